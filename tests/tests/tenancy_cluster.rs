//! Tenancy against a real cluster: the isolation matrix of protected tables, and a
//! real pgbouncer in transaction mode with two clients sharing one server connection.

use std::path::Path;
use std::process::Command;

use pgseal_tests::matrix::{self, cell, denied, ok};
use pgseal_tests::{sqlstate, Cluster, KEY_V1};

const SCHEMA: &str = "
    CREATE EXTENSION pgseal;
    CREATE ROLE app LOGIN;
    -- Plain tenant scope.
    CREATE TABLE notes (id int PRIMARY KEY, tenant_id text NOT NULL, body text);
    CREATE INDEX ON notes (tenant_id);
    SELECT pgseal.tenant_protect('notes');
    INSERT INTO notes VALUES (1, 'A', 'a1'), (2, 'A', 'a2'), (11, 'B', 'b1');
    -- Personal and organisation ownership.
    CREATE TABLE docs (id int PRIMARY KEY, tenant_id text NOT NULL, owner_id text, org_id text, body text);
    CREATE INDEX ON docs (tenant_id);
    SELECT pgseal.org_protect('docs', 'owner_id', 'org_id');
    INSERT INTO docs VALUES
        (1, 'A', 'olga', 'org1', 'org doc'), (2, 'A', 'zed', NULL, 'zed personal'),
        (11, 'B', 'olga', 'org1', 'other tenant org doc'), (12, 'B', 'zed', NULL, 'other tenant personal');
    INSERT INTO pgseal.org_members VALUES
        ('A', 'org1', 'olga', 'owner'), ('A', 'org1', 'adam', 'admin'),
        ('A', 'org1', 'mia', 'member'), ('A', 'org1', 'vic', 'viewer'),
        ('B', 'org1', 'olga', 'owner'), ('B', 'org1', 'adam', 'owner');
    GRANT SELECT, INSERT, UPDATE, DELETE ON notes, docs TO app;
";

#[test]
fn isolation_matrix_allows_exactly_the_expected_set() {
    let cl = Cluster::start("tenancy-matrix", &[KEY_V1], &[]);
    cl.connect().batch_execute(SCHEMA).unwrap();
    let mut app = postgres::Client::connect(
        &format!("{} user=app", cl.url().replace(" user=postgres", "")),
        postgres::NoTls,
    )
    .unwrap();
    // notes: own tenant, other tenant, no context.
    matrix::notes(&mut app, "notes");

    let ops = matrix::OPS;
    // docs: organisation roles in tenant A. Rows visible to each: olga owns doc 1
    // and is org owner; zed owns doc 2 personally; the rest see doc 1 through org1.
    let no = denied();
    for (who, user, expect) in [
        (
            "owner",
            "olga",
            [ok(1), ok(1), denied(), ok(1), ok(1), ok(1)],
        ),
        (
            "admin",
            "adam",
            [ok(1), ok(1), denied(), ok(1), ok(1), ok(1)],
        ),
        (
            "member",
            "mia",
            [ok(1), ok(1), denied(), ok(1), ok(0), ok(1)],
        ),
        (
            "viewer",
            "vic",
            [ok(1), denied(), denied(), ok(0), ok(0), ok(1)],
        ),
        (
            "outsider",
            "nobody",
            [ok(0), denied(), denied(), ok(0), ok(0), ok(0)],
        ),
        (
            "personal owner",
            "zed",
            [ok(1), denied(), denied(), ok(1), ok(1), ok(1)],
        ),
    ] {
        for (op, want) in ops.iter().zip(expect) {
            let got = cell(&mut app, Some(("A", user)), op, "docs");
            assert_eq!(got, want, "docs, {who}, {op}");
        }
    }
    for op in ops {
        assert_eq!(
            cell(&mut app, None, op, "docs"),
            no,
            "docs, no context, {op}"
        );
    }
    // COPY FROM cannot bypass it either: PostgreSQL refuses COPY FROM into a table
    // with row level security for a role subject to it.
    let r = app.batch_execute(
        "BEGIN; SELECT pgseal.set_tenant('A', 'olga'); COPY notes FROM STDIN; ROLLBACK",
    );
    assert_eq!(sqlstate(r), "0A000");
}

/// pgbouncer on a port of its own, in front of the cluster listening on `pg_port`.
struct Bouncer {
    pidfile: std::path::PathBuf,
    port: u16,
}

impl Bouncer {
    fn start(dir: &Path, pg_port: u16, users: &[&str]) -> Bouncer {
        let port = pgseal_tests::free_port();
        let ini = dir.join("pgbouncer.ini");
        let userlist = dir.join("userlist.txt");
        let pidfile = dir.join("pgbouncer.pid");
        std::fs::write(
            &userlist,
            users
                .iter()
                .map(|u| format!("\"{u}\" \"\"\n"))
                .collect::<String>(),
        )
        .unwrap();
        std::fs::write(
            &ini,
            format!(
                "[databases]\npostgres = host=127.0.0.1 port={pg_port} dbname=postgres\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\n\
                 auth_file = {}\npool_mode = transaction\ndefault_pool_size = 1\nmax_client_conn = 20\n\
                 unix_socket_dir =\nlogfile = {}\npidfile = {}\n",
                userlist.display(),
                dir.join("pgbouncer.log").display(),
                pidfile.display()
            ),
        )
        .unwrap();
        let user = pgseal_tests::test_user();
        for f in [&ini, &userlist] {
            Command::new("chown").arg(&user).arg(f).status().unwrap();
        }
        let st = Command::new("runuser")
            .args(["-u", &user, "--", "/usr/sbin/pgbouncer", "-d"])
            .arg(&ini)
            .status()
            .expect("start pgbouncer");
        assert!(
            st.success(),
            "pgbouncer did not start; see {}",
            dir.join("pgbouncer.log").display()
        );
        for _ in 0..50 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Bouncer { pidfile, port }
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

/// Tenant ids of the notes a simple query returns, or the SQLSTATE it failed with.
fn tenants_seen(c: &mut postgres::Client, sql: &str) -> Result<Vec<String>, String> {
    match c.simple_query(sql) {
        Ok(msgs) => Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect()),
        Err(e) => Err(sqlstate::<()>(Err(e))),
    }
}

#[test]
fn pgbouncer_transaction_mode_never_leaks_a_tenant() {
    let cl = Cluster::start("tenancy-pgbouncer", &[KEY_V1], &[]);
    cl.connect()
        .batch_execute(&format!(
            "{SCHEMA}
             CREATE ROLE app_strict LOGIN; CREATE ROLE app_loose LOGIN;
             GRANT SELECT ON notes TO app_strict, app_loose;
             ALTER ROLE app_strict SET pgseal.strict_context = on;"
        ))
        .unwrap();
    let bouncer = Bouncer::start(&cl.dir, cl.port, &["app", "app_strict", "app_loose"]);
    let via = |user: &str| {
        postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user={user} dbname=postgres",
                bouncer.port
            ),
            postgres::NoTls,
        )
        .expect("connect through pgbouncer")
    };

    // Both clients share the single server connection of the pool.
    let pid = |c: &mut postgres::Client| tenants_seen(c, "SELECT pg_backend_pid()::text").unwrap();
    let (mut c1, mut c2) = (via("app"), via("app"));
    assert_eq!(pid(&mut c1), pid(&mut c2), "one server connection");

    // 1. set_tenant per transaction: every transaction sees only its own tenant.
    let mut leaked = 0;
    for round in 0..50 {
        for (c, t) in [(&mut c1, "A"), (&mut c2, "B")] {
            let seen = tenants_seen(
                c,
                &format!(
                    "BEGIN; SELECT pgseal.set_tenant('{t}'); SELECT tenant_id FROM notes; COMMIT"
                ),
            )
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let seen: Vec<_> = seen.into_iter().filter(|s| s.len() == 1).collect();
            assert!(!seen.is_empty(), "round {round}: {t} saw its rows");
            leaked += seen.iter().filter(|s| s.as_str() != t).count();
        }
        // A client that forgets its context gets an error, never the last tenant.
        match tenants_seen(&mut c2, "SELECT tenant_id FROM notes") {
            Err(state) => assert_eq!(state, "42501"),
            Ok(rows) => leaked += rows.len(),
        }
    }
    assert_eq!(leaked, 0, "rows of another tenant seen with set_tenant");

    // 2. Session-level SET with strict_context on: the setting ends with its
    // transaction, so the next client (or the next statement) fails closed.
    let (mut s1, mut s2) = (via("app_strict"), via("app_strict"));
    let mut leaked = 0;
    for _ in 0..50 {
        s1.simple_query("SET app.tenant_id = 'A'").unwrap();
        for c in [&mut s2, &mut s1] {
            match tenants_seen(c, "SELECT tenant_id FROM notes") {
                Err(state) => assert_eq!(state, "42501"),
                Ok(rows) => leaked += rows.len(),
            }
        }
        // Inside one explicit transaction a session SET still works.
        let rows = tenants_seen(
            &mut s1,
            "BEGIN; SET app.tenant_id = 'B'; SELECT tenant_id FROM notes; COMMIT",
        )
        .unwrap();
        leaked += rows
            .iter()
            .filter(|r| r.len() == 1 && r.as_str() != "B")
            .count();
    }
    // A session-level SET hidden under a SET LOCAL of '' at commit (which pops it
    // back) ends with its transaction too.
    tenants_seen(
        &mut s1,
        "BEGIN; SET app.tenant_id = 'A'; SET LOCAL app.tenant_id = ''; COMMIT",
    )
    .unwrap();
    for c in [&mut s2, &mut s1] {
        match tenants_seen(c, "SELECT tenant_id FROM notes") {
            Err(state) => assert_eq!(state, "42501"),
            Ok(rows) => leaked += rows.len(),
        }
    }
    assert_eq!(
        leaked, 0,
        "rows leaked through a session-level SET with strict_context on"
    );

    // 3. A WITH HOLD cursor declared under tenant A is closed at commit, so the next
    // client of the server connection cannot FETCH A's rows from it.
    tenants_seen(
        &mut s1,
        "BEGIN; SELECT pgseal.set_tenant('A'); \
         DECLARE held CURSOR WITH HOLD FOR SELECT tenant_id FROM notes; COMMIT",
    )
    .unwrap();
    assert_eq!(pid(&mut s1), pid(&mut s2), "one server connection");
    assert_eq!(
        tenants_seen(&mut s2, "FETCH ALL FROM held"),
        Err("34000".to_owned()),
        "the next client fetched from a WITH HOLD cursor of tenant A"
    );

    // Control: without strict_context the same pattern does leak, which is why the
    // setting exists (and why this test can fail).
    let (mut l1, mut l2) = (via("app_loose"), via("app_loose"));
    l1.simple_query("SET app.tenant_id = 'A'").unwrap();
    let seen = tenants_seen(&mut l2, "SELECT tenant_id FROM notes")
        .expect("the leak the setting prevents");
    assert!(
        seen.iter().any(|t| t == "A"),
        "client 2 inherited client 1's tenant: {seen:?}"
    );
    // ... and a WITH HOLD cursor outlives its transaction for the next client.
    l1.simple_query("RESET app.tenant_id").unwrap();
    tenants_seen(
        &mut l1,
        "BEGIN; SELECT pgseal.set_tenant('A'); \
         DECLARE held CURSOR WITH HOLD FOR SELECT tenant_id FROM notes; COMMIT",
    )
    .unwrap();
    let seen = tenants_seen(&mut l2, "FETCH ALL FROM held").expect("the held cursor");
    assert_eq!(seen, vec!["A", "A"], "client 2 read client 1's held cursor");
}
