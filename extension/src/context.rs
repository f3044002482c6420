//! Tenant context: which tenant the current transaction acts for.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::{OrRaise, SealError, SealResult};
use crate::gucs;
use crate::pg::citus;

/// A setting's value by name, as its bytes; `None` when it does not exist.
fn setting_bytes(name: &CStr) -> Option<Vec<u8>> {
    // SAFETY: `name` is a valid NUL-terminated string. With missing_ok = true,
    // GetConfigOption returns NULL for an unknown name instead of raising; a
    // non-NULL result points to a NUL-terminated string owned by the GUC
    // machinery, which we copy before anything can change it.
    unsafe {
        let p = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        (!p.is_null()).then(|| CStr::from_ptr(p).to_bytes().to_vec())
    }
}

/// Reads a setting by name; `None` when it does not exist.
pub fn read_setting(name: &CStr) -> Option<String> {
    setting_bytes(name).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Text from PostgreSQL that pgseal compares or records (a setting, a role's
/// name), refused (22021, `what` names it) when it is not UTF-8, which a SQL_ASCII
/// or single-byte database lets in, or a shared catalog written from one:
/// replacing those bytes would make two values one.
pub fn utf8_text(bytes: &[u8], what: &'static str) -> SealResult<String> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| SealError::NotUtf8(what))
}

/// Reads a setting by name as text pgseal compares or records (`utf8_text`);
/// `None` when it does not exist.
pub fn read_setting_utf8(name: &CStr, what: &'static str) -> SealResult<Option<String>> {
    setting_bytes(name).map(|b| utf8_text(&b, what)).transpose()
}

/// The current tenant, failing closed: NULL or '' is "no tenant context" (42501).
pub fn tenant() -> SealResult<String> {
    tenant_shared().map(|t| t.to_string())
}

thread_local! {
    /// The tenant last read, shared so that a scan decrypting many rows for one
    /// tenant compares the setting's bytes instead of copying them every row.
    static LAST_TENANT: std::cell::RefCell<Option<std::rc::Rc<str>>> = const { std::cell::RefCell::new(None) };
}

/// `tenant()`, without a copy when the setting still holds the tenant last read.
pub fn tenant_shared() -> SealResult<std::rc::Rc<str>> {
    gucs::with_tenant_setting_name(|name| {
        // SAFETY: as in `read_setting`; the bytes are only compared or copied before
        // anything else runs that could change the setting.
        let value = unsafe {
            let p = pg_sys::GetConfigOption(name.as_ptr(), true, false);
            (!p.is_null()).then(|| CStr::from_ptr(p).to_bytes())
        };
        let Some(bytes) = value.filter(|b| !b.is_empty()) else {
            return Err(SealError::NoTenantContext(
                name.to_string_lossy().into_owned(),
            ));
        };
        LAST_TENANT.with(|last| {
            let mut last = last.borrow_mut();
            match &*last {
                Some(t) if t.as_bytes() == bytes => Ok(t.clone()),
                _ => {
                    if bytes.len() > crate::limits::TENANT {
                        return Err(SealError::TooLong {
                            what: "tenant id",
                            max: crate::limits::TENANT,
                        });
                    }
                    // pgseal's own chains (`_pgseal…`) are no tenant anyone acts
                    // for: a session under such a context would read them through
                    // the ledger's policy, key and audit its seals there, and take
                    // their locks.
                    if bytes.starts_with(pgseal_core::ledger::PGSEAL_CHAIN_PREFIX.as_bytes()) {
                        return Err(SealError::Forbidden(
                            "the tenant context names one of pgseal's own chains (_pgseal…), which no session acts for",
                        ));
                    }
                    let t: std::rc::Rc<str> = utf8_text(bytes, "the tenant context")?.into();
                    *last = Some(t.clone());
                    Ok(t)
                }
            }
        })
    })
}

/// The tenant this transaction acts for. Fails with SQLSTATE 42501 when the tenant
/// setting (`pgseal.tenant_setting`, default `app.tenant_id`) is unset or empty.
#[pg_extern(stable, parallel_safe)]
pub fn current_tenant() -> String {
    tenant().or_raise()
}

/// The current application user, failing closed like `tenant()`.
pub fn user_id() -> SealResult<String> {
    let name = gucs::user_setting_name();
    match read_setting_utf8(&name, "the user context")? {
        Some(u) if !u.is_empty() => Ok(u),
        _ => Err(SealError::NoUserContext(
            name.to_string_lossy().into_owned(),
        )),
    }
}

/// The application user this transaction acts for. Fails with SQLSTATE 42501 when
/// the user setting (`pgseal.user_setting`, default `app.user_id`) is unset or empty.
#[pg_extern(stable, parallel_safe)]
pub fn current_user_id() -> String {
    user_id().or_raise()
}

/// The names of the tenant and user settings, for `set_tenant` and the linter.
/// Refuses names that are not plain dotted identifiers.
#[pg_extern(stable, parallel_safe)]
pub fn _context_setting(which: &str) -> String {
    let name = match which {
        "tenant" => gucs::with_tenant_setting_name(|n| n.to_string_lossy().into_owned()),
        "user" => gucs::user_setting_name().to_string_lossy().into_owned(),
        _ => SealError::InvalidArgument("expected 'tenant' or 'user'").raise(),
    };
    let plain = name.split('.').all(|part| {
        let mut chars = part.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    if !plain {
        SealError::InvalidArgument("the configured setting name is not a dotted identifier")
            .raise();
    }
    name
}

/// Clears the tenant and user settings at pre-commit, so even a session-level SET
/// lasts one transaction (an aborted transaction already undoes its own SETs):
/// - with `pgseal.strict_context` on, in every client's session;
/// - always, in a session Citus opened to run another node's statements
///   ([`citus::in_citus_internal_session`]). Citus keeps such a session for the
///   coordinator session's later transactions and sends the tenant as a `SET LOCAL`
///   in each; a session-level value there comes from a query Citus pushed down or
///   a function call it delegated (`set_config(…, false)` inside it), and it would
///   let a later transaction that set no tenant run under it on that node instead
///   of failing closed.
///
/// Every setting that exists is set to '' for the session, whatever its value now:
/// a session-level value can hide under a `SET LOCAL` of '' in the same
/// transaction, which the commit would pop to bring it back. A plain `SET`
/// through the GUC machinery (no SPI, no snapshot): it overrides the transaction's
/// `SET LOCAL`s of the setting and drops the value they hid. Runs last at
/// pre-commit.
fn clear_context(_preparing: bool) -> SealResult<()> {
    for name in context_settings() {
        if read_setting(&name).is_some() {
            crate::privilege::set_setting(&name, c"", pg_sys::GucAction::GUC_ACTION_SET);
        }
    }
    Ok(())
}

/// The tenant and user settings' names, and the offboarding grant's (which a
/// table owner's code on a worker could set for its session: it lasts one
/// transaction too).
fn context_settings() -> [std::ffi::CString; 3] {
    [
        gucs::with_tenant_setting_name(|n| n.to_owned()),
        gucs::user_setting_name(),
        c"pgseal.offboard_grant".to_owned(),
    ]
}

/// Whether this commit clears the tenant and user settings ([`clear_context`]):
/// where it applies, once either setting exists in the session.
fn clears_context_here() -> bool {
    crate::pg::xact::is_client_backend()
        && (gucs::strict_context() || citus::in_citus_internal_session())
        && context_settings()
            .iter()
            .any(|name| read_setting(name).is_some())
}

/// Closes every `WITH HOLD` cursor at commit, under `pgseal.strict_context`.
///
/// A holdable cursor outlives its transaction: at commit PostgreSQL runs its query to
/// the end and keeps the rows, read under the tenant of that transaction. Behind a
/// pooler in transaction mode the next client of the server connection could then
/// `FETCH` them. Closing (rather than refusing) them:
/// - PostgreSQL persists holdable cursors (`PreCommit_Portals` in xact.c's
///   `CommitTransaction`) *before* it calls the `XACT_EVENT_PRE_COMMIT` callbacks,
///   and a cursor once persisted survives an abort of its transaction
///   (`AtAbort_Portals` skips portals whose `createSubid` is invalid). An ERROR raised
///   here would so lose the client's transaction and still leave the rows behind.
/// - Dropping a persisted cursor is what `CLOSE` does in a later transaction:
///   `PortalDrop(portal, false)` on a portal with no resource owner, no snapshot and
///   no executor state, only its hold store and memory.
///
/// A client can still use a `WITH HOLD` cursor inside the transaction that declared
/// it; after its commit a `FETCH` fails with 34000 (cursor does not exist).
///
/// Cursors are found through `pg_catalog.pg_cursor()`, which lists every portal
/// PostgreSQL can make holdable (DECLARE, SPI cursors); the ones it hides from that
/// list (a simple query's, EXECUTE's) are never holdable. The portal running the
/// COMMIT (active) and portals pinned by a procedure that commits inside a cursor
/// loop (PL/pgSQL's FOR over a query; the procedure itself releases them) are left
/// alone. Costs one SPI query per commit while `strict_context` is on (about 0.02 ms
/// on the 2-core test machine).
/// It runs first at pre-commit, before any other pre-commit work that could fail:
/// a cursor persisted at this commit survives the abort such a failure causes.
fn close_held_cursors_if_strict(_preparing: bool) -> SealResult<()> {
    if !strict_here() {
        return Ok(());
    }
    /// PostgreSQL's `InvalidSubTransactionId`: the portal belongs to no transaction.
    const INVALID_SUB_TRANSACTION_ID: pg_sys::SubTransactionId = 0;
    let names: Vec<String> = Spi::connect(|client| {
        client
            .select(
                "SELECT name FROM pg_catalog.pg_cursor() WHERE is_holdable",
                None,
                &[],
            )?
            .map(|row| row.get::<String>(1))
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>, _>>()
    })?;
    for name in names {
        let Ok(name) = std::ffi::CString::new(name) else {
            continue;
        };
        // SAFETY: `name` is a valid NUL-terminated string. GetPortalByName returns
        // NULL or a live portal, which we only read before dropping it. A portal that
        // is not active, not pinned and has an invalid createSubid was persisted by
        // PreCommit_Portals (or in an earlier transaction): it owns no resources of
        // this transaction, so PortalDrop(portal, false) frees it exactly as CLOSE
        // would. Nothing else refers to it after the drop.
        unsafe {
            let portal = pg_sys::GetPortalByName(name.as_ptr());
            if portal.is_null() {
                continue;
            }
            let p = &*portal;
            let held = (p.cursorOptions & pg_sys::CURSOR_OPT_HOLD as std::ffi::c_int) != 0
                && p.createSubid == INVALID_SUB_TRANSACTION_ID
                && p.status != pg_sys::PortalStatus::PORTAL_ACTIVE
                && !p.portalPinned;
            if held {
                pg_sys::PortalDrop(portal, false);
            }
        }
    }
    Ok(())
}

/// `pgseal.strict_context` applies to clients' backends only: a background process
/// has no client to hand a tenant to, and some (the autovacuum launcher) commit
/// with no database, where the cursor query could not even run.
fn strict_here() -> bool {
    gucs::strict_context() && crate::pg::xact::is_client_backend()
}

/// The context's pre-commit work: `WITH HOLD` cursors closed first (with
/// `pgseal.strict_context`), the settings cleared last ([`clear_context`]).
pub const TXN: crate::txn::Participant = crate::txn::Participant {
    pre_commit: &[
        crate::txn::PreCommit {
            phase: crate::txn::Phase::CloseCursors,
            has_work: strict_here,
            run: close_held_cursors_if_strict,
        },
        crate::txn::PreCommit {
            phase: crate::txn::Phase::ClearContext,
            has_work: clears_context_here,
            run: clear_context,
        },
    ],
    ..crate::txn::Participant::NONE
};
