//! Audit capture: row-change entries from `ledger_audit` triggers, and the decrypt
//! audit.
//!
//! Decrypt auditing (GUC `pgseal.audit_decrypt`; docs/SECURITY.md, "Decrypt audit"):
//! - `on` (the default): the first decrypt of each key in a transaction hands a
//!   `vault.decrypt_started` entry to the audit writer (`crate::audit_worker`) and
//!   waits until the writer has committed it, before the plaintext is returned, so
//!   the record survives a rollback, a failed commit and a crash. It goes to the
//!   tenant's chain, or to the audit chain `_pgseal_audit` when another transaction holds the
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
use crate::pg::xact::{in_recovery, read_only};

/// Distinct contexts recorded per key and transaction; more are counted only.
const MAX_CONTEXTS: usize = 64;
/// How long the writer keeps trying to append an end-of-transaction count (ms).
const COMPLETION_RETRY_MS: i64 = 60_000;

/// One key's decrypts in this transaction by one database role (a `SET ROLE` in the
/// middle of a transaction starts a use, and a durable record, of its own).
struct KeyUse {
    tenant: String,
    role_oid: pg_sys::Oid,
    count: i64,
    contexts: BTreeSet<String>,
    no_context: bool,
    more_contexts: bool,
    /// Where the durable `vault.decrypt_started` entry went: (chain, seq).
    started: Option<(String, i64)>,
    /// Its count was appended inside the transaction (pre-commit): only a commit
    /// keeps it, so after an abort the writer still gets it.
    written: bool,
    /// On a hot standby: the first decrypt was logged.
    logged: bool,
    /// The actor and database role, read when the use began (no catalog access is
    /// allowed once the transaction aborted).
    who: (String, String),
}

thread_local! {
    /// By key id, one use per role.
    static DECRYPTS: RefCell<BTreeMap<String, Vec<KeyUse>>> = const { RefCell::new(BTreeMap::new()) };
}

fn mode() -> AuditDecrypt {
    gucs::audit_decrypt()
}

fn current_role() -> pg_sys::Oid {
    // SAFETY: GetOuterUserId reads a backend global; the same role `db_role` names.
    unsafe { pg_sys::GetOuterUserId() }
}

/// Checks, before any decrypting, that this decrypt can be audited.
pub fn before_decrypt() -> SealResult<()> {
    crate::pg::xact::require_not_parallel_worker(
        "vault_decrypt cannot run in a parallel worker, where its decrypts would go unrecorded (mark the function around it PARALLEL UNSAFE)",
    )?;
    crate::privilege::require_no_table_owner_code(
        "vault_decrypt cannot run in a table owner's code during subject_export or subject_erase",
    )?;
    if mode() == AuditDecrypt::Commit && !in_recovery() {
        if read_only() {
            return Err(SealError::ReadOnly(
                "vault_decrypt with pgseal.audit_decrypt = commit",
            ));
        }
        // A Citus worker keeps no ledger, and a failure of its commit may never reach
        // the coordinator's client: only the audit writer (`on`) records there.
        if crate::pg::citus::is_worker()? {
            return Err(SealError::NotSupported(
                "on a Citus worker, vault_decrypt needs pgseal.audit_decrypt = on (the decrypts are recorded on the coordinator by the audit writer)",
            ));
        }
    }
    Ok(())
}

/// Runs `f` on this transaction's use of `key_id` by the current role, creating it.
/// Called for every decrypted row: a found use costs one map lookup, no allocation.
fn with_use<R>(key_id: &str, tenant: &str, f: impl FnOnce(&mut KeyUse) -> R) -> R {
    let role = current_role();
    DECRYPTS.with(|d| {
        let mut d = d.borrow_mut();
        if let Some(u) = d
            .get_mut(key_id)
            .and_then(|v| v.iter_mut().find(|u| u.role_oid == role))
        {
            return f(u);
        }
        let uses = d.entry(key_id.to_owned()).or_default();
        uses.push(KeyUse {
            tenant: tenant.to_owned(),
            role_oid: role,
            count: 0,
            contexts: BTreeSet::new(),
            no_context: false,
            more_contexts: false,
            started: None,
            written: false,
            logged: false,
            who: (super::actor::default_actor(), super::actor::db_role()),
        });
        f(uses.last_mut().expect("pushed above"))
    })
}

/// Runs before a key opens a value: with `pgseal.audit_decrypt = on`, the first
/// decrypt of the key by this role in the transaction is recorded durably first (on
/// a hot standby: logged). An error here means nothing may be decrypted.
pub fn before_open(key_id: &str, tenant: &str, ctx: Option<&str>) -> SealResult<()> {
    let mode = mode();
    if mode == AuditDecrypt::Off {
        return Ok(());
    }
    let recovery = in_recovery();
    // Every decrypted row passes here: the actor and role are copied out only for
    // the one that writes a record or a log line.
    let needs = |u: &KeyUse| {
        if recovery {
            !u.logged
        } else {
            mode == AuditDecrypt::On && u.started.is_none()
        }
    };
    let Some(who) = with_use(key_id, tenant, |u| needs(u).then(|| u.who.clone())) else {
        return Ok(());
    };
    // The actor is bounded before it is written anywhere, the log included.
    crate::limits::check("actor (the user id setting)", &who.0, crate::limits::ACTOR)?;
    if recovery {
        // Tenant, actor and role quoted and escaped (`{:?}`): a setting any role
        // chooses must not start a line of its own in the log, the only record of a
        // decrypt on a standby.
        pgrx::log!(
            "pgseal: decrypting under key {:?} for tenant {:?} by {:?} (role {:?}) on a hot standby, not recorded in the ledger",
            key_id,
            tenant,
            who.0,
            who.1
        );
        with_use(key_id, tenant, |u| u.logged = true);
        return Ok(());
    }
    let at = start_durably(key_id, tenant, ctx, &who)?;
    with_use(key_id, tenant, |u| u.started = Some(at));
    Ok(())
}

/// Counts one successful decrypt under `key_id`.
pub fn note_decrypt(key_id: &str, tenant: &str, ctx: Option<&str>) {
    if mode() == AuditDecrypt::Off {
        return;
    }
    with_use(key_id, tenant, |u| {
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
    let timeout = gucs::audit_decrypt_timeout_ms();
    audit_worker::append_durably(&entry, timeout)
}

fn completion_payload(key_id: &str, u: &KeyUse, outcome: Option<&str>) -> serde_json::Value {
    let mut contexts: Vec<serde_json::Value> = u
        .contexts
        .iter()
        .map(|c| serde_json::Value::from(c.as_str()))
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
    if let Some((chain, seq)) = &u.started {
        p["started"] = serde_json::json!({ "tenant": chain, "seq": seq });
    }
    if let Some(o) = outcome {
        p["outcome"] = serde_json::Value::from(o);
    }
    p
}

fn log_standby_counts(key_id: &str, u: &KeyUse, outcome: &str) {
    pgrx::log!(
        "pgseal: {} decrypt(s) under key {:?} for tenant {:?} by {:?} (role {:?}) on a hot standby, transaction {}, not recorded in the ledger",
        u.count,
        key_id,
        u.tenant,
        u.who.0,
        u.who.1,
        outcome
    );
}

/// Appends the transaction's 'vault.decrypt' entries inside it. Runs at pre-commit
/// (`preparing`: at PRE_PREPARE). Counts whose start was recorded durably are left
/// for `transaction_ended` when the transaction is being prepared (it may still
/// roll back) or is read-only (it cannot write). Written counts stay listed, so an
/// abort after this (the commit failed) still hands them to the writer.
pub fn flush_decrypts(preparing: bool) -> SealResult<()> {
    // A Citus worker keeps no ledger: its counts go to the audit writer at the end,
    // which appends them on the coordinator.
    let keep_for_end = preparing || read_only() || crate::pg::citus::is_worker()?;
    let recovery = in_recovery();
    let todo: Vec<(String, String, serde_json::Value, (String, String))> = DECRYPTS.with(|d| {
        let mut d = d.borrow_mut();
        let mut todo = Vec::new();
        for (key_id, uses) in d.iter_mut() {
            for u in uses.iter_mut().filter(|u| !u.written) {
                if recovery {
                    log_standby_counts(key_id, u, "committed");
                    u.written = true;
                } else if !(keep_for_end && u.started.is_some()) {
                    let outcome = u.started.is_some().then_some("committed");
                    todo.push((
                        key_id.clone(),
                        u.tenant.clone(),
                        completion_payload(key_id, u, outcome),
                        u.who.clone(),
                    ));
                    u.written = true;
                }
            }
        }
        todo
    });
    for (_, tenant, payload, (actor, role)) in todo {
        super::append::append_with_role(
            &tenant,
            "vault.decrypt",
            &payload.to_string(),
            &actor,
            &role,
        )?;
    }
    Ok(())
}

/// At the end of a transaction (`outcome`: committed, prepared or rolled back),
/// hands the counts of durably started uses that no commit kept to the audit writer
/// (and on a hot standby, logs a rolled-back transaction's counts); forgets the
/// rest. Never raises.
pub fn transaction_ended(outcome: &str) {
    let all = DECRYPTS.with(|d| std::mem::take(&mut *d.borrow_mut()));
    let committed = outcome == "committed";
    for (key_id, uses) in all {
        for mut u in uses {
            if u.logged && !committed {
                log_standby_counts(&key_id, &u, outcome);
            }
            if u.started.is_none() || (committed && u.written) {
                continue;
            }
            let (actor, role) = u.who.clone();
            let tenant = u.tenant.clone();
            let entry = |u: &KeyUse| {
                let mut payload = completion_payload(&key_id, u, Some(outcome));
                // Named, for when the writer ends up putting it in the audit chain.
                payload["tenant"] = serde_json::Value::from(tenant.as_str());
                Entry {
                    tenant: tenant.clone(),
                    actor: actor.clone(),
                    role: role.clone(),
                    event: "vault.decrypt".to_owned(),
                    payload: payload.to_string(),
                }
            };
            let mut e = entry(&u);
            if serde_json::to_vec(&e).map_or(true, |b| b.len() > audit_worker::queue::BUF) {
                // Too long for a queue slot: the count matters, the context list is cut.
                u.contexts.clear();
                u.more_contexts = true;
                e = entry(&u);
            }
            audit_worker::append_later(&e, COMPLETION_RETRY_MS);
        }
    }
}

/// Forgets uncommitted decrypt counts.
pub fn reset() {
    DECRYPTS.with(|d| d.borrow_mut().clear());
}

/// Appends a row-change entry for the audit trigger (`audit_trigger.rs`). The tenant
/// is the row's tenant column when the table has one, else the current tenant
/// context. Numbers that RFC 8785 would round are stored as strings.
pub fn append_row_change(
    tenant: Option<&str>,
    event: &str,
    payload: &str,
    subjects: Vec<String>,
) -> SealResult<i64> {
    crate::master::require_loaded()?;
    let tenant = match tenant {
        Some(t) if !t.is_empty() => t.to_owned(),
        _ => context::tenant()?,
    };
    let payload = lossless_numbers(payload);
    let mut actor = super::actor::default_actor();
    if actor.len() > crate::limits::ACTOR {
        actor = over_limit_marker(&actor);
    }
    // A row whose tenant column is longer than a tenant id may be (limits.rs), or
    // names one of pgseal's own chains, is still a valid write: its entry goes to the
    // open chain (any writer of an audited table can cause it, so never the system
    // chain), naming the tenant by its SHA-256, instead of failing the application's
    // statement.
    if tenant.len() > crate::limits::TENANT || super::names::is_pgseal_chain(&tenant) {
        let wrapped = format!(
            "{{\"tenant_over_limit\":\"{}\",\"entry\":{payload}}}",
            over_limit_marker(&tenant)
        );
        let (seq, _) = super::append::append(super::names::OPEN_CHAIN, event, &wrapped, &actor)?;
        return Ok(seq);
    }
    // A subject id that `ledger_append` would refuse (blank, with control
    // characters, over its limit) is named by its SHA-256, like an over-long actor:
    // the application's write does not fail, and erasure finds it by that name.
    let mut subjects: Vec<String> = subjects
        .into_iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            if s.len() > crate::limits::SUBJECT || s.chars().any(char::is_control) {
                over_limit_marker(&s)
            } else {
                s
            }
        })
        .collect();
    subjects.sort_unstable();
    subjects.dedup();
    subjects.truncate(crate::limits::SUBJECTS);
    let (seq, _) = super::append::append_naming(&tenant, event, &payload, &actor, subjects)?;
    Ok(seq)
}

/// What the audit records in place of a value over its limit: its SHA-256.
fn over_limit_marker(value: &str) -> String {
    use sha2::Digest;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(value.as_bytes()))
    )
}

pub fn has_pending() -> bool {
    DECRYPTS.with(|d| !d.borrow().is_empty())
}
