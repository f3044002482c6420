//! `#[pg_test]`s for the vault: each function and each error path with its SQLSTATE.
//! Every test runs in one transaction that is rolled back.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pg_tests::helpers::{sqlstate, tenant};

    extension_sql!(
        r#"
        -- Runs a statement and returns the SQLSTATE it raised, or 00000.
        CREATE FUNCTION tests.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS $f$
        BEGIN
            EXECUTE q;
            RETURN '00000';
        EXCEPTION WHEN OTHERS THEN
            RETURN SQLSTATE;
        END
        $f$;

        -- The message, detail and hint a statement raised.
        CREATE FUNCTION tests.error_text_of(q text) RETURNS text LANGUAGE plpgsql AS $f$
        DECLARE m text; d text; h text;
        BEGIN
            EXECUTE q;
            RETURN '';
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL, h = PG_EXCEPTION_HINT;
            RETURN concat_ws(' | ', m, d, h);
        END
        $f$;

        -- Seals inside a subtransaction that fails, then seals again outside it.
        CREATE FUNCTION tests.seal_after_rolled_back_seal() RETURNS text LANGUAGE plpgsql AS $f$
        BEGIN
            BEGIN
                PERFORM pgseal.vault_seal('doomed');
                RAISE EXCEPTION 'roll back the subtransaction';
            EXCEPTION WHEN OTHERS THEN
                NULL;
            END;
            RETURN pgseal.vault_seal('kept');
        END
        $f$;
        "#,
        name = "test_helpers",
    );

    fn one<T: FromDatum + IntoDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).expect("query failed")
    }

    fn text(sql: &str) -> String {
        one::<String>(sql).expect("NULL result")
    }

    fn seal(pt: &str, ctx: Option<&str>) -> String {
        Spi::get_one_with_args::<String>(
            "SELECT pgseal.vault_seal($1, $2)",
            &[pt.into(), ctx.into()],
        )
        .unwrap()
        .unwrap()
    }

    fn decrypt(sealed: &str, ctx: Option<&str>) -> Option<String> {
        Spi::get_one_with_args::<String>(
            "SELECT pgseal.vault_decrypt($1, $2)",
            &[sealed.into(), ctx.into()],
        )
        .unwrap()
    }

    fn decrypt_state(sealed: &str, ctx: &str) -> String {
        sqlstate(&format!(
            "SELECT pgseal.vault_decrypt({}, {ctx})",
            pgrx::spi::quote_literal(sealed)
        ))
    }

    fn key_id(sealed: &str) -> String {
        sealed.split(':').nth(1).unwrap().to_owned()
    }

    #[pg_test]
    fn seal_decrypt_round_trip() {
        tenant("acme");
        for pt in ["sk-live-0123456789", "", "pässwörd ✓"] {
            let s = seal(pt, Some("integrations.token"));
            assert_eq!(decrypt(&s, Some("integrations.token")).as_deref(), Some(pt));
        }
        let s = seal("no context", None);
        assert_eq!(decrypt(&s, None).as_deref(), Some("no context"));
    }

    #[pg_test]
    fn envelope_names_its_key() {
        tenant("acme");
        let s = seal("x", None);
        let parts: Vec<&str> = s.split(':').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], "v2");
        assert_eq!(parts[1].len(), 16);
        let stored = Spi::get_one_with_args::<String>(
            "SELECT tenant_id FROM pgseal.tenant_keys WHERE key_id = $1 AND state = 'active'",
            &[parts[1].into()],
        )
        .unwrap();
        assert_eq!(stored.as_deref(), Some("acme"));
        // the second seal reuses the tenant's key, with a fresh nonce
        let s2 = seal("x", None);
        assert_eq!(key_id(&s2), parts[1]);
        assert_ne!(s, s2);
    }

    #[pg_test]
    fn null_in_null_out() {
        tenant("acme");
        assert_eq!(one::<String>("SELECT pgseal.vault_decrypt(NULL)"), None);
        assert_eq!(one::<String>("SELECT pgseal.vault_seal(NULL)"), None);
        assert_eq!(one::<String>("SELECT pgseal.vault_redact(NULL)"), None);
        assert_eq!(one::<String>("SELECT pgseal.vault_rewrap(NULL)"), None);
    }

    #[pg_test]
    fn no_tenant_context_fails_closed() {
        assert_eq!(sqlstate("SELECT pgseal.current_tenant()"), "42501");
        assert_eq!(sqlstate("SELECT pgseal.vault_seal('x')"), "42501");
        tenant("acme");
        let s = seal("x", None);
        tenant("");
        assert_eq!(sqlstate("SELECT pgseal.current_tenant()"), "42501");
        assert_eq!(decrypt_state(&s, "NULL"), "42501");
        tenant("acme");
        assert_eq!(text("SELECT pgseal.current_tenant()"), "acme");
    }

    #[pg_test]
    fn tenant_setting_name_is_configurable() {
        Spi::run("SET LOCAL pgseal.tenant_setting = 'myapp.org'").unwrap();
        tenant("acme");
        assert_eq!(sqlstate("SELECT pgseal.current_tenant()"), "42501");
        Spi::run("SET LOCAL myapp.org = 'globex'").unwrap();
        assert_eq!(text("SELECT pgseal.current_tenant()"), "globex");
    }

    #[pg_test]
    fn other_tenant_is_refused() {
        tenant("acme");
        let s = seal("acme's token", None);
        tenant("globex");
        assert_eq!(decrypt_state(&s, "NULL"), "42501");
        assert_eq!(
            sqlstate(&format!(
                "SELECT pgseal.vault_redact({})",
                pgrx::spi::quote_literal(&s)
            )),
            "42501"
        );
    }

    #[pg_test]
    fn switching_tenants_between_decrypts_switches_keys() {
        // `vault_decrypt` keeps the tenant and the key it used last; each call must
        // still act for the tenant set now. "acme" and "acmf" differ in one byte.
        tenant("acme");
        let a = seal("acme's token", None);
        tenant("acmf");
        let f = seal("acmf's token", None);
        tenant("acme");
        assert_eq!(decrypt(&a, None).as_deref(), Some("acme's token"));
        assert_eq!(decrypt_state(&f, "NULL"), "42501");
        tenant("acmf");
        assert_eq!(decrypt_state(&a, "NULL"), "42501");
        assert_eq!(decrypt(&f, None).as_deref(), Some("acmf's token"));
        tenant("acme");
        assert_eq!(decrypt(&a, None).as_deref(), Some("acme's token"));
    }

    #[pg_test]
    fn error_paths_have_their_sqlstates() {
        tenant("acme");
        let s = seal("secret-value", Some("smtp.password"));
        // malformed envelopes
        for bad in [
            "",
            "garbage",
            "v1:abc:def",
            "v2:abc",
            "v2:a+b:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "v2:abc:!!!",
        ] {
            assert_eq!(decrypt_state(bad, "NULL"), "22P02", "{bad}");
        }
        // a well-formed envelope naming no key
        let unknown = format!("v2:AAAAAAAAAAAAAAAA:{}", s.rsplit(':').next().unwrap());
        assert_eq!(decrypt_state(&unknown, "'smtp.password'"), "22023");
        // wrong or missing context
        assert_eq!(decrypt_state(&s, "'other.context'"), "22023");
        assert_eq!(decrypt_state(&s, "NULL"), "22023");
        assert_eq!(decrypt_state(&s, "''"), "22023");
        // a flipped payload character
        let mut chars: Vec<char> = s.chars().collect();
        let i = chars.len() - 5;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        assert_eq!(decrypt_state(&tampered, "'smtp.password'"), "22023");
    }

    #[pg_test]
    fn errors_never_echo_input() {
        tenant("acme");
        let good = seal("TOPSECRETPLAINTEXT", Some("ctx"));
        let inputs = [
            "v2:SuperSecretKeyId:TOPSECRETPAYLOADTOPSECRETPAYLOADTOPSECRETPAYLOAD".to_owned(),
            "TOPSECRET-not-an-envelope".to_owned(),
            good.clone(),
        ];
        for input in &inputs {
            for ctx in ["NULL", "'SECRETCONTEXT'"] {
                let sql = format!(
                    "SELECT pgseal.vault_decrypt({}, {ctx})",
                    pgrx::spi::quote_literal(input)
                );
                let m = Spi::get_one_with_args::<String>(
                    "SELECT tests.error_text_of($1)",
                    &[sql.as_str().into()],
                )
                .unwrap()
                .unwrap();
                assert!(
                    !m.contains("TOPSECRET")
                        && !m.contains("SuperSecret")
                        && !m.contains("SECRETCONTEXT"),
                    "{m}"
                );
                assert!(!m.contains(&good[20..40]), "{m}");
            }
        }
    }

    #[pg_test]
    fn redact_shows_a_prefix_only() {
        tenant("acme");
        let s = seal("sk-live-51HxExampleToken", None);
        let r = Spi::get_one_with_args::<String>(
            "SELECT pgseal.vault_redact($1)",
            &[s.as_str().into()],
        )
        .unwrap();
        assert_eq!(r.as_deref(), Some("sk-l…"));
        let r = Spi::get_one_with_args::<String>(
            "SELECT pgseal.vault_redact($1, 2)",
            &[s.as_str().into()],
        )
        .unwrap();
        assert_eq!(r.as_deref(), Some("sk…"));
        let short = seal("1234", None);
        let r = Spi::get_one_with_args::<String>(
            "SELECT pgseal.vault_redact($1, 4)",
            &[short.as_str().into()],
        )
        .unwrap();
        assert_eq!(r.as_deref(), Some("1…"));
        let ctx = seal("sk-live-abcdefgh", Some("ai.key"));
        let r = Spi::get_one_with_args::<String>(
            "SELECT pgseal.vault_redact($1, 4, 'ai.key')",
            &[ctx.as_str().into()],
        )
        .unwrap();
        assert_eq!(r.as_deref(), Some("sk-l…"));
        assert_eq!(
            sqlstate(&format!(
                "SELECT pgseal.vault_redact({}, -1)",
                pgrx::spi::quote_literal(&s)
            )),
            "22023"
        );
    }

    #[pg_test]
    fn rotate_keeps_old_values_and_rewrap_moves_them() {
        tenant("acme");
        let old = seal("token-1", Some("c"));
        let new_id = text("SELECT pgseal.tenant_key_rotate('acme')");
        assert_ne!(new_id, key_id(&old));
        assert_eq!(one::<i64>("SELECT count(*) FROM pgseal.tenant_keys WHERE tenant_id = 'acme' AND state = 'active' AND purpose = 'dek'"), Some(1));
        assert_eq!(decrypt(&old, Some("c")).as_deref(), Some("token-1"));
        let fresh = seal("token-2", None);
        assert_eq!(key_id(&fresh), new_id);
        let moved = Spi::get_one_with_args::<String>(
            "SELECT pgseal.vault_rewrap($1, 'c')",
            &[old.as_str().into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(key_id(&moved), new_id);
        assert_eq!(decrypt(&moved, Some("c")).as_deref(), Some("token-1"));
        // already under the active key: unchanged
        let again = Spi::get_one_with_args::<String>(
            "SELECT pgseal.vault_rewrap($1, 'c')",
            &[moved.as_str().into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(again, moved);
        assert_eq!(sqlstate("SELECT pgseal.tenant_key_rotate('')"), "22023");
    }

    #[pg_test]
    fn shred_destroys_keys_even_when_cached() {
        tenant("acme");
        let s = seal("doomed", None);
        assert_eq!(decrypt(&s, None).as_deref(), Some("doomed")); // cached now
        tenant("globex");
        let other = seal("survivor", None);
        assert_eq!(one::<i32>("SELECT pgseal.tenant_shred('acme')"), Some(1));
        tenant("acme");
        assert_eq!(decrypt_state(&s, "NULL"), "22023");
        tenant("globex");
        assert_eq!(decrypt(&other, None).as_deref(), Some("survivor"));
        assert_eq!(one::<i64>("SELECT count(*) FROM pgseal.tenant_keys WHERE tenant_id = 'acme' AND purpose = 'dek' AND wrapped IS NOT NULL"), Some(0));
        // a later seal for the shredded tenant gets a brand-new key
        tenant("acme");
        let s2 = seal("after", None);
        assert_ne!(key_id(&s2), key_id(&s));
        assert_eq!(one::<i32>("SELECT pgseal.tenant_shred('nobody')"), Some(0));
    }

    #[pg_test]
    fn kek_rewrap_moves_keys_to_the_active_master_version() {
        Spi::run("SET LOCAL pgseal.master_key_active = 1").unwrap();
        tenant("t1");
        let a = seal("one", None);
        tenant("t2");
        let b = seal("two", None);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.tenant_keys WHERE kek_version = 1"),
            Some(2)
        );
        Spi::run("SET LOCAL pgseal.master_key_active = 0").unwrap();
        assert_eq!(one::<i32>("SELECT pgseal.kek_rewrap(1)"), Some(1));
        assert_eq!(one::<i32>("SELECT pgseal.kek_rewrap()"), Some(1));
        assert_eq!(one::<i32>("SELECT pgseal.kek_rewrap()"), Some(0));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.tenant_keys WHERE kek_version <> 2"),
            Some(0)
        );
        // the cache was emptied, so these unwrap the rewrapped keys under version 2
        assert_eq!(decrypt(&b, None).as_deref(), Some("two"));
        tenant("t1");
        assert_eq!(decrypt(&a, None).as_deref(), Some("one"));
        assert_eq!(sqlstate("SELECT pgseal.kek_rewrap(0)"), "22023");
    }

    #[pg_test]
    fn unloaded_active_version_is_55000() {
        tenant("acme");
        Spi::run("SET LOCAL pgseal.master_key_active = 9").unwrap();
        assert_eq!(sqlstate("SELECT pgseal.vault_seal('x')"), "55000");
    }

    #[pg_test]
    fn vault_status_reports_versions_not_bytes() {
        assert_eq!(
            one::<bool>("SELECT loaded FROM pgseal.vault_status()"),
            Some(true)
        );
        assert_eq!(
            one::<i32>("SELECT active_version FROM pgseal.vault_status()"),
            Some(2)
        );
        assert_eq!(
            text("SELECT versions::text FROM pgseal.vault_status()"),
            "{1,2}"
        );
        // The test cluster's key command echoes literal keys; a non-superuser must
        // not be able to read that command (GUC_SUPERUSER_ONLY).
        Spi::run("CREATE ROLE t_viewer").unwrap();
        Spi::run("SET LOCAL ROLE t_viewer").unwrap();
        let settings = one::<String>(
            "SELECT string_agg(coalesce(setting, ''), ' ') FROM pg_settings WHERE name LIKE 'pgseal.%'",
        )
        .unwrap_or_default();
        Spi::run("RESET ROLE").unwrap();
        assert!(
            !settings.contains("0001020304050607"),
            "pg_settings shows master key text"
        );
    }

    #[pg_test]
    fn encryption_limit_rotates_automatically() {
        tenant("busy");
        Spi::run("SET LOCAL pgseal.dek_max_encryptions = 3").unwrap();
        let sealed: Vec<String> = (0..7).map(|i| seal(&format!("v{i}"), None)).collect();
        let mut ids: Vec<String> = sealed.iter().map(|s| key_id(s)).collect();
        ids.dedup();
        assert_eq!(ids.len(), 3, "7 seals at 3 per key use 3 keys");
        for (i, s) in sealed.iter().enumerate() {
            assert_eq!(decrypt(s, None), Some(format!("v{i}")));
        }
        assert_eq!(one::<i64>("SELECT count(*) FROM pgseal.tenant_keys WHERE tenant_id = 'busy' AND state = 'active' AND purpose = 'dek'"), Some(1));
    }

    #[pg_test]
    fn rolled_back_key_is_never_used() {
        tenant("fresh");
        let s = text("SELECT tests.seal_after_rolled_back_seal()");
        let exists = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pgseal.tenant_keys WHERE key_id = $1)",
            &[key_id(&s).as_str().into()],
        )
        .unwrap();
        assert_eq!(
            exists,
            Some(true),
            "the surviving value must name a stored key"
        );
        assert_eq!(decrypt(&s, None).as_deref(), Some("kept"));
    }

    #[pg_test]
    fn read_only_transaction_cannot_seal() {
        tenant("acme");
        let s = seal("x", None);
        Spi::run("SET LOCAL transaction_read_only = on").unwrap();
        assert_eq!(sqlstate("SELECT pgseal.vault_seal('y')"), "25006");
        // Redaction needs no write; decrypt's audit rule is tested with the ledger.
        let q = pgrx::spi::quote_literal(&s);
        assert_eq!(
            Spi::get_one::<String>(&format!("SELECT pgseal.vault_redact({q}, 0)"))
                .unwrap()
                .as_deref(),
            Some("…")
        );
    }

    #[pg_test]
    fn roles_get_exactly_their_functions() {
        Spi::run("CREATE ROLE t_sealer IN ROLE pgseal_seal").unwrap();
        Spi::run("CREATE ROLE t_reader IN ROLE pgseal_decrypt").unwrap();
        Spi::run("CREATE ROLE t_admin IN ROLE pgseal_admin").unwrap();
        Spi::run("CREATE ROLE t_nobody").unwrap();
        tenant("acme");
        let s = seal("token-value", None);
        let q = pgrx::spi::quote_literal(&s);
        let cases: &[(&str, String, &str)] = &[
            ("t_sealer", "SELECT pgseal.vault_seal('x')".into(), "00000"),
            (
                "t_sealer",
                format!("SELECT pgseal.vault_redact({q})"),
                "00000",
            ),
            (
                "t_sealer",
                format!("SELECT pgseal.vault_decrypt({q})"),
                "42501",
            ),
            (
                "t_sealer",
                format!("SELECT pgseal.vault_rewrap({q})"),
                "42501",
            ),
            (
                "t_reader",
                format!("SELECT pgseal.vault_decrypt({q})"),
                "00000",
            ),
            (
                "t_reader",
                format!("SELECT pgseal.vault_rewrap({q})"),
                "00000",
            ),
            ("t_reader", "SELECT pgseal.vault_seal('x')".into(), "00000"),
            (
                "t_reader",
                "SELECT pgseal.tenant_shred('acme')".into(),
                "42501",
            ),
            (
                "t_admin",
                "SELECT pgseal.tenant_key_rotate('acme')".into(),
                "00000",
            ),
            ("t_admin", "SELECT pgseal.kek_rewrap()".into(), "00000"),
            (
                "t_admin",
                format!("SELECT pgseal.vault_decrypt({q})"),
                "42501",
            ),
            ("t_nobody", "SELECT pgseal.current_tenant()".into(), "00000"),
            (
                "t_nobody",
                "SELECT * FROM pgseal.vault_status()".into(),
                "00000",
            ),
            ("t_nobody", "SELECT pgseal.vault_seal('x')".into(), "42501"),
            (
                "t_nobody",
                format!("SELECT pgseal.vault_redact({q})"),
                "42501",
            ),
        ];
        for role in ["t_sealer", "t_reader", "t_admin", "t_nobody"] {
            Spi::run(&format!("SET LOCAL ROLE {role}")).unwrap();
            assert_eq!(
                sqlstate("SELECT * FROM pgseal.tenant_keys"),
                "42501",
                "{role} read the key table"
            );
            Spi::run("RESET ROLE").unwrap();
        }
        for (role, sql, want) in cases {
            Spi::run(&format!("SET LOCAL ROLE {role}")).unwrap();
            let got = sqlstate(sql);
            Spi::run("RESET ROLE").unwrap();
            assert_eq!(&got, want, "{role}: {sql}");
        }
    }
}
