//! Chain heads shared by every backend.
//!
//! A transaction's first append for a tenant needs the tenant's committed head.
//! Reading it from the table is two index probes (`pg::head_read`), a tenth of a
//! one-entry append's work with 16 clients (docs/BENCHMARKS.md). So every
//! transaction that appended publishes its heads here when it commits, while it
//! still holds the tenants' chain locks (`locks.rs`; PostgreSQL calls commit
//! callbacks after the commit is recorded and before it releases locks), and the
//! next holder of a tenant's lock takes the head from here instead.
//!
//! What keeps a published head right:
//! - Only the holder of a tenant's chain lock publishes or reads its head, so a
//!   head is published in commit order and read after the publisher committed.
//! - It is used only for a transaction's first load of the tenant under READ
//!   COMMITTED. After a subtransaction abort the head is re-read from the table
//!   (the transaction's own written entries are there, not here); under
//!   REPEATABLE READ and SERIALIZABLE it is read from the table, where the
//!   transaction's snapshot is checked against it (`pg::head_read`).
//! - A transaction publishes only heads it knows to be its last entry: for a head
//!   marked stale by a subtransaction abort, or whose heads row was moved where
//!   this transaction does not know (the SPI write, pruning), and for the heads of
//!   a prepared transaction (its commit happens elsewhere), the head published
//!   before is kept, no longer to be appended to, as verification's lower bound.
//!   An aborted transaction leaves the published heads as they were: they are
//!   still the committed ones.
//! - A head is keyed by database, the ledger table's OID (a new table after DROP
//!   EXTENSION has another) and the tenant's SHA-256. A restore
//!   (`pgseal.restore`), the one other way rows enter the ledger, removes every
//!   head of its database when it writes its first row and again when its
//!   transaction ends.
//! - Dropping a database or `pgseal.ledger`, and creating a database, removes
//!   the heads of that OID (an object access hook), so a database created again
//!   with the same OID finds none; a transaction that dropped its ledger does not
//!   publish heads of it.
//! - Shared memory starts empty with the server (and after a crash), so a head is
//!   never older than the server's last start.
//!
//! A head a committer could not replace with its own (stale, prepared) stays as a
//! lower bound for verification (`witness`): it is still a committed entry.
//!
//! Rows changed with the guards lifted (a superuser's deliberate act, TRUNCATE
//! included) are not seen here: appends then go on from the published head, so a
//! cut tail stays a gap, and `ledger_verify` and `ledger_checkpoint` treat a
//! published head past the last entry as one (`verify::top`). That witness is
//! not kept for certain: a restart, a restore, dropping the database (even a
//! drop that then fails) or a newer chain in the same pair of slots removes it;
//! what always catches a cut tail is a signed checkpoint past it
//! (docs/SECURITY.md).
//!
//! The table is two-way set-associative: a tenant's two slots are fixed by its
//! digest, a newer tenant replaces an older one in a full pair, and a miss reads
//! the table. Tenant ids an attacker chooses can only cause misses.

use std::sync::atomic::{AtomicPtr, Ordering};

use pgrx::pg_sys;
use pgrx::shmem::PgSharedMemoryInitialization;
use pgseal_core::ledger::Hash;
use sha2::{Digest, Sha256};

/// Heads kept at once (96 bytes each: 768 KiB of shared memory).
const SLOTS: usize = 8192;
/// A chain is kept in one of this many slots, fixed by its digest.
const WAYS: usize = 2;

/// Which chain: the database, the ledger table, and the tenant. A backend's
/// database is never InvalidOid (0), so an all-zero slot is empty.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct ChainKey {
    db: u32,
    ledger: u32,
    tenant: [u8; 32],
}

impl ChainKey {
    /// The key of `tenant`'s chain in the current database's `pgseal.ledger`,
    /// whose OID is `ledger`.
    pub fn new(ledger: pg_sys::Oid, tenant: &str) -> Self {
        ChainKey {
            db: current_db(),
            ledger: ledger.to_u32(),
            tenant: Sha256::digest(tenant.as_bytes()).into(),
        }
    }

    /// The first of the two slots the chain may be kept in (`WAYS`).
    pub(crate) fn set(&self) -> usize {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.tenant[..8]);
        (u64::from_le_bytes(first) % (SLOTS / WAYS) as u64) as usize * WAYS
    }

    /// The slot `publish` replaces when neither holds the chain nor is empty.
    fn victim(&self) -> usize {
        self.set() + (self.tenant[8] as usize) % WAYS
    }
}

fn current_db() -> u32 {
    // SAFETY: a plain global set when the backend connected to its database.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// A published head: the tenant's last committed entry, and the seq its heads
/// row holds (`ledger::heads::HEAD_STRIDE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Published {
    pub seq: i64,
    pub hash: Hash,
    pub row_seq: i64,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Slot {
    key: ChainKey,
    head: Published,
    /// The head may be appended to. Cleared when a committer could not publish
    /// its own head (`forget`): the head is then only a lower bound of the chain,
    /// a witness for verification (`witness`).
    current: bool,
}

impl Slot {
    fn holds(&self, key: &ChainKey) -> bool {
        self.key.db != 0 && self.key == *key
    }
}

/// The slots, in shared memory (zeroed at server start: every slot empty), and
/// the lock that guards them.
pub struct Table {
    slots: AtomicPtr<[Slot; SLOTS]>,
    lock: AtomicPtr<pg_sys::LWLock>,
}

/// Set up by `pg_shmem_init!(SHARED_HEADS)` in `_PG_init`. (Not a `PgLwLock`:
/// pgrx builds such a value on the stack of nested startup hooks, and 704 KiB
/// there overflows the postmaster's stack.)
pub static SHARED_HEADS: Table = Table {
    slots: AtomicPtr::new(std::ptr::null_mut()),
    lock: AtomicPtr::new(std::ptr::null_mut()),
};

const NAME: &std::ffi::CStr = c"pgseal_chain_heads";

impl PgSharedMemoryInitialization for Table {
    type Value = bool;

    unsafe fn on_shmem_request(&'static self) {
        // SAFETY: called from the shmem request hook, as the trait requires.
        unsafe {
            pg_sys::RequestAddinShmemSpace(std::mem::size_of::<[Slot; SLOTS]>());
            pg_sys::RequestNamedLWLockTranche(NAME.as_ptr(), 1);
        }
    }

    unsafe fn on_shmem_startup(&'static self, _: bool) {
        // SAFETY: called from the shmem startup hook, as the trait requires; the
        // space and the tranche were requested above. AddinShmemInitLock (the
        // 22nd of the main LWLocks) serialises the lookup and first zeroing.
        unsafe {
            let init = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
            pg_sys::LWLockAcquire(init, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let mut found = false;
            let size = std::mem::size_of::<[Slot; SLOTS]>();
            let slots = pg_sys::ShmemInitStruct(NAME.as_ptr(), size, &mut found);
            if !found {
                std::ptr::write_bytes(slots.cast::<u8>(), 0, size);
            }
            self.slots.store(slots.cast(), Ordering::Release);
            self.lock.store(
                &raw mut (*pg_sys::GetNamedLWLockTranche(NAME.as_ptr())).lock,
                Ordering::Release,
            );
            pg_sys::LWLockRelease(init);
        }
    }
}

impl Table {
    /// Runs `f` on the slots under the lock, shared or exclusive; not at all when
    /// the table was never set up (then nothing is published or found).
    fn with<R>(&self, exclusive: bool, f: impl FnOnce(&mut [Slot; SLOTS]) -> R) -> Option<R> {
        let (slots, lock) = (
            self.slots.load(Ordering::Acquire),
            self.lock.load(Ordering::Acquire),
        );
        if slots.is_null() || lock.is_null() {
            return None;
        }
        let mode = if exclusive {
            pg_sys::LWLockMode::LW_EXCLUSIVE
        } else {
            pg_sys::LWLockMode::LW_SHARED
        };
        // SAFETY: both pointers were set at shared memory startup and stay valid
        // for the server's life. The slots are only touched under the lock, in
        // the mode given (`f` only reads under a shared lock: `get` below), and
        // `f` copies plain data, so it cannot raise while the lock is held.
        unsafe {
            pg_sys::LWLockAcquire(lock, mode);
            let r = f(&mut *slots);
            pg_sys::LWLockRelease(lock);
            Some(r)
        }
    }
}

/// The head published for `key`, if any and current: the chain's last committed
/// entry, to append after.
pub fn get(key: &ChainKey) -> Option<Published> {
    find(key).filter(|s| s.current).map(|s| s.head)
}

/// The head last published for `key`, current or not: a committed entry the
/// chain has reached, which verification must find (unless the slot was reused).
pub fn witness(key: &ChainKey) -> Option<Published> {
    find(key).map(|s| s.head)
}

fn find(key: &ChainKey) -> Option<Slot> {
    SHARED_HEADS
        .with(false, |slots| {
            slots[key.set()..key.set() + WAYS]
                .iter()
                .find(|s| s.holds(key))
                .copied()
        })
        .flatten()
}

/// Publishes `head` for `key`, in the slot that holds the chain, else an empty
/// one, else the chain's victim. The caller holds the chain's lock and has
/// committed. Nothing is published for a ledger this transaction dropped.
pub fn publish(key: &ChainKey, head: Published) {
    if DROPPED_LEDGERS.with(|d| d.borrow().contains(&key.ledger)) {
        return;
    }
    SHARED_HEADS.with(true, |slots| {
        let set = key.set()..key.set() + WAYS;
        let at = set
            .clone()
            .find(|&i| slots[i].holds(key))
            .or_else(|| set.clone().find(|&i| slots[i].key.db == 0))
            .unwrap_or_else(|| key.victim());
        slots[at] = Slot {
            key: *key,
            head,
            current: true,
        };
    });
}

/// Marks the head published for `key`, if any, as no longer current: appends
/// read the table, verification still uses it as a lower bound. (A committer that
/// cannot publish its own head calls this: the one published before is still a
/// committed entry of the chain.)
pub fn forget(key: &ChainKey) {
    SHARED_HEADS.with(true, |slots| {
        for slot in slots[key.set()..key.set() + WAYS].iter_mut() {
            if slot.holds(key) {
                slot.current = false;
            }
        }
    });
}

/// Empties every slot `drop` selects.
fn remove(drop: impl Fn(&ChainKey) -> bool) {
    SHARED_HEADS.with(true, |slots| {
        for slot in slots.iter_mut().filter(|s| s.key.db != 0 && drop(&s.key)) {
            // SAFETY: an all-zero slot is a valid, empty one (plain integers and bytes).
            *slot = unsafe { std::mem::zeroed() };
        }
    });
}

/// Removes every head published for the current database.
fn forget_database() {
    let db = current_db();
    remove(|k| k.db == db);
}

/// The object access hook that was installed before ours.
static mut PREV_OBJECT_ACCESS_HOOK: pg_sys::object_access_hook_type = None;

/// Removes the heads of a database being dropped, and of a `pgseal.ledger`
/// being dropped (DROP EXTENSION), before anything reuses their OIDs: a database
/// created again with the same OID (`CREATE DATABASE … OID`, or from the same
/// template) would otherwise find the old chains' heads. Removing early is always
/// safe: it only makes appends read the table.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: std::ffi::c_int,
    arg: *mut std::ffi::c_void,
) {
    // SAFETY: the previous hook, if any, is called with the arguments PostgreSQL
    // passed us, as hooks must; it was read once at registration.
    unsafe {
        if let Some(prev) = PREV_OBJECT_ACCESS_HOOK {
            prev(access, class_id, object_id, sub_id, arg);
        }
    }
    if sub_id != 0 {
        return;
    }
    let object = object_id.to_u32();
    match access {
        // A database is created: nothing of an older one with its OID may be
        // left (a backend of a dropped database can publish while it exits).
        pg_sys::ObjectAccessType::OAT_POST_CREATE if class_id == pg_sys::DatabaseRelationId => {
            remove(|k| k.db == object)
        }
        pg_sys::ObjectAccessType::OAT_DROP if class_id == pg_sys::DatabaseRelationId => {
            remove(|k| k.db == object)
        }
        pg_sys::ObjectAccessType::OAT_DROP
            if class_id == pg_sys::RelationRelationId && is_pgseal_ledger(object_id) =>
        {
            DROPPED_LEDGERS.with(|d| d.borrow_mut().push(object));
            let db = current_db();
            remove(|k| k.db == db && k.ledger == object);
        }
        _ => {}
    }
}

/// Whether `relid` is `pgseal.ledger` (its catalog row still exists while its
/// drop hook runs): every other relation drop returns here, without the lock.
fn is_pgseal_ledger(relid: pg_sys::Oid) -> bool {
    // SAFETY: syscache lookups; get_namespace_oid with missing_ok returns
    // InvalidOid instead of raising, get_rel_name returns NULL or a palloc'd name.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"pgseal".as_ptr(), true);
        if nsp == pg_sys::InvalidOid || pg_sys::get_rel_namespace(relid) != nsp {
            return false;
        }
        let name = pg_sys::get_rel_name(relid);
        !name.is_null() && std::ffi::CStr::from_ptr(name).to_bytes() == b"ledger"
    }
}

/// Installs the object access hook; called once from `_PG_init`.
pub fn register_drop_hook() {
    // SAFETY: `_PG_init` runs once, in the postmaster, before any backend: the
    // hook chain is not read concurrently.
    unsafe {
        PREV_OBJECT_ACCESS_HOOK = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(on_object_access);
    }
}

thread_local! {
    /// This transaction wrote rows into the ledger's tables as a restore.
    static RESTORING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// OIDs of `pgseal.ledger` tables this transaction dropped: its heads of them
    /// are not published at commit.
    static DROPPED_LEDGERS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A restore wrote a row into `pgseal.ledger` or `pgseal.ledger_heads`: the heads
/// published for this database may no longer be the last entries. They are
/// removed now (once per transaction) and again when the transaction ends, so no
/// head published meanwhile outlives the restored rows.
pub fn restore_wrote() {
    if !RESTORING.with(|r| r.replace(true)) {
        forget_database();
    }
}

/// The transaction ended (after its heads were published): a restore's removal
/// is repeated, and the dropped ledgers are forgotten.
pub fn transaction_ended() {
    if RESTORING.with(|r| r.replace(false)) {
        forget_database();
    }
    DROPPED_LEDGERS.with(|d| d.borrow_mut().clear());
}
