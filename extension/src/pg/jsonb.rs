//! `jsonb` arguments read as text, exactly as PostgreSQL stores them.
//!
//! pgrx's `JsonB` parses into a `serde_json::Value`, which rounds large numbers; the
//! ledger must see every number as stored so that it can refuse one RFC 8785 would
//! round. `JsonbText` is the output of `jsonb_out` instead (read by `_job_receipt`).
//! `JsonbArg` (read by `ledger_append`'s C entry point, `ledger_append_fn.rs`) is
//! that text and the value's stored form, which the ledger writes as it is: the
//! entry then needs no second parse of its payload (`jsonb_in` of the canonical
//! text, which sorted every object's keys again), and a verifier reads the same
//! text back, whose canonical form is what was hashed.

use std::ffi::CStr;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::{direct_function_call, FromDatum};

use crate::error::{SealError, SealResult};

/// The text form of a `jsonb` argument.
pub struct JsonbText(pub String);

/// A `jsonb` argument: its text, as `JsonbText`, and its varlena, detoasted, with
/// its 4-byte header.
pub struct JsonbArg {
    pub text: String,
    pub raw: Vec<u8>,
}

impl FromDatum for JsonbArg {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        oid: pg_sys::Oid,
    ) -> Option<Self> {
        // SAFETY: as for JsonbText: a datum of SQL type jsonb.
        let JsonbText(text) = unsafe { JsonbText::from_polymorphic_datum(datum, is_null, oid) }?;
        // SAFETY: a non-null jsonb datum; pg_detoast_datum returns it, or a palloc'd
        // copy, as a plain varlena with a 4-byte header (a short header is
        // expanded), whose VARSIZE bytes are read.
        let raw = unsafe {
            let p = pg_sys::pg_detoast_datum(datum.cast_mut_ptr());
            let len = pgrx::varlena::varsize_any(p);
            std::slice::from_raw_parts(p.cast::<u8>(), len).to_vec()
        };
        Some(JsonbArg { text, raw })
    }
}

/// A `jsonb` datum holding `raw` (a `JsonbArg`'s varlena), palloc'd in the current
/// memory context.
pub fn datum_of_raw(raw: &[u8]) -> pg_sys::Datum {
    // SAFETY: palloc returns maximally aligned memory of the requested size, and
    // `raw` is a whole varlena as `JsonbArg` read it (header included).
    unsafe {
        let p = pg_sys::palloc(raw.len()).cast::<u8>();
        std::ptr::copy_nonoverlapping(raw.as_ptr(), p, raw.len());
        pg_sys::Datum::from(p)
    }
}

/// A `jsonb` datum parsed from JSON text (`jsonb_in`), in the current memory context.
pub fn datum_of_text(text: &str) -> SealResult<pg_sys::Datum> {
    let c = std::ffi::CString::new(text)
        .map_err(|_| SealError::Internal("canonical payload holds a NUL byte"))?;
    // SAFETY: jsonb_in reads a NUL-terminated string and returns a palloc'd jsonb
    // or raises on invalid input (the text is canonical JSON, so it does not).
    Ok(unsafe {
        pg_sys::OidInputFunctionCall(
            pg_sys::Oid::from(pg_sys::F_JSONB_IN),
            c.as_ptr().cast_mut(),
            pg_sys::JSONBOID,
            -1,
        )
    })
}

/// A `jsonb[]` argument of `datums`, in the current memory context.
pub fn array(mut datums: Vec<pg_sys::Datum>) -> DatumWithOid<'static> {
    // SAFETY: every element is a jsonb varlena; construct_array copies them into
    // one palloc'd array of jsonb (variable length, int-aligned, by reference).
    unsafe {
        let array = pg_sys::construct_array(
            datums.as_mut_ptr(),
            datums.len() as i32,
            pg_sys::JSONBOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as std::ffi::c_char,
        );
        DatumWithOid::new(pg_sys::Datum::from(array), pg_sys::JSONBARRAYOID)
    }
}

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
