//! Who an entry names: its actor (the application's user, or the session user) and
//! its `db_role` (the database role that appended it).

use std::ffi::CStr;

use pgrx::pg_sys;

use crate::context;
use crate::error::OrRaise;

/// The default actor: the user-id setting when set, else `session_user`.
pub fn default_actor() -> String {
    let name = crate::gucs::user_setting_name();
    // Not UTF-8: refused (22021), as the tenant context is, rather than recorded
    // with its bytes replaced (two users would read as one).
    if let Some(u) = context::read_setting_utf8(&name, "the user context").or_raise() {
        if !u.is_empty() {
            return u;
        }
    }
    // SAFETY: GetSessionUserId is valid in any backend with a session.
    let user = unsafe { pg_sys::GetSessionUserId() };
    SESSION_USER.with(|cached| {
        let mut cached = cached.borrow_mut();
        match &*cached {
            Some((oid, name)) if *oid == user => name.clone(),
            _ => {
                // SAFETY: with noerr = false, GetUserNameFromId returns a palloc'd
                // NUL-terminated name or raises, so the pointer is valid for the copy.
                let name =
                    role_name(unsafe { CStr::from_ptr(pg_sys::GetUserNameFromId(user, false)) });
                *cached = Some((user, name.clone()));
                name
            }
        }
    })
}

thread_local! {
    /// The session user's name, by its OID, for the rest of the transaction (a
    /// statement appending many entries looks it up once; a rename shows from the
    /// next transaction on).
    static SESSION_USER: std::cell::RefCell<Option<(pg_sys::Oid, String)>> =
        const { std::cell::RefCell::new(None) };
    /// The acting role's name, by its OID, cached like `SESSION_USER`.
    static DB_ROLE: std::cell::RefCell<Option<(pg_sys::Oid, String)>> =
        const { std::cell::RefCell::new(None) };
}

/// The `db_role` of an entry appended now (docs/FORMAT.md, "Ledger entries"): the
/// database role the calling session acts as, `current_user` as the session set it
/// (after `SET ROLE`). It is PostgreSQL's "outer" user id, which neither pgseal's
/// switch to the extension owner (`privilege::as_owner`) nor a SECURITY DEFINER
/// function changes, so it is the same wherever in pgseal it is read, and a caller
/// cannot choose it but by `SET ROLE` to a role it is a member of.
pub fn db_role() -> String {
    // SAFETY: GetOuterUserId reads a backend global that is valid in any backend
    // with a session.
    let role = unsafe { pg_sys::GetOuterUserId() };
    DB_ROLE.with(|cached| {
        let mut cached = cached.borrow_mut();
        match &*cached {
            Some((oid, name)) if *oid == role => name.clone(),
            _ => {
                // SAFETY: with noerr = false, GetUserNameFromId returns a palloc'd
                // NUL-terminated name or raises, so the pointer is valid for the copy.
                let name =
                    role_name(unsafe { CStr::from_ptr(pg_sys::GetUserNameFromId(role, false)) });
                *cached = Some((role, name.clone()));
                name
            }
        }
    })
}

/// A role's name as an entry records it (`context::utf8_text`: role names are in a
/// shared catalog, which a database of another encoding writes too).
fn role_name(name: &CStr) -> String {
    context::utf8_text(name.to_bytes(), "the role's name").or_raise()
}

/// Forgets the cached names (the transaction ended: a rename shows from the next one).
pub(super) fn forget() {
    SESSION_USER.with(|u| u.borrow_mut().take());
    DB_ROLE.with(|u| u.borrow_mut().take());
}
