//! Reading a tenant's head without SPI.
//!
//! Every appending transaction reads its tenant's head once, right after taking
//! the tenant's chain lock (`locks.rs`): a probe of the heads table's primary key
//! (the row exists, its anchor, where it is) and a backward probe of the ledger's
//! primary key (the last entry), both under a snapshot taken after the lock, with
//! no row lock. The head is the later of the two: the heads row is moved only
//! every `ledger::heads::HEAD_STRIDE` entries (and by pruning), so it is at most
//! that far behind the last entry; when it is ahead, entries after the last one
//! are missing (a cut tail), and appending after the heads row leaves the gap that
//! verification reports. (Why not SPI, and why not move the heads row on every
//! append: the 16-client ledger rows in docs/BENCHMARKS.md.)
//!
//! Every writer of a tenant's entries and heads row holds the tenant's chain lock
//! until it commits, so the snapshot sees the last committed head. Under
//! REPEATABLE READ and SERIALIZABLE the transaction's own snapshot must see that
//! head too: if it does not (another append committed after it was taken), the
//! read fails with 40001, a retryable error, rather than order this transaction's
//! entries after changes it cannot see.

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

/// Closes what `read` and `probe` opened, on every path out of it (an ERROR
/// aborts the transaction, which releases all of them anyway). A scan over an
/// opened `index` is an ordered one.
struct Opened {
    rel: pg_sys::Relation,
    index: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    scan: pg_sys::SysScanDesc,
}

impl Opened {
    fn none() -> Self {
        Opened {
            rel: std::ptr::null_mut(),
            index: std::ptr::null_mut(),
            snapshot: std::ptr::null_mut(),
            scan: std::ptr::null_mut(),
        }
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        // After an ERROR the transaction's abort releases all of them, and calling
        // into PostgreSQL while it unwinds could raise again.
        if std::thread::panicking() {
            return;
        }
        // SAFETY: each pointer is NULL or was opened by `read` or `probe` and not
        // closed since; the locks are kept until the transaction ends, as
        // PostgreSQL keeps the locks of the statements that read a table.
        unsafe {
            if !self.scan.is_null() {
                if self.index.is_null() {
                    pg_sys::systable_endscan(self.scan);
                } else {
                    pg_sys::systable_endscan_ordered(self.scan);
                }
            }
            if !self.snapshot.is_null() {
                pg_sys::UnregisterSnapshot(self.snapshot);
            }
            if !self.index.is_null() {
                pg_sys::index_close(self.index, pg_sys::NoLock as pg_sys::LOCKMODE);
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

/// `tenant`'s head: the later of its last entry and its heads row, as committed
/// (this transaction's own writes included), and where the heads row is; `None`
/// when the tenant has no heads row yet. With `xact_snapshot` (REPEATABLE READ,
/// SERIALIZABLE) the transaction's snapshot must see the same last entry, or this
/// fails with 40001. The caller holds the tenant's chain lock (`locks.rs`) and runs
/// as the extension's owner.
pub fn read(tenant: &str, xact_snapshot: bool) -> SealResult<Option<Loaded>> {
    let (ledger_id, heads_id) = relids()?;
    let mut o = Opened::none();
    // SAFETY: called inside a transaction. table_open raises on a bad OID, and
    // `o` closes what was opened. The scan key's argument is a palloc'd text that outlives the scan;
    // the tuple returned by systable_getnext is only read (deformed, its fields
    // copied) before the scan ends.
    unsafe {
        o.rel = pg_sys::table_open(heads_id, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
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
        let pkey = primary_key(
            o.rel,
            "pgseal.ledger_heads must be a plain table with its primary key (tenant_id)",
        )?;
        // This transaction's earlier writes become visible, as before any SPI statement.
        pg_sys::CommandCounterIncrement();
        o.snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let mut key = tenant_key(tenant, attrs[0].attcollation);
        o.scan = pg_sys::systable_beginscan(o.rel, pkey, true, o.snapshot, 1, &mut key);
        let tuple = pg_sys::systable_getnext(o.scan);
        if tuple.is_null() {
            // Entries without a heads row: the row was removed (only with the
            // guards lifted). Appending would start the chain again at seq 1 and
            // hide the removal; verification reports it as a gap at 1.
            if last_entry(ledger_id, o.snapshot, tenant)?.is_some() {
                return Err(SealError::ChainCorrupt(1, "gap"));
            }
            return Ok(None);
        }
        let mut values = vec![pg_sys::Datum::from(0usize); attrs.len()];
        let mut nulls = vec![true; attrs.len()];
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        if nulls[1] || nulls[2] {
            return Err(SealError::Internal("NULL in pgseal.ledger_heads"));
        }
        let seq = values[1].value() as i64;
        let hash = to_hash(varlena_bytes(values[2]))?;
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
        let last = last_entry(ledger_id, o.snapshot, tenant)?;
        if xact_snapshot {
            // The transaction snapshot, with this transaction's writes up to the
            // increment above.
            let mine = pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot());
            let seen = last_entry(ledger_id, mine, tenant);
            pg_sys::UnregisterSnapshot(mine);
            if seen?.map(|e| e.0) != last.map(|e| e.0) {
                return Err(SealError::Conflict(
                    "another transaction appended to this tenant's ledger after this transaction's snapshot was taken; retry the transaction",
                ));
            }
        }
        let head = match last {
            Some(entry) if entry.0 >= seq => entry,
            _ => (seq, hash),
        };
        Ok(Some((head, row)))
    }
}

fn to_hash(bytes: &[u8]) -> SealResult<Hash> {
    bytes
        .try_into()
        .map_err(|_| SealError::Internal("stored hash is not 32 bytes"))
}

/// The OID of `rel`'s primary key index, which this module scans; `rel` must be a
/// plain table (a partitioned one has no storage to scan: it is refused rather
/// than read through SPI, with the same result for every append).
///
/// # Safety
/// `rel` is an open relation.
unsafe fn primary_key(rel: pg_sys::Relation, refused: &'static str) -> SealResult<pg_sys::Oid> {
    // SAFETY: the caller's relation is open; building its index list fills in
    // rd_pkindex, and the list itself is not needed.
    unsafe {
        let class = &*(*rel).rd_rel;
        if class.relkind as u8 != pg_sys::RELKIND_RELATION || (*rel).rd_tableam.is_null() {
            return Err(SealError::WrongObjectType(refused));
        }
        pg_sys::list_free(pg_sys::RelationGetIndexList(rel));
        let pkey = (*rel).rd_pkindex;
        if pkey == pg_sys::InvalidOid {
            return Err(SealError::WrongObjectType(refused));
        }
        Ok(pkey)
    }
}

/// A scan key `tenant_id = tenant` on the first column (of the table, and of
/// both primary keys), compared under `collation`, the column's own, as the
/// indexes were built with. Its argument is palloc'd in the current memory context.
fn tenant_key(tenant: &str, collation: pg_sys::Oid) -> pg_sys::ScanKeyData {
    // SAFETY: a zeroed ScanKeyData is what ScanKeyInit fills in; the text is a
    // fresh palloc'd copy of `tenant`.
    unsafe {
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
        key.sk_collation = collation;
        key
    }
}

/// The hash of `tenant`'s entry `seq` as committed (this transaction's written
/// entries included), whatever the transaction's snapshot; `None` when there is none.
pub fn entry_now(tenant: &str, seq: i64) -> SealResult<Option<Hash>> {
    let (ledger_id, _) = relids()?;
    // SAFETY: called inside a transaction; the snapshot is registered for the
    // probe and unregistered after it (an ERROR releases it with the abort).
    unsafe {
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let entry = probe(ledger_id, snapshot, tenant, Some(seq));
        pg_sys::UnregisterSnapshot(snapshot);
        Ok(entry?.map(|(_, hash)| hash))
    }
}

const LEDGER_SHAPE: &str =
    "pgseal.ledger must be a plain table with its primary key (tenant_id, seq)";

/// The `(seq, hash)` of `tenant`'s last entry visible under `snapshot`: one
/// backward probe of the ledger's primary key, which must be `(tenant_id, seq)`.
///
/// # Safety
/// Called inside a transaction with `snapshot` registered, as the extension's owner.
unsafe fn last_entry(
    ledger_id: pg_sys::Oid,
    snapshot: pg_sys::Snapshot,
    tenant: &str,
) -> SealResult<Option<(i64, Hash)>> {
    // SAFETY: the caller's contract.
    unsafe { probe(ledger_id, snapshot, tenant, None) }
}

/// The `(seq, hash)` of `tenant`'s last entry visible under `snapshot`, or with
/// `at`, of its entry `at`.
///
/// # Safety
/// As `last_entry`.
unsafe fn probe(
    ledger_id: pg_sys::Oid,
    snapshot: pg_sys::Snapshot,
    tenant: &str,
    at: Option<i64>,
) -> SealResult<Option<(i64, Hash)>> {
    let mut o = Opened::none();
    // SAFETY: table_open and index_open raise on a bad OID, and `o` closes what
    // was opened. The primary key's columns are checked to be (tenant_id, seq)
    // before it is scanned; the tuple returned is only read (its seq and hash
    // copied) before the scan ends.
    unsafe {
        o.rel = pg_sys::table_open(ledger_id, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let desc = (*o.rel).rd_att;
        let attrs = crate::pg::compat::tupdesc_attrs(desc);
        let shaped = attrs.len() >= 8
            && [
                (0, pg_sys::TEXTOID),
                (1, pg_sys::INT8OID),
                (7, pg_sys::BYTEAOID),
            ]
            .iter()
            .all(|&(i, t)| !attrs[i].attisdropped && attrs[i].atttypid == t);
        if !shaped {
            return Err(SealError::Internal("unexpected shape of pgseal.ledger"));
        }
        let pkey = primary_key(o.rel, LEDGER_SHAPE)?;
        o.index = pg_sys::index_open(pkey, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let index = &*(*o.index).rd_index;
        let keys = index
            .indkey
            .values
            .as_slice(index.indnkeyatts.max(0) as usize);
        if keys != [1, 2] || !index.indisvalid {
            return Err(SealError::WrongObjectType(LEDGER_SHAPE));
        }
        let mut keys = [
            tenant_key(tenant, attrs[0].attcollation),
            std::mem::zeroed(),
        ];
        if let Some(seq) = at {
            pg_sys::ScanKeyInit(
                &mut keys[1],
                2,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::regproc::from(pg_sys::F_INT8EQ),
                pg_sys::Datum::from(seq),
            );
        }
        let nkeys = if at.is_some() { 2 } else { 1 };
        o.scan =
            pg_sys::systable_beginscan_ordered(o.rel, o.index, snapshot, nkeys, keys.as_mut_ptr());
        let tuple =
            pg_sys::systable_getnext_ordered(o.scan, pg_sys::ScanDirection::BackwardScanDirection);
        if tuple.is_null() {
            return Ok(None);
        }
        let mut values = vec![pg_sys::Datum::from(0usize); attrs.len()];
        let mut nulls = vec![true; attrs.len()];
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        if nulls[1] || nulls[7] {
            return Err(SealError::Internal("NULL in pgseal.ledger"));
        }
        Ok(Some((
            values[1].value() as i64,
            to_hash(varlena_bytes(values[7]))?,
        )))
    }
}
