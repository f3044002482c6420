//! The state of the current transaction, as PostgreSQL's globals hold it.

use pgrx::pg_sys;

use crate::error::{SealError, SealResult};

/// Whether the current transaction is read-only (`SET TRANSACTION READ ONLY`,
/// `default_transaction_read_only`, or a hot standby).
pub fn read_only() -> bool {
    // SAFETY: XactReadOnly is a plain bool global maintained by the transaction
    // machinery; reading it in a backend is always valid.
    unsafe { pg_sys::XactReadOnly }
}

/// Whether this server is a standby replaying WAL.
pub fn in_recovery() -> bool {
    // SAFETY: RecoveryInProgress may be called at any time in a backend.
    unsafe { pg_sys::RecoveryInProgress() }
}

/// Refuses `what` (25006) in a read-only transaction: it would write.
pub fn require_read_write(what: &'static str) -> SealResult<()> {
    if read_only() {
        return Err(SealError::ReadOnly(what));
    }
    Ok(())
}
