//! Encryption counts per data key, shared by every backend.
//!
//! A seal spends a random 96-bit nonce whether its transaction commits or not (its
//! ciphertext can leave through `RETURNING` before a rollback), so it counts against
//! its key when it happens. Shared memory holds one slot per key in use: the key's
//! total, raised to the stored `pgseal.tenant_keys.encryptions` whenever a backend
//! loads the key, and by one at every seal in any backend. Every committing
//! transaction that sealed writes its keys' totals back with `GREATEST`, so the
//! table holds every seal up to that commit, rolled-back ones included, and no seal
//! is counted twice.
//!
//! The margin (docs/SECURITY.md): the slots live as long as the server. After a
//! restart they start again from the table, so the seals of transactions that
//! rolled back after the last committed seal under a key are not counted; with the
//! default limit of 2^30 against the 2^32 that NIST SP 800-38D allows, that margin is
//! 3 × 2^30 such seals. When every slot is taken (more keys sealed with since the
//! server started than `SLOTS`), further keys are counted per transaction as before:
//! committed seals only. A LOG line says so once per backend.

use std::hash::{Hash, Hasher};

use pgrx::shmem::PGRXSharedMemory;
use pgrx::PgLwLock;

/// Keys that can be counted at once (16 bytes each: 1 MiB of shared memory).
const SLOTS: usize = 65536;
const EMPTY: u64 = 0;

#[derive(Copy, Clone)]
pub struct Counts {
    /// (tag of the key id, total encryptions); tag EMPTY marks a free slot.
    slots: [(u64, i64); SLOTS],
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            slots: [(EMPTY, 0); SLOTS],
        }
    }
}

// SAFETY: Counts is plain old data (an array of integer pairs) with no pointers, so
// it can live in shared memory and be read by every process.
unsafe impl PGRXSharedMemory for Counts {}

// SAFETY: the name is unique to pgseal; pg_shmem_init! in _PG_init sets it up.
pub static COUNTS: PgLwLock<Counts> = unsafe { PgLwLock::new(c"pgseal_encryption_counts") };

/// A 64-bit tag of the key id (never EMPTY). Key ids are random, so two keys share a
/// tag with probability 2^-64; they would then share one, larger, count.
fn tag(key_id: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key_id.hash(&mut h);
    h.finish().max(1)
}

impl Counts {
    /// The slot of `tag`, or the free slot where it would go; None when full.
    fn find(&self, tag: u64) -> Option<usize> {
        let start = (tag as usize) % SLOTS;
        (0..SLOTS)
            .map(|i| (start + i) % SLOTS)
            .find(|&i| self.slots[i].0 == tag || self.slots[i].0 == EMPTY)
    }
}

thread_local! {
    static FULL_LOGGED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn log_full_once() {
    if !FULL_LOGGED.with(|f| f.replace(true)) {
        pgrx::log!("pgseal: every shared encryption-count slot is taken; further keys are counted per committed transaction");
    }
}

/// Raises the key's shared total to `stored` (its count in `pgseal.tenant_keys`)
/// and returns the total; None when no slot is free.
pub fn observe(key_id: &str, stored: i64) -> Option<i64> {
    let t = tag(key_id);
    let mut c = COUNTS.exclusive();
    let Some(i) = c.find(t) else {
        log_full_once();
        return None;
    };
    let slot = &mut c.slots[i];
    if slot.0 == EMPTY {
        *slot = (t, stored);
    } else {
        slot.1 = slot.1.max(stored);
    }
    Some(slot.1)
}

/// Counts one seal under the key; returns its new total, None when it has no slot.
pub fn count_seal(key_id: &str) -> Option<i64> {
    let t = tag(key_id);
    let mut c = COUNTS.exclusive();
    let i = c.find(t).filter(|&i| c.slots[i].0 == t)?;
    c.slots[i].1 += 1;
    Some(c.slots[i].1)
}

/// The key's shared total, None when it has no slot.
pub fn total(key_id: &str) -> Option<i64> {
    let t = tag(key_id);
    let c = COUNTS.share();
    c.find(t)
        .filter(|&i| c.slots[i].0 == t)
        .map(|i| c.slots[i].1)
}
