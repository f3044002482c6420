//! The tenant ledger: appends, verification, checkpoints, pruning, audit capture.
//!
//! - `heads`: per-transaction chain heads, the append path, and the pre-commit flush.
//! - `verify`: `ledger_verify`, reading the chain back through `pgseal-core`.
//! - `admin`: pruning, and tenant resolution for exports.
//! - `checkpoints`: signed checkpoints (each extends the tenant's previous one) and
//!   the public key.
//! - `guard`: the write guard on the ledger's tables, and the scopes pgseal writes in.
//! - `audit`: row triggers and the per-transaction decrypt audit.
//! - `evidence`: pgseal's reserved event names, the system chain, and the entries
//!   recorded for every change that affects protection.

pub mod admin;
mod append_fn;
pub mod audit;
mod audit_trigger;
mod checkpoints;
pub mod evidence;
mod guard;
mod head_read;
pub(crate) mod head_write;
pub mod heads;
pub mod verify;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;

use pgrx::pg_sys;
use pgseal_core::keys::SecretKey;
use pgseal_core::ledger::EntryMac;
use pgseal_core::wrap::Purpose;

use crate::context;
use crate::error::{SealError, SealResult};
use crate::keystore;

/// Microseconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01 (UTC).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// The default actor: the user-id setting when set, else `session_user`.
pub fn default_actor() -> String {
    let name = crate::gucs::user_setting_name();
    if let Some(u) = context::read_setting(&name) {
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
                let name = unsafe {
                    CStr::from_ptr(pg_sys::GetUserNameFromId(user, false))
                        .to_string_lossy()
                        .into_owned()
                };
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
                let name = unsafe {
                    CStr::from_ptr(pg_sys::GetUserNameFromId(role, false))
                        .to_string_lossy()
                        .into_owned()
                };
                *cached = Some((role, name.clone()));
                name
            }
        }
    })
}

/// The tenant's ledger MAC key, created on its first append. It never rotates, so
/// every MAC ever written keeps verifying; `kek_rewrap` rewraps it like a data key.
pub fn mac_key(tenant: &str, create: bool) -> SealResult<Option<EntryMac>> {
    let key: Option<SecretKey> = if create {
        Some(keystore::ensure_active(tenant, Purpose::Ledger, false)?.1)
    } else {
        match keystore::fetch_active(tenant, Purpose::Ledger)? {
            Some(stored) => Some(stored.unwrap_key()?),
            None => None,
        }
    };
    Ok(key.as_ref().map(EntryMac::new))
}

thread_local! {
    /// Ledger MAC keys of committed tenants, by tenant. A key never changes once
    /// committed, so entries stay valid until the backend exits.
    static MACS: RefCell<HashMap<String, EntryMac>> = RefCell::new(HashMap::new());
    /// Keys first used in the running transaction; promoted at commit, because a
    /// key created by a transaction that rolls back never existed.
    static TXN_MACS: RefCell<HashMap<String, EntryMac>> = RefCell::new(HashMap::new());
}

/// The MAC key for appending to `tenant`'s chain, creating it on first use.
pub fn mac_for_append(tenant: &str) -> SealResult<EntryMac> {
    if let Some(m) = MACS.with(|c| c.borrow().get(tenant).cloned()) {
        return Ok(m);
    }
    let m = mac_key(tenant, true)?.ok_or(SealError::Internal("ledger key missing"))?;
    TXN_MACS.with(|c| c.borrow_mut().insert(tenant.to_owned(), m.clone()));
    Ok(m)
}

/// Transaction end: keep the keys a committed transaction used, drop the rest.
pub fn end_of_transaction(committed: bool) {
    SESSION_USER.with(|u| u.borrow_mut().take());
    DB_ROLE.with(|u| u.borrow_mut().take());
    let fresh = TXN_MACS.with(|c| std::mem::take(&mut *c.borrow_mut()));
    if committed && !fresh.is_empty() {
        let cap = crate::gucs::key_cache_size();
        MACS.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() + fresh.len() > cap {
                c.clear();
            }
            c.extend(fresh);
        });
    }
    heads::reset();
    audit::reset();
}

/// A subtransaction committed: its pending entries pass to its parent.
pub fn subtransaction_committed(
    subxact: pgrx::pg_sys::SubTransactionId,
    parent: pgrx::pg_sys::SubTransactionId,
) {
    heads::subtransaction_committed(subxact, parent);
}

/// A subtransaction aborted: keys it may have created are forgotten, and every
/// chain head is re-read before its next use.
pub fn subtransaction_aborted(subxact: pgrx::pg_sys::SubTransactionId) {
    TXN_MACS.with(|c| c.borrow_mut().clear());
    heads::subtransaction_aborted(subxact);
}

/// Whether the current user may act on `tenant`'s ledger: its own tenant, or any
/// tenant for members of `pgseal_admin`.
pub fn resolve_tenant(tenant: Option<&str>) -> SealResult<String> {
    match tenant {
        None => context::tenant(),
        Some(t) => {
            crate::limits::tenant_arg(t)?;
            let own = context::tenant().ok();
            if own.as_deref() == Some(t) || is_admin()? {
                Ok(t.to_owned())
            } else {
                Err(SealError::NotAdmin("acting on another tenant's ledger"))
            }
        }
    }
}

/// Whether the current user is a member of `pgseal_admin` (superusers are).
pub fn is_admin() -> SealResult<bool> {
    Ok(
        pgrx::Spi::get_one::<bool>("SELECT pg_catalog.pg_has_role('pgseal_admin', 'MEMBER')")?
            .unwrap_or(false),
    )
}

/// Fails unless the current user is a member of `pgseal_admin`.
pub fn require_admin(what: &'static str) -> SealResult<()> {
    if is_admin()? {
        Ok(())
    } else {
        Err(SealError::NotAdmin(what))
    }
}

/// `pgseal.ledger_append(event, payload jsonb, actor)` (its C entry point is in
/// `append_fn.rs`): appends an entry to the current tenant's chain and returns its
/// seq and hash. The payload arrives as `jsonb_out`'s text, which keeps every number
/// exactly as stored.
pub fn append_entry(
    event: Option<&str>,
    payload: Option<&crate::jsonb::JsonbText>,
    actor: Option<&str>,
) -> SealResult<(i64, pgseal_core::ledger::Hash)> {
    crate::master::require_loaded()?;
    let tenant = context::tenant()?;
    crate::pg::xact::require_read_write("ledger_append")?;
    let event = event.ok_or(SealError::InvalidArgument("event must not be NULL"))?;
    if !event.is_empty() && (event.trim().is_empty() || event.chars().any(char::is_control)) {
        return Err(SealError::InvalidArgument(
            "event must not be blank or contain control characters",
        ));
    }
    // pgseal's own events are written only by pgseal (the message does not echo
    // the event: it may carry whatever the caller put in it).
    if evidence::is_reserved(event) {
        return Err(SealError::InvalidArgument(
            "event names under vault., ledger., key., policy., org., retention., pgseal., subject., tenant., audit. and row. are reserved for pgseal",
        ));
    }
    if evidence::is_pgseal_chain(&tenant) {
        return Err(SealError::Forbidden(
            "the pgseal system chain takes only pgseal's own entries",
        ));
    }
    let actor = match actor {
        Some(a) => a.to_owned(),
        None => default_actor(),
    };
    crate::limits::check("actor", &actor, crate::limits::ACTOR)?;
    let payload = payload.map_or("{}", |p| p.0.as_str());
    heads::append(&tenant, event, payload, &actor)
}

/// Whether pre-commit has ledger work: decrypts to record or entries to write.
pub fn has_pending_work() -> bool {
    audit::has_pending() || heads::has_pending()
}
