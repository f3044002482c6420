//! The bounded job history in `pgseal.job_runs`: a row per run of a job, written
//! only here.

use std::sync::atomic::Ordering;

use tokio_postgres::Client;

use crate::error::DaemonError;
use crate::metrics;

/// Runs `body` as one run named `name` in `pgseal.job_runs`: a 'running' row
/// first, then 'ok' or 'failed' with the `detail` of the outcome, and the run
/// counted in the metrics. A body that failed because the connection is gone is
/// neither recorded nor counted: the next leader closes its row as interrupted.
///
/// The outer error means the start could not be recorded, and `body` did not run;
/// the inner result is the body's own.
pub async fn recorded<T>(
    client: &mut Client,
    name: &str,
    detail: impl FnOnce(Result<&T, &DaemonError>) -> serde_json::Value,
    body: impl AsyncFnOnce(&mut Client) -> Result<T, DaemonError>,
) -> Result<Result<T, DaemonError>, DaemonError> {
    let id = start(client, name).await?;
    let result = body(client).await;
    if result.is_err() && client.is_closed() {
        return Ok(result);
    }
    metrics::JOBS_RUN.fetch_add(1, Ordering::Relaxed);
    if result.is_err() {
        metrics::JOBS_FAILED.fetch_add(1, Ordering::Relaxed);
    }
    finish(client, id, result.is_ok(), detail(result.as_ref())).await;
    Ok(result)
}

/// Marks every run still 'running' as failed and interrupted. Called by a new
/// leader: only the leader runs jobs, so such a run was cut off (by a crash, a kill
/// or a lost connection).
pub async fn close_interrupted(client: &Client) {
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
}

/// Records the start of a run; returns its id.
async fn start(client: &Client, name: &str) -> Result<i64, DaemonError> {
    Ok(client
        .query_one(
            "INSERT INTO pgseal.job_runs (job, status) VALUES ($1, 'running') RETURNING id",
            &[&name],
        )
        .await
        .map_err(DaemonError::Query)?
        .get(0))
}

/// Records how a run ended. A failure to record is logged, not raised: the run's
/// own outcome is what the caller reports.
async fn finish(client: &Client, id: i64, ok: bool, detail: serde_json::Value) {
    let status = if ok { "ok" } else { "failed" };
    if let Err(e) = client
        .execute(
            "UPDATE pgseal.job_runs SET status = $2, finished_at = now(), detail = $3::text::jsonb WHERE id = $1",
            &[&id, &status, &detail.to_string()],
        )
        .await
    {
        tracing::warn!("could not record the end of job run {id}: {e}");
    }
}
