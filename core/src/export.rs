//! The ledger export format (one JSON object per line) and its offline verifier.
//!
//! Offline there is no MAC key: the verifier checks each entry's hash, the links,
//! and seq continuity, and, given signed checkpoints and the public key, that the
//! exported chain reaches and passes through every checkpoint's (seq, hash).

use std::collections::BTreeMap;
use std::io::BufRead;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::chain::{Failure, Payload, Problem, Report, StoredEntry, Verifier};
use crate::checkpoint::{self, Checkpoint};
use crate::ledger::{parse_hash, Hash, Salt, FMT_V1, FMT_V2, GENESIS, SALT_LEN};

/// One exported entry, as `pgseal.ledger_export()` writes it. A line without
/// `fmt` is format 1 (exports made before format 2 have none); the format 2
/// fields are absent (or null) when the entry has none.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportLine {
    #[serde(default = "fmt_v1")]
    pub fmt: i16,
    pub tenant_id: String,
    pub seq: i64,
    /// Informational; the hash covers `recorded_at_us`.
    #[serde(default)]
    pub recorded_at: Option<String>,
    pub recorded_at_us: i64,
    pub actor: String,
    #[serde(default)]
    pub db_role: Option<String>,
    pub event: String,
    #[serde(default)]
    pub subjects: Option<Vec<String>>,
    /// JSON `null` for an erased entry (no salt, a commitment).
    pub payload: Box<RawValue>,
    /// 64 hex characters.
    #[serde(default)]
    pub salt: Option<String>,
    /// 64 hex characters; exported only when stored (erased entries).
    #[serde(default)]
    pub commitment: Option<String>,
    pub prev_hash: String,
    pub hash: String,
    pub mac: String,
}

fn fmt_v1() -> i16 {
    FMT_V1
}

/// An export line decoded: hex fields as bytes, and an erased entry's payload
/// as `None`. The MAC is kept as text: offline verification has no key to check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedLine {
    pub fmt: i16,
    pub tenant_id: String,
    pub seq: i64,
    pub recorded_at: Option<String>,
    pub recorded_at_us: i64,
    pub actor: String,
    pub db_role: Option<String>,
    pub event: String,
    pub subjects: Option<Vec<String>>,
    /// The payload's JSON text as exported; `None` when erased.
    pub payload: Option<String>,
    pub salt: Option<Salt>,
    pub commitment: Option<Hash>,
    pub prev_hash: Hash,
    pub hash: Hash,
    pub mac: String,
}

impl DecodedLine {
    /// The entry as the chain verifier reads it (without a MAC).
    pub fn stored(&self) -> StoredEntry<'_> {
        StoredEntry {
            fmt: self.fmt,
            tenant: &self.tenant_id,
            seq: self.seq,
            recorded_at_us: self.recorded_at_us,
            actor: &self.actor,
            event: &self.event,
            payload: self.payload.as_deref().map(Payload::Json),
            db_role: self.db_role.as_deref(),
            subjects: self.subjects.as_deref(),
            salt: self.salt.as_ref().map(|s| &s[..]),
            commitment: self.commitment.as_ref().map(|c| &c[..]),
            prev_hash: &self.prev_hash,
            hash: &self.hash,
            mac: None,
        }
    }
}

/// Decodes one export line. An error names the field that is wrong, never its value.
pub fn decode_line(line: &str) -> Result<DecodedLine, String> {
    let e: ExportLine = serde_json::from_str(line).map_err(|err| err.to_string())?;
    let hex32 = |what: &str, text: &str| {
        parse_hash(text).ok_or_else(|| format!("{what} is not 64 hex characters"))
    };
    let salt = match &e.salt {
        Some(t) => {
            let mut out = [0u8; SALT_LEN];
            hex::decode_to_slice(t, &mut out)
                .map_err(|_| "salt is not 64 hex characters".to_owned())?;
            Some(out)
        }
        None => None,
    };
    let commitment = match &e.commitment {
        Some(t) => Some(hex32("commitment", t)?),
        None => None,
    };
    // Erased: a format 2 entry with neither payload nor salt, and a commitment.
    let erased = e.fmt == FMT_V2 && salt.is_none() && commitment.is_some();
    let payload = match (erased, e.payload.get()) {
        (true, "null") => None,
        (_, text) => Some(text.to_owned()),
    };
    Ok(DecodedLine {
        fmt: e.fmt,
        prev_hash: hex32("prev_hash", &e.prev_hash)?,
        hash: hex32("hash", &e.hash)?,
        tenant_id: e.tenant_id,
        seq: e.seq,
        recorded_at: e.recorded_at,
        recorded_at_us: e.recorded_at_us,
        actor: e.actor,
        db_role: e.db_role,
        event: e.event,
        subjects: e.subjects,
        payload,
        salt,
        commitment,
        mac: e.mac,
    })
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

/// Why a checkpoint does not hold against the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointProblem {
    /// The export's chain of the tenant ends before the checkpoint's seq: `last` is
    /// its last exported seq, or `None` when the export has no entry of the tenant.
    /// A cut (or rewritten and shortened) history; a range export that stops early
    /// must be checked against the checkpoints it reaches only.
    NotReached { last: Option<i64> },
    /// The exported entry at the checkpoint's seq (or, for the seq just before an
    /// export that starts later, the first entry's prev_hash) has another hash.
    HashMismatch,
    /// A v2 checkpoint does not extend the tenant's previous checkpoint in the file
    /// (its signed prev_seq and prev_hash name another): the checkpoint log was cut,
    /// reordered or mixed with another one.
    Unlinked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointFailure {
    /// The checkpoint's seq.
    pub seq: i64,
    pub problem: CheckpointProblem,
}

/// What offline verification found for one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantResult {
    pub tenant: String,
    /// The chain's own verification. A failed checkpoint is recorded here too (as a
    /// hash mismatch at its seq, or a gap after the last exported entry), so that
    /// `report.ok()` alone never passes an export that a checkpoint refutes.
    pub report: Report,
    /// Checkpoints whose (seq, hash) the export reached and matched.
    pub checkpoints_matched: usize,
    /// Checkpoints older than the entry before the export's first one (pruned, or
    /// outside an exported range): the export cannot confirm or refute them.
    pub checkpoints_before: usize,
    /// The first checkpoint (by seq) that does not hold against the export.
    pub checkpoint_failure: Option<CheckpointFailure>,
}

impl TenantResult {
    pub fn ok(&self) -> bool {
        self.report.ok() && self.checkpoint_failure.is_none()
    }
}

struct TenantState {
    verifier: Verifier,
    /// The seq before the first exported one and the hash the export claims for it
    /// (the first entry's prev_hash: 32 zero bytes before seq 1).
    anchor: (i64, Hash),
    hashes_at: BTreeMap<i64, Hash>,
}

/// Verifies an export. Each checkpoint's signature is checked against
/// `public_key`. Then, for each tenant of the export or of the checkpoints, every
/// checkpoint must hold: one at a seq the export covers must match that entry's
/// hash, one at the seq before the export's first entry must match its prev_hash,
/// and one beyond the tenant's last exported entry (or of a tenant the export does
/// not contain) fails, because a cut export would otherwise pass. Checkpoints
/// older than the export's start are counted, not checked.
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
    for cps in wanted.values_mut() {
        cps.sort_by_key(|c| c.seq);
    }
    let mut tenants: BTreeMap<String, TenantState> = BTreeMap::new();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let e = decode_line(&line).map_err(|err| ExportError::BadLine(i + 1, err))?;
        let (prev, hash) = (e.prev_hash, e.hash);
        let state = tenants.entry(e.tenant_id.clone()).or_insert_with(|| {
            // An export that starts at seq 1 must start from the genesis hash;
            // one that starts later (a range, or after pruning) is anchored by
            // its own first prev_hash, which checkpoints can confirm.
            let start = if e.seq == 1 { GENESIS } else { prev };
            TenantState {
                verifier: Verifier::new(e.seq, start, None),
                anchor: (e.seq.saturating_sub(1), start),
                hashes_at: BTreeMap::new(),
            }
        });
        let tracked = wanted
            .get(e.tenant_id.as_str())
            .is_some_and(|cps| cps.binary_search_by_key(&e.seq, |c| c.seq).is_ok());
        if tracked {
            state.hashes_at.insert(e.seq, hash);
        }
        state.verifier.push(&e.stored());
    }
    let mut out: BTreeMap<String, TenantResult> = BTreeMap::new();
    for (tenant, state) in tenants {
        let TenantState {
            verifier,
            anchor,
            hashes_at,
        } = state;
        let report = verifier.finish(None);
        let cps = wanted
            .get(tenant.as_str())
            .map_or(&[][..], |v| v.as_slice());
        let result = check_checkpoints(tenant.clone(), report, Some(anchor), &hashes_at, cps);
        out.insert(tenant, result);
    }
    // Tenants that only the checkpoints name: the export lost their whole chain.
    for (tenant, cps) in &wanted {
        if !out.contains_key(*tenant) {
            let report = Report {
                checked: 0,
                erased: 0,
                failure: None,
                last: None,
            };
            let result =
                check_checkpoints((*tenant).to_owned(), report, None, &BTreeMap::new(), cps);
            out.insert((*tenant).to_owned(), result);
        }
    }
    Ok(out.into_values().collect())
}

/// Checks one tenant's checkpoints (sorted by seq) against its verified chain:
/// `anchor` is `None` when the export has no entry of the tenant, and `hashes_at`
/// holds the exported hashes at the checkpoints' seqs.
fn check_checkpoints(
    tenant: String,
    mut report: Report,
    anchor: Option<(i64, Hash)>,
    hashes_at: &BTreeMap<i64, Hash>,
    cps: &[&Checkpoint],
) -> TenantResult {
    let mut matched = 0;
    let mut before = 0;
    let mut failure = None;
    // A chain that already failed is reported as such; its hashes prove nothing.
    let cps = if report.ok() { cps } else { &[] };
    // Without entries, the chain "ends" at seq 0 with the genesis hash.
    let (anchor_seq, anchor_hash) = anchor.unwrap_or((0, GENESIS));
    let last = report.last.map_or(anchor_seq, |(seq, _)| seq);
    for (i, cp) in cps.iter().enumerate() {
        // Two v2 checkpoints in a row must link (v1 ones name no predecessor).
        let unlinked = i > 0
            && cp.prev_seq.is_some()
            && cps[i - 1].prev_seq.is_some()
            && !cp.extends(cps[i - 1]);
        let problem = if unlinked {
            Some(CheckpointProblem::Unlinked)
        } else if cp.seq > last {
            Some(CheckpointProblem::NotReached {
                last: anchor.map(|_| last),
            })
        } else if cp.seq < anchor_seq {
            before += 1;
            None
        } else {
            let have = if cp.seq == anchor_seq {
                Some(anchor_hash)
            } else {
                hashes_at.get(&cp.seq).copied()
            };
            if have.is_some() && have == parse_hash(&cp.hash) {
                matched += 1;
                None
            } else {
                Some(CheckpointProblem::HashMismatch)
            }
        };
        if let Some(problem) = problem {
            report.failure = Some(match problem {
                CheckpointProblem::NotReached { .. } => Failure {
                    seq: last + 1,
                    problem: Problem::Gap,
                },
                CheckpointProblem::HashMismatch | CheckpointProblem::Unlinked => Failure {
                    seq: cp.seq,
                    problem: Problem::HashMismatch,
                },
            });
            failure = Some(CheckpointFailure {
                seq: cp.seq,
                problem,
            });
            break;
        }
    }
    TenantResult {
        tenant,
        report,
        checkpoints_matched: matched,
        checkpoints_before: before,
        checkpoint_failure: failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use crate::ledger::{entry_hash, EntryFields};

    /// `n` chained export lines of `tenant`, from seq 1.
    fn chain(tenant: &str, n: i64) -> Vec<String> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let payload = format!("{{\"n\":{seq}}}");
                let hash = entry_hash(&EntryFields {
                    prev_hash: &prev,
                    tenant,
                    seq,
                    recorded_at_us: seq,
                    actor: "alice",
                    event: "e",
                    payload: &payload,
                });
                let line = serde_json::json!({
                    "tenant_id": tenant, "seq": seq, "recorded_at_us": seq, "actor": "alice",
                    "event": "e", "payload": serde_json::from_str::<serde_json::Value>(&payload).unwrap(),
                    "prev_hash": hex::encode(prev), "hash": hex::encode(hash), "mac": hex::encode([0u8; 32]),
                });
                prev = hash;
                line.to_string()
            })
            .collect()
    }

    fn hash_at(lines: &[String], seq: i64) -> Hash {
        let v: serde_json::Value = serde_json::from_str(&lines[seq as usize - 1]).unwrap();
        parse_hash(v["hash"].as_str().unwrap()).unwrap()
    }

    fn run(lines: &[String], cps: &[Checkpoint], pk: &str) -> Vec<TenantResult> {
        verify_export(lines.join("\n").as_bytes(), cps, Some(pk)).unwrap()
    }

    #[test]
    fn every_checkpoint_must_be_reached_and_match() {
        let mk = SecretKey::random();
        let pk = checkpoint::public_key_hex(&mk);
        let lines = chain("acme", 10);
        let at = "2026-12-03T00:00:00Z";
        let cp10 = checkpoint::sign(&mk, 1, "acme", 10, &hash_at(&lines, 10), at);

        let full = run(&lines, std::slice::from_ref(&cp10), &pk);
        assert!(full[0].ok(), "{full:?}");
        assert_eq!(full[0].checkpoints_matched, 1);

        // Hole 2: the first three lines of that export.
        let cut = run(&lines[..3], std::slice::from_ref(&cp10), &pk);
        assert!(!cut[0].ok() && !cut[0].report.ok(), "{cut:?}");
        assert_eq!(
            cut[0].checkpoint_failure,
            Some(CheckpointFailure {
                seq: 10,
                problem: CheckpointProblem::NotReached { last: Some(3) }
            })
        );

        // A checkpoint of a tenant the export lacks.
        let other = checkpoint::sign(&mk, 1, "globex", 2, &[7; 32], at);
        let r = run(&lines, &[cp10.clone(), other], &pk);
        assert_eq!(r.len(), 2);
        assert!(r[0].ok(), "{r:?}");
        assert_eq!(r[1].tenant, "globex");
        assert_eq!(r[1].report.checked, 0);
        assert_eq!(
            r[1].checkpoint_failure,
            Some(CheckpointFailure {
                seq: 2,
                problem: CheckpointProblem::NotReached { last: None }
            })
        );

        // A checkpoint whose hash differs from the entry at its seq.
        let wrong = checkpoint::sign(&mk, 1, "acme", 5, &[9; 32], at);
        let r = run(&lines, &[cp10, wrong], &pk);
        assert_eq!(
            r[0].checkpoint_failure.map(|f| (f.seq, f.problem)),
            Some((5, CheckpointProblem::HashMismatch))
        );
        assert_eq!(r[0].report.failure.map(|f| f.seq), Some(5));
    }

    #[test]
    fn v2_checkpoints_in_a_file_must_extend_each_other() {
        let key = checkpoint::key_from_seed(&SecretKey::random());
        let pk = checkpoint::verifying_key_hex(&key);
        let lines = chain("acme", 10);
        let at = "2026-12-03T00:00:00Z";
        let h = |seq| hash_at(&lines, seq);
        let sign = |seq, prev: (i64, &Hash)| {
            checkpoint::sign_after(&key, 1, "ab", "acme", (seq, &h(seq)), prev, at)
        };
        let cp3 = sign(3, (0, &GENESIS));
        let cp6 = sign(6, (3, &h(3)));
        let cp9 = sign(9, (6, &h(6)));
        let r = run(&lines, &[cp3.clone(), cp6.clone(), cp9.clone()], &pk);
        assert!(r[0].ok(), "{r:?}");
        assert_eq!(r[0].checkpoints_matched, 3);
        // The file lost cp6: cp9 names a predecessor the file does not hold.
        let r = run(&lines, &[cp3.clone(), cp9.clone()], &pk);
        assert_eq!(
            r[0].checkpoint_failure.map(|f| (f.seq, f.problem)),
            Some((9, CheckpointProblem::Unlinked))
        );
        // A second checkpoint at seq 6 that does not extend cp3 (a forked log).
        let fork = sign(6, (2, &h(2)));
        let r = run(&lines, &[cp3, fork, cp9], &pk);
        assert_eq!(
            r[0].checkpoint_failure.map(|f| (f.seq, f.problem)),
            Some((6, CheckpointProblem::Unlinked))
        );
    }

    #[test]
    fn an_export_that_starts_later_is_anchored_by_the_checkpoint_before_it() {
        let mk = SecretKey::random();
        let pk = checkpoint::public_key_hex(&mk);
        let lines = chain("acme", 10);
        let at = "2026-12-03T00:00:00Z";
        let range = &lines[3..]; // seq 4..=10
        let cp3 = checkpoint::sign(&mk, 1, "acme", 3, &hash_at(&lines, 3), at);
        let cp1 = checkpoint::sign(&mk, 1, "acme", 1, &hash_at(&lines, 1), at);
        let r = run(range, &[cp1, cp3], &pk);
        assert!(r[0].ok(), "{r:?}");
        assert_eq!((r[0].checkpoints_matched, r[0].checkpoints_before), (1, 1));

        let forged = checkpoint::sign(&mk, 1, "acme", 3, &[1; 32], at);
        let r = run(range, &[forged], &pk);
        assert_eq!(
            r[0].checkpoint_failure.map(|f| (f.seq, f.problem)),
            Some((3, CheckpointProblem::HashMismatch))
        );
    }
}
