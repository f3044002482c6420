//! The delete step of an offboarding: `_offboard_delete` takes only rows the
//! tenant's export held, as it read them (`exported`), so no row is deleted
//! unexported: not one the application wrote or changed after the export, not one
//! of a table registered or a partition attached since, not one a trigger put back.
//!
//! A batch takes the next keys the export recorded for one registered table and
//! deletes, as the table's owner (restricted), the rows still at those places with
//! those inserting transactions (a TID scan). Its transaction is recorded when it
//! deleted some. Once the keys are used up, rows that those batches wrote or changed
//! in the exported tables (a foreign key's ON DELETE SET NULL, a trigger's counter)
//! are deleted too, by batches that record no transaction, so rows their own
//! triggers write stay. Any row of the tenant left then was not in the export as it
//! is: while nothing was deleted the offboarding goes back to exporting, and
//! otherwise it stops (55000, naming the table) for an administrator to export and
//! delete those rows by hand. Before the first row is deleted, the rows in the
//! tables are compared with the export's (`Digest`): a row written, changed or
//! removed since sends it back to exporting at once.

use pgrx::prelude::*;

use super::exported::{self, Digest};
use super::{require_context, require_step, tables, tree_of, Table};
use crate::error::{OrRaise, SealError, SealResult};
use crate::privilege::{as_owner, as_table_owner};

/// `pgseal._offboard_delete(tenant, batch)`: at step 'exported', deletes up to
/// `batch` of the tenant's rows that its export held (as each table's owner),
/// counts them in the offboarding, and returns how many (0: none left, or the
/// offboarding went back to exporting).
#[pg_extern(volatile, parallel_unsafe)]
fn _offboard_delete(tenant: Option<&str>, batch: Option<i32>) -> i64 {
    (|| {
        let tenant = super::checked(tenant, "_offboard_delete")?;
        let batch = batch.filter(|b| *b > 0).ok_or(SealError::InvalidArgument(
            "batch must be a positive number",
        ))?;
        require_step(&tenant, "exported")?;
        require_context(&tenant)?;
        let tables = tables()?;
        if nothing_deleted_yet(&tenant)? && export_differs(&tenant, &tables)? {
            super::export_again(&tenant)?;
            return Ok(0);
        }
        while let Some((root, keys)) = exported::take(&tenant, batch)? {
            // A table no longer registered (or dropped) is no longer offboarded:
            // its keys go unused.
            let Some(t) = tables.iter().find(|t| t.rel == root) else {
                continue;
            };
            let name = checked_for_delete(t)?;
            let n = t.delete_exported(&tenant, &name, keys)?;
            if n > 0 {
                exported::add_xact(&tenant)?;
                super::count_deleted(&tenant, &name, n)?;
                return Ok(n);
            }
        }
        let xacts = exported::earlier_xacts(&tenant)?;
        let exported_tables = export_tables(&tenant)?;
        let mut left: Option<&Table> = None;
        for t in &tables {
            let name = checked_for_delete(t)?;
            if crate::pg::citus::manages(t.rel)? {
                let n = t.delete_all(&tenant, &name)?;
                if n > 0 {
                    super::count_deleted(&tenant, &name, n)?;
                    return Ok(n);
                }
                continue;
            }
            let (candidates, rows) = t.left(&tenant, &exported_tables, &xacts)?;
            if candidates > 0 {
                let n = t.delete_written_by_batches(&tenant, &name, &exported_tables, &xacts, batch)?;
                if n > 0 {
                    super::count_deleted(&tenant, &name, n)?;
                    return Ok(n);
                }
            }
            if rows > 0 && left.is_none() {
                left = Some(t);
            }
        }
        match left {
            None => Ok(0),
            Some(_) if nothing_deleted_yet(&tenant)? => {
                super::export_again(&tenant)?;
                Ok(0)
            }
            Some(t) => Err(SealError::Refused(
                "rows of the tenant remain that its export does not hold as they are (written or changed since the export, in a table registered or attached since, or kept or put back by a trigger or rule): they are not deleted unexported (export and delete them, then run the offboarding again)",
            )
            .on_table(&t.holding(&tenant)?)),
        }
    })()
    .or_raise()
}

/// Whether the offboarding has deleted no row and never went past deleting: a new
/// export would still hold every row.
fn nothing_deleted_yet(tenant: &str) -> SealResult<bool> {
    Ok(as_owner(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT deleted OPERATOR(pg_catalog.=) '{}'::pg_catalog.jsonb AND NOT past_export \
               FROM pgseal.tenant_offboardings WHERE tenant_id = $1",
            &[tenant.into()],
        )
    })? == Some(true))
}

/// Whether the tenant's rows in the tables differ from those its export recorded
/// (by count and the sum of their keys' hashes).
fn export_differs(tenant: &str, tables: &[Table]) -> SealResult<bool> {
    let mut now = Digest::default();
    for t in tables {
        // The export records no key for a table Citus manages.
        if crate::pg::citus::manages(t.rel)? {
            continue;
        }
        let (rows, sum) = t.tally(tenant, "", &Digest::sum_sql(), Vec::new())?;
        now = now.add(Digest::of(Some(rows), sum)?);
    }
    Ok(now != exported::digest(tenant)?)
}

/// The tables the export read, every table under them included (`export_tables`).
fn export_tables(tenant: &str) -> SealResult<Vec<pg_sys::Oid>> {
    Ok(as_owner(|| {
        Spi::get_one_with_args::<Vec<pg_sys::Oid>>(
            "SELECT export_tables::pg_catalog.oid[] FROM pgseal.tenant_offboardings WHERE tenant_id = $1",
            &[tenant.into()],
        )
    })?
    .unwrap_or_default())
}

/// Locks `t`'s tree for the deletes and checks it: no third role's code runs as its
/// owner, the caller may DELETE from it, and no table outside the offboarded ones
/// that could be registered cascades from it. Returns its name as it is now.
fn checked_for_delete(t: &Table) -> SealResult<String> {
    let name = t.lock(pg_sys::RowExclusiveLock)?;
    crate::privilege::require_only_owners_code(t.rel, t.owner, pg_sys::RowExclusiveLock, &[])
        .and_then(|()| {
            crate::subjects::require_table_access(
                t.rel,
                t.owner,
                "DELETE",
                "_offboard_delete needs DELETE on every offboarded table",
            )
        })
        .map_err(|e| e.on_table(&name))?;
    refuse_cascades_out(t.rel)?;
    Ok(name)
}

/// Refuses (55000, naming it) a table outside `rel`'s tree with a text `tenant_id`
/// column (one an administrator can register) and a foreign key ON DELETE CASCADE
/// to a table of the tree: the deletes would take its rows unexported. A table
/// without one cannot be offboarded itself; its rows go with the rows they
/// reference, as the key says. The caller has locked the tree, so no partition
/// comes or goes between this check and the deletes.
fn refuse_cascades_out(rel: pg_sys::Oid) -> SealResult<()> {
    let members: Vec<pg_sys::Oid> = tree_of(rel)?.iter().map(|m| m.rel).collect();
    let cascading = as_owner(|| {
        Spi::get_one_with_args::<String>(
            "SELECT (SELECT c.conrelid::pg_catalog.regclass::pg_catalog.text FROM pg_catalog.pg_constraint c \
                      WHERE c.contype OPERATOR(pg_catalog.=) 'f' AND c.confdeltype OPERATOR(pg_catalog.=) 'c' \
                        AND c.confrelid OPERATOR(pg_catalog.=) ANY ($1) AND NOT c.conrelid OPERATOR(pg_catalog.=) ANY ($1) \
                        AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a \
                                     JOIN pg_catalog.pg_class r ON r.oid OPERATOR(pg_catalog.=) a.attrelid \
                                     JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) r.relnamespace \
                                     WHERE a.attrelid OPERATOR(pg_catalog.=) c.conrelid \
                                       AND a.attname OPERATOR(pg_catalog.=) 'tenant_id' AND NOT a.attisdropped \
                                       AND a.atttypid IN ('pg_catalog.text'::pg_catalog.regtype, 'pg_catalog.varchar'::pg_catalog.regtype) \
                                       AND r.relpersistence OPERATOR(pg_catalog.<>) 't' \
                                       AND n.nspname NOT IN ('pgseal', 'pg_catalog', 'information_schema')) \
                      ORDER BY 1 LIMIT 1)",
            &[members.into()],
        )
    })?;
    match cascading {
        None => Ok(()),
        Some(table) => Err(SealError::Refused(
            "a table outside the offboarded ones has a foreign key with ON DELETE CASCADE to one of them: the deletes would take its rows unexported (register it, or change the key's action)",
        )
        .on_table(&table)),
    }
}

impl Table {
    /// Deletes, as the owner, the tenant's rows of this table (named `name`,
    /// pinned) whose keys are `keys`: each still the row version the export read.
    /// A TID scan over their places; a partitioned table probes each partition.
    fn delete_exported(&self, tenant: &str, name: &str, keys: Vec<String>) -> SealResult<i64> {
        let places = keys
            .iter()
            .map(|k| exported::place_of(k).map(str::to_owned))
            .collect::<SealResult<Vec<String>>>()?;
        let key = exported::row_key("x");
        let sql = format!(
            "WITH d AS (DELETE FROM {name} AS x \
                         WHERE x.ctid OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.text[]::pg_catalog.tid[]) \
                           AND {key} OPERATOR(pg_catalog.=) ANY ($3::pg_catalog.text[]) \
                           AND x.tenant_id COLLATE pg_catalog.\"C\" OPERATOR(pg_catalog.=) $1::pg_catalog.text \
                        RETURNING 1) \
             SELECT pg_catalog.count(*) FROM d"
        );
        Ok(as_table_owner(self.owner, || {
            Spi::get_one_with_args::<i64>(&sql, &[tenant.into(), places.into(), keys.into()])
        })?
        .unwrap_or(0))
    }

    /// Deletes, as the owner, all the tenant's rows of this table, which Citus
    /// manages (one statement, sent to every node that holds them alike): a row's
    /// place and inserting transaction are another node's, so the export could
    /// record no key for them, and a row changed after the export is deleted as it
    /// is (docs/SCALING.md says so).
    fn delete_all(&self, tenant: &str, name: &str) -> SealResult<i64> {
        let sql = format!(
            "WITH d AS (DELETE FROM {name} AS x \
                         WHERE x.tenant_id COLLATE pg_catalog.\"C\" OPERATOR(pg_catalog.=) $1::pg_catalog.text \
                        RETURNING 1) \
             SELECT pg_catalog.count(*) FROM d"
        );
        Ok(as_table_owner(self.owner, || {
            Spi::get_one_with_args::<i64>(&sql, &[tenant.into()])
        })?
        .unwrap_or(0))
    }

    /// The condition, over alias `x`, of a row the delete batches wrote or changed
    /// in a table the export read ($2: those tables, $3: the batches'
    /// transactions).
    const WRITTEN_BY_BATCHES: &'static str =
        "x.tableoid OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.oid[]) \
         AND x.xmin OPERATOR(pg_catalog.=) ANY ($3::pg_catalog.text[]::pg_catalog.xid[])";

    /// The tenant's rows left in this table's tree: those the delete batches wrote
    /// or changed (`WRITTEN_BY_BATCHES`), and all.
    fn left(
        &self,
        tenant: &str,
        exported_tables: &[pg_sys::Oid],
        xacts: &[String],
    ) -> SealResult<(i64, i64)> {
        let (rows, written) = self.tally(
            tenant,
            "",
            &format!(
                "pg_catalog.count(*) FILTER (WHERE {})",
                Self::WRITTEN_BY_BATCHES
            ),
            vec![exported_tables.to_vec().into(), xacts.to_vec().into()],
        )?;
        let written = written
            .and_then(|w| w.parse::<i64>().ok())
            .ok_or(SealError::Internal("a count of rows"))?;
        Ok((written, rows))
    }

    /// Deletes, as the owner, up to `batch` of the tenant's rows of this table that
    /// the delete batches wrote or changed.
    fn delete_written_by_batches(
        &self,
        tenant: &str,
        name: &str,
        exported_tables: &[pg_sys::Oid],
        xacts: &[String],
        batch: i32,
    ) -> SealResult<i64> {
        let written = Self::WRITTEN_BY_BATCHES;
        let written_y = written.replace("x.", "y.");
        let sql = format!(
            "WITH d AS (DELETE FROM {name} AS x \
                         WHERE x.tenant_id COLLATE pg_catalog.\"C\" OPERATOR(pg_catalog.=) $1::pg_catalog.text \
                           AND {written} \
                           AND (x.tableoid, x.ctid) IN \
                               (SELECT y.tableoid, y.ctid FROM {name} AS y \
                                 WHERE y.tenant_id COLLATE pg_catalog.\"C\" OPERATOR(pg_catalog.=) $1::pg_catalog.text \
                                   AND {written_y} LIMIT $4) \
                        RETURNING 1) \
             SELECT pg_catalog.count(*) FROM d"
        );
        Ok(as_table_owner(self.owner, || {
            Spi::get_one_with_args::<i64>(
                &sql,
                &[
                    tenant.into(),
                    exported_tables.to_vec().into(),
                    xacts.to_vec().into(),
                    batch.into(),
                ],
            )
        })?
        .unwrap_or(0))
    }

    /// The name of the first table of this tree that holds rows of the tenant
    /// itself (the tree's root when none does alone).
    fn holding(&self, tenant: &str) -> SealResult<String> {
        for m in tree_of(self.rel)? {
            // SAFETY: a syscache lookup of a locked relation's kind.
            let kind = unsafe { pg_sys::get_rel_relkind(m.rel) } as u8;
            if kind == pg_sys::RELKIND_FOREIGN_TABLE || m.rows_of_only(tenant)? > 0 {
                return crate::privilege::pinned_name(m.rel, pg_sys::AccessShareLock);
            }
        }
        crate::privilege::pinned_name(self.rel, pg_sys::AccessShareLock)
    }
}
