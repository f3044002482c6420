//! `#[pg_test]`s for the SQL side of pgseald's jobs: retention rules and holds, the
//! sealed-column registry, key usage and the bounded job history.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pg_tests::helpers::{one, run, sqlstate};

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
}
