//! What an offboarding's deletes may take: the rows its export held, recorded as the
//! export read them (`pgseal.offboard_export_rows`), and the transactions of the
//! delete batches that took some (`pgseal.offboard_delete_xacts`), whose writes to
//! the exported tables come from rows the export held. Both tables are written and
//! read only here, as the extension owner (sql/offboarding.sql).
//!
//! A row is identified by its `tableoid ctid xmin`, as `concat_ws(' ', …)` prints
//! them (`row_key`): the table, the place and the inserting transaction of the row
//! version the export read. An update, a delete and a new insert all make a new
//! version (a new place, a new transaction), so a row changed or replaced since the
//! export never matches. Freezing keeps a tuple's raw xmin, which the `xmin` column
//! shows, so a row frozen after the export still matches. A rewrite (VACUUM FULL,
//! CLUSTER, a dump and restore) moves every row: nothing matches, and the offboarding
//! exports again or stops rather than delete.

use pgrx::prelude::*;

use crate::error::{SealError, SealResult};
use crate::privilege::as_owner;

/// A row's key, over the table alias `alias`: its table, place and inserting
/// transaction.
pub(super) fn row_key(alias: &str) -> String {
    format!("pg_catalog.concat_ws(' ', {alias}.tableoid, {alias}.ctid, {alias}.xmin)")
}

/// The place (`ctid`, as text) in a key `row_key` printed.
pub(super) fn place_of(key: &str) -> SealResult<&str> {
    key.split(' ')
        .nth(1)
        .ok_or(SealError::Internal("an exported row's key"))
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
    keys: Vec<String>,
) -> SealResult<()> {
    Ok(as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO pgseal.offboard_export_rows (tenant_id, chunk, root, keys) VALUES ($1, $2, $3, $4)",
            &[tenant.into(), chunk.into(), root.into(), keys.into()],
        )
    })?)
}

/// The number of rows recorded for the tenant and the sum of their keys' 64-bit
/// hashes (`hashtextextended`), to compare with the same over the tables' rows
/// (`Digest`).
pub(super) fn digest(tenant: &str) -> SealResult<Digest> {
    let (rows, sum) = as_owner(|| {
        Spi::get_two_with_args::<i64, String>(
            "SELECT pg_catalog.count(*), COALESCE(pg_catalog.sum(pg_catalog.hashtextextended(k, 0)), 0)::pg_catalog.text \
               FROM pgseal.offboard_export_rows e, pg_catalog.unnest(e.keys) k WHERE e.tenant_id = $1",
            &[tenant.into()],
        )
    })?;
    Digest::of(rows, sum)
}

/// A count of rows and the sum of their keys' hashes: equal for the rows the export
/// recorded and the rows in the tables when none was written, changed or removed
/// since (a collision only lets the deletes begin; they still take no row that is
/// not the version exported).
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
pub(super) struct Digest {
    pub rows: i64,
    pub sum: i128,
}

impl Digest {
    /// The hash sum over the table alias `x`, as a select-list item (`Digest::of`
    /// reads it as text).
    pub(super) fn sum_sql() -> String {
        format!(
            "COALESCE(pg_catalog.sum(pg_catalog.hashtextextended({}, 0)), 0)",
            row_key("x")
        )
    }

    pub(super) fn of(rows: Option<i64>, sum: Option<String>) -> SealResult<Digest> {
        let sum = sum
            .unwrap_or_else(|| "0".to_owned())
            .parse::<i128>()
            .map_err(|_| SealError::Internal("a sum of row hashes"))?;
        Ok(Digest {
            rows: rows.unwrap_or(0),
            sum,
        })
    }

    pub(super) fn add(self, other: Digest) -> Digest {
        Digest {
            rows: self.rows + other.rows,
            sum: self.sum + other.sum,
        }
    }
}

/// Takes (removes) up to `batch` of the tenant's recorded keys, in the order the
/// export read them, all of one registered table: returns the table and the keys,
/// or None when none is left. Removed in the caller's transaction, which deletes
/// by them: a batch rolled back puts them back.
pub(super) fn take(tenant: &str, batch: i32) -> SealResult<Option<(pg_sys::Oid, Vec<String>)>> {
    let batch = usize::try_from(batch).unwrap_or(0);
    let mut taken: Vec<String> = Vec::new();
    let mut root: Option<pg_sys::Oid> = None;
    while taken.len() < batch {
        let first = as_owner(|| {
            Spi::connect(|c| {
                let rows = c.select(
                    "SELECT chunk, root, keys FROM pgseal.offboard_export_rows \
                      WHERE tenant_id = $1 ORDER BY chunk LIMIT 1",
                    None,
                    &[tenant.into()],
                )?;
                let mut out = None;
                for r in rows {
                    out = Some((
                        r.get::<i32>(1)?.unwrap_or_default(),
                        r.get::<pg_sys::Oid>(2)?.unwrap_or_default(),
                        r.get::<Vec<String>>(3)?.unwrap_or_default(),
                    ));
                }
                Ok::<_, pgrx::spi::Error>(out)
            })
        })?;
        let Some((chunk, chunk_root, mut keys)) = first else {
            break;
        };
        if root.is_some_and(|r| r != chunk_root) {
            break;
        }
        root = Some(chunk_root);
        let need = batch - taken.len();
        if keys.len() <= need {
            as_owner(|| {
                Spi::run_with_args(
                    "DELETE FROM pgseal.offboard_export_rows WHERE tenant_id = $1 AND chunk = $2",
                    &[tenant.into(), chunk.into()],
                )
            })?;
            taken.append(&mut keys);
        } else {
            let rest = keys.split_off(need);
            as_owner(|| {
                Spi::run_with_args(
                    "UPDATE pgseal.offboard_export_rows SET keys = $3 WHERE tenant_id = $1 AND chunk = $2",
                    &[tenant.into(), chunk.into(), rest.into()],
                )
            })?;
            taken.append(&mut keys);
        }
    }
    Ok(root.map(|r| (r, taken)))
}

/// Records the caller's transaction as one of the tenant's delete batches.
pub(super) fn add_xact(tenant: &str) -> SealResult<()> {
    Ok(as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO pgseal.offboard_delete_xacts VALUES ($1, pg_catalog.pg_current_xact_id()) \
             ON CONFLICT DO NOTHING",
            &[tenant.into()],
        )
    })?)
}

/// The tenant's delete batches' transactions (as `xid` text) other than the
/// caller's, and less than 2^30 transactions old: a row's `xmin` is compared with
/// them as a 32-bit number, which names one transaction only within 2^31 of now
/// (an older one is left out, and its rows stop the deletes instead).
pub(super) fn earlier_xacts(tenant: &str) -> SealResult<Vec<String>> {
    Ok(as_owner(|| {
        Spi::get_one_with_args::<Vec<String>>(
            "SELECT COALESCE(pg_catalog.array_agg(pg_catalog.xid(d.xact)::pg_catalog.text), '{}') \
               FROM pgseal.offboard_delete_xacts d \
              WHERE d.tenant_id = $1 AND d.xact OPERATOR(pg_catalog.<>) pg_catalog.pg_current_xact_id() \
                AND pg_catalog.pg_current_xact_id()::pg_catalog.text::pg_catalog.numeric \
                    OPERATOR(pg_catalog.-) d.xact::pg_catalog.text::pg_catalog.numeric \
                    OPERATOR(pg_catalog.<) 1073741824",
            &[tenant.into()],
        )
    })?
    .unwrap_or_default())
}

/// Forgets the tenant's delete batches' transactions (its deletes are done).
pub(super) fn clear_xacts(tenant: &str) -> SealResult<()> {
    Ok(as_owner(|| {
        Spi::run_with_args(
            "DELETE FROM pgseal.offboard_delete_xacts WHERE tenant_id = $1",
            &[tenant.into()],
        )
    })?)
}
