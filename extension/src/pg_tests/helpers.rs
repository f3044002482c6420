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

/// An attacker's planner trap: role `owner` (created, with CREATE on `public`)
/// owns `public.<prefix>_imm(text)`, an IMMUTABLE function that records
/// `current_user` in `public.<prefix>_seen` whenever it runs. An expression
/// statistic over it (`owner_trap_statistic`) is simplified by whoever plans a
/// query on the table.
pub fn owner_trap(owner: &str, prefix: &str) {
    run(&format!("CREATE ROLE {owner}"));
    run(&format!("GRANT CREATE ON SCHEMA public TO {owner}"));
    run(&format!("CREATE TABLE public.{prefix}_seen (who text)"));
    run(&format!("GRANT INSERT ON public.{prefix}_seen TO PUBLIC"));
    run(&format!(
        "CREATE FUNCTION public.{prefix}_note() RETURNS text LANGUAGE plpgsql VOLATILE AS $$
         BEGIN INSERT INTO public.{prefix}_seen VALUES (current_user); RETURN ''; END $$"
    ));
    run(&format!(
        "CREATE FUNCTION public.{prefix}_imm(t text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
         BEGIN PERFORM public.{prefix}_note(); RETURN t; END $$"
    ));
    run(&format!(
        "ALTER FUNCTION public.{prefix}_note() OWNER TO {owner}"
    ));
    run(&format!(
        "ALTER FUNCTION public.{prefix}_imm(text) OWNER TO {owner}"
    ));
}

/// Gives `table` to `owner` and, as that owner, the trap's expression statistic.
pub fn owner_trap_statistic(owner: &str, prefix: &str, table: &str) {
    run(&format!("ALTER TABLE {table} OWNER TO {owner}"));
    run(&format!("SET LOCAL ROLE {owner}"));
    run(&format!(
        "CREATE STATISTICS public.{prefix}_st ON (tenant_id || public.{prefix}_imm('x')), tenant_id FROM {table}"
    ));
    run("RESET ROLE");
}

/// As `owner` (after `owner_trap`): an enum type `public.<prefix>_mood` ('calm',
/// 'angry') whose cast to json runs the trap, as `to_jsonb` of a row with such a
/// column would.
pub fn owner_trap_json_cast(owner: &str, prefix: &str) {
    run(&format!("SET LOCAL ROLE {owner}"));
    run(&format!(
        "CREATE TYPE public.{prefix}_mood AS ENUM ('calm', 'angry')"
    ));
    run(&format!(
        "CREATE FUNCTION public.{prefix}_mood_json(m public.{prefix}_mood) RETURNS json LANGUAGE plpgsql AS $$
         BEGIN PERFORM public.{prefix}_note(); RETURN pg_catalog.to_json(m::text); END $$"
    ));
    run(&format!(
        "CREATE CAST (public.{prefix}_mood AS json) WITH FUNCTION public.{prefix}_mood_json(public.{prefix}_mood)"
    ));
    run("RESET ROLE");
}

/// The roles the trap ran as, comma-separated.
pub fn owner_trap_ran_as(prefix: &str) -> String {
    one(&format!(
        "SELECT coalesce(string_agg(DISTINCT who, ','), '') FROM public.{prefix}_seen"
    ))
}

/// Takes both ledger tables' locks before a test lifts their guards (ALTER
/// TABLE), all at once or none, as `single_entries_are_written_directly…`
/// does: other tests append at the same time, and waiting for the second lock
/// while holding the first could deadlock with them. A test that takes them
/// appends to a tenant of its own: one shared with a test that appends without
/// them would deadlock on the tenant's chain lock (that test holds the chain
/// and waits for the tables to write its entries).
pub fn lock_ledger_tables() {
    run("DO $$ BEGIN
           LOOP
             BEGIN
               LOCK TABLE pgseal.ledger_heads, pgseal.ledger IN SHARE ROW EXCLUSIVE MODE NOWAIT;
               EXIT;
             EXCEPTION WHEN lock_not_available THEN PERFORM pg_sleep(0.01);
             END;
           END LOOP;
         END $$");
}
