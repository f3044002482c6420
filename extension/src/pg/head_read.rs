//! Reading a tenant's heads row under READ COMMITTED without SPI.
//!
//! Every appending transaction reads its tenant's head once, right after taking
//! the tenant's chain lock (`locks.rs`): one probe of the heads table's primary key,
//! under a snapshot taken after the lock, and no row lock. (Why not SPI: the
//! 16-client ledger rows in docs/BENCHMARKS.md.)
//!
//! Only for READ COMMITTED: there a fresh snapshot is what SPI would use too, and
//! every writer of a heads row holds the tenant's chain lock (`locks.rs`) until it commits,
//! so the snapshot sees the last committed head. Under REPEATABLE READ and
//! SERIALIZABLE the row is locked through SPI instead (see `ledger::chain_lock`).

use pgrx::pg_sys;
use pgseal_core::ledger::Hash;

use crate::error::{SealError, SealResult};

/// The types of `pgseal.ledger_heads`' columns: tenant_id, seq, hash, anchor_seq,
/// anchor_hash. The head is read from the first three; the row's place is kept
/// (for `head_write`) only when the table has exactly these.
pub const HEADS_COLUMNS: [pg_sys::Oid; 5] = [
    pg_sys::TEXTOID,
    pg_sys::INT8OID,
    pg_sys::BYTEAOID,
    pg_sys::INT8OID,
    pg_sys::BYTEAOID,
];

/// The bytes of a non-NULL bytea or text datum, detoasted (into the current
/// memory context) when compressed or stored out of line.
///
/// # Safety
/// `d` is a non-NULL varlena datum that outlives `'a`, and so does the current
/// memory context when it has to be detoasted.
pub unsafe fn varlena_bytes<'a>(d: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: per the contract; pg_detoast_datum_packed returns its argument when
    // the value is inline and uncompressed, and the pgrx helpers read its header.
    unsafe {
        let p = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
        std::slice::from_raw_parts(
            pgrx::varlena::vardata_any(p).cast::<u8>(),
            pgrx::varlena::varsize_any_exhdr(p),
        )
    }
}

/// A head `(seq, hash)`, and where its row is when it was read here.
pub type Loaded = ((i64, Hash), Option<HeadRow>);

/// Where a heads row was read, with the columns an update of it must carry over;
/// known when the table has exactly its five columns (see `head_write`).
#[derive(Clone)]
pub struct HeadRow {
    pub tid: pg_sys::ItemPointerData,
    /// The seq the row holds.
    pub seq: i64,
    pub anchor_seq: i64,
    pub anchor_hash: Vec<u8>,
}

/// Closes what `read` opened, on every path out of it (an ERROR aborts the
/// transaction, which releases all of them anyway).
struct Opened {
    rel: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    scan: pg_sys::SysScanDesc,
}

impl Drop for Opened {
    fn drop(&mut self) {
        // After an ERROR the transaction's abort releases all of them, and calling
        // into PostgreSQL while it unwinds could raise again.
        if std::thread::panicking() {
            return;
        }
        // SAFETY: each pointer is NULL or was opened by `read` below and not closed
        // since; the lock on the table is kept until the transaction ends, as
        // PostgreSQL keeps the locks of the statements that read a table.
        unsafe {
            if !self.scan.is_null() {
                pg_sys::systable_endscan(self.scan);
            }
            if !self.snapshot.is_null() {
                pg_sys::UnregisterSnapshot(self.snapshot);
            }
            if !self.rel.is_null() {
                pg_sys::table_close(self.rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            }
        }
    }
}

thread_local! {
    /// The OIDs of `pgseal.ledger` and `pgseal.ledger_heads`, looked up once a
    /// transaction (their read and their write both need them).
    static RELIDS: std::cell::Cell<Option<(pg_sys::Oid, pg_sys::Oid)>> =
        const { std::cell::Cell::new(None) };
}

/// The OIDs of `pgseal.ledger` and `pgseal.ledger_heads`.
pub fn relids() -> SealResult<(pg_sys::Oid, pg_sys::Oid)> {
    if let Some(ids) = RELIDS.with(|r| r.get()) {
        return Ok(ids);
    }
    let ids = (
        relid(c"ledger", "pgseal.ledger is missing")?,
        relid(c"ledger_heads", "pgseal.ledger_heads is missing")?,
    );
    RELIDS.with(|r| r.set(Some(ids)));
    Ok(ids)
}

/// Forgets the OIDs (the transaction ended).
pub fn forget_relids() {
    RELIDS.with(|r| r.set(None));
}

/// The OID of the table `pgseal.<name>` (two syscache lookups); `missing` is the
/// error when there is none.
fn relid(name: &std::ffi::CStr, missing: &'static str) -> SealResult<pg_sys::Oid> {
    // SAFETY: called inside a transaction; with missing_ok the namespace lookup
    // returns InvalidOid instead of raising, and so does the relation lookup.
    let relid = unsafe {
        let nsp = pg_sys::get_namespace_oid(c"pgseal".as_ptr(), true);
        pg_sys::get_relname_relid(name.as_ptr(), nsp)
    };
    if relid == pg_sys::InvalidOid {
        return Err(SealError::Internal(missing));
    }
    Ok(relid)
}

/// The committed `(seq, hash)` of `tenant`'s heads row (this transaction's own
/// writes included) and where that row is, or `None` when the tenant has none
/// yet. The caller holds the tenant's chain lock (`locks.rs`) and runs as the extension's owner.
pub fn read(tenant: &str) -> SealResult<Option<Loaded>> {
    let (_, relid) = relids()?;
    let mut o = Opened {
        rel: std::ptr::null_mut(),
        snapshot: std::ptr::null_mut(),
        scan: std::ptr::null_mut(),
    };
    // SAFETY: called inside a transaction. table_open raises on a bad OID, and
    // `o` closes what was opened. The scan key's argument is a palloc'd text that outlives the scan;
    // the tuple returned by systable_getnext is only read (deformed, its fields
    // copied) before the scan ends.
    unsafe {
        o.rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let desc = (*o.rel).rd_att;
        let attrs = crate::pg::compat::tupdesc_attrs(desc);
        let types_match = |n: usize| {
            attrs.len() >= n
                && attrs[..n]
                    .iter()
                    .zip(&HEADS_COLUMNS)
                    .all(|(a, t)| !a.attisdropped && a.atttypid == *t)
        };
        if !types_match(3) {
            return Err(SealError::Internal(
                "unexpected shape of pgseal.ledger_heads",
            ));
        }
        pg_sys::list_free(pg_sys::RelationGetIndexList(o.rel));
        let pkey = (*o.rel).rd_pkindex;
        if pkey == pg_sys::InvalidOid {
            return Err(SealError::Internal(
                "pgseal.ledger_heads has no primary key",
            ));
        }
        // This transaction's earlier writes become visible, as before any SPI statement.
        pg_sys::CommandCounterIncrement();
        o.snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let key_text =
            pg_sys::cstring_to_text_with_len(tenant.as_ptr().cast(), tenant.len() as i32);
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            1,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::regproc::from(pg_sys::F_TEXTEQ),
            pg_sys::Datum::from(key_text),
        );
        // Equality under the column's own collation, as the index was built with.
        key.sk_collation = attrs[0].attcollation;
        o.scan = pg_sys::systable_beginscan(o.rel, pkey, true, o.snapshot, 1, &mut key);
        let tuple = pg_sys::systable_getnext(o.scan);
        if tuple.is_null() {
            return Ok(None);
        }
        let mut values = vec![pg_sys::Datum::from(0usize); attrs.len()];
        let mut nulls = vec![true; attrs.len()];
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        if nulls[1] || nulls[2] {
            return Err(SealError::Internal("NULL in pgseal.ledger_heads"));
        }
        let seq = values[1].value() as i64;
        let hash: Hash = varlena_bytes(values[2])
            .try_into()
            .map_err(|_| SealError::Internal("stored hash is not 32 bytes"))?;
        let row = (attrs.len() == HEADS_COLUMNS.len()
            && types_match(HEADS_COLUMNS.len())
            && !nulls[3]
            && !nulls[4])
            .then(|| HeadRow {
                tid: (*tuple).t_self,
                seq,
                anchor_seq: values[3].value() as i64,
                anchor_hash: varlena_bytes(values[4]).to_vec(),
            });
        Ok(Some(((seq, hash), row)))
    }
}
