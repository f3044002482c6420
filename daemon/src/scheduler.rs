//! `pgseald run`: the scheduler.
//!
//! - Leader election: pgseal's leader lock (`pgseal._leader_try_lock()`, a lock tag SQL's
//!   advisory-lock functions cannot produce, so no other role can hold it). Every daemon keeps
//!   trying it every `leader_takeover_seconds / 2`; the leader's lock dies with its
//!   connection, so a standby takes over within `leader_takeover_seconds`.
//! - Jobs run one at a time on the leader's connection, each at its next cron time in
//!   the configured time zone, so a job never overlaps itself or another.
//! - A lost connection (Postgres restart) drops leadership; the daemon reconnects
//!   with capped exponential backoff and competes again.
//! - SIGTERM or SIGINT sets `STOP`: the current batch finishes, the daemon exits 0.

use std::io::Write;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use tokio_postgres::Client;

use crate::config::Config;
use crate::error::DaemonError;
use crate::{jobs, retention, rotate, STOP};

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Sleeps up to `d`, returning early when asked to stop.
async fn nap(d: Duration) {
    let until = tokio::time::Instant::now() + d;
    while !stopping() && tokio::time::Instant::now() < until {
        tokio::time::sleep((until - tokio::time::Instant::now()).min(Duration::from_millis(100)))
            .await;
    }
}

pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let url = cfg.database_url.clone().ok_or(DaemonError::Usage(
        "set database_url, PGSEALD_DATABASE_URL or --database-url",
    ))?;
    let poll = Duration::from_millis(cfg.leader_takeover_seconds * 500);
    let mut backoff = Duration::from_millis(250);
    while !stopping() {
        let client = match crate::connect(&url).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot reach the database ({e}); retrying in {:?}", backoff);
                nap(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_millis(250);
        // Compete for leadership on this connection until won or the connection dies.
        let won = loop {
            if stopping() {
                return Ok(());
            }
            match client
                .query_one("SELECT pgseal._leader_try_lock()", &[])
                .await
            {
                Ok(row) if row.get::<_, bool>(0) => break true,
                Ok(_) => nap(poll).await,
                Err(_) => break false,
            }
        };
        if !won {
            continue;
        }
        tracing::info!("became leader");
        crate::metrics::LEADER.store(1, Ordering::Relaxed);
        // Only the leader runs jobs, so a run still marked running was cut off (by a
        // crash, a kill or a lost connection).
        if let Err(e) = client
            .execute(
                "UPDATE pgseal.job_runs SET status = 'failed', finished_at = now(), \
                 detail = detail || '{\"error\": \"interrupted\"}' WHERE status = 'running'",
                &[],
            )
            .await
        {
            tracing::warn!("could not close interrupted job runs: {e}");
        }
        let mut client = client;
        match work(&mut client, &cfg).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                crate::metrics::LEADER.store(0, Ordering::Relaxed);
                tracing::warn!("lost leadership: {e}; reconnecting")
            }
        }
    }
    Ok(())
}

/// The leader's loop: run each job at its next scheduled time, until stopped or
/// the connection is lost.
async fn work(client: &mut Client, cfg: &Config) -> Result<(), DaemonError> {
    let tz = cfg.tz()?;
    let mut next: Vec<(&'static str, cron::Schedule, chrono::DateTime<Utc>)> = Vec::new();
    for (name, expr) in cfg.schedules() {
        let s = cron::Schedule::from_str(expr).map_err(|e| DaemonError::Config(e.to_string()))?;
        let at = s
            .upcoming(tz)
            .next()
            .ok_or_else(|| DaemonError::Config(format!("[{name}] never fires")))?;
        next.push((name, s, at.with_timezone(&Utc)));
    }
    if next.is_empty() {
        tracing::warn!("no job is configured; idling as leader");
    }
    loop {
        if stopping() {
            return Ok(());
        }
        if client.is_closed() {
            return Err(DaemonError::ConnectionLost);
        }
        let now = Utc::now();
        let due = next.iter().position(|(_, _, at)| *at <= now);
        let Some(i) = due else {
            let wait = next
                .iter()
                .map(|(_, _, at)| (*at - now).to_std().unwrap_or_default())
                .min();
            nap(wait
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1)))
            .await;
            continue;
        };
        let name = next[i].0;
        run_job(client, cfg, name).await?;
        let after = Utc::now().with_timezone(&tz);
        next[i].2 = next[i]
            .1
            .after(&after)
            .next()
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC);
    }
}

/// Runs one job and records it in `pgseal.job_runs`. A failed job is logged and
/// recorded; only a lost connection ends the leader's loop.
async fn run_job(client: &mut Client, cfg: &Config, name: &'static str) -> Result<(), DaemonError> {
    let id = match jobs::start(client, name).await {
        Ok(id) => id,
        Err(e) if client.is_closed() => return Err(e),
        Err(e) => {
            tracing::error!(job = name, "could not record the job start: {e}");
            return Ok(());
        }
    };
    let result = match name {
        "retention" => retention_job(client, cfg).await,
        "rotation" => rotation_job(client, cfg).await,
        _ => verification_job(client, cfg).await,
    };
    match result {
        Ok(detail) => {
            crate::metrics::JOBS_RUN.fetch_add(1, Ordering::Relaxed);
            tracing::info!(job = name, %detail, "job finished");
            jobs::finish(client, id, true, detail).await;
            Ok(())
        }
        Err(e) if client.is_closed() => Err(e),
        Err(e) => {
            crate::metrics::JOBS_RUN.fetch_add(1, Ordering::Relaxed);
            crate::metrics::JOBS_FAILED.fetch_add(1, Ordering::Relaxed);
            tracing::error!(job = name, "job failed: {e}");
            jobs::finish(
                client,
                id,
                false,
                serde_json::json!({ "error": e.to_string() }),
            )
            .await;
            Ok(())
        }
    }
}

async fn retention_job(
    client: &mut Client,
    cfg: &Config,
) -> Result<serde_json::Value, DaemonError> {
    let j = cfg
        .retention
        .as_ref()
        .expect("scheduled only when configured");
    let opts = retention::Options {
        dry_run: false,
        tenant: None,
        batch: j.batch,
        lock_timeout_ms: j.lock_timeout_ms,
        pause: Duration::from_millis(j.pause_ms),
    };
    let out = retention::run(client, &opts).await?;
    let deleted: u64 = out.iter().map(|o| o.rows).sum();
    crate::metrics::ROWS_DELETED.fetch_add(deleted, Ordering::Relaxed);
    let mut pruned = 0i64;
    if let Some(days) = j.ledger_keep_days {
        let keep = format!("{days} days");
        for t in crate::ledger::tenants(client).await? {
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
    }
    Ok(serde_json::json!({
        "deleted": deleted,
        "tenant_tables": out.len(),
        "longest_batch_ms": retention::longest_batch_ms(&out),
        "ledger_entries_pruned": pruned,
    }))
}

async fn rotation_job(client: &mut Client, cfg: &Config) -> Result<serde_json::Value, DaemonError> {
    let j = cfg
        .rotation
        .as_ref()
        .expect("scheduled only when configured");
    let age = format!("{} days", j.max_key_age_days);
    let due: Vec<String> = client
        .query("SELECT pgseal._rotation_due($1::text::interval)", &[&age])
        .await
        .map_err(DaemonError::Query)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut resealed = 0;
    for t in &due {
        if stopping() {
            break;
        }
        resealed += rotate::tenant(client, t, j.batch).await?.1;
    }
    // Values left under retired keys (an earlier run was interrupted) are resealed too.
    let leftover = client
        .query(
            "SELECT DISTINCT u.tenant_id, a.key_id FROM pgseal.key_usage u \
             JOIN pgseal.key_usage a ON a.tenant_id = u.tenant_id AND a.state = 'active' \
             WHERE u.state <> 'active' AND u.rows > 0",
            &[],
        )
        .await
        .map_err(DaemonError::Query)?;
    for r in leftover {
        if stopping() {
            break;
        }
        let (tenant, key): (String, String) = (r.get(0), r.get(1));
        resealed += rotate::reseal(client, &tenant, &key, j.batch).await?;
    }
    crate::metrics::ROWS_RESEALED.fetch_add(resealed, Ordering::Relaxed);
    Ok(serde_json::json!({ "rotated": due, "resealed": resealed }))
}

/// Verifies every tenant's chain and, when it verifies and still passes through
/// the tenant's last checkpoint, appends a new signed checkpoint to the file.
async fn verification_job(client: &Client, cfg: &Config) -> Result<serde_json::Value, DaemonError> {
    let j = cfg
        .verification
        .as_ref()
        .expect("scheduled only when configured");
    std::fs::create_dir_all(&j.checkpoint_dir)
        .map_err(|e| DaemonError::File(j.checkpoint_dir.display().to_string(), e.to_string()))?;
    let path = j.checkpoint_dir.join("checkpoints.jsonl");
    let last = last_checkpoints(&path)?;
    let mut failed = Vec::new();
    let mut written = 0;
    for tenant in crate::ledger::tenants(client).await? {
        // From the last checkpoint on: the entries before it were verified when it
        // was written, and the checkpoint's own hash is compared below.
        let from = last.get(&tenant).map(|(seq, _)| *seq);
        let o = crate::ledger::verify_one(client, &tenant, from).await?;
        let mut ok = o.ok;
        if let (true, Some((seq, hash))) = (ok, last.get(&o.tenant)) {
            let row = client
                .query_opt(
                    "SELECT encode(hash, 'hex') FROM pgseal.ledger WHERE tenant_id = $1 AND seq = $2",
                    &[&o.tenant, seq],
                )
                .await
                .map_err(DaemonError::Query)?;
            // A pruned seq is below the anchor and no longer comparable.
            if let Some(r) = row {
                ok = r.get::<_, String>(0) == *hash;
            }
        }
        if !ok {
            tracing::error!(tenant = %o.tenant, "ledger verification failed: {o}");
            crate::FAILED_VERIFICATIONS.fetch_add(1, Ordering::Relaxed);
            failed.push(o.tenant);
            continue;
        }
        // Nothing new since the last checkpoint (only its own entry was checked).
        if o.checked == 0 || (from.is_some() && o.checked == 1) {
            continue;
        }
        let cp: String = client
            .query_one("SELECT pgseal.ledger_checkpoint($1)::text", &[&o.tenant])
            .await
            .map_err(DaemonError::Query)?
            .get(0);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| DaemonError::File(path.display().to_string(), e.to_string()))?;
        writeln!(f, "{cp}")
            .map_err(|e| DaemonError::File(path.display().to_string(), e.to_string()))?;
        written += 1;
    }
    if failed.is_empty() {
        Ok(serde_json::json!({ "checkpoints": written }))
    } else {
        Err(DaemonError::VerifyFailed(failed))
    }
}

/// The newest (seq, hash) per tenant in the checkpoint file.
fn last_checkpoints(
    path: &Path,
) -> Result<std::collections::HashMap<String, (i64, String)>, DaemonError> {
    let mut out = std::collections::HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(out);
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let cp: pgseal_core::checkpoint::Checkpoint = serde_json::from_str(line)
            .map_err(|e| DaemonError::File(path.display().to_string(), e.to_string()))?;
        out.insert(cp.tenant.clone(), (cp.seq, cp.hash.clone()));
    }
    Ok(out)
}
