//! Evidence of every change that affects protection, and the event names that
//! only pgseal writes.
//!
//! - Event names under the prefixes in `names::RESERVED_PREFIXES` are pgseal's: the public
//!   `ledger_append` refuses them (22023), so an entry under one of them was written
//!   by pgseal itself, through `record` (or the decrypt audit, the row audit
//!   trigger and `ledger_prune`, which append directly).
//! - Nothing an application role can call takes an event name and a payload of its
//!   choosing: key changes are recorded by the Rust that makes them (a rotation in
//!   `cache::rotate`, shredding and rewrapping in `vault.rs`);
//!   organisation membership, retention rules and legal holds by C triggers on
//!   pgseal's own tables (not callable as functions, and executable by nobody, so
//!   no role can attach them elsewhere); TRUNCATE of an audited table by a C
//!   statement trigger (`audit_trigger.rs`); table protection by
//!   `_protection_changed(rel)`, which records what the catalog says of a table the
//!   caller owns, nothing the caller says; and pgseald's receipts by
//!   `_job_receipt`, granted to `pgseal_admin` and limited to `JOB_EVENTS`.
//! - A change that concerns one tenant is recorded in that tenant's chain. A change
//!   that concerns every tenant (a table's policies, a default retention rule, a
//!   TRUNCATE) is recorded in the chain of the tenant context the change was made
//!   under, where that tenant's auditor looks, else in one of pgseal's own chains,
//!   which only pgseal appends to: `names::SYSTEM_TENANT` for what only trusted
//!   roles do (column registrations, default retention rules, `kek_rewrap`),
//!   `names::OPEN_CHAIN` for what any table owner or audited table's writer can do
//!   (table protection, TRUNCATE), so that no such role can hold the system
//!   chain's lock by keeping its transaction open. A tenant context naming one of
//!   pgseal's chains is no context (`context::tenant` refuses it). Column
//!   registrations, and a default retention rule's removal when its table or time
//!   column is gone (a DROP), go to a chain the session's settings do not choose:
//!   the system chain when the role that made the change is trusted (`trusted_role`),
//!   else the open chain (a DROP of a registered table or column by its owner).
//!
//! Every entry recorded here has the usual actor (the user-id setting, else
//! `session_user`) and, like every entry, the hashed `db_role` field: the database
//! role that made the change (`ledger::actor::db_role`, the session's current role, never
//! a SECURITY DEFINER function's owner).

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;
use serde_json::{json, Value};

use super::names::{OPEN_CHAIN, SYSTEM_TENANT};
use crate::context;
use crate::error::{OrRaise, SealError, SealResult};
use crate::pg::jsonb::JsonbText;

/// The events pgseald records through `_job_receipt`.
const JOB_EVENTS: [&str; 1] = ["retention.deleted"];

/// The chain for a change that concerns every tenant, made by a role pgseal trusts
/// with it (a default retention rule): the tenant context's, else the system chain.
pub fn context_or_system() -> String {
    context_or(SYSTEM_TENANT)
}

/// The chain for a change that concerns every tenant and that any role may make (a
/// table's protection, a TRUNCATE): the tenant context's, else the open chain
/// `OPEN_CHAIN`, so that no such role holds the system chain's lock.
pub fn context_or_open() -> String {
    context_or(OPEN_CHAIN)
}

/// The tenant context, else `chain` (`context::tenant` refuses a context naming one
/// of pgseal's own chains, so a session's setting never chooses which is written).
fn context_or(chain: &str) -> String {
    context::tenant().unwrap_or_else(|_| chain.to_owned())
}

/// Whether the role the session acts as (`actor::db_role`'s: not the extension
/// owner pgseal switches to, nor a SECURITY DEFINER function's owner) is one pgseal
/// trusts with the system chain: a member of `pgseal_admin`, or a superuser. Never
/// inside a security-restricted operation: there a table's owner's code runs (an
/// index expression under ANALYZE or VACUUM, its triggers under pgseal's offboarding
/// and erasure) while the session's role is still the trusted caller's.
fn trusted_role() -> bool {
    // SAFETY: InSecurityRestrictedOperation and GetOuterUserId read backend
    // globals; get_role_oid with missing_ok returns InvalidOid for a missing role;
    // is_member_of_role reads the catalog inside the running transaction (and is
    // true for superusers).
    unsafe {
        if pg_sys::InSecurityRestrictedOperation() {
            return false;
        }
        let me = pg_sys::GetOuterUserId();
        let admin = pg_sys::get_role_oid(c"pgseal_admin".as_ptr(), true);
        pg_sys::superuser_arg(me)
            || (admin != pg_sys::InvalidOid && pg_sys::is_member_of_role(me, admin))
    }
}

/// Where a change to pgseal's registrations goes when no tenant owns it: the system
/// chain for a trusted role (`trusted_role`), else the open chain. Only trusted roles
/// write the registries; other roles change them only by dropping what a
/// registration names (its table, column or type), and must not hold the system
/// chain's lock by keeping that transaction open.
fn registry_chain() -> &'static str {
    if trusted_role() {
        SYSTEM_TENANT
    } else {
        OPEN_CHAIN
    }
}

/// Appends pgseal's entry `event` to `tenant`'s chain (its `db_role` is the
/// session's role, see `append::append`). Fails closed: without the master key
/// (55000) or in a read-only transaction (25006), the change it records fails with it.
pub fn record(tenant: &str, event: &'static str, payload: Value) -> SealResult<i64> {
    crate::master::require_loaded()?;
    crate::pg::xact::require_read_write(event)?;
    let (seq, _) = super::append::append(
        tenant,
        event,
        &payload.to_string(),
        &super::actor::default_actor(),
    )?;
    Ok(seq)
}

/// A relation's name, schema-qualified and quoted as needed (independent of the
/// caller's `search_path`); its OID when it no longer exists.
pub fn qualified_name(rel: pg_sys::Oid) -> String {
    let c_text = |p: *const std::ffi::c_char| {
        // SAFETY: non-NULL pointers here are NUL-terminated strings from the
        // syscache lookups below, palloc'd in the current memory context.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    // SAFETY: syscache lookups that return NULL for a missing object;
    // quote_identifier returns its argument or a palloc'd quoted copy.
    unsafe {
        let name = pg_sys::get_rel_name(rel);
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(rel));
        if name.is_null() || nsp.is_null() {
            return rel.to_u32().to_string();
        }
        format!(
            "{}.{}",
            c_text(pg_sys::quote_identifier(nsp)),
            c_text(pg_sys::quote_identifier(name))
        )
    }
}

// ---------------------------------------------------------------------------
// Table protection: tenant_protect, org_protect, tenant_unprotect.

/// A table's protection as the catalog holds it, read as the caller: whether the
/// caller owns it, row level security on and forced, and pgseal's policies on it.
const PROTECTION: &str = "\
SELECT pg_catalog.pg_has_role(c.relowner, 'USAGE') AND c.relpersistence OPERATOR(pg_catalog.<>) 't',
       c.relrowsecurity, c.relforcerowsecurity,
       ARRAY(SELECT p.polname::pg_catalog.text FROM pg_catalog.pg_policy p
              WHERE p.polrelid OPERATOR(pg_catalog.=) c.oid
                AND p.polname OPERATOR(pg_catalog.~~) 'pgseal\\_%'
              ORDER BY 1)
  FROM pg_catalog.pg_class c
 WHERE c.oid OPERATOR(pg_catalog.=) $1";

/// `pgseal._protection_changed(rel)`: records `policy.protected` (pgseal's policies
/// are on the table) or `policy.unprotected` (none are) for a table the caller
/// owns. Called at the end of `tenant_protect`, `org_protect` and
/// `tenant_unprotect`; called directly it records the same as re-running them.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn _protection_changed(rel: pg_sys::Oid) {
    protection_changed(rel).or_raise()
}

fn protection_changed(rel: pg_sys::Oid) -> SealResult<()> {
    crate::master::require_loaded()?;
    crate::pg::xact::require_read_write("changing a table's protection")?;
    let row = crate::privilege::with_pinned_search_path(|| {
        Spi::connect(|client| {
            let t = client.select(PROTECTION, Some(1), &[rel.into()])?;
            if t.is_empty() {
                return Ok(None);
            }
            let t = t.first();
            Ok::<_, pgrx::spi::Error>(Some((
                t.get::<bool>(1)?.unwrap_or(false),
                t.get::<bool>(2)?.unwrap_or(false),
                t.get::<bool>(3)?.unwrap_or(false),
                t.get::<Vec<String>>(4)?.unwrap_or_default(),
            )))
        })
    })?;
    let Some((owner, row_security, forced, policies)) = row else {
        return Err(SealError::WrongObjectType("the relation does not exist"));
    };
    if !owner {
        return Err(SealError::Forbidden(
            "only the table's owner records a change of its protection, and never of a temporary table",
        ));
    }
    let event = if policies.is_empty() {
        "policy.unprotected"
    } else {
        "policy.protected"
    };
    let payload = json!({
        "table": qualified_name(rel),
        "policies": policies,
        "row_security": row_security,
        "forced": forced,
    });
    record(&context_or_open(), event, payload).map(|_| ())
}

// ---------------------------------------------------------------------------
// pgseald's receipts.

crate::pg::v1_finfo!(pg_finfo_job_receipt_fn);

/// `pgseal._job_receipt(event text, payload jsonb) → bigint` (STRICT): appends one
/// of `JOB_EVENTS` to the current tenant's chain and returns its seq. Granted to
/// `pgseal_admin`, for pgseald.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn job_receipt_fn(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: PostgreSQL calls this STRICT function with a valid fcinfo of its two
    // declared arguments (text, jsonb), neither NULL.
    let (event, payload) = unsafe {
        (
            pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 0),
            pgrx::fcinfo::pg_getarg::<JsonbText>(fcinfo, 1),
        )
    };
    let seq = job_receipt(event, payload.as_ref()).or_raise();
    seq.into_datum().expect("a bigint datum")
}

fn job_receipt(event: Option<&str>, payload: Option<&JsonbText>) -> SealResult<i64> {
    super::access::require_admin("_job_receipt")?;
    if let Some(e) = event {
        crate::limits::check("event", e, crate::limits::EVENT)?;
    }
    let event = event
        .and_then(|e| JOB_EVENTS.iter().find(|j| **j == e).copied())
        .ok_or(SealError::InvalidArgument(
            "_job_receipt records only pgseald's job events",
        ))?;
    let tenant = context::tenant()?;
    if super::names::is_pgseal_chain(&tenant) {
        return Err(SealError::Forbidden(
            "pgseal's own chains take only pgseal's own entries",
        ));
    }
    let text = pgseal_core::canonical::lossless_numbers(payload.map_or("{}", |p| p.0.as_str()));
    let payload: Value = serde_json::from_str(&text)
        .map_err(|_| SealError::InvalidArgument("payload must be a JSON object"))?;
    if !payload.is_object() {
        return Err(SealError::InvalidArgument("payload must be a JSON object"));
    }
    record(&tenant, event, payload)
}

// ---------------------------------------------------------------------------
// Triggers on pgseal's own tables: org_members, retention_rules, retention_holds.

/// One row of the table a trigger fired on.
struct Row {
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
}

impl Row {
    /// Column `name` through its type's output function; None when NULL. The
    /// columns read are of built-in types or pgseal's enum.
    fn text(&self, name: &CStr) -> SealResult<Option<String>> {
        // SAFETY: tuple and descriptor are the trigger's, valid for the call.
        // SPI_fnumber and SPI_getvalue need no SPI connection; SPI_getvalue returns
        // NULL for a NULL value, else a palloc'd C string.
        unsafe {
            let n = pg_sys::SPI_fnumber(self.desc, name.as_ptr());
            if n <= 0 {
                return Err(SealError::TriggerProtocol(
                    "a column pgseal records is missing",
                ));
            }
            let p = pg_sys::SPI_getvalue(self.tuple, self.desc, n);
            Ok((!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned()))
        }
    }

    fn required(&self, name: &CStr) -> SealResult<String> {
        self.text(name)?.ok_or(SealError::TriggerProtocol(
            "a NOT NULL column pgseal records is NULL",
        ))
    }

    /// A NOT NULL column's datum, converted by `T` (an `oid`-valued or `int2` column).
    fn datum<T: FromDatum>(&self, name: &CStr) -> SealResult<T> {
        // SAFETY: as in `text`; SPI_getbinval sets `isnull` and returns the datum,
        // of the column's type, which the caller names by `T`.
        unsafe {
            let n = pg_sys::SPI_fnumber(self.desc, name.as_ptr());
            if n <= 0 {
                return Err(SealError::TriggerProtocol(
                    "a column pgseal records is missing",
                ));
            }
            let mut isnull = false;
            let d = pg_sys::SPI_getbinval(self.tuple, self.desc, n, &mut isnull);
            T::from_datum(d, isnull).ok_or(SealError::TriggerProtocol(
                "a NOT NULL column pgseal records is NULL",
            ))
        }
    }

    /// An `oid`-valued column (regclass) as a qualified name.
    fn relation(&self, name: &CStr) -> SealResult<String> {
        Ok(qualified_name(self.datum::<pg_sys::Oid>(name)?))
    }
}

/// Whether relation `rel` or its column `attnum` no longer exists, as the catalog
/// (not any setting of the session) says: a table or column dropped in this
/// transaction is already gone from the syscache when its registrations are deleted.
fn column_gone(rel: pg_sys::Oid, attnum: i16) -> bool {
    // SAFETY: syscache lookups; SearchSysCacheAttNum returns NULL for a missing or
    // dropped column, else a tuple released here and not read.
    unsafe {
        if pg_sys::get_rel_relkind(rel) == 0 {
            return true;
        }
        let tup = pg_sys::SearchSysCacheAttNum(rel, attnum);
        if tup.is_null() {
            return true;
        }
        pg_sys::ReleaseSysCache(tup);
        false
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Update,
    Delete,
}

/// What a recording trigger needs from its call.
struct RowChange {
    /// Which of the expected tables it fired on.
    table: usize,
    op: Op,
    old: Option<Row>,
    new: Option<Row>,
}

/// Reads the trigger call; refuses anything but an AFTER ... FOR EACH ROW trigger
/// on one of `tables` (in schema pgseal).
///
/// # Safety
/// `fcinfo` is the call frame PostgreSQL passed to the trigger function.
unsafe fn row_change(fcinfo: pg_sys::FunctionCallInfo, tables: &[&CStr]) -> RowChange {
    // SAFETY: fcinfo is valid (caller's contract); its context is NULL or a node,
    // whose tag is checked before it is read as TriggerData. For a row trigger,
    // tg_relation and its descriptor are valid for the call; tg_trigtuple is the
    // old row (UPDATE, DELETE) or the new row (INSERT), tg_newtuple the new row of
    // an UPDATE. The name lookups return InvalidOid when missing.
    unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || (*ctx).type_ != pg_sys::NodeTag::T_TriggerData {
            SealError::TriggerProtocol("must be called as a trigger").raise()
        }
        let td = &*ctx.cast::<pg_sys::TriggerData>();
        let ev = td.tg_event;
        if ev & pg_sys::TRIGGER_EVENT_TIMINGMASK != pg_sys::TRIGGER_EVENT_AFTER
            || ev & pg_sys::TRIGGER_EVENT_ROW == 0
        {
            SealError::TriggerProtocol("must be an AFTER ... FOR EACH ROW trigger").raise()
        }
        let rel = td.tg_relation;
        let nsp = pg_sys::get_namespace_oid(c"pgseal".as_ptr(), true);
        let Some(table) = tables
            .iter()
            .position(|t| pg_sys::get_relname_relid(t.as_ptr(), nsp) == (*rel).rd_id)
        else {
            SealError::TriggerProtocol("fires only on pgseal's own tables").raise()
        };
        let desc = (*rel).rd_att;
        let row = |tuple| Row { tuple, desc };
        let (op, old, new) = match ev & pg_sys::TRIGGER_EVENT_OPMASK {
            pg_sys::TRIGGER_EVENT_INSERT => (Op::Insert, None, Some(row(td.tg_trigtuple))),
            pg_sys::TRIGGER_EVENT_DELETE => (Op::Delete, Some(row(td.tg_trigtuple)), None),
            pg_sys::TRIGGER_EVENT_UPDATE => (
                Op::Update,
                Some(row(td.tg_trigtuple)),
                Some(row(td.tg_newtuple)),
            ),
            _ => SealError::TriggerProtocol("handles INSERT, UPDATE and DELETE").raise(),
        };
        RowChange {
            table,
            op,
            old,
            new,
        }
    }
}

crate::pg::v1_finfo!(pg_finfo_org_members_record_trigger);

/// `pgseal._org_members_record()`: AFTER each row change of `pgseal.org_members`,
/// `org.member_added`, `org.member_removed` or `org.role_changed` in the row's
/// tenant's chain.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn org_members_record_trigger(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: PostgreSQL calls this with the trigger's call frame.
    let change = unsafe { row_change(fcinfo, &[c"org_members"]) };
    org_members_changed(&change).or_raise();
    pg_sys::Datum::from(0usize)
}

struct Member {
    tenant: String,
    org: String,
    user: String,
    role: String,
}

fn member(row: &Row) -> SealResult<Member> {
    Ok(Member {
        tenant: row.required(c"tenant_id")?,
        org: row.required(c"org_id")?,
        user: row.required(c"user_id")?,
        role: row.required(c"role")?,
    })
}

fn member_event(event: &'static str, m: &Member) -> SealResult<()> {
    let payload = json!({ "org": m.org, "user": m.user, "role": m.role });
    record(&m.tenant, event, payload).map(|_| ())
}

fn org_members_changed(c: &RowChange) -> SealResult<()> {
    let old = c.old.as_ref().map(member).transpose()?;
    let new = c.new.as_ref().map(member).transpose()?;
    match (old, new) {
        (None, Some(n)) => member_event("org.member_added", &n),
        (Some(o), None) => member_event("org.member_removed", &o),
        (Some(o), Some(n)) if (&o.tenant, &o.org, &o.user) == (&n.tenant, &n.org, &n.user) => {
            if o.role == n.role {
                return Ok(());
            }
            let payload = json!({ "org": n.org, "user": n.user, "from": o.role, "to": n.role });
            record(&n.tenant, "org.role_changed", payload).map(|_| ())
        }
        (Some(o), Some(n)) => {
            member_event("org.member_removed", &o)?;
            member_event("org.member_added", &n)
        }
        (None, None) => Ok(()),
    }
}

crate::pg::v1_finfo!(pg_finfo_retention_record_trigger);

/// `pgseal._retention_record()`: AFTER each row change of `pgseal.retention_rules`
/// (`retention.set`, `retention.removed`) and `pgseal.retention_holds`
/// (`retention.held`, `retention.released`).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn retention_record_trigger(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: PostgreSQL calls this with the trigger's call frame.
    let change = unsafe { row_change(fcinfo, &[c"retention_rules", c"retention_holds"]) };
    let r = if change.table == 0 {
        rule_changed(&change)
    } else {
        hold_changed(&change)
    };
    r.or_raise();
    pg_sys::Datum::from(0usize)
}

struct Rule {
    /// The tenant of an override; None for the table's default.
    tenant: Option<String>,
    /// The rule's table or time column no longer exists (a DROP is removing it).
    gone: bool,
    payload: Value,
}

fn rule(row: &Row) -> SealResult<Rule> {
    let tenant = row.text(c"tenant_id")?;
    let gone = column_gone(
        row.datum::<pg_sys::Oid>(c"rel")?,
        row.datum::<i16>(c"time_attnum")?,
    );
    let payload = json!({
        "table": row.relation(c"rel")?,
        "keep": row.required(c"keep")?,
        "time_column": row.required(c"time_column")?,
        "scope": if tenant.is_some() { "tenant" } else { "default" },
    });
    Ok(Rule {
        tenant,
        gone,
        payload,
    })
}

/// A tenant's rule is recorded in that tenant's chain. A default rule concerns
/// every tenant: recorded in the tenant context's chain, else the system chain;
/// but a default rule whose table or time column is gone (its removal by
/// `_registrations_follow_drops`, fired by whichever role dropped it) in
/// `registry_chain()`'s: the dropping session's settings choose no chain (a context
/// naming a victim tenant would write into the victim's chain).
fn rule_event(event: &'static str, r: Rule) -> SealResult<()> {
    let tenant = match r.tenant {
        Some(t) => t,
        None if r.gone => registry_chain().to_owned(),
        None => context_or_system(),
    };
    record(&tenant, event, r.payload).map(|_| ())
}

fn rule_changed(c: &RowChange) -> SealResult<()> {
    let old = c.old.as_ref().map(rule).transpose()?;
    let new = c.new.as_ref().map(rule).transpose()?;
    match (c.op, old, new) {
        (Op::Delete, Some(o), _) => rule_event("retention.removed", o),
        (Op::Update, Some(o), Some(mut n)) if o.tenant == n.tenant => {
            if let Value::Object(m) = &mut n.payload {
                m.insert(
                    "previous".into(),
                    json!({ "keep": o.payload["keep"], "time_column": o.payload["time_column"] }),
                );
            }
            rule_event("retention.set", n)
        }
        (Op::Update, Some(o), Some(n)) => {
            rule_event("retention.removed", o)?;
            rule_event("retention.set", n)
        }
        (_, _, Some(n)) => rule_event("retention.set", n),
        _ => Ok(()),
    }
}

fn hold_changed(c: &RowChange) -> SealResult<()> {
    let tenant = |r: &Option<Row>| r.as_ref().map(|r| r.required(c"tenant_id")).transpose();
    let (old, new) = (tenant(&c.old)?, tenant(&c.new)?);
    if old == new {
        return Ok(()); // an UPDATE that keeps the tenant changes no hold
    }
    if let (Some(t), Some(row)) = (&old, &c.old) {
        let payload = json!({ "held_since": row.text(c"set_at")? });
        record(t, "retention.released", payload)?;
    }
    if let Some(t) = &new {
        record(t, "retention.held", json!({}))?;
    }
    Ok(())
}

crate::pg::v1_finfo!(pg_finfo_registration_record_trigger);

/// The column registries, in the order `registration_record_trigger` names them,
/// and each one's (registered, unregistered) events.
const REGISTRIES: [(&CStr, &str, &str); 3] = [
    (
        c"sealed_columns",
        "vault.column_registered",
        "vault.column_unregistered",
    ),
    (
        c"subject_columns",
        "subject.column_registered",
        "subject.column_unregistered",
    ),
    (
        c"subject_anonymised_columns",
        "subject.anonymised_column_registered",
        "subject.anonymised_column_unregistered",
    ),
];

/// `pgseal._registration_record()`: AFTER each row change of the column registries
/// (`sealed_columns`: `vault.column_registered`, `vault.column_unregistered`;
/// `subject_columns` and `subject_anonymised_columns`: `subject.column_…` and
/// `subject.anonymised_column_…`). They say what pgseald reseals and what
/// `subject_export`, `subject_erase` and offboarding reach, for every tenant:
/// recorded in one of pgseal's chains, which an auditor of registrations reads (a
/// chain the caller's tenant setting chose could be one no auditor reads): the
/// system chain for what trusted roles do, the open chain for the removals that a
/// DROP by another role makes (`registry_chain`). The triggers'
/// conditions pass only the UPDATEs that change the registration (its table, column
/// number or context), and each of those is recorded.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn registration_record_trigger(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    let tables = REGISTRIES.map(|(t, _, _)| t);
    // SAFETY: PostgreSQL calls this with the trigger's call frame.
    let change = unsafe { row_change(fcinfo, &tables) };
    registration_changed(&change).or_raise();
    pg_sys::Datum::from(0usize)
}

/// A registration's payload: its table (by OID once dropped), column name and
/// number, and (sealing) context.
fn registration(row: &Row, sealed: bool) -> SealResult<Value> {
    let mut payload = json!({
        "table": row.relation(c"rel")?,
        "column": row.required(c"col")?,
        "attnum": row.datum::<i16>(c"attnum")?,
    });
    if sealed {
        payload["context"] = json!(row.text(c"context")?);
    }
    Ok(payload)
}

fn registration_event(event: &'static str, payload: Value) -> SealResult<()> {
    record(registry_chain(), event, payload).map(|_| ())
}

fn registration_changed(c: &RowChange) -> SealResult<()> {
    let (_, registered, unregistered) = REGISTRIES[c.table];
    let sealed = c.table == 0;
    let old = c
        .old
        .as_ref()
        .map(|r| registration(r, sealed))
        .transpose()?;
    let new = c
        .new
        .as_ref()
        .map(|r| registration(r, sealed))
        .transpose()?;
    match (old, new) {
        (Some(o), None) => registration_event(unregistered, o),
        (None, Some(n)) => registration_event(registered, n),
        (Some(o), Some(mut n)) => {
            n["previous"] = o;
            registration_event(registered, n)
        }
        (None, None) => Ok(()),
    }
}
