//! Harness for out-of-process tests: each test starts its own throwaway cluster
//! through `scripts/cluster.sh` on a port of its own (`free_port`), stops it when
//! dropped, and runs pgseald through `Pgseald`.
//! The extension must already be installed (`make test` does that first).

pub mod citus;
pub mod matrix;

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

/// Where the clusters, their key files and the tests' other files live: outside the
/// root-owned checkout, as `scripts/cluster.sh` requires.
pub const IT_DIR: &str = "/var/tmp/pgseal-it";

/// A fresh, empty directory `name` under `IT_DIR` (a test's pgseald config, logs,
/// checkpoints, exports), emptied first if an earlier run left it.
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = Path::new(IT_DIR).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Server settings that make every session log the plan of every statement it
/// runs, pgseal's own included (`Cluster::start`'s conf; `logged_plans` reads them).
pub const LOG_EVERY_PLAN: [&str; 3] = [
    "session_preload_libraries = 'auto_explain'",
    "auto_explain.log_min_duration = 0",
    "auto_explain.log_nested_statements = on",
];

/// The plans `LOG_EVERY_PLAN` wrote to `log` whose text (query and plan) contains
/// every one of `needles`: each plan is its LOG line's continuation, the lines that
/// start with a tab.
pub fn logged_plans(log: &str, needles: &[&str]) -> Vec<String> {
    let mut plans: Vec<String> = Vec::new();
    for line in log.lines() {
        if line.contains("plan:") {
            plans.push(String::new());
        } else if let (Some(p), true) = (plans.last_mut(), line.starts_with('\t')) {
            p.push_str(line);
            p.push('\n');
        }
    }
    plans
        .into_iter()
        .filter(|p| needles.iter().all(|n| p.contains(n)))
        .collect()
}

/// Fails unless `plan` reads `table` by a TID scan and no table by any other scan
/// of a table (sequential, index, bitmap).
pub fn assert_tid_scan(plan: &str, table: &str) {
    assert!(
        plan.contains(&format!("Tid Scan on {table}"))
            && !plan.contains("Index Scan")
            && !plan.contains("Bitmap")
            && !plan.contains("Seq Scan"),
        "a batch's delete is not a TID scan of its places:\n{}",
        plan.lines()
            .filter(|l| l.contains("Scan") || l.contains("Delete on"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The unprivileged OS user the servers run as (`PGSEAL_TEST_USER`, as
/// `scripts/cluster.sh` reads it).
pub fn test_user() -> String {
    std::env::var("PGSEAL_TEST_USER").unwrap_or_else(|_| "pgseal-test".into())
}

/// The ports `free_port` hands out: below Linux's default ephemeral range (32768 and
/// up, net.ipv4.ip_local_port_range), so no outgoing connection takes one between
/// the choice and the server's bind, and apart from the fixed ports of the demo
/// (54390) and the benchmark (54395).
const TEST_PORTS: std::ops::Range<u16> = 21000..23000;

/// A TCP port for a server of a test: nothing listens on 127.0.0.1 at it, no
/// PostgreSQL has a socket or lock file for it in the default socket directories, and
/// no other caller has it, in this test binary or in any other running at the same
/// time. The claim is an exclusive `flock` on `IT_DIR/ports/<port>`, held until this
/// process exits (the kernel releases it then, even after a crash).
pub fn free_port() -> u16 {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = Path::new(IT_DIR).join("ports");
    std::fs::create_dir_all(&dir).unwrap();
    for port in TEST_PORTS {
        let claim = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .unwrap_or_else(|e| panic!("open {}/{port}: {e}", dir.display()));
        match claim.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => continue,
            Err(std::fs::TryLockError::Error(e)) => panic!("lock {}/{port}: {e}", dir.display()),
        }
        let socket_of_another_server = ["/tmp", "/var/run/postgresql"].iter().any(|d| {
            let sock = Path::new(d).join(format!(".s.PGSQL.{port}"));
            sock.exists() || Path::new(d).join(format!(".s.PGSQL.{port}.lock")).exists()
        });
        if socket_of_another_server || std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue; // the claim is dropped, and with it the lock
        }
        HELD.lock().unwrap().push(claim);
        return port;
    }
    panic!("no free port left in {TEST_PORTS:?}");
}

/// A throwaway cluster run by `scripts/cluster.sh` on a port of its own
/// (`free_port`), in `IT_DIR/<name>`; stopped when dropped.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    /// Another installation's bin directory (`PGSEAL_PG_BINDIR`), or None for the
    /// PostgreSQL under test.
    bindir: Option<PathBuf>,
}

/// How `Cluster::with` starts a cluster: by default with the key command printing
/// `KEY_V1`, no extra configuration, and the PostgreSQL under test.
pub struct ClusterOptions {
    name: String,
    keys: Vec<String>,
    env_key: Option<String>,
    conf: Vec<String>,
    bindir: Option<PathBuf>,
}

impl ClusterOptions {
    /// The lines the key command prints.
    pub fn keys(mut self, keys: &[&str]) -> Self {
        self.keys = keys.iter().map(|k| k.to_string()).collect();
        self
    }

    /// No key command: the postmaster finds `hex` (64 hex characters, master key
    /// version 1) in `PGSEAL_MASTER_KEY`.
    pub fn env_key(mut self, hex: &str) -> Self {
        self.env_key = Some(hex.into());
        self
    }

    /// Extra postgresql.conf lines.
    pub fn conf(mut self, conf: &[&str]) -> Self {
        self.conf = conf.iter().map(|l| l.to_string()).collect();
        self
    }

    /// Runs another installation's programs (a private copy of PostgreSQL that a
    /// test installs an older release into) instead of the one under test.
    pub fn bindir(mut self, bindir: &Path) -> Self {
        self.bindir = Some(bindir.into());
        self
    }

    pub fn start(self) -> Cluster {
        std::fs::create_dir_all(IT_DIR).unwrap();
        let c = Cluster {
            dir: Path::new(IT_DIR).join(&self.name),
            port: free_port(),
            bindir: self.bindir,
        };
        let keyfile = Path::new(IT_DIR).join(format!("{}.keys", self.name));
        let key_arg = match &self.env_key {
            Some(hex) => format!("env:{hex}"),
            None => {
                std::fs::write(&keyfile, self.keys.join("\n") + "\n").unwrap();
                keyfile.to_str().unwrap().to_owned()
            }
        };
        let port = c.port.to_string();
        let mut args = vec!["start", c.dir.to_str().unwrap(), &port, &key_arg];
        args.extend(self.conf.iter().map(String::as_str));
        c.script(&args);
        if self.env_key.is_none() {
            std::fs::remove_file(&keyfile).ok();
        }
        c
    }
}

impl Cluster {
    /// Options for a cluster named `name` (unique among the tests), to `start`.
    pub fn with(name: &str) -> ClusterOptions {
        ClusterOptions {
            name: name.into(),
            keys: vec![KEY_V1.into()],
            env_key: None,
            conf: Vec::new(),
            bindir: None,
        }
    }

    /// Starts a cluster whose key command prints `keys`, with extra conf lines.
    pub fn start(name: &str, keys: &[&str], conf: &[&str]) -> Cluster {
        Cluster::with(name).keys(keys).conf(conf).start()
    }

    /// Starts a cluster with no key command whose postmaster finds `hex` (64 hex
    /// characters, master key version 1) in `PGSEAL_MASTER_KEY`.
    pub fn start_env_key(name: &str, hex: &str, conf: &[&str]) -> Cluster {
        Cluster::with(name).env_key(hex).conf(conf).start()
    }

    /// The postmaster's process id: the first line of `postmaster.pid`.
    pub fn postmaster_pid(&self) -> u32 {
        let pidfile = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).unwrap();
        pidfile.lines().next().unwrap().trim().parse().unwrap()
    }

    /// `scripts/cluster.sh <args>`, with this cluster's installation.
    fn cluster_sh(&self, args: &[&str]) -> std::io::Result<std::process::ExitStatus> {
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("scripts/cluster.sh")).args(args);
        if let Some(bindir) = &self.bindir {
            cmd.env("PGSEAL_PG_BINDIR", bindir);
        }
        cmd.status()
    }

    fn script(&self, args: &[&str]) {
        let st = self.cluster_sh(args).expect("run cluster.sh");
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
        self.script(&["restart", self.dir.to_str().unwrap()]);
    }

    /// A clean shutdown; `resume` starts the cluster again.
    pub fn stop(&self) {
        self.script(&["stop", self.dir.to_str().unwrap()]);
    }

    /// kill -9 of the postmaster.
    pub fn crash(&self) {
        self.script(&["crash", self.dir.to_str().unwrap()]);
    }

    /// Starts the cluster again after `crash` or `stop`.
    pub fn resume(&self) {
        self.script(&["resume", self.dir.to_str().unwrap()]);
    }

    /// The libpq connection string of the superuser `postgres` to the database
    /// `postgres`.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// `url()` as a client configuration, for a caller to change (user, database,
    /// options, a notice callback) before connecting.
    pub fn config(&self) -> postgres::Config {
        self.url().parse().unwrap()
    }

    pub fn connect(&self) -> postgres::Client {
        self.connect_to("postgres", "postgres")
    }

    /// A session of `user` in the database `postgres`.
    pub fn connect_as(&self, user: &str) -> postgres::Client {
        self.connect_to("postgres", user)
    }

    /// A session of `user` in the database `db`.
    pub fn connect_to(&self, db: &str, user: &str) -> postgres::Client {
        self.config()
            .dbname(db)
            .user(user)
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| {
                panic!(
                    "connect to test cluster {} as {user}, database {db}: {e}",
                    self.dir.display()
                )
            })
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.cluster_sh(&["stop", self.dir.to_str().unwrap()]);
    }
}

/// The pgseald binary, as `make daemon` (which `make test` runs first) builds it.
pub fn pgseald_bin() -> PathBuf {
    repo_root().join("target/debug/pgseald")
}

/// One run of pgseald: `Pgseald::new(["ledger", "verify", ...])`, optionally
/// `.on(&cluster)`, then `.run()`, `.output()` or `.spawn(stderr)`. It inherits no
/// `PGSEALD_*` variable from the test's environment, so only what a test sets
/// reaches it.
pub struct Pgseald(Command);

impl Pgseald {
    pub fn new<I, S>(args: I) -> Pgseald
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(pgseald_bin());
        cmd.args(args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PGSEALD_") {
                cmd.env_remove(k);
            }
        }
        Pgseald(cmd)
    }

    /// `pgseald ledger verify --file` of an export (one JSON entry a line) against a
    /// checkpoints file and the checkpoint public key: no database.
    pub fn ledger_verify_file(export: &Path, checkpoints: &Path, public_key: &str) -> Pgseald {
        Pgseald::new(["ledger", "verify", "--file"])
            .args([export, Path::new("--checkpoints"), checkpoints])
            .args(["--public-key", public_key])
    }

    pub fn args<I, S>(mut self, args: I) -> Pgseald
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.0.args(args);
        self
    }

    /// Sets an environment variable for it (a test's `PGSEALD_FAILPOINT`).
    pub fn env(mut self, key: &str, value: &str) -> Pgseald {
        self.0.env(key, value);
        self
    }

    /// Connects to `cluster` (its `url()`) through `PGSEALD_DATABASE_URL`.
    pub fn on(mut self, cluster: &Cluster) -> Pgseald {
        self.0.env("PGSEALD_DATABASE_URL", cluster.url());
        self
    }

    /// Runs it to the end: its exit code and what it wrote, stdout then stderr.
    pub fn run(self) -> (Option<i32>, String) {
        let out = self.output();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// Runs it to the end, its stdout and stderr apart.
    pub fn output(mut self) -> std::process::Output {
        self.0.output().expect(PGSEALD_MISSING)
    }

    /// Starts it in the background, stdout discarded and stderr to `stderr`.
    pub fn spawn(mut self, stderr: impl Into<std::process::Stdio>) -> std::process::Child {
        self.0
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect(PGSEALD_MISSING)
    }
}

const PGSEALD_MISSING: &str = "pgseald is built by `make test` (make daemon) before these tests";

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

/// Polls `f` every 200 ms until it is true; panics, naming `what`, after `secs`.
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("timed out after {secs} s waiting for {what}");
}

/// The one bigint `sql` returns (a count).
pub fn count(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// Starts cluster `name` with pgseal, a role `app` that may decrypt and append,
/// and a table `integrations (id, tenant_id, token)` that `app` may read, its
/// token column registered as sealed, holding one token sealed for each of
/// `tenants` (ids 1, 2, … in that order); returns it with a superuser connection.
pub fn sealed_tokens_cluster(name: &str, tenants: &[&str]) -> (Cluster, postgres::Client) {
    let cl = Cluster::start(name, &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE ROLE app LOGIN;
         GRANT pgseal_decrypt, pgseal_ledger TO app;
         CREATE TABLE integrations (id int PRIMARY KEY, tenant_id text NOT NULL, token text);
         GRANT SELECT ON integrations TO app;
         SELECT pgseal.vault_register_column('integrations', 'token');",
    )
    .unwrap();
    for (i, t) in tenants.iter().enumerate() {
        c.batch_execute(&format!(
            "SET app.tenant_id = '{t}';
             INSERT INTO integrations VALUES ({}, '{t}', pgseal.vault_seal('{t}-tok', 'integrations.token'));
             RESET app.tenant_id;",
            i + 1
        ))
        .unwrap();
    }
    (cl, c)
}

/// The rows of `tenant` in `tables`, together.
pub fn tenant_rows(c: &mut postgres::Client, tables: &[&str], tenant: &str) -> i64 {
    tables
        .iter()
        .map(|t| {
            c.query_one(
                &format!("SELECT count(*) FROM {t} WHERE tenant_id = $1"),
                &[&tenant],
            )
            .unwrap()
            .get::<_, i64>(0)
        })
        .sum()
}

/// The payload of `tenant`'s `tenant.offboarded` receipt.
pub fn offboarded_receipt(c: &mut postgres::Client, tenant: &str) -> serde_json::Value {
    c.query_one(
        "SELECT payload FROM pgseal.ledger WHERE tenant_id = $1 AND event = 'tenant.offboarded'",
        &[&tenant],
    )
    .unwrap()
    .get(0)
}

/// The rows of an offboarding's export file, by the table each names.
pub fn exported_per_table(export: &str) -> std::collections::BTreeMap<String, usize> {
    let mut per = std::collections::BTreeMap::new();
    for line in export.lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(t) = line["table"].as_str() {
            *per.entry(t.to_owned()).or_default() += 1;
        }
    }
    per
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Ports handed out at once are distinct, free, and claimed against other
    /// processes too (flock(1) cannot take a claim this process holds).
    #[test]
    fn free_ports_are_distinct_free_and_claimed() {
        let threads: Vec<_> = (0..8)
            .map(|_| std::thread::spawn(|| (0..4).map(|_| free_port()).collect::<Vec<_>>()))
            .collect();
        let mut ports: Vec<u16> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        ports.sort_unstable();
        let n = ports.len();
        ports.dedup();
        assert_eq!(ports.len(), n, "a port was handed out twice: {ports:?}");
        for p in ports {
            assert!(std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
            let claim = Path::new(IT_DIR).join("ports").join(p.to_string());
            let st = Command::new("flock")
                .args(["-n", claim.to_str().unwrap(), "true"])
                .status()
                .unwrap();
            assert!(
                !st.success(),
                "port {p} is not claimed against other processes"
            );
        }
    }
}
