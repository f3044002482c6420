//! Rows of `pgseal.tenant_keys`: tenant data keys and ledger keys, and the
//! database's checkpoint key (tenant `_pgseal`), stored only wrapped.
//!
//! Every query here runs as the extension owner (see `privilege`), because the
//! table is readable by no application role.

use pgrx::prelude::*;
use pgseal_core::keyring::KeyRing;
use pgseal_core::keys::{new_key_id, SecretKey};
use pgseal_core::wrap::{self, Purpose, WrapLabel};

use crate::error::{SealError, SealResult};
use crate::master;
use crate::pg::citus;
use crate::privilege::as_owner;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Retired,
    Destroyed,
}

impl KeyState {
    fn parse(s: &str) -> SealResult<Self> {
        match s {
            "active" => Ok(KeyState::Active),
            "retired" => Ok(KeyState::Retired),
            "destroyed" => Ok(KeyState::Destroyed),
            _ => Err(SealError::Internal(
                "unknown key state in pgseal.tenant_keys",
            )),
        }
    }
}

pub fn purpose_from_str(s: &str) -> SealResult<Purpose> {
    match s {
        "dek" => Ok(Purpose::Dek),
        "ledger" => Ok(Purpose::Ledger),
        "checkpoint" => Ok(Purpose::Checkpoint),
        _ => Err(SealError::Internal(
            "unknown key purpose in pgseal.tenant_keys",
        )),
    }
}

pub struct StoredKey {
    pub key_id: String,
    pub tenant: String,
    pub purpose: Purpose,
    pub state: KeyState,
    pub kek_version: Option<i32>,
    pub wrapped: Option<Vec<u8>>,
    pub encryptions: i64,
}

impl StoredKey {
    /// Unwraps the key with the master key version it is stored under.
    pub fn unwrap_key(&self) -> SealResult<SecretKey> {
        master::with_ring(|ring| self.unwrap_key_with(ring))
    }

    /// As `unwrap_key`, for callers that already hold the ring.
    pub fn unwrap_key_with(&self, ring: &KeyRing) -> SealResult<SecretKey> {
        if self.state == KeyState::Destroyed {
            return Err(SealError::KeyDestroyed);
        }
        let (Some(ver), Some(wrapped)) = (self.kek_version, self.wrapped.as_deref()) else {
            return Err(SealError::CorruptKey(self.key_id.clone()));
        };
        let ver = ver as u32;
        let kek = ring.get(ver).ok_or(SealError::MasterVersionMissing(ver))?;
        let label = WrapLabel {
            purpose: self.purpose,
            tenant: &self.tenant,
            key_id: &self.key_id,
            kek_version: ver,
        };
        wrap::unwrap(kek, label, wrapped).map_err(|_| SealError::CorruptKey(self.key_id.clone()))
    }
}

/// The columns `row_to_key` reads, in its order.
macro_rules! key_columns {
    () => {
        "key_id, tenant_id, purpose, state, kek_version, wrapped, encryptions"
    };
}
const COLUMNS: &str = key_columns!();

fn row_to_key(row: &pgrx::spi::SpiHeapTupleData<'_>) -> SealResult<StoredKey> {
    let text = |i: usize| -> SealResult<String> {
        row.get::<String>(i)?.ok_or(SealError::Internal(
            "NULL in a NOT NULL column of pgseal.tenant_keys",
        ))
    };
    Ok(StoredKey {
        key_id: text(1)?,
        tenant: text(2)?,
        purpose: purpose_from_str(&text(3)?)?,
        state: KeyState::parse(&text(4)?)?,
        kek_version: row.get::<i32>(5)?,
        wrapped: row.get::<Vec<u8>>(6)?,
        encryptions: row.get::<i64>(7)?.unwrap_or(0),
    })
}

thread_local! {
    /// A key was read that this backend may keep for the running transaction only
    /// (since the last `take_read_for_transaction`): from a table that Citus
    /// replicates, whose changes through other nodes bump no epoch here, or through
    /// a snapshot that may be older than a shred (parallel mode, a text statement).
    static READ_FOR_TRANSACTION: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The table this node reads keys from (`key_table`).
enum KeyTable {
    /// `pgseal.tenant_keys`, a plain table of this node: without Citus, or before
    /// `pgseal.citus_distribute()`.
    Local,
    /// This node's copy of the replicated table (its qualified name).
    Copy(String),
    /// The replicated table, which this node holds no copy of: read through Citus
    /// (which runs it on another node under READ COMMITTED).
    ThroughCitus,
}

impl KeyTable {
    fn name(&self) -> &str {
        match self {
            KeyTable::Copy(name) => name,
            KeyTable::Local | KeyTable::ThroughCitus => "pgseal.tenant_keys",
        }
    }
}

/// The table this node reads keys from: `pgseal.tenant_keys`, or where Citus
/// replicates it (`pgseal.citus_distribute()`), its placement on this node, which a
/// function inside a query Citus pushed to this node can read (it may not run a
/// distributed query). Run as the owner.
fn key_table() -> SealResult<KeyTable> {
    if !crate::pg::citus::present() {
        return Ok(KeyTable::Local);
    }
    if let Some(placement) = placement() {
        READ_FOR_TRANSACTION.with(|r| r.set(true));
        return Ok(KeyTable::Copy(placement));
    }
    let (rel, replicated, oid) = Spi::get_three::<String, bool, pg_sys::Oid>(
        "SELECT k.rel, k.replicated, pg_catalog.to_regclass(k.rel)::pg_catalog.oid FROM pgseal._keys_relation() k",
    )?;
    let rel = rel.ok_or(SealError::Internal(
        "pgseal._keys_relation() returned no table",
    ))?;
    if replicated != Some(true) {
        return Ok(KeyTable::Local);
    }
    READ_FOR_TRANSACTION.with(|r| r.set(true));
    match oid.filter(|_| rel != "pgseal.tenant_keys") {
        Some(oid) => {
            PLACEMENT.with(|p| *p.borrow_mut() = Some((rel.clone(), oid)));
            Ok(KeyTable::Copy(rel))
        }
        None => Ok(KeyTable::ThroughCitus),
    }
}

thread_local! {
    /// This node's placement of the replicated key table (its qualified name and
    /// oid), once `_keys_relation()` named it: a placement keeps its name for the
    /// table's life. Each transaction checks once that Citus still lists it as this
    /// node's (`CHECKED`): a node taken out of the table's placements (disabled,
    /// removed) may keep the table, which Citus then no longer updates.
    static PLACEMENT: std::cell::RefCell<Option<(String, pg_sys::Oid)>> =
        const { std::cell::RefCell::new(None) };
    /// Key statements written for the placement, kept as plans (`pg::plans`) by
    /// their text: (statement for `pgseal.tenant_keys`, placement) → its text.
    /// The placement was checked against Citus's metadata in this transaction.
    static CHECKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static PLACED: std::cell::RefCell<std::collections::HashMap<(&'static str, String), &'static str>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The placement `key_table` found, while a relation of pgseal's schema with that
/// name and oid still exists (checked in the catalog caches) and, checked once a
/// transaction, Citus still lists it as this node's placement. Run as the owner.
fn placement() -> Option<String> {
    let (name, oid) = PLACEMENT.with(|p| p.borrow().clone())?;
    let table = name.strip_prefix("pgseal.")?;
    let shard: i64 = table.strip_prefix("tenant_keys_")?.parse().ok()?;
    // SAFETY: catalog cache lookups by oid; the returned name is palloc'd (or NULL
    // for a relation that no longer exists) and read at once.
    let same = unsafe {
        let n = pg_sys::get_rel_name(oid);
        !n.is_null()
            && std::ffi::CStr::from_ptr(n).to_bytes() == table.as_bytes()
            && pg_sys::get_rel_namespace(oid) == pg_sys::get_namespace_oid(c"pgseal".as_ptr(), true)
    };
    let listed = same
        && (CHECKED.get()
            || crate::pg::plans::select_first(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_placement p \
                   JOIN pg_catalog.pg_dist_local_group g ON g.groupid OPERATOR(pg_catalog.=) p.groupid \
                  WHERE p.shardid OPERATOR(pg_catalog.=) $1)",
                &[crate::pg::plans::INT8],
                &[shard.into()],
                |r| Ok(r.get::<bool>(1)?.unwrap_or(false)),
            )
            .ok()
            .flatten()
            .unwrap_or(false));
    if listed {
        CHECKED.set(true);
        Some(name)
    } else {
        PLACEMENT.with(|p| *p.borrow_mut() = None);
        None
    }
}

/// `query` (a `key_query!`) written for the placement `rel`, as a text kept for the
/// backend's life so that its plan is kept too; None past a few (a placement that
/// changed more than a few times in one backend is read as before).
fn placed(query: &'static str, rel: &str) -> Option<&'static str> {
    PLACED.with(|m| {
        let mut m = m.borrow_mut();
        if let Some(q) = m.get(&(query, rel.to_owned())) {
            return Some(*q);
        }
        if m.len() >= 8 {
            return None;
        }
        let q: &'static str = Box::leak(
            query
                .replacen("pgseal.tenant_keys", rel, 1)
                .into_boxed_str(),
        );
        m.insert((query, rel.to_owned()), q);
        Some(q)
    })
}

/// Whether keys were read since the last call that the key cache may keep for one
/// transaction only (`READ_FOR_TRANSACTION`, `cache.rs`).
pub fn take_read_for_transaction() -> bool {
    CHECKED.set(false);
    READ_FOR_TRANSACTION.with(|r| r.replace(false))
}

/// A statement on the key table, written for `pgseal.tenant_keys`.
macro_rules! key_query {
    ($where:literal) => {
        concat!(
            "SELECT ",
            key_columns!(),
            " FROM pgseal.tenant_keys WHERE ",
            $where
        )
    };
}

const BY_ID: &str = key_query!("key_id = $1");
const ACTIVE: &str = key_query!("tenant_id = $1 AND purpose = $2 AND state = 'active'");

/// The first key that `query` (a `key_query!`) returns, with `types` its parameters'.
///
/// Without Citus the statement runs through a plan kept for the backend's life
/// (`pg::plans`), under a snapshot taken now (`select_latest`): a backend meets
/// each tenant's keys once, and parsing and planning the statement every time was
/// most of a key load (and a key load most of a tenant's first append in a
/// backend). With Citus it reads the key table this node may read (`key_table`):
/// its placement on this node through a kept plan too once it is known, under the
/// transaction's snapshot (a new one for each read under READ COMMITTED) and
/// checked by `read_placement` (Citus's key cache lasts one transaction, so every
/// transaction reads its keys again).
fn select_one(
    query: &'static str,
    types: &[pgrx::pg_sys::PgOid],
    args: &[pgrx::datum::DatumWithOid],
) -> SealResult<Option<StoredKey>> {
    select_one_as(query, types, args, false)
}

/// `select_one`; with Citus, a text statement on a table found only now is run
/// read-write when `fresh` (under READ COMMITTED a new snapshot, which sees what a
/// lock's previous holder committed), read-only (the statement's snapshot) when not.
fn select_one_as(
    query: &'static str,
    types: &[pgrx::pg_sys::PgOid],
    args: &[pgrx::datum::DatumWithOid],
    fresh: bool,
) -> SealResult<Option<StoredKey>> {
    if !citus::present() {
        return as_owner(|| select_latest(query, types, args));
    }
    if let Some(read) = read_placement(query, types, args) {
        return read;
    }
    let caller = citus::caller_parsing()?;
    // What is read below is cached for this transaction only, as a replicated
    // read is.
    READ_FOR_TRANSACTION.with(|r| r.set(true));
    let table = as_owner(key_table)?;
    match &table {
        // This node's copy, named just now: read there as above.
        KeyTable::Copy(_) => {
            if let Some(read) = read_placement(query, types, args) {
                return read;
            }
        }
        // Before `citus_distribute()`: a plain table of this node, read as
        // committed now as without Citus.
        KeyTable::Local => return as_owner(|| select_latest(query, types, args)),
        KeyTable::ThroughCitus => {}
    }
    // This node's copy read by a text statement (past the kept plans `placed`
    // keeps, or a copy Citus no longer lists) would read through the transaction's
    // snapshot, unchecked: refused where that snapshot may predate a shred.
    if matches!(table, KeyTable::Copy(_)) && crate::pg::xact::uses_transaction_snapshot() {
        return Err(SealError::NotSupported(
            "on Citus, this session reads keys under REPEATABLE READ or SERIALIZABLE only through its node's copy of the key table; run it under READ COMMITTED",
        ));
    }
    // A text statement: on this node's copy (past the kept plans `placed`
    // keeps), or through Citus, which runs it on another node under READ
    // COMMITTED, a snapshot of its own.
    as_owner(|| {
        let query = query.replacen("pgseal.tenant_keys", table.name(), 1);
        let read = || {
            let row = |table: pgrx::spi::SpiTupleTable| match table.into_iter().next() {
                Some(row) => Ok(Some(row_to_key(&row)?)),
                None => Ok(None),
            };
            if fresh {
                Spi::connect_mut(|client| row(client.update(&query, Some(1), args)?))
            } else {
                Spi::connect(|client| row(client.select(&query, Some(1), args)?))
            }
        };
        match table {
            KeyTable::ThroughCitus => citus::with_remote_parsing_pinned(caller.as_ref(), read),
            _ => read(),
        }
    })
}

/// With Citus, `query` on this node's placement of the key table once it is known
/// (a statement on a plain table of this node, which Citus does not send on),
/// through a kept plan; None while it is not. Read read-write as SPI runs it (under
/// READ COMMITTED a new snapshot, else the transaction's),
/// as every key read with Citus (the seal counts of `add_encryptions` go through
/// Citus under the transaction's snapshot too, which must see the keys read here),
/// and kept for this transaction only. Under REPEATABLE READ or SERIALIZABLE, whose
/// snapshot may predate a shred or rotation, the key is read again as committed now
/// and returned as it is now (a shredded key destroyed); a key the snapshot does not
/// hold as found now (made or rotated since) is refused (40001: the transaction must
/// start again, and then reads the key as it is).
fn read_placement(
    query: &'static str,
    types: &[pgrx::pg_sys::PgOid],
    args: &[pgrx::datum::DatumWithOid],
) -> Option<SealResult<Option<StoredKey>>> {
    let rel = as_owner(placement)?;
    let placed = placed(query, &rel)?;
    READ_FOR_TRANSACTION.with(|r| r.set(true));
    Some(as_owner(|| {
        let seen = crate::pg::plans::select_first(placed, types, args, row_to_key)?;
        if !crate::pg::xact::uses_transaction_snapshot() {
            return Ok(seen);
        }
        let now = select_latest(placed, types, args)?;
        match &now {
            // A key committed since the snapshot (another active key, one the
            // snapshot does not hold): the seal counts of `add_encryptions` could
            // not reach its row.
            Some(n) if seen.as_ref().map(|k| &k.key_id) != Some(&n.key_id) => {
                Err(SealError::Conflict(
                    "a key of this tenant was made or rotated after this transaction's snapshot was taken; retry the transaction",
                ))
            }
            // The key as it is now: destroyed, retired, rewrapped, or gone (the
            // tenant's active key shredded: a new one is made).
            _ => Ok(now),
        }
    }))
}

/// A key as committed now, whatever the transaction's snapshot: under REPEATABLE
/// READ or SERIALIZABLE a snapshot taken before a shred or rotation would still
/// read the key as it was, and decrypt with a destroyed key after the shred
/// committed. In parallel mode, where no snapshot may be taken, the statement's
/// snapshot is read instead, and what it returns is kept for this transaction only.
fn select_latest(
    query: &'static str,
    types: &[pgrx::pg_sys::PgOid],
    args: &[pgrx::datum::DatumWithOid],
) -> SealResult<Option<StoredKey>> {
    if crate::pg::xact::in_parallel_mode() {
        // The statement's snapshot is the transaction's under REPEATABLE READ or
        // SERIALIZABLE, older than any shred since: refused, as any role can put
        // pgseal's functions in a parallel plan (a PARALLEL SAFE function around
        // them, `debug_parallel_query`).
        if crate::pg::xact::uses_transaction_snapshot() {
            return Err(SealError::NotSupported(
                "pgseal reads a key in parallel mode only under READ COMMITTED (mark the function around pgseal's PARALLEL UNSAFE)",
            ));
        }
        READ_FOR_TRANSACTION.with(|r| r.set(true));
        return crate::pg::plans::select_first(query, types, args, row_to_key);
    }
    crate::pg::plans::select_first_latest(query, types, args, row_to_key)
}

/// As `fetch_active`, under a snapshot taken now: after the key-creation lock, it
/// sees the key the previous holder committed. Without Citus through
/// `select_latest`, whatever the isolation level; with Citus through
/// `read_placement` where this node has a copy, and without one through a
/// read-write text statement that Citus runs on another node.
fn fetch_active_fresh(tenant: &str, purpose: Purpose) -> SealResult<Option<StoredKey>> {
    use crate::pg::plans::TEXT;
    select_one_as(
        ACTIVE,
        &[TEXT, TEXT],
        &[tenant.into(), purpose.as_str().into()],
        true,
    )
}

/// The key with this id, in any state.
pub fn fetch(key_id: &str) -> SealResult<Option<StoredKey>> {
    select_one(BY_ID, &[crate::pg::plans::TEXT], &[key_id.into()])
}

/// The tenant's active key for `purpose`, if it has one.
pub fn fetch_active(tenant: &str, purpose: Purpose) -> SealResult<Option<StoredKey>> {
    use crate::pg::plans::TEXT;
    select_one(
        ACTIVE,
        &[TEXT, TEXT],
        &[tenant.into(), purpose.as_str().into()],
    )
}

/// What this transaction did to `pgseal.tenant_keys`, for the key cache's
/// transaction-end work (`cache.rs`).
#[derive(Clone, Copy, Default, Debug)]
pub struct Writes {
    /// Keys were created, rotated or destroyed: an abort must empty the cache.
    pub any: bool,
    /// Keys other backends may hold were replaced or destroyed: a commit must
    /// invalidate every backend's cache.
    pub invalidates: bool,
}

thread_local! {
    static WRITES: std::cell::Cell<Writes> = const { std::cell::Cell::new(Writes { any: false, invalidates: false }) };
}

fn note_written(invalidates_other_backends: bool) {
    WRITES.with(|w| {
        let mut v = w.get();
        v.any = true;
        v.invalidates |= invalidates_other_backends;
        w.set(v);
    });
}

/// `pgseal._keys_changed()`: every backend's key cache is emptied when this
/// transaction commits. `citus_distribute()` calls it: a key cached before the key
/// table became a reference table would otherwise stay in use with no read of the
/// table, so a change made through another node would never reach it.
#[pg_extern(volatile, parallel_unsafe)]
fn _keys_changed() {
    note_written(true);
}

/// This transaction's key writes so far.
pub fn writes() -> Writes {
    WRITES.with(|w| w.get())
}

/// This transaction's key writes, forgotten (the transaction ended).
pub fn take_writes() -> Writes {
    WRITES.with(|w| w.take())
}

/// Serialises key creation and rotation for one tenant and purpose until commit.
fn lock_tenant(tenant: &str, purpose: Purpose) {
    crate::locks::key_creation(tenant, purpose.as_str());
}

/// Returns the tenant's active key, creating one if it has none.
///
/// Concurrent callers for one tenant serialise on a pgseal lock (`locks.rs`), and a partial
/// unique index allows one active key per tenant and purpose. Keys are read as
/// committed now (`select_one`), so a caller under REPEATABLE READ or SERIALIZABLE
/// whose snapshot predates another's new key finds and uses it (on Citus it is
/// refused with 40001 by `read_placement`; a race past the lock ends in 40001 from
/// ON CONFLICT) instead of creating a second one.
pub fn ensure_active(tenant: &str, purpose: Purpose) -> SealResult<(StoredKey, SecretKey)> {
    make_active(tenant, purpose, false).map(|(stored, key, _)| (stored, key))
}

/// Retires the tenant's active key for `purpose` and makes a new one. Returns the
/// new key and, for a data key, the payload of the `key.rotated` entry the caller
/// records (`cache::rotate`): the keys retired, with their encryption counts, and
/// the new key.
pub fn rotate(
    tenant: &str,
    purpose: Purpose,
) -> SealResult<(StoredKey, SecretKey, Option<serde_json::Value>)> {
    make_active(tenant, purpose, true)
}

/// `ensure_active`, or with `rotate`, `rotate`.
fn make_active(
    tenant: &str,
    purpose: Purpose,
    rotate: bool,
) -> SealResult<(StoredKey, SecretKey, Option<serde_json::Value>)> {
    let mut retired: Option<Vec<serde_json::Value>> = None;
    let caller = citus::caller_parsing()?;
    let made = as_owner(|| -> SealResult<(StoredKey, SecretKey)> {
        // The common case, a key that exists, needs no lock: active keys are only
        // replaced under the lock, and a reader may use the one it sees.
        if !rotate {
            if let Some(existing) = fetch_active(tenant, purpose)? {
                let key = existing.unwrap_key()?;
                return Ok((existing, key));
            }
        }
        citus::with_remote_parsing_pinned(caller.as_ref(), || {
            make_under_lock(tenant, purpose, rotate, &mut retired)
        })
    })?;
    let payload = match retired {
        Some(retired) if purpose == Purpose::Dek && made.0.wrapped.is_none() => {
            Some(serde_json::json!({
                "key_id": made.0.key_id,
                "kek_version": made.0.kek_version,
                "retired": retired,
            }))
        }
        _ => None,
    };
    Ok((made.0, made.1, payload))
}

/// `make_active` past the fast path: under the tenant's key-creation lock, the key
/// another transaction made meanwhile, or (with `rotate`, after retiring the active
/// key into `retired`) a new key. Runs as the owner.
fn make_under_lock(
    tenant: &str,
    purpose: Purpose,
    rotate: bool,
    retired: &mut Option<Vec<serde_json::Value>>,
) -> SealResult<(StoredKey, SecretKey)> {
    lock_tenant(tenant, purpose);
    if !rotate {
        if let Some(existing) = fetch_active_fresh(tenant, purpose)? {
            let key = existing.unwrap_key()?;
            return Ok((existing, key));
        }
    } else {
        let old = Spi::connect_mut(|client| {
            client
                .update(
                    "UPDATE pgseal.tenant_keys SET state = 'retired', retired_at = pg_catalog.now() \
                     WHERE tenant_id = $1 AND purpose = $2 AND state = 'active' RETURNING key_id, encryptions",
                    None,
                    &[tenant.into(), purpose.as_str().into()],
                )?
                .map(|row| -> Result<serde_json::Value, pgrx::spi::Error> {
                    Ok(serde_json::json!({
                        "key_id": row.get::<String>(1)?,
                        "encryptions": row.get::<i64>(2)?,
                    }))
                })
                .collect::<Result<Vec<_>, pgrx::spi::Error>>()
        })?;
        *retired = Some(old);
    }
    let key = SecretKey::random();
    let key_id = new_key_id();
    let (ver, wrapped) = master::with_active(|ver, kek| {
        let label = WrapLabel {
            purpose,
            tenant,
            key_id: &key_id,
            kek_version: ver,
        };
        Ok((ver, wrap::wrap(kek, label, &key)))
    })?;
    let inserted = Spi::connect_mut(|client| {
        client.update(
        "INSERT INTO pgseal.tenant_keys (key_id, tenant_id, purpose, state, kek_version, wrapped) \
         VALUES ($1, $2, $3, 'active', $4, $5) \
         ON CONFLICT (tenant_id, purpose) WHERE state = 'active' DO NOTHING RETURNING key_id",
        Some(1),
        &[key_id.as_str().into(), tenant.into(), purpose.as_str().into(), (ver as i32).into(), wrapped.into()],
    ).map(|t| (!t.is_empty()).then_some(()))
    });
    match inserted? {
        Some(_) => {}
        // Every pgseal path takes the key-creation lock first, so a conflict here means
        // a writer that bypassed it (a manual INSERT); use the key it committed.
        None => {
            let existing = fetch_active_fresh(tenant, purpose)?
                .ok_or(SealError::Internal("active key vanished"))?;
            let key = existing.unwrap_key()?;
            return Ok((existing, key));
        }
    }
    note_written(rotate);
    // `wrapped: None` marks a key made here (the paths above return stored keys).
    let stored = StoredKey {
        key_id,
        tenant: tenant.to_owned(),
        purpose,
        state: KeyState::Active,
        kek_version: Some(ver as i32),
        wrapped: None,
        encryptions: 0,
    };
    Ok((stored, key))
}

/// Destroys every data key of the tenant; returns the ids of the keys destroyed
/// (the caller records them: `key.shredded`).
pub fn shred(tenant: &str) -> SealResult<Vec<String>> {
    let caller = citus::caller_parsing()?;
    let ids = as_owner(|| {
        citus::with_remote_parsing_pinned(caller.as_ref(), || {
        Ok(Spi::get_one_with_args::<Vec<String>>(
            "WITH d AS (UPDATE pgseal.tenant_keys SET state = 'destroyed', wrapped = NULL, kek_version = NULL, \
                 destroyed_at = pg_catalog.now() \
             WHERE tenant_id = $1 AND purpose = 'dek' AND state <> 'destroyed' RETURNING key_id) \
             SELECT pg_catalog.array_agg(d.key_id ORDER BY d.key_id) FROM d",
            &[tenant.into()],
        )?)
        })
    })?
    .unwrap_or_default();
    note_written(true);
    Ok(ids)
}

/// Runs `f` with hash and merge joins off (as SET LOCAL), then sets them back to
/// what they were. An error in `f` aborts the (sub)transaction, which undoes the
/// settings as well.
fn with_nested_loops<R>(f: impl FnOnce() -> Result<R, pgrx::spi::Error>) -> SealResult<R> {
    let (hash, merge) = Spi::get_two::<String, String>(
        "SELECT pg_catalog.current_setting('enable_hashjoin'), pg_catalog.current_setting('enable_mergejoin')",
    )?;
    Spi::run(
        "SELECT pg_catalog.set_config('enable_hashjoin', 'off', true), \
                pg_catalog.set_config('enable_mergejoin', 'off', true)",
    )?;
    let r = f()?;
    Spi::run_with_args(
        "SELECT pg_catalog.set_config('enable_hashjoin', $1, true), \
                pg_catalog.set_config('enable_mergejoin', $2, true)",
        &[
            hash.unwrap_or_else(|| "on".into()).into(),
            merge.unwrap_or_else(|| "on".into()).into(),
        ],
    )?;
    Ok(r)
}

/// Rewraps up to `batch` keys not under the active master version; returns how many,
/// and when keys moved, the payload of the one `key.rewrapped` entry the caller
/// appends to the system chain (`_pgseal`), with counts per tenant. Not one entry per tenant: each would hold that
/// tenant's chain lock until commit, and a batch over thousands of tenants would run
/// out of PostgreSQL's shared lock table (`max_locks_per_transaction` × connections).
pub fn kek_rewrap(batch: i32) -> SealResult<(i32, Option<serde_json::Value>)> {
    if batch <= 0 {
        return Err(SealError::InvalidArgument("batch must be positive"));
    }
    let active = master::with_active(|v, _| Ok(v))? as i32;
    // tenant → (data keys, ledger keys, checkpoint keys, master versions they were under)
    let mut moved: Moved = Default::default();
    let caller = citus::caller_parsing()?;
    let n = as_owner(|| -> SealResult<i32> {
        citus::with_remote_parsing_pinned(caller.as_ref(), || {
            rewrap_batch(batch, active, &mut moved)
        })
    })?;
    if !moved.is_empty() {
        let mut from_versions = std::collections::BTreeSet::new();
        let mut checkpoint_keys = 0;
        let mut tenants = serde_json::Map::new();
        for (tenant, (dek, ledger, checkpoint, from)) in moved {
            from_versions.extend(from);
            checkpoint_keys += checkpoint;
            if dek + ledger > 0 {
                tenants.insert(tenant, serde_json::json!({ "dek": dek, "ledger": ledger }));
            }
        }
        let payload = serde_json::json!({
            "keys": n,
            "kek_version": active,
            "from_versions": from_versions,
            "checkpoint": checkpoint_keys,
            "tenants": tenants,
        });
        return Ok((n, Some(payload)));
    }
    Ok((n, None))
}

/// Per tenant: (data keys, ledger keys, checkpoint keys, master versions they were under).
type Moved = std::collections::BTreeMap<String, (i64, i64, i64, std::collections::BTreeSet<i32>)>;

/// One batch of `kek_rewrap`, as the owner: rewraps up to `batch` keys not under
/// master version `active` and counts them into `moved`; returns how many.
fn rewrap_batch(batch: i32, active: i32, moved: &mut Moved) -> SealResult<i32> {
    // connect_mut: a locking read must not run as a read-only SPI query, which
    // pgrx would choose when this (sub)transaction has no xid yet.
    // Two range scans of `tenant_keys_kek_version` (kek_version, key_id), below
    // the active version and then above it, each stopping after the rows it
    // returns: keys already rewrapped are under the active version, outside
    // both ranges, so a batch reads only what is left (a scan in key_id order
    // with a filter read every key rewrapped so far, on every batch).
    let rows: Vec<StoredKey> = Spi::connect_mut(|client| -> SealResult<Vec<StoredKey>> {
        let mut rows = Vec::new();
        for range in ["<", ">"] {
            let want = batch as usize - rows.len();
            if want == 0 {
                break;
            }
            let table = client.update(
                &format!(
                    "SELECT {COLUMNS} FROM pgseal.tenant_keys WHERE state <> 'destroyed' AND kek_version {range} $1 \
                     ORDER BY kek_version, key_id LIMIT $2 FOR UPDATE SKIP LOCKED"
                ),
                None,
                &[active.into(), (want as i32).into()],
            )?;
            for row in table {
                rows.push(row_to_key(&row)?);
            }
        }
        Ok(rows)
    })?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut blobs = Vec::with_capacity(rows.len());
    master::with_ring(|ring| {
        let pref = crate::gucs::preferred_master_version();
        let (ver, kek) = ring
            .active(pref)
            .ok_or(SealError::MasterVersionMissing(pref.unwrap_or(0)))?;
        for r in &rows {
            let key = r.unwrap_key_with(ring)?;
            let label = WrapLabel {
                purpose: r.purpose,
                tenant: &r.tenant,
                key_id: &r.key_id,
                kek_version: ver,
            };
            ids.push(r.key_id.clone());
            blobs.push(wrap::wrap(kek, label, &key));
            let m = moved.entry(r.tenant.clone()).or_default();
            match r.purpose {
                Purpose::Dek => m.0 += 1,
                Purpose::Ledger => m.1 += 1,
                // The database's checkpoint key (tenant `_pgseal`).
                Purpose::Checkpoint => m.2 += 1,
            }
            m.3.extend(r.kek_version);
        }
        Ok(())
    })?;
    let n = ids.len() as i32;
    // One primary-key probe per key. The planner, which sees the batch's size,
    // otherwise hashes it and joins it with a scan of the whole table: work in
    // proportion to every key there is, on every batch.
    with_nested_loops(|| {
        Spi::run_with_args(
            "UPDATE pgseal.tenant_keys k SET wrapped = u.wrapped, kek_version = $3 \
             FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.bytea[])) AS u(key_id, wrapped) WHERE k.key_id = u.key_id",
            &[ids.into(), blobs.into(), active.into()],
        )
    })?;
    Ok(n)
}

/// Writes seal counts (per key id) into this node's `pgseal._seal_counts_outbox`,
/// in the running transaction (`cache::write_seal_counts`, on a Citus worker): a
/// plain table of this node, which Citus leaves alone.
pub fn put_in_outbox(ids: &[String], counts: &[i64]) -> SealResult<()> {
    as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO pgseal._seal_counts_outbox (key_id, seals) \
             SELECT u.key_id, u.n FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), \
                                                 pg_catalog.unnest($2::pg_catalog.int8[])) AS u(key_id, n)",
            &[ids.to_vec().into(), counts.to_vec().into()],
        )?;
        Ok(())
    })
}

/// Adds a transaction's seals to its keys' totals (never below the shared total).
const ADD_ENCRYPTIONS: &str = "UPDATE pgseal.tenant_keys k SET encryptions = GREATEST(k.encryptions OPERATOR(pg_catalog.+) u.n, u.total) \
     FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.int8[]), \
                     pg_catalog.unnest($3::pg_catalog.int8[])) AS u(key_id, n, total) \
     WHERE k.key_id OPERATOR(pg_catalog.=) u.key_id";

/// Writes per-key encryption counts back (once per transaction, at pre-commit):
/// each key's count becomes the larger of its count plus `adds` and its shared total
/// (NULL when the key has none; `GREATEST` ignores NULL).
pub fn add_encryptions(
    ids: Vec<String>,
    adds: Vec<i64>,
    totals: Vec<Option<i64>>,
) -> SealResult<()> {
    // Where keys are read as committed now (`select_latest`: without Citus, or
    // before `citus_distribute()`), under a snapshot taken now: such a key may be
    // newer than a REPEATABLE READ transaction's snapshot, whose UPDATE would not
    // see its row and lose its count.
    if !citus::present() || matches!(as_owner(key_table)?, KeyTable::Local) {
        return as_owner(|| {
            use crate::pg::plans::{INT8_ARRAY, TEXT_ARRAY};
            crate::pg::plans::run_latest(
                ADD_ENCRYPTIONS,
                &[TEXT_ARRAY, INT8_ARRAY, INT8_ARRAY],
                &[ids.into(), adds.into(), totals.into()],
            )
            .map(|_| ())
        });
    }
    let caller = citus::caller_parsing()?;
    as_owner(|| {
        citus::with_remote_parsing_pinned(caller.as_ref(), || {
            Spi::run_with_args(ADD_ENCRYPTIONS, &[ids.into(), adds.into(), totals.into()])?;
            Ok(())
        })
    })
}
