//! The C entry point of `pgseal.ledger_append` (declared in `sql/ledger_api.sql`).
//!
//! The function returns `TABLE(seq bigint, hash text)`, one row, in materialize
//! mode: the row goes straight into a tuplestore built from the executor's expected
//! descriptor, which the executor reads as it is, with no per-call catalog lookup
//! or memory context (pgrx's value-per-call table protocol cost a bulk append about
//! a tenth of its time; docs/BENCHMARKS.md).

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::{OrRaise, SealError};
use crate::pg::jsonb::JsonbArg;

crate::pg::v1_finfo!(pg_finfo_ledger_append_srf);

/// `ledger_append(event text, payload jsonb, actor text, subjects text[])`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn ledger_append_srf(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: PostgreSQL calls this with a valid fcinfo of the declared arguments
    // (text, jsonb, text, text[]); pg_getarg reads argument n only when it is not
    // NULL, as the declared SQL type. The fourth is read only when it was passed (a
    // declaration left from before it had three).
    let (event, payload, actor, subjects) = unsafe {
        if (*fcinfo).nargs < 3 {
            SealError::NotSupported("pgseal.ledger_append is declared with too few arguments")
                .raise()
        }
        (
            pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 0),
            pgrx::fcinfo::pg_getarg::<JsonbArg>(fcinfo, 1),
            pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 2),
            if (*fcinfo).nargs >= 4 {
                pgrx::fcinfo::pg_getarg::<Vec<Option<String>>>(fcinfo, 3)
            } else {
                None
            },
        )
    };
    // SAFETY: resultinfo is NULL or points to a node the executor set up; the tag is
    // checked before it is used as a ReturnSetInfo.
    let rsinfo = unsafe {
        let ri = (*fcinfo).resultinfo;
        (!ri.is_null() && (*ri).type_ == pg_sys::NodeTag::T_ReturnSetInfo)
            .then(|| &mut *ri.cast::<pg_sys::ReturnSetInfo>())
    };
    let Some(rsinfo) = rsinfo.filter(|r| {
        !r.expectedDesc.is_null()
            && (r.allowedModes & pg_sys::SetFunctionReturnMode::SFRM_Materialize as i32) != 0
    }) else {
        SealError::NotSupported(
            "ledger_append must be called where a set of rows is accepted (FROM or a SELECT list)",
        )
        .raise()
    };
    if let Some(e) = event {
        crate::limits::check("event", e, crate::limits::EVENT).or_raise();
    }
    let (seq, hash) =
        crate::ledger::append::append_entry(event, payload, actor, subjects).or_raise();
    // Lowercase hex, encoded on the stack (`hex::encode` builds it char by char).
    let mut hex_buf = [0u8; 64];
    hex::encode_to_slice(hash, &mut hex_buf).expect("64 bytes for a 32-byte hash");
    let hash = std::str::from_utf8(&hex_buf).expect("hex is ASCII");
    // SAFETY: the tuplestore and the descriptor copy are made in the query's memory
    // context, which outlives the function scan that reads them; the values match
    // the expected descriptor (bigint, text), which `expectedDesc` is for this
    // function's declared result.
    unsafe {
        let per_query = (*rsinfo.econtext).ecxt_per_query_memory;
        let old = pg_sys::MemoryContextSwitchTo(per_query);
        let desc = pg_sys::CreateTupleDescCopy(rsinfo.expectedDesc);
        let store = pg_sys::tuplestore_begin_heap(true, false, pg_sys::work_mem);
        let mut values = [
            seq.into_datum().expect("bigint datum"),
            hash.into_datum().expect("text datum"),
        ];
        let mut nulls = [false, false];
        pg_sys::tuplestore_putvalues(store, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::MemoryContextSwitchTo(old);
        rsinfo.returnMode = pg_sys::SetFunctionReturnMode::SFRM_Materialize;
        rsinfo.setResult = store;
        rsinfo.setDesc = desc;
    }
    pg_sys::Datum::from(0usize)
}
