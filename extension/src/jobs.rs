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
            // No tenant context, whatever the session's or the database's default:
            // policies that need one fail the scan rather than narrow it to one
            // tenant (which would leave the others' expired rows).
            with_pinned_search_path(|| {
                crate::gucs::with_tenant_setting_name(|n| crate::privilege::save_setting(n, c""));
                crate::privilege::as_table_owner(table_owner, f)
            })
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
            // The owner's code (an index predicate the planner runs, a policy)
            // could change how the values print, or the tenant the policies see,
            // for the rest of this scope: the text would then name no tenant the
            // caller can read back, or a narrowed list.
            let before = printing_settings();
            let rows = Spi::connect(|client| {
                client
                    .select(&sql, None, &[])?
                    .map(|row| row.get::<String>(1))
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(SealError::from)?;
            if printing_settings() != before {
                return Err(SealError::Refused(
                    "a setting that decides how the tenant values print, or the tenant, changed while pgseal read the table (the table owner's code ran)",
                ));
            }
            Ok(rows)
        };
        // A policy of this node's table may reach a Citus table, whose query is
        // sent to the workers as the owner.
        crate::pg::citus::with_remote_parsing_pinned(caller.as_ref(), scan)
            .map(|v| v.into_iter().flatten().collect::<Vec<String>>())
    })
}

/// The distinct tenants of Citus table `rel` (named `name`): each node that holds
/// its shards lists theirs (`_shard_tenants`, `pg::shard_nodes`), checking each
/// shard in its own catalog before it plans the shard's scan. No shard is left
/// out: a node that fails (a shard moved meanwhile, or a shard whose owner's code
/// makes the node scan it as its owner, restricted) fails the listing (55000, the
/// node's error in a WARNING before it).
fn citus_tenants(rel: pg_sys::Oid, name: &str) -> SealResult<Vec<String>> {
    let table = pgrx::spi::quote_literal(name);
    let wait = crate::pg::shard_nodes::lock_timeout_literal();
    let answers = crate::pg::shard_nodes::on_shard_nodes(rel, |shards| {
        format!("SELECT pgseal._shard_tenants({table}, {shards}, {wait})")
    })?;
    let mut lists = Vec::new();
    let mut failed = false;
    for a in answers {
        match a.result {
            Ok(list) => lists.extend(list),
            Err(message) => {
                failed = true;
                pgrx::warning!(
                    "pgseal: node {}:{} could not list the tenants of {name}'s shards: {message}",
                    a.node,
                    a.port
                );
            }
        }
    }
    if failed {
        return Err(SealError::Refused(
            "a node could not list the tenants of the table's shards (its error is in the warning before this)",
        ));
    }
    // The nodes print the values in fixed styles (`_shard_tenants`); read back
    // into the column's type, they print here as a scan of this node's table
    // would, in the caller's session's styles, which pgseald's statements then
    // read back in turn.
    let typ = as_owner(|| {
        Spi::get_one_with_args::<String>(
            "SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a \
              WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attname OPERATOR(pg_catalog.=) 'tenant_id' \
                AND NOT a.attisdropped",
            &[rel.into()],
        )
    })?
    .ok_or(SealError::Internal("no tenant column"))?;
    let mut tenants = std::collections::BTreeSet::new();
    for list in lists {
        let one = with_pinned_search_path(|| {
            Spi::connect(|c| {
                c.select(
                    &format!(
                        "SELECT x::pg_catalog.text FROM pg_catalog.unnest($1::pg_catalog.text::{typ}[]) x"
                    ),
                    None,
                    &[list.into()],
                )?
                .map(|r| r.get::<String>(1))
                .collect::<Result<Vec<_>, _>>()
            })
        })?;
        tenants.extend(one.into_iter().flatten());
    }
    Ok(tenants.into_iter().collect())
}

/// The values of the settings that decide how a tenant value prints, and of the
/// tenant setting (`local_tenants`).
fn printing_settings() -> Vec<Option<String>> {
    let mut names: Vec<std::ffi::CString> = NODE_STYLES
        .iter()
        .map(|(name, _)| (*name).to_owned())
        .collect();
    names.push(crate::gucs::with_tenant_setting_name(|n| n.to_owned()));
    names
        .iter()
        .map(|n| crate::context::read_setting(n))
        .collect()
}

/// The styles in which `_shard_tenants` prints a node's tenant values: any node
/// reads them back alike, whatever its own settings (`citus_tenants`).
const NODE_STYLES: [(&std::ffi::CStr, &std::ffi::CStr); 6] = [
    (c"DateStyle", c"ISO, YMD"),
    (c"IntervalStyle", c"postgres"),
    (c"extra_float_digits", c"3"),
    (c"bytea_output", c"hex"),
    (c"TimeZone", c"UTC"),
    (c"lc_monetary", c"C"),
];

/// `pgseal._shard_tenants(rel, shards, lock_timeout)`: on a node of a Citus cluster, the
/// distinct tenants of the shards `shards` of Citus table `rel` (a quoted,
/// qualified name) that this node holds, each listed as a table of this node
/// (`local_tenants`: as the extension owner unless planning its scan would run
/// its owner's code, which this node's catalog shows). A shard that is not here,
/// or not of that table, fails it (55000). `citus_tenants` calls it through Citus
/// as the extension owner; executable by the owner only.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn _shard_tenants(rel: &str, shards: Vec<i64>, lock_timeout: &str) -> Vec<String> {
    with_pinned_search_path(|| {
        for (name, value) in NODE_STYLES {
            crate::privilege::save_setting(name, value);
        }
        let mut tenants = std::collections::BTreeSet::new();
        for shard in crate::pg::shard_nodes::local_shards(rel, &shards, lock_timeout)? {
            check_job_table(shard)?;
            tenants.extend(local_tenants(shard)?);
        }
        Ok(tenants.into_iter().collect())
    })
    .or_raise()
}

/// `pgseal._pinned_name(rel, attnum)`: for `_key_usage` (SQL), which builds its
/// query from the names of the registered tables and columns and runs it as the
/// extension owner: `{table, column}`, quoted (`pinned_text_column`). Executable by
/// the owner only.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn _pinned_name(rel: pg_sys::Oid, attnum: i16) -> Vec<String> {
    pinned_text_column(rel, attnum)
        .map(|(name, column)| vec![name, pgrx::spi::quote_identifier(column)])
        .or_raise()
}

/// The name of table `rel`, pinned (`privilege::pinned_name`, ACCESS SHARE), and
/// the name of its column `attnum` as it is (unquoted), both read after the lock;
/// fails (55000) unless that column is a `text` column then. A column renamed, or
/// retyped to one whose casts its owner wrote, while the lock was awaited is never
/// used under the name or type read before it.
fn pinned_text_column(rel: pg_sys::Oid, attnum: i16) -> SealResult<(String, String)> {
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
    Ok((name, column))
}

/// `pgseal._citus_key_counts(rel, attnum)`: for `_key_usage` (SQL), the sealed
/// values of registered text column `attnum` of Citus table `rel`, counted by key
/// id: each node that holds its shards counts theirs (`_shard_key_counts`,
/// `pg::shard_nodes`), checking each shard in its own catalog first. When a node
/// fails (a shard whose planning would run its owner's code, a shard moved, a
/// column no longer text there), the table's values are not known: one row with
/// no key and no count, after a WARNING, which makes `_key_usage` report no key's
/// count (as for a table of this node whose planning runs its owner's code).
/// Executable by the owner only.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn _citus_key_counts(
    rel: pg_sys::Oid,
    attnum: i16,
) -> TableIterator<'static, (name!(k, Option<String>), name!(n, Option<i64>))> {
    let r = (|| {
        let (name, column) = pinned_text_column(rel, attnum)?;
        let (table, column) = (
            pgrx::spi::quote_literal(&name),
            pgrx::spi::quote_literal(column),
        );
        let wait = crate::pg::shard_nodes::lock_timeout_literal();
        let answers = match crate::pg::shard_nodes::on_shard_nodes(rel, |shards| {
            format!("SELECT pgseal._shard_key_counts({table}, {column}, {shards}, {wait})")
        }) {
            Ok(answers) => answers,
            Err(e) => {
                pgrx::warning!("pgseal: key_usage does not count {name}: {e}");
                return Ok(vec![(None, None)]);
            }
        };
        let mut counts = std::collections::BTreeMap::<String, i64>::new();
        for a in answers {
            match a.result {
                Ok(Some(json)) => {
                    let one: std::collections::BTreeMap<String, i64> = serde_json::from_str(&json)
                        .map_err(|_| {
                            SealError::Internal("a node's key counts are not a JSON object")
                        })?;
                    for (k, n) in one {
                        *counts.entry(k).or_default() += n;
                    }
                    if counts.len() > KEY_IDS_PER_NODE {
                        pgrx::warning!(
                            "pgseal: key_usage does not count {name}: more than {KEY_IDS_PER_NODE} distinct key ids in it"
                        );
                        return Ok(vec![(None, None)]);
                    }
                }
                Ok(None) => {}
                Err(message) => {
                    pgrx::warning!(
                        "pgseal: key_usage does not count {name}: node {}:{} could not count its shards: {message}",
                        a.node,
                        a.port
                    );
                    return Ok(vec![(None, None)]);
                }
            }
        }
        Ok(counts
            .into_iter()
            .map(|(k, n)| (Some(k), Some(n)))
            .collect())
    })();
    TableIterator::new(r.or_raise())
}

/// How many distinct key ids one `_shard_key_counts` statement answers for at
/// most, and `_citus_key_counts` sums for one table (a key id is a sealed value's
/// own text, which the table's writers choose).
const KEY_IDS_PER_NODE: usize = 1_000_000;

/// `pgseal._shard_key_counts(rel, column, shards, lock_timeout)`: on a node of a Citus cluster,
/// the sealed values of text column `column` (its name) in the shards `shards` of
/// Citus table `rel` (a quoted, qualified name) that this node holds, counted by key
/// id, as a JSON object. Each shard is read as the extension owner only when
/// planning its scan runs no code its owner wrote, in this node's catalog (55000
/// otherwise, as for a shard that is not here, or whose column is not text).
/// `_citus_key_counts` calls it through Citus as the extension owner; executable by
/// the owner only.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn _shard_key_counts(rel: &str, column: &str, shards: Vec<i64>, lock_timeout: &str) -> String {
    with_pinned_search_path(|| {
        let gone = || SealError::Refused("a registered sealed column is no longer a text column");
        let column_c = std::ffi::CString::new(column).map_err(|_| gone())?;
        let mut counts = std::collections::BTreeMap::<String, i64>::new();
        for shard in crate::pg::shard_nodes::local_shards(rel, &shards, lock_timeout)? {
            if crate::privilege::planning_runs_owner_code(shard)? {
                return Err(SealError::Refused(
                    "planning a query on a shard would run code its owner wrote",
                ));
            }
            let name = crate::privilege::pinned_name(shard, pg_sys::AccessShareLock)?;
            // SAFETY: syscache lookups of the locked shard's column by its name:
            // InvalidAttrNumber for a missing one, InvalidOid as the type of none.
            let text = unsafe {
                let attnum = pg_sys::get_attnum(shard, column_c.as_ptr());
                attnum > 0 && pg_sys::get_atttype(shard, attnum) == pg_sys::TEXTOID
            };
            if !text {
                return Err(gone());
            }
            let col = pgrx::spi::quote_identifier(column);
            // Only what can be a key id (docs/FORMAT.md: 1–64 of [A-Za-z0-9_-]);
            // one more than the room left, to know the cap was passed.
            let room = KEY_IDS_PER_NODE + 1 - counts.len();
            let sql = format!(
                "SELECT k, pg_catalog.count(*) FROM \
                   (SELECT pg_catalog.split_part({col}, ':', 2) AS k FROM {name} \
                     WHERE {col} OPERATOR(pg_catalog.~~) 'v2:%') v \
                  WHERE k OPERATOR(pg_catalog.~) '^[A-Za-z0-9_-]{{1,64}}$' GROUP BY 1 LIMIT {room}"
            );
            let rows = as_owner(|| {
                with_pinned_search_path(|| {
                    Spi::connect(|c| {
                        c.select(&sql, None, &[])?
                            .map(|r| Ok((r.get::<String>(1)?, r.get::<i64>(2)?)))
                            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
                    })
                })
            })?;
            for (k, n) in rows {
                *counts.entry(k.unwrap_or_default()).or_default() += n.unwrap_or(0);
            }
            // Key ids are the values' own text: a column filled with made-up ones
            // would otherwise grow the answer without bound (the cap is per
            // statement, of up to 64 shards).
            if counts.len() > KEY_IDS_PER_NODE {
                return Err(SealError::TooMany {
                    what: "distinct key ids in a sealed column's shards on one node",
                    max: KEY_IDS_PER_NODE,
                });
            }
        }
        serde_json::to_string(&counts).map_err(|_| SealError::Internal("key counts"))
    })
    .or_raise()
}

/// `pgseal._planning_runs_owner_code(rel)`: `privilege::planning_runs_owner_code`,
/// for `_key_usage` (SQL), which skips such a table rather than scan it as the
/// extension owner. Executable by the owner only.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn _planning_runs_owner_code(rel: pg_sys::Oid) -> bool {
    crate::privilege::planning_runs_owner_code(rel).or_raise()
}
