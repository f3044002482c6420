//! `pgseald run` against a real cluster: one leader among two daemons, failover after
//! kill -9 of the leader, recovery after a Postgres restart, scheduled jobs recorded
//! in pgseal.job_runs, checkpoints written outside the database, and a clean exit 0
//! on SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pgseal_tests::{count, free_port, wait_for, Cluster, Pgseald, KEY_V1};

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(config: &Path, log: PathBuf) -> Daemon {
        let child = Pgseald::new(["run", "--config", config.to_str().unwrap()])
            .spawn(std::fs::File::create(&log).unwrap());
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn times_leader(&self) -> usize {
        self.log().matches("became leader").count()
    }

    fn terminate(&mut self) -> Option<i32> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "pgseald did not exit within 15 s of SIGTERM:\n{}",
            self.log()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The /metrics page of the daemon listening on `port`.
fn metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn one_leader_failover_restart_and_sigterm() {
    let cl = Cluster::start("daemon-run", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE events (id int PRIMARY KEY, tenant_id text NOT NULL, created_at timestamptz NOT NULL);
         INSERT INTO events SELECT g, 't' || (g % 3), now() - g * interval '1 day' FROM generate_series(1, 60) g;
         SELECT pgseal.retention_set('events', '30 days');
         SET app.tenant_id = 'acme';
         SELECT pgseal.ledger_append('login') FROM generate_series(1, 5);",
    )
    .unwrap();
    let dir = pgseal_tests::fresh_dir("daemon-run-files");
    let config = dir.join("pgseald.toml");
    let metrics_port = free_port();
    std::fs::write(
        &config,
        format!(
            "database_url = \"{}\"\nleader_takeover_seconds = 2\nmetrics_addr = \"127.0.0.1:{metrics_port}\"\n\
             [retention]\nschedule = \"* * * * * *\"\n\
             [verification]\nschedule = \"*/2 * * * * *\"\ncheckpoint_dir = \"{}\"\n",
            cl.url(),
            dir.join("checkpoints").display()
        ),
    )
    .unwrap();

    let mut a = Daemon::start(&config, dir.join("a.log"));
    wait_for("daemon A to lead", 15, || a.times_leader() == 1);
    let mut b = Daemon::start(&config, dir.join("b.log"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(b.times_leader(), 0, "exactly one leader:\n{}", b.log());
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 21251"),
        1
    );
    // The leader ran its jobs: retention deleted the expired rows, verification
    // wrote a signed checkpoint for the tenant with a ledger.
    wait_for("retention to run", 10, || {
        count(&mut c, "SELECT count(*) FROM events") == 29
    });
    wait_for("a checkpoint", 10, || {
        std::fs::read_to_string(dir.join("checkpoints/checkpoints.jsonl"))
            .is_ok_and(|t| t.contains("\"tenant\": \"acme\""))
    });
    assert!(
        count(
            &mut c,
            "SELECT count(*) FROM pgseal.job_runs WHERE job = 'retention' AND status = 'ok'"
        ) >= 1
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pgseal.job_runs WHERE status = 'failed'"
        ),
        0,
        "{}",
        a.log()
    );
    let page = metrics(metrics_port);
    assert!(page.contains("pgseald_leader 1"), "{page}");
    assert!(page.contains("pgseald_rows_deleted_total 31"), "{page}");
    assert!(
        page.contains("pgseald_verification_failures_total 0"),
        "{page}"
    );

    // kill -9 of the leader: the standby takes over within leader_takeover_seconds.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = Instant::now();
    wait_for("daemon B to take over", 10, || b.times_leader() == 1);
    assert!(
        killed.elapsed() < Duration::from_secs(6),
        "takeover took {:?}",
        killed.elapsed()
    );

    // A Postgres restart: the leader reconnects and leads again.
    drop(c);
    cl.restart();
    wait_for("daemon B to lead again after the restart", 30, || {
        b.times_leader() >= 2
    });
    let mut c = cl.connect();
    let runs = count(&mut c, "SELECT count(*) FROM pgseal.job_runs");
    wait_for("jobs to continue after the restart", 10, || {
        count(&mut c, "SELECT count(*) FROM pgseal.job_runs") > runs
    });

    // SIGTERM: finish the batch in hand and exit 0.
    assert_eq!(b.terminate(), Some(0), "{}", b.log());
    assert!(b.log().contains("stopped"), "{}", b.log());
    assert_eq!(count(&mut c, "SELECT count(*) FROM pgseal.job_runs WHERE status = 'running' AND finished_at IS NULL AND started_at < now() - interval '5 s'"), 0);
}

/// Sets `pgseal.ledger_min_retention` to 0 on `cl` (a reload), waits until every
/// entry so far is older than the 0.864 s kept, and starts pgseald with a retention
/// job every second that prunes every ledger to that age (its files in `dir`).
fn pruning_daemon(cl: &Cluster, dir: &Path) -> Daemon {
    let mut c = cl.connect();
    for sql in [
        "ALTER SYSTEM SET pgseal.ledger_min_retention = '0'",
        "SELECT pg_reload_conf()",
    ] {
        c.batch_execute(sql).unwrap();
    }
    wait_for("the reloaded minimum retention", 10, || {
        count(
            &mut cl.connect(),
            "SELECT count(*) FROM pg_settings WHERE name = 'pgseal.ledger_min_retention' AND setting = '0'",
        ) == 1
    });
    std::thread::sleep(Duration::from_secs(2));
    let config = dir.join("pgseald.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"{}\"\n[retention]\nschedule = \"* * * * * *\"\nledger_keep_days = 0.00001\n",
            cl.url()
        ),
    )
    .unwrap();
    Daemon::start(&config, dir.join("d.log"))
}

/// `[retention] ledger_keep_days` prunes every tenant's ledger on each run: a chain
/// with no entry that young (a tenant that appended nothing for longer) up to its
/// last entry, and not again while only that prune's receipt is left; a held
/// tenant's not at all; the audit writer's chain up to the first decrypt record of
/// the held tenant (`ledger_prune` refuses to go past it, and refused the whole
/// chain when asked to).
#[test]
fn scheduled_ledger_pruning_reaches_quiet_chains_and_stops_at_held_records() {
    let cl = Cluster::start("daemon-prune", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE ROLE app LOGIN;
         GRANT pgseal_decrypt, pgseal_ledger TO app;
         CREATE TABLE integrations (id int PRIMARY KEY, tenant_id text, token text);
         GRANT SELECT ON integrations TO app;
         SET app.tenant_id = 'beta';
         INSERT INTO integrations VALUES (2, 'beta', pgseal.vault_seal('tok-beta', 'integrations.token'));
         SET app.tenant_id = 'acme';
         INSERT INTO integrations VALUES (1, 'acme', pgseal.vault_seal('tok-secret', 'integrations.token'));
         SELECT pgseal.ledger_append('login') FROM generate_series(1, 3);
         SET app.tenant_id = 'quiet';
         SELECT pgseal.ledger_append('login') FROM generate_series(1, 4);
         RESET app.tenant_id;",
    )
    .unwrap();
    // Decrypts by beta, then acme, each while its own transaction holds its chain:
    // the audit writer records them in _pgseal_audit, in that order.
    let mut app = cl.connect_as("app");
    for t in ["beta", "acme"] {
        app.batch_execute(&format!(
            "BEGIN; SET LOCAL app.tenant_id = '{t}'; SELECT pgseal.ledger_append('app.note');
             SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations
              WHERE tenant_id = '{t}'; COMMIT"
        ))
        .unwrap();
    }
    let audited = |c: &mut postgres::Client| -> Vec<String> {
        c.query(
            "SELECT coalesce(payload ->> 'tenant', event) FROM pgseal.ledger \
              WHERE tenant_id = '_pgseal_audit' ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let chain = |c: &mut postgres::Client, t: &str| {
        count(
            c,
            &format!("SELECT count(*) FROM pgseal.ledger WHERE tenant_id = '{t}'"),
        )
    };
    let before = audited(&mut c);
    assert_eq!(
        before.first().map(String::as_str),
        Some("beta"),
        "{before:?}"
    );
    let held_from = before.iter().position(|t| t == "acme").unwrap();
    c.batch_execute("SELECT pgseal.retention_hold('acme', true)")
        .unwrap();
    let acme = chain(&mut c, "acme");
    let d = pruning_daemon(&cl, &pgseal_tests::fresh_dir("daemon-prune-files"));
    // The quiet chain keeps only the latest prune's receipt, and verifies.
    wait_for("the quiet chain to be pruned", 20, || {
        count(
            &mut c,
            "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 'quiet' AND event = 'login'",
        ) == 0
    });
    let (n, event, ok): (i64, String, bool) = {
        let r = c
            .query_one(
                "SELECT count(*), min(event), (SELECT ok FROM pgseal.ledger_verify('quiet')) \
                   FROM pgseal.ledger WHERE tenant_id = 'quiet'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!((n, event.as_str(), ok), (1, "ledger.pruned", true));
    // The audit writer's chain lost what came before acme's first record, and
    // gained the prune's receipt; the held chain is as it was; and later runs (one
    // a second) prune neither the quiet chain's receipt nor these again.
    let mut want: Vec<String> = before[held_from..].to_vec();
    want.push("ledger.pruned".to_owned());
    wait_for("the audit writer's chain to be pruned", 10, || {
        audited(&mut c) == want
    });
    let quiet_seq = |c: &mut postgres::Client| {
        count(
            c,
            "SELECT max(seq) FROM pgseal.ledger WHERE tenant_id = 'quiet'",
        )
    };
    let receipt = quiet_seq(&mut c);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(audited(&mut c), want, "{}", d.log());
    assert_eq!(
        quiet_seq(&mut c),
        receipt,
        "the quiet chain was pruned again"
    );
    assert_eq!(chain(&mut c, "acme"), acme);
    assert!(!d.log().contains("ledger not pruned"), "{}", d.log());
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pgseal.job_runs WHERE job = 'retention' AND status = 'failed'"
        ),
        0,
        "{}",
        d.log()
    );
    assert!(
        count(
            &mut c,
            "SELECT count(*) FROM pgseal.job_runs WHERE job = 'retention' AND status = 'ok'"
        ) >= 2
    );
}

/// A tenant's offboarding erases its decrypt records in the audit writer's chain,
/// whose payloads then no longer name it; a hold set on the tenant afterwards still
/// stops the scheduled pruning of that chain before them (the offboarding keeps
/// their seqs). Without that, the prune went past them (or was refused whole).
#[test]
fn scheduled_ledger_pruning_stops_at_a_held_tenants_erased_records() {
    let (cl, mut c) = pgseal_tests::sealed_tokens_cluster("daemon-prune-erased", &["acme", "beta"]);
    // beta's decrypt, then acme's, each while its own transaction holds its chain:
    // their starts go to _pgseal_audit, in that order.
    let mut app = cl.connect_as("app");
    for t in ["beta", "acme"] {
        app.batch_execute(&format!(
            "BEGIN; SELECT pgseal.set_tenant('{t}'); SELECT pgseal.ledger_append('app.note');
             SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations
              WHERE tenant_id = '{t}'; COMMIT"
        ))
        .unwrap();
    }
    let of = |c: &mut postgres::Client, t: &str| {
        count(
            c,
            &format!(
                "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = '_pgseal_audit' \
                   AND payload ->> 'tenant' = '{t}'"
            ),
        )
    };
    assert_eq!((of(&mut c, "beta"), of(&mut c, "acme")), (1, 1));
    c.batch_execute("SELECT pgseal.tenant_offboard('acme', '0')")
        .unwrap();
    let dir = pgseal_tests::fresh_dir("daemon-prune-erased-files");
    let (code, out) = Pgseald::new(["offboard", "run", "--export-dir"])
        .args([dir.to_str().unwrap()])
        .on(&cl)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant acme: done"), "{out}");
    assert_eq!(of(&mut c, "acme"), 0, "erased");
    let erased = "SELECT count(*) FROM pgseal.ledger l, pgseal.tenant_offboardings o \
                   WHERE o.tenant_id = 'acme' AND l.tenant_id = '_pgseal_audit' \
                     AND l.seq = ANY (o.audit_erased) AND l.payload IS NULL";
    assert_eq!(count(&mut c, erased), 1);
    c.batch_execute("SELECT pgseal.retention_hold('acme', true)")
        .unwrap();
    let d = pruning_daemon(&cl, &dir);
    // beta's record, before acme's, goes; acme's erased one stays.
    wait_for("beta's record to be pruned", 20, || of(&mut c, "beta") == 0);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&mut c, erased), 1, "{}", d.log());
    assert!(!d.log().contains("ledger not pruned"), "{}", d.log());
}
