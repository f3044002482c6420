//! Appending to a tenant's chain.
//!
//! The first append for a tenant in a transaction takes the tenant's
//! transaction-scoped chain lock (`locks.rs`), then reads its row in `pgseal.ledger_heads`.
//! Under READ COMMITTED the row is read directly (`head_read`) under a snapshot
//! taken after the lock, so it sees the last committed append: every writer of the
//! row holds the lock until it commits. Under REPEATABLE READ and SERIALIZABLE the
//! row is locked (FOR UPDATE), and a snapshot older than another session's append
//! makes that fail with 40001, a retryable error, instead of forking the chain.
//!
//! Later appends in the same transaction use the head kept here, so one append is
//! one payload commitment, one hash and one MAC (format 2, docs/FORMAT.md: the
//! payload is hashed once, inside its commitment, under a fresh 32-byte salt from
//! the backend's ChaCha20 generator). Entries are written in batches: an append
//! adds its entry to a pending list, and one statement inserts the list and moves
//! the heads rows to its last entries. That write runs when the statement that
//! appended ends (the executor-end hook in `txn.rs`), when the list grows past a
//! bound, before the ledger functions read the chain, and at pre-commit. So the
//! next statement of the transaction sees every entry appended before it. A single
//! entry whose heads row was read directly is written without SPI, with the
//! executor's one-row insert and update (`head_write`).
//!
//! A subtransaction abort drops the pending entries appended inside it (the
//! entries it wrote are rolled back by PostgreSQL, with the heads rows), and makes
//! every head here re-lock and re-read before its next use.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::datum::{DatumWithOid, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgseal_core::canonical::canonical_payload;
use pgseal_core::ledger::{
    entry_hash_v2, fresh_salt, payload_commitment, EntryFieldsV2, EntryMac, Hash, Salt, GENESIS,
};

use super::guard::Scope;
use super::head_read::{HeadRow, Loaded};
use crate::error::{SealError, SealResult};
use crate::plans;
use crate::privilege::as_owner;

struct Head {
    seq: i64,
    hash: Hash,
    mac: EntryMac,
    /// The committed head, as this transaction first read it.
    committed: (i64, Hash),
    /// A subtransaction aborted since the head was read: re-lock and re-read.
    stale: bool,
    /// Where the tenant's heads row is, when known: the row can then be moved
    /// without SPI (`head_write`). Forgotten whenever SPI or an abort moves it.
    row: Option<HeadRow>,
}

/// An entry appended but not yet inserted.
pub(super) struct Pending {
    /// The subtransaction that appended it: dropped if that one aborts.
    subxact: pg_sys::SubTransactionId,
    pub(super) tenant: String,
    pub(super) seq: i64,
    pub(super) recorded_at: TimestampWithTimeZone,
    pub(super) actor: String,
    /// The database role that appended it.
    pub(super) db_role: String,
    pub(super) event: String,
    /// Data-subject ids (none yet on any append path).
    pub(super) subjects: Vec<String>,
    /// Canonical JSON text.
    pub(super) payload: String,
    pub(super) salt: Salt,
    pub(super) prev: Hash,
    pub(super) hash: Hash,
    pub(super) mac: [u8; 32],
}

impl Pending {
    /// Roughly the memory it holds.
    fn size(&self) -> usize {
        self.tenant.len()
            + self.actor.len()
            + self.db_role.len()
            + self.subjects.iter().map(String::len).sum::<usize>()
            + self.event.len()
            + self.payload.len()
            + std::mem::size_of::<Self>()
    }
}

/// Pending entries are written once this many have gathered, or this many bytes.
const PENDING_MAX: usize = 1000;
const PENDING_MAX_BYTES: usize = 1 << 20;

thread_local! {
    static HEADS: RefCell<HashMap<String, Head>> = RefCell::new(HashMap::new());
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
    static PENDING_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Under REPEATABLE READ and SERIALIZABLE the heads row is locked, so that a
/// snapshot older than the last append fails with 40001 instead of forking.
const SELECT_HEAD_LOCKED: &str =
    "SELECT seq, hash FROM pgseal.ledger_heads WHERE tenant_id = $1 FOR UPDATE";
const INSERT_HEAD: &str =
    "INSERT INTO pgseal.ledger_heads (tenant_id, seq, hash) VALUES ($1, 0, $2) ON CONFLICT (tenant_id) DO NOTHING";
/// Inserts one tenant's pending entries and moves its heads row to the last, in
/// one statement (a data-modifying WITH always runs). With one entry, and with
/// several (as arrays, unnested in lockstep in the select list, which streams the
/// rows where `ROWS FROM` would first copy them into a tuplestore). Every entry of
/// a transaction has the same `recorded_at`, the transaction's start. Entries are
/// format 2 (`fmt` 2), with no stored commitment (it is recomputed from the salt
/// and payload when verifying). In a batch each entry's subjects are passed as the
/// text of a `text[]` literal (an array of arrays must be rectangular).
const WRITE_ONE: &str = "WITH e AS (\
       INSERT INTO pgseal.ledger (tenant_id, seq, recorded_at, actor, event, payload, prev_hash, hash, mac, fmt, db_role, subjects, salt) \
       VALUES ($1, $2, $3, $4, $5, $6::pg_catalog.jsonb, $7, $8, $9, 2, $10, $11, $12)) \
     UPDATE pgseal.ledger_heads SET seq = $2, hash = $8 WHERE tenant_id = $1 AND seq <= $2";
const WRITE_MANY: &str = "WITH e AS (\
       INSERT INTO pgseal.ledger (tenant_id, seq, recorded_at, actor, event, payload, prev_hash, hash, mac, fmt, db_role, subjects, salt) \
       SELECT $1, pg_catalog.unnest($2::pg_catalog.int8[]), $3, pg_catalog.unnest($4::pg_catalog.text[]), \
              pg_catalog.unnest($5::pg_catalog.text[]), pg_catalog.unnest($6::pg_catalog.text[])::pg_catalog.jsonb, \
              pg_catalog.unnest($7::pg_catalog.bytea[]), pg_catalog.unnest($8::pg_catalog.bytea[]), pg_catalog.unnest($9::pg_catalog.bytea[]), \
              2, pg_catalog.unnest($12::pg_catalog.text[]), pg_catalog.unnest($13::pg_catalog.text[])::pg_catalog.text[], \
              pg_catalog.unnest($14::pg_catalog.bytea[])) \
     UPDATE pgseal.ledger_heads SET seq = $10, hash = $11 WHERE tenant_id = $1 AND seq <= $10";

/// `subjects` as the text of a `text[]` literal, every element quoted.
pub(crate) fn text_array_literal(subjects: &[String]) -> String {
    let mut out = String::from("{");
    for (i, s) in subjects.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in s.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

fn select_head(tenant: &str) -> SealResult<Option<Loaded>> {
    // SAFETY: XactIsoLevel is a plain global set at transaction start; reading it
    // has no preconditions.
    let snapshot_per_xact = unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32;
    if !snapshot_per_xact {
        // Under READ COMMITTED a snapshot taken after the chain lock sees the
        // last committed head (every writer of the row holds that lock until it
        // commits), so the row is read directly and not locked: that spares SPI's
        // planner and executor, and a row lock's WAL record and dirtied page.
        return super::head_read::read(tenant);
    }
    plans::first_row(SELECT_HEAD_LOCKED, &[plans::TEXT], &[tenant.into()], |r| {
        let seq = r.get::<i64>(1)?.unwrap_or(0);
        let hash = r.get::<Vec<u8>>(2)?.unwrap_or_default();
        Ok(((seq, to_hash(&hash)?), None))
    })
}

/// Locks the tenant's chain and returns the head after which to append: the later
/// of the heads row (every write of pending entries moves it, so it includes
/// this transaction's written entries) and this transaction's last pending entry.
/// This level's pending entries are written first, so that no write can happen
/// between reading the row and reading the pending list (the queries below end
/// in the executor-end hook, which writes pending entries of the current level).
fn lock_and_load(tenant: &str) -> SealResult<Loaded> {
    flush()?;
    crate::locks::ledger_tenant(tenant);
    let (head, row) = match select_head(tenant)? {
        Some(h) => h,
        None => {
            // The tenant's first entry. ON CONFLICT DO NOTHING raises 40001 under
            // REPEATABLE READ when a concurrent first append committed after our snapshot.
            super::guard::with_scope(Scope::Append, || {
                plans::run(
                    INSERT_HEAD,
                    &[plans::TEXT, plans::BYTEA],
                    &[tenant.into(), GENESIS.to_vec().into()],
                )
            })?;
            select_head(tenant)?.ok_or(SealError::Internal("pgseal.ledger_heads row vanished"))?
        }
    };
    let head = match pending_tail(tenant) {
        Some(p) if p.0 > head.0 => p,
        _ => head,
    };
    Ok((head, row))
}

/// This transaction's last pending entry for `tenant`.
fn pending_tail(tenant: &str) -> Option<(i64, Hash)> {
    PENDING.with(|p| {
        p.borrow()
            .iter()
            .rev()
            .find(|e| e.tenant == tenant)
            .map(|e| (e.seq, e.hash))
    })
}

fn to_hash(bytes: &[u8]) -> SealResult<Hash> {
    bytes
        .try_into()
        .map_err(|_| SealError::Internal("stored hash is not 32 bytes"))
}

/// Appends one entry for `tenant`, recording the calling session's role
/// (`super::db_role`) as its `db_role`; see `append_with_role`.
pub fn append(tenant: &str, event: &str, payload: &str, actor: &str) -> SealResult<(i64, Hash)> {
    append_with_role(tenant, event, payload, actor, &super::db_role())
}

/// Appends one entry for `tenant` on behalf of the database role `db_role`;
/// `payload` is JSON text (checked and made canonical here). Returns the new seq
/// and hash. The caller has checked the tenant and the transaction's read-write
/// state, and vouches for `db_role` (only pgseal's own code calls this: the SQL
/// functions go through `append`). The entry is written with the next batch (see
/// the module notes).
pub fn append_with_role(
    tenant: &str,
    event: &str,
    payload: &str,
    actor: &str,
    db_role: &str,
) -> SealResult<(i64, Hash)> {
    if event.is_empty() {
        return Err(SealError::InvalidArgument("event must not be empty"));
    }
    if tenant == super::evidence::AUDIT_CHAIN && !crate::audit_worker::is_writer() {
        return Err(SealError::Forbidden(
            "only the pgseal audit writer appends to its own chain",
        ));
    }
    let payload = canonical_payload(payload)?;
    // SAFETY: the transaction start timestamp is set for every transaction;
    // reading it has no preconditions.
    let at = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let recorded_at = TimestampWithTimeZone::try_from(at)
        .map_err(|_| SealError::Internal("transaction timestamp out of range"))?;
    let state = HEADS.with(|h| h.borrow().get(tenant).map(|x| x.stale));
    if state != Some(false) {
        let ((seq, hash), row) = as_owner(|| lock_and_load(tenant))?;
        // After a subtransaction abort the key itself may have been rolled back,
        // so it is looked up again too.
        let mac = super::mac_for_append(tenant)?;
        HEADS.with(|h| {
            let mut h = h.borrow_mut();
            let committed = h.get(tenant).map_or((seq, hash), |old| old.committed);
            h.insert(
                tenant.to_owned(),
                Head {
                    seq,
                    hash,
                    mac,
                    committed,
                    stale: false,
                    row,
                },
            )
        });
    }
    let (seq, prev, mac) = HEADS.with(|h| {
        let h = h.borrow();
        let head = &h[tenant];
        (head.seq + 1, head.hash, head.mac.clone())
    });
    let salt = fresh_salt();
    let subjects: Vec<String> = Vec::new();
    let commitment = payload_commitment(&salt, &payload);
    let hash = entry_hash_v2(&EntryFieldsV2 {
        prev_hash: &prev,
        tenant,
        seq,
        recorded_at_us: at + super::PG_EPOCH_OFFSET_US,
        actor,
        db_role,
        event,
        subjects: &subjects,
        commitment: &commitment,
    });
    let tag = mac.sign(&hash);
    HEADS.with(|h| {
        let mut h = h.borrow_mut();
        let head = h.get_mut(tenant).expect("head loaded above");
        head.seq = seq;
        head.hash = hash;
    });
    let entry = Pending {
        // SAFETY: reads the current subtransaction's id; no preconditions.
        subxact: unsafe { pg_sys::GetCurrentSubTransactionId() },
        tenant: tenant.to_owned(),
        seq,
        recorded_at,
        actor: actor.to_owned(),
        db_role: db_role.to_owned(),
        event: event.to_owned(),
        subjects,
        payload,
        salt,
        prev,
        hash,
        mac: tag,
    };
    let bytes = entry.size();
    PENDING.with(|p| p.borrow_mut().push(entry));
    let total = PENDING_BYTES.with(|b| {
        b.set(b.get() + bytes);
        b.get()
    });
    if total >= PENDING_MAX_BYTES || PENDING.with(|p| p.borrow().len()) >= PENDING_MAX {
        flush()?;
    }
    Ok((seq, hash))
}

/// Whether appended entries wait to be written.
pub fn has_pending() -> bool {
    PENDING.with(|p| !p.borrow().is_empty())
}

/// Writes the pending entries, and moves each tenant's heads row to its last
/// one: one statement per tenant. Needs a snapshot (SPI plans it).
///
/// Only the entries of the current subtransaction are written (those of
/// finished inner ones were handed to it): an entry written inside a deeper
/// subtransaction would vanish if that one rolled back, although the statement
/// that appended it did not fail. Entries of outer levels wait for their level.
pub fn flush() -> SealResult<()> {
    // SAFETY: reads the current subtransaction's id; no preconditions.
    let current = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let pending = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let (mine, outer): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut *p)
            .into_iter()
            .partition(|e| e.subxact >= current);
        *p = outer;
        mine
    });
    PENDING_BYTES.with(|b| b.set(PENDING.with(|p| p.borrow().iter().map(Pending::size).sum())));
    if pending.is_empty() {
        return Ok(());
    }
    // Group by tenant, in order of first appearance; a tenant's entries stay in order.
    let mut groups: Vec<Vec<Pending>> = Vec::new();
    for e in pending {
        match groups.iter_mut().find(|g| g[0].tenant == e.tenant) {
            Some(g) => g.push(e),
            None => groups.push(vec![e]),
        }
    }
    as_owner(|| {
        super::guard::with_scope(Scope::Append, || {
            groups.into_iter().try_for_each(write_group)
        })
    })
}

/// Where `tenant`'s heads row is, if known; forgotten by `take`, since the write
/// about to happen moves it.
fn take_head_row(tenant: &str) -> Option<HeadRow> {
    HEADS.with(|h| h.borrow_mut().get_mut(tenant).and_then(|v| v.row.take()))
}

fn write_group(mut entries: Vec<Pending>) -> SealResult<()> {
    use plans::{BYTEA, BYTEA_ARRAY, INT8, INT8_ARRAY, TEXT, TEXT_ARRAY, TIMESTAMPTZ};
    let row = take_head_row(&entries[0].tenant);
    if entries.len() == 1 {
        if let Some(mut row) = row {
            if super::head_write::write_one(&entries[0], &mut row)? {
                let tenant = &entries[0].tenant;
                HEADS.with(|h| {
                    if let Some(v) = h.borrow_mut().get_mut(tenant) {
                        v.row = Some(row);
                    }
                });
                return Ok(());
            }
        }
        let e = entries.pop().expect("one entry");
        let args: [DatumWithOid; 12] = [
            e.tenant.into(),
            e.seq.into(),
            e.recorded_at.into(),
            e.actor.into(),
            e.event.into(),
            e.payload.into(),
            e.prev.to_vec().into(),
            e.hash.to_vec().into(),
            e.mac.to_vec().into(),
            e.db_role.into(),
            e.subjects.into(),
            e.salt.to_vec().into(),
        ];
        return plans::run(
            WRITE_ONE,
            &[
                TEXT,
                INT8,
                TIMESTAMPTZ,
                TEXT,
                TEXT,
                TEXT,
                BYTEA,
                BYTEA,
                BYTEA,
                TEXT,
                TEXT_ARRAY,
                BYTEA,
            ],
            &args,
        );
    }
    let n = entries.len();
    let tenant = entries[0].tenant.clone();
    let (last_seq, last_hash) = entries
        .last()
        .map(|e| (e.seq, e.hash.to_vec()))
        .expect("entries");
    let recorded_at = entries[0].recorded_at;
    if entries.iter().any(|e| e.recorded_at != recorded_at) {
        return Err(SealError::Internal(
            "pending entries of one transaction differ in time",
        ));
    }
    let prevs = plans::bytea32_array(entries.iter().map(|e| &e.prev));
    let hashes = plans::bytea32_array(entries.iter().map(|e| &e.hash));
    let macs = plans::bytea32_array(entries.iter().map(|e| &e.mac));
    let salts = plans::bytea32_array(entries.iter().map(|e| &e.salt));
    let mut seqs = Vec::with_capacity(n);
    let mut actors = Vec::with_capacity(n);
    let mut events = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut roles = Vec::with_capacity(n);
    let mut subjects = Vec::with_capacity(n);
    for e in entries {
        seqs.push(e.seq);
        actors.push(e.actor);
        events.push(e.event);
        payloads.push(e.payload);
        roles.push(e.db_role);
        subjects.push(text_array_literal(&e.subjects));
    }
    let args: [DatumWithOid; 14] = [
        tenant.into(),
        seqs.into(),
        recorded_at.into(),
        actors.into(),
        events.into(),
        payloads.into(),
        prevs,
        hashes,
        macs,
        last_seq.into(),
        last_hash.into(),
        roles.into(),
        subjects.into(),
        salts,
    ];
    plans::run(
        WRITE_MANY,
        &[
            TEXT,
            INT8_ARRAY,
            TIMESTAMPTZ,
            TEXT_ARRAY,
            TEXT_ARRAY,
            TEXT_ARRAY,
            BYTEA_ARRAY,
            BYTEA_ARRAY,
            BYTEA_ARRAY,
            INT8,
            BYTEA,
            TEXT_ARRAY,
            TEXT_ARRAY,
            BYTEA_ARRAY,
        ],
        &args,
    )
}

/// A subtransaction committed: its pending entries now belong to its parent.
pub fn subtransaction_committed(
    subxact: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
) {
    PENDING.with(|p| {
        p.borrow_mut()
            .iter_mut()
            .filter(|e| e.subxact == subxact)
            .for_each(|e| e.subxact = parent)
    });
}

/// A subtransaction aborted: its pending entries go, and every head is re-read
/// (and re-locked) before its next use.
pub fn subtransaction_aborted(subxact: pg_sys::SubTransactionId) {
    // Subtransaction ids grow, and an aborting subtransaction's open children
    // abort first, so the entries of `subxact` and its children are those >= it.
    PENDING.with(|p| p.borrow_mut().retain(|e| e.subxact < subxact));
    PENDING_BYTES.with(|b| b.set(PENDING.with(|p| p.borrow().iter().map(Pending::size).sum())));
    // The heads rows may have moved back: their places are forgotten too.
    HEADS.with(|h| {
        h.borrow_mut().values_mut().for_each(|v| {
            v.stale = true;
            v.row = None;
        })
    });
}

/// Forgets every head and pending entry (the transaction ended).
pub fn reset() {
    super::head_read::forget_relids();
    super::guard::reset();
    HEADS.with(|h| h.borrow_mut().clear());
    PENDING.with(|p| p.borrow_mut().clear());
    PENDING_BYTES.with(|b| b.set(0));
}

/// Sets a tenant's anchor after pruning, with the head `(seq, hash)` the caller
/// locked (it may be past the committed one); the caller holds the tenant's lock.
pub fn set_anchor(
    tenant: &str,
    head: (i64, Hash),
    anchor_seq: i64,
    anchor_hash: &Hash,
) -> SealResult<()> {
    take_head_row(tenant);
    as_owner(|| {
        super::guard::with_scope(Scope::Prune, || {
            Spi::run_with_args(
                "UPDATE pgseal.ledger_heads SET seq = $4, hash = $5, anchor_seq = $2, anchor_hash = $3 WHERE tenant_id = $1",
                &[tenant.into(), anchor_seq.into(), anchor_hash.to_vec().into(), head.0.into(), head.1.to_vec().into()],
            )
        })?;
        Ok(())
    })
}

/// Locks the tenant's chain for the rest of the transaction and returns its head,
/// with this transaction's entries written first.
pub fn lock(tenant: &str) -> SealResult<(i64, Hash)> {
    flush()?;
    as_owner(|| lock_and_load(tenant)).map(|(head, _)| head)
}

/// The committed head of a tenant this transaction appended to, as it was read
/// before the first append; `None` when this transaction has not appended.
pub fn committed_head(tenant: &str) -> Option<(i64, Hash)> {
    HEADS.with(|h| h.borrow().get(tenant).map(|v| v.committed))
}
