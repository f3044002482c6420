//! A `text` result written in place: `vault_decrypt` decodes and decrypts straight
//! into the varlena it returns, so the plaintext exists in exactly one buffer, the
//! one PostgreSQL owns from then on, and no Rust heap copy is left behind unwiped.

use std::ptr::NonNull;

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::pg_sys;
use zeroize::Zeroize;

/// A palloc'd `text` in the current memory context.
pub struct PlainText(NonNull<pg_sys::varlena>);

impl PlainText {
    /// Allocates a zeroed text with room for `cap` bytes and lets `fill` write into
    /// it, returning how many bytes it used. If `fill` fails, the buffer is zeroed
    /// and freed.
    pub fn fill<E>(
        cap: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<Self, E> {
        // SAFETY: palloc0 returns zeroed, maxaligned memory of the requested size in
        // CurrentMemoryContext, or raises ERROR (out of memory, or more than 1 GB);
        // the caller's input was itself a text, so `cap` stays below that limit.
        let base = unsafe { pg_sys::palloc0(pg_sys::VARHDRSZ + cap) }.cast::<u8>();
        // SAFETY: the `cap` bytes after the 4-byte header lie inside the allocation,
        // are initialised (zeroed), and nothing else refers to them.
        let data = unsafe { std::slice::from_raw_parts_mut(base.add(pg_sys::VARHDRSZ), cap) };
        match fill(data) {
            Ok(len) => {
                assert!(len <= cap, "PlainText::fill wrote past its buffer");
                let ptr = base.cast::<pg_sys::varlena>();
                // SAFETY: `ptr` heads an allocation of VARHDRSZ + cap >= VARHDRSZ + len
                // bytes, which is below 1 GB, so the 4-byte header can hold the size.
                unsafe { pgrx::set_varsize_4b(ptr, (pg_sys::VARHDRSZ + len) as i32) };
                Ok(PlainText(
                    NonNull::new(ptr).expect("palloc0 never returns NULL"),
                ))
            }
            Err(e) => {
                data.zeroize();
                // SAFETY: `base` came from palloc0 above and is freed once; `data`,
                // its only view, is not used again.
                unsafe { pg_sys::pfree(base.cast()) };
                Err(e)
            }
        }
    }
}

// SAFETY: the datum is a valid `text` varlena allocated in the function's memory
// context, which is where a function's by-reference result must live.
unsafe impl BoxRet for PlainText {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
        // SAFETY: see above; the function returns this datum.
        unsafe { fcinfo.return_raw_datum(pg_sys::Datum::from(self.0.as_ptr())) }
    }
}

pgrx::impl_sql_translatable!(PlainText, "text");
