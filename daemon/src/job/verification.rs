//! The scheduled verification job: every tenant's chain verified in the database,
//! and a signed checkpoint appended to `checkpoints.jsonl`, outside the database,
//! for each tenant whose chain verifies and still passes through its last one.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::VerificationJob;
use crate::error::DaemonError;
use crate::ledger;

/// Verifies every tenant's chain from its last checkpoint on (until `stop` is
/// cancelled) and appends a checkpoint for each tenant with new entries. Fails,
/// after checking the rest, when any tenant's chain does not verify.
pub async fn scheduled(
    client: &Client,
    j: &VerificationJob,
    stop: &CancellationToken,
) -> Result<serde_json::Value, DaemonError> {
    std::fs::create_dir_all(&j.checkpoint_dir)
        .map_err(|e| DaemonError::File(j.checkpoint_dir.display().to_string(), e.to_string()))?;
    let path = j.checkpoint_dir.join("checkpoints.jsonl");
    let last = last_checkpoints(&path)?;
    let mut failed = Vec::new();
    let mut written = 0;
    for tenant in ledger::tenants(client).await? {
        if stop.is_cancelled() {
            break;
        }
        // From the last checkpoint on: the entries before it were verified when it
        // was written, and the checkpoint's own hash is compared below.
        let from = last.get(&tenant).map(|(seq, _)| *seq);
        let o = ledger::verify_one(client, &tenant, from).await?;
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
            crate::metrics::VERIFICATION_FAILURES.fetch_add(1, Ordering::Relaxed);
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
        append_line(&path, &cp)?;
        written += 1;
    }
    if failed.is_empty() {
        Ok(serde_json::json!({ "checkpoints": written }))
    } else {
        Err(DaemonError::VerifyFailed(failed))
    }
}

/// Appends one line to the checkpoint file, creating it.
fn append_line(path: &Path, line: &str) -> Result<(), DaemonError> {
    let file_error =
        |e: std::io::Error| DaemonError::File(path.display().to_string(), e.to_string());
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(file_error)?;
    writeln!(f, "{line}").map_err(file_error)
}

/// The newest (seq, hash) per tenant in the checkpoint file; none when the file
/// cannot be read (the first run).
fn last_checkpoints(path: &Path) -> Result<HashMap<String, (i64, String)>, DaemonError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(HashMap::new());
    };
    parse_checkpoints(&text)
        .map_err(|e| DaemonError::File(path.display().to_string(), e.to_string()))
}

/// The newest (seq, hash) per tenant of a JSON-lines checkpoint log: a later line
/// replaces an earlier one of the same tenant; blank lines are skipped.
fn parse_checkpoints(text: &str) -> Result<HashMap<String, (i64, String)>, serde_json::Error> {
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let cp: pgseal_core::checkpoint::Checkpoint = serde_json::from_str(line)?;
        out.insert(cp.tenant, (cp.seq, cp.hash));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(tenant: &str, seq: i64, hash: &str) -> String {
        serde_json::json!({
            "tenant": tenant, "seq": seq, "hash": hash, "signed_at": "2026-01-01T00:00:00Z",
            "key_version": 1, "signature": "00",
        })
        .to_string()
    }

    #[test]
    fn the_newest_checkpoint_of_each_tenant_wins() {
        let text = [
            line("acme", 5, "aa"),
            String::new(),
            line("globex", 3, "bb"),
            line("acme", 9, "cc"),
        ]
        .join("\n");
        let last = parse_checkpoints(&text).unwrap();
        assert_eq!(last.len(), 2);
        assert_eq!(last["acme"], (9, "cc".to_owned()));
        assert_eq!(last["globex"], (3, "bb".to_owned()));
    }

    #[test]
    fn a_damaged_line_is_an_error_and_a_missing_file_is_none() {
        assert!(parse_checkpoints("{\"tenant\": \"acme\"}\n").is_err());
        let missing = Path::new("/nonexistent/pgseald/checkpoints.jsonl");
        assert!(last_checkpoints(missing).unwrap().is_empty());
    }
}
