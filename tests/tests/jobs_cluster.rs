//! pgseald's one-shot jobs against a real cluster: retention runs (windows,
//! overrides, holds, receipts, dry run), tenant rotation with reseal (also after a
//! kill -9 mid-run), and KEK rotation.

use std::process::Stdio;
use std::time::Duration;

use pgseal_tests::{count, Cluster, Pgseald, KEY_V1, KEY_V2};

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
