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

/// Whether this backend is in parallel mode: a parallel worker, or a leader while
/// its parallel query runs (no new snapshot, command or write may start).
pub fn in_parallel_mode() -> bool {
    // SAFETY: IsInParallelMode reads a field of the current transaction state;
    // valid in any backend.
    unsafe { pg_sys::IsInParallelMode() }
}

/// Whether the transaction reads through one snapshot for its whole life
/// (REPEATABLE READ or SERIALIZABLE).
pub fn uses_transaction_snapshot() -> bool {
    // SAFETY: XactIsoLevel is a plain int global of the transaction machinery.
    unsafe { pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 }
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

/// Why `in_subtransaction`'s work failed; its subtransaction is rolled back.
pub enum SubFailure {
    /// It returned this error.
    Error(SealError),
    /// It raised an ERROR (or panicked).
    Raised(Box<pgrx::pg_sys::panic::CaughtError>),
}

impl SubFailure {
    /// The failure's message (never a value of the caller's: pgseal's messages
    /// carry none, and PostgreSQL's detail is left out).
    pub fn message(&self) -> String {
        use pgrx::pg_sys::panic::CaughtError;
        match self {
            SubFailure::Error(e) => e.to_string(),
            SubFailure::Raised(c) => match &**c {
                CaughtError::PostgresError(r)
                | CaughtError::ErrorReport(r)
                | CaughtError::RustPanic { ereport: r, .. } => r.message().to_owned(),
            },
        }
    }

    /// Raises the failure again in the caller's (sub)transaction.
    pub fn raise(self) -> ! {
        match self {
            SubFailure::Error(e) => e.raise(),
            SubFailure::Raised(c) => (*c).rethrow(),
        }
    }
}

/// Runs `f` in a subtransaction of its own: what it changed is kept when it returns
/// Ok, and undone, with the locks it took, when it returns Err or raises an ERROR,
/// which then comes back as a [`SubFailure`] for the caller to decide on (its own
/// transaction goes on). A query cancel is raised again at once: it is never the
/// caller's to ignore. The caller's memory context and resource owner are current
/// again on return.
///
/// The caller holds no LWLock and has interrupts allowed (the abort releases every
/// LWLock and resets the holdoff count, as PL/pgSQL's exception blocks assume).
/// Entries this transaction appended are written only at the level that appended
/// them (`ledger::writer::flush`): the caller writes its own before `f` reads them.
pub fn in_subtransaction<T>(f: impl FnOnce() -> SealResult<T>) -> Result<T, SubFailure> {
    use pgrx::pg_sys::errcodes::PgSqlErrorCode;
    use pgrx::pg_sys::panic::CaughtError;
    use pgrx::prelude::PgTryBuilder;
    use std::panic::AssertUnwindSafe;
    // SAFETY: called inside a transaction (every caller runs in one); the memory
    // context and resource owner saved here are the caller's, which outlive the
    // subtransaction, and are made current again as PL/pgSQL's exception blocks do.
    let (context, owner) = unsafe {
        let saved = (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner);
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(saved.0);
        saved
    };
    let r = PgTryBuilder::new(AssertUnwindSafe(|| f().map_err(SubFailure::Error)))
        .catch_others(|e| Err(SubFailure::Raised(Box::new(e))))
        .execute();
    // SAFETY: the subtransaction begun above is the current one (f's own
    // subtransactions end within it; pgrx flushed a caught error's state); it is
    // released or rolled back exactly once, and the caller's context and owner
    // restored.
    unsafe {
        if r.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    }
    let cancelled = matches!(&r, Err(SubFailure::Raised(c)) if matches!(
        &**c,
        CaughtError::PostgresError(e) | CaughtError::ErrorReport(e)
            if e.sql_error_code() == PgSqlErrorCode::ERRCODE_QUERY_CANCELED
    ));
    match r {
        Err(f) if cancelled => f.raise(),
        r => r,
    }
}
