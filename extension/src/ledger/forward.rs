//! `ledger_append` through a Citus worker (docs/SCALING.md, "One chain per tenant").
//!
//! The ledger is kept on the coordinator, where each tenant's chain lock and head
//! are. A worker appends, after `ledger_append`'s checks, by inserting the entry's
//! fields and its session's role into `pgseal._ledger_forwarded`, a Citus local
//! table that `citus_distribute()` makes on the coordinator: Citus sends the INSERT
//! there, inside the worker's distributed transaction, as pgseal's owner (no role
//! is granted the table), and the table's trigger (`ledger_forwarded_append`)
//! appends the entry (`append::append_forwarded`) under the coordinator's chain
//! lock and returns its seq and hash; `ledger_forwarded_done` then deletes the row,
//! so the table never holds one past its statement. Appends of one tenant through
//! the coordinator and through any worker are sequenced by the same lock: one
//! chain, gapless.
//!
//! The worker makes Citus commit in two phases
//! (`citus::commit_forwarded_entries_in_two_phases`): the coordinator's part, the
//! entry, is prepared at the worker's pre-commit and committed after the worker's
//! own commit, or rolled back with it, so an entry and the worker's writes it
//! records commit together or not at all.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{FromDatum, IntoDatum};
use pgseal_core::ledger::Hash;

use crate::error::{SealError, SealResult};
use crate::pg::jsonb::JsonbArg;
use crate::pg::plans;

const NESTED: &str = "on a Citus worker, ledger_append cannot run inside a query that Citus runs on a shard: its entry is appended on the coordinator; call it in a statement of its own";

const FORWARD: &str = "INSERT INTO pgseal._ledger_forwarded \
       (chain, event, payload, actor, db_role, subjects) \
     VALUES ($1, $2, $3, $4, $5, $6) RETURNING seq, hash";

/// Appends through the coordinator (this node is a Citus worker). The caller's
/// checks are done (`append::append_entry`); the entry records `db_role` as this
/// session's role, as an append on one node does.
///
/// The tenant's ledger MAC key is made here first when it does not exist yet (Citus
/// writes it to every copy of the key table, the coordinator's included): the
/// coordinator's side of the append runs inside a statement Citus sent it, where no
/// distributed write may run, so it could not make the key itself. The INSERT runs
/// as pgseal's owner, over the connection that wrote the key (Citus keeps one per
/// node and role in a transaction), so the coordinator's side sees the key.
pub fn to_coordinator(
    tenant: &str,
    event: &str,
    payload: Option<JsonbArg>,
    actor: &str,
    subjects: Vec<String>,
) -> SealResult<(i64, Hash)> {
    crate::pg::citus::require_function_transaction_block()?;
    // A session Citus opened for another node's statement (a query pushed to this
    // node that calls ledger_append) would send the entry over a connection of its
    // own, which that node's two-phase commit never prepares nor commits. Citus
    // refuses such nested statements unless `citus.allow_nested_distributed_execution`
    // is on, which any role may set.
    if crate::pg::citus::in_citus_internal_session() {
        return Err(SealError::NotSupported(NESTED));
    }
    require_forwarding_table()?;
    super::mac::for_append(tenant)?;
    let db_role = super::actor::db_role();
    let caller = crate::pg::citus::caller_parsing()?;
    let forward = || {
        crate::privilege::as_owner(|| {
            crate::pg::citus::with_remote_parsing_pinned(caller.as_ref(), || {
                plans::select_first(
                    FORWARD,
                    &[
                        plans::TEXT,
                        plans::TEXT,
                        plans::JSONB,
                        plans::TEXT,
                        plans::TEXT,
                        plans::TEXT_ARRAY,
                    ],
                    &[
                        tenant.into(),
                        event.into(),
                        payload.into(),
                        actor.into(),
                        db_role.as_str().into(),
                        subjects.into(),
                    ],
                    |r| Ok((r.get::<i64>(1)?, r.get::<String>(2)?)),
                )
                .and_then(|row| {
                    crate::pg::citus::commit_forwarded_entries_in_two_phases()?;
                    Ok(row)
                })
            })
        })
    };
    // Inside a statement Citus runs on a shard (a query pushed to this node that
    // calls ledger_append per row) Citus refuses the INSERT as a nested distributed
    // query, with an internal error; it is told as what it is.
    let row = pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(forward))
        .catch_when(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, |e| match e {
            pgrx::pg_sys::panic::CaughtError::PostgresError(ref r)
                if r.message()
                    .starts_with("cannot execute a distributed query from a query on a shard") =>
            {
                Err(SealError::NotSupported(NESTED))
            }
            e => e.rethrow(),
        })
        .execute()?;
    let (Some(seq), Some(hash)) = row.unwrap_or((None, None)) else {
        return Err(SealError::Internal(
            "the coordinator did not append the forwarded ledger entry",
        ));
    };
    let mut h: Hash = [0; 32];
    hex::decode_to_slice(&hash, &mut h)
        .map_err(|_| SealError::Internal("the coordinator returned a malformed hash"))?;
    Ok((seq, h))
}

/// Refuses (55000) before `citus_distribute()` has made `pgseal._ledger_forwarded`
/// (a worker sees Citus's tables through its metadata). Checked once a backend:
/// the table, once there, stays.
fn require_forwarding_table() -> SealResult<()> {
    thread_local! {
        static FOUND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if FOUND.with(|f| f.get()) {
        return Ok(());
    }
    let found = crate::privilege::as_owner(|| {
        Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p \
              WHERE p.logicalrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('pgseal._ledger_forwarded'))",
        )
        .map_err(SealError::from)
    })? == Some(true);
    if !found {
        return Err(SealError::Refused(
            "on a Citus worker pgseal forwards ledger entries to the coordinator only after pgseal.citus_distribute() has run there",
        ));
    }
    FOUND.with(|f| f.set(true));
    Ok(())
}

/// `pgseal._ledger_forwarded`'s columns, in order, with their types.
const COLUMNS: [pg_sys::Oid; 8] = [
    pg_sys::TEXTOID,      // chain (the tenant)
    pg_sys::TEXTOID,      // event
    pg_sys::JSONBOID,     // payload
    pg_sys::TEXTOID,      // actor
    pg_sys::TEXTOID,      // db_role
    pg_sys::TEXTARRAYOID, // subjects
    pg_sys::INT8OID,      // seq
    pg_sys::TEXTOID,      // hash
];

thread_local! {
    /// Set while `ledger_forwarded_append` appends: this backend runs a statement a
    /// worker sent (a query on a shard, in which Citus refuses a distributed one),
    /// whose two-phase commit the worker has asked for.
    static FORWARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the running append is one a worker forwarded (`ledger_forwarded_append`).
pub fn appending_forwarded() -> bool {
    FORWARDED.with(|f| f.get())
}

crate::pg::v1_finfo!(pg_finfo_ledger_forwarded_append);

/// `pgseal._ledger_forwarded_append()`: the BEFORE ROW INSERT trigger of
/// `pgseal._ledger_forwarded` (on the coordinator, its placement). Appends the entry
/// the row carries (`append::append_forwarded`: `ledger_append`'s checks of its
/// event, actor and subjects, made again) to the row's chain, on behalf of the
/// row's `db_role`, and returns the row with the entry's seq and hash for the
/// INSERT's `RETURNING`. Only pgseal's owner (the worker's `to_coordinator`) or a
/// superuser inserts such a row; refuses any other use.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn ledger_forwarded_append(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    use crate::error::OrRaise;
    // SAFETY: PostgreSQL calls this with a valid fcinfo; its context is NULL or a
    // node, whose tag is checked before it is read as TriggerData. For a BEFORE ROW
    // INSERT trigger tg_relation is open for the call and tg_trigtuple is the new
    // row, described by the relation's descriptor, whose columns are checked against
    // COLUMNS before any is read; heap_deform_tuple fills one datum per column.
    // The datums read point into the tuple, which lives through the call. The
    // returned tuple is palloc'd in the trigger's memory context, as PostgreSQL
    // expects of a BEFORE trigger's result.
    unsafe {
        let td = row_insert_trigger(
            fcinfo,
            pg_sys::TRIGGER_EVENT_BEFORE,
            "pgseal._ledger_forwarded_append() is pgseal._ledger_forwarded's BEFORE INSERT row trigger only",
        );
        let desc = (*td.tg_relation).rd_att;
        let attrs = crate::pg::compat::tupdesc_attrs(desc);
        if attrs.len() != COLUMNS.len()
            || !attrs
                .iter()
                .zip(&COLUMNS)
                .all(|(a, t)| !a.attisdropped && a.atttypid == *t)
        {
            SealError::TriggerProtocol("pgseal._ledger_forwarded does not have its columns").raise()
        }
        // A worker's own copy of the table (Citus keeps a shell of it there) is never
        // where an entry is appended: forwarding from here would start over.
        if crate::pg::citus::is_worker().or_raise() {
            SealError::NotSupported(
                "pgseal._ledger_forwarded takes entries on the coordinator only",
            )
            .raise()
        }
        // The row's role and tenant are taken as they are: only pgseal's code,
        // as the extension owner, inserts (no role is granted INSERT), or a superuser.
        let user = pg_sys::GetUserId();
        if user != crate::privilege::extension_owner() && !pg_sys::superuser_arg(user) {
            SealError::Forbidden("only pgseal forwards ledger entries").raise()
        }
        let mut values = [pg_sys::Datum::from(0usize); COLUMNS.len()];
        let mut nulls = [true; COLUMNS.len()];
        pg_sys::heap_deform_tuple(
            td.tg_trigtuple,
            desc,
            values.as_mut_ptr(),
            nulls.as_mut_ptr(),
        );
        let text = |i: usize| -> Option<String> { String::from_datum(values[i], nulls[i]) };
        let (Some(tenant), Some(event), Some(actor), Some(db_role)) =
            (text(0), text(1), text(3), text(4))
        else {
            SealError::NullArgument("a forwarded ledger entry's tenant, event, actor or role")
                .raise()
        };
        let payload = JsonbArg::from_datum(values[2], nulls[2]);
        let subjects = Vec::<Option<String>>::from_datum(values[5], nulls[5]);
        let appended = {
            FORWARDED.with(|f| f.set(true));
            let _reset = Reset;
            super::append::append_forwarded(&tenant, &event, payload, &actor, &db_role, subjects)
        };
        let (seq, hash) = appended.or_raise();
        let mut cols = [7, 8];
        let mut new_values = [
            seq.into_datum().expect("bigint datum"),
            hex::encode(hash).into_datum().expect("text datum"),
        ];
        let mut new_nulls = [false, false];
        let tuple = pg_sys::heap_modify_tuple_by_cols(
            td.tg_trigtuple,
            desc,
            2,
            cols.as_mut_ptr(),
            new_values.as_mut_ptr(),
            new_nulls.as_mut_ptr(),
        );
        pg_sys::Datum::from(tuple)
    }
}

/// Clears `FORWARDED` when the append returns or unwinds.
struct Reset;

impl Drop for Reset {
    fn drop(&mut self) {
        FORWARDED.with(|f| f.set(false));
    }
}

crate::pg::v1_finfo!(pg_finfo_ledger_forwarded_done);

/// `pgseal._ledger_forwarded_done()`: the AFTER ROW INSERT trigger of
/// `pgseal._ledger_forwarded` (on the coordinator, its placement), which deletes the
/// row just inserted once its `RETURNING` has been read: the table holds no row
/// past the statement that forwarded it. Refuses any other use.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn ledger_forwarded_done(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: PostgreSQL calls this with a valid fcinfo; its context is NULL or a
    // node, whose tag is checked before it is read as TriggerData. For an AFTER ROW
    // INSERT trigger tg_relation is open (row exclusive) for the call and
    // tg_trigtuple is the inserted row, fetched by its tid (t_self).
    unsafe {
        let td = row_insert_trigger(
            fcinfo,
            pg_sys::TRIGGER_EVENT_AFTER,
            "pgseal._ledger_forwarded_done() is pgseal._ledger_forwarded's AFTER INSERT row trigger only",
        );
        let rel = td.tg_relation;
        // The row was inserted by this statement's command: make it visible to the
        // delete, which runs under the next command id.
        pg_sys::CommandCounterIncrement();
        pg_sys::simple_heap_delete(rel, &mut (*td.tg_trigtuple).t_self);
    }
    pg_sys::Datum::from(0usize)
}

/// The TriggerData of a row INSERT trigger fired at `timing` (BEFORE or AFTER) on
/// `pgseal._ledger_forwarded` or its placement; raises (39P01, `wrong_use`) for any
/// other call.
///
/// # Safety
/// `fcinfo` is the call frame PostgreSQL passed to the trigger function.
unsafe fn row_insert_trigger<'a>(
    fcinfo: pg_sys::FunctionCallInfo,
    timing: u32,
    wrong_use: &'static str,
) -> &'a pg_sys::TriggerData {
    // SAFETY: fcinfo is valid (caller's contract); its context is NULL or a node,
    // whose tag is checked before it is read as TriggerData, which lives through
    // the trigger call; tg_relation is open for a trigger call.
    unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || (*ctx).type_ != pg_sys::NodeTag::T_TriggerData {
            SealError::TriggerProtocol(wrong_use).raise()
        }
        let td = &*ctx.cast::<pg_sys::TriggerData>();
        let ev = td.tg_event;
        if ev & pg_sys::TRIGGER_EVENT_TIMINGMASK != timing
            || ev & pg_sys::TRIGGER_EVENT_ROW == 0
            || ev & pg_sys::TRIGGER_EVENT_OPMASK != pg_sys::TRIGGER_EVENT_INSERT
            || td.tg_trigtuple.is_null()
            || !is_forwarding_table(td.tg_relation)
        {
            SealError::TriggerProtocol(wrong_use).raise()
        }
        td
    }
}

/// Whether `rel` is `pgseal._ledger_forwarded` or, on a Citus node, its placement
/// (`_ledger_forwarded_<shard id>` in pgseal's schema, where only pgseal's owner
/// creates tables).
///
/// # Safety
/// `rel` is an open relation.
unsafe fn is_forwarding_table(rel: pg_sys::Relation) -> bool {
    // SAFETY: rel is open (caller's contract): rd_rel is its pg_class row, whose
    // relname is a NUL-terminated name; get_namespace_name returns a palloc'd copy
    // or NULL.
    unsafe {
        let form = &*(*rel).rd_rel;
        let name = std::ffi::CStr::from_ptr(form.relname.data.as_ptr()).to_bytes();
        let ns = pg_sys::get_namespace_name(form.relnamespace);
        let in_pgseal = !ns.is_null() && std::ffi::CStr::from_ptr(ns).to_bytes() == b"pgseal";
        let shard_suffix = |rest: &[u8]| {
            rest.is_empty()
                || (rest.len() > 1 && rest[0] == b'_' && rest[1..].iter().all(u8::is_ascii_digit))
        };
        in_pgseal
            && name
                .strip_prefix(b"_ledger_forwarded")
                .is_some_and(shard_suffix)
            && form.relkind == pg_sys::RELKIND_RELATION as std::ffi::c_char
    }
}
