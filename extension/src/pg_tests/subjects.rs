//! `#[pg_test]`s for data subjects (issue 19): subjects in entries, registration,
//! export and erasure, and the ways an attacker would try to erase or restore
//! evidence around them.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pg_tests::helpers::{
        lock_ledger_tables, one, owner_trap, owner_trap_json_cast, owner_trap_ran_as, run,
        sqlstate, tenant,
    };

    fn append_naming(event: &str, payload: &str, subjects: &str) -> i64 {
        one::<i64>(&format!(
            "SELECT seq FROM pgseal.ledger_append({}, {}::jsonb, NULL, {subjects})",
            pgrx::spi::quote_literal(event),
            pgrx::spi::quote_literal(payload)
        ))
    }

    /// (ok, checked, erased) of the tenant context's chain.
    fn verify() -> (bool, i64, i64) {
        let (ok, checked, erased) = Spi::get_three::<bool, i64, i64>(
            "SELECT ok, checked, erased FROM pgseal.ledger_verify()",
        )
        .unwrap();
        (ok.unwrap(), checked.unwrap(), erased.unwrap())
    }

    /// The offline verifier's report on the tenant's export.
    fn verify_offline(tenant: &str) -> pgseal_core::chain::Report {
        let lines: Vec<String> = Spi::connect(|c| {
            c.select(
                "SELECT e::text FROM pgseal.ledger_export($1) e",
                None,
                &[tenant.into()],
            )
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect()
        });
        let r = pgseal_core::export::verify_export(lines.join("\n").as_bytes(), &[], None).unwrap();
        assert_eq!(r.len(), 1);
        r[0].report.clone()
    }

    /// A table of users with a subject column and a sealed column, two users of
    /// tenant `tenant` and one of another tenant, and an audit trigger.
    fn users(tenant_id: &str) {
        run("CREATE TABLE public.subj_users (id text PRIMARY KEY, tenant_id text NOT NULL, email text, token text)");
        run("CREATE TABLE public.subj_orders (id int PRIMARY KEY, tenant_id text NOT NULL, buyer uuid, note text)");
        run("SELECT pgseal.subject_register('public.subj_users', 'id')");
        run("SELECT pgseal.vault_register_column('public.subj_users', 'token', 'users.token')");
        run("SELECT pgseal.ledger_audit('public.subj_users')");
        tenant(tenant_id);
        run(&format!(
            "INSERT INTO public.subj_users VALUES \
             ('u1', '{tenant_id}', 'one@example.com', pgseal.vault_seal('tok-1', 'users.token')), \
             ('u2', '{tenant_id}', 'two@example.com', NULL)"
        ));
    }

    #[pg_test]
    fn entries_name_their_subjects_sorted_and_bad_subjects_are_refused() {
        tenant("subj-append");
        let seq = append_naming("e", "{}", "ARRAY['b', 'a', 'a']");
        assert_eq!(
            one::<String>(&format!(
                "SELECT subjects::text FROM pgseal.ledger WHERE tenant_id = 'subj-append' AND seq = {seq}"
            )),
            "{a,b}"
        );
        append_naming("e", "{}", "NULL");
        append_naming("e", "{}", "'{}'");
        for (subjects, code) in [
            ("ARRAY['a', NULL]", "22004"),
            ("ARRAY['']", "22023"),
            ("ARRAY['  ']", "22023"),
            ("ARRAY[E'a\\nb']", "22023"),
            ("ARRAY[repeat('x', 257)]", "54000"),
            (
                "(SELECT array_agg(g::text) FROM generate_series(1, 65) g)",
                "54000",
            ),
        ] {
            assert_eq!(
                sqlstate(&format!(
                    "SELECT pgseal.ledger_append('e', '{{}}', NULL, {subjects})"
                )),
                code,
                "{subjects}"
            );
        }
        assert_eq!(verify(), (true, 3, 0));
        // Subjects are hashed: changing them breaks the entry.
        let r = verify_offline("subj-append");
        assert!(r.ok(), "{r:?}");
    }

    #[pg_test]
    fn erasure_deletes_the_rows_and_payloads_and_the_chain_still_verifies() {
        users("subj-erase");
        append_naming(
            "profile.changed",
            r#"{"email": "one@example.com"}"#,
            "ARRAY['u1']",
        );
        append_naming(
            "profile.changed",
            r#"{"email": "two@example.com"}"#,
            "ARRAY['u2']",
        );
        append_naming("shared", r#"{"both": true}"#, "ARRAY['u1', 'u2']");
        // The audit named each inserted row's subject.
        assert_eq!(
            one::<String>(
                "SELECT string_agg(subjects::text, ' ' ORDER BY seq) FROM pgseal.ledger \
                 WHERE tenant_id = 'subj-erase' AND event = 'row.insert'"
            ),
            "{u1} {u2}"
        );
        let before: i64 = one("SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 'subj-erase'");
        let receipt: pgrx::JsonB = one("SELECT pgseal.subject_erase('subj-erase', 'u1')");
        // Its row insert, its two entries, and the audit of the delete just made.
        assert_eq!(receipt.0["ledger_entries_erased"], 4, "{:?}", receipt.0);
        assert_eq!(receipt.0["tables"][0]["deleted"], 1, "{:?}", receipt.0);
        assert_eq!(receipt.0["tables"][0]["table"], "public.subj_users");
        assert_eq!(
            one::<String>("SELECT string_agg(id, ',' ORDER BY id) FROM public.subj_users"),
            "u2"
        );
        // u1's entries (its row insert, its own and the shared one) lost payload and
        // salt and kept a commitment; u2's own entries are whole.
        assert_eq!(
            one::<String>(
                "SELECT string_agg(seq::text || ':' || (payload IS NULL)::text || (salt IS NULL)::text \
                        || coalesce(length(commitment), 0)::text, ' ' ORDER BY seq) \
                 FROM pgseal.ledger WHERE tenant_id = 'subj-erase' AND subjects @> ARRAY['u1']"
            ),
            one::<String>(
                "SELECT string_agg(seq::text || ':truetrue32', ' ' ORDER BY seq) \
                 FROM pgseal.ledger WHERE tenant_id = 'subj-erase' AND subjects @> ARRAY['u1'] \
                   AND event <> 'subject.erased'"
            ) + " "
                + &one::<String>(
                    "SELECT seq::text || ':falsefalse0' FROM pgseal.ledger \
                     WHERE tenant_id = 'subj-erase' AND event = 'subject.erased'"
                )
        );
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 'subj-erase' \
                 AND subjects = ARRAY['u2'] AND payload IS NOT NULL"
            ),
            2
        );
        // The receipt names the subject, never its data.
        let receipt_payload: String = one(
            "SELECT payload::text FROM pgseal.ledger WHERE tenant_id = 'subj-erase' AND event = 'subject.erased'",
        );
        assert!(
            !receipt_payload.contains("one@example.com"),
            "{receipt_payload}"
        );
        // The receipt lists the erased entries' seqs as runs.
        let runs = receipt.0["seqs"].as_array().unwrap();
        let listed: i64 = runs
            .iter()
            .map(|r| r[1].as_i64().unwrap() - r[0].as_i64().unwrap() + 1)
            .sum();
        assert_eq!(listed, 4, "{runs:?}");
        // Nothing else was removed; online and offline verification count the erased.
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 'subj-erase'"),
            before + 2 // the row delete's audit entry and the receipt
        );
        assert_eq!(verify(), (true, before + 2, 4));
        let r = verify_offline("subj-erase");
        assert!(r.ok(), "{r:?}");
        assert_eq!((r.checked, r.erased), (before + 2, 4));
        // Erasing again finds nothing left, and keeps the receipts.
        let again: pgrx::JsonB = one("SELECT pgseal.subject_erase('subj-erase', 'u1')");
        assert_eq!(again.0["ledger_entries_erased"], 0);
        assert!(verify().0);
    }

    #[pg_test]
    fn nobody_erases_or_restores_a_payload_by_hand() {
        tenant("subj-hand");
        let seq = append_naming("e", r#"{"secret": 1}"#, "ARRAY['u1']");
        assert!(!one::<bool>("SELECT pgseal._ledger_erasing()"));
        // A superuser's UPDATE, erasure-shaped or not, is refused.
        for sql in [
            format!("UPDATE pgseal.ledger SET payload = NULL, salt = NULL, commitment = sha256('x') WHERE tenant_id = 'subj-hand' AND seq = {seq}"),
            format!("UPDATE pgseal.ledger SET subjects = '{{}}' WHERE tenant_id = 'subj-hand' AND seq = {seq}"),
        ] {
            assert_eq!(sqlstate(&sql), "42501", "{sql}");
        }
        run("SET LOCAL session_replication_role = replica");
        assert_eq!(
            sqlstate(&format!("UPDATE pgseal.ledger SET payload = NULL WHERE tenant_id = 'subj-hand' AND seq = {seq}")),
            "42501"
        );
        run("SET LOCAL session_replication_role = origin");
        // After an erasure the salt is gone: the payload cannot be put back.
        run("SELECT pgseal.subject_erase('subj-hand', 'u1')");
        assert!(one::<bool>(&format!(
            "SELECT salt IS NULL AND payload IS NULL FROM pgseal.ledger WHERE tenant_id = 'subj-hand' AND seq = {seq}"
        )));
        assert_eq!(
            sqlstate(&format!("UPDATE pgseal.ledger SET payload = '{{\"secret\": 1}}' WHERE tenant_id = 'subj-hand' AND seq = {seq}")),
            "42501"
        );
    }

    #[pg_test]
    fn an_edited_entry_is_not_erased() {
        // Takes the ledger's locks before lifting a guard (the tests run in
        // parallel).
        lock_ledger_tables();
        tenant("subj-edited");
        append_naming("e", r#"{"amount": 10}"#, "ARRAY['u1']");
        let seq = append_naming("e", r#"{"amount": 20}"#, "ARRAY['u1']");
        run("ALTER EVENT TRIGGER pgseal_ledger_ddl_guard DISABLE");
        run("ALTER TABLE pgseal.ledger DISABLE TRIGGER pgseal_ledger_guard");
        run(&format!(
            r#"UPDATE pgseal.ledger SET payload = '{{"amount": 1}}' WHERE tenant_id = 'subj-edited' AND seq = {seq}"#
        ));
        run("ALTER TABLE pgseal.ledger ENABLE ALWAYS TRIGGER pgseal_ledger_guard");
        // Erasing would store a commitment of the edited payload and hide the edit
        // behind "erased": refused, and nothing is erased.
        assert_eq!(
            sqlstate("SELECT pgseal.subject_erase('subj-edited', 'u1')"),
            "XX001"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 'subj-edited' AND salt IS NULL"),
            0
        );
    }

    #[pg_test]
    fn erasure_is_refused_under_a_hold_for_another_tenant_and_for_non_admins() {
        users("subj-refused");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_erase('other', 'u1')"),
            "22023"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.subject_erase('subj-refused', NULL)"),
            "22004"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.subject_erase('subj-refused', '')"),
            "22023"
        );
        run("SELECT pgseal.retention_hold('subj-refused', true)");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_erase('subj-refused', 'u1')"),
            "55000"
        );
        run("SELECT pgseal.retention_hold('subj-refused', false)");
        run("CREATE ROLE subj_ledger IN ROLE pgseal_ledger");
        run("GRANT SELECT, DELETE ON public.subj_users TO subj_ledger");
        run("SET LOCAL ROLE subj_ledger");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_erase('subj-refused', 'u1')"),
            "42501"
        );
        run("RESET ROLE");
        assert_eq!(one::<i64>("SELECT count(*) FROM public.subj_users"), 2);
    }

    #[pg_test]
    fn export_returns_rows_decrypted_and_entries_and_is_recorded() {
        users("subj-export");
        run("INSERT INTO public.subj_orders VALUES (1, 'subj-export', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'n')");
        run("SELECT pgseal.subject_register('public.subj_orders', 'buyer')");
        append_naming("profile.changed", r#"{"k": 1}"#, "ARRAY['u1']");
        let out: pgrx::JsonB = one("SELECT pgseal.subject_export('subj-export', 'u1')");
        let tables = out.0["tables"].as_array().unwrap();
        let users = tables
            .iter()
            .find(|t| t["table"] == "public.subj_users")
            .unwrap();
        let rows = users["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["email"], "one@example.com");
        assert_eq!(rows[0]["token"], "tok-1");
        // Entries naming u1: its row insert and the append.
        let ledger = out.0["ledger"].as_array().unwrap();
        assert_eq!(
            ledger
                .iter()
                .map(|e| e["event"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["row.insert", "profile.changed"]
        );
        // The uuid column matches by its text form.
        let by_uuid: pgrx::JsonB = one(
            "SELECT pgseal.subject_export('subj-export', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11')",
        );
        let orders = by_uuid.0["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == "public.subj_orders")
            .unwrap()
            .clone();
        assert_eq!(orders["rows"].as_array().unwrap().len(), 1);
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 'subj-export' \
                 AND event = 'subject.exported' AND subjects = ARRAY['u1']"
            ),
            1
        );
        // Without pgseal_decrypt the sealed column stays sealed.
        run("CREATE ROLE subj_reader IN ROLE pgseal_ledger");
        run("GRANT SELECT ON public.subj_users, public.subj_orders TO subj_reader");
        run("SET LOCAL ROLE subj_reader");
        let sealed: pgrx::JsonB = one("SELECT pgseal.subject_export('subj-export', 'u1')");
        run("RESET ROLE");
        let token = sealed.0["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == "public.subj_users")
            .unwrap()["rows"][0]["token"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(token.starts_with("v2:"), "{token}");
    }

    #[pg_test]
    fn registrations_need_delete_and_follow_renames_and_drops() {
        run("CREATE TABLE public.subj_untenanted (id text PRIMARY KEY)");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_register('public.subj_untenanted', 'id')"),
            "42703"
        );
        run("CREATE TABLE public.subj_int_tenant (id text PRIMARY KEY, tenant_id int)");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_register('public.subj_int_tenant', 'id')"),
            "42804"
        );
        run("CREATE TEMP TABLE subj_temp (id text PRIMARY KEY, tenant_id text)");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_register('subj_temp', 'id')"),
            "42809"
        );
        run("CREATE TABLE public.subj_reg (id bigint PRIMARY KEY, tenant_id text, who text, at timestamptz)");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_register('public.subj_reg', 'at')"),
            "42804"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.subject_register('public.subj_reg', 'nope')"),
            "42703"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.subject_register('pgseal.ledger', 'actor')"),
            "42501"
        );
        run("CREATE ROLE subj_admin IN ROLE pgseal_admin");
        run("GRANT SELECT ON public.subj_reg TO subj_admin");
        run("SET LOCAL ROLE subj_admin");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_register('public.subj_reg', 'who')"),
            "42501"
        );
        run("RESET ROLE");
        run("SELECT pgseal.subject_register('public.subj_reg', 'who')");
        run("SELECT pgseal.subject_register('public.subj_reg', 'id')");
        run("ALTER TABLE public.subj_reg RENAME COLUMN who TO owner_id");
        assert_eq!(
            one::<String>("SELECT string_agg(col, ',' ORDER BY col) FROM pgseal.subject_columns WHERE rel = 'public.subj_reg'::regclass"),
            "id,owner_id"
        );
        run("ALTER TABLE public.subj_reg DROP COLUMN owner_id");
        run("DROP TABLE public.subj_reg");
        assert_eq!(one::<i64>("SELECT count(*) FROM pgseal.subject_columns"), 0);
    }

    #[pg_test]
    fn another_tenants_rows_with_the_same_subject_id_are_untouched() {
        users("subj-mine");
        // Another tenant's users with the id u1, in the same table, which has no
        // row-level security: only the tenant_id filter keeps them out.
        run("ALTER TABLE public.subj_users DROP CONSTRAINT subj_users_pkey");
        run("INSERT INTO public.subj_users VALUES ('u1', 'subj-theirs', 'x@example.com', NULL), ('u1', 'subj-theirs', 'y@example.com', NULL)");
        let out: pgrx::JsonB = one("SELECT pgseal.subject_export('subj-mine', 'u1')");
        let rows = out.0["tables"][0]["rows"].as_array().unwrap().clone();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["tenant_id"], "subj-mine");
        let receipt: pgrx::JsonB = one("SELECT pgseal.subject_erase('subj-mine', 'u1')");
        assert_eq!(receipt.0["tables"][0]["deleted"], 1);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.subj_users WHERE id = 'u1' AND tenant_id = 'subj-theirs'"),
            2
        );
    }

    #[pg_test]
    fn a_table_owners_code_runs_as_the_owner_not_as_the_erasing_superuser() {
        run("CREATE ROLE subj_owner");
        run("CREATE TABLE public.subj_trojan (id text PRIMARY KEY, tenant_id text NOT NULL)");
        run("CREATE TABLE public.subj_seen (who text, escalated boolean)");
        run("ALTER TABLE public.subj_trojan OWNER TO subj_owner");
        run("ALTER TABLE public.subj_seen OWNER TO subj_owner");
        // The owner's trigger tries to make its owner a superuser with the
        // privileges of whoever deletes, and records who it ran as; it also leaves
        // settings behind for the caller's later statements, and appends an entry
        // that would carry the caller's role as its db_role.
        run(
            r#"CREATE FUNCTION public.subj_trojan_fn() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 BEGIN
                   EXECUTE 'ALTER ROLE subj_owner SUPERUSER';
                   INSERT INTO public.subj_seen VALUES (current_user, true);
                 EXCEPTION WHEN OTHERS THEN
                   INSERT INTO public.subj_seen VALUES (current_user, false);
                 END;
                 PERFORM set_config('search_path', 'public, pg_catalog', false);
                 PERFORM set_config('app.tenant_id', 'somebody-else', false);
                 PERFORM set_config('app.user_id', 'forged', false);
                 BEGIN
                   PERFORM pgseal.ledger_append('owner.was.here');
                   INSERT INTO public.subj_tries VALUES ('append', '00000');
                 EXCEPTION WHEN OTHERS THEN
                   INSERT INTO public.subj_tries VALUES ('append', SQLSTATE);
                 END;
                 RETURN OLD;
               END $$"#,
        );
        run("CREATE TABLE public.subj_tries (what text, sqlstate text)");
        run("ALTER TABLE public.subj_tries OWNER TO subj_owner");
        run("ALTER FUNCTION public.subj_trojan_fn() OWNER TO subj_owner");
        run("CREATE TRIGGER t BEFORE DELETE ON public.subj_trojan FOR EACH ROW EXECUTE FUNCTION public.subj_trojan_fn()");
        run("SELECT pgseal.subject_register('public.subj_trojan', 'id')");
        tenant("subj-trojan");
        run("INSERT INTO public.subj_trojan VALUES ('u1', 'subj-trojan')");
        let receipt: pgrx::JsonB = one("SELECT pgseal.subject_erase('subj-trojan', 'u1')");
        assert_eq!(receipt.0["tables"][0]["deleted"], 1);
        assert_eq!(
            one::<String>("SELECT who || ':' || escalated FROM public.subj_seen"),
            "subj_owner:false"
        );
        assert!(!one::<bool>(
            "SELECT rolsuper FROM pg_roles WHERE rolname = 'subj_owner'"
        ));
        // Nothing the owner's code set reached the caller's session.
        assert_eq!(
            one::<String>("SELECT current_setting('app.tenant_id')"),
            "subj-trojan"
        );
        assert_eq!(
            one::<String>("SELECT coalesce(current_setting('app.user_id', true), '')"),
            ""
        );
        assert!(!one::<String>("SHOW search_path").starts_with("public, pg_catalog"));
        assert_eq!(
            one::<String>("SELECT string_agg(what || ':' || sqlstate, ',') FROM public.subj_tries"),
            "append:42501"
        );
    }

    #[pg_test]
    fn an_anonymising_table_keeps_its_rows_without_the_subjects_data() {
        users("subj-anon");
        run(
            "CREATE TABLE public.subj_invoices (id int PRIMARY KEY, tenant_id text NOT NULL, customer text, \
             address text, amount numeric NOT NULL, phone text NOT NULL DEFAULT 'none')",
        );
        run("SELECT pgseal.subject_register('public.subj_invoices', 'customer')");
        run("SELECT pgseal.ledger_audit('public.subj_invoices')");
        for (sql, code) in [
            (
                "SELECT pgseal.subject_anonymise('public.subj_invoices', NULL)",
                "22004",
            ),
            (
                "SELECT pgseal.subject_anonymise('public.subj_invoices', ARRAY[NULL]::name[])",
                "22004",
            ),
            (
                "SELECT pgseal.subject_anonymise('public.subj_invoices', ARRAY['nope'])",
                "42703",
            ),
            (
                "SELECT pgseal.subject_anonymise('public.subj_invoices', ARRAY['amount'])",
                "23502",
            ),
            (
                "SELECT pgseal.subject_anonymise('public.subj_invoices', ARRAY['tenant_id'])",
                "22023",
            ),
            (
                "SELECT pgseal.subject_anonymise('pgseal.subject_columns', ARRAY['col'])",
                "42501",
            ),
        ] {
            assert_eq!(sqlstate(sql), code, "{sql}");
        }
        // The registration check runs as the caller: UPDATE on the table is needed.
        run("CREATE ROLE subj_anon_admin IN ROLE pgseal_admin");
        run("GRANT SELECT, DELETE ON public.subj_invoices TO subj_anon_admin");
        run("SET LOCAL ROLE subj_anon_admin");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_anonymise('public.subj_invoices', ARRAY['address'])"),
            "42501"
        );
        run("RESET ROLE");
        run("SELECT pgseal.subject_anonymise('public.subj_invoices', ARRAY['address', 'phone'])");
        run(
            "INSERT INTO public.subj_invoices VALUES \
             (1, 'subj-anon', 'u1', '1 Main St', 10, '555-1'), (2, 'subj-anon', 'u1', '1 Main St', 20, '555-1'), \
             (3, 'subj-anon', 'u2', '2 Side St', 30, '555-2'), (4, 'subj-other', 'u1', '3 Far Rd', 40, '555-3')",
        );
        let receipt: pgrx::JsonB = one("SELECT pgseal.subject_erase('subj-anon', 'u1')");
        let tables = receipt.0["tables"].as_array().unwrap();
        let invoices = tables
            .iter()
            .find(|t| t["table"] == "public.subj_invoices")
            .unwrap();
        assert_eq!(invoices["anonymised"], 2, "{tables:?}");
        assert!(invoices.get("deleted").is_none());
        let users = tables
            .iter()
            .find(|t| t["table"] == "public.subj_users")
            .unwrap();
        assert_eq!(users["deleted"], 1);
        // The rows stay, without the subject and its declared columns; the other
        // subject's row and the other tenant's rows are untouched.
        assert_eq!(
            one::<String>(
                "SELECT string_agg(id || ':' || coalesce(customer, '-') || ':' || coalesce(address, '-') \
                        || ':' || amount || ':' || phone, ' ' ORDER BY id) FROM public.subj_invoices"
            ),
            "1:-:-:10:none 2:-:-:20:none 3:u2:2 Side St:30:555-2 4:u1:3 Far Rd:40:555-3"
        );
        // No entry of the tenant that names u1 keeps a payload: the inserts' audit
        // and the anonymising updates' audit (its before image has the address).
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 'subj-anon' AND subjects @> ARRAY['u1'] \
                 AND payload IS NOT NULL AND event <> 'subject.erased'"
            ),
            0
        );
        assert!(!one::<bool>(
            "SELECT bool_or(payload::text LIKE '%1 Main St%') FROM pgseal.ledger WHERE tenant_id = 'subj-anon'"
        ));
        assert!(verify().0);
        // A declared column that lost its default cannot be cleared: nothing changes.
        run("ALTER TABLE public.subj_invoices ALTER COLUMN phone DROP DEFAULT");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_erase('subj-anon', 'u2')"),
            "55000"
        );
        assert_eq!(
            one::<String>("SELECT customer FROM public.subj_invoices WHERE id = 3"),
            "u2"
        );
        // Dropping a declared column drops its declaration; an empty declaration
        // makes erasure delete again.
        run("ALTER TABLE public.subj_invoices DROP COLUMN phone");
        assert_eq!(
            one::<String>(
                "SELECT string_agg(col, ',') FROM pgseal.subject_anonymised_columns \
                 WHERE rel = 'public.subj_invoices'::regclass"
            ),
            "address"
        );
        run("SELECT pgseal.subject_anonymise('public.subj_invoices', '{}')");
        let receipt: pgrx::JsonB = one("SELECT pgseal.subject_erase('subj-anon', 'u2')");
        let invoices = receipt.0["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == "public.subj_invoices")
            .unwrap()
            .clone();
        assert_eq!(invoices["deleted"], 1);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM public.subj_invoices WHERE tenant_id = 'subj-anon'"),
            2
        );
    }

    #[pg_test]
    fn another_roles_trigger_partition_or_domain_is_never_run_as_the_table_owner() {
        owner_trap("subj_third", "subj_third");
        run("CREATE ROLE subj_tbl_owner");
        run(
            "CREATE TABLE public.subj_trig (id text, tenant_id text NOT NULL, note text) PARTITION BY LIST (tenant_id)",
        );
        run("CREATE TABLE public.subj_trig_a PARTITION OF public.subj_trig FOR VALUES IN ('subj-trig')");
        run("ALTER TABLE public.subj_trig OWNER TO subj_tbl_owner");
        run("ALTER TABLE public.subj_trig_a OWNER TO subj_tbl_owner");
        run("SELECT pgseal.subject_register('public.subj_trig', 'id')");
        tenant("subj-trig");
        run("INSERT INTO public.subj_trig VALUES ('u1', 'subj-trig', 'n')");
        // A holder of the TRIGGER privilege adds a trigger with its own function.
        run("GRANT TRIGGER ON public.subj_trig_a TO subj_third");
        run("SET LOCAL ROLE subj_third");
        run(
            "CREATE FUNCTION public.subj_third_trg() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM public.subj_third_note(); RETURN OLD; END $$",
        );
        run(
            "CREATE TRIGGER z BEFORE DELETE ON public.subj_trig_a FOR EACH ROW \
             EXECUTE FUNCTION public.subj_third_trg()",
        );
        run("RESET ROLE");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_erase('subj-trig', 'u1')"),
            "42501"
        );
        // The refusal names the table it is about.
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal("SELECT pgseal.subject_erase('subj-trig', 'u1')")
        ));
        assert!(msg.contains("(table public.subj_trig)"), "{msg}");
        assert_eq!(owner_trap_ran_as("subj_third"), "");
        assert_eq!(one::<i64>("SELECT count(*) FROM public.subj_trig"), 1);
        // SECURITY DEFINER does not make it safe: its owner can turn it back into
        // SECURITY INVOKER at any time, between the check and the delete.
        run("ALTER FUNCTION public.subj_third_trg() SECURITY DEFINER");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_erase('subj-trig', 'u1')"),
            "42501"
        );
        // Disabled, it runs nowhere: allowed.
        run("ALTER TABLE public.subj_trig_a DISABLE TRIGGER z");
        let receipt: pgrx::JsonB = one("SELECT pgseal.subject_erase('subj-trig', 'u1')");
        assert_eq!(receipt.0["tables"][0]["deleted"], 1);
        assert_eq!(owner_trap_ran_as("subj_third"), "");
        run("INSERT INTO public.subj_trig VALUES ('u1', 'subj-trig', 'n')");
        run("DROP TRIGGER z ON public.subj_trig_a");
        // Where the row audit is on, a column of a third role's type (whose cast to
        // json the audit would run as the owner) stops the erasure.
        owner_trap_json_cast("subj_third", "subj_third");
        run("CREATE TABLE public.subj_aud (id text, tenant_id text NOT NULL, mood public.subj_third_mood[])");
        run("ALTER TABLE public.subj_aud OWNER TO subj_tbl_owner");
        run("SELECT pgseal.subject_register('public.subj_aud', 'id')");
        run("INSERT INTO public.subj_aud VALUES ('u9', 'subj-trig', '{calm}')");
        run("TRUNCATE public.subj_third_seen");
        one::<pgrx::JsonB>("SELECT pgseal.subject_erase('subj-trig', 'u9')");
        run("INSERT INTO public.subj_aud VALUES ('u9', 'subj-trig', '{calm}')");
        run("SELECT pgseal.ledger_audit('public.subj_aud')");
        run("TRUNCATE public.subj_third_seen");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_erase('subj-trig', 'u9')"),
            "42501"
        );
        assert_eq!(owner_trap_ran_as("subj_third"), "");
        run("SELECT pgseal.ledger_unaudit('public.subj_aud')");
        // A partition of another owner: its triggers and index expressions are its
        // owner's, so export and erasure refuse the tree.
        run("ALTER TABLE public.subj_trig_a OWNER TO subj_third");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_export('subj-trig', 'u1')"),
            "42501"
        );
        run("ALTER TABLE public.subj_trig_a OWNER TO subj_tbl_owner");
        // A column to clear whose domain (default, CHECK) is another role's.
        run("SET LOCAL ROLE subj_third");
        run("CREATE DOMAIN public.subj_third_dom AS text CHECK (public.subj_third_imm(VALUE) IS NOT NULL)");
        run("RESET ROLE");
        run("CREATE TABLE public.subj_dom (id text, tenant_id text NOT NULL, note public.subj_third_dom)");
        run("ALTER TABLE public.subj_dom OWNER TO subj_tbl_owner");
        run("SELECT pgseal.subject_register('public.subj_dom', 'id')");
        run("SELECT pgseal.subject_anonymise('public.subj_dom', ARRAY['note'])");
        run("INSERT INTO public.subj_dom VALUES ('u1', 'subj-trig', 'x')");
        run("TRUNCATE public.subj_third_seen");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_erase('subj-trig', 'u1')"),
            "42501"
        );
        assert_eq!(owner_trap_ran_as("subj_third"), "");
    }

    #[pg_test]
    fn code_run_for_one_table_cannot_plant_a_trigger_on_the_next() {
        // The owner of one registered table (statements on it run as that owner)
        // holds TRIGGER on the next one; its trigger adds one there mid-erasure.
        // Each table is checked right before its own statement, so the planted
        // trigger is seen and refused, never run as the next table's owner.
        owner_trap("subj_ord_x", "subj_ord");
        run("CREATE ROLE subj_ord_o");
        run("CREATE TABLE public.subj_ord_a (id text, tenant_id text NOT NULL)");
        run("CREATE TABLE public.subj_ord_b (id text, tenant_id text NOT NULL)");
        run("ALTER TABLE public.subj_ord_a OWNER TO subj_ord_x");
        run("ALTER TABLE public.subj_ord_b OWNER TO subj_ord_o");
        run("GRANT TRIGGER ON public.subj_ord_b TO subj_ord_x");
        run("SELECT pgseal.subject_register('public.subj_ord_a', 'id')");
        run("SELECT pgseal.subject_register('public.subj_ord_b', 'id')");
        run("SET LOCAL ROLE subj_ord_x");
        run(
            "CREATE FUNCTION public.subj_ord_trg() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM public.subj_ord_note(); RETURN NULL; END $$",
        );
        run(
            "CREATE FUNCTION public.subj_ord_plant() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               EXECUTE 'CREATE TRIGGER z AFTER DELETE ON public.subj_ord_b FOR EACH ROW EXECUTE FUNCTION public.subj_ord_trg()';
               RETURN NULL;
             END $$",
        );
        run(
            "CREATE TRIGGER plant AFTER DELETE ON public.subj_ord_a FOR EACH STATEMENT \
             EXECUTE FUNCTION public.subj_ord_plant()",
        );
        run("RESET ROLE");
        tenant("subj-ord");
        run("INSERT INTO public.subj_ord_a VALUES ('u1', 'subj-ord')");
        run("INSERT INTO public.subj_ord_b VALUES ('u1', 'subj-ord')");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_erase('subj-ord', 'u1')"),
            "42501"
        );
        assert_eq!(owner_trap_ran_as("subj_ord"), "");
        assert_eq!(one::<i64>("SELECT count(*) FROM public.subj_ord_b"), 1);
    }

    #[pg_test]
    fn a_column_types_json_cast_never_runs_as_the_table_owner() {
        // Another role owns a column's type and its cast to json; the export reads
        // rows as the table's owner, so `to_jsonb` of the row would run that role's
        // cast with the owner's rights.
        owner_trap("subj_typer", "subj_jc");
        owner_trap_json_cast("subj_typer", "subj_jc");
        run("CREATE ROLE subj_jc_owner");
        run("CREATE DOMAIN public.subj_jc_count AS int CHECK (VALUE >= 0)");
        run(
            "CREATE TABLE public.subj_jc (id text, tenant_id text NOT NULL, mood public.subj_jc_mood, \
             moods public.subj_jc_mood[], n public.subj_jc_count, at timestamptz, tags text[])",
        );
        run("ALTER TABLE public.subj_jc OWNER TO subj_jc_owner");
        run("SELECT pgseal.subject_register('public.subj_jc', 'id')");
        tenant("subj-jc");
        run("INSERT INTO public.subj_jc VALUES \
             ('u1', 'subj-jc', 'angry', '{angry,calm}', 5, '2026-01-02 03:04:05+00', '{a,b}'), \
             ('u1', 'subj-jc', NULL, NULL, NULL, NULL, NULL)");
        // The trap works: to_jsonb of the row runs the cast as whoever reads.
        run("SELECT pg_catalog.to_jsonb(j) FROM public.subj_jc j");
        assert_ne!(owner_trap_ran_as("subj_jc"), "");
        run("TRUNCATE public.subj_jc_seen");

        let export: pgrx::JsonB = one("SELECT pgseal.subject_export('subj-jc', 'u1')");
        assert_eq!(owner_trap_ran_as("subj_jc"), "");
        let rows = export.0["tables"][0]["rows"].as_array().unwrap().clone();
        assert_eq!(rows.len(), 2);
        let full = rows.iter().find(|r| !r["mood"].is_null()).unwrap();
        // Types of others become their text form; system types (and domains over
        // them) stay as to_jsonb gives them.
        assert_eq!(full["mood"], "angry");
        assert_eq!(full["moods"], "{angry,calm}");
        assert_eq!(full["n"], 5);
        let to_jsonb: pgrx::JsonB = one(
            "SELECT jsonb_build_object('at', to_jsonb(at), 'tags', to_jsonb(tags)) FROM public.subj_jc WHERE n = 5",
        );
        assert_eq!(full["at"], to_jsonb.0["at"]);
        assert_eq!(full["tags"], serde_json::json!(["a", "b"]));
        let empty = rows.iter().find(|r| r["mood"].is_null()).unwrap();
        for column in ["moods", "n", "at", "tags"] {
            assert!(empty[column].is_null(), "{column}");
        }
        assert_eq!(
            empty.as_object().unwrap().len(),
            7,
            "every column is in the image"
        );
    }

    #[pg_test]
    fn a_table_whose_policies_bind_the_caller_but_not_its_owner_is_refused() {
        run("CREATE TABLE public.subj_rls (id text, tenant_id text NOT NULL, secret text)");
        run("SELECT pgseal.subject_register('public.subj_rls', 'id')");
        run("ALTER TABLE public.subj_rls ENABLE ROW LEVEL SECURITY");
        run("CREATE POLICY only_mine ON public.subj_rls USING (secret IS NULL)");
        tenant("subj-rls");
        run("INSERT INTO public.subj_rls VALUES ('u1', 'subj-rls', 'hidden'), ('u1', 'subj-rls', NULL)");
        run("CREATE ROLE subj_rls_reader IN ROLE pgseal_ledger");
        run("GRANT SELECT ON public.subj_rls TO subj_rls_reader");
        run("SET LOCAL ROLE subj_rls_reader");
        // As its owner the export would return the row the policy hides.
        assert_eq!(
            sqlstate("SELECT pgseal.subject_export('subj-rls', 'u1')"),
            "42501"
        );
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            pgrx::spi::quote_literal("SELECT pgseal.subject_export('subj-rls', 'u1')")
        ));
        assert!(
            msg.contains("that its owner is exempt from")
                && msg.contains("(table public.subj_rls)"),
            "{msg}"
        );
        run("RESET ROLE");
        // FORCE does not bind an owner that is a superuser (as here).
        run("ALTER TABLE public.subj_rls FORCE ROW LEVEL SECURITY");
        run("SET LOCAL ROLE subj_rls_reader");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_export('subj-rls', 'u1')"),
            "42501"
        );
        run("RESET ROLE");
        // An ordinary owner, forced: the policy holds for both.
        run("CREATE ROLE subj_rls_owner");
        run("ALTER TABLE public.subj_rls OWNER TO subj_rls_owner");
        run("SET LOCAL ROLE subj_rls_reader");
        let out: pgrx::JsonB = one("SELECT pgseal.subject_export('subj-rls', 'u1')");
        run("RESET ROLE");
        let rows = out.0["tables"][0]["rows"].as_array().unwrap().clone();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!(rows[0]["secret"].is_null());
        // A policy for particular roles, one that names the current role, or one
        // that reads another table (with policies of its own) would be the owner's
        // and not the caller's: refused, each of them.
        run("CREATE TABLE public.subj_rls_acl (id text)");
        run("ALTER TABLE public.subj_rls_acl OWNER TO subj_rls_owner");
        for policy in [
            "CREATE POLICY readers ON public.subj_rls AS RESTRICTIVE TO subj_rls_reader USING (id = 'u2')",
            "CREATE POLICY readers ON public.subj_rls AS RESTRICTIVE USING (secret IS DISTINCT FROM current_user)",
            "CREATE POLICY readers ON public.subj_rls AS RESTRICTIVE WITH CHECK (session_user IS NOT NULL)",
            "CREATE POLICY readers ON public.subj_rls AS RESTRICTIVE USING (pg_has_role('pg_monitor', 'MEMBER'))",
            "CREATE POLICY readers ON public.subj_rls AS RESTRICTIVE USING (has_table_privilege('public.subj_rls', 'UPDATE'))",
            "CREATE POLICY readers ON public.subj_rls AS RESTRICTIVE USING (getpgusername() IS NOT NULL)",
            "CREATE POLICY readers ON public.subj_rls AS RESTRICTIVE USING (id IN (SELECT a.id FROM public.subj_rls_acl a))",
        ] {
            run(policy);
            run("SET LOCAL ROLE subj_rls_reader");
            assert_eq!(
                sqlstate("SELECT pgseal.subject_export('subj-rls', 'u1')"),
                "42501",
                "{policy}"
            );
            run("RESET ROLE");
            run("DROP POLICY readers ON public.subj_rls");
        }
        // Under standard_conforming_strings = off the check still reads the policy.
        run("CREATE POLICY readers ON public.subj_rls AS RESTRICTIVE USING (secret IS DISTINCT FROM current_user)");
        run("SET LOCAL standard_conforming_strings = off");
        run("SET LOCAL ROLE subj_rls_reader");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_export('subj-rls', 'u1')"),
            "42501"
        );
        run("RESET ROLE");
    }

    #[pg_test]
    fn a_partitioned_tables_rows_name_their_subject_and_are_erased() {
        run("CREATE TABLE public.subj_parted (id text, tenant_id text NOT NULL, email text) PARTITION BY LIST (tenant_id)");
        run("CREATE TABLE public.subj_parted_a PARTITION OF public.subj_parted FOR VALUES IN ('subj-parted')");
        run("CREATE TABLE public.subj_parted_b PARTITION OF public.subj_parted DEFAULT");
        run("SELECT pgseal.subject_register('public.subj_parted', 'id')");
        run("SELECT pgseal.ledger_audit('public.subj_parted')");
        tenant("subj-parted");
        run("INSERT INTO public.subj_parted VALUES ('u1', 'subj-parted', 'p@example.com'), ('u1', 'elsewhere', 'q@example.com')");
        assert_eq!(
            one::<String>("SELECT string_agg(subjects::text, ' ') FROM pgseal.ledger WHERE tenant_id = 'subj-parted' AND event = 'row.insert'"),
            "{u1}"
        );
        let receipt: pgrx::JsonB = one("SELECT pgseal.subject_erase('subj-parted', 'u1')");
        assert_eq!(receipt.0["tables"][0]["deleted"], 1, "{:?}", receipt.0);
        // The insert and the delete's audit entries.
        assert_eq!(receipt.0["ledger_entries_erased"], 2, "{:?}", receipt.0);
        assert_eq!(one::<i64>("SELECT count(*) FROM public.subj_parted"), 1);
    }

    #[pg_test]
    fn subjects_that_are_not_a_columns_text_form_match_nothing() {
        run("CREATE TABLE public.subj_typed (n bigint, u uuid, tenant_id text NOT NULL)");
        run("SELECT pgseal.subject_register('public.subj_typed', 'n')");
        run("SELECT pgseal.subject_register('public.subj_typed', 'u')");
        tenant("subj-typed");
        run("INSERT INTO public.subj_typed VALUES (42, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'subj-typed')");
        let rows = |subject: &str| -> i64 {
            let out: pgrx::JsonB = one(&format!(
                "SELECT pgseal.subject_export('subj-typed', {})",
                pgrx::spi::quote_literal(subject)
            ));
            out.0["tables"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["rows"].as_array().unwrap().len() as i64)
                .sum()
        };
        assert_eq!(rows("42"), 1);
        assert_eq!(rows("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), 1);
        for other in [
            "+42",
            "042",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "u1",
            "99999999999999999999",
        ] {
            assert_eq!(rows(other), 0, "{other}");
        }
        // pgseal's own chains have no subjects.
        tenant("_pgseal");
        assert_eq!(
            sqlstate("SELECT pgseal.subject_export('_pgseal', 'u1')"),
            "42501"
        );
    }
}
