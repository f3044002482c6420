//! Optional Prometheus metrics (`metrics_addr` in pgseald.toml): a plain-text
//! `/metrics` page with jobs run, rows deleted, values resealed, failed ledger
//! verifications and whether this daemon leads.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub static JOBS_RUN: AtomicU64 = AtomicU64::new(0);
pub static JOBS_FAILED: AtomicU64 = AtomicU64::new(0);
pub static ROWS_DELETED: AtomicU64 = AtomicU64::new(0);
pub static ROWS_RESEALED: AtomicU64 = AtomicU64::new(0);
pub static LEADER: AtomicU64 = AtomicU64::new(0);
/// Failed ledger verifications of the scheduled job since start (each also logged
/// as an error).
pub static VERIFICATION_FAILURES: AtomicU64 = AtomicU64::new(0);

fn page() -> String {
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    format!(
        "# TYPE pgseald_jobs_run_total counter\npgseald_jobs_run_total {}\n\
         # TYPE pgseald_jobs_failed_total counter\npgseald_jobs_failed_total {}\n\
         # TYPE pgseald_rows_deleted_total counter\npgseald_rows_deleted_total {}\n\
         # TYPE pgseald_rows_resealed_total counter\npgseald_rows_resealed_total {}\n\
         # TYPE pgseald_verification_failures_total counter\npgseald_verification_failures_total {}\n\
         # TYPE pgseald_leader gauge\npgseald_leader {}\n",
        g(&JOBS_RUN),
        g(&JOBS_FAILED),
        g(&ROWS_DELETED),
        g(&ROWS_RESEALED),
        g(&VERIFICATION_FAILURES),
        g(&LEADER),
    )
}

/// Serves `/metrics` on `addr` until the process ends.
pub async fn serve(addr: String) -> Result<(), std::io::Error> {
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!("metrics on http://{addr}/metrics");
    loop {
        let (mut sock, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                ("200 OK", page())
            } else {
                ("404 Not Found", "not found\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
