//! `#[pg_test]`s for tenant offboarding (issue 19): scheduling, cancelling, and the
//! step functions pgseald calls, with the ways they refuse to be taken out of
//! order, early, under a hold or with the work undone. pgseald's side, with kill -9
//! at every step, is in tests/tests/jobs_cluster.rs.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pg_tests::helpers::{one, run, sqlstate, tenant};

    fn step(t: &str) -> String {
        one(&format!(
            "SELECT step FROM pgseal.tenant_offboardings WHERE tenant_id = {}",
            pgrx::spi::quote_literal(t)
        ))
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

    #[pg_test]
    fn the_steps_run_in_order_and_the_receipt_states_what_was_done() {
        tenant_data("off-steps");
        run("SELECT pgseal.tenant_offboard('off-steps', '0')");
        assert!(one::<bool>(
            "SELECT 'off-steps' IN (SELECT * FROM pgseal._offboard_due())"
        ));
        assert!(one::<bool>(
            "SELECT 'public.off_users'::regclass IN (SELECT * FROM pgseal._offboard_tables())"
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
        run("SELECT pgseal._offboard_advance('off-steps', 'scheduled', 'exported', '/exports/off-steps.jsonl')");
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_advance('off-steps', 'scheduled', 'exported', '/x')"),
            "55000"
        );
        let n: i64 = one("WITH d AS (DELETE FROM public.off_users WHERE tenant_id = 'off-steps' RETURNING 1) SELECT count(*) FROM d");
        run(&format!(
            "SELECT pgseal._offboard_deleted('off-steps', 'public.off_users', {n})"
        ));
        run("SELECT pgseal._offboard_advance('off-steps', 'exported', 'deleted')");
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_deleted('off-steps', 'public.off_users', 1)"),
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
    fn the_receipt_is_refused_while_keys_or_payloads_remain() {
        tenant_data("off-undone");
        run("SELECT pgseal.tenant_offboard('off-undone', '0')");
        run("SELECT pgseal._offboard_advance('off-undone', 'scheduled', 'exported', '/x')");
        run("SELECT pgseal._offboard_advance('off-undone', 'exported', 'deleted')");
        // Advanced without shredding or erasing.
        run("SELECT pgseal._offboard_advance('off-undone', 'deleted', 'shredded')");
        run("SELECT pgseal._offboard_advance('off-undone', 'shredded', 'erased')");
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_finish('off-undone')"),
            "55000"
        );
        assert_eq!(step("off-undone"), "erased");
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
            sqlstate("SELECT pgseal._offboard_advance('off-held', 'scheduled', 'exported', '/x')"),
            "55000"
        );
        run("SELECT pgseal.retention_hold('off-held', false)");
        run("SELECT pgseal._offboard_advance('off-held', 'scheduled', 'exported', '/x')");
        run("SELECT pgseal.retention_hold('off-held', true)");
        assert_eq!(
            sqlstate("SELECT pgseal._offboard_advance('off-held', 'exported', 'deleted')"),
            "55000"
        );
        assert_eq!(step("off-held"), "exported");
    }
}
