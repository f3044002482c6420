//! `#[pg_test]`s for evidence (issue 14): pgseal's reserved event names, and the
//! entry each change of protection leaves (event, actor, the db_role field, payload).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::json;

    use crate::pg_tests::helpers::{one, run, sqlstate, tenant};

    /// (event, actor, payload) of `tenant`'s newest entry, read through the export
    /// (which writes this transaction's pending entries first).
    fn last(tenant: &str) -> (String, String, serde_json::Value) {
        let e = Spi::get_one_with_args::<pgrx::JsonB>(
            "SELECT e FROM pgseal.ledger_export($1) e ORDER BY (e->>'seq')::bigint DESC LIMIT 1",
            &[tenant.into()],
        )
        .unwrap()
        .unwrap_or_else(|| panic!("{tenant} has no entries"))
        .0;
        (
            e["event"].as_str().unwrap().to_owned(),
            e["actor"].as_str().unwrap().to_owned(),
            e["payload"].clone(),
        )
    }

    /// The events of `tenant`'s entries, in seq order.
    fn events(tenant: &str) -> Vec<String> {
        Spi::connect(|c| {
            c.select(
                "SELECT e->>'event' FROM pgseal.ledger_export($1) e ORDER BY (e->>'seq')::bigint",
                None,
                &[tenant.into()],
            )
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect()
        })
    }

    fn verifies(tenant: &str) -> bool {
        Spi::get_one_with_args::<bool>("SELECT ok FROM pgseal.ledger_verify($1)", &[tenant.into()])
            .unwrap()
            .unwrap()
    }

    /// The `db_role` column of `tenant`'s newest entry (its payload carries none).
    fn last_role(tenant: &str) -> String {
        Spi::get_one_with_args::<String>(
            "SELECT db_role FROM pgseal.ledger WHERE tenant_id = $1 ORDER BY seq DESC LIMIT 1",
            &[tenant.into()],
        )
        .unwrap()
        .unwrap_or_else(|| panic!("{tenant}'s newest entry has no db_role"))
    }

    fn me() -> String {
        one("SELECT current_user::text")
    }

    fn lit(s: &str) -> String {
        pgrx::spi::quote_literal(s).to_string()
    }

    #[pg_test]
    fn blank_and_control_character_event_names_are_refused() {
        tenant("ev-blank");
        for e in ["'   '", "E'order\\npaid'", "E'\\x01'", "E'a\\tb'"] {
            assert_eq!(
                sqlstate(&format!("SELECT * FROM pgseal.ledger_append({e}, '{{}}')")),
                "22023",
                "{e}"
            );
        }
        assert_eq!(
            sqlstate("SELECT * FROM pgseal.ledger_append('order.paid', '{}')"),
            "00000"
        );
    }

    #[pg_test]
    fn reserved_event_names_are_refused_to_callers() {
        tenant("ev-reserved");
        assert_eq!(
            sqlstate(
                r#"SELECT * FROM pgseal.ledger_append('vault.decrypt', '{"count":1}', 'alice')"#
            ),
            "22023"
        );
        for e in [
            "ledger.pruned",
            "key.rotated",
            "policy.protected",
            "org.member_added",
            "retention.deleted",
            "pgseal.anything",
            "subject.erased",
            "tenant.offboarded",
            "audit.truncated",
            "row.insert",
            "Vault.Decrypt",
            "  KEY.shredded",
        ] {
            let q = format!("SELECT * FROM pgseal.ledger_append({})", lit(e));
            assert_eq!(sqlstate(&q), "22023", "{e}");
        }
        // The error does not echo the event.
        let msg: String = one(&format!(
            "SELECT tests.error_text_of({})",
            lit("SELECT * FROM pgseal.ledger_append('vault.s3cret-in-the-name')")
        ));
        assert!(msg.contains("reserved for pgseal"), "{msg}");
        assert!(!msg.contains("s3cret"), "{msg}");
        // Names that only look alike are the application's.
        for e in [
            "vaulted.x",
            "order.paid",
            "keys",
            "app.vault.decrypt",
            "row",
        ] {
            let q = format!("SELECT * FROM pgseal.ledger_append({})", lit(e));
            assert_eq!(sqlstate(&q), "00000", "{e}");
        }
        assert_eq!(
            events("ev-reserved"),
            [
                "vaulted.x",
                "order.paid",
                "keys",
                "app.vault.decrypt",
                "row"
            ]
        );
        // pgseal's system chain takes no caller's entry.
        tenant("_pgseal");
        assert_eq!(
            sqlstate("SELECT * FROM pgseal.ledger_append('order.paid')"),
            "42501"
        );
    }

    #[pg_test]
    fn key_rotation_rewrap_and_shredding_are_recorded() {
        run("SET LOCAL pgseal.master_key_active = 1");
        tenant("ev-keys");
        run("SET LOCAL app.user_id = 'ops-1'");
        let old: String = one("SELECT split_part(pgseal.vault_seal('x'), ':', 2)");
        run("SET LOCAL pgseal.master_key_active = 0");
        let new: String = one("SELECT pgseal.tenant_key_rotate('ev-keys')");
        let (event, actor, p) = last("ev-keys");
        assert_eq!((event.as_str(), actor.as_str()), ("key.rotated", "ops-1"));
        assert_eq!(p["key_id"], json!(new));
        assert_eq!(p["kek_version"], 2);
        assert_eq!(p["retired"][0]["key_id"], json!(old));
        assert_eq!(last_role("ev-keys"), me());
        assert!(
            p.get("db_role").is_none(),
            "db_role is a field, not payload"
        );

        // The retired data key is still under version 1; the ledger key was made
        // under 2 by the entry above.
        assert_eq!(one::<i32>("SELECT pgseal.kek_rewrap()"), 1);
        let (event, _, p) = last("_pgseal");
        assert_eq!(event, "key.rewrapped");
        assert_eq!(p["keys"], 1);
        assert_eq!(p["tenants"]["ev-keys"], json!({"dek": 1, "ledger": 0}));
        assert_eq!(p["kek_version"], 2);
        assert_eq!(p["from_versions"], json!([1]));
        let entries =
            || one::<i64>("SELECT count(*) FROM pgseal.ledger WHERE tenant_id = '_pgseal'");
        let before = entries();
        assert_eq!(one::<i32>("SELECT pgseal.kek_rewrap()"), 0);
        assert_eq!(entries(), before, "nothing moved: no entry");

        assert_eq!(one::<i32>("SELECT pgseal.tenant_shred('ev-keys')"), 2);
        let (event, actor, p) = last("ev-keys");
        assert_eq!((event.as_str(), actor.as_str()), ("key.shredded", "ops-1"));
        let mut ids = vec![old, new];
        ids.sort();
        assert_eq!(p["keys"], 2);
        assert_eq!(p["key_ids"], json!(ids));
        // A shred of a tenant without keys is recorded too.
        assert_eq!(one::<i32>("SELECT pgseal.tenant_shred('ev-nobody')"), 0);
        assert_eq!(last("ev-nobody").2["keys"], 0);
        assert!(verifies("ev-keys"));
        assert!(verifies("ev-nobody"));
    }

    #[pg_test]
    fn table_protection_changes_are_recorded() {
        run("CREATE TABLE public.inv (id int PRIMARY KEY, tenant_id text NOT NULL, owner_id text, org_id text)");
        run("CREATE INDEX ON public.inv (tenant_id)");
        // Under a tenant context: that tenant's chain.
        tenant("ev-prot");
        run("SET LOCAL app.user_id = 'dba'");
        run("SELECT pgseal.tenant_protect('public.inv')");
        let (event, actor, p) = last("ev-prot");
        assert_eq!(
            (event.as_str(), actor.as_str()),
            ("policy.protected", "dba")
        );
        assert_eq!(p["table"], "public.inv");
        assert_eq!(p["policies"], json!(["pgseal_tenant"]));
        assert_eq!(
            (p["row_security"].clone(), p["forced"].clone()),
            (json!(true), json!(true))
        );
        assert_eq!(last_role("ev-prot"), me());
        assert!(
            p.get("db_role").is_none(),
            "db_role is a field, not payload"
        );
        // Without one: pgseal's open chain, never the system chain (any table's
        // owner may do this, and would then hold that chain's lock).
        run("SET LOCAL app.tenant_id = ''");
        run("SELECT pgseal.tenant_unprotect('public.inv')");
        let (event, _, p) = last("_pgseal_open");
        assert_eq!(event, "policy.unprotected");
        assert_eq!(p["policies"], json!([]));
        assert_eq!(p["row_security"], false);
        run("SELECT pgseal.org_protect('public.inv', 'owner_id', 'org_id')");
        let (event, _, p) = last("_pgseal_open");
        assert_eq!(event, "policy.protected");
        assert_eq!(
            p["policies"],
            json!([
                "pgseal_offboard_delete",
                "pgseal_offboard_select",
                "pgseal_org_delete",
                "pgseal_org_insert",
                "pgseal_org_select",
                "pgseal_org_update",
                "pgseal_owner",
                "pgseal_tenant_only"
            ])
        );
        // A context naming one of pgseal's chains counts as none.
        let system = events("_pgseal").len();
        run("SET LOCAL app.tenant_id = '_pgseal'");
        run("SELECT pgseal.org_protect('public.inv', 'owner_id', 'org_id')");
        assert_eq!(events("_pgseal").len(), system);
        assert_eq!(
            events("_pgseal_open"),
            ["policy.unprotected", "policy.protected", "policy.protected"]
        );
        assert!(verifies("_pgseal_open"));
        // The recording function states what the catalog holds, and only for the
        // table's owner.
        run("CREATE ROLE evidence_other");
        run("SET LOCAL ROLE evidence_other");
        assert_eq!(
            sqlstate("SELECT pgseal._protection_changed('public.inv'::regclass)"),
            "42501"
        );
        run("RESET ROLE");
        assert_eq!(sqlstate("SELECT pgseal._protection_changed(0)"), "42809");
    }

    #[pg_test]
    fn organisation_membership_changes_are_recorded() {
        run("SELECT pgseal.set_tenant('ev-org', 'olga')");
        run("INSERT INTO pgseal.org_members VALUES ('ev-org', 'org1', 'olga', 'owner'), ('ev-org', 'org1', 'mia', 'member')");
        run("UPDATE pgseal.org_members SET role = 'admin' WHERE user_id = 'mia'");
        run("UPDATE pgseal.org_members SET role = role"); // changes nothing: no entry
        run("DELETE FROM pgseal.org_members WHERE user_id = 'mia'");
        assert_eq!(
            events("ev-org"),
            [
                "org.member_added",
                "org.member_added",
                "org.role_changed",
                "org.member_removed"
            ]
        );
        let payloads: Vec<serde_json::Value> = Spi::connect(|c| {
            c.select(
                "SELECT (e->'payload') || jsonb_build_object('actor', e->'actor') \
                 FROM pgseal.ledger_export('ev-org') e ORDER BY (e->>'seq')::bigint",
                None,
                &[],
            )
            .unwrap()
            .map(|r| r.get::<pgrx::JsonB>(1).unwrap().unwrap().0)
            .collect()
        });
        assert_eq!(
            payloads,
            [
                json!({"org": "org1", "user": "olga", "role": "owner", "actor": "olga"}),
                json!({"org": "org1", "user": "mia", "role": "member", "actor": "olga"}),
                json!({"org": "org1", "user": "mia", "from": "member", "to": "admin", "actor": "olga"}),
                json!({"org": "org1", "user": "mia", "role": "admin", "actor": "olga"}),
            ]
        );
        let (_, _, p) = last("ev-org");
        assert_eq!(last_role("ev-org"), me());
        assert!(
            p.get("db_role").is_none(),
            "db_role is a field, not payload"
        );
        assert!(verifies("ev-org"));
    }

    #[pg_test]
    fn retention_rules_and_holds_are_recorded() {
        run("CREATE TABLE public.ev (id int, tenant_id text, created_at timestamptz)");
        run("SELECT pgseal.retention_set('public.ev', '30 days')");
        let (event, _, p) = last("_pgseal");
        assert_eq!(event, "retention.set");
        assert_eq!(
            (
                p["table"].clone(),
                p["keep"].clone(),
                p["time_column"].clone(),
                p["scope"].clone()
            ),
            (
                json!("public.ev"),
                json!("30 days"),
                json!("created_at"),
                json!("default")
            )
        );
        run("SELECT pgseal.retention_set('public.ev', '10 days', 'created_at', 'ev-ret')");
        run("SELECT pgseal.retention_set('public.ev', '20 days', 'created_at', 'ev-ret')");
        assert_eq!(events("ev-ret"), ["retention.set", "retention.set"]);
        let (_, _, p) = last("ev-ret");
        assert_eq!(
            (p["keep"].clone(), p["scope"].clone()),
            (json!("20 days"), json!("tenant"))
        );
        assert_eq!(p["previous"]["keep"], "10 days");

        // retention_hold is SECURITY DEFINER: the role recorded is still the caller.
        run("CREATE ROLE evidence_admin IN ROLE pgseal_admin");
        run("SET LOCAL ROLE evidence_admin");
        run("SELECT pgseal.retention_hold('ev-ret-hold', true)");
        run("SELECT pgseal.retention_hold('ev-ret-hold', true)"); // already held: no change
        run("SELECT pgseal.retention_hold('ev-ret-hold', false)");
        run("RESET ROLE");
        assert_eq!(
            events("ev-ret-hold"),
            ["retention.held", "retention.released"]
        );
        let (_, _, p) = last("ev-ret-hold");
        assert_eq!(last_role("ev-ret-hold"), "evidence_admin");
        assert!(
            p.get("db_role").is_none(),
            "db_role is a field, not payload"
        );
        assert!(p["held_since"].is_string());
        run("DELETE FROM pgseal.retention_rules WHERE tenant_id = 'ev-ret'");
        assert_eq!(last("ev-ret").0, "retention.removed");
        assert!(verifies("ev-ret") && verifies("ev-ret-hold") && verifies("_pgseal"));
    }

    /// The column registries' changes (sealing, subjects, anonymised columns), always
    /// in the system chain whatever the tenant context; a rename is not a change, a
    /// declaration made again is none either, and a registration moved to another
    /// column by any UPDATE is recorded with the column number it had.
    #[pg_test]
    fn column_registrations_are_recorded() {
        run("CREATE TABLE public.evr (id int PRIMARY KEY, tenant_id text, email text, token text, note text, memo text)");
        let from = events("_pgseal").len();
        let since = || events("_pgseal")[from..].to_vec();
        run("SELECT pgseal.subject_register('public.evr', 'email')");
        let (event, _, p) = last("_pgseal");
        assert_eq!(event, "subject.column_registered");
        assert_eq!(
            (p["table"].clone(), p["column"].clone(), p["attnum"].clone()),
            (json!("public.evr"), json!("email"), json!(3))
        );
        assert_eq!(last_role("_pgseal"), me());

        // A tenant context chooses no chain.
        tenant("ev-reg");
        run("SELECT pgseal.vault_register_column('public.evr', 'token', 'ctx1')");
        run("SELECT pgseal.vault_register_column('public.evr', 'token', 'ctx1')"); // no change
        run("SELECT pgseal.vault_register_column('public.evr', 'token', 'ctx2')");
        run("SELECT pgseal.subject_anonymise('public.evr', ARRAY['note']::name[])");
        run("SELECT pgseal.subject_anonymise('public.evr', ARRAY['note']::name[])"); // no change
        run("SELECT pgseal.subject_anonymise('public.evr', ARRAY['note', 'memo']::name[])");
        run("ALTER TABLE public.evr RENAME COLUMN token TO token2"); // followed, not a change
        assert!(events("ev-reg").is_empty(), "{:?}", events("ev-reg"));
        let (_, _, p) = last("_pgseal");
        assert_eq!(p["column"], "memo");
        let second = Spi::get_one_with_args::<pgrx::JsonB>(
            "SELECT e->'payload' FROM pgseal.ledger_export('_pgseal') e WHERE (e->>'seq')::bigint = $1",
            &[((from + 3) as i64).into()],
        )
        .unwrap()
        .unwrap()
        .0;
        assert_eq!(
            (
                second["context"].clone(),
                second["previous"]["context"].clone()
            ),
            (json!("ctx2"), json!("ctx1"))
        );

        // A registration whose name went stale (the rename not followed) and is then
        // resolved again to another column by an UPDATE that changes nothing else:
        // recorded, with the column number before and after.
        run("ALTER EVENT TRIGGER pgseal_registrations_rename DISABLE");
        run("ALTER TABLE public.evr RENAME COLUMN token2 TO kept_secret");
        run("ALTER TABLE public.evr ADD COLUMN token2 text");
        run("ALTER EVENT TRIGGER pgseal_registrations_rename ENABLE");
        run(
            "UPDATE pgseal.sealed_columns SET context = context WHERE rel = 'public.evr'::regclass",
        );
        let (event, _, p) = last("_pgseal");
        assert_eq!(event, "vault.column_registered");
        assert_eq!(
            (
                p["column"].clone(),
                p["attnum"].clone(),
                p["previous"]["attnum"].clone()
            ),
            (json!("token2"), json!(7), json!(4))
        );

        run("SELECT pgseal.vault_unregister_column('public.evr', 'token2')");
        run("SELECT pgseal.subject_unregister('public.evr', 'email')");
        // A dropped column's registration goes, recorded.
        run("ALTER TABLE public.evr DROP COLUMN note");
        let (event, _, p) = last("_pgseal");
        assert_eq!(event, "subject.anonymised_column_unregistered");
        assert_eq!(p["column"], "note");
        assert_eq!(
            since(),
            [
                "subject.column_registered",
                "vault.column_registered",
                "vault.column_registered",
                "subject.anonymised_column_registered",
                "subject.anonymised_column_registered",
                "vault.column_registered",
                "vault.column_unregistered",
                "subject.column_unregistered",
                "subject.anonymised_column_unregistered"
            ]
        );
        assert!(verifies("_pgseal"));
    }

    #[pg_test]
    fn truncate_of_an_audited_table_is_recorded() {
        run("CREATE TABLE public.acc (id int PRIMARY KEY, tenant_id text)");
        run("SELECT pgseal.ledger_audit('public.acc')");
        tenant("ev-trunc");
        run("INSERT INTO public.acc VALUES (1, 'ev-trunc')");
        run("TRUNCATE public.acc");
        let (event, _, p) = last("ev-trunc");
        assert_eq!(event, "audit.truncated");
        assert_eq!(p["table"], "public.acc");
        assert_eq!(last_role("ev-trunc"), me());
        assert!(
            p.get("db_role").is_none(),
            "db_role is a field, not payload"
        );
        assert_eq!(events("ev-trunc"), ["row.insert", "audit.truncated"]);
        // Without a tenant context: pgseal's open chain, not the system chain.
        run("SET LOCAL app.tenant_id = ''");
        let system = events("_pgseal").len();
        run("TRUNCATE public.acc");
        assert_eq!(last("_pgseal_open").0, "audit.truncated");
        assert_eq!(events("_pgseal").len(), system);
        run("SELECT pgseal.ledger_unaudit('public.acc')");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.acc'::regclass"),
            0
        );
        // A partitioned table: TRUNCATE of it, or of one partition, is recorded.
        run("CREATE TABLE public.parted (id int, tenant_id text) PARTITION BY LIST (tenant_id)");
        run("CREATE TABLE public.parted_a PARTITION OF public.parted FOR VALUES IN ('a')");
        run("SELECT pgseal.ledger_audit('public.parted')");
        tenant("ev-trunc");
        let truncated = || -> Vec<String> {
            Spi::connect(|c| {
                c.select(
                    "SELECT e->'payload'->>'table' FROM pgseal.ledger_export('ev-trunc') e \
                     WHERE e->>'event' = 'audit.truncated' ORDER BY (e->>'seq')::bigint",
                    None,
                    &[],
                )
                .unwrap()
                .map(|r| r.get::<String>(1).unwrap().unwrap())
                .collect()
            })
        };
        assert_eq!(truncated(), ["public.acc"]);
        // One entry per table truncated: the table and each partition.
        run("TRUNCATE public.parted");
        assert_eq!(
            truncated(),
            ["public.acc", "public.parted", "public.parted_a"]
        );
        run("TRUNCATE public.parted_a");
        assert_eq!(
            truncated().len(),
            4,
            "a partition's own TRUNCATE is recorded"
        );
    }

    #[pg_test]
    fn job_receipts_take_only_job_events_from_admins() {
        tenant("ev-job");
        run("SET LOCAL app.user_id = 'pgseald'");
        let seq: i64 = one(
            r#"SELECT pgseal._job_receipt('retention.deleted', '{"table": "public.ev", "deleted": 3}')"#,
        );
        assert_eq!(seq, 1);
        let (event, actor, p) = last("ev-job");
        assert_eq!(
            (event.as_str(), actor.as_str()),
            ("retention.deleted", "pgseald")
        );
        assert_eq!(p["deleted"], 3);
        assert_eq!(last_role("ev-job"), me());
        assert!(
            p.get("db_role").is_none(),
            "db_role is a field, not payload"
        );
        tenant("_pgseal");
        assert_eq!(
            sqlstate("SELECT pgseal._job_receipt('retention.deleted', '{}')"),
            "42501"
        );
        tenant("ev-job");
        for bad in [
            "SELECT pgseal._job_receipt('vault.decrypt', '{}')",
            "SELECT pgseal._job_receipt('order.paid', '{}')",
            "SELECT pgseal._job_receipt('retention.deleted', '[1]')",
        ] {
            assert_eq!(sqlstate(bad), "22023", "{bad}");
        }
        run("CREATE ROLE evidence_ledger IN ROLE pgseal_ledger");
        run("SET LOCAL ROLE evidence_ledger");
        assert_eq!(
            sqlstate("SELECT pgseal._job_receipt('retention.deleted', '{}')"),
            "42501"
        );
        run("RESET ROLE");
        assert_eq!(events("ev-job"), ["retention.deleted"]);
    }

    #[pg_test]
    fn a_forwarded_audit_entry_is_a_superusers_and_its_commit_is_flushed() {
        // What a Citus worker's audit writer calls on the coordinator: only a
        // superuser may (it records any role and reserved events), and an entry it
        // acknowledges is flushed at commit even where synchronous_commit is off.
        run("CREATE ROLE fw_app");
        run("GRANT USAGE ON SCHEMA pgseal TO fw_app");
        let call = "SELECT pgseal._audit_append_forwarded('fw-t', 'vault.decrypt_started', '{\"keys\": 1}', 'alice', 'fw_app', false)";
        run("SET LOCAL ROLE fw_app");
        assert_eq!(sqlstate(call), "42501");
        run("RESET ROLE");
        run("SET LOCAL synchronous_commit = off");
        let answer: String = one(call);
        assert_eq!(
            one::<String>("SELECT current_setting('synchronous_commit')"),
            "local"
        );
        let (event, actor, payload) = last("fw-t");
        assert_eq!(
            answer,
            format!(
                "f:{}",
                one::<i64>("SELECT max((e->>'seq')::bigint) FROM pgseal.ledger_export('fw-t') e")
            )
        );
        assert_eq!(
            (event.as_str(), actor.as_str()),
            ("vault.decrypt_started", "alice")
        );
        assert_eq!(payload, json!({"keys": 1}));
        // A stronger setting is left as it is.
        run("SET LOCAL synchronous_commit = remote_apply");
        one::<String>(call);
        assert_eq!(
            one::<String>("SELECT current_setting('synchronous_commit')"),
            "remote_apply"
        );
    }
}
