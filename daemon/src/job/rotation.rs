//! Key rotation: `pgseald rotate kek`, `pgseald rotate tenant <id>`, and the
//! scheduled job that rotates keys past their age.
//!
//! The crypto stays in the extension: `kek_rewrap` rewraps tenant keys in batches,
//! `tenant_key_rotate` makes a new data key, and `vault_rewrap` reseals each value
//! under it. Every batch is its own transaction under the tenant's context, and each
//! row is updated only if it still holds the value read, so a concurrent update wins
//! and a rerun after a crash picks up whatever is left. Once cancelled, the batch in
//! hand is committed and the run ends; the values left are resealed by the next run.

use std::sync::atomic::Ordering;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::batch::Batch;
use crate::config::RotationJob;
use crate::error::DaemonError;
use crate::progress::Progress;

/// `pgseal.job_runs`' name of a `pgseald rotate kek` run.
pub const KEK_RUN: &str = "rotate.kek";
/// `pgseal.job_runs`' name of a `pgseald rotate tenant` run.
pub const TENANT_RUN: &str = "rotate.tenant";

/// The scheduled job: rotates every tenant key that `_rotation_due` names, then
/// reseals the values still under retired keys (left by an interrupted run).
///
/// A tenant whose rotation or reseal fails (a value in its rows that no key opens,
/// a lock it holds) is logged and passed over: the tenants after it are rotated all
/// the same, and the run then fails naming the tenants it could not finish, so
/// `job_runs` shows it. One tenant's rows must not stop every other tenant's keys
/// from rotating. A lost connection still ends the run at once.
pub async fn scheduled(
    client: &mut Client,
    j: &RotationJob,
    stop: &CancellationToken,
) -> Result<serde_json::Value, DaemonError> {
    let age = format!("{} days", j.max_key_age_days);
    let due: Vec<String> = client
        .query("SELECT pgseal._rotation_due($1::text::interval)", &[&age])
        .await
        .map_err(DaemonError::Query)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut resealed = 0;
    let mut rotated = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    // One batch size for the whole run: what one tenant's batches taught carries over.
    let mut batch = Batch::new(j.batch, j.batch_ms);
    for t in &due {
        if stop.is_cancelled() {
            break;
        }
        if super::tenant_tx::skip_pgseal_chain("rotation", t) {
            continue;
        }
        match tenant(client, t, &mut batch, stop).await {
            Ok((_, n)) => {
                resealed += n;
                rotated.push(t.clone());
            }
            Err(e) => passed_over(client, t, e, &mut failed)?,
        }
    }
    // Values left under a retired key: a count of none known (a registered table
    // pgseal could not count, named in the server's warnings) is not taken for zero.
    let leftover = client
        .query(
            "WITH k AS MATERIALIZED (SELECT * FROM pgseal.key_usage) \
             SELECT DISTINCT u.tenant_id, a.key_id, u.rows IS NULL FROM k u \
             JOIN k a ON a.tenant_id = u.tenant_id AND a.state = 'active' \
             WHERE u.state <> 'active' AND u.rows IS DISTINCT FROM 0",
            &[],
        )
        .await
        .map_err(DaemonError::Query)?;
    let usage_known = !leftover.iter().any(|r| r.get::<_, bool>(2));
    if !usage_known {
        tracing::warn!(
            "key usage is not known for a registered table (the server's warnings name it): every tenant with a retired key is resealed"
        );
    }
    for r in leftover {
        if stop.is_cancelled() {
            break;
        }
        let (tenant, key): (String, String) = (r.get(0), r.get(1));
        // A tenant that failed above would fail again the same way.
        if failed.contains(&tenant) || super::tenant_tx::skip_pgseal_chain("reseal", &tenant) {
            continue;
        }
        match reseal(client, &tenant, &key, &mut batch, stop).await {
            Ok(n) => resealed += n,
            Err(e) => passed_over(client, &tenant, e, &mut failed)?,
        }
    }
    crate::metrics::ROWS_RESEALED.fetch_add(resealed, Ordering::Relaxed);
    if !failed.is_empty() {
        return Err(DaemonError::TenantsFailed {
            job: "rotation",
            failed,
            done: format!(
                "{} tenant keys rotated, {resealed} values resealed",
                rotated.len()
            ),
        });
    }
    Ok(
        serde_json::json!({ "rotated": rotated, "resealed": resealed, "key_usage_known": usage_known }),
    )
}

/// A tenant's failed rotation or reseal: logged and added to `failed`, unless the
/// connection is gone (then the run cannot go on, and the error ends it).
fn passed_over(
    client: &Client,
    tenant: &str,
    e: DaemonError,
    failed: &mut Vec<String>,
) -> Result<(), DaemonError> {
    if client.is_closed() {
        return Err(e);
    }
    tracing::error!(tenant = ?tenant, "rotation of this tenant failed, going on with the others: {e}");
    failed.push(tenant.to_owned());
    Ok(())
}

/// Runs `kek_rewrap(batch)` until it returns 0 or `stop` is cancelled; returns the
/// keys rewrapped. Each call is one transaction: `batch` sizes it.
pub async fn kek(
    client: &Client,
    mut batch: Batch,
    stop: &CancellationToken,
) -> Result<i64, DaemonError> {
    let remaining: i64 = client
        .query_one(
            "SELECT count(*) FROM pgseal.tenant_keys WHERE state <> 'destroyed' \
             AND kek_version <> (SELECT active_version FROM pgseal.vault_status())",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0);
    let bar = Progress::new("rewrapping tenant keys", remaining as u64);
    let mut total = 0i64;
    loop {
        let size = batch.size().clamp(1, i32::MAX as i64) as i32;
        let began = std::time::Instant::now();
        let n: i32 = client
            .query_one("SELECT pgseal.kek_rewrap($1)", &[&size])
            .await
            .map_err(DaemonError::Query)?
            .get(0);
        batch.observe(n.max(0) as u64, began.elapsed());
        if n == 0 {
            break;
        }
        total += n as i64;
        bar.inc(n as u64);
        if stop.is_cancelled() {
            break;
        }
    }
    bar.finish();
    Ok(total)
}

/// One registered sealed column.
struct SealedColumn {
    rel: String,
    /// The column's current name, quoted (found by its number, so a RENAME COLUMN
    /// is followed); empty when the column is gone.
    col: String,
    context: Option<String>,
    /// Quoted primary key columns, and their SQL types.
    pk: Vec<String>,
    pk_types: Vec<String>,
    /// Whether each key column is a date or time (its base type's category): its
    /// text goes back to pgseald as JSON prints it (`batch_sql`).
    pk_dated: Vec<bool>,
    /// SQL type of the table's tenant_id.
    tenant_type: String,
    /// The search_path a batch runs under: pg_catalog, then the schemas of the
    /// key's and tenant_id's types (and of their base types) that are not built
    /// in, such as citext's, whose operators the batch's comparisons must be.
    search_path: String,
    /// Why the registration cannot be resealed (table or column gone, not text, no
    /// primary key, no tenant_id); such a registration is skipped with a warning.
    broken: Option<&'static str>,
}

async fn sealed_columns(client: &Client) -> Result<Vec<SealedColumn>, DaemonError> {
    let key_columns = "a.attname = 'tenant_id' OR a.attnum = ANY ( \
           SELECT unnest(i.indkey::int2[]) FROM pg_index i \
            WHERE i.indrelid = s.rel AND i.indisprimary)";
    let schemas = super::tenant_tx::type_schemas_sql("s.rel", key_columns);
    let open_schemas = super::tenant_tx::open_type_schemas_sql("s.rel", key_columns);
    let rows = client
        .query(
            &format!("SELECT s.rel::text, quote_ident(c.attname), s.context, pk.names, pk.types, \
                    (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                      WHERE a.attrelid = s.rel AND a.attname = 'tenant_id' AND NOT a.attisdropped), \
                    coalesce(r.relkind IN ('r', 'p'), false), c.atttypid = 'text'::regtype, \
                    {}, {}, pk.dated \
             FROM pgseal.sealed_columns s \
             LEFT JOIN pg_class r ON r.oid = s.rel \
             LEFT JOIN pg_attribute c ON c.attrelid = s.rel AND c.attnum = s.attnum AND NOT c.attisdropped \
             LEFT JOIN LATERAL ( \
                    SELECT array_agg(quote_ident(a.attname) ORDER BY k.ord) AS names, \
                           array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord) AS types, \
                           array_agg(t.typcategory = 'D' ORDER BY k.ord) AS dated \
                      FROM pg_index i \
                      CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                      JOIN pg_type t ON t.oid = a.atttypid \
                     WHERE i.indrelid = s.rel AND i.indisprimary) pk ON true \
             ORDER BY 1, 2", schemas, open_schemas),
            &[],
        )
        .await
        .map_err(DaemonError::Query)?;
    Ok(rows
        .iter()
        .map(|r| {
            let col: Option<String> = r.get(1);
            let pk = r.get::<_, Option<Vec<String>>>(3).unwrap_or_default();
            let tenant_type: Option<String> = r.get(5);
            let broken = if !r.get::<_, bool>(6) {
                Some("the table is gone, or is no longer a plain or partitioned table")
            } else if col.is_none() {
                Some("the column is gone")
            } else if r.get::<_, Option<bool>>(7) != Some(true) {
                Some("the column is no longer of type text")
            } else if pk.is_empty() {
                Some("the table has no primary key")
            } else if tenant_type.is_none() {
                Some("the table has no tenant_id column")
            } else if r.get::<_, bool>(9) {
                // Left off the batch's path (`tenant_tx`), such a type would compare
                // by its base type's operators, in another order than its index's:
                // the key ranges would skip rows.
                Some("a key or tenant_id column's type lives in a schema every role may create in, which pgseald does not put on its path (revoke CREATE on that schema from PUBLIC)")
            } else {
                None
            };
            SealedColumn {
                rel: r.get(0),
                col: col.unwrap_or_default(),
                context: r.get(2),
                pk,
                pk_types: r.get::<_, Option<Vec<String>>>(4).unwrap_or_default(),
                pk_dated: r.get::<_, Option<Vec<bool>>>(10).unwrap_or_default(),
                tenant_type: tenant_type.unwrap_or_default(),
                search_path: super::tenant_tx::search_path(r.get(8)),
                broken,
            }
        })
        .collect())
}

/// Rotates the tenant's data key, then reseals every registered column's values
/// under older keys. Returns (new key id, values resealed).
pub async fn tenant(
    client: &mut Client,
    tenant: &str,
    batch: &mut Batch,
    stop: &CancellationToken,
) -> Result<(String, u64), DaemonError> {
    let key_id: String = client
        .query_one("SELECT pgseal.tenant_key_rotate($1)", &[&tenant])
        .await
        .map_err(DaemonError::Query)?
        .get(0);
    let resealed = reseal(client, tenant, &key_id, batch, stop).await?;
    Ok((key_id, resealed))
}

/// The statement that reseals one batch: it walks the tenant's rows in primary key
/// order from just after `$5` (the previous batch's last key, as a JSON array; NULL
/// to start), so each batch reads only its own rows, and returns how many it
/// resealed, the last key it read, how many rows it read, and how many of them
/// needed a new seal. `$4` rows make a batch.
///
/// Without Citus (`routed` false) the batch is one UPDATE over a key range: the
/// range's end is the `$4`-th key after `$5` (read from the index alone), and the
/// UPDATE reseals the rows of the range whose value is under another key. Under
/// READ COMMITTED a row another transaction updated meanwhile is checked again in
/// its new version, and resealed from its new value if that still needs it, so a
/// concurrent update is never overwritten. This is a quarter cheaper than the
/// routed form below (no materialised read, no TID scan, no join).
///
/// With Citus the new values are made in the read, not in the update: Citus refuses
/// a volatile function in an UPDATE of a distributed table. The update then reaches
/// the rows read by their ctids (a TID scan) and joins them by primary key (joined
/// by primary key alone, PostgreSQL 18 plans a hash join over a scan of the whole
/// table, on every batch), and sets a row only if it still holds the value read
/// (compare-and-set: a concurrent update wins, and the batch runs again). With
/// `tenant_id = $1` on both the read and the update, the whole statement goes to
/// the tenant's shard as it is (without it on the update, Citus cannot plan it).
fn batch_sql(c: &SealedColumn, routed: bool) -> String {
    let pk = c.pk.join(", ");
    // The statement's own names for the key's columns (pgseal_k0, …), given by
    // column alias lists, so that no column of the table can shadow them.
    let k: Vec<String> = (0..c.pk.len()).map(|i| format!("pgseal_k{i}")).collect();
    // The last key goes back to pgseald as a JSON array of each column's text form
    // (a JSON number or string could change the value: a jsonb column holding "5"),
    // and each column is read back with its type's input function. A date or time
    // as JSON prints it (ISO 8601, a numeric offset), not as its output function
    // does: on Citus the text is printed and read on the tenant's worker, under that
    // connection's `DateStyle` and `TimeZone` (Citus does not send it pgseald's),
    // where a zone's abbreviation can read back as another zone's (Asia/Shanghai's
    // CST as US Central) or not at all.
    let last_key = k
        .iter()
        .enumerate()
        .map(|(i, k)| {
            if c.pk_dated.get(i).copied().unwrap_or(false) {
                format!("pg_catalog.to_jsonb({k}) OPERATOR(pg_catalog.#>>) '{{}}'")
            } else {
                format!("{k}::text")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let k_desc = k
        .iter()
        .map(|k| format!("{k} DESC"))
        .collect::<Vec<_>>()
        .join(", ");
    // The keyset compares the key after a leading tenant_id, which `tenant_id = $1`
    // already fixes: a row comparison that starts with it makes the btree start each
    // batch at the tenant's first row and filter its way to the last batch's end.
    let after: Vec<(usize, &String)> =
        c.pk.iter()
            .enumerate()
            .skip_while(|(_, k)| k.as_str() == "tenant_id")
            .collect();
    let cols = |prefix: &str| -> String {
        let v: Vec<String> = after.iter().map(|(_, k)| format!("{prefix}{k}")).collect();
        v.join(", ")
    };
    let keyset = |prefix: &str| -> String {
        if after.is_empty() {
            return "FALSE".to_owned();
        }
        let last: Vec<String> = after
            .iter()
            .map(|(i, _)| format!("($5::text::jsonb ->> {i})::{}", c.pk_types[*i]))
            .collect();
        format!("({}) > ({})", cols(prefix), last.join(", "))
    };
    if !routed {
        // The range's end: the batch's last key, each column read from `b`. A key of
        // tenant_id alone (one row per tenant) has no range but the tenant's row.
        let upper = if after.is_empty() {
            "EXISTS (SELECT FROM b)".to_owned()
        } else {
            let ends: Vec<String> = after
                .iter()
                .map(|(i, _)| format!("(SELECT {} FROM b)", k[*i]))
                .collect();
            format!("({}) <= ({})", cols("t."), ends.join(", "))
        };
        return format!(
            "WITH r AS (SELECT {pk} FROM {rel} \
                        WHERE tenant_id = $1::text::{tt} AND ($5::text IS NULL OR {keyset}) \
                        ORDER BY {pk} LIMIT $4), \
                  b({ks}, pgseal_rows) AS ( \
                        SELECT {pk}, (SELECT count(*) FROM r) FROM r ORDER BY {desc} LIMIT 1), \
                  u AS (UPDATE {rel} AS t SET {col} = pgseal.vault_rewrap(t.{col}, $3) \
                        WHERE t.tenant_id = $1::text::{tt} AND ($5::text IS NULL OR {keyset_t}) AND {upper} \
                          AND t.{col} LIKE 'v2:%' AND split_part(t.{col}, ':', 2) <> $2 RETURNING 1) \
             SELECT (SELECT count(*) FROM u), (SELECT jsonb_build_array({last_key})::text FROM b), \
                    coalesce((SELECT pgseal_rows FROM b), 0), (SELECT count(*) FROM u)",
            rel = c.rel,
            col = c.col,
            tt = c.tenant_type,
            ks = k.join(", "),
            keyset = keyset(""),
            keyset_t = keyset("t."),
            desc = c
                .pk
                .iter()
                .map(|k| format!("{k} DESC"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    // The update finds each row by its ctid, then checks it is the row read by the
    // rest of its primary key: tenant_id is left out of that join, since both sides
    // already fix it to $1. With it in, the planner carries `tenant_id = $1` over to
    // the read rows as a filter it cannot estimate (0.5% of them), expects five, and
    // joins them to the TID scan by a nested loop: every row compared with every row,
    // 80 ms for a batch of 1,000 where the hash join it picks without it takes 5.
    let join: Vec<String> =
        c.pk.iter()
            .zip(&k)
            .filter(|(c, _)| c.as_str() != "tenant_id")
            .map(|(c, k)| format!("t.{c} = s.{k}"))
            .collect();
    // A primary key of tenant_id alone (one row per tenant) leaves nothing to join on
    // but the ctid.
    let join = if join.is_empty() {
        vec!["t.ctid = s.pgseal_tid".to_owned()]
    } else {
        join
    };
    format!(
        "WITH s(pgseal_tid, {ks}, pgseal_old, pgseal_new) AS ( \
                    SELECT ctid, {pk}, {col}, \
                           CASE WHEN {col} LIKE 'v2:%' AND split_part({col}, ':', 2) <> $2 \
                                THEN pgseal.vault_rewrap({col}, $3) END \
                    FROM {rel} \
                    WHERE tenant_id = $1::text::{tt} AND ($5::text IS NULL OR {keyset}) \
                    ORDER BY {pk} LIMIT $4), \
              u AS (UPDATE {rel} AS t SET {col} = s.pgseal_new FROM s \
                    WHERE t.tenant_id = $1::text::{tt} AND t.ctid = ANY (ARRAY(SELECT pgseal_tid FROM s)) AND {join} AND t.{col} = s.pgseal_old \
                      AND s.pgseal_new IS NOT NULL RETURNING 1) \
         SELECT (SELECT count(*) FROM u), (SELECT jsonb_build_array({last_key})::text FROM s ORDER BY {k_desc} LIMIT 1), \
                (SELECT count(*) FROM s), \
                (SELECT count(*) FROM s WHERE s.pgseal_new IS NOT NULL)",
        rel = c.rel,
        col = c.col,
        tt = c.tenant_type,
        ks = k.join(", "),
        keyset = keyset(""),
        join = join.join(" AND "),
    )
}

/// How often a batch runs again when rows were updated under it (`reseal`).
const RESEAL_RETRIES: u32 = 3;

/// How long a reseal batch waits for a row lock, and how often it is tried again
/// after such a wait (or a deadlock, or a serialization failure) before the
/// tenant's reseal fails.
const RESEAL_LOCK_TIMEOUT: &str = "1s";
const RESEAL_LOCK_RETRIES: u32 = 5;

/// One batch, in its own transaction (`tenant_tx`: READ COMMITTED whatever the
/// database's default, which `batch_sql`'s re-check of updated rows relies on)
/// under the tenant's context, the key types' search_path and `RESEAL_LOCK_TIMEOUT`.
async fn reseal_batch(
    client: &mut Client,
    tenant: &str,
    active: &str,
    c: &SealedColumn,
    sql: &str,
    size: i64,
    last: &Option<String>,
) -> Result<tokio_postgres::Row, DaemonError> {
    let tx = super::tenant_tx::begin(client, tenant, &c.search_path, RESEAL_LOCK_TIMEOUT).await?;
    let row = tx
        .query_one(sql, &[&tenant, &active, &c.context, &size, last])
        .await
        .map_err(DaemonError::Query)?;
    tx.commit().await.map_err(DaemonError::Query)?;
    Ok(row)
}

/// Reseals the tenant's registered values that are not under `active`, in
/// batches sized by `batch` (which learns from each), each batch one transaction.
/// A concurrent update is never overwritten: a row updated under the batch is
/// resealed from its new value, or (on Citus) left to the concurrent value
/// (`batch_sql`).
pub async fn reseal(
    client: &mut Client,
    tenant: &str,
    active: &str,
    batch: &mut Batch,
    stop: &CancellationToken,
) -> Result<u64, DaemonError> {
    let mut total = 0u64;
    // Citus tables take the routed form of the batch (see `batch_sql`).
    let routed: bool = client
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await
        .map_err(DaemonError::Query)?
        .get(0);
    for c in sealed_columns(client).await? {
        if stop.is_cancelled() {
            break;
        }
        // A registration the schema broke (issue 17) is skipped: the others are
        // resealed all the same.
        if let Some(why) = c.broken {
            tracing::warn!(table = %c.rel, column = %c.col, "skipping a sealed column registration: {why}");
            continue;
        }
        let sql = batch_sql(&c, routed);
        let bar = Progress::new(&format!("resealing {}.{}", c.rel, c.col), 0);
        let mut last: Option<String> = None;
        let mut retries = 0;
        let mut lock_retries = 0;
        loop {
            let size = batch.size();
            let began = std::time::Instant::now();
            let row = match reseal_batch(client, tenant, active, &c, &sql, size, &last).await {
                Ok(row) => row,
                // A row lock held past the batch's lock_timeout (or a deadlock, or a
                // serialization failure): the batch is tried again a few times, then
                // the error ends this tenant's reseal, and the scheduled job goes on
                // to the next tenant. A session that holds a lock cannot stall it.
                Err(DaemonError::Query(e))
                    if lock_retries < RESEAL_LOCK_RETRIES
                        && !stop.is_cancelled()
                        && e.code().is_some_and(|c| {
                            [
                                SqlState::LOCK_NOT_AVAILABLE,
                                SqlState::T_R_DEADLOCK_DETECTED,
                                SqlState::T_R_SERIALIZATION_FAILURE,
                            ]
                            .contains(c)
                        }) =>
                {
                    lock_retries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            lock_retries = 0;
            let n = row.get::<_, i64>(0) as u64;
            // Rows read, not rows resealed, measure the batch: a batch of values
            // already under the new key reads its rows and writes none.
            batch.observe(row.get::<_, i64>(2) as u64, began.elapsed());
            total += n;
            bar.inc(n);
            // On Citus a row another transaction updated while the batch ran has a
            // new ctid, and the update passed it by: the same batch runs again (a row
            // whose sealed value itself changed no longer needs resealing then), up
            // to RESEAL_RETRIES times; a row still left is the next run's.
            let needed = row.get::<_, i64>(3) as u64;
            if n < needed && retries < RESEAL_RETRIES && !stop.is_cancelled() {
                retries += 1;
                continue;
            }
            retries = 0;
            let next = row.get::<_, Option<String>>(1);
            // The key must move on: one that reads back as itself (a type whose text
            // form is not exact) would repeat the same batch for ever.
            if next.is_some() && next == last {
                return Err(DaemonError::NoProgress(format!(
                    "the reseal of {}.{} did not move past a key: its primary key's text form does not read back exactly",
                    c.rel, c.col
                )));
            }
            last = next;
            if last.is_none() || stop.is_cancelled() {
                break;
            }
        }
        bar.finish();
    }
    Ok(total)
}
