//! Appending an entry to a tenant's chain.
//!
//! `ledger_append`'s checks (`append_entry`), then for every append, pgseal's own
//! included: the chain lock and head on the tenant's first append in the
//! transaction (`chain_lock`), one payload commitment, one hash and one MAC
//! (format 2, docs/FORMAT.md: the payload is hashed once, inside its commitment,
//! under a fresh 32-byte salt from the backend's ChaCha20 generator), and the entry
//! added to the pending list, which `writer` writes in batches.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;
use pgseal_core::canonical::canonical_payload;
use pgseal_core::ledger::{entry_hash_v2, fresh_salt_in, payload_commitment, EntryFieldsV2, Hash};

use super::pending::{self, Pending};
use super::{chain_lock, heads};
use crate::context;
use crate::error::{SealError, SealResult};

/// `pgseal.ledger_append(event, payload jsonb, actor)` (its C entry point is in
/// `pg/ledger_append_fn.rs`): appends an entry to the current tenant's chain and returns its
/// seq and hash. The payload's canonical form is read from its binary form, which
/// keeps every number exactly as stored, and is what is hashed; the value itself is
/// what is stored (`pg::jsonb`).
pub fn append_entry(
    event: Option<&str>,
    payload: Option<crate::pg::jsonb::JsonbArg>,
    actor: Option<&str>,
    subjects: Option<Vec<Option<String>>>,
) -> SealResult<(i64, pgseal_core::ledger::Hash)> {
    crate::master::require_loaded()?;
    crate::privilege::require_no_table_owner_code(
        "ledger_append cannot run in a table owner's code during subject_export or subject_erase",
    )?;
    let tenant = context::tenant()?;
    crate::pg::xact::require_read_write("ledger_append")?;
    let event = checked_event(event, &tenant)?;
    let actor = match actor {
        Some(a) => a.to_owned(),
        None => super::actor::default_actor(),
    };
    crate::limits::check("actor", &actor, crate::limits::ACTOR)?;
    let subjects = match subjects {
        Some(s) => checked_subjects(s)?,
        None => Vec::new(),
    };
    // On a Citus worker the entry is appended on the coordinator, which keeps the
    // chain (`forward`).
    if crate::pg::citus::present() && crate::pg::citus::is_worker()? {
        return super::forward::to_coordinator(&tenant, event, payload, &actor, subjects);
    }
    append_caller_entry(
        &tenant,
        event,
        payload,
        &actor,
        &super::actor::db_role(),
        subjects,
    )
}

/// The entry a Citus worker forwarded for `ledger_append` (`forward`), appended
/// here on behalf of `db_role`, the worker's session role; `ledger_append`'s checks
/// of the event, actor and subjects are made again.
pub fn append_forwarded(
    tenant: &str,
    event: &str,
    payload: Option<crate::pg::jsonb::JsonbArg>,
    actor: &str,
    db_role: &str,
    subjects: Option<Vec<Option<String>>>,
) -> SealResult<(i64, pgseal_core::ledger::Hash)> {
    crate::master::require_loaded()?;
    crate::pg::xact::require_read_write("ledger_append")?;
    let event = checked_event(Some(event), tenant)?;
    crate::limits::check("event", event, crate::limits::EVENT)?;
    crate::limits::check("actor", actor, crate::limits::ACTOR)?;
    let subjects = match subjects {
        Some(s) => checked_subjects(s)?,
        None => Vec::new(),
    };
    append_caller_entry(tenant, event, payload, actor, db_role, subjects)
}

/// `ledger_append`'s checks of its event (not NULL, not blank, no control
/// characters, no name pgseal reserves) and of the chain (not pgseal's own).
fn checked_event<'a>(event: Option<&'a str>, tenant: &str) -> SealResult<&'a str> {
    let event = event.ok_or(SealError::InvalidArgument("event must not be NULL"))?;
    if !event.is_empty() && (event.trim().is_empty() || event.chars().any(char::is_control)) {
        return Err(SealError::InvalidArgument(
            "event must not be blank or contain control characters",
        ));
    }
    // pgseal's own events are written only by pgseal (the message does not echo
    // the event: it may carry whatever the caller put in it).
    if super::names::is_reserved(event) {
        return Err(SealError::InvalidArgument(
            "event names under vault., ledger., key., policy., org., retention., pgseal., subject., tenant., audit. and row. are reserved for pgseal",
        ));
    }
    if super::names::is_pgseal_chain(tenant) {
        return Err(SealError::Forbidden(
            "the pgseal system chain takes only pgseal's own entries",
        ));
    }
    Ok(event)
}

/// Appends a caller's entry (checked) with its payload stored as given.
fn append_caller_entry(
    tenant: &str,
    event: &str,
    payload: Option<crate::pg::jsonb::JsonbArg>,
    actor: &str,
    db_role: &str,
    subjects: Vec<String>,
) -> SealResult<(i64, pgseal_core::ledger::Hash)> {
    match payload {
        Some(p) => append_stored(tenant, event, actor, db_role, subjects, move || {
            p.canonical().map(|c| (c, Some(p.raw)))
        }),
        None => append_stored(tenant, event, actor, db_role, subjects, || {
            Ok(("{}".into(), None))
        }),
    }
}

/// The data subjects an entry names (issue 19, docs/FORMAT.md): each a non-blank
/// id without control characters, within `limits::SUBJECT` bytes, at most
/// `limits::SUBJECTS` of them; stored sorted and without repeats, so that the same
/// set is always hashed the same way.
pub fn checked_subjects(subjects: Vec<Option<String>>) -> SealResult<Vec<String>> {
    if subjects.len() > crate::limits::SUBJECTS {
        return Err(SealError::TooMany {
            what: "subjects",
            max: crate::limits::SUBJECTS,
        });
    }
    let mut out = Vec::with_capacity(subjects.len());
    for s in subjects {
        let s = s.ok_or(SealError::NullArgument("a subject"))?;
        crate::limits::check("subject", &s, crate::limits::SUBJECT)?;
        if s.trim().is_empty() || s.chars().any(char::is_control) {
            return Err(SealError::InvalidArgument(
                "a subject must not be empty, blank or contain control characters",
            ));
        }
        out.push(s);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Appends one entry for `tenant`, recording the calling session's role
/// (`actor::db_role`) as its `db_role`; see `append_with_role`.
pub fn append(tenant: &str, event: &str, payload: &str, actor: &str) -> SealResult<(i64, Hash)> {
    append_with_role(tenant, event, payload, actor, &super::actor::db_role())
}

/// Appends one entry for `tenant` on behalf of the database role `db_role`;
/// `payload` is JSON text (checked and made canonical here). Returns the new seq
/// and hash. The caller has checked the tenant and the transaction's read-write
/// state, and vouches for `db_role` (only pgseal's own code calls this: the SQL
/// functions go through `append`). The entry is written with the next batch (see
/// `writer`).
pub fn append_with_role(
    tenant: &str,
    event: &str,
    payload: &str,
    actor: &str,
    db_role: &str,
) -> SealResult<(i64, Hash)> {
    append_stored(tenant, event, actor, db_role, Vec::new(), || {
        Ok((canonical_payload(payload)?, None))
    })
}

/// `append` of an entry that names `subjects` (already checked by
/// `checked_subjects`): pgseal's row audit and its `subject.*` receipts.
pub fn append_naming(
    tenant: &str,
    event: &str,
    payload: &str,
    actor: &str,
    subjects: Vec<String>,
) -> SealResult<(i64, Hash)> {
    append_stored(
        tenant,
        event,
        actor,
        &super::actor::db_role(),
        subjects,
        || Ok((canonical_payload(payload)?, None)),
    )
}

/// `append_with_role` of the canonical text `payload()` returns with, when given,
/// the `jsonb` varlena it was read from, which is stored in place of the canonical
/// text's `jsonb`.
fn append_stored(
    tenant: &str,
    event: &str,
    actor: &str,
    db_role: &str,
    subjects: Vec<String>,
    payload: impl FnOnce() -> Result<(String, Option<Vec<u8>>), pgseal_core::CoreError>,
) -> SealResult<(i64, Hash)> {
    if event.is_empty() {
        return Err(SealError::InvalidArgument("event must not be empty"));
    }
    // `ledger_prune`'s receipt goes to the chain it pruned, this one included (the
    // prune holds its lock): `ledger.` names are pgseal's, and only the prune writes
    // this one.
    if tenant == super::names::AUDIT_CHAIN
        && !crate::audit_worker::is_writer()
        && event != "ledger.pruned"
    {
        return Err(SealError::Forbidden(
            "only the pgseal audit writer appends to its own chain",
        ));
    }
    let (payload, stored) = payload()?;
    // SAFETY: the transaction start timestamp is set for every transaction;
    // reading it has no preconditions.
    let at = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let recorded_at = TimestampWithTimeZone::try_from(at)
        .map_err(|_| SealError::Internal("transaction timestamp out of range"))?;
    if !heads::is_current(tenant) {
        // On Citus the ledger is kept on the coordinator (docs/SCALING.md): a chain
        // appended to on a worker too would fork. `ledger_append` on a worker is
        // forwarded there (`forward`), a worker's decrypt audit through its audit
        // writer (`audit_worker::writer`); pgseal's other appends are refused.
        if crate::pg::citus::is_worker()? {
            return Err(SealError::NotSupported(
                "on Citus, pgseal's ledger is kept on the coordinator: this entry can be appended through the coordinator only (this node is a worker)",
            ));
        }
        // The audit writer's own transactions write nothing else; a worker that
        // forwards an entry has asked for two-phase commit itself.
        if crate::pg::citus::present()
            && !crate::audit_worker::is_writer()
            && !super::forward::appending_forwarded()
        {
            crate::pg::citus::commit_remote_writes_in_two_phases()?;
        }
        // The MAC key first, then the chain lock: a tenant's first entry makes its
        // key under the key-creation lock, and every path takes that lock (of any
        // purpose) before the chain's, as a rotation does. On Citus a worker's
        // forwarded entry makes the key before its entry reaches the chain lock on
        // the coordinator; taken the other way round here, two first entries
        // through two nodes deadlocked. After a subtransaction abort the key
        // itself may have been rolled back, so it is looked up again too.
        let mac = super::mac::for_append(tenant)?;
        let (head, row, key) = chain_lock::lock_and_load(tenant)?;
        heads::loaded(tenant, head, mac, row, key);
    }
    let (seq, prev, mac) = heads::next(tenant);
    // SAFETY: MyProcPid is a plain global PostgreSQL sets in every process right
    // after it is forked; reading it has no preconditions.
    let salt = fresh_salt_in(unsafe { pg_sys::MyProcPid } as u32);
    let commitment = payload_commitment(&salt, &payload);
    let hash = entry_hash_v2(&EntryFieldsV2 {
        prev_hash: &prev,
        tenant,
        seq,
        recorded_at_us: at + super::PG_EPOCH_OFFSET_US,
        actor,
        db_role,
        event,
        subjects: &subjects,
        commitment: &commitment,
    });
    let tag = mac.sign(&hash);
    heads::advance(tenant, seq, hash);
    let entry = Pending {
        // SAFETY: reads the current subtransaction's id; no preconditions.
        subxact: unsafe { pg_sys::GetCurrentSubTransactionId() },
        tenant: tenant.to_owned(),
        seq,
        recorded_at,
        actor: actor.to_owned(),
        db_role: db_role.to_owned(),
        event: event.to_owned(),
        subjects,
        payload,
        stored,
        salt,
        prev,
        hash,
        mac: tag,
    };
    if pending::push(entry) {
        super::writer::flush()?;
    }
    Ok((seq, hash))
}
