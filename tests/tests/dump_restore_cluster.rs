//! A DBA's pg_dump and pg_restore (with `pgseal.restore = on`, README "Backup and
//! restore") of a database using pgseal: the restored database
//! has the same ledger id, its chains verify, its sealed values decrypt, new appends
//! extend the restored chains, and new checkpoints extend the restored ones.

use std::process::Command;

use pgseal_tests::{Cluster, KEY_V1};

fn run(tool: &str, args: &[&str]) {
    let out = Command::new(pgseal_tests::pg_bindir().join(tool))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn verify(c: &mut postgres::Client, tenant: &str) -> (bool, i64) {
    let r = c
        .query_one(
            "SELECT ok, checked FROM pgseal.ledger_verify($1)",
            &[&tenant],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

#[test]
fn a_dumped_and_restored_database_keeps_its_ledger_identity_chains_and_keys() {
    let cl = Cluster::start("dump-restore", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE creds (id int PRIMARY KEY, tenant_id text, token text);
         SELECT pgseal.vault_register_column('creds', 'token', 'creds.token');
         SELECT pgseal.subject_register('creds', 'id');
         SET app.tenant_id = 'acme';
         INSERT INTO creds SELECT g, 'acme', pgseal.vault_seal('secret-' || g, 'creds.token') FROM generate_series(1, 5) g;
         SELECT pgseal.ledger_append('order.paid', jsonb_build_object('n', g)) FROM generate_series(1, 20) g;",
    )
    .unwrap();
    c.batch_execute("SELECT pgseal.ledger_checkpoint('acme')")
        .unwrap();
    let id: String = c
        .query_one("SELECT pgseal.ledger_id()", &[])
        .unwrap()
        .get(0);
    let pk: String = c
        .query_one("SELECT pgseal.ledger_public_key()", &[])
        .unwrap()
        .get(0);
    // The registrations are recorded in the system chain; a restore loads them with
    // their entries and records nothing again.
    let system = verify(&mut c, "_pgseal");
    assert!(system.0 && system.1 >= 2, "{system:?}");
    let dump = format!("{}/db.dump", cl.dir.display());
    let port = cl.port.to_string();
    let conn = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
    run(
        "pg_dump",
        &[&conn[..], &["-Fc", "-f", &dump, "postgres"]].concat(),
    );
    c.batch_execute("CREATE DATABASE restored").unwrap();
    // Without restore mode the guards refuse the dumped ledger rows, superuser or not.
    let refused = Command::new(pgseal_tests::pg_bindir().join("pg_restore"))
        .args([&conn[..], &["--exit-on-error", "-d", "restored", &dump]].concat())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("written only by"));
    c.batch_execute("DROP DATABASE restored").unwrap();
    c.batch_execute("CREATE DATABASE restored").unwrap();
    let out = Command::new(pgseal_tests::pg_bindir().join("pg_restore"))
        .env("PGOPTIONS", "-c pgseal.restore=on")
        .args([&conn[..], &["--exit-on-error", "-d", "restored", &dump]].concat())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut r = cl.connect_to("restored", "postgres");
    let rid: String = r
        .query_one("SELECT pgseal.ledger_id()", &[])
        .unwrap()
        .get(0);
    assert_eq!(rid, id, "the restored database names the same ledger");
    let rpk: String = r
        .query_one("SELECT pgseal.ledger_public_key()", &[])
        .unwrap()
        .get(0);
    assert_eq!(rpk, pk, "and signs with the same checkpoint key");
    assert_eq!(verify(&mut r, "acme"), (true, 20));
    assert_eq!(verify(&mut r, "_pgseal"), system);
    let registered: i64 = r
        .query_one(
            "SELECT (SELECT count(*) FROM pgseal.sealed_columns) + (SELECT count(*) FROM pgseal.subject_columns)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(registered, 2, "the registrations are restored");
    r.batch_execute("SET app.tenant_id = 'acme'").unwrap();
    let plain: Vec<String> = r
        .query(
            "SELECT pgseal.vault_decrypt(token, 'creds.token') FROM creds ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(plain[0], "secret-1");
    assert_eq!(plain.len(), 5);
    r.batch_execute("SELECT pgseal.ledger_append('order.shipped', '{}')")
        .unwrap();
    let (ok, checked) = verify(&mut r, "acme");
    assert!(ok, "the restored chain takes new entries");
    assert!(checked > 20, "{checked}");
    let prev: i64 = r
        .query_one(
            "SELECT (pgseal.ledger_checkpoint('acme') ->> 'prev_seq')::bigint",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(prev, 20, "the new checkpoint extends the restored one");
}
