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

/// Each shard of Citus table `$1` with the node that holds its active placement
/// (one placement per shard, the lowest group's; no node for a shard whose
/// placements are none active, or on no active primary node), by node.
const PLAN: &str = "\
WITH one AS (
    SELECT s.shardid,
           (SELECT p.groupid FROM pg_catalog.pg_dist_placement p
             WHERE p.shardid OPERATOR(pg_catalog.=) s.shardid AND p.shardstate OPERATOR(pg_catalog.=) 1
             ORDER BY p.groupid LIMIT 1) AS groupid
      FROM pg_catalog.pg_dist_shard s
     WHERE s.logicalrelid OPERATOR(pg_catalog.=) $1::pg_catalog.oid
)
SELECT n.nodename, n.nodeport, o.shardid
  FROM one o
  LEFT JOIN pg_catalog.pg_dist_node n ON n.groupid OPERATOR(pg_catalog.=) o.groupid
   AND n.noderole OPERATOR(pg_catalog.=) 'primary' AND n.isactive
 ORDER BY n.nodename, n.nodeport, o.shardid";

/// How many shards one statement on a node locks and reads at most: a node's
/// shards go in several statements, each its own transaction there, so that one
/// transaction never holds locks on thousands of shards (and their partitions
/// and indexes), which PostgreSQL's shared lock table could not hold.
const SHARDS_PER_STATEMENT: usize = 64;

/// A node by its name and port.
type Node = (String, i32);

/// What one node answered for some of its shards: the statement's single value's
/// text, or its error's message.
pub struct NodeAnswer {
    pub node: String,
    pub port: i32,
    pub result: Result<Option<String>, String>,
}

/// This session's `lock_timeout`, as a literal for the nodes' statements
/// (`local_shards` waits for each shard's lock that long there, as a statement of
/// this session would here; Citus opens the nodes' connections with their own).
pub fn lock_timeout_literal() -> String {
    pgrx::spi::quote_literal(crate::context::read_setting(c"lock_timeout").unwrap_or_default())
}

/// Runs, on each node that holds a shard of Citus table `rel`, the statement
/// `command(shard ids)` makes from an `int8[]` literal of ids of shards it holds
/// (each shard on one node, up to `SHARDS_PER_STATEMENT` a statement), as the
/// extension owner over connections of its own, the nodes at once; the answers,
/// one per statement. Every shard is covered: a shard without an active placement
/// fails (55000).
pub fn on_shard_nodes(
    rel: pg_sys::Oid,
    command: impl Fn(&str) -> String,
) -> SealResult<Vec<NodeAnswer>> {
    as_owner(|| {
        let rows = Spi::connect(|c| {
            c.select(PLAN, None, &[rel.into()])?
                .map(|r| {
                    Ok::<_, pgrx::spi::Error>((
                        r.get::<String>(1)?,
                        r.get::<i32>(2)?,
                        r.get::<i64>(3)?.unwrap_or(0),
                    ))
                })
                .collect::<Result<Vec<_>, _>>()
        })?;
        let no_node = || {
            SealError::Refused("a shard of a Citus table has no active placement on an active node")
        };
        let rows = rows
            .into_iter()
            .map(|(node, port, shard)| {
                Ok((node.ok_or_else(no_node)?, port.ok_or_else(no_node)?, shard))
            })
            .collect::<SealResult<Vec<_>>>()?;
        // Each node's shards, in statements of at most SHARDS_PER_STATEMENT.
        let mut by_node: Vec<(Node, Vec<Vec<i64>>)> = Vec::new();
        for (node, port, shard) in rows {
            match by_node.last_mut() {
                Some((key, chunks)) if *key == (node.clone(), port) => match chunks.last_mut() {
                    Some(c) if c.len() < SHARDS_PER_STATEMENT => c.push(shard),
                    _ => chunks.push(vec![shard]),
                },
                _ => by_node.push(((node, port), vec![vec![shard]])),
            }
        }
        // In rounds: one statement on each node at a time.
        let rounds = by_node.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
        let mut answers = Vec::new();
        for round in 0..rounds {
            let (mut nodes, mut ports, mut commands) = (Vec::new(), Vec::new(), Vec::new());
            for ((node, port), chunks) in &by_node {
                if let Some(chunk) = chunks.get(round) {
                    let ids = chunk
                        .iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(",");
                    nodes.push(node.clone());
                    ports.push(*port);
                    commands.push(command(&pgrx::spi::quote_literal(format!("{{{ids}}}"))));
                }
            }
            let got = Spi::connect(|c| {
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
            answers.extend(got);
        }
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
/// node, fails (55000). The locks are awaited at most `lock_timeout` (the
/// caller's, `lock_timeout_literal`; set in the caller's GUC nest level).
pub fn local_shards(rel: &str, shards: &[i64], lock_timeout: &str) -> SealResult<Vec<pg_sys::Oid>> {
    let not_here = || SealError::Refused("a shard of the table is not on this node");
    let wait = std::ffi::CString::new(lock_timeout)
        .map_err(|_| SealError::InvalidArgument("lock_timeout is not a setting's value"))?;
    crate::privilege::save_setting(c"lock_timeout", &wait);
    // The checks below, and the caller's of each shard's planning, read the
    // catalog as it is now only under READ COMMITTED (a statement of a session
    // whose default is a stricter isolation would read its first snapshot).
    if crate::pg::xact::uses_transaction_snapshot() {
        return Err(SealError::Refused(
            "the extension owner's sessions on this node default to REPEATABLE READ or SERIALIZABLE: pgseal cannot check a shard there",
        ));
    }
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
