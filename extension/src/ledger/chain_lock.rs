//! Locking a tenant's chain and reading its head.
//!
//! The first append for a tenant in a transaction takes the tenant's
//! transaction-scoped chain lock (`locks.rs`), then reads its head: the later of
//! its last entry and its heads row (`pg::head_read`), under a snapshot taken
//! after the lock, so it sees the last committed append: every writer of both
//! holds the lock until it commits. Under REPEATABLE READ and SERIALIZABLE a
//! transaction whose snapshot predates another session's append fails there with
//! 40001, a retryable error, instead of appending after entries it cannot see.

use pgseal_core::ledger::{Hash, GENESIS};

use super::guard::Scope;
use super::heads::Row;
use super::shared_heads::{self, ChainKey};
use crate::error::{SealError, SealResult};
use crate::pg::head_read::Loaded;
use crate::pg::plans;
use crate::privilege::as_owner;

const INSERT_HEAD: &str =
    "INSERT INTO pgseal.ledger_heads (tenant_id, seq, hash) VALUES ($1, 0, $2) ON CONFLICT (tenant_id) DO NOTHING";

fn select_head(tenant: &str, snapshot_per_xact: bool) -> SealResult<Option<Loaded>> {
    crate::pg::head_read::read(tenant, snapshot_per_xact)
}

/// Locks the tenant's chain and returns the head after which to append: the later
/// of the stored head (which includes this transaction's written entries) and
/// this transaction's last pending entry; with what is known of its heads row, and
/// the chain's key in `shared_heads`. Under READ COMMITTED a transaction's first
/// load takes the head its previous holder published at commit, when there is
/// one; otherwise it is read from the table. This level's pending entries are
/// written first, so that no write can happen between reading the head and
/// reading the pending list (the queries below end in the executor-end hook,
/// which writes pending entries of the current level). Reading the table runs as
/// the extension's owner; taking a published head needs no privilege, so it
/// does without the owner switch and the pinned `search_path` (whose setting and
/// restoring also makes the session's next statement recompute its path).
pub(super) fn lock_and_load(tenant: &str) -> SealResult<((i64, Hash), Row, ChainKey)> {
    super::writer::flush()?;
    crate::locks::ledger_tenant(tenant);
    let key = ChainKey::new(crate::pg::head_read::relids()?.0, tenant);
    let snapshot_per_xact = crate::pg::xact::uses_transaction_snapshot();
    let published = (!snapshot_per_xact && !super::heads::was_loaded(tenant))
        .then(|| shared_heads::get(&key))
        .flatten();
    let (head, row) = match published {
        Some(p) => ((p.seq, p.hash), Row::Behind(p.row_seq)),
        None => as_owner(|| -> SealResult<_> {
            let (head, row) = match select_head(tenant, snapshot_per_xact)? {
                Some(h) => h,
                None => {
                    // The tenant's first entry: no committed row, as the read above saw
                    // under a snapshot taken after the lock. (Under REPEATABLE READ a
                    // first append committed after the transaction's snapshot fails
                    // there with 40001.)
                    super::guard::with_scope(Scope::Append, || {
                        plans::run(
                            INSERT_HEAD,
                            &[plans::TEXT, plans::BYTEA],
                            &[tenant.into(), GENESIS.to_vec().into()],
                        )
                    })?;
                    select_head(tenant, snapshot_per_xact)?
                        .ok_or(SealError::Internal("pgseal.ledger_heads row vanished"))?
                }
            };
            Ok((head, row.map_or(Row::Unknown, Row::Known)))
        })?,
    };
    let head = match super::pending::tail(tenant) {
        Some(p) if p.0 > head.0 => p,
        _ => head,
    };
    Ok((head, row, key))
}

/// Locks the tenant's chain for the rest of the transaction and returns its head,
/// with this transaction's entries written first.
pub fn lock(tenant: &str) -> SealResult<(i64, Hash)> {
    super::writer::flush()?;
    as_owner(|| lock_and_load(tenant)).map(|(head, ..)| head)
}
