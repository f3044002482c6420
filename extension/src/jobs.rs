//! The owner-side parts of pgseald's jobs that read application tables.
//!
//! Discovering a table's tenants must not need a tenant context or BYPASSRLS, so
//! the scan runs as the extension owner, unless planning it would run code the
//! table's owner wrote (`privilege::planning_runs_owner_code`): then as that owner. Before it does, the relation the caller
//! named is checked as the caller: a plain or partitioned table (42809 otherwise:
//! a view, a foreign table or a function would run the caller's code as the
//! owner), outside schema `pgseal`, that the caller owns or may DELETE from
//! (42501), whose tenant column has a built-in type (so the comparisons of the
//! scan are PostgreSQL's own code). Everything is read under the pinned
//! `search_path`.

use pgrx::prelude::*;

use crate::error::{OrRaise, SealError, SealResult};
use crate::privilege::{as_owner, with_pinned_search_path};

/// What the caller may do with a relation, read as the caller.
const CHECK: &str = "\
SELECT c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p']::pg_catalog.\"char\"[]),
       n.nspname OPERATOR(pg_catalog.=) 'pgseal',
       pg_catalog.pg_has_role(c.relowner, 'USAGE')
           OR pg_catalog.has_table_privilege(c.oid, 'DELETE'),
       (SELECT tn.nspname OPERATOR(pg_catalog.=) 'pg_catalog'
          FROM pg_catalog.pg_attribute a
          JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) a.atttypid
          JOIN pg_catalog.pg_namespace tn ON tn.oid OPERATOR(pg_catalog.=) t.typnamespace
         WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attname OPERATOR(pg_catalog.=) 'tenant_id'
           AND NOT a.attisdropped AND t.typtype OPERATOR(pg_catalog.=) 'b')
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
 WHERE c.oid OPERATOR(pg_catalog.=) $1";

/// Checks, as the caller, that pgseald may work on `rel`.
fn check_job_table(rel: pg_sys::Oid) -> SealResult<()> {
    // Read-write SPI: a fresh snapshot, so that the check made again after the
    // scan's locks sees the table as it is then (a column's type changed while the
    // scan waited would otherwise pass).
    let row = with_pinned_search_path(|| {
        Spi::connect_mut(|client| {
            let t = client.update(CHECK, Some(1), &[rel.into()])?;
            if t.is_empty() {
                return Ok((None, None, None, None));
            }
            let t = t.first();
            Ok::<_, pgrx::spi::Error>((
                t.get::<bool>(1)?,
                t.get::<bool>(2)?,
                t.get::<bool>(3)?,
                t.get::<bool>(4)?,
            ))
        })
    });
    match row {
        Ok((Some(true), Some(false), Some(true), Some(true))) => Ok(()),
        Ok((Some(true), Some(false), Some(true), _)) => Err(SealError::InvalidArgument(
            "the table's tenant_id column is missing or not of a built-in type",
        )),
        Ok((Some(true), Some(false), _, _)) => Err(SealError::Forbidden(
            "pgseald works only on tables the caller owns or may DELETE from",
        )),
        Ok((Some(true), Some(true), _, _)) => Err(SealError::Forbidden(
            "pgseal's own tables cannot be used here",
        )),
        Ok((Some(false), _, _, _)) => Err(SealError::WrongObjectType(
            "the relation is not a plain or partitioned table",
        )),
        Ok(_) => Err(SealError::WrongObjectType("the relation does not exist")),
        Err(e) => Err(e.into()),
    }
}

/// The distinct tenants of `rel`, for the retention run's default rules.
/// `pgseal._tenants_of(regclass)` calls it. A table of this node is scanned here
/// (`local_tenants`); a Citus table's shards are each scanned on the node that
/// holds them (`citus_tenants`).
#[pg_extern(volatile, parallel_unsafe)]
fn _tenants_scan(rel: pg_sys::Oid) -> SetOfIterator<'static, String> {
    let r = check_job_table(rel).and_then(|_| {
        if crate::pg::citus::manages(rel)? {
            let name = crate::privilege::pinned_name(rel, pg_sys::AccessShareLock)?;
            check_job_table(rel)?;
            citus_tenants(rel, &name)
        } else {
            local_tenants(rel)
        }
    });
    SetOfIterator::new(r.or_raise())
}

/// The distinct tenants of a table of this node (a loose index scan over its
/// tenant_id), after `check_job_table`.
fn local_tenants(rel: pg_sys::Oid) -> SealResult<Vec<String>> {
    let caller = crate::pg::citus::caller_parsing()?;
    // Planning the scan would run code the table's owner wrote (an index or
    // statistics expression calling its function): scanned as that owner,
    // restricted, instead of as the extension owner. Row-level security that
    // binds the owner then applies (a policy that needs a tenant context makes
    // the scan fail: set a rule per tenant for such a table).
    let owner_code = crate::privilege::planning_runs_owner_code(rel)?;
    let table_owner = as_owner(|| {
        Spi::get_one_with_args::<pg_sys::Oid>(
            "SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) $1",
            &[rel.into()],
        )
    })?
    .ok_or(SealError::Internal("no relation owner"))?;
    // As the owner, only the owner's code may run: a partition of another
    // role's, or a third role's trigger, would run that role's code with the
    // owner's rights (42501), as in every other statement pgseal runs as a
    // table's owner.
    if owner_code {
        crate::privilege::require_only_owners_code(rel, table_owner, pg_sys::AccessShareLock, &[])?;
    }
    let run_as = |f: &mut dyn FnMut() -> SealResult<Vec<String>>| {
        if owner_code {
            crate::privilege::as_table_owner(table_owner, f)
        } else {
            as_owner(f)
        }
    };
    let name = crate::privilege::pinned_name(rel, pg_sys::AccessShareLock)?;
    // Again, now that the table is locked: its tenant_id may have changed type
    // while the locks were awaited (to one whose cast to text its owner wrote).
    check_job_table(rel)?;
    run_as(&mut || {
        let sql = format!(
            "WITH RECURSIVE t AS (
                 (SELECT tenant_id AS id FROM {name} WHERE tenant_id IS NOT NULL ORDER BY tenant_id LIMIT 1)
                 UNION ALL
                 SELECT (SELECT x.tenant_id FROM {name} x
                          WHERE x.tenant_id OPERATOR(pg_catalog.>) t.id ORDER BY x.tenant_id LIMIT 1)
                   FROM t WHERE t.id IS NOT NULL)
             SELECT id::pg_catalog.text FROM t WHERE id IS NOT NULL"
        );
        let scan = || {
            Spi::connect(|client| {
                client
                    .select(&sql, None, &[])?
                    .map(|row| row.get::<String>(1))
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(SealError::from)
        };
        // A policy of this node's table may reach a Citus table, whose query is
        // sent to the workers as the owner.
        crate::pg::citus::with_remote_parsing_pinned(caller.as_ref(), scan)
            .map(|v| v.into_iter().flatten().collect::<Vec<String>>())
    })
}

/// For each node that holds an active placement of a shard of Citus table `rel`
/// (named `name`, quoted and qualified): that node's name, port, and the command
/// that lists the tenants of those shards there (`_shard_tenants`), one placement
/// per shard. Also the number of shards the table has and the number covered.
const CITUS_PLAN: &str = "\
WITH one AS (
    SELECT s.shardid,
           (SELECT p.groupid FROM pg_catalog.pg_dist_placement p
             WHERE p.shardid OPERATOR(pg_catalog.=) s.shardid AND p.shardstate OPERATOR(pg_catalog.=) 1
             ORDER BY p.groupid LIMIT 1) AS groupid
      FROM pg_catalog.pg_dist_shard s
     WHERE s.logicalrelid OPERATOR(pg_catalog.=) $1::pg_catalog.oid
), plan AS (
    SELECT n.nodename, n.nodeport,
           pg_catalog.format('SELECT pgseal._shard_tenants(%L, %L)', $2::pg_catalog.text,
                             pg_catalog.array_agg(o.shardid ORDER BY o.shardid)::pg_catalog.text) AS command,
           pg_catalog.count(*) AS shards
      FROM one o
      JOIN pg_catalog.pg_dist_node n ON n.groupid OPERATOR(pg_catalog.=) o.groupid
       AND n.noderole OPERATOR(pg_catalog.=) 'primary' AND n.isactive
     GROUP BY n.nodename, n.nodeport
)
SELECT (SELECT pg_catalog.count(*) FROM one),
       (SELECT pg_catalog.sum(shards) FROM plan)::pg_catalog.int8,
       pg_catalog.array_agg(nodename ORDER BY nodename, nodeport),
       pg_catalog.array_agg(nodeport ORDER BY nodename, nodeport),
       pg_catalog.array_agg(command ORDER BY nodename, nodeport)
  FROM plan";

/// The distinct tenants of Citus table `rel` (named `name`): each node that holds
/// its shards lists theirs (`_shard_tenants`), over a connection of its own that
/// Citus opens as the extension owner (`master_run_on_worker`), so the node checks
/// its shards in its own catalog before it plans their scan: a shard's own index
/// or statistics, made on its node alone, are seen where they run. No shard is
/// left out: a node that fails (a shard moved meanwhile, or a shard whose owner's
/// code makes the node scan it as its owner, restricted) fails the listing (55000,
/// the node's error in a WARNING before it).
fn citus_tenants(rel: pg_sys::Oid, name: &str) -> SealResult<Vec<String>> {
    as_owner(|| {
        let (shards, covered, nodes, ports, commands) = Spi::connect(|c| {
            let t = c.select(CITUS_PLAN, Some(1), &[rel.into(), name.into()])?;
            let t = t.first();
            Ok::<_, pgrx::spi::Error>((
                t.get::<i64>(1)?.unwrap_or(0),
                t.get::<i64>(2)?.unwrap_or(0),
                t.get::<Vec<String>>(3)?.unwrap_or_default(),
                t.get::<Vec<i32>>(4)?.unwrap_or_default(),
                t.get::<Vec<String>>(5)?.unwrap_or_default(),
            ))
        })?;
        if covered != shards {
            return Err(SealError::Refused(
                "a shard of the table has no active placement on a node: its tenants cannot be listed",
            ));
        }
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let answers = Spi::connect(|c| {
            c.select(
                "SELECT r.node_name, r.node_port, r.success, r.result \
                   FROM pg_catalog.master_run_on_worker($1, $2, $3, true) r",
                None,
                &[nodes.into(), ports.into(), commands.into()],
            )?
            .map(|row| {
                Ok::<_, pgrx::spi::Error>((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<i32>(2)?.unwrap_or(0),
                    row.get::<bool>(3)?.unwrap_or(false),
                    row.get::<String>(4)?,
                ))
            })
            .collect::<Result<Vec<_>, _>>()
        })?;
        let mut failed = false;
        let mut lists = Vec::new();
        for (node, port, ok, result) in answers {
            if ok {
                lists.push(result);
            } else {
                failed = true;
                pgrx::warning!(
                    "pgseal: node {node}:{port} could not list the tenants of {name}'s shards: {}",
                    result.unwrap_or_default()
                );
            }
        }
        if failed {
            return Err(SealError::Refused(
                "a node could not list the tenants of the table's shards (its error is in the warning before this)",
            ));
        }
        let mut tenants = std::collections::BTreeSet::new();
        for list in lists.into_iter().flatten() {
            let one = Spi::get_one_with_args::<Vec<String>>(
                "SELECT $1::pg_catalog.text[]",
                &[list.into()],
            )?
            .unwrap_or_default();
            tenants.extend(one);
        }
        Ok(tenants.into_iter().collect())
    })
}

/// `pgseal._shard_tenants(rel, shards)`: on a node of a Citus cluster, the
/// distinct tenants of the shards `shards` of Citus table `rel` (a quoted,
/// qualified name) that this node holds, each listed as a table of this node
/// (`local_tenants`: as the extension owner unless planning its scan would run
/// its owner's code, which this node's catalog shows). A shard that is not here,
/// or not of that table, fails it (55000). `citus_tenants` calls it through Citus
/// as the extension owner; executable by the owner only.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn _shard_tenants(rel: &str, shards: Vec<i64>) -> Vec<String> {
    (|| {
        let not_here = || SealError::Refused("a shard of the table is not on this node");
        let table = with_pinned_search_path(|| {
            Spi::get_one_with_args::<pg_sys::Oid>(
                "SELECT pg_catalog.to_regclass($1)::pg_catalog.oid",
                &[rel.into()],
            )
        })?
        .ok_or(not_here())?;
        if !crate::pg::citus::manages(table)? {
            return Err(not_here());
        }
        let mut tenants = std::collections::BTreeSet::new();
        for shard in shards {
            // The shard's name as Citus makes it (truncated and hashed when long),
            // looked up without a catalog query (Citus hides shards from those).
            let oid = as_owner(|| {
                Spi::get_one_with_args::<pg_sys::Oid>(
                    "SELECT pg_catalog.to_regclass(pg_catalog.shard_name(s.logicalrelid, s.shardid, false))::pg_catalog.oid \
                       FROM pg_catalog.pg_dist_shard s \
                      WHERE s.logicalrelid OPERATOR(pg_catalog.=) $1 AND s.shardid OPERATOR(pg_catalog.=) $2",
                    &[table.into(), shard.into()],
                )
            })?
            .ok_or(not_here())?;
            check_job_table(oid)?;
            tenants.extend(local_tenants(oid)?);
        }
        Ok(tenants.into_iter().collect())
    })()
    .or_raise()
}

/// `pgseal._pinned_name(rel, attnum)`: for `_key_usage` (SQL), which builds its
/// query from the names of the registered tables and columns and runs it as the
/// extension owner: `{table, column}`, the table's name pinned
/// (`privilege::pinned_name`, ACCESS SHARE) and column `attnum`'s name, both read
/// after the lock; fails (55000) unless that column is a `text` column then. A
/// column renamed, or retyped to one whose casts its owner wrote, while the lock
/// was awaited is never used under the name or type read before it. Executable by
/// the owner only.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn _pinned_name(rel: pg_sys::Oid, attnum: i16) -> Vec<String> {
    (|| {
        let name = crate::privilege::pinned_name(rel, pg_sys::AccessShareLock)?;
        let gone = || SealError::Refused("a registered sealed column is no longer a text column");
        // SAFETY: syscache lookups of the locked table's column: InvalidOid for a
        // missing column (a dropped one has no type), and a palloc'd name or null.
        let column = unsafe {
            if pg_sys::get_atttype(rel, attnum) != pg_sys::TEXTOID {
                return Err(gone());
            }
            let p = pg_sys::get_attname(rel, attnum, true);
            if p.is_null() {
                return Err(gone());
            }
            crate::privilege::exact_name(std::ffi::CStr::from_ptr(p))?
        };
        Ok(vec![name, pgrx::spi::quote_identifier(column)])
    })()
    .or_raise()
}

/// `pgseal._planning_runs_owner_code(rel)`: `privilege::planning_runs_owner_code`,
/// for `_key_usage` (SQL), which skips such a table rather than scan it as the
/// extension owner. Executable by the owner only.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn _planning_runs_owner_code(rel: pg_sys::Oid) -> bool {
    crate::privilege::planning_runs_owner_code(rel).or_raise()
}
