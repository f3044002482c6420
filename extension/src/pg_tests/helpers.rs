//! Helpers shared by the `#[pg_test]` modules. The SQL side (`tests.sqlstate_of`,
//! `tests.error_text_of`, `tests.count_of`) is created by the modules' `extension_sql!`.

use pgrx::prelude::*;

/// The SQLSTATE a statement raised, or 00000; it runs in a subtransaction.
pub fn sqlstate(sql: &str) -> String {
    Spi::get_one_with_args::<String>("SELECT tests.sqlstate_of($1)", &[sql.into()])
        .expect("tests.sqlstate_of")
        .expect("tests.sqlstate_of returns a code")
}

/// Runs a statement that must succeed.
pub fn run(sql: &str) {
    Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The single non-NULL value a query returns.
pub fn one<T: FromDatum + IntoDatum>(sql: &str) -> T {
    Spi::get_one::<T>(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .unwrap_or_else(|| panic!("{sql}: NULL"))
}

/// Sets the tenant for the rest of the test's transaction.
pub fn tenant(t: &str) {
    run(&format!(
        "SET LOCAL app.tenant_id = {}",
        pgrx::spi::quote_literal(t)
    ));
}
