//! Audit capture: row-change entries from `ledger_audit` triggers, and one
//! 'vault.decrypt' entry per key at the commit of a transaction that decrypted.
//!
//! Decrypt auditing (GUC `pgseal.audit_decrypt`, default on):
//! - on a read-write primary, every transaction that decrypts appends its entries
//!   at pre-commit; they commit or roll back with it;
//! - in a read-only transaction on a primary, `vault_decrypt` refuses (25006),
//!   because the entry could not be written: nothing is skipped silently;
//! - on a hot standby, where nothing can be written, decrypts are allowed and each
//!   transaction's counts are written to the server log at LOG level instead.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use pgrx::pg_sys;
use pgseal_core::canonical::lossless_numbers;

use crate::context;
use crate::error::{SealError, SealResult};
use crate::gucs;

/// Distinct contexts recorded per key and transaction; more are counted only.
const MAX_CONTEXTS: usize = 64;

#[derive(Default)]
struct KeyUse {
    tenant: String,
    count: i64,
    contexts: BTreeSet<String>,
    no_context: bool,
    more_contexts: bool,
}

thread_local! {
    static DECRYPTS: RefCell<BTreeMap<String, KeyUse>> = const { RefCell::new(BTreeMap::new()) };
}

fn in_recovery() -> bool {
    // SAFETY: RecoveryInProgress may be called at any time in a backend.
    unsafe { pg_sys::RecoveryInProgress() }
}

/// Checks, before any plaintext is returned, that this decrypt can be audited.
pub fn before_decrypt() -> SealResult<()> {
    if !gucs::AUDIT_DECRYPT.get() || in_recovery() {
        return Ok(());
    }
    // SAFETY: XactReadOnly is a plain bool global of the transaction machinery.
    if unsafe { pg_sys::XactReadOnly } {
        return Err(SealError::ReadOnly(
            "vault_decrypt with pgseal.audit_decrypt on",
        ));
    }
    Ok(())
}

/// Counts one decrypt under `key_id` for the commit-time entry.
pub fn note_decrypt(key_id: &str, tenant: &str, ctx: Option<&str>) {
    if !gucs::AUDIT_DECRYPT.get() {
        return;
    }
    DECRYPTS.with(|d| {
        let mut d = d.borrow_mut();
        if !d.contains_key(key_id) {
            d.insert(
                key_id.to_owned(),
                KeyUse {
                    tenant: tenant.to_owned(),
                    ..KeyUse::default()
                },
            );
        }
        let u = d.get_mut(key_id).expect("inserted above");
        u.count += 1;
        match ctx {
            None => u.no_context = true,
            Some(c) if u.contexts.contains(c) => {}
            Some(_) if u.contexts.len() >= MAX_CONTEXTS => u.more_contexts = true,
            Some(c) => {
                u.contexts.insert(c.to_owned());
            }
        }
    });
}

/// Appends the transaction's 'vault.decrypt' entries. Runs at pre-commit.
pub fn flush_decrypts() -> SealResult<()> {
    let uses = DECRYPTS.with(|d| std::mem::take(&mut *d.borrow_mut()));
    if uses.is_empty() {
        return Ok(());
    }
    let actor = super::default_actor();
    for (key_id, u) in uses {
        if in_recovery() {
            pgrx::log!(
                "pgseal: {} decrypt(s) under key {} for tenant {} by {} on a hot standby, not recorded in the ledger",
                u.count,
                key_id,
                u.tenant,
                actor
            );
            continue;
        }
        let mut contexts: Vec<serde_json::Value> = u
            .contexts
            .into_iter()
            .map(serde_json::Value::from)
            .collect();
        if u.no_context {
            contexts.insert(0, serde_json::Value::Null);
        }
        let payload = serde_json::json!({
            "key_id": key_id,
            "count": u.count,
            "contexts": contexts,
            "more_contexts": u.more_contexts,
        });
        super::heads::append(&u.tenant, "vault.decrypt", &payload.to_string(), &actor)?;
    }
    Ok(())
}

/// Forgets uncommitted decrypt counts (the transaction aborted).
pub fn reset() {
    DECRYPTS.with(|d| d.borrow_mut().clear());
}

/// Appends a row-change entry for the audit trigger (`audit_trigger.rs`). The tenant
/// is the row's tenant column when the table has one, else the current tenant
/// context. Numbers that RFC 8785 would round are stored as strings.
pub fn append_row_change(tenant: Option<&str>, event: &str, payload: &str) -> SealResult<i64> {
    crate::master::require_loaded()?;
    let tenant = match tenant {
        Some(t) if !t.is_empty() => t.to_owned(),
        _ => context::tenant()?,
    };
    let payload = lossless_numbers(payload);
    let (seq, _) = super::heads::append(&tenant, event, &payload, &super::default_actor())?;
    Ok(seq)
}

pub fn has_pending() -> bool {
    DECRYPTS.with(|d| !d.borrow().is_empty())
}
