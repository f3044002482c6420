//! `#[pg_test]`s for tenancy: the context functions, the policy helpers, organisation
//! roles, and each isolation lint firing and staying quiet.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pg_tests::helpers::{one, run, sqlstate};

    extension_sql!(
        r#"
        -- Tests switch to roles of their own that call tests.* helpers. Granted once
        -- here: tests run concurrently, and a GRANT in each rewrote the schema's row
        -- while other tests held pgseal's chain locks (a deadlock, in either order).
        GRANT USAGE ON SCHEMA tests TO PUBLIC;
        -- Runs a statement and returns how many rows it affected.
        CREATE FUNCTION tests.count_of(q text) RETURNS bigint LANGUAGE plpgsql AS $f$
        DECLARE n bigint;
        BEGIN
            EXECUTE q;
            GET DIAGNOSTICS n = ROW_COUNT;
            RETURN n;
        END
        $f$;
        "#,
        name = "tenancy_test_helpers",
    );

    /// (severity, object, problem) rows of the report for objects matching `like`.
    fn findings(like: &str) -> Vec<(String, String, String)> {
        Spi::connect(|c| {
            c.select(
                "SELECT severity, object, problem FROM pgseal.isolation_report() WHERE object LIKE $1 ORDER BY 2, 3",
                None,
                &[like.into()],
            )
            .unwrap()
            .map(|r| (r.get(1).unwrap().unwrap(), r.get(2).unwrap().unwrap(), r.get(3).unwrap().unwrap()))
            .collect()
        })
    }

    fn has_finding(like: &str, problem_part: &str) -> bool {
        findings(like)
            .iter()
            .any(|(_, _, p)| p.contains(problem_part))
    }

    /// A correct, protected schema: the linter must say nothing about it.
    fn clean_schema() {
        run("CREATE SCHEMA app");
        run("CREATE TABLE app.invoices (id bigint PRIMARY KEY, tenant_id uuid NOT NULL, amount int)");
        run("CREATE INDEX ON app.invoices (tenant_id, id)");
        run("SELECT pgseal.tenant_protect('app.invoices')");
        run("CREATE VIEW app.invoice_totals WITH (security_invoker = true) AS SELECT tenant_id, sum(amount) FROM app.invoices GROUP BY 1");
    }

    #[pg_test]
    fn current_user_id_fails_closed() {
        assert_eq!(sqlstate("SELECT pgseal.current_user_id()"), "42501");
        run("SET LOCAL app.user_id = ''");
        assert_eq!(sqlstate("SELECT pgseal.current_user_id()"), "42501");
        run("SET LOCAL app.user_id = 'u1'");
        assert_eq!(one::<String>("SELECT pgseal.current_user_id()"), "u1");
        run("SET LOCAL pgseal.user_setting = 'my.uid'");
        run("SET LOCAL my.uid = 'u2'");
        assert_eq!(one::<String>("SELECT pgseal.current_user_id()"), "u2");
    }

    #[pg_test]
    fn set_tenant_sets_both_for_the_transaction() {
        run("SELECT pgseal.set_tenant('acme', 'alice')");
        assert_eq!(one::<String>("SELECT pgseal.current_tenant()"), "acme");
        assert_eq!(one::<String>("SELECT pgseal.current_user_id()"), "alice");
        run("SELECT pgseal.set_tenant('globex')");
        assert_eq!(one::<String>("SELECT pgseal.current_tenant()"), "globex");
        assert_eq!(
            sqlstate("SELECT pgseal.current_user_id()"),
            "42501",
            "a NULL user clears the old one"
        );
        assert_eq!(sqlstate("SELECT pgseal.set_tenant('')"), "22023");
        assert_eq!(sqlstate("SELECT pgseal.set_tenant(NULL)"), "22023");
    }

    #[pg_test]
    fn set_tenant_refuses_an_odd_setting_name() {
        run("SET LOCAL pgseal.tenant_setting = 'x; DROP TABLE y'");
        assert_eq!(sqlstate("SELECT pgseal.set_tenant('acme')"), "22023");
    }

    #[pg_test]
    fn tenant_protect_policy_filters_and_checks_for_each_key_type() {
        run("CREATE ROLE app_user");
        for (table, ty, a, b) in [
            ("t_text", "text", "'acme'", "'globex'"),
            ("t_big", "bigint", "1", "2"),
            (
                "t_uuid",
                "uuid",
                "'5f0e8a52-6c5e-4d37-9c61-0e5f1f4a2b10'",
                "'00000000-0000-0000-0000-000000000002'",
            ),
        ] {
            run(&format!(
                "CREATE TABLE public.{table} (id int, tenant_id {ty}, PRIMARY KEY (tenant_id, id))"
            ));
            run(&format!(
                "INSERT INTO public.{table} VALUES (1, {a}), (2, {b})"
            ));
            run(&format!("SELECT pgseal.tenant_protect('public.{table}')"));
            run(&format!("SELECT pgseal.tenant_protect('public.{table}')")); // idempotent
                                                                             // app_user owns the table: FORCE makes the policy apply to it too.
            run(&format!("ALTER TABLE public.{table} OWNER TO app_user"));
            run("SET LOCAL ROLE app_user");
            assert_eq!(
                sqlstate(&format!("SELECT count(*) FROM public.{table}")),
                "42501",
                "{table}: no context"
            );
            run(&format!("SET LOCAL app.tenant_id = {a}"));
            assert_eq!(
                one::<i64>(&format!("SELECT count(*) FROM public.{table}")),
                1,
                "{table}"
            );
            assert_eq!(
                sqlstate(&format!("INSERT INTO public.{table} VALUES (3, {b})")),
                "42501",
                "{table}: WITH CHECK"
            );
            assert_eq!(
                sqlstate(&format!("INSERT INTO public.{table} VALUES (3, {a})")),
                "00000"
            );
            assert_eq!(one::<i64>(&format!("WITH u AS (UPDATE public.{table} SET id = id RETURNING 1) SELECT count(*) FROM u")), 2);
            run("RESET ROLE");
            run("RESET app.tenant_id");
        }
        assert!(one::<bool>(
            "SELECT relforcerowsecurity FROM pg_class WHERE oid = 'public.t_uuid'::regclass"
        ));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pg_policy WHERE polrelid = 'public.t_uuid'::regclass"),
            1
        );
    }

    #[pg_test]
    fn tenant_protect_plans_the_tenant_once_and_uses_the_index() {
        run("CREATE TABLE public.big (id int, tenant_id text NOT NULL, body text)");
        run("CREATE INDEX big_tenant ON public.big (tenant_id)");
        run("INSERT INTO public.big SELECT g, 't' || (g % 500), 'x' FROM generate_series(1, 20000) g");
        run("ANALYZE public.big");
        run("SELECT pgseal.tenant_protect('public.big')");
        run("CREATE ROLE plan_user");
        run("GRANT SELECT ON public.big TO plan_user");
        run("SET LOCAL ROLE plan_user");
        run("SET LOCAL app.tenant_id = 't7'");
        let plan = Spi::explain("SELECT * FROM public.big")
            .unwrap()
            .0
            .to_string();
        run("RESET ROLE");
        assert!(plan.contains("InitPlan"), "{plan}");
        assert!(
            plan.contains("big_tenant"),
            "the tenant index is used: {plan}"
        );
    }

    /// A tenant column with a length limit: a longer tenant id must not be cut down
    /// to another tenant's id by the policy's cast, for either protect function.
    #[pg_test]
    fn a_longer_tenant_id_is_not_cut_down_to_a_shorter_one() {
        run("CREATE TABLE public.short_ids (id int, tenant_id varchar(8) NOT NULL, owner_id varchar(4), org_id varchar(4))");
        run("INSERT INTO public.short_ids VALUES (1, 'acmecorp', 'bob', 'o1')");
        run("CREATE TABLE public.short_orgs (LIKE public.short_ids)");
        run("INSERT INTO public.short_orgs SELECT * FROM public.short_ids");
        run("SELECT pgseal.tenant_protect('public.short_ids')");
        run("SELECT pgseal.org_protect('public.short_orgs', 'owner_id', 'org_id')");
        run("CREATE ROLE short_user");
        run("GRANT SELECT ON public.short_ids, public.short_orgs TO short_user");
        run("SET LOCAL ROLE short_user");
        run("SELECT pgseal.set_tenant('acmecorpX', 'bobby')");
        let seen = one::<i64>("SELECT (SELECT count(*) FROM public.short_ids) + (SELECT count(*) FROM public.short_orgs)");
        run("SELECT pgseal.set_tenant('acmecorp', 'bob')");
        let own = one::<i64>("SELECT (SELECT count(*) FROM public.short_ids) + (SELECT count(*) FROM public.short_orgs)");
        run("RESET ROLE");
        assert_eq!(seen, 0, "tenant acmecorpX saw acmecorp's rows");
        assert_eq!(own, 2);
    }

    #[pg_test]
    fn tenant_protect_warns_without_an_index_and_rejects_bad_input() {
        run("CREATE TABLE public.noidx (id int, tenant_id text)");
        let block = "DO $d$ BEGIN PERFORM pgseal.tenant_protect('public.noidx'); RAISE EXCEPTION 'done'; END $d$";
        let warned = one::<String>(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal(block)
        ));
        assert!(
            warned.starts_with("done"),
            "the call itself succeeds: {warned}"
        );
        assert!(has_finding("public.noidx", "no index has tenant_id"));
        assert_eq!(
            sqlstate("SELECT pgseal.tenant_protect('public.noidx', 'nope')"),
            "42703"
        );
        run("CREATE VIEW public.v AS SELECT 1 AS tenant_id");
        assert_eq!(
            sqlstate("SELECT pgseal.tenant_protect('public.v')"),
            "42809"
        );
    }

    #[pg_test]
    fn tenant_unprotect_reverses_it() {
        run("CREATE TABLE public.u (id int, tenant_id text)");
        run("SELECT pgseal.tenant_protect('public.u')");
        run("SELECT pgseal.tenant_unprotect('public.u')");
        assert!(!one::<bool>("SELECT relrowsecurity OR relforcerowsecurity FROM pg_class WHERE oid = 'public.u'::regclass"));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pg_policy WHERE polrelid = 'public.u'::regclass"),
            0
        );
    }

    #[pg_test]
    fn partitions_are_protected_with_their_parent() {
        run("CREATE TABLE public.ev (tenant_id text, at date) PARTITION BY RANGE (at)");
        run("CREATE TABLE public.ev_2026 PARTITION OF public.ev FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')");
        run("CREATE INDEX ON public.ev (tenant_id)");
        run("SELECT pgseal.tenant_protect('public.ev')");
        assert!(one::<bool>(
            "SELECT relforcerowsecurity FROM pg_class WHERE oid = 'public.ev_2026'::regclass"
        ));
        assert!(
            findings("public.ev%").is_empty(),
            "{:?}",
            findings("public.ev%")
        );
        run("CREATE TABLE public.ev_2027 PARTITION OF public.ev FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')");
        assert!(
            has_finding("public.ev_2027", "lacks its parent"),
            "{:?}",
            findings("public.ev%")
        );
    }

    #[pg_test]
    fn org_roles_grant_exactly_their_commands() {
        run("CREATE TABLE public.docs (id int PRIMARY KEY, tenant_id text NOT NULL, owner_id text, org_id text, body text)");
        run("CREATE INDEX ON public.docs (tenant_id)");
        run("SELECT pgseal.org_protect('public.docs', 'owner_id', 'org_id')");
        run("CREATE ROLE org_app");
        run("GRANT ALL ON public.docs TO org_app");
        // Only someone who already owns an organisation of the tenant creates one:
        // the superuser seeds olga's first.
        run("INSERT INTO pgseal.org_members VALUES ('acme', 'org0', 'olga', 'owner')");
        run("SET LOCAL ROLE org_app");
        // The org's creator becomes its owner and adds the others.
        run("SELECT pgseal.set_tenant('acme', 'olga')");
        run("INSERT INTO pgseal.org_members VALUES ('acme', 'org1', 'olga', 'owner')");
        run("INSERT INTO pgseal.org_members VALUES ('acme', 'org1', 'adam', 'admin'), ('acme', 'org1', 'mia', 'member'), ('acme', 'org1', 'vic', 'viewer')");
        run("INSERT INTO public.docs VALUES (1, 'acme', 'olga', 'org1', 'x'), (2, 'acme', 'olga', NULL, 'private')");
        // Another tenant with the same org id and user names sees none of it.
        run("SELECT pgseal.set_tenant('globex', 'olga')");
        assert_eq!(one::<i64>("SELECT count(*) FROM public.docs"), 0);
        assert_eq!(one::<i64>("SELECT count(*) FROM pgseal.org_members"), 0);
        assert_eq!(
            sqlstate("INSERT INTO public.docs VALUES (9, 'acme', 'olga', 'org1', 'x')"),
            "42501"
        );
        let cases = [
            // user, SELECT count, INSERT org doc, UPDATE count, DELETE count
            ("olga", 2, "00000", 2, 1),
            ("adam", 1, "00000", 1, 1),
            ("mia", 1, "00000", 1, 0),
            ("vic", 1, "42501", 0, 0),
            ("zed", 0, "42501", 0, 0),
        ];
        for (user, sel, ins, upd, del) in cases {
            run(&format!("SELECT pgseal.set_tenant('acme', '{user}')"));
            assert_eq!(
                one::<i64>("SELECT count(*) FROM public.docs"),
                sel,
                "{user} SELECT"
            );
            let updated = one::<i64>("SELECT tests.count_of('UPDATE public.docs SET body = body')");
            assert_eq!(updated, upd, "{user} UPDATE");
            let deleted = one::<i64>(
                "SELECT tests.count_of('DELETE FROM public.docs WHERE org_id = ''org1''')",
            );
            assert_eq!(deleted, del, "{user} DELETE");
            assert_eq!(
                sqlstate(&format!(
                    "INSERT INTO public.docs VALUES (100, 'acme', 'someone', 'org1', '{user}')"
                )),
                ins,
                "{user} INSERT"
            );
            run("RESET ROLE");
            run("DELETE FROM public.docs WHERE id = 100");
            run("INSERT INTO public.docs VALUES (1, 'acme', 'olga', 'org1', 'x') ON CONFLICT DO NOTHING");
            run("SET LOCAL ROLE org_app");
        }
        // Only owners and admins change membership.
        run("SELECT pgseal.set_tenant('acme', 'mia')");
        assert_eq!(
            sqlstate("INSERT INTO pgseal.org_members VALUES ('acme', 'org1', 'eve', 'owner')"),
            "42501"
        );
        assert_eq!(
            one::<i64>("SELECT tests.count_of('UPDATE pgseal.org_members SET role = ''owner''')"),
            0
        );
        run("SELECT pgseal.set_tenant('acme', 'adam')");
        assert_eq!(
            sqlstate("INSERT INTO pgseal.org_members VALUES ('acme', 'org1', 'eve', 'viewer')"),
            "00000"
        );
        assert_eq!(
            sqlstate("INSERT INTO pgseal.org_members VALUES ('acme', 'org1', 'eve2', 'owner')"),
            "42501",
            "an admin does not grant the owner role"
        );
        run("RESET ROLE");
    }

    /// Who grants and takes the owner role, who creates an organisation, and that an
    /// organisation with members keeps an owner. (Races are in the attack tier.)
    #[pg_test]
    fn org_owner_invariants_hold() {
        run("CREATE ROLE org_app");
        run("INSERT INTO pgseal.org_members VALUES ('acme', 'org1', 'olga', 'owner'), ('acme', 'org1', 'adam', 'admin'), ('acme', 'org1', 'mia', 'member'), ('acme', 'home', 'tom', 'owner'), ('globex', 'g1', 'mia', 'owner')");
        run("SET LOCAL ROLE org_app");
        let members = "SELECT string_agg(user_id || ':' || role, ',' ORDER BY user_id) FROM pgseal.org_members WHERE org_id = 'org1'";
        run("SELECT pgseal.set_tenant('acme', 'adam')");
        let before = one::<String>(members);
        for (probe, sql) in [
            ("admin inserts an owner", "INSERT INTO pgseal.org_members VALUES ('acme', 'org1', 'eve', 'owner')"),
            ("admin promotes themself", "UPDATE pgseal.org_members SET role = 'owner' WHERE user_id = 'adam'"),
            ("admin promotes a member", "UPDATE pgseal.org_members SET role = 'owner' WHERE user_id = 'mia'"),
            ("admin demotes the owner", "UPDATE pgseal.org_members SET role = 'admin' WHERE user_id = 'olga'"),
            ("admin deletes the owner", "DELETE FROM pgseal.org_members WHERE user_id = 'olga'"),
            ("admin renames the owner's row", "UPDATE pgseal.org_members SET user_id = 'adam2' WHERE user_id = 'olga'"),
            ("admin upserts themself to owner", "INSERT INTO pgseal.org_members VALUES ('acme', 'org1', 'adam', 'admin') ON CONFLICT (tenant_id, org_id, user_id) DO UPDATE SET role = 'owner'"),
        ] {
            assert_eq!(sqlstate(sql), "42501", "{probe}");
        }
        assert_eq!(one::<String>(members), before, "nothing changed");
        // An admin still manages the other roles.
        assert_eq!(
            sqlstate("UPDATE pgseal.org_members SET role = 'viewer' WHERE user_id = 'mia'"),
            "00000"
        );

        // Creating an organisation: only a user who owns one in this tenant.
        run("SELECT pgseal.set_tenant('acme', 'mia')");
        assert_eq!(
            sqlstate("INSERT INTO pgseal.org_members VALUES ('acme', 'newco', 'mia', 'owner')"),
            "42501",
            "mia owns an organisation in globex only"
        );
        run("SELECT pgseal.set_tenant('acme', 'adam')");
        assert_eq!(
            sqlstate("INSERT INTO pgseal.org_members VALUES ('acme', 'newco', 'adam', 'owner')"),
            "42501",
            "an admin is no owner"
        );
        run("SELECT pgseal.set_tenant('acme', 'tom')");
        assert_eq!(
            sqlstate("INSERT INTO pgseal.org_members VALUES ('acme', 'newco', 'tom', 'owner')"),
            "00000",
            "a tenant owner creates an organisation"
        );

        // The last owner stays while the organisation has other members.
        run("SELECT pgseal.set_tenant('acme', 'olga')");
        assert_eq!(
            sqlstate("UPDATE pgseal.org_members SET role = 'admin' WHERE user_id = 'olga'"),
            "23514"
        );
        assert_eq!(
            sqlstate("DELETE FROM pgseal.org_members WHERE user_id = 'olga'"),
            "23514"
        );
        // Handing over: the new owner first, then the old one steps down.
        run("UPDATE pgseal.org_members SET role = 'owner' WHERE user_id = 'adam'");
        run("UPDATE pgseal.org_members SET role = 'admin' WHERE user_id = 'olga'");
        assert_eq!(
            sqlstate("UPDATE pgseal.org_members SET role = 'owner' WHERE user_id = 'olga'"),
            "42501",
            "a former owner cannot take it back"
        );
        // An owner dissolves the organisation by removing every member at once.
        run("SELECT pgseal.set_tenant('acme', 'adam')");
        assert_eq!(
            sqlstate("DELETE FROM pgseal.org_members WHERE org_id = 'org1'"),
            "00000"
        );
        run("RESET ROLE");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.org_members WHERE org_id = 'org1'"),
            0
        );
        // The rule holds for the superuser too.
        run("INSERT INTO pgseal.org_members VALUES ('acme', 'org2', 'ann', 'owner'), ('acme', 'org2', 'bob', 'member')");
        assert_eq!(
            sqlstate("DELETE FROM pgseal.org_members WHERE org_id = 'org2' AND user_id = 'ann'"),
            "23514"
        );
    }

    /// isolation_report() names every SECURITY DEFINER function whose search_path
    /// does not end in pg_temp. It enumerates pg_proc, so a pgseal function added
    /// later is covered without editing this test.
    #[pg_test]
    fn isolation_report_checks_definer_search_paths() {
        let pgseal_definers = one::<i64>(
            "SELECT count(*) FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e' \
             JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pgseal' WHERE p.prosecdef",
        );
        assert!(
            pgseal_definers > 0,
            "pgseal has SECURITY DEFINER functions to check"
        );
        let own: Vec<_> = findings("%")
            .into_iter()
            .filter(|(_, o, p)| o.starts_with("pgseal.") || p.contains("pgseal's own"))
            .collect();
        assert!(own.is_empty(), "pgseal's own functions: {own:?}");

        run("CREATE FUNCTION public.leaky_definer() RETURNS int LANGUAGE sql SECURITY DEFINER SET search_path = public AS 'SELECT 1'");
        run("CREATE FUNCTION public.pinned_definer() RETURNS int LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS 'SELECT 1'");
        assert_eq!(
            findings("public.%_definer()"),
            vec![(
                "warning".to_string(),
                "public.leaky_definer()".to_string(),
                "SECURITY DEFINER function whose search_path does not end in pg_temp, so the caller's temporary objects come first".to_string()
            )]
        );
        // One of pgseal's own, planted here, is an error.
        run("CREATE FUNCTION pgseal.planted() RETURNS int LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgseal AS 'SELECT 1'");
        assert!(
            findings("pgseal.planted()")
                .iter()
                .any(|(sev, _, p)| sev == "error" && p.contains("pgseal's own")),
            "{:?}",
            findings("pgseal.planted()")
        );
        // The fixes keep the path and append pg_temp.
        let fixes: Vec<String> = Spi::connect(|c| {
            c.select(
                "SELECT fix FROM pgseal.isolation_report() WHERE object IN ('public.leaky_definer()', 'pgseal.planted()')",
                None,
                &[],
            )
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect()
        });
        assert_eq!(fixes.len(), 2, "{fixes:?}");
        for f in &fixes {
            run(f);
        }
        assert_eq!(
            one::<String>("SELECT array_to_string(proconfig, ';') FROM pg_proc WHERE oid = 'public.leaky_definer()'::regprocedure"),
            "search_path=public, pg_temp"
        );
        assert!(findings("public.%").is_empty() && findings("pgseal.%").is_empty());
    }

    #[pg_test]
    fn clean_schema_has_no_findings() {
        clean_schema();
        assert!(findings("app.%").is_empty(), "{:?}", findings("app.%"));
    }

    #[pg_test]
    fn lints_fire_on_each_mistake() {
        clean_schema();
        run("CREATE TABLE app.no_rls (id int, tenant_id text)");
        assert!(has_finding("app.no_rls", "row level security is off"));
        run("CREATE TABLE app.not_forced (id int, tenant_id text)");
        run("CREATE INDEX ON app.not_forced (tenant_id)");
        run("ALTER TABLE app.not_forced ENABLE ROW LEVEL SECURITY");
        run("CREATE POLICY p ON app.not_forced USING (tenant_id = (SELECT pgseal.current_tenant()))");
        assert!(has_finding("app.not_forced", "not forced"));
        run("CREATE TABLE app.no_policy (id int, tenant_id text)");
        run("ALTER TABLE app.no_policy ENABLE ROW LEVEL SECURITY");
        assert!(has_finding("app.no_policy", "no policy"));
        run("CREATE POLICY open ON app.invoices USING (true)");
        assert!(has_finding("app.invoices", "allows every row"));
        run("DROP POLICY open ON app.invoices");
        run("CREATE POLICY amt ON app.invoices USING (amount > 0)");
        assert!(has_finding("app.invoices", "no tenant predicate"));
        run("DROP POLICY amt ON app.invoices");
        run("CREATE TABLE app.per_row (id int, tenant_id text)");
        run("CREATE INDEX ON app.per_row (tenant_id)");
        run("ALTER TABLE app.per_row ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY");
        run("CREATE POLICY p ON app.per_row USING (tenant_id = current_setting('app.tenant_id'))");
        assert!(has_finding("app.per_row", "once per row"));
        assert!(has_finding("app.no_rls", "no index has tenant_id"));
        run("CREATE VIEW app.leaky AS SELECT * FROM app.invoices");
        assert!(has_finding("app.leaky", "without security_invoker"));
        run("CREATE MATERIALIZED VIEW app.snap AS SELECT * FROM app.invoices");
        assert!(has_finding("app.snap", "materialized view"));
        run("CREATE ROLE sneaky BYPASSRLS");
        assert!(has_finding("sneaky", "BYPASSRLS"));
        run("CREATE ROLE cleaner");
        run("GRANT TRUNCATE ON app.invoices TO cleaner");
        assert!(has_finding(
            "app.invoices",
            "TRUNCATE is granted to cleaner"
        ));
        run(
            "CREATE FUNCTION app.definer() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1'",
        );
        assert!(has_finding("app.definer()", "search_path"));
        // Each finding carries a fix; applying the one-statement fixes cleans up.
        let fixes: Vec<String> = Spi::connect(|c| {
            c.select(
                "SELECT fix FROM pgseal.isolation_report() WHERE fix NOT LIKE 'DROP MATERIALIZED%'",
                None,
                &[],
            )
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect()
        });
        for f in &fixes {
            run(f);
        }
        run("DROP MATERIALIZED VIEW app.snap");
        let left = findings("%");
        assert!(left.is_empty(), "after the fixes: {left:?}");
    }
}
