//! Acting as the extension's owner for access to pgseal's own tables.
//!
//! The key table is readable by no application role. Functions that need it run
//! their SPI queries as the extension owner, as SECURITY DEFINER would, but only
//! around the queries themselves, so the fast paths pay nothing. Every query run
//! this way names its objects with their schema.

use pgrx::pg_sys;

struct RestoreUser {
    user: pg_sys::Oid,
    sec_context: i32,
}

impl Drop for RestoreUser {
    fn drop(&mut self) {
        // SAFETY: restores exactly the values GetUserIdAndSecContext returned. Runs on
        // normal return and on unwinding; an ERROR that escapes to the transaction
        // or subtransaction abort also restores them in core PostgreSQL.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.sec_context) };
    }
}

thread_local! {
    /// The owner for this transaction (the ledger's append path switches identity
    /// on every call).
    static OWNER: std::cell::Cell<Option<pg_sys::Oid>> = const { std::cell::Cell::new(None) };
}

/// The owner of the extension's objects: the role that ran CREATE EXTENSION owns
/// every table its script created. Read as the owner of `pgseal.tenant_keys`,
/// through the system caches (the pg_extension row has no cache and cost a
/// catalog scan per transaction). If the table is missing, the current user:
/// never a more privileged role than the caller's.
fn extension_owner() -> pg_sys::Oid {
    if let Some(o) = OWNER.with(|c| c.get()) {
        return o;
    }
    // SAFETY: syscache lookups. get_namespace_oid with missing_ok returns
    // InvalidOid instead of raising, and get_relname_relid returns InvalidOid for
    // a missing name. SearchSysCache1 returns a pinned tuple or NULL; a pg_class
    // tuple's fixed part is FormData_pg_class, read before ReleaseSysCache.
    let owner = unsafe {
        let nsp = pg_sys::get_namespace_oid(c"pgseal".as_ptr(), true);
        let rel = pg_sys::get_relname_relid(c"tenant_keys".as_ptr(), nsp);
        let tup = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(rel),
        );
        if tup.is_null() {
            pg_sys::GetUserId()
        } else {
            let owner = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tup)).relowner;
            pg_sys::ReleaseSysCache(tup);
            owner
        }
    };
    OWNER.with(|c| c.set(Some(owner)));
    owner
}

/// Forgets the cached owner; called at every transaction end.
pub fn forget_owner() {
    OWNER.with(|c| c.set(None));
}

/// Runs `f` with the current user switched to the extension owner.
pub fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    let owner = extension_owner();
    let mut user = pg_sys::Oid::INVALID;
    let mut sec_context = 0;
    // SAFETY: both out-pointers are valid locals.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut user, &mut sec_context) };
    let _restore = RestoreUser { user, sec_context };
    // SAFETY: SECURITY_LOCAL_USERID_CHANGE is the flag SECURITY DEFINER functions
    // use; the guard above restores the previous identity.
    unsafe {
        pg_sys::SetUserIdAndSecContext(
            owner,
            sec_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        )
    };
    f()
}
