//! The delete step of an offboarding: `_offboard_delete` takes only rows the
//! tenant's export held, as it read them (`exported`), so no row is deleted
//! unexported: not one the application wrote or changed after the export, not one
//! of a table registered or a partition attached since, not one a trigger put back.
//!
//! A batch takes the next keys the export recorded for one registered table and
//! deletes, as the table's owner (restricted), the rows still at those places with
//! those inserting transactions (a TID scan), and never a row inserted by a
//! transaction the export's cursor could not see. Tables come referencing before
//! referenced (the export reads them in that order), so that a foreign key's ON
//! DELETE action finds the rows that reference a deleted one already gone; a table
//! whose foreign key references its own tree goes in one statement. A batch that
//! changed, deleted, truncated or dropped any other row or table of the offboarded
//! ones (a foreign key's action, a trigger's counter) is refused (55000, which rolls
//! it back): that row may have changed since the export. Once the keys are used up,
//! any row of the tenant left was not in the export as it is: while nothing was
//! deleted and it differs from the export, the offboarding goes back to exporting,
//! and otherwise it stops (55000, naming the table) for an administrator to export
//! and delete those rows by hand. Before the first row is deleted, the rows in the
//! tables are compared with the export's (`Digest`): a row written, changed or
//! removed since sends it back to exporting at once.
//!
//! A distributed table's rows have keys of the nodes that hold them: a statement
//! sends up to `CITUS_STATEMENT_KEYS` of them (all, for a table whose foreign key
//! references its own tree) to the shards and deletes the tenant's rows that have
//! them, so a row written or changed since the export, or one a shard's own policy
//! hid from it (the offboarding checks the coordinator's policies), is left and
//! stops the deletes. A table Citus keeps copies of is compared by count. A foreign
//! key's ON DELETE action that would reach rows of an offboarded Citus table that
//! the export does not hold, counted just before the statement, stops them
//! (`delete_on_citus`; docs/SCALING.md says what that leaves).

use pgrx::prelude::*;

use super::exported::{self, Digest};
use super::{require_context, require_step, tables, tree_of, Table};
use crate::error::{OrRaise, SealError, SealResult};
use crate::privilege::as_owner;

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
        require_track_counts()?;
        // Every table locked and checked before anything is read or deleted.
        let tables = tables()?;
        let mut names = Vec::with_capacity(tables.len());
        let mut trees = Vec::with_capacity(tables.len());
        for t in &tables {
            names.push(checked_for_delete(&tenant, t)?);
            trees.push(tree_of(t.rel)?.iter().map(|m| m.rel).collect::<Vec<_>>());
        }
        refuse_cascades_out(&trees)?;
        if nothing_deleted_yet(&tenant)? && export_differs(&tenant, &tables)? {
            super::export_again(&tenant)?;
            return Ok(0);
        }
        let watched = watched_tables(&tenant, &trees)?;
        loop {
            // A table whose foreign key references its own tree goes in one
            // statement, which the key's action or check then finds nothing left
            // of (a tree's rows need not lie leaves last).
            let size = match exported::first_root(&tenant)? {
                None => break,
                Some(r) => {
                    let citus = crate::pg::citus::manages(r)?;
                    match tables.iter().position(|t| t.rel == r) {
                    Some(i) if citus && crate::pg::citus::has_copies(r)? => {
                        let read = exported::take_count(&tenant, r)?
                            .ok_or_else(|| copies_changed(&names[i].name))?;
                        let n = delete_on_citus(
                            &tenant,
                            &tables,
                            &trees,
                            &names,
                            i,
                            read,
                            CitusRows::Count(read),
                        )?;
                        if n > 0 {
                            return Ok(n);
                        }
                        continue;
                    }
                    Some(i) if acts_on_itself(&trees[i])? => i32::MAX,
                    Some(_) if citus => CITUS_STATEMENT_KEYS,
                    _ => batch,
                    }
                }
            };
            let Some(exported::Taken {
                root,
                keys,
                horizon,
            }) = exported::take(&tenant, size)?
            else {
                break;
            };
            // A table no longer registered (or dropped) is no longer offboarded:
            // its keys go unused.
            let Some(i) = tables.iter().position(|t| t.rel == root) else {
                continue;
            };
            if crate::pg::citus::manages(root)? {
                let left = keys.len() as i64 + exported::count(&tenant, root)?;
                let n = delete_on_citus(
                    &tenant,
                    &tables,
                    &trees,
                    &names,
                    i,
                    left,
                    CitusRows::Keys(keys),
                )?;
                if n > 0 {
                    return Ok(n);
                }
                continue;
            }
            let before = write_counts(&watched)?;
            let deleted = tables[i].delete_exported(&tenant, &names[i], keys, horizon)?;
            refuse_other_writes(&watched, &before, &deleted)?;
            let n: i64 = deleted.iter().map(|(_, n)| n).sum();
            if n > 0 {
                super::count_deleted(&tenant, &names[i].name, n)?;
                return Ok(n);
            }
        }
        let mut left: Option<&Table> = None;
        for t in &tables {
            if left.is_none() && t.rows_of(&tenant)? > 0 {
                left = Some(t);
            }
        }
        match left {
            None => Ok(0),
            Some(_) if nothing_deleted_yet(&tenant)? && export_differs(&tenant, &tables)? => {
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

/// The most keys of a Citus table one statement deletes by (each statement reads
/// the tenant's rows of the table on every shard that holds them).
const CITUS_STATEMENT_KEYS: i32 = 100_000;

/// What the export read of a table Citus manages (`exported::keys`).
enum CitusRows {
    /// Its rows' keys on their nodes (one batch of them).
    Keys(Vec<Vec<u8>>),
    /// How many rows it read, of a table Citus keeps copies of.
    Count(i64),
}

/// Deletes the rows of `tables[i]`, which Citus manages, that the export read
/// (`Table::delete_on_citus`; `left`: how many of its rows the export read and the
/// deletes have not taken, this batch's included). Refuses first (55000) when a
/// foreign key's ON DELETE action (CASCADE, SET NULL, SET DEFAULT) would reach rows
/// of the tenant that the export may not hold as they are: rows left in another
/// offboarded Citus table whose key references this one (the deletes took its
/// exported rows before, as they go referencing tables first), or more rows in
/// this one than the export read, when its key references itself. Such an action
/// runs on the workers, where this node's table counters (`refuse_other_writes`) do
/// not see its writes; nor can the tables be counted again after the statement, in
/// its transaction, as their other owners (Citus refuses any other role the
/// placements a statement changed, and those of their co-located shards). Counts
/// the rows it deleted in the offboarding, and returns how many.
fn delete_on_citus(
    tenant: &str,
    tables: &[Table],
    trees: &[Vec<pg_sys::Oid>],
    names: &[super::Locked],
    i: usize,
    left: i64,
    read: CitusRows,
) -> SealResult<i64> {
    for (j, t) in tables.iter().enumerate() {
        if !crate::pg::citus::manages(t.rel)? || !acts_on(&trees[j], &trees[i])? {
            continue;
        }
        let may_hold = if j == i { left } else { 0 };
        // As the table's owner, restricted, as every offboarding statement on it:
        // a count planned as a superuser would run the owner's functions in the
        // table's (or a shard's) index predicates and expressions as one. A row a
        // shard's own policy hides from the owner is then not counted (a limit
        // docs/SCALING.md names).
        if t.rows_of(tenant)? > may_hold {
            return Err(SealError::Refused(
                "rows of the tenant that the export does not hold as they are (written or changed since) are in a Citus table whose foreign key's ON DELETE action the deletes would set off: they are not deleted or changed unexported (export and delete them, then run the offboarding again)",
            )
            .on_table(&names[j].name));
        }
    }
    let n = tables[i].delete_on_citus(tenant, &names[i], read)?;
    if n > 0 {
        super::count_deleted(tenant, &names[i].name, n)?;
    }
    Ok(n)
}

/// Whether deleting rows of a table of `of` can change rows of a table of `tree`
/// through foreign keys' ON DELETE actions that write (CASCADE, SET NULL, SET
/// DEFAULT): a key of `tree` with such an action references `of`, or references a
/// table whose rows a CASCADE from `of` deletes (through any tables).
fn acts_on(tree: &[pg_sys::Oid], of: &[pg_sys::Oid]) -> SealResult<bool> {
    Ok(as_owner(|| {
        Spi::get_one_with_args::<bool>(
            "WITH RECURSIVE reached(rel, action) AS ( \
                 SELECT c.conrelid, c.confdeltype FROM pg_catalog.pg_constraint c \
                  WHERE c.contype OPERATOR(pg_catalog.=) 'f' AND c.confdeltype IN ('c', 'n', 'd') \
                    AND c.confrelid OPERATOR(pg_catalog.=) ANY ($2) \
                 UNION \
                 SELECT c.conrelid, c.confdeltype FROM pg_catalog.pg_constraint c \
                   JOIN reached r ON c.confrelid OPERATOR(pg_catalog.=) r.rel \
                  WHERE r.action OPERATOR(pg_catalog.=) 'c' AND c.contype OPERATOR(pg_catalog.=) 'f' \
                    AND c.confdeltype IN ('c', 'n', 'd')) \
             SELECT EXISTS (SELECT 1 FROM reached r WHERE r.rel OPERATOR(pg_catalog.=) ANY ($1))",
            &[tree.to_vec().into(), of.to_vec().into()],
        )
    })? == Some(true))
}

/// The refusal when the export recorded a Citus table's rows in the other form
/// than the table's copies now call for (`exported::keys`).
fn copies_changed(name: &str) -> SealError {
    SealError::Refused(
        "Citus changed how many copies of this table's rows it keeps since the export (a placement added or removed): its recorded rows no longer compare (export again: cancel and schedule the offboarding, or export and delete them by hand)",
    )
    .on_table(name)
}

/// `tables` in the order the export reads them and the deletes take them: a table
/// before every table its tree references by a foreign key, directly or through
/// tables outside the offboarded ones whose rows a CASCADE of that table deletes
/// (so that the key's ON DELETE action finds the referencing rows already gone),
/// otherwise in name order;
/// tables in a cycle of keys keep name order among themselves.
pub(super) fn delete_order(tables: Vec<Table>) -> SealResult<Vec<Table>> {
    let mut root_of = std::collections::HashMap::new();
    for (i, t) in tables.iter().enumerate() {
        for m in tree_of(t.rel)? {
            root_of.entry(m.rel).or_insert(i);
        }
    }
    let members: Vec<pg_sys::Oid> = root_of.keys().copied().collect();
    let edges = as_owner(|| {
        Spi::connect(|c| {
            c.select(
                "WITH RECURSIVE reach(rel, target, action) AS ( \
                     SELECT c.conrelid, c.confrelid, c.confdeltype FROM pg_catalog.pg_constraint c \
                      WHERE c.contype OPERATOR(pg_catalog.=) 'f' AND c.confrelid OPERATOR(pg_catalog.=) ANY ($1) \
                     UNION \
                     SELECT c.conrelid, r.target, c.confdeltype FROM pg_catalog.pg_constraint c \
                       JOIN reach r ON c.confrelid OPERATOR(pg_catalog.=) r.rel \
                      WHERE c.contype OPERATOR(pg_catalog.=) 'f' AND r.action OPERATOR(pg_catalog.=) 'c' \
                        AND NOT r.rel OPERATOR(pg_catalog.=) ANY ($1)) \
                 SELECT DISTINCT r.rel, r.target FROM reach r WHERE r.rel OPERATOR(pg_catalog.=) ANY ($1)",
                None,
                &[members.into()],
            )?
            .map(|r| {
                Ok((
                    r.get::<pg_sys::Oid>(1)?.unwrap_or_default(),
                    r.get::<pg_sys::Oid>(2)?.unwrap_or_default(),
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
        })
    })?;
    // before[j]: the tables that must come before table j (those referencing it).
    let mut before: Vec<std::collections::BTreeSet<usize>> = vec![Default::default(); tables.len()];
    for (from, to) in edges {
        if let (Some(&a), Some(&b)) = (root_of.get(&from), root_of.get(&to)) {
            if a != b {
                before[b].insert(a);
            }
        }
    }
    let mut order = Vec::with_capacity(tables.len());
    let mut placed = vec![false; tables.len()];
    while order.len() < tables.len() {
        // The first table (in name order) whose referencing tables are all placed;
        // in a cycle, the first not placed.
        let next = (0..tables.len())
            .find(|&j| !placed[j] && before[j].iter().all(|&a| placed[a]))
            .or_else(|| (0..tables.len()).find(|&j| !placed[j]))
            .ok_or(SealError::Internal("the order of the offboarded tables"))?;
        placed[next] = true;
        order.push(next);
    }
    let mut slots: Vec<Option<Table>> = tables.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}

/// Whether a foreign key of `tree` (a table and the tables under it) references it: with an ON DELETE
/// action the action would find rows a batch left, and without one a batch that
/// takes a referenced row before the rows referencing it would fail every time.
fn acts_on_itself(tree: &[pg_sys::Oid]) -> SealResult<bool> {
    Ok(as_owner(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c \
                WHERE c.contype OPERATOR(pg_catalog.=) 'f' \
                  AND c.conrelid OPERATOR(pg_catalog.=) ANY ($1) AND c.confrelid OPERATOR(pg_catalog.=) ANY ($1))",
            &[tree.to_vec().into()],
        )
    })? == Some(true))
}

/// Refuses (55000) unless `track_counts` is on: a batch's writes beyond its own
/// deletes are found in the transaction's table counters (`refuse_other_writes`).
fn require_track_counts() -> SealResult<()> {
    // SAFETY: pgstat_track_counts is a plain bool GUC variable of the server.
    if unsafe { pg_sys::pgstat_track_counts } {
        Ok(())
    } else {
        Err(SealError::Refused(
            "the offboarding's deletes need track_counts on (they check each batch's writes in the transaction's table counters)",
        ))
    }
}

/// The tables whose rows a batch must not change or delete beyond its own: every
/// table the export read and every table of the registered tables' trees now.
fn watched_tables(tenant: &str, trees: &[Vec<pg_sys::Oid>]) -> SealResult<Vec<pg_sys::Oid>> {
    let mut watched = export_tables(tenant)?;
    for tree in trees {
        watched.extend_from_slice(tree);
    }
    watched.sort_unstable_by_key(|r| r.to_u32());
    watched.dedup();
    Ok(watched)
}

/// A table's writes in the transaction so far: updated and deleted tuples, and its
/// storage (a TRUNCATE gives it new storage and resets the counts).
type Writes = (i64, i64, Option<String>);

/// `Writes` of each table of `rels`.
fn write_counts(rels: &[pg_sys::Oid]) -> SealResult<Vec<Writes>> {
    Ok(as_owner(|| {
        Spi::connect(|c| {
            c.select(
                "SELECT pg_catalog.pg_stat_get_xact_tuples_updated(r), pg_catalog.pg_stat_get_xact_tuples_deleted(r), \
                        pg_catalog.pg_relation_filenode(r)::pg_catalog.text \
                   FROM pg_catalog.unnest($1::pg_catalog.oid[]) WITH ORDINALITY AS u(r, i) ORDER BY i",
                None,
                &[rels.to_vec().into()],
            )?
            .map(|r| {
                Ok((
                    r.get::<i64>(1)?.unwrap_or(0),
                    r.get::<i64>(2)?.unwrap_or(0),
                    r.get::<String>(3)?,
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
        })
    })?)
}

/// Refuses (55000, naming the table) a batch that updated a row of a watched table,
/// or deleted more from one than its own `deleted` (per table), or truncated or
/// dropped one: a foreign key's ON DELETE action or a trigger changed or took a row
/// that may have changed since the export. The error rolls the batch back.
fn refuse_other_writes(
    watched: &[pg_sys::Oid],
    before: &[Writes],
    deleted: &[(pg_sys::Oid, i64)],
) -> SealResult<()> {
    let after = write_counts(watched)?;
    for ((rel, (u0, d0, f0)), (u1, d1, f1)) in watched.iter().zip(before).zip(&after) {
        let own: i64 = deleted
            .iter()
            .filter(|(r, _)| r == rel)
            .map(|(_, n)| n)
            .sum();
        // A TRUNCATE (new storage, counts reset) or a DROP counts as other writes.
        if f0 != f1 || u1 < u0 || d1 < d0 || u1 - u0 > 0 || d1 - d0 > own {
            let name = crate::privilege::pinned_name(*rel, pg_sys::AccessShareLock)?;
            return Err(SealError::Refused(
                "deleting the tenant's exported rows changed or deleted other rows of an offboarded table (a foreign key's ON DELETE action, or a trigger): they may have changed since the export, so the batch is undone (drop the trigger or change the key's action for the offboarding, or export and delete those rows by hand)",
            )
            .on_table(&name));
        }
    }
    Ok(())
}

/// Whether the offboarding has deleted no row and never went past deleting: a new
/// export would still hold every row.
fn nothing_deleted_yet(tenant: &str) -> SealResult<bool> {
    Ok(as_owner(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT NOT past_export AND NOT EXISTS (SELECT 1 FROM pg_catalog.jsonb_each_text(deleted) d \
                     WHERE d.value::pg_catalog.int8 OPERATOR(pg_catalog.>) 0) \
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
        // The export records no key for a table without them (`exported::keys`).
        let Some(key) = exported::keys(t.rel, "x")? else {
            continue;
        };
        let (_, digest) = t.tally(tenant, "", &Digest::sql_of(&key), Vec::new())?;
        now = now.add(Digest::parse(digest)?);
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

/// Locks `t`'s tree for the deletes and checks it (`Table::lock_checked`, with
/// DELETE). Returns its name as it is now.
fn checked_for_delete(tenant: &str, t: &Table) -> SealResult<super::Locked> {
    t.lock_checked(
        tenant,
        pg_sys::RowExclusiveLock,
        "DELETE",
        "_offboard_delete needs DELETE on every offboarded table",
    )
}

/// Refuses (55000, naming it) a table outside the offboarded tables' trees with a
/// text `tenant_id` column (one an administrator can register) or pgseal's
/// policies (one `tenant_protect` or `org_protect` protects) that a chain of
/// foreign keys ON DELETE CASCADE reaches from one of them (directly, or through
/// tables without such a column): the deletes would take its rows unexported. A
/// table without one cannot be offboarded itself; its rows go with the rows they
/// reference, as the key says. Cascades among the offboarded tables are checked as
/// they happen (`refuse_other_writes`). A partition attached after this check (its
/// parent's lock does not keep ATTACH out) has no keys: its rows are not deleted.
fn refuse_cascades_out(trees: &[Vec<pg_sys::Oid>]) -> SealResult<()> {
    let members: Vec<pg_sys::Oid> = trees.concat();
    let cascading = as_owner(|| {
        Spi::get_one_with_args::<String>(
            "WITH RECURSIVE reached(rel) AS ( \
                 SELECT c.conrelid FROM pg_catalog.pg_constraint c \
                  WHERE c.contype OPERATOR(pg_catalog.=) 'f' AND c.confdeltype OPERATOR(pg_catalog.=) 'c' \
                    AND c.confrelid OPERATOR(pg_catalog.=) ANY ($1) AND NOT c.conrelid OPERATOR(pg_catalog.=) ANY ($1) \
                 UNION \
                 SELECT c.conrelid FROM pg_catalog.pg_constraint c JOIN reached r ON c.confrelid OPERATOR(pg_catalog.=) r.rel \
                  WHERE c.contype OPERATOR(pg_catalog.=) 'f' AND c.confdeltype OPERATOR(pg_catalog.=) 'c' \
                    AND NOT c.conrelid OPERATOR(pg_catalog.=) ANY ($1)) \
             SELECT (SELECT r.rel::pg_catalog.regclass::pg_catalog.text FROM reached r \
                      WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a \
                                     JOIN pg_catalog.pg_class t ON t.oid OPERATOR(pg_catalog.=) a.attrelid \
                                     JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) t.relnamespace \
                                     WHERE a.attrelid OPERATOR(pg_catalog.=) r.rel \
                                       AND a.attname OPERATOR(pg_catalog.=) 'tenant_id' AND NOT a.attisdropped \
                                       AND a.atttypid IN ('pg_catalog.text'::pg_catalog.regtype, 'pg_catalog.varchar'::pg_catalog.regtype) \
                                       AND t.relpersistence OPERATOR(pg_catalog.<>) 't' \
                                       AND n.nspname NOT IN ('pgseal', 'pg_catalog', 'information_schema')) \
                         OR EXISTS (SELECT 1 FROM pg_catalog.pg_policy p WHERE p.polrelid OPERATOR(pg_catalog.=) r.rel \
                                       AND p.polname IN ('pgseal_tenant', 'pgseal_tenant_only', 'pgseal_owner')) \
                      ORDER BY 1 LIMIT 1)",
            &[members.into()],
        )
    })?;
    match cascading {
        None => Ok(()),
        Some(table) => Err(SealError::Refused(
            "a table outside the offboarded ones is reached from one of them by foreign keys with ON DELETE CASCADE: the deletes would take its rows unexported (register it, or change the key's action)",
        )
        .on_table(&table)),
    }
}

impl Table {
    /// Deletes, as the owner, the tenant's rows of this table (named `name`,
    /// pinned) whose keys are `keys`: each still the row version the export read.
    /// A TID scan over their places; a partitioned table probes each partition.
    /// Returns the rows deleted per table of the tree.
    ///
    /// `horizon` is the first transaction the export's cursor over the table could
    /// not see. A row whose xmin is that one or a later one (up to what the
    /// statement's snapshot sees, compared as 32-bit numbers) is newer than the
    /// export whatever its key says (a frozen row's raw xmin from an earlier epoch
    /// can read as the same 32-bit number), and stays.
    fn delete_exported(
        &self,
        tenant: &str,
        locked: &super::Locked,
        keys: Vec<Vec<u8>>,
        horizon: i64,
    ) -> SealResult<Vec<(pg_sys::Oid, i64)>> {
        let name = &locked.name;
        let tenant_is = locked.tenant_is("x");
        let places = keys
            .iter()
            .map(|k| exported::place_of(k))
            .collect::<SealResult<Vec<String>>>()?;
        let key = exported::row_key("x");
        let sql = format!(
            "WITH d AS (DELETE FROM {name} AS x \
                         WHERE x.ctid OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.text[]::pg_catalog.tid[]) \
                           AND {key} OPERATOR(pg_catalog.=) ANY ($3::pg_catalog.bytea[]) \
                           AND ({tenant_is}) IS TRUE \
                           AND (((x.xmin::pg_catalog.text::pg_catalog.int8 OPERATOR(pg_catalog.-) $4) \
                                 OPERATOR(pg_catalog.%) 4294967296 OPERATOR(pg_catalog.+) 4294967296) \
                                OPERATOR(pg_catalog.%) 4294967296) OPERATOR(pg_catalog.>=) \
                               (SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::pg_catalog.text::pg_catalog.int8 \
                                       OPERATOR(pg_catalog.-) $5) \
                        RETURNING x.tableoid) \
             SELECT d.tableoid, pg_catalog.count(*) FROM d GROUP BY d.tableoid"
        );
        super::as_offboarding_owner(self.rel, self.owner, || {
            // A TID scan of the places, never a scan of the whole table with the
            // places as a filter, which the planner chose for a tenant among
            // others in a table: every batch read the whole table
            // (docs/BENCHMARKS.md, "Offboarding's deletes as a TID scan"). No
            // index serves the statement's own other conditions (the tenant is
            // tested `IS TRUE`), so with sequential scans off no other path is
            // left but one the table's row level security may add (its test of the
            // tenant). Saved in the owner scope's setting level, discarded on
            // return. Before PostgreSQL 18 index and bitmap scans stay on: a
            // disabled scan inside a nested loop is costed once per outer row
            // there, which would steer the joins of what the delete runs (the
            // owner's triggers, foreign keys) to scans of whole tables; 18 counts
            // disabled scans, one per table whichever kind.
            crate::privilege::save_setting(c"enable_seqscan", c"off");
            #[cfg(feature = "pg18")]
            for scan in [c"enable_indexscan", c"enable_bitmapscan"] {
                crate::privilege::save_setting(scan, c"off");
            }
            Spi::connect(|c| {
                c.select(
                    &sql,
                    None,
                    &[
                        tenant.into(),
                        places.into(),
                        keys.into(),
                        (horizon % 4_294_967_296).into(),
                        horizon.into(),
                    ],
                )?
                .map(|r| {
                    Ok((
                        r.get::<pg_sys::Oid>(1)?.unwrap_or_default(),
                        r.get::<i64>(2)?.unwrap_or(0),
                    ))
                })
                .collect::<Result<Vec<_>, pgrx::spi::Error>>()
            })
        })
    }

    /// Deletes, as the owner, the tenant's rows of this table, which Citus manages,
    /// that the export read (`read`), in one statement that Citus sends to every
    /// shard of the tenant's rows. With keys (`exported::keys`, evaluated on the
    /// nodes that hold the rows), the rows that have them, the keys sent as an array
    /// constant, which PostgreSQL hashes: a row written or changed since the export
    /// has a key it did not record, and stays. With a count (a table Citus keeps
    /// copies of), all the tenant's rows, and the statement fails (55000, undoing
    /// it) unless it deleted as many as the export read.
    fn delete_on_citus(
        &self,
        tenant: &str,
        locked: &super::Locked,
        read: CitusRows,
    ) -> SealResult<i64> {
        let (matching, keys, exported) = match read {
            // Nothing to delete: no statement, so that no placement is changed in
            // this transaction (Citus would refuse the next table's owner the
            // placements co-located with it).
            CitusRows::Count(0) => return Ok(0),
            CitusRows::Count(n) => (String::new(), None, Some(n)),
            CitusRows::Keys(keys) => {
                if keys.iter().any(|k| k.len() != exported::NODE_KEY_LEN) {
                    return Err(copies_changed(&locked.name));
                }
                let Some(key) = exported::keys(self.rel, "x")? else {
                    return Err(SealError::Internal("a Citus table without keys"));
                };
                (
                    format!("AND ({key}) OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.bytea[])"),
                    Some(keys),
                    None,
                )
            }
        };
        let rows = format!(
            "FROM {} AS x WHERE {} {matching}",
            locked.name,
            locked.tenant_is("x")
        );
        let run = |sql: String| {
            let mut args = vec![tenant.into()];
            if let Some(keys) = &keys {
                args.push(keys.clone().into());
            }
            super::as_offboarding_owner(self.rel, self.owner, || {
                Spi::get_one_with_args::<i64>(&sql, &args)
            })
            .map(|n| n.unwrap_or(0))
        };
        // None of the keys' rows left (all changed or removed since the export):
        // no statement either. Read as the owner the delete runs as.
        if keys.is_some() && run(format!("SELECT pg_catalog.count(*) {rows}"))? == 0 {
            return Ok(0);
        }
        let n = run(format!(
            "WITH d AS (DELETE {rows} RETURNING 1) SELECT pg_catalog.count(*) FROM d"
        ))?;
        match exported {
            Some(read) if read != n => Err(SealError::Refused(
                "the tenant's rows in this table, which Citus keeps copies of, are not as many as its export read (written or removed since, or hidden from the export by a copy's own policy): they are not deleted unexported (export and delete them, then run the offboarding again)",
            )
            .on_table(&locked.name)),
            _ => Ok(n),
        }
    }

    /// The name of the first table of this tree that holds rows of the tenant
    /// itself (the tree's root when none does alone).
    fn holding(&self, tenant: &str) -> SealResult<String> {
        for m in self.members()? {
            // SAFETY: a syscache lookup of a locked relation's kind.
            let kind = unsafe { pg_sys::get_rel_relkind(m.rel) } as u8;
            if kind == pg_sys::RELKIND_FOREIGN_TABLE || m.rows_of_only(tenant)? > 0 {
                return crate::privilege::pinned_name(m.rel, pg_sys::AccessShareLock);
            }
        }
        crate::privilege::pinned_name(self.rel, pg_sys::AccessShareLock)
    }
}
