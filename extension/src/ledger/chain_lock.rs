//! Locking a tenant's chain and reading its head.
//!
//! The first append for a tenant in a transaction takes the tenant's
//! transaction-scoped chain lock (`locks.rs`), then reads its row in
//! `pgseal.ledger_heads`. Under READ COMMITTED the row is read directly
//! (`pg::head_read`) under a snapshot taken after the lock, so it sees the last
//! committed append: every writer of the row holds the lock until it commits.
//! Under REPEATABLE READ and SERIALIZABLE the row is locked (FOR UPDATE), and a
//! snapshot older than another session's append makes that fail with 40001, a
//! retryable error, instead of forking the chain.

use pgrx::pg_sys;
use pgseal_core::ledger::{Hash, GENESIS};

use super::guard::Scope;
use crate::error::{SealError, SealResult};
use crate::pg::head_read::Loaded;
use crate::pg::plans;
use crate::privilege::as_owner;

/// Under REPEATABLE READ and SERIALIZABLE the heads row is locked, so that a
/// snapshot older than the last append fails with 40001 instead of forking.
const SELECT_HEAD_LOCKED: &str =
    "SELECT seq, hash FROM pgseal.ledger_heads WHERE tenant_id = $1 FOR UPDATE";
const INSERT_HEAD: &str =
    "INSERT INTO pgseal.ledger_heads (tenant_id, seq, hash) VALUES ($1, 0, $2) ON CONFLICT (tenant_id) DO NOTHING";

fn select_head(tenant: &str) -> SealResult<Option<Loaded>> {
    // SAFETY: XactIsoLevel is a plain global set at transaction start; reading it
    // has no preconditions.
    let snapshot_per_xact = unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32;
    if !snapshot_per_xact {
        // Under READ COMMITTED a snapshot taken after the chain lock sees the
        // last committed head (every writer of the row holds that lock until it
        // commits), so the row is read directly and not locked: that spares SPI's
        // planner and executor, and a row lock's WAL record and dirtied page.
        return crate::pg::head_read::read(tenant);
    }
    plans::first_row(SELECT_HEAD_LOCKED, &[plans::TEXT], &[tenant.into()], |r| {
        let seq = r.get::<i64>(1)?.unwrap_or(0);
        let hash = r.get::<Vec<u8>>(2)?.unwrap_or_default();
        Ok(((seq, to_hash(&hash)?), None))
    })
}

/// Locks the tenant's chain and returns the head after which to append: the later
/// of the heads row (every write of pending entries moves it, so it includes
/// this transaction's written entries) and this transaction's last pending entry.
/// This level's pending entries are written first, so that no write can happen
/// between reading the row and reading the pending list (the queries below end
/// in the executor-end hook, which writes pending entries of the current level).
pub(super) fn lock_and_load(tenant: &str) -> SealResult<Loaded> {
    super::writer::flush()?;
    crate::locks::ledger_tenant(tenant);
    let (head, row) = match select_head(tenant)? {
        Some(h) => h,
        None => {
            // The tenant's first entry. ON CONFLICT DO NOTHING raises 40001 under
            // REPEATABLE READ when a concurrent first append committed after our snapshot.
            super::guard::with_scope(Scope::Append, || {
                plans::run(
                    INSERT_HEAD,
                    &[plans::TEXT, plans::BYTEA],
                    &[tenant.into(), GENESIS.to_vec().into()],
                )
            })?;
            select_head(tenant)?.ok_or(SealError::Internal("pgseal.ledger_heads row vanished"))?
        }
    };
    let head = match super::pending::tail(tenant) {
        Some(p) if p.0 > head.0 => p,
        _ => head,
    };
    Ok((head, row))
}

fn to_hash(bytes: &[u8]) -> SealResult<Hash> {
    bytes
        .try_into()
        .map_err(|_| SealError::Internal("stored hash is not 32 bytes"))
}

/// Locks the tenant's chain for the rest of the transaction and returns its head,
/// with this transaction's entries written first.
pub fn lock(tenant: &str) -> SealResult<(i64, Hash)> {
    super::writer::flush()?;
    as_owner(|| lock_and_load(tenant)).map(|(head, _)| head)
}
