//! Random SQL as a test tier (issue 20): sqlsmith sends a bounded number of random
//! queries, with fixed seeds, to a cluster with pgseal preloaded and a fixture in
//! place (a sealed column, an audited table, a protected table, ledger entries).
//! The tier fails on any backend crash and on any fixture plaintext or master key
//! material in the server log.
//!
//! `make test` runs the short default; `make fuzz` sets `PGSEAL_FUZZ_QUERIES` and
//! `PGSEAL_FUZZ_SEEDS` for a longer run. Seeds are 1..=PGSEAL_FUZZ_SEEDS.

use std::process::Command;

use pgseal_tests::{Cluster, KEY_V1};

const DEFAULT_QUERIES: u64 = 2000;
const DEFAULT_SEEDS: u64 = 3;
const TENANTS: [&str; 2] = ["acme", "globex"];

/// The sealed column's plaintexts: none of them may ever reach the server log.
const PLAINTEXTS: [&str; 3] = [
    "sk-live-SQLSMITH-SECRET-alpha",
    "smtp-SQLSMITH-SECRET-beta",
    "SQLSMITH-SECRET-gamma-ünïcødé",
];

/// A secret to look for in the log, with a name for the failure message.
struct Secret {
    name: String,
    bytes: Vec<u8>,
}

/// Every spelling of the fixture's secrets the log is searched for: each plaintext
/// raw and as lowercase and uppercase hex, and the master key as hex (both cases)
/// and as its 32 raw bytes.
fn fixture_secrets() -> Vec<Secret> {
    let mut out = Vec::new();
    for pt in PLAINTEXTS {
        out.extend(spellings(&format!("plaintext {pt:?}"), pt.as_bytes()));
    }
    let key_hex = KEY_V1.split_once(':').unwrap().1;
    let key_raw = decode_hex(key_hex);
    out.extend(spellings("master key", &key_raw));
    out
}

/// `bytes` raw, as lowercase hex and as uppercase hex.
fn spellings(name: &str, bytes: &[u8]) -> Vec<Secret> {
    let lower: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        Secret {
            name: format!("{name} (raw)"),
            bytes: bytes.to_vec(),
        },
        Secret {
            name: format!("{name} (hex)"),
            bytes: lower.clone().into_bytes(),
        },
        Secret {
            name: format!("{name} (HEX)"),
            bytes: lower.to_uppercase().into_bytes(),
        },
    ]
}

fn decode_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// What is wrong with a server log: one line per crashed backend and per secret
/// found. Empty when the log is clean.
fn log_problems(log: &[u8], secrets: &[Secret]) -> Vec<String> {
    let text = String::from_utf8_lossy(log);
    let mut problems: Vec<String> = text
        .lines()
        .filter(|line| is_crash_line(line))
        .map(|line| format!("backend crash: {line}"))
        .collect();
    for s in secrets {
        if contains(log, &text, &s.bytes) {
            problems.push(format!("{} found in the server log", s.name));
        }
    }
    problems
}

/// Whether a log line reports a backend that died: "terminated by signal", or
/// "server process … was terminated" (e.g. "by exception" on some platforms).
fn is_crash_line(line: &str) -> bool {
    line.contains("terminated by signal")
        || (line.contains("server process") && line.contains("was terminated"))
}

/// Whether `needle` occurs in `log`. A needle that is UTF-8 text is searched for in
/// `text`, the log's lossy UTF-8 decoding (fast; replacing invalid bytes never
/// touches a valid sequence next to them); any other needle byte by byte.
fn contains(log: &[u8], text: &str, needle: &[u8]) -> bool {
    match std::str::from_utf8(needle) {
        Ok(t) => text.contains(t),
        Err(_) => log.windows(needle.len()).any(|w| w == needle),
    }
}

/// A positive integer from the environment, or `default` when the variable is unset.
fn env_count(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => panic!("{name}={v:?} is not a positive integer"),
        },
    }
}

/// Fails with a message naming `make setup` when sqlsmith is not installed.
fn require_sqlsmith() {
    let found = Command::new("sqlsmith").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "sqlsmith is not installed (the Debian package `sqlsmith`); run `make setup`"
    );
}

/// Creates the extension, then the fixture: a sealed and registered column, an
/// audited table, a protected table and ledger entries, for two tenants. Plaintexts
/// travel as bind parameters only, so no statement text carries them.
fn create_fixture(c: &mut postgres::Client) {
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE integrations (id int PRIMARY KEY, tenant_id text NOT NULL, token text);
         SELECT pgseal.vault_register_column('integrations', 'token', 'integrations.token');
         CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, status text, doc jsonb);
         SELECT pgseal.ledger_audit('orders');
         CREATE TABLE invoices (id int PRIMARY KEY, tenant_id text NOT NULL, amount numeric);
         CREATE INDEX ON invoices (tenant_id);
         SELECT pgseal.tenant_protect('invoices');",
    )
    .unwrap();
    let mut id = 0;
    for tenant in TENANTS {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])
            .unwrap();
        for pt in PLAINTEXTS {
            id += 1;
            tx.execute(
                "INSERT INTO integrations VALUES ($1, $2, pgseal.vault_seal($3, 'integrations.token'))",
                &[&id, &tenant, &pt],
            )
            .unwrap();
            tx.execute(
                "INSERT INTO orders VALUES ($1, $2, 'new', jsonb_build_object('n', $1::int))",
                &[&id, &tenant],
            )
            .unwrap();
            tx.execute(
                "INSERT INTO invoices VALUES ($1, $2, $1::int * 10.5)",
                &[&id, &tenant],
            )
            .unwrap();
        }
        tx.batch_execute(
            "UPDATE orders SET status = 'paid' WHERE id % 2 = 0;
             SELECT pgseal.ledger_append('order.status', '{\"order\": 2, \"to\": \"paid\"}');
             SELECT pgseal.ledger_append('fixture.note');",
        )
        .unwrap();
        tx.commit().unwrap();
        // A checkpoint signs committed entries only.
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])
            .unwrap();
        tx.execute("SELECT pgseal.ledger_checkpoint()", &[])
            .unwrap();
        tx.commit().unwrap();
    }
}

/// Checks the fixture is what the queries run against: sealed values that decrypt
/// for their tenant, audit entries, and a forced RLS policy.
fn check_fixture(c: &mut postgres::Client) {
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT pgseal.set_tenant('acme')", &[]).unwrap();
    let plain: Vec<String> = tx
        .query(
            "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations WHERE tenant_id = 'acme' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(plain, PLAINTEXTS);
    let (ok, checked): (bool, i64) = tx
        .query_one("SELECT ok, checked FROM pgseal.ledger_verify()", &[])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    // At least 3 audited inserts, 1 audited update and 2 appends.
    assert!(
        ok && checked >= 6,
        "acme's chain: ok={ok}, {checked} entries"
    );
    tx.commit().unwrap();
    let forced: bool = c
        .query_one(
            "SELECT relforcerowsecurity FROM pg_class WHERE oid = 'invoices'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(forced, "invoices is not protected");
}

/// Row counts of the fixture's tables, of the ledger entries that are not decrypt
/// evidence, of data keys and of checkpoints. Decrypt attempts are recorded
/// durably even when their transaction rolls back (`vault.decrypt_started`,
/// `vault.decrypt`), creating the tenant's ledger key if needed, so those
/// rows are left out: random SQL adds them by design.
fn fixture_counts(c: &mut postgres::Client) -> Vec<i64> {
    c.query_one(
        "SELECT (SELECT count(*) FROM integrations), (SELECT count(*) FROM orders),
                (SELECT count(*) FROM invoices),
                (SELECT count(*) FROM pgseal.ledger WHERE event NOT LIKE 'vault.decrypt%'),
                (SELECT count(*) FROM pgseal.tenant_keys WHERE purpose = 'dek'),
                (SELECT count(*) FROM pgseal.ledger_checkpoints)",
        &[],
    )
    .map(|r| (0..6).map(|i| r.get(i)).collect())
    .unwrap()
}

/// Every tenant's chain verifies, including chains random SQL started.
fn assert_every_chain_verifies(c: &mut postgres::Client) {
    let rows = c
        .query(
            "SELECT d.tenant_id, v.ok, v.problem
               FROM (SELECT DISTINCT tenant_id FROM pgseal.ledger) d,
                    pgseal.ledger_verify(d.tenant_id) v",
            &[],
        )
        .unwrap();
    assert!(rows.len() >= 3, "the fixture's chains: {}", rows.len());
    for r in rows {
        let (tenant, ok, problem): (String, bool, Option<String>) = (r.get(0), r.get(1), r.get(2));
        assert!(ok, "tenant {tenant:?}'s chain does not verify: {problem:?}");
    }
}

/// Runs sqlsmith for `queries` queries with `seed`; panics when it does not exit 0.
fn run_sqlsmith(cl: &Cluster, seed: u64, queries: u64) {
    let out = Command::new("sqlsmith")
        .arg(format!("--target={}", cl.url()))
        .arg(format!("--seed={seed}"))
        .arg(format!("--max-queries={queries}"))
        .output()
        .expect("run sqlsmith");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "sqlsmith seed {seed} exited with {}: …{}",
        out.status,
        last_chars(&stderr, 2000)
    );
    println!("sqlsmith seed {seed}: {queries} queries done");
}

/// The last `n` characters of `text`.
fn last_chars(text: &str, n: usize) -> &str {
    let start = text
        .char_indices()
        .rev()
        .nth(n.saturating_sub(1))
        .map_or(0, |(i, _)| i);
    &text[start..]
}

/// Fails with every problem of the server log.
fn assert_log_clean(cl: &Cluster, secrets: &[Secret], after: &str) {
    let log = std::fs::read(cl.dir.join("server.log")).expect("read server.log");
    let problems = log_problems(&log, secrets);
    assert!(
        problems.is_empty(),
        "after {after}, see {}/server.log:\n{}",
        cl.dir.display(),
        problems.join("\n")
    );
}

#[test]
fn random_sql_crashes_no_backend_and_leaks_nothing_to_the_log() {
    require_sqlsmith();
    let queries = env_count("PGSEAL_FUZZ_QUERIES", DEFAULT_QUERIES);
    let seeds = env_count("PGSEAL_FUZZ_SEEDS", DEFAULT_SEEDS);
    let cl = Cluster::start(
        "sqlsmith",
        &[KEY_V1],
        &["statement_timeout = '2s'", "log_min_messages = info"],
    );
    let mut c = cl.connect();
    create_fixture(&mut c);
    check_fixture(&mut c);
    let before = fixture_counts(&mut c);
    let secrets = fixture_secrets();
    assert_log_clean(&cl, &secrets, "the fixture");
    for seed in 1..=seeds {
        run_sqlsmith(&cl, seed, queries);
        assert_log_clean(&cl, &secrets, &format!("sqlsmith seed {seed}"));
    }
    // The fixture survives unchanged (sqlsmith rolls back every statement it sends)
    // and every ledger chain, the fixture's and those random SQL started, verifies.
    // (Counted first: check_fixture's decrypts and verify are recorded in the ledger.)
    let mut c = cl.connect();
    assert_eq!(fixture_counts(&mut c), before);
    assert_every_chain_verifies(&mut c);
    check_fixture(&mut c);
}

/// The log scan, on synthetic logs: each kind of problem is found, a clean log
/// has none, and ordinary errors are not crashes.
mod log_scan {
    use super::*;

    const CLEAN: &str = "2026-12-03 09:00:00 UTC [123] ERROR:  function foo() does not exist\n\
                         2026-12-03 09:00:01 UTC [124] FATAL:  terminating connection due to administrator command\n\
                         2026-12-03 09:00:02 UTC [125] ERROR:  canceling statement due to statement timeout\n";

    #[test]
    fn a_clean_log_has_no_problems() {
        assert!(log_problems(CLEAN.as_bytes(), &fixture_secrets()).is_empty());
    }

    #[test]
    fn a_backend_killed_by_a_signal_is_a_crash() {
        let log = format!(
            "{CLEAN}LOG:  server process (PID 4242) was terminated by signal 11: Segmentation fault\n\
             DETAIL:  Failed process was running: select 1\n"
        );
        let p = log_problems(log.as_bytes(), &fixture_secrets());
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("backend crash:") && p[0].contains("signal 11"));
    }

    #[test]
    fn a_backend_terminated_by_exception_is_a_crash() {
        let log = "LOG:  server process (PID 7) was terminated by exception 0xC0000005\n";
        assert_eq!(log_problems(log.as_bytes(), &[]).len(), 1);
    }

    #[test]
    fn each_spelling_of_a_plaintext_is_found() {
        let pt = PLAINTEXTS[2].as_bytes();
        let hex: String = pt.iter().map(|b| format!("{b:02x}")).collect();
        for spelled in [PLAINTEXTS[2].to_owned(), hex.clone(), hex.to_uppercase()] {
            let log = format!("{CLEAN}LOG:  value is \\x{spelled} here\n");
            let p = log_problems(log.as_bytes(), &fixture_secrets());
            assert_eq!(p.len(), 1, "{spelled}: {p:?}");
            assert!(p[0].contains("SQLSMITH-SECRET-gamma"), "{p:?}");
        }
    }

    #[test]
    fn a_plaintext_next_to_invalid_utf8_is_found() {
        let mut log = b"LOG:  \xe2\xff".to_vec();
        log.extend(PLAINTEXTS[0].as_bytes());
        log.extend(b"\xc3\n");
        let p = log_problems(&log, &fixture_secrets());
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("alpha"), "{p:?}");
    }

    #[test]
    fn the_master_key_is_found_as_hex_or_raw_bytes() {
        let hex = KEY_V1.split_once(':').unwrap().1;
        let mut raw_log = CLEAN.as_bytes().to_vec();
        raw_log.extend(decode_hex(hex));
        raw_log.extend(b"\n");
        for log in [format!("LOG: key {hex}\n").into_bytes(), raw_log] {
            let p = log_problems(&log, &fixture_secrets());
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(p[0].starts_with("master key"), "{p:?}");
        }
    }
}
