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

/// Whether this process is a client's backend connected to a database (not the
/// autovacuum launcher, a WAL sender or another background process, some of which
/// commit transactions with no database selected, where no catalog can be read).
pub fn is_client_backend() -> bool {
    // SAFETY: both are plain globals set when the process starts; reading them is
    // always valid.
    unsafe {
        pg_sys::MyBackendType == pg_sys::BackendType::B_BACKEND
            && pg_sys::MyDatabaseId != pg_sys::InvalidOid
    }
}

/// Whether this process is a parallel worker of another backend's query.
pub fn in_parallel_worker() -> bool {
    // SAFETY: ParallelWorkerNumber is a plain global, -1 outside a parallel worker
    // and set once when one starts; reading it is always valid.
    unsafe { pg_sys::ParallelWorkerNumber >= 0 }
}

/// Refuses `what` (0A000) in a parallel worker: what a transaction of pgseal's
/// records at its commit (decrypt counts, seal counts) is kept in the backend that
/// made it, and a parallel worker's ends with the worker, unrecorded. pgseal's own
/// functions are parallel unsafe; a caller's function marked PARALLEL SAFE around
/// them is how one gets there.
pub fn require_not_parallel_worker(what: &'static str) -> SealResult<()> {
    if in_parallel_worker() {
        return Err(SealError::NotSupported(what));
    }
    Ok(())
}

/// Refuses `what` (25006) in a read-only transaction: it would write.
pub fn require_read_write(what: &'static str) -> SealResult<()> {
    if read_only() {
        return Err(SealError::ReadOnly(what));
    }
    Ok(())
}
