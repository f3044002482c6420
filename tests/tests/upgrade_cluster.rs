//! Versioned upgrades (issue 15): every released version (extension/sql/RELEASES)
//! upgrades with `ALTER EXTENSION pgseal UPDATE` to the current one, keeps its data,
//! and ends up with the schema of a fresh install.
//!
//! Without a cluster (every PostgreSQL version): the frozen install scripts in
//! extension/sql/ have the sha256 RELEASES gives, and a chain of upgrade scripts
//! leads from every release to the version in Cargo.toml. With a cluster
//! (PostgreSQL 15, the only version a release so far was built for): the release is
//! built from its commit (scripts/release_build.sh, cached), installed into a private
//! copy of PostgreSQL, used as its users used it (sealed values under two data keys
//! of one tenant, concurrent ledger appends, an audited table, checkpoints,
//! protected tables, organisations, retention rules, decrypts), then the current
//! build replaces it, the server restarts and the extension is updated. Every value
//! still decrypts, every chain and old checkpoint verifies (online, and offline with
//! pgseald), new entries are format 2 and extend the old chains, and the catalog
//! (tests/sql/catalog_dump.sql) equals a fresh install's in another database.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use pgseal_tests::{pg_bindir, pg_major, repo_root, sqlstate, Cluster, Pgseald, KEY_V1};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------
// Releases, versions and upgrade scripts
// ---------------------------------------------------------------------------------

struct Release {
    version: String,
    commit: String,
    sha256: String,
}

fn sql_dir() -> PathBuf {
    repo_root().join("extension/sql")
}

/// The lines of extension/sql/RELEASES: `<version> <commit> <sha256>`.
fn releases() -> Vec<Release> {
    let text = std::fs::read_to_string(sql_dir().join("RELEASES")).expect("read RELEASES");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(
                f.len(),
                3,
                "RELEASES line {l:?}: expected version, commit, sha256"
            );
            assert!(
                f[1].len() == 40 && f[1].chars().all(|c| c.is_ascii_hexdigit()),
                "RELEASES line {l:?}: commit"
            );
            assert!(
                f[2].len() == 64 && f[2].chars().all(|c| c.is_ascii_hexdigit()),
                "RELEASES line {l:?}: sha256"
            );
            Release {
                version: f[0].into(),
                commit: f[1].into(),
                sha256: f[2].into(),
            }
        })
        .collect()
}

/// The workspace version (Cargo.toml, `[workspace.package]`): what pgrx names the
/// install script and the control file's default_version.
fn current_version() -> String {
    let toml = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let mut in_pkg = false;
    for line in toml.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_pkg = t == "[workspace.package]";
        } else if in_pkg && t.starts_with("version") {
            return t
                .split('"')
                .nth(1)
                .expect("version = \"x.y.z\"")
                .to_string();
        }
    }
    panic!("no version in [workspace.package] of Cargo.toml");
}

fn semver(v: &str) -> (u64, u64, u64) {
    let p: Vec<u64> = v
        .split('.')
        .map(|x| {
            x.parse()
                .unwrap_or_else(|_| panic!("version {v:?} is not x.y.z"))
        })
        .collect();
    assert_eq!(p.len(), 3, "version {v:?} is not x.y.z");
    (p[0], p[1], p[2])
}

fn sha256_file(p: &Path) -> String {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The files of extension/sql/ named `pgseal--A.sql` (install scripts) and
/// `pgseal--A--B.sql` (upgrade scripts).
fn sql_files() -> (Vec<String>, Vec<(String, String)>) {
    let mut installs = Vec::new();
    let mut upgrades = Vec::new();
    for e in std::fs::read_dir(sql_dir()).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        let Some(stem) = name
            .strip_prefix("pgseal--")
            .and_then(|s| s.strip_suffix(".sql"))
        else {
            continue;
        };
        match stem.split_once("--") {
            Some((a, b)) => upgrades.push((a.to_string(), b.to_string())),
            None => installs.push(stem.to_string()),
        }
    }
    (installs, upgrades)
}

/// The versions `ALTER EXTENSION ... UPDATE` passes through from `from` to `to`
/// along the given upgrade scripts (shortest path, as PostgreSQL picks), or None.
fn upgrade_path(edges: &[(String, String)], from: &str, to: &str) -> Option<Vec<String>> {
    let mut prev: HashMap<String, String> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([from.to_string()]);
    let mut seen = std::collections::HashSet::from([from.to_string()]);
    while let Some(v) = queue.pop_front() {
        if v == to {
            let mut path = vec![v.clone()];
            let mut cur = v;
            while let Some(p) = prev.get(&cur) {
                path.push(p.clone());
                cur = p.clone();
            }
            path.reverse();
            return Some(path);
        }
        for (a, b) in edges {
            if *a == v && seen.insert(b.clone()) {
                prev.insert(b.clone(), v.clone());
                queue.push_back(b.clone());
            }
        }
    }
    None
}

#[test]
fn frozen_install_scripts_match_releases() {
    let rel = releases();
    assert!(!rel.is_empty(), "RELEASES lists no release");
    let cur = current_version();
    let mut last = (0, 0, 0);
    for r in &rel {
        let v = semver(&r.version);
        assert!(
            v > last,
            "RELEASES must list versions in increasing order ({})",
            r.version
        );
        last = v;
        assert!(
            v <= semver(&cur),
            "release {} is newer than Cargo.toml's {cur}",
            r.version
        );
        let frozen = sql_dir().join(format!("pgseal--{}.sql", r.version));
        assert!(
            frozen.exists(),
            "{} is released but {} is missing",
            r.version,
            frozen.display()
        );
        let got = sha256_file(&frozen);
        assert_eq!(
            got,
            r.sha256,
            "{} changed: released install scripts are frozen (RELEASES has its sha256, commit {})",
            frozen.display(),
            r.commit
        );
    }
    let (installs, _) = sql_files();
    for v in installs {
        assert!(
            rel.iter().any(|r| r.version == v),
            "extension/sql/pgseal--{v}.sql is not a release in RELEASES"
        );
    }
}

#[test]
fn every_release_has_an_upgrade_path_to_the_current_version() {
    // The path finder finds what is there and nothing else.
    let e = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(upgrade_path(&[], "0.1.0", "0.2.0"), None);
    assert_eq!(upgrade_path(&[e("0.2.0", "0.3.0")], "0.1.0", "0.3.0"), None);
    assert_eq!(
        upgrade_path(
            &[e("0.2.0", "0.3.0"), e("0.1.0", "0.2.0")],
            "0.1.0",
            "0.3.0"
        ),
        Some(vec!["0.1.0".into(), "0.2.0".into(), "0.3.0".into()])
    );

    let cur = current_version();
    let rel = releases();
    let (_, upgrades) = sql_files();
    let known = |v: &str| v == cur || rel.iter().any(|r| r.version == v);
    for (a, b) in &upgrades {
        assert!(
            known(a) && known(b) && semver(a) < semver(b),
            "pgseal--{a}--{b}.sql: an upgrade script goes from a release to a later release or to {cur}"
        );
    }
    for r in &rel {
        assert!(
            upgrade_path(&upgrades, &r.version, &cur).is_some(),
            "no chain of extension/sql/pgseal--A--B.sql files leads from release {} to {cur}: \
             a new version needs an upgrade script from the previous one (empty if the SQL did not change)",
            r.version
        );
    }
}

// ---------------------------------------------------------------------------------
// A private PostgreSQL installation and a cluster that runs it
// ---------------------------------------------------------------------------------

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn pg_config(bindir: &Path, what: &str) -> PathBuf {
    PathBuf::from(sh(Command::new(bindir.join("pg_config")).arg(what)).trim())
}

/// A copy of the PostgreSQL under test (its bin, lib and share trees at the same
/// relative places, under `root`), into which a test installs any pgseal build
/// without touching the system's directories.
struct PgCopy {
    bindir: PathBuf,
    pkglibdir: PathBuf,
    extdir: PathBuf,
}

impl PgCopy {
    fn make(root: &Path) -> PgCopy {
        let sys_bin = pg_bindir();
        let sys_lib = pg_config(&sys_bin, "--pkglibdir");
        let sys_share = pg_config(&sys_bin, "--sharedir");
        let _ = std::fs::remove_dir_all(root);
        let mut copied: Vec<PathBuf> = Vec::new();
        for src in [
            sys_bin.parent().unwrap().to_path_buf(),
            sys_lib.clone(),
            sys_share.clone(),
        ] {
            if copied.iter().any(|c| src.starts_with(c)) {
                continue;
            }
            let dst = root.join(src.strip_prefix("/").unwrap());
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            sh(Command::new("cp").arg("-a").arg(&src).arg(&dst));
            copied.push(src);
        }
        let under = |p: &Path| root.join(p.strip_prefix("/").unwrap());
        let copy = PgCopy {
            bindir: under(&sys_bin),
            pkglibdir: under(&sys_lib),
            extdir: under(&sys_share).join("extension"),
        };
        // The copy finds its own lib and share directories (PostgreSQL computes them
        // relative to its binaries), not the system's.
        assert_eq!(
            pg_config(&copy.bindir, "--pkglibdir"),
            copy.pkglibdir,
            "the PostgreSQL copy is not relocatable"
        );
        assert_eq!(
            pg_config(&copy.bindir, "--sharedir").join("extension"),
            copy.extdir
        );
        copy.remove_pgseal();
        copy
    }

    fn remove_pgseal(&self) {
        let _ = std::fs::remove_file(self.pkglibdir.join("pgseal.so"));
        for e in std::fs::read_dir(&self.extdir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            if name == "pgseal.control" || name.starts_with("pgseal--") {
                std::fs::remove_file(p).unwrap();
            }
        }
    }

    /// Installs pgseal.so and the given extension files (control, scripts).
    fn install(&self, so: &Path, ext_files: &[PathBuf]) {
        self.remove_pgseal();
        std::fs::copy(so, self.pkglibdir.join("pgseal.so")).unwrap();
        for f in ext_files {
            std::fs::copy(f, self.extdir.join(f.file_name().unwrap())).unwrap();
        }
    }
}

type Notices = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// A session of the superuser whose notices and warnings are kept ("SEVERITY:
/// message HINT: hint").
fn connect_notices(cl: &Cluster) -> (postgres::Client, Notices) {
    let seen = Notices::default();
    let keep = seen.clone();
    let c = cl
        .config()
        .notice_callback(move |n: postgres::error::DbError| {
            keep.lock().unwrap().push(format!(
                "{}: {} HINT: {}",
                n.severity(),
                n.message(),
                n.hint().unwrap_or("")
            ))
        })
        .connect(postgres::NoTls)
        .expect("connect to the upgrade test cluster");
    (c, seen)
}

// ---------------------------------------------------------------------------------
// The catalog comparison
// ---------------------------------------------------------------------------------

fn catalog_dump(c: &mut impl postgres::GenericClient) -> Vec<String> {
    let sql = std::fs::read_to_string(repo_root().join("tests/sql/catalog_dump.sql")).unwrap();
    let rows = c
        .query(sql.as_str(), &[])
        .expect("run tests/sql/catalog_dump.sql");
    let lines: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert!(
        lines.len() > 100,
        "the catalog dump found almost nothing: {} lines",
        lines.len()
    );
    lines
}

/// The lines only one side has, as a readable diff; empty when the dumps are equal.
fn line_diff(fresh: &[String], upgraded: &[String]) -> String {
    let mut count: BTreeMap<&str, i64> = BTreeMap::new();
    for l in fresh {
        *count.entry(l.as_str()).or_default() += 1;
    }
    for l in upgraded {
        *count.entry(l.as_str()).or_default() -= 1;
    }
    let mut out = String::new();
    for (l, n) in count {
        if n > 0 {
            out += &format!("- fresh only:    {l}\n");
        } else if n < 0 {
            out += &format!("+ upgraded only: {l}\n");
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// What a release's users did
// ---------------------------------------------------------------------------------

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];

/// (id, tenant, plaintext) of every sealed value. The plaintexts exist only here
/// and in the database; no assertion message prints one.
type Sealed = Vec<(i32, String, String)>;

fn seal(c: &mut postgres::Client, sealed: &mut Sealed, tenant: &str, n: usize) {
    for _ in 0..n {
        let id = sealed.len() as i32 + 1;
        let plain = format!(
            "sk-{tenant}-{id}-{:016x}",
            (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        );
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])
            .unwrap();
        tx.execute(
            "INSERT INTO secrets VALUES ($1, $2, pgseal.vault_seal($3, 'secrets.token'))",
            &[&id, &tenant, &plain],
        )
        .unwrap();
        tx.commit().unwrap();
        sealed.push((id, tenant.into(), plain));
    }
}

/// Decrypts every sealed value in its tenant's context; returns how many matched.
fn decrypt_all(c: &mut postgres::Client, sealed: &Sealed) -> usize {
    let mut ok = 0;
    for tenant in TENANTS {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])
            .unwrap();
        let rows = tx
            .query(
                "SELECT id, pgseal.vault_decrypt(token, 'secrets.token') FROM secrets WHERE tenant_id = $1 ORDER BY id",
                &[&tenant],
            )
            .unwrap_or_else(|e| panic!("decrypting {tenant}'s values failed: {:?}", e.code()));
        for r in rows {
            let id: i32 = r.get(0);
            let got: String = r.get(1);
            let want = &sealed.iter().find(|s| s.0 == id).unwrap().2;
            assert!(
                got == *want,
                "value {id} of {tenant} did not decrypt to what was sealed"
            );
            ok += 1;
        }
        tx.commit().unwrap();
    }
    ok
}

fn append(c: &mut postgres::Client, tenant: &str, event: &str, n: i32) {
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])
        .unwrap();
    tx.execute(
        "SELECT pgseal.ledger_append($1, jsonb_build_object('n', $2::int))",
        &[&event, &n],
    )
    .unwrap();
    tx.commit().unwrap();
}

/// Appends from four sessions at once, two of them to the same tenant.
fn concurrent_appends(cl: &Cluster, event: &'static str) {
    let threads: Vec<_> = [TENANTS[0], TENANTS[0], TENANTS[1], TENANTS[2]]
        .into_iter()
        .map(|tenant| {
            let mut c = cl.connect();
            std::thread::spawn(move || {
                for i in 0..10 {
                    append(&mut c, tenant, event, i);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("an appending session failed");
    }
}

/// Every chain (every tenant with a head) verifies; returns entries checked per chain.
fn verify_all(c: &mut postgres::Client) -> BTreeMap<String, i64> {
    let mut checked = BTreeMap::new();
    let rows = c
        .query(
            "SELECT h.tenant_id, v.ok, v.checked, v.first_bad_seq, v.problem
             FROM pgseal.ledger_heads h, pgseal.ledger_verify(h.tenant_id) v ORDER BY 1",
            &[],
        )
        .unwrap();
    assert!(
        rows.len() >= TENANTS.len(),
        "fewer chains than tenants: {}",
        rows.len()
    );
    for r in rows {
        let t: String = r.get(0);
        let ok: bool = r.get(1);
        assert!(
            ok,
            "chain {t} does not verify: first bad seq {:?}, {:?}",
            r.get::<_, Option<i64>>(3),
            r.get::<_, Option<String>>(4)
        );
        checked.insert(t, r.get(2));
    }
    checked
}

/// (tenant, seq) -> (hash, mac, fmt) of every ledger row; without `with_fmt` (a
/// release before the column existed) every row is format 1.
fn ledger_rows(
    c: &mut postgres::Client,
    with_fmt: bool,
) -> BTreeMap<(String, i64), (String, String, i16)> {
    let fmt = if with_fmt { "fmt" } else { "1::smallint" };
    c.query(
        &format!("SELECT tenant_id, seq, encode(hash, 'hex'), encode(mac, 'hex'), {fmt} FROM pgseal.ledger"),
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4))))
    .collect()
}

/// Every chain's export, one JSON object a line, in a file for pgseald.
fn export_all(c: &mut postgres::Client, path: &Path) {
    let lines: Vec<String> = c
        .query(
            "SELECT e::text FROM (SELECT tenant_id FROM pgseal.ledger_heads ORDER BY 1) h, pgseal.ledger_export(h.tenant_id) e",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// What 0.1.0's users had (the API every later release keeps): sealed values of two
/// tenants under two data keys of one, concurrent appends, an audited plain and an
/// audited partitioned table, protected tables, organisations, retention rules and
/// a legal hold, a registered sealed column, decrypts (each one a ledger entry).
fn use_release(c: &mut postgres::Client, cl: &Cluster, sealed: &mut Sealed) {
    c.batch_execute(
        "CREATE TABLE secrets (id int PRIMARY KEY, tenant_id text NOT NULL, token text NOT NULL);
         CREATE INDEX ON secrets (tenant_id);
         CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, status text);
         CREATE TABLE events (id int, tenant_id text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
                              PRIMARY KEY (tenant_id, id)) PARTITION BY LIST (tenant_id);
         CREATE TABLE events_acme PARTITION OF events FOR VALUES IN ('acme');
         CREATE TABLE events_globex PARTITION OF events FOR VALUES IN ('globex');
         CREATE TABLE invoices (id int PRIMARY KEY, tenant_id text NOT NULL, amount int);
         CREATE INDEX ON invoices (tenant_id);
         CREATE TABLE docs (id int PRIMARY KEY, tenant_id text NOT NULL, owner_id text, org_id text);
         CREATE INDEX ON docs (tenant_id);
         SELECT pgseal.ledger_audit('orders');
         SELECT pgseal.ledger_audit('events', '{INSERT,DELETE}');
         SELECT pgseal.tenant_protect('invoices');
         SELECT pgseal.org_protect('docs', 'owner_id', 'org_id');
         INSERT INTO pgseal.org_members VALUES ('acme', 'org1', 'alice', 'owner'), ('acme', 'org1', 'bob', 'member'),
                                               ('globex', 'org9', 'carol', 'owner');
         SELECT pgseal.retention_set('events', '90 days');
         SELECT pgseal.retention_set('events', '30 days', 'created_at', 'acme');
         SELECT pgseal.retention_hold('globex', true);
         SELECT pgseal.vault_register_column('secrets', 'token', 'secrets.token');",
    )
    .unwrap();
    seal(c, sealed, "acme", 3);
    seal(c, sealed, "globex", 3);
    c.execute("SELECT pgseal.tenant_key_rotate('acme')", &[])
        .unwrap();
    seal(c, sealed, "acme", 2);
    let keys: i64 = c
        .query_one("SELECT count(DISTINCT split_part(token, ':', 2)) FROM secrets WHERE tenant_id = 'acme'", &[])
        .unwrap()
        .get(0);
    assert_eq!(keys, 2, "acme's values are sealed under two data keys");
    concurrent_appends(cl, "order.status");
    for (i, tenant) in ["acme", "globex"].into_iter().enumerate() {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])
            .unwrap();
        let base = 10 * i as i32;
        tx.batch_execute(&format!(
            "INSERT INTO orders VALUES ({b1}, '{tenant}', 'new'), ({b2}, '{tenant}', 'new'), ({b3}, '{tenant}', 'new');
             UPDATE orders SET status = 'paid' WHERE id = {b1};
             DELETE FROM orders WHERE id = {b2};
             INSERT INTO events (id, tenant_id) VALUES (1, '{tenant}'), (2, '{tenant}');
             INSERT INTO invoices VALUES ({b1}, '{tenant}', 100);",
            b1 = base + 1, b2 = base + 2, b3 = base + 3
        ))
        .unwrap();
        tx.commit().unwrap();
    }
    assert_eq!(decrypt_all(c, sealed), sealed.len());
}

/// OIDs of the relations the 0.1.0 attacks below registered.
struct Legacy {
    view: u32,
    tenant_keys: u32,
    mine: u32,
    dropped: u32,
}

/// What roles other than the DBA could leave behind under 0.1.0 to break or abuse
/// the update (the security review of the 0.1.0 -> 0.2.0 script):
/// * F3: a member of pgseal_admin attaches a `pgseal_audit` trigger calling
///   `_audit_row` to a view (INSTEAD OF), and the DBA audits a partitioned table with
///   a foreign partition: neither can have the TRUNCATE trigger block 9 adds;
/// * F5: the same member, through 0.1.0's SECURITY DEFINER retention_set and
///   vault_register_column, registers a view, pgseal.tenant_keys, a table it may not
///   DELETE from or UPDATE, a column it then drops, a table it then drops.
fn legacy_0_1_0(c: &mut postgres::Client, cl: &Cluster) -> Legacy {
    c.batch_execute(
        "CREATE ROLE upg_nobody LOGIN;
         CREATE ROLE upg_admin LOGIN;
         -- Grants the update must carry over to the functions it drops and creates again.
         CREATE ROLE upg_app;
         GRANT EXECUTE ON FUNCTION pgseal.ledger_append(text, jsonb, text) TO upg_app;
         GRANT EXECUTE ON FUNCTION pgseal.ledger_verify(text, bigint, bigint) TO upg_app WITH GRANT OPTION;
         GRANT pgseal_admin TO upg_admin;
         GRANT CREATE ON SCHEMA public TO upg_admin;
         CREATE TABLE upg_not_mine (id int PRIMARY KEY, tenant_id text NOT NULL,
                                    created_at timestamptz NOT NULL DEFAULT now(), note text);
         GRANT SELECT ON upg_not_mine TO upg_admin;
         INSERT INTO upg_not_mine VALUES (1, 'acme', now() - interval '1 year', 'keep me');
         CREATE FOREIGN DATA WRAPPER upg_fdw;
         CREATE SERVER upg_nowhere FOREIGN DATA WRAPPER upg_fdw;
         CREATE TABLE feed (id int, tenant_id text NOT NULL) PARTITION BY LIST (tenant_id);
         CREATE TABLE feed_local PARTITION OF feed FOR VALUES IN ('acme');
         CREATE FOREIGN TABLE feed_remote PARTITION OF feed FOR VALUES IN ('globex') SERVER upg_nowhere;
         SELECT pgseal.ledger_audit('feed');",
    )
    .unwrap();
    let mut a = cl.connect_as("upg_admin");
    a.batch_execute(
        "CREATE TABLE upg_mine (id int PRIMARY KEY, tenant_id text NOT NULL,
                                created_at timestamptz NOT NULL DEFAULT now(), note text, gone text);
         CREATE VIEW upg_view AS SELECT id, tenant_id, created_at, note FROM upg_mine;
         CREATE TRIGGER pgseal_audit INSTEAD OF INSERT OR UPDATE OR DELETE ON upg_view
             FOR EACH ROW EXECUTE FUNCTION pgseal._audit_row('{id}', 'tenant_id');
         SELECT pgseal.retention_set('upg_view', '1 day');
         SELECT pgseal.retention_set('pgseal.tenant_keys', '1 day', 'created_at', 'acme');
         SELECT pgseal.vault_register_column('pgseal.tenant_keys', 'state');
         SELECT pgseal.retention_set('upg_not_mine', '1 day');
         SELECT pgseal.vault_register_column('upg_not_mine', 'note');
         SELECT pgseal.vault_register_column('upg_mine', 'gone');
         ALTER TABLE upg_mine DROP COLUMN gone;
         CREATE TABLE upg_dropped (id int PRIMARY KEY, tenant_id text NOT NULL,
                                   created_at timestamptz NOT NULL DEFAULT now());
         SELECT pgseal.retention_set('upg_dropped', '7 days');",
    )
    .unwrap();
    let oid = |a: &mut postgres::Client, r: &str| -> u32 {
        a.query_one("SELECT $1::text::regclass::oid", &[&r])
            .unwrap()
            .get(0)
    };
    let l = Legacy {
        view: oid(&mut a, "upg_view"),
        tenant_keys: oid(&mut a, "pgseal.tenant_keys"),
        mine: oid(&mut a, "upg_mine"),
        dropped: oid(&mut a, "upg_dropped"),
    };
    a.batch_execute("DROP TABLE upg_dropped").unwrap();
    // The member cannot delete from (or update) upg_not_mine itself.
    assert_eq!(
        sqlstate(a.batch_execute("DELETE FROM upg_not_mine")),
        "42501",
        "upg_admin may not DELETE from upg_not_mine"
    );
    let n: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM pgseal.retention_rules) + (SELECT count(*) FROM pgseal.sealed_columns)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 3 + 7, "0.1.0 accepted every registration");
    l
}

/// F2: a role with no pgseal privilege holds a temporary view on
/// `_ledger_audit_append` (which the update drops) in an open session. The update
/// stops with 2BP01 naming the view and its owner, and changes nothing; once that
/// session has ended, the update goes through.
fn update_blocked_by_temp_view(
    c: &mut postgres::Client,
    cl: &Cluster,
    v: &str,
    before: &BTreeMap<(String, i64), (String, String, i16)>,
) {
    let mut holder = cl.connect_as("upg_nobody");
    holder
        .batch_execute(
            "CREATE TEMP VIEW blk AS SELECT pgseal._ledger_audit_append('a', 'b', 'c') AS x",
        )
        .unwrap();
    let registrations = |c: &mut postgres::Client| -> i64 {
        c.query_one(
            "SELECT (SELECT count(*) FROM pgseal.retention_rules) + (SELECT count(*) FROM pgseal.sealed_columns)",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let regs = registrations(c);
    let err = c
        .batch_execute("ALTER EXTENSION pgseal UPDATE")
        .expect_err("the update must not drop another role's view, nor ignore it");
    let db = err.as_db_error().expect("a server error");
    let msg = db.message();
    assert_eq!(db.code().code(), "2BP01", "{msg}");
    assert!(
        msg.contains("view pg_temp_")
            && msg.contains(".blk (owner upg_nobody)")
            && msg.contains("depends on function pgseal._ledger_audit_append("),
        "the error names the dependent view with its schema and owner: {msg}"
    );
    let hint = db.hint().unwrap_or("");
    assert!(
        hint.contains("pg_temp_")
            && hint.contains("pg_terminate_backend")
            && hint.contains("ALTER EXTENSION pgseal UPDATE"),
        "the hint says what to do: {hint}"
    );
    let version: String = c
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pgseal'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(version, v, "a failed update leaves {v}");
    assert_eq!(
        registrations(c),
        regs,
        "a failed update leaves the registrations"
    );
    assert!(
        ledger_rows(c, false) == *before,
        "a failed update leaves the ledger as it was"
    );
    // The view is gone when its session ends.
    drop(holder);
    let t0 = std::time::Instant::now();
    while c
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'blk' AND relpersistence = 't'",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
        > 0
    {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "the temporary view outlived its session"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// F3 and F5 after the update: what the 0.1.0 attacks left was handled, and said so.
fn check_legacy(c: &mut postgres::Client, notices: &[String], l: &Legacy) {
    // The EXECUTE grants on the functions the update dropped and created again
    // (block 2b) are gone with them, each named in a WARNING with its GRANT.
    for (old, stmt) in [
        (
            "pgseal.ledger_append(text, jsonb, text) to upg_app",
            "GRANT EXECUTE ON FUNCTION pgseal.ledger_append(text, jsonb, text, text[]) TO upg_app;",
        ),
        (
            "pgseal.ledger_verify(text, bigint, bigint) to upg_app",
            "GRANT EXECUTE ON FUNCTION pgseal.ledger_verify(text, bigint, bigint) TO upg_app WITH GRANT OPTION;",
        ),
    ] {
        assert!(
            notices
                .iter()
                .any(|n| n.starts_with("WARNING: ") && n.contains(old) && n.contains(stmt)),
            "no warning names the grant on {old}:\n{}",
            notices.join("\n")
        );
    }
    let kept: bool = c
        .query_one(
            "SELECT has_function_privilege('upg_app', 'pgseal.ledger_append(text, jsonb, text, text[])', 'EXECUTE')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!kept);
    let warned = |parts: &[&str]| -> bool {
        notices
            .iter()
            .any(|n| n.starts_with("WARNING: ") && parts.iter().all(|p| n.contains(p)))
    };
    let all = notices.join("\n");
    // F3: skipped, named, and no TRUNCATE trigger on either.
    assert!(
        warned(&[
            "public.upg_view (a view) has a pgseal_audit trigger",
            "skipped"
        ]),
        "no warning names the view with a pgseal_audit trigger:\n{all}"
    );
    assert!(
        warned(&[
            "public.feed_remote (a foreign table) has a pgseal_audit trigger",
            "skipped"
        ]),
        "no warning names the foreign partition:\n{all}"
    );
    // F5: registrations that name no plain or partitioned table outside pgseal, or a
    // dropped column or table, are gone, each named in a warning.
    let rules: Vec<(String, String)> = c
        .query(
            "SELECT rel::text, coalesce(tenant_id, '') FROM pgseal.retention_rules ORDER BY 1, 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rules,
        [
            ("events".to_string(), String::new()),
            ("events".into(), "acme".into()),
            ("upg_not_mine".into(), String::new())
        ],
        "retention rules after the update"
    );
    let cols: Vec<(String, String)> = c
        .query(
            "SELECT rel::text, col::text FROM pgseal.sealed_columns ORDER BY 1, 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        cols,
        [
            ("secrets".to_string(), "token".to_string()),
            ("upg_not_mine".into(), "note".into())
        ],
        "sealed column registrations after the update"
    );
    for (what, parts) in [
        ("the view's rule", vec![format!("removed the retention rule of relation {} (public.upg_view)", l.view), "a view".into(), "default rule".into()]),
        ("tenant_keys' rule", vec![format!("removed the retention rule of relation {} (pgseal.tenant_keys)", l.tenant_keys), "tenant 'acme'".into(), "a table of pgseal".into()]),
        ("tenant_keys' column", vec![format!("removed the sealed column registration of relation {} (pgseal.tenant_keys), column state", l.tenant_keys), "a table of pgseal".into()]),
        ("the dropped column", vec![format!("removed the sealed column registration of relation {} (public.upg_mine), column gone", l.mine), "does not exist".into()]),
        ("the dropped table's rule", vec![format!("removed the retention rule of relation {} (dropped)", l.dropped), "no such relation".into()]),
    ] {
        let p: Vec<&str> = parts.iter().map(String::as_str).collect();
        assert!(warned(&p), "no warning names {what} ({p:?}):\n{all}");
    }
    // What remains is listed once, for review, with the query to list it.
    assert!(
        warned(&[
            "3 retention rule(s) and 2 sealed column registration(s) were written under 0.1.0",
            "retention public.upg_not_mine (time column created_at, default rule)",
            "retention public.events (time column created_at, tenant 'acme')",
            "sealed column public.secrets.token",
            "sealed column public.upg_not_mine.note",
            "SELECT rel, tenant_id, time_column, keep FROM pgseal.retention_rules WHERE updated_at <=",
        ]),
        "no review warning lists the remaining registrations:\n{all}"
    );
    // Nothing was written for the removed rows (their removal is in the warnings).
    let removed: i64 = c
        .query_one(
            "SELECT count(*) FROM pgseal.ledger WHERE event = 'retention.removed'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(removed, 0, "the cleanup appended retention.removed entries");
}

// ---------------------------------------------------------------------------------
// The upgrade
// ---------------------------------------------------------------------------------

#[test]
fn every_release_upgrades_to_the_current_version_like_a_fresh_install() {
    if pg_major() != 15 {
        println!(
            "upgrade_cluster: no upgrade to test on PostgreSQL {}: every release so far (RELEASES) was \
             built for PostgreSQL 15 only (0.1.0 did not build for 18), so no installation on {} has an \
             older pgseal; the frozen-script and upgrade-path checks of this file ran",
            pg_major(),
            pg_major()
        );
        return;
    }
    let cur = current_version();
    let releases = releases();
    // The current build, as `make install` put it into the system's PostgreSQL.
    let sys_lib = pg_config(&pg_bindir(), "--pkglibdir");
    let sys_ext = pg_config(&pg_bindir(), "--sharedir").join("extension");
    let current_files: Vec<PathBuf> = std::fs::read_dir(&sys_ext)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n == "pgseal.control" || n.starts_with("pgseal--")
        })
        .collect();
    assert!(
        current_files
            .iter()
            .any(|p| p.ends_with(format!("pgseal--{cur}.sql"))),
        "pgseal {cur} is not installed in {} (make install)",
        sys_ext.display()
    );
    // A released version's install script is the frozen one, byte for byte.
    if let Some(r) = releases.iter().find(|r| r.version == cur) {
        assert_eq!(
            sha256_file(&sys_ext.join(format!("pgseal--{cur}.sql"))),
            r.sha256,
            "{cur} is released, but the install script this build generates differs from the frozen one: \
             the SQL changed without a new version and an upgrade script"
        );
    }
    for r in releases.iter().filter(|r| r.version != cur) {
        upgrade_from(r, &cur, &sys_lib.join("pgseal.so"), &current_files);
    }
}

fn upgrade_from(r: &Release, cur: &str, current_so: &Path, current_files: &[PathBuf]) {
    let started = std::time::Instant::now();
    let v = &r.version;
    let out = sh(Command::new("bash")
        .arg(repo_root().join("scripts/release_build.sh"))
        .arg(v));
    let cache = PathBuf::from(
        out.lines()
            .last()
            .expect("release_build.sh prints its cache directory"),
    );
    println!(
        "upgrade_cluster: {v} built or found in {} ({:?})",
        cache.display(),
        started.elapsed()
    );
    let copy = PgCopy::make(&Path::new(pgseal_tests::IT_DIR).join(format!("upgrade-pg-{v}")));
    copy.install(
        &cache.join("lib/pgseal.so"),
        &[
            cache.join("extension/pgseal.control"),
            cache.join(format!("extension/pgseal--{v}.sql")),
        ],
    );

    let cl = Cluster::with(&format!("upgrade-{v}"))
        .keys(&[KEY_V1])
        .bindir(&copy.bindir)
        .start();
    let mut c = cl.connect();
    c.batch_execute(&format!("CREATE EXTENSION pgseal VERSION '{v}'"))
        .unwrap();
    // Releases before 0.2.0 wrote ledger format 1 and v1 checkpoints signed by a key
    // derived from the master key; from 0.2.0 on, format 2 and v2 checkpoints signed
    // by the database's checkpoint key (docs/FORMAT.md).
    let v1_era = semver(v) < (0, 2, 0);
    let mut sealed = Sealed::new();
    use_release(&mut c, &cl, &mut sealed);
    // The 0.1.0 attacks on its update (F3, F5); F2 needs an open session at update time.
    let legacy = if v1_era {
        Some(legacy_0_1_0(&mut c, &cl))
    } else {
        None
    };
    // Two signed checkpoints, then more entries after one of them.
    let mut old_cps = Vec::new();
    for t in ["acme", "globex"] {
        let cp: serde_json::Value = c
            .query_one("SELECT pgseal.ledger_checkpoint($1)", &[&t])
            .unwrap()
            .get(0);
        assert_eq!(
            cp.get("ledger_id").is_none(),
            v1_era,
            "{v}'s checkpoint version"
        );
        old_cps.push(cp.to_string());
    }
    let old_pk: String = c
        .query_one("SELECT pgseal.ledger_public_key()", &[])
        .unwrap()
        .get(0);
    append(&mut c, "acme", "after.checkpoint", 1);
    let before = ledger_rows(&mut c, !v1_era);
    let checked_before = verify_all(&mut c);
    let dir = cl.dir.clone();
    let v1_cps = dir.join("checkpoints-old.jsonl");
    std::fs::write(&v1_cps, old_cps.join("\n") + "\n").unwrap();
    // pgseald reads the release's exports (0.1.0's: lines without `fmt`).
    export_all(&mut c, &dir.join("export-old.jsonl"));
    let (code, msg) =
        Pgseald::ledger_verify_file(&dir.join("export-old.jsonl"), &v1_cps, &old_pk).run();
    assert_eq!(code, Some(0), "pgseald on {v}'s export: {msg}");
    drop(c);

    // The DBA's upgrade: new files, a restart (pgseal.so is preloaded), ALTER EXTENSION.
    cl.stop();
    copy.install(current_so, current_files);
    cl.resume();
    let (mut c, notices) = connect_notices(&cl);
    // Another superuser would own what the update creates: the script refuses.
    c.batch_execute("CREATE ROLE upgrade_other_dba SUPERUSER")
        .unwrap();
    let other = c.batch_execute("SET ROLE upgrade_other_dba; ALTER EXTENSION pgseal UPDATE");
    assert_eq!(
        sqlstate(other),
        "42501",
        "an update run by a role that does not own the extension"
    );
    c.batch_execute("RESET ROLE; DROP ROLE upgrade_other_dba")
        .unwrap();
    if v1_era {
        update_blocked_by_temp_view(&mut c, &cl, v, &before);
    }
    // F3 with a temporary table: a member of pgseal_admin audits a temporary table of
    // its own, in a session that stays open during the update.
    let tmp_holder = if v1_era {
        let mut h = cl.connect_as("upg_admin");
        h.batch_execute(
            "CREATE TEMP TABLE upg_tmp (id int PRIMARY KEY, tenant_id text NOT NULL);
             SELECT pgseal.ledger_audit('upg_tmp');",
        )
        .unwrap();
        Some(h)
    } else {
        None
    };
    notices.lock().unwrap().clear();
    let update_started = std::time::Instant::now();
    c.batch_execute("ALTER EXTENSION pgseal UPDATE").unwrap();
    println!(
        "upgrade_cluster: ALTER EXTENSION pgseal UPDATE took {:?}",
        update_started.elapsed()
    );
    let update_notices = notices.lock().unwrap().clone();
    for n in &update_notices {
        println!("upgrade_cluster: update said {n}");
    }
    let version: String = c
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pgseal'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(version, cur);
    if let Some(l) = &legacy {
        check_legacy(&mut c, &update_notices, l);
    }
    drop(tmp_holder);

    // The old entries are untouched, keep their format (1 before 0.2.0), and every
    // chain verifies.
    let after = ledger_rows(&mut c, true);
    assert_eq!(
        after.len(),
        before.len(),
        "the update added or removed ledger entries"
    );
    for (k, (hash, mac, old_fmt)) in &before {
        let (h, m, fmt) = after
            .get(k)
            .unwrap_or_else(|| panic!("entry {k:?} is gone"));
        assert!(h == hash && m == mac, "entry {k:?} changed");
        assert_eq!(
            fmt, old_fmt,
            "entry {k:?} written by {v} changed its format"
        );
    }
    let v2_fields: i64 = c
        .query_one(
            "SELECT count(*) FROM pgseal.ledger WHERE db_role IS NOT NULL OR subjects IS NOT NULL OR salt IS NOT NULL OR commitment IS NOT NULL OR payload IS NULL",
            &[],
        )
        .unwrap()
        .get(0);
    if v1_era {
        assert_eq!(v2_fields, 0, "format 1 rows have no format 2 fields");
    }
    assert_eq!(verify_all(&mut c), checked_before);

    // Every value decrypts with the old data keys; new seals use the rotated key.
    assert_eq!(decrypt_all(&mut c, &sealed), sealed.len());
    let active: String = c
        .query_one(
            "SELECT key_id FROM pgseal.tenant_keys WHERE tenant_id = 'acme' AND purpose = 'dek' AND state = 'active'",
            &[],
        )
        .unwrap()
        .get(0);
    seal(&mut c, &mut sealed, "acme", 1);
    seal(&mut c, &mut sealed, "initech", 1);
    let newest: String = c
        .query_one(
            "SELECT split_part(token, ':', 2) FROM secrets WHERE id = $1",
            &[&(sealed.len() as i32 - 1)],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        newest, active,
        "a new seal of acme uses its active data key from before the update"
    );
    c.execute("SELECT pgseal.tenant_key_rotate('globex')", &[])
        .unwrap();
    seal(&mut c, &mut sealed, "globex", 1);
    assert_eq!(decrypt_all(&mut c, &sealed), sealed.len());

    // New entries are format 2 and extend the old chains; so do the audit, evidence
    // and decrypt entries the upgraded triggers and functions write.
    concurrent_appends(&cl, "order.shipped");
    {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant('acme', 'alice')", &[])
            .unwrap();
        tx.batch_execute(
            "UPDATE orders SET status = 'shipped' WHERE id = 1;
             INSERT INTO pgseal.org_members VALUES ('acme', 'org1', 'dave', 'viewer');",
        )
        .unwrap();
        tx.commit().unwrap();
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant('acme')", &[]).unwrap();
        tx.batch_execute("TRUNCATE orders").unwrap();
        tx.commit().unwrap();
    }
    let new_rows: Vec<(String, i64, i16, Option<String>)> = c
        .query(
            "SELECT tenant_id, seq, fmt, db_role FROM pgseal.ledger l
             WHERE NOT EXISTS (SELECT 1 FROM unnest($1::text[], $2::bigint[]) o(t, s) WHERE o.t = l.tenant_id AND o.s = l.seq)",
            &[
                &before.keys().map(|k| k.0.clone()).collect::<Vec<_>>(),
                &before.keys().map(|k| k.1).collect::<Vec<_>>(),
            ],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert!(
        new_rows.len() >= 40,
        "only {} entries after the update",
        new_rows.len()
    );
    for (t, s, fmt, role) in &new_rows {
        assert_eq!(
            *fmt, 2,
            "entry {t}/{s} appended after the update is not format 2"
        );
        assert_eq!(
            role.as_deref(),
            Some("postgres"),
            "entry {t}/{s} records the appending role"
        );
    }
    let events = |c: &mut postgres::Client, e: &str| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pgseal.ledger WHERE event = $1 AND fmt = 2",
            &[&e],
        )
        .unwrap()
        .get(0)
    };
    for e in [
        "row.update",
        "org.member_added",
        "audit.truncated",
        "vault.decrypt",
    ] {
        assert!(
            events(&mut c, e) >= 1,
            "no format 2 '{e}' entry after the update"
        );
    }
    let checked_after = verify_all(&mut c);
    for (t, n) in &checked_before {
        assert!(
            checked_after[t] > *n || t != "acme",
            "acme's chain did not grow across the update"
        );
        assert!(checked_after[t] >= *n, "chain {t} lost entries");
    }
    // Tables audited by the old release got the TRUNCATE trigger (block 9 of the script).
    let truncate_triggers: Vec<String> = c
        .query(
            "SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname = 'pgseal_audit_truncate' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Under 0.1.0 (legacy_0_1_0) also feed and its local partition, but not its
    // foreign partition, nor the view with a pgseal_audit trigger.
    let mut want = vec!["events", "events_acme", "events_globex", "orders"];
    if legacy.is_some() {
        want = vec![
            "events",
            "events_acme",
            "events_globex",
            "feed",
            "feed_local",
            "orders",
        ];
    }
    assert_eq!(truncate_triggers, want);

    // Checkpoints: the old (v1) ones verify offline with the old public key, against the
    // export after the update; a new one is v2, signed by the new checkpoint key.
    let cp2: serde_json::Value = c
        .query_one("SELECT pgseal.ledger_checkpoint('acme')", &[])
        .unwrap()
        .get(0);
    let ledger_id: String = c
        .query_one("SELECT pgseal.ledger_id()", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        cp2["ledger_id"],
        serde_json::json!(ledger_id),
        "a checkpoint after the update is v2"
    );
    let new_pk: String = c
        .query_one("SELECT pgseal.ledger_public_key()", &[])
        .unwrap()
        .get(0);
    // A v1 era database gets its own checkpoint key; a later one keeps it.
    assert_eq!(
        new_pk != old_pk,
        v1_era,
        "the checkpoint key after the update"
    );
    let export = dir.join("export-new.jsonl");
    export_all(&mut c, &export);
    let (code, msg) = Pgseald::ledger_verify_file(&export, &v1_cps, &old_pk).run();
    assert_eq!(
        code,
        Some(0),
        "pgseald, old checkpoints after the update: {msg}"
    );
    // The new checkpoint extends the release's (v2) ones, or is the tenant's first v2.
    let v2_cps = dir.join("checkpoints-new.jsonl");
    let mut new_cps = if v1_era { Vec::new() } else { old_cps.clone() };
    new_cps.push(cp2.to_string());
    std::fs::write(&v2_cps, new_cps.join("\n") + "\n").unwrap();
    let (code, msg) = Pgseald::ledger_verify_file(&export, &v2_cps, &new_pk).run();
    assert_eq!(
        code,
        Some(0),
        "pgseald, new checkpoint after the update: {msg}"
    );
    if v1_era {
        let (code, _) = Pgseald::ledger_verify_file(&export, &v1_cps, &new_pk).run();
        assert_eq!(
            code,
            Some(5),
            "the old checkpoints must not verify with the new key"
        );
    }

    // pgseal's own SECURITY DEFINER functions all pin a search_path ending in pg_temp.
    let own_errors: Vec<String> = c
        .query(
            "SELECT object || ': ' || problem FROM pgseal.isolation_report() WHERE severity = 'error' AND object LIKE 'pgseal.%'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        own_errors.is_empty(),
        "isolation_report after the update: {own_errors:?}"
    );

    // The schema equals a fresh install's, in another database of the same cluster.
    c.batch_execute("CREATE DATABASE fresh").unwrap();
    let mut f = cl.connect_to("fresh", "postgres");
    f.batch_execute("CREATE EXTENSION pgseal").unwrap();
    let fresh = catalog_dump(&mut f);
    let upgraded = catalog_dump(&mut c);
    let diff = line_diff(&fresh, &upgraded);
    assert!(
        diff.is_empty(),
        "the pgseal schema after ALTER EXTENSION UPDATE from {v} differs from a fresh {cur} install \
         (an SQL change without its upgrade script in extension/sql/?):\n{diff}"
    );
    // The comparison sees a changed search_path and a changed grant.
    {
        let mut tx = c.transaction().unwrap();
        tx.batch_execute(
            "ALTER FUNCTION pgseal._my_orgs(pgseal.org_role) SET search_path = pg_catalog, pgseal;
             GRANT EXECUTE ON FUNCTION pgseal.vault_decrypt(text, text) TO PUBLIC;",
        )
        .unwrap();
        let d = line_diff(&fresh, &catalog_dump(&mut tx));
        assert!(
            d.contains("_my_orgs") && d.contains("config="),
            "search_path change not seen:\n{d}"
        );
        assert!(
            d.contains("vault_decrypt(text,text) acl PUBLIC EXECUTE"),
            "grant not seen:\n{d}"
        );
        tx.rollback().unwrap();
    }
    let log = cl.server_log();
    assert!(
        !log.contains("terminated by signal"),
        "a backend crashed; see {}/server.log",
        dir.display()
    );
    for (_, _, plain) in &sealed {
        assert!(
            !log.contains(plain.as_str()),
            "a plaintext reached the server log"
        );
    }
    println!(
        "upgrade_cluster: {v} -> {cur} checked in {:?}",
        started.elapsed()
    );
}
