//! Tenant offboarding (issue 19) against a real cluster: `pgseald offboard run`
//! killed with kill -9 just after every step and batch it commits (and the
//! postmaster killed too, at every other one), then run again, until the tenant is
//! done: its rows deleted, its keys shredded, its ledger payloads erased, a receipt
//! and a checkpoint that verify offline; another tenant untouched, a held tenant
//! never offboarded.

use std::process::Stdio;
use std::time::{Duration, Instant};

use pgseal_tests::{
    assert_tid_scan, count, logged_plans, wait_for, Cluster, Pgseald, KEY_V1, LOG_EVERY_PLAN,
};
use sha2::Digest;

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `pgseald offboard run` until it reports `failpoint` on stderr, then kills
/// it with SIGKILL. Panics when it exits first.
fn run_until(cl: &Cluster, dir: &std::path::Path, failpoint: &str) {
    let log = dir.join(format!("pgseald-{failpoint}.log"));
    let f = std::fs::File::create(&log).unwrap();
    let mut child = Pgseald::new(["offboard", "run", "--export-dir"])
        .args([dir.to_str().unwrap(), "--batch", "3"])
        .on(cl)
        .env("PGSEALD_FAILPOINT", failpoint)
        .spawn(Stdio::from(f));
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&format!("failpoint {failpoint} reached")) {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("pgseald exited ({status}) before {failpoint}: {text}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no {failpoint} within 60 s: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

#[test]
fn offboarding_survives_kill_9_at_every_step_and_completes() {
    let cl = Cluster::start("offboard", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE users (id text, tenant_id text NOT NULL, email text, token text, PRIMARY KEY (tenant_id, id));
         SELECT pgseal.subject_register('users', 'id');
         SELECT pgseal.vault_register_column('users', 'token', 'users.token');
         CREATE TABLE orders (id bigint PRIMARY KEY, tenant_id text NOT NULL, buyer text, total numeric);
         SELECT pgseal.subject_register('orders', 'buyer');
         SELECT pgseal.tenant_protect('orders');
         CREATE TABLE scratch (tenant_id text, note text);   -- protected, not registered: offboarded too
         SELECT pgseal.tenant_protect('scratch');
         SET app.tenant_id = 'acme';
         INSERT INTO users SELECT 'u' || g, 'acme', 'u' || g || '@acme.example', pgseal.vault_seal('tok-' || g, 'users.token')
           FROM generate_series(1, 7) g;
         INSERT INTO orders SELECT g, 'acme', 'u' || (g % 7 + 1), g * 10 FROM generate_series(1, 11) g;
         INSERT INTO scratch VALUES ('acme', 'kept');
         SELECT pgseal.ledger_append('order.paid', jsonb_build_object('n', g), NULL, ARRAY['u' || (g % 7 + 1)])
           FROM generate_series(1, 10) g;
         SET app.tenant_id = 'globex';
         INSERT INTO users VALUES ('u1', 'globex', 'u1@globex.example', pgseal.vault_seal('g-tok', 'users.token'));
         INSERT INTO orders VALUES (100, 'globex', 'u1', 5);
         SELECT pgseal.ledger_append('order.paid', '{\"n\": 1}');
         RESET app.tenant_id;
         SELECT pgseal.tenant_offboard('acme', '0');
         SELECT pgseal.tenant_offboard('held', '0');
         SELECT pgseal.retention_hold('held', true);",
    )
    .unwrap();
    let dir = pgseal_tests::fresh_dir("offboard-files");

    let points = [
        "offboard.export_written",
        "offboard.exported",
        "offboard.delete_batch",
        "offboard.deleted",
        "offboard.shredded",
        "offboard.erase_batch",
        "offboard.erased",
        "offboard.receipted",
    ];
    for (i, point) in points.iter().enumerate() {
        run_until(&cl, &dir, point);
        if i % 2 == 1 {
            cl.crash();
            cl.resume();
        }
    }
    c = cl.connect();
    let step = |c: &mut postgres::Client, t: &str| -> String {
        c.query_one(
            "SELECT step FROM pgseal.tenant_offboardings WHERE tenant_id = $1",
            &[&t],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(step(&mut c, "acme"), "receipted");
    let (code, out) = Pgseald::new(["offboard", "run", "--export-dir"])
        .args([dir.to_str().unwrap()])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant acme: done"), "{out}");
    assert_eq!(step(&mut c, "acme"), "done");
    assert_eq!(
        step(&mut c, "held"),
        "scheduled",
        "a held tenant is never offboarded"
    );

    // The rows: acme's gone from the offboarded tables, globex's and the
    // unregistered table's kept.
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM users WHERE tenant_id = 'acme'"
        ),
        0
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM orders WHERE tenant_id = 'acme'"
        ),
        0
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM users WHERE tenant_id = 'globex'"
        ),
        1
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM orders WHERE tenant_id = 'globex'"
        ),
        1
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM scratch WHERE tenant_id = 'acme'"
        ),
        0
    );
    // The keys: acme's shredded, globex's values still decrypt.
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM pgseal.tenant_keys WHERE tenant_id = 'acme' AND purpose = 'dek' AND state <> 'destroyed'"),
        0
    );
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT pgseal.set_tenant('globex')", &[])
        .unwrap();
    let plain: String = tx
        .query_one(
            "SELECT pgseal.vault_decrypt(token, 'users.token') FROM users WHERE tenant_id = 'globex'",
            &[],
        )
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    assert_eq!(plain, "g-tok");
    // The receipt counts each row once, whatever the kills repeated.
    let receipt = pgseal_tests::offboarded_receipt(&mut c, "acme");
    assert_eq!(receipt["deleted"]["public.users"], 7, "{receipt}");
    assert_eq!(receipt["deleted"]["public.orders"], 11, "{receipt}");
    assert_eq!(receipt["deleted"]["public.scratch"], 1, "{receipt}");
    assert_eq!(
        receipt["protected_tables_not_offboarded"],
        serde_json::json!([]),
        "{receipt}"
    );
    // It names the export file and its SHA-256, which the file on disk has.
    let file = receipt["export_file"].as_str().unwrap();
    let bytes = std::fs::read(file).unwrap();
    assert_eq!(
        receipt["export_sha256"],
        hex_of(&sha2::Sha256::digest(&bytes)),
        "{receipt}"
    );
    // The ledger: every payload erased but pgseal's tenant.* receipts, and the chain
    // verifies, in the database and offline against the final checkpoint.
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 'acme' AND payload IS NOT NULL AND event NOT LIKE 'tenant.%'"),
        0
    );
    let (ok, erased): (bool, i64) = {
        let r = c
            .query_one("SELECT ok, erased FROM pgseal.ledger_verify('acme')", &[])
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(ok);
    assert!(erased >= 11, "{erased}"); // the ten entries and the shred's
    let lines: Vec<String> = c
        .query("SELECT e::text FROM pgseal.ledger_export('acme') e", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let after = dir.join("after.jsonl");
    std::fs::write(&after, lines.join("\n") + "\n").unwrap();
    let pk: String = c
        .query_one("SELECT pgseal.ledger_public_key()", &[])
        .unwrap()
        .get(0);
    let cp = dir.join("acme.checkpoint.json");
    let (code, out) = Pgseald::ledger_verify_file(&after, &cp, &pk).run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1 checkpoint(s) matched"), "{out}");
    // The export holds acme's rows, once each, and no one else's.
    let export = std::fs::read_to_string(dir.join("acme.offboard.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |table: &str| rows.iter().filter(|r| r["table"] == table).count();
    assert_eq!((of("public.users"), of("public.orders")), (7, 11));
    assert!(rows
        .iter()
        .filter(|r| r.get("row").is_some())
        .all(|r| r["row"]["tenant_id"] == "acme"));
    assert!(rows.iter().any(|r| r.get("ledger").is_some()));
    assert!(
        !export.contains("tok-1"),
        "sealed values stay sealed in the export"
    );
    // Every run is in job_runs: the killed ones closed as interrupted by the next
    // leader, or still 'running' (one-shot runs close no one else's), and the last ok.
    let last: String = c
        .query_one(
            "SELECT status FROM pgseal.job_runs WHERE job = 'offboarding' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(last, "ok");
}

#[test]
fn a_lock_held_on_a_table_fails_the_step_instead_of_stalling_it() {
    // Whoever can hold a lock on a registered table (its owner, its schema's owner
    // through an uncommitted DROP) could stall pgseald's offboarding for every
    // tenant: its transactions wait at most 10 s, then the tenant's step fails for
    // the run and is taken up by the next.
    let cl = Cluster::start("offboard_lock", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE users (id text PRIMARY KEY, tenant_id text NOT NULL);
         SELECT pgseal.subject_register('users', 'id');
         INSERT INTO users VALUES ('u1', 'acme');
         SELECT pgseal.tenant_offboard('acme', '0');",
    )
    .unwrap();
    let dir = pgseal_tests::fresh_dir("offboard-lock-files");
    let mut holder = cl.connect();
    holder
        .batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let began = Instant::now();
    let (code, out) = Pgseald::new(["offboard", "run", "--export-dir"])
        .args([dir.to_str().unwrap()])
        .on(&cl)
        .run();
    let took = began.elapsed();
    // A tenant's failure is reported, and the run goes on with the others.
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant acme: scheduled"), "{out}");
    assert!(out.contains("lock timeout"), "{out}");
    assert!(took < Duration::from_secs(40), "{took:?}: {out}");
    holder.batch_execute("ROLLBACK").unwrap();
    let (code, out) = Pgseald::new(["offboard", "run", "--export-dir"])
        .args([dir.to_str().unwrap()])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant acme: done"), "{out}");
}

/// A batch of the deletes takes the exported rows by their places with a TID scan,
/// never with a scan of the tenant's index with the places as a filter, which read
/// all of the tenant's rows again in every batch (docs/BENCHMARKS.md, "Offboarding's
/// deletes as a TID scan"). The table is shaped for the planner to prefer that
/// index (and one on the tenant in the C order the deletes compare in): the tenant's
/// rows lie together on a few pages among many rows of others. auto_explain logs the
/// plan of every statement, pgseal's own included.
#[test]
fn offboarding_deletes_each_batch_by_a_tid_scan() {
    let cl = Cluster::start("offboard_plan", &[KEY_V1], &LOG_EVERY_PLAN);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE users (id text, tenant_id text NOT NULL, email text, PRIMARY KEY (tenant_id, id));
         -- An index that serves the deletes' own test of the tenant (in C order).
         CREATE INDEX ON users (tenant_id COLLATE \"C\");
         SELECT pgseal.subject_register('users', 'id');
         INSERT INTO users SELECT 'u' || g, 'big', 'e' || g FROM generate_series(1, 3000) g;
         INSERT INTO users SELECT 'u' || g, 'o' || g % 50, 'e' || g FROM generate_series(1, 50000) g;
         ANALYZE users;
         SELECT pgseal.tenant_offboard('big', '0');",
    )
    .unwrap();
    let dir = pgseal_tests::fresh_dir("offboard-plan-files");
    let (code, out) = Pgseald::new(["offboard", "run", "--export-dir"])
        .args([dir.to_str().unwrap(), "--batch", "1000"])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant big: done"), "{out}");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM users WHERE tenant_id = 'big'"),
        0
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM users"), 50_000);
    let deletes = logged_plans(
        &cl.server_log(),
        &["Query Text: WITH d AS (DELETE FROM", "users AS x"],
    );
    assert!(
        deletes.len() >= 3,
        "a delete per batch of 1000: {deletes:#?}"
    );
    for p in &deletes {
        assert_tid_scan(p, "users");
    }
}

#[test]
fn a_table_registered_after_the_export_is_exported_before_it_is_deleted_from() {
    // pgseald is killed just after the export step; an administrator then registers
    // a table holding the tenant's rows. The next run must not delete them
    // unexported: it exports again, and the file then holds them.
    let cl = Cluster::start("offboard_late", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE users (id text PRIMARY KEY, tenant_id text NOT NULL);
         SELECT pgseal.subject_register('users', 'id');
         INSERT INTO users VALUES ('u1', 'acme');
         CREATE TABLE notes (author text, tenant_id text NOT NULL, body text);
         INSERT INTO notes VALUES ('u1', 'acme', 'registered late');
         SELECT pgseal.tenant_offboard('acme', '0');",
    )
    .unwrap();
    let dir = pgseal_tests::fresh_dir("offboard-late-files");
    run_until(&cl, &dir, "offboard.exported");
    let file = dir.join("acme.offboard.jsonl");
    let first = std::fs::read_to_string(&file).unwrap();
    assert!(!first.contains("registered late"), "{first}");
    c.batch_execute("SELECT pgseal.subject_register('notes', 'author')")
        .unwrap();
    let (code, out) = Pgseald::new(["offboard", "run", "--export-dir"])
        .args([dir.to_str().unwrap()])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant acme: done"), "{out}");
    let again = std::fs::read_to_string(&file).unwrap();
    assert!(again.contains("registered late"), "{again}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM notes"), 0);
    let receipt: String = c
        .query_one(
            "SELECT payload::text FROM pgseal.ledger WHERE tenant_id = 'acme' AND event = 'tenant.offboarded'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        receipt.contains(&hex_of(&sha2::Sha256::digest(again.as_bytes()))),
        "{receipt}"
    );
}

#[test]
fn the_export_step_is_recorded_only_in_the_exports_own_transaction() {
    // Otherwise a second export could replace the tables the first one recorded
    // between the first one's commit and its step (the tables, the file and the
    // hash recorded must be one export's).
    let cl = Cluster::start("offboard_xact", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE users (id text PRIMARY KEY, tenant_id text NOT NULL);
         SELECT pgseal.subject_register('users', 'id');
         INSERT INTO users VALUES ('u1', 'acme');
         SELECT pgseal.tenant_offboard('acme', '0');
         BEGIN; SELECT pgseal.set_tenant('acme');
         SELECT count(*) FROM pgseal._offboard_export('acme');
         COMMIT;",
    )
    .unwrap();
    let advance =
        "SELECT pgseal._offboard_advance('acme', 'scheduled', 'exported', '/x', repeat('a', 64))";
    assert_eq!(pgseal_tests::sqlstate(c.batch_execute(advance)), "55000");
    c.batch_execute(&format!(
        "BEGIN; SELECT pgseal.set_tenant('acme');
         SELECT count(*) FROM pgseal._offboard_export('acme');
         {advance}; COMMIT;"
    ))
    .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pgseal.tenant_offboardings WHERE step = 'exported'"
        ),
        1
    );
}

/// Peak resident memory of a server backend, in kB (`VmHWM` of /proc/<pid>/status).
fn backend_peak_kb(c: &mut postgres::Client) -> u64 {
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// A tenant's export much larger than work_mem does not grow the backend by its
/// size: `_offboard_export` reads each table through a cursor, a chunk at a time,
/// into the result's tuplestore, which spills to disk. 100,000 rows of 1 kB each:
/// read whole, they added 300 MB to the backend's peak; read through cursors, 2 MB.
#[test]
fn a_large_export_is_read_in_chunks_not_held_in_memory() {
    let cl = Cluster::start("offboard-large", &[KEY_V1], &["work_mem = '4MB'"]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE notes (id int, tenant_id text NOT NULL, body text);
         SELECT pgseal.subject_register('notes', 'id');
         INSERT INTO notes SELECT g, 'big', repeat(md5(g::text), 32) FROM generate_series(1, 100000) g;
         INSERT INTO notes SELECT g, 'small', 'x' FROM generate_series(1, 10) g;
         SELECT pgseal.tenant_offboard('big', '0');
         SELECT pgseal.tenant_offboard('small', '0');",
    )
    .unwrap();
    // What counts in a backend's resident memory but is not what is measured here,
    // touched once first: the table's pages in shared buffers, and the library's
    // code of the export (a small tenant's).
    c.batch_execute(
        "SELECT count(*), sum(length(body)) FROM notes;
         BEGIN; SELECT pgseal.set_tenant('small');
         SELECT count(*) FROM pgseal._offboard_export('small');
         COMMIT;",
    )
    .unwrap();
    let before = backend_peak_kb(&mut c);
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SELECT pgseal.set_tenant('big')").unwrap();
    let (lines, bytes): (i64, i64) = {
        let r = tx
            .query_one(
                "SELECT count(*), sum(length(l))::bigint FROM pgseal._offboard_export('big') l",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    tx.commit().unwrap();
    let grew_kb = backend_peak_kb(&mut c).saturating_sub(before);
    eprintln!("the backend's peak grew by {grew_kb} kB for a {bytes}-byte export");
    assert!(lines > 100_000, "every row and the ledger: {lines}");
    assert!(bytes > 100_000_000, "the export is over 100 MB: {bytes}");
    assert!(
        grew_kb < 32 * 1024,
        "the backend's peak grew by {grew_kb} kB for a {bytes}-byte export"
    );
}

/// The payload of `tenant`'s `tenant.offboarded` receipt.
fn receipt_of(c: &mut postgres::Client, tenant: &str) -> serde_json::Value {
    c.query_one(
        "SELECT payload FROM pgseal.ledger WHERE tenant_id = $1 AND event = 'tenant.offboarded'",
        &[&tenant],
    )
    .unwrap()
    .get(0)
}

/// `pgseald offboard run` for every due tenant; returns its output (exit 0).
fn offboard_run(cl: &Cluster, dir: &std::path::Path) -> String {
    let (code, out) = Pgseald::new(["offboard", "run", "--export-dir"])
        .args([dir.to_str().unwrap(), "--batch", "3"])
        .on(cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    out
}

#[test]
fn rows_changed_after_the_export_or_by_the_deletes_are_never_deleted_unexported() {
    // The deletes take only rows the export held as it read them, referencing
    // tables first and a table's rows last-written first, so that foreign keys'
    // ON DELETE actions find nothing left to change. A batch whose trigger changes
    // another offboarded row is undone; rows the application changes after the
    // export, and rows a trigger puts back, stay and stop the offboarding.
    let cl = Cluster::start("offboard_changes", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE nodes (id text PRIMARY KEY, tenant_id text NOT NULL, parent text REFERENCES nodes ON DELETE SET NULL);
         CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, note text);
         CREATE TABLE shipments (order_id int REFERENCES orders ON DELETE CASCADE, tenant_id text NOT NULL);
         CREATE TABLE totals (tenant_id text PRIMARY KEY, orders int NOT NULL);
         CREATE FUNCTION count_down() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN UPDATE public.totals SET orders = orders - 1 WHERE tenant_id = OLD.tenant_id; RETURN OLD; END $$;
         CREATE TRIGGER count_down AFTER DELETE ON orders FOR EACH ROW EXECUTE FUNCTION count_down();
         CREATE FUNCTION put_back() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF OLD.tenant_id = 'globex' THEN INSERT INTO public.orders VALUES (OLD.id + 1000, OLD.tenant_id, OLD.note); END IF; RETURN OLD; END $$;
         CREATE TRIGGER put_back AFTER DELETE ON orders FOR EACH ROW EXECUTE FUNCTION put_back();
         SELECT pgseal.subject_register('nodes', 'id');
         SELECT pgseal.subject_register('orders', 'note');
         SELECT pgseal.subject_register('shipments', 'order_id');
         SELECT pgseal.subject_register('totals', 'tenant_id');
         INSERT INTO nodes SELECT t || g, t, CASE WHEN g > 1 THEN t || (g / 2) END
           FROM unnest(ARRAY['acme', 'initech', 'umbrella']) t, generate_series(1, 20) g;
         INSERT INTO orders SELECT g, (ARRAY['acme', 'globex', 'initech'])[g % 3 + 1], 'o' || g FROM generate_series(1, 30) g;
         INSERT INTO shipments SELECT id, tenant_id FROM orders WHERE tenant_id = 'acme';
         INSERT INTO totals SELECT t, 10 FROM unnest(ARRAY['acme', 'globex', 'initech']) t;",
    )
    .unwrap();
    let dir = pgseal_tests::fresh_dir("offboard-changes-files");
    let left = |c: &mut postgres::Client, t: &str| -> i64 {
        count(
            c,
            &format!(
                "SELECT (SELECT count(*) FROM nodes WHERE tenant_id = '{t}') \
                      + (SELECT count(*) FROM orders WHERE tenant_id = '{t}') \
                      + (SELECT count(*) FROM totals WHERE tenant_id = '{t}')"
            ),
        )
    };

    let rows_of = |c: &mut postgres::Client, table: &str, t: &str| -> i64 {
        count(
            c,
            &format!("SELECT count(*) FROM {table} WHERE tenant_id = '{t}'"),
        )
    };

    // acme: its nodes go leaves first (no child is set to NULL), its shipments
    // before the orders they reference (no cascade). Its orders' trigger counts
    // down its total, which may have changed since the export: that batch is
    // undone and the offboarding stops, naming the table.
    c.batch_execute("SELECT pgseal.tenant_offboard('acme', '0')")
        .unwrap();
    let out = offboard_run(&cl, &dir);
    assert!(
        out.contains("tenant acme: exported; 30 rows deleted")
            && out.contains("changed or deleted other rows")
            && out.contains("(table public.totals)"),
        "{out}"
    );
    assert_eq!(rows_of(&mut c, "nodes", "acme"), 0);
    assert_eq!(rows_of(&mut c, "shipments", "acme"), 0);
    assert_eq!(rows_of(&mut c, "orders", "acme"), 10);
    assert_eq!(
        count(
            &mut c,
            "SELECT orders::int8 FROM totals WHERE tenant_id = 'acme'"
        ),
        10
    );
    // Without the trigger, the offboarding completes.
    c.batch_execute("DROP TRIGGER count_down ON orders")
        .unwrap();
    let out = offboard_run(&cl, &dir);
    assert!(out.contains("tenant acme: done; 11 rows deleted"), "{out}");
    assert_eq!(left(&mut c, "acme"), 0);
    assert_eq!(left(&mut c, "initech"), 31, "another tenant's rows stay");

    // globex: every order deleted is put back by its owner's trigger: the copies
    // stay, and the offboarding stops naming the table.
    c.batch_execute("SELECT pgseal.tenant_offboard('globex', '0')")
        .unwrap();
    let out = offboard_run(&cl, &dir);
    assert!(
        out.contains("tenant globex: exported;")
            && out.contains("not deleted unexported")
            && out.contains("(table public.orders)"),
        "{out}"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM orders WHERE tenant_id = 'globex' AND id > 1000"
        ),
        10
    );
    assert_eq!(left(&mut c, "globex"), 10);

    // initech: the application changes a row after a batch was deleted: the row
    // stays with its new value, and so does the offboarding's step.
    c.batch_execute("SELECT pgseal.tenant_offboard('initech', '0')")
        .unwrap();
    run_until(&cl, &dir, "offboard.delete_batch");
    c.batch_execute(
        "UPDATE orders SET note = 'changed after the export' WHERE tenant_id = 'initech' AND id = 29",
    )
    .unwrap();
    let out = offboard_run(&cl, &dir);
    assert!(
        out.contains("tenant initech: exported;") && out.contains("not deleted unexported"),
        "{out}"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM orders WHERE tenant_id = 'initech' AND note = 'changed after the export'"
        ),
        1
    );
    assert_eq!(left(&mut c, "initech"), 1);

    // umbrella: VACUUM FULL after the export moves every row; nothing matches,
    // nothing was deleted yet, so it exports again and then completes.
    c.batch_execute("SELECT pgseal.tenant_offboard('umbrella', '0')")
        .unwrap();
    run_until(&cl, &dir, "offboard.exported");
    c.batch_execute("VACUUM FULL nodes").unwrap();
    let out = offboard_run(&cl, &dir);
    assert!(
        out.contains("tenant umbrella: done; 20 rows deleted"),
        "{out}"
    );
    assert_eq!(left(&mut c, "umbrella"), 0);
    let again = std::fs::read_to_string(dir.join("umbrella.offboard.jsonl")).unwrap();
    assert_eq!(again.matches("\"table\": \"public.nodes\"").count(), 20);

    // hooli: once deleting began, the application deletes an exported row, VACUUM
    // frees its place, and a new row of the tenant lands in it: the key of the row
    // exported there names another inserting transaction, and the new row stays.
    c.batch_execute(
        "CREATE TABLE slots (id int, tenant_id text NOT NULL, body text);
         SELECT pgseal.subject_register('slots', 'body');
         INSERT INTO slots SELECT g, 'hooli', 'exported' FROM generate_series(1, 5) g;
         SELECT pgseal.tenant_offboard('hooli', '0');",
    )
    .unwrap();
    run_until(&cl, &dir, "offboard.delete_batch");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM slots WHERE ctid = '(0,2)' AND id = 2"
        ),
        1
    );
    for sql in [
        "DELETE FROM slots WHERE id = 2",
        "VACUUM slots",
        "INSERT INTO slots VALUES (6, 'hooli', 'written after the export')",
    ] {
        c.batch_execute(sql).unwrap();
    }
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM slots WHERE ctid = '(0,2)' AND id = 6"
        ),
        1,
        "the new row took the exported row's place"
    );
    let out = offboard_run(&cl, &dir);
    assert!(
        out.contains("tenant hooli: exported;") && out.contains("(table public.slots)"),
        "{out}"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM slots WHERE body = 'written after the export'"
        ),
        1
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM slots"), 1);

    // wayne: a trigger that empties another offboarded table (TRUNCATE resets the
    // transaction's counts; the table's new storage gives it away).
    c.batch_execute(
        "CREATE TABLE visits (tenant_id text NOT NULL, at int);
         CREATE TABLE visit_log (tenant_id text NOT NULL, note text);
         SELECT pgseal.subject_register('visits', 'at');
         SELECT pgseal.subject_register('visit_log', 'note');
         CREATE FUNCTION empty_log() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN TRUNCATE public.visit_log; RETURN NULL; END $$;
         CREATE TRIGGER empty_log AFTER DELETE ON visits FOR EACH STATEMENT EXECUTE FUNCTION empty_log();
         INSERT INTO visits SELECT 'wayne', g FROM generate_series(1, 3) g;
         INSERT INTO visit_log VALUES ('wayne', 'kept'), ('other', 'not the tenant''s');
         SELECT pgseal.tenant_offboard('wayne', '0');",
    )
    .unwrap();
    let out = offboard_run(&cl, &dir);
    assert!(
        out.contains("tenant wayne: exported; 1 rows deleted")
            && out.contains("(table public.visit_log)"),
        "{out}"
    );
    // (visit_log's own row of the tenant went first, by its key; another
    // tenant's row, which the TRUNCATE took, is back)
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM visit_log WHERE tenant_id = 'other'"
        ),
        1
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM visits"), 3);
}

#[test]
fn an_offboarding_erases_the_tenants_decrypt_records_in_the_audit_chain() {
    // A decrypt's records go to the audit chain `_pgseal_audit` when the tenant's
    // chain is held (here by another session for longer than the writer waits): the
    // start and the count, whose contexts and actor are the tenant's. The offboarding
    // erased only the tenant's own chain, and its receipt was given over them.
    let (cl, mut c) =
        pgseal_tests::sealed_tokens_cluster("offboard_audit_chain", &["acme", "globex"]);
    let in_audit_chain = |c: &mut postgres::Client, tenant: &str| -> i64 {
        count(
            c,
            &format!(
                "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = '_pgseal_audit' \
                   AND payload ->> 'tenant' = '{tenant}'"
            ),
        )
    };
    for tenant in ["globex", "acme"] {
        let mut holder = cl.connect_as("app");
        holder
            .batch_execute(&format!(
                "BEGIN; SELECT pgseal.set_tenant('{tenant}'); \
                 SELECT pgseal.ledger_append('export.requested', '{{}}')"
            ))
            .unwrap();
        let mut app = cl.connect_as("app");
        app.batch_execute(&format!(
            "BEGIN READ ONLY; SELECT pgseal.set_tenant('{tenant}'); \
             SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations \
             WHERE tenant_id = '{tenant}'; COMMIT"
        ))
        .unwrap();
        wait_for("the start and count in the audit chain", 20, || {
            in_audit_chain(&mut c, tenant) == 2
        });
        holder.batch_execute("ROLLBACK").unwrap();
    }
    c.batch_execute("SELECT pgseal.tenant_offboard('acme', '0')")
        .unwrap();
    let acme_seqs: Vec<i64> = c
        .query(
            "SELECT seq FROM pgseal.ledger WHERE tenant_id = '_pgseal_audit' \
               AND payload ->> 'tenant' = 'acme' ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let dir = pgseal_tests::fresh_dir("offboard-audit-chain-files");
    let out = offboard_run(&cl, &dir);
    assert!(out.contains("tenant acme: done"), "{out}");
    // The export holds them, after the tenant's own chain.
    let export = std::fs::read_to_string(dir.join("acme.offboard.jsonl")).unwrap();
    let exported: Vec<i64> = export
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("audit_chain").map(|e| e["seq"].as_i64().unwrap()))
        .collect();
    assert_eq!(exported, acme_seqs, "{export}");
    assert!(
        export
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("{\"audit_chain\""),
        "{export}"
    );

    let left = count(
        &mut c,
        "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = '_pgseal_audit' \
           AND payload::text LIKE '%acme%'",
    );
    assert_eq!(left, 0, "no payload in the audit chain names acme");
    assert_eq!(in_audit_chain(&mut c, "globex"), 2, "globex's are kept");
    let receipt = receipt_of(&mut c, "acme");
    assert_eq!(receipt["audit_entries_erased"], 2, "{receipt}");
    let listed: Vec<i64> = receipt["audit_seqs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|run| run[0].as_i64().unwrap()..=run[1].as_i64().unwrap())
        .collect();
    assert_eq!(listed, acme_seqs, "{receipt}");
    let r = c
        .query_one(
            "SELECT ok, erased, problem FROM pgseal.ledger_verify('_pgseal_audit')",
            &[],
        )
        .unwrap();
    assert!(r.get::<_, bool>(0), "{:?}", r.get::<_, Option<String>>(2));
    assert_eq!(r.get::<_, i64>(1), 2, "the two entries verify as erased");

    // Their payloads no longer name acme: a hold set on it now still keeps them.
    c.batch_execute(
        "SET pgseal.ledger_min_retention = '0 seconds'; \
         SELECT pgseal.retention_hold('acme', true)",
    )
    .unwrap();
    let prune = "SELECT pgseal.ledger_prune('_pgseal_audit', \
                   (SELECT max(seq) + 1 FROM pgseal.ledger WHERE tenant_id = '_pgseal_audit'))";
    assert_eq!(
        pgseal_tests::sqlstate(c.query_one(prune, &[])),
        "55000",
        "the hold on acme keeps its erased records"
    );
    let before_acme = format!(
        "SELECT pgseal.ledger_prune('_pgseal_audit', {})",
        acme_seqs[0]
    );
    c.batch_execute(&before_acme).unwrap();
    c.batch_execute("SELECT pgseal.retention_hold('acme', false)")
        .unwrap();
    c.query_one(prune, &[]).unwrap();
}

#[test]
fn audit_chain_entries_pruned_under_the_erase_are_not_counted_as_erased() {
    // The erase step reads the tenant's entries in the audit chain, then updates
    // them; a prune of that chain committed in between deletes them first. The
    // offboarding counted (and would list) what it read, not what it erased.
    let (cl, mut c) = pgseal_tests::sealed_tokens_cluster("offboard_audit_prune", &["acme"]);
    // The decrypting transaction holds acme's chain: its start goes to the audit chain.
    let mut app = cl.connect_as("app");
    app.batch_execute(
        "BEGIN; SELECT pgseal.set_tenant('acme'); SELECT pgseal.ledger_append('app.note');
         SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations; COMMIT",
    )
    .unwrap();
    let in_audit = |c: &mut postgres::Client| {
        count(
            c,
            "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = '_pgseal_audit' \
               AND payload ->> 'tenant' = 'acme'",
        )
    };
    assert_eq!(in_audit(&mut c), 1);
    c.batch_execute("SELECT pgseal.tenant_offboard('acme', '0')")
        .unwrap();
    let dir = pgseal_tests::fresh_dir("offboard-audit-prune-files");
    run_until(&cl, &dir, "offboard.shredded");

    // The erase of acme's own chain first; then, while a prune of the audit chain
    // holds its deleted rows, the erase of acme's records there waits on them.
    let mut eraser = cl.connect();
    let own: i64 = eraser
        .query_one("SELECT pgseal._offboard_erase('acme', 1000)", &[])
        .unwrap()
        .get(0);
    assert!(own > 0);
    let mut pruner = cl.connect();
    pruner
        .batch_execute(
            "SET pgseal.ledger_min_retention = '0 seconds'; BEGIN; \
             SELECT pgseal.ledger_prune('_pgseal_audit', \
               (SELECT max(seq) + 1 FROM pgseal.ledger WHERE tenant_id = '_pgseal_audit'))",
        )
        .unwrap();
    let pid: i32 = eraser
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let erasing = std::thread::spawn(move || -> i64 {
        eraser
            .query_one("SELECT pgseal._offboard_erase('acme', 1000)", &[])
            .unwrap()
            .get(0)
    });
    wait_for("the erase to wait on the prune's rows", 20, || {
        count(
            &mut c,
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND wait_event_type = 'Lock'"
            ),
        ) == 1
    });
    pruner.batch_execute("COMMIT").unwrap();
    assert_eq!(erasing.join().unwrap(), 0, "nothing was left to erase");
    assert_eq!(in_audit(&mut c), 0, "pruned");

    let out = offboard_run(&cl, &dir);
    assert!(out.contains("tenant acme: done"), "{out}");
    let receipt = receipt_of(&mut c, "acme");
    assert_eq!(receipt["audit_entries_erased"], 0, "{receipt}");
    assert_eq!(receipt["audit_seqs"], serde_json::json!([]), "{receipt}");
}

#[test]
fn a_decrypt_count_that_arrives_after_the_offboarding_is_erased_on_arrival() {
    // Read-only transactions that decrypted before the shred and end after the
    // offboarding is done hand their counts (payload: contexts, the tenant) to the
    // audit writer then: one lands in the tenant's chain, one (the chain held) in
    // the audit chain. Both came after the erase step and kept their payloads.
    let (cl, mut c) = pgseal_tests::sealed_tokens_cluster("offboard_late_count", &["acme"]);
    let decrypting = || {
        let mut t = cl.connect_as("app");
        t.batch_execute(
            "BEGIN READ ONLY; SELECT pgseal.set_tenant('acme'); \
             SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
        )
        .unwrap();
        t
    };
    let (mut t1, mut t2, mut t3) = (decrypting(), decrypting(), decrypting());
    c.batch_execute("SELECT pgseal.tenant_offboard('acme', '0')")
        .unwrap();
    let dir = pgseal_tests::fresh_dir("offboard-late-count-files");
    let out = offboard_run(&cl, &dir);
    assert!(out.contains("tenant acme: done"), "{out}");
    let counts = |c: &mut postgres::Client, with_payload: bool| {
        count(
            c,
            &format!(
                "SELECT count(*) FROM pgseal.ledger WHERE event = 'vault.decrypt' \
                   AND (tenant_id = 'acme' OR payload ->> 'tenant' = 'acme' \
                        OR (tenant_id = '_pgseal_audit' AND payload IS NULL)) \
                   AND (payload IS NOT NULL) = {with_payload}"
            ),
        )
    };
    assert_eq!(counts(&mut c, false) + counts(&mut c, true), 0);

    // t1's count goes to acme's chain.
    t1.batch_execute("COMMIT").unwrap();
    wait_for("t1's count", 20, || {
        counts(&mut c, false) + counts(&mut c, true) == 1
    });
    // t2's, with acme's chain held for longer than the writer waits, to the audit chain.
    let mut holder = cl.connect_as("app");
    holder
        .batch_execute(
            "BEGIN; SELECT pgseal.set_tenant('acme'); SELECT pgseal.ledger_append('app.note')",
        )
        .unwrap();
    t2.batch_execute("COMMIT").unwrap();
    wait_for("t2's count", 20, || {
        counts(&mut c, false) + counts(&mut c, true) == 2
    });
    holder.batch_execute("ROLLBACK").unwrap();
    assert_eq!(counts(&mut c, true), 0, "no count keeps its payload");
    let placed = count(
        &mut c,
        "SELECT count(*) FROM pgseal.ledger l, pgseal.tenant_offboardings o \
          WHERE o.tenant_id = 'acme' AND l.tenant_id = '_pgseal_audit' \
            AND l.seq = ANY (o.audit_erased) AND l.event = 'vault.decrypt'",
    );
    assert_eq!(
        placed, 1,
        "the audit chain's is listed with the offboarding's"
    );
    for chain in ["acme", "_pgseal_audit"] {
        let ok: bool = c
            .query_one("SELECT ok FROM pgseal.ledger_verify($1)", &[&chain])
            .unwrap()
            .get(0);
        assert!(ok, "{chain}");
    }

    // The writer never waits for the offboarding's row (every decrypt of the
    // database waits on the writer): held by another transaction, a late count
    // keeps its payload instead.
    let mut admin = cl.connect();
    admin
        .batch_execute(
            "BEGIN; SELECT 1 FROM pgseal.tenant_offboardings WHERE tenant_id = 'acme' FOR UPDATE",
        )
        .unwrap();
    t3.batch_execute("COMMIT").unwrap();
    wait_for(
        "t3's count (the writer must not wait for the offboarding's row)",
        20,
        || counts(&mut c, true) == 1,
    );
    admin.batch_execute("ROLLBACK").unwrap();
    // A tenant id used again after its offboarding: counts of its new keys are not
    // the offboarded tenant's, and keep their payloads.
    c.batch_execute(
        "SET app.tenant_id = 'acme';
         INSERT INTO integrations VALUES (2, 'acme', pgseal.vault_seal('acme-new', 'integrations.token'));
         RESET app.tenant_id;",
    )
    .unwrap();
    let mut t4 = cl.connect_as("app");
    t4.batch_execute(
        "BEGIN READ ONLY; SELECT pgseal.set_tenant('acme'); \
         SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations WHERE id = 2; COMMIT",
    )
    .unwrap();
    wait_for("the new key's count, with its payload", 20, || {
        counts(&mut c, true) == 2
    });
}

#[test]
fn a_late_decrypt_count_whose_erase_fails_is_kept_with_its_payload() {
    // The audit writer erases a decrypt record that arrives after the offboarding
    // in a subtransaction: when erasing fails (here a superuser's trigger refuses
    // the update of the offboarding's list of the audit chain's erased seqs), a
    // count is tried again until its deadline (a minute) and its last try records
    // it with its payload, logged, rather than drop it. (A decrypt that starts
    // after the shred, here through a snapshot older than it, is refused.)
    let (cl, mut c) = pgseal_tests::sealed_tokens_cluster("offboard_late_count_kept", &["acme"]);
    c.batch_execute(
        "SET app.tenant_id = 'acme'; SELECT pgseal.ledger_append('app.note'); RESET app.tenant_id",
    )
    .unwrap();
    let sealed: String = c
        .query_one("SELECT token FROM integrations", &[])
        .unwrap()
        .get(0);
    let mut t = cl.connect_as("app");
    t.batch_execute(
        "BEGIN READ ONLY; SELECT pgseal.set_tenant('acme'); \
         SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
    )
    .unwrap();
    let mut late = cl.connect_as("app");
    late.batch_execute(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT pgseal.set_tenant('acme'); \
         SELECT count(*) FROM integrations",
    )
    .unwrap();
    c.batch_execute("SELECT pgseal.tenant_offboard('acme', '0')")
        .unwrap();
    let dir = pgseal_tests::fresh_dir("offboard-late-count-kept-files");
    let out = offboard_run(&cl, &dir);
    assert!(out.contains("tenant acme: done"), "{out}");
    c.batch_execute(
        "CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
           BEGIN RAISE EXCEPTION 'refused by a trigger'; END $$; \
         CREATE TRIGGER refuse BEFORE UPDATE ON pgseal.tenant_offboardings \
           FOR EACH ROW EXECUTE FUNCTION public.refuse();",
    )
    .unwrap();
    // acme's chain held for longer than the writer waits: the records go to the
    // audit chain, whose erase lists them with the offboarding.
    let mut holder = cl.connect_as("app");
    holder
        .batch_execute(
            "BEGIN; SELECT pgseal.set_tenant('acme'); SELECT pgseal.ledger_append('app.note')",
        )
        .unwrap();
    let starts = |c: &mut postgres::Client| {
        count(
            c,
            "SELECT count(*) FROM pgseal.ledger WHERE event = 'vault.decrypt_started'",
        )
    };
    let starts_before = starts(&mut c);
    let refused = late.query_one(
        "SELECT pgseal.vault_decrypt($1, 'integrations.token')",
        &[&sealed],
    );
    assert_eq!(
        pgseal_tests::sqlstate(refused),
        "22023",
        "a start under the shredded key"
    );
    assert_eq!(starts(&mut c), starts_before, "nothing recorded for it");
    let records = |c: &mut postgres::Client, event: &str| {
        count(
            c,
            &format!(
                "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = '_pgseal_audit' \
                   AND event = '{event}' AND payload ->> 'tenant' = 'acme'"
            ),
        )
    };
    let committed = Instant::now();
    t.batch_execute("COMMIT").unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(records(&mut c, "vault.decrypt"), 0, "tried again first");
    wait_for("the count, recorded with its payload", 90, || {
        records(&mut c, "vault.decrypt") == 1
    });
    assert!(
        committed.elapsed() > Duration::from_secs(50),
        "on its last try"
    );
    holder.batch_execute("ROLLBACK").unwrap();
    let listed = count(
        &mut c,
        "SELECT count(*) FROM pgseal.tenant_offboardings \
          WHERE tenant_id = 'acme' AND cardinality(audit_erased) > 0",
    );
    assert_eq!(listed, 0, "nothing erased, nothing listed");
    let ok: bool = c
        .query_one("SELECT ok FROM pgseal.ledger_verify('_pgseal_audit')", &[])
        .unwrap()
        .get(0);
    assert!(ok);
    assert!(
        cl.server_log().contains(
            "keeps its payload: erasing it for the tenant's offboarding failed on its last try: refused by a trigger"
        ),
        "the failure is logged"
    );
}
