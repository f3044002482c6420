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
//! - Once `stop` is cancelled (SIGTERM or SIGINT), the job in hand finishes its
//!   current batch and `run` returns.

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::DaemonError;
use crate::job::{record, Job};

/// Sleeps `d`; false when `stop` was cancelled first.
async fn nap(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.cancelled() => false,
    }
}

pub async fn run(cfg: Config, stop: &CancellationToken) -> Result<(), DaemonError> {
    let url = cfg.database_url.clone().ok_or(DaemonError::Usage(
        "set database_url, PGSEALD_DATABASE_URL or --database-url",
    ))?;
    let poll = Duration::from_millis(cfg.leader_takeover_seconds * 500);
    let mut backoff = Duration::from_millis(250);
    while !stop.is_cancelled() {
        let mut client = match crate::db::connect(&url).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot reach the database ({e}); retrying in {:?}", backoff);
                nap(backoff, stop).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_millis(250);
        // Compete for leadership on this connection until won or the connection dies.
        let won = loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            match client
                .query_one("SELECT pgseal._leader_try_lock()", &[])
                .await
            {
                Ok(row) if row.get::<_, bool>(0) => break true,
                Ok(_) => {
                    nap(poll, stop).await;
                }
                Err(_) => break false,
            }
        };
        if !won {
            continue;
        }
        tracing::info!("became leader");
        crate::metrics::LEADER.store(1, Ordering::Relaxed);
        record::close_interrupted(&client).await;
        match work(&mut client, &cfg, stop).await {
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
async fn work(
    client: &mut Client,
    cfg: &Config,
    stop: &CancellationToken,
) -> Result<(), DaemonError> {
    let tz = cfg.tz()?;
    let mut next: Vec<(Job, cron::Schedule, chrono::DateTime<Utc>)> = Vec::new();
    for (job, expr) in Job::scheduled(cfg) {
        let s = cron::Schedule::from_str(expr).map_err(|e| DaemonError::Config(e.to_string()))?;
        let at = s
            .upcoming(tz)
            .next()
            .ok_or_else(|| DaemonError::Config(format!("[{job}] never fires")))?;
        next.push((job, s, at.with_timezone(&Utc)));
    }
    if next.is_empty() {
        tracing::warn!("no job is configured; idling as leader");
    }
    loop {
        if stop.is_cancelled() {
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
            nap(
                wait.unwrap_or(Duration::from_secs(1))
                    .min(Duration::from_secs(1)),
                stop,
            )
            .await;
            continue;
        };
        run_job(client, cfg, next[i].0, stop).await?;
        let after = Utc::now().with_timezone(&tz);
        next[i].2 = next[i]
            .1
            .after(&after)
            .next()
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC);
    }
}

/// Runs one job, recorded in `pgseal.job_runs`. A failed job is logged and
/// recorded; only a lost connection ends the leader's loop.
async fn run_job(
    client: &mut Client,
    cfg: &Config,
    job: Job,
    stop: &CancellationToken,
) -> Result<(), DaemonError> {
    let detail = |r: Result<&serde_json::Value, &DaemonError>| match r {
        Ok(detail) => detail.clone(),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    let name = job.name();
    match record::recorded(client, name, detail, async |c| job.run(c, cfg, stop).await).await {
        Err(e) if client.is_closed() => Err(e),
        Err(e) => {
            tracing::error!(job = name, "could not record the job start: {e}");
            Ok(())
        }
        Ok(Ok(detail)) => {
            tracing::info!(job = name, %detail, "job finished");
            Ok(())
        }
        Ok(Err(e)) if client.is_closed() => Err(e),
        Ok(Err(e)) => {
            tracing::error!(job = name, "job failed: {e}");
            Ok(())
        }
    }
}
