//! Per-transaction bookkeeping, driven by transaction callbacks registered in `_PG_init`.
//!
//! - Every seal counts at once in its key's shared total (`enc_counts`), whether the
//!   transaction commits or not; at pre-commit the keys this transaction sealed with
//!   have their totals written back to `pgseal.tenant_keys.encryptions`.
//! - A transaction that rotated or shredded keys bumps the shared key epoch after
//!   it commits, so every backend drops its cached keys before its next use.
//! - A transaction or subtransaction that wrote keys and then aborted empties this
//!   backend's cache, so no key that was rolled back can ever be used again.
//! - When a statement that appended to the ledger ends (the executor-end hook),
//!   its pending entries are written, so the next statement sees them.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::cache;
use crate::error::{OrRaise, SealError, SealResult};

#[derive(Default)]
struct TxState {
    encryptions: HashMap<String, i64>,
    keys_written: bool,
    bump_epoch: bool,
}

thread_local! {
    static TX: RefCell<TxState> = RefCell::new(TxState::default());
}

/// Counts one seal under `key_id`: in the shared total at once (it counts even if the
/// transaction rolls back), and in this transaction's list of keys to write back.
pub fn note_encryption(key_id: &str) {
    crate::enc_counts::count_seal(key_id);
    TX.with(|t| {
        *t.borrow_mut()
            .encryptions
            .entry(key_id.to_owned())
            .or_insert(0) += 1
    });
}

/// Pending (not yet flushed) encryptions under `key_id` in this transaction.
pub fn pending_encryptions(key_id: &str) -> i64 {
    TX.with(|t| t.borrow().encryptions.get(key_id).copied().unwrap_or(0))
}

pub fn note_keys_written(invalidates_other_backends: bool) {
    TX.with(|t| {
        let mut t = t.borrow_mut();
        t.keys_written = true;
        t.bump_epoch |= invalidates_other_backends;
    });
}

fn flush_encryptions() -> SealResult<()> {
    let pending = TX.with(|t| std::mem::take(&mut t.borrow_mut().encryptions));
    if pending.is_empty() {
        return Ok(());
    }
    let (ids, counts): (Vec<String>, Vec<i64>) = pending.into_iter().unzip();
    cache::add_counts(&ids, &counts);
    // A key with a shared total writes that total back (it already holds this
    // transaction's seals and every rolled-back one); a key without adds its count.
    let (adds, totals): (Vec<i64>, Vec<Option<i64>>) = ids
        .iter()
        .zip(&counts)
        .map(|(id, &n)| match crate::enc_counts::total(id) {
            Some(t) => (0, Some(t)),
            None => (n, None),
        })
        .unzip();
    crate::keystore::add_encryptions(ids, adds, totals)
}

/// Pre-commit work, in order: with `pgseal.strict_context`, closing `WITH HOLD`
/// cursors; encryption counts, the decrypt audit entries (which
/// may create a ledger key and append), the ledger heads those appends moved, and
/// with `pgseal.strict_context`, clearing the tenant and user settings.
fn pre_commit(preparing: bool) {
    if TX.with(|t| t.borrow().encryptions.is_empty())
        && !crate::ledger::has_pending_work()
        && !crate::gucs::strict_context()
    {
        return;
    }
    // At pre-commit no portal holds a snapshot; SPI needs one.
    let r = with_snapshot(|| {
        crate::context::close_held_cursors_if_strict()
            .and_then(|_| flush_encryptions())
            .and_then(|_| crate::ledger::audit::flush_decrypts(preparing))
            .and_then(|_| flush_encryptions())
            .and_then(|_| crate::ledger::heads::flush())
            .and_then(|_| crate::context::clear_if_strict())
    });
    r.or_raise();
}

fn end_of_transaction(committed: bool) {
    crate::ledger::end_of_transaction(committed);
    crate::privilege::forget_owner();
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT => pre_commit(false),
        XACT_EVENT_PRE_PREPARE => {
            if TX.with(|t| t.borrow().bump_epoch) {
                SealError::NotSupported(
                    "a transaction that rotated or shredded keys cannot be prepared",
                )
                .raise();
            }
            pre_commit(true);
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PREPARE => {
            crate::ledger::audit::transaction_ended(if event == XACT_EVENT_PREPARE {
                "prepared"
            } else {
                "committed"
            });
            end_of_transaction(true);
            let st = TX.with(|t| std::mem::take(&mut *t.borrow_mut()));
            if st.bump_epoch {
                cache::bump_epoch();
            }
        }
        XACT_EVENT_ABORT => {
            crate::ledger::audit::transaction_ended("rolled back");
            end_of_transaction(false);
            let st = TX.with(|t| std::mem::take(&mut *t.borrow_mut()));
            if st.keys_written {
                cache::forget_all();
            }
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB {
        crate::ledger::subtransaction_committed(my, parent);
    }
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        crate::ledger::subtransaction_aborted(my);
        if TX.with(|t| t.borrow().keys_written) {
            cache::forget_all();
        }
    }
}

/// The executor-end hook that was installed before ours.
static PREV_EXECUTOR_END: std::sync::OnceLock<pg_sys::ExecutorEnd_hook_type> =
    std::sync::OnceLock::new();

/// Ends the query as PostgreSQL would, then writes the ledger entries it appended.
#[pg_guard]
unsafe extern "C-unwind" fn executor_end(query: *mut pg_sys::QueryDesc) {
    // SAFETY: `query` is the QueryDesc PostgreSQL passed us, handed on unchanged
    // to the previous hook or to the standard implementation, as hooks must.
    unsafe {
        match PREV_EXECUTOR_END.get().copied().flatten() {
            Some(prev) => prev(query),
            None => pg_sys::standard_ExecutorEnd(query),
        }
    }
    if crate::ledger::heads::has_pending() {
        with_snapshot(crate::ledger::heads::flush).or_raise();
    }
}

/// Runs `f` with an active snapshot, pushing the transaction's if none is set
/// (SPI plans and revalidates under one).
fn with_snapshot<R>(f: impl FnOnce() -> SealResult<R>) -> SealResult<R> {
    // SAFETY: only called inside a live transaction (at executor end or pre-commit).
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

/// Registers the callbacks and the executor-end hook; called once from `_PG_init`
/// in the postmaster, so every backend inherits them.
pub fn register_callbacks() {
    // SAFETY: both are plain 'static functions with the signatures PostgreSQL
    // expects; the argument pointer is unused. The hook is chained: the previous
    // one is kept and called first. _PG_init runs once, single-threaded.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
        let _ = PREV_EXECUTOR_END.set(pg_sys::ExecutorEnd_hook);
        pg_sys::ExecutorEnd_hook = Some(executor_end);
    }
}
