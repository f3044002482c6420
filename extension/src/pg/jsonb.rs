//! `jsonb` arguments read as text, exactly as PostgreSQL stores them.
//!
//! pgrx's `JsonB` parses into a `serde_json::Value`, which rounds large numbers; the
//! ledger must see every number as stored so that it can refuse one RFC 8785 would
//! round. `JsonbText` is the output of `jsonb_out` instead (read by
//! `ledger_append`'s C entry point, `ledger_append_fn.rs`).

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::{direct_function_call, FromDatum};

/// The text form of a `jsonb` argument.
pub struct JsonbText(pub String);

impl FromDatum for JsonbText {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: the caller passes a non-null datum of SQL type jsonb (the function's
        // declared argument type); jsonb_out detoasts it and returns a palloc'd C string.
        let text = unsafe { direct_function_call::<&CStr>(pg_sys::jsonb_out, &[Some(datum)]) }?;
        Some(JsonbText(
            text.to_str()
                .expect("jsonb text is UTF-8 in a UTF8 database")
                .to_owned(),
        ))
    }
}
