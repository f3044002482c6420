//! The vault against a real cluster: key command, restart with a second master key
//! version, kek_rewrap, concurrent first seals, the no-key server, the server log,
//! and the independent Python check of a live envelope.

use pgseal_tests::{kek_rewrap_until_done, repo_root, sqlstate, Cluster, Pgseald, KEY_V1, KEY_V2};

const PLAINTEXTS: [&str; 3] = [
    "sk-live-PLAINTEXT-MARKER-alpha",
    "smtp-PLAINTEXT-MARKER-beta",
    "PLAINTEXT-MARKER-gamma",
];

fn seal(c: &mut postgres::Client, tenant: &str, pt: &str, ctx: Option<&str>) -> String {
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT set_config('app.tenant_id', $1, true)", &[&tenant])
        .unwrap();
    let s: String = tx
        .query_one("SELECT pgseal.vault_seal($1, $2)", &[&pt, &ctx])
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    s
}

fn decrypt(
    c: &mut postgres::Client,
    tenant: &str,
    sealed: &str,
    ctx: Option<&str>,
) -> Result<Option<String>, postgres::Error> {
    let mut tx = c.transaction()?;
    tx.execute("SELECT set_config('app.tenant_id', $1, true)", &[&tenant])?;
    let r = tx
        .query_one("SELECT pgseal.vault_decrypt($1, $2)", &[&sealed, &ctx])
        .map(|row| row.get(0));
    tx.commit()?;
    r
}

#[test]
fn restart_with_new_master_version_then_kek_rewrap() {
    let cl = Cluster::start(
        "rotate",
        &[KEY_V1],
        &["log_min_messages = debug5", "log_statement = 'none'"],
    );
    let mut c = cl.connect();
    c.batch_execute("CREATE EXTENSION pgseal").unwrap();
    let row = c
        .query_one(
            "SELECT loaded, active_version, versions FROM pgseal.vault_status()",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, Option<i32>>(1), Some(1));

    let mut sealed = Vec::new();
    for t in 0..20 {
        let tenant = format!("tenant-{t}");
        for pt in PLAINTEXTS {
            sealed.push((
                tenant.clone(),
                pt,
                seal(&mut c, &tenant, pt, Some("it.ctx")),
            ));
        }
    }
    // encryption counts reach the key table at commit
    let n: i64 = c
        .query_one("SELECT sum(encryptions)::int8 FROM pgseal.tenant_keys", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 60);

    // Restart with version 2 added: version 2 becomes active, version 1 still unwraps.
    cl.set_keys(&[KEY_V1, KEY_V2]);
    cl.restart();
    let mut c = cl.connect();
    assert_eq!(
        c.query_one("SELECT active_version FROM pgseal.vault_status()", &[])
            .unwrap()
            .get::<_, Option<i32>>(0),
        Some(2)
    );
    for (tenant, pt, s) in &sealed {
        assert_eq!(
            decrypt(&mut c, tenant, s, Some("it.ctx"))
                .unwrap()
                .as_deref(),
            Some(*pt)
        );
    }
    assert_eq!(kek_rewrap_until_done(&mut c), 20);
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM pgseal.tenant_keys WHERE kek_version <> 2",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0);

    // Drop version 1 entirely: everything must still decrypt in a new session.
    cl.set_keys(&[KEY_V2]);
    cl.restart();
    let mut c = cl.connect();
    for (tenant, pt, s) in &sealed {
        assert_eq!(
            decrypt(&mut c, tenant, s, Some("it.ctx"))
                .unwrap()
                .as_deref(),
            Some(*pt)
        );
    }

    // Shred in one session while another has the key cached.
    let mut other = cl.connect();
    let (t0, _, s0) = &sealed[0];
    assert!(decrypt(&mut other, t0, s0, Some("it.ctx")).is_ok());
    let shredded: i32 = c
        .query_one("SELECT pgseal.tenant_shred($1)", &[t0])
        .unwrap()
        .get(0);
    assert_eq!(shredded, 1);
    assert_eq!(
        sqlstate(decrypt(&mut other, t0, s0, Some("it.ctx"))),
        "22023"
    );

    // An independent implementation opens a live envelope (tests/format_check.py).
    let (t1, pt1, s1) = &sealed[3];
    let kid = s1.split(':').nth(1).unwrap();
    let row = c
        .query_one(
            "SELECT kek_version, encode(wrapped, 'hex') FROM pgseal.tenant_keys WHERE key_id = $1",
            &[&kid],
        )
        .unwrap();
    let live = serde_json::json!({
        "master_key_hex": &KEY_V2[2..], "kek_version": row.get::<_, i32>(0), "wrapped_hex": row.get::<_, String>(1),
        "tenant": t1, "key_id": kid, "context": "it.ctx", "sealed": s1, "plaintext": pt1,
    });
    let live_path = cl.dir.join("live.json");
    std::fs::write(&live_path, live.to_string()).unwrap();
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(repo_root().join("tests/format_check.py"))
        .arg("--live")
        .arg(&live_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "format_check.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&live_path).unwrap();

    // Errors on bad input were logged; no plaintext or key ever was.
    let _ = decrypt(&mut c, "tenant-5", "v2:garbage", None);
    let _ = decrypt(&mut c, "tenant-5", &sealed[15].2, Some("wrong"));
    drop(c);
    drop(other);
    let log = cl.server_log();
    assert!(log.contains("DEBUG"), "debug5 logging was not on");
    assert!(
        !log.contains("PLAINTEXT-MARKER"),
        "server log contains plaintext"
    );
    for k in [KEY_V1, KEY_V2] {
        assert!(!log.contains(&k[2..18]), "server log contains key bytes");
    }
}

#[test]
fn concurrent_first_seals_end_with_one_active_key() {
    let cl = Cluster::start("concurrent", &[KEY_V1], &[]);
    cl.connect()
        .batch_execute("CREATE EXTENSION pgseal")
        .unwrap();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let port = cl.port;
            std::thread::spawn(move || {
                let mut c = postgres::Client::connect(
                    &format!("host=127.0.0.1 port={port} user=postgres"),
                    postgres::NoTls,
                )
                .unwrap();
                let mut out = Vec::new();
                for j in 0..20 {
                    out.push(seal(
                        &mut c,
                        &format!("race-{}", j % 4),
                        &format!("v{i}-{j}"),
                        None,
                    ));
                }
                out
            })
        })
        .collect();
    let all: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let mut c = cl.connect();
    let actives: i64 = c
        .query_one("SELECT count(*) FROM pgseal.tenant_keys WHERE tenant_id LIKE 'race-%' AND state = 'active'", &[])
        .unwrap()
        .get(0);
    assert_eq!(actives, 4);
    let keys: i64 = c
        .query_one("SELECT count(*) FROM pgseal.tenant_keys", &[])
        .unwrap()
        .get(0);
    assert_eq!(keys, 4, "a concurrent first seal created a second key");
    assert_eq!(all.len(), 160);

    // pgseald status reads vault_status() and exits 0 when the key is loaded.
    let out = pgseald_status(cl.port);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("active version:    1"));
}

/// Issue 14, hole 6: 99 seals in a transaction that rolls back still spent their
/// nonces, so they count against the key in every backend, and the limit
/// (`pgseal.dek_max_encryptions`) rotates the key on time.
#[test]
fn rolled_back_seals_count_against_the_key_in_every_backend() {
    let cl = Cluster::start(
        "enc-counts",
        &[KEY_V1],
        &["pgseal.dek_max_encryptions = 100"],
    );
    let mut a = cl.connect();
    a.batch_execute("CREATE EXTENSION pgseal").unwrap();
    let first = seal(&mut a, "lim", "one", None);
    let key_of = |s: &str| s.split(':').nth(1).unwrap().to_owned();
    // 98 more seals in a transaction whose ciphertexts leave through the result,
    // then a rollback: 99 nonces spent under the key.
    let mut tx = a.transaction().unwrap();
    tx.execute("SELECT set_config('app.tenant_id', 'lim', true)", &[])
        .unwrap();
    let rows = tx
        .query(
            "SELECT pgseal.vault_seal('x' || g) FROM generate_series(1, 98) g",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 98);
    tx.rollback().unwrap();
    // Another backend seals: the key is at 99 of 100, so the 2nd seal from here
    // reaches the limit and the 3rd uses a new key.
    let mut b = cl.connect();
    let k1 = key_of(&seal(&mut b, "lim", "b1", None));
    let k2 = key_of(&seal(&mut b, "lim", "b2", None));
    assert_eq!(
        k1,
        key_of(&first),
        "the 100th encryption still uses the first key"
    );
    assert_ne!(
        k2,
        key_of(&first),
        "the key was not rotated after 100 encryptions (rolled-back seals were not counted)"
    );
    // The committed count of the first key includes the rolled-back seals.
    let n: i64 = b
        .query_one(
            "SELECT encryptions FROM pgseal.tenant_keys WHERE key_id = $1",
            &[&key_of(&first)],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 100, "stored count of the first key");
}

/// `pgseald status` of the cluster (given as a URL, not a key=value string).
fn pgseald_status(port: u16) -> std::process::Output {
    Pgseald::new([
        "status",
        "--database-url",
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
    ])
    .output()
}

#[test]
fn server_without_master_key_starts_and_fails_closed() {
    let cl = Cluster::start("nokey", &["not a key line"], &[]);
    let mut c = cl.connect();
    c.batch_execute("CREATE EXTENSION pgseal").unwrap();
    let loaded: bool = c
        .query_one("SELECT loaded FROM pgseal.vault_status()", &[])
        .unwrap()
        .get(0);
    assert!(!loaded);
    let mut tx = c.transaction().unwrap();
    tx.execute("SET LOCAL app.tenant_id = 'acme'", &[]).unwrap();
    assert_eq!(
        sqlstate(tx.query_one("SELECT pgseal.vault_seal('x')", &[])),
        "55000"
    );
    drop(tx);
    assert!(cl.server_log().contains("master key not loaded"));
    assert_eq!(pgseald_status(cl.port).status.code(), Some(3));
}
