//! The decrypt audit with `pgseal.audit_decrypt = on` (the default): the first
//! decrypt of a key in a transaction is on disk before its plaintext is returned,
//! whatever the transaction does next: rollback, a failed deferred constraint,
//! PREPARE + ROLLBACK PREPARED, kill -9 of the audit writer or of the postmaster.
//! Each test reproduces issue 14's hole 1 the way an attacker would try it.

use std::time::{Duration, Instant};

use pgseal_tests::{ledger_entries as entries, sqlstate, Cluster, KEY_V1};
use serde_json::Value;

const SETUP: &str = "
    CREATE EXTENSION pgseal;
    CREATE ROLE app LOGIN;
    GRANT pgseal_decrypt, pgseal_ledger TO app;
    CREATE TABLE integrations (id int PRIMARY KEY, tenant_id text, token text);
    GRANT SELECT ON integrations TO app;
    SET app.tenant_id = 'acme';
    INSERT INTO integrations
        SELECT g, 'acme', pgseal.vault_seal('tok-secret-' || g, 'integrations.token')
        FROM generate_series(1, 3) g;
    RESET app.tenant_id;";

const DECRYPT_ALL: &str = "SELECT pgseal.set_tenant('acme'); \
     SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations";

fn start(name: &str) -> (Cluster, postgres::Client) {
    let cl = Cluster::start(name, &[KEY_V1], &["max_prepared_transactions = 4"]);
    let mut c = cl.connect();
    c.batch_execute(SETUP).unwrap();
    (cl, c)
}

/// Waits (up to 20 s) for the writer to append the end-of-transaction counts.
fn wait_for_counts(
    c: &mut postgres::Client,
    n: usize,
) -> Vec<(String, i64, Option<String>, Value)> {
    let t0 = Instant::now();
    loop {
        let e = entries(c, "vault.decrypt");
        if e.len() >= n || t0.elapsed() > Duration::from_secs(20) {
            return e;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn verifies(c: &mut postgres::Client, tenant: &str) {
    let r = c
        .query_one(
            "SELECT ok, problem FROM pgseal.ledger_verify($1)",
            &[&tenant],
        )
        .unwrap();
    assert!(
        r.get::<_, bool>(0),
        "{tenant}: {:?}",
        r.get::<_, Option<String>>(1)
    );
}

#[test]
fn a_rolled_back_decrypt_is_on_record_with_its_count() {
    let (cl, mut admin) = start("audit-rollback");
    let mut c = cl.connect_as("app");
    // The attack from the issue, word for word: decrypt every token, then roll back.
    let rows = c
        .simple_query(&format!("BEGIN; {DECRYPT_ALL}; ROLLBACK"))
        .unwrap();
    let plaintexts = rows
        .iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .filter(|v| v.starts_with("tok-secret-"))
        .count();
    assert_eq!(plaintexts, 3, "the client did get the plaintexts");
    let started = entries(&mut admin, "vault.decrypt_started");
    assert_eq!(
        started.len(),
        1,
        "one durable entry for the key's first decrypt: {started:?}"
    );
    let (chain, seq, role, p) = &started[0];
    assert_eq!(chain, "acme");
    assert_eq!(
        role.as_deref(),
        Some("app"),
        "the role that decrypted, not the writer's"
    );
    assert_eq!(p["context"], "integrations.token");
    let done = wait_for_counts(&mut admin, 1);
    assert_eq!(done.len(), 1, "the count is completed on rollback");
    let p = &done[0].3;
    assert_eq!(p["count"], 3);
    assert_eq!(p["outcome"], "rolled back");
    assert_eq!(
        p["started"],
        serde_json::json!({"tenant": "acme", "seq": seq})
    );
    verifies(&mut admin, "acme");
}

#[test]
fn a_failed_deferred_constraint_and_a_rolled_back_prepared_transaction_leave_the_record() {
    let (cl, mut admin) = start("audit-deferred");
    admin
        .batch_execute(
            "CREATE TABLE seen (k int UNIQUE DEFERRABLE INITIALLY DEFERRED);
             GRANT INSERT ON seen TO app;",
        )
        .unwrap();
    let mut c = cl.connect_as("app");
    let r = c.batch_execute(&format!(
        "BEGIN; {DECRYPT_ALL}; INSERT INTO seen VALUES (1), (1); COMMIT"
    ));
    assert_eq!(
        sqlstate(r),
        "23505",
        "the commit fails on the deferred constraint"
    );
    assert_eq!(entries(&mut admin, "vault.decrypt_started").len(), 1);
    let done = wait_for_counts(&mut admin, 1);
    assert_eq!(done[0].3["outcome"], "rolled back");

    admin
        .batch_execute(&format!("BEGIN; {DECRYPT_ALL}; PREPARE TRANSACTION 'p1'"))
        .unwrap();
    admin.batch_execute("ROLLBACK PREPARED 'p1'").unwrap();
    assert_eq!(
        entries(&mut admin, "vault.decrypt_started").len(),
        2,
        "the prepared transaction's decrypt is on record after ROLLBACK PREPARED"
    );
    let done = wait_for_counts(&mut admin, 2);
    assert_eq!(done.len(), 2);
    assert_eq!(done[1].3["outcome"], "prepared");
    assert_eq!(done[1].3["count"], 3);
    verifies(&mut admin, "acme");
}

#[test]
fn committed_and_read_only_decrypts_are_counted_once_per_key() {
    let (cl, mut admin) = start("audit-commit");
    let mut c = cl.connect_as("app");
    c.batch_execute(&format!("BEGIN; {DECRYPT_ALL}; {DECRYPT_ALL}; COMMIT"))
        .unwrap();
    let started = entries(&mut admin, "vault.decrypt_started");
    assert_eq!(
        started.len(),
        1,
        "six decrypts under one key, one durable entry"
    );
    let done = entries(&mut admin, "vault.decrypt");
    assert_eq!(
        done.len(),
        1,
        "the count is written inside the committing transaction"
    );
    assert_eq!(done[0].3["count"], 6);
    assert_eq!(done[0].3["outcome"], "committed");
    // A read-only transaction can decrypt: the writer records it.
    c.batch_execute(&format!("BEGIN READ ONLY; {DECRYPT_ALL}; COMMIT"))
        .unwrap();
    assert_eq!(entries(&mut admin, "vault.decrypt_started").len(), 2);
    let done = wait_for_counts(&mut admin, 2);
    assert_eq!(done.len(), 2);
    assert_eq!(done[1].3["outcome"], "committed");
    verifies(&mut admin, "acme");
}

#[test]
fn a_decrypt_after_an_append_to_the_same_chain_is_recorded_in_the_audit_chain() {
    let (cl, mut admin) = start("audit-own-lock");
    let mut c = cl.connect_as("app");
    // This transaction holds acme's chain until it ends, so the writer cannot append
    // there; it must neither deadlock nor skip the record.
    c.batch_execute(&format!(
        "BEGIN; SELECT pgseal.set_tenant('acme'); SELECT pgseal.ledger_append('export.requested', '{{}}'); {DECRYPT_ALL}; ROLLBACK"
    ))
    .unwrap();
    let started = entries(&mut admin, "vault.decrypt_started");
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].0, "_pgseal_audit", "{started:?}");
    assert_eq!(started[0].3["tenant"], "acme");
    let done = wait_for_counts(&mut admin, 1);
    assert_eq!(
        done[0].0, "acme",
        "the count goes to the tenant once its chain is free"
    );
    assert_eq!(done[0].3["started"]["tenant"], "_pgseal_audit");
    verifies(&mut admin, "acme");
    verifies(&mut admin, "_pgseal_audit");
}

fn decrypt_state(cl: &Cluster) -> String {
    let mut c = cl.connect_as("app");
    sqlstate(c.query(
        "SELECT pgseal.set_tenant('acme'), pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
        &[],
    ))
}

#[test]
fn without_the_audit_worker_decrypt_fails_closed() {
    // No background worker slot at all: the launcher never runs.
    let cl = Cluster::start(
        "audit-no-launcher",
        &[KEY_V1],
        &["max_worker_processes = 0"],
    );
    let mut admin = cl.connect();
    admin.batch_execute(SETUP).unwrap();
    assert_eq!(
        decrypt_state(&cl),
        "55000",
        "no plaintext without its record"
    );
    assert!(entries(&mut admin, "vault.decrypt_started").is_empty());
    // commit mode (superuser-only) works without the worker; nobody else may choose it.
    admin
        .batch_execute(&format!("SET pgseal.audit_decrypt = commit; {DECRYPT_ALL}"))
        .unwrap();
    let r = cl
        .connect_as("app")
        .batch_execute("SET pgseal.audit_decrypt = commit");
    assert_eq!(
        sqlstate(r),
        "42501",
        "only a superuser may weaken the audit"
    );
    drop(cl);
    // Two slots (the launcher and logical replication's): no writer can start.
    let cl = Cluster::start("audit-no-writer", &[KEY_V1], &["max_worker_processes = 2"]);
    let mut admin = cl.connect();
    admin.batch_execute(SETUP).unwrap();
    assert_eq!(decrypt_state(&cl), "55000");
    assert!(entries(&mut admin, "vault.decrypt_started").is_empty());
    assert!(
        cl.server_log()
            .contains("pgseal audit launcher: no background worker slot for a writer"),
        "the launcher ran and said why"
    );
}

/// Opens a transaction as `app` that has decrypted (so its record was acknowledged)
/// and has not committed; returns the connection to keep the transaction open.
fn decrypt_and_hold(cl: &Cluster) -> postgres::Client {
    let mut c = cl.connect_as("app");
    c.batch_execute(&format!("BEGIN; {DECRYPT_ALL}")).unwrap();
    c
}

#[test]
fn the_record_survives_kill_9_of_the_writer_and_of_the_postmaster() {
    let (cl, mut admin) = start("audit-crash");
    let held = decrypt_and_hold(&cl);
    let writer: i32 = admin
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pgseal audit writer'",
            &[],
        )
        .unwrap()
        .get(0);
    // kill -9 of the writer after its acknowledgement: the postmaster restarts every
    // backend, so the decrypting transaction never commits.
    let st = std::process::Command::new("kill")
        .args(["-9", &writer.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    // Wait until the postmaster has reacted (it ends every backend, the held one
    // too): a connection opened before that could be accepted and then reset.
    wait_until_ended(held);
    drop(admin);
    let mut admin = reconnect(&cl);
    assert_eq!(entries(&mut admin, "vault.decrypt_started").len(), 1);
    verifies(&mut admin, "acme");
    // kill -9 of the postmaster between the acknowledgement and the commit.
    let held = decrypt_and_hold(&cl);
    cl.crash();
    drop(held);
    cl.resume();
    let mut admin = reconnect(&cl);
    assert_eq!(entries(&mut admin, "vault.decrypt_started").len(), 2);
    verifies(&mut admin, "acme");
    // And the audit works again after the restarts.
    let mut c = cl.connect_as("app");
    c.batch_execute(&format!("BEGIN; {DECRYPT_ALL}; COMMIT"))
        .unwrap();
    assert_eq!(entries(&mut admin, "vault.decrypt_started").len(), 3);
}

/// Returns once the server has ended `c`'s backend.
fn wait_until_ended(mut c: postgres::Client) {
    let t0 = Instant::now();
    while c.simple_query("SELECT 1").is_ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the postmaster did not end the backends after the writer's kill -9"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects once the server accepts connections and answers a query on them.
fn reconnect(cl: &Cluster) -> postgres::Client {
    let t0 = Instant::now();
    loop {
        match postgres::Client::connect(&cl.url(), postgres::NoTls)
            .and_then(|mut c| c.simple_query("SELECT 1").map(|_| c))
        {
            Ok(c) => return c,
            Err(e) if t0.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("server did not come back: {e}"),
        }
    }
}

/// Runs `during` (in this thread, with its own sessions) while `tenant`'s first
/// ledger append, in a session of `app`, sits between making the tenant's ledger key
/// and taking its chain lock (held there by the test's trigger on the key table);
/// returns what `during` returned, then the append's result (a SQLSTATE on error).
fn beside_a_first_append<T>(
    cl: &Cluster,
    tenant: &str,
    during: impl FnOnce() -> T,
) -> (T, Result<(), String>) {
    let mut config = cl.config();
    config.user("app");
    let sql = format!(
        "BEGIN; SELECT pgseal.set_tenant('{tenant}'); \
         SELECT pgseal.ledger_append('first.entry'); COMMIT"
    );
    let first = std::thread::spawn(move || {
        let mut b = config.connect(postgres::NoTls).unwrap();
        b.batch_execute(&sql).map_err(|e| sqlstate::<()>(Err(e)))
    });
    std::thread::sleep(Duration::from_millis(400));
    let r = during();
    (r, first.join().unwrap())
}

/// Every append takes the tenant's ledger key before its chain lock. A tenant's
/// first append makes the key (its row written, the key-creation lock held) and then
/// waits for the chain; the audit writer, recording a decrypt of the same tenant
/// meanwhile, must not take the free chain lock and then wait for that key: the two
/// would deadlock, and the decrypt's record or the append would be lost. It takes
/// neither by waiting, and records the decrypt in its own chain.
#[test]
fn the_writer_never_waits_for_a_key_a_first_append_is_making() {
    let (cl, mut admin) = start("audit-key-race");
    // acme has sealed values but no ledger key yet. A test-only trigger on pgseal's
    // key table holds a new ledger key of acme's (or initech's, below) for 1.5 s
    // after its row is written, before the append goes on to the chain lock.
    admin
        .batch_execute(
            "CREATE FUNCTION public.slow_ledger_key() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.purpose = 'ledger' AND NEW.tenant_id IN ('acme', 'initech') THEN
                     PERFORM pg_catalog.pg_sleep(1.5);
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER slow_ledger_key AFTER INSERT ON pgseal.tenant_keys
                 FOR EACH ROW EXECUTE FUNCTION public.slow_ledger_key();",
        )
        .unwrap();
    let (opened, first) = beside_a_first_append(&cl, "acme", || {
        cl.connect_as("app")
            .batch_execute(&format!("BEGIN; {DECRYPT_ALL}; COMMIT"))
            .map_err(|e| sqlstate::<()>(Err(e)))
    });
    assert_eq!(opened, Ok(()), "the decrypt beside the first append");
    assert_eq!(first, Ok(()), "the first append");
    let started = entries(&mut admin, "vault.decrypt_started");
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(started[0].0, "_pgseal_audit", "{started:?}");
    let done = wait_for_counts(&mut admin, 1);
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(entries(&mut admin, "first.entry").len(), 1);
    verifies(&mut admin, "acme");
    verifies(&mut admin, "_pgseal_audit");

    // The same race with an erasure, which locks the chain first and then appends
    // its receipt: it takes the key first too, and waits for the one being made.
    admin
        .batch_execute(
            "CREATE TABLE people (id text, tenant_id text, email text);
             SELECT pgseal.subject_register('people', 'id');
             SET app.tenant_id = 'initech';
             INSERT INTO people VALUES ('u1', 'initech', 'u1@initech.example');
             RESET app.tenant_id;",
        )
        .unwrap();
    let (erased, first) = beside_a_first_append(&cl, "initech", || {
        admin
            .batch_execute(
                "BEGIN; SELECT pgseal.set_tenant('initech'); \
                 SELECT pgseal.subject_erase('initech', 'u1'); COMMIT",
            )
            .map_err(|e| sqlstate::<()>(Err(e)))
    });
    assert_eq!(erased, Ok(()), "the erasure beside the first append");
    assert_eq!(first, Ok(()), "the first append");
    assert_eq!(entries(&mut admin, "subject.erased").len(), 1);
    verifies(&mut admin, "initech");
}

#[test]
fn a_count_in_the_audit_chain_names_its_tenant_and_a_hold_keeps_it() {
    // A count the writer could not append to its tenant's chain (held for longer than
    // it waits) goes to the audit chain, alone (its start went to the tenant's). Its
    // payload must name the tenant: a hold on the tenant keeps it from ledger_prune by
    // that, and the tenant's offboarding finds it by that to erase it (offboard_cluster,
    // an_offboarding_erases_the_tenants_decrypt_records_in_the_audit_chain).
    let (cl, mut admin) = start("audit-count-hold");
    let mut c = cl.connect_as("app");
    let mut holder = cl.connect_as("app");
    // The start goes to acme's chain, free at that point.
    c.batch_execute(&format!("BEGIN READ ONLY; {DECRYPT_ALL}"))
        .unwrap();
    holder
        .batch_execute(
            "BEGIN; SELECT pgseal.set_tenant('acme'); \
             SELECT pgseal.ledger_append('export.requested', '{}')",
        )
        .unwrap();
    c.batch_execute("COMMIT").unwrap();
    let done = wait_for_counts(&mut admin, 1);
    holder.batch_execute("ROLLBACK").unwrap();
    assert_eq!(done.len(), 1);
    let (chain, _, role, p) = &done[0];
    assert_eq!(chain, "_pgseal_audit", "{done:?}");
    assert_eq!(role.as_deref(), Some("app"));
    assert_eq!(p["tenant"], "acme", "{p}");
    assert_eq!(p["count"], 3);
    let started = entries(&mut admin, "vault.decrypt_started");
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].0, "acme", "only the count is in the audit chain");
    verifies(&mut admin, "_pgseal_audit");

    admin
        .batch_execute(
            "SET pgseal.ledger_min_retention = '0 seconds'; \
             SELECT pgseal.retention_hold('acme', true)",
        )
        .unwrap();
    let prune = "SELECT pgseal.ledger_prune('_pgseal_audit', \
                   (SELECT max(seq) + 1 FROM pgseal.ledger WHERE tenant_id = '_pgseal_audit'))";
    assert_eq!(
        sqlstate(admin.query_one(prune, &[])),
        "55000",
        "a hold on acme keeps its count in the audit chain"
    );
    admin
        .batch_execute("SELECT pgseal.retention_hold('acme', false)")
        .unwrap();
    let pruned: i64 = admin.query_one(prune, &[]).unwrap().get(0);
    assert_eq!(
        pruned, 1,
        "without the hold the count is pruned like any entry"
    );
}

#[test]
fn a_reload_to_asynchronous_commit_leaves_no_start_unflushed() {
    // The writer acknowledges a decrypt's start once its transaction commits, and the
    // plaintext is returned then: that commit must be on disk. It made its commits
    // wait for their flush when `synchronous_commit = off` was configured as it
    // started, not when a reload set it later: its commits then returned with their
    // WAL still in memory (for up to wal_writer_delay), and a crash could lose the
    // record of a decrypt whose plaintext had been returned. Nothing else writes WAL
    // in this cluster (no autovacuum, wal_level minimal), so right after a decrypt
    // returns everything inserted is the writer's, and must be flushed.
    let cl = Cluster::start(
        "audit-reload-async",
        &[KEY_V1],
        &[
            "wal_writer_delay = 10000",
            "autovacuum = off",
            "wal_level = minimal",
            "max_wal_senders = 0",
        ],
    );
    let mut admin = cl.connect();
    admin.batch_execute(SETUP).unwrap();
    let mut c = cl.connect_as("app");
    // The writer starts with the first decrypt, under synchronous_commit = on (and
    // this sets the hint bits of the rows read, which later reads leave alone).
    c.batch_execute(DECRYPT_ALL).unwrap();
    admin
        .batch_execute("ALTER SYSTEM SET synchronous_commit = off")
        .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let starts = entries(&mut admin, "vault.decrypt_started").len();
    let lsns = "SELECT pg_current_wal_flush_lsn()::text, pg_current_wal_insert_lsn()::text";
    // Once before the rounds: a session's first lookup of these functions prunes dead
    // rows of pg_proc's pages, which is WAL of its own (after the writer's commit).
    admin.query_one(lsns, &[]).unwrap();
    for round in 1..=3 {
        // Read while the decrypting transaction is open: at its commit it writes its
        // count itself (or, read-only, hands it to the writer), which would flush or
        // add WAL of its own.
        c.batch_execute(&format!("BEGIN READ ONLY; {DECRYPT_ALL}"))
            .unwrap();
        let (flushed, inserted): (String, String) = {
            let r = admin.query_one(lsns, &[]).unwrap();
            (r.get(0), r.get(1))
        };
        assert_eq!(
            flushed, inserted,
            "round {round}: the writer's commit was not flushed when the decrypt returned"
        );
        assert_eq!(
            entries(&mut admin, "vault.decrypt_started").len(),
            starts + round,
            "each decrypting transaction has its start"
        );
        c.batch_execute("COMMIT").unwrap();
        // The writer appends the count it was handed before the next round starts.
        assert_eq!(wait_for_counts(&mut admin, 1 + round).len(), 1 + round);
    }
}

#[test]
fn a_decrypt_that_starts_after_the_shred_is_refused_whatever_its_snapshot() {
    // A REPEATABLE READ transaction whose snapshot predates a shred: its first
    // decrypt of the tenant's key after the shred is refused (22023) before its
    // plaintext returns, and nothing is recorded for it; read-only or not. The key
    // is read as committed now (`keystore::select_latest`; the audit writer, which
    // reads it again before recording the start, refuses a destroyed key too, for
    // a key read in parallel mode or a shred that commits between the two reads).
    // (Each tenant appended before, so the snapshot's read of its chain head does
    // not fail first.)
    let cl = Cluster::start("decrypt_after_shred", &[KEY_V1], &[]);
    let mut admin = cl.connect();
    admin.batch_execute(SETUP).unwrap();
    let starts = |c: &mut postgres::Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pgseal.ledger WHERE event = 'vault.decrypt_started'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    for (id, tenant, read_only) in [(1, "acme", true), (11, "beta", false)] {
        admin
            .batch_execute(&format!(
                "SET app.tenant_id = '{tenant}'; \
                 INSERT INTO integrations VALUES ({id} + 100, '{tenant}', pgseal.vault_seal('t', 'integrations.token')); \
                 SELECT pgseal.ledger_append('app.note'); RESET app.tenant_id"
            ))
            .unwrap();
        let sealed: String = admin
            .query_one(
                "SELECT token FROM integrations WHERE id = $1",
                &[&(id + 100)],
            )
            .unwrap()
            .get(0);
        let mut app = cl.connect_as("app");
        app.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ{}; SELECT pgseal.set_tenant('{tenant}'); \
             SELECT count(*) FROM integrations",
            if read_only { " READ ONLY" } else { "" }
        ))
        .unwrap();
        admin
            .execute("SELECT pgseal.tenant_shred($1)", &[&tenant])
            .unwrap();
        let before = starts(&mut admin);
        let r = app.query_one(
            "SELECT pgseal.vault_decrypt($1, 'integrations.token')",
            &[&sealed],
        );
        assert_eq!(sqlstate(r), "22023", "{tenant}, read only: {read_only}");
        assert_eq!(starts(&mut admin), before, "nothing recorded");
        app.batch_execute("ROLLBACK").unwrap();
    }
}

#[test]
fn a_snapshot_older_than_a_shred_cannot_read_with_the_shredded_key() {
    // A REPEATABLE READ or SERIALIZABLE transaction whose snapshot predates a
    // shred would read the key's row as it was. Keys are read as committed now,
    // whatever the snapshot, so such a transaction is refused once the shred
    // commits: whether it had the key cached already or not, through every path
    // that reads a value (vault_redact, and vault_decrypt under every audit mode,
    // the superuser-only `commit` and `off` among them, which the audit writer's
    // own check does not cover), and in the session's later transactions.
    let cl = Cluster::start("key_cache_after_shred", &[KEY_V1], &[]);
    let mut admin = cl.connect();
    admin.batch_execute(SETUP).unwrap();
    admin.batch_execute("GRANT pgseal_seal TO app").unwrap();
    let redact =
        "SELECT pgseal.vault_redact(token, 4, 'integrations.token') FROM integrations WHERE id = 1";
    let decrypt =
        "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations WHERE id = 1";
    // Keys read under REPEATABLE READ stay cached past their transaction (they
    // are read as committed now, so nothing makes them stale but an epoch bump).
    let mut reader = cl.connect();
    reader
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT pgseal.set_tenant('acme'); {redact}; COMMIT"
        ))
        .unwrap();
    let cached: i32 = reader
        .query_one("SELECT pgseal.key_cache_entries()", &[])
        .unwrap()
        .get(0);
    assert_eq!(cached, 1, "a key read under REPEATABLE READ is kept");

    // Sessions open before the shred, each at one stage of its transaction: with
    // the snapshot taken and no key read yet (as the app role, and as superusers
    // under the audit modes only they may choose), or with the key already read
    // and cached under the old snapshot.
    let open = |c: &mut postgres::Client, level: &str, set: &str, read_first: Option<&str>| {
        c.batch_execute(&format!(
            "{set} BEGIN ISOLATION LEVEL {level}; SELECT pgseal.set_tenant('acme'); \
             SELECT count(*) FROM integrations"
        ))
        .unwrap();
        if let Some(sql) = read_first {
            c.batch_execute(sql).unwrap();
        }
    };
    struct Case {
        who: &'static str,
        client: postgres::Client,
        sql: &'static str,
    }
    // A seal after the shred finds no active key as committed now and makes the
    // tenant a new one: it never takes the shredded key back (which the old
    // snapshot still shows as active) into the session's cache.
    let mut sealer = cl.connect();
    open(&mut sealer, "REPEATABLE READ", "", None);
    let mut cases = Vec::new();
    for level in ["REPEATABLE READ", "SERIALIZABLE"] {
        for (who, set, sql, read_first) in [
            ("app, redact", "", redact, None),
            ("app, decrypt (on)", "", decrypt, None),
            ("app, redact after a read", "", redact, Some(redact)),
            (
                "superuser, decrypt (commit)",
                "SET pgseal.audit_decrypt = commit;",
                decrypt,
                None,
            ),
            (
                "superuser, decrypt (off)",
                "SET pgseal.audit_decrypt = off;",
                decrypt,
                None,
            ),
            (
                "superuser, decrypt (commit) after a decrypt",
                "SET pgseal.audit_decrypt = commit;",
                decrypt,
                Some(decrypt),
            ),
        ] {
            let mut client = if who.starts_with("app") {
                cl.connect_as("app")
            } else {
                cl.connect()
            };
            open(&mut client, level, set, read_first);
            cases.push(Case {
                who: Box::leak(format!("{level}, {who}").into_boxed_str()),
                client,
                sql,
            });
        }
    }
    admin
        .batch_execute("SELECT pgseal.tenant_shred('acme')")
        .unwrap();
    let mut not_refused = Vec::new();
    for c in &mut cases {
        let after = sqlstate(c.client.batch_execute(c.sql));
        c.client.batch_execute("ROLLBACK").unwrap();
        if after != "22023" {
            not_refused.push((c.who, after));
        }
    }
    assert!(
        not_refused.is_empty(),
        "reads after the shred committed that were not refused: {not_refused:?}"
    );
    sealer
        .batch_execute("SELECT pgseal.vault_seal('new', 'integrations.token')")
        .unwrap();
    let after_seal = sqlstate(sealer.batch_execute(redact));
    sealer.batch_execute("ROLLBACK").unwrap();
    assert_eq!(after_seal, "22023", "a read after a seal after the shred");
    // The sessions' later transactions are refused too.
    for c in [&mut cases[2].client, &mut sealer] {
        for sql in [redact, decrypt] {
            c.batch_execute("BEGIN; SELECT pgseal.set_tenant('acme')")
                .unwrap();
            let later = sqlstate(c.batch_execute(sql));
            c.batch_execute("ROLLBACK").unwrap();
            assert_eq!(later, "22023", "a later transaction: {sql}");
        }
    }
    // A parallel plan reads keys under the statement's snapshot, which under
    // REPEATABLE READ is the transaction's: refused, whoever asks for the plan.
    admin
        .batch_execute(
            "SET app.tenant_id = 'beta'; \
             INSERT INTO integrations VALUES (50, 'beta', pgseal.vault_seal('b', 'integrations.token')); \
             RESET app.tenant_id; GRANT CREATE ON SCHEMA public TO app",
        )
        .unwrap();
    let mut par = cl.connect_as("app");
    par.batch_execute(
        "CREATE FUNCTION par_redact(t text) RETURNS text LANGUAGE plpgsql PARALLEL SAFE \
             AS $$ BEGIN RETURN pgseal.vault_redact(t, 4, 'integrations.token'); END $$; \
         SELECT set_config(CASE WHEN current_setting('server_version_num')::int >= 160000 \
                                THEN 'debug_parallel_query' ELSE 'force_parallel_mode' END, 'on', false); \
         SET app.tenant_id = 'beta'",
    )
    .unwrap();
    let par_redact = "SELECT par_redact(token) FROM integrations WHERE id = 50";
    let plan: Vec<String> = par
        .query(&format!("EXPLAIN {par_redact}"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("Gather")),
        "a parallel plan: {plan:?}"
    );
    par.batch_execute(par_redact).unwrap();
    par.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .unwrap();
    let refused = sqlstate(par.batch_execute(par_redact));
    par.batch_execute("ROLLBACK").unwrap();
    assert_eq!(
        refused, "0A000",
        "a key read in parallel mode under REPEATABLE READ"
    );
}

#[test]
fn seals_under_a_key_newer_than_the_snapshot_are_counted() {
    // Keys are read as committed now: a REPEATABLE READ transaction whose snapshot
    // predates a rotation seals under the new key, and its seals are added to that
    // key's stored count at commit (an UPDATE through the transaction's snapshot
    // would not see the key's row and would drop them).
    let cl = Cluster::start("seal_counts_newer_key", &[KEY_V1], &[]);
    let mut admin = cl.connect();
    admin.batch_execute(SETUP).unwrap();
    let mut app = cl.connect();
    app.batch_execute(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT pgseal.set_tenant('acme'); \
         SELECT count(*) FROM integrations",
    )
    .unwrap();
    let new_key: String = admin
        .query_one("SELECT pgseal.tenant_key_rotate('acme')", &[])
        .unwrap()
        .get(0);
    let sealed: Vec<String> = app
        .query(
            "SELECT pgseal.vault_seal('s' || g, 'integrations.token') FROM generate_series(1, 3) g",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    app.batch_execute("COMMIT").unwrap();
    for v in &sealed {
        assert!(
            v.contains(&format!(":{new_key}:")),
            "sealed under the key active now"
        );
    }
    let counted: i64 = admin
        .query_one(
            "SELECT encryptions FROM pgseal.tenant_keys WHERE key_id = $1",
            &[&new_key],
        )
        .unwrap()
        .get(0);
    assert_eq!(counted, 3, "the seals are in the new key's stored count");
}
