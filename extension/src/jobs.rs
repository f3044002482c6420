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

/// The distinct tenants of `rel` (a loose index scan over its tenant_id, or on a
/// Citus table a DISTINCT that each shard answers), for the retention run's default
/// rules. `pgseal._tenants_of(regclass)` calls it.
#[pg_extern(volatile, parallel_unsafe)]
fn _tenants_scan(rel: pg_sys::Oid) -> SetOfIterator<'static, String> {
    let r = check_job_table(rel).and_then(|_| {
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
            crate::privilege::require_only_owners_code(
                rel,
                table_owner,
                pg_sys::AccessShareLock,
                &[],
            )?;
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
            // Citus refuses the recursive scan on its tables; a DISTINCT over the
            // distribution column runs on each shard instead (docs/SCALING.md).
            let citus = Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pgseal._citus_tables() d WHERE d.rel OPERATOR(pg_catalog.=) $1)",
                &[rel.into()],
            )?
            .unwrap_or(false);
            let sql = if citus {
                format!(
                    "SELECT DISTINCT tenant_id::pg_catalog.text FROM {name} WHERE tenant_id IS NOT NULL"
                )
            } else {
                format!(
                "WITH RECURSIVE t AS (
                     (SELECT tenant_id AS id FROM {name} WHERE tenant_id IS NOT NULL ORDER BY tenant_id LIMIT 1)
                     UNION ALL
                     SELECT (SELECT x.tenant_id FROM {name} x
                              WHERE x.tenant_id OPERATOR(pg_catalog.>) t.id ORDER BY x.tenant_id LIMIT 1)
                       FROM t WHERE t.id IS NOT NULL)
                 SELECT id::pg_catalog.text FROM t WHERE id IS NOT NULL"
                )
            };
            let scan = || {
                Spi::connect(|client| {
                    client
                        .select(&sql, None, &[])?
                        .map(|row| row.get::<String>(1))
                        .collect::<Result<Vec<_>, _>>()
                })
                .map_err(SealError::from)
            };
            // A Citus table's query is sent to the workers as the owner (and a
            // table of this node's policies may reach a Citus table too).
            crate::pg::citus::with_remote_parsing_pinned(caller.as_ref(), scan)
            .map(|v| v.into_iter().flatten().collect::<Vec<String>>())
        })
    });
    SetOfIterator::new(r.or_raise())
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
