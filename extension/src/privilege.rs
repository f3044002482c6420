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
    /// The extension owner for this transaction (the ledger's append path switches
    /// identity on every call).
    static OWNER: std::cell::Cell<Option<pg_sys::Oid>> = const { std::cell::Cell::new(None) };
    /// (extension oid, owner) as last read from pg_extension, reused while the
    /// extension's oid is unchanged: DROP and CREATE EXTENSION give a new oid.
    static KNOWN: std::cell::Cell<Option<(pg_sys::Oid, pg_sys::Oid)>> = const { std::cell::Cell::new(None) };
}

fn extension_owner() -> pg_sys::Oid {
    if let Some(o) = OWNER.with(|c| c.get()) {
        return o;
    }
    // SAFETY: a catalog lookup by name; with missing_ok it returns InvalidOid
    // instead of raising.
    let ext = unsafe { pg_sys::get_extension_oid(c"pgseal".as_ptr(), true) };
    let o = match KNOWN.with(|c| c.get()) {
        Some((known_ext, owner)) if known_ext == ext => owner,
        _ => {
            let owner = crate::plans::first_row(
                "SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'pgseal'",
                &[],
                &[],
                |r| Ok(r.get::<pg_sys::Oid>(1)?),
            )
            .ok()
            .flatten()
            .flatten()
            .unwrap_or(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID));
            KNOWN.with(|c| c.set(Some((ext, owner))));
            owner
        }
    };
    OWNER.with(|c| c.set(Some(o)));
    o
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
