//! Work on a Citus table's shards, each on the node that holds it.
//!
//! A shard's own objects (an index or statistics its owner made on its node with
//! `citus.enable_manual_changes_to_shards`) are in that node's catalog alone, and
//! run where its queries are planned. So that pgseal can check a shard before it
//! plans a query on it as the extension owner, the coordinator has Citus open a
//! connection of its own to each node that holds a shard of the table, as the
//! extension owner and outside the transaction (`master_run_on_worker`), and runs
//! there a function that finds the shards it names (`local_shards`) and checks and
//! reads each in that node's catalog.

use pgrx::prelude::*;

use crate::error::{SealError, SealResult};
use crate::privilege::{as_owner, with_pinned_search_path};

/// For each node that holds an active placement of a shard of Citus table `$1`
/// (one placement per shard, the lowest group's): its name, port, and its shards'
/// ids as an `int8[]` literal. Also the number of shards the table has and the
/// number those nodes cover.
const PLAN: &str = "\
WITH one AS (
    SELECT s.shardid,
           (SELECT p.groupid FROM pg_catalog.pg_dist_placement p
             WHERE p.shardid OPERATOR(pg_catalog.=) s.shardid AND p.shardstate OPERATOR(pg_catalog.=) 1
             ORDER BY p.groupid LIMIT 1) AS groupid
      FROM pg_catalog.pg_dist_shard s
     WHERE s.logicalrelid OPERATOR(pg_catalog.=) $1::pg_catalog.oid
), plan AS (
    SELECT n.nodename, n.nodeport,
           pg_catalog.array_agg(o.shardid ORDER BY o.shardid)::pg_catalog.text AS shards,
           pg_catalog.count(*) AS n
      FROM one o
      JOIN pg_catalog.pg_dist_node n ON n.groupid OPERATOR(pg_catalog.=) o.groupid
       AND n.noderole OPERATOR(pg_catalog.=) 'primary' AND n.isactive
     GROUP BY n.nodename, n.nodeport
)
SELECT (SELECT pg_catalog.count(*) FROM one),
       (SELECT pg_catalog.sum(n) FROM plan)::pg_catalog.int8,
       pg_catalog.array_agg(nodename ORDER BY nodename, nodeport),
       pg_catalog.array_agg(nodeport ORDER BY nodename, nodeport),
       pg_catalog.array_agg(shards ORDER BY nodename, nodeport)
  FROM plan";

/// What one node answered: its single value's text, or its error's message.
pub struct NodeAnswer {
    pub node: String,
    pub port: i32,
    pub result: Result<Option<String>, String>,
}

/// Runs, on each node that holds a shard of Citus table `rel`, the statement
/// `command(shard ids)` makes from an `int8[]` literal of the ids of the shards it
/// holds (each shard on one node), as the extension owner over a connection of
/// its own; its answers, one per node. Every shard is covered: a shard without an
/// active placement fails (55000).
pub fn on_shard_nodes(
    rel: pg_sys::Oid,
    command: impl Fn(&str) -> String,
) -> SealResult<Vec<NodeAnswer>> {
    as_owner(|| {
        let (shards, covered, nodes, ports, ids) = Spi::connect(|c| {
            let t = c.select(PLAN, Some(1), &[rel.into()])?;
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
                "a shard of a Citus table has no active placement on a node",
            ));
        }
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let commands: Vec<String> = ids
            .iter()
            .map(|s| command(&pgrx::spi::quote_literal(s)))
            .collect();
        let answers = Spi::connect(|c| {
            c.select(
                "SELECT r.node_name, r.node_port, r.success, r.result \
                   FROM pg_catalog.master_run_on_worker($1, $2, $3, true) r",
                None,
                &[nodes.into(), ports.into(), commands.into()],
            )?
            .map(|row| {
                let ok = row.get::<bool>(3)?.unwrap_or(false);
                let text = row.get::<String>(4)?;
                Ok::<_, pgrx::spi::Error>(NodeAnswer {
                    node: row.get::<String>(1)?.unwrap_or_default(),
                    port: row.get::<i32>(2)?.unwrap_or(0),
                    result: if ok {
                        Ok(text)
                    } else {
                        Err(text.unwrap_or_default())
                    },
                })
            })
            .collect::<Result<Vec<_>, _>>()
        })?;
        Ok(answers)
    })
}

/// On a node, the relations of the shards `shards` of Citus table `rel` (a
/// quoted, qualified name): each found by its id in this node's Citus metadata and
/// by the name Citus gives it (truncated and hashed when long), without a query of
/// `pg_class` (Citus hides shards from those). All of them are locked in SHARE
/// UPDATE EXCLUSIVE mode until the transaction ends, and then each must still be
/// the relation of that name and have an active placement on this node: a shard
/// moved away meanwhile, and a table made under its name after, are refused. A
/// table Citus does not manage here, or a shard that is not of it or not on this
/// node, fails (55000).
pub fn local_shards(rel: &str, shards: &[i64]) -> SealResult<Vec<pg_sys::Oid>> {
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
    let find = |shard: i64| {
        with_pinned_search_path(|| {
            as_owner(|| {
                // Read-write SPI: a fresh snapshot, so that the check made again
                // under the locks sees what committed while they were awaited.
                Spi::connect_mut(|c| {
                    let t = c.update(
                    "SELECT pg_catalog.to_regclass(pg_catalog.shard_name(s.logicalrelid, s.shardid, false))::pg_catalog.oid \
                       FROM pg_catalog.pg_dist_shard s \
                      WHERE s.logicalrelid OPERATOR(pg_catalog.=) $1 AND s.shardid OPERATOR(pg_catalog.=) $2 \
                        AND EXISTS (SELECT 1 FROM pg_catalog.pg_dist_placement p \
                                     WHERE p.shardid OPERATOR(pg_catalog.=) s.shardid \
                                       AND p.shardstate OPERATOR(pg_catalog.=) 1 \
                                       AND p.groupid OPERATOR(pg_catalog.=) (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g))",
                    Some(1),
                    &[table.into(), shard.into()],
                    )?;
                    if t.is_empty() {
                        return Ok(None);
                    }
                    t.first().get::<pg_sys::Oid>(1)
                })
            })
        })
    };
    let found = shards
        .iter()
        .map(|&shard| find(shard)?.ok_or(not_here()))
        .collect::<SealResult<Vec<_>>>()?;
    for &oid in &found {
        // SAFETY: LockRelationOid takes a heavyweight lock on an OID that need not
        // exist (it raises nothing for a missing one), held to transaction end.
        unsafe {
            pg_sys::LockRelationOid(oid, pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE)
        };
    }
    // Again under the locks.
    for (&shard, &oid) in shards.iter().zip(&found) {
        if find(shard)? != Some(oid) {
            return Err(not_here());
        }
    }
    Ok(found)
}
