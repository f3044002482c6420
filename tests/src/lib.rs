//! Harness for out-of-process tests: each test starts its own throwaway cluster
//! through `scripts/cluster.sh` on its own port, and stops it when dropped.
//! The extension must already be installed (`make test` does that first).

use std::path::{Path, PathBuf};
use std::process::Command;

pub const KEY_V1: &str = "1:4f1c2a9e8d7b6a5948372615f4e3d2c1b0a99887766554433221100ffeeddcc0";
pub const KEY_V2: &str = "2:a1b2c3d4e5f60718293a4b5c6d7e8f90112233445566778899aabbccddeeff00";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The PostgreSQL major version the clusters run: `PGSEAL_PG` (15 or 18; 15 when
/// unset), as `scripts/cluster.sh` reads it.
pub fn pg_major() -> u32 {
    match std::env::var("PGSEAL_PG").as_deref() {
        Err(_) | Ok("") | Ok("15") => 15,
        Ok("18") => 18,
        Ok(v) => panic!("PGSEAL_PG={v}: pgseal builds for PostgreSQL 15 and 18"),
    }
}

/// That version's bin directory (pg_ctl, pg_dump, pg_basebackup...), from
/// `scripts/pg.sh`, the one place that knows where each version lives.
pub fn pg_bindir() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/pg.sh"))
        .args(["bindir", &pg_major().to_string()])
        .output()
        .expect("run scripts/pg.sh");
    assert!(out.status.success(), "scripts/pg.sh bindir failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Whether that version's server was built with TLS (`--with-ssl=openssl`).
/// Debian's 15 was; the PostgreSQL 18 wheel was not.
pub fn pg_has_ssl() -> bool {
    let out = Command::new(pg_bindir().join("pg_config"))
        .arg("--configure")
        .output()
        .expect("run pg_config --configure");
    let flags = String::from_utf8_lossy(&out.stdout);
    flags.contains("--with-ssl=openssl") || flags.contains("--with-openssl")
}

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
}

impl Cluster {
    /// Starts a cluster whose key command prints `keys`, with extra conf lines.
    pub fn start(name: &str, port: u16, keys: &[&str], conf: &[&str]) -> Cluster {
        let dir = PathBuf::from(format!("/var/tmp/pgseal-it/{name}"));
        std::fs::create_dir_all("/var/tmp/pgseal-it").unwrap();
        let keyfile = PathBuf::from(format!("/var/tmp/pgseal-it/{name}.keys"));
        std::fs::write(&keyfile, keys.join("\n") + "\n").unwrap();
        let c = Cluster { dir, port };
        c.script(
            &[
                "start",
                c.dir.to_str().unwrap(),
                &port.to_string(),
                keyfile.to_str().unwrap(),
            ],
            conf,
        );
        std::fs::remove_file(&keyfile).ok();
        c
    }

    /// Starts a cluster with no key command whose postmaster finds `hex` (64 hex
    /// characters, master key version 1) in `PGSEAL_MASTER_KEY`.
    pub fn start_env_key(name: &str, port: u16, hex: &str, conf: &[&str]) -> Cluster {
        std::fs::create_dir_all("/var/tmp/pgseal-it").unwrap();
        let c = Cluster {
            dir: PathBuf::from(format!("/var/tmp/pgseal-it/{name}")),
            port,
        };
        let key = format!("env:{hex}");
        c.script(
            &["start", c.dir.to_str().unwrap(), &port.to_string(), &key],
            conf,
        );
        c
    }

    /// The postmaster's process id: the first line of `postmaster.pid`.
    pub fn postmaster_pid(&self) -> u32 {
        let pidfile = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).unwrap();
        pidfile.lines().next().unwrap().trim().parse().unwrap()
    }

    fn script(&self, args: &[&str], extra: &[&str]) {
        let st = Command::new("bash")
            .arg(repo_root().join("scripts/cluster.sh"))
            .args(args)
            .args(extra)
            .status()
            .expect("run cluster.sh");
        assert!(
            st.success(),
            "cluster.sh {args:?} failed; see {}/server.log",
            self.dir.display()
        );
    }

    /// Replaces the key file the server reads at its next start.
    pub fn set_keys(&self, keys: &[&str]) {
        std::fs::write(self.dir.join("master.keys"), keys.join("\n") + "\n").unwrap();
    }

    pub fn restart(&self) {
        self.script(&["restart", self.dir.to_str().unwrap()], &[]);
    }

    /// kill -9 of the postmaster.
    pub fn crash(&self) {
        self.script(&["crash", self.dir.to_str().unwrap()], &[]);
    }

    /// Starts the cluster again after `crash`.
    pub fn resume(&self) {
        self.script(&["resume", self.dir.to_str().unwrap()], &[]);
    }

    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    pub fn connect(&self) -> postgres::Client {
        postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                self.port
            ),
            postgres::NoTls,
        )
        .expect("connect to test cluster")
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_root().join("scripts/cluster.sh"))
            .args(["stop", self.dir.to_str().unwrap()])
            .status();
    }
}

/// The SQLSTATE of an error, or "00000" for success.
pub fn sqlstate<T>(r: Result<T, postgres::Error>) -> String {
    match r {
        Ok(_) => "00000".into(),
        Err(e) => e
            .code()
            .map(|c| c.code().to_owned())
            .unwrap_or_else(|| format!("no sqlstate: {e}")),
    }
}

/// Whether an error is a retryable serialization failure or deadlock.
pub fn is_retryable(e: &postgres::Error) -> bool {
    matches!(e.code().map(|c| c.code()), Some("40001") | Some("40P01"))
}

/// Calls `pgseal.kek_rewrap(7)` until it returns 0; returns how many keys moved.
pub fn kek_rewrap_until_done(c: &mut postgres::Client) -> i64 {
    let mut total = 0i64;
    loop {
        let n: i32 = c
            .query_one("SELECT pgseal.kek_rewrap(7)", &[])
            .unwrap()
            .get(0);
        if n == 0 {
            return total;
        }
        total += i64::from(n);
    }
}

/// (chain, seq, db_role, payload) of every ledger entry of `event`, oldest first.
pub fn ledger_entries(
    c: &mut postgres::Client,
    event: &str,
) -> Vec<(String, i64, Option<String>, serde_json::Value)> {
    c.query(
        "SELECT tenant_id, seq, db_role, payload FROM pgseal.ledger WHERE event = $1 ORDER BY recorded_at, seq",
        &[&event],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}
