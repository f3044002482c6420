//! SPI plans kept for the life of the backend, for statements on hot paths (the
//! ledger's append runs several per transaction). Each is parsed and planned once;
//! PostgreSQL's plan cache replans it when the tables it uses change.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::pg_sys::PgOid;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;

use crate::error::SealResult;

thread_local! {
    static PLANS: RefCell<HashMap<&'static str, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

fn plan(sql: &'static str, types: &[PgOid]) -> SealResult<Rc<OwnedPreparedStatement>> {
    if let Some(p) = PLANS.with(|m| m.borrow().get(sql).cloned()) {
        return Ok(p);
    }
    let p = Rc::new(Spi::connect(|client| {
        client.prepare_mut(sql, types).map(|p| p.keep())
    })?);
    PLANS.with(|m| m.borrow_mut().insert(sql, p.clone()));
    Ok(p)
}

/// Runs a kept plan and calls `f` with its row count while the result is still
/// SPI's current tuple table (for readers that deform rows themselves). Kept plans
/// are prepared as statements that may write: SPI runs them read-write, with the
/// command counter advanced and, under READ COMMITTED, a new snapshot.
pub fn select_raw<R>(
    sql: &'static str,
    types: &[PgOid],
    args: &[DatumWithOid],
    f: impl FnOnce(usize) -> SealResult<R>,
) -> SealResult<R> {
    let p = plan(sql, types)?;
    Spi::connect(|client| {
        let table = client.select(&*p, None, args)?;
        f(table.len())
    })
}

/// Runs a kept plan (read-write, as `select_raw` says) and maps its first row, if
/// any, with `f`.
pub fn select_first<R>(
    sql: &'static str,
    types: &[PgOid],
    args: &[DatumWithOid],
    f: impl FnOnce(&pgrx::spi::SpiHeapTupleData<'_>) -> SealResult<R>,
) -> SealResult<Option<R>> {
    let p = plan(sql, types)?;
    Spi::connect(|client| {
        let table = client.select(&*p, Some(1), args)?;
        match table.into_iter().next() {
            Some(row) => f(&row).map(Some),
            None => Ok(None),
        }
    })
}

/// Runs a kept plan for its effect.
pub fn run(sql: &'static str, types: &[PgOid], args: &[DatumWithOid]) -> SealResult<()> {
    let p = plan(sql, types)?;
    Spi::connect_mut(|client| client.update(&*p, None, args).map(|_| ()))?;
    Ok(())
}

/// A `bytea[]` argument of 32-byte values (hashes, MACs), built with one allocation
/// for its elements: pgrx's generic conversion makes a Vec and a datum per element
/// and accumulates them one by one, which was 7% of a bulk append.
pub fn bytea32_array<'a>(
    items: impl ExactSizeIterator<Item = &'a [u8; 32]>,
) -> DatumWithOid<'static> {
    const ELEM: usize = pg_sys::VARHDRSZ + 32;
    let n = items.len();
    // SAFETY: `block` has room for n elements of ELEM bytes (a multiple of 4, and
    // palloc's result is maximally aligned, so every element meets bytea's int
    // alignment); each gets a 4-byte varlena header and its 32 bytes before
    // construct_array copies them all into the array, in the current memory
    // context as pgrx's own conversion would. The iterator yields exactly n items.
    unsafe {
        let block = pg_sys::palloc(n.max(1) * ELEM).cast::<u8>();
        let mut elems: Vec<pg_sys::Datum> = Vec::with_capacity(n);
        for (i, item) in items.take(n).enumerate() {
            let p = block.add(i * ELEM);
            pgrx::varlena::set_varsize_4b(p.cast(), ELEM as i32);
            std::ptr::copy_nonoverlapping(item.as_ptr(), p.add(pg_sys::VARHDRSZ), 32);
            elems.push(pg_sys::Datum::from(p));
        }
        let array = pg_sys::construct_array(
            elems.as_mut_ptr(),
            elems.len() as i32,
            pg_sys::BYTEAOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as std::ffi::c_char,
        );
        pg_sys::pfree(block.cast());
        DatumWithOid::new(pg_sys::Datum::from(array), pg_sys::BYTEAARRAYOID)
    }
}

pub const TEXT: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
pub const INT4: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT4OID);
pub const INT8: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8OID);
pub const TIMESTAMPTZ: PgOid = PgOid::BuiltIn(PgBuiltInOids::TIMESTAMPTZOID);
pub const BYTEA: PgOid = PgOid::BuiltIn(PgBuiltInOids::BYTEAOID);
pub const TEXT_ARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
pub const INT8_ARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID);
pub const BYTEA_ARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::BYTEAARRAYOID);
pub const JSONB: PgOid = PgOid::BuiltIn(PgBuiltInOids::JSONBOID);
pub const JSONB_ARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::JSONBARRAYOID);
