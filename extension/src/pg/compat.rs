//! The few places where PostgreSQL's C structures differ between the versions
//! pgseal builds for (15 and 18), behind one function each.

use pgrx::pg_sys;

/// A tuple descriptor's attributes, as C code gets them one at a time with
/// `TupleDescAttr()`. PostgreSQL 18 keeps a `CompactAttribute` per column first
/// and the full `FormData_pg_attribute` array after them; earlier versions have
/// only the latter, as the `attrs` member.
///
/// # Safety
/// `desc` is a valid tuple descriptor that outlives the returned slice.
pub(crate) unsafe fn tupdesc_attrs<'a>(
    desc: pg_sys::TupleDesc,
) -> &'a [pg_sys::FormData_pg_attribute] {
    // SAFETY: the caller's descriptor holds `natts` attributes in the layout of
    // the version this was compiled for.
    unsafe {
        let natts = (*desc).natts.max(0) as usize;
        #[cfg(not(feature = "pg18"))]
        {
            (*desc).attrs.as_slice(natts)
        }
        #[cfg(feature = "pg18")]
        {
            let first = (*desc)
                .compact_attrs
                .as_ptr()
                .add(natts)
                .cast::<pg_sys::FormData_pg_attribute>();
            std::slice::from_raw_parts(first, natts)
        }
    }
}
