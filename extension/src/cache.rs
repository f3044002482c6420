//! Per-backend cache of unwrapped tenant keys, bounded by `pgseal.key_cache_size`.
//!
//! A shared-memory epoch invalidates every backend's cache: rotation and shredding
//! bump it when their transaction commits, and each cache use first compares it.
//! So a shredded key stops working in every session, including those that had it
//! cached.
//!
//! Its transaction-end work (`TXN`, registered with `txn`):
//! - every seal counts at once in its key's shared total (`enc_counts`), whether the
//!   transaction commits or not; at pre-commit the keys this transaction sealed with
//!   have their totals written back to `pgseal.tenant_keys.encryptions`;
//! - a transaction that rotated or shredded keys bumps the epoch after it commits,
//!   and cannot be prepared;
//! - a transaction or subtransaction that wrote keys and then aborted empties this
//!   backend's cache, so no key that was rolled back can ever be used again;
//! - on Citus, where `pgseal.tenant_keys` is a reference table changed through any
//!   node (docs/SCALING.md), a transaction that read keys empties the cache when it
//!   ends: a rotation or shred on another node cannot bump this node's epoch;
//! - on a hot standby, where a shred or rotation arrives by WAL replay and bumps no
//!   epoch, every transaction empties the cache when it ends;
//! - a transaction that read a key through a snapshot that may predate a shred
//!   (in parallel mode; `keystore::select_one` otherwise reads keys as committed
//!   now, whatever the isolation level) empties the cache when it ends: the
//!   shred's epoch bump may have come before the read, and nothing would clear it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use aes_gcm::Aes256Gcm;
use pgrx::prelude::*;
use pgrx::PgAtomic;
use pgseal_core::keys::Locked;
use pgseal_core::wrap::Purpose;

use crate::error::{SealError, SealResult};
use crate::gucs;
use crate::keystore::{self, KeyState};
use crate::txn::{End, Participant, Phase, PreCommit};

// SAFETY: the name is unique to pgseal; pg_shmem_init! in _PG_init sets it up.
pub static EPOCH: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pgseal_key_epoch") };

/// An unwrapped key, ready to use. Its expanded key lives in locked memory that is
/// left out of core dumps and wiped when the last reference goes.
pub struct LiveKey {
    pub key_id: String,
    pub tenant: String,
    pub purpose: Purpose,
    pub cipher: Locked<Aes256Gcm>,
}

struct ActiveEntry {
    key: Rc<LiveKey>,
    encryptions: i64,
}

#[derive(Default)]
struct Cache {
    epoch: u64,
    by_id: HashMap<String, Rc<LiveKey>>,
    active: HashMap<(String, &'static str), ActiveEntry>,
    /// The key `key_by_id` returned last: a scan over one tenant's values asks for
    /// the same key every row, and a string compare is cheaper than a hash probe.
    last: Option<Rc<LiveKey>>,
}

impl Cache {
    fn clear(&mut self) {
        self.by_id.clear();
        self.active.clear();
        self.last = None;
    }
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
    /// Seals per key in the running transaction, to write back at pre-commit.
    static SEALS: RefCell<HashMap<String, i64>> = RefCell::new(HashMap::new());
    static EXIT_HOOK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Whether this transaction cached a key for itself only (`remember`): on a
    /// hot standby.
    static CACHED_FOR_TRANSACTION: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The cache's transaction-end work (see the module notes).
pub const TXN: Participant = Participant {
    pre_commit: &[PreCommit {
        phase: Phase::SealCounts,
        has_work: has_seals,
        run: write_seal_counts,
    }],
    before_prepare: Some(refuse_prepare_after_key_changes),
    end: Some(transaction_ended),
    released: Some(hand_over_seal_counts),
    subxact_aborted: Some(subtransaction_aborted),
    ..Participant::NONE
};

thread_local! {
    /// A Citus worker's seal counts of the ending transaction, for its audit writer
    /// once the transaction's commit is complete (`hand_over_seal_counts`).
    static COUNTS_AFTER_COMMIT: RefCell<Option<(Vec<String>, Vec<i64>)>> = const { RefCell::new(None) };
    /// Whether the ending transaction, prepared on a Citus worker, left its counts
    /// in the node's outbox table for the audit writer (`write_seal_counts`).
    static COUNTS_IN_OUTBOX: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Hands a Citus worker's seal counts to its audit writer once the transaction's
/// end is complete: for a transaction this node commits, after Citus's `COMMIT
/// PREPARED` to the other nodes, which Citus sends after pgseal's own transaction
/// callbacks. Counts handed over earlier could reach the coordinator before a key
/// the transaction created was committed on some node, whose copy of the key table
/// would then miss them while the others took them. A transaction that aborted
/// hands nothing over (its seals stay in this node's shared totals,
/// docs/SECURITY.md). A transaction prepared here for another node's two-phase
/// commit left its counts in the node's outbox table, where they appear when it
/// commits: the writer is asked to move them from there.
fn hand_over_seal_counts(committed: bool) {
    if COUNTS_IN_OUTBOX
        .try_with(|c| c.replace(false))
        .unwrap_or(false)
        && committed
    {
        crate::audit_worker::drain_seal_counts_later();
    }
    let Some((ids, counts)) = COUNTS_AFTER_COMMIT
        .try_with(|c| c.borrow_mut().take())
        .ok()
        .flatten()
    else {
        return;
    };
    if committed {
        crate::audit_worker::seal_counts_later(&ids, &counts);
    }
}

/// Counts one seal under `key_id`: in the shared total at once (it counts even if the
/// transaction rolls back), and in this transaction's list of keys to write back.
pub fn note_seal(key_id: &str) {
    crate::enc_counts::count_seal(key_id);
    SEALS.with(|t| *t.borrow_mut().entry(key_id.to_owned()).or_insert(0) += 1);
}

/// Seals under `key_id` in this transaction not yet written back.
fn pending_seals(key_id: &str) -> i64 {
    SEALS.with(|t| t.borrow().get(key_id).copied().unwrap_or(0))
}

fn has_seals() -> bool {
    SEALS.with(|t| !t.borrow().is_empty())
}

fn write_seal_counts(preparing: bool) -> SealResult<()> {
    let pending = SEALS.with(|t| std::mem::take(&mut *t.borrow_mut()));
    if pending.is_empty() {
        return Ok(());
    }
    let (ids, counts): (Vec<String>, Vec<i64>) = pending.into_iter().unzip();
    add_counts(&ids, &counts);
    // On a Citus worker the key table is a copy Citus writes from the coordinator;
    // while a shard's statement runs in this transaction the worker cannot write it,
    // so the audit writer adds the counts there (docs/SCALING.md): handed over once
    // the transaction has committed, or, for a transaction being prepared for
    // another node's two-phase commit (which commits later, maybe in another
    // session, or is rolled back), written in it to this node's outbox table, where
    // they appear when it commits. Counts handed over at the PREPARE could reach the
    // coordinator before it committed a key this transaction created, and find
    // that key on no copy. A read-only transaction cannot write the table (and a
    // transaction can be made read-only after it wrote a key): it is not prepared.
    if crate::pg::citus::is_worker()? {
        if preparing {
            // SAFETY: XactReadOnly is a plain global of the running transaction.
            if unsafe { pg_sys::XactReadOnly } {
                return Err(SealError::NotSupported(
                    "on a Citus worker, a read-only transaction that sealed cannot be prepared",
                ));
            }
            keystore::put_in_outbox(&ids, &counts)?;
            COUNTS_IN_OUTBOX.with(|c| c.set(true));
        } else {
            COUNTS_AFTER_COMMIT.with(|c| *c.borrow_mut() = Some((ids, counts)));
        }
        return Ok(());
    }
    // A key with a shared total writes that total back (it already holds this
    // transaction's seals and every rolled-back one); a key without adds its count.
    // With Citus every node seals and has its own total, so every node adds: a
    // total would overwrite the other nodes' seals.
    let citus = crate::pg::citus::present();
    let (adds, totals): (Vec<i64>, Vec<Option<i64>>) = ids
        .iter()
        .zip(&counts)
        .map(|(id, &n)| match crate::enc_counts::total(id) {
            Some(t) if !citus => (0, Some(t)),
            _ => (n, None),
        })
        .unzip();
    keystore::add_encryptions(ids, adds, totals)
}

fn refuse_prepare_after_key_changes() -> SealResult<()> {
    if keystore::writes().invalidates {
        return Err(SealError::NotSupported(
            "a transaction that rotated or shredded keys cannot be prepared",
        ));
    }
    Ok(())
}

fn transaction_ended(how: End) {
    SEALS.with(|t| t.borrow_mut().clear());
    let writes = keystore::take_writes();
    match how {
        End::Committed | End::Prepared if writes.invalidates => bump_epoch(),
        // A prepared transaction may still be rolled back (ROLLBACK PREPARED, from
        // any session), taking the keys it made with it: this session must not seal
        // with them afterwards.
        End::Aborted | End::Prepared if writes.any => forget_all(),
        _ => {}
    }
    // Keys that Citus replicates change through other nodes, which cannot bump this
    // node's epoch; keys read through a snapshot that may be older than the last
    // shred (`keystore::take_read_for_transaction`) or on a hot standby
    // (`remember`, which marks them as they are cached, so a standby promoted
    // meanwhile still forgets them) may predate it. Each is cached for the
    // transaction that read it only.
    let for_transaction = CACHED_FOR_TRANSACTION
        .try_with(|r| r.replace(false))
        .unwrap_or(false);
    if keystore::take_read_for_transaction() || for_transaction {
        forget_all();
    }
}

fn subtransaction_aborted(_my: pgrx::pg_sys::SubTransactionId) {
    if keystore::writes().any {
        forget_all();
    }
}

/// Rotates the tenant's active key for `purpose` (see `keystore::rotate`) and
/// records a data key's rotation in the tenant's ledger (`key.rotated`).
pub fn rotate(
    tenant: &str,
    purpose: Purpose,
) -> SealResult<(keystore::StoredKey, pgseal_core::keys::SecretKey)> {
    let (stored, key, rotated) = keystore::rotate(tenant, purpose)?;
    if let Some(payload) = rotated {
        crate::ledger::evidence::record(tenant, "key.rotated", payload)?;
    }
    Ok((stored, key))
}

pub fn bump_epoch() {
    EPOCH.get().fetch_add(1, Ordering::SeqCst);
}

/// Drops every cached key in this backend.
pub fn forget_all() {
    CACHE.with(|c| c.borrow_mut().clear());
}

/// Wipes the cached keys when the backend exits; does nothing if the cache is in
/// use or gone.
#[pg_guard]
unsafe extern "C-unwind" fn wipe_on_exit(_code: i32, _arg: pgrx::pg_sys::Datum) {
    let _ = CACHE.try_with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            c.clear();
        }
    });
}

/// Registers the exit wipe once per backend (a forked backend does not inherit
/// the postmaster's exit callbacks).
fn register_exit_wipe() {
    EXIT_HOOK.with(|done| {
        if !done.replace(true) {
            // SAFETY: on_proc_exit stores a plain function pointer; wipe_on_exit is
            // 'static and only touches this thread's cache, without panicking.
            unsafe { pgrx::pg_sys::on_proc_exit(Some(wipe_on_exit), pgrx::pg_sys::Datum::from(0)) };
        }
    });
}

/// Empties the cache if another backend changed keys since we last looked.
fn sync_epoch() {
    let now = EPOCH.get().load(Ordering::SeqCst);
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.epoch != now {
            c.clear();
            c.epoch = now;
        }
    });
}

fn remember(live: Rc<LiveKey>) {
    if crate::pg::xact::in_recovery() {
        CACHED_FOR_TRANSACTION.with(|r| r.set(true));
    }
    let cap = gucs::key_cache_size();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.by_id.len() >= cap {
            c.clear();
        }
        c.by_id.insert(live.key_id.clone(), live);
    });
}

fn live_from(stored: &keystore::StoredKey, key: pgseal_core::keys::SecretKey) -> Rc<LiveKey> {
    let cipher = key.locked_cipher();
    crate::master::protect_key_memory();
    register_exit_wipe();
    Rc::new(LiveKey {
        key_id: stored.key_id.clone(),
        tenant: stored.tenant.clone(),
        purpose: stored.purpose,
        cipher,
    })
}

/// The key named by `key_id`, in any usable state (active or retired).
pub fn key_by_id(key_id: &str) -> SealResult<Rc<LiveKey>> {
    sync_epoch();
    let hit = CACHE.with(|c| {
        let mut c = c.borrow_mut();
        match &c.last {
            Some(k) if k.key_id == key_id => Some(k.clone()),
            _ => {
                let k = c.by_id.get(key_id).cloned();
                c.last.clone_from(&k);
                k
            }
        }
    });
    if let Some(k) = hit {
        return Ok(k);
    }
    let stored = keystore::fetch(key_id)?.ok_or(SealError::UnknownKey)?;
    if stored.state == KeyState::Destroyed {
        return Err(SealError::KeyDestroyed);
    }
    let live = live_from(&stored, stored.unwrap_key()?);
    remember(live.clone());
    Ok(live)
}

/// The tenant's active key for `purpose`, created on first use, and rotated
/// first when it has reached `pgseal.dek_max_encryptions`.
pub fn active_key(tenant: &str, purpose: Purpose) -> SealResult<Rc<LiveKey>> {
    sync_epoch();
    let limit = gucs::dek_max_encryptions();
    let slot = (tenant.to_owned(), purpose.as_str());
    let cached = CACHE.with(|c| {
        c.borrow()
            .active
            .get(&slot)
            .map(|e| (e.key.clone(), e.encryptions))
    });
    // The shared total counts every backend's seals, rolled-back ones included
    // (`enc_counts`); without a slot, this backend's view: stored + this transaction.
    if let Some((k, n)) = cached {
        let used =
            crate::enc_counts::total(&k.key_id).unwrap_or_else(|| n + pending_seals(&k.key_id));
        if used < limit {
            return Ok(k);
        }
    }
    let (mut stored, mut key) = keystore::ensure_active(tenant, purpose)?;
    let used = crate::enc_counts::observe(&stored.key_id, stored.encryptions)
        .unwrap_or_else(|| stored.encryptions + pending_seals(&stored.key_id));
    if used >= limit {
        (stored, key) = rotate(tenant, purpose)?;
        crate::enc_counts::observe(&stored.key_id, stored.encryptions);
    }
    let live = live_from(&stored, key);
    remember(live.clone());
    CACHE.with(|c| {
        c.borrow_mut().active.insert(
            slot,
            ActiveEntry {
                key: live.clone(),
                encryptions: stored.encryptions,
            },
        )
    });
    Ok(live)
}

/// Records flushed counts in the cached active entries.
fn add_counts(ids: &[String], counts: &[i64]) {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        for e in c.active.values_mut() {
            if let Some(i) = ids.iter().position(|id| *id == e.key.key_id) {
                e.encryptions += counts[i];
            }
        }
    });
}

/// Number of keys this backend holds; for tests and status.
#[pg_extern(volatile)]
fn key_cache_entries() -> i32 {
    sync_epoch();
    CACHE.with(|c| c.borrow().by_id.len() as i32)
}
