//! Audit capture: row-change entries from `ledger_audit` triggers, and the decrypt
//! audit.
//!
//! Decrypt auditing (GUC `pgseal.audit_decrypt`; docs/SECURITY.md, "Decrypt audit"):
//! - `on` (the default): the first decrypt of each key in a transaction hands a
//!   `vault.decrypt_started` entry to the audit writer (`crate::audit_worker`) and
//!   waits until the writer has committed it, before the plaintext is returned, so
//!   the record survives a rollback, a failed commit and a crash. It goes to the
//!   tenant's chain, or to the system chain when another transaction holds the
//!   tenant's. When the transaction ends, one `vault.decrypt` entry per key
//!   completes the count: at commit inside the transaction (or through the writer
//!   in a read-only one), on rollback and at PREPARE through the writer. Read-only
//!   transactions can decrypt.
//! - `commit`: only the `vault.decrypt` entries, written at pre-commit; they commit
//!   or roll back with the transaction, and `vault_decrypt` refuses (25006) in a
//!   read-only transaction on a primary.
//! - on a hot standby, where nothing can be written, decrypts are allowed and each
//!   transaction's counts are written to the server log at LOG level instead.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use pgrx::pg_sys;
use pgseal_core::canonical::lossless_numbers;

use crate::audit_worker::{self, Entry};
use crate::context;
use crate::error::{SealError, SealResult};
use crate::gucs::{self, AuditDecrypt};

/// Distinct contexts recorded per key and transaction; more are counted only.
const MAX_CONTEXTS: usize = 64;
/// How long the writer keeps trying to append an end-of-transaction count (ms).
const COMPLETION_RETRY_MS: i64 = 60_000;

#[derive(Default)]
struct KeyUse {
    tenant: String,
    count: i64,
    contexts: BTreeSet<String>,
    no_context: bool,
    more_contexts: bool,
    /// Where the durable `vault.decrypt_started` entry went: (chain, seq).
    started: Option<(String, i64)>,
    /// The actor and database role of the first decrypt, read while the transaction
    /// could still look them up (no catalog access is allowed once it aborted).
    who: (String, String),
}

thread_local! {
    static DECRYPTS: RefCell<BTreeMap<String, KeyUse>> = const { RefCell::new(BTreeMap::new()) };
}

fn in_recovery() -> bool {
    // SAFETY: RecoveryInProgress may be called at any time in a backend.
    unsafe { pg_sys::RecoveryInProgress() }
}

fn read_only() -> bool {
    // SAFETY: XactReadOnly is a plain bool global of the transaction machinery.
    unsafe { pg_sys::XactReadOnly }
}

fn mode() -> AuditDecrypt {
    gucs::AUDIT_DECRYPT.get().mode()
}

/// Checks, before any decrypting, that this decrypt can be audited.
pub fn before_decrypt() -> SealResult<()> {
    if mode() == AuditDecrypt::Commit && !in_recovery() && read_only() {
        return Err(SealError::ReadOnly(
            "vault_decrypt with pgseal.audit_decrypt = commit",
        ));
    }
    Ok(())
}

/// Runs before a key opens a value: with `pgseal.audit_decrypt = on`, the key's
/// first decrypt in the transaction is recorded durably first. An error here means
/// nothing may be decrypted.
pub fn before_open(key_id: &str, tenant: &str, ctx: Option<&str>) -> SealResult<()> {
    let started_already = DECRYPTS.with(|d| d.borrow().get(key_id).is_some_and(|u| u.started.is_some()));
    if mode() != AuditDecrypt::On || in_recovery() || started_already {
        return Ok(());
    }
    let who = (super::default_actor(), super::db_role());
    crate::limits::check("actor (the user id setting)", &who.0, crate::limits::ACTOR)?;
    let at = start_durably(key_id, tenant, ctx, &who)?;
    DECRYPTS.with(|d| {
        let mut d = d.borrow_mut();
        let u = use_of(&mut d, key_id, tenant);
        u.started = Some(at);
        u.who = who;
    });
    Ok(())
}

fn use_of<'a>(d: &'a mut BTreeMap<String, KeyUse>, key_id: &str, tenant: &str) -> &'a mut KeyUse {
    d.entry(key_id.to_owned()).or_insert_with(|| KeyUse {
        tenant: tenant.to_owned(),
        ..KeyUse::default()
    })
}

/// Counts one successful decrypt under `key_id`.
pub fn note_decrypt(key_id: &str, tenant: &str, ctx: Option<&str>) {
    if mode() == AuditDecrypt::Off {
        return;
    }
    DECRYPTS.with(|d| {
        let mut d = d.borrow_mut();
        let u = use_of(&mut d, key_id, tenant);
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

/// Has the writer commit `vault.decrypt_started` and returns (chain, seq).
fn start_durably(
    key_id: &str,
    tenant: &str,
    ctx: Option<&str>,
    who: &(String, String),
) -> SealResult<(String, i64)> {
    let payload = serde_json::json!({
        "tenant": tenant,
        "key_id": key_id,
        "context": ctx,
    });
    let entry = Entry {
        tenant: tenant.to_owned(),
        actor: who.0.clone(),
        role: who.1.clone(),
        event: "vault.decrypt_started".to_owned(),
        payload: payload.to_string(),
    };
    let timeout = i64::from(gucs::AUDIT_DECRYPT_TIMEOUT.get());
    audit_worker::append_durably(&entry, timeout)
}

fn completion_payload(key_id: &str, u: KeyUse, outcome: Option<&str>) -> serde_json::Value {
    let mut contexts: Vec<serde_json::Value> = u
        .contexts
        .into_iter()
        .map(serde_json::Value::from)
        .collect();
    if u.no_context {
        contexts.insert(0, serde_json::Value::Null);
    }
    let mut p = serde_json::json!({
        "key_id": key_id,
        "count": u.count,
        "contexts": contexts,
        "more_contexts": u.more_contexts,
    });
    if let Some((chain, seq)) = u.started {
        p["started"] = serde_json::json!({ "tenant": chain, "seq": seq });
    }
    if let Some(o) = outcome {
        p["outcome"] = serde_json::Value::from(o);
    }
    p
}

/// Appends the transaction's 'vault.decrypt' entries inside it. Runs at pre-commit
/// (`preparing`: at PRE_PREPARE). Counts whose start was recorded durably are left
/// for `transaction_ended` when the transaction is being prepared (it may still
/// roll back) or is read-only (it cannot write).
pub fn flush_decrypts(preparing: bool) -> SealResult<()> {
    let keep_for_end = preparing || read_only();
    let uses = DECRYPTS.with(|d| {
        let mut d = d.borrow_mut();
        let all = std::mem::take(&mut *d);
        let (later, now): (BTreeMap<_, _>, BTreeMap<_, _>) = all
            .into_iter()
            .partition(|(_, u)| keep_for_end && u.started.is_some());
        *d = later;
        now
    });
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
        let tenant = u.tenant.clone();
        let outcome = u.started.is_some().then_some("committed");
        let payload = completion_payload(&key_id, u, outcome);
        super::heads::append(&tenant, "vault.decrypt", &payload.to_string(), &actor)?;
    }
    Ok(())
}

/// At the end of a transaction (`outcome`: committed, prepared or rolled back),
/// hands the counts of durably started keys that were not written inside it to the
/// audit writer, and forgets the rest. Never raises.
pub fn transaction_ended(outcome: &str) {
    let uses = DECRYPTS.with(|d| std::mem::take(&mut *d.borrow_mut()));
    for (key_id, u) in uses {
        if u.started.is_none() {
            continue;
        }
        let (actor, role) = u.who.clone();
        let tenant = u.tenant.clone();
        let mut payload = completion_payload(&key_id, u, Some(outcome));
        // Named, for when the writer ends up putting it in the system chain.
        payload["tenant"] = serde_json::Value::from(tenant.as_str());
        let entry = Entry {
            tenant,
            actor,
            role,
            event: "vault.decrypt".to_owned(),
            payload: payload.to_string(),
        };
        audit_worker::append_later(&entry, COMPLETION_RETRY_MS);
    }
}

/// Forgets uncommitted decrypt counts.
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
    let mut actor = super::default_actor();
    if actor.len() > crate::limits::ACTOR {
        actor = over_limit_marker(&actor);
    }
    // A row whose tenant column is longer than a tenant id may be (limits.rs) is
    // still a valid write: its entry goes to the system chain, naming the tenant by
    // its SHA-256, instead of failing the application's statement.
    if tenant.len() > crate::limits::TENANT {
        let wrapped = format!(
            "{{\"tenant_over_limit\":\"{}\",\"entry\":{payload}}}",
            over_limit_marker(&tenant)
        );
        let (seq, _) = super::heads::append(super::evidence::SYSTEM_TENANT, event, &wrapped, &actor)?;
        return Ok(seq);
    }
    let (seq, _) = super::heads::append(&tenant, event, &payload, &actor)?;
    Ok(seq)
}

/// What the audit records in place of a value over its limit: its SHA-256.
fn over_limit_marker(value: &str) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(value.as_bytes())))
}

pub fn has_pending() -> bool {
    DECRYPTS.with(|d| !d.borrow().is_empty())
}
