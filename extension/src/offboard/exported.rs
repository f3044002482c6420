//! What an offboarding's deletes may take: the rows its export held, recorded as the
//! export read them (`pgseal.offboard_export_rows`), written and read only here, as
//! the extension owner (sql/offboarding.sql).
//!
//! A row is identified by its `tableoid ctid xmin` (`row_key`): the table, the place
//! and the inserting transaction of the row version the export read. An update, a
//! delete and a new insert all make a new version (a new place, a new transaction),
//! so a row changed or replaced since the export never matches. Freezing keeps a
//! tuple's raw xmin, which the `xmin` column shows, so a row frozen after the export
//! still matches. A rewrite (VACUUM FULL, CLUSTER) keeps each row's xmin and may move
//! rows: a key then matches only a row of the same inserting transaction unchanged
//! since, which the export held as it is. A key's xmin is a 32-bit number, which
//! names one transaction only within 2^31 of now: a record older than 2^30
//! transactions is refused, and a row whose xmin was handed out after the export is
//! never taken (a frozen row's raw xmin from an earlier epoch can read the same).
//! Only heap tables' rows have keys (`keys`); a Citus table's are its shards'
//! nodes' (or, where Citus keeps copies of its rows, one for all, counted). A dump
//! and restore does not carry the record.

use pgrx::prelude::*;

use crate::error::{SealError, SealResult};
use crate::privilege::as_owner;

/// A row's key, over the table alias `alias`: its table, place and inserting
/// transaction (for a heap table of this node: `keys`), as `_offboard_row_key` packs
/// them.
pub(super) fn row_key(alias: &str) -> String {
    format!("pgseal._offboard_row_key({alias}.tableoid, {alias}.ctid, {alias}.xmin)")
}

/// `pgseal._offboard_row_key(rel, place, xmin) → bytea`: a row's table, place and
/// inserting transaction packed in 14 bytes (big-endian: the table's OID, the
/// place's block and offset, the transaction), so that a batch compares each row's
/// key with the batch's hashed set without printing three values as text. A pure
/// function of its arguments, which the statements run as a table's owner call.
#[pg_extern(immutable, strict, parallel_safe)]
fn _offboard_row_key(
    rel: pg_sys::Oid,
    place: pg_sys::ItemPointerData,
    xmin: pg_sys::TransactionId,
) -> Vec<u8> {
    let (block, offset) = pgrx::itemptr::item_pointer_get_both(place);
    let mut key = Vec::with_capacity(14);
    key.extend_from_slice(&rel.to_u32().to_be_bytes());
    key.extend_from_slice(&block.to_be_bytes());
    key.extend_from_slice(&offset.to_be_bytes());
    key.extend_from_slice(&xmin.into_inner().to_be_bytes());
    key
}

/// `pgseal._offboard_node_row_key(rel, place, xmin) → bytea`: `_offboard_row_key`
/// followed by this node's system identifier (8 bytes, big-endian), for the rows
/// of a table Citus manages, evaluated on the node that holds each shard: a shard's
/// table OID, a row's place and inserting transaction are that node's numbers, and
/// the identifier, fixed when the node's data directory was made, tells the nodes
/// apart. The same for the same arguments on a node, so immutable (Citus runs no
/// other function of a row's columns in a distributed DELETE).
#[pg_extern(immutable, strict, parallel_safe)]
fn _offboard_node_row_key(
    rel: pg_sys::Oid,
    place: pg_sys::ItemPointerData,
    xmin: pg_sys::TransactionId,
) -> Vec<u8> {
    let mut key = _offboard_row_key(rel, place, xmin);
    // SAFETY: reads the system identifier the server read from its control file
    // at start; it does not change while the server runs.
    let node = unsafe { pg_sys::GetSystemIdentifier() };
    key.extend_from_slice(&node.to_be_bytes());
    key
}

/// How the export keys the rows of registered table `rel`, as an expression over
/// the alias `alias` (None: no key, and its rows are never deleted: they stop the
/// deletes for an administrator).
///
/// - A heap table of this node: `row_key`, which the deletes go by (its rows'
///   places, a TID scan).
/// - A heap table Citus manages whose shards have one copy each (a distributed
///   table): `_offboard_node_row_key` evaluated on the node that holds each shard,
///   so that no two nodes' rows share a key. The deletes send the keys to the
///   shards and take the rows that have them (`Table::delete_on_citus`).
/// - A heap table Citus keeps copies of (a reference table, or shards replicated):
///   each copy holds the rows at places of its own, and which copy a read or a
///   delete's `RETURNING` comes from is Citus's choice, so every row has the same
///   key, and the deletes take the tenant's rows in one statement when as many are
///   there as the export read (counts alone: docs/SCALING.md says what that leaves).
/// - A table of whose tree a member stores rows other than in the heap (a foreign
///   table's rows have no place or transaction of this server's, and another
///   access method's row places need not mean what a heap's do): none.
pub(super) fn keys(rel: pg_sys::Oid, alias: &str) -> SealResult<Option<String>> {
    let tree: Vec<pg_sys::Oid> = super::tree_of(rel)?.iter().map(|m| m.rel).collect();
    let heap = as_owner(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
                                 WHERE c.oid OPERATOR(pg_catalog.=) ANY ($1) \
                                   AND (c.relkind OPERATOR(pg_catalog.=) 'f' \
                                        OR (c.relkind IN ('r', 'm') AND c.relam OPERATOR(pg_catalog.<>) $2::pg_catalog.oid)))",
            &[tree.into(), pg_sys::HEAP_TABLE_AM_OID.into()],
        )
    })? == Some(true);
    if !heap {
        return Ok(None);
    }
    if !crate::pg::citus::manages(rel)? {
        return Ok(Some(row_key(alias)));
    }
    Ok(Some(if crate::pg::citus::has_copies(rel)? {
        COPIES_KEY.to_owned()
    } else {
        format!("pgseal._offboard_node_row_key({alias}.tableoid, {alias}.ctid, {alias}.xmin)")
    }))
}

/// The one key recorded for every row of a table Citus keeps copies of (each copy
/// holds its rows at its own places): such a table is compared by count.
const COPIES_KEY: &str = "pg_catalog.decode('00', 'hex')";

/// The place (`ctid`, as text) in a key `_offboard_row_key` packed.
pub(super) fn place_of(key: &[u8]) -> SealResult<String> {
    let bad = || SealError::Internal("an exported row's key");
    let block = u32::from_be_bytes(
        key.get(4..8)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let offset = u16::from_be_bytes(
        key.get(8..10)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    Ok(format!("({block},{offset})"))
}

/// Forgets what the tenant's last export recorded (a new export begins, or the
/// deletes are done).
pub(super) fn clear(tenant: &str) -> SealResult<()> {
    Ok(as_owner(|| {
        Spi::run_with_args(
            "DELETE FROM pgseal.offboard_export_rows WHERE tenant_id = $1",
            &[tenant.into()],
        )
    })?)
}

/// Records chunk `chunk` of the tenant's export: the keys of rows read through
/// the registered table `root`.
pub(super) fn record(
    tenant: &str,
    chunk: i32,
    root: pg_sys::Oid,
    horizon: i64,
    keys: Vec<Vec<u8>>,
) -> SealResult<()> {
    Ok(as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO pgseal.offboard_export_rows (tenant_id, chunk, root, horizon, keys) \
             VALUES ($1, $2, $3, $4::pg_catalog.text::pg_catalog.xid8, $5)",
            &[
                tenant.into(),
                chunk.into(),
                root.into(),
                horizon.to_string().into(),
                keys.into(),
            ],
        )
    })?)
}

/// The first transaction the caller's latest snapshot cannot see (its xmax, or past
/// the caller's own transaction, whose rows it sees), as a full transaction id:
/// read just after a cursor opened, every row the cursor reads was inserted before.
pub(super) fn horizon() -> SealResult<i64> {
    as_owner(|| {
        Spi::get_one::<i64>(
            "SELECT GREATEST(pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::pg_catalog.text::pg_catalog.int8, \
                             COALESCE(pg_catalog.pg_current_xact_id_if_assigned()::pg_catalog.text::pg_catalog.int8 \
                                      OPERATOR(pg_catalog.+) 1, 0))",
        )
    })?
    .ok_or(SealError::Internal("a snapshot's horizon"))
}

/// The number of rows recorded for the tenant and the sum of their keys' 64-bit
/// hashes (`hashtextextended`), to compare with the same over the tables' rows
/// (`Digest`).
pub(super) fn digest(tenant: &str) -> SealResult<Digest> {
    let digest = as_owner(|| {
        Spi::get_one_with_args::<String>(
            &format!(
                "SELECT {} FROM pgseal.offboard_export_rows e, pg_catalog.unnest(e.keys) k WHERE e.tenant_id = $1",
                Digest::sql_of("k")
            ),
            &[tenant.into()],
        )
    })?;
    Digest::parse(digest)
}

/// A count of keyed rows and the sum of their keys' hashes: equal for the rows the
/// export recorded and the rows in the tables when none was written, changed or
/// removed since (a collision only lets the deletes begin; they still take no row
/// that is not the version exported).
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
pub(super) struct Digest {
    pub rows: i64,
    pub sum: i128,
}

impl Digest {
    /// The digest of the keys `key` (an expression; NULLs left out), as text:
    /// the count and the sum.
    pub(super) fn sql_of(key: &str) -> String {
        format!(
            "pg_catalog.count({key})::pg_catalog.text OPERATOR(pg_catalog.||) ' ' OPERATOR(pg_catalog.||) \
             COALESCE(pg_catalog.sum(pg_catalog.hashtextextended(pg_catalog.encode({key}, 'hex'), 0)), 0)::pg_catalog.text"
        )
    }

    pub(super) fn parse(digest: Option<String>) -> SealResult<Digest> {
        let bad = || SealError::Internal("a digest of row keys");
        let digest = digest.ok_or_else(bad)?;
        let (rows, sum) = digest.split_once(' ').ok_or_else(bad)?;
        Ok(Digest {
            rows: rows.parse().map_err(|_| bad())?,
            sum: sum.parse().map_err(|_| bad())?,
        })
    }

    pub(super) fn add(self, other: Digest) -> Digest {
        Digest {
            rows: self.rows + other.rows,
            sum: self.sum + other.sum,
        }
    }
}

/// Takes (removes) up to `batch` of the tenant's recorded keys, all of one
/// registered table: the first table the export read (`delete::delete_order`), its
/// keys last-read first. Returns the table and the keys, or None when none is left.
/// Removed in the caller's transaction, which deletes by them: a batch rolled back
/// puts them back. Refuses (55000) a record older than 2^30 transactions.
///
/// With the keys comes the table's export horizon (`horizon`, a full transaction
/// id; `Table::delete_exported`). `batch` `i32::MAX` takes all the table's keys, up
/// to `WHOLE_TABLE_KEYS` (more are refused, 55000).
pub(super) fn take(tenant: &str, batch: i32) -> SealResult<Option<Taken>> {
    let batch = usize::try_from(batch).unwrap_or(0);
    let mut taken: Vec<Vec<u8>> = Vec::new();
    let mut root: Option<pg_sys::Oid> = None;
    let mut horizon = 0i64;
    while taken.len() < batch {
        if taken.len() > WHOLE_TABLE_KEYS {
            return Err(SealError::Refused(
                "a table whose foreign key references itself is deleted from in one statement, and this one holds more than 1,000,000 of the tenant's exported rows (delete them by hand, or drop the key for the offboarding)",
            ));
        }
        let last = as_owner(|| {
            Spi::connect(|c| {
                let rows = c.select(
                    "SELECT e.chunk, e.root, e.keys, \
                            pg_catalog.pg_current_xact_id()::pg_catalog.text::pg_catalog.numeric \
                              OPERATOR(pg_catalog.-) e.horizon::pg_catalog.text::pg_catalog.numeric \
                              OPERATOR(pg_catalog.>) 1073741824, \
                            e.horizon::pg_catalog.text::pg_catalog.int8 \
                       FROM pgseal.offboard_export_rows e \
                      WHERE e.tenant_id = $1 \
                        AND e.root OPERATOR(pg_catalog.=) COALESCE($2, (SELECT f.root FROM pgseal.offboard_export_rows f \
                                                  WHERE f.tenant_id = $1 ORDER BY f.chunk LIMIT 1)) \
                      ORDER BY e.chunk DESC LIMIT 1",
                    None,
                    &[tenant.into(), root.into()],
                )?;
                let mut out = None;
                for r in rows {
                    out = Some((
                        r.get::<i32>(1)?.unwrap_or_default(),
                        r.get::<pg_sys::Oid>(2)?.unwrap_or_default(),
                        r.get::<pgrx::Array<&[u8]>>(3)?
                            .map(|a| {
                                a.iter()
                                    .map(|k| k.unwrap_or_default().to_vec())
                                    .collect::<Vec<Vec<u8>>>()
                            })
                            .unwrap_or_default(),
                        r.get::<bool>(4)?.unwrap_or(true),
                        r.get::<i64>(5)?.unwrap_or(0),
                    ));
                }
                Ok::<_, pgrx::spi::Error>(out)
            })
        })?;
        let Some((chunk, chunk_root, mut keys, too_old, chunk_horizon)) = last else {
            break;
        };
        if too_old {
            return Err(SealError::Refused(
                "the tenant's export was read more than 2^30 transactions ago: its rows' transactions can no longer be told apart (export and delete the rows left by hand)",
            ));
        }
        root = Some(chunk_root);
        horizon = chunk_horizon;
        let need = batch - taken.len();
        if keys.len() <= need {
            as_owner(|| {
                Spi::run_with_args(
                    "DELETE FROM pgseal.offboard_export_rows WHERE tenant_id = $1 AND chunk = $2",
                    &[tenant.into(), chunk.into()],
                )
            })?;
        } else {
            let rest = keys.len() - need;
            let first = keys[..rest].to_vec();
            keys.drain(..rest);
            as_owner(|| {
                Spi::run_with_args(
                    "UPDATE pgseal.offboard_export_rows SET keys = $3 WHERE tenant_id = $1 AND chunk = $2",
                    &[tenant.into(), chunk.into(), first.into()],
                )
            })?;
        }
        keys.reverse();
        taken.append(&mut keys);
    }
    Ok(root.map(|root| Taken {
        root,
        keys: taken,
        horizon,
    }))
}

/// Takes (removes) all the keys recorded for the registered table `root`, a table
/// Citus keeps copies of, and returns how many there were, in the caller's
/// transaction; None when they are not all that form's one key (the export read
/// the table when Citus kept one copy of its rows).
pub(super) fn take_count(tenant: &str, root: pg_sys::Oid) -> SealResult<Option<i64>> {
    let (rows, alike) = as_owner(|| {
        Spi::get_two_with_args::<i64, bool>(
            &format!(
                "WITH e AS (DELETE FROM pgseal.offboard_export_rows e \
                             WHERE e.tenant_id = $1 AND e.root OPERATOR(pg_catalog.=) $2 RETURNING e.keys) \
                 SELECT pg_catalog.count(*), COALESCE(pg_catalog.bool_and(k OPERATOR(pg_catalog.=) {COPIES_KEY}), true) \
                   FROM e, pg_catalog.unnest(e.keys) k"
            ),
            &[tenant.into(), root.into()],
        )
    })?;
    Ok((alike == Some(true)).then_some(rows.unwrap_or(0)))
}

/// The length of a key `_offboard_node_row_key` makes.
pub(super) const NODE_KEY_LEN: usize = 22;

/// How many keys are recorded for the registered table `root`.
pub(super) fn count(tenant: &str, root: pg_sys::Oid) -> SealResult<i64> {
    Ok(as_owner(|| {
        Spi::get_one_with_args::<i64>(
            "SELECT COALESCE(pg_catalog.sum(pg_catalog.cardinality(e.keys)), 0)::pg_catalog.int8 \
               FROM pgseal.offboard_export_rows e WHERE e.tenant_id = $1 AND e.root OPERATOR(pg_catalog.=) $2",
            &[tenant.into(), root.into()],
        )
    })?
    .unwrap_or(0))
}

/// What `take` took: the registered table, its keys, and its export horizon.
pub(super) struct Taken {
    pub root: pg_sys::Oid,
    pub keys: Vec<Vec<u8>>,
    pub horizon: i64,
}

/// The most keys `take` gathers for one statement over a whole table.
const WHOLE_TABLE_KEYS: usize = 1_000_000;

/// The registered table whose keys `take` takes next, if any are left.
pub(super) fn first_root(tenant: &str) -> SealResult<Option<pg_sys::Oid>> {
    match as_owner(|| {
        Spi::get_one_with_args::<pg_sys::Oid>(
            "SELECT root FROM pgseal.offboard_export_rows WHERE tenant_id = $1 ORDER BY chunk LIMIT 1",
            &[tenant.into()],
        )
    }) {
        Ok(r) => Ok(r),
        Err(pgrx::spi::Error::InvalidPosition) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
