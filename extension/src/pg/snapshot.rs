//! The active snapshot that SPI needs outside a statement.

use pgrx::pg_sys;

use crate::error::SealResult;

/// Runs `f` with an active snapshot, pushing the transaction's if none is set
/// (SPI plans and revalidates under one). Only for code inside a live
/// transaction: the executor-end hook and pre-commit.
pub fn with_snapshot<R>(f: impl FnOnce() -> SealResult<R>) -> SealResult<R> {
    // SAFETY: callers run inside a live transaction (at executor end or pre-commit).
    let push = unsafe { !pg_sys::ActiveSnapshotSet() };
    if push {
        // SAFETY: as above; popped below on the normal path, and an ERROR aborts
        // the transaction, which pops it.
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    }
    let r = f();
    if push {
        // SAFETY: pops the snapshot pushed above.
        unsafe { pg_sys::PopActiveSnapshot() };
    }
    r
}
