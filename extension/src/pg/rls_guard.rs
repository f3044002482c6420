//! Hooks that refuse writes which would skip row level security, before any hook
//! loaded earlier can carry them out. PostgreSQL itself refuses `COPY … FROM` into a
//! table whose row level security applies to the current user (COPY does not check
//! policies), but Citus, which must come first in `shared_preload_libraries` (so its
//! hooks run inside pgseal's), writes rows into a shard on the same node with its own
//! copy, which checks no policy: one tenant could write another's rows through a
//! worker (docs/SCALING.md). Two ways lead there:
//!
//! - `COPY … FROM`: the `ProcessUtility` hook refuses it (0A000) when row level
//!   security applies to the current user on the target, as PostgreSQL would;
//! - `INSERT … SELECT` that Citus cannot push down to the shards: Citus plans it as
//!   its "INSERT … SELECT" custom scan and copies the rows; the planner hook refuses
//!   such a plan (0A000) when row level security applies on the target.
//!
//! The relation of a COPY is resolved with the lock COPY FROM takes
//! (RowExclusiveLock), so the relation checked cannot be dropped or renamed before the
//! COPY that follows resolves the same name.
//!
//! The same `ProcessUtility` hook tells the audit writer when a `COMMIT PREPARED` has
//! committed (`audit_worker::prepared_committed`): on a Citus worker, seal counts a
//! prepared transaction left in the node's outbox table appear then.

use pgrx::pg_sys;

use crate::error::SealError;

/// The hooks that were installed before ours.
static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;
static mut PREV_PLANNER: pg_sys::planner_hook_type = None;

/// The name of Citus's custom scan for an `INSERT … SELECT` it does not push down.
const CITUS_INSERT_SELECT: &[u8] = b"Citus INSERT ... SELECT";

/// Installs the hooks; called once from `_PG_init`.
pub fn register() {
    // SAFETY: `_PG_init` runs once, in the postmaster, before any backend: the hook
    // chains are not read concurrently.
    unsafe {
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(on_utility);
        PREV_PLANNER = pg_sys::planner_hook;
        pg_sys::planner_hook = Some(on_plan);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_plan(
    parse: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: std::ffi::c_int,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    // The target of an INSERT, read before planning (a planner may change `parse`).
    // SAFETY: PostgreSQL passes a valid Query; resultRelation indexes its rtable
    // (1-based) for an INSERT.
    let target = unsafe {
        let q = &*parse;
        if q.commandType == pg_sys::CmdType::CMD_INSERT && q.resultRelation > 0 {
            let rtable = pgrx::PgList::<pg_sys::RangeTblEntry>::from_pg(q.rtable);
            rtable
                .get_ptr(q.resultRelation as usize - 1)
                .map(|rte| (*rte).relid)
        } else {
            None
        }
    };
    // SAFETY: the previous hook, or PostgreSQL's planner, is called with the
    // arguments PostgreSQL passed us, as hooks must.
    let plan = unsafe {
        match PREV_PLANNER {
            Some(prev) => prev(parse, query_string, cursor_options, bound_params),
            None => pg_sys::standard_planner(parse, query_string, cursor_options, bound_params),
        }
    };
    if let Some(relid) = target {
        // SAFETY: a planner returns a valid PlannedStmt.
        if unsafe { is_citus_insert_select(plan) } && rls_applies_to(relid) {
            SealError::NotSupported(
                "an INSERT … SELECT that Citus does not push down to the shards is not supported on a table with row level security",
            )
            .raise();
        }
    }
    plan
}

/// Whether the plan's top node is Citus's custom scan for an `INSERT … SELECT` that
/// it does not push down.
///
/// # Safety
/// `plan` is a valid PlannedStmt.
unsafe fn is_citus_insert_select(plan: *mut pg_sys::PlannedStmt) -> bool {
    // SAFETY: the caller's contract; a CustomScan's methods and their name are set by
    // the provider that made it, and live as long as its library.
    unsafe {
        let top = (*plan).planTree as *mut pg_sys::Node;
        if top.is_null() || !pgrx::is_a(top, pg_sys::NodeTag::T_CustomScan) {
            return false;
        }
        let methods = (*(top as *mut pg_sys::CustomScan)).methods;
        !methods.is_null()
            && !(*methods).CustomName.is_null()
            && std::ffi::CStr::from_ptr((*methods).CustomName).to_bytes() == CITUS_INSERT_SELECT
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
        if copy.is_from && !copy.relation.is_null() && rls_applies_to(resolve(copy.relation)) {
            SealError::NotSupported(
                "COPY FROM is not supported on a table with row level security; use INSERT",
            )
            .raise();
        }
    }
    let original_query = query_string;
    // SAFETY: `stmt` is a Node (or NULL, which is_a treats as no match).
    let query_string =
        if !stmt.is_null() && unsafe { pgrx::is_a(stmt, pg_sys::NodeTag::T_VariableSetStmt) } {
            // SAFETY: the tag says it is a VariableSetStmt; pstmt and query_string
            // are what PostgreSQL passed us.
            unsafe {
                crate::pg::citus::on_set_statement(
                    pstmt,
                    stmt as *const pg_sys::VariableSetStmt,
                    query_string,
                )
            }
        } else {
            query_string
        };
    // A replaced text is one statement of its own: the hooks after this one (a
    // pg_stat_statements listed before pgseal) read the statement's place in
    // the text from the PlannedStmt, whose offsets are the original text's.
    let pstmt = if query_string != original_query {
        // SAFETY: a shallow copy of the PlannedStmt PostgreSQL passed, palloc'd in
        // the current memory context (which outlives the call); only its two
        // offsets differ, and nothing below frees it.
        unsafe {
            let copy = pg_sys::palloc(std::mem::size_of::<pg_sys::PlannedStmt>())
                .cast::<pg_sys::PlannedStmt>();
            std::ptr::copy_nonoverlapping(pstmt, copy, 1);
            (*copy).stmt_location = 0;
            (*copy).stmt_len = 0;
            copy
        }
    } else {
        pstmt
    };
    // SAFETY: `stmt` is a Node (or NULL); the tag says it is a TransactionStmt
    // before it is read as one.
    let commit_prepared = !stmt.is_null()
        && unsafe { pgrx::is_a(stmt, pg_sys::NodeTag::T_TransactionStmt) }
        && unsafe { (*(stmt as *const pg_sys::TransactionStmt)).kind }
            == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED;
    // SAFETY: the previous hook, or PostgreSQL's own, is called with the arguments
    // PostgreSQL passed us (the query string cut down to a SET statement for Citus),
    // as hooks must.
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
    if commit_prepared {
        crate::audit_worker::prepared_committed();
    }
}

/// The relation `rv` names, locked as COPY FROM locks it, or InvalidOid when it names
/// none (COPY then reports that itself).
fn resolve(rv: *mut pg_sys::RangeVar) -> pg_sys::Oid {
    // SAFETY: `rv` is the statement's RangeVar; with RVR_MISSING_OK the lookup
    // returns InvalidOid instead of raising; the lock is held to the end of the
    // transaction.
    unsafe {
        pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::RowExclusiveLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        )
    }
}

/// Whether row level security applies to the current user on `relid` (false for
/// InvalidOid).
fn rls_applies_to(relid: pg_sys::Oid) -> bool {
    // SAFETY: check_enable_rls with noError reads the relation's flags (a syscache
    // lookup; a missing relation is RLS_NONE) and the current user's attributes.
    relid != pg_sys::InvalidOid
        && unsafe { pg_sys::check_enable_rls(relid, pg_sys::InvalidOid, true) }
            == pg_sys::CheckEnableRlsResult::RLS_ENABLED as std::ffi::c_int
}
