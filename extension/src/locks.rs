//! Every heavyweight lock pgseal takes, in one place.
//!
//! | lock | scope | held | taken by |
//! |---|---|---|---|
//! | `LedgerTenant(tenant)` | one tenant's chain | until the transaction ends | the first append of a transaction for that tenant (`ledger/chain_lock.rs`) |
//! | `KeyCreation(tenant, purpose)` | creating or rotating one tenant's key | until the transaction ends | `keystore::get_or_create` |
//! | `DaemonLeader` | pgseald leadership | for the session | `pgseal._leader_try_lock()`, called by pgseald |
//!
//! Order: a tenant's `KeyCreation` lock (its ledger key, made on its first append)
//! before its `LedgerTenant` lock, on every path (`ledger/append.rs`,
//! `ledger/erase.rs`; the audit writer takes both without waiting); on Citus a
//! worker's forwarded entry makes the key on its node before the chain lock on the
//! coordinator, so the other order deadlocked across nodes.
//!
//! A transaction holding a `LedgerTenant` or `KeyCreation` lock of one of pgseal's own
//! chains (`_pgseal…`) cannot be prepared (`holds_pgseal_chain_lock`, asked at
//! PREPARE by `ledger/mod.rs`): a prepared transaction keeps its locks beyond its
//! session.
//!
//! All three are advisory locktags in PostgreSQL's user lock method, so they wait
//! under `lock_timeout`, take part in deadlock detection and show in `pg_locks` as
//! `locktype = 'advisory'`. What makes them pgseal's alone is `field4` (`objsubid`
//! in `pg_locks`): SQL's advisory-lock functions only ever build field4 = 1 (one
//! bigint key) or 2 (two integer keys); pgseal's are `0x5300 + kind` (the
//! leader lock shows as `objsubid = 21251`). No role can
//! take, hold or wait on them from SQL, so no role can stall a tenant's appends or
//! keep every pgseald from leading. Row locks pgseal takes (on
//! `pgseal.tenant_keys` by `kek_rewrap`, on `pgseal.org_locks` for a new
//! organisation) are on pgseal-owned rows that application roles cannot lock.

use pgrx::pg_sys;
use sha2::Digest;

/// The locks, with the `field4` value that tells them apart.
#[derive(Clone, Copy)]
enum Kind {
    LedgerTenant = 0x5301,
    KeyCreation = 0x5302,
    DaemonLeader = 0x5303,
}

/// The locktag of `kind` over `parts`: the first 8 bytes of
/// SHA-256("pgseal.lock" ‖ kind ‖ for each part: its length and bytes), in field2
/// and field3, and the current database in field1 (advisory locks are per database).
fn tag(kind: Kind, parts: &[&[u8]]) -> pg_sys::LOCKTAG {
    let mut h = sha2::Sha256::new()
        .chain_update(b"pgseal.lock")
        .chain_update((kind as u16).to_be_bytes());
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let d = h.finalize();
    pg_sys::LOCKTAG {
        // SAFETY: MyDatabaseId is a plain global set once the backend is connected
        // to a database, which every caller of pgseal's SQL functions is.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: u32::from_be_bytes(d[0..4].try_into().expect("4 bytes")),
        locktag_field3: u32::from_be_bytes(d[4..8].try_into().expect("4 bytes")),
        locktag_field4: kind as u16,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

/// Takes `tag` in ExclusiveLock mode; waits unless `dont_wait`. Returns whether it
/// was granted.
fn acquire(tag: pg_sys::LOCKTAG, session: bool, dont_wait: bool) -> bool {
    // SAFETY: LockAcquire reads the tag (a valid local) and may wait, time out
    // (lock_timeout) or detect a deadlock, raising an ERROR that pgrx's guard turns
    // into a Rust panic propagating as that ERROR. A transaction-scoped lock is
    // released at transaction end, a session lock when the session ends.
    let r = unsafe {
        pg_sys::LockAcquire(
            &tag,
            pg_sys::ExclusiveLock as pg_sys::LOCKMODE,
            session,
            dont_wait,
        )
    };
    r != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Serialises appends to one tenant's chain until the transaction ends.
pub fn ledger_tenant(tenant: &str) {
    let t = tag(Kind::LedgerTenant, &[tenant.as_bytes()]);
    note_pgseal_chain(tenant, t);
    acquire(t, false, false);
}

thread_local! {
    /// The locks of pgseal's own chains (`_pgseal…`) this transaction has taken,
    /// chain and key-creation locks alike (cleared when it ends). Whether each is
    /// still held is asked of the lock manager (`holds_pgseal_chain_lock`), so a lock
    /// a subtransaction released is not counted.
    static PGSEAL_CHAIN_LOCKS: std::cell::RefCell<Vec<pg_sys::LOCKTAG>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn note_pgseal_chain(tenant: &str, t: pg_sys::LOCKTAG) {
    if !pgseal_core::ledger::is_pgseal_chain(tenant) {
        return;
    }
    PGSEAL_CHAIN_LOCKS.with(|l| {
        let mut l = l.borrow_mut();
        let same = |o: &pg_sys::LOCKTAG| {
            (
                o.locktag_field1,
                o.locktag_field2,
                o.locktag_field3,
                o.locktag_field4,
            ) == (
                t.locktag_field1,
                t.locktag_field2,
                t.locktag_field3,
                t.locktag_field4,
            )
        };
        if !l.iter().any(same) {
            l.push(t);
        }
    });
}

/// Whether this transaction holds a lock of one of pgseal's own chains: the chain's
/// (an append, a prune) or its key creation's.
pub fn holds_pgseal_chain_lock() -> bool {
    PGSEAL_CHAIN_LOCKS.with(|l| l.borrow().iter().any(held))
}

/// The transaction ended: its locks are released, and the list starts empty.
pub fn transaction_ended() {
    PGSEAL_CHAIN_LOCKS.with(|l| l.borrow_mut().clear());
}

fn held(t: &pg_sys::LOCKTAG) -> bool {
    let mode = pg_sys::ExclusiveLock as pg_sys::LOCKMODE;
    // SAFETY: LockHeldByMe only looks the tag up in this backend's local lock table.
    #[cfg(feature = "pg15")]
    let held = unsafe { pg_sys::LockHeldByMe(t, mode) };
    // SAFETY: as above.
    #[cfg(not(feature = "pg15"))]
    let held = unsafe { pg_sys::LockHeldByMe(t, mode, false) };
    held
}

/// Takes the tenant's chain lock if no other transaction holds it; true when this
/// transaction holds it now (also when it already did). The audit writer uses it so
/// that one busy chain never stalls the requests of other tenants.
pub fn ledger_tenant_try(tenant: &str) -> bool {
    let t = tag(Kind::LedgerTenant, &[tenant.as_bytes()]);
    note_pgseal_chain(tenant, t);
    acquire(t, false, true)
}

/// Serialises creating and rotating one tenant's key for `purpose` until the
/// transaction ends.
pub fn key_creation(tenant: &str, purpose: &str) {
    let t = tag(Kind::KeyCreation, &[tenant.as_bytes(), purpose.as_bytes()]);
    note_pgseal_chain(tenant, t);
    acquire(t, false, false);
}

/// `key_creation` without waiting: true when this transaction holds the lock now
/// (also when it already did). The audit writer uses it before a chain lock, so that
/// a key another transaction is making never stalls it.
pub fn key_creation_try(tenant: &str, purpose: &str) -> bool {
    let t = tag(Kind::KeyCreation, &[tenant.as_bytes(), purpose.as_bytes()]);
    note_pgseal_chain(tenant, t);
    acquire(t, false, true)
}

/// Tries to take the pgseald leader lock for this session; true when this session
/// holds it (also when it already did).
pub fn daemon_leader_try() -> bool {
    acquire(tag(Kind::DaemonLeader, &[]), true, true)
}

/// `pgseal._leader_try_lock()`: pgseald's leader election (granted to pgseal_admin).
#[pgrx::pg_extern(volatile, parallel_unsafe)]
fn _leader_try_lock() -> bool {
    daemon_leader_try()
}
