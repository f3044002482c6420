//! Tenant offboarding (issue 19): `tenant_offboard` schedules the end of a tenant
//! after a grace period, `tenant_offboard_cancel` undoes it within that period, and
//! pgseald carries out the steps through the internal functions here, each of which
//! checks the tenant's step (compare-and-set), its due time and its legal hold under
//! the tenant's chain lock. The state is `pgseal.tenant_offboardings`
//! (sql/offboarding.sql), written only here, as the extension owner.
//!
//! The tables offboarded (`tables`) are those `tenant_protect` protects, by the
//! column its policy tests, and those an administrator registered
//! (`subject_register`, `vault_register_column`, `retention_set`) by their
//! `tenant_id` column, a `text` or `varchar` one with a deterministic collation;
//! their rows are read and deleted here, never by pgseald's own SQL, each statement
//! limited to the tenant (`COLLATE "C"`, which no index on the column serves: the
//! export and the count of rows left read every row, so that an index that misses a
//! row cannot keep it from either), after the privilege checks of the caller and
//! of the role that scheduled the offboarding, and run as the table's owner in a
//! security-restricted operation, as `subjects` does. Where row-level security
//! binds that owner, its policies must be exactly `tenant_protect`'s, which show
//! the owner the tenant's rows and no fewer (`require_own_policies`). The
//! deletes take only rows the export held, as it read them (`delete`). Tables
//! with pgseal's policies that cannot be offboarded so (`org_protect`'s, and
//! `tenant_protect`'s on another column type) are named in the receipt.
//! Before the step after deleting is recorded, and again before the receipt, the
//! tenant's rows left in those tables are counted (as each table's owner, under
//! the tenant's context: `rows_left`); the receipt is refused while any row, data
//! key or payload is left, and the offboarding goes back to deleting instead.
//! Reading, deleting and counting need the tenant context to be the tenant.

use pgrx::prelude::*;
use pgrx::JsonB;
use pgrx::PgMemoryContexts;
use serde_json::json;

use crate::error::{OrRaise, SealError, SealResult};
use crate::ledger::erase::{self, Which};
use crate::ledger::evidence;
use crate::privilege::{as_owner, as_table_owner, with_pinned_search_path};

mod delete;
mod exported;
mod visible;

use visible::as_offboarding_owner;
pub use visible::TXN;

/// The steps, in order (`tenant_offboardings.step`).
const STEPS: [&str; 7] = [
    "scheduled",
    "exported",
    "deleted",
    "shredded",
    "erased",
    "receipted",
    "done",
];

/// The checks every function makes: the master key, a tenant argument that is not
/// one of pgseal's own chains, pgseal_admin, a read-write transaction.
fn checked(tenant: Option<&str>, what: &'static str) -> SealResult<String> {
    crate::master::require_loaded()?;
    let tenant = tenant.ok_or(SealError::NullArgument("tenant"))?;
    crate::limits::tenant_arg(tenant)?;
    if crate::ledger::names::is_pgseal_chain(tenant) {
        return Err(SealError::Forbidden(
            "pgseal's own chains cannot be offboarded",
        ));
    }
    crate::ledger::access::require_admin(what)?;
    crate::pg::xact::require_read_write(what)?;
    // Not from a table owner's code that a step runs (a trigger on an offboarded
    // table): the offboarding's record would name pgseald's session.
    crate::privilege::require_no_table_owner_code(
        "an offboarding function cannot be called from a table owner's code that pgseal runs",
    )?;
    Ok(tenant.to_owned())
}

/// `pgseal.tenant_offboard(tenant, grace)`: schedules the tenant's offboarding for
/// `now() + grace` and records `tenant.offboard_scheduled`; returns the due time.
/// Refused (55000) when one is already scheduled or running.
#[pg_extern(volatile, parallel_unsafe)]
fn tenant_offboard(
    tenant: Option<&str>,
    grace: Option<pgrx::datum::Interval>,
) -> pgrx::datum::TimestampWithTimeZone {
    (|| {
        let tenant = checked(tenant, "tenant_offboard")?;
        let grace = grace.ok_or(SealError::NullArgument("grace"))?;
        // The role scheduling it needs what the steps will need of it on every
        // table offboarded now (42501, naming the table): told now, not when due.
        for t in tables()? {
            for privilege in ["SELECT", "DELETE"] {
                let ok = Spi::get_one_with_args::<bool>(
                    "SELECT pg_catalog.has_table_privilege($1, $2)",
                    &[t.rel.into(), privilege.into()],
                )?;
                if ok != Some(true) {
                    return Err(SealError::Forbidden(
                        "scheduling an offboarding needs SELECT and DELETE on every table it offboards",
                    )
                    .on_table(&crate::ledger::evidence::qualified_name(t.rel)));
                }
            }
            if t.org
                && Spi::get_one_with_args::<bool>(
                    "SELECT pg_catalog.row_security_active($1)",
                    &[t.rel.into()],
                )? != Some(false)
            {
                return Err(SealError::Forbidden(
                    "org_protect's policies bind the role scheduling the offboarding on a table it offboards: only a role they do not bind (a superuser, or one with BYPASSRLS) may offboard its tenants' rows",
                )
                .on_table(&crate::ledger::evidence::qualified_name(t.rel)));
            }
        }
        erase::lock_chain(&tenant)?;
        // SAFETY: reads the backend's current user id; no preconditions.
        let scheduler = unsafe { pg_sys::GetUserId() };
        let (due, due_text) = as_owner(|| -> SealResult<_> {
            if Spi::get_one_with_args::<bool>(
                "SELECT $1::pg_catalog.interval OPERATOR(pg_catalog.<) '0'::pg_catalog.interval \
                     OR $1::pg_catalog.interval OPERATOR(pg_catalog.>) '100 years'::pg_catalog.interval",
                &[grace.into()],
            )? != Some(false)
            {
                return Err(SealError::InvalidArgument(
                    "grace must lie between 0 and 100 years",
                ));
            }
            let row = Spi::get_two_with_args::<pgrx::datum::TimestampWithTimeZone, String>(
                "INSERT INTO pgseal.tenant_offboardings (tenant_id, due_at, scheduled_by) \
                 VALUES ($1, pg_catalog.now() OPERATOR(pg_catalog.+) $2::pg_catalog.interval, $3::pg_catalog.oid::pg_catalog.regrole) \
                 ON CONFLICT (tenant_id) DO NOTHING \
                 RETURNING due_at, pg_catalog.to_char(due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
                &[tenant.as_str().into(), grace.into(), scheduler.into()],
            );
            match row {
                Ok((Some(due), Some(text))) => Ok((due, text)),
                Ok(_) | Err(pgrx::spi::Error::InvalidPosition) => Err(SealError::Refused(
                    "an offboarding of the tenant is already scheduled or running",
                )),
                Err(e) => Err(e.into()),
            }
        })?;
        let grace_text = as_owner(|| {
            Spi::get_one_with_args::<String>(
                "SELECT $1::pg_catalog.interval::pg_catalog.text",
                &[grace.into()],
            )
        })?;
        evidence::record(
            &tenant,
            "tenant.offboard_scheduled",
            json!({ "due_at": due_text, "grace": grace_text }),
        )?;
        Ok(due)
    })()
    .or_raise()
}

/// `pgseal.tenant_offboard_cancel(tenant)`: cancels a scheduled offboarding while
/// its grace period runs and records `tenant.offboard_cancelled`. Refused (55000)
/// when none is scheduled, or once it is due (pgseald may have begun).
#[pg_extern(volatile, parallel_unsafe)]
fn tenant_offboard_cancel(tenant: Option<&str>) {
    (|| {
        let tenant = checked(tenant, "tenant_offboard_cancel")?;
        erase::lock_chain(&tenant)?;
        let state = as_owner(|| {
            Spi::get_two_with_args::<String, bool>(
                "SELECT step, due_at OPERATOR(pg_catalog.<=) pg_catalog.now() \
                   FROM pgseal.tenant_offboardings WHERE tenant_id = $1 FOR UPDATE",
                &[tenant.as_str().into()],
            )
        });
        match state {
            Ok((Some(step), Some(false))) if step == "scheduled" => {}
            Ok((Some(_), Some(_))) => {
                return Err(SealError::Refused(
                    "the offboarding's grace period is over: it can no longer be cancelled",
                ))
            }
            Ok(_) | Err(pgrx::spi::Error::InvalidPosition) => {
                return Err(SealError::Refused("no offboarding of the tenant is scheduled"))
            }
            Err(e) => return Err(e.into()),
        }
        let due = as_owner(|| {
            Spi::get_one_with_args::<String>(
                "DELETE FROM pgseal.tenant_offboardings WHERE tenant_id = $1 \
                 RETURNING pg_catalog.to_char(due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
                &[tenant.as_str().into()],
            )
        })?;
        evidence::record(&tenant, "tenant.offboard_cancelled", json!({ "due_at": due }))?;
        Ok(())
    })()
    .or_raise()
}

/// Fails (55000) unless `tenant`'s offboarding is due, not done, not held, and at
/// `step`. Takes the tenant's chain lock first (a hold is recorded in the chain).
fn require_step(tenant: &str, step: &str) -> SealResult<()> {
    erase::lock_chain(tenant)?;
    if crate::ledger::admin::on_hold(tenant)? {
        return Err(SealError::Refused(
            "the tenant is under a retention hold: it is not offboarded",
        ));
    }
    let at = as_owner(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT step = $2 AND due_at OPERATOR(pg_catalog.<=) pg_catalog.now() \
               FROM pgseal.tenant_offboardings WHERE tenant_id = $1",
            &[tenant.into(), step.into()],
        )
    });
    match at {
        Ok(Some(true)) => Ok(()),
        Ok(_) | Err(pgrx::spi::Error::InvalidPosition) => Err(SealError::Refused(
            "the tenant's offboarding is not due at that step",
        )),
        Err(e) => Err(e.into()),
    }
}

/// A table an offboarding deletes from.
struct Table {
    rel: pg_sys::Oid,
    owner: pg_sys::Oid,
    /// The tenant column's number: the column the table's `pgseal_tenant` policy
    /// tests where `tenant_protect` protects it, `tenant_id` otherwise; None when
    /// that policy tests no single column (`lock` refuses it).
    attnum: Option<i16>,
    /// Whether `org_protect` protects it (its tenant column the one its
    /// `pgseal_tenant_only` policy tests), rather than `tenant_protect`.
    org: bool,
}

/// The catalog's candidates for offboarding (`tables`), as a CTE `cand(oid,
/// owner, attnum, protected, org, name)` over the plain and partitioned, permanent
/// tables outside pgseal: those with a `pgseal_tenant` policy (`tenant_protect`'s)
/// or a `pgseal_tenant_only` one with the two offboarding policies beside it
/// (`org_protect`'s, `org`; `visible`), `attnum` the one column it tests (or NULL),
/// at any level of a partition or inheritance tree, and those registered (`subject_register`,
/// `vault_register_column`, `retention_set`) with a `text` or `varchar`
/// `tenant_id` column and no such policy (a partition only through its root).
/// Then `anc(child, parent)`: every ancestor of every table.
const CANDIDATES: &str = "\
WITH RECURSIVE cand AS ( \
    SELECT c.oid, c.relowner AS owner, \
           CASE WHEN p.oid IS NOT NULL THEN pc.attnum ELSE tc.attnum END AS attnum, \
           p.oid IS NOT NULL AS protected, COALESCE(p.org, false) AS org, \
           pg_catalog.format('%I.%I', n.nspname, c.relname) AS name \
      FROM pg_catalog.pg_class c \
      JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
      LEFT JOIN LATERAL (SELECT p.oid, p.polname OPERATOR(pg_catalog.<>) 'pgseal_tenant' AS org \
                           FROM pg_catalog.pg_policy p \
                          WHERE p.polrelid OPERATOR(pg_catalog.=) c.oid \
                            AND (p.polname OPERATOR(pg_catalog.=) 'pgseal_tenant' \
                                 OR (p.polname OPERATOR(pg_catalog.=) 'pgseal_tenant_only' \
                                     AND EXISTS (SELECT 1 FROM pg_catalog.pg_policy q WHERE q.polrelid OPERATOR(pg_catalog.=) c.oid \
                                                    AND q.polname OPERATOR(pg_catalog.=) 'pgseal_offboard_select') \
                                     AND EXISTS (SELECT 1 FROM pg_catalog.pg_policy q WHERE q.polrelid OPERATOR(pg_catalog.=) c.oid \
                                                    AND q.polname OPERATOR(pg_catalog.=) 'pgseal_offboard_delete')) \
                                 OR (p.polname OPERATOR(pg_catalog.=) 'pgseal_offboard_select' \
                                     AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_policy q WHERE q.polrelid OPERATOR(pg_catalog.=) c.oid \
                                                        AND q.polname OPERATOR(pg_catalog.=) 'pgseal_tenant_only') \
                                     AND EXISTS (SELECT 1 FROM pg_catalog.pg_policy q WHERE q.polrelid OPERATOR(pg_catalog.=) c.oid \
                                                    AND q.polname OPERATOR(pg_catalog.=) 'pgseal_offboard_delete') \
                                     AND EXISTS (SELECT 1 FROM pg_catalog.pg_policy q WHERE q.polrelid OPERATOR(pg_catalog.=) c.oid \
                                                    AND q.polname OPERATOR(pg_catalog.=) 'pgseal_owner'))) \
                          ORDER BY p.polname LIMIT 1) p ON true \
      LEFT JOIN LATERAL (SELECT pg_catalog.min(d.refobjsubid)::pg_catalog.int2 AS attnum FROM pg_catalog.pg_depend d \
                          WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_policy'::pg_catalog.regclass \
                            AND d.objid OPERATOR(pg_catalog.=) p.oid \
                            AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass \
                            AND d.refobjid OPERATOR(pg_catalog.=) c.oid AND d.refobjsubid OPERATOR(pg_catalog.>) 0 \
                         HAVING pg_catalog.count(DISTINCT d.refobjsubid) OPERATOR(pg_catalog.=) 1) pc ON true \
      LEFT JOIN pg_catalog.pg_attribute tc ON tc.attrelid OPERATOR(pg_catalog.=) c.oid \
            AND tc.attname OPERATOR(pg_catalog.=) 'tenant_id' AND NOT tc.attisdropped \
            AND tc.atttypid IN ('pg_catalog.text'::pg_catalog.regtype, 'pg_catalog.varchar'::pg_catalog.regtype) \
     WHERE c.relkind IN ('r', 'p') AND c.relpersistence OPERATOR(pg_catalog.<>) 't' \
       AND n.nspname NOT IN ('pgseal', 'pg_catalog', 'information_schema') \
       AND (p.oid IS NOT NULL \
            OR (NOT c.relispartition AND tc.attnum IS NOT NULL \
                AND (EXISTS (SELECT 1 FROM pgseal.subject_columns x WHERE x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) c.oid) \
                     OR EXISTS (SELECT 1 FROM pgseal.sealed_columns x WHERE x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) c.oid) \
                     OR EXISTS (SELECT 1 FROM pgseal.retention_rules x WHERE x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) c.oid))))), \
anc(child, parent) AS ( \
    SELECT i.inhrelid, i.inhparent FROM pg_catalog.pg_inherits i \
    UNION SELECT a.child, i.inhparent FROM anc a JOIN pg_catalog.pg_inherits i ON i.inhrelid OPERATOR(pg_catalog.=) a.parent) ";

/// Whether candidate `c` can be offboarded: not protected, or protected by a
/// `text` or `varchar` column (or by a policy that tests no single column, which
/// `lock` refuses, naming it).
const OFFBOARDABLE: &str = "\
(NOT c.protected OR c.attnum IS NULL \
 OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a \
             WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.=) c.attnum AND NOT a.attisdropped \
               AND a.atttypid IN ('pg_catalog.text'::pg_catalog.regtype, 'pg_catalog.varchar'::pg_catalog.regtype)))";

/// The tables whose tenant's rows an offboarding deletes, in name order: the
/// offboardable `CANDIDATES` below no offboardable candidate (a table and the tables
/// under it are read and deleted from through it; a protected partition whose root
/// is neither protected nor registered on its own).
/// - `tenant_protect`'s by the column its policy tests (`not_offboarded` names
///   those on a column of another type);
/// - registered ones by `tenant_id`.
fn tables() -> SealResult<Vec<Table>> {
    tables_of(
        &format!(
            "{CANDIDATES} \
             SELECT c.oid, c.owner, c.attnum, c.org FROM cand c \
              WHERE {OFFBOARDABLE} \
                AND NOT EXISTS (SELECT 1 FROM anc a JOIN cand p ON p.oid OPERATOR(pg_catalog.=) a.parent \
                                 WHERE a.child OPERATOR(pg_catalog.=) c.oid \
                                   AND (NOT p.protected OR p.attnum IS NULL \
                                        OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a2 \
                                                    WHERE a2.attrelid OPERATOR(pg_catalog.=) p.oid AND a2.attnum OPERATOR(pg_catalog.=) p.attnum \
                                                      AND NOT a2.attisdropped \
                                                      AND a2.atttypid IN ('pg_catalog.text'::pg_catalog.regtype, 'pg_catalog.varchar'::pg_catalog.regtype)))) \
              ORDER BY c.name"
        ),
        &[],
    )
}

/// The tables with pgseal's policies that no offboarded table (`offboarded`)
/// covers, named as the receipt shows them: `org_protect`'s (their policies show a
/// tenant's rows only to its members, so no statement of the offboarding could
/// find them all), `tenant_protect`'s on a tenant column that is neither `text`
/// nor `varchar`, and partitions or children of either kind under no offboarded
/// table.
fn not_offboarded(offboarded: &[pg_sys::Oid]) -> SealResult<Vec<String>> {
    let rels = as_owner(|| {
        Spi::connect(|c| {
            c.select(
                "WITH RECURSIVE anc(child, parent) AS ( \
                     SELECT i.inhrelid, i.inhparent FROM pg_catalog.pg_inherits i \
                     UNION SELECT a.child, i.inhparent FROM anc a JOIN pg_catalog.pg_inherits i ON i.inhrelid OPERATOR(pg_catalog.=) a.parent) \
                 SELECT c.oid FROM pg_catalog.pg_class c \
                   JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
                  WHERE c.relkind IN ('r', 'p') AND c.relpersistence OPERATOR(pg_catalog.<>) 't' \
                    AND n.nspname NOT IN ('pgseal', 'pg_catalog', 'information_schema') \
                    AND NOT c.oid OPERATOR(pg_catalog.=) ANY ($1) \
                    AND NOT EXISTS (SELECT 1 FROM anc a WHERE a.child OPERATOR(pg_catalog.=) c.oid \
                                       AND a.parent OPERATOR(pg_catalog.=) ANY ($1)) \
                    AND EXISTS (SELECT 1 FROM pg_catalog.pg_policy p WHERE p.polrelid OPERATOR(pg_catalog.=) c.oid \
                                   AND p.polname IN ('pgseal_tenant', 'pgseal_tenant_only', 'pgseal_owner')) \
                  ORDER BY pg_catalog.format('%I.%I', n.nspname, c.relname)",
                None,
                &[offboarded.to_vec().into()],
            )?
            .map(|r| r.get::<pg_sys::Oid>(1).map(Option::unwrap_or_default))
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
        })
    })?;
    Ok(rels
        .into_iter()
        .map(crate::ledger::evidence::qualified_name)
        .collect())
}

/// The tables `sql` names, as its rows (OID, owner, tenant column), read as the
/// extension owner.
fn tables_of(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> SealResult<Vec<Table>> {
    as_owner(|| {
        Spi::connect(|c| {
            let mut out = Vec::new();
            for r in c.select(sql, None, args)? {
                let missing = || SealError::Internal("a table's catalog row");
                out.push(Table {
                    rel: r.get::<pg_sys::Oid>(1)?.ok_or_else(missing)?,
                    owner: r.get::<pg_sys::Oid>(2)?.ok_or_else(missing)?,
                    attnum: r.get::<i16>(3)?,
                    org: r.get::<bool>(4)?.unwrap_or(false),
                });
            }
            Ok::<_, SealError>(out)
        })
    })
}

/// A table locked, with its name and its tenant column's, quoted, as they are
/// once the lock is held, and the column's type.
struct Locked {
    name: String,
    column: String,
    varchar: bool,
}

impl Locked {
    /// `<alias>.<tenant column> = $1`, the tenant, compared byte for byte.
    fn tenant_is(&self, alias: &str) -> String {
        format!(
            "{alias}.{} COLLATE pg_catalog.\"C\" OPERATOR(pg_catalog.=) $1::pg_catalog.text",
            self.column
        )
    }

    /// The texts PostgreSQL prints (`pg_get_expr`, search_path pinned) for the
    /// condition `tenant_protect` gives its policy on this column, as it writes it
    /// without Citus and with it.
    fn policy_texts(&self) -> Vec<String> {
        [
            "( SELECT pgseal.current_tenant() AS current_tenant)",
            "pgseal.current_tenant()",
        ]
        .iter()
        .map(|v| {
            if self.varchar {
                format!(
                    "(({})::text = (({v})::character varying)::text)",
                    self.column
                )
            } else {
                format!("({} = {v})", self.column)
            }
        })
        .collect()
    }
}

impl Table {
    /// `lock`, then checks the table: no third role's code runs as its owner
    /// (`require_only_owners_code`), and the caller holds `privilege` on it
    /// (`denied` says which step needs it). Returns its name as it is now.
    ///
    /// The role that scheduled the tenant's offboarding must hold `privilege` on
    /// it too (42501): pgseald's grants must not let an administrator who could not
    /// read or delete a table's rows have them exported or deleted.
    fn lock_checked(
        &self,
        tenant: &str,
        lockmode: u32,
        privilege: &str,
        denied: &'static str,
    ) -> SealResult<Locked> {
        let locked = self.lock(lockmode)?;
        crate::privilege::require_only_owners_code(self.rel, self.owner, lockmode, &[])
            .and_then(|()| {
                crate::subjects::require_table_access(self.rel, self.owner, privilege, denied)
            })
            .and_then(|()| require_scheduler_access(tenant, self.rel, privilege))
            .and_then(|()| self.require_own_policies(tenant, &locked))
            .map_err(|e| e.on_table(&locked.name))?;
        Ok(locked)
    }

    /// Locks the table by its OID (`lockmode`), so that no rename or DROP moves its
    /// name to another relation meanwhile, and returns its name and its tenant
    /// column's as they are now, quoted (the names `tables()` read may already name
    /// something else: a view put in its place after a rename, another column
    /// renamed to the tenant column's name). Refused (55000) when the column is
    /// no longer a `text` or `varchar` one, or its collation is not deterministic
    /// (a row its policy shows the tenant would then not be found by the tenant's
    /// id byte for byte, and be left behind).
    fn lock(&self, lockmode: u32) -> SealResult<Locked> {
        let name = crate::privilege::pinned_name(self.rel, lockmode)?;
        // SAFETY: a syscache lookup of a locked relation's kind.
        let kind = unsafe { pg_sys::get_rel_relkind(self.rel) } as u8;
        if kind != pg_sys::RELKIND_RELATION && kind != pg_sys::RELKIND_PARTITIONED_TABLE {
            return Err(SealError::Refused(
                "an offboarded table was dropped or replaced meanwhile",
            ));
        }
        let attnum = self.attnum.ok_or_else(|| {
            SealError::Refused(
                "a table's pgseal_tenant policy is not tenant_protect's (it does not test one column): run pgseal.tenant_protect on it again",
            )
            .on_table(&name)
        })?;
        let column = as_owner(|| {
            Spi::get_two_with_args::<bool, bool>(
                "SELECT a.atttypid OPERATOR(pg_catalog.=) 'pg_catalog.varchar'::pg_catalog.regtype, \
                        a.atttypid IN ('pg_catalog.text'::pg_catalog.regtype, 'pg_catalog.varchar'::pg_catalog.regtype) \
                          AND COALESCE((SELECT l.collisdeterministic FROM pg_catalog.pg_collation l \
                                         WHERE l.oid OPERATOR(pg_catalog.=) a.attcollation), false) \
                   FROM pg_catalog.pg_attribute a \
                  WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attnum OPERATOR(pg_catalog.=) $2 AND NOT a.attisdropped",
                &[self.rel.into(), attnum.into()],
            )
        });
        let refused = || {
            SealError::Refused(
                "an offboarded table's tenant column was dropped or retyped meanwhile, or has a collation that is not deterministic",
            )
            .on_table(&name)
        };
        let varchar = match column {
            Ok((Some(varchar), Some(true))) => varchar,
            Ok(_) | Err(pgrx::spi::Error::InvalidPosition) => return Err(refused()),
            Err(e) => return Err(e.into()),
        };
        // SAFETY: a syscache lookup of the locked table's column (missing_ok):
        // a palloc'd name, or null for a dropped one.
        let column = unsafe {
            let p = pg_sys::get_attname(self.rel, attnum, true);
            if p.is_null() {
                return Err(refused());
            }
            crate::privilege::exact_name(std::ffi::CStr::from_ptr(p))
                .map_err(|e| e.on_table(&name))?
        };
        Ok(Locked {
            name,
            column: pgrx::spi::quote_identifier(column),
            varchar,
        })
    }

    /// Refuses (55000) a table whose policies could make the tenant's rows differ
    /// from those the statements here find:
    /// - a `pgseal_tenant` policy that is not exactly `tenant_protect`'s on the
    ///   tenant column (permissive, for all commands and roles, its condition as
    ///   `tenant_protect` writes it): the tenant's application would see rows as
    ///   theirs that a byte-for-byte comparison on the column does not find;
    /// - where row-level security binds the table's owner (by whose rights every
    ///   statement here runs) or the role that scheduled the offboarding, any
    ///   policy beside that one: it could hide rows of the tenant from the export,
    ///   the deletes and the count of rows left (the receipt would stand over rows
    ///   left), or show the scheduler fewer rows than the owner deletes.
    fn require_own_policies(&self, tenant: &str, locked: &Locked) -> SealResult<()> {
        self.require_tree_policies(locked)?;
        if self.org {
            self.require_org_policies(locked)?;
            // org_protect's policies show the scheduler, as any role they bind,
            // only its own user's and organisations' rows, while the offboarding
            // reads and deletes all of the tenant's: only a role they do not bind
            // may have that done.
            if let Some(role) = scheduler_of(tenant)? {
                if self.bound(role)? {
                    return Err(SealError::Forbidden(
                        "org_protect's policies bind the role that scheduled the offboarding on an offboarded table: only a role they do not bind (a superuser, or one with BYPASSRLS) may offboard its tenants' rows",
                    ));
                }
            }
            return Ok(());
        }
        let (has_own, exact, only_exact) = as_owner(|| {
            Spi::connect(|c| {
                let row = c
                    .select(
                        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_policy p WHERE p.polrelid OPERATOR(pg_catalog.=) $1 \
                                           AND p.polname OPERATOR(pg_catalog.=) 'pgseal_tenant'), \
                                COALESCE(pg_catalog.bool_and(e.exact IS TRUE) FILTER (WHERE e.polname OPERATOR(pg_catalog.=) 'pgseal_tenant'), true), \
                                pg_catalog.count(*) OPERATOR(pg_catalog.=) 1 AND COALESCE(pg_catalog.bool_and(e.exact IS TRUE), false) \
                           FROM (SELECT p.polname, p.polname OPERATOR(pg_catalog.=) 'pgseal_tenant' AND p.polpermissive \
                                        AND p.polcmd OPERATOR(pg_catalog.=) '*' AND p.polroles OPERATOR(pg_catalog.=) '{0}'::pg_catalog.oid[] \
                                        AND pg_catalog.pg_get_expr(p.polqual, p.polrelid) OPERATOR(pg_catalog.=) ANY ($2) \
                                        AND pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid) OPERATOR(pg_catalog.=) ANY ($2) AS exact \
                                   FROM pg_catalog.pg_policy p WHERE p.polrelid OPERATOR(pg_catalog.=) $1) e",
                        Some(1),
                        &[self.rel.into(), locked.policy_texts().into()],
                    )?
                    .first();
                Ok::<_, pgrx::spi::Error>((
                    row.get::<bool>(1)?.unwrap_or(true),
                    row.get::<bool>(2)?.unwrap_or(false),
                    row.get::<bool>(3)?.unwrap_or(false),
                ))
            })
        })?;
        if has_own && !exact {
            return Err(SealError::Refused(
                "an offboarded table's pgseal_tenant policy is not tenant_protect's: the tenant's rows cannot all be found (run pgseal.tenant_protect on it again)",
            ));
        }
        if only_exact {
            return Ok(());
        }
        let bound = |role: pg_sys::Oid| self.bound(role);
        if bound(self.owner)? || scheduler_of(tenant)?.map(bound).transpose()? == Some(true) {
            return Err(SealError::Refused(
                "row-level security other than tenant_protect's binds an offboarded table's owner or the role that scheduled the offboarding: the tenant's rows cannot all be found (run pgseal.tenant_protect on it again)",
            ));
        }
        Ok(())
    }
}

impl Table {
    /// Whether row-level security binds `role` on this table (evaluated as that
    /// role, in a security-restricted operation: only the built-in runs).
    fn bound(&self, role: pg_sys::Oid) -> SealResult<bool> {
        Ok(as_table_owner(role, || {
            Spi::get_one_with_args::<bool>(
                "SELECT pg_catalog.row_security_active($1)",
                &[self.rel.into()],
            )
        })? != Some(false))
    }

    /// Refuses (55000, naming it) a table under this one (a partition or an
    /// inheritance child, at any level) whose own tenant policy (`pgseal_tenant`,
    /// or `org_protect`'s `pgseal_tenant_only`) is not the one this table's would be
    /// on the same column: the statements here go through this table and find the
    /// tenant's rows by its column, while the tenant's application, reading that
    /// table directly, would see others. And one with more than one parent, whose
    /// rows the export would read twice.
    fn require_tree_policies(&self, locked: &Locked) -> SealResult<()> {
        let odd = as_owner(|| {
            Spi::get_one_with_args::<pg_sys::Oid>(
                "WITH RECURSIVE t(rel) AS (SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent OPERATOR(pg_catalog.=) $1 \
                    UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN t ON i.inhparent OPERATOR(pg_catalog.=) t.rel) \
                 SELECT t.rel FROM t \
                  WHERE (SELECT pg_catalog.count(*) FROM pg_catalog.pg_inherits i WHERE i.inhrelid OPERATOR(pg_catalog.=) t.rel) \
                          OPERATOR(pg_catalog.>) 1 \
                     OR EXISTS (SELECT 1 FROM pg_catalog.pg_policy p \
                                 WHERE p.polrelid OPERATOR(pg_catalog.=) t.rel \
                                   AND p.polname IN ('pgseal_tenant', 'pgseal_tenant_only') \
                                   AND NOT COALESCE(pg_catalog.pg_get_expr(p.polqual, p.polrelid) OPERATOR(pg_catalog.=) ANY ($2) \
                                                    AND pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid) OPERATOR(pg_catalog.=) ANY ($2) \
                                                    AND p.polcmd OPERATOR(pg_catalog.=) '*' \
                                                    AND p.polroles OPERATOR(pg_catalog.=) '{0}'::pg_catalog.oid[] \
                                                    AND p.polpermissive OPERATOR(pg_catalog.=) (p.polname OPERATOR(pg_catalog.=) 'pgseal_tenant'), \
                                                    false)) \
                  ORDER BY t.rel LIMIT 1",
                &[self.rel.into(), locked.policy_texts().into()],
            )
        });
        match odd {
            Ok(None) | Err(pgrx::spi::Error::InvalidPosition) => Ok(()),
            Ok(Some(member)) => Err(SealError::Refused(
                "a table under an offboarded one has a tenant policy other than its parent's (another column, or another condition), or more than one parent: the tenant's rows in it cannot all be found through its parent (run the protect function on the parent again)",
            )
            .on_table(&crate::ledger::evidence::qualified_name(member))),
            Err(e) => Err(e.into()),
        }
    }

    /// `require_own_policies` for a table `org_protect` protects: its restrictive
    /// `pgseal_tenant_only` policy exactly `org_protect`'s on the tenant column (it
    /// limits every statement to the tenant), its two offboarding policies exactly
    /// `org_protect`'s (they show the owner all the tenant's rows inside the
    /// offboarding's statements: `visible`), and no policy but `org_protect`'s
    /// permissive ones beside them (a restrictive one could hide a row; the
    /// permissive ones only ever show more, which the restrictive one still limits
    /// to the tenant). Their conditions run as the owner here, so they may depend
    /// on nothing but the table itself, pgseal's own objects, PostgreSQL's built-in
    /// ones (which `pg_depend` does not record) and types that are not domains owned
    /// by the owner or a superuser: no function, operator, domain or relation of
    /// anyone else (its code would run with the owner's rights). Refused (55000)
    /// otherwise. `org_protect`'s form on Citus has no restrictive policy (Citus
    /// would make it permissive on the shards): there each offboarding policy is the
    /// tenant's condition and the offboarding's, exactly, and the statements here
    /// test the tenant themselves.
    fn require_org_policies(&self, locked: &Locked) -> SealResult<()> {
        let ok = as_owner(|| {
            Spi::get_one_with_args::<bool>(
                "SELECT COALESCE(pg_catalog.bool_and((CASE p.polname \
                          WHEN 'pgseal_tenant_only' THEN NOT p.polpermissive AND p.polcmd OPERATOR(pg_catalog.=) '*' \
                               AND p.polqual IS NOT NULL AND p.polwithcheck IS NOT NULL \
                               AND p.polroles OPERATOR(pg_catalog.=) '{0}'::pg_catalog.oid[] \
                               AND pg_catalog.pg_get_expr(p.polqual, p.polrelid) OPERATOR(pg_catalog.=) ANY ($2) \
                               AND pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid) OPERATOR(pg_catalog.=) ANY ($2) \
                          WHEN 'pgseal_offboard_select' THEN p.polpermissive AND p.polcmd OPERATOR(pg_catalog.=) 'r' \
                               AND p.polqual IS NOT NULL \
                               AND p.polroles OPERATOR(pg_catalog.=) '{0}'::pg_catalog.oid[] AND p.polwithcheck IS NULL \
                               AND pg_catalog.pg_get_expr(p.polqual, p.polrelid) OPERATOR(pg_catalog.=) ANY (v.texts OPERATOR(pg_catalog.||) v.doubled) \
                          WHEN 'pgseal_offboard_delete' THEN p.polpermissive AND p.polcmd OPERATOR(pg_catalog.=) 'd' \
                               AND p.polqual IS NOT NULL \
                               AND p.polroles OPERATOR(pg_catalog.=) '{0}'::pg_catalog.oid[] AND p.polwithcheck IS NULL \
                               AND pg_catalog.pg_get_expr(p.polqual, p.polrelid) OPERATOR(pg_catalog.=) ANY (v.texts OPERATOR(pg_catalog.||) v.doubled) \
                          WHEN 'pgseal_owner' THEN p.polpermissive \
                          WHEN 'pgseal_org_select' THEN p.polpermissive \
                          WHEN 'pgseal_org_insert' THEN p.polpermissive \
                          WHEN 'pgseal_org_update' THEN p.polpermissive \
                          WHEN 'pgseal_org_delete' THEN p.polpermissive \
                          ELSE false END) IS TRUE), false) \
                    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_policy q \
                                      JOIN pg_catalog.pg_depend d ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_policy'::pg_catalog.regclass \
                                                                 AND d.objid OPERATOR(pg_catalog.=) q.oid \
                                     WHERE q.polrelid OPERATOR(pg_catalog.=) $1 \
                                       AND NOT (d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass \
                                                AND d.refobjid OPERATOR(pg_catalog.=) $1) \
                                       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend x \
                                                        WHERE x.classid OPERATOR(pg_catalog.=) d.refclassid AND x.objid OPERATOR(pg_catalog.=) d.refobjid \
                                                          AND x.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass \
                                                          AND x.deptype OPERATOR(pg_catalog.=) 'e' \
                                                          AND x.refobjid OPERATOR(pg_catalog.=) (SELECT e.oid FROM pg_catalog.pg_extension e \
                                                                                                   WHERE e.extname OPERATOR(pg_catalog.=) 'pgseal')) \
                                       AND NOT (d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_type'::pg_catalog.regclass \
                                                AND EXISTS (SELECT 1 FROM pg_catalog.pg_type t JOIN pg_catalog.pg_authid r ON r.oid OPERATOR(pg_catalog.=) t.typowner \
                                                             WHERE t.oid OPERATOR(pg_catalog.=) d.refobjid AND t.typtype OPERATOR(pg_catalog.<>) 'd' \
                                                               AND (r.rolsuper OR r.oid OPERATOR(pg_catalog.=) $3)))) \
                    AND pg_catalog.count(*) FILTER (WHERE p.polname IN ('pgseal_offboard_select', 'pgseal_offboard_delete')) \
                        OPERATOR(pg_catalog.=) 2 \
                    AND pg_catalog.count(*) FILTER (WHERE p.polname OPERATOR(pg_catalog.=) 'pgseal_tenant_only') \
                        OPERATOR(pg_catalog.=) (CASE WHEN v.citus THEN 0 ELSE 1 END) \
                   FROM pg_catalog.pg_policy p, \
                        (SELECT f.citus, CASE WHEN f.citus \
                                     THEN ARRAY(SELECT pg_catalog.format('(%s AND %s)', x, f.visible_in) FROM pg_catalog.unnest($2::pg_catalog.text[]) x) \
                                     ELSE ARRAY[f.visible] END AS texts, \
                                ARRAY(SELECT pg_catalog.replace(t, pg_catalog.chr(92), pg_catalog.repeat(pg_catalog.chr(92), 2)) \
                                        FROM pg_catalog.unnest(CASE WHEN f.citus \
                                                 THEN ARRAY(SELECT pg_catalog.format('(%s AND %s)', x, f.visible_in) FROM pg_catalog.unnest($2::pg_catalog.text[]) x) \
                                                 ELSE ARRAY[f.visible] END) t) AS doubled \
                           FROM (SELECT 'pgseal._offboard_visible((''' OPERATOR(pg_catalog.||) pg_catalog.replace($1::pg_catalog.regclass::pg_catalog.text, '''', '''''') OPERATOR(pg_catalog.||) '''::regclass)::oid)' AS visible, \
                                        (SELECT 'pgseal._offboard_visible_in(''' OPERATOR(pg_catalog.||) pg_catalog.replace(pg_catalog.format('%I.%I', n.nspname, c.relname), '''', '''''') OPERATOR(pg_catalog.||) '''::text)' \
                                           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
                                          WHERE c.oid OPERATOR(pg_catalog.=) $1) AS visible_in, \
                                        NOT EXISTS (SELECT 1 FROM pg_catalog.pg_policy q WHERE q.polrelid OPERATOR(pg_catalog.=) $1 \
                                                       AND q.polname OPERATOR(pg_catalog.=) 'pgseal_tenant_only') AS citus) f) v \
                  WHERE p.polrelid OPERATOR(pg_catalog.=) $1 \
                  GROUP BY v.citus",
                &[self.rel.into(), locked.policy_texts().into(), self.owner.into()],
            )
        })?;
        if ok != Some(true) {
            return Err(SealError::Refused(
                "an offboarded table's policies are not org_protect's (a policy changed or added beside them, or one that calls a third role's function): the tenant's rows cannot all be found (run pgseal.org_protect on it again)",
            ));
        }
        if policies_call_volatile(self.rel)? {
            return Err(SealError::Refused(
                "an offboarded table's policies call a volatile function (their conditions run for each row as its owner, and one could change the tenant or the offboarding's grant midway): the tenant's rows cannot all be found (run pgseal.org_protect on it again)",
            ));
        }
        Ok(())
    }
}

/// Whether a condition of a policy of `rel` calls a volatile function: such as
/// `set_config`, which, run for each row as the table's owner, could change the
/// tenant, or on Citus the offboarding's grant, partway through a statement (where
/// the tenant is read for each row), and so hide the rows after it from the export
/// alone. PostgreSQL's and pgseal's functions are marked as they behave, and no
/// other role's may appear there (`require_org_policies`); but the stable
/// `*_to_xml` functions of a schema or database (`schema_to_xml`, named by text,
/// which records no dependency) read every view there, whose code may call one:
/// a condition that calls any `…to_xml…` function counts as volatile too.
fn policies_call_volatile(rel: pg_sys::Oid) -> SealResult<bool> {
    let (trees, xml): (Vec<String>, bool) = as_owner(|| {
        Spi::connect(|c| {
            let trees = c
                .select(
                    "SELECT x FROM pg_catalog.pg_policy p, \
                            LATERAL (VALUES (p.polqual::pg_catalog.text), (p.polwithcheck::pg_catalog.text)) v(x) \
                      WHERE p.polrelid OPERATOR(pg_catalog.=) $1 AND x IS NOT NULL",
                    None,
                    &[rel.into()],
                )?
                .map(|r| r.get::<String>(1).map(Option::unwrap_or_default))
                .collect::<Result<Vec<_>, pgrx::spi::Error>>()?;
            let xml = c
                .select(
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_policy p, \
                            LATERAL (VALUES (p.polqual), (p.polwithcheck)) v(x) \
                      WHERE p.polrelid OPERATOR(pg_catalog.=) $1 AND v.x IS NOT NULL \
                        AND pg_catalog.pg_get_expr(v.x, p.polrelid) OPERATOR(pg_catalog.~) 'to_xml[a-z_]*[(]')",
                    None,
                    &[rel.into()],
                )?
                .first()
                .get_one::<bool>()?
                .unwrap_or(true);
            Ok::<_, pgrx::spi::Error>((trees, xml))
        })
    })?;
    if xml {
        return Ok(true);
    }
    for tree in trees {
        let tree = std::ffi::CString::new(tree)
            .map_err(|_| SealError::Internal("a policy's condition"))?;
        // SAFETY: stringToNode reads a node tree that PostgreSQL wrote into
        // pg_policy (palloc'd into the current memory context);
        // contain_volatile_functions walks it without changing it.
        let volatile = unsafe {
            let node = pg_sys::stringToNode(tree.as_ptr()) as *mut pg_sys::Node;
            !node.is_null() && pg_sys::contain_volatile_functions(node)
        };
        if volatile {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The role that scheduled the tenant's offboarding (`scheduled_by`), if one is.
fn scheduler_of(tenant: &str) -> SealResult<Option<pg_sys::Oid>> {
    match as_owner(|| {
        Spi::get_one_with_args::<pg_sys::Oid>(
            "SELECT o.scheduled_by::pg_catalog.oid FROM pgseal.tenant_offboardings o WHERE o.tenant_id = $1",
            &[tenant.into()],
        )
    }) {
        Ok(s) => Ok(s),
        Err(pgrx::spi::Error::InvalidPosition) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Refuses (42501) unless the role that scheduled the tenant's offboarding
/// (`tenant_offboardings.scheduled_by`) holds `privilege` on `rel`.
fn require_scheduler_access(tenant: &str, rel: pg_sys::Oid, privilege: &str) -> SealResult<()> {
    let ok = as_owner(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT pg_catalog.has_table_privilege(o.scheduled_by::pg_catalog.oid, $2, $3) \
               FROM pgseal.tenant_offboardings o WHERE o.tenant_id = $1",
            &[tenant.into(), rel.into(), privilege.into()],
        )
    });
    match ok {
        Ok(Some(true)) => Ok(()),
        Ok(_) | Err(pgrx::spi::Error::InvalidPosition) => {
            Err(SealError::Forbidden(if privilege == "DELETE" {
                "the role that scheduled the offboarding needs DELETE on every offboarded table"
            } else {
                "the role that scheduled the offboarding needs SELECT on every offboarded table"
            }))
        }
        Err(e) => Err(e.into()),
    }
}

/// Fails (22023) unless the tenant context is `tenant`: the statements on the
/// tables run under it (their policies see the tenant's rows by it).
fn require_context(tenant: &str) -> SealResult<()> {
    if crate::context::tenant()? != tenant {
        return Err(SealError::InvalidArgument(
            "the tenant context must be the tenant being offboarded: call pgseal.set_tenant(tenant) first",
        ));
    }
    Ok(())
}

/// The tenant's rows left in the offboarded tables, counted as each table's owner
/// in a security-restricted operation under the tenant's context (never as the
/// extension owner: planning a query runs the table owner's index, statistics and
/// partition-key expressions as whoever plans it). Where row-level security binds
/// the owner, a policy other than `tenant_protect`'s could hide rows from the count,
/// so such a table stops the offboarding (55000). The count compares the tenant under
/// "C" only, which no index on the column can serve: it reads the table itself, so
/// an index that misses a row (a collation's sort order changed under it, or a
/// partial index its owner made to hide one) cannot hide it from this last check.
fn rows_left(tenant: &str) -> SealResult<i64> {
    require_context(tenant)?;
    let mut left = 0;
    for t in tables()? {
        left += t.rows_of(tenant)?;
    }
    Ok(left)
}

impl Table {
    /// The tenant's rows in this table and the tables under it (`rows_left` says
    /// how they are counted).
    fn rows_of(&self, tenant: &str) -> SealResult<i64> {
        self.count(tenant, "")
    }

    /// `rows_of`, in this table alone (`ONLY`).
    fn rows_of_only(&self, tenant: &str) -> SealResult<i64> {
        self.count(tenant, "ONLY")
    }

    fn count(&self, tenant: &str, only: &str) -> SealResult<i64> {
        Ok(self.tally(tenant, only, "NULL", Vec::new())?.0)
    }

    /// The tenant's rows in this table (`only`: "ONLY", or "" with the tables
    /// under it), counted as `rows_left` says, and `second`, a select-list item over
    /// them (alias `x`, parameters after `$1`, the tenant: `extra`), as text.
    fn tally(
        &self,
        tenant: &str,
        only: &str,
        second: &str,
        extra: Vec<pgrx::datum::DatumWithOid>,
    ) -> SealResult<(i64, Option<String>)> {
        let t = self;
        let locked = t.lock(pg_sys::AccessShareLock)?;
        let name = &locked.name;
        crate::privilege::require_only_owners_code(t.rel, t.owner, pg_sys::AccessShareLock, &[])
            .and_then(|()| t.require_own_policies(tenant, &locked))
            .map_err(|e| e.on_table(name))?;
        as_offboarding_owner(t.rel, t.owner, || -> SealResult<(i64, Option<String>)> {
            let mut args = vec![tenant.into()];
            args.extend(extra);
            let (rows, second) = Spi::get_two_with_args::<i64, String>(
                &format!(
                    "SELECT pg_catalog.count(*), ({second})::pg_catalog.text FROM {only} {name} x WHERE {}",
                    locked.tenant_is("x")
                ),
                &args,
            )?;
            Ok((rows.unwrap_or(0), second))
        })
        .map_err(|e| e.on_table(name))
    }
}

/// `rel` and every permanent table under it (its partitions and inheritance
/// children, at every level; a temporary child is another session's, and its rows
/// are its), with their owners.
fn tree_of(rel: pg_sys::Oid) -> SealResult<Vec<Table>> {
    Table {
        rel,
        owner: pg_sys::Oid::INVALID,
        attnum: None,
        org: false,
    }
    .members()
}

impl Table {
    /// This table and every permanent table under it (`tree_of`), each with its
    /// own number of this table's tenant column (a partition's can differ; none
    /// without one).
    fn members(&self) -> SealResult<Vec<Table>> {
        tables_of(
                "WITH RECURSIVE t(rel) AS (SELECT $1::pg_catalog.oid \
                   UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN t ON i.inhparent OPERATOR(pg_catalog.=) t.rel) \
                 SELECT t.rel, c.relowner, \
                        (SELECT m.attnum FROM pg_catalog.pg_attribute m JOIN pg_catalog.pg_attribute r \
                             ON r.attrelid OPERATOR(pg_catalog.=) $1 AND r.attnum OPERATOR(pg_catalog.=) $2 \
                          WHERE m.attrelid OPERATOR(pg_catalog.=) t.rel AND m.attname OPERATOR(pg_catalog.=) r.attname \
                            AND NOT m.attisdropped), \
                        $3 \
                   FROM t JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.rel \
                  WHERE c.relpersistence OPERATOR(pg_catalog.<>) 't'",
            &[self.rel.into(), self.attnum.unwrap_or(0).into(), self.org.into()],
        )
    }
}

/// Starts the record of the tenant's export, in its transaction: no tables and no
/// rows yet, no row count, and the transaction, which `_offboard_advance` to
/// 'exported' requires to be its own (so the tables, the rows, the file and the
/// hash recorded are one export's).
fn start_export_record(tenant: &str) -> SealResult<()> {
    as_owner(|| {
        Spi::run_with_args(
            "UPDATE pgseal.tenant_offboardings SET export_tables = '{}', export_rows = NULL, \
                    export_xact = pg_catalog.pg_current_xact_id() WHERE tenant_id = $1",
            &[tenant.into()],
        )
    })?;
    exported::clear(tenant)
}

/// Adds `tables` to the tables the tenant's export read (`export_tables`), whose
/// writes each delete batch checks (`delete`).
fn add_export_tables(tenant: &str, tables: Vec<pg_sys::Oid>) -> SealResult<()> {
    Ok(as_owner(|| {
        Spi::run_with_args(
            "UPDATE pgseal.tenant_offboardings \
                SET export_tables = export_tables OPERATOR(pg_catalog.||) $2::pg_catalog.regclass[] \
              WHERE tenant_id = $1",
            &[tenant.into(), tables.into()],
        )
    })?)
}

/// Sends the tenant's offboarding back to exporting.
fn export_again(tenant: &str) -> SealResult<()> {
    as_owner(|| {
        Spi::run_with_args(
            "UPDATE pgseal.tenant_offboardings SET step = 'scheduled', step_at = pg_catalog.now(), \
                    export_tables = NULL, export_rows = NULL, export_xact = NULL WHERE tenant_id = $1",
            &[tenant.into()],
        )
    })?;
    exported::clear(tenant)
}

/// `pgseal._offboard_export(tenant)`: at step 'scheduled', the lines of the
/// tenant's export: `{"table", "row"}` for each of its rows in the offboarded
/// tables (read as each table's owner, sealed values as stored), then `{"ledger"}`
/// for each `ledger_export` line (read as the caller).
///
/// The lines are read through cursors, `EXPORT_CHUNK` at a time, and written to
/// the result's tuplestore as they come, which spills to disk past `work_mem`: the
/// backend holds one chunk, however large the tenant. The whole export runs in one
/// call (materialize mode), so no code of the caller runs between two fetches. A
/// set-returning function of pgrx's returns one line a call, and in a select list
/// (or a plpgsql loop) the caller's code runs between calls: it could find the
/// table's cursor by name (`pg_cursors`), close it and open its own under that
/// name, which the next fetch would then run as the table's owner. This is a C-ABI
/// function for that reason, declared in sql/offboarding.sql under the name pgrx
/// gave it before. Each table is checked and locked when its turn comes; its cursor
/// is read as its owner, restricted, at every fetch.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn _offboard_export_wrapper(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: PostgreSQL calls this with the function's call frame; argument 0 is
    // the text `tenant` (NULL allowed: the function is not STRICT).
    let tenant: Option<String> = unsafe { pgrx::fcinfo::pg_getarg::<String>(fcinfo, 0) };
    // SAFETY: the call frame's result info, checked before use. First, so that a
    // caller that cannot take a set this way is told so (0A000) before anything.
    let (store, desc) = unsafe { materialize_text(fcinfo) };
    let lines = (|| {
        let tenant = checked(tenant.as_deref(), "_offboard_export")?;
        require_step(&tenant, "scheduled")?;
        require_context(&tenant)?;
        start_export_record(&tenant)?;
        Ok::<_, SealError>(ExportLines {
            tables: delete::delete_order(tables()?)?.into_iter(),
            table_rows: 0,
            chunks: 0,
            keys: Vec::new(),
            tenant,
            stage: ExportStage::Tables,
            buffer: std::collections::VecDeque::new(),
        })
    })()
    .or_raise();
    let mut lines = lines;
    let mut scratch = PgMemoryContexts::new("pgseal export line");
    for line in lines.by_ref() {
        // SAFETY: the tuplestore and its one-column text descriptor were made for
        // this call; putvalues copies the tuple into the tuplestore's own memory,
        // so the datum made in `scratch` can go with it.
        unsafe {
            scratch.switch_to(|_| {
                let mut value = line.into_datum().expect("a text datum");
                let mut null = false;
                // A raw pointer each: PostgreSQL 15 declares them mutable, 18 const.
                pg_sys::tuplestore_putvalues(
                    store,
                    desc,
                    std::ptr::addr_of_mut!(value),
                    std::ptr::addr_of_mut!(null),
                );
            });
        }
        // SAFETY: nothing made in `scratch` is used after its line was put.
        unsafe { scratch.reset() };
    }
    as_owner(|| {
        Spi::run_with_args(
            "UPDATE pgseal.tenant_offboardings SET export_rows = $2 WHERE tenant_id = $1",
            &[lines.tenant.as_str().into(), lines.table_rows.into()],
        )
    })
    .map_err(SealError::from)
    .or_raise();
    pg_sys::Datum::from(0usize)
}

crate::pg::v1_finfo!(pg_finfo__offboard_export_wrapper);

/// Sets up the call's result as a tuplestore of one text column (materialize
/// mode), in the query's memory; returns it and its descriptor. Refuses (0A000) a
/// caller that cannot take a set that way.
///
/// # Safety
/// `fcinfo` must be the call frame of a function PostgreSQL is calling.
unsafe fn materialize_text(
    fcinfo: pg_sys::FunctionCallInfo,
) -> (*mut pg_sys::Tuplestorestate, pg_sys::TupleDesc) {
    // SAFETY: the caller's contract; resultinfo is a node or null.
    unsafe {
        let rsinfo = (*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo;
        if rsinfo.is_null()
            || (*rsinfo).type_ != pg_sys::NodeTag::T_ReturnSetInfo
            || ((*rsinfo).allowedModes & pg_sys::SetFunctionReturnMode::SFRM_Materialize as i32)
                == 0
        {
            SealError::NotSupported(
                "_offboard_export needs a caller that accepts a set in materialize mode",
            )
            .raise();
        }
        let query_memory = (*(*rsinfo).econtext).ecxt_per_query_memory;
        let previous = pg_sys::MemoryContextSwitchTo(query_memory);
        let desc = pg_sys::CreateTemplateTupleDesc(1);
        pg_sys::TupleDescInitEntry(
            desc,
            1,
            c"_offboard_export".as_ptr(),
            pg_sys::TEXTOID,
            -1,
            0,
        );
        // Random access only when the caller asks for it (a scroll cursor).
        let random = ((*rsinfo).allowedModes
            & pg_sys::SetFunctionReturnMode::SFRM_Materialize_Random as i32)
            != 0;
        let store = pg_sys::tuplestore_begin_heap(random, false, pg_sys::work_mem);
        (*rsinfo).returnMode = pg_sys::SetFunctionReturnMode::SFRM_Materialize;
        (*rsinfo).setResult = store;
        (*rsinfo).setDesc = desc;
        pg_sys::MemoryContextSwitchTo(previous);
        (store, desc)
    }
}

/// Lines an export reads per fetch, and so holds at once.
const EXPORT_CHUNK: i64 = 1_000;

/// Where `_offboard_export` is in its reading.
enum ExportStage {
    /// Between tables: the next one is opened (or, after the last, the ledger).
    Tables,
    /// A table's open cursor, fetched as the table's owner; `root` is the
    /// registered table it reads, `horizon` the first transaction it cannot see
    /// (`exported::horizon`).
    Table {
        owner: pg_sys::Oid,
        root: pg_sys::Oid,
        horizon: i64,
        cursor: String,
    },
    /// The `ledger_export` cursor (the tenant's chain, then its records in the
    /// audit chain), fetched as the caller.
    Ledger {
        cursor: String,
    },
    Done,
}

/// `_offboard_export`'s lines, read a chunk at a time.
struct ExportLines {
    tenant: String,
    tables: std::vec::IntoIter<Table>,
    /// The table rows read so far (`export_rows`).
    table_rows: i64,
    /// The chunks of rows recorded so far (`exported::record`).
    chunks: i32,
    /// The keys of the table read but not recorded yet.
    keys: Vec<Vec<u8>>,
    stage: ExportStage,
    buffer: std::collections::VecDeque<String>,
}

impl Iterator for ExportLines {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(line) = self.buffer.pop_front() {
                return Some(line);
            }
            if matches!(self.stage, ExportStage::Done) {
                return None;
            }
            self.advance().or_raise();
        }
    }
}

impl ExportLines {
    /// Fills the buffer from the cursor at hand, or moves to the next cursor.
    fn advance(&mut self) -> SealResult<()> {
        self.stage = match std::mem::replace(&mut self.stage, ExportStage::Done) {
            ExportStage::Tables => match self.tables.next() {
                Some(t) => self.open_table(&t)?,
                None => {
                    crate::ledger::writer::flush()?;
                    // The tenant's chain, then its decrypt records in the audit chain
                    // (which the erase step erases too), each exported alone: the
                    // export function keeps its whole result before it is filtered.
                    let cursor = with_pinned_search_path(|| {
                        open_cursor(
                            "SELECT pg_catalog.jsonb_build_object('ledger', e)::pg_catalog.text FROM pgseal.ledger_export($1) e \
                             UNION ALL \
                             (SELECT pg_catalog.jsonb_build_object('audit_chain', e)::pg_catalog.text \
                                FROM pgseal.ledger l, LATERAL pgseal.ledger_export($2, l.seq, l.seq) e \
                               WHERE l.tenant_id OPERATOR(pg_catalog.=) $2 \
                                 AND (l.payload OPERATOR(pg_catalog.->>) 'tenant') OPERATOR(pg_catalog.=) $1 \
                               ORDER BY l.seq)",
                            &[
                                self.tenant.as_str().into(),
                                crate::ledger::names::AUDIT_CHAIN.into(),
                            ],
                        )
                    })?;
                    ExportStage::Ledger { cursor }
                }
            },
            ExportStage::Table {
                owner,
                root,
                horizon,
                cursor,
            } => {
                let before = self.buffer.len();
                let more = as_offboarding_owner(root, owner, || {
                    fetch_lines(&cursor, &mut self.buffer, Some(&mut self.keys))
                })?;
                self.table_rows += (self.buffer.len() - before) as i64;
                self.keys.retain(|k| !k.is_empty());
                // Recorded ten fetches at a time, and at the table's end: the
                // deletes take a chunk with a query of their own.
                if self.keys.len() >= 10 * EXPORT_CHUNK as usize || !more && !self.keys.is_empty() {
                    self.chunks += 1;
                    let keys = std::mem::take(&mut self.keys);
                    exported::record(&self.tenant, self.chunks, root, horizon, keys)?;
                }
                if more {
                    ExportStage::Table {
                        owner,
                        root,
                        horizon,
                        cursor,
                    }
                } else {
                    ExportStage::Tables
                }
            }
            ExportStage::Ledger { cursor } => {
                if with_pinned_search_path(|| fetch_lines(&cursor, &mut self.buffer, None))? {
                    ExportStage::Ledger { cursor }
                } else {
                    ExportStage::Done
                }
            }
            ExportStage::Done => ExportStage::Done,
        };
        Ok(())
    }

    /// Locks and checks table `t`, then opens the cursor over its tenant's rows as
    /// its owner.
    fn open_table(&self, t: &Table) -> SealResult<ExportStage> {
        let locked = t.lock_checked(
            &self.tenant,
            pg_sys::AccessShareLock,
            "SELECT",
            "_offboard_export needs SELECT on every offboarded table",
        )?;
        let name = &locked.name;
        // The tree is locked now (no partition detached until the transaction
        // ends; one attached meanwhile is not read, and its rows get no keys): the
        // tables recorded are the tables read.
        add_export_tables(
            &self.tenant,
            tree_of(t.rel)?.into_iter().map(|m| m.rel).collect(),
        )?;
        // Every table is read whole under "C" alone, as `rows_left` counts it: no
        // index that misses a row (a collation whose order changed under it) keeps
        // a row from the export, and what it read compares with the rows left
        // (`delete`). Each line comes with its row's key, which the deletes go by
        // (`exported::keys`).
        let key = exported::keys(t.rel, "_pgseal_row")?
            .unwrap_or_else(|| "NULL::pg_catalog.bytea".to_owned());
        let sql = format!(
            "SELECT pg_catalog.jsonb_build_object('table', $2::pg_catalog.text, 'row', {})::pg_catalog.text, {} \
               FROM {} AS _pgseal_row WHERE {}",
            crate::privilege::row_image_sql(t.rel, "_pgseal_row")?,
            key,
            name,
            locked.tenant_is("_pgseal_row")
        );
        let cursor = as_offboarding_owner(t.rel, t.owner, || {
            open_cursor(&sql, &[self.tenant.as_str().into(), name.as_str().into()])
        })?;
        // Read once the cursor is open: every row it reads was inserted before.
        let horizon = exported::horizon()?;
        Ok(ExportStage::Table {
            owner: t.owner,
            root: t.rel,
            horizon,
            cursor,
        })
    }
}

/// Opens a cursor over `sql` that outlives its SPI connection (as whoever calls
/// this), and returns its name for `fetch_lines`.
fn open_cursor(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> Result<String, pgrx::spi::Error> {
    Spi::connect(|c| {
        c.try_open_cursor(sql, args)
            .map(|cur| cur.detach_into_name())
    })
}

/// Fetches up to `EXPORT_CHUNK` lines of the open cursor `cursor` into `buffer`,
/// and with `keys`, each line's row key (the cursor's second column) into it.
/// Returns whether the cursor may have more; at its end it is closed. Each call is
/// its own SPI connection, so the fetched rows are freed with it.
fn fetch_lines(
    cursor: &str,
    buffer: &mut std::collections::VecDeque<String>,
    mut keys: Option<&mut Vec<Vec<u8>>>,
) -> Result<bool, pgrx::spi::Error> {
    Spi::connect(|c| {
        let mut cur = c.find_cursor(cursor)?;
        let fetched = {
            let rows = cur.fetch(EXPORT_CHUNK)?;
            let n = rows.len();
            for r in rows {
                if let Some(line) = r.get::<String>(1)? {
                    buffer.push_back(line);
                    if let Some(keys) = keys.as_deref_mut() {
                        keys.push(r.get::<Vec<u8>>(2)?.unwrap_or_default());
                    }
                }
            }
            n
        };
        if (fetched as i64) < EXPORT_CHUNK {
            // Dropping the cursor closes it.
            return Ok(false);
        }
        cur.detach_into_name();
        Ok(true)
    })
}

thread_local! {
    /// Where this backend's last batch of `_offboard_erase` ended (a seq in the
    /// tenant's own chain, or once that is done in the audit chain): the next batch
    /// goes on from there, so erasing costs one pass
    /// over the chain, not one per batch over what the batches before it erased. A
    /// hint only: a batch that finds nothing after it looks again from the start
    /// (of the audit chain, then of the tenant's own) before it reports none left
    /// (a batch rolled back, or an entry written meanwhile), and pgseald's next
    /// connection starts from the start.
    static RESUME: std::cell::RefCell<std::collections::HashMap<String, Resume>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Where `_offboard_erase` goes on: in the tenant's own chain, or (that done) in the
/// audit chain, after a seq.
#[derive(Clone, Copy)]
enum Resume {
    Own(i64),
    Audit(i64),
}

/// Sets the tenant's resume hint, for the test of the pass that `_offboard_erase`
/// makes from the start.
#[cfg(any(test, feature = "pg_test"))]
pub(crate) fn set_resume_hint(tenant: &str, seq: i64) {
    RESUME.with(|r| r.borrow_mut().insert(tenant.to_owned(), Resume::Own(seq)));
}

/// Sets the tenant's resume hint in the audit chain (its own chain taken as done).
#[cfg(any(test, feature = "pg_test"))]
pub(crate) fn set_audit_resume_hint(tenant: &str, seq: i64) {
    RESUME.with(|r| r.borrow_mut().insert(tenant.to_owned(), Resume::Audit(seq)));
}

/// Adds `n` rows deleted from `name` to the tenant's offboarding.
fn count_deleted(tenant: &str, name: &str, n: i64) -> SealResult<()> {
    Ok(as_owner(|| {
        Spi::run_with_args(
            "UPDATE pgseal.tenant_offboardings \
                SET deleted = deleted OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object($2::pg_catalog.text, \
                    COALESCE((deleted OPERATOR(pg_catalog.->>) $2::pg_catalog.text)::pg_catalog.int8, 0) OPERATOR(pg_catalog.+) $3) \
              WHERE tenant_id = $1",
            &[tenant.into(), name.into(), n.into()],
        )
    })?)
}

/// `pgseal._offboard_due()`: the tenants whose offboarding is due and not done,
/// and not under a hold, earliest first.
#[pg_extern(volatile, parallel_unsafe)]
fn _offboard_due() -> SetOfIterator<'static, String> {
    let tenants = (|| {
        crate::master::require_loaded()?;
        crate::ledger::access::require_admin("_offboard_due")?;
        as_owner(|| {
            Spi::connect(|c| {
                let rows = c.select(
                    "SELECT o.tenant_id FROM pgseal.tenant_offboardings o \
                      WHERE o.step OPERATOR(pg_catalog.<>) 'done' AND o.due_at OPERATOR(pg_catalog.<=) pg_catalog.now() \
                        AND NOT EXISTS (SELECT 1 FROM pgseal.retention_holds h WHERE h.tenant_id OPERATOR(pg_catalog.=) o.tenant_id) \
                      ORDER BY o.due_at, o.tenant_id",
                    None,
                    &[],
                )?;
                rows.map(|r| {
                    r.get::<String>(1)?
                        .ok_or(SealError::Internal("an offboarding's tenant"))
                })
                .collect::<SealResult<Vec<_>>>()
            })
        })
    })()
    .or_raise();
    SetOfIterator::new(tenants)
}

/// `pgseal._offboard_advance(tenant, from_step, to_step, export_file, export_sha256)`: records that
/// the step after `from_step` is done (pgseald calls it in the transaction that did
/// the step's work). `export_file` and the file's SHA-256 (hex), which the receipt
/// names, are required with 'exported' and refused with any other step.
#[pg_extern(volatile, parallel_unsafe)]
fn _offboard_advance(
    tenant: Option<&str>,
    from_step: Option<&str>,
    to_step: Option<&str>,
    export_file: default!(Option<&str>, "NULL"),
    export_sha256: default!(Option<&str>, "NULL"),
) {
    (|| {
        let tenant = checked(tenant, "_offboard_advance")?;
        let from = from_step.ok_or(SealError::NullArgument("from_step"))?;
        let to = to_step.ok_or(SealError::NullArgument("to_step"))?;
        let next = STEPS
            .iter()
            .position(|s| *s == from)
            .and_then(|i| STEPS.get(i + 1));
        // 'receipted' is reached only through _offboard_finish, which checks the
        // work is done.
        if next != Some(&to) || to == "receipted" {
            return Err(SealError::InvalidArgument(
                "to_step must be the step after from_step",
            ));
        }
        if to == "exported" {
            export_file.ok_or(SealError::NullArgument("export_file"))?;
            let hash = export_sha256.ok_or(SealError::NullArgument("export_sha256"))?;
            if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(SealError::InvalidArgument(
                    "export_sha256 must be the export file's SHA-256 in 64 lower-case hex digits",
                ));
            }
        } else if export_file.is_some() || export_sha256.is_some() {
            return Err(SealError::InvalidArgument(
                "export_file and export_sha256 go with the step to 'exported' only",
            ));
        }
        require_step(&tenant, from)?;
        if to == "exported"
            && as_owner(|| {
                Spi::get_one_with_args::<bool>(
                    "SELECT export_tables IS NOT NULL AND export_rows IS NOT NULL \
                            AND export_xact OPERATOR(pg_catalog.=) pg_catalog.pg_current_xact_id() \
                       FROM pgseal.tenant_offboardings WHERE tenant_id = $1",
                    &[tenant.as_str().into()],
                )
            })? != Some(true)
        {
            return Err(SealError::Refused(
                "the tenant's export was not read in this transaction: pgseal._offboard_export comes first, in the transaction that records the step",
            ));
        }
        if to == "deleted" {
            if rows_left(&tenant)? > 0 {
                return Err(SealError::Refused(
                    "rows of the tenant remain in an offboarded table (a trigger, rule or policy of the table kept them)",
                ));
            }
            // What the deletes went by is done with.
            exported::clear(&tenant)?;
        }
        as_owner(|| {
            Spi::run_with_args(
                "UPDATE pgseal.tenant_offboardings SET step = $2, step_at = pg_catalog.now(), \
                        export_file = COALESCE($3, export_file), export_sha256 = COALESCE($4, export_sha256), \
                        past_export = past_export OR $2 OPERATOR(pg_catalog.=) 'deleted', \
                        export_tables = CASE WHEN $2 OPERATOR(pg_catalog.=) 'done' THEN NULL ELSE export_tables END, \
                        export_xact = NULL \
                  WHERE tenant_id = $1",
                &[
                    tenant.as_str().into(),
                    to.into(),
                    export_file.into(),
                    export_sha256.into(),
                ],
            )
        })?;
        Ok(())
    })()
    .or_raise()
}

/// `pgseal._offboard_erase(tenant, batch)`: erases the payloads of up to `batch`
/// more of the tenant's entries (at step 'shredded'), then of the entries in the
/// audit chain `_pgseal_audit` that record its decrypts; returns how many (0: none
/// left).
#[pg_extern(volatile, parallel_unsafe)]
fn _offboard_erase(tenant: Option<&str>, batch: Option<i32>) -> i64 {
    (|| {
        let tenant = checked(tenant, "_offboard_erase")?;
        let batch = batch.filter(|b| *b > 0).ok_or(SealError::InvalidArgument(
            "batch must be a positive number",
        ))?;
        require_step(&tenant, "shredded")?;
        let at = RESUME
            .with(|r| r.borrow().get(&tenant).copied())
            .unwrap_or(Resume::Own(0));
        let limit = i64::from(batch);
        let own = |after: i64| erase::erase(&tenant, Which::All { limit, after });
        if let Resume::Own(after) = at {
            if let Some((to, n)) = erased_from(after, own)? {
                RESUME.with(|r| r.borrow_mut().insert(tenant.clone(), Resume::Own(to)));
                return Ok(n);
            }
        }
        // The tenant's own chain is done: then its decrypt records that the audit
        // writer put in the audit chain.
        let after = match at {
            Resume::Audit(after) => after,
            Resume::Own(_) => 0,
        };
        let mut erased = Vec::new();
        let audit = |after: i64| {
            let e = erase::erase(&tenant, Which::InAuditChain { limit, after })?;
            erased.extend_from_slice(&e.seqs);
            Ok(e)
        };
        let done = erased_from(after, audit)?;
        add_audit_erased(&tenant, &erased)?;
        match done {
            Some((to, n)) => {
                RESUME.with(|r| r.borrow_mut().insert(tenant.clone(), Resume::Audit(to)));
                Ok(n)
            }
            None => {
                // Before none left is reported, the tenant's own chain once more when
                // this call did not look at it (the hint was in the audit chain): an
                // entry may have been written there since (a decrypt's count), or
                // left by a batch that rolled back.
                if let Resume::Audit(_) = at {
                    if let Some((to, n)) = erased_from(0, own)? {
                        RESUME.with(|r| r.borrow_mut().insert(tenant.clone(), Resume::Own(to)));
                        return Ok(n);
                    }
                }
                RESUME.with(|r| r.borrow_mut().remove(&tenant));
                Ok(0)
            }
        }
    })()
    .or_raise()
}

/// Runs `erase` from `after` until a batch erases something or finds nothing
/// (a batch whose entries were all pruned meanwhile finds them and erases none);
/// from the start once when it finds nothing after `after` (the hint may be past
/// entries a rolled-back batch left). Returns (the last seq found, how many it
/// erased), or None when nothing is left.
fn erased_from(
    mut after: i64,
    mut erase: impl FnMut(i64) -> SealResult<erase::Erased>,
) -> SealResult<Option<(i64, i64)>> {
    let mut from_start = after == 0;
    loop {
        let e = erase(after)?;
        match e.found_to {
            Some(to) if e.seqs.is_empty() => after = to,
            Some(to) => return Ok(Some((to, e.seqs.len() as i64))),
            None if from_start => return Ok(None),
            None => {
                after = 0;
                from_start = true;
            }
        }
    }
}

/// Whether `tenant`'s offboarding is past its erase step and no hold is on the
/// tenant: the audit writer asks it for every decrypt count (a kept plan), before
/// and outside the subtransaction of `erase_if_offboarded`.
pub(crate) fn past_erase_step(tenant: &str) -> SealResult<bool> {
    let past = as_owner(|| {
        crate::pg::plans::select_first(
            "SELECT EXISTS (SELECT 1 FROM pgseal.tenant_offboardings o \
                             WHERE o.tenant_id OPERATOR(pg_catalog.=) $1 \
                               AND o.step OPERATOR(pg_catalog.=) ANY (ARRAY['erased', 'receipted', 'done'])) \
                AND NOT EXISTS (SELECT 1 FROM pgseal.retention_holds h WHERE h.tenant_id OPERATOR(pg_catalog.=) $1)",
            &[crate::pg::plans::TEXT],
            &[tenant.into()],
            |r| Ok(r.get::<bool>(1)?),
        )
    })?
    .flatten();
    Ok(past == Some(true))
}

/// Erases the `vault.decrypt` count the audit writer just appended for `tenant` (in
/// its chain, or with `in_audit_chain` in the audit chain) under key `key_id` when
/// that key is a shredded key of the tenant; the caller has found the tenant's
/// offboarding past its erase step and no hold on it (`past_erase_step`, in this
/// transaction): a count that arrives after the
/// offboarding erased the tenant's payloads (its transaction was open across the
/// shred, or the writer retried it) is erased as the offboarding would have; one in
/// the audit chain is added to the offboarding's list. Nothing here waits: the
/// offboarding's row is taken only when no other transaction holds it (otherwise
/// the count keeps its payload, with a LOG line), since every decrypt of the
/// database waits on this writer.
pub(crate) fn erase_if_offboarded(
    tenant: &str,
    key_id: &str,
    in_audit_chain: bool,
    seq: i64,
) -> SealResult<()> {
    // The key as pgseal reads it everywhere (on Citus, this node's copy of the key
    // table, or another node's with the settings pinned).
    let shredded = crate::keystore::fetch(key_id)?
        .is_some_and(|k| k.tenant == tenant && k.state == crate::keystore::KeyState::Destroyed);
    if !shredded {
        return Ok(());
    }
    let taken = as_owner(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pgseal.tenant_offboardings o \
                             WHERE o.tenant_id OPERATOR(pg_catalog.=) $1 FOR UPDATE SKIP LOCKED)",
            &[tenant.into()],
        )
    })?;
    if taken != Some(true) {
        pgrx::log!(
            "pgseal: a decrypt count of tenant {:?} (seq {seq}) arrived after its offboarding's erase step and keeps its payload: the offboarding's row was held by another transaction",
            tenant
        );
        return Ok(());
    }
    let e = erase::erase(
        tenant,
        Which::Appended {
            in_audit_chain,
            seq,
        },
    )?;
    if in_audit_chain {
        add_audit_erased(tenant, &e.seqs)?;
    }
    Ok(())
}

/// Adds the seqs of the audit chain's entries erased to the tenant's offboarding
/// (`audit_erased`): its receipt lists them, and a hold on the tenant keeps them
/// from `ledger_prune` once their payloads no longer name it.
fn add_audit_erased(tenant: &str, seqs: &[i64]) -> SealResult<()> {
    if seqs.is_empty() {
        return Ok(());
    }
    Ok(as_owner(|| {
        Spi::run_with_args(
            "UPDATE pgseal.tenant_offboardings \
                SET audit_erased = audit_erased OPERATOR(pg_catalog.||) $2::pg_catalog.int8[] \
              WHERE tenant_id = $1",
            &[tenant.into(), seqs.to_vec().into()],
        )
    })?)
}

/// `pgseal._offboard_finish(tenant)`: at step 'erased', checks that the work is
/// done (no row left in an offboarded table, no data key, no payload to erase),
/// appends the `tenant.offboarded` receipt and moves to 'receipted'; returns the
/// receipt. When something was written after its step, it goes back to 'exported'
/// instead and returns `{"redo": …}`.
#[pg_extern(volatile, parallel_unsafe)]
fn _offboard_finish(tenant: Option<&str>) -> JsonB {
    (|| {
        let tenant = checked(tenant, "_offboard_finish")?;
        require_step(&tenant, "erased")?;
        // What reads every offboarded table (the rows left) or the catalogs, first:
        // the lock below keeps the audit writer off the audit chain meanwhile, and
        // every decrypt whose tenant's chain is busy needs it.
        let rows = rows_left(&tenant)?;
        let offboarded: Vec<pg_sys::Oid> = tables()?.iter().map(|t| t.rel).collect();
        let not_offboarded = not_offboarded(&offboarded)?;
        // The audit writer's appends to the audit chain commit before the count
        // below reads it: a count of the tenant's it appended there while the last
        // erase batch ran (and that batch could not see) is then counted, not left
        // behind the receipt. (The writer only ever tries this lock.)
        crate::locks::ledger_tenant(crate::ledger::names::AUDIT_CHAIN);
        // The key table is a Citus reference table: its read may go to another
        // node (or to this one over a connection, local execution off) as the
        // owner, with the caller's settings replayed there first.
        let caller = crate::pg::citus::caller_parsing()?;
        let (keys, left) = as_owner(|| {
            crate::pg::citus::with_remote_parsing_pinned(caller.as_ref(), || {
                Ok(Spi::get_two_with_args::<i64, i64>(
                "SELECT (SELECT pg_catalog.count(*) FROM pgseal.tenant_keys k \
                          WHERE k.tenant_id = $1 AND k.purpose = 'dek' AND k.wrapped IS NOT NULL), \
                        (SELECT pg_catalog.count(*) FROM pgseal.ledger l \
                          WHERE (l.tenant_id = $1 \
                                 OR (l.tenant_id = $2 AND (l.payload OPERATOR(pg_catalog.->>) 'tenant') = $1)) \
                            AND l.fmt = 2 AND l.salt IS NOT NULL \
                            AND NOT pg_catalog.starts_with(l.event, 'subject.') \
                            AND NOT pg_catalog.starts_with(l.event, 'tenant.'))",
                &[
                    tenant.as_str().into(),
                    crate::ledger::names::AUDIT_CHAIN.into(),
                ],
            )?)
            })
        })?;
        if keys != Some(0) || left != Some(0) || rows > 0 {
            // Written after their step (the application went on writing): back to
            // deleting, which the steps after it follow again (erasing from the
            // start of the tenant's chain).
            RESUME.with(|r| r.borrow_mut().remove(&tenant));
            as_owner(|| {
                Spi::run_with_args(
                    "UPDATE pgseal.tenant_offboardings SET step = 'exported', step_at = pg_catalog.now() WHERE tenant_id = $1",
                    &[tenant.as_str().into()],
                )
            })?;
            return Ok(JsonB(json!({
                "redo": "rows, data keys or ledger payloads of the tenant were written after their step; back to deleting"
            })));
        }
        let (file, sha256, deleted, erased, kept, audit_erased) = as_owner(|| {
            Spi::connect(|c| {
                let row = c
                    .select(
                        "SELECT o.export_file, o.export_sha256, o.deleted, \
                                (SELECT pg_catalog.count(*) FROM pgseal.ledger l WHERE l.tenant_id = $1 AND l.commitment IS NOT NULL), \
                                (SELECT pg_catalog.count(*) FROM pgseal.ledger l WHERE l.tenant_id = $1 AND l.fmt = 1), \
                                o.audit_erased \
                           FROM pgseal.tenant_offboardings o WHERE o.tenant_id = $1",
                        Some(1),
                        &[tenant.as_str().into()],
                    )?
                    .first();
                Ok::<_, pgrx::spi::Error>((
                    row.get::<String>(1)?,
                    row.get::<String>(2)?,
                    row.get::<JsonB>(3)?.map(|j| j.0),
                    row.get::<i64>(4)?,
                    row.get::<i64>(5)?,
                    {
                        // In the order erased: a pass from the start after a batch
                        // rolled back adds lower seqs after higher ones.
                        let mut seqs = row.get::<Vec<i64>>(6)?.unwrap_or_default();
                        seqs.sort_unstable();
                        seqs
                    },
                ))
            })
        })?;
        let receipt = json!({
            "export_file": file,
            "export_sha256": sha256,
            "deleted": deleted,
            "ledger_entries_erased": erased,
            "format_1_entries_kept": kept,
            "audit_entries_erased": audit_erased.len(),
            "audit_seqs": erase::ranges(&audit_erased),
            "protected_tables_not_offboarded": not_offboarded,
        });
        evidence::record(&tenant, "tenant.offboarded", receipt.clone())?;
        as_owner(|| {
            Spi::run_with_args(
                "UPDATE pgseal.tenant_offboardings SET step = 'receipted', step_at = pg_catalog.now() WHERE tenant_id = $1",
                &[tenant.as_str().into()],
            )
        })?;
        Ok(JsonB(receipt))
    })()
    .or_raise()
}
