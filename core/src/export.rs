//! The ledger export format (one JSON object per line) and its offline verifier.
//!
//! Offline there is no MAC key: the verifier checks each entry's hash, the links,
//! and seq continuity, and, given signed checkpoints and the public key, that the
//! exported chain passes through every checkpoint's (seq, hash).

use std::collections::BTreeMap;
use std::io::BufRead;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::chain::{Failure, Problem, Report, StoredEntry, Verifier};
use crate::checkpoint::{self, Checkpoint};
use crate::ledger::{parse_hash, GENESIS};

/// One exported entry, as `pgseal.ledger_export()` writes it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportLine {
    pub tenant_id: String,
    pub seq: i64,
    /// Informational; the hash covers `recorded_at_us`.
    #[serde(default)]
    pub recorded_at: Option<String>,
    pub recorded_at_us: i64,
    pub actor: String,
    pub event: String,
    pub payload: Box<RawValue>,
    pub prev_hash: String,
    pub hash: String,
    pub mac: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("line {0}: {1}")]
    BadLine(usize, String),
    #[error("reading the export: {0}")]
    Io(#[from] std::io::Error),
    #[error("checkpoint for tenant {0} at seq {1} has an invalid signature")]
    BadSignature(String, i64),
}

/// What offline verification found for one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantResult {
    pub tenant: String,
    pub report: Report,
    /// Checkpoints whose (seq, hash) the export reached and matched.
    pub checkpoints_matched: usize,
}

struct TenantState {
    verifier: Verifier,
    hashes_at: BTreeMap<i64, String>,
}

/// Verifies an export. Each checkpoint's signature is checked against
/// `public_key`; a checkpoint whose seq the export covers must match its hash.
pub fn verify_export(
    input: impl BufRead,
    checkpoints: &[Checkpoint],
    public_key: Option<&str>,
) -> Result<Vec<TenantResult>, ExportError> {
    let mut wanted: BTreeMap<&str, Vec<&Checkpoint>> = BTreeMap::new();
    for cp in checkpoints {
        if !public_key.is_some_and(|pk| checkpoint::verify(pk, cp)) {
            return Err(ExportError::BadSignature(cp.tenant.clone(), cp.seq));
        }
        wanted.entry(cp.tenant.as_str()).or_default().push(cp);
    }
    let mut tenants: BTreeMap<String, TenantState> = BTreeMap::new();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let e: ExportLine = serde_json::from_str(&line)
            .map_err(|err| ExportError::BadLine(i + 1, err.to_string()))?;
        let bad =
            |what: &str| ExportError::BadLine(i + 1, format!("{what} is not 64 hex characters"));
        let prev = parse_hash(&e.prev_hash).ok_or_else(|| bad("prev_hash"))?;
        let hash = parse_hash(&e.hash).ok_or_else(|| bad("hash"))?;
        let state = tenants.entry(e.tenant_id.clone()).or_insert_with(|| {
            // An export that starts at seq 1 must start from the genesis hash;
            // one that starts later (a range, or after pruning) is anchored by
            // its own first prev_hash, which checkpoints can confirm.
            let start = if e.seq == 1 { GENESIS } else { prev };
            TenantState {
                verifier: Verifier::new(e.seq, start, None),
                hashes_at: BTreeMap::new(),
            }
        });
        let tracked = wanted
            .get(e.tenant_id.as_str())
            .is_some_and(|cps| cps.iter().any(|c| c.seq == e.seq));
        if tracked {
            state.hashes_at.insert(e.seq, e.hash.to_lowercase());
        }
        state.verifier.push(&StoredEntry {
            tenant: &e.tenant_id,
            seq: e.seq,
            recorded_at_us: e.recorded_at_us,
            actor: &e.actor,
            event: &e.event,
            payload: e.payload.get(),
            prev_hash: &prev,
            hash: &hash,
            mac: None,
        });
    }
    let mut out = Vec::new();
    for (tenant, state) in tenants {
        let mut report = state.verifier.finish(None);
        let mut matched = 0;
        if report.ok() {
            for cp in wanted.get(tenant.as_str()).into_iter().flatten() {
                match state.hashes_at.get(&cp.seq) {
                    Some(h) if *h == cp.hash.to_lowercase() => matched += 1,
                    Some(_) => {
                        report.failure = Some(Failure {
                            seq: cp.seq,
                            problem: Problem::HashMismatch,
                        });
                        break;
                    }
                    // The export does not reach this checkpoint: it may be older than
                    // it, or cover another range. Not a failure by itself.
                    None => {}
                }
            }
        }
        out.push(TenantResult {
            tenant,
            report,
            checkpoints_matched: matched,
        });
    }
    Ok(out)
}
