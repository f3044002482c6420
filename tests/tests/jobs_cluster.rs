//! pgseald's one-shot jobs against a real cluster: retention runs (windows,
//! overrides, holds, receipts, dry run), tenant rotation with reseal (also after a
//! kill -9 mid-run), and KEK rotation.

use std::process::Stdio;
use std::time::Duration;

use pgseal_tests::{
    assert_tid_scan, count, logged_plans, Cluster, Pgseald, KEY_V1, KEY_V2, LOG_EVERY_PLAN,
};

#[test]
fn retention_deletes_exactly_the_expired_rows_per_tenant() {
    let cl = Cluster::start("jobs-retention", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE events (id bigint PRIMARY KEY, tenant_id text NOT NULL, created_at timestamptz NOT NULL);
         CREATE INDEX ON events (tenant_id, created_at);
         -- Per tenant, one row per day of age 0..99.
         INSERT INTO events SELECT t * 1000 + d, 't' || t, now() - d * interval '1 day' - interval '1 hour'
           FROM generate_series(1, 3) t, generate_series(0, 99) d;
         SELECT pgseal.tenant_protect('events');
         SELECT pgseal.retention_set('events', '30 days');
         SELECT pgseal.retention_set('events', '10 days', 'created_at', 't2');
         SELECT pgseal.retention_hold('t3', true);",
    )
    .unwrap();
    let (code, out) = Pgseald::new(["retention", "run", "--dry-run"])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant t1: would delete 70 rows"), "{out}");
    assert!(out.contains("tenant t2: would delete 90 rows"), "{out}");
    assert!(out.contains("tenant t3: on legal hold"), "{out}");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM events"),
        300,
        "a dry run deletes nothing"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pgseal.ledger WHERE event = 'retention.deleted'"
        ),
        0,
        "a dry run leaves no receipt"
    );

    let (code, out) = Pgseald::new(["retention", "run", "--batch", "7"])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    let left = |c: &mut postgres::Client, t: &str| {
        count(
            c,
            &format!("SELECT count(*) FROM events WHERE tenant_id = '{t}'"),
        )
    };
    assert_eq!(left(&mut c, "t1"), 30);
    assert_eq!(left(&mut c, "t2"), 10);
    assert_eq!(left(&mut c, "t3"), 100, "legal hold");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM events WHERE tenant_id = 't1' AND created_at < now() - interval '30 days'"),
        0
    );
    // One receipt per tenant × table, in that tenant's chain, with the count.
    let receipts: Vec<(String, serde_json::Value)> = c
        .query("SELECT tenant_id, payload FROM pgseal.ledger WHERE event = 'retention.deleted' ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(receipts.len(), 2, "{receipts:?}");
    assert_eq!(receipts[0].0, "t1");
    assert_eq!(receipts[0].1["deleted"], 70);
    assert_eq!(receipts[1].1["deleted"], 90);
    assert_eq!(receipts[1].1["keep"], "10 days");
    let roles: Vec<Option<String>> = c
        .query(
            "SELECT db_role FROM pgseal.ledger WHERE event = 'retention.deleted'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        roles,
        vec![Some("postgres".to_owned()); 2],
        "the role pgseald connected as"
    );
    // The rules and the hold set up above are evidence too (issue 14).
    let setup: Vec<(String, String)> = c
        .query("SELECT tenant_id, event FROM pgseal.ledger WHERE event LIKE 'retention.%' AND event <> 'retention.deleted' ORDER BY 1, 2", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        setup,
        [
            ("_pgseal", "retention.set"),
            ("t2", "retention.set"),
            ("t3", "retention.held")
        ]
        .map(|(t, e)| (t.to_owned(), e.to_owned()))
    );
    // The job history recorded the run, with its longest batch transaction.
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pgseal.job_runs WHERE job = 'retention' AND status = 'ok'"
        ),
        1
    );
    assert!(
        out.contains("tenant t1: deleted 70 rows older than"),
        "{out}"
    );
    assert!(
        out.contains(" ms)"),
        "each line reports its longest batch: {out}"
    );
    let longest: f64 = c
        .query_one(
            "SELECT (detail->>'longest_batch_ms')::float8 FROM pgseal.job_runs WHERE job = 'retention'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        longest > 0.0 && longest < 60_000.0,
        "longest batch {longest} ms"
    );
    // Lifting the hold and a rerun for one tenant only.
    c.batch_execute("SELECT pgseal.retention_hold('t3', false)")
        .unwrap();
    let (code, out) = Pgseald::new(["retention", "run", "--tenant", "t3"])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(left(&mut c, "t3"), 30);
    assert_eq!(left(&mut c, "t1"), 30);
}

#[test]
fn retention_sweeps_every_batch_under_strict_context() {
    // pgseal.strict_context closes every cursor WITH HOLD at commit; the sweep
    // must not rely on one there, in fixed and in learned batch sizes.
    let cl = Cluster::start(
        "jobs-retention-strict",
        &[KEY_V1],
        &["pgseal.strict_context = on"],
    );
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         -- Partitioned by time: the partitions reuse ctids, and a ctid of an
         -- expired row must never delete the live row at the same place.
         CREATE TABLE events (id bigint, tenant_id text NOT NULL, created_at timestamptz NOT NULL,
                              PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at);
         CREATE TABLE events_old PARTITION OF events FOR VALUES FROM (MINVALUE) TO (now() - interval '30 days');
         CREATE TABLE events_new PARTITION OF events FOR VALUES FROM (now() - interval '30 days') TO (MAXVALUE);
         CREATE INDEX ON events (tenant_id, created_at);
         INSERT INTO events SELECT t * 100000 + g, 't' || t, now() - (g % 100) * interval '1 day' - interval '1 hour'
           FROM generate_series(1, 2) t, generate_series(1, 5000) g;
         SELECT pgseal.tenant_protect('events');
         SELECT pgseal.retention_set('events', '30 days');",
    )
    .unwrap();
    let expired = "SELECT count(*) FROM events WHERE created_at < now() - interval '30 days'";
    assert_eq!(count(&mut c, expired), 2 * 3500);
    let (code, out) = Pgseald::new(["retention", "run", "--batch", "500", "--tenant", "t1"])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant t1: deleted 3500 rows"), "{out}");
    let (code, out) = Pgseald::new(["retention", "run"]).on(&cl).run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant t2: deleted 3500 rows"), "{out}");
    assert_eq!(count(&mut c, expired), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM events"), 2 * 1500);
}

/// A batch's delete by ctid is a TID scan of the batch's places, never a scan of
/// the tenant's index with the places as a filter, which read every expired row of
/// the tenant again in every batch (docs/BENCHMARKS.md, "Retention's delete as a TID
/// scan"). The table is shaped for the planner to prefer that index: the tenant's
/// expired rows lie together on a few pages among many rows of others. auto_explain
/// logs every statement's plan. A partitioned table, whose deletes keep the
/// planner's choice, loses exactly its expired rows in the same run, though its
/// partitions hold rows at the same places.
#[test]
fn retention_deletes_each_batch_by_a_tid_scan() {
    let cl = Cluster::start("jobs-retention-plan", &[KEY_V1], &LOG_EVERY_PLAN);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE ev_plan (tenant_id text NOT NULL, created_at timestamptz NOT NULL, body text);
         CREATE INDEX ON ev_plan (tenant_id, created_at);
         INSERT INTO ev_plan SELECT 'big', now() - interval '60 days', 'old ' || g FROM generate_series(1, 5000) g;
         INSERT INTO ev_plan SELECT 'o' || g % 50, now() - interval '60 days', 'other ' || g FROM generate_series(1, 50000) g;
         INSERT INTO ev_plan SELECT 'big', now(), 'new ' || g FROM generate_series(1, 100) g;
         ANALYZE ev_plan;
         CREATE TABLE ev_parts (tenant_id text NOT NULL, created_at timestamptz NOT NULL, body text)
           PARTITION BY RANGE (created_at);
         CREATE TABLE ev_parts_old PARTITION OF ev_parts FOR VALUES FROM (MINVALUE) TO (now() - interval '30 days');
         CREATE TABLE ev_parts_new PARTITION OF ev_parts FOR VALUES FROM (now() - interval '30 days') TO (MAXVALUE);
         CREATE INDEX ON ev_parts (tenant_id, created_at);
         INSERT INTO ev_parts SELECT 'big', now() - interval '60 days', 'old ' || g FROM generate_series(1, 3000) g;
         INSERT INTO ev_parts SELECT 'big', now(), 'new ' || g FROM generate_series(1, 3000) g;
         ANALYZE ev_parts;
         SELECT pgseal.retention_set('ev_plan', '30 days');
         SELECT pgseal.retention_set('ev_parts', '30 days');",
    )
    .unwrap();
    let (code, out) = Pgseald::new(["retention", "run", "--batch", "1000", "--tenant", "big"])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant big: deleted 5000 rows"), "{out}");
    assert!(out.contains("tenant big: deleted 3000 rows"), "{out}");
    let left = |c: &mut postgres::Client, t: &str| {
        count(
            c,
            &format!("SELECT count(*) FROM {t} WHERE tenant_id = 'big' AND created_at < now() - interval '30 days'"),
        )
    };
    assert_eq!(left(&mut c, "ev_plan"), 0);
    assert_eq!(left(&mut c, "ev_parts"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM ev_plan"), 50_100);
    assert_eq!(count(&mut c, "SELECT count(*) FROM ev_parts"), 3000);
    let deletes = logged_plans(
        &cl.server_log(),
        &["Query Text: DELETE FROM", "ev_plan WHERE"],
    );
    assert_eq!(
        deletes.len(),
        5,
        "one delete per batch of 1000: {deletes:#?}"
    );
    for p in &deletes {
        assert_tid_scan(p, "ev_plan");
    }
}

/// `retention_deletes_each_batch_by_a_tid_scan` with pgseald's role under the
/// table's row level security (`tenant_protect`, not its owner), whose test of the
/// tenant an index serves. On PostgreSQL 18 and later the batches turn index and
/// bitmap scans off as well, and each delete is a TID scan; before 18 they do not (a
/// disabled scan there is costed once per outer row of a nested loop, which would
/// steer the joins of what the delete runs), and the planner may choose the
/// tenant's index through the policy: there each delete is bounded by its batch's
/// time range too, and an index scan reads that range only.
#[test]
fn retention_under_row_level_security_deletes_each_batch_by_its_places_or_its_time_range() {
    let cl = Cluster::start("jobs-retention-plan-rls", &[KEY_V1], &LOG_EVERY_PLAN);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE ROLE sweeper LOGIN;
         GRANT pgseal_admin TO sweeper;
         CREATE TABLE ev_rls (tenant_id text NOT NULL, created_at timestamptz NOT NULL, body text);
         CREATE INDEX ON ev_rls (tenant_id, created_at);
         INSERT INTO ev_rls SELECT 'big', now() - interval '60 days' - g * interval '1 second', 'old ' || g
           FROM generate_series(1, 5000) g;
         INSERT INTO ev_rls SELECT 'o' || g % 50, now() - interval '60 days' - g / 10 * interval '1 second', 'other ' || g
           FROM generate_series(1, 50000) g;
         ANALYZE ev_rls;
         SELECT pgseal.tenant_protect('ev_rls');
         GRANT SELECT, DELETE ON ev_rls TO sweeper;
         SELECT pgseal.retention_set('ev_rls', '30 days');",
    )
    .unwrap();
    let url = cl.url().replace("user=postgres", "user=sweeper");
    let (code, out) = Pgseald::new(["retention", "run", "--batch", "1000", "--tenant", "big"])
        .on(&cl)
        .env("PGSEALD_DATABASE_URL", &url)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant big: deleted 5000 rows"), "{out}");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM ev_rls WHERE tenant_id = 'big'"
        ),
        0
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM ev_rls"), 50_000);
    let v18: bool = c
        .query_one(
            "SELECT current_setting('server_version_num')::int4 >= 180000",
            &[],
        )
        .unwrap()
        .get(0);
    let deletes = logged_plans(
        &cl.server_log(),
        &["Query Text: DELETE FROM", "ev_rls WHERE"],
    );
    assert_eq!(
        deletes.len(),
        5,
        "one delete per batch of 1000: {deletes:#?}"
    );
    if v18 {
        for p in &deletes {
            assert_tid_scan(p, "ev_rls");
        }
    } else {
        // Before 18 the planner may take the tenant's index through the policy's
        // test, but each batch's delete is bounded by the batch's time range there,
        // so that it reads the batch's rows, not every expired row of the tenant.
        for p in &deletes {
            let conds: Vec<&str> = p.lines().filter(|l| l.contains("Index Cond:")).collect();
            assert!(
                conds
                    .iter()
                    .all(|c| c.contains("created_at >=") && c.contains("created_at <=")),
                "an index scan of the batch's delete is not bounded by its time range:\n{}",
                conds.join("\n")
            );
        }
    }
}

/// A tenant id naming one of pgseal's chains (`_pgseal…`), written into a swept table
/// by any role that may insert there, is no tenant a session acts for (set_tenant
/// refuses it): the sweep skips it with a warning and goes on with the others,
/// instead of failing the run at it (it sorts first).
#[test]
fn retention_skips_a_tenant_id_naming_a_pgseal_chain_and_sweeps_the_rest() {
    let cl = Cluster::start("jobs-retention-pgseal-names", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE events (id bigint PRIMARY KEY, tenant_id text NOT NULL, created_at timestamptz NOT NULL);
         CREATE INDEX ON events (tenant_id, created_at);
         INSERT INTO events SELECT g, t, now() - interval '60 days'
           FROM unnest(ARRAY['_pgseal', '_pgseal_x', 'acme']) WITH ORDINALITY AS u(t, i),
                LATERAL generate_series(i * 1000, i * 1000 + 9) g;
         SELECT pgseal.retention_set('events', '30 days');",
    )
    .unwrap();
    let (code, out) = Pgseald::new(["retention", "run"]).on(&cl).run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant acme: deleted 10 rows"), "{out}");
    assert!(
        out.contains("_pgseal_x") && out.contains("skipping"),
        "{out}"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM events WHERE tenant_id LIKE '\\_pgseal%'"
        ),
        20
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM events WHERE tenant_id = 'acme'"
        ),
        0
    );
}

/// The extension, and a table `creds` whose `token` column is registered for resealing.
fn creds_table(cl: &Cluster) -> postgres::Client {
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE creds (id int PRIMARY KEY, tenant_id text NOT NULL, token text);
         SELECT pgseal.vault_register_column('creds', 'token', 'creds.token');",
    )
    .unwrap();
    c
}

fn seal_rows(c: &mut postgres::Client, tenant: &str, from: i32, n: i32) {
    c.batch_execute(&format!(
        "BEGIN; SELECT pgseal.set_tenant('{tenant}');
         INSERT INTO creds SELECT g, '{tenant}', pgseal.vault_seal('token-' || g, 'creds.token') FROM generate_series({from}, {}) g;
         COMMIT;",
        from + n - 1
    ))
    .unwrap();
}

/// Values of the tenant whose decrypt does not give back 'token-<id>'.
fn wrong_values(c: &mut postgres::Client, tenant: &str) -> i64 {
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(&format!("SELECT pgseal.set_tenant('{tenant}')"))
        .unwrap();
    let n: i64 = tx
        .query_one(
            "SELECT count(*) FROM creds WHERE tenant_id = $1 \
             AND pgseal.vault_decrypt(token, 'creds.token') IS DISTINCT FROM 'token-' || id",
            &[&tenant],
        )
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    n
}

fn rows_under_non_active_keys(c: &mut postgres::Client, tenant: &str) -> i64 {
    count(
        c,
        &format!("SELECT coalesce(sum(rows), 0)::bigint FROM pgseal.key_usage WHERE tenant_id = '{tenant}' AND state <> 'active'"),
    )
}

#[test]
fn tenant_rotation_reseals_every_value_even_after_a_kill_9() {
    let cl = Cluster::start("jobs-rotate", &[KEY_V1], &[]);
    let mut c = creds_table(&cl);
    seal_rows(&mut c, "a", 1, 3000);
    seal_rows(&mut c, "b", 5001, 200);

    // A reseal killed mid-run...
    let mut child = Pgseald::new(["rotate", "tenant", "a", "--batch", "20"])
        .on(&cl)
        .spawn(Stdio::null());
    std::thread::sleep(Duration::from_millis(400));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        wrong_values(&mut c, "a"),
        0,
        "every value decrypts after the kill"
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM creds"),
        3200,
        "no row lost"
    );

    // ...and a rerun finishes the job.
    let (code, out) = Pgseald::new(["rotate", "tenant", "a", "--batch", "500"])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        rows_under_non_active_keys(&mut c, "a"),
        0,
        "no value left under a retired key"
    );
    assert_eq!(wrong_values(&mut c, "a"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM pgseal.tenant_keys WHERE tenant_id = 'a' AND state = 'active' AND purpose = 'dek'"), 1);
    // The other tenant was not touched.
    assert_eq!(
        count(
            &mut c,
            "SELECT count(DISTINCT split_part(token, ':', 2)) FROM creds WHERE tenant_id = 'b'"
        ),
        1
    );
    assert_eq!(wrong_values(&mut c, "b"), 0);
    assert!(
        count(
            &mut c,
            "SELECT count(*) FROM pgseal.job_runs WHERE job = 'rotate.tenant' AND status = 'ok'"
        ) >= 1
    );
}

/// A registered table that `key_usage` cannot count (planning a query on it runs
/// code its owner wrote) leaves no key's count known: `key_usage` reports none
/// (NULL, never 0), and pgseald's rotation then reseals the values another
/// tenant's rotation left under a retired key rather than take them for none.
#[test]
fn rotation_reseals_values_under_a_retired_key_when_key_usage_cannot_count() {
    let cl = Cluster::start("jobs-rotate-uncounted", &[KEY_V1], &[]);
    let mut c = creds_table(&cl);
    seal_rows(&mut c, "a", 1, 40);
    // a's key rotated without a reseal: its values stay under the retired key.
    c.batch_execute("SELECT pgseal.tenant_key_rotate('a')")
        .unwrap();
    assert_eq!(rows_under_non_active_keys(&mut c, "a"), 40);
    c.batch_execute(
        "CREATE ROLE creds_owner;
         GRANT CREATE ON SCHEMA public TO creds_owner;
         ALTER TABLE creds OWNER TO creds_owner;
         SET ROLE creds_owner;
         CREATE FUNCTION public.creds_imm(t text) RETURNS text LANGUAGE sql IMMUTABLE AS 'SELECT t';
         CREATE STATISTICS public.creds_st ON (tenant_id || public.creds_imm('x')), tenant_id FROM creds;
         RESET ROLE;",
    )
    .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pgseal.key_usage WHERE rows IS NOT NULL"
        ),
        0,
        "a count pgseal could not take is reported"
    );
    // The scheduled rotation, with no key due: only its pass over values left
    // under retired keys has work.
    let (status, detail, out) =
        scheduled_rotation_once(&cl, &mut c, "jobs-rotate-uncounted-files", 3650);
    assert_eq!(status, "ok", "{out}");
    assert!(out.contains("key usage is not known"), "{out}");
    assert!(detail.contains(r#""key_usage_known": false"#), "{detail}");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM creds c JOIN pgseal.tenant_keys k ON k.key_id = split_part(c.token, ':', 2) \
              WHERE c.tenant_id = 'a' AND k.state = 'active'"
        ),
        40,
        "{out}"
    );
    assert_eq!(wrong_values(&mut c, "a"), 0);
}

/// The scheduled rotation (`pgseald run` with a [rotation] section) goes on past a
/// tenant whose reseal fails: tenant "a" plants a value under its key that no key
/// opens, which fails every reseal batch of its rows. Tenants "b" and "c", after it
/// in the run's order, are rotated and resealed all the same, and the run is
/// recorded as failed, naming "a" and only "a".
#[test]
fn scheduled_rotation_goes_on_past_a_tenant_whose_reseal_fails() {
    let cl = Cluster::start("jobs-rotate-sched", &[KEY_V1], &[]);
    let mut c = creds_table(&cl);
    seal_rows(&mut c, "a", 1, 50);
    seal_rows(&mut c, "b", 101, 50);
    seal_rows(&mut c, "c", 201, 50);
    let old: Vec<String> = c
        .query("SELECT key_id FROM pgseal.tenant_keys WHERE purpose = 'dek' AND state = 'active' ORDER BY tenant_id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(old.len(), 3);
    // What the tenant's own writes can put in its rows: a value naming its key
    // whose ciphertext is not one.
    c.batch_execute(&format!(
        "BEGIN; SELECT pgseal.set_tenant('a');
         INSERT INTO creds VALUES (51, 'a', 'v2:{}:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA');
         COMMIT;",
        old[0]
    ))
    .unwrap();
    // Every key is due (age 0 days).
    let (status, detail, _) = scheduled_rotation_once(&cl, &mut c, "jobs-rotate-sched-files", 0);
    let run = (status, detail);
    assert_eq!(run.0, "failed", "{run:?}");
    assert!(
        run.1.contains(r#"failed for tenant(s) [\"a\"]"#),
        "the run names tenant a, and only a: {run:?}"
    );
    for (i, t) in ["b", "c"].iter().enumerate() {
        assert_eq!(
            count(&mut c, &format!("SELECT count(*) FROM creds WHERE tenant_id = '{t}' AND split_part(token, ':', 2) = '{}'", old[i + 1])),
            0,
            "tenant {t}'s values are all under its new key"
        );
        assert_ne!(
            count(&mut c, &format!("SELECT count(*) FROM pgseal.tenant_keys WHERE tenant_id = '{t}' AND purpose = 'dek' AND state = 'active' AND key_id <> '{}'", old[i + 1])),
            0,
            "tenant {t}'s key was rotated"
        );
        assert_eq!(wrong_values(&mut c, t), 0);
    }
    // Tenant a's own values all still open, under whichever key they are.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SELECT pgseal.set_tenant('a')").unwrap();
    let a_wrong: i64 = tx
        .query_one(
            "SELECT count(*) FROM creds WHERE tenant_id = 'a' AND id <= 50 \
             AND pgseal.vault_decrypt(token, 'creds.token') IS DISTINCT FROM 'token-' || id",
            &[],
        )
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    assert_eq!(a_wrong, 0);
}

/// A role with CREATE on the database makes a schema named after pgseald's role
/// (the first entry of the default search_path, `"$user"`) while a reseal runs, with
/// an updatable view of the registered table's name whose condition calls its own
/// function. pgseald read the table's name before the schema existed; the statements
/// it runs after must still mean the registered table, so the function never runs,
/// and never as pgseald's role (here a superuser).
#[test]
fn a_schema_made_during_a_reseal_cannot_take_over_its_table_name() {
    let cl = Cluster::start("jobs-name-race", &[KEY_V1], &[]);
    let mut c = creds_table(&cl);
    seal_rows(&mut c, "a", 1, 4000);
    c.batch_execute(
        "CREATE ROLE mallory LOGIN;
         GRANT CREATE ON DATABASE postgres TO mallory;",
    )
    .unwrap();
    let mut m = cl.connect_as("mallory");
    m.batch_execute(
        "CREATE SCHEMA trap;
         CREATE TABLE trap.ran (who text);
         GRANT USAGE ON SCHEMA trap TO PUBLIC;
         GRANT INSERT ON trap.ran TO PUBLIC;
         CREATE FUNCTION trap.evil() RETURNS boolean LANGUAGE sql VOLATILE
           AS $$ INSERT INTO trap.ran VALUES (current_user) RETURNING true $$;
         CREATE TABLE trap.rows (id int PRIMARY KEY, tenant_id text, token text);
         INSERT INTO trap.rows VALUES (1, 'a', 'v2:x:y');",
    )
    .unwrap();
    // Batches of one row: the reseal runs for seconds.
    let mut child = Pgseald::new(["rotate", "tenant", "a", "--batch", "1"])
        .on(&cl)
        .spawn(Stdio::null());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the reseal must still be running when the schema appears"
    );
    m.batch_execute(
        "CREATE SCHEMA postgres;
         CREATE VIEW postgres.creds AS SELECT * FROM trap.rows WHERE trap.evil();",
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "the reseal completes: {status:?}");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM trap.ran"),
        0,
        "the view's function ran inside pgseald's statements"
    );
    // The view would take over this test's own unqualified queries as well.
    m.batch_execute("DROP SCHEMA postgres CASCADE").unwrap();
    assert_eq!(rows_under_non_active_keys(&mut c, "a"), 0);
    assert_eq!(wrong_values(&mut c, "a"), 0);
}

/// A session of the tenant that holds a lock on one of its rows (and stays idle)
/// cannot stall a reseal: each batch waits for a row lock at most its lock_timeout,
/// is tried again a few times, and then the run fails for that tenant (exit 4)
/// instead of waiting for ever. Once the lock is gone, a rerun finishes.
#[test]
fn a_held_row_lock_fails_the_reseal_instead_of_stalling_it() {
    let cl = Cluster::start("jobs-rotate-lock", &[KEY_V1], &[]);
    let mut c = creds_table(&cl);
    seal_rows(&mut c, "a", 1, 100);
    let mut holder = cl.connect();
    holder
        .batch_execute(
            "BEGIN; SELECT pgseal.set_tenant('a'); SELECT 1 FROM creds WHERE id = 50 FOR UPDATE;",
        )
        .unwrap();
    let log = std::path::Path::new(pgseal_tests::IT_DIR).join("jobs-rotate-lock.log");
    let mut child = Pgseald::new(["rotate", "tenant", "a"])
        .on(&cl)
        .spawn(std::fs::File::create(&log).unwrap());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the reseal still waited for the lock after 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(4), "{out}");
    assert!(
        out.contains("55P03"),
        "the lock timeout is what it reports: {out}"
    );
    holder.batch_execute("COMMIT").unwrap();
    let (code, out) = Pgseald::new(["rotate", "tenant", "a"]).on(&cl).run();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(rows_under_non_active_keys(&mut c, "a"), 0);
    assert_eq!(wrong_values(&mut c, "a"), 0);
}

/// Keys of types an extension brings (citext, ltree) are compared with their own
/// operators, though pgseald's sessions see only pg_catalog: a batch adds the
/// schemas of its key's types to its own search_path. Without them ltree's key has
/// no `>` at all, and citext's would compare as text, in another order than the
/// index's. Skipped, saying so, where the server lacks either extension.
#[test]
fn reseal_compares_keys_of_extension_types_with_their_own_operators() {
    let cl = Cluster::start("jobs-reseal-exttypes", &[KEY_V1], &[]);
    let mut c = cl.connect();
    if lacks_extensions(&mut c, &["citext", "ltree"]) {
        return;
    }
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE SCHEMA ext;
         CREATE EXTENSION citext SCHEMA ext;
         CREATE EXTENSION ltree SCHEMA ext;
         CREATE TABLE k_ci (tenant_id text, email ext.citext, token text, PRIMARY KEY (tenant_id, email));
         CREATE TABLE k_lt (tenant_id text, path ext.ltree, token text, PRIMARY KEY (tenant_id, path));
         SELECT pgseal.vault_register_column('k_ci', 'token', 'keys.token');
         SELECT pgseal.vault_register_column('k_lt', 'token', 'keys.token');
         BEGIN; SELECT pgseal.set_tenant('a');
         -- Mixed case: citext's order (case-blind) is not text's.
         INSERT INTO k_ci SELECT 'a', (CASE WHEN g % 2 = 0 THEN upper(chr(97 + g % 26)) ELSE chr(97 + g % 26) END) || g || '@x',
                                 pgseal.vault_seal('a-' || g, 'keys.token') FROM generate_series(1, 40) g;
         INSERT INTO k_lt SELECT 'a', ('top.n' || (g % 7) || '.m' || g)::ext.ltree,
                                 pgseal.vault_seal('a-' || g, 'keys.token') FROM generate_series(1, 40) g;
         COMMIT;",
    )
    .unwrap();
    let (code, out) = Pgseald::new(["rotate", "tenant", "a", "--batch", "7"])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(rows_under_non_active_keys(&mut c, "a"), 0, "{out}");
}

#[test]
fn retention_compares_a_tenant_id_of_an_extension_type_with_its_own_operators() {
    // pgseald's statements run under `pg_catalog, pg_temp`, where an extension
    // type's operators are not visible: ltree has no cast to text to fall back on,
    // so the sweep failed; citext fell back to text's (case-sensitive, its index
    // unused).
    let cl = Cluster::start("jobs-retention-exttypes", &[KEY_V1], &[]);
    let mut c = cl.connect();
    if lacks_extensions(&mut c, &["citext", "ltree"]) {
        return;
    }
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE SCHEMA ext;
         CREATE EXTENSION citext SCHEMA ext;
         CREATE EXTENSION ltree SCHEMA ext;
         CREATE TABLE ev_lt (tenant_id ext.ltree NOT NULL, created_at timestamptz NOT NULL);
         CREATE TABLE ev_ci (tenant_id ext.citext NOT NULL, created_at timestamptz NOT NULL);
         INSERT INTO ev_lt SELECT 'acme', now() - g * interval '1 day' FROM generate_series(0, 9) g;
         INSERT INTO ev_ci SELECT CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'ACME' END, now() - g * interval '1 day'
           FROM generate_series(0, 9) g;
         SELECT pgseal.retention_set('ev_lt', '3 days 1 hour');
         SELECT pgseal.retention_set('ev_ci', '3 days 1 hour');",
    )
    .unwrap();
    for dry in [true, false] {
        let mut args = vec!["retention", "run", "--tenant", "acme"];
        if dry {
            args.push("--dry-run");
        }
        let (code, out) = Pgseald::new(args).on(&cl).run();
        assert_eq!(code, Some(0), "{out}");
    }
    // Days 0..3 kept; under citext 'ACME' is 'acme'.
    assert_eq!(count(&mut c, "SELECT count(*) FROM ev_lt"), 4);
    assert_eq!(count(&mut c, "SELECT count(*) FROM ev_ci"), 4);
}

#[test]
fn an_operator_made_in_a_schema_anyone_may_write_never_runs_as_pgseald() {
    // A domain tenant_id in a schema where every role may create objects: another
    // role makes an `=` for the domain there, an exact match that PostgreSQL would
    // pick over pg_catalog's had pgseald put that schema on its path.
    let cl = Cluster::start("jobs-retention-open-schema", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE SCHEMA open_schema;
         GRANT CREATE, USAGE ON SCHEMA open_schema TO PUBLIC;
         CREATE DOMAIN open_schema.tid AS text;
         CREATE TABLE ev_dom (tenant_id open_schema.tid NOT NULL, created_at timestamptz NOT NULL);
         INSERT INTO ev_dom SELECT 'acme', now() - g * interval '1 day' FROM generate_series(0, 9) g;
         SELECT pgseal.retention_set('ev_dom', '3 days 1 hour');
         CREATE TABLE ran_as (who text);
         GRANT INSERT ON ran_as TO PUBLIC;
         CREATE ROLE mallory;
         SET ROLE mallory;
         CREATE FUNCTION open_schema.eq(open_schema.tid, open_schema.tid) RETURNS boolean
           LANGUAGE plpgsql AS $$ BEGIN INSERT INTO public.ran_as VALUES (current_user); RETURN $1::text = $2::text; END $$;
         CREATE OPERATOR open_schema.= (leftarg = open_schema.tid, rightarg = open_schema.tid, function = open_schema.eq);
         RESET ROLE;",
    )
    .unwrap();
    let (code, out) = Pgseald::new(["retention", "run", "--tenant", "acme"])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM ev_dom"), 4, "{out}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM ran_as"), 0, "{out}");
}

#[test]
fn a_sweep_stopped_between_batches_leaves_the_receipt_of_what_it_deleted() {
    // A sweep stopped by SIGTERM in the pause between two batches still records
    // what it deleted.
    let cl = Cluster::start("jobs-retention-stop", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE ev (id bigint PRIMARY KEY, tenant_id text NOT NULL, created_at timestamptz NOT NULL);
         INSERT INTO ev SELECT g, 'acme', now() - interval '365 days' FROM generate_series(1, 50) g;
         SELECT pgseal.retention_set('ev', '30 days');",
    )
    .unwrap();
    let log = std::path::Path::new(pgseal_tests::IT_DIR).join("jobs-retention-stop.log");
    let mut child = Pgseald::new(["retention", "run", "--batch", "10", "--pause-ms", "3000"])
        .on(&cl)
        .spawn(Stdio::from(std::fs::File::create(&log).unwrap()));
    // The first batch commits at once; then the sweep pauses for 3 s.
    let began = std::time::Instant::now();
    while count(&mut c, "SELECT count(*) FROM ev") > 40 {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "no batch committed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = wait_for_exit(&mut child, Duration::from_secs(30));
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(
        !status.success() || out.contains("stopped"),
        "{status:?}: {out}"
    );
    let left = count(&mut c, "SELECT count(*) FROM ev");
    assert!(left > 0, "the sweep was not stopped before its end: {out}");
    let recorded: i64 = c
        .query_one(
            "SELECT (payload->>'deleted')::int8 FROM pgseal.ledger WHERE event = 'retention.deleted' AND tenant_id = 'acme'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(recorded, 50 - left, "{out}");
}

/// A tenant's receipt commits with its last batch: a receipt that fails (here,
/// pgseald's role may no longer call `_job_receipt`) takes the rows of that batch
/// with it, so they are never deleted without the receipt; the batches before it
/// stay deleted (their receipt, tried once more after the failure, fails alike) and
/// the next run's receipt counts only what that run deleted.
#[test]
fn a_failed_receipt_leaves_the_rows_of_the_tenants_last_batch() {
    let cl = Cluster::start("jobs-retention-receipt-fails", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE ROLE sweeper LOGIN;
         GRANT pgseal_admin TO sweeper;
         CREATE TABLE ev (id bigint PRIMARY KEY, tenant_id text NOT NULL, created_at timestamptz NOT NULL);
         INSERT INTO ev SELECT g, 'one', now() - interval '60 days' FROM generate_series(1, 50) g;
         INSERT INTO ev SELECT 1000 + g, 'two', now() - interval '60 days' FROM generate_series(1, 250) g;
         INSERT INTO ev SELECT 2000 + 10 * i + g, t, now() FROM generate_series(1, 5) g, unnest(ARRAY['one', 'two']) WITH ORDINALITY AS u(t, i);
         SELECT pgseal.tenant_protect('ev');
         GRANT SELECT, DELETE ON ev TO sweeper;
         SELECT pgseal.retention_set('ev', '30 days');
         REVOKE EXECUTE ON FUNCTION pgseal._job_receipt(text, jsonb) FROM pgseal_admin;",
    )
    .unwrap();
    let url = cl.url().replace("user=postgres", "user=sweeper");
    let run = |tenant: &str| {
        Pgseald::new(["retention", "run", "--batch", "100", "--tenant", tenant])
            .on(&cl)
            .env("PGSEALD_DATABASE_URL", &url)
            .run()
    };
    let left = |c: &mut postgres::Client, t: &str| {
        count(
            c,
            &format!("SELECT count(*) FROM ev WHERE tenant_id = '{t}' AND created_at < now() - interval '30 days'"),
        )
    };
    // One batch: it is the last, and nothing goes.
    let (code, out) = run("one");
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("_job_receipt"), "{out}");
    assert_eq!(left(&mut c, "one"), 50, "{out}");
    // Batches of 100, 100 and 50: the first two stay deleted, the last does not.
    let (code, out) = run("two");
    assert_ne!(code, Some(0), "{out}");
    assert_eq!(left(&mut c, "two"), 50, "{out}");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pgseal.ledger WHERE event = 'retention.deleted'"
        ),
        0
    );
    c.batch_execute("GRANT EXECUTE ON FUNCTION pgseal._job_receipt(text, jsonb) TO pgseal_admin")
        .unwrap();
    for t in ["one", "two"] {
        let (code, out) = run(t);
        assert_eq!(code, Some(0), "{out}");
        assert_eq!(left(&mut c, t), 0, "{out}");
    }
    let receipts: Vec<(String, i64)> = c
        .query(
            "SELECT tenant_id, (payload->>'deleted')::int8 FROM pgseal.ledger \
              WHERE event = 'retention.deleted' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(receipts, [("one".to_owned(), 50), ("two".to_owned(), 50)]);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM ev"),
        10,
        "the rows in their window stay"
    );
}

/// The receipt in a tenant's last batch waits for the tenant's chain lock no
/// longer than 200 ms (or the batch's `lock_timeout`, if shorter; here it is a
/// minute), since the batch holds its rows' locks meanwhile (a session holding the
/// chain lock that then waited for one of those rows would deadlock with it): the
/// batch commits without it, and the receipt follows in a transaction of its own
/// once the lock is free.
#[test]
fn a_receipt_that_waits_for_the_chain_lock_lets_its_batch_commit_first() {
    let cl = Cluster::start("jobs-retention-receipt-waits", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE ev (id bigint PRIMARY KEY, tenant_id text NOT NULL, created_at timestamptz NOT NULL);
         INSERT INTO ev SELECT g, 'acme', now() - interval '60 days' FROM generate_series(1, 20) g;
         SELECT pgseal.retention_set('ev', '30 days');",
    )
    .unwrap();
    // acme's chain exists (its ledger key too: the lock the receipt waits for is the
    // chain's); another session appends to it and holds its lock.
    c.batch_execute("BEGIN; SELECT pgseal.set_tenant('acme'); SELECT pgseal.ledger_append('first', '{}'); COMMIT;")
        .unwrap();
    let mut holder = cl.connect();
    holder
        .batch_execute(
            "BEGIN; SELECT pgseal.set_tenant('acme'); SELECT pgseal.ledger_append('held', '{}');",
        )
        .unwrap();
    let log = std::path::Path::new(pgseal_tests::IT_DIR).join("jobs-retention-receipt-waits.log");
    let mut child = Pgseald::new(["retention", "run", "--lock-timeout-ms", "60000"])
        .on(&cl)
        .spawn(Stdio::from(std::fs::File::create(&log).unwrap()));
    // The batch's deletes commit while the chain lock is still held.
    let began = std::time::Instant::now();
    while count(&mut c, "SELECT count(*) FROM ev") > 0 {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the batch did not commit while the chain lock was held: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "pgseald did not wait for the receipt"
    );
    let receipts = "SELECT count(*) FROM pgseal.ledger WHERE event = 'retention.deleted' \
                      AND tenant_id = 'acme' AND payload->>'deleted' = '20'";
    assert_eq!(count(&mut c, receipts), 0);
    holder.batch_execute("COMMIT").unwrap();
    let status = wait_for_exit(&mut child, Duration::from_secs(30));
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status:?}: {out}");
    assert_eq!(count(&mut c, receipts), 1, "{out}");
}

/// A sweep whose later batch fails (a row lock held past its `lock_timeout`)
/// still leaves the receipt of the batches it committed before its error ends the
/// run.
#[test]
fn a_sweep_that_fails_after_committed_batches_receipts_them() {
    let cl = Cluster::start("jobs-retention-fails-midway", &[KEY_V1], &[]);
    let mut c = cl.connect();
    // Physical order and time order agree, so the first batch is ids 1..10
    // whichever way the cursor's query is planned.
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE ev (id bigint PRIMARY KEY, tenant_id text NOT NULL, created_at timestamptz NOT NULL);
         CREATE INDEX ON ev (tenant_id, created_at);
         INSERT INTO ev SELECT g, 'acme', now() - interval '60 days' + g * interval '1 second' FROM generate_series(1, 30) g;
         SELECT pgseal.retention_set('ev', '30 days');",
    )
    .unwrap();
    let mut holder = cl.connect();
    holder
        .batch_execute("BEGIN; SELECT count(*) FROM (SELECT 1 FROM ev WHERE id > 10 FOR UPDATE) l;")
        .unwrap();
    let (code, out) = Pgseald::new(["retention", "run", "--batch", "10"])
        .on(&cl)
        .run();
    holder.batch_execute("ROLLBACK").unwrap();
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("lock timeout"), "{out}");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM ev WHERE id <= 10"),
        0,
        "{out}"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM ev"), 20, "{out}");
    let receipts = deleted_receipts(&mut c, "acme");
    assert_eq!(receipts, [10], "{out}");
}

/// `pgseal.strict_context` turned on (a reload) during a sweep: a commit then
/// closes the held cursor, and the sweep goes on by searching for the rest instead
/// of failing with rows deleted; one receipt counts them all.
#[test]
fn a_sweep_goes_on_by_search_when_strict_context_turns_on_midway() {
    let cl = Cluster::start("jobs-retention-strict-midway", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE ev (id bigint PRIMARY KEY, tenant_id text NOT NULL, created_at timestamptz NOT NULL);
         INSERT INTO ev SELECT g, 'acme', now() - interval '60 days' FROM generate_series(1, 50) g;
         SELECT pgseal.retention_set('ev', '30 days');",
    )
    .unwrap();
    let log = std::path::Path::new(pgseal_tests::IT_DIR).join("jobs-retention-strict-midway.log");
    let mut child = Pgseald::new(["retention", "run", "--batch", "10", "--pause-ms", "1000"])
        .on(&cl)
        .spawn(Stdio::from(std::fs::File::create(&log).unwrap()));
    let began = std::time::Instant::now();
    while count(&mut c, "SELECT count(*) FROM ev") > 40 {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "no batch committed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.batch_execute("ALTER SYSTEM SET pgseal.strict_context = on")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    let status = wait_for_exit(&mut child, Duration::from_secs(60));
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status:?}: {out}");
    assert!(
        out.contains("strict_context closed the sweep's cursor"),
        "the sweep never met a closed cursor: {out}"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM ev"), 0, "{out}");
    let receipts = deleted_receipts(&mut c, "acme");
    assert_eq!(receipts, [50], "{out}");
}

/// Times go to pgseald as text and back (the cutoff, each batch's time bounds),
/// whatever `DateStyle` and `TimeZone` the database gives pgseald's session: the
/// batches of a partitioned table (bounded by their time range) cross a fall-back
/// of the clocks, where the texts of two hours interleave, and delete every row;
/// under Asia/Shanghai with the SQL style (whose zone abbreviation, CST, reads
/// back as US Central's) the cutoff stays 30 days back, keeping a row 29 days and
/// 17 hours old.
#[test]
fn retention_reads_times_back_exactly_under_any_date_style_and_zone() {
    let cl = Cluster::start("jobs-retention-timezones", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE ev_tz (tenant_id text NOT NULL, created_at timestamptz NOT NULL) PARTITION BY RANGE (created_at);
         CREATE TABLE ev_tz_all PARTITION OF ev_tz DEFAULT;
         CREATE INDEX ON ev_tz (tenant_id, created_at);
         INSERT INTO ev_tz SELECT 'dst', timestamptz '2025-10-26 00:00:00+00' + g * interval '1 second'
           FROM generate_series(0, 7199) g;
         CREATE TABLE ev_cut (id int PRIMARY KEY, tenant_id text NOT NULL, created_at timestamptz NOT NULL);
         INSERT INTO ev_cut VALUES (1, 'cut', now() - interval '30 days 1 hour'),
                                   (2, 'cut', now() - interval '30 days' + interval '7 hours');
         SELECT pgseal.retention_set('ev_tz', '30 days');
         SELECT pgseal.retention_set('ev_cut', '30 days');
         ALTER DATABASE postgres SET TimeZone = 'Europe/Berlin';
         ALTER DATABASE postgres SET DateStyle = 'SQL, DMY';",
    )
    .unwrap();
    let (code, out) = Pgseald::new(["retention", "run", "--batch", "1000", "--tenant", "dst"])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant dst: deleted 7200 rows"), "{out}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM ev_tz"), 0, "{out}");
    c.batch_execute("ALTER DATABASE postgres SET TimeZone = 'Asia/Shanghai'")
        .unwrap();
    let (code, out) = Pgseald::new(["retention", "run", "--tenant", "cut"])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    let left: Vec<i32> = c
        .query("SELECT id FROM ev_cut ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, [2], "{out}");
}

#[test]
fn a_key_type_in_a_schema_anyone_may_write_is_skipped_not_resealed_out_of_order() {
    // Such a schema is left off the batch's path (an operator made there would run
    // as pgseald); a citext key would then compare as text, in another order than
    // its index's, and key ranges would skip rows. The registration is skipped.
    let cl = Cluster::start("jobs-reseal-open-schema", &[KEY_V1], &[]);
    let mut c = cl.connect();
    if lacks_extensions(&mut c, &["citext"]) {
        return;
    }
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE SCHEMA open_ext;
         GRANT CREATE, USAGE ON SCHEMA open_ext TO PUBLIC;
         CREATE EXTENSION citext SCHEMA open_ext;
         CREATE TABLE k_open (tenant_id text, email open_ext.citext, token text, PRIMARY KEY (tenant_id, email));
         SELECT pgseal.vault_register_column('k_open', 'token', 'keys.token');
         BEGIN; SELECT pgseal.set_tenant('a');
         INSERT INTO k_open SELECT 'a', (CASE WHEN g % 2 = 0 THEN upper(chr(97 + g % 26)) ELSE chr(97 + g % 26) END) || g || '@x',
                                   pgseal.vault_seal('a-' || g, 'keys.token') FROM generate_series(1, 40) g;
         COMMIT;",
    )
    .unwrap();
    let (code, out) = Pgseald::new(["rotate", "tenant", "a", "--batch", "7"])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("skipping a sealed column registration")
            && out.contains("every role may create in"),
        "{out}"
    );
    assert_eq!(rows_under_non_active_keys(&mut c, "a"), 40, "{out}");
}

#[test]
fn kek_rotation_moves_every_tenant_key() {
    let cl = Cluster::start("jobs-kek", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE creds (id int PRIMARY KEY, tenant_id text NOT NULL, token text);",
    )
    .unwrap();
    for t in 0..30 {
        seal_rows(&mut c, &format!("t{t}"), t * 10, 3);
    }
    drop(c);
    cl.set_keys(&[KEY_V1, KEY_V2]);
    cl.restart();
    let mut c = cl.connect();
    let (code, out) = Pgseald::new(["rotate", "kek", "--batch", "7"])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("rewrapped 30 tenant keys"), "{out}");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pgseal.tenant_keys WHERE kek_version <> 2"
        ),
        0
    );
    for t in 0..30 {
        assert_eq!(wrong_values(&mut c, &format!("t{t}")), 0);
    }
}

#[test]
fn no_decrypt_fails_and_concurrent_updates_win_while_a_reseal_runs() {
    let cl = Cluster::start("jobs-rotate-live", &[KEY_V1], &[]);
    let mut c = creds_table(&cl);
    seal_rows(&mut c, "a", 1, 4000);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A reader decrypting every value, over and over, counting failures.
    let reader = {
        let (mut r, stop) = (cl.connect(), stop.clone());
        std::thread::spawn(move || {
            let (mut rounds, mut failures) = (0u32, 0i64);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || rounds == 0 {
                match r.batch_execute("BEGIN; SELECT pgseal.set_tenant('a')") {
                    Ok(()) => {}
                    Err(_) => failures += 1,
                }
                match r.query_one(
                    "SELECT count(*) FROM creds WHERE pgseal.vault_decrypt(token, 'creds.token') NOT LIKE 'token-%' \
                     AND pgseal.vault_decrypt(token, 'creds.token') NOT LIKE 'new-%'",
                    &[],
                ) {
                    Ok(row) => failures += row.get::<_, i64>(0),
                    Err(_) => failures += 1,
                }
                let _ = r.batch_execute("COMMIT");
                rounds += 1;
            }
            (rounds, failures)
        })
    };
    // A writer replacing some values while the reseal runs.
    let writer = {
        let (mut w, stop) = (cl.connect(), stop.clone());
        std::thread::spawn(move || {
            let mut written = Vec::new();
            let mut id = 1;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && id <= 4000 {
                w.batch_execute(&format!(
                    "BEGIN; SELECT pgseal.set_tenant('a');
                     UPDATE creds SET token = pgseal.vault_seal('new-{id}', 'creds.token') WHERE id = {id}; COMMIT;"
                ))
                .unwrap();
                written.push(id);
                id += 97;
            }
            written
        })
    };
    let (code, out) = Pgseald::new(["rotate", "tenant", "a", "--batch", "50"])
        .on(&cl)
        .run();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(code, Some(0), "{out}");
    let (rounds, failures) = reader.join().unwrap();
    let written = writer.join().unwrap();
    assert!(rounds >= 1);
    assert_eq!(
        failures, 0,
        "decrypts failed while the reseal ran ({rounds} rounds)"
    );
    // Every concurrent update survived: the reseal never wrote back an old value.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SELECT pgseal.set_tenant('a')").unwrap();
    for id in &written {
        let v: String = tx
            .query_one(
                "SELECT pgseal.vault_decrypt(token, 'creds.token') FROM creds WHERE id = $1",
                &[id],
            )
            .unwrap()
            .get(0);
        assert_eq!(v, format!("new-{id}"), "row {id}");
    }
    tx.commit().unwrap();
    assert!(!written.is_empty());
}

// ---------------------------------------------------------------------------
// Registrations follow the schema (issue 17).

/// The one value `sql` returns.
fn value<T: for<'a> postgres::types::FromSql<'a>>(c: &mut postgres::Client, sql: &str) -> T {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// Rows of `table` (tenant 'a') whose value in `col` is sealed under `key`.
fn sealed_under(c: &mut postgres::Client, table: &str, col: &str, key: &str) -> i64 {
    count(
        c,
        &format!("SELECT count(*) FROM {table} WHERE split_part({col}, ':', 2) = '{key}'"),
    )
}

/// A reseal walks every primary key shape in batches: tenant_id first, last, alone,
/// and before several columns of other types. Every value of tenant "a" ends under
/// its new key and opens to what was sealed; tenant "b", in the same tables and key
/// ranges, is not touched. Batches of 7 rows make every table take several, with
/// keys that are equal in a leading column across a batch's end.
#[test]
fn reseal_walks_every_primary_key_shape_in_batches() {
    let cl = Cluster::start("jobs-reseal-keys", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE k_first (tenant_id text, id int, token text, PRIMARY KEY (tenant_id, id));
         CREATE TABLE k_last (id int, tenant_id text, token text, PRIMARY KEY (id, tenant_id));
         CREATE TABLE k_alone (tenant_id text PRIMARY KEY, token text);
         CREATE TABLE k_mixed (tenant_id text, name text, at timestamptz, n numeric, new int DEFAULT 0, token text,
                               PRIMARY KEY (tenant_id, name, at, n, new));
         -- A key whose JSON form is not its text form: the string \"5\" and the number 5.
         CREATE TABLE k_json (tenant_id text, k jsonb, f float8, pgseal_rows int DEFAULT 0, pgseal_k0 int DEFAULT 0,
                              token text, PRIMARY KEY (tenant_id, k, f, pgseal_rows, pgseal_k0));",
    )
    .unwrap();
    for t in ["k_first", "k_last", "k_alone", "k_mixed", "k_json"] {
        c.batch_execute(&format!(
            "SELECT pgseal.vault_register_column('{t}', 'token', 'keys.token')"
        ))
        .unwrap();
    }
    for tenant in ["a", "b"] {
        c.batch_execute(&format!(
            "BEGIN; SELECT pgseal.set_tenant('{tenant}');
             INSERT INTO k_first SELECT '{tenant}', g, pgseal.vault_seal('{tenant}-' || g, 'keys.token') FROM generate_series(1, 40) g;
             INSERT INTO k_last SELECT g, '{tenant}', pgseal.vault_seal('{tenant}-' || g, 'keys.token') FROM generate_series(1, 40) g;
             INSERT INTO k_alone VALUES ('{tenant}', pgseal.vault_seal('{tenant}-0', 'keys.token'));
             INSERT INTO k_mixed (tenant_id, name, at, n, token) SELECT '{tenant}', 'n' || (g % 3), timestamptz '2026-01-01' + (g % 5) * interval '1 hour', g / 10.0,
                                        pgseal.vault_seal('{tenant}-' || g, 'keys.token') FROM generate_series(1, 40) g;
             INSERT INTO k_json (tenant_id, k, f, token)
               SELECT '{tenant}', CASE WHEN g % 2 = 0 THEN to_jsonb(g / 2) ELSE to_jsonb((g / 2)::text) END, 0.1 * g,
                      pgseal.vault_seal('{tenant}-' || g, 'keys.token') FROM generate_series(1, 40) g;
             COMMIT;"
        ))
        .unwrap();
    }
    let key = |c: &mut postgres::Client, t: &str| -> String {
        value(c, &format!("SELECT key_id FROM pgseal.tenant_keys WHERE tenant_id = '{t}' AND purpose = 'dek' AND state = 'active'"))
    };
    let (old_a, old_b) = (key(&mut c, "a"), key(&mut c, "b"));
    for batch in [Some("7"), None] {
        let mut args = vec!["rotate", "tenant", "a"];
        if let Some(n) = batch {
            args.extend(["--batch", n]);
        }
        let (code, out) = Pgseald::new(args).on(&cl).run();
        assert_eq!(code, Some(0), "{out}");
        let new_a = key(&mut c, "a");
        let mut tx = c.transaction().unwrap();
        tx.batch_execute("SELECT pgseal.set_tenant('a')").unwrap();
        for (t, rows) in [
            ("k_first", 40),
            ("k_last", 40),
            ("k_alone", 1),
            ("k_mixed", 40),
            ("k_json", 40),
        ] {
            let (under_new, total): (i64, i64) = {
                let r = tx
                    .query_one(
                        &format!("SELECT count(*) FILTER (WHERE split_part(token, ':', 2) = $1), count(*) FROM {t} WHERE tenant_id = 'a'"),
                        &[&new_a],
                    )
                    .unwrap();
                (r.get(0), r.get(1))
            };
            assert_eq!(
                (under_new, total),
                (rows, rows),
                "{t}, batch {batch:?}: {out}"
            );
            let opened: Vec<String> = tx
                .query(&format!("SELECT pgseal.vault_decrypt(token, 'keys.token') FROM {t} WHERE tenant_id = 'a'"), &[])
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert!(
                opened.iter().all(|v| v.starts_with("a-")),
                "{t}: {opened:?}"
            );
            let distinct: std::collections::BTreeSet<&String> = opened.iter().collect();
            assert_eq!(distinct.len() as i64, rows, "{t}: every value kept apart");
        }
        tx.commit().unwrap();
        for t in ["k_first", "k_last", "k_alone", "k_mixed", "k_json"] {
            assert_eq!(
                count(&mut c, &format!("SELECT count(*) FROM {t} WHERE tenant_id = 'b' AND split_part(token, ':', 2) <> '{old_b}'")),
                0,
                "{t}: tenant b untouched"
            );
        }
        assert_ne!(new_a, old_a);
    }
}

#[test]
fn jobs_follow_renames_and_skip_broken_registrations_after_drops() {
    let cl = Cluster::start("jobs-schema", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute("CREATE EXTENSION pgseal; CREATE SCHEMA other;")
        .unwrap();
    for t in [
        "ok", "renamed", "dropped", "dropcol", "nopk", "retyped", "ghost",
    ] {
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, tenant_id text NOT NULL, created_at timestamptz NOT NULL, token text);
             SELECT pgseal.vault_register_column('{t}', 'token', 'ctx');
             SELECT pgseal.retention_set('{t}', '30 days');
             BEGIN; SELECT pgseal.set_tenant('a');
             INSERT INTO {t} SELECT g, 'a', now() - g * interval '1 day', pgseal.vault_seal('v' || g, 'ctx')
               FROM generate_series(1, 50) g;
             COMMIT;"
        ))
        .unwrap();
    }
    let old_key: String = value(&mut c, "SELECT split_part(token, ':', 2) FROM ok LIMIT 1");
    let ghost: i64 = value(&mut c, "SELECT 'ghost'::regclass::oid::bigint");
    c.batch_execute(
        "ALTER TABLE renamed RENAME COLUMN token TO secret;
         ALTER TABLE renamed RENAME COLUMN created_at TO made_at;
         ALTER TABLE renamed RENAME TO renamed2;
         ALTER TABLE renamed2 SET SCHEMA other;
         DROP TABLE dropped;
         ALTER TABLE dropcol DROP COLUMN token;
         ALTER TABLE nopk DROP CONSTRAINT nopk_pkey;
         ALTER TABLE retyped ALTER COLUMN token TYPE varchar, ALTER COLUMN created_at TYPE text;
         -- A table dropped while the event trigger is off keeps its registrations:
         -- before issue 17 every DROP did, and rotation then failed for every table.
         ALTER EVENT TRIGGER pgseal_registrations_drop DISABLE;
         DROP TABLE ghost;
         ALTER EVENT TRIGGER pgseal_registrations_drop ENABLE ALWAYS;",
    )
    .unwrap();
    let regs: Vec<(String, String)> = c
        .query(
            "SELECT rel::text, col::text FROM pgseal.sealed_columns ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expect = [
        (ghost.to_string(), "token"),
        ("nopk".into(), "token"),
        ("ok".into(), "token"),
        ("other.renamed2".into(), "secret"),
        ("retyped".into(), "token"),
    ];
    let mut expect: Vec<(String, String)> =
        expect.into_iter().map(|(t, c)| (t, c.to_owned())).collect();
    expect.sort();
    assert_eq!(regs, expect, "drops removed, renames followed");

    let (code, out) = Pgseald::new(["rotate", "tenant", "a", "--batch", "7"])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("cannot be resealed"), "{out}");
    for (table, why) in [
        (ghost.to_string(), "the table is gone"),
        ("nopk".into(), "no primary key"),
        ("retyped".into(), "no longer of type text"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.contains("WARN") && l.contains(&table) && l.contains(why)),
            "a warning names {table}: {out}"
        );
    }
    let new_key: String = value(
        &mut c,
        "SELECT key_id FROM pgseal.tenant_keys WHERE tenant_id = 'a' AND purpose = 'dek' AND state = 'active'",
    );
    assert_ne!(new_key, old_key);
    assert_eq!(sealed_under(&mut c, "ok", "token", &new_key), 50);
    assert_eq!(
        sealed_under(&mut c, "other.renamed2", "secret", &new_key),
        50,
        "the renamed column of the renamed table is resealed"
    );
    assert_eq!(sealed_under(&mut c, "nopk", "token", &old_key), 50);
    assert_eq!(sealed_under(&mut c, "retyped", "token", &old_key), 50);

    let (code, out) = Pgseald::new(["retention", "run"]).on(&cl).run();
    assert_eq!(code, Some(0), "{out}");
    for (table, why) in [
        (ghost.to_string(), "the table is gone"),
        ("retyped".into(), "no longer a timestamp or date"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.contains("WARN") && l.contains(&table) && l.contains(why)),
            "a warning names {table}: {out}"
        );
    }
    for t in ["ok", "other.renamed2", "dropcol", "nopk"] {
        assert_eq!(
            count(&mut c, &format!("SELECT count(*) FROM {t}")),
            29,
            "{t}: rows older than 30 days deleted; {out}"
        );
    }
    assert_eq!(count(&mut c, "SELECT count(*) FROM retyped"), 50);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pgseal.job_runs WHERE status <> 'ok'"
        ),
        0
    );
}

#[test]
fn a_drop_without_the_master_key_still_removes_registrations() {
    let cl = Cluster::start("jobs-drop-nokey", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute("CREATE EXTENSION pgseal;").unwrap();
    for t in ["gone", "kept"] {
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, tenant_id text, created_at timestamptz, token text, extra text);
             SELECT pgseal.vault_register_column('{t}', 'token');
             SELECT pgseal.vault_register_column('{t}', 'extra');
             SELECT pgseal.retention_set('{t}', '30 days');
             SELECT pgseal.retention_set('{t}', '10 days', 'created_at', 'acme');"
        ))
        .unwrap();
    }
    let before = count(&mut c, "SELECT count(*) FROM pgseal.ledger");
    drop(c);
    cl.set_keys(&[]);
    cl.restart();
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = notices.clone();
    let mut c = cl
        .config()
        .notice_callback(move |n| sink.lock().unwrap().push(n.message().to_owned()))
        .connect(postgres::NoTls)
        .unwrap();
    assert!(!value::<bool>(
        &mut c,
        "SELECT loaded FROM pgseal.vault_status()"
    ));
    c.batch_execute("ALTER TABLE kept DROP COLUMN extra; DROP TABLE gone;")
        .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pgseal.retention_rules WHERE rel::text = 'kept'"
        ),
        2
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM pgseal.retention_rules"),
        2
    );
    assert_eq!(
        c.query(
            "SELECT col::text FROM pgseal.sealed_columns ORDER BY 1",
            &[]
        )
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>(),
        ["token"]
    );
    let warned = notices
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.contains("public.gone") && m.contains("not recorded in the ledger"))
        .count();
    // The table's two rules and its two sealed columns, and the dropped column's
    // registration of `kept`.
    assert_eq!(warned, 4, "{:?}", notices.lock().unwrap());
    assert_eq!(
        notices
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.contains("public.kept.extra") && m.contains("not recorded in the ledger"))
            .count(),
        1,
        "{:?}",
        notices.lock().unwrap()
    );
    // A live rule's or registration's removal still needs its ledger entry: fail closed.
    assert_eq!(
        pgseal_tests::sqlstate(c.batch_execute(
            "DELETE FROM pgseal.retention_rules WHERE rel = 'kept'::regclass AND tenant_id = 'acme'"
        )),
        "55000"
    );
    assert_eq!(
        pgseal_tests::sqlstate(
            c.batch_execute("SELECT pgseal.vault_unregister_column('kept', 'token')")
        ),
        "55000"
    );
    drop(c);
    cl.set_keys(&[KEY_V1]);
    cl.restart();
    let mut c = cl.connect();
    assert_eq!(count(&mut c, "SELECT count(*) FROM pgseal.ledger"), before);
    for t in ["_pgseal", "acme"] {
        assert!(value::<bool>(
            &mut c,
            &format!("SELECT ok FROM pgseal.ledger_verify('{t}')")
        ));
    }
}

fn pg_tool(tool: &str, args: &[&str], env: &[(&str, &str)]) {
    let out = std::process::Command::new(pgseal_tests::pg_bindir().join(tool))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// pg_dump writes a table without its dropped columns, so the restored table numbers
/// its columns differently. Here the stale numbers would name other columns of the
/// right types (another timestamp, another text column): the restore must resolve the
/// names pg_dump carried instead.
#[test]
fn registrations_survive_a_dump_and_restore_that_renumbers_columns() {
    let cl = Cluster::start("jobs-dump", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE ev (id int PRIMARY KEY, tenant_id text NOT NULL, junk int, created_at timestamptz,
                          seen timestamptz, other_at timestamptz, token text, note text);
         ALTER TABLE ev DROP COLUMN junk;
         SELECT pgseal.retention_set('ev', '30 days', 'seen');
         SELECT pgseal.vault_register_column('ev', 'token', 'ctx');
         SELECT pgseal.retention_hold('b', true);
         ALTER TABLE ev RENAME COLUMN seen TO seen_at;
         ALTER TABLE ev RENAME COLUMN token TO secret;
         BEGIN; SELECT pgseal.set_tenant('a');
         INSERT INTO ev SELECT g, 'a', now(),
                CASE WHEN g <= 10 THEN now() - interval '40 days' ELSE now() END,
                CASE WHEN g <= 10 THEN now() ELSE now() - interval '40 days' END,
                pgseal.vault_seal('v' || g, 'ctx'), 'plain note'
           FROM generate_series(1, 20) g;
         COMMIT;",
    )
    .unwrap();
    assert_eq!(
        c.query_one(
            "SELECT (SELECT time_attnum FROM pgseal.retention_rules), (SELECT attnum FROM pgseal.sealed_columns)",
            &[]
        )
        .map(|r| (r.get::<_, i16>(0), r.get::<_, i16>(1)))
        .unwrap(),
        (5, 7)
    );
    let dump = format!("{}/jobs.dump", cl.dir.display());
    let port = cl.port.to_string();
    let conn = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
    pg_tool(
        "pg_dump",
        &[&conn[..], &["-Fc", "-f", &dump, "postgres"]].concat(),
        &[],
    );
    c.batch_execute("CREATE DATABASE restored").unwrap();
    pg_tool(
        "pg_restore",
        &[&conn[..], &["--exit-on-error", "-d", "restored", &dump]].concat(),
        &[("PGOPTIONS", "-c pgseal.restore=on")],
    );
    let mut r = cl.connect_to("restored", "postgres");
    // In the restored table seen_at is column 4 (5 there is other_at), secret 6 (7 is note).
    let (time_attnum, time_column, attnum, col): (i16, String, i16, String) = r
        .query_one(
            "SELECT x.time_attnum, x.time_column::text, s.attnum, s.col::text
               FROM pgseal.retention_rules x, pgseal.sealed_columns s",
            &[],
        )
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .unwrap();
    assert_eq!((time_attnum, time_column.as_str()), (4, "seen_at"));
    assert_eq!((attnum, col.as_str()), (6, "secret"));
    assert_eq!(
        value::<String>(
            &mut r,
            "SELECT time_column::text FROM pgseal.retention_policies"
        ),
        "seen_at"
    );
    assert_eq!(
        count(
            &mut r,
            "SELECT count(*) FROM pgseal.retention_holds WHERE tenant_id = 'b'"
        ),
        1
    );
    // The restore recorded nothing new: the dumped entries record the rule and hold.
    assert_eq!(
        count(
            &mut r,
            "SELECT count(*) FROM pgseal.ledger WHERE event IN ('retention.set', 'retention.held')"
        ),
        2
    );
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=restored",
        cl.port
    );
    let (code, out) = Pgseald::new(["retention", "run", "--database-url", &url]).run();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        count(&mut r, "SELECT count(*) FROM ev WHERE id <= 10"),
        0,
        "{out}"
    );
    assert_eq!(
        count(&mut r, "SELECT count(*) FROM ev WHERE id > 10"),
        10,
        "rows old only by another timestamp are kept"
    );
    let (code, out) = Pgseald::new(["rotate", "tenant", "a", "--database-url", &url]).run();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        count(
            &mut r,
            "SELECT count(*) FROM pgseal.key_usage WHERE state <> 'active' AND rows > 0"
        ),
        0,
        "every value resealed"
    );
    assert_eq!(
        count(&mut r, "SELECT count(*) FROM ev WHERE note <> 'plain note'"),
        0
    );
    for t in ["_pgseal", "a"] {
        assert!(value::<bool>(
            &mut r,
            &format!("SELECT ok FROM pgseal.ledger_verify('{t}')")
        ));
    }
}

/// The attack of the security review: a table owner swaps two column names through
/// ALTER VIEW (which renames a plain table's columns, under the tag ALTER VIEW), so
/// that a stored name would point at a column of 1970 timestamps and the restored
/// rule would delete every tenant's rows. Now every tag syncs the name, and pg_dump
/// leaves out registrations whose name is stale (a rename made while event triggers
/// were off) or whose table is gone (a drop made then), which would otherwise fail
/// the restore's COPY and lose every registration of every table.
#[test]
fn alter_view_renames_and_broken_registrations_cannot_poison_a_restore() {
    let cl = Cluster::start("jobs-rename-tags", &[KEY_V1], &[]);
    let mut c = cl.connect();
    let table = |t: &str| {
        format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, tenant_id text NOT NULL, created_at timestamptz,
                               fake_ts timestamptz, token text, other text);
             SELECT pgseal.retention_set('{t}', '30 days');
             SELECT pgseal.vault_register_column('{t}', 'token');"
        )
    };
    c.batch_execute(&format!(
        "CREATE EXTENSION pgseal;
         CREATE ROLE mal LOGIN; CREATE SCHEMA mal AUTHORIZATION mal;
         {} ALTER TABLE mal.t OWNER TO mal;
         {} {} {}
         ALTER EVENT TRIGGER pgseal_registrations_rename DISABLE;
         ALTER TABLE stale RENAME COLUMN created_at TO c2;
         ALTER TABLE stale RENAME COLUMN fake_ts TO created_at;
         ALTER EVENT TRIGGER pgseal_registrations_rename ENABLE ALWAYS;
         ALTER EVENT TRIGGER pgseal_registrations_drop DISABLE;
         DROP TABLE dangling;
         ALTER EVENT TRIGGER pgseal_registrations_drop ENABLE ALWAYS;",
        table("mal.t"),
        table("keep"),
        table("stale"),
        table("dangling")
    ))
    .unwrap();
    let mut m = cl.connect_as("mal");
    m.batch_execute(
        "ALTER VIEW mal.t RENAME COLUMN created_at TO real_created;
         ALTER VIEW mal.t RENAME COLUMN fake_ts TO created_at;
         ALTER FOREIGN TABLE mal.t RENAME COLUMN token TO tok;
         ALTER MATERIALIZED VIEW mal.t RENAME COLUMN other TO token;",
    )
    .unwrap();
    c.batch_execute(
        "BEGIN; SELECT pgseal.set_tenant('a');
         INSERT INTO mal.t (id, tenant_id, real_created, created_at)
           SELECT g, 'a', now(), '1970-01-01' FROM generate_series(1, 5) g;
         COMMIT;",
    )
    .unwrap();
    let dump = format!("{}/rename-tags.dump", cl.dir.display());
    let port = cl.port.to_string();
    let conn = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
    pg_tool(
        "pg_dump",
        &[&conn[..], &["-Fc", "-f", &dump, "postgres"]].concat(),
        &[],
    );
    c.batch_execute("CREATE DATABASE restored").unwrap();
    pg_tool(
        "pg_restore",
        &[&conn[..], &["--exit-on-error", "-d", "restored", &dump]].concat(),
        &[("PGOPTIONS", "-c pgseal.restore=on")],
    );
    let mut r = cl.connect_to("restored", "postgres");
    let rows = |r: &mut postgres::Client, sql: &str| {
        r.query(sql, &[])
            .unwrap()
            .iter()
            .map(|row| row.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        rows(
            &mut r,
            "SELECT rel::text || '.' || time_column FROM pgseal.retention_rules ORDER BY 1"
        ),
        ["keep.created_at", "mal.t.real_created"]
    );
    assert_eq!(
        rows(
            &mut r,
            "SELECT rel::text || '.' || col FROM pgseal.sealed_columns ORDER BY 1"
        ),
        ["keep.token", "mal.t.tok", "stale.token"],
        "stale's sealed column kept its name; its rule and everything of dangling are left out"
    );
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=restored",
        cl.port
    );
    let (code, out) = Pgseald::new(["retention", "run", "--database-url", &url]).run();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        count(&mut r, "SELECT count(*) FROM mal.t"),
        5,
        "rows new by their real time column are kept: {out}"
    );
}

/// A rename never waits on a registration row another transaction holds (the review
/// held one open and made every other role's ALTER TABLE hang, while it held ACCESS
/// EXCLUSIVE): it syncs only the altered table's rows, and skips a locked one.
#[test]
fn a_rename_never_waits_on_a_locked_registration() {
    let cl = Cluster::start("jobs-rename-locks", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE x (id int PRIMARY KEY, tenant_id text, created_at timestamptz, token text);
         CREATE TABLE y (id int PRIMARY KEY, tenant_id text, created_at timestamptz, token text);
         SELECT pgseal.vault_register_column('x', 'token');
         SELECT pgseal.vault_register_column('y', 'token');
         SELECT pgseal.retention_set('x', '1 day');
         ALTER EVENT TRIGGER pgseal_registrations_rename DISABLE;
         ALTER TABLE x RENAME COLUMN token TO tok;
         ALTER EVENT TRIGGER pgseal_registrations_rename ENABLE ALWAYS;",
    )
    .unwrap();
    let mut holder = cl.connect();
    holder
        .batch_execute(
            "BEGIN;
             SELECT 1 FROM pgseal.sealed_columns WHERE rel = 'x'::regclass FOR UPDATE;
             SELECT 1 FROM pgseal.retention_rules WHERE rel = 'x'::regclass FOR UPDATE;",
        )
        .unwrap();
    c.batch_execute("SET statement_timeout = '10s'").unwrap();
    let t = std::time::Instant::now();
    c.batch_execute("ALTER TABLE y RENAME COLUMN token TO tok_y")
        .unwrap();
    c.batch_execute("ALTER TABLE x RENAME COLUMN created_at TO made_at")
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let names = |c: &mut postgres::Client| {
        c.query_one(
            "SELECT (SELECT string_agg(col, ',' ORDER BY col) FROM pgseal.sealed_columns),
                    (SELECT time_column::text FROM pgseal.retention_rules)",
            &[],
        )
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .unwrap()
    };
    assert_eq!(
        names(&mut c),
        ("tok_y,token".to_owned(), "created_at".to_owned()),
        "x's locked rows are left for later"
    );
    holder.batch_execute("COMMIT").unwrap();
    c.batch_execute("ALTER TABLE x ALTER COLUMN tok SET STATISTICS 200")
        .unwrap();
    assert_eq!(
        names(&mut c),
        ("tok,tok_y".to_owned(), "made_at".to_owned())
    );
}

/// Whether the server lacks any of the extensions `names` (saying so: the test that
/// asks is then skipped).
fn lacks_extensions(c: &mut postgres::Client, names: &[&str]) -> bool {
    let wanted: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let have = c
        .query_one(
            "SELECT count(*) FROM pg_available_extensions WHERE name = ANY ($1)",
            &[&wanted],
        )
        .unwrap()
        .get::<_, i64>(0);
    if have < names.len() as i64 {
        eprintln!("SKIPPED: this server lacks one of the extensions {names:?}");
        return true;
    }
    false
}

/// Waits for pgseald's `child` to end, at most `limit`.
fn wait_for_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "pgseald did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The rows each of `tenant`'s retention receipts counts.
fn deleted_receipts(c: &mut postgres::Client, tenant: &str) -> Vec<i64> {
    c.query(
        "SELECT (payload->>'deleted')::int8 FROM pgseal.ledger \
          WHERE event = 'retention.deleted' AND tenant_id = $1",
        &[&tenant],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Runs `pgseald run` with a [rotation] section (every second, keys older than
/// `max_key_age_days` due) until its first rotation run ends: that run's status,
/// its detail, and pgseald's log.
fn scheduled_rotation_once(
    cl: &Cluster,
    c: &mut postgres::Client,
    files: &str,
    max_key_age_days: u32,
) -> (String, String, String) {
    let dir = pgseal_tests::fresh_dir(files);
    let config = dir.join("pgseald.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"{}\"\n[rotation]\nschedule = \"* * * * * *\"\nmax_key_age_days = {max_key_age_days}\n",
            cl.url()
        ),
    )
    .unwrap();
    let log = dir.join("pgseald.log");
    let mut child = Pgseald::new(["run", "--config", config.to_str().unwrap()])
        .spawn(std::fs::File::create(&log).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let run = loop {
        let row = c
            .query_opt(
                "SELECT status, detail::text FROM pgseal.job_runs \
                 WHERE job = 'rotation' AND status <> 'running' ORDER BY id LIMIT 1",
                &[],
            )
            .unwrap();
        if let Some(r) = row {
            break (r.get::<_, String>(0), r.get::<_, String>(1));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no rotation run ended within 60 s:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    (
        run.0,
        run.1,
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}
