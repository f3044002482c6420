//! Retention: per-tenant hard deletes of expired rows, run by `pgseald retention
//! run` and by the scheduled job, which also prunes ledgers when configured.
//!
//! For every table with a rule and every tenant in it, the effective window is the
//! tenant's override, else the table's default; a tenant on legal hold is skipped.
//! A window's cutoff is taken once per run, when a sweep first needs it. The
//! expired rows of a tenant are found once (their ctids, in a held cursor) and
//! deleted in batches, each one transaction under the tenant's own context with a
//! `lock_timeout`, with a pause between batches; a batch's size is fixed or adapts
//! to a target time per transaction (`batch.rs`). Each tenant × table that had a
//! window ends with a 'retention.deleted' ledger receipt, committed with its last
//! batch. Once cancelled, the batch in hand is committed and receipted and the run
//! ends.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::batch::Batch;
use crate::config::RetentionJob;
use crate::error::DaemonError;

#[derive(Debug, Clone)]
pub struct Options {
    pub dry_run: bool,
    pub tenant: Option<String>,
    /// Rows per delete transaction: fixed, or adapted to a target time per batch.
    pub batch: Batch,
    pub lock_timeout_ms: u64,
    pub pause: Duration,
}

/// What one tenant × table run did (or would do, in a dry run).
#[derive(Debug)]
pub struct Outcome {
    pub rel: String,
    pub tenant: String,
    pub cutoff: String,
    pub rows: u64,
    pub on_hold: bool,
    /// The longest batch transaction, from BEGIN to COMMIT: the longest any lock
    /// the sweep took was held. Zero when nothing was deleted.
    pub longest_batch: std::time::Duration,
}

/// The longest batch of a run, in milliseconds.
pub fn longest_batch_ms(out: &[Outcome]) -> f64 {
    out.iter()
        .map(|o| o.longest_batch.as_secs_f64() * 1000.0)
        .fold(0.0, f64::max)
}

struct Rule {
    keep: String,
    time_column: String,
    /// SQL type of the time column (timestamptz, timestamp or date): a batch's time
    /// range compares in it, so that an index on the column serves it.
    time_type: String,
    /// Whether the time column is a `timestamptz`: it compares with the cutoff as
    /// a point in time; a `timestamp` or `date` with the cutoff as a local time
    /// (`Cutoff`).
    zoned: bool,
    /// SQL type of the table's tenant_id, so the tenant compares without a cast on
    /// the column (which would keep its index out of use).
    tenant_type: String,
    /// The search_path the sweep's statements run under: with the schemas of
    /// tenant_id's type, whose operators compare it (`tenant_tx`).
    search_path: String,
    /// Why the rule cannot be applied (its time column is gone or no longer a
    /// timestamp or date). The tenants it governs are skipped with a warning, never
    /// swept under another rule.
    broken: Option<&'static str>,
    /// A partitioned table, or one with inheritance children (which its deletes
    /// reach too): its deletes by ctid are planned as PostgreSQL chooses
    /// (`delete_expired`).
    partitioned: bool,
    /// A table Citus manages (distributed or reference): its rows' places are the
    /// shards' own, and differ between a reference table's copies, so its batches
    /// delete by time range alone (`Sweep::delete_expired`).
    citus: bool,
}

/// The scheduled job: a retention run over every tenant with the configured batches,
/// then, with `ledger_keep_days`, every tenant's ledger pruned to that age.
pub async fn scheduled(
    client: &mut Client,
    j: &RetentionJob,
    stop: &CancellationToken,
) -> Result<serde_json::Value, DaemonError> {
    let opts = Options {
        dry_run: false,
        tenant: None,
        batch: Batch::new(j.batch, j.batch_ms),
        lock_timeout_ms: j.lock_timeout_ms,
        pause: Duration::from_millis(j.pause_ms),
    };
    let out = run(client, &opts, stop).await?;
    let deleted: u64 = out.iter().map(|o| o.rows).sum();
    crate::metrics::ROWS_DELETED.fetch_add(deleted, Ordering::Relaxed);
    let pruned = match j.ledger_keep_days {
        Some(days) => prune_ledgers(client, days, stop).await?,
        None => 0,
    };
    Ok(serde_json::json!({
        "deleted": deleted,
        "tenant_tables": out.len(),
        "longest_batch_ms": longest_batch_ms(&out),
        "ledger_entries_pruned": pruned,
    }))
}

/// Prunes every tenant's ledger to `days` with `ledger_prune`, which keeps an
/// anchor so the chain still verifies; returns the entries pruned.
async fn prune_ledgers(
    client: &Client,
    days: f64,
    stop: &CancellationToken,
) -> Result<i64, DaemonError> {
    // In whole microseconds, PostgreSQL's interval resolution.
    let keep = format!("{:.6} seconds", days * 86_400.0);
    let mut pruned = 0i64;
    for t in crate::ledger::tenants(client).await? {
        if stop.is_cancelled() {
            break;
        }
        // Where the prune stops (every entry before it goes): the first entry young
        // enough to keep, or, in a chain with none that young (a tenant that
        // appended nothing for longer), past its last entry (the prune's receipt
        // then starts it again); never past the first entry a retention hold keeps
        // (`pgseal._ledger_held_from`: a held tenant's whole chain, and in the
        // audit writer's chain the records of a held tenant's decrypts), which
        // ledger_prune refuses to prune. Nothing when all that would go is earlier
        // prunes' receipts (a quiet chain is not pruned again on every run). Never
        // younger than pgseal.ledger_min_retention, which ledger_prune enforces
        // like the holds.
        let first: Option<i64> = client
            .query_one(
                "WITH c AS ( \
                   SELECT least( \
                            coalesce(min(l.seq) FILTER (WHERE l.recorded_at >= now() - greatest($2::text::interval, \
                                         current_setting('pgseal.ledger_min_retention')::interval)), \
                                     max(l.seq) + 1), \
                            pgseal._ledger_held_from($1)) AS cut \
                     FROM pgseal.ledger l WHERE l.tenant_id = $1 \
                   HAVING count(*) > 0) \
                 SELECT (SELECT c.cut FROM c WHERE EXISTS (SELECT 1 FROM pgseal.ledger l \
                            WHERE l.tenant_id = $1 AND l.seq < c.cut AND l.event <> 'ledger.pruned'))",
                &[&t, &keep],
            )
            .await
            .map_err(DaemonError::Query)?
            .get(0);
        if let Some(seq) = first {
            match client
                .query_one("SELECT pgseal.ledger_prune($1, $2)", &[&t, &seq])
                .await
            {
                Ok(row) => pruned += row.get::<_, i64>(0),
                // Refused for a hold or a minimum retention set after the query
                // read them: the next run prunes what they then allow.
                Err(e)
                    if e.code()
                        == Some(
                            &tokio_postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
                        ) =>
                {
                    tracing::warn!(tenant = ?t, "ledger not pruned: {e}");
                }
                Err(e) => return Err(DaemonError::Query(e)),
            }
        }
    }
    Ok(pruned)
}

/// One retention run: what each tenant × table had deleted (or would have, in a
/// dry run), up to where `stop` ended it.
pub async fn run(
    client: &mut Client,
    opts: &Options,
    stop: &CancellationToken,
) -> Result<Vec<Outcome>, DaemonError> {
    // The session's styles again (`db::connect` sets them; a table owner's trigger
    // in an earlier run on this connection may have changed them).
    client
        .batch_execute(crate::db::STYLES)
        .await
        .map_err(DaemonError::Query)?;
    // (rel, tenant or "" for the default) → rule
    let mut rules: BTreeMap<String, BTreeMap<String, Rule>> = BTreeMap::new();
    // The time column by its number, so a RENAME COLUMN is followed. A rule the
    // schema broke (issue 17) is skipped with a warning and the run goes on: a table
    // that is gone, no longer a plain or partitioned table, or without tenant_id, as
    // a whole; a rule whose time column is gone or of another type, alone.
    let schemas = super::tenant_tx::type_schemas_sql("r.rel", "a.attname = 'tenant_id'");
    for r in client
        .query(
            &format!("SELECT r.rel::text, coalesce(r.tenant_id, ''), r.keep::text, quote_ident(a.attname), \
                    (SELECT format_type(t.atttypid, t.atttypmod) FROM pg_attribute t \
                      WHERE t.attrelid = r.rel AND t.attname = 'tenant_id' AND NOT t.attisdropped), \
                    coalesce(c.relkind IN ('r', 'p'), false), \
                    a.atttypid IN ('timestamptz'::regtype, 'timestamp'::regtype, 'date'::regtype), \
                    format_type(a.atttypid, NULL), \
                    {}, coalesce(a.atttypid = 'timestamptz'::regtype, false), coalesce(c.relkind = 'p' OR c.relhassubclass, false) \
             FROM pgseal.retention_rules r \
             LEFT JOIN pg_class c ON c.oid = r.rel \
             LEFT JOIN pg_attribute a ON a.attrelid = r.rel AND a.attnum = r.time_attnum AND NOT a.attisdropped",
                schemas
            ),
            &[],
        )
        .await
        .map_err(DaemonError::Query)?
    {
        let (rel, tenant): (String, String) = (r.get(0), r.get(1));
        let time_column: Option<String> = r.get(3);
        let tenant_type: Option<String> = r.get(4);
        let table_broken = if !r.get::<_, bool>(5) {
            Some("the table is gone, or is no longer a plain or partitioned table")
        } else if tenant_type.is_none() {
            Some("the table has no tenant_id column")
        } else {
            None
        };
        if let Some(why) = table_broken {
            tracing::warn!(table = %rel, tenant = %tenant, "skipping a retention rule: {why}");
            continue;
        }
        let broken = if time_column.is_none() {
            Some("its time column is gone")
        } else if r.get::<_, Option<bool>>(6) != Some(true) {
            Some("its time column is no longer a timestamp or date")
        } else {
            None
        };
        rules.entry(rel).or_default().insert(
            tenant,
            Rule {
                keep: r.get(2),
                time_column: time_column.unwrap_or_default(),
                time_type: r.get::<_, Option<String>>(7).unwrap_or_default(),
                tenant_type: tenant_type.unwrap_or_default(),
                zoned: r.get(9),
                search_path: super::tenant_tx::search_path(r.get(8)),
                partitioned: r.get(10),
                citus: false,
                broken,
            },
        );
    }
    // The tables Citus manages, by the same text as the rules' (regclass printed
    // under pgseald's path).
    let citus_tables: Vec<String> = if client
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await
        .map_err(DaemonError::Query)?
        .get(0)
    {
        client
            .query(
                "SELECT logicalrelid::pg_catalog.regclass::text FROM pg_catalog.pg_dist_partition",
                &[],
            )
            .await
            .map_err(DaemonError::Query)?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        Vec::new()
    };
    for (rel, by_tenant) in rules.iter_mut() {
        let citus = citus_tables.contains(rel);
        for rule in by_tenant.values_mut() {
            rule.citus = citus;
        }
    }
    let holds: Vec<String> = client
        .query("SELECT tenant_id FROM pgseal.retention_holds", &[])
        .await
        .map_err(DaemonError::Query)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let session = if opts.dry_run {
        None
    } else {
        Some(Session::read(client).await?)
    };
    // One cutoff per window per run (as of the run's first use of it), asked once.
    let mut cutoffs: BTreeMap<String, Cutoff> = BTreeMap::new();
    let mut out = Vec::new();
    // One batch size for the whole run: what one tenant's batches taught carries over.
    let mut batch = opts.batch;
    for (rel, by_tenant) in &rules {
        let tenants: Vec<String> = match &opts.tenant {
            Some(t) => vec![t.clone()],
            // Waiting for a lock no longer than a batch would (on Citus, each node
            // that lists a shard's tenants waits that long at most too).
            None => {
                let tx = client.transaction().await.map_err(DaemonError::Query)?;
                if opts.lock_timeout_ms > 0 {
                    tx.execute(
                        "SELECT pg_catalog.set_config('lock_timeout', $1, true)",
                        &[&format!("{}ms", opts.lock_timeout_ms)],
                    )
                    .await
                    .map_err(DaemonError::Query)?;
                }
                let listed = tx
                    .query("SELECT pgseal._tenants_of($1::text::regclass)", &[rel])
                    .await
                    .map_err(DaemonError::Query)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                tx.commit().await.map_err(DaemonError::Query)?;
                listed
            }
        };
        for tenant in tenants {
            if stop.is_cancelled() {
                return Ok(out);
            }
            let Some(rule) = by_tenant.get(&tenant).or_else(|| by_tenant.get("")) else {
                continue;
            };
            if super::tenant_tx::skip_pgseal_chain("retention", &tenant) {
                continue;
            }
            if let Some(why) = rule.broken {
                tracing::warn!(table = %rel, tenant = %tenant, "skipping a retention rule: {why}");
                continue;
            }
            let cutoff = match cutoffs.get(&rule.keep) {
                Some(c) => c.clone(),
                None => {
                    let r = client
                        .query_one(CUTOFF, &[&rule.keep])
                        .await
                        .map_err(DaemonError::Query)?;
                    let c = Cutoff {
                        at: r.get(0),
                        local: r.get(1),
                    };
                    cutoffs.insert(rule.keep.clone(), c.clone());
                    c
                }
            };
            if holds.contains(&tenant) {
                tracing::info!(table = %rel, tenant = %tenant, "legal hold: nothing deleted");
                out.push(Outcome {
                    rel: rel.clone(),
                    tenant,
                    cutoff: cutoff.at,
                    rows: 0,
                    on_hold: true,
                    longest_batch: Default::default(),
                });
                continue;
            }
            let (rows, longest_batch) = match &session {
                None => (
                    count_expired(client, rel, &tenant, rule, &cutoff, opts).await?,
                    Default::default(),
                ),
                Some(session) => {
                    let sweep = Sweep {
                        rel,
                        tenant: &tenant,
                        rule,
                        cutoff: &cutoff,
                        opts,
                        session,
                    };
                    sweep.run(client, &mut batch, stop).await?
                }
            };
            out.push(Outcome {
                rel: rel.clone(),
                tenant,
                cutoff: cutoff.at,
                rows,
                on_hold: false,
                longest_batch,
            });
        }
    }
    Ok(out)
}

async fn count_expired(
    client: &mut Client,
    rel: &str,
    tenant: &str,
    rule: &Rule,
    cutoff: &Cutoff,
    opts: &Options,
) -> Result<u64, DaemonError> {
    let tx = batch_transaction(client, tenant, &rule.search_path, opts).await?;
    let n: i64 = tx
        .query_one(
            &format!(
                "SELECT count(*) FROM {rel} WHERE tenant_id = $1::text::{} AND {} < {}",
                rule.tenant_type,
                rule.time_column,
                rule.cutoff_sql()
            ),
            &[&tenant, &cutoff.of(rule)],
        )
        .await
        .map_err(DaemonError::Query)?
        .get(0);
    tx.rollback().await.map_err(DaemonError::Query)?;
    Ok(n as u64)
}

/// Sent in each batch transaction of a plain table before its delete by ctid
/// (`Sweep::delete_expired`), on PostgreSQL before 18. Index and bitmap scans stay
/// on: there a disabled scan on the inner side of a nested loop is costed as
/// disabled once per outer row, which would steer the joins of what the delete runs
/// (triggers, policies' functions, foreign keys) to scans of whole tables. Function
/// calls, not `SET`s: Citus would send a `SET LOCAL` to the workers.
const SEQSCAN_OFF: &str = "SELECT pg_catalog.set_config('enable_seqscan', 'off', true)";

/// `SEQSCAN_OFF` on PostgreSQL 18 and later, which plans by the number of disabled
/// scans first and their cost after: with every kind of table scan off, a plan of
/// what the delete runs weighs as it would (one disabled scan per table either way),
/// and the delete's own scan needs index and bitmap scans off too when the table's
/// row level security adds a test of the tenant an index serves.
const SCANS_OFF: &str = "SELECT pg_catalog.set_config('enable_seqscan', 'off', true), \
                                pg_catalog.set_config('enable_indexscan', 'off', true), \
                                pg_catalog.set_config('enable_bitmapscan', 'off', true)";

/// The settings a batch transaction changes for itself (`batch_transaction`,
/// `SCANS_OFF`) that a receipt sets again (`Sweep::append_receipt`): to the
/// session's values, but for `lock_timeout` in a tenant's last batch
/// (`RECEIPT_LOCK_TIMEOUT_MS`).
const BATCH_SETTINGS: [&str; 5] = [
    "lock_timeout",
    "search_path",
    "enable_seqscan",
    "enable_indexscan",
    "enable_bitmapscan",
];

/// The longest a receipt in a tenant's last batch waits for a lock (the tenant's
/// chain lock, its ledger key's creation) while the batch holds its rows' locks:
/// the batch's `lock_timeout` when shorter, and well under PostgreSQL's default
/// `deadlock_timeout` (1 s), so that a session holding the chain lock that then
/// waits for one of the batch's rows is held up at most that long, and usually finds
/// a batch that gave up waiting (`Sweep::receipt_in_batch`; the deadlock check runs
/// in whichever of the two waited `deadlock_timeout` first, and that one fails).
const RECEIPT_LOCK_TIMEOUT_MS: u64 = 200;

/// A window's cutoff as text (`now()` less the window). Times travel as text
/// between pgseald and the server (the cutoff; each batch's bounds, which the
/// cursor returns alike): as JSON prints them, in ISO 8601 with a numeric offset
/// whatever `DateStyle` the session has or a Citus worker's connection has (Citus
/// does not send it pgseald's, and a table owner's trigger may change the
/// session's), so that they read back as the same time.
const CUTOFF: &str = "SELECT pg_catalog.to_jsonb(x.at) OPERATOR(pg_catalog.#>>) '{}', \
                             pg_catalog.to_jsonb(x.at::pg_catalog.timestamp) OPERATOR(pg_catalog.#>>) '{}' \
                        FROM (SELECT pg_catalog.now() OPERATOR(pg_catalog.-) $1::text::pg_catalog.interval) x(at)";

/// A window's cutoff (`CUTOFF`), as a point in time and as the local time it is in
/// pgseald's session (its `TimeZone`). A `timestamp` or `date` column compares with
/// the local time, a time of its own kind, with no zone in the comparison: compared
/// with the point in time, each value would be converted under the `TimeZone` of
/// the session that runs the comparison, which on Citus is a worker's connection
/// (Citus does not send it pgseald's), and Citus refuses such a conversion (a
/// stable function of a column) in a DELETE: the run failed (0A000) on a Citus
/// table with a `timestamp` column.
#[derive(Clone)]
struct Cutoff {
    /// The point in time (`now()` less the window), as JSON prints a `timestamptz`:
    /// what the receipt records.
    at: String,
    /// The same, as a `timestamp` in pgseald's session.
    local: String,
}

impl Cutoff {
    /// The text `rule`'s column compares with (`Rule::cutoff_sql`).
    fn of(&self, rule: &Rule) -> &str {
        if rule.zoned {
            &self.at
        } else {
            &self.local
        }
    }
}

impl Rule {
    /// The cutoff as the statements read it, from `$2` (`Cutoff::of`).
    fn cutoff_sql(&self) -> &'static str {
        if self.zoned {
            "$2::text::pg_catalog.timestamptz"
        } else {
            "$2::text::pg_catalog.timestamp"
        }
    }
}

/// The held cursor over one tenant's expired rows (`Sweep::delete_expired`).
const CURSOR: &str = "pgseald_expired";

/// What a run asks the server once, before its first sweep.
struct Session {
    /// PostgreSQL 18 or later, which counts disabled scans (`SCANS_OFF`).
    counts_disabled: bool,
    /// The session's values of `BATCH_SETTINGS`, in that order.
    settings: Vec<String>,
}

impl Session {
    async fn read(client: &mut Client) -> Result<Session, DaemonError> {
        let names: Vec<&str> = BATCH_SETTINGS.to_vec();
        let row = client
            .query_one(
                "SELECT pg_catalog.current_setting('server_version_num')::int4 >= 180000, \
                        ARRAY(SELECT pg_catalog.current_setting(n) \
                                FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS s(n, i) ORDER BY i)",
                &[&names],
            )
            .await
            .map_err(DaemonError::Query)?;
        // A cursor an earlier failed run left on this connection (each sweep closes
        // its own in its last batch).
        client
            .batch_execute("CLOSE ALL")
            .await
            .map_err(DaemonError::Query)?;
        Ok(Session {
            counts_disabled: row.get(0),
            settings: row.get(1),
        })
    }
}

/// One tenant's sweep of one table.
struct Sweep<'a> {
    rel: &'a str,
    tenant: &'a str,
    rule: &'a Rule,
    cutoff: &'a Cutoff,
    opts: &'a Options,
    session: &'a Session,
}

impl Sweep<'_> {
    /// The tenant's expired rows: their FROM and WHERE, with the tenant as $1 and
    /// the cutoff as $2.
    fn expired(&self) -> String {
        format!(
            "FROM {} WHERE tenant_id = $1::text::{} AND {} < {}",
            self.rel,
            self.rule.tenant_type,
            self.rule.time_column,
            self.rule.cutoff_sql()
        )
    }

    /// Deletes the tenant's expired rows and appends their receipt
    /// (`delete_expired`); returns the rows deleted and the longest batch. A sweep
    /// that fails after some of its batches committed still tries to append the
    /// receipt of those (a warning says when that fails too) before its error ends
    /// the run: no batch is left without a receipt because a later one failed.
    async fn run(
        &self,
        client: &mut Client,
        batch: &mut Batch,
        stop: &CancellationToken,
    ) -> Result<(u64, Duration), DaemonError> {
        let mut committed = 0u64;
        let result = self
            .delete_expired(client, batch, stop, &mut committed)
            .await;
        if result.is_err() && committed > 0 {
            if let Err(e) = self.receipt(client, committed).await {
                tracing::warn!(
                    table = %self.rel, tenant = %self.tenant, rows = committed, error = %e,
                    "a failed retention sweep's committed deletes have no receipt"
                );
            }
        }
        result
    }

    /// Deletes the tenant's expired rows in batch transactions sized by `batch`,
    /// which learns from each, and appends the receipt in the last; returns the rows
    /// deleted and the longest batch, and keeps in `committed` the rows of the
    /// batches committed without a receipt.
    ///
    /// The expired rows are found once: their ctids are kept in a cursor WITH HOLD,
    /// which PostgreSQL materialises when the transaction that declares it commits
    /// (not when the tenant's rows fit one batch: it is closed there), and each batch
    /// deletes the next ones by ctid. A batch that searched the table again would pass every row the
    /// batches before it deleted: a bitmap heap scan visits their dead tuples' pages
    /// again (they stay in the index until vacuum), so a tenant's sweep grew with the
    /// square of its batches. Each delete re-checks the tenant and the cutoff: a
    /// ctid whose row was updated or deleted meanwhile names a dead version and is
    /// skipped, and one a vacuum gave to a new row deletes it only if that row is
    /// expired too. A row updated while the delete waits for its lock is checked
    /// again in its new version (READ COMMITTED), which goes only if it is still the
    /// tenant's and still expired.
    ///
    /// The receipt commits with the last batch: a run that fails there leaves that
    /// batch's rows in place, never deleted without their receipt.
    async fn delete_expired(
        &self,
        client: &mut Client,
        batch: &mut Batch,
        stop: &CancellationToken,
        committed: &mut u64,
    ) -> Result<(u64, Duration), DaemonError> {
        let (rel, rule) = (self.rel, self.rule);
        // A plain table's delete is a TID scan of the batch's ctids, never a scan of
        // the (tenant, time) index with the ctids as a filter, which the planner chose
        // on a 4M-row table for batches of 8k of a tenant's 40k rows: it read every
        // expired row of the tenant, and the dead versions the batches before it left,
        // once per batch, so a tenant's sweep grew with the square of its batches; nor
        // a scan of the whole table, which it chose for batches of 8k rows in a 1M-row
        // one (docs/BENCHMARKS.md, "Retention's delete as a TID scan"). The tenant and
        // the cutoff are re-checked as `IS TRUE` tests, which no index serves (the same
        // rows in a WHERE clause), and each batch turns sequential scans off for itself
        // (`SEQSCAN_OFF`, `SCANS_OFF`): no other path is left, but one row level
        // security may add on PostgreSQL before 18, where pgseald's role is under the
        // table's policies. Not for a partitioned table (or one with children): the
        // cutoff prunes its partitions, and a TID scan would probe every partition left
        // with every ctid of the batch (a ctid does not name its partition).
        //
        // Where the planner may still choose an index of the tenant (a partitioned
        // table; the table's row level security on pgseald's role before PostgreSQL
        // 18, whose test of the tenant an index serves), the cursor returns the rows
        // in time order with their times, and each delete is also bounded by its
        // batch's first and last time ($4, $5, in the column's own type), which an
        // index of (tenant, time) serves: such a scan then reads the batch's time
        // range, not every expired row of the tenant, and a partitioned table's batch
        // is pruned to the partitions of its range. Not elsewhere: there the bounds
        // would be the one test an index serves, and a misjudged range could have the
        // planner scan a whole (tenant, time) index for them; and the cursor returns
        // places alone, in no order (with a time's text for every row, the bench's
        // sweep at N measured a quarter slower: docs/BENCHMARKS.md, runs J8–J10).
        let range = format!(
            "{time} >= $4::text::{ty} AND {time} <= $5::text::{ty}",
            time = rule.time_column,
            ty = rule.time_type
        );
        let ranged_delete = |ranged: bool| {
            let range = if ranged {
                range.as_str()
            } else {
                "$4::text IS NOT NULL AND $5::text IS NOT NULL"
            };
            if rule.citus {
                // A Citus table: by the batch's time range alone, the same rows on
                // every copy of a reference table, and routed to the tenant's shard
                // of a distributed one. Rows at the range's last time past the
                // batch go with it (they are expired too).
                format!(
                    "DELETE {} AND {range} AND $3::text[] IS NOT NULL",
                    self.expired()
                )
            } else if rule.partitioned {
                format!(
                    "DELETE {} AND {range} AND ctid = ANY ($3::text[]::tid[])",
                    self.expired()
                )
            } else {
                format!(
                    "DELETE FROM {rel} WHERE (tenant_id = $1::text::{}) IS TRUE \
                       AND ({} < {}) IS TRUE AND {range} \
                       AND ctid = ANY ($3::text[]::tid[])",
                    rule.tenant_type,
                    rule.time_column,
                    rule.cutoff_sql()
                )
            }
        };
        // The cursor is declared, and the first batch's ctids taken from it, in a
        // transaction that deletes nothing: its commit materialises the cursor (a
        // read of every expired row of the tenant), which no batch's locks then wait
        // on. A tenant whose rows fit one batch closes it there, before its commit:
        // nothing is materialised.
        let mut open = true;
        let delete;
        let mut first = {
            let size = batch.size();
            let tx = self.batch_transaction(client).await?;
            // Under `pgseal.strict_context` every cursor WITH HOLD is closed when its
            // transaction commits (so none carries a tenant's rows to the next client
            // of a pooled connection); each batch then searches the table again. Asked
            // for each sweep: a reload may change it during a run.
            let row = tx
                .query_one(
                    "SELECT coalesce(pg_catalog.current_setting('pgseal.strict_context', true), 'off')::bool, \
                            pg_catalog.row_security_active($1::text::pg_catalog.regclass)",
                    &[&rel],
                )
                .await
                .map_err(DaemonError::Query)?;
            let (strict, under_rls): (bool, bool) = (row.get(0), row.get(1));
            let ranged =
                rule.citus || rule.partitioned || (under_rls && !self.session.counts_disabled);
            delete = ranged_delete(ranged);
            // Ordered by the column itself, named with its table: a bare name would
            // order by the output column of that name, the time's text.
            let declare = if ranged {
                format!(
                    "DECLARE {CURSOR} NO SCROLL CURSOR WITH HOLD FOR \
                     SELECT ctid::text AS pgseal_place, \
                            pg_catalog.to_jsonb({time}) OPERATOR(pg_catalog.#>>) '{{}}' AS pgseal_time \
                     {} ORDER BY {rel}.{time}",
                    self.expired(),
                    time = rule.time_column
                )
            } else {
                format!(
                    "DECLARE {CURSOR} NO SCROLL CURSOR WITH HOLD FOR \
                     SELECT ctid::text AS pgseal_place, ''::text AS pgseal_time {}",
                    self.expired()
                )
            };
            if strict {
                tx.rollback().await.map_err(DaemonError::Query)?;
                return self
                    .delete_expired_by_search(client, batch, stop, committed)
                    .await;
            }
            tx.execute(&declare, &[&self.tenant, &self.cutoff.of(self.rule)])
                .await
                .map_err(DaemonError::Query)?;
            let rows = fetch(&tx, size).await?;
            if (rows.ctids.len() as i64) < size {
                close(&tx).await?;
                open = false;
            }
            tx.commit().await.map_err(DaemonError::Query)?;
            Some((rows, size))
        };
        let mut swept = Swept {
            total: 0,
            longest: Duration::ZERO,
            committed,
        };
        loop {
            let began = std::time::Instant::now();
            let tx = self.batch_transaction(client).await?;
            if !rule.partitioned && !rule.citus {
                tx.batch_execute(if self.session.counts_disabled {
                    SCANS_OFF
                } else {
                    SEQSCAN_OFF
                })
                .await
                .map_err(DaemonError::Query)?;
            }
            let (rows, size) = match first.take() {
                Some(taken) => taken,
                None => {
                    let size = batch.size();
                    match fetch(&tx, size).await {
                        Ok(rows) => (rows, size),
                        // `pgseal.strict_context` turned on during the sweep: the
                        // commit before closed the cursor. The rest is searched for.
                        Err(DaemonError::Query(e))
                            if e.code() == Some(&SqlState::INVALID_CURSOR_NAME) =>
                        {
                            tx.rollback().await.map_err(DaemonError::Query)?;
                            tracing::info!(
                                table = %self.rel, tenant = %self.tenant,
                                "pgseal.strict_context closed the sweep's cursor: the rest is searched for"
                            );
                            let Swept {
                                longest, committed, ..
                            } = swept;
                            let (total, l) = self
                                .delete_expired_by_search(client, batch, stop, committed)
                                .await?;
                            return Ok((total, l.max(longest)));
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            if let Some((lo, hi)) = &rows.range {
                swept.total += tx
                    .execute(
                        &delete,
                        &[
                            &self.tenant,
                            &self.cutoff.of(self.rule),
                            &rows.ctids,
                            lo,
                            hi,
                        ],
                    )
                    .await
                    .map_err(DaemonError::Query)?;
            }
            // Once cancelled, the batch in hand is the last.
            let last = (rows.ctids.len() as i64) < size || stop.is_cancelled();
            if last && open {
                close(&tx).await?;
            }
            let found = rows.ctids.len() as u64;
            let receipted = self
                .commit_batch(tx, began, found, last, batch, &mut swept)
                .await?;
            if self
                .after_batch(client, last, receipted, stop, &mut swept, true)
                .await?
            {
                return Ok((swept.total, swept.longest));
            }
        }
    }

    /// `delete_expired` without a held cursor: each batch deletes the next expired
    /// rows it finds, searching the table again (it passes the dead versions of the
    /// rows the batches before it deleted until a vacuum, so a large sweep slows as it
    /// goes). The delete re-checks the tenant and the cutoff as the cursor's does:
    /// partitions reuse ctids, so a ctid alone could name a live row of another
    /// partition. A batch that found fewer rows than asked is the last; one whose
    /// rows were changed under it (deleted fewer than it found) is not.
    async fn delete_expired_by_search(
        &self,
        client: &mut Client,
        batch: &mut Batch,
        stop: &CancellationToken,
        committed: &mut u64,
    ) -> Result<(u64, Duration), DaemonError> {
        let expired = self.expired();
        let delete = if self.rule.citus {
            // A Citus table (see `delete_expired`): the batch is the tenant's oldest
            // `$3` expired rows by time, bounded by the time of the last of them
            // (all that are left when fewer are), the same rows on every copy of a
            // reference table.
            format!(
                "WITH d AS (DELETE {expired} AND {time} <= coalesce( \
                              (SELECT {time} {expired} ORDER BY {rel}.{time} OFFSET $3::int8 - 1 LIMIT 1), \
                              'infinity'::{ty}) RETURNING 1) \
                 SELECT count(*), count(*) FROM d",
                time = self.rule.time_column,
                rel = self.rel,
                ty = self.rule.time_type
            )
        } else {
            format!(
                "WITH s AS (SELECT ctid {expired} LIMIT $3), \
                      d AS (DELETE {expired} AND ctid = ANY (ARRAY(SELECT ctid FROM s)) RETURNING 1) \
                 SELECT (SELECT count(*) FROM s), (SELECT count(*) FROM d)"
            )
        };
        let mut swept = Swept {
            total: *committed,
            longest: Duration::ZERO,
            committed,
        };
        loop {
            let size = batch.size();
            let began = std::time::Instant::now();
            let tx = self.batch_transaction(client).await?;
            let row = tx
                .query_one(&delete, &[&self.tenant, &self.cutoff.of(self.rule), &size])
                .await
                .map_err(DaemonError::Query)?;
            let (found, n) = (row.get::<_, i64>(0), row.get::<_, i64>(1) as u64);
            swept.total += n;
            let last = found < size || stop.is_cancelled();
            let receipted = self
                .commit_batch(tx, began, found as u64, last, batch, &mut swept)
                .await?;
            if self
                .after_batch(client, last, receipted, stop, &mut swept, false)
                .await?
            {
                return Ok((swept.total, swept.longest));
            }
        }
    }

    /// Ends a batch of the sweep that found `found` rows: the last one (`last`)
    /// appends the receipt of the sweep's rows in it when it gets the chain lock in
    /// time (`receipt_in_batch`), then it commits, and `batch` learns its pace.
    /// Returns whether the receipt went with it.
    async fn commit_batch(
        &self,
        tx: tokio_postgres::Transaction<'_>,
        began: std::time::Instant,
        found: u64,
        last: bool,
        batch: &mut Batch,
        swept: &mut Swept<'_>,
    ) -> Result<bool, DaemonError> {
        let (mut receipted, mut receipt_took) = (false, Duration::ZERO);
        if last {
            let at = std::time::Instant::now();
            receipted = self.receipt_in_batch(&tx, swept.total).await?;
            receipt_took = at.elapsed();
        }
        tx.commit().await.map_err(DaemonError::Query)?;
        let took = began.elapsed();
        if !receipted {
            *swept.committed = swept.total;
        }
        // The size learns from the deletes, not from a wait for the chain lock.
        batch.observe(found, took.saturating_sub(receipt_took));
        swept.longest = swept.longest.max(took);
        Ok(receipted)
    }

    /// After a batch committed: the last one's receipt in a transaction of its own
    /// when it did not go with the batch, or else the pause before the next batch,
    /// which a stop cuts short (the held cursor closed, with `cursor`, and the
    /// receipt of the rows so far appended). Returns whether the sweep ended.
    async fn after_batch(
        &self,
        client: &mut Client,
        last: bool,
        receipted: bool,
        stop: &CancellationToken,
        swept: &mut Swept<'_>,
        cursor: bool,
    ) -> Result<bool, DaemonError> {
        if !last {
            tokio::select! {
                _ = tokio::time::sleep(self.opts.pause) => return Ok(false),
                _ = stop.cancelled() => {}
            }
            if cursor {
                client
                    .batch_execute("CLOSE ALL")
                    .await
                    .map_err(DaemonError::Query)?;
            }
        }
        if !last || !receipted {
            self.receipt(client, swept.total).await?;
        }
        *swept.committed = 0;
        Ok(true)
    }

    /// Appends the receipt for `rows` in `tx`, the tenant's last batch, so that the
    /// batch's rows go only with their receipt (an error in it takes the batch with
    /// it). The receipt waits for a lock (the tenant's chain lock) no longer than
    /// `RECEIPT_LOCK_TIMEOUT_MS` or the batch's `lock_timeout`, whichever is shorter:
    /// the batch holds its rows' locks meanwhile, and a session that holds the chain
    /// lock and then waits for one of those rows would deadlock with it. When a lock
    /// is not had in that time (or the deadlock is found first), the receipt is
    /// undone (to a savepoint) and `false` returned: the batch commits without it,
    /// and `receipt` appends it after, holding no lock of the batch while it waits.
    async fn receipt_in_batch(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        rows: u64,
    ) -> Result<bool, DaemonError> {
        tx.batch_execute("SAVEPOINT pgseald_receipt")
            .await
            .map_err(DaemonError::Query)?;
        let wait = match self.opts.lock_timeout_ms {
            0 => RECEIPT_LOCK_TIMEOUT_MS,
            ms => ms.min(RECEIPT_LOCK_TIMEOUT_MS),
        };
        match self.append_receipt(tx, rows, Some(wait)).await {
            Ok(()) => Ok(true),
            Err(DaemonError::Query(e))
                if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
                    || e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) =>
            {
                tx.batch_execute("ROLLBACK TO SAVEPOINT pgseald_receipt")
                    .await
                    .map_err(DaemonError::Query)?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The tenant's 'retention.deleted' receipt for `rows`, in a transaction of its
    /// own (a sweep cancelled between two batches, or whose last batch did not get
    /// the tenant's chain lock in time, or one that failed after some batches
    /// committed), under the session's settings: READ COMMITTED, so that the chain's
    /// head it appends after is the one its lock waited for.
    async fn receipt(&self, client: &mut Client, rows: u64) -> Result<(), DaemonError> {
        let tx = super::tenant_tx::read_committed(client).await?;
        self.append_receipt(&tx, rows, None).await?;
        tx.commit().await.map_err(DaemonError::Query)
    }

    /// Appends the receipt in `tx`, the tenant's last batch (or a transaction of its
    /// own), with the session's values of `BATCH_SETTINGS`, but for a `lock_timeout`
    /// of `lock_wait_ms` when given.
    async fn append_receipt(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        rows: u64,
        lock_wait_ms: Option<u64>,
    ) -> Result<(), DaemonError> {
        let names: Vec<&str> = BATCH_SETTINGS.to_vec();
        let mut values = self.session.settings.clone();
        if let (Some(ms), Some(i)) = (
            lock_wait_ms,
            BATCH_SETTINGS.iter().position(|n| *n == "lock_timeout"),
        ) {
            values[i] = format!("{ms}ms");
        }
        // The actor is 'pgseald' (the user setting); the entry's payload also names the
        // database role pgseald connected as.
        tx.execute(
            "SELECT pgseal.set_tenant($1, 'pgseald'), \
                    (SELECT pg_catalog.count(pg_catalog.set_config(s.n, s.v, true)) \
                       FROM ROWS FROM (pg_catalog.unnest($2::text[]), pg_catalog.unnest($3::text[])) AS s(n, v))",
            &[&self.tenant, &names, &values],
        )
        .await
        .map_err(DaemonError::Query)?;
        let payload = serde_json::json!({
            "table": self.rel, "cutoff": self.cutoff.at, "keep": self.rule.keep, "deleted": rows,
        });
        // 'retention.' is one of pgseal's reserved event names, which ledger_append
        // refuses; pgseald's receipts go through the narrow _job_receipt (pgseal_admin).
        tx.execute(
            "SELECT pgseal._job_receipt('retention.deleted', $1::text::jsonb)",
            &[&payload.to_string()],
        )
        .await
        .map_err(DaemonError::Query)?;
        Ok(())
    }

    async fn batch_transaction<'c>(
        &self,
        client: &'c mut Client,
    ) -> Result<tokio_postgres::Transaction<'c>, DaemonError> {
        batch_transaction(client, self.tenant, &self.rule.search_path, self.opts).await
    }
}

/// A tenant's sweep so far: the rows it deleted, its longest batch, and the rows
/// committed without their receipt (`committed`, the run's record: a failure then
/// appends their receipt).
struct Swept<'a> {
    total: u64,
    longest: Duration,
    committed: &'a mut u64,
}

/// A batch's rows from the held cursor: their places, and the first and last of
/// their times (as text; the cursor returns them in time order).
struct Fetched {
    ctids: Vec<String>,
    range: Option<(String, String)>,
}

/// The next `size` rows of the held cursor.
async fn fetch(tx: &tokio_postgres::Transaction<'_>, size: i64) -> Result<Fetched, DaemonError> {
    let rows = tx
        .query(&format!("FETCH FORWARD {size} FROM {CURSOR}"), &[])
        .await
        .map_err(DaemonError::Query)?;
    Ok(Fetched {
        ctids: rows.iter().map(|r| r.get(0)).collect(),
        range: rows
            .first()
            .zip(rows.last())
            .map(|(a, b)| (a.get(1), b.get(1))),
    })
}

/// Closes the held cursor in `tx`: closed before its transaction commits, it is
/// not materialised there. `CLOSE ALL`, which does not fail when a commit under
/// `pgseal.strict_context` closed it already (pgseald opens no other cursor).
async fn close(tx: &tokio_postgres::Transaction<'_>) -> Result<(), DaemonError> {
    tx.batch_execute("CLOSE ALL")
        .await
        .map_err(DaemonError::Query)
}

/// Opens one batch's transaction (`tenant_tx`): its lock timeout bounds every
/// lock the batch waits for, the tenant's context is set for row-level security,
/// and `search_path` holds the schemas of tenant_id's type.
async fn batch_transaction<'a>(
    client: &'a mut Client,
    tenant: &str,
    search_path: &str,
    opts: &Options,
) -> Result<tokio_postgres::Transaction<'a>, DaemonError> {
    super::tenant_tx::begin(
        client,
        tenant,
        search_path,
        &format!("{}ms", opts.lock_timeout_ms),
    )
    .await
}
