//! The ledger against a real cluster: concurrent appends at every isolation level,
//! kill -9 of the postmaster, audit triggers under concurrent updates, the decrypt
//! audit at commit, and an export verified offline by pgseald.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgseal_tests::{is_retryable, repo_root, sqlstate, Cluster, KEY_V1};

const SESSIONS: usize = 16;
const APPENDS_PER_SESSION: usize = 2000;

/// Appends in its own transaction at `level`, retrying serialization failures.
/// Returns how many retries it took.
fn append_retrying(c: &mut postgres::Client, level: &str, tenant: &str, i: usize) -> u64 {
    let sql = format!(
        "BEGIN ISOLATION LEVEL {level}; SET LOCAL app.tenant_id = '{tenant}'; \
         SELECT pgseal.ledger_append('e', '{{\"i\": {i}}}'); COMMIT"
    );
    let mut retries = 0;
    loop {
        match c.batch_execute(&sql) {
            Ok(()) => return retries,
            Err(e) if is_retryable(&e) => {
                c.batch_execute("ROLLBACK").unwrap();
                retries += 1;
                // Under REPEATABLE READ a snapshot taken while another session held
                // the tenant's lock is stale by the time this one gets it; backing
                // off with jitter lets a retry start when the lock is free.
                let cap = 1u64 << retries.min(5);
                std::thread::sleep(Duration::from_micros(jitter(cap * 500)));
            }
            Err(e) => panic!("append at {level}: {e}"),
        }
    }
}

/// A pseudo-random delay below `max_us`, different per thread and call.
fn jitter(max_us: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish() % max_us.max(1)
}

/// (ok, checked, problem) from ledger_verify for a tenant, plus count and max(seq).
fn check_tenant(c: &mut postgres::Client, tenant: &str) -> (bool, i64, Option<String>, i64, i64) {
    let v = c
        .query_one(
            "SELECT ok, checked, problem FROM pgseal.ledger_verify($1)",
            &[&tenant],
        )
        .unwrap();
    let n = c
        .query_one(
            "SELECT count(*), coalesce(max(seq), 0) FROM pgseal.ledger WHERE tenant_id = $1",
            &[&tenant],
        )
        .unwrap();
    (v.get(0), v.get(1), v.get(2), n.get(0), n.get(1))
}

fn run_sessions(cl: &Cluster, level: &'static str, tenant_of: fn(usize, usize) -> String) -> u64 {
    let retries = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let mut c = cl.connect();
            let retries = retries.clone();
            std::thread::spawn(move || {
                for i in 0..APPENDS_PER_SESSION {
                    let r = append_retrying(&mut c, level, &tenant_of(s, i), i);
                    retries.fetch_add(r, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("appending session panicked");
    }
    retries.load(Ordering::Relaxed)
}

#[test]
fn concurrent_appends_never_fork_at_any_isolation_level() {
    let cl = Cluster::start(
        "ledger-concurrency",
        54331,
        &[KEY_V1],
        &["max_connections = 60"],
    );
    let mut c = cl.connect();
    c.batch_execute("CREATE EXTENSION pgseal").unwrap();
    let total = (SESSIONS * APPENDS_PER_SESSION) as i64;
    for (level, tag) in [
        ("READ COMMITTED", "rc"),
        ("REPEATABLE READ", "rr"),
        ("SERIALIZABLE", "sz"),
    ] {
        let started = Instant::now();
        let one = match tag {
            "rc" => run_sessions(&cl, level, |_, _| "one-rc".into()),
            "rr" => run_sessions(&cl, level, |_, _| "one-rr".into()),
            _ => run_sessions(&cl, level, |_, _| "one-sz".into()),
        };
        let (ok, checked, problem, count, max) = check_tenant(&mut c, &format!("one-{tag}"));
        assert!(ok, "{level}, one tenant: {problem:?}");
        assert_eq!(
            (checked, count, max),
            (total, total, total),
            "{level}, one tenant: no gap, no duplicate"
        );
        let many = match tag {
            "rc" => run_sessions(&cl, level, |s, i| format!("rc-{}", (s * 31 + i) % 100)),
            "rr" => run_sessions(&cl, level, |s, i| format!("rr-{}", (s * 31 + i) % 100)),
            _ => run_sessions(&cl, level, |s, i| format!("sz-{}", (s * 31 + i) % 100)),
        };
        let mut sum = 0;
        for t in 0..100 {
            let (ok, checked, problem, count, max) = check_tenant(&mut c, &format!("{tag}-{t}"));
            assert!(ok, "{level}, tenant {t}: {problem:?}");
            assert_eq!(
                (checked, count),
                (max, max),
                "{level}, tenant {t}: no gap, no duplicate"
            );
            sum += count;
        }
        assert_eq!(sum, total, "{level}: every append landed exactly once");
        eprintln!(
            "{level}: {} appends in {:?}; retries: one tenant {one}, 100 tenants {many}",
            2 * total,
            started.elapsed()
        );
    }
}

#[test]
fn kill_9_of_the_postmaster_during_appends_leaves_no_gap() {
    let cl = Cluster::start("ledger-crash", 54332, &[KEY_V1], &[]);
    cl.connect()
        .batch_execute("CREATE EXTENSION pgseal")
        .unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let mut c = cl.connect();
            let acked = acked.clone();
            std::thread::spawn(move || {
                // Appends until the server dies under it.
                while c
                    .batch_execute("SET app.tenant_id = 'k'; SELECT pgseal.ledger_append('e')")
                    .is_ok()
                {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    cl.crash();
    for h in handles {
        h.join().unwrap();
    }
    cl.resume();
    let mut c = cl.connect();
    let (ok, checked, problem, count, max) = check_tenant(&mut c, "k");
    assert!(ok, "after the crash: {problem:?}");
    assert_eq!(
        (checked, count),
        (max, max),
        "no gap, no duplicate after the crash"
    );
    // fsync is off in test clusters, but a crash of the postmaster alone keeps the
    // OS page cache, so every acknowledged commit survived.
    assert!(
        count as u64 >= acked.load(Ordering::Relaxed),
        "{count} < {} acknowledged",
        acked.load(Ordering::Relaxed)
    );
    // And the chain continues where it stopped.
    c.batch_execute("SET app.tenant_id = 'k'").unwrap();
    let seq: i64 = c
        .query_one("SELECT seq FROM pgseal.ledger_append('after')", &[])
        .unwrap()
        .get(0);
    assert_eq!(seq, max + 1);
}

#[test]
fn audit_triggers_under_concurrent_updates() {
    let cl = Cluster::start("ledger-audit", 54333, &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE accounts (id int PRIMARY KEY, tenant_id text NOT NULL, balance bigint NOT NULL);
         INSERT INTO accounts SELECT g, 't' || (g % 4), 0 FROM generate_series(1, 20) g;
         SELECT pgseal.ledger_audit('accounts');",
    )
    .unwrap();
    let handles: Vec<_> = (0..8)
        .map(|s| {
            let mut c = cl.connect();
            std::thread::spawn(move || {
                for i in 0..200 {
                    let id: i32 = (s * 7 + i) % 20 + 1;
                    c.execute(
                        "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                        &[&id],
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut total = 0;
    for t in 0..4 {
        let (ok, checked, problem, count, max) = check_tenant(&mut c, &format!("t{t}"));
        assert!(ok, "tenant t{t}: {problem:?}");
        assert_eq!((checked, count), (max, max));
        total += count;
    }
    assert_eq!(total, 1600, "one entry per row change");
    let sum: i64 = c
        .query_one("SELECT sum(balance)::bigint FROM accounts", &[])
        .unwrap()
        .get(0);
    assert_eq!(sum, 1600);
    // Every update entry records only the changed column.
    let other: i64 = c
        .query_one("SELECT count(*) FROM pgseal.ledger WHERE payload -> 'after' ?| array['id', 'tenant_id']", &[])
        .unwrap()
        .get(0);
    assert_eq!(other, 0);
}

#[test]
fn decrypts_are_recorded_once_per_key_at_commit() {
    let cl = Cluster::start("ledger-decrypt-audit", 54334, &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal; SET app.tenant_id = 'acme';
         CREATE TABLE secrets AS SELECT g AS id, pgseal.vault_seal('token-' || g, 'ai.openai') AS v FROM generate_series(1, 3) g;",
    )
    .unwrap();
    let decrypt_entries = |c: &mut postgres::Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pgseal.ledger WHERE event = 'vault.decrypt'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    c.batch_execute("SELECT pgseal.vault_decrypt(v, 'ai.openai') FROM secrets")
        .unwrap();
    assert_eq!(
        decrypt_entries(&mut c),
        1,
        "one entry for three decrypts under one key"
    );
    let p = c
        .query_one(
            "SELECT payload FROM pgseal.ledger WHERE event = 'vault.decrypt'",
            &[],
        )
        .unwrap()
        .get::<_, serde_json::Value>(0);
    assert_eq!(p["count"], 3);
    assert_eq!(p["contexts"], serde_json::json!(["ai.openai"]));
    c.batch_execute("BEGIN; SELECT pgseal.vault_decrypt(v, 'ai.openai') FROM secrets; ROLLBACK")
        .unwrap();
    assert_eq!(
        decrypt_entries(&mut c),
        1,
        "a rolled-back transaction leaves no entry"
    );
    let r = c
        .batch_execute("BEGIN READ ONLY; SELECT pgseal.vault_decrypt(v, 'ai.openai') FROM secrets");
    assert_eq!(
        sqlstate(r),
        "25006",
        "a read-only transaction cannot be audited, so it cannot decrypt"
    );
    c.batch_execute("ROLLBACK").unwrap();
    let (ok, _, problem, _, _) = check_tenant(&mut c, "acme");
    assert!(ok, "{problem:?}");
}

fn pgseald(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(repo_root().join("target/debug/pgseald"))
        .args(args)
        .output()
        .expect("pgseald is built by `make test` before these tests");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn export_is_verified_offline_by_pgseald() {
    let cl = Cluster::start("ledger-export", 54335, &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute("CREATE EXTENSION pgseal; SET app.tenant_id = 'acme'")
        .unwrap();
    for i in 0..50 {
        c.execute("SELECT pgseal.ledger_append('order.update', jsonb_build_object('id', $1::int, 'total', 12.50))", &[&i])
            .unwrap();
    }
    let cp: serde_json::Value = c
        .query_one("SELECT pgseal.ledger_checkpoint()", &[])
        .unwrap()
        .get(0);
    let pk: String = c
        .query_one("SELECT pgseal.ledger_public_key()", &[])
        .unwrap()
        .get(0);
    c.batch_execute("SELECT pgseal.ledger_append('after.checkpoint')")
        .unwrap();
    let lines: Vec<String> = c
        .query("SELECT e::text FROM pgseal.ledger_export() e", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(lines.len(), 51);
    let dir = std::path::PathBuf::from("/var/tmp/pgseal-it/ledger-export-files");
    std::fs::create_dir_all(&dir).unwrap();
    let export = dir.join("export.jsonl");
    let cps = dir.join("checkpoints.jsonl");
    std::fs::write(&export, lines.join("\n") + "\n").unwrap();
    std::fs::write(&cps, cp.to_string() + "\n").unwrap();
    let (code, out) = pgseald(&[
        "ledger",
        "verify",
        "--file",
        export.to_str().unwrap(),
        "--checkpoints",
        cps.to_str().unwrap(),
        "--public-key",
        &pk,
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("acme: ok, 51 entries checked, 1 checkpoint(s) matched"),
        "{out}"
    );
    let (code, out) = pgseald(&["ledger", "verify", "--database-url", &cl.url()]);
    assert_eq!(code, Some(0), "{out}");

    // Someone with superuser rewrites entry 10 and re-hashes the rest of the chain;
    // without the MAC key the database check catches it, and without the database
    // the auditor's checkpoint does.
    c.batch_execute(
        "ALTER EVENT TRIGGER pgseal_ledger_ddl_guard DISABLE;
         ALTER TABLE pgseal.ledger DISABLE TRIGGER pgseal_ledger_guard;
         UPDATE pgseal.ledger SET payload = '{\"id\": 9, \"total\": 0}' WHERE tenant_id = 'acme' AND seq = 10;",
    )
    .unwrap();
    let (code, out) = pgseald(&[
        "ledger",
        "verify",
        "--database-url",
        &cl.url(),
        "--tenant",
        "acme",
    ]);
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("hash mismatch at seq 10"), "{out}");
    let tampered: Vec<String> = c
        .query("SELECT e::text FROM pgseal.ledger_export() e", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    std::fs::write(&export, tampered.join("\n") + "\n").unwrap();
    let (code, out) = pgseald(&["ledger", "verify", "--file", export.to_str().unwrap()]);
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("hash mismatch at seq 10"), "{out}");
}
