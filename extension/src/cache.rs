//! Per-backend cache of unwrapped tenant keys, bounded by `pgseal.key_cache_size`.
//!
//! A shared-memory epoch invalidates every backend's cache: rotation and shredding
//! bump it when their transaction commits, and each cache use first compares it.
//! So a shredded key stops working in every session, including those that had it
//! cached.

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
}

pub fn bump_epoch() {
    EPOCH.get().fetch_add(1, Ordering::SeqCst);
}

/// Drops every cached key in this backend.
pub fn forget_all() {
    CACHE.with(|c| c.borrow_mut().clear());
}

/// As `forget_all`, for the exit wipe: does nothing if the cache is in use or gone.
pub fn forget_all_at_exit() {
    let _ = CACHE.try_with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            c.clear();
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
        let used = crate::enc_counts::total(&k.key_id)
            .unwrap_or_else(|| n + crate::txn::pending_encryptions(&k.key_id));
        if used < limit {
            return Ok(k);
        }
    }
    let (mut stored, mut key) = keystore::ensure_active(tenant, purpose, false)?;
    let used = crate::enc_counts::observe(&stored.key_id, stored.encryptions)
        .unwrap_or_else(|| stored.encryptions + crate::txn::pending_encryptions(&stored.key_id));
    if used >= limit {
        (stored, key) = keystore::ensure_active(tenant, purpose, true)?;
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
pub fn add_counts(ids: &[String], counts: &[i64]) {
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
