//! `#[pg_test]`s for the SQL side of pgseald's jobs: retention rules and holds, the
//! sealed-column registry, key usage and the bounded job history; registrations
//! following the schema (drops, renames, the column number taken from the name).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pg_tests::helpers::{
        one, owner_trap, owner_trap_ran_as, owner_trap_statistic, run, sqlstate, tenant,
    };

    #[pg_test]
    fn retention_rules_default_override_and_hold() {
        run("CREATE TABLE public.ev (id int PRIMARY KEY, tenant_id text, created_at timestamptz, at date, note text)");
        run("SELECT pgseal.retention_set('public.ev', '30 days')");
        run("SELECT pgseal.retention_set('public.ev', '10 days', 'at', 'acme')");
        run("SELECT pgseal.retention_set('public.ev', '40 days')"); // replaces the default
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.retention_policies"),
            2
        );
        assert_eq!(
            one::<String>(
                "SELECT keep::text FROM pgseal.retention_policies WHERE tenant_id IS NULL"
            ),
            "40 days"
        );
        assert_eq!(
            one::<String>(
                "SELECT time_column::text FROM pgseal.retention_policies WHERE tenant_id = 'acme'"
            ),
            "at"
        );
        run("SELECT pgseal.retention_hold('acme', true)");
        run("SELECT pgseal.retention_hold('acme', true)"); // idempotent
        assert!(one::<bool>(
            "SELECT on_hold FROM pgseal.retention_policies WHERE tenant_id = 'acme'"
        ));
        run("SELECT pgseal.retention_hold('acme', false)");
        assert!(!one::<bool>(
            "SELECT on_hold FROM pgseal.retention_policies WHERE tenant_id = 'acme'"
        ));
    }

    #[pg_test]
    fn retention_set_rejects_bad_input() {
        run("CREATE TABLE public.ev (id int, tenant_id text, created_at timestamptz, note text)");
        run("CREATE TABLE public.no_tenant (id int, created_at timestamptz)");
        assert_eq!(
            sqlstate("SELECT pgseal.retention_set('public.ev', '-1 day')"),
            "22023"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.retention_set('public.ev', '0')"),
            "22023"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.retention_set('public.ev', '1 day', 'nope')"),
            "42703"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.retention_set('public.ev', '1 day', 'note')"),
            "42804"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.retention_set('public.ev', '1 day', 'created_at', '')"),
            "22023"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.retention_set('public.no_tenant', '1 day')"),
            "42703"
        );
        assert_eq!(sqlstate("SELECT pgseal.retention_hold('', true)"), "22023");
        assert_eq!(
            sqlstate("SELECT pgseal.retention_hold(NULL, true)"),
            "22004"
        );
    }

    #[pg_test]
    fn registered_columns_and_key_usage() {
        run("CREATE TABLE public.creds (id int PRIMARY KEY, tenant_id text, token text, n int)");
        run("CREATE TABLE public.nopk (id int, token text)");
        assert_eq!(
            sqlstate("SELECT pgseal.vault_register_column('public.creds', 'nope')"),
            "42703"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.vault_register_column('public.creds', 'n')"),
            "42804"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.vault_register_column('public.nopk', 'token')"),
            "42P10"
        );
        run("SELECT pgseal.vault_register_column('public.creds', 'token', 'creds.token')");
        run("SET LOCAL app.tenant_id = 'acme'");
        run("INSERT INTO public.creds SELECT g, 'acme', pgseal.vault_seal('t' || g, 'creds.token') FROM generate_series(1, 5) g");
        let old: String = one("SELECT key_id FROM pgseal.key_usage WHERE tenant_id = 'acme'");
        assert_eq!(
            one::<i64>("SELECT rows FROM pgseal.key_usage WHERE tenant_id = 'acme'"),
            5
        );
        let new: String = one("SELECT pgseal.tenant_key_rotate('acme')");
        run("UPDATE public.creds SET token = pgseal.vault_rewrap(token, 'creds.token') WHERE id <= 2");
        let q = |k: &str| {
            one::<i64>(&format!(
                "SELECT rows FROM pgseal.key_usage WHERE key_id = '{k}'"
            ))
        };
        assert_eq!((q(&old), q(&new)), (3, 2));
        assert_eq!(
            one::<String>(&format!(
                "SELECT state FROM pgseal.key_usage WHERE key_id = '{old}'"
            )),
            "retired"
        );
    }

    /// The newest ledger entry of `tenant`: (event, payload).
    fn newest(tenant: &str) -> (String, pgrx::JsonB) {
        Spi::connect(|c| {
            let t = c
                .select(
                    "SELECT event, payload FROM pgseal.ledger WHERE tenant_id = $1 ORDER BY seq DESC LIMIT 1",
                    Some(1),
                    &[tenant.into()],
                )
                .unwrap()
                .first();
            (
                t.get::<String>(1).unwrap().unwrap(),
                t.get::<pgrx::JsonB>(2).unwrap().unwrap(),
            )
        })
    }

    fn entries(tenant: &str) -> i64 {
        Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = $1",
            &[tenant.into()],
        )
        .unwrap()
        .unwrap()
    }

    /// Two registered tables, each with a default and a tenant's retention rule on
    /// different time columns and two registered sealed columns.
    fn two_registered_tables() {
        for t in ["public.reg_a", "public.reg_b"] {
            run(&format!(
                "CREATE TABLE {t} (id int PRIMARY KEY, tenant_id text, created_at timestamptz, \
                 seen_at timestamptz, token text, token2 text)"
            ));
            run(&format!("SELECT pgseal.retention_set('{t}', '30 days')"));
            run(&format!(
                "SELECT pgseal.retention_set('{t}', '10 days', 'seen_at', 'reg-t')"
            ));
            run(&format!(
                "SELECT pgseal.vault_register_column('{t}', 'token', 'ctx')"
            ));
            run(&format!(
                "SELECT pgseal.vault_register_column('{t}', 'token2', 'ctx')"
            ));
        }
    }

    fn registrations(rel: &str) -> (i64, i64) {
        (
            one::<i64>(&format!(
                "SELECT count(*) FROM pgseal.retention_rules WHERE rel::text = '{rel}'"
            )),
            one::<i64>(&format!(
                "SELECT count(*) FROM pgseal.sealed_columns WHERE rel::text = '{rel}'"
            )),
        )
    }

    #[pg_test]
    fn dropping_a_column_or_table_removes_its_registrations_only() {
        two_registered_tables();
        let oid: i64 = one("SELECT 'public.reg_a'::regclass::oid::bigint");
        // A dropped sealed column: that registration only.
        run("ALTER TABLE public.reg_a DROP COLUMN token2");
        assert_eq!(registrations("reg_a"), (2, 1));
        assert_eq!(
            one::<String>(
                "SELECT col::text FROM pgseal.sealed_columns WHERE rel = 'public.reg_a'::regclass"
            ),
            "token"
        );
        // A dropped time column: the tenant's rule on it, recorded as any removal.
        run("ALTER TABLE public.reg_a DROP COLUMN seen_at");
        assert_eq!(registrations("reg_a"), (1, 1));
        let (event, p) = newest("reg-t");
        assert_eq!(event, "retention.removed");
        assert_eq!(p.0["time_column"], "seen_at");
        assert_eq!(p.0["scope"], "tenant");
        // A dropped table: everything of it, the other table untouched.
        run("DROP TABLE public.reg_a");
        assert_eq!(
            one::<i64>(&format!(
                "SELECT count(*) FROM pgseal.retention_rules WHERE rel::oid = {oid}"
            )) + one::<i64>(&format!(
                "SELECT count(*) FROM pgseal.sealed_columns WHERE rel::oid = {oid}"
            )),
            0
        );
        assert_eq!(registrations("reg_b"), (2, 2));
        // The sealed column's removal is the newest entry, the default rule's before it.
        let (event, p) = newest("_pgseal");
        assert_eq!(event, "vault.column_unregistered");
        assert_eq!(
            p.0["table"],
            serde_json::json!(oid.to_string()),
            "the table's name is gone: its OID"
        );
        let p = one::<pgrx::JsonB>(
            "SELECT payload FROM pgseal.ledger WHERE tenant_id = '_pgseal' AND event = 'retention.removed'
              ORDER BY seq DESC LIMIT 1",
        );
        assert_eq!(p.0["scope"], "default");
        assert_eq!(
            p.0["table"],
            serde_json::json!(oid.to_string()),
            "the table's name is gone: its OID"
        );
        // DROP SCHEMA ... CASCADE reaches them too.
        run("CREATE SCHEMA reg_s");
        run("ALTER TABLE public.reg_b SET SCHEMA reg_s");
        run("DROP SCHEMA reg_s CASCADE");
        assert_eq!(one::<i64>("SELECT count(*) FROM pgseal.retention_rules"), 0);
        assert_eq!(one::<i64>("SELECT count(*) FROM pgseal.sealed_columns"), 0);
        assert!(one::<bool>(
            "SELECT ok FROM pgseal.ledger_verify('_pgseal')"
        ));
    }

    #[pg_test]
    fn renames_of_columns_tables_and_schemas_are_followed_unrecorded() {
        two_registered_tables();
        let before = (entries("_pgseal"), entries("reg-t"));
        let nums: (i16, i16) = (
            one("SELECT attnum FROM pgseal.sealed_columns WHERE rel = 'public.reg_a'::regclass AND col = 'token'"),
            one("SELECT time_attnum FROM pgseal.retention_rules WHERE rel = 'public.reg_a'::regclass AND tenant_id = 'reg-t'"),
        );
        run("ALTER TABLE public.reg_a RENAME COLUMN token TO secret");
        run("ALTER TABLE public.reg_a RENAME COLUMN seen_at TO last_seen");
        run("ALTER TABLE public.reg_a RENAME TO reg_renamed");
        run("CREATE SCHEMA reg_s");
        run("ALTER TABLE public.reg_renamed SET SCHEMA reg_s");
        assert_eq!(registrations("reg_s.reg_renamed"), (2, 2));
        assert_eq!(
            one::<i16>("SELECT attnum FROM pgseal.sealed_columns WHERE rel = 'reg_s.reg_renamed'::regclass AND col = 'secret'"),
            nums.0
        );
        assert_eq!(
            one::<i16>("SELECT time_attnum FROM pgseal.retention_rules WHERE rel = 'reg_s.reg_renamed'::regclass AND time_column = 'last_seen'"),
            nums.1
        );
        assert_eq!(
            one::<String>("SELECT time_column::text FROM pgseal.retention_policies WHERE tenant_id = 'reg-t' AND rel = 'reg_s.reg_renamed'::regclass"),
            "last_seen"
        );
        assert_eq!(
            (entries("_pgseal"), entries("reg-t")),
            before,
            "a rename changes no rule: nothing recorded"
        );
        // The renamed column is still scanned by key_usage.
        tenant("reg-t");
        run("INSERT INTO reg_s.reg_renamed (id, tenant_id, secret) VALUES (1, 'reg-t', pgseal.vault_seal('x', 'ctx'))");
        assert_eq!(
            one::<i64>("SELECT sum(rows)::bigint FROM pgseal.key_usage WHERE tenant_id = 'reg-t'"),
            1
        );
        // Setting the rule again by its new name updates it, recorded with the name.
        run("SELECT pgseal.retention_set('reg_s.reg_renamed', '20 days', 'last_seen', 'reg-t')");
        let (event, p) = newest("reg-t");
        assert_eq!(event, "retention.set");
        assert_eq!(p.0["previous"]["time_column"], "last_seen");
        assert_eq!(registrations("reg_s.reg_renamed"), (2, 2));
        // The other table kept its names.
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.sealed_columns WHERE rel = 'public.reg_b'::regclass AND col IN ('token', 'token2')"),
            2
        );
    }

    #[pg_test]
    fn a_registrations_column_number_comes_from_its_name() {
        run("CREATE TABLE public.reg_n (id int PRIMARY KEY, tenant_id text, gone int, created_at timestamptz, token text)");
        run("ALTER TABLE public.reg_n DROP COLUMN gone");
        run("SELECT pgseal.vault_register_column('public.reg_n', 'token')");
        run("SELECT pgseal.retention_set('public.reg_n', '1 day')");
        assert_eq!(
            one::<i16>(
                "SELECT attnum FROM pgseal.sealed_columns WHERE rel = 'public.reg_n'::regclass"
            ),
            5
        );
        assert_eq!(
            one::<i16>("SELECT time_attnum FROM pgseal.retention_rules WHERE rel = 'public.reg_n'::regclass"),
            4
        );
        // A number written directly (as a restore writes a dumped one) is replaced by
        // the named column's.
        run("DELETE FROM pgseal.sealed_columns");
        run("INSERT INTO pgseal.sealed_columns (rel, col, context, attnum) VALUES ('public.reg_n', 'token', NULL, 2)");
        assert_eq!(
            one::<i16>(
                "SELECT attnum FROM pgseal.sealed_columns WHERE rel = 'public.reg_n'::regclass"
            ),
            5
        );
        run("UPDATE pgseal.retention_rules SET time_attnum = 1");
        assert_eq!(
            one::<i16>("SELECT time_attnum FROM pgseal.retention_rules WHERE rel = 'public.reg_n'::regclass"),
            4
        );
        assert_eq!(
            sqlstate("INSERT INTO pgseal.sealed_columns (rel, col, attnum) VALUES ('public.reg_n', 'nope', 5)"),
            "42703"
        );
        assert_eq!(
            sqlstate("INSERT INTO pgseal.sealed_columns (rel, col, attnum) VALUES ('public.reg_n', '........pg.dropped.3........', 3)"),
            "42703"
        );
    }

    #[pg_test]
    fn a_roles_drop_removes_only_its_own_tables_registrations_and_runs_none_of_its_code() {
        two_registered_tables();
        run("CREATE ROLE reg_app");
        run("GRANT CREATE ON SCHEMA public TO reg_app");
        run("CREATE SCHEMA reg_atk AUTHORIZATION reg_app");
        run("CREATE TABLE public.reg_own (id int PRIMARY KEY, tenant_id text, created_at timestamptz, token text)");
        run("ALTER TABLE public.reg_own OWNER TO reg_app");
        run("SELECT pgseal.vault_register_column('public.reg_own', 'token')");
        run("SELECT pgseal.retention_set('public.reg_own', '5 days')");
        run("SET LOCAL ROLE reg_app");
        // The attacker's hijacks: a log of who ran its code, and `=` / `<>` on oid,
        // int4/int2 and name in a schema first in its search_path, plus pg_temp views
        // named like the catalogs the event triggers read.
        run("CREATE TABLE reg_atk.ran (who text)");
        run("GRANT INSERT ON reg_atk.ran TO PUBLIC");
        run("CREATE FUNCTION reg_atk.pwn() RETURNS boolean LANGUAGE sql AS $$ INSERT INTO reg_atk.ran VALUES (current_user::text) RETURNING true $$");
        for (l, r) in [
            ("oid", "oid"),
            ("int4", "int2"),
            ("name", "name"),
            ("oid", "regclass"),
        ] {
            run(&format!(
                "CREATE FUNCTION reg_atk.eq(a {l}, b {r}) RETURNS boolean LANGUAGE sql AS $$ SELECT reg_atk.pwn() AND a::text = b::text $$"
            ));
            run(&format!(
                "CREATE OPERATOR reg_atk.= (LEFTARG = {l}, RIGHTARG = {r}, FUNCTION = reg_atk.eq)"
            ));
        }
        run("CREATE TEMP VIEW pg_attribute AS SELECT attrelid, attname, attnum, atttypid, attisdropped FROM pg_catalog.pg_attribute WHERE reg_atk.pwn()");
        run("CREATE TEMP VIEW retention_rules AS SELECT * FROM pgseal.retention_rules WHERE reg_atk.pwn()");
        run("SET LOCAL search_path = reg_atk, pg_temp, pg_catalog, public");
        run("CREATE TABLE reg_atk.mine (id int, tenant_id text, created_at timestamptz)");
        run("ALTER TABLE reg_atk.mine RENAME COLUMN id TO ident");
        run("DROP TABLE reg_atk.mine");
        run("ALTER TABLE public.reg_own RENAME COLUMN token TO tok");
        run("ALTER TABLE public.reg_own DROP COLUMN tok");
        run("DROP TABLE public.reg_own");
        run("RESET search_path");
        run("RESET ROLE");
        assert_eq!(registrations("reg_a"), (2, 2));
        assert_eq!(registrations("reg_b"), (2, 2));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.retention_rules")
                + one::<i64>("SELECT count(*) FROM pgseal.sealed_columns"),
            8,
            "the role's own table's registrations are gone, nothing else"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM reg_atk.ran WHERE who <> 'reg_app'"),
            0,
            "the attacker's code never ran as anyone else"
        );
        // The role cannot reach the registrations by any other way either.
        run("SET LOCAL ROLE reg_app");
        assert_eq!(sqlstate("DELETE FROM pgseal.sealed_columns"), "42501");
        assert_eq!(sqlstate("SELECT pgseal._master_key_loaded()"), "42501");
        run("RESET ROLE");
    }

    /// Every command tag that renames a column of a plain table (ALTER VIEW /
    /// MATERIALIZED VIEW / FOREIGN TABLE ... RENAME COLUMN too) syncs the stored name:
    /// swapping two column names through ALTER VIEW leaves no name on another column.
    #[pg_test]
    fn renames_by_every_alter_tag_are_followed() {
        run("CREATE TABLE public.reg_v (id int PRIMARY KEY, tenant_id text, created_at timestamptz, \
             fake_ts timestamptz, token text, other text)");
        run("SELECT pgseal.retention_set('public.reg_v', '30 days')");
        run("SELECT pgseal.vault_register_column('public.reg_v', 'token')");
        let (t, c): (i16, i16) = (
            one("SELECT time_attnum FROM pgseal.retention_rules"),
            one("SELECT attnum FROM pgseal.sealed_columns"),
        );
        run("ALTER VIEW public.reg_v RENAME COLUMN created_at TO real_created");
        run("ALTER VIEW public.reg_v RENAME COLUMN fake_ts TO created_at");
        run("ALTER FOREIGN TABLE public.reg_v RENAME COLUMN token TO tok");
        run("ALTER MATERIALIZED VIEW public.reg_v RENAME COLUMN other TO token");
        assert_eq!(
            one::<String>("SELECT time_column::text FROM pgseal.retention_rules"),
            "real_created"
        );
        assert_eq!(
            one::<String>("SELECT col::text FROM pgseal.sealed_columns"),
            "tok"
        );
        assert_eq!(
            one::<i16>("SELECT time_attnum FROM pgseal.retention_rules"),
            t
        );
        assert_eq!(one::<i16>("SELECT attnum FROM pgseal.sealed_columns"), c);
        // ALTER TYPE ... RENAME ATTRIBUTE ... CASCADE renames a typed table's column.
        run("CREATE TYPE public.reg_ty AS (id int, tenant_id text, created_at timestamptz)");
        run("CREATE TABLE public.reg_typed OF public.reg_ty (PRIMARY KEY (id))");
        run("SELECT pgseal.retention_set('public.reg_typed', '1 day')");
        run("ALTER TYPE public.reg_ty RENAME ATTRIBUTE created_at TO born_at CASCADE");
        assert_eq!(
            one::<String>(
                "SELECT time_column::text FROM pgseal.retention_rules WHERE rel = 'public.reg_typed'::regclass"
            ),
            "born_at"
        );
    }

    /// A rename syncs only the registrations of the relations it altered (and their
    /// inheritors), never other tables' rows.
    #[pg_test]
    fn a_rename_syncs_only_the_altered_tables_registrations() {
        two_registered_tables();
        run("ALTER EVENT TRIGGER pgseal_registrations_rename DISABLE");
        run("ALTER TABLE public.reg_b RENAME COLUMN token TO tok_b");
        run("ALTER EVENT TRIGGER pgseal_registrations_rename ENABLE ALWAYS");
        run("ALTER TABLE public.reg_a RENAME COLUMN token TO tok_a");
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM pgseal.sealed_columns WHERE col IN ('tok_a', 'token')"
            ),
            2,
            "reg_a synced, reg_b's stale row untouched"
        );
        // The next DDL on reg_b syncs its row.
        run("ALTER TABLE public.reg_b ALTER COLUMN token2 SET STATISTICS 200");
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM pgseal.sealed_columns WHERE col IN ('tok_a', 'tok_b')"
            ),
            2
        );
        // A rename of a partitioned parent reaches a registered partition.
        run("CREATE TABLE public.reg_p (id int, tenant_id text, created_at timestamptz) PARTITION BY RANGE (id)");
        run("CREATE TABLE public.reg_p1 PARTITION OF public.reg_p FOR VALUES FROM (0) TO (10)");
        run("ALTER TABLE public.reg_p1 ADD PRIMARY KEY (id)");
        run("SELECT pgseal.retention_set('public.reg_p1', '1 day')");
        run("ALTER TABLE public.reg_p RENAME COLUMN created_at TO made_at");
        assert_eq!(
            one::<String>("SELECT time_column::text FROM pgseal.retention_rules WHERE rel = 'public.reg_p1'::regclass"),
            "made_at"
        );
    }

    /// During a restore a registration that cannot be resolved is skipped with a
    /// WARNING instead of failing the COPY (which would lose every registration);
    /// outside a restore it is refused as before.
    #[pg_test]
    fn a_restore_skips_an_unresolvable_registration() {
        run("CREATE TABLE public.reg_r (id int PRIMARY KEY, tenant_id text, created_at timestamptz, token text)");
        run("CREATE VIEW public.reg_rv AS SELECT * FROM public.reg_r");
        assert_eq!(
            sqlstate("INSERT INTO pgseal.retention_rules (rel, keep, time_column, time_attnum) VALUES ('public.reg_r', '1 day', 'nope', 3)"),
            "42703"
        );
        run("SET LOCAL pgseal.restore = on");
        run("INSERT INTO pgseal.retention_rules (rel, keep, time_column, time_attnum) VALUES ('public.reg_r', '1 day', 'nope', 3)");
        run("INSERT INTO pgseal.retention_rules (rel, keep, time_column, time_attnum) VALUES ('public.reg_rv', '1 day', 'created_at', 3)");
        run("INSERT INTO pgseal.sealed_columns (rel, col, attnum) VALUES ('public.reg_r', 'gone', 4)");
        run("INSERT INTO pgseal.retention_rules (rel, keep, time_column, time_attnum) VALUES ('public.reg_r', '1 day', 'created_at', 9)");
        run("INSERT INTO pgseal.sealed_columns (rel, col, attnum) VALUES ('public.reg_r', 'token', 9)");
        assert_eq!(
            one::<String>("SELECT time_column::text || time_attnum FROM pgseal.retention_rules"),
            "created_at3"
        );
        assert_eq!(
            one::<String>("SELECT col::text || attnum FROM pgseal.sealed_columns"),
            "token4"
        );
        // An UPDATE is checked as always, restore or not.
        assert_eq!(
            sqlstate("UPDATE pgseal.sealed_columns SET col = 'nope'"),
            "42703"
        );
        run("RESET pgseal.restore");
    }

    /// The removal of a dropped table's default rule goes to the system chain,
    /// whatever tenant the dropping session names: not the append-only audit chain
    /// (which refused it, and the rule was kept dangling), not a victim's chain.
    #[pg_test]
    fn a_dropped_tables_rule_removal_goes_to_the_system_chain_whatever_the_context() {
        for t in ["reg_d1", "reg_d2", "reg_d3"] {
            run(&format!(
                "CREATE TABLE public.{t} (id int PRIMARY KEY, tenant_id text, created_at timestamptz)"
            ));
            run(&format!(
                "SELECT pgseal.retention_set('public.{t}', '30 days')"
            ));
        }
        run("SELECT pgseal.retention_set('public.reg_d3', '5 days', 'created_at', 'reg-owner')");
        let audit = entries("_pgseal_audit");
        let system = entries("_pgseal");
        tenant("_pgseal_audit");
        run("DROP TABLE public.reg_d1");
        tenant("reg-victim");
        run("DROP TABLE public.reg_d2");
        run("DROP TABLE public.reg_d3");
        run("RESET app.tenant_id");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.retention_rules"),
            0,
            "no dangling rule"
        );
        assert_eq!(entries("_pgseal_audit"), audit);
        assert_eq!(entries("reg-victim"), 0);
        assert_eq!(entries("_pgseal"), system + 3);
        let (event, p) = newest("reg-owner");
        assert_eq!(event, "retention.removed");
        assert_eq!(p.0["scope"], "tenant");
        // A default rule of a table that still exists still goes to the context's chain.
        run("CREATE TABLE public.reg_d4 (id int PRIMARY KEY, tenant_id text, created_at timestamptz)");
        run("SELECT pgseal.retention_set('public.reg_d4', '30 days')");
        tenant("reg-ctx");
        run("DELETE FROM pgseal.retention_rules WHERE rel = 'public.reg_d4'::regclass");
        assert_eq!(newest("reg-ctx").0, "retention.removed");
        run("RESET app.tenant_id");
        assert!(one::<bool>(
            "SELECT ok FROM pgseal.ledger_verify('_pgseal')"
        ));
    }

    #[pg_test]
    fn job_history_is_bounded() {
        run("INSERT INTO pgseal.job_runs (job, status) SELECT 'x', 'ok' FROM generate_series(1, 1005)");
        assert_eq!(one::<i64>("SELECT count(*) FROM pgseal.job_runs"), 1000);
        assert_eq!(
            sqlstate("INSERT INTO pgseal.job_runs (job, status) VALUES ('x', 'bogus')"),
            "23514"
        );
    }

    #[pg_test]
    fn tenants_of_lists_each_tenant_once() {
        run("CREATE TABLE public.ev (id int, tenant_id uuid)");
        run("CREATE INDEX ON public.ev (tenant_id)");
        run("INSERT INTO public.ev SELECT g, lpad(to_hex(g % 3), 32, '0')::uuid FROM generate_series(1, 30) g");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal._tenants_of('public.ev')"),
            3
        );
        assert_eq!(
            one::<String>("SELECT min(t) FROM pgseal._tenants_of('public.ev') t"),
            "00000000-0000-0000-0000-000000000000"
        );
    }

    #[pg_test]
    fn tenant_discovery_and_key_usage_never_plan_an_owners_code_as_superuser() {
        // Planning a query on a table runs its statistics' expressions as whoever
        // plans it: tenant discovery and key usage must not plan one as the
        // extension owner. The owner's function records who ran it.
        owner_trap("job_owner", "job");
        run("CREATE TABLE public.job_trap (id int PRIMARY KEY, tenant_id text, created_at timestamptz, tok text)");
        run("INSERT INTO public.job_trap VALUES (1, 'acme', now(), 'v2:k1:x')");
        run("SELECT pgseal.retention_set('public.job_trap', '30 days')");
        run("SELECT pgseal.vault_register_column('public.job_trap', 'tok')");
        run("ALTER TABLE public.job_trap OWNER TO job_owner");
        assert!(!one::<bool>(
            "SELECT pgseal._planning_runs_owner_code('public.job_trap'::regclass)"
        ));
        owner_trap_statistic("job_owner", "job", "public.job_trap");
        assert!(one::<bool>(
            "SELECT pgseal._planning_runs_owner_code('public.job_trap'::regclass)"
        ));
        run("TRUNCATE public.job_seen");
        assert_eq!(
            one::<String>("SELECT string_agg(t, ',') FROM pgseal._tenants_of('public.job_trap') t"),
            "acme"
        );
        one::<i64>("SELECT count(*) FROM pgseal.key_usage");
        let who = owner_trap_ran_as("job");
        assert_eq!(who, "job_owner", "the owner's code ran as: {who}");
    }

    #[pg_test]
    fn tenant_discovery_as_the_owner_is_not_narrowed_by_a_tenant_context() {
        // A protected table whose planning runs its owner's code is scanned as its
        // owner, under its policies: a tenant in the session (or a database
        // default of the setting) would narrow the listing to that tenant and
        // leave the others' expired rows. The scan runs with no tenant instead,
        // and fails.
        owner_trap("jn_owner", "jn");
        run("CREATE TABLE public.jn_t (id int PRIMARY KEY, tenant_id text NOT NULL)");
        run("INSERT INTO public.jn_t VALUES (1, 'acme'), (2, 'globex')");
        run("SELECT pgseal.tenant_protect('public.jn_t')");
        run("ALTER TABLE public.jn_t OWNER TO jn_owner");
        owner_trap_statistic("jn_owner", "jn", "public.jn_t");
        run("SET LOCAL app.tenant_id = 'acme'");
        assert_eq!(
            sqlstate("SELECT count(*) FROM pgseal._tenants_of('public.jn_t')"),
            "42501"
        );
        assert_eq!(
            one::<String>("SELECT current_setting('app.tenant_id')"),
            "acme"
        );
    }

    #[pg_test]
    fn tenant_discovery_as_the_owner_refuses_a_style_its_code_changed() {
        // The owner's code, run by the planner while pgseal scans the table as its
        // owner, sets how dates print for the rest of that scope: the listed text
        // would then name no tenant the caller reads back the same way.
        run("CREATE ROLE jd_owner");
        run("GRANT CREATE ON SCHEMA public TO jd_owner");
        run("CREATE TABLE public.jd_t (id int PRIMARY KEY, tenant_id date NOT NULL)");
        run("INSERT INTO public.jd_t VALUES (1, '2024-01-02')");
        run("ALTER TABLE public.jd_t OWNER TO jd_owner");
        run("SET LOCAL ROLE jd_owner");
        run(
            "CREATE FUNCTION public.jd_style(t text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
             BEGIN PERFORM pg_catalog.set_config('DateStyle', 'SQL, DMY', false); RETURN t; END $$",
        );
        run("CREATE STATISTICS public.jd_st ON (tenant_id::text || public.jd_style('x')), tenant_id FROM public.jd_t");
        run("RESET ROLE");
        assert!(one::<bool>(
            "SELECT pgseal._planning_runs_owner_code('public.jd_t'::regclass)"
        ));
        assert_eq!(
            sqlstate("SELECT count(*) FROM pgseal._tenants_of('public.jd_t')"),
            "55000"
        );
    }

    #[pg_test]
    fn tenant_discovery_as_the_owner_runs_no_third_roles_code() {
        // A partitioned table whose planning runs its owner's code is scanned as its
        // owner; a partition of a third role's, with that role's function in its
        // statistics, would then run that role's code with the owner's rights.
        owner_trap("jt_owner", "jto");
        owner_trap("jt_third", "jt");
        run("CREATE TABLE public.jt_parent (id int, tenant_id text) PARTITION BY LIST (tenant_id)");
        run("CREATE TABLE public.jt_part PARTITION OF public.jt_parent FOR VALUES IN ('acme')");
        run("INSERT INTO public.jt_parent VALUES (1, 'acme')");
        run("ALTER TABLE public.jt_parent OWNER TO jt_owner");
        owner_trap_statistic("jt_third", "jt", "public.jt_part");
        assert!(one::<bool>(
            "SELECT pgseal._planning_runs_owner_code('public.jt_parent'::regclass)"
        ));
        assert_eq!(
            sqlstate("SELECT count(*) FROM pgseal._tenants_of('public.jt_parent')"),
            "42501"
        );
        let who = owner_trap_ran_as("jt");
        assert_eq!(who, "", "the third role's code ran as: {who}");
    }

    #[pg_test]
    fn an_ancestors_partition_key_and_late_changes_count_as_owner_code() {
        run("CREATE FUNCTION public.job_key(t text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT t $$");
        // A partition inherits, as its partition constraint, every ancestor's
        // partition key expression, which planning a scan of it simplifies.
        run("CREATE TABLE public.job_parent (id int, tenant_id text) PARTITION BY LIST ((public.job_key(tenant_id)))");
        run("CREATE TABLE public.job_child PARTITION OF public.job_parent FOR VALUES IN ('acme')");
        assert!(one::<bool>(
            "SELECT pgseal._planning_runs_owner_code('public.job_child'::regclass)"
        ));
        // Whatever the check saw stays true until the scan: the table and its tree
        // are locked against new statistics, indexes, constraints and partitions.
        run("CREATE TABLE public.job_plain (id int, tenant_id text)");
        assert!(!one::<bool>(
            "SELECT pgseal._planning_runs_owner_code('public.job_plain'::regclass)"
        ));
        assert!(one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() \
               AND relation = 'public.job_plain'::regclass AND mode = 'ShareUpdateExclusiveLock' AND granted)"
        ));
    }

    #[pg_test]
    fn registrations_are_undone_only_by_a_role_that_could_make_them() {
        // Each registry's undo: true when it removed a registration, false after;
        // a pgseal_admin member without the table privilege its registration needs
        // (and not a member of the owner's role) cannot remove it, by the function
        // or by a DELETE of the row; the owner can. A retention rule's removal is
        // recorded.
        run("CREATE TABLE public.undo_t (id text PRIMARY KEY, tenant_id text NOT NULL, tok text, created_at timestamptz)");
        run("SELECT pgseal.subject_register('public.undo_t', 'id')");
        run("SELECT pgseal.vault_register_column('public.undo_t', 'tok')");
        run("SELECT pgseal.retention_set('public.undo_t', '30 days')");
        run("CREATE ROLE undo_admin IN ROLE pgseal_admin");
        run("GRANT SELECT ON public.undo_t TO undo_admin");
        run("SET LOCAL ROLE undo_admin");
        for (q, direct) in [
            (
                "SELECT pgseal.subject_unregister('public.undo_t', 'id')",
                "DELETE FROM pgseal.subject_columns WHERE rel = 'public.undo_t'::regclass",
            ),
            (
                "SELECT pgseal.vault_unregister_column('public.undo_t', 'tok')",
                "DELETE FROM pgseal.sealed_columns WHERE rel = 'public.undo_t'::regclass",
            ),
            (
                "SELECT pgseal.retention_remove('public.undo_t')",
                "DELETE FROM pgseal.retention_rules WHERE rel = 'public.undo_t'::regclass",
            ),
        ] {
            assert_eq!(sqlstate(q), "42501", "{q}");
            assert_eq!(sqlstate(direct), "42501", "{direct}");
        }
        run("RESET ROLE");
        for (table, n) in [
            ("subject_columns", 1),
            ("sealed_columns", 1),
            ("retention_rules", 1),
        ] {
            assert_eq!(
                one::<i64>(&format!(
                    "SELECT count(*) FROM pgseal.{table} WHERE rel = 'public.undo_t'::regclass"
                )),
                n,
                "{table}"
            );
        }
        // With the privileges, each goes, once.
        run("GRANT DELETE, UPDATE ON public.undo_t TO undo_admin");
        run("SET LOCAL ROLE undo_admin");
        for q in [
            "SELECT pgseal.subject_unregister('public.undo_t', 'id')",
            "SELECT pgseal.vault_unregister_column('public.undo_t', 'tok')",
            "SELECT pgseal.retention_remove('public.undo_t')",
        ] {
            assert!(one::<bool>(q), "{q}");
            assert!(!one::<bool>(q), "{q}");
        }
        run("RESET ROLE");
        for table in ["subject_columns", "sealed_columns", "retention_rules"] {
            assert_eq!(
                one::<i64>(&format!(
                    "SELECT count(*) FROM pgseal.{table} WHERE rel = 'public.undo_t'::regclass"
                )),
                0,
                "{table}"
            );
        }
        assert!(one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pgseal.ledger WHERE event = 'retention.removed' \
                AND payload ->> 'table' = 'public.undo_t')"
        ));
        assert_eq!(
            sqlstate("SELECT pgseal.subject_unregister(NULL, 'id')"),
            "22004"
        );
        // Nor by moving a registration to another table (an UPDATE), nor by
        // removing a table's anonymise declaration without UPDATE on it.
        run("CREATE TABLE public.undo_mine (id text PRIMARY KEY, tenant_id text NOT NULL, tok text)");
        run("GRANT UPDATE, DELETE ON public.undo_mine TO undo_admin");
        run("REVOKE DELETE, UPDATE ON public.undo_t FROM undo_admin");
        run("SELECT pgseal.vault_register_column('public.undo_t', 'tok')");
        run("SELECT pgseal.subject_anonymise('public.undo_t', '{tok}')");
        run("SET LOCAL ROLE undo_admin");
        assert_eq!(
            sqlstate(
                "UPDATE pgseal.sealed_columns SET rel = 'public.undo_mine'::regclass \
                  WHERE rel = 'public.undo_t'::regclass"
            ),
            "0A000"
        );
        assert_eq!(
            sqlstate("DELETE FROM pgseal.subject_anonymised_columns WHERE rel = 'public.undo_t'::regclass"),
            "42501"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.subject_anonymise('public.undo_t', '{}')"),
            "42501"
        );
        run("RESET ROLE");
        // A member of the owner's role may, without the privilege itself.
        run("CREATE ROLE undo_owner");
        run("ALTER TABLE public.undo_t OWNER TO undo_owner");
        run("REVOKE ALL ON public.undo_t FROM undo_owner");
        run("GRANT undo_owner TO undo_admin");
        run("SET LOCAL ROLE undo_admin");
        assert!(one::<bool>(
            "SELECT pgseal.vault_unregister_column('public.undo_t', 'tok')"
        ));
        run("RESET ROLE");
        // Not while an offboarding that exported the table is under way.
        run("SELECT pgseal.subject_register('public.undo_mine', 'id')");
        tenant("undo-off");
        run("SELECT pgseal.tenant_offboard('undo-off', '0')");
        run("SELECT count(*) FROM pgseal._offboard_export('undo-off')");
        run("SET LOCAL ROLE undo_admin");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_unregister('public.undo_mine', 'id')"),
            "55000"
        );
        run("RESET ROLE");
    }
}
