//! Data subjects (issue 19): export and erasure of one subject's data in one
//! tenant, across the tables registered with `pgseal.subject_register` and the
//! ledger entries that name the subject.
//!
//! Both run in the caller's tenant context (the `tenant` argument must be it).
//! A statement on a registered table:
//! - is limited to the tenant by the table's `tenant_id` column (which
//!   `subject_register` requires), whatever row-level security the table has;
//! - needs the caller's own privilege on the table (SELECT to export, DELETE to
//!   erase), checked first;
//! - runs as the table's owner in a security-restricted operation
//!   (`privilege::as_table_owner`), so the owner's triggers, rules, policies and
//!   casts never run with the caller's rights (the caller may be a superuser);
//! - is built from the catalog (the table's and column's names as they are now,
//!   quoted) and parsed under the pinned `search_path`, with schema-qualified
//!   operators and casts; the subject and tenant are parameters.
//!
//! Sealed columns are decrypted for an exporting member of `pgseal_decrypt` by
//! `vault_decrypt` called as the caller, each decrypt audited as usual. The ledger
//! work runs as the extension owner: reading the registrations, erasing payloads
//! (`ledger::erase`) and the receipts.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use crate::error::{OrRaise, SealError, SealResult};
use crate::privilege::{as_owner, as_table_owner, as_table_owner_pinned, with_pinned_search_path};

/// One registered subject column, as the catalog names it now.
struct Registration {
    /// `schema.table`, quoted.
    table: String,
    /// The column, quoted.
    column: String,
    /// The column's type, schema-qualified (one of the types `subject_register`
    /// accepts).
    cast: String,
    rel: pg_sys::Oid,
    owner: pg_sys::Oid,
    /// The columns `subject_anonymise` declared for the table, quoted: erasure
    /// sets them and `column` to their defaults instead of deleting the row.
    clears: Vec<String>,
}

impl Registration {
    /// Whether `subject` is the text form of a value of the column: a value whose
    /// input would fail, or would be stored as another text (`+42`, an upper-case
    /// uuid), is not one, and the row audit names a row by that text form.
    fn can_hold(&self, subject: &str) -> bool {
        match self.cast.as_str() {
            "pg_catalog.int4" => subject
                .parse::<i32>()
                .is_ok_and(|v| v.to_string() == subject),
            "pg_catalog.int8" => subject
                .parse::<i64>()
                .is_ok_and(|v| v.to_string() == subject),
            "pg_catalog.uuid" => {
                let b = subject.as_bytes();
                b.len() == 36
                    && b.iter().enumerate().all(|(i, c)| match i {
                        8 | 13 | 18 | 23 => *c == b'-',
                        _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
                    })
            }
            _ => true,
        }
    }

    /// ` COLLATE "C"` for a text column: a nondeterministic collation (one that
    /// ignores case) must not make another subject's id match.
    fn collate(&self) -> &'static str {
        if self.cast == "pg_catalog.text" {
            " COLLATE pg_catalog.\"C\""
        } else {
            ""
        }
    }

    /// The rows of subject `$1` and tenant `$2` in this table, as `alias`: each id
    /// compared byte for byte (`collate`), and again under the column's own
    /// collation, which that comparison implies (equal bytes are equal under every
    /// collation) and which an index on the columns can serve (a comparison under
    /// "C" cannot use an index built under another collation: every call scanned
    /// the whole table).
    fn rows_of_subject(&self, alias: &str) -> String {
        let mut filter = format!(
            "{alias}.{col}{collate} OPERATOR(pg_catalog.=) $1::{cast} \
             AND {alias}.tenant_id COLLATE pg_catalog.\"C\" OPERATOR(pg_catalog.=) $2::pg_catalog.text \
             AND {alias}.tenant_id OPERATOR(pg_catalog.=) $2::pg_catalog.text",
            col = self.column,
            collate = self.collate(),
            cast = self.cast
        );
        if !self.collate().is_empty() {
            filter.push_str(&format!(
                " AND {alias}.{} OPERATOR(pg_catalog.=) $1::{}",
                self.column, self.cast
            ));
        }
        filter
    }

    /// Fails (55000) when a column erasure would set to its default is NOT NULL
    /// without one (the table changed since `subject_anonymise`): PostgreSQL's
    /// error would show the row, personal data, in the server log.
    fn require_clearable(&self) -> SealResult<()> {
        let blocked = with_pinned_search_path(|| {
            Spi::get_one_with_args::<String>(
            "SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ') FROM pg_catalog.pg_attribute a \
              WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped \
                AND a.attnotnull AND NOT a.atthasdef \
                AND pg_catalog.quote_ident(a.attname) OPERATOR(pg_catalog.=) ANY ($2)",
            &[
                self.rel.into(),
                std::iter::once(self.column.clone())
                    .chain(self.clears.iter().cloned())
                    .collect::<Vec<_>>()
                    .into(),
            ],
            )
        })?;
        if let Some(columns) = blocked {
            pgrx::warning!(
                "pgseal: {} cannot be anonymised: column(s) {columns} are NOT NULL without a default",
                self.table
            );
            return Err(SealError::Refused(
                "a column subject_erase would clear is NOT NULL without a default",
            ));
        }
        Ok(())
    }

    /// `require_table_access` on this registration's table.
    fn require(&self, privilege: &str, refused: &'static str) -> SealResult<()> {
        require_table_access(self.rel, self.owner, privilege, refused)
            .map_err(|e| e.on_table(&self.table))
    }
}

/// Fails (42501) unless the caller has `privilege` on table `rel` (owned by
/// `owner`), and when row-level security binds the caller on it but not its owner
/// (not FORCEd, or an owner that is superuser or BYPASSRLS), or binds both with a
/// policy for particular roles (`TO …`), one whose expressions name the current
/// role (`current_user`, `pg_has_role`, `has_…_privilege`, …), or one that reads
/// another table (whose own policies would be the owner's): a statement run as the
/// owner (`as_table_owner`) would reach rows the caller's policies hide. (A policy
/// that calls a function which reads the current role is not seen; docs/SECURITY.md
/// says so.)
pub(crate) fn require_table_access(
    rel: pg_sys::Oid,
    owner: pg_sys::Oid,
    privilege: &str,
    refused: &'static str,
) -> SealResult<()> {
    let (ok, rls_caller) = with_pinned_search_path(|| {
        Spi::get_two_with_args::<bool, bool>(
            "SELECT pg_catalog.has_table_privilege($1, $2), pg_catalog.row_security_active($1)",
            &[rel.into(), privilege.into()],
        )
    })?;
    if ok != Some(true) {
        return Err(SealError::Forbidden(refused));
    }
    if rls_caller != Some(false) {
        let rls_owner = as_table_owner(owner, || {
            Spi::get_one_with_args::<bool>(
                "SELECT pg_catalog.row_security_active($1)",
                &[rel.into()],
            )
        })?;
        if rls_owner != Some(true) {
            return Err(SealError::Forbidden(
                "a registered table has row-level security for the caller that its owner is exempt from (FORCE ROW LEVEL SECURITY, and an owner that is neither superuser nor BYPASSRLS, make it hold for both)",
            ));
        }
        // The statement runs as the owner, so its policies are those of the owner:
        // they must be the caller's too.
        let by_role = as_owner(|| {
            Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_policy p \
                                 WHERE p.polrelid OPERATOR(pg_catalog.=) $1 \
                                   AND (p.polroles OPERATOR(pg_catalog.<>) '{0}'::pg_catalog.oid[] \
                                        OR pg_catalog.concat(pg_catalog.pg_get_expr(p.polqual, p.polrelid), ' ', \
                                                             pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid)) \
                                           OPERATOR(pg_catalog.~*) E'\\\\m(current_user|session_user|current_role|user|getpgusername|pg_has_role|has_[a-z_]+_privilege|row_security_active)\\\\M' \
                                        OR EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
                                                    WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_policy'::pg_catalog.regclass \
                                                      AND d.objid OPERATOR(pg_catalog.=) p.oid \
                                                      AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass \
                                                      AND d.refobjid OPERATOR(pg_catalog.<>) p.polrelid)))",
                &[rel.into()],
            )
        })?;
        if by_role != Some(false) {
            return Err(SealError::Forbidden(
                "a registered table has row-level security policies for particular roles, or that depend on the current role: run as its owner, the statement would not see the rows the caller's policies allow",
            ));
        }
    }
    Ok(())
}

/// The registrations of plain or partitioned, non-temporary tables that can hold
/// `subject`, in a stable order, and the registered tables skipped because they no
/// longer have a text `tenant_id` column (their rows could not be limited to the
/// tenant; each is named in a WARNING and in the receipt).
fn registrations(subject: &str) -> SealResult<(Vec<Registration>, Vec<String>)> {
    let mut out = as_owner(|| {
        Spi::connect(|c| {
            let rows = c.select(
                "SELECT pg_catalog.format('%I.%I', n.nspname, r.relname), pg_catalog.quote_ident(a.attname), \
                        CASE a.atttypid WHEN 'pg_catalog.text'::pg_catalog.regtype THEN 'pg_catalog.text' \
                                        WHEN 'pg_catalog.varchar'::pg_catalog.regtype THEN 'pg_catalog.text' \
                                        WHEN 'pg_catalog.uuid'::pg_catalog.regtype THEN 'pg_catalog.uuid' \
                                        WHEN 'pg_catalog.int4'::pg_catalog.regtype THEN 'pg_catalog.int4' \
                                        WHEN 'pg_catalog.int8'::pg_catalog.regtype THEN 'pg_catalog.int8' END, \
                        r.oid, r.relowner, \
                        EXISTS (SELECT 1 FROM pg_catalog.pg_attribute t \
                                 WHERE t.attrelid OPERATOR(pg_catalog.=) r.oid AND t.attname OPERATOR(pg_catalog.=) 'tenant_id' \
                                   AND NOT t.attisdropped \
                                   AND t.atttypid IN ('pg_catalog.text'::pg_catalog.regtype, 'pg_catalog.varchar'::pg_catalog.regtype)), \
                        ARRAY(SELECT pg_catalog.quote_ident(c.attname) FROM pgseal.subject_anonymised_columns y \
                                JOIN pg_catalog.pg_attribute c ON c.attrelid OPERATOR(pg_catalog.=) y.rel::pg_catalog.oid \
                                     AND c.attnum OPERATOR(pg_catalog.=) y.attnum AND NOT c.attisdropped \
                               WHERE y.rel::pg_catalog.oid OPERATOR(pg_catalog.=) r.oid \
                                 AND c.attnum OPERATOR(pg_catalog.<>) a.attnum ORDER BY y.attnum) \
                   FROM pgseal.subject_columns x \
                   JOIN pg_catalog.pg_class r ON r.oid OPERATOR(pg_catalog.=) x.rel::pg_catalog.oid \
                   JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) r.relnamespace \
                   JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) r.oid \
                        AND a.attnum OPERATOR(pg_catalog.=) x.attnum AND NOT a.attisdropped \
                  WHERE r.relkind IN ('r', 'p') AND r.relpersistence OPERATOR(pg_catalog.<>) 't' \
                    AND n.nspname OPERATOR(pg_catalog.<>) 'pgseal' \
                    AND a.atttypid IN ('pg_catalog.text'::pg_catalog.regtype, 'pg_catalog.varchar'::pg_catalog.regtype, \
                                       'pg_catalog.uuid'::pg_catalog.regtype, 'pg_catalog.int4'::pg_catalog.regtype, \
                                       'pg_catalog.int8'::pg_catalog.regtype) \
                  ORDER BY 1, 2",
                None,
                &[],
            )?;
            let mut out = Vec::new();
            let mut skipped = Vec::new();
            for r in rows {
                let missing = || SealError::Internal("a subject registration's catalog row");
                if r.get::<bool>(6)? != Some(true) {
                    let table = r.get::<String>(1)?.ok_or_else(missing)?;
                    pgrx::warning!(
                        "pgseal: skipped {table}, registered with subject_register: it has no text tenant_id column"
                    );
                    skipped.push(table);
                    continue;
                }
                out.push(Registration {
                    table: r.get::<String>(1)?.ok_or_else(missing)?,
                    column: r.get::<String>(2)?.ok_or_else(missing)?,
                    cast: r.get::<String>(3)?.ok_or_else(missing)?,
                    rel: r.get::<pg_sys::Oid>(4)?.ok_or_else(missing)?,
                    owner: r.get::<pg_sys::Oid>(5)?.ok_or_else(missing)?,
                    clears: r.get::<Vec<String>>(7)?.unwrap_or_default(),
                });
            }
            skipped.dedup();
            Ok::<_, SealError>((out, skipped))
        })
    })?;
    out.0.retain(|r| r.can_hold(subject));
    Ok(out)
}

/// The checks both functions make: the master key, the arguments, and that
/// `tenant` is the caller's tenant context and not one of pgseal's own chains.
fn checked(tenant: Option<&str>, subject: Option<&str>) -> SealResult<(String, String)> {
    crate::master::require_loaded()?;
    let tenant = tenant.ok_or(SealError::NullArgument("tenant"))?;
    let subject = subject.ok_or(SealError::NullArgument("subject"))?;
    crate::limits::tenant_arg(tenant)?;
    let subject = crate::ledger::append::checked_subjects(vec![Some(subject.to_owned())])?
        .pop()
        .ok_or(SealError::Internal("one subject"))?;
    if crate::context::tenant()? != tenant {
        return Err(SealError::InvalidArgument(
            "tenant must be the tenant context: call pgseal.set_tenant(tenant) first",
        ));
    }
    if crate::ledger::names::is_pgseal_chain(tenant) {
        return Err(SealError::Forbidden(
            "pgseal's own chains have no data subjects",
        ));
    }
    Ok((tenant.to_owned(), subject))
}

/// Whether the caller may decrypt (is a member of `pgseal_decrypt`).
fn may_decrypt() -> SealResult<bool> {
    Ok(
        Spi::get_one::<bool>("SELECT pg_catalog.pg_has_role('pgseal_decrypt', 'MEMBER')")?
            .unwrap_or(false),
    )
}

/// The sealed columns (`vault_register_column`) of `rel`: (name, context).
fn sealed_columns(rel: pg_sys::Oid) -> SealResult<Vec<(String, Option<String>)>> {
    as_owner(|| {
        Spi::connect(|c| {
            let rows = c.select(
                "SELECT a.attname::pg_catalog.text, s.context FROM pgseal.sealed_columns s \
                   JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) s.rel::pg_catalog.oid \
                        AND a.attnum OPERATOR(pg_catalog.=) s.attnum AND NOT a.attisdropped \
                  WHERE s.rel::pg_catalog.oid OPERATOR(pg_catalog.=) $1 \
                    AND a.atttypid OPERATOR(pg_catalog.=) 'pg_catalog.text'::pg_catalog.regtype \
                  ORDER BY 1",
                None,
                &[rel.into()],
            )?;
            let mut out = Vec::new();
            for r in rows {
                let name = r
                    .get::<String>(1)?
                    .ok_or(SealError::Internal("a sealed column's name"))?;
                out.push((name, r.get::<String>(2)?));
            }
            Ok(out)
        })
    })
}

/// `vault_decrypt(sealed, context)`, called as the caller (its privileges, its
/// decrypt audit).
fn decrypt(sealed: &str, context: Option<&str>) -> SealResult<Option<String>> {
    Ok(with_pinned_search_path(|| {
        Spi::get_one_with_args::<String>(
            "SELECT pgseal.vault_decrypt($1, $2)::pg_catalog.text",
            &[sealed.into(), context.into()],
        )
    })?)
}

/// `pgseal.subject_export(tenant, subject)`: every registered row of `subject` in
/// `tenant`, with the registered sealed columns decrypted when the caller is a
/// member of `pgseal_decrypt`, and the subject's ledger entries as `ledger_export`
/// lines (read as the caller). Recorded as a `subject.exported` entry (counts
/// only) naming the subject.
#[pg_extern(volatile, parallel_unsafe)]
fn subject_export(tenant: Option<&str>, subject: Option<&str>) -> JsonB {
    JsonB(export(tenant, subject).or_raise())
}

fn export(tenant: Option<&str>, subject: Option<&str>) -> SealResult<Value> {
    let (tenant, subject) = checked(tenant, subject)?;
    crate::pg::xact::require_read_write("subject_export")?;
    let decrypt_sealed = may_decrypt()?;
    let mut tables = Vec::new();
    let mut counts = Vec::new();
    let (registered, skipped) = registrations(&subject)?;
    for r in registered {
        r.require(
            "SELECT",
            "subject_export needs SELECT on every registered table",
        )?;
        let name = crate::privilege::pinned_name(r.rel, pg_sys::AccessShareLock)?;
        crate::privilege::require_only_owners_code(r.rel, r.owner, pg_sys::AccessShareLock, &[])
            .map_err(|e| e.on_table(&name))?;
        let sql = format!(
            "SELECT COALESCE(pg_catalog.jsonb_agg({}), '[]'::pg_catalog.jsonb) \
               FROM {} AS _pgseal_row \
              WHERE {}",
            crate::privilege::row_image_sql(r.rel, "_pgseal_row")?,
            name,
            r.rows_of_subject("_pgseal_row")
        );
        let mut rows = as_table_owner_pinned(r.owner, || {
            Spi::get_one_with_args::<JsonB>(
                &sql,
                &[subject.as_str().into(), tenant.as_str().into()],
            )
        })?
        .map_or(Value::Array(Vec::new()), |j| j.0);
        if decrypt_sealed {
            let sealed = sealed_columns(r.rel)?;
            for row in rows.as_array_mut().into_iter().flatten() {
                for (name, context) in &sealed {
                    if let Some(Value::String(v)) = row.get(name) {
                        let plain = decrypt(v, context.as_deref())?;
                        row[name] = plain.map_or(Value::Null, Value::String);
                    }
                }
            }
        }
        let n = rows.as_array().map_or(0, Vec::len);
        counts.push(json!({ "table": r.table, "column": r.column, "rows": n }));
        tables.push(json!({ "table": r.table, "column": r.column, "rows": rows }));
    }
    // The subject's entries, read as the caller (row-level security of the ledger).
    crate::ledger::writer::flush()?;
    let ledger = with_pinned_search_path(|| {
        Spi::get_one_with_args::<JsonB>(
            "SELECT COALESCE(pg_catalog.jsonb_agg(e ORDER BY (e OPERATOR(pg_catalog.->>) 'seq')::pg_catalog.int8), '[]'::pg_catalog.jsonb) \
               FROM pgseal.ledger_export($1) e \
              WHERE (e OPERATOR(pg_catalog.->) 'subjects') OPERATOR(pg_catalog.?) $2",
            &[tenant.as_str().into(), subject.as_str().into()],
        )
    })?
    .map_or(Value::Array(Vec::new()), |j| j.0);
    let entries = ledger.as_array().map_or(0, Vec::len);
    let receipt = json!({
        "tables": counts,
        "skipped_tables": skipped,
        "ledger_entries": entries,
        "decrypted": decrypt_sealed,
    });
    receipt_entry(&tenant, "subject.exported", &receipt, &subject)?;
    Ok(json!({
        "tenant": tenant,
        "subject": subject,
        "tables": tables,
        "ledger": ledger,
    }))
}

/// `pgseal.subject_erase(tenant, subject)`: deletes `subject`'s rows of `tenant` in
/// every registered table (in a table declared with `subject_anonymise`, sets the
/// declared columns and the matching subject column to their defaults instead),
/// erases the payloads of the tenant's ledger entries that name the subject, and
/// appends a `subject.erased` receipt naming the subject with the counts and the
/// erased entries' seqs, which it returns. For members of
/// `pgseal_admin`; refused (55000) for a tenant under a retention hold.
#[pg_extern(volatile, parallel_unsafe)]
fn subject_erase(tenant: Option<&str>, subject: Option<&str>) -> JsonB {
    JsonB(erase(tenant, subject).or_raise())
}

fn erase(tenant: Option<&str>, subject: Option<&str>) -> SealResult<Value> {
    let (tenant, subject) = checked(tenant, subject)?;
    crate::pg::xact::require_read_write("subject_erase")?;
    crate::ledger::access::require_admin("subject_erase")?;
    // The tenant's chain lock first: a hold is recorded in the chain, so one set
    // concurrently is either seen here or waits for this erasure to end.
    crate::ledger::erase::lock_chain(&tenant)?;
    if crate::ledger::admin::on_hold(&tenant)? {
        return Err(SealError::Refused(
            "the tenant is under a retention hold: its subjects' data is not erased",
        ));
    }
    let (registered, skipped) = registrations(&subject)?;
    for r in &registered {
        if r.clears.is_empty() {
            r.require(
                "DELETE",
                "subject_erase needs DELETE on every registered table",
            )?;
        } else {
            r.require(
                "UPDATE",
                "subject_erase needs UPDATE on every table it anonymises",
            )?;
            r.require_clearable().map_err(|e| e.on_table(&r.table))?;
        }
    }
    let mut counts = Vec::new();
    for r in registered {
        let name = crate::privilege::pinned_name(r.rel, pg_sys::RowExclusiveLock)?;
        // Checked right before the statement, not with the others up front: code
        // that ran as an earlier table's owner could have changed this table since
        // (this transaction's own locks do not stop it).
        let clears = if r.clears.is_empty() {
            Vec::new()
        } else {
            std::iter::once(r.column.clone())
                .chain(r.clears.iter().cloned())
                .collect()
        };
        crate::privilege::require_only_owners_code(
            r.rel,
            r.owner,
            pg_sys::RowExclusiveLock,
            &clears,
        )
        .map_err(|e| e.on_table(&name))?;
        let filter = r.rows_of_subject("_pgseal_row");
        let (sql, done) = if r.clears.is_empty() {
            (
                format!("DELETE FROM {name} AS _pgseal_row WHERE {filter}"),
                "deleted",
            )
        } else {
            let set = std::iter::once(&r.column)
                .chain(&r.clears)
                .map(|c| format!("{c} = DEFAULT"))
                .collect::<Vec<_>>()
                .join(", ");
            (
                format!("UPDATE {name} AS _pgseal_row SET {set} WHERE {filter}"),
                "anonymised",
            )
        };
        let sql = format!("WITH d AS ({sql} RETURNING 1) SELECT pg_catalog.count(*) FROM d");
        let n = as_table_owner_pinned(r.owner, || {
            Spi::get_one_with_args::<i64>(&sql, &[subject.as_str().into(), tenant.as_str().into()])
        })?
        .unwrap_or(0);
        counts.push(json!({ "table": r.table, "column": r.column, done: n }));
    }
    let seqs =
        crate::ledger::erase::erase(&tenant, crate::ledger::erase::Which::Subject(&subject))?.seqs;
    let receipt = json!({
        "tables": counts,
        "skipped_tables": skipped,
        "ledger_entries_erased": seqs.len(),
        "seqs": crate::ledger::erase::ranges(&seqs),
    });
    receipt_entry(&tenant, "subject.erased", &receipt, &subject)?;
    Ok(receipt)
}

/// Appends pgseal's receipt `event` naming `subject`.
fn receipt_entry(tenant: &str, event: &str, payload: &Value, subject: &str) -> SealResult<()> {
    crate::ledger::append::append_naming(
        tenant,
        event,
        &payload.to_string(),
        &crate::ledger::actor::default_actor(),
        vec![subject.to_owned()],
    )?;
    Ok(())
}
