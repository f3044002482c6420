//! The bounded job history in `pgseal.job_runs`: a row per run of a job.

use tokio_postgres::Client;

use crate::error::DaemonError;

/// Records the start of a job; returns its run id.
pub async fn start(client: &Client, job: &str) -> Result<i64, DaemonError> {
    Ok(client
        .query_one(
            "INSERT INTO pgseal.job_runs (job, status) VALUES ($1, 'running') RETURNING id",
            &[&job],
        )
        .await
        .map_err(DaemonError::Query)?
        .get(0))
}

/// Records how a job ended. A failure to record is logged, not raised: the job's
/// own outcome is what the caller reports.
pub async fn finish(client: &Client, id: i64, ok: bool, detail: serde_json::Value) {
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
