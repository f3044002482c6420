//! The ledger against a real cluster: concurrent appends at every isolation level,
//! kill -9 of the postmaster, audit triggers under concurrent updates, the decrypt
//! audit at commit, an export verified offline by pgseald, checkpoints that sign
//! only verified chains and extend each other, and a subject's erasure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgseal_tests::{
    is_retryable, kek_rewrap_until_done, sqlstate, Cluster, Pgseald, KEY_V1, KEY_V2,
};

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
    let cl = Cluster::start("ledger-concurrency", &[KEY_V1], &["max_connections = 60"]);
    let mut c = cl.connect();
    c.batch_execute("CREATE EXTENSION pgseal").unwrap();
    // A REPEATABLE READ or SERIALIZABLE transaction whose snapshot predates
    // another session's append fails with 40001 (retry it), rather than append
    // after entries it cannot see: the tenant's first entry, and a later one.
    for level in ["REPEATABLE READ", "SERIALIZABLE"] {
        let tenant = format!("stale-{}", level.len());
        for event in ["first", "later"] {
            let mut stale = cl.connect();
            stale
                .batch_execute(&format!(
                    "BEGIN ISOLATION LEVEL {level}; SET LOCAL app.tenant_id = '{tenant}'; SELECT 1"
                ))
                .unwrap();
            c.batch_execute(&format!(
                "SET app.tenant_id = '{tenant}'; SELECT pgseal.ledger_append('{event}'); RESET app.tenant_id"
            ))
            .unwrap();
            assert_eq!(
                sqlstate(stale.batch_execute("SELECT pgseal.ledger_append('stale')")),
                "40001",
                "{level}, {event} entry"
            );
            stale.batch_execute("ROLLBACK").unwrap();
        }
        let (ok, checked, ..) = check_tenant(&mut c, &tenant);
        assert!(ok && checked == 2, "{level}");
    }
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
    let cl = Cluster::start("ledger-crash", &[KEY_V1], &[]);
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
    let cl = Cluster::start("ledger-audit", &[KEY_V1], &[]);
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
fn in_commit_mode_decrypts_are_recorded_once_per_key_at_commit() {
    let cl = Cluster::start(
        "ledger-decrypt-audit",
        &[KEY_V1],
        &["pgseal.audit_decrypt = commit"],
    );
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

#[test]
fn export_is_verified_offline_by_pgseald() {
    let cl = Cluster::start("ledger-export", &[KEY_V1], &[]);
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
    let dir = std::path::Path::new(pgseal_tests::IT_DIR).join("ledger-export-files");
    std::fs::create_dir_all(&dir).unwrap();
    let export = dir.join("export.jsonl");
    let cps = dir.join("checkpoints.jsonl");
    std::fs::write(&export, lines.join("\n") + "\n").unwrap();
    std::fs::write(&cps, cp.to_string() + "\n").unwrap();
    let (code, out) = Pgseald::ledger_verify_file(&export, &cps, &pk).run();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("acme: ok, 51 entries checked, 1 checkpoint(s) matched"),
        "{out}"
    );
    let (code, out) = Pgseald::new(["ledger", "verify", "--database-url", &cl.url()]).run();
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
    let (code, out) = Pgseald::new([
        "ledger",
        "verify",
        "--database-url",
        &cl.url(),
        "--tenant",
        "acme",
    ])
    .run();
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("hash mismatch at seq 10"), "{out}");
    let tampered: Vec<String> = c
        .query("SELECT e::text FROM pgseal.ledger_export() e", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    std::fs::write(&export, tampered.join("\n") + "\n").unwrap();
    let (code, out) = Pgseald::new(["ledger", "verify", "--file", export.to_str().unwrap()]).run();
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("hash mismatch at seq 10"), "{out}");
}

/// Issue 19: a subject's rows and the payloads of the entries that name it are
/// erased, and the chain still verifies, in the database and offline against a
/// checkpoint signed before the erasure; putting a payload back, even with a new
/// salt, is detected.
#[test]
fn an_erased_subject_still_verifies_offline_against_earlier_checkpoints() {
    let cl = Cluster::start("ledger-erasure", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE users (id text PRIMARY KEY, tenant_id text NOT NULL, email text);
         SELECT pgseal.subject_register('users', 'id');
         SELECT pgseal.ledger_audit('users');
         SET app.tenant_id = 'acme';
         INSERT INTO users VALUES ('u1', 'acme', 'one@example.com'), ('u2', 'acme', 'two@example.com');
         UPDATE users SET email = 'uno@example.com' WHERE id = 'u1';",
    )
    .unwrap();
    for i in 0..20 {
        let who = if i % 2 == 0 { "u1" } else { "u2" };
        c.execute(
            "SELECT pgseal.ledger_append('profile.viewed', jsonb_build_object('n', $1::int), NULL, ARRAY[$2])",
            &[&i, &who],
        )
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
    let receipt: serde_json::Value = c
        .query_one("SELECT pgseal.subject_erase('acme', 'u1')", &[])
        .unwrap()
        .get(0);
    // u1's insert and update, its ten entries, and the audit of its delete.
    assert_eq!(receipt["ledger_entries_erased"], 13, "{receipt}");
    let (ok, checked, erased): (bool, i64, i64) = {
        let r = c
            .query_one(
                "SELECT ok, checked, erased FROM pgseal.ledger_verify()",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    // 2 inserts, 1 update, 20 appends, 1 delete, the receipt.
    assert_eq!((ok, checked, erased), (true, 25, 13));
    let lines: Vec<String> = c
        .query("SELECT e::text FROM pgseal.ledger_export() e", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let joined = lines.join("\n");
    assert!(!joined.contains("one@example.com") && !joined.contains("uno@example.com"));
    assert!(joined.contains("two@example.com"));
    let dir = std::path::Path::new(pgseal_tests::IT_DIR).join("ledger-erasure-files");
    std::fs::create_dir_all(&dir).unwrap();
    let export = dir.join("export.jsonl");
    let cps = dir.join("checkpoints.jsonl");
    std::fs::write(&export, joined.clone() + "\n").unwrap();
    std::fs::write(&cps, cp.to_string() + "\n").unwrap();
    let (code, out) = Pgseald::ledger_verify_file(&export, &cps, &pk).run();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("acme: ok, 25 entries checked, 13 erased (verified by their payload commitments), 1 checkpoint(s) matched"),
        "{out}"
    );
    // A superuser puts the first erased payload back, with a fresh salt (the old
    // one is gone): the entry no longer matches its hash.
    let first: i64 = c
        .query_one(
            "SELECT min(seq) FROM pgseal.ledger WHERE tenant_id = 'acme' AND salt IS NULL",
            &[],
        )
        .unwrap()
        .get(0);
    c.batch_execute(&format!(
        "ALTER EVENT TRIGGER pgseal_ledger_ddl_guard DISABLE;
         ALTER TABLE pgseal.ledger DISABLE TRIGGER pgseal_ledger_guard;
         UPDATE pgseal.ledger SET payload = '{{\"table\": \"public.users\"}}', salt = gen_random_bytes_fallback.b, commitment = NULL
           FROM (SELECT sha256(random()::text::bytea) AS b) gen_random_bytes_fallback
          WHERE tenant_id = 'acme' AND seq = {first};"
    ))
    .unwrap();
    let problem: Option<String> = c
        .query_one("SELECT problem FROM pgseal.ledger_verify()", &[])
        .unwrap()
        .get(0);
    assert_eq!(problem.as_deref(), Some("hash mismatch"));
}

/// Issue 14, hole 7: the checkpoint key is a random key kept wrapped, not derived from
/// the master key, so a master key rotation and `kek_rewrap` leave the public key and
/// every earlier checkpoint valid; every checkpoint names the database's ledger_id.
#[test]
fn checkpoint_identity_survives_master_key_rotation() {
    let cl = Cluster::start("ledger-identity", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute("CREATE EXTENSION pgseal; SET app.tenant_id = 'acme'")
        .unwrap();
    let ledger_id: String = c
        .query_one("SELECT pgseal.ledger_id()", &[])
        .unwrap()
        .get(0);
    assert!(
        ledger_id.len() == 32
            && ledger_id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{ledger_id}"
    );
    // The key is made on first use, which a read-only transaction cannot store.
    let r = c.batch_execute("BEGIN READ ONLY; SELECT pgseal.ledger_public_key()");
    assert_eq!(sqlstate(r), "25006");
    c.batch_execute("ROLLBACK").unwrap();
    for i in 0..5 {
        c.execute(
            "SELECT pgseal.ledger_append('order.update', jsonb_build_object('id', $1::int))",
            &[&i],
        )
        .unwrap();
    }
    let cp1: serde_json::Value = c
        .query_one("SELECT pgseal.ledger_checkpoint()", &[])
        .unwrap()
        .get(0);
    assert_eq!(cp1["ledger_id"], ledger_id.as_str(), "{cp1}");
    assert_eq!(cp1["key_version"], 1, "{cp1}");
    let pk1: String = c
        .query_one("SELECT pgseal.ledger_public_key()", &[])
        .unwrap()
        .get(0);
    drop(c);

    // A second master key version becomes active; every key moves to it.
    cl.set_keys(&[KEY_V1, KEY_V2]);
    cl.restart();
    let mut c = cl.connect();
    c.batch_execute("SET app.tenant_id = 'acme'").unwrap();
    kek_rewrap_until_done(&mut c);
    let (left, cp_keys): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*) FILTER (WHERE kek_version <> 2), \
                        count(*) FILTER (WHERE purpose = 'checkpoint' AND kek_version = 2) \
                 FROM pgseal.tenant_keys",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (left, cp_keys),
        (0, 1),
        "the checkpoint key was rewrapped too"
    );
    let pk2: String = c
        .query_one("SELECT pgseal.ledger_public_key()", &[])
        .unwrap()
        .get(0);
    assert_eq!(pk2, pk1, "the public key survives the rotation");
    let id2: String = c
        .query_one("SELECT pgseal.ledger_id()", &[])
        .unwrap()
        .get(0);
    assert_eq!(id2, ledger_id);

    c.batch_execute("SELECT pgseal.ledger_append('after.rotation')")
        .unwrap();
    let cp2: serde_json::Value = c
        .query_one("SELECT pgseal.ledger_checkpoint()", &[])
        .unwrap()
        .get(0);
    assert_eq!(cp2["ledger_id"], ledger_id.as_str(), "{cp2}");
    assert_eq!(cp2["key_version"], 2, "{cp2}");
    assert_eq!(cp2["prev_seq"], cp1["seq"], "{cp2}");

    // Offline, with the one public key: the checkpoint signed before the rotation
    // and the one signed after both verify against the export.
    let lines: Vec<String> = c
        .query("SELECT e::text FROM pgseal.ledger_export() e", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let dir = std::path::Path::new(pgseal_tests::IT_DIR).join("ledger-identity-files");
    std::fs::create_dir_all(&dir).unwrap();
    let export = dir.join("export.jsonl");
    std::fs::write(&export, lines.join("\n") + "\n").unwrap();
    for (name, cps) in [("old.jsonl", vec![&cp1]), ("both.jsonl", vec![&cp1, &cp2])] {
        let file = dir.join(name);
        let text: String = cps.iter().map(|cp| cp.to_string() + "\n").collect();
        std::fs::write(&file, text).unwrap();
        let (code, out) = Pgseald::ledger_verify_file(&export, &file, &pk1).run();
        assert_eq!(code, Some(0), "{name}: {out}");
        assert!(
            out.contains(&format!("{} checkpoint(s) matched", cps.len())),
            "{name}: {out}"
        );
    }
}

/// The hash of a ledger entry as docs/FORMAT.md ("Ledger entries") defines it:
/// anyone can compute it; only the MAC needs the master key.
fn entry_hash(
    prev: &[u8],
    tenant: &str,
    seq: i64,
    at_us: i64,
    actor: &str,
    event: &str,
    payload: &str,
) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let lp = |h: &mut Sha256, s: &str| {
        h.update((s.len() as u32).to_be_bytes());
        h.update(s.as_bytes());
    };
    let mut h = Sha256::new();
    h.update(b"pgseal:v1:ledger\0");
    h.update(prev);
    lp(&mut h, tenant);
    h.update(seq.to_be_bytes());
    h.update(at_us.to_be_bytes());
    lp(&mut h, actor);
    lp(&mut h, event);
    lp(&mut h, payload);
    h.finalize().to_vec()
}

#[test]
fn checkpoints_sign_only_verified_chains_and_extend_each_other() {
    let cl = Cluster::start("ledger-checkpoints", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute("CREATE EXTENSION pgseal; SET app.tenant_id = 'acme'")
        .unwrap();
    let append = |c: &mut postgres::Client, n: usize| {
        for _ in 0..n {
            c.batch_execute("SELECT pgseal.ledger_append('order.paid', '{\"amount\": 10}')")
                .unwrap();
        }
    };
    let checkpoint = |c: &mut postgres::Client| {
        c.query_one("SELECT pgseal.ledger_checkpoint('acme')", &[])
            .map(|r| r.get::<_, serde_json::Value>(0))
    };
    let kept = |c: &mut postgres::Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pgseal.ledger_checkpoints WHERE tenant_id = 'acme'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    append(&mut c, 3);
    // Issue 14, hole 4, exactly as written: moving the anchor to the head made
    // ledger_verify return ok with 0 entries checked.
    assert_eq!(
        sqlstate(
            c.batch_execute("UPDATE pgseal.ledger_heads SET anchor_seq = seq, anchor_hash = hash")
        ),
        "42501"
    );
    let (ok, checked): (bool, i64) = {
        let r = c
            .query_one("SELECT ok, checked FROM pgseal.ledger_verify('acme')", &[])
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((ok, checked), (true, 3));
    let first = checkpoint(&mut c).unwrap();
    assert_eq!(first["seq"], 3);
    assert_eq!(first["prev_seq"], 0, "a tenant's first checkpoint");
    assert_eq!(first["prev_hash"], "0".repeat(64));
    assert_eq!(
        checkpoint(&mut c).unwrap(),
        first,
        "a head that has not moved gets its checkpoint again"
    );
    append(&mut c, 2);
    let second = checkpoint(&mut c).unwrap();
    assert_eq!(second["seq"], 5);
    assert_eq!(second["prev_seq"], 3, "the checkpoint log is a chain");
    assert_eq!(second["prev_hash"], first["hash"]);
    assert_eq!(kept(&mut c), 2);
    for write in [
        "UPDATE pgseal.ledger_checkpoints SET signed_at = 'x'",
        "DELETE FROM pgseal.ledger_checkpoints",
        "TRUNCATE pgseal.ledger_checkpoints",
    ] {
        assert_eq!(sqlstate(c.batch_execute(write)), "42501", "{write}");
    }

    // Two checkpoints of one head at once: one is kept, the other fails with 40001
    // (retry it: it then gets the kept one), and the log does not fork.
    append(&mut c, 1);
    let mut a = cl.connect();
    a.batch_execute("BEGIN").unwrap();
    let third = checkpoint(&mut a).unwrap();
    let mut b = cl.connect();
    let racer = std::thread::spawn(move || sqlstate(checkpoint(&mut b)));
    std::thread::sleep(Duration::from_millis(500));
    a.batch_execute("COMMIT").unwrap();
    assert_eq!(racer.join().unwrap(), "40001");
    assert_eq!(checkpoint(&mut c).unwrap(), third);
    assert_eq!(third["prev_seq"], 5);
    assert_eq!(kept(&mut c), 3);

    // Pruned past the last checkpoint, the next one starts from the anchor, which
    // the prune recorded and which is that checkpoint's (seq, hash).
    c.batch_execute(
        "SET pgseal.ledger_min_retention = '0'; SELECT pgseal.ledger_prune('acme', 7); \
         RESET pgseal.ledger_min_retention",
    )
    .unwrap();
    append(&mut c, 1);
    let fourth = checkpoint(&mut c).unwrap();
    assert_eq!(
        (fourth["prev_seq"].clone(), fourth["seq"].clone()),
        (6.into(), 8.into())
    );
    assert_eq!(fourth["prev_hash"], third["hash"]);
    assert_eq!(kept(&mut c), 4);

    // Issue 14, hole 3: rows written by someone without the master key (the
    // table owner, a restored dump) were signed by the next checkpoint, and then
    // passed offline. Writing them is refused now, superusers included ...
    let row = c
        .query_one(
            "SELECT seq, hash FROM pgseal.ledger WHERE tenant_id = 'acme' ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .unwrap();
    let (seq, head): (i64, Vec<u8>) = (row.get::<_, i64>(0) + 1, row.get(1));
    let at_us: i64 = 1_796_083_200_000_000;
    let payload = "{\"amount\":1000}";
    let hash = entry_hash(
        &head,
        "acme",
        seq,
        at_us,
        "mallory",
        "order.refund",
        payload,
    );
    let forge = |c: &mut postgres::Client| {
        c.execute(
            "INSERT INTO pgseal.ledger VALUES ('acme', $1, 'epoch'::timestamptz + $2::float8 * interval '1 microsecond', \
             'mallory', 'order.refund', $3::text::jsonb, $4, $5, $6)",
            &[&seq, &(at_us as f64), &payload, &head, &hash, &vec![0u8; 32]],
        )
    };
    assert_eq!(sqlstate(forge(&mut c)), "42501");
    // ... and when they are written anyway (the guards lifted on purpose, as
    // only a superuser can), the next checkpoint refuses to sign them.
    c.batch_execute(
        "ALTER EVENT TRIGGER pgseal_ledger_ddl_guard DISABLE;
         ALTER TABLE pgseal.ledger DISABLE TRIGGER pgseal_ledger_write_guard;
         ALTER TABLE pgseal.ledger_heads DISABLE TRIGGER pgseal_heads_write_guard;",
    )
    .unwrap();
    forge(&mut c).unwrap();
    c.execute(
        "UPDATE pgseal.ledger_heads SET seq = $1, hash = $2 WHERE tenant_id = 'acme'",
        &[&seq, &hash],
    )
    .unwrap();
    assert_eq!(sqlstate(checkpoint(&mut c)), "XX001");
    assert_eq!(kept(&mut c), 4, "nothing was signed");
    let problem: Option<String> = c
        .query_one("SELECT problem FROM pgseal.ledger_verify('acme')", &[])
        .unwrap()
        .get(0);
    assert!(problem.is_some());

    // A tail cut after the tenant's heads row (which appends move only every
    // HEAD_STRIDE entries): while the server runs, the head its last appender
    // published at commit still names the cut entry, so verification reports
    // the gap and the next checkpoint refuses.
    c.batch_execute(
        "SET app.tenant_id = 'cut'; SELECT pgseal.ledger_append('e'); \
         SELECT pgseal.ledger_append('e'); SELECT pgseal.ledger_append('e')",
    )
    .unwrap();
    let signed = c
        .query_one("SELECT pgseal.ledger_checkpoint('cut')", &[])
        .unwrap()
        .get::<_, serde_json::Value>(0);
    assert_eq!(signed["seq"], 3);
    c.batch_execute(
        "ALTER TABLE pgseal.ledger DISABLE TRIGGER pgseal_ledger_guard; \
         DELETE FROM pgseal.ledger WHERE tenant_id = 'cut' AND seq = 3",
    )
    .unwrap();
    let verified = |c: &mut postgres::Client| -> (bool, Option<i64>) {
        let r = c
            .query_one(
                "SELECT ok, first_bad_seq FROM pgseal.ledger_verify('cut')",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(verified(&mut c), (false, Some(3)));
    // An append rolled back to a savepoint (whose committer cannot publish its
    // own head) leaves the published one as a witness.
    c.batch_execute(
        "BEGIN; SET LOCAL app.tenant_id = 'cut'; SAVEPOINT s; SELECT pgseal.ledger_append('e'); \
         ROLLBACK TO s; COMMIT",
    )
    .unwrap();
    assert_eq!(verified(&mut c), (false, Some(3)));
    // The checkpoint of that head is returned again; nothing new is signed.
    let again = c
        .query_one("SELECT pgseal.ledger_checkpoint('cut')", &[])
        .unwrap()
        .get::<_, serde_json::Value>(0);
    assert_eq!(again, signed);
    // After a restart nothing in the database remembers the cut entry (the heads
    // row is behind it): the chain verifies, and what catches the cut is the
    // checkpoint that signed it, which the next one must extend.
    cl.restart();
    let mut c = cl.connect();
    assert_eq!(verified(&mut c), (true, None));
    assert_eq!(
        sqlstate(c.query_one("SELECT pgseal.ledger_checkpoint('cut')", &[])),
        "XX001"
    );
}

/// Each way a chain's head moves, other than a plain append, followed by another
/// session's append, which takes the head the last committer published
/// (`ledger::shared_heads`) unless that head was removed: the append must land
/// right after the last entry, and the chain must verify. A prepared transaction
/// rolled back takes the keys it made (ledger and data keys) with it, from its
/// session's caches too.
#[test]
fn published_heads_follow_aborts_prepares_restores_and_truncates() {
    let cl = Cluster::start(
        "ledger-published",
        &[KEY_V1],
        &["max_prepared_transactions = 4"],
    );
    let mut c = cl.connect();
    c.batch_execute("CREATE EXTENSION pgseal").unwrap();
    let mut other = cl.connect();
    let append = |c: &mut postgres::Client, tenant: &str| -> i64 {
        c.execute("SELECT set_config('app.tenant_id', $1, false)", &[&tenant])
            .unwrap();
        c.query_one("SELECT seq FROM pgseal.ledger_append('e')", &[])
            .unwrap()
            .get(0)
    };
    let verified = |c: &mut postgres::Client, tenant: &str| -> (bool, i64, Option<i64>) {
        let r = c
            .query_one(
                "SELECT ok, checked, first_bad_seq FROM pgseal.ledger_verify($1)",
                &[&tenant],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };

    // A rolled-back savepoint: the committed head is the last entry written
    // after it, not the one rolled back.
    c.batch_execute(
        "BEGIN; SET LOCAL app.tenant_id = 'sub'; SELECT pgseal.ledger_append('a'); \
         SAVEPOINT s; SELECT pgseal.ledger_append('b'); ROLLBACK TO s; COMMIT",
    )
    .unwrap();
    assert_eq!(append(&mut other, "sub"), 2);
    c.batch_execute(
        "BEGIN; SET LOCAL app.tenant_id = 'sub'; SELECT pgseal.ledger_append('c'); \
         SAVEPOINT s; SELECT pgseal.ledger_append('d'); ROLLBACK TO s; \
         SELECT pgseal.ledger_append('e'); COMMIT",
    )
    .unwrap();
    assert_eq!(append(&mut other, "sub"), 5);
    assert_eq!(verified(&mut c, "sub"), (true, 5, None));

    // A REPEATABLE READ snapshot taken before another session's append does not
    // see its entry, nor is that head a cut: verification is ok, as of the snapshot.
    other
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .unwrap();
    assert_eq!(append(&mut c, "sub"), 6);
    assert_eq!(verified(&mut other, "sub"), (true, 5, None));
    other.batch_execute("COMMIT").unwrap();

    // A prepared transaction commits in another session, which publishes nothing.
    append(&mut c, "prep");
    c.batch_execute(
        "BEGIN; SET LOCAL app.tenant_id = 'prep'; SELECT pgseal.ledger_append('p'); \
         PREPARE TRANSACTION 'p'",
    )
    .unwrap();
    other.batch_execute("COMMIT PREPARED 'p'").unwrap();
    assert_eq!(append(&mut c, "prep"), 3);
    assert_eq!(verified(&mut other, "prep"), (true, 3, None));

    // A prepared transaction that made a new tenant's ledger key, rolled back: the
    // key is gone, and the session that prepared it signs its next entry with the
    // key made then, not with the one it held.
    c.batch_execute(
        "BEGIN; SET LOCAL app.tenant_id = 'unprep'; SELECT pgseal.ledger_append('p'); \
         PREPARE TRANSACTION 'u'",
    )
    .unwrap();
    other.batch_execute("ROLLBACK PREPARED 'u'").unwrap();
    assert_eq!(append(&mut c, "unprep"), 1);
    assert_eq!(verified(&mut other, "unprep"), (true, 1, None));
    // So does a data key: the session's next seal is one another session opens.
    c.batch_execute(
        "BEGIN; SET LOCAL app.tenant_id = 'unprep'; SELECT pgseal.vault_seal('first', 'ctx'); \
         PREPARE TRANSACTION 'v'",
    )
    .unwrap();
    other.batch_execute("ROLLBACK PREPARED 'v'").unwrap();
    c.execute("SELECT set_config('app.tenant_id', 'unprep', false)", &[])
        .unwrap();
    let sealed: String = c
        .query_one("SELECT pgseal.vault_seal('second', 'ctx')", &[])
        .unwrap()
        .get(0);
    other
        .execute("SELECT set_config('app.tenant_id', 'unprep', false)", &[])
        .unwrap();
    let opened: String = other
        .query_one("SELECT pgseal.vault_decrypt($1, 'ctx')", &[&sealed])
        .unwrap()
        .get(0);
    assert_eq!(opened, "second");

    // A restore writes entries past the head last published. Set up: entries 4
    // and 5 saved and cut; a REPEATABLE READ append (which reads the table) then
    // commits entry 4 of another history and publishes it; that entry is cut too.
    for _ in 0..5 {
        append(&mut c, "restored");
    }
    for sql in [
        "CREATE TABLE saved AS SELECT * FROM pgseal.ledger WHERE tenant_id = 'restored' AND seq > 3",
        "ALTER EVENT TRIGGER pgseal_ledger_ddl_guard DISABLE",
        "ALTER TABLE pgseal.ledger DISABLE TRIGGER pgseal_ledger_guard",
        "DELETE FROM pgseal.ledger WHERE tenant_id = 'restored' AND seq > 3",
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL app.tenant_id = 'restored'; \
         SELECT pgseal.ledger_append('other'); COMMIT",
        "DELETE FROM pgseal.ledger WHERE tenant_id = 'restored' AND seq > 3",
        "SET pgseal.restore = on; INSERT INTO pgseal.ledger SELECT * FROM saved; RESET pgseal.restore",
    ] {
        c.batch_execute(sql).unwrap();
    }
    // Taken from the restored entries, not from the head published before.
    assert_eq!(append(&mut other, "restored"), 6);
    assert_eq!(verified(&mut c, "restored"), (true, 6, None));

    // TRUNCATE with the guards lifted: appends go on after the published head,
    // so the loss stays a gap. (The restore above removed the heads published
    // before it.)
    assert_eq!(append(&mut c, "sub"), 7);
    c.batch_execute(
        "ALTER TABLE pgseal.ledger DISABLE TRIGGER pgseal_ledger_truncate_guard;
         TRUNCATE pgseal.ledger",
    )
    .unwrap();
    assert_eq!(append(&mut other, "sub"), 8);
    assert_eq!(verified(&mut c, "sub"), (false, 0, Some(1)));

    // A database dropped and created again with the same OID, from a template
    // holding pgseal (so its ledger has the same OID too), starts its chains at 1.
    c.batch_execute("CREATE DATABASE tpl").unwrap();
    cl.connect_to("tpl", "postgres")
        .batch_execute("CREATE EXTENSION pgseal")
        .unwrap();
    c.batch_execute("CREATE DATABASE again TEMPLATE tpl")
        .unwrap();
    let oid: u32 = c
        .query_one("SELECT oid FROM pg_database WHERE datname = 'again'", &[])
        .unwrap()
        .get(0);
    let mut again = cl.connect_to("again", "postgres");
    for n in 1..=3 {
        assert_eq!(append(&mut again, "acme"), n);
    }
    drop(again);
    c.batch_execute("DROP DATABASE again WITH (FORCE)").unwrap();
    c.batch_execute(&format!("CREATE DATABASE again TEMPLATE tpl OID {oid}"))
        .unwrap();
    let mut again = cl.connect_to("again", "postgres");
    assert_eq!(append(&mut again, "acme"), 1);
    assert_eq!(verified(&mut again, "acme"), (true, 1, None));
}
