//! Erasing the payloads of a data subject's entries (issue 19, docs/FORMAT.md,
//! "Format 2").
//!
//! An erased entry keeps every hashed field but its payload: the payload and its
//! salt are deleted and the payload commitment `H(salt ‖ JCS(payload))`, which the
//! entry's hash covers, is stored in their place. Verification then proves the
//! entry's order, links and MAC from the commitment, and counts it as erased; with
//! the salt gone nobody can test a guessed payload against it.
//!
//! Before an entry is erased its hash is recomputed from its stored fields with the
//! commitment computed here: an entry that does not verify is not erased (XX001),
//! so an erasure never stores a commitment of an edited payload. Only format 2
//! entries with a payload are erased, and never pgseal's own `subject.*` and
//! `tenant.*` receipts, which record erasures, exports and offboardings by counts.
//! An offboarding also erases the entries of the audit chain `_pgseal_audit` that
//! record the tenant's decrypts (the audit writer names the tenant in each one's
//! payload); that chain's other entries keep theirs.
//!
//! The update is pgseal's fixed statement, run as the extension owner inside
//! `Scope::Erase`, which `pgseal._ledger_guard()` checks: in that scope it lets an
//! UPDATE of a ledger row through only when the row keeps every other column and
//! loses its payload and salt for a commitment (sql/ledger_api.sql).

use pgrx::prelude::*;
use pgseal_core::ledger::{entry_hash_v2, payload_commitment, EntryFieldsV2, Hash, Salt};

use super::guard::{self, Scope};
use crate::error::{SealError, SealResult};
use crate::privilege::as_owner;

/// The columns an erasure reads of an entry, in the order `erase` reads them.
const COLUMNS: &str =
    "l.seq, (EXTRACT(epoch FROM l.recorded_at) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8, \
       l.actor, l.db_role, l.event, l.subjects, l.payload, l.salt, l.prev_hash, l.hash";

/// What every erasure leaves: entries without a payload to erase (format 1, which
/// has no commitment; already erased), and pgseal's receipts of erasures and
/// offboardings (`subject.*`, `tenant.*`), which hold counts, never data.
const ERASABLE: &str = "l.fmt OPERATOR(pg_catalog.=) 2 AND l.salt IS NOT NULL AND l.payload IS NOT NULL \
   AND NOT pg_catalog.starts_with(l.event, 'subject.') AND NOT pg_catalog.starts_with(l.event, 'tenant.')";

/// Which of a tenant's entries an erasure takes.
pub enum Which<'a> {
    /// Those that name the subject.
    Subject(&'a str),
    /// All of them, the first `limit` still to erase after seq `after`
    /// (offboarding, in batches).
    All { limit: i64, after: i64 },
    /// The first `limit` still to erase after seq `after` of the entries in the
    /// audit chain `_pgseal_audit` that record the tenant's decrypts (their
    /// payload's `tenant`; offboarding, in batches, after the tenant's own chain).
    InAuditChain { limit: i64, after: i64 },
    /// The entry at `seq` that this transaction appended for the tenant, in its
    /// chain or (`in_audit_chain`) in the audit chain.
    Appended { in_audit_chain: bool, seq: i64 },
}

/// What an erasure did.
pub struct Erased {
    /// The seqs whose payloads it erased, ascending: those it found that were still
    /// there to update (an entry pruned meanwhile is found and not erased).
    pub seqs: Vec<i64>,
    /// The last seq it found (None: it found none).
    pub found_to: Option<i64>,
}

/// The entries are found by the primary key (`seq = ANY`), not by a join over the
/// tenant's whole chain, which made each of offboarding's batches cost the chain.
const UPDATE_SQL: &str = "\
WITH e AS (
UPDATE pgseal.ledger l SET payload = NULL, salt = NULL, commitment = u.c
  FROM ROWS FROM (pg_catalog.unnest($2::pg_catalog.int8[]), pg_catalog.unnest($3::pg_catalog.bytea[])) AS u(seq, c)
 WHERE l.tenant_id OPERATOR(pg_catalog.=) $1 AND l.seq OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.int8[])
   AND l.seq OPERATOR(pg_catalog.=) u.seq
RETURNING l.seq)
SELECT pg_catalog.array_agg(e.seq ORDER BY e.seq) FROM e";

/// Whether an erasure is updating the ledger right now; read by the guard trigger.
#[pg_extern(volatile, parallel_unsafe)]
pub fn _ledger_erasing() -> bool {
    guard::active(Scope::Erase)
}

/// Takes `tenant`'s chain lock for the rest of the transaction (an erasure checks
/// the tenant's hold under it), after the tenant's ledger key, which the callers'
/// receipts need: every path takes a tenant's key before its chain lock
/// (`append::append_stored`), or a first append elsewhere could deadlock with it.
pub fn lock_chain(tenant: &str) -> SealResult<()> {
    super::mac::for_append(tenant)?;
    super::chain_lock::lock(tenant).map(|_| ())
}

/// Erases the payloads of `tenant`'s entries that `which` takes (in the audit chain
/// for `Which::InAuditChain`). The caller has checked who may erase, the tenant and
/// the hold.
pub fn erase(tenant: &str, which: Which<'_>) -> SealResult<Erased> {
    let chain = match which {
        Which::InAuditChain { .. }
        | Which::Appended {
            in_audit_chain: true,
            ..
        } => super::names::AUDIT_CHAIN,
        Which::Subject(_) | Which::All { .. } | Which::Appended { .. } => tenant,
    };
    // This transaction's own appends go into the table first.
    super::writer::flush()?;
    let (seqs, commitments) = as_owner(|| -> SealResult<(Vec<i64>, Vec<Vec<u8>>)> {
        Spi::connect(|c| {
            let rows = match which {
                Which::Subject(subject) => c.select(
                    &format!(
                        "SELECT {COLUMNS} FROM pgseal.ledger l WHERE l.tenant_id OPERATOR(pg_catalog.=) $1 \
                           AND l.subjects OPERATOR(pg_catalog.@>) pg_catalog.array_fill($2::pg_catalog.text, ARRAY[1]) \
                           AND {ERASABLE} ORDER BY l.seq"
                    ),
                    None,
                    &[tenant.into(), subject.into()],
                )?,
                Which::All { limit, after } => c.select(
                    &format!(
                        "SELECT {COLUMNS} FROM pgseal.ledger l WHERE l.tenant_id OPERATOR(pg_catalog.=) $1 \
                           AND l.seq OPERATOR(pg_catalog.>) $3 AND {ERASABLE} ORDER BY l.seq LIMIT $2"
                    ),
                    None,
                    &[tenant.into(), limit.into(), after.into()],
                )?,
                Which::InAuditChain { limit, after } => c.select(
                    &format!(
                        "SELECT {COLUMNS} FROM pgseal.ledger l WHERE l.tenant_id OPERATOR(pg_catalog.=) $1 \
                           AND l.seq OPERATOR(pg_catalog.>) $4 \
                           AND (l.payload OPERATOR(pg_catalog.->>) 'tenant') OPERATOR(pg_catalog.=) $2 \
                           AND {ERASABLE} ORDER BY l.seq LIMIT $3"
                    ),
                    None,
                    &[chain.into(), tenant.into(), limit.into(), after.into()],
                )?,
                Which::Appended { seq, .. } => c.select(
                    &format!(
                        "SELECT {COLUMNS} FROM pgseal.ledger l WHERE l.tenant_id OPERATOR(pg_catalog.=) $1 \
                           AND l.seq OPERATOR(pg_catalog.=) $2 AND {ERASABLE}"
                    ),
                    None,
                    &[chain.into(), seq.into()],
                )?,
            };
            let mut seqs = Vec::new();
            let mut commitments = Vec::new();
            for r in rows {
                let seq: i64 = r.get(1)?.ok_or(SealError::Internal("ledger seq"))?;
                let bad = || SealError::ChainCorrupt(seq, "hash mismatch");
                let at: i64 = r.get(2)?.ok_or_else(bad)?;
                let actor: String = r.get(3)?.ok_or_else(bad)?;
                let db_role: String = r.get(4)?.ok_or_else(bad)?;
                let event: String = r.get(5)?.ok_or_else(bad)?;
                let subjects: Vec<Option<String>> = r.get(6)?.ok_or_else(bad)?;
                let subjects: Vec<String> = subjects
                    .into_iter()
                    .collect::<Option<_>>()
                    .ok_or_else(bad)?;
                let payload: crate::pg::jsonb::JsonbArg = r.get(7)?.ok_or_else(bad)?;
                let salt: Vec<u8> = r.get(8)?.ok_or_else(bad)?;
                let prev: Vec<u8> = r.get(9)?.ok_or_else(bad)?;
                let hash: Vec<u8> = r.get(10)?.ok_or_else(bad)?;
                let salt = Salt::try_from(salt.as_slice()).map_err(|_| bad())?;
                let prev = Hash::try_from(prev.as_slice()).map_err(|_| bad())?;
                // From the stored binary form, as the verifier reads it.
                let canonical = payload.canonical().map_err(|_| bad())?;
                let commitment = payload_commitment(&salt, &canonical);
                let recomputed = entry_hash_v2(&EntryFieldsV2 {
                    prev_hash: &prev,
                    tenant: chain,
                    seq,
                    recorded_at_us: at,
                    actor: &actor,
                    db_role: &db_role,
                    event: &event,
                    subjects: &subjects,
                    commitment: &commitment,
                });
                if recomputed[..] != hash[..] {
                    return Err(bad());
                }
                seqs.push(seq);
                commitments.push(commitment.to_vec());
            }
            Ok((seqs, commitments))
        })
    })?;
    let found_to = seqs.last().copied();
    if seqs.is_empty() {
        return Ok(Erased { seqs, found_to });
    }
    let seqs = as_owner(|| {
        guard::with_scope(Scope::Erase, || {
            Spi::get_one_with_args::<Vec<i64>>(
                UPDATE_SQL,
                &[chain.into(), seqs.into(), commitments.into()],
            )
        })
    })?
    .unwrap_or_default();
    Ok(Erased { seqs, found_to })
}

/// Ascending `seqs` as `[first, last]` runs (receipts list erased entries so).
pub fn ranges(seqs: &[i64]) -> Vec<[i64; 2]> {
    let mut out: Vec<[i64; 2]> = Vec::new();
    for &s in seqs {
        match out.last_mut() {
            Some(run) if run[1] + 1 == s => run[1] = s,
            _ => out.push([s, s]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::ranges;

    #[test]
    fn seqs_fold_into_runs() {
        assert_eq!(ranges(&[]), Vec::<[i64; 2]>::new());
        assert_eq!(ranges(&[3]), vec![[3, 3]]);
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), vec![[1, 3], [7, 7], [9, 10]]);
    }
}
