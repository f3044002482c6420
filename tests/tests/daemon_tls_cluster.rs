//! pgseald's TLS (daemon/src/tls.rs) against a cluster with `ssl = on` and a CA and
//! server certificate made here: verify-full succeeds with the right CA and host and
//! fails with a wrong CA or host name; verify-ca ignores the name; require fails
//! against a server without TLS. No error repeats the password.

use std::path::{Path, PathBuf};
use std::process::Command;

use pgseal_tests::{Cluster, Pgseald, KEY_V1};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 only (no DNS name) signed by it, and a
/// second, unrelated CA. The key is readable by the test servers' OS user.
fn make_certs() -> PathBuf {
    let dir = pgseal_tests::fresh_dir("tls-certs");
    for ca in ["ca", "other-ca"] {
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=pgseal test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ],
        );
    }
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=pgseal test server",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName = IP:127.0.0.1\n").unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
    let user = pgseal_tests::test_user();
    let st = Command::new("chown")
        .arg(format!("{user}:{user}"))
        .arg(dir.join("server.key"))
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("chmod")
        .args(["0600"])
        .arg(dir.join("server.key"))
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("chmod")
        .args(["a+rx"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    dir
}

#[test]
fn sslmodes_verify_what_they_promise() {
    if !pgseal_tests::pg_has_ssl() {
        // What is tested is pgseald's client side; a server without TLS cannot
        // take part. `make test` runs this on PostgreSQL 15, built with OpenSSL.
        eprintln!(
            "skipped on PostgreSQL {}: this server was built without SSL support",
            pgseal_tests::pg_major()
        );
        return;
    }
    let certs = make_certs();
    let ssl_conf = [
        "ssl = on".to_owned(),
        format!("ssl_cert_file = '{}'", certs.join("server.crt").display()),
        format!("ssl_key_file = '{}'", certs.join("server.key").display()),
        "password_encryption = 'scram-sha-256'".to_owned(),
    ];
    let conf: Vec<&str> = ssl_conf.iter().map(String::as_str).collect();
    let cl = Cluster::start("daemon-tls", &[KEY_V1], &conf);
    cl.connect()
        .batch_execute("CREATE EXTENSION pgseal")
        .unwrap();
    let ca = certs.join("ca.pem");
    let other = certs.join("other-ca.pem");
    let base = |host: &str| {
        format!(
            "host={host} port={} user=postgres password=hunter2secret dbname=postgres",
            cl.port
        )
    };
    let with = |host: &str, mode: &str, root: Option<&Path>| match root {
        Some(r) => format!("{} sslmode={mode} sslrootcert={}", base(host), r.display()),
        None => format!("{} sslmode={mode}", base(host)),
    };
    let ok = |conn: String| {
        let (code, out) = Pgseald::new(["status", "--database-url", &conn]).run();
        assert_eq!(code, Some(0), "{conn}: {out}");
    };
    let fails = |conn: String| {
        let (code, out) = Pgseald::new(["status", "--database-url", &conn]).run();
        assert_ne!(code, Some(0), "{conn} must fail: {out}");
        assert!(!out.contains("hunter2secret"), "the password leaked: {out}");
    };
    ok(with("127.0.0.1", "verify-full", Some(&ca)));
    ok(format!(
        "postgres://postgres:hunter2secret@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        cl.port,
        ca.display().to_string().replace('/', "%2F")
    ));
    fails(with("127.0.0.1", "verify-full", Some(&other)));
    fails(with("127.0.0.1", "verify-ca", Some(&other)));
    // The certificate names 127.0.0.1, not localhost.
    fails(with("localhost", "verify-full", Some(&ca)));
    ok(with("localhost", "verify-ca", Some(&ca)));
    ok(with("127.0.0.1", "require", None));
    fails(with("127.0.0.1", "verify-full", None));
    drop(cl);

    // A server without TLS: require fails, prefer and disable connect.
    let plain = Cluster::start("daemon-tls-plain", &[KEY_V1], &[]);
    plain
        .connect()
        .batch_execute("CREATE EXTENSION pgseal")
        .unwrap();
    let pbase = format!(
        "host=127.0.0.1 port={} user=postgres password=hunter2secret dbname=postgres",
        plain.port
    );
    fails(format!("{pbase} sslmode=require"));
    ok(format!("{pbase} sslmode=prefer"));
    ok(format!("{pbase} sslmode=disable"));
}
