//! `jsonb` values as the ledger reads them: their RFC 8785 text, and their stored form.
//!
//! pgrx's `JsonB` parses into a `serde_json::Value`, which rounds large numbers; the
//! ledger must see every number as stored so that it can refuse one RFC 8785 would
//! round. `canonical` reads a value's binary form with `pgseal_core::jsonb` (no
//! `jsonb_out` text and no parse of it), and falls back to the text form where that
//! reader does not apply. `JsonbArg` (read by `ledger_append`'s C entry point,
//! `ledger_append_fn.rs`) is the value's stored form, which the ledger writes as it
//! is: the entry then needs no second parse of its payload, and a verifier reads
//! the same value back, whose canonical form is what was hashed. `JsonbText` is
//! `jsonb_out`'s text (read by `_job_receipt`).

use std::ffi::CStr;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::{direct_function_call, FromDatum};
use pgseal_core::canonical::canonical_payload;
use pgseal_core::jsonb::{canonical_from_jsonb, JsonbError};
use pgseal_core::CoreError;

use crate::error::{SealError, SealResult};

/// The text form of a `jsonb` argument.
pub struct JsonbText(pub String);

/// A `jsonb` argument: its varlena, detoasted, with its 4-byte header.
pub struct JsonbArg {
    pub raw: Vec<u8>,
}

impl JsonbArg {
    /// The value's RFC 8785 text; `InexactNumber` for a number that form would round.
    pub fn canonical(&self) -> Result<String, CoreError> {
        canonical(&self.raw[pg_sys::VARHDRSZ..], || {
            // SAFETY: `raw` is a whole jsonb varlena (see FromDatum below).
            unsafe { text_of(datum_of_raw(&self.raw)) }
        })
    }
}

/// The RFC 8785 text of the jsonb value whose bytes after the varlena header are
/// `container`: read from the binary form, or from `text()` (the value's
/// `jsonb_out` text) where `pgseal_core::jsonb` does not read it, and in a
/// database whose encoding is not UTF-8.
pub fn canonical(container: &[u8], text: impl FnOnce() -> String) -> Result<String, CoreError> {
    // SAFETY: reads the database encoding, set at backend start; no preconditions.
    let utf8 = unsafe { pg_sys::GetDatabaseEncoding() } == pg_sys::pg_enc::PG_UTF8 as i32;
    if !utf8 {
        // The stored strings are in the database's encoding, not UTF-8.
        return canonical_payload(&text());
    }
    match canonical_from_jsonb(container) {
        Ok(c) => Ok(c),
        Err(JsonbError::InexactNumber) => Err(CoreError::InexactNumber),
        Err(JsonbError::Malformed(_) | JsonbError::Unsupported) => canonical_payload(&text()),
    }
}

/// `jsonb_out`'s text of a jsonb datum.
///
/// # Safety
/// `datum` is a non-null datum of SQL type jsonb.
pub unsafe fn text_of(datum: pg_sys::Datum) -> String {
    // SAFETY: per the contract; jsonb_out detoasts it and returns a palloc'd C string.
    let text = unsafe { direct_function_call::<&CStr>(pg_sys::jsonb_out, &[Some(datum)]) }
        .expect("jsonb_out returns a string");
    text.to_str()
        .expect("jsonb text is UTF-8 in a UTF8 database")
        .to_owned()
}

impl FromDatum for JsonbArg {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: a non-null jsonb datum (the function's declared argument type);
        // pg_detoast_datum returns it, or a palloc'd copy, as a plain varlena with a
        // 4-byte header (a short header is expanded), whose VARSIZE bytes are read.
        let raw = unsafe {
            let p = pg_sys::pg_detoast_datum(datum.cast_mut_ptr());
            let len = pgrx::varlena::varsize_any(p);
            std::slice::from_raw_parts(p.cast::<u8>(), len).to_vec()
        };
        Some(JsonbArg { raw })
    }
}

/// Read from SPI rows too (the erasure reads each entry's payload this way).
impl pgrx::IntoDatum for JsonbArg {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(datum_of_raw(&self.raw))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
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
        // declared argument type).
        Some(JsonbText(unsafe { text_of(datum) }))
    }
}
