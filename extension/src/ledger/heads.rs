//! Appending to a tenant's chain.
//!
//! The first append for a tenant in a transaction takes the tenant's
//! transaction-scoped advisory lock, then locks its row in `pgseal.ledger_heads`
//! (FOR UPDATE). Under READ COMMITTED the statement's snapshot is taken after the
//! lock, so it sees the last committed append. Under REPEATABLE READ and
//! SERIALIZABLE a snapshot older than another session's append makes the row lock
//! fail with 40001, a retryable error, instead of forking the chain.
//!
//! Later appends in the same transaction use the head kept here, so one append is
//! one hash, one MAC and one INSERT through a kept plan. The heads row is written
//! once, at pre-commit. A subtransaction abort releases locks taken inside it and
//! removes its entries, so it makes every head here re-lock and re-read before
//! the next use.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::datum::{DatumWithOid, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgseal_core::canonical::canonical_payload;
use pgseal_core::ledger::{entry_hash, EntryFields, EntryMac, Hash, GENESIS};

use crate::error::{SealError, SealResult};
use crate::plans;
use crate::privilege::as_owner;

struct Head {
    seq: i64,
    hash: Hash,
    mac: EntryMac,
    /// Appended in this transaction: the heads row needs writing at pre-commit.
    dirty: bool,
    /// A subtransaction aborted since the head was read: re-lock and re-read.
    stale: bool,
}

thread_local! {
    static HEADS: RefCell<HashMap<String, Head>> = RefCell::new(HashMap::new());
}

const SELECT_HEAD: &str =
    "SELECT seq, hash FROM pgseal.ledger_heads WHERE tenant_id = $1 FOR UPDATE";
const INSERT_HEAD: &str =
    "INSERT INTO pgseal.ledger_heads (tenant_id, seq, hash) VALUES ($1, 0, $2) ON CONFLICT (tenant_id) DO NOTHING";
const INSERT_ENTRY: &str = "INSERT INTO pgseal.ledger (tenant_id, seq, recorded_at, actor, event, payload, prev_hash, hash, mac) \
     VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9)";
const UPDATE_HEAD: &str =
    "UPDATE pgseal.ledger_heads SET seq = $2, hash = $3 WHERE tenant_id = $1 AND seq <= $2";

fn select_head(tenant: &str) -> SealResult<Option<(i64, Hash)>> {
    plans::first_row(SELECT_HEAD, &[plans::TEXT], &[tenant.into()], |r| {
        let seq = r.get::<i64>(1)?.unwrap_or(0);
        let hash = r.get::<Vec<u8>>(2)?.unwrap_or_default();
        Ok((seq, to_hash(&hash)?))
    })
}

/// Locks the tenant's chain and returns the head after which to append. With
/// `reload` (after a subtransaction abort), entries this transaction appended
/// earlier lie past the committed head and are found in the table.
fn lock_and_load(tenant: &str, reload: bool) -> SealResult<(i64, Hash)> {
    advisory_xact_lock(tenant);
    let head = match select_head(tenant)? {
        Some(h) => h,
        None => {
            // The tenant's first entry. ON CONFLICT DO NOTHING raises 40001 under
            // REPEATABLE READ when a concurrent first append committed after our snapshot.
            plans::run(
                INSERT_HEAD,
                &[plans::TEXT, plans::BYTEA],
                &[tenant.into(), GENESIS.to_vec().into()],
            )?;
            select_head(tenant)?.ok_or(SealError::Internal("pgseal.ledger_heads row vanished"))?
        }
    };
    if reload {
        return Ok(own_tail_after(tenant, head.0)?.unwrap_or(head));
    }
    Ok(head)
}

unsafe extern "C-unwind" {
    /// PostgreSQL's V1 function behind `pg_advisory_xact_lock(bigint)`; declared here
    /// because pgrx's binding is a Rust wrapper, not a function pointer.
    fn pg_advisory_xact_lock_int8(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum;
}

/// Takes the tenant's transaction-scoped advisory lock (as `pg_advisory_xact_lock`
/// would), keyed by the first 8 bytes of SHA-256("pgseal.ledger:" || tenant). Called
/// directly rather than through SQL because every appending transaction takes it.
fn advisory_xact_lock(tenant: &str) {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"pgseal.ledger:")
        .chain_update(tenant.as_bytes())
        .finalize();
    let key = i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    // SAFETY: pg_advisory_xact_lock_int8 is a V1 SQL function taking one int8 and
    // returning void; DirectFunctionCall1Coll builds its call frame. It may wait,
    // or raise (deadlock, cancel), which pgrx's guard turns into a Rust panic that
    // propagates as the PostgreSQL ERROR.
    unsafe {
        pg_sys::DirectFunctionCall1Coll(
            Some(pg_advisory_xact_lock_int8),
            pg_sys::InvalidOid,
            pg_sys::Datum::from(key),
        );
    }
}

fn to_hash(bytes: &[u8]) -> SealResult<Hash> {
    bytes
        .try_into()
        .map_err(|_| SealError::Internal("stored hash is not 32 bytes"))
}

/// Appends one entry for `tenant`; `payload` is JSON text (checked and made
/// canonical here). Returns the new seq and hash. The caller has checked the
/// tenant and the transaction's read-write state.
pub fn append(tenant: &str, event: &str, payload: &str, actor: &str) -> SealResult<(i64, Hash)> {
    if event.is_empty() {
        return Err(SealError::InvalidArgument("event must not be empty"));
    }
    let payload = canonical_payload(payload)?;
    // SAFETY: the transaction start timestamp is set for every transaction;
    // reading it has no preconditions.
    let at = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    as_owner(|| {
        let state = HEADS.with(|h| h.borrow().get(tenant).map(|x| x.stale));
        if state != Some(false) {
            let reload = state.is_some();
            let (seq, hash) = lock_and_load(tenant, reload)?;
            // After a subtransaction abort the key itself may have been rolled
            // back, so it is looked up again too.
            let mac = super::mac_for_append(tenant)?;
            HEADS.with(|h| {
                h.borrow_mut().insert(
                    tenant.to_owned(),
                    Head {
                        seq,
                        hash,
                        mac,
                        dirty: true,
                        stale: false,
                    },
                )
            });
        }
        let (seq, prev, mac) = HEADS.with(|h| {
            let h = h.borrow();
            let head = &h[tenant];
            (head.seq + 1, head.hash, head.mac.clone())
        });
        let fields = EntryFields {
            prev_hash: &prev,
            tenant,
            seq,
            recorded_at_us: at + super::PG_EPOCH_OFFSET_US,
            actor,
            event,
            payload: &payload,
        };
        let hash = entry_hash(&fields);
        let tag = mac.sign(&hash);
        let recorded_at = TimestampWithTimeZone::try_from(at)
            .map_err(|_| SealError::Internal("transaction timestamp out of range"))?;
        let args: [DatumWithOid; 9] = [
            tenant.into(),
            seq.into(),
            recorded_at.into(),
            actor.into(),
            event.into(),
            payload.as_str().into(),
            prev.to_vec().into(),
            hash.to_vec().into(),
            tag.to_vec().into(),
        ];
        plans::run(
            INSERT_ENTRY,
            &[
                plans::TEXT,
                plans::INT8,
                plans::TIMESTAMPTZ,
                plans::TEXT,
                plans::TEXT,
                plans::TEXT,
                plans::BYTEA,
                plans::BYTEA,
                plans::BYTEA,
            ],
            &args,
        )?;
        HEADS.with(|h| {
            let mut h = h.borrow_mut();
            let head = h.get_mut(tenant).expect("head loaded above");
            head.seq = seq;
            head.hash = hash;
            head.dirty = true;
        });
        Ok((seq, hash))
    })
}

/// Writes every head this transaction moved. Runs at pre-commit, with a snapshot.
pub fn flush() -> SealResult<()> {
    let dirty: Vec<String> = HEADS.with(|h| {
        h.borrow()
            .iter()
            .filter(|(_, v)| v.dirty)
            .map(|(k, _)| k.clone())
            .collect()
    });
    if dirty.is_empty() {
        return Ok(());
    }
    as_owner(|| {
        for tenant in dirty {
            let stale = HEADS.with(|h| h.borrow()[&tenant].stale);
            let (seq, hash) = if stale {
                lock_and_load(&tenant, true)?
            } else {
                HEADS.with(|h| {
                    let h = h.borrow();
                    (h[&tenant].seq, h[&tenant].hash)
                })
            };
            plans::run(
                UPDATE_HEAD,
                &[plans::TEXT, plans::INT8, plans::BYTEA],
                &[tenant.as_str().into(), seq.into(), hash.to_vec().into()],
            )?;
        }
        Ok(())
    })
}

/// Marks every head as needing a reload (a subtransaction aborted).
pub fn mark_stale() {
    HEADS.with(|h| h.borrow_mut().values_mut().for_each(|v| v.stale = true));
}

/// Forgets every head (the transaction ended).
pub fn reset() {
    HEADS.with(|h| h.borrow_mut().clear());
}

/// Sets a tenant's anchor after pruning, with the head `(seq, hash)` the caller
/// locked (it may be past the committed one); the caller holds the tenant's lock.
pub fn set_anchor(
    tenant: &str,
    head: (i64, Hash),
    anchor_seq: i64,
    anchor_hash: &Hash,
) -> SealResult<()> {
    as_owner(|| {
        Spi::run_with_args(
            "UPDATE pgseal.ledger_heads SET seq = $4, hash = $5, anchor_seq = $2, anchor_hash = $3 WHERE tenant_id = $1",
            &[tenant.into(), anchor_seq.into(), anchor_hash.to_vec().into(), head.0.into(), head.1.to_vec().into()],
        )?;
        Ok(())
    })
}

/// Locks the tenant's chain for the rest of the transaction and returns its head.
pub fn lock(tenant: &str) -> SealResult<(i64, Hash)> {
    let reload = HEADS.with(|h| h.borrow().contains_key(tenant));
    as_owner(|| lock_and_load(tenant, reload))
}

pub fn has_dirty() -> bool {
    HEADS.with(|h| h.borrow().values().any(|v| v.dirty))
}

/// The head of `tenant`'s chain including this transaction's own appends, when
/// it appended: kept in memory, or re-read after a subtransaction abort.
pub fn own_head(tenant: &str, committed_seq: i64) -> SealResult<Option<(i64, Hash)>> {
    match HEADS.with(|h| h.borrow().get(tenant).map(|v| (v.stale, v.seq, v.hash))) {
        None => Ok(None),
        Some((false, seq, hash)) => Ok(Some((seq, hash))),
        Some((true, _, _)) => own_tail_after(tenant, committed_seq),
    }
}

/// The newest entry past `seq` that this transaction can see (its own appends).
pub fn own_tail_after(tenant: &str, seq: i64) -> SealResult<Option<(i64, Hash)>> {
    match Spi::get_two_with_args::<i64, Vec<u8>>(
        "SELECT seq, hash FROM pgseal.ledger WHERE tenant_id = $1 AND seq > $2 ORDER BY seq DESC LIMIT 1",
        &[tenant.into(), seq.into()],
    ) {
        Ok((Some(s), Some(h))) => Ok(Some((s, to_hash(&h)?))),
        Ok(_) | Err(pgrx::spi::SpiError::InvalidPosition) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
