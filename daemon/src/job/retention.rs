//! Retention: per-tenant hard deletes of expired rows, run by `pgseald retention
//! run` and by the scheduled job, which also prunes ledgers when configured.
//!
//! For every table with a rule and every tenant in it, the effective window is the
//! tenant's override, else the table's default; a tenant on legal hold is skipped.
//! Deletes go in keyset batches (by ctid), each one transaction under the tenant's
//! own context with a `lock_timeout`, with a pause between batches. Each tenant ×
//! table that had a window ends with a 'retention.deleted' ledger receipt. Once
//! cancelled, the batch in hand is committed and receipted and the run ends.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionJob;
use crate::error::DaemonError;

#[derive(Debug, Clone)]
pub struct Options {
    pub dry_run: bool,
    pub tenant: Option<String>,
    pub batch: i64,
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
    /// SQL type of the table's tenant_id, so the tenant compares without a cast on
    /// the column (which would keep its index out of use).
    tenant_type: String,
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
        batch: j.batch,
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
    days: u32,
    stop: &CancellationToken,
) -> Result<i64, DaemonError> {
    let keep = format!("{days} days");
    let mut pruned = 0i64;
    for t in crate::ledger::tenants(client).await? {
        if stop.is_cancelled() {
            break;
        }
        // The first entry young enough to keep; everything before it goes. Never
        // younger than pgseal.ledger_min_retention, which ledger_prune enforces,
        // and nothing for a tenant under a legal hold (ledger_prune refuses both).
        let first: Option<i64> = client
            .query_one(
                "SELECT min(seq) FROM pgseal.ledger WHERE tenant_id = $1 \
                 AND NOT EXISTS (SELECT 1 FROM pgseal.retention_holds h WHERE h.tenant_id = $1) \
                 AND recorded_at >= now() - greatest($2::text::interval, \
                     current_setting('pgseal.ledger_min_retention')::interval)",
                &[&t, &keep],
            )
            .await
            .map_err(DaemonError::Query)?
            .get(0);
        if let Some(seq) = first {
            pruned += client
                .query_one("SELECT pgseal.ledger_prune($1, $2)", &[&t, &seq])
                .await
                .map_err(DaemonError::Query)?
                .get::<_, i64>(0);
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
    // (rel, tenant or "" for the default) → rule
    let mut rules: BTreeMap<String, BTreeMap<String, Rule>> = BTreeMap::new();
    for r in client
        .query(
            "SELECT r.rel::text, coalesce(r.tenant_id, ''), r.keep::text, quote_ident(r.time_column), \
                    (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                      WHERE a.attrelid = r.rel AND a.attname = 'tenant_id' AND NOT a.attisdropped) \
             FROM pgseal.retention_rules r",
            &[],
        )
        .await
        .map_err(DaemonError::Query)?
    {
        rules.entry(r.get(0)).or_default().insert(
            r.get(1),
            Rule { keep: r.get(2), time_column: r.get(3), tenant_type: r.get::<_, Option<String>>(4).unwrap_or_else(|| "text".into()) },
        );
    }
    let holds: Vec<String> = client
        .query("SELECT tenant_id FROM pgseal.retention_holds", &[])
        .await
        .map_err(DaemonError::Query)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut out = Vec::new();
    for (rel, by_tenant) in &rules {
        let tenants: Vec<String> = match &opts.tenant {
            Some(t) => vec![t.clone()],
            None => client
                .query("SELECT pgseal._tenants_of($1::text::regclass)", &[rel])
                .await
                .map_err(DaemonError::Query)?
                .iter()
                .map(|r| r.get(0))
                .collect(),
        };
        for tenant in tenants {
            if stop.is_cancelled() {
                return Ok(out);
            }
            let Some(rule) = by_tenant.get(&tenant).or_else(|| by_tenant.get("")) else {
                continue;
            };
            let cutoff: String = client
                .query_one("SELECT (now() - $1::text::interval)::text", &[&rule.keep])
                .await
                .map_err(DaemonError::Query)?
                .get(0);
            if holds.contains(&tenant) {
                tracing::info!(table = %rel, tenant = %tenant, "legal hold: nothing deleted");
                out.push(Outcome {
                    rel: rel.clone(),
                    tenant,
                    cutoff,
                    rows: 0,
                    on_hold: true,
                    longest_batch: Default::default(),
                });
                continue;
            }
            let (rows, longest_batch) = if opts.dry_run {
                (
                    count_expired(client, rel, &tenant, rule, &cutoff).await?,
                    Default::default(),
                )
            } else {
                let (n, longest) =
                    delete_expired(client, rel, &tenant, rule, &cutoff, opts, stop).await?;
                receipt(client, rel, &tenant, rule, &cutoff, n).await?;
                (n, longest)
            };
            out.push(Outcome {
                rel: rel.clone(),
                tenant,
                cutoff,
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
    cutoff: &str,
) -> Result<u64, DaemonError> {
    let tx = client.transaction().await.map_err(DaemonError::Query)?;
    tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])
        .await
        .map_err(DaemonError::Query)?;
    let n: i64 = tx
        .query_one(
            &format!(
                "SELECT count(*) FROM {rel} WHERE tenant_id = $1::text::{} AND {} < $2::text::timestamptz",
                rule.tenant_type, rule.time_column
            ),
            &[&tenant, &cutoff],
        )
        .await
        .map_err(DaemonError::Query)?
        .get(0);
    tx.rollback().await.map_err(DaemonError::Query)?;
    Ok(n as u64)
}

async fn delete_expired(
    client: &mut Client,
    rel: &str,
    tenant: &str,
    rule: &Rule,
    cutoff: &str,
    opts: &Options,
    stop: &CancellationToken,
) -> Result<(u64, std::time::Duration), DaemonError> {
    let sql = format!(
        "DELETE FROM {rel} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {rel} \
         WHERE tenant_id = $1::text::{} AND {} < $2::text::timestamptz LIMIT $3))",
        rule.tenant_type, rule.time_column
    );
    let mut total = 0u64;
    let mut longest = std::time::Duration::ZERO;
    loop {
        let began = std::time::Instant::now();
        let tx = client.transaction().await.map_err(DaemonError::Query)?;
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{}ms'",
            opts.lock_timeout_ms
        ))
        .await
        .map_err(DaemonError::Query)?;
        tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])
            .await
            .map_err(DaemonError::Query)?;
        let n = tx
            .execute(&sql, &[&tenant, &cutoff, &opts.batch])
            .await
            .map_err(DaemonError::Query)?;
        tx.commit().await.map_err(DaemonError::Query)?;
        longest = longest.max(began.elapsed());
        total += n;
        // Once cancelled, the batch just committed is the last.
        if (n as i64) < opts.batch || stop.is_cancelled() {
            return Ok((total, longest));
        }
        tokio::select! {
            _ = tokio::time::sleep(opts.pause) => {}
            _ = stop.cancelled() => return Ok((total, longest)),
        }
    }
}

async fn receipt(
    client: &mut Client,
    rel: &str,
    tenant: &str,
    rule: &Rule,
    cutoff: &str,
    rows: u64,
) -> Result<(), DaemonError> {
    let tx = client.transaction().await.map_err(DaemonError::Query)?;
    // The actor is 'pgseald' (the user setting); the entry's payload also names the
    // database role pgseald connected as.
    tx.execute("SELECT pgseal.set_tenant($1, 'pgseald')", &[&tenant])
        .await
        .map_err(DaemonError::Query)?;
    let payload = serde_json::json!({
        "table": rel, "cutoff": cutoff, "keep": rule.keep, "deleted": rows,
    });
    // 'retention.' is one of pgseal's reserved event names, which ledger_append
    // refuses; pgseald's receipts go through the narrow _job_receipt (pgseal_admin).
    tx.execute(
        "SELECT pgseal._job_receipt('retention.deleted', $1::text::jsonb)",
        &[&payload.to_string()],
    )
    .await
    .map_err(DaemonError::Query)?;
    tx.commit().await.map_err(DaemonError::Query)?;
    Ok(())
}
