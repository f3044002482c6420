//! A `ProcessUtility` hook that refuses `COPY … FROM` into a table whose row level
//! security applies to the current user (0A000), as PostgreSQL's own COPY does: COPY
//! FROM writes rows without checking policies. PostgreSQL refuses it itself, but a
//! hook that runs before PostgreSQL's COPY may copy on its own: Citus (which must
//! come first in `shared_preload_libraries`, so its hook runs after pgseal's) copies
//! into a shard on the same node without the check, and one tenant could write
//! another's rows through a worker (docs/SCALING.md). pgseal's hook is the outer one
//! and sees every utility statement first.
//!
//! The relation is resolved with the lock COPY FROM takes (RowExclusiveLock), so the
//! relation checked cannot be dropped or renamed before the COPY that follows
//! resolves the same name.

use pgrx::pg_sys;

use crate::error::SealError;

/// The `ProcessUtility` hook that was installed before ours.
static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Installs the hook; called once from `_PG_init`.
pub fn register() {
    // SAFETY: `_PG_init` runs once, in the postmaster, before any backend: the hook
    // chain is not read concurrently.
    unsafe {
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(on_utility);
    }
}

#[pgrx::pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn on_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: PostgreSQL passes a valid PlannedStmt whose utilityStmt is a Node.
    let stmt = unsafe { (*pstmt).utilityStmt };
    // SAFETY: `stmt` is a Node (or NULL, which is_a treats as no match).
    if !stmt.is_null() && unsafe { pgrx::is_a(stmt, pg_sys::NodeTag::T_CopyStmt) } {
        // SAFETY: the tag says it is a CopyStmt.
        let copy = unsafe { &*(stmt as *const pg_sys::CopyStmt) };
        if copy.is_from && !copy.relation.is_null() && rls_applies(copy.relation) {
            SealError::NotSupported(
                "COPY FROM is not supported on a table with row level security; use INSERT",
            )
            .raise();
        }
    }
    // SAFETY: the previous hook, or PostgreSQL's own, is called with the arguments
    // PostgreSQL passed us, as hooks must.
    unsafe {
        match PREV_PROCESS_UTILITY {
            Some(prev) => prev(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
    }
}

/// Whether row level security applies to the current user on the relation `rv`
/// names (false when it names none: COPY then reports that itself).
fn rls_applies(rv: *mut pg_sys::RangeVar) -> bool {
    // SAFETY: `rv` is the statement's RangeVar; with RVR_MISSING_OK the lookup
    // returns InvalidOid instead of raising, and the lock is the one COPY FROM takes,
    // held to the end of the transaction. check_enable_rls with noError reads the
    // relation's flags and the current user's attributes.
    unsafe {
        let relid = pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::RowExclusiveLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        );
        relid != pg_sys::InvalidOid
            && pg_sys::check_enable_rls(relid, pg_sys::InvalidOid, true)
                == pg_sys::CheckEnableRlsResult::RLS_ENABLED as std::ffi::c_int
    }
}
