//! `pgseald run` against a real cluster: one leader among two daemons, failover after
//! kill -9 of the leader, recovery after a Postgres restart, scheduled jobs recorded
//! in pgseal.job_runs, checkpoints written outside the database, and a clean exit 0
//! on SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pgseal_tests::{count, free_port, Cluster, Pgseald, KEY_V1};

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

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {secs} s waiting for {what}");
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
    let dir = Path::new(pgseal_tests::IT_DIR).join("daemon-run-files");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
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
