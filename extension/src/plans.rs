//! SPI plans kept for the life of the backend, for statements on hot paths (the
//! ledger's append runs several per transaction). Each is parsed and planned once;
//! PostgreSQL's plan cache replans it when the tables it uses change.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::PgOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiHeapTupleData};

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

/// Runs a kept plan (as a read-write SPI call) and maps its first row, if any.
pub fn first_row<R>(
    sql: &'static str,
    types: &[PgOid],
    args: &[DatumWithOid],
    f: impl FnOnce(&SpiHeapTupleData) -> SealResult<R>,
) -> SealResult<Option<R>> {
    let p = plan(sql, types)?;
    Spi::connect_mut(|client| {
        let table = client.update(&*p, Some(1), args)?;
        match table.into_iter().next() {
            Some(row) => Ok(Some(f(&row)?)),
            None => Ok(None),
        }
    })
}

/// Runs a kept plan read-only and calls `f` with its row count while the result
/// is still SPI's current tuple table (for readers that deform rows themselves).
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

/// Runs a kept plan for its effect.
pub fn run(sql: &'static str, types: &[PgOid], args: &[DatumWithOid]) -> SealResult<()> {
    let p = plan(sql, types)?;
    Spi::connect_mut(|client| client.update(&*p, None, args).map(|_| ()))?;
    Ok(())
}

pub const TEXT: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
pub const INT8: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8OID);
pub const TIMESTAMPTZ: PgOid = PgOid::BuiltIn(PgBuiltInOids::TIMESTAMPTZOID);
pub const BYTEA: PgOid = PgOid::BuiltIn(PgBuiltInOids::BYTEAOID);
pub const TEXT_ARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
pub const INT8_ARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID);
pub const BYTEA_ARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::BYTEAARRAYOID);
pub const TIMESTAMPTZ_ARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::TIMESTAMPTZARRAYOID);
