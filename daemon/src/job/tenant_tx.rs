//! The transaction a job's work on one tenant's rows runs in: reseal batches
//! (`rotation`), retention's sweeps (`retention`) and offboarding's steps
//! (`offboarding`). READ COMMITTED, so a batch sees rows committed before each of
//! its statements; the tenant's context, for the tables' row-level security; a lock
//! timeout, so a lock another session holds fails the batch instead of stalling the
//! job; and a search_path.
//!
//! The session's search_path is `pg_catalog, pg_temp` (`db::connect`), so every
//! name pgseald prints into a statement carries its schema. A column type from an
//! extension (citext's, say) then has no operators on the path, and a comparison
//! of it falls back to text's: another result where its operators differ (citext
//! ignores case), and an index on the column unused. A job's statement on such
//! columns runs with their types' schemas after pg_catalog ([`search_path`]):
//! pg_catalog's operators still come first, and the column's own operator is the
//! one exact match for its type. A schema every role may create in is never put on
//! the path (an operator made there for a domain would be an exact match and run as
//! pgseald); a role granted CREATE on a type's schema can do the same, so grant it
//! to trusted roles only.

use tokio_postgres::{Client, IsolationLevel, Transaction};

use crate::error::DaemonError;

/// The path a job's statements run under when its columns need no other schema.
pub const CATALOG_ONLY: &str = "pg_catalog, pg_temp";

/// SQL for the schemas (quoted, comma-separated; NULL when none) of the types of
/// the columns of relation `rel` (an SQL expression) that `attrs` (a condition on
/// `a`, the column's `pg_attribute` row) selects, and of their base types, other
/// than pg_catalog and other than any schema every role may create objects in: an
/// operator another role made there for a column's type (a domain's, say) would be
/// a closer match than pg_catalog's and run as pgseald. Such a type compares as
/// the session's path allows (a domain as its base type).
pub fn type_schemas_sql(rel: &str, attrs: &str) -> String {
    format!(
        "(SELECT string_agg(DISTINCT quote_ident(n.nspname), ', ') {})",
        column_type_schemas(rel, attrs, false)
    )
}

/// SQL for whether any of those columns' types (or base types) lives in a schema
/// every role may create objects in, which `type_schemas_sql` leaves off the path.
pub fn open_type_schemas_sql(rel: &str, attrs: &str) -> String {
    format!(
        "(SELECT EXISTS (SELECT 1 {}))",
        column_type_schemas(rel, attrs, true)
    )
}

/// The FROM and WHERE of both: the schemas, other than pg_catalog, of the types and
/// base types of `rel`'s columns `attrs`, where every role may (`open`) or may not
/// create objects.
fn column_type_schemas(rel: &str, attrs: &str, open: bool) -> String {
    let not = if open { "" } else { "NOT " };
    format!(
        "FROM pg_attribute a \
         JOIN pg_type t ON t.oid = a.atttypid \
         JOIN pg_namespace n ON n.oid IN (t.typnamespace, \
              (SELECT b.typnamespace FROM pg_type b WHERE b.oid = t.typbasetype)) \
        WHERE a.attrelid = {rel} AND NOT a.attisdropped AND n.nspname <> 'pg_catalog' \
          AND {not}has_schema_privilege('public', n.oid, 'CREATE') \
          AND ({attrs})"
    )
}

/// The search_path for statements on columns whose types live in `schemas` (as
/// `type_schemas_sql` returns them).
pub fn search_path(schemas: Option<String>) -> String {
    match schemas {
        Some(s) if !s.is_empty() => format!("pg_catalog, {s}, pg_temp"),
        _ => CATALOG_ONLY.to_owned(),
    }
}

/// Begins a READ COMMITTED transaction under `tenant`'s context, with
/// `search_path` and `lock_timeout` (a PostgreSQL duration, e.g. "1s") set for it.
pub async fn begin<'c>(
    client: &'c mut Client,
    tenant: &str,
    search_path: &str,
    lock_timeout: &str,
) -> Result<Transaction<'c>, DaemonError> {
    let tx = read_committed(client).await?;
    // DateStyle and IntervalStyle again for the transaction (`db::connect` sets
    // them for the session): code the batch runs (a table owner's trigger) may
    // change the session's.
    tx.execute(
        "SELECT pgseal.set_tenant($1), pg_catalog.set_config('search_path', $2, true), \
                pg_catalog.set_config('lock_timeout', $3, true), \
                pg_catalog.set_config('DateStyle', 'ISO, YMD', true), \
                pg_catalog.set_config('IntervalStyle', 'postgres', true)",
        &[&tenant, &search_path, &lock_timeout],
    )
    .await
    .map_err(DaemonError::Query)?;
    Ok(tx)
}

/// Begins a READ COMMITTED transaction, whatever the database's default.
pub async fn read_committed(client: &mut Client) -> Result<Transaction<'_>, DaemonError> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .await
        .map_err(DaemonError::Query)
}

/// Whether `tenant` names one of pgseal's own chains (`_pgseal…`), which no session
/// acts for (`set_tenant` refuses it): rows, keys or sealed values of such a tenant,
/// made by an application or before pgseal refused it, are skipped with a warning
/// instead of failing the job for every tenant after it.
pub fn skip_pgseal_chain(job: &str, tenant: &str) -> bool {
    let skip = pgseal_core::ledger::is_pgseal_chain(tenant);
    if skip {
        tracing::warn!(
            job,
            tenant = ?tenant,
            "skipping a tenant id that names one of pgseal's own chains (_pgseal…): no session acts for it"
        );
    }
    skip
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_comes_first_and_pg_temp_last() {
        assert_eq!(search_path(None), CATALOG_ONLY);
        assert_eq!(search_path(Some(String::new())), CATALOG_ONLY);
        assert_eq!(
            search_path(Some("public, \"My Ext\"".into())),
            "pg_catalog, public, \"My Ext\", pg_temp"
        );
    }
}
