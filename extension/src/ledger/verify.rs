//! `pgseal.ledger_verify`: reads a range of a tenant's chain back and checks
//! every hash, MAC, link and seq with `pgseal-core`'s verifier, format 1 and
//! format 2 entries alike (erased format 2 entries by their stored commitment).

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgseal_core::chain::{Failure, Payload, Problem, Report, StoredEntry, Verifier};
use pgseal_core::ledger::{Hash, GENESIS};

use crate::error::{OrRaise, SealError, SealResult};
use crate::pg::plans;
use crate::privilege::as_owner;

/// Seqs read per statement, through a kept plan: small enough that every batch is an
/// index scan in seq order and SPI's copy of it reuses freed memory (the
/// measurements are in docs/BENCHMARKS.md, Ledger).
const BATCH: i64 = 512;

const BATCH_SQL: &str = "SELECT seq, recorded_at, actor, event, payload, prev_hash, hash, mac, \
            fmt, db_role, subjects, salt, commitment \
     FROM pgseal.ledger WHERE tenant_id = $1 AND seq >= $2 AND seq < $3 ORDER BY seq";

/// A tenant's heads row as verification reads it through SPI (the append path's
/// `pg::head_read::HeadRow` also knows where the row is).
struct RecordedHead {
    seq: i64,
    hash: Hash,
    anchor_seq: i64,
    anchor_hash: Hash,
}

fn head_row(tenant: &str) -> SealResult<Option<RecordedHead>> {
    let row = Spi::connect(|client| -> SealResult<Option<RecordedHead>> {
        let t = client.select(
            "SELECT seq, hash, anchor_seq, anchor_hash FROM pgseal.ledger_heads WHERE tenant_id = $1",
            Some(1),
            &[tenant.into()],
        )?;
        let Some(r) = t.into_iter().next() else {
            return Ok(None);
        };
        let h = |i| -> SealResult<Hash> {
            r.get::<Vec<u8>>(i)?
                .and_then(|v| v.try_into().ok())
                .ok_or(SealError::Internal("bad hash in pgseal.ledger_heads"))
        };
        Ok(Some(RecordedHead {
            seq: r.get::<i64>(1)?.unwrap_or(0),
            hash: h(2)?,
            anchor_seq: r.get::<i64>(3)?.unwrap_or(0),
            anchor_hash: h(4)?,
        }))
    })?;
    Ok(row)
}

/// The hash of entry `seq`, if it exists.
fn hash_at(tenant: &str, seq: i64) -> SealResult<Option<Hash>> {
    let h = Spi::get_one_with_args::<Vec<u8>>(
        "SELECT hash FROM pgseal.ledger WHERE tenant_id = $1 AND seq = $2",
        &[tenant.into(), seq.into()],
    );
    match h {
        Ok(Some(v)) => Ok(v.try_into().ok()),
        Ok(None) | Err(pgrx::spi::SpiError::InvalidPosition) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The `(seq, hash)` of `tenant`'s last stored entry, if any.
fn last_entry(tenant: &str) -> SealResult<Option<(i64, Hash)>> {
    let r = Spi::get_two_with_args::<i64, Vec<u8>>(
        "SELECT seq, hash FROM pgseal.ledger WHERE tenant_id = $1 ORDER BY seq DESC LIMIT 1",
        &[tenant.into()],
    );
    match r {
        Ok((Some(seq), Some(hash))) => Ok(Some((
            seq,
            hash.try_into()
                .map_err(|_| SealError::Internal("stored hash is not 32 bytes"))?,
        ))),
        Ok(_) | Err(pgrx::spi::SpiError::InvalidPosition) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The head verification walks to: the latest of the tenant's last entry, its
/// heads row's (seq, hash) and the head its last appender published at commit
/// (`shared_heads`, kept since the server started). Either witness being later
/// than the last entry means entries after it are missing: a cut tail, which the
/// walk then reports as a gap. (The heads row lags the last entry by less than
/// `HEAD_STRIDE`; the published head does not lag.)
fn top(tenant: &str, head: &RecordedHead) -> SealResult<(i64, Hash)> {
    let mut top = match last_entry(tenant)? {
        Some(entry) if entry.0 >= head.seq => entry,
        _ => (head.seq, head.hash),
    };
    let key = super::shared_heads::ChainKey::new(crate::pg::head_read::relids()?.0, tenant);
    if let Some(p) = super::shared_heads::witness(&key) {
        // A head published after this transaction's snapshot was taken (under
        // REPEATABLE READ and SERIALIZABLE) is past what the snapshot sees without
        // any cut: it is a cut only if the latest snapshot does not hold that
        // very entry either.
        if p.seq > top.0 && crate::pg::head_read::entry_now(tenant, p.seq)? != Some(p.hash) {
            top = (p.seq, p.hash);
        }
    }
    Ok(top)
}

/// The head a checkpoint signs when this transaction has not appended to the
/// tenant: the later of its last entry and its heads row; `None` when it has
/// no heads row. Runs as the extension owner.
pub(super) fn recorded_head(tenant: &str) -> SealResult<Option<(i64, Hash)>> {
    match head_row(tenant)? {
        Some(head) => top(tenant, &head).map(Some),
        None => Ok(None),
    }
}

/// A walk that ended well must also have passed through the heads row's
/// (seq, hash) when its range covers it (and it is not the anchor's): an entry
/// replaced since the row was moved fails here.
fn through_heads_row(
    tenant: &str,
    head: &RecordedHead,
    from: i64,
    to: i64,
    mut report: Report,
) -> SealResult<Report> {
    let covered = head.seq > head.anchor_seq && from <= head.seq && head.seq <= to;
    if report.failure.is_none() && covered && hash_at(tenant, head.seq)? != Some(head.hash) {
        report.failure = Some(Failure {
            seq: head.seq,
            problem: Problem::HashMismatch,
        });
    }
    Ok(report)
}

/// The columns the batch query selects, in order.
const COLUMNS: usize = 13;
/// Of those, the ones that may be NULL: payload (an erased entry), db_role,
/// subjects, salt and commitment (absent in format 1, or erased).
const NULLABLE: [usize; 5] = [4, 9, 10, 11, 12];

/// The rows of the last SPI result, each deformed once into datums that borrow
/// from SPI's copy of the tuple. pgrx's per-field `get` walks the tuple again
/// for every field and copies every bytea; at a million entries a second that
/// was a quarter of the time.
struct RawRows {
    vals: *mut pg_sys::HeapTuple,
    tupdesc: pg_sys::TupleDesc,
    rows: usize,
}

/// A deformed row; its fields borrow from the result `'t` it came from.
struct RawRow<'t> {
    values: [pg_sys::Datum; COLUMNS],
    nulls: [bool; COLUMNS],
    _result: std::marker::PhantomData<&'t RawRows>,
}

impl RawRows {
    /// # Safety
    /// An SPI select must just have run on the open connection, returning `rows`
    /// rows, and the result must outlive every use of the returned rows.
    unsafe fn of_last_result(rows: usize) -> SealResult<RawRows> {
        // SAFETY: per the contract, SPI_tuptable is the last select's result (or
        // NULL when it returned no rows).
        let table = unsafe { pg_sys::SPI_tuptable.as_ref() };
        let (vals, tupdesc) = match table {
            Some(t) => (t.vals, t.tupdesc),
            None if rows == 0 => (std::ptr::null_mut(), std::ptr::null_mut()),
            None => return Err(SealError::Internal("no SPI result for ledger rows")),
        };
        // SAFETY: a non-NULL tupdesc of the result describes its columns.
        if !tupdesc.is_null() && unsafe { (*tupdesc).natts } as usize != COLUMNS {
            return Err(SealError::Internal("unexpected ledger row shape"));
        }
        Ok(RawRows {
            vals,
            tupdesc,
            rows,
        })
    }

    fn row(&self, i: usize) -> SealResult<RawRow<'_>> {
        assert!(i < self.rows, "row index out of range");
        let mut row = RawRow {
            values: [pg_sys::Datum::from(0usize); COLUMNS],
            nulls: [true; COLUMNS],
            _result: std::marker::PhantomData,
        };
        // SAFETY: `vals` holds `rows` tuples of `tupdesc`'s shape (checked to have
        // COLUMNS attributes), and `values`/`nulls` have room for all of them.
        unsafe {
            pg_sys::heap_deform_tuple(
                *self.vals.add(i),
                self.tupdesc,
                row.values.as_mut_ptr(),
                row.nulls.as_mut_ptr(),
            )
        };
        if row
            .nulls
            .iter()
            .enumerate()
            .any(|(i, &n)| n && !NULLABLE.contains(&i))
        {
            return Err(SealError::Internal(
                "NULL in a NOT NULL column of pgseal.ledger",
            ));
        }
        Ok(row)
    }
}

impl<'t> RawRow<'t> {
    /// A bigint or timestamptz column (both are 64-bit, passed by value).
    fn int8(&self, col: usize) -> i64 {
        self.values[col].value() as i64
    }

    /// A bytea or text column's bytes. Inline uncompressed values (all of a usual
    /// ledger row) are borrowed; a compressed or out-of-line value is detoasted into
    /// the SPI connection's memory context, which outlives the batch.
    fn bytes(&self, col: usize) -> &'t [u8] {
        // SAFETY: the column is a non-NULL varlena of a tuple that SPI keeps until the
        // connection closes, and a detoasted copy lives in the SPI connection's memory
        // context, which outlives the batch.
        unsafe { crate::pg::head_read::varlena_bytes(self.values[col]) }
    }

    fn text(&self, col: usize) -> SealResult<&'t str> {
        std::str::from_utf8(self.bytes(col))
            .map_err(|_| SealError::Internal("text in pgseal.ledger is not UTF-8"))
    }

    /// A smallint column.
    fn int2(&self, col: usize) -> i16 {
        self.values[col].value() as i16
    }

    /// A nullable bytea column's bytes.
    fn opt_bytes(&self, col: usize) -> Option<&'t [u8]> {
        (!self.nulls[col]).then(|| self.bytes(col))
    }

    /// A nullable jsonb column's RFC 8785 text, read from its binary form
    /// (`pg::jsonb::canonical`); where that fails (a number RFC 8785 would round),
    /// its `jsonb_out` text, which the verifier then refuses as a hash mismatch.
    fn opt_jsonb(&self, col: usize) -> Option<JsonbPayload> {
        if self.nulls[col] {
            return None;
        }
        let datum = self.values[col];
        // SAFETY: a non-NULL jsonb column of a tuple SPI keeps for the batch.
        let text = || unsafe { crate::pg::jsonb::text_of(datum) };
        Some(match crate::pg::jsonb::canonical(self.bytes(col), text) {
            Ok(c) => JsonbPayload::Canonical(c),
            Err(_) => JsonbPayload::Json(text()),
        })
    }

    /// A nullable text column.
    fn opt_text(&self, col: usize) -> SealResult<Option<&'t str>> {
        if self.nulls[col] {
            return Ok(None);
        }
        self.text(col).map(Some)
    }

    /// A nullable text[] column's elements (a NULL element is refused). An empty
    /// array, the usual value, is recognised from its header without pgrx's
    /// array conversion.
    fn text_array(&self, col: usize) -> SealResult<Option<Vec<String>>> {
        if self.nulls[col] {
            return Ok(None);
        }
        let body = self.bytes(col);
        // After the varlena header an array starts with its dimension count.
        if body.len() >= 4 && i32::from_ne_bytes([body[0], body[1], body[2], body[3]]) == 0 {
            return Ok(Some(Vec::new()));
        }
        // SAFETY: the column is a non-NULL text[] datum of a tuple SPI keeps until
        // the connection closes; the conversion copies every element out.
        let items = unsafe {
            <Vec<Option<String>> as pgrx::FromDatum>::from_datum(self.values[col], false)
        }
        .ok_or(SealError::Internal("unreadable subjects in pgseal.ledger"))?;
        items
            .into_iter()
            .collect::<Option<Vec<String>>>()
            .map(Some)
            .ok_or(SealError::Internal("NULL subject in pgseal.ledger"))
    }
}

/// A stored payload, owned, as `RawRow::opt_jsonb` read it.
enum JsonbPayload {
    Canonical(String),
    Json(String),
}

impl JsonbPayload {
    fn as_payload(&self) -> Payload<'_> {
        match self {
            JsonbPayload::Canonical(c) => Payload::Canonical(c),
            JsonbPayload::Json(t) => Payload::Json(t),
        }
    }
}

/// The report for a tenant with no heads row: either no entries, or entries
/// whose head row was removed.
fn headless(tenant: &str) -> SealResult<Report> {
    let any = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pgseal.ledger WHERE tenant_id = $1)",
        &[tenant.into()],
    )?
    .unwrap_or(false);
    Ok(failed(any.then_some(Failure {
        seq: 1,
        problem: Problem::Gap,
    })))
}

/// A report with nothing checked.
fn failed(failure: Option<Failure>) -> Report {
    Report {
        checked: 0,
        erased: 0,
        failure,
        last: None,
    }
}

/// The hash the first kept entry links to: the anchor, or the genesis hash.
fn anchor_prev(head: &RecordedHead) -> Hash {
    if head.anchor_seq == 0 {
        GENESIS
    } else {
        head.anchor_hash
    }
}

/// Checks the anchor against the evidence of the prune that set it: the newest
/// 'ledger.pruned' entry must name it (`anchor_seq`, `anchor_hash`). Only
/// `ledger_prune` writes an anchor and that entry, and pgseal's event names are
/// reserved, so an anchor written any other way names no prune and fails here.
fn anchor_failure(tenant: &str, head: &RecordedHead) -> SealResult<Option<Failure>> {
    if head.anchor_seq == 0 {
        return Ok(None);
    }
    let recorded = Spi::get_two_with_args::<i64, String>(
        "SELECT (l.payload OPERATOR(pg_catalog.->>) 'anchor_seq')::pg_catalog.int8, \
                l.payload OPERATOR(pg_catalog.->>) 'anchor_hash' \
         FROM pgseal.ledger l WHERE l.tenant_id = $1 AND l.seq > $2 AND l.event = 'ledger.pruned' \
         ORDER BY l.seq DESC LIMIT 1",
        &[tenant.into(), head.anchor_seq.into()],
    );
    let recorded = match recorded {
        Ok((Some(seq), Some(hash))) => Some((seq, hash)),
        Ok(_) | Err(pgrx::spi::SpiError::InvalidPosition) => None,
        Err(e) => return Err(e.into()),
    };
    let matches = recorded
        .is_some_and(|(seq, hash)| seq == head.anchor_seq && hash == hex::encode(head.anchor_hash));
    Ok((!matches).then_some(Failure {
        seq: head.anchor_seq,
        problem: Problem::AnchorMismatch,
    }))
}

/// Verifies `tenant`'s entries from `from_seq` to `to_seq` (both inclusive;
/// defaults: the first kept entry and the head). Runs as the extension owner.
pub fn verify_range(
    tenant: &str,
    from_seq: Option<i64>,
    to_seq: Option<i64>,
) -> SealResult<Report> {
    // Entries this transaction appended are verified too: written first, they
    // are in the table.
    super::writer::flush()?;
    as_owner(|| {
        let Some(head) = head_row(tenant)? else {
            return headless(tenant);
        };
        let top = top(tenant, &head)?;
        let first_kept = head.anchor_seq + 1;
        let from = from_seq.unwrap_or(first_kept).max(first_kept);
        let to = to_seq.unwrap_or(top.0).min(top.0);
        // A range that starts at the anchor trusts it: it must be a prune's.
        if from == first_kept {
            if let Some(f) = anchor_failure(tenant, &head)? {
                return Ok(failed(Some(f)));
            }
        }
        if from > to {
            return Ok(failed(None));
        }
        let prev = if from == first_kept {
            anchor_prev(&head)
        } else {
            match hash_at(tenant, from - 1)? {
                Some(h) => h,
                None => {
                    return Ok(failed(Some(Failure {
                        seq: from - 1,
                        problem: Problem::Gap,
                    })))
                }
            }
        };
        let expect_head = (to == top.0).then_some(top);
        let report = walk(tenant, from, prev, to, expect_head)?;
        through_heads_row(tenant, &head, from, to, report)
    })
}

/// Verifies the entries after a trusted `(seq, hash)` (the tenant's previous
/// checkpoint) up to `target`, which the chain must reach with exactly that hash.
/// When the trusted seq has been pruned since, verification starts at the anchor,
/// which must then be a prune's (and be the trusted hash, at the trusted seq).
pub fn verify_since(tenant: &str, trusted: (i64, Hash), target: (i64, Hash)) -> SealResult<Report> {
    super::writer::flush()?;
    as_owner(|| {
        let Some(head) = head_row(tenant)? else {
            return headless(tenant);
        };
        let (from, prev) = if trusted.0 > head.anchor_seq {
            (trusted.0 + 1, trusted.1)
        } else {
            if let Some(f) = anchor_failure(tenant, &head)? {
                return Ok(failed(Some(f)));
            }
            if trusted.0 == head.anchor_seq && trusted.1 != anchor_prev(&head) {
                return Ok(failed(Some(Failure {
                    seq: trusted.0,
                    problem: Problem::HashMismatch,
                })));
            }
            (head.anchor_seq + 1, anchor_prev(&head))
        };
        let top = top(tenant, &head)?;
        if target.0 > top.0 {
            return Ok(failed(Some(Failure {
                seq: top.0 + 1,
                problem: Problem::Gap,
            })));
        }
        let report = walk(tenant, from, prev, target.0, Some(target))?;
        through_heads_row(tenant, &head, from, target.0, report)
    })
}

/// Walks the stored entries `from..=to`, the first linking to `prev`, checking
/// each with the tenant's MAC key; `expect` is the (seq, hash) the walk must end on.
fn walk(
    tenant: &str,
    from: i64,
    prev: Hash,
    to: i64,
    expect: Option<(i64, Hash)>,
) -> SealResult<Report> {
    let mac = super::mac::key(tenant, false)?;
    if mac.is_none() {
        return Ok(failed(Some(Failure {
            seq: from,
            problem: Problem::MacMismatch,
        })));
    }
    let mut v = Verifier::new(from, prev, mac);
    // Batches of at most BATCH consecutive seqs: whatever plan the statistics
    // give (a never-analysed table gets a bitmap scan and a sort), a batch
    // sorts no more than BATCH rows. (One open cursor over the range was
    // planned that way too, and its sort spilled to disk.)
    let mut next = from;
    while next <= to {
        let end = next.saturating_add(BATCH).min(to.saturating_add(1));
        let more = plans::select_raw(
            BATCH_SQL,
            &[plans::TEXT, plans::INT8, plans::INT8],
            &[tenant.into(), next.into(), end.into()],
            |rows| {
                // SAFETY: select_raw calls us right after its select, with its row
                // count; the result stays SPI's current tuple table until we return.
                let table = unsafe { RawRows::of_last_result(rows) }?;
                for i in 0..rows {
                    let row = table.row(i)?;
                    let subjects = row.text_array(10)?;
                    let payload = row.opt_jsonb(4);
                    let entry = StoredEntry {
                        fmt: row.int2(8),
                        tenant,
                        seq: row.int8(0),
                        recorded_at_us: row.int8(1) + super::PG_EPOCH_OFFSET_US,
                        actor: row.text(2)?,
                        event: row.text(3)?,
                        payload: payload.as_ref().map(JsonbPayload::as_payload),
                        db_role: row.opt_text(9)?,
                        subjects: subjects.as_deref(),
                        salt: row.opt_bytes(11),
                        commitment: row.opt_bytes(12),
                        prev_hash: row.bytes(5),
                        hash: row.bytes(6),
                        mac: Some(row.bytes(7)),
                    };
                    if !v.push(&entry) {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?;
        if !more {
            break;
        }
        next = end;
    }
    Ok(v.finish(expect))
}

/// Verifies a range of a tenant's chain: hashes, MACs, links and seq continuity.
/// Without `tenant` it verifies the current tenant; members of `pgseal_admin` may
/// verify any tenant. `problem` is NULL when `ok`; `erased` counts the checked
/// entries whose payload `subject_erase` erased (verified by their commitment).
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)] // the SQL result's columns, spelled out for pgrx
fn ledger_verify(
    tenant: default!(Option<&str>, "NULL"),
    from_seq: default!(Option<i64>, "NULL"),
    to_seq: default!(Option<i64>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(checked, i64),
        name!(first_bad_seq, Option<i64>),
        name!(problem, Option<String>),
        name!(erased, i64),
    ),
> {
    let r = (|| {
        crate::master::require_loaded()?;
        let tenant = super::access::resolve_tenant(tenant)?;
        if from_seq.is_some_and(|s| s < 1) || to_seq.is_some_and(|s| s < 1) {
            return Err(SealError::InvalidArgument(
                "from_seq and to_seq must be positive",
            ));
        }
        verify_range(&tenant, from_seq, to_seq)
    })()
    .or_raise();
    TableIterator::once((
        r.ok(),
        r.checked,
        r.failure.map(|f| f.seq),
        r.failure.map(|f| f.problem.as_str().to_owned()),
        r.erased,
    ))
}
