//! `pgseald ledger verify`: online through `pgseal.ledger_verify`, or offline on a
//! `pgseal.ledger_export()` file with no database at all.

use std::io::BufRead;
use std::path::Path;

use pgseal_core::checkpoint::Checkpoint;
use pgseal_core::export::{verify_export, CheckpointProblem, TenantResult};

use crate::error::DaemonError;

/// One tenant's verification outcome, printed one line each.
pub struct Outcome {
    pub tenant: String,
    pub ok: bool,
    pub checked: i64,
    pub detail: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ok {
            write!(
                f,
                "{}: ok, {} entries checked{}",
                self.tenant, self.checked, self.detail
            )
        } else {
            write!(
                f,
                "{}: FAILED after {} entries: {}",
                self.tenant, self.checked, self.detail
            )
        }
    }
}

fn read_checkpoints(path: &Path) -> Result<Vec<Checkpoint>, DaemonError> {
    let file = std::fs::File::open(path)
        .map_err(|e| DaemonError::File(path.display().to_string(), e.to_string()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line =
            line.map_err(|e| DaemonError::File(path.display().to_string(), e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let cp = serde_json::from_str(&line).map_err(|e| {
            DaemonError::File(path.display().to_string(), format!("line {}: {e}", i + 1))
        })?;
        out.push(cp);
    }
    Ok(out)
}

/// Verifies an export file offline: hashes, links and seq continuity, and with
/// checkpoints and the public key, that each tenant's chain reaches and passes
/// through every checkpoint of that tenant. A checkpoint beyond the tenant's last
/// exported entry, or of a tenant the export lacks, fails (a cut export). With
/// `tenant`, only that tenant's entries and checkpoints are checked.
pub fn verify_file(
    file: &Path,
    checkpoints: Option<&Path>,
    public_key: Option<&str>,
    tenant: Option<&str>,
) -> Result<Vec<Outcome>, DaemonError> {
    let mut cps = match checkpoints {
        Some(p) => read_checkpoints(p)?,
        None => Vec::new(),
    };
    if !cps.is_empty() && public_key.is_none() {
        return Err(DaemonError::Usage("--checkpoints needs --public-key"));
    }
    if let Some(t) = tenant {
        cps.retain(|cp| cp.tenant == t);
    }
    let input = std::fs::File::open(file)
        .map_err(|e| DaemonError::File(file.display().to_string(), e.to_string()))?;
    let results =
        verify_export(std::io::BufReader::new(input), &cps, public_key).map_err(|e| match e {
            pgseal_core::export::ExportError::BadSignature(t, s) => {
                DaemonError::BadCheckpoint(t, s)
            }
            other => DaemonError::File(file.display().to_string(), other.to_string()),
        })?;
    Ok(results
        .into_iter()
        .filter(|r| tenant.is_none_or(|t| t == r.tenant))
        .map(|r| Outcome {
            ok: r.ok(),
            detail: detail(&r),
            tenant: r.tenant,
            checked: r.report.checked,
        })
        .collect())
}

/// The text after "ok, N entries checked" or "FAILED after N entries: ".
fn detail(r: &TenantResult) -> String {
    if let Some(f) = r.checkpoint_failure {
        return match f.problem {
            CheckpointProblem::NotReached { last: Some(last) } => format!(
                "checkpoint at seq {} lies beyond the last exported entry (seq {last}): the export is cut short",
                f.seq
            ),
            CheckpointProblem::NotReached { last: None } => format!(
                "checkpoint at seq {}, but the export has no entry of this tenant",
                f.seq
            ),
            CheckpointProblem::HashMismatch => format!(
                "hash mismatch at seq {}: the export differs from the checkpoint",
                f.seq
            ),
            CheckpointProblem::Unlinked => format!(
                "checkpoint at seq {} does not extend the previous checkpoint in the file: the checkpoint log is cut or forked",
                f.seq
            ),
        };
    }
    if let Some(f) = r.report.failure {
        return format!("{} at seq {}", f.problem.as_str(), f.seq);
    }
    let mut out = String::new();
    if r.report.erased > 0 {
        out += &format!(
            ", {} erased (verified by their payload commitments)",
            r.report.erased
        );
    }
    if r.checkpoints_matched > 0 {
        out += &format!(", {} checkpoint(s) matched", r.checkpoints_matched);
    }
    if r.checkpoints_before > 0 {
        out += &format!(
            ", {} checkpoint(s) before the export's first entry not checked",
            r.checkpoints_before
        );
    }
    out
}

/// Every tenant with a ledger (a loose index scan over the primary key).
pub async fn tenants(client: &tokio_postgres::Client) -> Result<Vec<String>, DaemonError> {
    Ok(client
        .query(
            "WITH RECURSIVE t AS ( \
               SELECT min(tenant_id) AS id FROM pgseal.ledger \
               UNION ALL SELECT (SELECT min(tenant_id) FROM pgseal.ledger WHERE tenant_id > t.id) FROM t WHERE t.id IS NOT NULL) \
             SELECT id FROM t WHERE id IS NOT NULL",
            &[],
        )
        .await
        .map_err(DaemonError::Query)?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Verifies one tenant's chain from `from_seq` (default: its first kept entry).
pub async fn verify_one(
    client: &tokio_postgres::Client,
    tenant: &str,
    from_seq: Option<i64>,
) -> Result<Outcome, DaemonError> {
    let row = client
        .query_one(
            "SELECT ok, checked, first_bad_seq, problem FROM pgseal.ledger_verify($1, $2)",
            &[&tenant, &from_seq],
        )
        .await
        .map_err(DaemonError::Query)?;
    let detail = match (
        row.get::<_, Option<i64>>(2),
        row.get::<_, Option<String>>(3),
    ) {
        (Some(seq), Some(problem)) => format!("{problem} at seq {seq}"),
        _ => String::new(),
    };
    Ok(Outcome {
        tenant: tenant.to_owned(),
        ok: row.get(0),
        checked: row.get(1),
        detail,
    })
}

/// Verifies tenants' chains in the database with `pgseal.ledger_verify`, one
/// tenant after another until `stop` is cancelled.
pub async fn verify_db(
    client: &tokio_postgres::Client,
    tenant: Option<&str>,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<Vec<Outcome>, DaemonError> {
    let tenants = match tenant {
        Some(t) => vec![t.to_owned()],
        None => tenants(client).await?,
    };
    let mut out = Vec::with_capacity(tenants.len());
    for t in tenants {
        if stop.is_cancelled() {
            break;
        }
        out.push(verify_one(client, &t, None).await?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgseal_core::chain::Report;

    fn result(erased: i64) -> TenantResult {
        TenantResult {
            tenant: "acme".into(),
            report: Report {
                checked: 5,
                erased,
                failure: None,
                last: None,
            },
            checkpoints_matched: 0,
            checkpoints_before: 0,
            checkpoint_failure: None,
        }
    }

    #[test]
    fn erased_entries_are_counted_in_the_detail() {
        assert_eq!(detail(&result(0)), "");
        assert_eq!(
            detail(&result(2)),
            ", 2 erased (verified by their payload commitments)"
        );
    }
}
