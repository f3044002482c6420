//! `pgseal._audit_row()`, the row-change trigger that `ledger_audit` creates.
//!
//! It runs as the role that changed the row (it is not SECURITY DEFINER): the row
//! images are turned into JSON by that role's own query, so whatever the row's
//! types run on the way (a user-defined cast to `json`, a type's output function)
//! runs with that role's privileges, never the extension owner's. Only the finished
//! entry crosses to the owner, through the ledger's append (`append::append`, which
//! switches to the owner around its own fixed SQL). The query is parsed under the
//! pinned `search_path` (`privilege::with_pinned_search_path`) and names every
//! function and operator with its schema.
//!
//! Trigger arguments: the primary key columns (a text array literal) and the tenant
//! column ('' when the table has none).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::pg_sys::PgOid;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;

use crate::error::{OrRaise, SealError};

/// The payload, the row's tenant and its data subjects, from the old and new row
/// ($1, $2: the table's row type), the table's name ($3), the operation ($4), the
/// primary key columns ($5, a text array literal), the tenant column ($6) and the
/// table's OID ($7). UPDATE records only the columns whose value changed, before
/// and after. The subjects are the values, old and new, of the columns registered
/// with `subject_register` (issue 19) on the table or, for a partition, on any of
/// its ancestors (the row trigger fires on the partition), looked up by name.
const PAYLOAD: &str = "\
SELECT pg_catalog.jsonb_build_object(
           'table', $3::pg_catalog.text,
           'op', $4::pg_catalog.text,
           'key', k.key,
           'before', CASE WHEN $4::pg_catalog.text OPERATOR(pg_catalog.=) 'UPDATE' THEN d.before ELSE s.o END,
           'after', CASE WHEN $4::pg_catalog.text OPERATOR(pg_catalog.=) 'UPDATE' THEN d.after ELSE s.n END
       )::pg_catalog.text,
       CASE WHEN $6::pg_catalog.text OPERATOR(pg_catalog.<>) ''
            THEN COALESCE(s.n, s.o) OPERATOR(pg_catalog.->>) $6::pg_catalog.text END,
       (SELECT pg_catalog.array_agg(DISTINCT v.v)
          FROM pgseal.subject_columns x
          JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) x.rel::pg_catalog.oid
               AND a.attnum OPERATOR(pg_catalog.=) x.attnum AND NOT a.attisdropped
          CROSS JOIN LATERAL (VALUES (s.o OPERATOR(pg_catalog.->>) a.attname::pg_catalog.text),
                                     (s.n OPERATOR(pg_catalog.->>) a.attname::pg_catalog.text)) AS v(v)
         WHERE (x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) $7::pg_catalog.oid
                OR x.rel::pg_catalog.oid IN (SELECT pg_catalog.pg_partition_ancestors($7::pg_catalog.oid)))
           AND v.v IS NOT NULL)
FROM (SELECT pg_catalog.to_jsonb($1) AS o, pg_catalog.to_jsonb($2) AS n) AS s
CROSS JOIN LATERAL (
    SELECT pg_catalog.jsonb_object_agg(c.c, COALESCE(s.o, s.n) OPERATOR(pg_catalog.->) c.c) AS key
    FROM pg_catalog.unnest($5::pg_catalog.text[]) AS c(c)) AS k
CROSS JOIN LATERAL (
    SELECT COALESCE(pg_catalog.jsonb_object_agg(e.key, s.o OPERATOR(pg_catalog.->) e.key), '{}'::pg_catalog.jsonb) AS before,
           COALESCE(pg_catalog.jsonb_object_agg(e.key, e.value), '{}'::pg_catalog.jsonb) AS after
    FROM pg_catalog.jsonb_each(CASE WHEN $4::pg_catalog.text OPERATOR(pg_catalog.=) 'UPDATE' THEN s.n END) AS e
    WHERE NOT (e.value OPERATOR(pg_catalog.=) (s.o OPERATOR(pg_catalog.->) e.key)) IS TRUE) AS d";

thread_local! {
    /// One kept plan per row type (the parameters' type is the audited table's).
    static PLANS: RefCell<HashMap<pg_sys::Oid, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

fn plan_for(row_type: pg_sys::Oid) -> Rc<OwnedPreparedStatement> {
    if let Some(p) = PLANS.with(|m| m.borrow().get(&row_type).cloned()) {
        return p;
    }
    let row = PgOid::from(row_type);
    let types = [
        row,
        row,
        crate::pg::plans::TEXT,
        crate::pg::plans::TEXT,
        crate::pg::plans::TEXT,
        crate::pg::plans::TEXT,
        PgOid::from(pg_sys::OIDOID),
    ];
    let p = Rc::new(
        Spi::connect(|client| client.prepare(PAYLOAD, &types).map(|p| p.keep()))
            .map_err(SealError::from)
            .or_raise(),
    );
    PLANS.with(|m| m.borrow_mut().insert(row_type, p.clone()));
    p
}

crate::pg::v1_finfo!(pg_finfo_audit_row_trigger);

/// What the trigger needs from its `TriggerData`.
struct Fired {
    op: &'static str,
    old: Option<pg_sys::Datum>,
    new: Option<pg_sys::Datum>,
    row_type: pg_sys::Oid,
    relid: pg_sys::Oid,
    table: String,
    pk: String,
    tenant_column: String,
}

fn c_text(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-NULL pointers here are NUL-terminated C strings from the catalog
    // (names, trigger arguments) that live at least as long as the trigger call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Reads the trigger call, refusing anything but an AFTER ROW trigger.
///
/// # Safety
/// `fcinfo` is the call frame PostgreSQL passed to the trigger function.
unsafe fn fired(fcinfo: pg_sys::FunctionCallInfo) -> Fired {
    // SAFETY: fcinfo is valid (caller's contract); its context is NULL or a node,
    // whose tag is checked before it is read as TriggerData.
    let td = unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || (*ctx).type_ != pg_sys::NodeTag::T_TriggerData {
            SealError::TriggerProtocol("pgseal._audit_row() must be called as a trigger").raise()
        }
        &*ctx.cast::<pg_sys::TriggerData>()
    };
    let ev = td.tg_event;
    if ev & pg_sys::TRIGGER_EVENT_TIMINGMASK != pg_sys::TRIGGER_EVENT_AFTER
        || ev & pg_sys::TRIGGER_EVENT_ROW == 0
    {
        SealError::TriggerProtocol("pgseal._audit_row() must be an AFTER ... FOR EACH ROW trigger")
            .raise()
    }
    // SAFETY: for a row trigger, tg_relation, its descriptor and tg_trigger are
    // valid for the call; tg_trigtuple is the old row (UPDATE, DELETE) or the new
    // row (INSERT), tg_newtuple the new row of an UPDATE. heap_copy_tuple_as_datum
    // copies a tuple into a composite datum of the table's row type in the current
    // memory context. The trigger's arguments are tgnargs C strings.
    unsafe {
        let rel = td.tg_relation;
        let desc = (*rel).rd_att;
        let as_datum = |t: pg_sys::HeapTuple| pg_sys::heap_copy_tuple_as_datum(t, desc);
        let (op, old, new) = match ev & pg_sys::TRIGGER_EVENT_OPMASK {
            pg_sys::TRIGGER_EVENT_INSERT => ("INSERT", None, Some(as_datum(td.tg_trigtuple))),
            pg_sys::TRIGGER_EVENT_DELETE => ("DELETE", Some(as_datum(td.tg_trigtuple)), None),
            pg_sys::TRIGGER_EVENT_UPDATE => (
                "UPDATE",
                Some(as_datum(td.tg_trigtuple)),
                Some(as_datum(td.tg_newtuple)),
            ),
            _ => {
                SealError::TriggerProtocol("pgseal._audit_row() handles INSERT, UPDATE and DELETE")
                    .raise()
            }
        };
        let schema = pg_sys::get_namespace_name((*(*rel).rd_rel).relnamespace);
        let name = (*(*rel).rd_rel).relname.data.as_ptr();
        let table = format!(
            "{}.{}",
            c_text(pg_sys::quote_identifier(schema)),
            c_text(pg_sys::quote_identifier(name))
        );
        let trigger = &*td.tg_trigger;
        let arg = |i: i16| {
            if i < trigger.tgnargs {
                c_text(*trigger.tgargs.add(i as usize))
            } else {
                String::new()
            }
        };
        Fired {
            op,
            old,
            new,
            row_type: (*desc).tdtypeid,
            relid: (*rel).rd_id,
            table,
            pk: arg(0),
            tenant_column: arg(1),
        }
    }
}

/// `pgseal._audit_row()`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn audit_row_trigger(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: PostgreSQL calls this with the trigger's call frame.
    let f = unsafe { fired(fcinfo) };
    let pk = if f.pk.is_empty() {
        "{}".to_owned()
    } else {
        f.pk
    };
    let (payload, tenant, subjects) = crate::privilege::with_pinned_search_path(|| {
        let plan = plan_for(f.row_type);
        // SAFETY: the row datums are composite datums of `row_type`, built above in
        // this call's memory context.
        let rows = unsafe {
            [f.old, f.new].map(|d| match d {
                Some(d) => DatumWithOid::new(d, f.row_type),
                None => DatumWithOid::null_oid(f.row_type),
            })
        };
        let [old, new] = rows;
        let args = [
            old,
            new,
            f.table.as_str().into(),
            f.op.into(),
            pk.as_str().into(),
            f.tenant_column.as_str().into(),
            f.relid.into(),
        ];
        Spi::connect(|client| {
            let row = client.select(&*plan, Some(1), &args)?.first();
            Ok::<_, pgrx::spi::Error>((
                row.get::<String>(1)?,
                row.get::<String>(2)?,
                row.get::<Vec<Option<String>>>(3)?,
            ))
        })
        .map_err(SealError::from)
        .or_raise()
    });
    let payload = payload.unwrap_or_else(|| "{}".to_owned());
    let event = format!("row.{}", f.op.to_ascii_lowercase());
    let subjects = subjects.unwrap_or_default().into_iter().flatten().collect();
    super::audit::append_row_change(tenant.as_deref(), &event, &payload, subjects).or_raise();
    pg_sys::Datum::from(0usize)
}

crate::pg::v1_finfo!(pg_finfo_audit_truncate_trigger);

/// `pgseal._audit_truncate()`, the statement trigger `ledger_audit` creates next to
/// the row trigger: TRUNCATE fires no row trigger, so it records `audit.truncated`
/// (the table's name) in the chain of the tenant context, else pgseal's open chain
/// (`evidence.rs`). It reads nothing from the table and runs none of its types'
/// code; only the finished entry is appended, as the owner.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn audit_truncate_trigger(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: PostgreSQL calls this with a valid fcinfo; its context is NULL or a
    // node, whose tag is checked before it is read as TriggerData; tg_relation is
    // valid for a trigger call.
    let rel = unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || (*ctx).type_ != pg_sys::NodeTag::T_TriggerData {
            SealError::TriggerProtocol("pgseal._audit_truncate() must be called as a trigger")
                .raise()
        }
        let td = &*ctx.cast::<pg_sys::TriggerData>();
        if td.tg_event & pg_sys::TRIGGER_EVENT_OPMASK != pg_sys::TRIGGER_EVENT_TRUNCATE {
            SealError::TriggerProtocol("pgseal._audit_truncate() must be a TRUNCATE trigger")
                .raise()
        }
        (*td.tg_relation).rd_id
    };
    let payload = serde_json::json!({ "table": super::evidence::qualified_name(rel) });
    let tenant = super::evidence::context_or_open();
    super::evidence::record(&tenant, "audit.truncated", payload).or_raise();
    pg_sys::Datum::from(0usize)
}
