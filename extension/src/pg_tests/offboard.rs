//! `#[pg_test]`s for tenant offboarding (issue 19): scheduling, cancelling, and the
//! step functions pgseald calls, with the ways they refuse to be taken out of
//! order, early, under a hold or with the work undone. pgseald's side, with kill -9
//! at every step, is in tests/tests/jobs_cluster.rs.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pg_tests::helpers::{
        one, owner_trap, owner_trap_json_cast, owner_trap_ran_as, owner_trap_statistic, run,
        sqlstate, tenant,
    };

    fn step(t: &str) -> String {
        one(&format!(
            "SELECT step FROM pgseal.tenant_offboardings WHERE tenant_id = {}",
            pgrx::spi::quote_literal(t)
        ))
    }

    /// The export step as pgseald takes it: the export read (which records its
    /// tables), then 'exported'.
    fn exported(t: &str) {
        let q = pgrx::spi::quote_literal(t);
        run(&format!(
            "SELECT count(*) FROM pgseal._offboard_export({q})"
        ));
        run(&format!(
            "SELECT pgseal._offboard_advance({q}, 'scheduled', 'exported', '/x', repeat('a', 64))"
        ));
    }

    /// Calls `q` (a batch step returning how many it did) until it returns 0;
    /// returns the total.
    fn drain(q: &str) -> i64 {
        let mut total = 0;
        loop {
            let k: i64 = one(q);
            if k == 0 {
                return total;
            }
            total += k;
        }
    }

    fn events(t: &str) -> String {
        one(&format!(
            "SELECT string_agg(event, ',' ORDER BY seq) FROM pgseal.ledger WHERE tenant_id = {}",
            pgrx::spi::quote_literal(t)
        ))
    }

    #[pg_test]
    fn scheduling_is_recorded_refused_twice_and_checks_its_arguments() {
        tenant("off-sched");
        let later: bool = one(
            "SELECT pgseal.tenant_offboard('off-sched', '30 days') = now() + interval '30 days'",
        );
        assert!(later);
        assert_eq!(step("off-sched"), "scheduled");
        assert_eq!(events("off-sched"), "tenant.offboard_scheduled");
        let payload: pgrx::JsonB = one(
            "SELECT payload FROM pgseal.ledger WHERE tenant_id = 'off-sched' AND event = 'tenant.offboard_scheduled'",
        );
        assert_eq!(payload.0["grace"], "30 days");
        for (sql, code) in [
            (
                "SELECT pgseal.tenant_offboard('off-sched', '1 day')",
                "55000",
            ),
            (
                "SELECT pgseal.tenant_offboard('off-neg', '-1 day')",
                "22023",
            ),
            ("SELECT pgseal.tenant_offboard('off-null', NULL)", "22004"),
            (
                "SELECT pgseal.tenant_offboard('off-far', '101 years')",
                "22023",
            ),
            ("SELECT pgseal.tenant_offboard(NULL, '1 day')", "22004"),
            ("SELECT pgseal.tenant_offboard('', '1 day')", "22023"),
            ("SELECT pgseal.tenant_offboard('_pgseal', '1 day')", "42501"),
            (
                "SELECT pgseal.tenant_offboard('_pgseal_audit', '1 day')",
                "42501",
            ),
        ] {
            assert_eq!(sqlstate(sql), code, "{sql}");
        }
        run("CREATE ROLE off_ledger IN ROLE pgseal_ledger");
        run("SET LOCAL ROLE off_ledger");
        assert_eq!(
            sqlstate("SELECT pgseal.tenant_offboard('off-other', '1 day')"),
            "42501"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.tenant_offboard_cancel('off-sched')"),
            "42501"
        );
        assert_eq!(sqlstate("SELECT * FROM pgseal._offboard_due()"), "42501");
        run("RESET ROLE");
    }

    #[pg_test]
    fn a_cancel_works_only_within_the_grace_period() {
        tenant("off-cancel");
        run("SELECT pgseal.tenant_offboard('off-cancel', '1 hour')");
        run("SELECT pgseal.tenant_offboard_cancel('off-cancel')");
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM pgseal.tenant_offboardings WHERE tenant_id = 'off-cancel'"
            ),
            0
        );
        assert_eq!(
            events("off-cancel"),
            "tenant.offboard_scheduled,tenant.offboard_cancelled"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.tenant_offboard_cancel('off-cancel')"),
            "55000"
        );
        // Due at once: no longer cancellable (pgseald may have begun).
        run("SELECT pgseal.tenant_offboard('off-cancel', '0')");
        assert_eq!(
            sqlstate("SELECT pgseal.tenant_offboard_cancel('off-cancel')"),
            "55000"
        );
    }

    /// A registered table with rows of two tenants, a sealed value and entries.
    fn tenant_data(t: &str) {
        run("CREATE TABLE public.off_users (id text, tenant_id text NOT NULL, email text, token text)");
        run("SELECT pgseal.subject_register('public.off_users', 'id')");
        tenant(t);
        run(&format!(
            "INSERT INTO public.off_users VALUES ('u1', '{t}', 'a@example.com', pgseal.vault_seal('tok')), \
             ('u2', '{t}', 'b@example.com', NULL), ('u1', 'off-bystander', 'c@example.com', NULL)"
        ));
        for i in 0..5 {
            run(&format!(
                "SELECT pgseal.ledger_append('order.paid', '{{\"n\": {i}}}', NULL, ARRAY['u1'])"
            ));
        }
    }

    /// Two rows of another tenant in `tenant_data`'s table, under its context.
    fn more_tenant_data(t: &str) {
        tenant(t);
        run(&format!(
            "INSERT INTO public.off_users VALUES ('u1', '{t}', 'a@example.com', NULL), ('u2', '{t}', NULL, NULL)"
        ));
    }

    #[pg_test]
    fn the_steps_run_in_order_and_the_receipt_states_what_was_done() {
        tenant_data("off-steps");
        run("SELECT pgseal.tenant_offboard('off-steps', '0')");
        assert!(one::<bool>(
            "SELECT 'off-steps' IN (SELECT * FROM pgseal._offboard_due())"
        ));
        // Out of order, skipping, or without its export file: refused.
        for (sql, code) in [
            (
                "SELECT pgseal._offboard_advance('off-steps', 'scheduled', 'deleted')",
                "22023",
            ),
            (
                "SELECT pgseal._offboard_advance('off-steps', 'scheduled', 'exported')",
                "22004",
            ),
            (
                "SELECT pgseal._offboard_advance('off-steps', 'scheduled', 'exported', '/x')",
                "22004",
            ),
            (
                "SELECT pgseal._offboard_advance('off-steps', 'scheduled', 'exported', '/x', repeat('A', 64))",
                "22023",
            ),
            (
                "SELECT pgseal._offboard_advance('off-steps', 'scheduled', 'exported', '/x', repeat('a', 63))",
                "22023",
            ),
            (
                "SELECT pgseal._offboard_advance('off-steps', 'exported', 'deleted', '/x', repeat('a', 64))",
                "22023",
            ),
            (
                "SELECT pgseal._offboard_advance('off-steps', 'exported', 'deleted')",
                "55000",
            ),
            ("SELECT pgseal._offboard_erase('off-steps', 10)", "55000"),
            ("SELECT pgseal._offboard_finish('off-steps')", "55000"),
            (
                "SELECT pgseal._offboard_advance('off-steps', 'erased', 'receipted')",
                "22023",
            ),
        ] {
            assert_eq!(sqlstate(sql), code, "{sql}");
        }
        // The export: the tenant's rows, then its ledger.
        let export: String =
            one("SELECT string_agg(l, E'\\n') FROM pgseal._offboard_export('off-steps') l");
        assert_eq!(
            export.matches("\"table\": \"public.off_users\"").count(),
            2,
            "{export}"
        );
        assert!(!export.contains("off-bystander"), "{export}");
        assert_eq!(export.matches("\"ledger\"").count(), 6, "{export}");
        run("SELECT pgseal._offboard_advance('off-steps', 'scheduled', 'exported', '/exports/off-steps.jsonl', repeat('a', 64))");
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_export('off-steps')"),
            "55000"
        );
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_advance('off-steps', 'scheduled', 'exported', '/x', repeat('a', 64))"),
            "55000"
        );
        let n = drain("SELECT pgseal._offboard_delete('off-steps', 1)");
        assert_eq!(n, 2);
        run("SELECT pgseal._offboard_advance('off-steps', 'exported', 'deleted')");
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_delete('off-steps', 1)"),
            "55000"
        );
        run("SELECT pgseal.tenant_shred('off-steps')");
        run("SELECT pgseal._offboard_advance('off-steps', 'deleted', 'shredded')");
        let mut total = 0;
        loop {
            let k: i64 = one("SELECT pgseal._offboard_erase('off-steps', 2)");
            assert!(k <= 2);
            if k == 0 {
                break;
            }
            total += k;
        }
        // The five entries and the shred's; the scheduling receipt stays whole.
        assert_eq!(total, 6);
        assert!(one::<bool>(
            "SELECT payload IS NOT NULL FROM pgseal.ledger WHERE tenant_id = 'off-steps' AND event = 'tenant.offboard_scheduled'"
        ));
        run("SELECT pgseal._offboard_advance('off-steps', 'shredded', 'erased')");
        let receipt: pgrx::JsonB = one("SELECT pgseal._offboard_finish('off-steps')");
        assert_eq!(
            receipt.0["deleted"]["public.off_users"], 2,
            "{:?}",
            receipt.0
        );
        assert_eq!(receipt.0["ledger_entries_erased"], 6);
        assert_eq!(receipt.0["export_file"], "/exports/off-steps.jsonl");
        assert_eq!(receipt.0["export_sha256"], "a".repeat(64));
        assert_eq!(step("off-steps"), "receipted");
        assert!(events("off-steps").ends_with(",tenant.offboarded"));
        let (ok, erased) =
            Spi::get_two::<bool, i64>("SELECT ok, erased FROM pgseal.ledger_verify('off-steps')")
                .unwrap();
        assert_eq!((ok, erased), (Some(true), Some(6)));
        run("SELECT pgseal._offboard_advance('off-steps', 'receipted', 'done')");
        assert!(!one::<bool>(
            "SELECT 'off-steps' IN (SELECT * FROM pgseal._offboard_due())"
        ));
        // The other tenant's row is untouched.
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.off_users WHERE tenant_id = 'off-bystander'"),
            1
        );
    }

    #[pg_test]
    fn an_erase_resume_hint_past_what_is_left_never_hides_it() {
        // The erase batches go on from where the last one ended; a hint past
        // entries still there (a batch rolled back, an entry written below it) must
        // not make a batch report none left.
        tenant_data("off-hint");
        run("SELECT pgseal.tenant_offboard('off-hint', '0')");
        exported("off-hint");
        let n = drain("SELECT pgseal._offboard_delete('off-hint', 1)");
        assert_eq!(n, 2);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.off_users WHERE tenant_id = 'off-hint'"),
            0
        );
        run("SELECT pgseal._offboard_advance('off-hint', 'exported', 'deleted')");
        run("SELECT pgseal.tenant_shred('off-hint')");
        run("SELECT pgseal._offboard_advance('off-hint', 'deleted', 'shredded')");
        crate::offboard::set_resume_hint("off-hint", 1_000_000);
        let total = drain("SELECT pgseal._offboard_erase('off-hint', 2)");
        assert_eq!(total, 6);
    }

    #[pg_test]
    fn a_resume_hint_in_the_audit_chain_never_hides_the_tenants_own_entries() {
        // Once the tenant's own chain is done the batches go on in the audit chain;
        // an entry of its own chain left or written since (a batch rolled back, a
        // decrypt's late count) must still be found before none left is reported.
        tenant_data("off-audit-hint");
        run("SELECT pgseal.tenant_offboard('off-audit-hint', '0')");
        exported("off-audit-hint");
        drain("SELECT pgseal._offboard_delete('off-audit-hint', 10)");
        run("SELECT pgseal._offboard_advance('off-audit-hint', 'exported', 'deleted')");
        run("SELECT pgseal.tenant_shred('off-audit-hint')");
        run("SELECT pgseal._offboard_advance('off-audit-hint', 'deleted', 'shredded')");
        crate::offboard::set_audit_resume_hint("off-audit-hint", 1_000_000);
        let total = drain("SELECT pgseal._offboard_erase('off-audit-hint', 2)");
        assert_eq!(total, 6);
    }

    #[pg_test]
    fn the_receipt_is_refused_while_keys_or_payloads_remain() {
        tenant_data("off-undone");
        run("SELECT pgseal.tenant_offboard('off-undone', '0')");
        exported("off-undone");
        // Not past deleting while rows are left.
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_advance('off-undone', 'exported', 'deleted')"),
            "55000"
        );
        while one::<i64>("SELECT pgseal._offboard_delete('off-undone', 10)") > 0 {}
        run("SELECT pgseal._offboard_advance('off-undone', 'exported', 'deleted')");
        // Advanced without shredding or erasing: no receipt, back to deleting.
        run("SELECT pgseal._offboard_advance('off-undone', 'deleted', 'shredded')");
        run("SELECT pgseal._offboard_advance('off-undone', 'shredded', 'erased')");
        let r: pgrx::JsonB = one("SELECT pgseal._offboard_finish('off-undone')");
        assert!(r.0.get("redo").is_some(), "{:?}", r.0);
        assert_eq!(step("off-undone"), "exported");
        assert!(!events("off-undone").contains("tenant.offboarded"));
    }

    #[pg_test]
    fn a_refused_table_is_named() {
        tenant_data("off-named");
        run("SELECT pgseal.tenant_offboard('off-named', '0')");
        exported("off-named");
        run("CREATE ROLE off_no_delete IN ROLE pgseal_admin");
        run("GRANT SELECT ON public.off_users TO off_no_delete");
        run("SET LOCAL ROLE off_no_delete");
        let q = "SELECT pgseal._offboard_delete('off-named', 10)";
        assert_eq!(sqlstate(q), "42501");
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal(q)
        ));
        assert!(
            msg.contains("needs DELETE on every offboarded table (table public.off_users)"),
            "{msg}"
        );
        run("RESET ROLE");
        assert_eq!(one::<i64>("SELECT count(*) FROM public.off_users"), 3);
    }

    #[pg_test]
    fn a_held_tenant_is_never_offboarded() {
        tenant_data("off-held");
        run("SELECT pgseal.tenant_offboard('off-held', '0')");
        run("SELECT pgseal.retention_hold('off-held', true)");
        assert!(!one::<bool>(
            "SELECT 'off-held' IN (SELECT * FROM pgseal._offboard_due())"
        ));
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_advance('off-held', 'scheduled', 'exported', '/x', repeat('a', 64))"),
            "55000"
        );
        run("SELECT pgseal.retention_hold('off-held', false)");
        exported("off-held");
        run("SELECT pgseal.retention_hold('off-held', true)");
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_advance('off-held', 'exported', 'deleted')"),
            "55000"
        );
        assert_eq!(step("off-held"), "exported");
    }

    #[pg_test]
    fn rows_a_trigger_keeps_stop_the_offboarding() {
        tenant_data("off-kept");
        // The table's owner keeps one row from being deleted.
        run(
            "CREATE FUNCTION public.off_keep() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF OLD.id = 'u2' THEN RETURN NULL; END IF; RETURN OLD; END $$",
        );
        run("CREATE TRIGGER keep BEFORE DELETE ON public.off_users FOR EACH ROW EXECUTE FUNCTION public.off_keep()");
        run("SELECT pgseal.tenant_offboard('off-kept', '0')");
        exported("off-kept");
        // The batch deletes u1; the next finds u2 left and stops, naming the table.
        assert_eq!(
            calls_until_refused("SELECT pgseal._offboard_delete('off-kept', 10)", 5),
            1
        );
        assert_eq!(
            one::<String>(
                "SELECT string_agg(id, ',') FROM public.off_users WHERE tenant_id = 'off-kept'"
            ),
            "u2"
        );
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_advance('off-kept', 'exported', 'deleted')"),
            "55000"
        );
        assert_eq!(step("off-kept"), "exported");
    }

    /// Calls `q` until it is refused for rows left that the export does not hold,
    /// at most `max` times; returns how many calls succeeded before (panics when
    /// none was refused, or one failed otherwise). The refusal names the table.
    fn calls_until_refused(q: &str, max: usize) -> usize {
        let checked = format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal(q)
        );
        for i in 0..max {
            let msg: String = one(&checked);
            if msg.is_empty() {
                continue;
            }
            assert!(
                msg.contains("not deleted unexported") && msg.contains("(table public."),
                "{q}: {msg}"
            );
            return i;
        }
        panic!("{q} was never refused in {max} calls");
    }

    #[pg_test]
    fn a_trigger_that_puts_rows_back_stops_the_offboarding() {
        // The table's owner puts every deleted row back: the deletes would find
        // rows for ever (pgseald's loop would never end). They take only the rows
        // the export held, each once, and stop on the copies.
        tenant_data("off-back");
        run(
            "CREATE FUNCTION public.off_put_back() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO public.off_users VALUES (OLD.*); RETURN OLD; END $$",
        );
        run("CREATE TRIGGER put_back AFTER DELETE ON public.off_users FOR EACH ROW EXECUTE FUNCTION public.off_put_back()");
        run("SELECT pgseal.tenant_offboard('off-back', '0')");
        exported("off-back");
        let q = "SELECT pgseal._offboard_delete('off-back', 1)";
        // Two rows: two batches of one, the third refused.
        assert_eq!(calls_until_refused(q, 10), 2);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.off_users WHERE tenant_id = 'off-back'"),
            2
        );
        // Its step stays; once an administrator has taken the rows put back (the
        // export holds what they copy), the offboarding goes on.
        assert_eq!(step("off-back"), "exported");
        run("DROP TRIGGER put_back ON public.off_users");
        run("DELETE FROM public.off_users WHERE tenant_id = 'off-back'");
        assert_eq!(
            one::<i64>("SELECT pgseal._offboard_delete('off-back', 10)"),
            0
        );
        run("SELECT pgseal._offboard_advance('off-back', 'exported', 'deleted')");
        // The same through a partitioned table's trigger, which its partitions take.
        run("CREATE TABLE public.off_parts (id text, tenant_id text NOT NULL) PARTITION BY LIST (tenant_id)");
        run("CREATE TABLE public.off_parts_1 PARTITION OF public.off_parts FOR VALUES IN ('off-back-p')");
        run("SELECT pgseal.subject_register('public.off_parts', 'id')");
        run(
            "CREATE FUNCTION public.off_parts_back() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO public.off_parts VALUES (OLD.*); RETURN OLD; END $$",
        );
        run("CREATE TRIGGER put_back AFTER DELETE ON public.off_parts FOR EACH ROW EXECUTE FUNCTION public.off_parts_back()");
        tenant("off-back-p");
        run("INSERT INTO public.off_parts VALUES ('u1', 'off-back-p')");
        run("SELECT pgseal.tenant_offboard('off-back-p', '0')");
        exported("off-back-p");
        assert_eq!(
            calls_until_refused("SELECT pgseal._offboard_delete('off-back-p', 10)", 10),
            1
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM public.off_parts"), 1);
        // Rows moved between two offboarded tables by their triggers: the same.
        run("CREATE TABLE public.off_ping (id text, tenant_id text NOT NULL)");
        run("CREATE TABLE public.off_pong (id text, tenant_id text NOT NULL)");
        run("SELECT pgseal.subject_register('public.off_ping', 'id')");
        run("SELECT pgseal.subject_register('public.off_pong', 'id')");
        run(
            "CREATE FUNCTION public.off_to_pong() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO public.off_pong VALUES (OLD.*); RETURN OLD; END $$",
        );
        run(
            "CREATE FUNCTION public.off_to_ping() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO public.off_ping VALUES (OLD.*); RETURN OLD; END $$",
        );
        run("CREATE TRIGGER t AFTER DELETE ON public.off_ping FOR EACH ROW EXECUTE FUNCTION public.off_to_pong()");
        run("CREATE TRIGGER t AFTER DELETE ON public.off_pong FOR EACH ROW EXECUTE FUNCTION public.off_to_ping()");
        tenant("off-ping");
        run("INSERT INTO public.off_ping VALUES ('u1', 'off-ping')");
        run("SELECT pgseal.tenant_offboard('off-ping', '0')");
        exported("off-ping");
        assert_eq!(
            calls_until_refused("SELECT pgseal._offboard_delete('off-ping', 10)", 10),
            1
        );
    }

    #[pg_test]
    fn what_is_written_after_its_step_sends_the_offboarding_back() {
        tenant_data("off-late");
        run("SELECT pgseal.tenant_offboard('off-late', '0')");
        exported("off-late");
        while one::<i64>("SELECT pgseal._offboard_delete('off-late', 10)") > 0 {}
        run("SELECT pgseal._offboard_advance('off-late', 'exported', 'deleted')");
        run("SELECT pgseal.tenant_shred('off-late')");
        run("SELECT pgseal._offboard_advance('off-late', 'deleted', 'shredded')");
        while one::<i64>("SELECT pgseal._offboard_erase('off-late', 10)") > 0 {}
        run("SELECT pgseal._offboard_advance('off-late', 'shredded', 'erased')");
        // The application goes on: a row and a sealed value (a new key).
        run("INSERT INTO public.off_users VALUES ('u9', 'off-late', 'late@example.com', pgseal.vault_seal('late'))");
        let r: pgrx::JsonB = one("SELECT pgseal._offboard_finish('off-late')");
        assert!(r.0.get("redo").is_some(), "{:?}", r.0);
        assert_eq!(step("off-late"), "exported");
        assert!(!events("off-late").contains("tenant.offboarded"));
    }

    #[pg_test]
    fn the_export_reads_every_row_across_its_chunks_in_order() {
        // More rows than one fetch takes (1,000), in a table read after another,
        // and the ledger after every table.
        run("CREATE TABLE public.off_many (id int, tenant_id text NOT NULL, note text)");
        run("SELECT pgseal.subject_register('public.off_many', 'id')");
        tenant_data("off-many");
        run("INSERT INTO public.off_many SELECT g, 'off-many', 'n' || g FROM generate_series(1, 2345) g");
        run(
            "INSERT INTO public.off_many SELECT g, 'off-other', 'x' FROM generate_series(1, 100) g",
        );
        run("SELECT pgseal.tenant_offboard('off-many', '0')");
        run("CREATE TEMP TABLE off_lines AS SELECT n, l::jsonb AS j FROM pgseal._offboard_export('off-many') WITH ORDINALITY AS e(l, n)");
        assert_eq!(
            one::<i64>("SELECT count(DISTINCT j -> 'row' ->> 'id') FROM off_lines WHERE j ->> 'table' = 'public.off_many'"),
            2345
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM off_lines WHERE j ->> 'table' = 'public.off_many'"),
            2345
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM off_lines WHERE j ->> 'table' = 'public.off_users'"),
            2
        );
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM off_lines WHERE j -> 'row' ->> 'tenant_id' <> 'off-many'"
            ),
            0
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM off_lines WHERE j ? 'ledger'"),
            one::<i64>("SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 'off-many'")
        );
        assert!(one::<bool>(
            "SELECT max(n) FILTER (WHERE j ? 'table') < min(n) FILTER (WHERE j ? 'ledger') FROM off_lines"
        ));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM off_lines"),
            2345 + 2
                + one::<i64>("SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 'off-many'")
        );
    }

    #[pg_test]
    fn a_caller_cannot_swap_the_tables_cursor_between_fetches() {
        // The attack on a set-returning export that returns a line a call: called in
        // a select list, the caller's function runs between calls, finds the table's
        // cursor in pg_cursors, closes it and opens its own under that name, which
        // the next fetch would run as the table's owner.
        run("CREATE ROLE off_victim_owner");
        run("CREATE ROLE off_mallory IN ROLE pgseal_admin");
        run("CREATE TABLE public.off_victim (id int, tenant_id text NOT NULL)");
        run("SELECT pgseal.subject_register('public.off_victim', 'id')");
        run("ALTER TABLE public.off_victim OWNER TO off_victim_owner");
        run("GRANT SELECT ON public.off_victim TO off_mallory");
        run("CREATE TABLE public.off_ran (who text)");
        run("GRANT INSERT, SELECT ON public.off_ran TO PUBLIC");
        run(
            "CREATE FUNCTION public.off_payload() RETURNS text LANGUAGE sql VOLATILE \
             AS $$ INSERT INTO public.off_ran VALUES (current_user) RETURNING 'payload' $$",
        );
        run(
            "CREATE FUNCTION public.off_swap(l text) RETURNS text LANGUAGE plpgsql AS $$
             DECLARE n text; c refcursor;
             BEGIN
               SELECT name INTO n FROM pg_cursors WHERE statement LIKE '%AS _pgseal_row%' LIMIT 1;
               IF n IS NOT NULL THEN
                 c := n; CLOSE c;
                 c := n; OPEN c FOR SELECT public.off_payload() FROM generate_series(1, 1000);
               END IF;
               RETURN l;
             END $$",
        );
        tenant("off-victim");
        run("INSERT INTO public.off_victim SELECT g, 'off-victim' FROM generate_series(1, 2500) g");
        run("SELECT pgseal.tenant_offboard('off-victim', '0')");
        run("SET LOCAL ROLE off_mallory");
        run("CREATE TEMP TABLE off_out AS \
             SELECT public.off_swap(pgseal._offboard_export('off-victim')) AS l");
        run("RESET ROLE");
        assert_eq!(
            one::<String>("SELECT coalesce(string_agg(DISTINCT who, ','), '') FROM public.off_ran"),
            "",
            "the caller's function ran inside the export"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM off_out WHERE l = 'payload'"),
            0,
            "lines of the caller's cursor in the export"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM off_out WHERE l LIKE '%\"public.off_victim\"%'"),
            2500,
            "every row exported"
        );
    }

    #[pg_test]
    fn protected_and_registered_tables_are_offboarded_and_no_other() {
        // tenant_protect's tables are offboarded by the column their policy tests
        // (here a varchar `org`, beside a `tenant_id` that is not the tenant's); a
        // table with a policy named like pgseal's but none of pgseal's, and no
        // registration, is not touched; tables with pgseal's policies that cannot
        // be offboarded (org_protect's; tenant_protect's on a uuid column) are
        // named in the receipt and do not stop the offboarding.
        run("CREATE TABLE public.off_unregistered (tenant_id text NOT NULL, note text)");
        run("CREATE POLICY pgseal_lookalike ON public.off_unregistered USING (true)");
        run("CREATE TABLE public.off_protected (org varchar(40) NOT NULL, tenant_id text, note text)");
        run("SELECT pgseal.tenant_protect('public.off_protected', 'org')");
        run("CREATE TABLE public.off_uuid (tenant uuid NOT NULL, note text)");
        run("SELECT pgseal.tenant_protect('public.off_uuid', 'tenant')");
        run("CREATE TABLE public.off_org (tenant_id text NOT NULL, owner_id text, org_id text, note text)");
        run("SELECT pgseal.org_protect('public.off_org', 'owner_id', 'org_id')");
        // As org_protect made it before it added its offboarding policies.
        run("DROP POLICY pgseal_offboard_select ON public.off_org");
        run("DROP POLICY pgseal_offboard_delete ON public.off_org");
        tenant_data("off-only");
        run("INSERT INTO public.off_unregistered VALUES ('off-only', 'kept')");
        run("INSERT INTO public.off_protected VALUES ('off-only', NULL, 'gone 1'), ('off-only', 'x', 'gone 2')");
        tenant("off-other");
        run("INSERT INTO public.off_protected VALUES ('off-other', 'off-only', 'kept: another tenant''s row')");
        tenant("off-only");
        run("SELECT pgseal.tenant_offboard('off-only', '0')");
        let export: String =
            one("SELECT string_agg(l, E'\\n') FROM pgseal._offboard_export('off-only') l");
        assert!(!export.contains("off_unregistered"), "{export}");
        assert_eq!(
            export
                .matches("\"table\": \"public.off_protected\"")
                .count(),
            2,
            "{export}"
        );
        assert!(!export.contains("another tenant"), "{export}");
        run("SELECT pgseal._offboard_advance('off-only', 'scheduled', 'exported', '/x', repeat('a', 64))");
        while one::<i64>("SELECT pgseal._offboard_delete('off-only', 10)") > 0 {}
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.off_unregistered"),
            1
        );
        run("SET LOCAL row_security = off");
        assert_eq!(
            one::<String>("SELECT string_agg(org || '/' || note, ',') FROM public.off_protected"),
            "off-other/kept: another tenant's row"
        );
        run("RESET row_security");
        assert_eq!(
            one::<i64>(
                "SELECT (deleted ->> 'public.off_protected')::int8 FROM pgseal.tenant_offboardings WHERE tenant_id = 'off-only'"
            ),
            2
        );
        run("SELECT pgseal._offboard_advance('off-only', 'exported', 'deleted')");
        run("SELECT pgseal.tenant_shred('off-only')");
        run("SELECT pgseal._offboard_advance('off-only', 'deleted', 'shredded')");
        drain("SELECT pgseal._offboard_erase('off-only', 100)");
        run("SELECT pgseal._offboard_advance('off-only', 'shredded', 'erased')");
        let receipt: pgrx::JsonB = one("SELECT pgseal._offboard_finish('off-only')");
        assert_eq!(
            receipt.0["protected_tables_not_offboarded"],
            serde_json::json!(["public.off_org", "public.off_uuid"]),
            "{}",
            receipt.0
        );
    }

    #[pg_test]
    fn org_protects_tables_are_offboarded_whoever_owns_the_rows() {
        // org_protect's policies show a row to its organisation's members and its
        // user, and bind the table's owner too; the offboarding still finds every
        // row of the tenant, and only inside its own statements.
        run("CREATE ROLE off_org_owner");
        for table in ["off_org2", "off_org3"] {
            run(&format!(
                "CREATE TABLE public.{table} (tenant_id text NOT NULL, owner_id text, org_id text, note text)"
            ));
            run(&format!(
                "ALTER TABLE public.{table} OWNER TO off_org_owner"
            ));
            run(&format!(
                "SELECT pgseal.org_protect('public.{table}', 'owner_id', 'org_id')"
            ));
        }
        tenant("off-org");
        run("INSERT INTO public.off_org2 VALUES ('off-org', 'alice', 'o1', 'a'), ('off-org', 'bob', 'o2', 'b'), \
             ('off-org', NULL, NULL, 'c')");
        tenant("off-org-other");
        run("INSERT INTO public.off_org2 VALUES ('off-org-other', 'alice', 'o1', 'kept')");
        // Outside the offboarding, the owner (as any role) sees no row of another
        // user or organisation, and the offboarding's condition is false.
        run("SELECT pgseal.set_tenant('off-org', 'nobody')");
        run("SET LOCAL ROLE off_org_owner");
        assert_eq!(one::<i64>("SELECT count(*) FROM public.off_org2"), 0);
        assert!(!one::<bool>(
            "SELECT pgseal._offboard_visible('public.off_org2'::regclass)"
        ));
        run("RESET ROLE");
        // A role org_protect's policies bind cannot schedule it (it could not
        // read or delete other users' rows itself), nor carry it out once they
        // bind it.
        run("CREATE ROLE off_org_admin IN ROLE pgseal_admin BYPASSRLS");
        run("GRANT SELECT, DELETE ON public.off_org2, public.off_org3 TO off_org_admin");
        run("CREATE ROLE off_org_bound IN ROLE off_org_admin");
        let message_of = |q: &str| -> String {
            one(&format!(
                "SELECT tests.error_text_of({})",
                pgrx::spi::quote_literal(q)
            ))
        };
        run("SET LOCAL ROLE off_org_bound");
        let schedule = "SELECT pgseal.tenant_offboard('off-org', '0')";
        assert_eq!(sqlstate(schedule), "42501");
        let msg = message_of(schedule);
        assert!(
            msg.contains("org_protect's policies bind the role scheduling the offboarding"),
            "{msg}"
        );
        run("SET LOCAL ROLE off_org_admin");
        run(schedule);
        run("RESET ROLE");
        let q = "SELECT count(*) FROM pgseal._offboard_export('off-org')";
        run("ALTER ROLE off_org_admin NOBYPASSRLS");
        assert_eq!(sqlstate(q), "42501");
        let msg = message_of(q);
        assert!(
            msg.contains("org_protect's policies bind the role that scheduled the offboarding"),
            "{msg}"
        );
        run("ALTER ROLE off_org_admin BYPASSRLS");
        // Each way the owner could make its policies hide a row, or run a third
        // role's code as the owner: the offboarding stops, naming the table.
        run("CREATE ROLE off_third");
        run("CREATE FUNCTION public.off_third_fn() RETURNS boolean LANGUAGE sql AS 'SELECT true'");
        run("ALTER FUNCTION public.off_third_fn() OWNER TO off_third");
        // Reached indirectly: an operator (the table owner's, here the superuser's)
        // over the third role's function, a domain whose check is the third role's,
        // a view of the third role's.
        run("CREATE FUNCTION public.off_third_eq(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true'");
        run("ALTER FUNCTION public.off_third_eq(text, text) OWNER TO off_third");
        run("CREATE OPERATOR public.=== (LEFTARG = text, RIGHTARG = text, FUNCTION = public.off_third_eq)");
        run("CREATE FUNCTION public.off_third_ok(text) RETURNS boolean LANGUAGE sql AS 'SELECT true'");
        run("ALTER FUNCTION public.off_third_ok(text) OWNER TO off_third");
        run("CREATE DOMAIN public.off_third_dom AS text CHECK (public.off_third_ok(VALUE))");
        run("ALTER DOMAIN public.off_third_dom OWNER TO off_third");
        run("CREATE VIEW public.off_third_view AS SELECT public.off_third_fn() AS x");
        run("ALTER VIEW public.off_third_view OWNER TO off_third");
        for way in [
            "CREATE POLICY hide ON public.off_org3 AS RESTRICTIVE USING (note <> 'hidden')",
            "DROP POLICY pgseal_offboard_select ON public.off_org3; \
             CREATE POLICY pgseal_offboard_select ON public.off_org3 FOR SELECT",
            "ALTER POLICY pgseal_tenant_only ON public.off_org3 USING (true)",
            "CREATE POLICY extra ON public.off_org3 USING (true)",
            "ALTER POLICY pgseal_owner ON public.off_org3 USING (public.off_third_fn())",
            "ALTER POLICY pgseal_owner ON public.off_org3 USING (owner_id OPERATOR(public.===) 'x')",
            "ALTER POLICY pgseal_owner ON public.off_org3 USING (note::public.off_third_dom IS NOT NULL)",
            "ALTER POLICY pgseal_owner ON public.off_org3 USING (EXISTS (SELECT 1 FROM public.off_third_view))",
            // A built-in with an effect, run for each row as the owner: it could
            // change the tenant (or on Citus the grant) midway through the export.
            "ALTER POLICY pgseal_owner ON public.off_org3 USING (pg_catalog.set_config('app.tenant_id', 'x', true) IS NULL)",
            // A stable built-in that reads every view of a schema (whose code may
            // call one), named by text.
            "ALTER POLICY pgseal_owner ON public.off_org3 USING (pg_catalog.schema_to_xml('public', false, false, '') IS NOT NULL)",
            // Without the restrictive policy it is taken for org_protect's Citus
            // form, whose offboarding policies test the tenant too: these do not.
            "DROP POLICY pgseal_tenant_only ON public.off_org3",
        ] {
            run(way);
            assert_eq!(sqlstate(q), "55000", "{way}");
            let msg: String = one(&format!(
                "SELECT tests.error_text_of({})",
                pgrx::spi::quote_literal(q)
            ));
            assert!(msg.contains("(table public.off_org3)"), "{way}: {msg}");
            run("SELECT pgseal.org_protect('public.off_org3', 'owner_id', 'org_id')");
            run("DROP POLICY IF EXISTS hide ON public.off_org3");
            run("DROP POLICY IF EXISTS extra ON public.off_org3");
        }
        let export: String =
            one("SELECT string_agg(l, E'\\n') FROM pgseal._offboard_export('off-org') l");
        assert_eq!(
            export.matches("\"table\": \"public.off_org2\"").count(),
            3,
            "{export}"
        );
        assert!(!export.contains("kept"), "{export}");
        run("SELECT pgseal._offboard_advance('off-org', 'scheduled', 'exported', '/x', repeat('a', 64))");
        assert_eq!(drain("SELECT pgseal._offboard_delete('off-org', 2)"), 3);
        run("SELECT pgseal._offboard_advance('off-org', 'exported', 'deleted')");
        run("SET LOCAL row_security = off");
        assert_eq!(
            one::<String>("SELECT string_agg(note, ',') FROM public.off_org2"),
            "kept"
        );
        run("RESET row_security");
        assert!(!one::<bool>(
            "SELECT pgseal._offboard_visible('public.off_org2'::regclass)"
        ));
    }

    #[pg_test]
    fn a_grant_for_a_tables_name_is_refused_while_another_tables_policy_names_it() {
        // org_protect's Citus form names its table by text; a table renamed since
        // keeps its old name in its policy. A role that makes a table of its own
        // under that name (and has it offboarded) would hold the offboarding's grant,
        // or here the backend's flag, for it: its trigger, running as its owner in
        // the offboarding's delete, would read the renamed table's rows.
        run("CREATE ROLE off_dec_owner");
        run("CREATE TABLE public.\"off\\decoy\" (tenant_id text NOT NULL, owner_id text, org_id text, note text)");
        run("ALTER TABLE public.\"off\\decoy\" OWNER TO off_dec_owner");
        run("SELECT pgseal.org_protect('public.\"off\\decoy\"', 'owner_id', 'org_id')");
        run("CREATE TABLE public.off_seen (n bigint)");
        run("GRANT INSERT ON public.off_seen TO off_dec_owner");
        run("CREATE FUNCTION public.off_peek() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN INSERT INTO public.off_seen SELECT count(*) FROM public.off_renamed; RETURN OLD; END $$");
        run("ALTER FUNCTION public.off_peek() OWNER TO off_dec_owner");
        run("CREATE TRIGGER off_peek AFTER DELETE ON public.\"off\\decoy\" FOR EACH ROW EXECUTE FUNCTION public.off_peek()");
        // The renamed table, another role's, with its stale condition (the decoy's
        // name has a backslash, which `pg_get_expr` prints as it is).
        run("CREATE TABLE public.off_renamed (tenant_id text, secret text)");
        run("INSERT INTO public.off_renamed VALUES ('off-dec', 's1'), ('off-dec', 's2')");
        run("ALTER TABLE public.off_renamed ENABLE ROW LEVEL SECURITY");
        run(
            "CREATE POLICY pgseal_offboard_select ON public.off_renamed FOR SELECT \
             USING (pgseal._offboard_visible_in('public.\"off\\decoy\"'))",
        );
        run("GRANT SELECT ON public.off_renamed TO off_dec_owner");
        run("SELECT pgseal.set_tenant('off-dec', 'mallory')");
        run("INSERT INTO public.\"off\\decoy\" VALUES ('off-dec', 'mallory', NULL, 'x')");
        run("CREATE ROLE off_dec_admin IN ROLE pgseal_admin BYPASSRLS");
        run("GRANT SELECT, DELETE ON public.\"off\\decoy\" TO off_dec_admin");
        run("SET LOCAL ROLE off_dec_admin");
        run("SELECT pgseal.tenant_offboard('off-dec', '0')");
        run("RESET ROLE");
        let q = "SELECT count(*) FROM pgseal._offboard_export('off-dec')";
        assert_eq!(sqlstate(q), "55000");
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal(q)
        ));
        assert!(msg.contains("(table off_renamed)"), "{msg}");
        // With the stale condition mended, the offboarding goes on, and the
        // trigger finds no row of the other table.
        run("ALTER POLICY pgseal_offboard_select ON public.off_renamed USING (false)");
        exported("off-dec");
        assert_eq!(drain("SELECT pgseal._offboard_delete('off-dec', 10)"), 1);
        assert_eq!(one::<i64>("SELECT max(n) FROM public.off_seen"), 0);
    }

    #[pg_test]
    fn an_offboarding_runs_no_operator_or_function_found_on_its_callers_path() {
        // The checks before each switch to a table's owner (the stale-name check
        // reads every table's policies) run as the caller, pgseal_admin, with its
        // search_path. A schema earlier on that path than pg_catalog whose
        // operators and functions match pg_catalog's exactly would take over every
        // unqualified one; here each raises.
        run("CREATE ROLE off_ops_owner");
        run("CREATE TABLE public.off_ops (tenant_id text NOT NULL, owner_id text, org_id text, note text)");
        run("ALTER TABLE public.off_ops OWNER TO off_ops_owner");
        run("SELECT pgseal.org_protect('public.off_ops', 'owner_id', 'org_id')");
        run("SELECT pgseal.set_tenant('off-ops', 'mallory')");
        run("INSERT INTO public.off_ops VALUES ('off-ops', 'mallory', NULL, 'x')");
        run("SELECT pgseal.tenant_offboard('off-ops', '0')");
        run("CREATE SCHEMA off_evil");
        run(
            "DO $d$ DECLARE t text; o text; n int := 0; BEGIN \
               FOREACH t IN ARRAY ARRAY['oid', 'name', 'text', '\"char\"', 'int4', 'int8', 'bool'] LOOP \
                 FOREACH o IN ARRAY ARRAY['=', '<>', '<', '>', '<=', '>='] LOOP \
                   n := n + 1; \
                   EXECUTE format('CREATE FUNCTION off_evil.f%s(%s, %s) RETURNS bool LANGUAGE plpgsql \
                     AS $f$ BEGIN RAISE EXCEPTION ''off_evil %s ran''; END $f$', n, t, t, o); \
                   EXECUTE format('CREATE OPERATOR off_evil.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = off_evil.f%s)', o, t, t, n); \
                 END LOOP; \
               END LOOP; END $d$",
        );
        run(
            "CREATE FUNCTION off_evil.cat(text, text) RETURNS text LANGUAGE plpgsql \
             AS $f$ BEGIN RAISE EXCEPTION 'off_evil || ran'; END $f$",
        );
        run("CREATE OPERATOR off_evil.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = off_evil.cat)");
        for f in [
            "replace(text, text, text) RETURNS text",
            "strpos(text, text) RETURNS int",
            "pg_get_expr(pg_node_tree, oid) RETURNS text",
            "starts_with(text, text) RETURNS bool",
        ] {
            run(&format!(
                "CREATE FUNCTION off_evil.{f} LANGUAGE plpgsql AS $f$ BEGIN RAISE EXCEPTION 'off_evil function ran'; END $f$"
            ));
        }
        let planted = |q: &str| {
            run("SET LOCAL search_path = off_evil, pg_catalog, public");
            run(q);
            run("SET LOCAL search_path = public");
        };
        planted("SELECT count(*) FROM pgseal._offboard_export('off-ops')");
        planted(
            "SELECT pgseal._offboard_advance('off-ops', 'scheduled', 'exported', '/x', pg_catalog.repeat('a', 64))",
        );
        planted("SELECT pgseal._offboard_delete('off-ops', 10)");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.off_ops WHERE tenant_id = 'off-ops'"),
            0
        );
    }

    /// Table `public.<table>`, which `tenant_protect` protects by `org`, owned by
    /// role off_pol_owner (made if missing), which its policies bind, with one
    /// row of `t` and its offboarding scheduled.
    fn protected_table(t: &str, table: &str) {
        protected_table_of(t, table, "text");
    }

    /// `protected_table`, its tenant column of type `column_type`.
    fn protected_table_of(t: &str, table: &str, column_type: &str) {
        run("DO $$ BEGIN CREATE ROLE off_pol_owner; EXCEPTION WHEN duplicate_object THEN NULL; END $$");
        run(&format!(
            "CREATE TABLE public.{table} (org {column_type} NOT NULL, note text)"
        ));
        run(&format!(
            "ALTER TABLE public.{table} OWNER TO off_pol_owner"
        ));
        run(&format!(
            "SELECT pgseal.tenant_protect('public.{table}', 'org')"
        ));
        tenant(t);
        run(&format!(
            "INSERT INTO public.{table} VALUES ('{t}', 'hidden')"
        ));
        run(&format!("SELECT pgseal.tenant_offboard('{t}', '0')"));
    }

    #[pg_test]
    fn a_protected_tables_policy_that_could_hide_rows_stops_the_offboarding() {
        // Each way a table's owner (or anyone who can change its policies) could
        // hide the tenant's row from the owner, by whose rights the export, the
        // deletes and the count of rows left run: the export refuses (55000), and
        // nothing is deleted.
        let ways = [
            "ALTER POLICY pgseal_tenant ON public.off_pol USING (false)",
            "ALTER POLICY pgseal_tenant ON public.off_pol USING (org = pgseal.current_tenant() AND note <> 'hidden')",
            "ALTER POLICY pgseal_tenant ON public.off_pol WITH CHECK (true)",
            "ALTER POLICY pgseal_tenant ON public.off_pol TO pgseal_admin",
            "CREATE POLICY hide ON public.off_pol AS RESTRICTIVE USING (note <> 'hidden')",
            "DROP POLICY pgseal_tenant ON public.off_pol; \
             CREATE POLICY pgseal_tenant ON public.off_pol AS RESTRICTIVE USING (org = (SELECT pgseal.current_tenant())) \
             WITH CHECK (org = (SELECT pgseal.current_tenant()))",
            "DROP POLICY pgseal_tenant ON public.off_pol; \
             CREATE POLICY pgseal_tenant ON public.off_pol FOR SELECT USING (org = (SELECT pgseal.current_tenant()))",
            // An operator named like the built-in one, in a schema the owner can
            // write to, whose function could answer anything: it must not pass for
            // tenant_protect's `=`, whatever the search_path.
            "CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = pg_catalog.texteq); \
             SET LOCAL search_path = public, pg_catalog; \
             ALTER POLICY pgseal_tenant ON public.off_pol USING (org OPERATOR(public.=) (SELECT pgseal.current_tenant())) \
             WITH CHECK (org OPERATOR(public.=) (SELECT pgseal.current_tenant()))",
            // The owner exempt (no FORCE), the policy no longer byte for byte: the
            // application would see an 'OFF-POL-…' row as the tenant's.
            "ALTER TABLE public.off_pol NO FORCE ROW LEVEL SECURITY; \
             ALTER POLICY pgseal_tenant ON public.off_pol USING (lower(org) = pgseal.current_tenant())",
        ];
        for (i, way) in ways.iter().enumerate() {
            let t = format!("off-pol-{i}");
            let table = format!("off_pol_{i}");
            protected_table(&t, &table);
            run(&way.replace("public.off_pol", &format!("public.{table}")));
            let q = format!("SELECT count(*) FROM pgseal._offboard_export('{t}')");
            assert_eq!(sqlstate(&q), "55000", "{way}");
            let msg: String = one(&format!(
                "SELECT tests.error_text_of({})",
                pgrx::spi::quote_literal(&q)
            ));
            assert!(
                msg.contains(&format!("(table public.{table})")),
                "{way}: {msg}"
            );
            tenant(&t);
            run("SET LOCAL row_security = off");
            assert_eq!(
                one::<i64>(&format!("SELECT count(*) FROM public.{table}")),
                1
            );
            run("RESET row_security");
            // Until it is fixed, such a table stops every offboarding.
            run(&format!("DROP TABLE public.{table}"));
        }
        // Changed after the export: the count of rows left refuses the step, so
        // no receipt stands over the row.
        protected_table("off-pol-late", "off_pol");
        exported("off-pol-late");
        assert_eq!(
            drain("SELECT pgseal._offboard_delete('off-pol-late', 10)"),
            1
        );
        run("INSERT INTO public.off_pol VALUES ('off-pol-late', 'written after the deletes')");
        run("ALTER POLICY pgseal_tenant ON public.off_pol USING (org = pgseal.current_tenant() AND note <> 'written after the deletes')");
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_advance('off-pol-late', 'exported', 'deleted')"),
            "55000"
        );
        assert_eq!(step("off-pol-late"), "exported");
    }

    #[pg_test]
    fn a_protected_table_re_protected_is_offboarded() {
        // The same table with tenant_protect's policy as it makes it is offboarded
        // (the policies' exact form is recognised on this server's version), on
        // a text and on a varchar column, by an owner the policies bind.
        for (i, column_type) in ["text", "varchar(40)"].iter().enumerate() {
            let t = format!("off-pol-ok-{i}");
            let table = format!("off_pol_ok_{i}");
            protected_table_of(&t, &table, column_type);
            exported(&t);
            assert_eq!(
                drain(&format!("SELECT pgseal._offboard_delete('{t}', 10)")),
                1
            );
            run(&format!(
                "SELECT pgseal._offboard_advance('{t}', 'exported', 'deleted')"
            ));
            assert_eq!(step(&t), "deleted");
            run("SET LOCAL row_security = off");
            assert_eq!(
                one::<i64>(&format!("SELECT count(*) FROM public.{table}")),
                0
            );
            run("RESET row_security");
        }
    }

    #[pg_test]
    fn the_scheduler_needs_delete_on_every_offboarded_table() {
        // An administrator who cannot delete a protected table's rows cannot have
        // them deleted through pgseald's grants (here the superuser's, who holds
        // DELETE) by scheduling the tenant's offboarding.
        run("CREATE ROLE off_sched IN ROLE pgseal_admin");
        run("CREATE TABLE public.off_sched_t (tenant_id text NOT NULL, note text)");
        run("SELECT pgseal.tenant_protect('public.off_sched_t')");
        run("GRANT SELECT ON public.off_sched_t TO off_sched");
        tenant("off-sched-t");
        run("INSERT INTO public.off_sched_t VALUES ('off-sched-t', 'kept')");
        // Told when scheduling.
        run("SET LOCAL ROLE off_sched");
        assert_eq!(
            sqlstate("SELECT pgseal.tenant_offboard('off-sched-t', '0')"),
            "42501"
        );
        run("RESET ROLE");
        // And checked when the deletes run: the grant taken back after scheduling.
        run("GRANT DELETE ON public.off_sched_t TO off_sched");
        run("SET LOCAL ROLE off_sched");
        run("SELECT pgseal.tenant_offboard('off-sched-t', '0')");
        run("RESET ROLE");
        run("REVOKE DELETE ON public.off_sched_t FROM off_sched");
        exported("off-sched-t");
        let q = "SELECT pgseal._offboard_delete('off-sched-t', 10)";
        assert_eq!(sqlstate(q), "42501");
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal(q)
        ));
        assert!(
            msg.contains("scheduled the offboarding needs DELETE on every offboarded table (table public.off_sched_t)"),
            "{msg}"
        );
        run("SET LOCAL row_security = off");
        assert_eq!(one::<i64>("SELECT count(*) FROM public.off_sched_t"), 1);
        run("RESET row_security");
        // Granted, the same offboarding goes on.
        run("GRANT DELETE ON public.off_sched_t TO off_sched");
        assert_eq!(one::<i64>(q), 1);
    }

    #[pg_test]
    fn policies_that_bind_the_scheduler_alone_stop_the_offboarding() {
        // The owner is exempt from row-level security (a superuser), the scheduler
        // is not: a policy that keeps it from a row must not let the owner's
        // statements delete that row on its behalf.
        run("CREATE ROLE off_sched2 IN ROLE pgseal_admin");
        run("CREATE TABLE public.off_sched2_t (id text, tenant_id text NOT NULL, note text)");
        run("SELECT pgseal.subject_register('public.off_sched2_t', 'id')");
        run("GRANT SELECT, DELETE ON public.off_sched2_t TO off_sched2");
        run("ALTER TABLE public.off_sched2_t ENABLE ROW LEVEL SECURITY");
        run("CREATE POLICY not_that_one ON public.off_sched2_t TO off_sched2 USING (note <> 'not yours')");
        tenant("off-sched2");
        run("INSERT INTO public.off_sched2_t VALUES ('u1', 'off-sched2', 'not yours')");
        run("SET LOCAL ROLE off_sched2");
        run("SELECT pgseal.tenant_offboard('off-sched2', '0')");
        run("RESET ROLE");
        let q = "SELECT count(*) FROM pgseal._offboard_export('off-sched2')";
        assert_eq!(sqlstate(q), "55000");
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal(q)
        ));
        assert!(
            msg.contains(
                "binds an offboarded table's owner or the role that scheduled the offboarding"
            ) && msg.contains("(table public.off_sched2_t)"),
            "{msg}"
        );
    }

    #[pg_test]
    fn a_protected_partition_or_child_is_offboarded_once_through_its_highest_protected_table() {
        // A partition protected under a root nobody protected or registered is
        // offboarded on its own; an inheritance child of a protected parent (which
        // tenant_protect protects too) only through the parent, so its rows are
        // exported once.
        run("CREATE TABLE public.off_ev (tenant_id text NOT NULL, k int) PARTITION BY LIST (k)");
        run("CREATE TABLE public.off_ev1 PARTITION OF public.off_ev FOR VALUES IN (1)");
        run("SELECT pgseal.tenant_protect('public.off_ev1')");
        run("CREATE TABLE public.off_par (tenant_id text NOT NULL, note text)");
        run("CREATE TABLE public.off_kid (extra int) INHERITS (public.off_par)");
        run("SELECT pgseal.tenant_protect('public.off_par')");
        tenant("off-tree");
        run("INSERT INTO public.off_ev VALUES ('off-tree', 1)");
        run("INSERT INTO public.off_kid VALUES ('off-tree', 'in the child', 7)");
        run("SELECT pgseal.tenant_offboard('off-tree', '0')");
        let export: String =
            one("SELECT string_agg(l, E'\\n') FROM pgseal._offboard_export('off-tree') l");
        assert_eq!(export.matches("in the child").count(), 1, "{export}");
        assert_eq!(
            export.matches("\"table\": \"public.off_ev1\"").count(),
            1,
            "{export}"
        );
        run("SELECT pgseal._offboard_advance('off-tree', 'scheduled', 'exported', '/x', repeat('a', 64))");
        assert_eq!(drain("SELECT pgseal._offboard_delete('off-tree', 10)"), 2);
        run("SELECT pgseal._offboard_advance('off-tree', 'exported', 'deleted')");
        // A partition protected on another column than its protected root: its
        // application sees rows as the tenant's that the root's column does not
        // find; the offboarding stops, naming the partition.
        run("CREATE TABLE public.off_ev2 (tenant_id text NOT NULL, org text, k int) PARTITION BY LIST (k)");
        run("CREATE TABLE public.off_ev21 PARTITION OF public.off_ev2 FOR VALUES IN (1)");
        run("SELECT pgseal.tenant_protect('public.off_ev2')");
        run("SELECT pgseal.tenant_protect('public.off_ev21', 'org')");
        tenant("off-tree2");
        run("INSERT INTO public.off_ev2 VALUES ('someone else', 'off-tree2', 1)");
        run("SELECT pgseal.tenant_offboard('off-tree2', '0')");
        let q = "SELECT count(*) FROM pgseal._offboard_export('off-tree2')";
        assert_eq!(sqlstate(q), "55000");
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal(q)
        ));
        assert!(msg.contains("(table public.off_ev21)"), "{msg}");
        // The same column and conditions, but for UPDATE only: stopped too.
        run("DROP TABLE public.off_ev2");
        run("CREATE TABLE public.off_ev3 (tenant_id text NOT NULL, k int) PARTITION BY LIST (k)");
        run("CREATE TABLE public.off_ev31 PARTITION OF public.off_ev3 FOR VALUES IN (1)");
        run("SELECT pgseal.tenant_protect('public.off_ev3')");
        run("DROP POLICY pgseal_tenant ON public.off_ev31");
        run("CREATE POLICY pgseal_tenant ON public.off_ev31 FOR UPDATE USING (tenant_id = (SELECT pgseal.current_tenant())) \
             WITH CHECK (tenant_id = (SELECT pgseal.current_tenant()))");
        assert_eq!(sqlstate(q), "55000");
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal(q)
        ));
        assert!(msg.contains("(table public.off_ev31)"), "{msg}");
    }

    #[pg_test]
    fn a_table_owners_trigger_cannot_schedule_an_offboarding_through_a_step() {
        // A trigger of an offboarded table runs as its owner while a step deletes;
        // the offboarding functions refuse to run there (they would record
        // pgseald's session as the one that asked).
        tenant_data("off-trig");
        run(
            "CREATE FUNCTION public.off_schedules() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pgseal.tenant_offboard('off-bystander', '0'); RETURN OLD; END $$",
        );
        run("CREATE TRIGGER off_schedules AFTER DELETE ON public.off_users FOR EACH ROW EXECUTE FUNCTION public.off_schedules()");
        run("SELECT pgseal.tenant_offboard('off-trig', '0')");
        exported("off-trig");
        let q = "SELECT pgseal._offboard_delete('off-trig', 10)";
        assert_eq!(sqlstate(q), "42501");
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal(q)
        ));
        assert!(
            msg.contains("cannot be called from a table owner's code that pgseal runs"),
            "{msg}"
        );
    }

    #[pg_test]
    fn a_tenant_column_whose_collation_is_not_deterministic_stops_the_offboarding() {
        // Under a case-insensitive collation the policy shows tenant 'off-ci' the
        // row of 'OFF-CI' too, which no byte-for-byte statement would find. Where
        // the server has no ICU (no such collation can be made) there is nothing
        // to refuse.
        if sqlstate("CREATE COLLATION public.off_ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
            != "00000"
        {
            assert!(!one::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_collation WHERE NOT collisdeterministic)"
            ));
            return;
        }
        run("CREATE TABLE public.off_ci_t (tenant_id text COLLATE public.off_ci NOT NULL, note text)");
        run("SELECT pgseal.tenant_protect('public.off_ci_t')");
        tenant("off-ci");
        run("INSERT INTO public.off_ci_t VALUES ('OFF-CI', 'the tenant sees it')");
        run("SELECT pgseal.tenant_offboard('off-ci', '0')");
        assert_eq!(
            sqlstate("SELECT count(*) FROM pgseal._offboard_export('off-ci')"),
            "55000"
        );
    }

    #[pg_test]
    fn a_table_owners_planner_code_never_runs_as_the_extension_owner() {
        // Planning a query on a table runs the expressions of its extended
        // statistics as whoever plans it: the count of rows left must be planned as
        // the table's owner.
        owner_trap("off_owner", "off");
        run("CREATE TABLE public.off_stats (id text, tenant_id text NOT NULL)");
        run("SELECT pgseal.subject_register('public.off_stats', 'id')");
        owner_trap_statistic("off_owner", "off", "public.off_stats");
        tenant("off-stats");
        run("SELECT pgseal.tenant_offboard('off-stats', '0')");
        exported("off-stats");
        run("TRUNCATE public.off_seen");
        run("SELECT pgseal._offboard_advance('off-stats', 'exported', 'deleted')");
        assert_eq!(owner_trap_ran_as("off"), "off_owner");
    }

    #[pg_test]
    fn the_keyed_deletes_run_a_table_owners_code_only_as_that_owner() {
        // The deletes plan their digest and their keyed DELETE on a table holding
        // the tenant's rows, and the DELETE fires the table's triggers: a planted
        // statistic expression and a delete trigger must both run as the table's
        // owner, never as the extension owner the step functions switch to.
        owner_trap("off_del_owner", "off_del");
        run("CREATE TABLE public.off_del (id text, tenant_id text NOT NULL)");
        run("SELECT pgseal.subject_register('public.off_del', 'id')");
        owner_trap_statistic("off_del_owner", "off_del", "public.off_del");
        run(
            "CREATE FUNCTION public.off_del_trg() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM public.off_del_note(); RETURN OLD; END $$",
        );
        run("ALTER FUNCTION public.off_del_trg() OWNER TO off_del_owner");
        run("CREATE TRIGGER off_del_t BEFORE DELETE ON public.off_del FOR EACH ROW EXECUTE FUNCTION public.off_del_trg()");
        tenant("off-del");
        run("INSERT INTO public.off_del SELECT 'u' || g, 'off-del' FROM generate_series(1, 25) g");
        run("SELECT pgseal.tenant_offboard('off-del', '0')");
        exported("off-del");
        run("TRUNCATE public.off_del_seen");
        assert_eq!(drain("SELECT pgseal._offboard_delete('off-del', 10)"), 25);
        // The trigger ran once a row, each time as the owner; nothing else ran it.
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.off_del_seen WHERE who = 'off_del_owner'"),
            one::<i64>("SELECT count(*) FROM public.off_del_seen")
        );
        assert!(one::<i64>("SELECT count(*) FROM public.off_del_seen") >= 25);
        assert_eq!(owner_trap_ran_as("off_del"), "off_del_owner");
        run("SELECT pgseal._offboard_advance('off-del', 'exported', 'deleted')");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.off_del WHERE tenant_id = 'off-del'"),
            0
        );
    }

    #[pg_test]
    fn the_export_never_runs_a_column_types_json_cast() {
        owner_trap("off_typer", "off_jc");
        owner_trap_json_cast("off_typer", "off_jc");
        run("CREATE ROLE off_jc_owner");
        run("CREATE TABLE public.off_jc (id text, tenant_id text NOT NULL, mood public.off_jc_mood)");
        run("ALTER TABLE public.off_jc OWNER TO off_jc_owner");
        run("SELECT pgseal.subject_register('public.off_jc', 'id')");
        tenant("off-jc");
        run("INSERT INTO public.off_jc VALUES ('u1', 'off-jc', 'calm')");
        run("SELECT pg_catalog.to_jsonb(j) FROM public.off_jc j");
        assert_ne!(owner_trap_ran_as("off_jc"), "");
        run("TRUNCATE public.off_jc_seen");
        run("SELECT pgseal.tenant_offboard('off-jc', '0')");
        let line: String =
            one("SELECT l FROM pgseal._offboard_export('off-jc') l WHERE l::jsonb ? 'table'");
        assert_eq!(owner_trap_ran_as("off_jc"), "");
        let line: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(line["row"]["mood"], "calm");
        assert_eq!(line["table"], "public.off_jc");
    }

    #[pg_test]
    fn the_statements_need_the_tenants_own_context() {
        tenant_data("off-ctx");
        run("SELECT pgseal.tenant_offboard('off-ctx', '0')");
        tenant("someone-else");
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_export('off-ctx')"),
            "22023"
        );
        tenant("off-ctx");
        exported("off-ctx");
        tenant("someone-else");
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_delete('off-ctx', 5)"),
            "22023"
        );
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_advance('off-ctx', 'exported', 'deleted')"),
            "22023"
        );
    }

    #[pg_test]
    fn the_export_step_needs_the_export_read() {
        tenant_data("off-unread");
        run("SELECT pgseal.tenant_offboard('off-unread', '0')");
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_advance('off-unread', 'scheduled', 'exported', '/x', repeat('a', 64))"),
            "55000"
        );
        // An export that failed (rolled back) recorded nothing either.
        assert_eq!(
            sqlstate("SELECT count(*) / 0 FROM pgseal._offboard_export('off-unread')"),
            "22012"
        );
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_advance('off-unread', 'scheduled', 'exported', '/x', repeat('a', 64))"),
            "55000"
        );
        exported("off-unread");
        assert_eq!(step("off-unread"), "exported");
    }

    #[pg_test]
    fn a_table_registered_after_the_export_is_never_deleted_from_unexported() {
        // An administrator registers a table holding the tenant's rows after the
        // export was written: before any row is deleted, the offboarding goes back
        // to exporting, and the next export holds the table's rows.
        tenant_data("off-reg");
        run("CREATE TABLE public.off_late_reg (id text, tenant_id text NOT NULL, note text)");
        run("INSERT INTO public.off_late_reg VALUES ('u1', 'off-reg', 'not in the export')");
        run("SELECT pgseal.tenant_offboard('off-reg', '0')");
        exported("off-reg");
        run("SELECT pgseal.subject_register('public.off_late_reg', 'id')");
        assert_eq!(
            one::<i64>("SELECT pgseal._offboard_delete('off-reg', 10)"),
            0
        );
        assert_eq!(step("off-reg"), "scheduled");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.off_users WHERE tenant_id = 'off-reg'"),
            2
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM public.off_late_reg"), 1);
        let export: String =
            one("SELECT string_agg(l, E'\\n') FROM pgseal._offboard_export('off-reg') l");
        assert!(export.contains("not in the export"), "{export}");
        run("SELECT pgseal._offboard_advance('off-reg', 'scheduled', 'exported', '/x', repeat('a', 64))");
        let n = drain("SELECT pgseal._offboard_delete('off-reg', 10)");
        assert_eq!(n, 3);
        run("SELECT pgseal._offboard_advance('off-reg', 'exported', 'deleted')");

        // Once rows were deleted, a new export would no longer hold them: a table
        // registered then stops the offboarding, its rows kept, and it is named.
        more_tenant_data("off-reg2");
        run("INSERT INTO public.off_late_reg VALUES ('u1', 'off-reg2', 'kept')");
        run("CREATE TABLE public.off_late_reg2 (id text, tenant_id text NOT NULL)");
        run("INSERT INTO public.off_late_reg2 VALUES ('u1', 'off-reg2')");
        run("SELECT pgseal.tenant_offboard('off-reg2', '0')");
        exported("off-reg2");
        assert!(one::<i64>("SELECT pgseal._offboard_delete('off-reg2', 1)") > 0);
        run("SELECT pgseal.subject_register('public.off_late_reg2', 'id')");
        // The rows the export held go; the late table's stop the deletes.
        let q = "SELECT pgseal._offboard_delete('off-reg2', 10)";
        assert_eq!(calls_until_refused(q, 5), 1);
        assert_eq!(sqlstate(q), "55000");
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal(q)
        ));
        assert!(msg.contains("(table public.off_late_reg2)"), "{msg}");
        assert_eq!(one::<i64>("SELECT count(*) FROM public.off_late_reg2"), 1);
        assert_eq!(step("off-reg2"), "exported");
        // The administrator takes the rows out; the offboarding goes on.
        run("DELETE FROM public.off_late_reg2");
        while one::<i64>("SELECT pgseal._offboard_delete('off-reg2', 10)") > 0 {}
        run("SELECT pgseal._offboard_advance('off-reg2', 'exported', 'deleted')");

        // A table registered after the export with none of the tenant's rows does
        // not stop it.
        more_tenant_data("off-reg3");
        run("SELECT pgseal.tenant_offboard('off-reg3', '0')");
        exported("off-reg3");
        run("CREATE TABLE public.off_late_reg3 (id text, tenant_id text NOT NULL)");
        run("INSERT INTO public.off_late_reg3 VALUES ('u1', 'someone-else')");
        run("SELECT pgseal.subject_register('public.off_late_reg3', 'id')");
        let n = drain("SELECT pgseal._offboard_delete('off-reg3', 10)");
        assert_eq!(n, 2);
        run("SELECT pgseal._offboard_advance('off-reg3', 'exported', 'deleted')");
        // A dropped table leaves the export's tables (its OID could name another
        // table later).
        assert!(one::<bool>(
            "SELECT 'public.off_late_reg'::regclass = ANY (export_tables) FROM pgseal.tenant_offboardings WHERE tenant_id = 'off-reg3'"
        ));
        let oid: pg_sys::Oid = one("SELECT 'public.off_late_reg'::regclass::oid");
        run("DROP TABLE public.off_late_reg");
        assert!(!one::<bool>(&format!(
            "SELECT {} = ANY (export_tables::oid[]) FROM pgseal.tenant_offboardings WHERE tenant_id = 'off-reg3'",
            oid.to_u32()
        )));
        assert!(one::<bool>(
            "SELECT 'public.off_users'::regclass = ANY (export_tables) FROM pgseal.tenant_offboardings WHERE tenant_id = 'off-reg3'"
        ));
    }

    #[pg_test]
    fn a_partition_attached_after_the_export_is_never_deleted_from_unexported() {
        run("CREATE TABLE public.off_ev (id text, tenant_id text NOT NULL, at date NOT NULL) PARTITION BY RANGE (at)");
        run("CREATE TABLE public.off_ev_2026 PARTITION OF public.off_ev FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')");
        run("SELECT pgseal.subject_register('public.off_ev', 'id')");
        tenant("off-att");
        run("INSERT INTO public.off_ev VALUES ('u1', 'off-att', '2026-05-01')");
        run("SELECT pgseal.tenant_offboard('off-att', '0')");
        exported("off-att");
        assert!(one::<i64>("SELECT pgseal._offboard_delete('off-att', 1)") > 0);
        run("CREATE TABLE public.off_ev_2023 (id text, tenant_id text NOT NULL, at date NOT NULL)");
        run("INSERT INTO public.off_ev_2023 VALUES ('old', 'off-att', '2023-05-01')");
        run("ALTER TABLE public.off_ev ATTACH PARTITION public.off_ev_2023 FOR VALUES FROM ('2023-01-01') TO ('2024-01-01')");
        let q = "SELECT pgseal._offboard_delete('off-att', 10)";
        assert_eq!(sqlstate(q), "55000");
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal(q)
        ));
        assert!(msg.contains("(table public.off_ev_2023)"), "{msg}");
        assert_eq!(one::<i64>("SELECT count(*) FROM public.off_ev_2023"), 1);
    }

    #[pg_test]
    fn a_row_an_index_misses_is_exported_before_it_is_deleted() {
        // An index that misses a row (here made so by hand; in life a collation
        // whose order changed under it): the plain-table deletes walk the table and
        // take the row, so the export must read it the same way.
        run("CREATE TABLE public.off_idx (id text, tenant_id text NOT NULL)");
        run("CREATE INDEX off_idx_t ON public.off_idx (tenant_id)");
        run("SELECT pgseal.subject_register('public.off_idx', 'id')");
        tenant("off-idx");
        run("INSERT INTO public.off_idx SELECT 'u' || g, 'off-idx' FROM generate_series(1, 5) g");
        run("UPDATE pg_index SET indisready = false WHERE indexrelid = 'public.off_idx_t'::regclass");
        run("INSERT INTO public.off_idx VALUES ('unindexed', 'off-idx')");
        run(
            "UPDATE pg_index SET indisready = true WHERE indexrelid = 'public.off_idx_t'::regclass",
        );
        run("SET LOCAL enable_seqscan = off");
        run("SET LOCAL enable_bitmapscan = off");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.off_idx WHERE tenant_id = 'off-idx'"),
            5,
            "the index misses the row"
        );
        run("SELECT pgseal.tenant_offboard('off-idx', '0')");
        let export: String =
            one("SELECT string_agg(l, E'\\n') FROM pgseal._offboard_export('off-idx') l");
        assert!(export.contains("unindexed"), "{export}");
    }

    #[pg_test]
    fn rows_written_after_the_export_send_it_back_before_anything_is_deleted() {
        tenant_data("off-after");
        run("SELECT pgseal.tenant_offboard('off-after', '0')");
        exported("off-after");
        run("INSERT INTO public.off_users VALUES ('u3', 'off-after', 'late@example.com', NULL)");
        assert_eq!(
            one::<i64>("SELECT pgseal._offboard_delete('off-after', 10)"),
            0
        );
        assert_eq!(step("off-after"), "scheduled");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.off_users WHERE tenant_id = 'off-after'"),
            3
        );
        let export: String =
            one("SELECT string_agg(l, E'\\n') FROM pgseal._offboard_export('off-after') l");
        assert!(export.contains("late@example.com"), "{export}");
        run("SELECT pgseal._offboard_advance('off-after', 'scheduled', 'exported', '/x', repeat('a', 64))");
        // More rows again after exporting again: exported again (pgseald does so at
        // most three times a run).
        run("INSERT INTO public.off_users VALUES ('u4', 'off-after', 'later@example.com', NULL)");
        assert_eq!(
            one::<i64>("SELECT pgseal._offboard_delete('off-after', 10)"),
            0
        );
        assert_eq!(step("off-after"), "scheduled");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.off_users WHERE tenant_id = 'off-after'"),
            4
        );
    }

    #[pg_test]
    fn a_row_changed_after_the_export_is_never_deleted_unexported() {
        // Before any row is deleted, a changed row sends the offboarding back to
        // exporting, and the next export holds the new value.
        tenant_data("off-chg");
        run("SELECT pgseal.tenant_offboard('off-chg', '0')");
        exported("off-chg");
        run("UPDATE public.off_users SET email = 'new@example.com' WHERE tenant_id = 'off-chg' AND id = 'u2'");
        assert_eq!(
            one::<i64>("SELECT pgseal._offboard_delete('off-chg', 10)"),
            0
        );
        assert_eq!(step("off-chg"), "scheduled");
        let export: String =
            one("SELECT string_agg(l, E'\\n') FROM pgseal._offboard_export('off-chg') l");
        assert!(export.contains("new@example.com"), "{export}");
        run("SELECT pgseal._offboard_advance('off-chg', 'scheduled', 'exported', '/x', repeat('a', 64))");
        // Once a row was deleted: a row changed, one deleted and put back as it
        // was, and one moved (the same values in a new place) are all kept, and the
        // deletes stop naming the table.
        run("INSERT INTO public.off_users SELECT 'm' || g, 'off-chg', NULL, NULL FROM generate_series(1, 4) g");
        exported_again("off-chg");
        assert_eq!(
            one::<i64>("SELECT pgseal._offboard_delete('off-chg', 1)"),
            1
        );
        run("UPDATE public.off_users SET email = 'newer@example.com' WHERE tenant_id = 'off-chg' AND id = 'u2'");
        run("DELETE FROM public.off_users WHERE tenant_id = 'off-chg' AND id = 'm1'");
        run("INSERT INTO public.off_users VALUES ('m1', 'off-chg', NULL, NULL)");
        run("UPDATE public.off_users SET id = id WHERE tenant_id = 'off-chg' AND id = 'm2'");
        let q = "SELECT pgseal._offboard_delete('off-chg', 10)";
        assert_eq!(calls_until_refused(q, 5), 1);
        assert_eq!(
            one::<String>(
                "SELECT string_agg(id || ':' || coalesce(email, ''), ',' ORDER BY id) FROM public.off_users WHERE tenant_id = 'off-chg'"
            ),
            "m1:,m2:,u2:newer@example.com"
        );
        assert_eq!(step("off-chg"), "exported");
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_advance('off-chg', 'exported', 'deleted')"),
            "55000"
        );
    }

    /// The export step again at step 'exported' as pgseald would take it after
    /// going back: the deletes sent it back first (rows written since).
    fn exported_again(t: &str) {
        assert_eq!(
            one::<i64>(&format!(
                "SELECT pgseal._offboard_delete({}, 10)",
                pgrx::spi::quote_literal(t)
            )),
            0
        );
        assert_eq!(step(t), "scheduled");
        exported(t);
    }

    #[pg_test]
    fn a_forged_or_stale_key_deletes_nothing() {
        // The keys are the extension owner's: nobody else may write them, and a key
        // whose row is gone, moved or of another tenant matches no row.
        tenant_data("off-keys");
        run("SELECT pgseal.tenant_offboard('off-keys', '0')");
        exported("off-keys");
        for sql in [
            "INSERT INTO pgseal.offboard_export_rows (tenant_id, chunk, root, keys) VALUES ('off-keys', 99, 'public.off_users'::regclass, '{}')",
            "DELETE FROM pgseal.offboard_export_rows",
            "UPDATE pgseal.offboard_export_rows SET keys = '{}'",
        ] {
            run("SET LOCAL ROLE pgseal_admin");
            assert_eq!(sqlstate(sql), "42501", "{sql}");
            run("RESET ROLE");
        }
        // The bystander's row, under off-keys' key list once the deletes began:
        // another tenant's row at an exported place is never taken.
        assert_eq!(
            one::<i64>("SELECT pgseal._offboard_delete('off-keys', 1)"),
            1
        );
        run(
            "UPDATE pgseal.offboard_export_rows SET keys = keys || ARRAY(SELECT pgseal._offboard_row_key(x.tableoid, x.ctid, x.xmin) \
               FROM public.off_users x WHERE x.tenant_id = 'off-bystander') WHERE tenant_id = 'off-keys'",
        );
        let n = 1 + drain("SELECT pgseal._offboard_delete('off-keys', 10)");
        assert_eq!(n, 2);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.off_users WHERE tenant_id = 'off-bystander'"),
            1
        );
        run("SELECT pgseal._offboard_advance('off-keys', 'exported', 'deleted')");
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM pgseal.offboard_export_rows WHERE tenant_id = 'off-keys'"
            ),
            0
        );
    }

    #[pg_test]
    fn referencing_rows_go_first_and_a_batch_that_changes_others_is_undone() {
        // A child table that sorts after its parent, with ON DELETE CASCADE, a tree
        // with ON DELETE SET NULL, and a table whose NO ACTION key references a row
        // that lies after the row referencing it: the deletes take the child table
        // first and each self-referencing table in one statement, so no key acts
        // or refuses.
        run("CREATE TABLE public.off_a_parent (id int PRIMARY KEY, tenant_id text NOT NULL)");
        run(
            "CREATE TABLE public.off_b_child (parent int REFERENCES public.off_a_parent ON DELETE CASCADE, \
             tenant_id text NOT NULL, note text)",
        );
        run(
            "CREATE TABLE public.off_c_tree (id text PRIMARY KEY, tenant_id text NOT NULL, \
             up text REFERENCES public.off_c_tree ON DELETE SET NULL)",
        );
        // (the child's name sorts after its parent's)
        run("ALTER TABLE public.off_b_child RENAME TO off_z_child");
        run(
            "CREATE TABLE public.off_d_self (id text PRIMARY KEY, tenant_id text NOT NULL, \
             up text REFERENCES public.off_d_self, note text)",
        );
        for t in ["off_a_parent", "off_z_child", "off_c_tree", "off_d_self"] {
            run(&format!(
                "SELECT pgseal.subject_register('public.{t}', 'tenant_id')"
            ));
        }
        tenant("off-fk");
        run("INSERT INTO public.off_a_parent SELECT g, 'off-fk' FROM generate_series(1, 5) g");
        run("INSERT INTO public.off_z_child SELECT g, 'off-fk', 'n' || g FROM generate_series(1, 5) g");
        run("INSERT INTO public.off_c_tree SELECT 't' || g, 'off-fk', CASE WHEN g > 1 THEN 't' || (g / 2) END \
             FROM generate_series(1, 9) g");
        run("INSERT INTO public.off_d_self VALUES ('p', 'off-fk', NULL, 'first'), ('c', 'off-fk', 'p', NULL)");
        run("UPDATE public.off_d_self SET note = 'moved after its child' WHERE id = 'p'");
        assert!(one::<bool>(
            "SELECT (SELECT ctid FROM public.off_d_self WHERE id = 'p') > (SELECT ctid FROM public.off_d_self WHERE id = 'c')"
        ));
        run("SELECT pgseal.tenant_offboard('off-fk', '0')");
        exported("off-fk");
        let n = drain("SELECT pgseal._offboard_delete('off-fk', 2)");
        assert_eq!(n, 21);
        run("SELECT pgseal._offboard_advance('off-fk', 'exported', 'deleted')");
        let deleted: pgrx::JsonB =
            one("SELECT deleted FROM pgseal.tenant_offboardings WHERE tenant_id = 'off-fk'");
        assert_eq!(deleted.0["public.off_z_child"], 5, "{:?}", deleted.0);
        assert_eq!(deleted.0["public.off_a_parent"], 5, "{:?}", deleted.0);
        assert_eq!(deleted.0["public.off_c_tree"], 9, "{:?}", deleted.0);
        assert_eq!(deleted.0["public.off_d_self"], 2, "{:?}", deleted.0);

        // A trigger that counts down another offboarded row (one the deletes take
        // after the parents): the batch that would change it is undone and
        // refused, naming that table.
        run("CREATE TABLE public.off_zz_counts (tenant_id text PRIMARY KEY, n int)");
        run("SELECT pgseal.subject_register('public.off_zz_counts', 'tenant_id')");
        run(
            "CREATE FUNCTION public.off_count_down() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN UPDATE public.off_zz_counts SET n = n - 1 WHERE tenant_id = OLD.tenant_id; RETURN OLD; END $$",
        );
        run("CREATE TRIGGER count_down AFTER DELETE ON public.off_a_parent FOR EACH ROW EXECUTE FUNCTION public.off_count_down()");
        tenant("off-cnt");
        run("INSERT INTO public.off_a_parent SELECT g, 'off-cnt' FROM generate_series(11, 13) g");
        run("INSERT INTO public.off_zz_counts VALUES ('off-cnt', 3)");
        run("SELECT pgseal.tenant_offboard('off-cnt', '0')");
        exported("off-cnt");
        let q = "SELECT pgseal._offboard_delete('off-cnt', 10)";
        assert_eq!(sqlstate(q), "55000");
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal(q)
        ));
        assert!(
            msg.contains("changed or deleted other rows")
                && msg.contains("(table public.off_zz_counts)"),
            "{msg}"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.off_a_parent WHERE tenant_id = 'off-cnt'"),
            3
        );
        assert_eq!(
            one::<i32>("SELECT n FROM public.off_zz_counts WHERE tenant_id = 'off-cnt'"),
            3
        );
    }

    #[pg_test]
    fn a_cascade_into_a_table_without_tenant_id_goes_with_its_rows() {
        // Such a table cannot be registered: its rows go with the rows they
        // reference, as its key says, and the offboarding is not stopped.
        tenant_data("off-lines");
        run("ALTER TABLE public.off_users ADD PRIMARY KEY (tenant_id, id)");
        run(
            "CREATE TABLE public.off_lines (owner_tenant text, owner_id text, \
             FOREIGN KEY (owner_tenant, owner_id) REFERENCES public.off_users ON DELETE CASCADE)",
        );
        run("INSERT INTO public.off_lines VALUES ('off-lines', 'u1'), ('off-bystander', 'u1')");
        run("SELECT pgseal.tenant_offboard('off-lines', '0')");
        exported("off-lines");
        while one::<i64>("SELECT pgseal._offboard_delete('off-lines', 10)") > 0 {}
        run("SELECT pgseal._offboard_advance('off-lines', 'exported', 'deleted')");
        assert_eq!(
            one::<String>("SELECT string_agg(owner_tenant, ',') FROM public.off_lines"),
            "off-bystander"
        );
    }

    #[pg_test]
    fn a_cascade_into_an_unregistered_table_stops_the_deletes() {
        tenant_data("off-casc");
        run("ALTER TABLE public.off_users ADD PRIMARY KEY (tenant_id, id)");
        run(
            "CREATE TABLE public.off_notes (tenant_id text NOT NULL, user_id text, note text, \
             FOREIGN KEY (tenant_id, user_id) REFERENCES public.off_users ON DELETE CASCADE)",
        );
        run("INSERT INTO public.off_notes VALUES ('off-casc', 'u1', 'not in the export')");
        run("SELECT pgseal.tenant_offboard('off-casc', '0')");
        exported("off-casc");
        let q = "SELECT pgseal._offboard_delete('off-casc', 10)";
        assert_eq!(sqlstate(q), "55000");
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal(q)
        ));
        assert!(
            msg.contains("ON DELETE CASCADE") && msg.contains("(table public.off_notes)"),
            "{msg}"
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM public.off_notes"), 1);
        // Registered, it is a late table with the tenant's rows: exported first.
        run("SELECT pgseal.subject_register('public.off_notes', 'user_id')");
        assert_eq!(one::<i64>(q), 0);
        assert_eq!(step("off-casc"), "scheduled");
    }

    #[pg_test]
    fn a_cascade_through_a_table_without_tenant_id_stops_the_deletes() {
        // off_users → off_mid (no tenant_id, not offboarded) → off_deep (has
        // tenant_id, could be registered): deleting a user would take off_deep's
        // rows unexported, two keys away.
        tenant_data("off-deep");
        run("ALTER TABLE public.off_users ADD PRIMARY KEY (tenant_id, id)");
        run(
            "CREATE TABLE public.off_mid (id int PRIMARY KEY, owner_tenant text, owner_id text, \
             FOREIGN KEY (owner_tenant, owner_id) REFERENCES public.off_users ON DELETE CASCADE)",
        );
        run(
            "CREATE TABLE public.off_deep (tenant_id text NOT NULL, mid int REFERENCES public.off_mid ON DELETE CASCADE, note text)",
        );
        run("INSERT INTO public.off_mid VALUES (1, 'off-deep', 'u1')");
        run("INSERT INTO public.off_deep VALUES ('off-deep', 1, 'not in the export')");
        run("SELECT pgseal.tenant_offboard('off-deep', '0')");
        exported("off-deep");
        let q = "SELECT pgseal._offboard_delete('off-deep', 10)";
        assert_eq!(sqlstate(q), "55000");
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal(q)
        ));
        assert!(msg.contains("(table public.off_deep)"), "{msg}");
        assert_eq!(one::<i64>("SELECT count(*) FROM public.off_deep"), 1);
    }

    #[pg_test]
    fn past_its_export_an_offboarding_never_exports_again() {
        // A tenant with no rows went through every step; a table registered then
        // with its rows must not send it back to exporting, which would write a
        // new export over the first (whose ledger lines still had their payloads).
        run("CREATE TABLE public.off_none (id text, tenant_id text NOT NULL)");
        run("SELECT pgseal.subject_register('public.off_none', 'id')");
        tenant("off-past");
        run("SELECT pgseal.ledger_append('order.paid', '{\"n\": 1}')");
        run("SELECT pgseal.tenant_offboard('off-past', '0')");
        exported("off-past");
        while one::<i64>("SELECT pgseal._offboard_delete('off-past', 10)") > 0 {}
        run("SELECT pgseal._offboard_advance('off-past', 'exported', 'deleted')");
        run("SELECT pgseal.tenant_shred('off-past')");
        run("SELECT pgseal._offboard_advance('off-past', 'deleted', 'shredded')");
        while one::<i64>("SELECT pgseal._offboard_erase('off-past', 10)") > 0 {}
        run("SELECT pgseal._offboard_advance('off-past', 'shredded', 'erased')");
        run("CREATE TABLE public.off_later (id text, tenant_id text NOT NULL)");
        run("INSERT INTO public.off_later VALUES ('u1', 'off-past')");
        run("SELECT pgseal.subject_register('public.off_later', 'id')");
        let r: pgrx::JsonB = one("SELECT pgseal._offboard_finish('off-past')");
        assert!(r.0.get("redo").is_some(), "{:?}", r.0);
        assert_eq!(step("off-past"), "exported");
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_delete('off-past', 10)"),
            "55000"
        );
        assert_eq!(step("off-past"), "exported");
        assert_eq!(one::<i64>("SELECT count(*) FROM public.off_later"), 1);
    }

    #[pg_test]
    fn other_policies_binding_the_owner_stop_the_count() {
        run("CREATE ROLE off_rls_owner");
        run("CREATE TABLE public.off_rls (id text, tenant_id text NOT NULL)");
        run("SELECT pgseal.subject_register('public.off_rls', 'id')");
        run("ALTER TABLE public.off_rls OWNER TO off_rls_owner");
        run("ALTER TABLE public.off_rls ENABLE ROW LEVEL SECURITY");
        run("ALTER TABLE public.off_rls FORCE ROW LEVEL SECURITY");
        run("CREATE POLICY hide_some ON public.off_rls USING (id <> 'hidden')");
        tenant("off-rls");
        run("INSERT INTO public.off_rls VALUES ('hidden', 'off-rls')");
        run("SELECT pgseal.tenant_offboard('off-rls', '0')");
        // Refused at the export already (and by the count of rows left, which
        // `a_protected_tables_policy_that_could_hide_rows_stops_the_offboarding`
        // reaches past the export).
        assert_eq!(
            sqlstate("SELECT count(*) FROM pgseal._offboard_export('off-rls')"),
            "55000"
        );
    }
}
