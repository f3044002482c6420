//! Each tenant's ledger MAC key, and this backend's cache of them.

use std::cell::RefCell;
use std::collections::HashMap;

use pgseal_core::keys::SecretKey;
use pgseal_core::ledger::EntryMac;
use pgseal_core::wrap::Purpose;

use crate::error::{SealError, SealResult};
use crate::keystore;

/// The tenant's ledger MAC key, created on its first append. It never rotates, so
/// every MAC ever written keeps verifying; `kek_rewrap` rewraps it like a data key.
pub fn key(tenant: &str, create: bool) -> SealResult<Option<EntryMac>> {
    let key: Option<SecretKey> = if create {
        Some(keystore::ensure_active(tenant, Purpose::Ledger)?.1)
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
pub fn for_append(tenant: &str) -> SealResult<EntryMac> {
    if let Some(m) = MACS.with(|c| c.borrow().get(tenant).cloned()) {
        return Ok(m);
    }
    let m = key(tenant, true)?.ok_or(SealError::Internal("ledger key missing"))?;
    TXN_MACS.with(|c| c.borrow_mut().insert(tenant.to_owned(), m.clone()));
    Ok(m)
}

/// Whether `for_append(tenant)` would return at once, without waiting for another
/// transaction: the key is cached or stored, or this transaction could take the
/// tenant's key-creation lock (and now holds it). For the audit writer, which takes
/// chain locks only when they are free and must take the key first, as every
/// append does (`append::append_stored`).
pub fn available_without_waiting(tenant: &str) -> SealResult<bool> {
    if MACS.with(|c| c.borrow().contains_key(tenant))
        || TXN_MACS.with(|c| c.borrow().contains_key(tenant))
    {
        return Ok(true);
    }
    if keystore::fetch_active(tenant, Purpose::Ledger)?.is_some() {
        return Ok(true);
    }
    Ok(crate::locks::key_creation_try(
        tenant,
        Purpose::Ledger.as_str(),
    ))
}

/// Transaction end: keep the keys a committed transaction used, drop the rest.
pub(super) fn transaction_ended(committed: bool) {
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
}

/// A subtransaction aborted: keys it may have created are forgotten.
pub(super) fn subtransaction_aborted() {
    TXN_MACS.with(|c| c.borrow_mut().clear());
}
