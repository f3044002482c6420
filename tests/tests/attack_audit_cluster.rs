//! Attacks on the decrypt audit (`pgseal.audit_decrypt = on`, the audit writer).
//! Each test asserts the behaviour docs/SECURITY.md ("Decrypt audit") promises; a
//! failing test is a finding (see the security review report).

use std::time::{Duration, Instant};

use pgseal_tests::{ledger_entries as entries, sqlstate, Cluster, KEY_V1};
use serde_json::Value;

const SETUP: &str = "
    CREATE EXTENSION pgseal;
    CREATE ROLE app LOGIN;
    CREATE ROLE app2 LOGIN;
    CREATE ROLE nobody LOGIN;
    GRANT pgseal_decrypt, pgseal_ledger TO app, app2;
    CREATE TABLE integrations (id int PRIMARY KEY, tenant_id text, token text);
    GRANT SELECT ON integrations TO app, app2;
    SET app.tenant_id = 'acme';
    INSERT INTO integrations
        SELECT g, 'acme', pgseal.vault_seal('tok-secret-' || g, 'integrations.token')
        FROM generate_series(1, 3) g;
    RESET app.tenant_id;";

fn start(name: &str) -> (Cluster, postgres::Client) {
    let cl = Cluster::start(name, &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(SETUP).unwrap();
    (cl, c)
}

/// A superuser seals and decrypts a value of another tenant, with a 2 s audit
/// timeout; returns the decrypt's SQLSTATE.
fn victim_decrypt(admin: &mut postgres::Client) -> String {
    admin
        .batch_execute("SET pgseal.audit_decrypt_timeout = 2000; SET app.tenant_id = 'victim'")
        .unwrap();
    let sealed: String = admin
        .query_one("SELECT pgseal.vault_seal('victim-secret')", &[])
        .unwrap()
        .get(0);
    sqlstate(admin.query_one("SELECT pgseal.vault_decrypt($1)", &[&sealed]))
}

/// Waits up to `secs` for a `vault.decrypt` entry matching `pred`.
fn wait_for_count(
    c: &mut postgres::Client,
    secs: u64,
    pred: impl Fn(&(String, i64, Option<String>, Value)) -> bool,
) -> bool {
    let t0 = Instant::now();
    loop {
        if entries(c, "vault.decrypt").iter().any(&pred) {
            return true;
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Finding 1: a request whose waiter gives up while it is still QUEUED becomes
/// ABANDONED, and nothing ever frees an ABANDONED slot that no writer took
/// (writer.rs `process` takes only QUEUED slots, the launcher looks only at QUEUED
/// ones). `statement_timeout` is user-settable, so any pgseal_decrypt role leaks
/// slots until all 128 are gone: from then on every decrypt of every tenant in every
/// database waits `audit_decrypt_timeout` and fails with 55000, until a restart.
#[test]
fn statement_timeout_cancels_must_not_exhaust_the_audit_queue() {
    let (cl, mut admin) = start("atk-audit-leak");
    let port = cl.port;
    let workers: Vec<_> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = postgres::Client::connect(
                    &format!("host=127.0.0.1 port={port} user=app dbname=postgres"),
                    postgres::NoTls,
                )
                .unwrap();
                c.batch_execute("SET app.tenant_id = 'acme'; SET statement_timeout = '2ms'")
                    .unwrap();
                for _ in 0..200 {
                    let _ = c.simple_query(
                        "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations WHERE id = 1",
                    );
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // Another tenant, another role (a superuser), well after the attack ended.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        victim_decrypt(&mut admin),
        "00000",
        "after app's cancelled decrypts, another tenant cannot decrypt any more (audit queue slots leaked)"
    );
}

/// A role holds its own tenant's chain (an append in an open transaction) and
/// decrypts in many short transactions whose commit gives up on that chain (a
/// short `lock_timeout`; on a Citus worker the coordinator answers busy): each
/// one's count entry, nobody waiting for it, waits for the held chain in a slot of
/// the queue every database shares. They were retried for a minute, so a few hundred
/// such transactions filled the queue, and another tenant's decrypt found no slot
/// for its record and failed (55000) until they drained; now after two seconds they
/// go to the audit chain, which no session can hold, and give their slots back.
#[test]
fn count_entries_under_a_held_chain_give_their_queue_slots_back() {
    let (cl, mut admin) = start("atk-audit-countflood");
    let mut holder = cl.connect_as("app");
    holder
        .batch_execute(
            "BEGIN; SET LOCAL app.tenant_id = 'acme'; SELECT pgseal.ledger_append('app.hold', '{}')",
        )
        .unwrap();
    // A short lock_timeout (any role sets its own): the count's append at commit
    // gives up on the held chain, and the count is handed to the writer. Four
    // sessions at once for five seconds; another tenant decrypts in the middle.
    let port = cl.port;
    let until = Instant::now() + Duration::from_secs(5);
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut flood = postgres::Client::connect(
                    &format!("host=127.0.0.1 port={port} user=app dbname=postgres"),
                    postgres::NoTls,
                )
                .unwrap();
                flood
                    .batch_execute("SET lock_timeout = '5ms'; SET statement_timeout = '1s'")
                    .unwrap();
                while Instant::now() < until {
                    let mut tx = flood.transaction().unwrap();
                    tx.batch_execute("SET LOCAL app.tenant_id = 'acme'").unwrap();
                    let _ = tx.query(
                        "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations WHERE id = 1",
                        &[],
                    );
                    let _ = tx.commit();
                }
            })
        })
        .collect();
    // The most slots the flood held at once in its first 1.5 s (its counts wait 2 s
    // each before the audit chain takes them).
    let mut in_use = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1500) {
        let now: i32 = admin
            .query_one("SELECT slots_in_use FROM pgseal.audit_queue_status()", &[])
            .unwrap()
            .get(0);
        in_use = in_use.max(now);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(in_use >= 48, "the flood held only {in_use} slots");
    let victim = victim_decrypt(&mut admin);
    for f in flooders {
        f.join().unwrap();
    }
    assert_eq!(
        victim, "00000",
        "decrypt counts under a held chain took every slot of the audit queue"
    );
    // Nor do they keep their slots while the chain stays held: after a moment
    // they go to the audit chain.
    let t0 = Instant::now();
    loop {
        let in_use: i32 = admin
            .query_one("SELECT slots_in_use FROM pgseal.audit_queue_status()", &[])
            .unwrap()
            .get(0);
        if in_use == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{in_use} count entries still hold their slots while the chain is held"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let recorded: i64 = admin
        .query_one(
            "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = '_pgseal_audit' \
               AND event = 'vault.decrypt' AND payload->>'tenant' = 'acme'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(recorded > 0, "no count went to the audit chain");
    holder.batch_execute("COMMIT").unwrap();
}

/// Finding 2: any role (no pgseal role at all) can hold the system chain's lock:
/// `_protection_changed` is granted to PUBLIC and records, with no tenant set, into
/// `_pgseal`; a TEMP table is owned by its creator. With `_pgseal` held, a decrypt
/// whose tenant chain is held (by its own transaction, e.g. after an audited write,
/// or by any other open transaction of that tenant) can go nowhere and fails.
#[test]
fn no_role_can_hold_the_system_chain_and_block_other_tenants_decrypts() {
    let (cl, _setup) = start("atk-audit-syslock");
    let mut nobody = cl.connect_as("nobody");
    // The way in is closed: no protection change is recorded for a temporary table.
    let r = nobody.batch_execute(
        "BEGIN; CREATE TEMP TABLE t (); SELECT pgseal._protection_changed('t'::regclass)",
    );
    assert_eq!(sqlstate(r), "42501");
    nobody.batch_execute("ROLLBACK").unwrap();
    // And whoever holds the system chain and the open chain (here an admin's open
    // transaction that set a default retention rule and protected a table outside a
    // tenant context), the writer's fallback is the audit chain, which only writers
    // append to.
    let mut holder = cl.connect();
    holder
        .batch_execute(
            "BEGIN; CREATE TABLE held (id int, tenant_id text, created_at timestamptz);
             SELECT pgseal.retention_set('held', '1 day'); SELECT pgseal.tenant_protect('held')",
        )
        .unwrap();
    let held: i64 = holder
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() \
               AND locktype = 'advisory' AND objsubid = 21249",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        held, 2,
        "the holder holds the chain locks of _pgseal and _pgseal_open"
    );
    let mut c = cl.connect_as("app");
    c.batch_execute(
        "BEGIN; SET LOCAL app.tenant_id = 'acme'; SELECT pgseal.ledger_append('app.note', '{}')",
    )
    .unwrap();
    let r = c.query(
        "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
        &[],
    );
    assert_eq!(
        sqlstate(r),
        "00000",
        "an unprivileged role's open transaction made another tenant's decrypt fail"
    );
    c.batch_execute("COMMIT").unwrap();
    holder.batch_execute("COMMIT").unwrap();
    // The audit writer's chain, where that decrypt went, is pruned like any other:
    // its ledger.pruned entry goes there too, and the chain verifies from its anchor.
    let mut admin = cl.connect();
    admin
        .batch_execute("SET pgseal.ledger_min_retention = '0 seconds'")
        .unwrap();
    let prune = "SELECT pgseal.ledger_prune('_pgseal_audit', \
                   (SELECT max(seq) + 1 FROM pgseal.ledger WHERE tenant_id = '_pgseal_audit'))";
    // A hold on the decrypting tenant keeps its records there too.
    admin
        .batch_execute("SELECT pgseal.retention_hold('acme', true)")
        .unwrap();
    assert_eq!(sqlstate(admin.query_one(prune, &[])), "55000");
    admin
        .batch_execute("SELECT pgseal.retention_hold('acme', false)")
        .unwrap();
    let pruned: i64 = admin
        .query_one(
            "SELECT pgseal.ledger_prune('_pgseal_audit', \
               (SELECT max(seq) + 1 FROM pgseal.ledger WHERE tenant_id = '_pgseal_audit'))",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(pruned > 0, "the decrypt's records were in _pgseal_audit");
    let (ok, event): (bool, String) = {
        let r = admin
            .query_one(
                "SELECT (SELECT ok FROM pgseal.ledger_verify('_pgseal_audit')), \
                        (SELECT event FROM pgseal.ledger WHERE tenant_id = '_pgseal_audit' ORDER BY seq DESC LIMIT 1)",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(ok);
    assert_eq!(event, "ledger.pruned");
}

/// Every way a role without `pgseal_admin` can make pgseal append outside a tenant
/// context, each kept open in a transaction: owning a table and protecting it with
/// no tenant set, or with the tenant setting naming the system chain; writing an
/// audited row whose tenant column is over the limit or names the system chain;
/// truncating an audited table with no tenant set; dropping a column of its own
/// table that an administrator registered for sealing, or its own table that has an
/// administrator's default retention rule (the removals are recorded). Meanwhile an
/// administrator's default retention rule (recorded in the system chain `_pgseal`)
/// must not wait on any of them.
#[test]
fn no_application_role_can_hold_the_system_chain_and_stall_admin_work() {
    let (cl, mut admin) = start("atk-audit-sysheld");
    admin
        .batch_execute(
            "CREATE SCHEMA mine AUTHORIZATION nobody;
             CREATE TABLE audited (id int, tenant_id text);
             SELECT pgseal.ledger_audit('audited');
             GRANT INSERT, TRUNCATE ON audited TO nobody;
             CREATE TABLE kept (id int, tenant_id text, created_at timestamptz);
             CREATE TABLE mine.reg (id int PRIMARY KEY, tenant_id text, secret text);
             SELECT pgseal.vault_register_column('mine.reg', 'secret');
             ALTER TABLE mine.reg OWNER TO nobody;
             CREATE TABLE mine.ruled (id int, tenant_id text, created_at timestamptz);
             SELECT pgseal.retention_set('mine.ruled', '1 day');
             ALTER TABLE mine.ruled OWNER TO nobody;
             SET lock_timeout = '3s';",
        )
        .unwrap();
    let attacks = [
        "CREATE TABLE mine.t1 (id int, tenant_id text); SELECT pgseal.tenant_protect('mine.t1')",
        "SET LOCAL app.tenant_id = '_pgseal'; CREATE TABLE mine.t2 (id int, tenant_id text);
         SELECT pgseal.tenant_protect('mine.t2')",
        "INSERT INTO audited VALUES (1, repeat('t', 300))",
        "INSERT INTO audited VALUES (2, '_pgseal')",
        "TRUNCATE audited",
        "ALTER TABLE mine.reg DROP COLUMN secret",
        "DROP TABLE mine.ruled",
    ];
    let system = |c: &mut postgres::Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = '_pgseal'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    for (n, attack) in attacks.iter().enumerate() {
        let mut atk = cl.connect_as("nobody");
        atk.batch_execute("BEGIN").unwrap();
        atk.batch_execute(attack)
            .unwrap_or_else(|e| panic!("the attack {attack:?} itself failed: {e}"));
        let before = system(&mut admin);
        let r = admin.batch_execute(&format!(
            "SELECT pgseal.retention_set('kept', '{} days')",
            n + 1
        ));
        assert_eq!(
            sqlstate(r),
            "00000",
            "an open transaction of a role without pgseal_admin ({attack:?}) stalled a change \
             recorded in the system chain"
        );
        assert_eq!(
            system(&mut admin),
            before + 1,
            "the rule's entry is in _pgseal"
        );
        atk.batch_execute("COMMIT").unwrap();
    }
    // The removals those DROPs made are recorded, as nobody's, in the open chain.
    let removals: Vec<(String, String)> = admin
        .query(
            "SELECT event, db_role FROM pgseal.ledger WHERE tenant_id = '_pgseal_open' \
               AND event IN ('vault.column_unregistered', 'retention.removed') ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        removals,
        [
            ("vault.column_unregistered".to_owned(), "nobody".to_owned()),
            ("retention.removed".to_owned(), "nobody".to_owned())
        ]
    );
    for chain in ["_pgseal", "_pgseal_open"] {
        let ok: bool = admin
            .query_one(
                "SELECT ok AND checked > 0 FROM pgseal.ledger_verify($1)",
                &[&chain],
            )
            .unwrap()
            .get(0);
        assert!(ok, "{chain} verifies");
    }
}

/// Which of pgseal's chains a registration's removal by a DROP goes to follows the
/// role that made it, not the session's: a `pgseal_admin`'s own DROP goes to the
/// system chain; after `SET ROLE` to a role without it, or when a table owner's code
/// runs inside an administrator's statement (an index expression that ANALYZE
/// evaluates as the table's owner, in a security-restricted operation, while the
/// session's role is still the administrator's), to `_pgseal_open`: that code must
/// not take the system chain's lock in the administrator's transaction (it could
/// then hold it for as long as it likes).
#[test]
fn removals_go_to_the_system_chain_only_for_trusted_roles() {
    let (cl, mut admin) = start("atk-audit-dropchain");
    admin
        .batch_execute(
            "CREATE ROLE padmin LOGIN; GRANT pgseal_admin TO padmin;
             CREATE SCHEMA mine AUTHORIZATION nobody; CREATE SCHEMA theirs AUTHORIZATION padmin;
             CREATE TABLE theirs.reg (id int PRIMARY KEY, tenant_id text, secret text);
             ALTER TABLE theirs.reg OWNER TO padmin;
             SELECT pgseal.vault_register_column('theirs.reg', 'secret');
             CREATE TABLE mine.reg2 (id int PRIMARY KEY, tenant_id text, secret text);
             SELECT pgseal.vault_register_column('mine.reg2', 'secret');
             ALTER TABLE mine.reg2 OWNER TO nobody;
             CREATE TABLE mine.reg3 (id int PRIMARY KEY, tenant_id text, secret text);
             SELECT pgseal.vault_register_column('mine.reg3', 'secret');
             ALTER TABLE mine.reg3 OWNER TO nobody;",
        )
        .unwrap();
    // nobody's table, whose index expression drops nobody's registered column when
    // anyone else's session evaluates it.
    let mut nobody = cl.connect_as("nobody");
    nobody
        .batch_execute(
            "CREATE FUNCTION mine.g() RETURNS void LANGUAGE plpgsql AS $$
             BEGIN
                 IF session_user <> 'nobody' THEN
                     EXECUTE 'ALTER TABLE mine.reg3 DROP COLUMN IF EXISTS secret';
                 END IF;
             END $$;
             CREATE FUNCTION mine.f(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
             BEGIN PERFORM mine.g(); RETURN x; END $$;
             CREATE TABLE mine.idx (x int);
             CREATE INDEX ON mine.idx (mine.f(x));
             INSERT INTO mine.idx SELECT g FROM generate_series(1, 10) g;",
        )
        .unwrap();
    let mut padmin = cl.connect_as("padmin");
    padmin
        .batch_execute("ALTER TABLE theirs.reg DROP COLUMN secret")
        .unwrap();
    admin
        .batch_execute("SET ROLE nobody; ALTER TABLE mine.reg2 DROP COLUMN secret; RESET ROLE")
        .unwrap();
    admin.batch_execute("ANALYZE mine.idx").unwrap();
    let removals: Vec<(String, String, String)> = admin
        .query(
            "SELECT tenant_id, payload ->> 'table', db_role FROM pgseal.ledger \
              WHERE event = 'vault.column_unregistered' ORDER BY payload ->> 'table'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let me: String = admin
        .query_one("SELECT current_user::text", &[])
        .unwrap()
        .get(0);
    let row = |c: &str, t: &str, r: &str| (c.to_owned(), t.to_owned(), r.to_owned());
    assert_eq!(
        removals,
        [
            row("_pgseal_open", "mine.reg2", "nobody"),
            row("_pgseal_open", "mine.reg3", &me),
            row("_pgseal", "theirs.reg", "padmin"),
        ]
    );
}

/// pgseal's own chains are no tenant a session acts for. A role with
/// pgseal_decrypt and pgseal_ledger that sets its tenant to one of them must not
/// read them through the ledger's policy (`_pgseal_audit` holds other tenants'
/// decrypt records, `_pgseal_open` row images), seal under them (a data key of
/// `_pgseal`, and its rotations recorded there), or verify them as its own; it
/// must not take the checkpoint key's creation lock (`ledger_public_key` before an
/// administrator made the key); and no transaction that recorded into one of them
/// can be prepared (a prepared transaction keeps the chain's lock beyond every
/// idle timeout).
#[test]
fn no_session_acts_for_or_holds_pgseal_chains() {
    let cl = Cluster::start(
        "atk-audit-ownchains",
        &[KEY_V1],
        &["max_prepared_transactions = 4"],
    );
    let mut admin = cl.connect();
    admin.batch_execute(SETUP).unwrap();
    admin
        .batch_execute(
            "CREATE SCHEMA mine AUTHORIZATION app;
             CREATE TABLE audited (id int, tenant_id text);
             SELECT pgseal.ledger_audit('audited');
             INSERT INTO audited VALUES (1, repeat('t', 300));
             SET app.tenant_id = 'victim';
             SELECT pgseal.vault_decrypt(pgseal.vault_seal('v'));
             RESET app.tenant_id;",
        )
        .unwrap();
    let mut app = cl.connect_as("app");
    // Before an administrator made the checkpoint key, its public key is refused
    // (and the key not made); after, everyone reads the same key.
    assert_eq!(
        sqlstate(app.query_one("SELECT pgseal.ledger_public_key()", &[])),
        "55000"
    );
    let made: String = admin
        .query_one("SELECT pgseal.ledger_public_key()", &[])
        .unwrap()
        .get(0);
    let read: String = app
        .query_one("SELECT pgseal.ledger_public_key()", &[])
        .unwrap()
        .get(0);
    assert_eq!(read, made);
    for chain in ["_pgseal", "_pgseal_audit", "_pgseal_open", "_pgseal_mine"] {
        app.batch_execute(&format!("SET app.tenant_id = '{chain}'"))
            .unwrap();
        for q in [
            "SELECT count(*) FROM pgseal.ledger",
            "SELECT pgseal.vault_seal('x')",
            "SELECT ok FROM pgseal.ledger_verify()",
            "SELECT count(*) FROM pgseal.ledger_export()",
        ] {
            assert_eq!(
                sqlstate(app.query_one(q, &[])),
                "42501",
                "{q} under the tenant context {chain}"
            );
        }
    }
    app.batch_execute("RESET app.tenant_id").unwrap();
    assert_eq!(
        sqlstate(app.batch_execute("SELECT pgseal.set_tenant('_pgseal_audit')")),
        "42501"
    );
    let open: i64 = admin
        .query_one(
            "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = '_pgseal_open'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(open > 0, "the over-limit row went to _pgseal_open");
    // A protection change outside a tenant context, then PREPARE: refused.
    app.batch_execute(
        "BEGIN; CREATE TABLE mine.t (id int, tenant_id text); SELECT pgseal.tenant_protect('mine.t')",
    )
    .unwrap();
    assert_eq!(
        sqlstate(app.batch_execute("PREPARE TRANSACTION 'hold'")),
        "0A000"
    );
    app.batch_execute("ROLLBACK").unwrap();
    let prepared: i64 = admin
        .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
        .unwrap()
        .get(0);
    assert_eq!(prepared, 0);
    // The same in a tenant's context can be prepared (its own chain's lock).
    app.batch_execute(
        "BEGIN; SET LOCAL app.tenant_id = 'acme'; CREATE TABLE mine.u (id int, tenant_id text);
         SELECT pgseal.tenant_protect('mine.u'); PREPARE TRANSACTION 'tenant'",
    )
    .unwrap();
    admin.batch_execute("ROLLBACK PREPARED 'tenant'").unwrap();
    // Rolled back to a savepoint, the change holds no lock of pgseal's chains any
    // more: the transaction can be prepared.
    app.batch_execute(
        "BEGIN; SAVEPOINT a; CREATE TABLE mine.v (id int, tenant_id text);
         SELECT pgseal.tenant_protect('mine.v'); ROLLBACK TO a; PREPARE TRANSACTION 'savepoint'",
    )
    .unwrap();
    admin
        .batch_execute("ROLLBACK PREPARED 'savepoint'")
        .unwrap();
    // An administrator's prune takes the chain's lock without appending (nothing
    // to prune): it cannot be prepared either.
    admin
        .batch_execute("BEGIN; SELECT pgseal.ledger_prune('_pgseal_open', 1)")
        .unwrap();
    assert_eq!(
        sqlstate(admin.batch_execute("PREPARE TRANSACTION 'prune'")),
        "0A000"
    );
    admin.batch_execute("ROLLBACK").unwrap();
    // Committed, app's protection change outside a tenant context is recorded, as
    // app, in the open chain and not in the system chain.
    app.batch_execute(
        "CREATE TABLE mine.w (id int, tenant_id text); SELECT pgseal.tenant_protect('mine.w')",
    )
    .unwrap();
    let by_app = |c: &mut postgres::Client, chain: &str| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = $1 AND db_role = 'app'",
            &[&chain],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(by_app(&mut admin, "_pgseal_open"), 1);
    assert_eq!(
        by_app(&mut admin, "_pgseal"),
        0,
        "nothing app did went to _pgseal"
    );
}

/// Finding 3: at commit the counts are taken out of the backend's list before they
/// are appended; when that append fails (here: lock_timeout on the tenant's chain,
/// held by another transaction), the transaction aborts and the count is dropped:
/// the plaintexts were returned, and no `vault.decrypt` entry ever follows.
#[test]
fn a_commit_that_fails_in_the_audit_append_still_records_the_count() {
    let (cl, mut admin) = start("atk-audit-lostcount");
    let mut holder = cl.connect_as("app");
    holder
        .batch_execute("BEGIN; SET LOCAL app.tenant_id = 'acme'; SELECT pgseal.ledger_append('app.note', '{}')")
        .unwrap();
    let mut c = cl.connect_as("app");
    c.batch_execute("SET lock_timeout = '300ms'; BEGIN; SET LOCAL app.tenant_id = 'acme'")
        .unwrap();
    let rows = c
        .query(
            "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 3, "the plaintexts reached the client");
    assert_eq!(
        sqlstate(c.batch_execute("COMMIT")),
        "55P03",
        "the commit fails"
    );
    holder.batch_execute("COMMIT").unwrap();
    let started = entries(&mut admin, "vault.decrypt_started");
    assert_eq!(started.len(), 1, "{started:?}");
    let (chain, seq) = (started[0].0.clone(), started[0].1);
    let found = wait_for_count(&mut admin, 20, |e| {
        e.3["started"] == serde_json::json!({"tenant": chain, "seq": seq}) && e.3["count"] == 3
    });
    assert!(
        found,
        "3 decrypts whose plaintexts were returned have no count entry"
    );
}

/// Finding 4: only the first decrypt of a key in a transaction is recorded with its
/// role; after SET ROLE, the decrypts of a second role are folded into the first
/// role's record, so the second role appears nowhere in the ledger.
#[test]
fn decrypts_after_set_role_are_attributed_to_the_role_that_made_them() {
    let (cl, mut admin) = start("atk-audit-setrole");
    admin
        .batch_execute("CREATE ROLE mid LOGIN; GRANT app, app2 TO mid")
        .unwrap();
    let mut c = cl.connect_as("mid");
    c.batch_execute(
        "BEGIN; SET LOCAL app.tenant_id = 'acme'; SET LOCAL ROLE app;
         SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations WHERE id = 1;
         SET LOCAL ROLE app2;
         SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations;
         ROLLBACK",
    )
    .unwrap();
    // One use, one durable record and one count per role.
    assert!(wait_for_count(&mut admin, 20, |e| e.2.as_deref()
        == Some("app2")
        && e.3["count"] == 3));
    assert!(wait_for_count(&mut admin, 20, |e| e.2.as_deref()
        == Some("app")
        && e.3["count"] == 1));
    let roles: Vec<Option<String>> = ["vault.decrypt_started", "vault.decrypt"]
        .iter()
        .flat_map(|ev| entries(&mut admin, ev))
        .map(|e| e.2)
        .collect();
    assert!(
        roles.iter().any(|r| r.as_deref() == Some("app2")),
        "app2 decrypted 3 values but the ledger names only {roles:?}"
    );
}

/// Finding 5: the end-of-transaction count travels through one queue slot (3 KB, now
/// 8 KB); a count whose context list is longer (up to 64 contexts of up to 1 KB each) is dropped,
/// with a LOG line that blames a full queue. A caller who can seal adds a few values
/// with long contexts to the transaction and its real decrypts lose their count.
#[test]
fn a_rolled_back_count_with_long_contexts_is_still_recorded() {
    let (cl, mut admin) = start("atk-audit-bigcount");
    admin
        .batch_execute(
            "GRANT pgseal_seal TO app;
             CREATE TABLE padding (ctx text, v text);
             GRANT SELECT ON padding TO app;
             SET app.tenant_id = 'acme';
             INSERT INTO padding SELECT c, pgseal.vault_seal('x', c)
               FROM (SELECT g || repeat('c', 1000) AS c FROM generate_series(1, 12) g) s;
             RESET app.tenant_id;",
        )
        .unwrap();
    let mut c = cl.connect_as("app");
    c.batch_execute(
        "BEGIN; SET LOCAL app.tenant_id = 'acme';
         SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations;
         SELECT pgseal.vault_decrypt(v, ctx) FROM padding;
         ROLLBACK",
    )
    .unwrap();
    assert_eq!(entries(&mut admin, "vault.decrypt_started").len(), 1);
    assert!(
        wait_for_count(&mut admin, 15, |e| e.3["count"] == 15),
        "15 decrypts (3 real tokens) were returned and rolled back; their count was dropped. log: {}",
        cl.server_log()
            .lines()
            .filter(|l| l.contains("pgseal"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A hot standby cloned from a primary with `pg_basebackup`, stopped when dropped.
struct Standby {
    dir: std::path::PathBuf,
    port: u16,
}

impl Standby {
    fn clone_from(primary: &Cluster, name: &str) -> Standby {
        use std::process::Command;
        let dir = std::path::Path::new(pgseal_tests::IT_DIR).join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let user = pgseal_tests::test_user();
        let port = pgseal_tests::free_port();
        let run = |args: &[&str]| {
            let st = Command::new("runuser")
                .args(["-u", &user, "--"])
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "{args:?}");
        };
        let st = Command::new("install")
            .args(["-d", "-o", &user, "-m", "700", dir.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(st.success());
        let data = dir.join("data");
        let bin = pgseal_tests::pg_bindir();
        run(&[
            bin.join("pg_basebackup").to_str().unwrap(),
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-D",
            data.to_str().unwrap(),
            "-R",
            "-X",
            "stream",
        ]);
        let conf = format!(
            "port = {port}\nunix_socket_directories = '{}'\n",
            dir.display()
        );
        let mut old = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        old.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), old).unwrap();
        run(&[
            bin.join("pg_ctl").to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-l",
            dir.join("server.log").to_str().unwrap(),
            "-w",
            "start",
        ]);
        Standby { dir, port }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", &pgseal_tests::test_user(), "--"])
            .arg(pgseal_tests::pg_bindir().join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .status();
    }
}

/// A primary named `primary` with `SETUP`, a standby `standby` cloned from it, and
/// `app`'s session on the standby.
fn primary_and_standby(primary: &str, standby: &str) -> (Cluster, Standby, postgres::Client) {
    let cl = Cluster::start(
        primary,
        &[KEY_V1],
        &["wal_level = replica", "max_wal_senders = 4"],
    );
    cl.connect().batch_execute(SETUP).unwrap();
    let standby = Standby::clone_from(&cl, standby);
    let c = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=app dbname=postgres",
            standby.port
        ),
        postgres::NoTls,
    )
    .unwrap();
    (cl, standby, c)
}

/// Finding 6: on a hot standby the counts are logged only at pre-commit, so a
/// transaction that decrypts and then rolls back (or fails) leaves no trace at all,
/// although docs/SECURITY.md says each transaction's counts go to the server log.
#[test]
fn a_rolled_back_decrypt_on_a_hot_standby_leaves_a_trace() {
    let (_cl, standby, mut c) = primary_and_standby("atk-audit-primary", "atk-audit-standby");
    let rec: bool = c
        .query_one("SELECT pg_is_in_recovery()", &[])
        .unwrap()
        .get(0);
    assert!(rec);
    c.batch_execute("BEGIN; SET LOCAL app.tenant_id = 'acme'")
        .unwrap();
    let rows = c
        .query(
            "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 3, "the standby returned the plaintexts");
    c.batch_execute("ROLLBACK").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let traces = standby
        .log()
        .lines()
        .filter(|l| l.contains("on a hot standby"))
        .count();
    assert!(
        traces > 0,
        "3 plaintexts left the standby and nothing records them"
    );
}

/// On a hot standby the server log is the only record of a decrypt, and its lines
/// name the actor, a setting any role chooses: an actor holding a line break and a
/// line of its own must come out escaped on the decrypt's lines, not as a line that
/// reads as a record of its own (PostgreSQL only indents it); and an actor over the
/// ledger's length limit is refused there as on the primary, before anything is
/// written.
#[test]
fn a_decrypt_on_a_hot_standby_cannot_forge_log_lines() {
    let (_cl, standby, mut c) =
        primary_and_standby("atk-audit-primary-log", "atk-audit-standby-log");
    let forged = "LOG:  pgseal: 0 decrypt(s) under key FORGED";
    c.batch_execute(&format!(
        "BEGIN; SET LOCAL app.tenant_id = 'acme'; SET LOCAL app.user_id = E'mallory\\n{forged}'"
    ))
    .unwrap();
    let rows = c
        .query(
            "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 3);
    c.batch_execute("COMMIT").unwrap();
    c.batch_execute(&format!(
        "BEGIN; SET LOCAL app.tenant_id = 'acme'; SET LOCAL app.user_id = '{}'",
        "m".repeat(100_000)
    ))
    .unwrap();
    let r = c.query(
        "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
        &[],
    );
    assert_eq!(
        sqlstate(r),
        "54000",
        "an oversized actor decrypted on the standby"
    );
    c.batch_execute("ROLLBACK").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let log = standby.log();
    assert!(
        // PostgreSQL indents a message's later lines with a tab; a reader (or a log
        // shipper) still takes such a line for one of its own.
        !log.lines().any(|l| l.trim_start().starts_with(forged)),
        "a role's actor setting wrote a log line of its own"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("on a hot standby") && l.contains("mallory\\n")),
        "the decrypt's line does not name the actor, escaped"
    );
    assert!(
        !log.contains(&"m".repeat(10_000)),
        "an oversized actor reached the log"
    );
}

/// Finding 1, second way in: `pg_terminate_backend` (which a role may use on its own
/// sessions) ends a waiting backend with FATAL, which exits the process without
/// unwinding, so `Waiting::drop` never runs. The backend's exit hook must give its
/// slot back, or 128 terminations exhaust the queue for every database.
#[test]
fn terminated_waiters_must_not_exhaust_the_audit_queue() {
    let (cl, mut admin) = start("atk-audit-terminate");
    let in_use = |c: &mut postgres::Client| -> i32 {
        c.query_one("SELECT slots_in_use FROM pgseal.audit_queue_status()", &[])
            .unwrap()
            .get(0)
    };
    // Make each wait long: a superuser holds the ledger table, so the writer's
    // append blocks and every decrypt waits for its record.
    let mut holder = cl.connect();
    holder
        .batch_execute("BEGIN; LOCK TABLE pgseal.ledger IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let mut killer = cl.connect_as("app");
    let port = cl.port;
    for _wave in 0..4 {
        let waiters: Vec<_> = (0..34)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut c = postgres::Client::connect(
                        &format!("host=127.0.0.1 port={port} user=app dbname=postgres"),
                        postgres::NoTls,
                    )
                    .unwrap();
                    sqlstate(c.batch_execute(
                        "SET app.tenant_id = 'acme';
                         SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
                    ))
                })
            })
            .collect();
        // Terminate every waiting session, again and again until all have ended (on
        // a busy host some reach their wait later than others).
        let t0 = Instant::now();
        while !waiters.iter().all(|w| w.is_finished()) && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(200));
            killer
                .batch_execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                      WHERE usename = 'app' AND pid <> pg_backend_pid() AND wait_event = 'Extension'",
                )
                .unwrap();
        }
        for w in waiters {
            let state = w.join().unwrap();
            assert!(
                state == "57P01"
                    || state.contains("connection closed")
                    || state.contains("db error"),
                "every waiter was terminated while it waited, not {state}"
            );
        }
    }
    holder.batch_execute("COMMIT").unwrap();
    let t0 = Instant::now();
    while in_use(&mut admin) > 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        in_use(&mut admin),
        0,
        "terminated waiters left slots behind"
    );
    assert_eq!(
        victim_decrypt(&mut admin),
        "00000",
        "after app terminated its own waiting sessions, another tenant cannot decrypt (slots leaked)"
    );
}

/// Finding 7: writers are dynamic background workers, started on a database's first
/// decrypt and retired after a minute idle; parallel query workers share the same
/// `max_worker_processes` slots (and by default `max_parallel_workers` equals it).
/// Any role, with no pgseal privilege, fills the slots with parallel queries over
/// pg_catalog, and the next writer cannot start: every decrypt in that database
/// fails (55000) for as long as the slots are held.
#[test]
fn parallel_queries_of_an_unprivileged_role_do_not_block_decrypts() {
    // The configuration docs/SECURITY.md requires: parallel workers cannot take the
    // slots the launcher and the writers need (8 - 1 launcher - 1 logical
    // replication launcher - 2 writers = 4).
    let cl = Cluster::start(
        "atk-audit-workers",
        &[KEY_V1],
        &["max_worker_processes = 8", "max_parallel_workers = 4"],
    );
    let mut admin = cl.connect();
    admin.batch_execute(SETUP).unwrap();
    let port = cl.port;
    let hogs: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = postgres::Client::connect(
                    &format!("host=127.0.0.1 port={port} user=nobody dbname=postgres"),
                    postgres::NoTls,
                )
                .unwrap();
                let _ = c.batch_execute(
                    "SET force_parallel_mode = on; SET parallel_setup_cost = 0;
                     SELECT count(*) FROM pg_catalog.pg_database WHERE pg_sleep(2) IS NOT NULL",
                );
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(2000));
    let mut c = cl.connect_as("app");
    let r = c.batch_execute(
        "SET app.tenant_id = 'acme';
         SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
    );
    let state = sqlstate(r);
    for h in hogs {
        h.join().unwrap();
    }
    let _ = &mut admin;
    assert_eq!(
        state, "00000",
        "an unprivileged role's parallel queries kept the audit writer from starting"
    );
}

/// A role wraps pgseal's parallel-unsafe functions in a PARALLEL SAFE function of
/// its own and forces a parallel plan: the wrapper then runs in a parallel worker,
/// whose transaction state ends with it. There a decrypt's count (and every context
/// after the first) and a seal's count against its key's limit would be kept in
/// the worker and never written: both are refused instead (0A000).
#[test]
fn decrypts_and_seals_in_a_parallel_worker_are_refused_not_left_unrecorded() {
    let (cl, mut admin) = start("atk-audit-parallel");
    admin
        .batch_execute(
            "GRANT CREATE ON SCHEMA public TO app;
             CREATE TABLE notes (id int PRIMARY KEY, tenant_id text, body text);
             GRANT SELECT ON notes TO app;
             INSERT INTO notes SELECT g, 'acme', 'note ' || g FROM generate_series(1, 3) g;",
        )
        .unwrap();
    let mut c = cl.connect_as("app");
    c.batch_execute(
        "CREATE FUNCTION par_open(t text) RETURNS text LANGUAGE plpgsql PARALLEL SAFE
             AS $$ BEGIN RETURN pgseal.vault_decrypt(t, 'integrations.token'); END $$;
         CREATE FUNCTION par_seal(t text) RETURNS text LANGUAGE plpgsql PARALLEL SAFE
             AS $$ BEGIN RETURN pgseal.vault_seal(t); END $$;
         CREATE FUNCTION par_rewrap(t text) RETURNS text LANGUAGE plpgsql PARALLEL SAFE
             AS $$ BEGIN RETURN pgseal.vault_rewrap(t, 'integrations.token'); END $$;
         CREATE FUNCTION in_worker() RETURNS boolean LANGUAGE sql PARALLEL SAFE
             AS $$ SELECT pg_catalog.pg_backend_pid() <> pg_catalog.current_setting('app.leader')::int $$;
         SET app.tenant_id = 'acme';
         SELECT set_config(CASE WHEN current_setting('server_version_num')::int >= 160000
                                THEN 'debug_parallel_query' ELSE 'force_parallel_mode' END, 'on', false);
         SELECT set_config('app.leader', pg_backend_pid()::text, false);",
    )
    .unwrap();
    // The plan is run by a parallel worker, not the leader.
    let in_worker: bool = c
        .query_one("SELECT bool_and(in_worker()) FROM integrations", &[])
        .unwrap()
        .get(0);
    assert!(in_worker, "the forced parallel plan ran in the leader");
    for (sql, what) in [
        ("SELECT par_open(token) FROM integrations", "vault_decrypt"),
        ("SELECT par_seal(body) FROM notes", "vault_seal"),
        (
            "SELECT par_rewrap(token) FROM integrations",
            "vault_seal and vault_rewrap",
        ),
    ] {
        let r = c.query(sql, &[]);
        let msg = r
            .as_ref()
            .err()
            .and_then(|e| e.as_db_error())
            .map(|d| d.message().to_owned())
            .unwrap_or_default();
        assert_eq!(sqlstate(r), "0A000", "{sql}: {msg}");
        assert!(
            msg.contains(what) && msg.contains("parallel worker"),
            "{msg}"
        );
    }
    // The same wrappers in the leader work, and the decrypts are counted.
    c.batch_execute(
        "SELECT set_config(CASE WHEN current_setting('server_version_num')::int >= 160000
                                THEN 'debug_parallel_query' ELSE 'force_parallel_mode' END, 'off', false)",
    )
    .unwrap();
    let opened = c
        .query("SELECT par_open(token) FROM integrations", &[])
        .unwrap();
    assert_eq!(opened.len(), 3);
    assert!(
        wait_for_count(&mut admin, 10, |(t, _, role, p)| t == "acme"
            && role.as_deref() == Some("app")
            && p["count"] == 3
            && p["outcome"] == "committed"),
        "the leader's decrypts were not counted"
    );
}

/// A shred reaches a hot standby by WAL replay, which bumps no cache epoch there: a
/// standby session that had the tenant's key cached must not go on decrypting with
/// it in its next transactions.
#[test]
fn a_shred_replayed_on_a_hot_standby_reaches_its_sessions_cached_keys() {
    let (cl, standby, mut c) = primary_and_standby("atk-shred-primary", "atk-shred-standby");
    let decrypt = |c: &mut postgres::Client| -> String {
        c.batch_execute("BEGIN; SET LOCAL app.tenant_id = 'acme'")
            .unwrap();
        let state = sqlstate(c.query(
            "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
            &[],
        ));
        c.batch_execute("ROLLBACK").unwrap();
        state
    };
    assert_eq!(decrypt(&mut c), "00000", "the key is cached");
    let mut su = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            standby.port
        ),
        postgres::NoTls,
    )
    .unwrap();
    cl.connect()
        .batch_execute("SELECT pgseal.tenant_shred('acme')")
        .unwrap();
    pgseal_tests::wait_for("the shred's replay", 20, || {
        su.query_one(
            "SELECT count(*) FROM pgseal.tenant_keys \
              WHERE tenant_id = 'acme' AND purpose = 'dek' AND wrapped IS NOT NULL",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
            == 0
    });
    let err = c
        .batch_execute("BEGIN; SET LOCAL app.tenant_id = 'acme'")
        .and_then(|_| {
            c.query(
                "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
                &[],
            )
        })
        .expect_err("the next transaction");
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(err.code().map(|c| c.code()), Some("22023"), "{err}");
    let message = err.as_db_error().map(|d| d.message()).unwrap_or_default();
    assert!(message.contains("key has been destroyed"), "{message}");
}
