//! Refuses Citus's `pg_catalog.citus_get_transaction_clock()` in a transaction in
//! which pgseal ran statements through Citus as another role.
//!
//! The connections Citus began for those statements (as the extension's owner, a
//! superuser, or as a table's owner) stay in the transaction until it ends, and
//! every `SET LOCAL` Citus sends afterwards reaches them too: the caller's own
//! `search_path` (which pgseal sends back once its statements are done, or which
//! the caller sets itself). `citus_get_transaction_clock()`, which Citus lets every
//! role execute, sends an unqualified `SELECT citus_get_node_clock();` over every
//! connection of the transaction, whoever it is open as: a caller's own
//! `citus_get_node_clock` ran there as the superuser (docs/SCALING.md). Besides
//! the propagation of SETs (whose text pgseal rebuilds) and the two-phase commit's
//! fixed commands, it is the one place of Citus 14 that sends a command over every
//! connection of the transaction (read in its source: `InProgressTransactions`).
//!
//! `needs_fmgr_hook` marks the function (looked up by its OID in the system cache:
//! a function called from a plan or a PL/pgSQL expression is marked whenever its
//! call is set up, so a cached plan cannot skip the check), and `fmgr_hook`
//! refuses its call at its start.

use std::ffi::CStr;

use pgrx::pg_sys;

use crate::error::SealError;

/// The hooks that were installed before ours.
static mut PREV_NEEDS_FMGR: pg_sys::needs_fmgr_hook_type = None;
static mut PREV_FMGR: pg_sys::fmgr_hook_type = None;

/// Installs the hooks; called once from `_PG_init`.
pub fn register() {
    // SAFETY: `_PG_init` runs once, in the postmaster, before any backend: the hook
    // chains are not read concurrently.
    unsafe {
        PREV_NEEDS_FMGR = pg_sys::needs_fmgr_hook;
        pg_sys::needs_fmgr_hook = Some(needs_fmgr);
        PREV_FMGR = pg_sys::fmgr_hook;
        pg_sys::fmgr_hook = Some(on_fmgr);
    }
}

/// Whether `fn_oid` is `pg_catalog.citus_get_transaction_clock` (only where Citus is
/// preloaded; elsewhere no function is).
fn is_transaction_clock(fn_oid: pg_sys::Oid) -> bool {
    if !super::citus::preloaded() {
        return false;
    }
    // SAFETY: a system cache lookup by OID, made where PostgreSQL sets up a call of
    // that function (it has just read the same row); a pg_proc tuple's fixed part
    // is FormData_pg_proc, read before ReleaseSysCache. NameData is NUL-terminated.
    unsafe {
        let tup = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::PROCOID as i32,
            pg_sys::Datum::from(fn_oid),
        );
        if tup.is_null() {
            return false;
        }
        let p = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_proc>(tup);
        let hit = p.pronamespace == pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE)
            && CStr::from_ptr(p.proname.data.as_ptr()).to_bytes() == b"citus_get_transaction_clock";
        pg_sys::ReleaseSysCache(tup);
        hit
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn needs_fmgr(fn_oid: pg_sys::Oid) -> bool {
    // SAFETY: reads the hook saved once in `_PG_init`, and calls it with the
    // argument PostgreSQL passed us.
    let prev_needs = unsafe { PREV_NEEDS_FMGR.is_some_and(|prev| prev(fn_oid)) };
    if prev_needs {
        return true;
    }
    is_transaction_clock(fn_oid)
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_fmgr(
    event: pg_sys::FmgrHookEventType::Type,
    flinfo: *mut pg_sys::FmgrInfo,
    arg: *mut pg_sys::Datum,
) {
    // SAFETY: PostgreSQL passes the FmgrInfo of the function being called.
    let fn_oid = unsafe { (*flinfo).fn_oid };
    if event == pg_sys::FmgrHookEventType::FHET_START
        && super::citus::ran_as_another_role()
        && is_transaction_clock(fn_oid)
    {
        SealError::NotSupported(
            "citus_get_transaction_clock() is refused in a transaction in which pgseal ran statements through Citus as another role (Citus would call a function there under this transaction's settings on those roles' connections): call it in another transaction",
        )
        .raise();
    }
    // SAFETY: reads the hook saved once in `_PG_init`, and calls it with the
    // arguments PostgreSQL passed us.
    unsafe {
        if let Some(prev) = PREV_FMGR {
            prev(event, flinfo, arg)
        }
    }
}
