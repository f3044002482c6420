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

use crate::error::{SealError, SealResult};

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

thread_local! {
    /// SPI's own kept plans for `select_first_latest` (`SPI_keepplan`), which pgrx's
    /// prepared statements cannot run under a snapshot of the caller's choosing.
    static LATEST_PLANS: RefCell<HashMap<&'static str, std::ptr::NonNull<pg_sys::_SPI_plan>>> =
        RefCell::new(HashMap::new());
}

/// As `select_first`, under a snapshot taken now (`GetLatestSnapshot`, with this
/// transaction's own writes, as a read-write statement sees them), whatever the
/// transaction's isolation level: under REPEATABLE READ or SERIALIZABLE the row as
/// committed since the transaction's snapshot was taken, not as that snapshot has
/// it. Not in parallel mode, where no new snapshot may be taken (the caller checks
/// `xact::in_parallel_mode`).
pub fn select_first_latest<R>(
    sql: &'static str,
    types: &[PgOid],
    args: &[DatumWithOid],
    f: impl FnOnce(&pgrx::spi::SpiHeapTupleData<'_>) -> SealResult<R>,
) -> SealResult<Option<R>> {
    Spi::connect(|_client| {
        let status = execute_latest(sql, types, args, 1)?;
        if status != pg_sys::SPI_OK_SELECT as i32 {
            return Err(SealError::Internal(
                "a kept statement under the latest snapshot did not select",
            ));
        }
        // SAFETY: the statement above just ran in this SPI connection: SPI's tuple
        // table (reset by every execution) holds its result until the connection
        // ends, and its first tuple and descriptor are read, and copied out by
        // `f`, before that.
        unsafe {
            let table = pg_sys::SPI_tuptable;
            if pg_sys::SPI_processed == 0 || table.is_null() {
                return Ok(None);
            }
            let row = pgrx::spi::SpiHeapTupleData::new((*table).tupdesc, *(*table).vals)?
                .ok_or(SealError::Internal("no tuple descriptor"))?;
            f(&row).map(Some)
        }
    })
}

/// Runs a kept plan for its effect under a snapshot taken now, as
/// `select_first_latest` reads (an UPDATE then reaches rows committed after a
/// REPEATABLE READ transaction's snapshot); returns the rows it processed.
pub fn run_latest(sql: &'static str, types: &[PgOid], args: &[DatumWithOid]) -> SealResult<u64> {
    Spi::connect(|_client| {
        let status = execute_latest(sql, types, args, 0)?;
        if status < 0 {
            return Err(SealError::Internal(
                "a kept statement under the latest snapshot failed",
            ));
        }
        // SAFETY: SPI_processed is the count of the statement just run.
        Ok(unsafe { pg_sys::SPI_processed })
    })
}

/// Runs `sql` (prepared once and kept by SPI for the backend's life) under
/// `GetLatestSnapshot()`, read-write (SPI advances the command counter first, so
/// this transaction's own writes are seen); returns SPI's status. Called inside an
/// SPI connection.
fn execute_latest(
    sql: &'static str,
    types: &[PgOid],
    args: &[DatumWithOid],
    tcount: i64,
) -> SealResult<i32> {
    if args.len() != types.len() {
        return Err(SealError::Internal(
            "a kept statement's arguments do not match its types",
        ));
    }
    let (mut values, nulls): (Vec<pg_sys::Datum>, Vec<std::ffi::c_char>) = args
        .iter()
        .map(|a| match a.datum() {
            Some(d) => (d.sans_lifetime(), b' ' as std::ffi::c_char),
            None => (pg_sys::Datum::from(0usize), b'n' as std::ffi::c_char),
        })
        .unzip();
    let plan = match LATEST_PLANS.with(|m| m.borrow().get(sql).copied()) {
        Some(p) => p,
        None => {
            let text = std::ffi::CString::new(sql)
                .map_err(|_| SealError::Internal("a kept statement holds a NUL"))?;
            let mut oids: Vec<pg_sys::Oid> = types.iter().map(|t| t.value()).collect();
            // SAFETY: inside the caller's SPI connection; the text and the type
            // array outlive the call. SPI_prepare raises on a bad statement;
            // SPI_keepplan moves the plan out of the connection's memory, to be
            // kept for the backend's life. Only a kept plan is remembered.
            let plan = unsafe {
                let p = pg_sys::SPI_prepare(text.as_ptr(), oids.len() as i32, oids.as_mut_ptr());
                if !p.is_null() && pg_sys::SPI_keepplan(p) != 0 {
                    return Err(SealError::Internal("SPI_keepplan failed"));
                }
                std::ptr::NonNull::new(p)
                    .ok_or(SealError::Internal("SPI_prepare returned no plan"))?
            };
            LATEST_PLANS.with(|m| m.borrow_mut().insert(sql, plan));
            plan
        }
    };
    // SAFETY: inside the caller's SPI connection; the plan is kept and was
    // prepared with `types`, as many as the values (checked above), whose datums
    // live in the caller's memory for the call. SPI copies GetLatestSnapshot's
    // result before the statement runs.
    Ok(unsafe {
        pg_sys::SPI_execute_snapshot(
            plan.as_ptr(),
            values.as_mut_ptr(),
            nulls.as_ptr(),
            pg_sys::GetLatestSnapshot(),
            std::ptr::null_mut(),
            false,
            true,
            tcount,
        )
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
