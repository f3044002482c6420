//! The Citus tier (issue 18): pgseal on a coordinator and two workers, tenant tables
//! distributed by tenant. It runs when `make test` installed Citus (PostgreSQL 16 and
//! later, vendored source present: `PGSEAL_CITUS=1`); otherwise each test says that it
//! is skipped.

use pgseal_tests::citus::{self, CitusCluster};
use pgseal_tests::{matrix, sqlstate, Pgseald};

/// Three tables shaped like the single-node matrix's `notes`, each under
/// `tenant_protect`: distributed and then protected, protected and then distributed
/// (co-located), and a reference table (a copy on every node).
const TABLES: [&str; 3] = ["notes", "notes_early", "notes_ref"];

const SCHEMA: &str = "
    CREATE ROLE app LOGIN;
    CREATE TABLE notes (id int, tenant_id text NOT NULL, body text, PRIMARY KEY (tenant_id, id));
    SELECT create_distributed_table('notes', 'tenant_id');
    SELECT pgseal.tenant_protect('notes');
    CREATE TABLE notes_early (id int, tenant_id text NOT NULL, body text, PRIMARY KEY (tenant_id, id));
    SELECT pgseal.tenant_protect('notes_early');
    SELECT create_distributed_table('notes_early', 'tenant_id', colocate_with => 'notes');
    CREATE TABLE notes_ref (id int, tenant_id text NOT NULL, body text, PRIMARY KEY (tenant_id, id));
    SELECT create_reference_table('notes_ref');
    SELECT pgseal.tenant_protect('notes_ref');
    INSERT INTO notes VALUES (1, 'A', 'a1'), (2, 'A', 'a2'), (11, 'B', 'b1');
    INSERT INTO notes_early SELECT * FROM notes;
    INSERT INTO notes_ref SELECT * FROM notes;
    GRANT SELECT, INSERT, UPDATE, DELETE ON notes, notes_early, notes_ref TO app;
";

/// pgseal on the coordinator, distributed (`citus_distribute()`, in a transaction of
/// its own: it reads the workers' key tables over other connections, which must see
/// the extension), then `SCHEMA`.
fn schema(cc: &CitusCluster) {
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute(SCHEMA).unwrap();
}

/// `CREATE EXTENSION pgseal` and `pgseal.citus_distribute()`, one after the other.
fn distributed_pgseal(c: &mut postgres::Client) {
    c.batch_execute("CREATE EXTENSION pgseal").unwrap();
    let done: String = c
        .query_one("SELECT pgseal.citus_distribute()", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        done,
        "pgseal.tenant_keys and pgseal._org_members_copy are now reference tables"
    );
}

fn app(node: &pgseal_tests::Cluster) -> postgres::Client {
    node.connect_as("app")
}

/// The tenants of the rows `sql` returns inside a transaction that first ran
/// `setup`, or the error's SQLSTATE.
fn tenants(c: &mut postgres::Client, setup: &str, sql: &str) -> Result<Vec<String>, String> {
    let mut tx = c.transaction().unwrap();
    if !setup.is_empty() {
        tx.batch_execute(setup).unwrap();
    }
    let r = tx.query(sql, &[]);
    let _ = tx.rollback();
    match r {
        Ok(rows) => {
            let mut t: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            t.sort();
            Ok(t)
        }
        Err(e) => Err(sqlstate::<()>(Err(e))),
    }
}

/// Every placement of `tables`' shards, read directly on its node by `app`: never a
/// row without a tenant (42501, or nothing where the plan never evaluates the
/// policy on an empty shard), only tenant B's rows with tenant B.
fn assert_shards_hold(cc: &CitusCluster, tables: &[&str]) {
    let mut c = cc.coordinator.connect();
    let shards: Vec<(String, i32)> = c
        .query(
            "SELECT shard_name, nodeport FROM citus_shards \
             WHERE table_name::text = ANY ($1) ORDER BY 1, 2",
            &[&tables.to_vec()],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(shards.len() >= 32, "{} shard placements", shards.len());
    for (shard, port) in &shards {
        let mut on = app(cc.node_at(*port as u16));
        let sql = format!("SELECT tenant_id FROM {shard}");
        match tenants(&mut on, "", &sql) {
            Err(state) => assert_eq!(state, "42501", "{shard} on {port}"),
            Ok(rows) => assert!(
                rows.is_empty(),
                "{shard} on {port} without a tenant: {rows:?}"
            ),
        }
        let seen = tenants(&mut on, "SELECT pgseal.set_tenant('B')", &sql)
            .unwrap_or_else(|e| panic!("{shard} on {port}: {e}"));
        assert!(seen.iter().all(|t| t == "B"), "{shard} on {port}: {seen:?}");
    }
}

#[test]
fn pgseal_created_on_the_coordinator_is_usable_on_every_node() {
    if !citus::enabled("pgseal_created_on_the_coordinator_is_usable_on_every_node") {
        return;
    }
    let cc = CitusCluster::start("citus-ext");
    let mut c = cc.coordinator.connect();
    c.batch_execute("CREATE EXTENSION pgseal; CREATE ROLE app LOGIN")
        .unwrap();
    let version: String = c
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pgseal'",
            &[],
        )
        .unwrap()
        .get(0);
    for w in &cc.workers {
        let mut wc = w.connect();
        let on_worker: Option<String> = wc
            .query_opt(
                "SELECT extversion FROM pg_extension WHERE extname = 'pgseal'",
                &[],
            )
            .unwrap()
            .map(|r| r.get(0));
        assert_eq!(
            on_worker.as_deref(),
            Some(version.as_str()),
            "worker {}",
            w.port
        );
        // The role exists there too, and the tenant context fails closed on a worker
        // as on the coordinator.
        let mut a = app(w);
        assert_eq!(
            sqlstate(a.query_one("SELECT pgseal.current_tenant()", &[])),
            "42501",
            "worker {}",
            w.port
        );
        let mut tx = a.transaction().unwrap();
        tx.batch_execute("SELECT pgseal.set_tenant('A')").unwrap();
        let t: String = tx
            .query_one("SELECT pgseal.current_tenant()", &[])
            .unwrap()
            .get(0);
        assert_eq!(t, "A");
    }
}

#[test]
fn the_isolation_matrix_holds_through_every_node() {
    if !citus::enabled("the_isolation_matrix_holds_through_every_node") {
        return;
    }
    let cc = CitusCluster::start("citus-matrix");
    schema(&cc);
    // Through the coordinator and through each worker (Citus's metadata is on every
    // node, so a worker plans distributed queries too).
    for node in cc.nodes() {
        let mut a = app(node);
        for table in TABLES {
            matrix::notes(&mut a, table);
        }
    }
}

#[test]
fn the_tenant_reaches_every_shard_whatever_the_session_did() {
    if !citus::enabled("the_tenant_reaches_every_shard_whatever_the_session_did") {
        return;
    }
    let cc = CitusCluster::start("citus-context");
    schema(&cc);
    let mut a = app(&cc.coordinator);
    let all = "SELECT tenant_id FROM notes";
    let a_rows = Ok(vec!["A".to_string(), "A".to_string()]);

    // Switching tenant after a query has opened the connections to the workers: the
    // workers follow, in the same transaction and after a savepoint's rollback.
    let mut tx = a.transaction().unwrap();
    tx.batch_execute("SELECT pgseal.set_tenant('A')").unwrap();
    assert_eq!(tx.query(all, &[]).unwrap().len(), 2);
    tx.batch_execute("SELECT pgseal.set_tenant('B')").unwrap();
    let seen: Vec<String> = tx
        .query(all, &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(seen, ["B"], "the workers kept the first tenant");
    tx.batch_execute("SAVEPOINT s; SELECT pgseal.set_tenant('A')")
        .unwrap();
    assert_eq!(tx.query(all, &[]).unwrap().len(), 2);
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    let seen: Vec<String> = tx
        .query(all, &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        seen,
        ["B"],
        "a rolled-back set_tenant stayed on the workers"
    );
    tx.rollback().unwrap();

    // A session that turned Citus's propagation of SET off still gets its tenant to
    // the workers through set_tenant; a bare SET LOCAL then fails closed there.
    a.batch_execute("SET citus.propagate_set_commands = 'none'")
        .unwrap();
    assert_eq!(
        tenants(&mut a, "SELECT pgseal.set_tenant('A')", all),
        a_rows
    );
    assert_eq!(
        tenants(&mut a, "SET LOCAL app.tenant_id = 'A'", all),
        Err("42501".into())
    );
    // The next transaction starts without the tenant, on the workers as here.
    assert_eq!(tenants(&mut a, "", all), Err("42501".into()));

    // A session-level tenant (and user) set by a query Citus ran on a worker stays
    // in no session Citus keeps for the coordinator session's later transactions:
    // tenant A's router query sets it on the connection to A's worker, which Citus
    // keeps and uses again for the next transaction's router query to A's shard.
    a.batch_execute("RESET citus.propagate_set_commands")
        .unwrap();
    let mut tx = a.transaction().unwrap();
    tx.batch_execute("SELECT pgseal.set_tenant('A')").unwrap();
    let set = "SELECT pg_catalog.set_config('app.tenant_id', 'A', false), \
               pg_catalog.set_config('app.user_id', 'u-a', false) \
               FROM notes WHERE tenant_id = 'A' AND id = 1";
    assert_eq!(tx.query(set, &[]).unwrap().len(), 1);
    tx.commit().unwrap();
    assert_eq!(
        tenants(
            &mut a,
            "SET LOCAL citus.propagate_set_commands = 'local'; SET LOCAL app.tenant_id = 'A'",
            "SELECT coalesce(pg_catalog.current_setting('app.user_id', true), '') \
             FROM notes WHERE tenant_id = 'A' AND id = 1"
        ),
        Ok(vec![String::new()]),
        "the user a pushed-down query set stayed on the worker"
    );
    assert_eq!(
        tenants(
            &mut a,
            "",
            "SELECT tenant_id FROM notes WHERE tenant_id = 'A'"
        ),
        Err("42501".into()),
        "a later transaction without a tenant ran under the tenant a pushed-down query set"
    );
    // The same, with the session-level value hidden under a SET LOCAL of '' when
    // the transaction commits (which pops it back).
    let mut tx = a.transaction().unwrap();
    tx.batch_execute("SELECT pgseal.set_tenant('A')").unwrap();
    let hidden = "SELECT pg_catalog.set_config('app.tenant_id', 'A', false), \
                  pg_catalog.set_config('app.tenant_id', '', true) \
                  FROM notes WHERE tenant_id = 'A' AND id = 1";
    assert_eq!(tx.query(hidden, &[]).unwrap().len(), 1);
    tx.commit().unwrap();
    assert_eq!(
        tenants(
            &mut a,
            "",
            "SELECT tenant_id FROM notes WHERE tenant_id = 'A'"
        ),
        Err("42501".into()),
        "a tenant hidden under an empty SET LOCAL outlived the pushed-down query's transaction"
    );

    // Each shard, read directly on the node that holds it: its own policy.
    assert_shards_hold(&cc, &TABLES);
}

#[test]
fn isolation_report_understands_citus_tables() {
    if !citus::enabled("isolation_report_understands_citus_tables") {
        return;
    }
    let cc = CitusCluster::start("citus-report");
    let mut c = cc.coordinator.connect();
    let report = |c: &mut postgres::Client| -> Vec<(String, String, String)> {
        c.query(
            "SELECT object, problem, fix FROM pgseal.isolation_report() ORDER BY 1, 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
    };
    // Before pgseal.citus_distribute(): the report names it for a tenant table in
    // Citus, and pgseal writes no ledger entry on the coordinator (tenant_protect
    // records the protection), as it could commit apart from the workers' writes.
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE early (id int, tenant_id text NOT NULL, PRIMARY KEY (tenant_id, id));
         SELECT create_distributed_table('early', 'tenant_id');",
    )
    .unwrap();
    let found = report(&mut c);
    let keys: Vec<_> = found
        .iter()
        .filter(|(o, _, _)| o == "pgseal.tenant_keys")
        .collect();
    assert_eq!(keys.len(), 1, "{found:?}");
    assert_eq!(keys[0].2, "SELECT pgseal.citus_distribute();");
    let r = c.batch_execute("SELECT pgseal.tenant_protect('early')");
    assert_eq!(
        message(r),
        "on a Citus coordinator pgseal writes its ledger only after pgseal.citus_distribute() (without it a ledger entry could commit apart from the transaction's writes on the workers)"
    );
    c.batch_execute(&keys[0].2).unwrap();
    c.batch_execute("SELECT pgseal.tenant_protect('early'); DROP TABLE early")
        .unwrap();
    c.batch_execute(SCHEMA).unwrap();
    c.batch_execute(
        "CREATE TABLE by_id (id int, tenant_id text NOT NULL, PRIMARY KEY (id, tenant_id));
         CREATE INDEX ON by_id (tenant_id);
         SELECT create_distributed_table('by_id', 'id');
         SELECT pgseal.tenant_protect('by_id');",
    )
    .unwrap();
    let found = report(&mut c);
    // Protected tables, distributed or not, are clean: their policies call the tenant
    // functions directly (Citus allows no sub-select there) and that is no finding.
    for t in TABLES {
        let t = format!("public.{t}");
        assert!(found.iter().all(|(o, _, _)| *o != t), "{t}: {found:?}");
    }
    let by_id: Vec<_> = found
        .iter()
        .filter(|(o, _, _)| o == "public.by_id")
        .collect();
    assert_eq!(by_id.len(), 1, "{found:?}");
    assert_eq!(
        by_id[0].1,
        "distributed by id, not by its tenant column tenant_id"
    );
    let propagate: Vec<_> = found
        .iter()
        .filter(|(o, _, _)| o == "citus.propagate_set_commands")
        .collect();
    assert_eq!(propagate.len(), 1, "{found:?}");

    // Each fix it names clears its finding, and the table is still protected.
    c.batch_execute(&by_id[0].2).unwrap();
    // ALTER SYSTEM runs outside a transaction block: one statement at a time, as psql
    // sends them.
    for stmt in propagate[0].2.split_inclusive(';') {
        c.batch_execute(stmt).unwrap();
    }
    let mut fresh = cc.coordinator.connect();
    let left = report(&mut fresh);
    assert!(left.is_empty(), "{left:?}");
    let mut a = app(&cc.coordinator);
    c.batch_execute("INSERT INTO by_id VALUES (1, 'A'), (2, 'B'); GRANT SELECT ON by_id TO app")
        .unwrap();
    assert_eq!(
        tenants(
            &mut a,
            "SELECT pgseal.set_tenant('A')",
            "SELECT tenant_id FROM by_id"
        ),
        Ok(vec!["A".to_string()])
    );
    assert_eq!(
        tenants(&mut a, "", "SELECT tenant_id FROM by_id"),
        Err("42501".into())
    );
}

/// The statement failed with 0A000 and pgseal's message (not PostgreSQL's own
/// refusal, which a remote shard would give without pgseal's hook).
fn refused_by_pgseal<T: std::fmt::Debug>(r: Result<T, postgres::Error>, what: &str) {
    match r {
        Ok(v) => panic!("{what}: accepted ({v:?})"),
        Err(e) => {
            let db = e.as_db_error().unwrap_or_else(|| panic!("{what}: {e}"));
            assert_eq!(db.code().code(), "0A000", "{what}: {db:?}");
            assert!(
                db.message()
                    .contains("is not supported on a table with row level security"),
                "{what}: {}",
                db.message()
            );
        }
    }
}

/// A session with Citus's DDL propagation off cannot protect a table on the
/// coordinator only: the protect functions turn it on for their call. A shard that
/// lost its policy on its node anyway is named by the isolation report.
#[test]
fn protection_reaches_the_shards_whatever_the_session_set() {
    if !citus::enabled("protection_reaches_the_shards_whatever_the_session_set") {
        return;
    }
    let cc = CitusCluster::start("citus-ddl");
    schema(&cc);
    let mut c = cc.coordinator.connect();
    c.batch_execute(
        "SELECT pgseal.tenant_unprotect('notes');
         SET citus.enable_ddl_propagation = off;
         SELECT pgseal.tenant_protect('notes');
         RESET citus.enable_ddl_propagation;",
    )
    .unwrap();
    assert_shards_hold(&cc, &["notes"]);
    let report = |c: &mut postgres::Client| -> Vec<String> {
        c.query(
            "SELECT problem FROM pgseal.isolation_report() WHERE object = 'public.notes'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert_eq!(report(&mut c), Vec::<String>::new());

    // One shard's policy dropped on its node: the report names that placement.
    let (shard, port): (String, i32) = {
        let r = c
            .query_one(
                "SELECT shard_name, nodeport FROM citus_shards WHERE table_name = 'notes'::regclass \
                 ORDER BY shardid LIMIT 1",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    cc.node_at(port as u16)
        .connect()
        .batch_execute(&format!("DROP POLICY pgseal_tenant ON {shard}"))
        .unwrap();
    let found = report(&mut c);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("differs from the table") && found[0].contains(&port.to_string()),
        "{found:?}"
    );
}

/// Citus copies into a shard on the same node without PostgreSQL's check that
/// refuses COPY FROM under row level security, for a COPY and for an INSERT … SELECT
/// it does not push down; pgseal's hooks refuse both first (their message, not
/// PostgreSQL's), on every node, with a tenant or without.
#[test]
fn copy_and_insert_select_cannot_write_another_tenants_rows() {
    if !citus::enabled("copy_and_insert_select_cannot_write_another_tenants_rows") {
        return;
    }
    let cc = CitusCluster::start("citus-copy");
    schema(&cc);
    let mut c = cc.coordinator.connect();
    let before = pgseal_tests::count(&mut c, "SELECT count(*) FROM notes WHERE tenant_id = 'B'");
    for node in cc.nodes() {
        for setup in ["SELECT pgseal.set_tenant('A')", ""] {
            for table in TABLES {
                let mut a = app(node);
                let mut tx = a.transaction().unwrap();
                if !setup.is_empty() {
                    tx.batch_execute(setup).unwrap();
                    // A read first, as an application would: it opens the local
                    // shards (without a tenant it would fail, and end the test).
                    tx.query(&format!("SELECT count(*) FROM {table}"), &[])
                        .unwrap();
                }
                let r = tx
                    .copy_in(&format!("COPY {table} (id, tenant_id, body) FROM STDIN"))
                    .and_then(|mut w| {
                        use std::io::Write;
                        w.write_all(b"900\tB\tplanted\n").unwrap();
                        w.finish()
                    });
                refused_by_pgseal(
                    r,
                    &format!("COPY into {table} through {} ({setup:?})", node.port),
                );
                let _ = tx.rollback();
                // An INSERT … SELECT that Citus does not push down (no distributed
                // table in its SELECT) is copied into the shards the same way.
                // A COPY that failed closes the client's connection: a new one.
                let mut a = app(node);
                let mut tx = a.transaction().unwrap();
                if !setup.is_empty() {
                    tx.batch_execute(setup).unwrap();
                }
                let r = tx.execute(
                    &format!("INSERT INTO {table} (id, tenant_id, body) SELECT 901, 'B', 'planted' FROM generate_series(1, 1)"),
                    &[],
                );
                refused_by_pgseal(
                    r,
                    &format!(
                        "INSERT … SELECT into {table} through {} ({setup:?})",
                        node.port
                    ),
                );
                let _ = tx.rollback();
            }
        }
    }
    for table in TABLES {
        let n = pgseal_tests::count(
            &mut c,
            &format!("SELECT count(*) FROM {table} WHERE tenant_id = 'B'"),
        );
        assert_eq!(n, before, "{table}");
    }
}

/// org_protect under Citus: Citus makes every policy permissive on the shards, so
/// the tenant is part of each; no role of the organisation, and no command, reaches
/// another tenant's rows through any node.
#[test]
fn org_protect_never_crosses_tenants_on_citus() {
    if !citus::enabled("org_protect_never_crosses_tenants_on_citus") {
        return;
    }
    let cc = CitusCluster::start("citus-org");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute(
        "CREATE ROLE app LOGIN;
         CREATE TABLE docs (id int, tenant_id text NOT NULL, owner_id text, org_id text, body text,
                            PRIMARY KEY (tenant_id, id));
         SELECT create_distributed_table('docs', 'tenant_id');
         SELECT pgseal.org_protect('docs', 'owner_id', 'org_id');
         INSERT INTO docs VALUES
             (1, 'A', 'olga', 'org1', 'org doc'), (2, 'A', 'zed', NULL, 'zed personal'),
             (11, 'B', 'olga', 'org1', 'other tenant org doc'), (12, 'B', 'vic', NULL, 'vic in B');
         INSERT INTO pgseal.org_members VALUES
             ('A', 'org1', 'olga', 'owner'), ('A', 'org1', 'adam', 'admin'),
             ('A', 'org1', 'mia', 'member'), ('A', 'org1', 'vic', 'viewer');
         GRANT SELECT, INSERT, UPDATE, DELETE ON docs TO app;",
    )
    .unwrap();
    let b_rows = || {
        let mut c = cc.coordinator.connect();
        c.query(
            "SELECT id, owner_id, body FROM docs WHERE tenant_id = 'B' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get::<_, i32>(0),
                r.get::<_, Option<String>>(1),
                r.get::<_, String>(2),
            )
        })
        .collect::<Vec<_>>()
    };
    let b_before = b_rows();
    for node in cc.nodes() {
        let mut a = app(node);
        for user in ["olga", "adam", "mia", "vic", "zed", "nobody"] {
            for op in matrix::OPS {
                let got = matrix::cell(&mut a, Some(("A", user)), op, "docs");
                assert_eq!(got.cross, 0, "{user} {op} through {}: {got:?}", node.port);
                assert!(
                    got.state == "00000" || got.state == "42501",
                    "{user} {op} through {}: {got:?}",
                    node.port
                );
            }
            // The review's attacks: a row of tenant B owned by oneself, and moving
            // one's own row to tenant B, are both refused.
            for sql in [
                format!("INSERT INTO docs VALUES (900, 'B', '{user}', 'org1', 'planted')"),
                "UPDATE docs SET tenant_id = 'B' WHERE tenant_id = 'A'".to_string(),
            ] {
                let mut tx = a.transaction().unwrap();
                tx.batch_execute(&format!("SELECT pgseal.set_tenant('A', '{user}')"))
                    .unwrap();
                let r = tx.execute(&sql, &[]);
                let moved = matches!(r, Ok(n) if n > 0);
                assert!(!moved, "{sql} as {user} through {}: {r:?}", node.port);
                let _ = tx.commit();
            }
        }
        // vic owns a row in tenant B; in tenant A's context vic sees nothing of it.
        assert_eq!(
            tenants(
                &mut a,
                "SELECT pgseal.set_tenant('A', 'vic')",
                "SELECT tenant_id FROM docs WHERE owner_id = 'vic'"
            ),
            Ok(vec![])
        );
    }
    assert_eq!(b_rows(), b_before);
    // The report finds nothing on it: no restrictive policy, the shards as the table.
    let found: Vec<String> = c
        .query(
            "SELECT problem FROM pgseal.isolation_report() WHERE object = 'public.docs'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(found.is_empty(), "{found:?}");
}

/// The ids of `docs` that `user` of tenant A sees through `node`, or the SQLSTATE.
fn docs_seen(node: &pgseal_tests::Cluster, user: &str) -> Result<Vec<i32>, String> {
    let mut a = app(node);
    let mut tx = a.transaction().unwrap();
    tx.batch_execute(&format!("SELECT pgseal.set_tenant('A', '{user}')"))
        .unwrap();
    let r = tx.query("SELECT id FROM docs ORDER BY id", &[]);
    let _ = tx.rollback();
    r.map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .map_err(|e| sqlstate::<()>(Err(e)))
}

/// Organisation membership reaches every node: on a worker's shards `org_protect`'s
/// policies read the coordinator's membership (its copy, a reference table kept in the
/// transaction of each change), so a member sees the organisation's rows through every
/// node, and a change made through the coordinator holds on every node at its commit.
/// A worker's own `pgseal.org_members` is no way in: no one may change it (0A000), and
/// what a superuser writes there grants nothing.
#[test]
fn organisation_membership_reaches_every_node_from_the_coordinator_only() {
    if !citus::enabled("organisation_membership_reaches_every_node_from_the_coordinator_only") {
        return;
    }
    let cc = CitusCluster::start("citus-orgcopy");
    let mut c = cc.coordinator.connect();
    c.batch_execute("CREATE EXTENSION pgseal").unwrap();
    // A worker holding members of its own: citus_distribute() refuses (they would
    // stop counting there without a word) until they are gone.
    let worker = cc
        .nodes()
        .find(|n| n.port != cc.coordinator.port)
        .expect("a worker");
    let stray = "SET citus.enable_ddl_propagation = off;
         SET session_replication_role = replica;
         ALTER TABLE pgseal.org_members DISABLE TRIGGER org_members_record;
         INSERT INTO pgseal.org_members VALUES ('A', 'org1', 'zed', 'owner');
         ALTER TABLE pgseal.org_members ENABLE ALWAYS TRIGGER org_members_record;";
    worker.connect().batch_execute(stray).unwrap();
    let r = c.query_one("SELECT pgseal.citus_distribute()", &[]);
    let e = r.as_ref().err().and_then(|e| e.as_db_error()).cloned();
    assert_eq!(sqlstate(r), "55000");
    assert!(
        e.unwrap().message().contains(&worker.port.to_string()),
        "the refusal names the worker"
    );
    worker
        .connect()
        .batch_execute("TRUNCATE pgseal.org_members")
        .unwrap();
    let done: String = c
        .query_one("SELECT pgseal.citus_distribute()", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        done,
        "pgseal.tenant_keys and pgseal._org_members_copy are now reference tables"
    );
    c.batch_execute(
        "CREATE ROLE app LOGIN;
         GRANT CREATE ON SCHEMA public TO app;
         CREATE TABLE docs (id int, tenant_id text NOT NULL, owner_id text, org_id text, body text,
                            PRIMARY KEY (tenant_id, id));
         SELECT create_distributed_table('docs', 'tenant_id');
         SELECT pgseal.org_protect('docs', 'owner_id', 'org_id');
         INSERT INTO docs VALUES
             (1, 'A', 'owen', 'org1', 'org1 doc'), (2, 'A', 'zed', NULL, 'zed personal'),
             (3, 'A', 'owen', 'org2', 'org2 doc'), (4, 'B', 'owen', 'org1', 'B org1 doc');
         INSERT INTO pgseal.org_members VALUES
             ('A', 'org1', 'olga', 'owner'), ('A', 'org1', 'mia', 'member'),
             ('A', 'org1', 'vic', 'viewer'), ('A', 'org2', 'olga', 'owner'),
             ('B', 'org1', 'mia', 'owner');
         GRANT SELECT, INSERT, UPDATE, DELETE ON docs TO app;",
    )
    .unwrap();
    // Tenant A's rows are on one worker; every node is asked.
    let holder: i32 = c
        .query_one(
            "SELECT nodeport FROM citus_shards s WHERE table_name = 'docs'::regclass
               AND shardid = get_shard_id_for_distribution_column('docs', 'A')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_ne!(
        holder as u16, cc.coordinator.port,
        "tenant A's shard is on a worker"
    );
    let expect = |who: &[(&str, &[i32])]| {
        for node in cc.nodes() {
            for (user, ids) in who {
                assert_eq!(
                    docs_seen(node, user),
                    Ok(ids.to_vec()),
                    "{user} through {}",
                    node.port
                );
            }
        }
    };
    expect(&[
        ("olga", &[1, 3]),
        ("mia", &[1]),
        ("vic", &[1]),
        ("zed", &[2]),
        ("nobody", &[]),
    ]);

    // Changes through the coordinator, by the organisation's owner: mia leaves org1,
    // nora joins it, vic becomes a member of org2.
    let mut olga = app(&cc.coordinator);
    let mut tx = olga.transaction().unwrap();
    tx.batch_execute(
        "SELECT pgseal.set_tenant('A', 'olga');
         DELETE FROM pgseal.org_members WHERE org_id = 'org1' AND user_id = 'mia';
         INSERT INTO pgseal.org_members VALUES ('A', 'org1', 'nora', 'member');
         UPDATE pgseal.org_members SET org_id = 'org2' WHERE org_id = 'org1' AND user_id = 'vic';",
    )
    .unwrap();
    tx.commit().unwrap();
    expect(&[
        ("olga", &[1, 3]),
        ("mia", &[]),
        ("nora", &[1]),
        ("vic", &[3]),
    ]);
    // A change that rolls back reaches no node.
    let mut tx = olga.transaction().unwrap();
    tx.batch_execute(
        "SELECT pgseal.set_tenant('A', 'olga');
         INSERT INTO pgseal.org_members VALUES ('A', 'org1', 'zed', 'admin');",
    )
    .unwrap();
    tx.rollback().unwrap();
    expect(&[("zed", &[2])]);

    // A row the copy should not hold (a superuser wrote it) is put right by the next
    // change of that member, not a failure of it.
    c.batch_execute("INSERT INTO pgseal._org_members_copy VALUES ('A', 'org1', 'zed', 'admin')")
        .unwrap();
    expect(&[("zed", &[1, 2])]);
    let mut tx = olga.transaction().unwrap();
    tx.batch_execute(
        "SELECT pgseal.set_tenant('A', 'olga');
         INSERT INTO pgseal.org_members VALUES ('A', 'org1', 'zed', 'viewer');",
    )
    .unwrap();
    tx.commit().unwrap();
    let copied: String = c
        .query_one(
            "SELECT role::text FROM pgseal._org_members_copy WHERE user_id = 'zed'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(copied, "viewer");
    let mut tx = olga.transaction().unwrap();
    tx.batch_execute(
        "SELECT pgseal.set_tenant('A', 'olga');
         DELETE FROM pgseal.org_members WHERE user_id = 'zed';",
    )
    .unwrap();
    tx.commit().unwrap();
    expect(&[("zed", &[2])]);

    // The copy's trigger writes for org_members alone: attached elsewhere by a
    // superuser it refuses; an application role cannot attach it.
    c.batch_execute(
        "CREATE TABLE fake_members (tenant_id text, org_id text, user_id text, role pgseal.org_role);
         CREATE TRIGGER fake AFTER INSERT ON fake_members
             FOR EACH ROW EXECUTE FUNCTION pgseal._org_members_copy_sync();",
    )
    .unwrap();
    assert_eq!(
        sqlstate(c.execute(
            "INSERT INTO fake_members VALUES ('A', 'org1', 'zed', 'owner')",
            &[]
        )),
        "42501"
    );
    let mut a = app(&cc.coordinator);
    assert_eq!(
        sqlstate(a.batch_execute(
            "CREATE TABLE my_members (tenant_id text, org_id text, user_id text, role pgseal.org_role);
             CREATE TRIGGER mine AFTER INSERT ON my_members
                 FOR EACH ROW EXECUTE FUNCTION pgseal._org_members_copy_sync();"
        )),
        "42501"
    );
    expect(&[("zed", &[2])]);

    // The copy's placements, on every node that has one.
    let placements: Vec<(String, i32)> = c
        .query(
            "SELECT 'pgseal._org_members_copy_' || s.shardid, n.nodeport
               FROM pg_dist_shard s JOIN pg_dist_placement p ON p.shardid = s.shardid
               JOIN pg_dist_node n ON n.groupid = p.groupid
              WHERE s.logicalrelid = 'pgseal._org_members_copy'::regclass ORDER BY 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(placements.len() >= 2, "{placements:?}");
    for (shard, port) in &placements {
        let mut a = app(cc.node_at(*port as u16));
        assert_eq!(
            sqlstate(a.query(&format!("SELECT count(*) FROM {shard}"), &[])),
            "42501",
            "{shard} on {port}"
        );
    }

    for node in cc.nodes().filter(|n| n.port != cc.coordinator.port) {
        // Through a worker, an owner cannot change membership (its own table there
        // would otherwise be what that worker read).
        let mut a = app(node);
        let mut tx = a.transaction().unwrap();
        tx.batch_execute("SELECT pgseal.set_tenant('A', 'olga')")
            .unwrap();
        let r = tx.execute(
            "INSERT INTO pgseal.org_members VALUES ('A', 'org1', 'zed', 'owner')",
            &[],
        );
        assert_eq!(sqlstate(r), "0A000", "through {}", node.port);
        drop(tx);
        // What a superuser writes into a worker's own table, past its triggers,
        // grants nothing.
        node.connect()
            .batch_execute(
                "SET citus.enable_ddl_propagation = off;
                 ALTER TABLE pgseal.org_members DISABLE TRIGGER ALL;
                 INSERT INTO pgseal.org_members VALUES ('A', 'org1', 'zed', 'owner');",
            )
            .unwrap();
        // Column registrations are made on the coordinator, where they are recorded.
        assert_eq!(
            sqlstate(
                node.connect()
                    .query("SELECT pgseal.subject_register('docs', 'owner_id')", &[])
            ),
            "0A000",
            "a registration through {}",
            node.port
        );
        // Neither the copy nor the function that reads it is open to the caller.
        for sql in [
            "SELECT count(*) FROM pgseal._org_members_copy",
            "SELECT pgseal._replica_orgs('viewer')",
        ] {
            let mut tx = a.transaction().unwrap();
            tx.batch_execute("SELECT pgseal.set_tenant('A', 'olga')")
                .unwrap();
            assert_eq!(
                sqlstate(tx.query(sql, &[])),
                "42501",
                "{sql} through {}",
                node.port
            );
        }
    }
    expect(&[("zed", &[2]), ("olga", &[1, 3])]);
    // The paths that run as the owner under a caller's hijacks: the copy's trigger
    // (writing through Citus, on the coordinator) and the copy's reader (on the
    // worker holding tenant A's shard, which runs the query in the caller's backend).
    // The caller plants, in its own session, operators of a schema of its own first
    // in search_path and pg_temp domains over text and the role type; each calls
    // `pwn`, which names the role it runs as.
    let plant = "CREATE FUNCTION atk_s.pwn() RETURNS boolean LANGUAGE plpgsql AS $f$
             BEGIN RAISE WARNING 'pwn ran as %', current_user; RETURN true; END $f$;
         CREATE FUNCTION atk_s.eq(text, text) RETURNS boolean LANGUAGE sql AS
             'SELECT atk_s.pwn() AND pg_catalog.texteq($1, $2)';
         CREATE OPERATOR atk_s.= (LEFTARG = text, RIGHTARG = text, FUNCTION = atk_s.eq);
         CREATE FUNCTION atk_s.cat(text, text) RETURNS text LANGUAGE sql AS
             'SELECT CASE WHEN atk_s.pwn() THEN pg_catalog.textcat($1, $2) END';
         CREATE OPERATOR atk_s.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = atk_s.cat);
         CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (atk_s.pwn());
         CREATE DOMAIN pg_temp.org_role AS pgseal.org_role CHECK (atk_s.pwn());
         SET search_path = atk_s, pg_catalog, public;";
    c.batch_execute("CREATE ROLE atk LOGIN; GRANT SELECT ON docs TO atk;")
        .unwrap();
    for node in cc.nodes() {
        node.connect()
            .batch_execute(
                "SET citus.enable_ddl_propagation = off;
                 CREATE SCHEMA atk_s AUTHORIZATION atk;",
            )
            .unwrap();
    }
    let ran_as = |node: &pgseal_tests::Cluster, sql: &str| -> Vec<String> {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let sink = seen.clone();
        let mut a = node
            .config()
            .user("atk")
            .notice_callback(move |n| sink.lock().unwrap().push(n.message().to_owned()))
            .connect(postgres::NoTls)
            .unwrap();
        a.batch_execute("SET citus.enable_ddl_propagation = off")
            .unwrap();
        a.batch_execute(plant).unwrap();
        a.batch_execute(sql).unwrap();
        let pwned = seen.lock().unwrap().clone();
        // The probe works: the caller's own statement runs its operator.
        a.batch_execute("SELECT 'a' = 'a'").unwrap();
        assert!(
            seen.lock().unwrap().len() > pwned.len(),
            "the planted operator never ran"
        );
        pwned
    };
    let pwned = ran_as(
        &cc.coordinator,
        "BEGIN;
         SELECT pgseal.set_tenant('A', 'olga');
         INSERT INTO pgseal.org_members VALUES ('A', 'org1', 'pia', 'member');
         UPDATE pgseal.org_members SET role = 'viewer' WHERE user_id = 'pia';
         DELETE FROM pgseal.org_members WHERE user_id = 'pia';
         COMMIT;",
    );
    assert!(
        pwned.iter().all(|m| m == "pwn ran as atk"),
        "the copy's trigger ran the caller's code as another role: {pwned:?}"
    );
    let pwned = ran_as(
        cc.node_at(holder as u16),
        "BEGIN;
         SELECT pgseal.set_tenant('A', 'olga');
         SELECT id FROM docs;
         COMMIT;",
    );
    assert!(
        pwned.iter().all(|m| m == "pwn ran as atk"),
        "the copy's reader ran the caller's code as another role: {pwned:?}"
    );
    // The coordinator's membership is unchanged by all of it.
    let members: Vec<String> = c
        .query(
            "SELECT tenant_id || '/' || org_id || '/' || user_id || '/' || role
               FROM pgseal.org_members ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        members,
        [
            "A/org1/nora/member",
            "A/org1/olga/owner",
            "A/org2/olga/owner",
            "A/org2/vic/viewer",
            "B/org1/mia/owner"
        ]
    );
}

/// `pgseald retention run` against the coordinator deletes every expired row of a
/// distributed, protected table on every shard (it enumerates the tenants with a
/// query Citus can run), keeps the rest, and records its receipts in a chain that
/// verifies.
#[test]
fn pgseald_retention_runs_against_the_coordinator() {
    if !citus::enabled("pgseald_retention_runs_against_the_coordinator") {
        return;
    }
    let cc = CitusCluster::start("citus-retention");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    // The workers print times in another style and zone (Citus does not send them
    // pgseald's): the cursor's times, read on a worker, must still read back.
    for w in &cc.workers {
        let mut wc = w.connect();
        wc.batch_execute("ALTER SYSTEM SET DateStyle = 'SQL, DMY'")
            .unwrap();
        wc.batch_execute("ALTER SYSTEM SET TimeZone = 'Asia/Shanghai'")
            .unwrap();
        wc.batch_execute("SELECT pg_reload_conf()").unwrap();
    }
    c.batch_execute(
        "CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY, tenant_id text NOT NULL,
                              created_at timestamptz NOT NULL, body text, PRIMARY KEY (tenant_id, id));
         SELECT create_distributed_table('events', 'tenant_id');
         SELECT pgseal.tenant_protect('events');
         INSERT INTO events (tenant_id, created_at, body)
         SELECT 't' || (g % 12), CASE WHEN g % 3 = 0 THEN now() - interval '365 days' ELSE now() END, 'row'
         FROM generate_series(1, 6000) g;
         SELECT pgseal.retention_set('events', '30 days');",
    )
    .unwrap();
    // A `timestamp` column (no zone) holds local times: pgseald's session on the
    // coordinator (UTC) cuts them off at its own local time, whatever the workers'
    // zone (eight hours ahead here). Compared with a point in time, each value would
    // be converted under the zone of the worker's connection, a stable function of a
    // column, which Citus refuses in a DELETE (0A000: the run failed).
    c.batch_execute("ALTER SYSTEM SET TimeZone = 'UTC'")
        .unwrap();
    c.batch_execute(
        "SELECT pg_reload_conf();
         CREATE TABLE visits (id bigint GENERATED ALWAYS AS IDENTITY, tenant_id text NOT NULL,
                              seen_at timestamp NOT NULL, PRIMARY KEY (tenant_id, id));
         SELECT create_distributed_table('visits', 'tenant_id');
         SELECT pgseal.retention_set('visits', '1 day', 'seen_at');",
    )
    .unwrap();
    // Each of two tenants: 60 rows 20 hours old (kept), 60 rows 30 hours old.
    let add_visits = "INSERT INTO visits (tenant_id, seen_at) \
         SELECT 'v' || (g % 2), (now() AT TIME ZONE 'UTC') \
                - CASE WHEN g % 4 < 2 THEN interval '20 hours' ELSE interval '30 hours' END \
           FROM generate_series(1, 240) g";
    c.batch_execute(add_visits).unwrap();
    let visits =
        "SELECT count(*) FROM visits WHERE seen_at < (now() AT TIME ZONE 'UTC') - interval '1 day'";
    let visits_kept = "SELECT count(*) FROM visits WHERE seen_at >= (now() AT TIME ZONE 'UTC') - interval '1 day'";
    // Batches of 150: a tenant's 500 expired rows take four (the held cursor over
    // the distributed table materialised, the receipt in the last batch), the
    // tenants with none one (the cursor closed before it is materialised).
    let (code, out) = Pgseald::new(["retention", "run", "--batch", "150"])
        .on(&cc.coordinator)
        .run();
    assert_eq!(code, Some(0), "{out}");
    let expired = "SELECT count(*) FROM events WHERE created_at < now() - interval '30 days'";
    assert_eq!(pgseal_tests::count(&mut c, expired), 0, "{out}");
    assert_eq!(
        pgseal_tests::count(&mut c, "SELECT count(*) FROM events"),
        4000
    );
    assert_eq!(pgseal_tests::count(&mut c, visits), 0, "{out}");
    assert_eq!(pgseal_tests::count(&mut c, visits_kept), 120, "{out}");
    // Every tenant has a receipt with its count (those of g % 3 = 0, t0, t3, t6 and
    // t9, had 500 expired rows each), and its chain verifies.
    let receipts: Vec<(String, String)> = c
        .query(
            "SELECT tenant_id, payload->>'deleted' FROM pgseal.ledger \
             WHERE event = 'retention.deleted' AND payload->>'table' = 'public.events' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut want: Vec<(String, String)> = (0..12)
        .map(|i| {
            let n = if i % 3 == 0 { "500" } else { "0" };
            (format!("t{i}"), n.to_string())
        })
        .collect();
    want.sort();
    assert_eq!(receipts, want, "{out}");
    let receipts: Vec<String> = receipts.into_iter().map(|(t, _)| t).collect();
    for t in &receipts {
        let ok: bool = c
            .query_one("SELECT ok FROM pgseal.ledger_verify($1)", &[t])
            .unwrap()
            .get(0);
        assert!(ok, "{t}");
    }
    // Under pgseal.strict_context (each batch searches again, by time on Citus).
    c.batch_execute(
        "INSERT INTO events (tenant_id, created_at, body)
         SELECT 't' || (g % 12), now() - interval '100 days' + g * interval '1 second', 'old' FROM generate_series(1, 1200) g;",
    )
    .unwrap();
    c.batch_execute(add_visits).unwrap();
    c.batch_execute("ALTER SYSTEM SET pgseal.strict_context = on")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    strict_context_on(&cc.coordinator);
    let (code, out) = Pgseald::new(["retention", "run", "--batch", "30"])
        .on(&cc.coordinator)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(pgseal_tests::count(&mut c, expired), 0, "{out}");
    assert_eq!(
        pgseal_tests::count(&mut c, "SELECT count(*) FROM events"),
        4000
    );
    assert_eq!(out.matches("deleted 100 rows").count(), 12, "{out}");
    assert_eq!(pgseal_tests::count(&mut c, visits), 0, "{out}");
    assert_eq!(pgseal_tests::count(&mut c, visits_kept), 240, "{out}");
}

/// Waits until a new session on `node` has `pgseal.strict_context` on (after an
/// `ALTER SYSTEM` and a reload, which the postmaster takes in its own time).
fn strict_context_on(node: &pgseal_tests::Cluster) {
    let began = std::time::Instant::now();
    loop {
        let on: String = node
            .connect()
            .query_one("SHOW pgseal.strict_context", &[])
            .unwrap()
            .get(0);
        if on == "on" {
            return;
        }
        assert!(
            began.elapsed() < std::time::Duration::from_secs(30),
            "never on"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A reference table's copies keep its rows at different places (here one copy,
/// vacuumed alone, gave its freed room to rows the others appended): retention
/// deletes a Citus table's batches by their time range, never by the places of the
/// copy its cursor read, so every copy loses exactly the expired rows and the
/// copies stay alike.
#[test]
fn pgseald_retention_keeps_a_reference_tables_copies_alike() {
    if !citus::enabled("pgseald_retention_keeps_a_reference_tables_copies_alike") {
        return;
    }
    let cc = CitusCluster::start("citus-retention-ref");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute(
        "CREATE TABLE ref_ev (id int PRIMARY KEY, tenant_id text NOT NULL, created_at timestamptz NOT NULL, body text);
         SELECT create_reference_table('ref_ev');
         INSERT INTO ref_ev SELECT g, 'acme', now() - interval '60 days' + g * interval '1 second', repeat('x', 100)
           FROM generate_series(1, 2000) g;
         DELETE FROM ref_ev WHERE id % 2 = 0;",
    )
    .unwrap();
    let (shard, port): (String, i32) = {
        let r = c
            .query_one(
                "SELECT shard_name, nodeport FROM citus_shards WHERE table_name = 'ref_ev'::regclass \
                 ORDER BY nodeport DESC LIMIT 1",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    cc.node_at(port as u16)
        .connect()
        .batch_execute(&format!("VACUUM {shard}"))
        .unwrap();
    c.batch_execute(
        "INSERT INTO ref_ev SELECT 2000 + g, 'acme', now() - interval '50 days' + g * interval '1 second', repeat('y', 100)
           FROM generate_series(1, 1000) g;
         INSERT INTO ref_ev SELECT 4000 + g, 'acme', now(), 'new' FROM generate_series(1, 100) g;
         SELECT pgseal.retention_set('ref_ev', '30 days');",
    )
    .unwrap();
    let on_copies = |c: &mut postgres::Client, sql: &str| -> Vec<String> {
        c.query(
            "SELECT result FROM run_command_on_placements('ref_ev', $1) ORDER BY nodeport",
            &[&sql],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let places = on_copies(
        &mut c,
        "SELECT md5(string_agg(id || '@' || ctid, ',' ORDER BY id)) FROM %s",
    );
    assert!(places.len() >= 2, "{places:?}");
    assert!(
        places.iter().any(|p| p != &places[0]),
        "the copies hold their rows at the same places: {places:?}"
    );
    let (code, out) = Pgseald::new(["retention", "run", "--batch", "100"])
        .on(&cc.coordinator)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant acme: deleted 2000 rows"), "{out}");
    let left = on_copies(
        &mut c,
        "SELECT count(*) || ' ' || count(*) FILTER (WHERE created_at < now() - interval '30 days') FROM %s",
    );
    assert!(left.iter().all(|l| l == "100 0"), "{left:?}");
    // Under pgseal.strict_context (no held cursor: each batch searches again) too.
    c.batch_execute(
        "INSERT INTO ref_ev SELECT 5000 + g, 'acme', now() - interval '40 days' + g * interval '1 second', 'z'
           FROM generate_series(1, 500) g;",
    )
    .unwrap();
    c.batch_execute("ALTER SYSTEM SET pgseal.strict_context = on")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    strict_context_on(&cc.coordinator);
    let (code, out) = Pgseald::new(["retention", "run", "--batch", "100"])
        .on(&cc.coordinator)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant acme: deleted 500 rows"), "{out}");
    let left = on_copies(
        &mut c,
        "SELECT count(*) || ' ' || count(*) FILTER (WHERE created_at < now() - interval '30 days') FROM %s",
    );
    assert!(left.iter().all(|l| l == "100 0"), "{left:?}");
}

/// `tenant=encryptions` of the keys `filter` (a condition on the key table's
/// columns, `%%` for a `%`) selects, in tenant order, on each copy of the key table.
fn counts_on_copies(c: &mut postgres::Client, filter: &str) -> Vec<String> {
    on_key_copies(
        c,
        &format!(
            "SELECT string_agg(tenant_id || '=' || encryptions, ',' ORDER BY tenant_id) FROM %s WHERE {filter}"
        ),
    )
}

/// Waits up to 20 s until every copy of the key table shows `want` for `filter`
/// (`counts_on_copies`): a worker's counts reach the coordinator through its audit
/// writer, after the transaction.
fn wait_for_counts(c: &mut postgres::Client, filter: &str, want: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let got = counts_on_copies(c, filter);
        if got.iter().all(|g| g == want) && got.len() == 3 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "seal counts per copy: {got:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// What `sql` (with `%s` for the table) returns on each copy of the key table, in
/// the order of the copies' ports.
fn on_key_copies(c: &mut postgres::Client, sql: &str) -> Vec<String> {
    c.query(
        "SELECT result FROM run_command_on_placements('pgseal.tenant_keys', $1) ORDER BY nodeport",
        &[&sql],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A transaction through the coordinator that makes a tenant's key and seals with it
/// on a worker (a query Citus pushes down) is prepared there by Citus's two-phase commit
/// and committed only after the coordinator has committed. The worker's counts wait
/// for that commit: handed over at the `PREPARE`, they reached the coordinator
/// before any copy of the key table held the key, and were lost on every copy. The
/// coordinator's commit is held here (it waits for a synchronous standby that does
/// not exist) while the worker is prepared, for longer than the worker's audit
/// writer takes to retry.
#[test]
fn a_prepared_workers_seal_counts_wait_for_its_commit() {
    if !citus::enabled("a_prepared_workers_seal_counts_wait_for_its_commit") {
        return;
    }
    let cc = CitusCluster::start("citus-prepared-counts");
    schema(&cc);
    let mut c = cc.coordinator.connect();
    for sql in [
        "GRANT pgseal_seal TO app",
        "ALTER SYSTEM SET synchronous_commit = 'local'",
        "ALTER SYSTEM SET synchronous_standby_names = 'pgseal_nobody'",
        "SELECT pg_reload_conf()",
    ] {
        c.batch_execute(sql).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pgseal_tests::count(
        &mut cc.coordinator.connect(),
        "SELECT count(*) FROM pg_settings WHERE name = 'synchronous_standby_names' AND setting = 'pgseal_nobody'",
    ) != 1
    {
        assert!(std::time::Instant::now() < deadline, "the reload was not seen");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A superuser's session: pgseal writes the key as its owner, a superuser, over
    // the connections Citus keeps for that role in the transaction, so the worker's
    // part that seals is the one that holds the new key (another role's part there
    // would not see it before the commit).
    let mut s = cc.coordinator.connect();
    let pid: i32 = s.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let committer = std::thread::spawn(move || {
        s.batch_execute("SET synchronous_commit = on").unwrap();
        let mut tx = s.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant('A')", &[]).unwrap();
        // The tenant's key is made here, on the coordinator, and written to every
        // copy of the key table; then its two rows are sealed on their worker.
        tx.query_one("SELECT pgseal.vault_seal('first', 'c')", &[])
            .unwrap();
        let sealed = tx
            .query(
                "SELECT pgseal.vault_seal(body, 'c') FROM notes WHERE tenant_id = 'A'",
                &[],
            )
            .unwrap();
        assert_eq!(sealed.len(), 2);
        tx.commit()
    });
    // The coordinator's commit waits; the worker holding tenant A's rows is prepared.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let waiting = pgseal_tests::count(
            &mut c,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND wait_event = 'SyncRep'"),
        );
        if waiting == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline && !committer.is_finished(),
            "the commit did not wait"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The worker holding tenant A's rows, which sealed them, is prepared.
    let port: i32 = c
        .query_one(
            "SELECT nodeport FROM citus_shards \
              WHERE shardid = get_shard_id_for_distribution_column('notes', 'A')",
            &[],
        )
        .unwrap()
        .get(0);
    let prepared = pgseal_tests::count(
        &mut cc.node_at(port as u16).connect(),
        "SELECT count(*) FROM pg_prepared_xacts",
    );
    assert_eq!(prepared, 1, "the sealing worker is not prepared");
    // Longer than the writer's retries of counts it could not add (1 s apart).
    std::thread::sleep(std::time::Duration::from_secs(4));
    // No copy shows the key yet (the coordinator's commit is not visible).
    let before = counts_on_copies(&mut c, "tenant_id = 'A'");
    assert!(before.iter().all(|g| !g.contains("A=")), "{before:?}");
    c.execute("SELECT pg_catalog.pg_cancel_backend($1::int4)", &[&pid])
        .unwrap();
    committer
        .join()
        .unwrap()
        .expect("the commit completes once its wait is cancelled");
    // The coordinator's seal and the worker's two, on every copy.
    wait_for_counts(&mut c, "tenant_id = 'A'", "A=3");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(counts_on_copies(&mut c, "tenant_id = 'A'"), vec!["A=3"; 3]);
}

/// Seals in transactions prepared on a worker (here by hand, as Citus prepares its
/// parts) count on every copy of the key table once they commit, whichever session
/// commits them, also after a restart of the worker, and never if they are rolled
/// back: their counts wait in the worker's outbox table, written in the prepared
/// transaction. A read-only transaction that sealed is not prepared.
#[test]
fn a_workers_prepared_seals_count_once_committed_by_any_session() {
    if !citus::enabled("a_workers_prepared_seals_count_once_committed_by_any_session") {
        return;
    }
    let cc = CitusCluster::start("citus-outbox");
    schema(&cc);
    let mut c = cc.coordinator.connect();
    c.batch_execute("SET app.tenant_id = 'P'; SELECT pgseal.vault_seal('first', 'c')")
        .unwrap();
    wait_for_counts(&mut c, "tenant_id = 'P'", "P=1");
    let worker = &cc.workers[0];
    for (gid, seals) in [("pgseal_p1", 3), ("pgseal_p2", 5), ("pgseal_p3", 7)] {
        let mut s = worker.connect();
        s.batch_execute(&format!(
            "BEGIN; SELECT pgseal.set_tenant('P');
             SELECT pgseal.vault_seal('x', 'c') FROM generate_series(1, {seals});
             PREPARE TRANSACTION '{gid}'"
        ))
        .unwrap();
    }
    let mut w = worker.connect();
    // Longer than the writer's retries: nothing counts while they are prepared.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(counts_on_copies(&mut c, "tenant_id = 'P'"), vec!["P=1"; 3]);
    w.batch_execute("COMMIT PREPARED 'pgseal_p1'").unwrap();
    w.batch_execute("ROLLBACK PREPARED 'pgseal_p2'").unwrap();
    wait_for_counts(&mut c, "tenant_id = 'P'", "P=4");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(counts_on_copies(&mut c, "tenant_id = 'P'"), vec!["P=4"; 3]);
    // The third, still prepared, survives a restart of the worker; committed after
    // it (no request for its counts was left in the worker's memory), it counts.
    drop(w);
    worker.restart();
    let mut w = worker.connect();
    w.batch_execute("COMMIT PREPARED 'pgseal_p3'").unwrap();
    wait_for_counts(&mut c, "tenant_id = 'P'", "P=11");
    assert_eq!(
        pgseal_tests::count(&mut w, "SELECT count(*) FROM pgseal._seal_counts_outbox"),
        0
    );
    // A transaction can be made read-only after it wrote (a key, here a seal):
    // it cannot write the outbox, and is not prepared.
    let r = w.batch_execute(
        "BEGIN; SELECT pgseal.set_tenant('P'); SELECT pgseal.vault_seal('x', 'c');
         SET TRANSACTION READ ONLY; PREPARE TRANSACTION 'pgseal_ro'",
    );
    assert_eq!(sqlstate(r), "0A000");
    w.batch_execute("ROLLBACK").unwrap();
    assert_eq!(
        pgseal_tests::count(&mut w, "SELECT count(*) FROM pg_prepared_xacts"),
        0
    );
}

/// The message of `r`'s database error (or "ok").
fn message<T>(r: Result<T, postgres::Error>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_else(|| e.to_string()),
    }
}

/// (id, plaintext) of the tenant's rows of `integrations`, decrypted by a query that
/// Citus sends to the shard's node, in a transaction of its own; or the error.
fn decrypted(c: &mut postgres::Client, tenant: &str) -> Result<Vec<(i32, String)>, String> {
    let mut tx = c.transaction().map_err(|e| message::<()>(Err(e)))?;
    tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])
        .map_err(|e| message::<()>(Err(e)))?;
    let r = tx.query(
        "SELECT id, pgseal.vault_decrypt(token, 'integrations.token') FROM integrations ORDER BY id",
        &[],
    );
    let _ = tx.commit();
    r.map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        .map_err(|e| message::<()>(Err(e)))
}

/// The node that holds `tenant`'s shard of `integrations` (`sealed_integrations`).
fn integrations_node<'a>(cc: &'a CitusCluster, tenant: &str) -> &'a pgseal_tests::Cluster {
    let port: i32 = cc
        .coordinator
        .connect()
        .query_one(
            "SELECT nodeport FROM citus_shards WHERE table_name = 'integrations'::regclass \
             AND shardid = get_shard_id_for_distribution_column('integrations', $1::text)",
            &[&tenant],
        )
        .unwrap()
        .get(0);
    cc.node_at(port as u16)
}

/// `secret-<tenant>-<id>` sealed by tenants t0 … t7, three each, in a distributed,
/// protected `integrations` table, through the coordinator, after
/// `pgseal.citus_distribute()`; `app` may decrypt. Returns the tenants.
fn sealed_integrations(cc: &CitusCluster) -> Vec<String> {
    let mut c = cc.coordinator.connect();
    // The GRANT in a transaction of its own: Citus sends it to the workers over
    // another connection than the CREATE ROLE, which would wait for the first.
    distributed_pgseal(&mut c);
    c.batch_execute("CREATE ROLE app LOGIN").unwrap();
    c.batch_execute(
        "GRANT pgseal_decrypt TO app;
         CREATE TABLE integrations (id int, tenant_id text NOT NULL, token text,
                                    PRIMARY KEY (tenant_id, id));
         SELECT create_distributed_table('integrations', 'tenant_id');
         SELECT pgseal.tenant_protect('integrations');
         GRANT SELECT, INSERT ON integrations TO app;",
    )
    .unwrap();
    let tenants: Vec<String> = (0..8).map(|i| format!("t{i}")).collect();
    let mut a = app(&cc.coordinator);
    for t in &tenants {
        let mut tx = a.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[t]).unwrap();
        for id in 1..=3 {
            tx.execute(
                "INSERT INTO integrations VALUES ($1, $2, pgseal.vault_seal($3, 'integrations.token'))",
                &[&id, t, &format!("secret-{t}-{id}")],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    tenants
}

/// A node that Citus no longer lists among the key table's placements (taken out by
/// hand here, as disabling or removing a node does) may keep its copy, which Citus
/// then no longer updates: a session there that read keys from its copy before
/// stops reading it, and a shred made since reaches it.
#[test]
fn a_node_taken_out_of_the_key_tables_placements_stops_reading_its_copy() {
    if !citus::enabled("a_node_taken_out_of_the_key_tables_placements_stops_reading_its_copy") {
        return;
    }
    let cc = CitusCluster::start("citus-stale-copy");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    let sealed: String = {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant('tx')", &[]).unwrap();
        let v = tx
            .query_one("SELECT pgseal.vault_seal('the secret', 'c')", &[])
            .unwrap()
            .get(0);
        tx.commit().unwrap();
        v
    };
    let decrypt = |s: &mut postgres::Client| -> Result<String, String> {
        let mut tx = s.transaction().map_err(|e| message::<()>(Err(e)))?;
        tx.execute("SELECT pgseal.set_tenant('tx')", &[])
            .map_err(|e| message::<()>(Err(e)))?;
        let r = tx.query_one("SELECT pgseal.vault_decrypt($1, 'c')", &[&sealed]);
        let _ = tx.commit();
        r.map(|r| r.get(0)).map_err(|e| message::<()>(Err(e)))
    };
    // A session on the first worker reads the key from that worker's copy.
    let mut s = cc.workers[0].connect();
    assert_eq!(decrypt(&mut s), Ok("the secret".to_owned()));
    assert_eq!(decrypt(&mut s), Ok("the secret".to_owned()));
    // The worker's placement leaves Citus's metadata on every node; its table stays.
    let group: i32 = cc.workers[0]
        .connect()
        .query_one("SELECT groupid FROM pg_dist_local_group", &[])
        .unwrap()
        .get(0);
    let forget = format!(
        "DELETE FROM pg_dist_placement WHERE groupid = {group} AND shardid IN \
           (SELECT shardid FROM pg_dist_shard WHERE logicalrelid = 'pgseal.tenant_keys'::regclass)"
    );
    for node in cc.nodes() {
        let n = node.connect().execute(&forget, &[]).unwrap();
        assert_eq!(n, 1, "port {}", node.port);
    }
    // A shred through the coordinator now skips that copy, which still holds the key.
    c.batch_execute("SELECT pgseal.tenant_shred('tx')").unwrap();
    let copy_still_active: i64 = cc.workers[0]
        .connect()
        .query_one(
            &format!(
                "SELECT count(*) FROM pgseal.tenant_keys_{} WHERE tenant_id = 'tx' AND state = 'active'",
                c.query_one(
                    "SELECT shardid FROM pg_dist_shard WHERE logicalrelid = 'pgseal.tenant_keys'::regclass",
                    &[]
                )
                .unwrap()
                .get::<_, i64>(0)
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert!(copy_still_active > 0);
    // The session that had read from the copy reads the table through Citus now.
    assert_eq!(
        decrypt(&mut s),
        Err("sealed value's key has been destroyed".to_owned())
    );
    assert_eq!(
        decrypt(&mut cc.workers[0].connect()),
        Err("sealed value's key has been destroyed".to_owned())
    );
}

/// Sealed credentials on a distributed table. With `pgseal.citus_distribute()` the
/// key table is a reference table: values sealed through the coordinator decrypt in
/// queries that Citus runs on the workers (routed to one shard, and fanned out to
/// all), through the coordinator and through each worker; seal counts reach every
/// copy; a rotation, a shred and a master key rewrap through the coordinator take
/// effect on every node, also in sessions that had the key cached.
#[test]
fn sealed_values_decrypt_on_every_node_and_key_changes_reach_them() {
    if !citus::enabled("sealed_values_decrypt_on_every_node_and_key_changes_reach_them") {
        return;
    }
    let cc = CitusCluster::start("citus-vault");
    let tenants = sealed_integrations(&cc);
    let mut c = cc.coordinator.connect();
    let again: String = c
        .query_one("SELECT pgseal.citus_distribute()", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        again,
        "pgseal.tenant_keys and pgseal._org_members_copy are already reference tables"
    );
    let secret = |t: &str, id: i32| format!("secret-{t}-{id}");
    let mut a = app(&cc.coordinator);
    let want = |t: &str| -> Vec<(i32, String)> { (1..=3).map(|id| (id, secret(t, id))).collect() };
    // The tenants' shards are on both workers.
    let nodes: i64 = pgseal_tests::count(
        &mut c,
        "SELECT count(DISTINCT nodeport) FROM citus_shards s \
         WHERE s.table_name = 'integrations'::regclass AND s.shard_size > 0",
    );
    assert!(nodes >= 2, "rows on {nodes} node(s)");

    // Every tenant decrypts through every node; each node has the keys locally.
    let mut sessions: Vec<postgres::Client> = cc.nodes().map(app).collect();
    for s in sessions.iter_mut() {
        for t in &tenants {
            assert_eq!(decrypted(s, t), Ok(want(t)), "{t}");
        }
        // A query over every shard, each decrypting on its node.
        let mut tx = s.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant('t3')", &[]).unwrap();
        let n: i64 = tx
            .query_one(
                "SELECT count(*) FROM integrations \
                 WHERE pgseal.vault_decrypt(token, 'integrations.token') LIKE 'secret-t3-%'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(n, 3);
        tx.commit().unwrap();
    }
    for node in cc.nodes() {
        let placements = pgseal_tests::count(
            &mut node.connect(),
            "SELECT count(*) FROM pg_dist_placement p JOIN pg_dist_shard s USING (shardid) \
             WHERE s.logicalrelid = 'pgseal.tenant_keys'::regclass",
        );
        assert_eq!(placements, 3, "port {}", node.port);
    }
    // Every copy of the key table counts the 24 seals.
    let counts = on_key_copies(&mut c, "SELECT sum(encryptions) FROM %s");
    assert_eq!(counts, vec!["24"; 3]);

    // A rotation through the coordinator: new values name the new key; old and new
    // values decrypt on every node.
    let old_key: String = c
        .query_one(
            "SELECT key_id FROM pgseal.tenant_keys WHERE tenant_id = 't2' AND purpose = 'dek' AND state = 'active'",
            &[],
        )
        .unwrap()
        .get(0);
    // Sessions on every node whose REPEATABLE READ or SERIALIZABLE snapshot
    // predates the rotation, each knowing its node's copy of the key table: the
    // old key, retired since, still decrypts there; a seal, whose key is now one
    // the snapshot does not hold (its count at commit could not reach it), is
    // refused with 40001, and goes through once the transaction starts again.
    let t2_token: String = c
        .query_one(
            "SELECT token FROM integrations WHERE tenant_id = 't2' AND id = 1",
            &[],
        )
        .unwrap()
        .get(0);
    let mut before_rotation: Vec<(String, postgres::Client)> = Vec::new();
    for level in ["REPEATABLE READ", "SERIALIZABLE"] {
        for node in cc.nodes() {
            let mut s = app(node);
            s.batch_execute("BEGIN; SELECT pgseal.set_tenant('t2')")
                .unwrap();
            s.query_one(
                "SELECT pgseal.vault_decrypt($1, 'integrations.token')",
                &[&t2_token],
            )
            .unwrap();
            s.batch_execute(&format!(
                "COMMIT; BEGIN ISOLATION LEVEL {level}; SELECT pgseal.set_tenant('t2'); SELECT 1"
            ))
            .unwrap();
            before_rotation.push((format!("{level}, port {}", node.port), s));
        }
    }
    c.batch_execute("SELECT pgseal.tenant_key_rotate('t2')")
        .unwrap();
    for (who, s) in before_rotation.iter_mut() {
        let old: String = s
            .query_one(
                "SELECT pgseal.vault_decrypt($1, 'integrations.token')",
                &[&t2_token],
            )
            .unwrap()
            .get(0);
        assert_eq!(old, secret("t2", 1), "{who}: the retired key decrypts");
        let seal =
            sqlstate(s.query_one("SELECT pgseal.vault_seal('s', 'integrations.token')", &[]));
        s.batch_execute("ROLLBACK").unwrap();
        assert_eq!(
            seal, "40001",
            "{who}: a seal under a key made since the snapshot"
        );
        let mut tx = s.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant('t2')", &[]).unwrap();
        let again: String = tx
            .query_one("SELECT pgseal.vault_seal('s', 'integrations.token')", &[])
            .unwrap()
            .get(0);
        tx.rollback().unwrap();
        assert!(
            !again.contains(&old_key),
            "{who}: retried, under the new key"
        );
    }
    drop(before_rotation);
    {
        let mut tx = a.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant('t2')", &[]).unwrap();
        tx.execute(
            "INSERT INTO integrations VALUES (4, 't2', pgseal.vault_seal($1, 'integrations.token'))",
            &[&secret("t2", 4)],
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let tokens: Vec<String> = c
        .query(
            "SELECT token FROM integrations WHERE tenant_id = 't2' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tokens[0].contains(&old_key), "{}", tokens[0]);
    assert!(!tokens[3].contains(&old_key), "{}", tokens[3]);
    for s in sessions.iter_mut() {
        let mut w = want("t2");
        w.push((4, secret("t2", 4)));
        assert_eq!(decrypted(s, "t2"), Ok(w));
    }

    // A shred through the coordinator reaches every node, also the sessions that
    // decrypted t1 a moment ago; the other tenants still decrypt there.
    for s in sessions.iter_mut() {
        assert_eq!(decrypted(s, "t1"), Ok(want("t1")));
    }
    // Sessions on every node whose REPEATABLE READ snapshot predates the shred,
    // each knowing its node's copy of the key table (it decrypted there in an
    // earlier transaction): a decrypt, a redact and a seal on that node after the
    // shred are refused, not served with the key as the snapshot has it.
    let t1_token: String = c
        .query_one(
            "SELECT token FROM integrations WHERE tenant_id = 't1' AND id = 1",
            &[],
        )
        .unwrap()
        .get(0);
    let mut old_snapshots: Vec<postgres::Client> = Vec::new();
    for node in cc.nodes() {
        let mut s = app(node);
        s.batch_execute("BEGIN; SELECT pgseal.set_tenant('t1')")
            .unwrap();
        s.query_one(
            "SELECT pgseal.vault_decrypt($1, 'integrations.token')",
            &[&t1_token],
        )
        .unwrap();
        s.batch_execute(
            "COMMIT; BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT pgseal.set_tenant('t1'); SELECT 1",
        )
        .unwrap();
        old_snapshots.push(s);
    }
    c.batch_execute("SELECT pgseal.tenant_shred('t1')").unwrap();
    let shredded_key = t1_token.split(':').nth(1).unwrap().to_owned();
    for (s, node) in old_snapshots.iter_mut().zip(cc.nodes()) {
        for sql in [
            "SELECT pgseal.vault_decrypt($1, 'integrations.token')",
            "SELECT pgseal.vault_redact($1, 4, 'integrations.token')",
        ] {
            s.batch_execute("SAVEPOINT k").unwrap();
            let r = message(s.query_one(sql, &[&t1_token]));
            s.batch_execute("ROLLBACK TO SAVEPOINT k").unwrap();
            assert_eq!(
                r, "sealed value's key has been destroyed",
                "port {}: {sql}",
                node.port
            );
        }
        // A seal finds no active key as committed now: it makes the tenant a new
        // one, never seals under the shredded key.
        let sealed: String = s
            .query_one("SELECT pgseal.vault_seal('new', 'integrations.token')", &[])
            .unwrap()
            .get(0);
        assert!(
            !sealed.contains(&format!(":{shredded_key}:")),
            "port {}: sealed under the shredded key",
            node.port
        );
        s.batch_execute("ROLLBACK").unwrap();
    }
    // A session's first key read on a node, under a snapshot older than the shred.
    let t6_token: String = c
        .query_one(
            "SELECT token FROM integrations WHERE tenant_id = 't6' AND id = 1",
            &[],
        )
        .unwrap()
        .get(0);
    let mut fresh_sessions: Vec<postgres::Client> = Vec::new();
    for node in cc.nodes() {
        let mut s = app(node);
        s.batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT pgseal.set_tenant('t6'); SELECT 1",
        )
        .unwrap();
        fresh_sessions.push(s);
    }
    c.batch_execute("SELECT pgseal.tenant_shred('t6')").unwrap();
    for (s, node) in fresh_sessions.iter_mut().zip(cc.nodes()) {
        let r = message(s.query_one(
            "SELECT pgseal.vault_redact($1, 4, 'integrations.token')",
            &[&t6_token],
        ));
        s.batch_execute("ROLLBACK").unwrap();
        assert_eq!(
            r, "sealed value's key has been destroyed",
            "port {}: a first read",
            node.port
        );
    }
    drop(old_snapshots);
    for (s, node) in sessions.iter_mut().zip(cc.nodes()) {
        assert_eq!(
            decrypted(s, "t1"),
            Err("sealed value's key has been destroyed".to_owned()),
            "port {}",
            node.port
        );
        assert_eq!(decrypted(s, "t5"), Ok(want("t5")), "port {}", node.port);
        assert_eq!(
            decrypted(&mut app(node), "t1"),
            Err("sealed value's key has been destroyed".to_owned()),
            "port {}",
            node.port
        );
    }
    drop(sessions);
    drop(a);
    drop(c);

    // A new master key version on every node, and kek_rewrap through the
    // coordinator: every copy is under version 2, and every node still decrypts.
    for n in cc.nodes() {
        n.set_keys(&[pgseal_tests::KEY_V1, pgseal_tests::KEY_V2]);
        n.restart();
    }
    let mut c = cc.coordinator.connect();
    assert!(pgseal_tests::kek_rewrap_until_done(&mut c) > 0);
    let versions = on_key_copies(
        &mut c,
        "SELECT string_agg(DISTINCT kek_version::text, ',') FROM %s WHERE state <> 'destroyed'",
    );
    assert_eq!(versions, vec!["2"; 3]);
    for node in cc.nodes() {
        let mut s = app(node);
        for t in ["t0", "t7"] {
            assert_eq!(decrypted(&mut s, t), Ok(want(t)), "port {}", node.port);
        }
    }
}

/// Each tenant's (entries, highest seq, ledger_verify ok) in the coordinator's ledger.
fn chains(c: &mut postgres::Client, tenants: &[String]) -> Vec<(String, i64, i64, bool)> {
    tenants
        .iter()
        .map(|t| {
            let r = c
                .query_one(
                    "SELECT count(*), coalesce(max(seq), 0), (SELECT ok FROM pgseal.ledger_verify($1)) \
                     FROM pgseal.ledger WHERE tenant_id = $1",
                    &[t],
                )
                .unwrap();
            (t.clone(), r.get(0), r.get(1), r.get(2))
        })
        .collect()
}

/// The number of `event` entries of `tenant` in the coordinator's ledger.
fn entries(c: &mut postgres::Client, tenant: &str, event: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = $1 AND event = $2",
        &[&tenant, &event],
    )
    .unwrap()
    .get(0)
}

/// The ledger is kept on the coordinator, one chain per tenant. A decrypt that Citus
/// runs on a worker is recorded there before its plaintext returns (also when its
/// transaction then rolls back, with the count at its end); a decrypt on a worker
/// under `audit_decrypt = commit` is refused (0A000); decrypts through every node at once, and a
/// worker killed (-9) in the middle of them, leave every tenant one gapless chain
/// that verifies, and nothing in the workers' own ledgers.
#[test]
fn the_ledger_is_one_chain_per_tenant_on_the_coordinator() {
    if !citus::enabled("the_ledger_is_one_chain_per_tenant_on_the_coordinator") {
        return;
    }
    let cc = CitusCluster::start("citus-ledger");
    let tenants = sealed_integrations(&cc);
    let want = |t: &str| -> Vec<(i32, String)> {
        (1..=3).map(|id| (id, format!("secret-{t}-{id}"))).collect()
    };
    let mut c = cc.coordinator.connect();

    // Through a worker, in a transaction left open: the start is on the coordinator
    // before the plaintext is back; after the rollback, the count is too.
    let mut w = app(&cc.workers[0]);
    let started = entries(&mut c, "t4", "vault.decrypt_started");
    let counted = entries(&mut c, "t4", "vault.decrypt");
    let mut tx = w.transaction().unwrap();
    tx.execute("SELECT pgseal.set_tenant('t4')", &[]).unwrap();
    let n = tx
        .query(
            "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
            &[],
        )
        .unwrap()
        .len();
    assert_eq!(n, 3);
    assert_eq!(entries(&mut c, "t4", "vault.decrypt_started"), started + 1);
    tx.rollback().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while entries(&mut c, "t4", "vault.decrypt") == counted {
        assert!(
            std::time::Instant::now() < deadline,
            "no count after the rollback"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let outcome: String = c
        .query_one(
            "SELECT payload->>'outcome' FROM pgseal.ledger WHERE tenant_id = 't4' \
             AND event = 'vault.decrypt' ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(outcome, "rolled back");

    // The worker's audit writer keeps its one connection to the coordinator across
    // entries; after a restart of the coordinator it makes a new one, and the next
    // decrypt is recorded.
    let links = |c: &mut postgres::Client| -> Vec<i32> {
        c.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgseal audit writer' ORDER BY pid",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let decrypt_on_worker = |w: &mut postgres::Client| {
        let mut tx = w.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant('t4')", &[]).unwrap();
        let n = tx
            .query(
                "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
                &[],
            )
            .unwrap()
            .len();
        assert_eq!(n, 3);
        tx.commit().unwrap();
    };
    let first = links(&mut c);
    assert_eq!(first.len(), 1, "{first:?}");
    decrypt_on_worker(&mut w);
    decrypt_on_worker(&mut w);
    assert_eq!(links(&mut c), first);
    assert_eq!(entries(&mut c, "t4", "vault.decrypt_started"), started + 3);
    drop(c);
    cc.coordinator.restart();
    let mut c = cc.coordinator.connect();
    let mut w = app(&cc.workers[0]);
    decrypt_on_worker(&mut w);
    assert_eq!(entries(&mut c, "t4", "vault.decrypt_started"), started + 4);
    let again = links(&mut c);
    assert_eq!(again.len(), 1, "{again:?}");

    // What the coordinator's database owner may set for every session there (kept
    // to the coordinator: Citus would send them to the workers too) (read
    // only by default, idle sessions ended, another role) neither stops the audit
    // nor ends the writer's connection.
    let db: String = c
        .query_one("SELECT current_database()", &[])
        .unwrap()
        .get(0);
    c.batch_execute(&format!(
        "SET citus.enable_ddl_propagation = off; CREATE ROLE audit_nobody; \
         ALTER DATABASE \"{db}\" SET default_transaction_read_only = on; \
         ALTER DATABASE \"{db}\" SET idle_session_timeout = '300ms'; \
         ALTER DATABASE \"{db}\" SET role = audit_nobody"
    ))
    .unwrap();
    drop(c);
    cc.coordinator.restart();
    decrypt_on_worker(&mut w);
    std::thread::sleep(std::time::Duration::from_millis(800));
    decrypt_on_worker(&mut w);
    let mut c = cc.coordinator.connect();
    c.batch_execute("SET ROLE NONE").unwrap();
    assert_eq!(entries(&mut c, "t4", "vault.decrypt_started"), started + 6);
    let kept = links(&mut c);
    assert_eq!(kept.len(), 1, "{kept:?}");
    c.batch_execute(&format!(
        "BEGIN READ WRITE; SET LOCAL citus.enable_ddl_propagation = off; ALTER DATABASE \"{db}\" RESET default_transaction_read_only; \
         ALTER DATABASE \"{db}\" RESET idle_session_timeout; ALTER DATABASE \"{db}\" RESET role; COMMIT"
    ))
    .unwrap();
    let pid_before = kept[0];
    drop(c);
    let mut c = cc.coordinator.connect();
    decrypt_on_worker(&mut w);
    assert_eq!(links(&mut c), vec![pid_before]);

    // On a worker, a commit-mode decrypt is refused.
    let mut su = cc.workers[1].connect();
    let mut tx = su.transaction().unwrap();
    // After set_tenant, so Citus sends the setting along to the worker with t1's rows.
    tx.batch_execute("SELECT pgseal.set_tenant('t1'); SET LOCAL pgseal.audit_decrypt = commit")
        .unwrap();
    let r = tx.query(
        "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations WHERE tenant_id = 't1'",
        &[],
    );
    assert_eq!(
        message(r),
        "on a Citus worker, vault_decrypt needs pgseal.audit_decrypt = on (the decrypts are recorded on the coordinator by the audit writer)"
    );
    tx.rollback().unwrap();

    // Decrypts through the coordinator and both workers at once, then more through
    // the coordinator while a worker is killed and started again.
    let threads: Vec<_> = cc
        .nodes()
        .map(|node| {
            let mut s = app(node);
            let tenants = tenants.clone();
            std::thread::spawn(move || {
                for round in 0..15 {
                    let t = &tenants[round % tenants.len()];
                    let got = decrypted(&mut s, t);
                    assert_eq!(
                        got,
                        Ok((1..=3).map(|id| (id, format!("secret-{t}-{id}"))).collect())
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let tenants = tenants.clone();
        let config = cc.coordinator.config();
        std::thread::spawn(move || {
            let mut ok = 0;
            let mut i = 0;
            let connect = || config.clone().user("app").connect(postgres::NoTls).ok();
            let mut s = connect();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Transactions whose shard is on the killed worker fail, and Citus
                // passes the worker's FATAL on to the session: connect again.
                match s.as_mut() {
                    Some(c) if !c.is_closed() => {
                        if decrypted(c, &tenants[i % tenants.len()]).is_ok() {
                            ok += 1;
                        }
                    }
                    _ => s = connect(),
                }
                i += 1;
            }
            ok
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(700));
    cc.workers[1].crash();
    std::thread::sleep(std::time::Duration::from_millis(700));
    cc.workers[1].resume();
    std::thread::sleep(std::time::Duration::from_millis(700));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ok = load.join().unwrap();
    assert!(ok > 0, "no decrypt got through");
    for node in cc.nodes() {
        assert_eq!(decrypted(&mut app(node), "t6"), Ok(want("t6")));
    }

    // Every tenant: one chain on the coordinator, gapless, verifying; nothing on the
    // workers.
    for (t, n, max, ok) in chains(&mut c, &tenants) {
        assert!(
            n > 0 && n == max && ok,
            "{t}: {n} entries, last seq {max}, ok {ok}"
        );
    }
    for wk in &cc.workers {
        assert_eq!(
            pgseal_tests::count(&mut wk.connect(), "SELECT count(*) FROM pgseal.ledger"),
            0,
            "port {}",
            wk.port
        );
    }
}

/// A worker's audit writer waiting for the coordinator's answer to a forwarded
/// decrypt entry gives the wait up when it is asked to stop: a fast shutdown of the
/// worker while the coordinator is silent (its session for the writer stopped with
/// SIGSTOP) ends within seconds, not after the answer's 10 s deadline. The decrypt
/// that waited fails (it is never answered as recorded), and after both are running
/// again the next decrypt is recorded.
#[test]
fn a_workers_audit_writer_stops_at_once_while_the_coordinator_is_silent() {
    if !citus::enabled("a_workers_audit_writer_stops_at_once_while_the_coordinator_is_silent") {
        return;
    }
    let cc = CitusCluster::start("citus-writer-stop");
    sealed_integrations(&cc);
    let mut c = cc.coordinator.connect();
    let worker = integrations_node(&cc, "t5");
    let want: Vec<(i32, String)> = (1..=3).map(|id| (id, format!("secret-t5-{id}"))).collect();
    assert_eq!(decrypted(&mut app(worker), "t5"), Ok(want.clone()));
    let recorded = entries(&mut c, "t5", "vault.decrypt_started");
    // The coordinator's sessions of the workers' writers, stopped.
    let writers: Vec<i32> = c
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgseal audit writer'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!writers.is_empty());
    let signal = |sig: &str| {
        for pid in &writers {
            let st = std::process::Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .unwrap();
            assert!(st.success(), "kill {sig} {pid}");
        }
    };
    signal("-STOP");
    let waiting = {
        let mut s = app(worker);
        std::thread::spawn(move || decrypted(&mut s, "t5"))
    };
    // The decrypt is waiting for its record (its backend on the worker still runs
    // the statement) before the worker is stopped.
    let mut su = worker.connect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while pgseal_tests::count(
        &mut su,
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%vault_decrypt%' \
           AND pid <> pg_backend_pid()",
    ) == 0
    {
        assert!(std::time::Instant::now() < deadline, "the decrypt is not waiting");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(su);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let began = std::time::Instant::now();
    worker.stop();
    let took = began.elapsed();
    signal("-CONT");
    assert!(
        took < std::time::Duration::from_secs(5),
        "the worker took {took:?} to stop while its audit writer waited for the coordinator"
    );
    assert!(
        waiting.join().unwrap().is_err(),
        "the waiting decrypt returned plaintext"
    );
    worker.resume();
    assert_eq!(decrypted(&mut app(worker), "t5"), Ok(want));
    // The waiting decrypt may have been recorded (its entry was sent before the
    // coordinator went silent) or not; the one after the restart was.
    let now = entries(&mut c, "t5", "vault.decrypt_started");
    assert!(
        now == recorded + 1 || now == recorded + 2,
        "{recorded} then {now}"
    );
}

/// A decrypting transaction on a worker ends while the coordinator is down: its
/// count entry, which the worker's audit writer forwards after the commit and
/// nobody waits for, fails to reach the coordinator. It is tried again until its
/// deadline, so it is recorded once the coordinator is back (it was dropped at the
/// first failure, with a LOG line).
#[test]
fn a_workers_decrypt_count_survives_a_coordinator_restart() {
    if !citus::enabled("a_workers_decrypt_count_survives_a_coordinator_restart") {
        return;
    }
    let cc = CitusCluster::start("citus-count-retry");
    sealed_integrations(&cc);
    let mut c = cc.coordinator.connect();
    let worker = integrations_node(&cc, "t6");
    let counts = |c: &mut postgres::Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 't6' AND event = 'vault.decrypt' \
               AND payload->>'count' = '3' AND payload->>'outcome' = 'committed'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(counts(&mut c), 0);
    drop(c);
    let mut s = app(worker);
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT pgseal.set_tenant('t6')", &[]).unwrap();
    let rows = tx
        .query(
            "SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 3);
    // The started entry is on record; now the coordinator goes, and the
    // transaction ends on the worker alone.
    cc.coordinator.stop();
    tx.commit().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    cc.coordinator.resume();
    let mut c = cc.coordinator.connect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while counts(&mut c) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the count of a transaction that ended while the coordinator was down was never recorded"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(counts(&mut c), 1);
}

/// pgseal's own statements on the key table run as the extension owner and Citus
/// sends them to every node as text, after replaying the caller's `SET LOCAL`s there:
/// an application role that sets its `search_path` to a schema with its own `bytea`
/// and `text` (domains whose check calls its function) must not get that function
/// run as the owner on another node when its first seal makes a key, or when its
/// first ledger entry on a worker makes the tenant's ledger key and is sent to the
/// coordinator, nor see the wrapped key in Citus's logging of the commands it sends.
#[test]
fn key_writes_through_citus_ignore_the_callers_settings() {
    if !citus::enabled("key_writes_through_citus_ignore_the_callers_settings") {
        return;
    }
    let cc = CitusCluster::start("citus-keywrite");
    let mut c = cc.coordinator.connect();
    c.batch_execute("CREATE EXTENSION pgseal; CREATE ROLE app LOGIN")
        .unwrap();
    c.batch_execute(
        "GRANT pgseal_seal, pgseal_ledger TO app;
         CREATE SCHEMA evil AUTHORIZATION app;
         SELECT pgseal.citus_distribute();",
    )
    .unwrap();
    let mut a = app(&cc.coordinator);
    a.batch_execute(
        "CREATE FUNCTION evil.pwn(x anyelement) RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN
             IF current_setting('is_superuser') = 'on' THEN
                 EXECUTE 'CREATE TABLE IF NOT EXISTS public.ran_as_superuser (x int)';
             END IF;
             RETURN true;
         END $$;
         CREATE DOMAIN evil.bytea AS pg_catalog.bytea CHECK (evil.pwn(VALUE));
         CREATE DOMAIN evil.text AS pg_catalog.text CHECK (evil.pwn(VALUE));
         CREATE DOMAIN evil.int4 AS pg_catalog.int4 CHECK (evil.pwn(VALUE));
         CREATE DOMAIN evil.int8 AS pg_catalog.int8 CHECK (evil.pwn(VALUE));
         CREATE DOMAIN evil.jsonb AS pg_catalog.jsonb CHECK (evil.pwn(VALUE));
         CREATE DOMAIN evil.text_array AS pg_catalog.text[] CHECK (evil.pwn(VALUE));",
    )
    .unwrap();
    // Through every node: seal (a new key, written to every copy), and seal again
    // (the count written back to every copy); then a ledger entry, which a worker
    // sends to the coordinator as the owner after making the tenant's ledger key,
    // and its two-phase request.
    for (i, node) in cc.nodes().enumerate() {
        let tenant = format!("victim{i}");
        // The notices the session receives.
        let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = notices.clone();
        let mut cfg = node.config();
        cfg.user("app").notice_callback(move |n| {
            seen.lock().unwrap().push(n.message().to_owned());
        });
        let mut s = cfg.connect(postgres::NoTls).unwrap();
        // Citus's command logging for the session (not sent to the workers), and
        // the parse settings pgseal pins, sent to the workers.
        s.batch_execute(
            "SET citus.log_remote_commands = on; SET citus.log_local_commands = on;
             SET client_min_messages = debug1; SET debug_print_parse = on",
        )
        .unwrap();
        let mut tx = s.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])
            .unwrap();
        tx.batch_execute(
            "SET LOCAL search_path = evil, pg_catalog;
             SET LOCAL standard_conforming_strings = off;",
        )
        .unwrap();
        let sealed: String = tx
            .query_one("SELECT pgseal.vault_seal('s3cret', 'c')", &[])
            .unwrap()
            .get(0);
        tx.query_one("SELECT pgseal.vault_seal('again', 'c')", &[])
            .unwrap();
        let seq: i64 = tx
            .query_one(
                "SELECT seq FROM pgseal.ledger_append('order.placed', '{\"n\": 1}', 'alice', ARRAY['s1'])",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(seq, 1);
        // The caller's settings are as it left them, here and for its later queries.
        let path: String = tx
            .query_one("SELECT current_setting('search_path')", &[])
            .unwrap()
            .get(0);
        assert_eq!(path, "evil, pg_catalog");
        let kept: Vec<String> = tx
            .query_one(
                "SELECT ARRAY[current_setting('client_min_messages'), current_setting('debug_print_parse'), \
                 current_setting('citus.log_remote_commands'), current_setting('standard_conforming_strings')]",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(kept, vec!["debug1", "on", "on", "off"]);
        tx.commit().unwrap();
        assert!(sealed.starts_with("v2:"), "{sealed}");
        let notices = notices.lock().unwrap();
        assert!(
            notices
                .iter()
                .all(|n| !n.contains("tenant_keys") && !n.contains(":constvalue")),
            "port {}: {notices:?}",
            node.port
        );
    }
    for node in cc.nodes() {
        let ran = pgseal_tests::count(
            &mut node.connect(),
            "SELECT count(*) FROM pg_class WHERE relname = 'ran_as_superuser'",
        );
        assert_eq!(
            ran, 0,
            "the caller's function ran as a superuser on port {}",
            node.port
        );
    }
    // Both seals of each node's transaction are counted on every copy, the
    // workers' through their audit writers (handed over once the transaction's
    // commit, the new key's included, is complete on every node: counts handed
    // over before it missed the copy of a node that had not committed the key yet).
    wait_for_counts(
        &mut c,
        "tenant_id IN ('victim0', 'victim1', 'victim2') AND purpose = 'dek'",
        "victim0=2,victim1=2,victim2=2",
    );
    // The same for twenty new keys made on the workers, each counted by its audit
    // writer right after the transaction that made it.
    for (i, worker) in cc.workers.iter().cycle().take(20).enumerate() {
        let mut s = app(worker);
        let mut tx = s.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&format!("fresh{i:02}")])
            .unwrap();
        tx.batch_execute("SELECT pgseal.vault_seal('a', 'c'), pgseal.vault_seal('b', 'c')")
            .unwrap();
        tx.commit().unwrap();
    }
    let want = (0..20)
        .map(|i| format!("fresh{i:02}=2"))
        .collect::<Vec<_>>()
        .join(",");
    wait_for_counts(&mut c, "tenant_id LIKE 'fresh%%'", &want);
    // And they stay so: no count is added twice.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        counts_on_copies(&mut c, "tenant_id LIKE 'fresh%%'"),
        vec![want; 3]
    );
    // A SET LOCAL sent in one message with other statements: Citus is given the SET
    // alone, so the DO is not replayed on the owner's connections; and a setting
    // pgseal does not pin (work_mem here, client_min_messages or debug output
    // elsewhere) makes pgseal refuse to send its own statements (0A000) rather than
    // have them run under it.
    let mut s = app(&cc.workers[0]);
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT pgseal.set_tenant('victim9')", &[])
        .unwrap();
    tx.batch_execute(
        "SET LOCAL work_mem = '4MB'; DO $x$ BEGIN
             IF current_setting('is_superuser') = 'on' THEN
                 PERFORM set_config('citus.enable_ddl_propagation', 'off', true);
                 EXECUTE 'ALTER ROLE app SUPERUSER';
             END IF;
         END $x$",
    )
    .unwrap();
    let r = tx.query_one("SELECT pgseal.vault_seal('x', 'c')", &[]);
    assert_eq!(sqlstate(r), "0A000");
    drop(tx);
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT pgseal.set_tenant('victim9')", &[])
        .unwrap();
    tx.batch_execute("SET LOCAL client_min_messages = debug1; SET LOCAL debug_print_parse = on")
        .unwrap();
    let r = tx.query_one("SELECT pgseal.vault_seal('x', 'c')", &[]);
    assert_eq!(sqlstate(r), "0A000");
    drop(tx);
    // Time limits are harmless to replay, so pgseal's statements go ahead: the DO
    // sent along must not be replayed with them.
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT pgseal.set_tenant('victim9')", &[])
        .unwrap();
    tx.batch_execute(
        "SET LOCAL statement_timeout = '30s'; DO $x$ BEGIN
             IF current_setting('is_superuser') = 'on' THEN
                 PERFORM set_config('citus.enable_ddl_propagation', 'off', true);
                 EXECUTE 'ALTER ROLE app SUPERUSER';
             END IF;
         END $x$",
    )
    .unwrap();
    tx.query_one("SELECT pgseal.vault_seal('x', 'c')", &[])
        .unwrap();
    tx.commit().unwrap();
    // Two harmless settings whose texts, joined by Citus into the message that
    // begins each new connection, would comment a DO into it: Citus is given texts
    // pgseal rebuilt from the parsed SETs instead.
    let escalate = "DO $x$ BEGIN IF current_setting($q$is_superuser$q$) = $q$on$q$ THEN \
         PERFORM set_config($q$citus.enable_ddl_propagation$q$, $q$off$q$, true); \
         EXECUTE $q$ALTER ROLE app SUPERUSER$q$; END IF; END $x$;";
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT pgseal.set_tenant('victim10')", &[])
        .unwrap();
    tx.batch_execute(&format!(
        "DO $d$ BEGIN
             EXECUTE 'SET LOCAL statement_timeout = ''30s'' --';
             EXECUTE E'SET LOCAL lock_timeout = ''30s'' /*\\n{} --*/\\n';
         END $d$",
        escalate.replace('\'', "''")
    ))
    .unwrap();
    tx.query_one("SELECT pgseal.vault_seal('x', 'c')", &[])
        .unwrap();
    tx.commit().unwrap();
    for node in cc.nodes() {
        let su: bool = node
            .connect()
            .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'app'", &[])
            .unwrap()
            .get(0);
        assert!(!su, "app became a superuser on port {}", node.port);
    }

    // pgseald's reads of Citus tables as the owner, called by a pgseal_admin with
    // its search_path sent along: the tenant scan pins the workers' parsing (a
    // varchar tenant column's cast to text would find evil.text), and so do the
    // key usage and rotation reads (`_citus_owner_check`): none runs evil code.
    c.batch_execute(
        "GRANT pgseal_admin TO app;
         CREATE TABLE things (id int, tenant_id varchar(20) NOT NULL, PRIMARY KEY (tenant_id, id));
         SELECT create_distributed_table('things', 'tenant_id');
         INSERT INTO things VALUES (1, 'a'), (2, 'b');
         GRANT SELECT, DELETE ON things TO app;",
    )
    .unwrap();
    let mut a = app(&cc.coordinator);
    let mut tx = a.transaction().unwrap();
    tx.batch_execute("SELECT pgseal.set_tenant('ops'); SET LOCAL search_path = evil, pg_catalog")
        .unwrap();
    let scanned: Vec<String> = tx
        .query(
            "SELECT * FROM pgseal._tenants_of('public.things') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(scanned, vec!["a", "b"]);
    drop(tx);
    // Local execution off: the coordinator's own copy is read through Citus too.
    a.batch_execute("SET citus.enable_local_execution = off")
        .unwrap();
    for q in [
        "SELECT count(*) FROM pgseal._key_usage()",
        "SELECT count(*) FROM pgseal._rotation_due('1 day')",
    ] {
        let mut tx = a.transaction().unwrap();
        tx.batch_execute(
            "SELECT pgseal.set_tenant('ops'); SET LOCAL search_path = evil, pg_catalog",
        )
        .unwrap();
        assert_eq!(sqlstate(tx.query_one(q, &[])), "00000", "{q}");
        // ... and the workers parse the caller's later statements as it had them.
        let path: String = tx
            .query_one(
                "SELECT pg_catalog.current_setting('search_path') FROM public.things \
                 WHERE tenant_id OPERATOR(pg_catalog.=) 'a' AND id OPERATOR(pg_catalog.=) 1",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(path, "evil, pg_catalog", "{q}");
    }
    for node in cc.nodes() {
        let ran = pgseal_tests::count(
            &mut node.connect(),
            "SELECT count(*) FROM pg_class WHERE relname = 'ran_as_superuser'",
        );
        assert_eq!(
            ran, 0,
            "the caller's function ran as a superuser on port {}",
            node.port
        );
    }

    // Every copy holds the same keys, byte for byte, and the same counts.
    let copies = on_key_copies(&mut c, "SELECT md5(string_agg(key_id || encode(wrapped, 'hex') || encryptions, ',' ORDER BY key_id)) FROM %s");
    assert_eq!(copies.len(), 3);
    assert!(copies.iter().all(|h| *h == copies[0]), "{copies:?}");
}

/// A key cached on the coordinator before `citus_distribute()` is read again after
/// it: a change to the key table made through a worker then reaches a session that
/// had the key cached all along.
#[test]
fn keys_cached_before_distribution_follow_the_reference_table() {
    if !citus::enabled("keys_cached_before_distribution_follow_the_reference_table") {
        return;
    }
    let cc = CitusCluster::start("citus-precache");
    let mut c = cc.coordinator.connect();
    c.batch_execute("CREATE EXTENSION pgseal").unwrap();
    let mut s = cc.coordinator.connect();
    let decrypt = |s: &mut postgres::Client, sealed: &str| -> Result<String, String> {
        let mut tx = s.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant('tx')", &[]).unwrap();
        let r = tx.query_one("SELECT pgseal.vault_decrypt($1, 'c')", &[&sealed]);
        let _ = tx.commit();
        r.map(|r| r.get(0)).map_err(|e| message::<()>(Err(e)))
    };
    let sealed: String = {
        let mut tx = s.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant('tx')", &[]).unwrap();
        let v = tx
            .query_one("SELECT pgseal.vault_seal('secret-x', 'c')", &[])
            .unwrap()
            .get(0);
        tx.commit().unwrap();
        v
    };
    assert_eq!(decrypt(&mut s, &sealed), Ok("secret-x".to_owned()));
    // Before distribution keys are read as committed now, as on one node: a
    // REPEATABLE READ transaction whose snapshot predates the tenant's first key
    // (made by another session's seal) seals under that key, and its seals reach
    // the key's stored count.
    let mut rr = cc.coordinator.connect();
    rr.batch_execute(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT pgseal.set_tenant('ty'); SELECT 1",
    )
    .unwrap();
    let first: String = {
        let mut tx = s.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant('ty')", &[]).unwrap();
        let v = tx
            .query_one("SELECT pgseal.vault_seal('y', 'c')", &[])
            .unwrap()
            .get(0);
        tx.commit().unwrap();
        v
    };
    let key = first.split(':').nth(1).unwrap().to_owned();
    for _ in 0..3 {
        let v: String = rr
            .query_one("SELECT pgseal.vault_seal('y', 'c')", &[])
            .unwrap()
            .get(0);
        assert!(
            v.contains(&format!(":{key}:")),
            "sealed under the key made since"
        );
    }
    rr.batch_execute("COMMIT").unwrap();
    let counted: i64 = c
        .query_one(
            "SELECT encryptions FROM pgseal.tenant_keys WHERE key_id = $1",
            &[&key],
        )
        .unwrap()
        .get(0);
    assert_eq!(counted, 4, "every seal is in the key's stored count");
    c.batch_execute("SELECT pgseal.citus_distribute()").unwrap();
    assert_eq!(decrypt(&mut s, &sealed), Ok("secret-x".to_owned()));
    // Destroyed in every copy, through a worker (as tenant_shred would, were it not
    // recorded in the coordinator's ledger).
    cc.workers[0]
        .connect()
        .batch_execute(
            "UPDATE pgseal.tenant_keys SET state = 'destroyed', wrapped = NULL, kek_version = NULL \
             WHERE tenant_id = 'tx' AND purpose = 'dek'",
        )
        .unwrap();
    assert_eq!(
        decrypt(&mut s, &sealed),
        Err("sealed value's key has been destroyed".to_owned())
    );
}

/// pgseald against the coordinator: `rotate tenant` reseals a distributed table's
/// values (the new values are made on the tenant's worker), `rotate kek` moves every
/// copy of every key to the new master key version, and `ledger verify` checks the
/// coordinator's chains. Seals made on a worker (the reseal's, and a query's) commit
/// there and are counted on every copy of the key table.
#[test]
fn pgseald_rotation_and_verification_run_against_the_coordinator() {
    if !citus::enabled("pgseald_rotation_and_verification_run_against_the_coordinator") {
        return;
    }
    let cc = CitusCluster::start("citus-pgseald");
    let tenants = sealed_integrations(&cc);
    let mut c = cc.coordinator.connect();
    c.batch_execute(
        "SELECT pgseal.vault_register_column('integrations', 'token', 'integrations.token');
         SELECT pgseal.tenant_key_rotate('t3');",
    )
    .unwrap();
    let counted = |c: &mut postgres::Client| -> Vec<String> {
        on_key_copies(
            c,
            "SELECT coalesce(sum(encryptions), 0)::text FROM %s WHERE tenant_id = 't3'",
        )
    };
    // A table keyed by a time: each batch's last key travels back to pgseald and
    // into the next batch's keyset as text, printed and read on the tenant's worker,
    // whose style and zone Citus does not set (`SQL, DMY` and Asia/Shanghai here,
    // whose abbreviation, CST, reads back as US Central: 14 hours off).
    for w in &cc.workers {
        let mut wc = w.connect();
        wc.batch_execute("ALTER SYSTEM SET DateStyle = 'SQL, DMY'")
            .unwrap();
        wc.batch_execute("ALTER SYSTEM SET TimeZone = 'Asia/Shanghai'")
            .unwrap();
        wc.batch_execute("SELECT pg_reload_conf()").unwrap();
    }
    c.batch_execute(
        "CREATE TABLE hooks (tenant_id text NOT NULL, made_at timestamptz NOT NULL, secret text,
                             PRIMARY KEY (tenant_id, made_at));
         SELECT create_distributed_table('hooks', 'tenant_id');
         SELECT pgseal.vault_register_column('hooks', 'secret', 'hooks.secret');",
    )
    .unwrap();
    {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant('t3')", &[]).unwrap();
        for h in 0..24 {
            tx.execute(
                "INSERT INTO hooks VALUES ('t3', timestamptz '2026-01-01 00:00+00' + $1::int * interval '1 hour', \
                                          pgseal.vault_seal('hook-' || $1::int, 'hooks.secret'))",
                &[&h],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let before = counted(&mut c);
    assert_eq!(before.len(), 3);
    assert!(before.iter().all(|n| n == &before[0]), "{before:?}");
    let (code, out) = Pgseald::new(["rotate", "tenant", "t3", "--batch", "2"])
        .on(&cc.coordinator)
        .run();
    assert_eq!(code, Some(0), "{out}");
    let active: String = c
        .query_one(
            "SELECT key_id FROM pgseal.tenant_keys WHERE tenant_id = 't3' AND state = 'active' AND purpose = 'dek'",
            &[],
        )
        .unwrap()
        .get(0);
    let mut a = app(&cc.coordinator);
    let mut tx = a.transaction().unwrap();
    tx.execute("SELECT pgseal.set_tenant('t3')", &[]).unwrap();
    let keys: Vec<String> = tx
        .query(
            "SELECT split_part(token, ':', 2) FROM integrations ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys, vec![active.clone(); 3]);
    let hooks: Vec<String> = c
        .query(
            "SELECT split_part(secret, ':', 2) FROM hooks ORDER BY made_at",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(hooks, vec![active.clone(); 24], "{out}");
    // A query that seals on the worker, in a transaction that commits there.
    let sealed = tx
        .query(
            "SELECT pgseal.vault_seal(token, 'x') FROM integrations WHERE tenant_id = 't3'",
            &[],
        )
        .unwrap()
        .len();
    assert_eq!(sealed, 3);
    tx.commit().unwrap();
    assert_eq!(
        decrypted(&mut app(&cc.coordinator), "t3"),
        Ok((1..=3).map(|id| (id, format!("secret-t3-{id}"))).collect())
    );
    // The reseal's 3 + 24 seals and the query's 3, on every copy.
    let want: Vec<String> = vec![(before[0].parse::<i64>().unwrap() + 30).to_string(); 3];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while counted(&mut c) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "seal counts {:?}, want {want:?}",
            counted(&mut c)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // A role sealing on a worker in many short transactions as fast as it can takes
    // no more than a few slots of the worker's audit queue (the counts are merged
    // while they wait; one slot each would fill the queue and fail every audited
    // decrypt there), and every seal is counted. A few: the counts waiting and
    // those being sent, and beside them requests to drain the outbox (one waiting,
    // one being run), which Citus's two-phase commits on the node ask for.
    let worker = integrations_node(&cc, "t3");
    let flood: Vec<_> = (0..2)
        .map(|_| {
            let mut a = app(worker);
            std::thread::spawn(move || {
                for _ in 0..200 {
                    a.batch_execute(
                        "SELECT pgseal.set_tenant('t3'); SELECT pgseal.vault_seal('x', 'x')",
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    let mut busiest = 0;
    let mut su = worker.connect();
    while !flood.iter().all(|t| t.is_finished()) {
        let in_use: i32 = su
            .query_one("SELECT slots_in_use FROM pgseal.audit_queue_status()", &[])
            .unwrap()
            .get(0);
        busiest = busiest.max(in_use);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    for t in flood {
        t.join().unwrap();
    }
    assert!(busiest <= 5, "{busiest} queue slots in use at once");
    // The 30 above and the flood's 400.
    let want: Vec<String> = vec![(before[0].parse::<i64>().unwrap() + 430).to_string(); 3];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while counted(&mut c) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "seal counts {:?}, want {want:?}",
            counted(&mut c)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // While another transaction holds the data keys' rows, the forwarded counts give up
    // on the coordinator (its 2 s lock_timeout) rather than hold the worker's audit
    // writer, which meanwhile records a decrypt on that worker; they are sent again,
    // and arrive once the rows are free.
    // With set propagation on server-wide (as the isolation report asks) too.
    c.batch_execute("ALTER DATABASE postgres SET citus.propagate_set_commands = 'local'")
        .unwrap();
    let mut holder = cc.coordinator.connect();
    let mut held = holder.transaction().unwrap();
    held.execute(
        "SELECT key_id FROM pgseal.tenant_keys WHERE tenant_id = 't3' AND purpose = 'dek' FOR UPDATE",
        &[],
    )
    .unwrap();
    let mut a = app(worker);
    for _ in 0..5 {
        a.batch_execute("SELECT pgseal.set_tenant('t3'); SELECT pgseal.vault_seal('y', 'y')")
            .unwrap();
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    let decrypting = std::time::Instant::now();
    assert_eq!(
        decrypted(&mut app(worker), "t3"),
        Ok((1..=3).map(|id| (id, format!("secret-t3-{id}"))).collect())
    );
    assert!(
        decrypting.elapsed() < std::time::Duration::from_secs(8),
        "the decrypt waited {:?} for the audit writer",
        decrypting.elapsed()
    );
    assert_eq!(counted(&mut c), want, "counted while the rows were held");
    held.rollback().unwrap();
    let want: Vec<String> = vec![(before[0].parse::<i64>().unwrap() + 435).to_string(); 3];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut settled = 0;
    while settled < 2 {
        // Reached, and still so after a retry interval (no count added twice).
        if counted(&mut c) == want {
            settled += 1;
            std::thread::sleep(std::time::Duration::from_millis(1500));
            continue;
        }
        assert_eq!(
            settled,
            0,
            "the counts went past {want:?}: {:?}",
            counted(&mut c)
        );
        assert!(
            std::time::Instant::now() < deadline,
            "seal counts {:?} after the rows were free, want {want:?}; the worker's log: {}",
            counted(&mut c),
            worker
                .server_log()
                .lines()
                .filter(|l| l.contains("pgseal"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (code, out) = Pgseald::new(["ledger", "verify"]).on(&cc.coordinator).run();
    assert_eq!(code, Some(0), "{out}");
    for n in cc.nodes() {
        n.set_keys(&[pgseal_tests::KEY_V1, pgseal_tests::KEY_V2]);
        n.restart();
    }
    let (code, out) = Pgseald::new(["rotate", "kek"]).on(&cc.coordinator).run();
    assert_eq!(code, Some(0), "{out}");
    let mut c = cc.coordinator.connect();
    let versions = on_key_copies(
        &mut c,
        "SELECT string_agg(DISTINCT kek_version::text, ',') FROM %s WHERE state <> 'destroyed'",
    );
    assert_eq!(versions, vec!["2"; 3]);
    for node in cc.nodes() {
        assert_eq!(
            decrypted(&mut app(node), &tenants[5]),
            Ok((1..=3).map(|id| (id, format!("secret-t5-{id}"))).collect())
        );
    }
    let (code, out) = Pgseald::new(["ledger", "verify"]).on(&cc.coordinator).run();
    assert_eq!(code, Some(0), "{out}");
}

/// `ledger_append` on a worker is appended on the coordinator, in the worker's
/// transaction: the entry (seq, hash, actor, subjects, the session's role as
/// `db_role`) is the one the worker's call returned, and it commits with the
/// worker's writes or not at all (a rollback, a savepoint rolled back, a
/// serialization failure at the worker's commit). The forwarding table is pgseal's
/// alone: an application role cannot insert into it on any node, its triggers
/// cannot be put on another table, and it never holds a row. A call inside a query
/// that Citus runs on a shard, a reserved event and a missing tenant are refused
/// before anything reaches the coordinator.
#[test]
fn a_workers_ledger_append_is_appended_on_the_coordinator() {
    if !citus::enabled("a_workers_ledger_append_is_appended_on_the_coordinator") {
        return;
    }
    let cc = CitusCluster::start("citus-forward");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute("CREATE ROLE app LOGIN").unwrap();
    c.batch_execute(
        "GRANT pgseal_ledger TO app;
         CREATE TABLE orders (tenant_id text NOT NULL, n int, PRIMARY KEY (tenant_id, n));
         SELECT create_distributed_table('orders', 'tenant_id');
         SELECT pgseal.tenant_protect('orders');
         GRANT SELECT, INSERT ON orders TO app;",
    )
    .unwrap();
    let orders_of = |c: &mut postgres::Client, t: &str| -> Vec<i32> {
        c.query(
            "SELECT n FROM orders WHERE tenant_id = $1 ORDER BY n",
            &[&t],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let events_of = |c: &mut postgres::Client, t: &str| -> Vec<(i64, String)> {
        c.query(
            "SELECT seq, event FROM pgseal.ledger WHERE tenant_id = $1 ORDER BY seq",
            &[&t],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    };
    for (k, w) in cc.workers.iter().enumerate() {
        let t = format!("f{k}");
        let mut a = app(w);
        // Committed with its order: the entry the call returned is the coordinator's.
        let mut tx = a.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&t]).unwrap();
        tx.execute("INSERT INTO orders VALUES ($1, 1)", &[&t])
            .unwrap();
        let r = tx
            .query_one(
                "SELECT seq, hash FROM pgseal.ledger_append('order.created', '{\"n\": 1.50}', 'alice', ARRAY['s2', 's1'])",
                &[],
            )
            .unwrap();
        let (seq, hash): (i64, String) = (r.get(0), r.get(1));
        tx.commit().unwrap();
        assert_eq!(seq, 1);
        let row = c
            .query_one(
                "SELECT encode(hash, 'hex'), actor, db_role, subjects, payload::text FROM pgseal.ledger \
                 WHERE tenant_id = $1 AND seq = 1",
                &[&t],
            )
            .unwrap();
        assert_eq!(row.get::<_, String>(0), hash);
        assert_eq!(row.get::<_, String>(1), "alice");
        assert_eq!(row.get::<_, String>(2), "app");
        assert_eq!(row.get::<_, Vec<String>>(3), vec!["s1", "s2"]);
        assert_eq!(row.get::<_, String>(4), r#"{"n": 1.50}"#);
        // Rolled back with its order; a savepoint's entry rolled back alone.
        let mut tx = a.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&t]).unwrap();
        tx.execute("INSERT INTO orders VALUES ($1, 2)", &[&t])
            .unwrap();
        tx.query("SELECT * FROM pgseal.ledger_append('order.created')", &[])
            .unwrap();
        tx.rollback().unwrap();
        a.batch_execute(&format!(
            "BEGIN; SELECT pgseal.set_tenant('{t}'); INSERT INTO orders VALUES ('{t}', 3); \
             SELECT pgseal.ledger_append('order.kept'); SAVEPOINT s; \
             SELECT pgseal.ledger_append('order.dropped'); ROLLBACK TO SAVEPOINT s; \
             SELECT pgseal.ledger_append('order.after'); COMMIT"
        ))
        .unwrap();
        assert_eq!(orders_of(&mut c, &t), vec![1, 3]);
        // A serialization failure at the worker's own commit, after its entry was
        // sent: it read a range of a table of the worker's own (one Citus does not
        // manage) that another session then wrote, and wrote into the range that
        // session read (write skew), and the other committed first. PostgreSQL
        // finds it after Citus's pre-commit, where Citus commits what it does not
        // commit in two phases. A new tenant's: its ledger key, made in that
        // transaction, goes too, and the coordinator's session that held it must
        // not sign the next entry with it.
        let tn = format!("{t}-new");
        w.connect()
            .batch_execute(&format!(
                "CREATE TABLE skew_{k} (n int); GRANT SELECT, INSERT ON skew_{k} TO app"
            ))
            .unwrap();
        let mut a2 = app(w);
        let mut t1 = a.transaction().unwrap();
        t1.batch_execute(&format!(
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; SELECT pgseal.set_tenant('{tn}')"
        ))
        .unwrap();
        t1.query(&format!("SELECT count(*) FROM skew_{k} WHERE n > 100"), &[])
            .unwrap();
        t1.execute(&format!("INSERT INTO skew_{k} VALUES (4)"), &[])
            .unwrap();
        t1.query("SELECT * FROM pgseal.ledger_append('order.created')", &[])
            .unwrap();
        a2.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL SERIALIZABLE; \
             SELECT count(*) FROM skew_{k} WHERE n < 100; INSERT INTO skew_{k} VALUES (104); COMMIT"
        ))
        .unwrap();
        assert_eq!(sqlstate(t1.commit()), "40001");
        assert_eq!(
            pgseal_tests::count(&mut w.connect(), &format!("SELECT count(*) FROM skew_{k}")),
            1
        );
        let mut tx = a.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&tn]).unwrap();
        let seq: i64 = tx
            .query_one("SELECT seq FROM pgseal.ledger_append('order.retried')", &[])
            .unwrap()
            .get(0);
        tx.commit().unwrap();
        assert_eq!(seq, 1);
        assert_eq!(
            events_of(&mut c, &tn),
            vec![(1, "order.retried".to_owned())]
        );
        let ok: bool = c
            .query_one("SELECT ok FROM pgseal.ledger_verify($1)", &[&tn])
            .unwrap()
            .get(0);
        assert!(ok, "{tn}: signed with the rolled-back key");
        // A new tenant's first entry with Citus told to open a connection per task:
        // the entry still reaches the coordinator over the connection that made
        // the tenant's ledger key, which it must see.
        let tq = format!("{t}-parallel");
        a.batch_execute(&format!(
            "SET citus.force_max_query_parallelization = on; \
             BEGIN; SELECT pgseal.set_tenant('{tq}'); SELECT pgseal.ledger_append('order.created'); COMMIT; \
             RESET citus.force_max_query_parallelization"
        ))
        .unwrap();
        assert_eq!(
            events_of(&mut c, &tq),
            vec![(1, "order.created".to_owned())]
        );
        let want: Vec<(i64, String)> = ["order.created", "order.kept", "order.after"]
            .iter()
            .enumerate()
            .map(|(i, e)| (i as i64 + 1, e.to_string()))
            .collect();
        assert_eq!(events_of(&mut c, &t), want);
        let ok: bool = c
            .query_one("SELECT ok FROM pgseal.ledger_verify($1)", &[&t])
            .unwrap()
            .get(0);
        assert!(ok);

        // Refused on the worker, nothing forwarded.
        let mut tx = a.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&t]).unwrap();
        assert_eq!(
            sqlstate(tx.query("SELECT * FROM pgseal.ledger_append('vault.sealed')", &[])),
            "22023"
        );
        tx.rollback().unwrap();
        assert_eq!(
            sqlstate(a.query("SELECT * FROM pgseal.ledger_append('order.created')", &[])),
            "42501"
        );
        let mut tx = a.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&t]).unwrap();
        let r = tx.query(
            "SELECT (pgseal.ledger_append('order.seen', jsonb_build_object('n', n))).seq FROM orders",
            &[],
        );
        assert!(
            message(r).starts_with("on a Citus worker, ledger_append cannot run inside a query that Citus runs on a shard"),
            "a call inside a query on a shard"
        );
        tx.rollback().unwrap();
        // The same pushed to the worker from the coordinator, with Citus's refusal
        // of nested distributed statements turned off (any role may): the entry
        // would go over a connection the coordinator's two-phase commit never
        // commits nor rolls back.
        let mut co = app(&cc.coordinator);
        let mut tx = co.transaction().unwrap();
        tx.batch_execute(&format!(
            "SELECT pgseal.set_tenant('{t}'); SET LOCAL citus.allow_nested_distributed_execution = on"
        ))
        .unwrap();
        let r = tx.query(
            "SELECT (pgseal.ledger_append('order.seen', jsonb_build_object('n', n))).seq FROM orders",
            &[],
        );
        assert!(
            message(r).starts_with("on a Citus worker, ledger_append cannot run inside a query that Citus runs on a shard"),
            "a call pushed down with nested execution allowed"
        );
        tx.rollback().unwrap();
        // And with the session's name changed first, in the same query (the scan's
        // condition, evaluated before the call): the session is still the one Citus
        // opened.
        let mut tx = co.transaction().unwrap();
        tx.batch_execute(&format!(
            "SELECT pgseal.set_tenant('{t}'); SET LOCAL citus.allow_nested_distributed_execution = on"
        ))
        .unwrap();
        let r = tx.query(
            "SELECT (pgseal.ledger_append('order.seen', jsonb_build_object('n', n))).seq FROM orders \
             WHERE pg_catalog.set_config('application_name', 'not citus', false) IS NOT NULL",
            &[],
        );
        assert!(
            message(r).starts_with("on a Citus worker, ledger_append cannot run inside a query that Citus runs on a shard"),
            "a call pushed down with nested execution allowed, the session renamed"
        );
        tx.rollback().unwrap();
        assert_eq!(events_of(&mut c, &t).len(), want.len());
    }

    // The shard a worker's session uses to ask for two-phase commit, moved to the
    // coordinator by a rebalance: the DELETE would ride the connection the entry
    // went over and ask for nothing. The session finds another shard, and a
    // failure at its commit still takes the entry with it.
    let w0 = &cc.workers[0];
    let mut a = app(w0);
    a.batch_execute("BEGIN; SELECT pgseal.set_tenant('m0'); SELECT pgseal.ledger_append('order.created'); COMMIT")
        .unwrap();
    let shard: i64 = c
        .query_one(
            "SELECT s.shardid FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid) \
               JOIN pg_dist_node n USING (groupid) \
              WHERE s.logicalrelid = 'pgseal._two_phase_shards'::regclass AND n.nodeport = $1 \
              ORDER BY s.shardid LIMIT 1",
            &[&i32::from(w0.port)],
        )
        .unwrap()
        .get(0);
    c.execute(
        "SELECT citus_set_node_property('127.0.0.1', $1, 'shouldhaveshards', true)",
        &[&i32::from(cc.coordinator.port)],
    )
    .unwrap();
    c.execute(
        "SELECT citus_move_shard_placement($1, '127.0.0.1', $2, '127.0.0.1', $3, shard_transfer_mode => 'block_writes')",
        &[&shard, &i32::from(w0.port), &i32::from(cc.coordinator.port)],
    )
    .unwrap();
    let mut a2 = app(w0);
    let mut t1 = a.transaction().unwrap();
    t1.batch_execute(
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; SELECT pgseal.set_tenant('m0'); \
         SELECT count(*) FROM skew_0 WHERE n > 1000; INSERT INTO skew_0 VALUES (5); \
         SELECT pgseal.ledger_append('order.created')",
    )
    .unwrap();
    a2.batch_execute(
        "BEGIN ISOLATION LEVEL SERIALIZABLE; \
         SELECT count(*) FROM skew_0 WHERE n < 1000; INSERT INTO skew_0 VALUES (1005); COMMIT",
    )
    .unwrap();
    assert_eq!(sqlstate(t1.commit()), "40001");
    assert_eq!(
        events_of(&mut c, "m0"),
        vec![(1, "order.created".to_owned())]
    );

    // The forwarding table: no row left, no way in for the application, its
    // triggers for it alone.
    assert_eq!(
        pgseal_tests::count(&mut c, "SELECT count(*) FROM pgseal._ledger_forwarded"),
        0
    );
    for n in cc.nodes() {
        let mut a = app(n);
        let mut tx = a.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant('f0')", &[]).unwrap();
        let r = tx.execute(
            "INSERT INTO pgseal._ledger_forwarded (chain, event, actor, db_role) \
             VALUES ('f0', 'order.forged', 'mallory', 'postgres')",
            &[],
        );
        assert_eq!(sqlstate(r), "42501", "through {}", n.port);
    }
    c.batch_execute(
        "CREATE TABLE evil (chain text, event text, payload jsonb, actor text, db_role text, \
                            subjects text[], seq bigint, hash text);
         GRANT ALL ON evil TO app; GRANT CREATE ON SCHEMA public TO app;",
    )
    .unwrap();
    let mut a = app(&cc.coordinator);
    for f in ["_ledger_forwarded_append", "_ledger_forwarded_done"] {
        let r = a.batch_execute(&format!(
            "CREATE TABLE evil_{f} (LIKE evil); \
             CREATE TRIGGER t BEFORE INSERT ON evil_{f} FOR EACH ROW EXECUTE FUNCTION pgseal.{f}()"
        ));
        assert_eq!(sqlstate(r), "42501", "{f}");
    }
    // Even a superuser's trigger on another table is refused by the functions.
    for (f, when) in [
        ("_ledger_forwarded_append", "BEFORE"),
        ("_ledger_forwarded_done", "AFTER"),
    ] {
        c.batch_execute(&format!(
            "SET citus.enable_ddl_propagation = off; CREATE TRIGGER t_{f} {when} INSERT ON evil FOR EACH ROW EXECUTE FUNCTION pgseal.{f}()"
        ))
        .unwrap();
        let r = c.batch_execute(
            "BEGIN; SELECT pgseal.set_tenant('f0'); \
             INSERT INTO evil VALUES ('f0', 'order.forged', NULL, 'mallory', 'app', NULL); COMMIT",
        );
        assert_eq!(sqlstate(r), "39P01", "{f}");
        c.batch_execute(&format!("ROLLBACK; DROP TRIGGER t_{f} ON evil"))
            .unwrap();
    }
    assert_eq!(
        pgseal_tests::count(
            &mut c,
            "SELECT count(*) FROM pgseal.ledger WHERE event = 'order.forged'"
        ),
        0
    );
}

/// One business write and its ledger entry in one transaction through the
/// coordinator, at `level`: a row of the distributed `orders` (on the tenant's
/// worker) and `ledger_append` (on the coordinator), committed by Citus's two-phase
/// commit. Retries what may be retried (serialization failures, and the errors of a
/// worker that is down, after connecting again); returns the session's client.
fn order_and_entry(
    mut c: postgres::Client,
    connect: &dyn Fn() -> postgres::Client,
    level: &str,
    tenant: &str,
    s: usize,
    i: usize,
) -> postgres::Client {
    let sql = format!(
        "BEGIN ISOLATION LEVEL {level}; SELECT pgseal.set_tenant('{tenant}'); \
         INSERT INTO orders VALUES ('{tenant}', {s}, {i}); \
         SELECT pgseal.ledger_append('order.created', '{{\"s\": {s}, \"i\": {i}}}'); COMMIT"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // Whether the last attempt lost its connection: its node went down while it ran,
    // maybe after its commit (whose answer never came).
    let mut in_doubt = false;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "{level}: {tenant} {s}/{i} never committed"
        );
        let e = match c.batch_execute(&sql) {
            Ok(()) => return c,
            Err(e) => e,
        };
        let code = e.code().map(|c| c.code().to_owned());
        // A unique violation is a retry of a write that had committed: right after a
        // lost connection, the commit whose answer was lost (the final check finds its
        // entry beside it); otherwise a node reported a failure for a commit that
        // happened.
        if code.as_deref() == Some("23505") && in_doubt {
            c.batch_execute("ROLLBACK").unwrap();
            return c;
        }
        assert_ne!(
            code.as_deref(),
            Some("23505"),
            "{level}, {tenant} {s}/{i}: {:?}",
            e.as_db_error()
        );
        // Only the attempt right after a lost connection may meet its own commit.
        in_doubt = c.is_closed() || c.batch_execute("ROLLBACK").is_err();
        if in_doubt {
            c = connect();
        }
        std::thread::sleep(std::time::Duration::from_millis(
            if pgseal_tests::is_retryable(&e) {
                2
            } else {
                50
            },
        ));
    }
}

/// The ledger's concurrency matrix on Citus: 16 sessions spread over the coordinator
/// and both workers (a worker's `ledger_append` is appended on the coordinator) at
/// each isolation level, each transaction writing an order on the tenant's worker
/// and its ledger entry, over one tenant and over 40, so that one tenant's appends
/// arrive through three nodes at once (its first ones too); a worker killed (-9) and started again
/// during the READ COMMITTED round, while its own sessions append through it. Every
/// tenant's chain is gapless and verifies, and the orders and the entries match one
/// for one: no entry without its order, no order without its entry, whatever failed.
#[test]
fn ledger_appends_beside_distributed_writes_never_fork_or_part() {
    if !citus::enabled("ledger_appends_beside_distributed_writes_never_fork_or_part") {
        return;
    }
    const SESSIONS: usize = 16;
    const PER_SESSION: usize = 120;
    let cc = CitusCluster::start("citus-ledger-matrix");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute(
        "CREATE TABLE orders (tenant_id text NOT NULL, s int, i int, PRIMARY KEY (tenant_id, s, i));
         SELECT create_distributed_table('orders', 'tenant_id');
         SELECT pgseal.tenant_protect('orders');",
    )
    .unwrap();
    let configs: Vec<_> = cc.nodes().map(|n| n.config()).collect();
    let levels = [
        ("READ COMMITTED", "rc"),
        ("REPEATABLE READ", "rr"),
        ("SERIALIZABLE", "sz"),
    ];
    for (level, tag) in levels {
        for tenants in [1usize, 40] {
            let threads: Vec<_> = (0..SESSIONS)
                .map(|s| {
                    let config = configs[s % configs.len()].clone();
                    std::thread::spawn(move || {
                        let connect = move || loop {
                            match config.connect(postgres::NoTls) {
                                Ok(c) => return c,
                                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
                            }
                        };
                        let mut c = connect();
                        for i in 0..PER_SESSION {
                            let t = format!("{tag}{tenants}-{}", (s * 31 + i) % tenants);
                            c = order_and_entry(c, &connect, level, &t, s, i);
                        }
                    })
                })
                .collect();
            if tag == "rc" && tenants == 40 {
                std::thread::sleep(std::time::Duration::from_millis(800));
                cc.workers[1].crash();
                std::thread::sleep(std::time::Duration::from_millis(800));
                cc.workers[1].resume();
                // Its transactions prepared on the coordinator hold their chains'
                // locks until the worker's recovery finishes them.
                cc.workers[1]
                    .connect()
                    .batch_execute("SELECT recover_prepared_transactions()")
                    .unwrap();
            }
            for t in threads {
                t.join().expect("appending session panicked");
            }
        }
    }
    // Transactions prepared on the killed worker, or by it, are finished by Citus's
    // recovery on the node that began them (in new sessions: this one's cached
    // connection to that worker is dead).
    for n in cc.nodes() {
        n.connect()
            .batch_execute("SELECT recover_prepared_transactions()")
            .unwrap();
    }
    let mut c = cc.coordinator.connect();
    let tenants: Vec<String> = c
        .query(
            "SELECT DISTINCT tenant_id FROM pgseal.ledger WHERE event = 'order.created' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tenants.len(), 3 * 41, "{tenants:?}");
    for (t, n, max, ok) in chains(&mut c, &tenants) {
        assert!(
            n >= 1 && n == max && ok,
            "{t}: {n} entries, last seq {max}, ok {ok}"
        );
    }
    let total = pgseal_tests::count(
        &mut c,
        "SELECT count(*) FROM pgseal.ledger WHERE event = 'order.created'",
    );
    assert_eq!(total as usize, 3 * 2 * SESSIONS * PER_SESSION);
    // Nothing is left in the forwarding table, and no worker keeps a ledger.
    assert_eq!(
        pgseal_tests::count(&mut c, "SELECT count(*) FROM pgseal._ledger_forwarded"),
        0
    );
    for w in &cc.workers {
        assert_eq!(
            pgseal_tests::count(
                &mut w.connect(),
                "SELECT (SELECT count(*) FROM ONLY pgseal.ledger) + (SELECT count(*) FROM ONLY pgseal.ledger_heads)"
            ),
            0
        );
    }
    // The orders (read as the superuser: every tenant) against the entries.
    c.batch_execute(
        "CREATE TEMP TABLE o AS SELECT tenant_id, s, i FROM orders;
         CREATE TEMP TABLE e AS SELECT tenant_id, (payload->>'s')::int AS s, (payload->>'i')::int AS i
                                FROM pgseal.ledger WHERE event = 'order.created';",
    )
    .unwrap();
    let unmatched: i64 = c
        .query_one(
            "SELECT count(*) FROM ((SELECT * FROM o EXCEPT ALL SELECT * FROM e)
                                   UNION ALL (SELECT * FROM e EXCEPT ALL SELECT * FROM o)) d",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(pgseal_tests::count(&mut c, "SELECT count(*) FROM o"), total);
    assert_eq!(unmatched, 0, "orders and ledger entries differ");
}

/// The two-phase commit that keeps a ledger entry with its transaction's writes on
/// the workers holds whatever the caller set, in a new session and in one that ran
/// other cases before: Citus prepares the worker's part (its
/// logged `PREPARE TRANSACTION`) with Citus's local execution off, its fast-path
/// planner off, the transaction reaching the coordinator's own placements over a
/// connection first, and the append before or after the write; and the owner's
/// statement behind it, which Citus then sends over a connection to the coordinator
/// itself, runs none of the caller's functions (a caller's `search_path` naming its
/// own `assign_distributed_transaction_id`, which Citus calls unqualified on each
/// connection it opens).
#[test]
fn ledger_entries_commit_in_two_phases_whatever_the_caller_set() {
    if !citus::enabled("ledger_entries_commit_in_two_phases_whatever_the_caller_set") {
        return;
    }
    let cc = CitusCluster::start("citus-2pc");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute("CREATE ROLE app LOGIN").unwrap();
    c.batch_execute(
        "GRANT pgseal_ledger TO app;
         CREATE SCHEMA evil AUTHORIZATION app;
         CREATE TABLE orders (tenant_id text NOT NULL, n int NOT NULL);
         SELECT create_distributed_table('orders', 'tenant_id');
         SELECT pgseal.tenant_protect('orders');
         GRANT SELECT, INSERT ON orders TO app;",
    )
    .unwrap();
    let mut a = app(&cc.coordinator);
    a.batch_execute(
        "CREATE FUNCTION evil.pwn() RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             IF current_setting('is_superuser') = 'on' THEN
                 EXECUTE 'CREATE TABLE IF NOT EXISTS public.ran_as_superuser (x int)';
             END IF;
         END $$;
         CREATE FUNCTION evil.assign_distributed_transaction_id(int, int, text) RETURNS void
             LANGUAGE sql AS 'SELECT evil.pwn()';
         CREATE FUNCTION evil.assign_distributed_transaction_id(int, bigint, text) RETURNS void
             LANGUAGE sql AS 'SELECT evil.pwn()';
         CREATE TABLE evil.ref (x int);
         SELECT create_reference_table('evil.ref');",
    )
    .unwrap();
    let cases = [
        ("", false, false),
        ("SET citus.enable_local_execution = off", false, false),
        ("SET citus.enable_local_execution = off", true, false),
        ("SET citus.enable_local_execution = off", true, true),
        ("SET citus.enable_fast_path_router_planner = off", false, false),
        (
            "SET citus.enable_fast_path_router_planner = off; SET citus.enable_local_execution = off",
            true,
            true,
        ),
    ];
    // Each tenant's ledger key first: making it writes the key table on every node,
    // which Citus commits in two phases anyway.
    for n in 0..cases.len() {
        c.batch_execute(&format!(
            "BEGIN; SELECT pgseal.set_tenant('t{n}'); SELECT pgseal.ledger_append('setup'); COMMIT"
        ))
        .unwrap();
    }
    // One transaction of a case: an order and its entry, with Citus's commands
    // logged at commit.
    let case = |s: &mut postgres::Client, n: usize, reach_coordinator: bool, append_first: bool| {
        let tenant = format!("t{n}");
        let mut tx = s.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])
            .unwrap();
        tx.batch_execute("SET LOCAL search_path = evil, pg_catalog")
            .unwrap();
        if reach_coordinator {
            // Over a connection to the coordinator's own placement: Citus then turns
            // local execution off for the rest of the transaction.
            tx.batch_execute("SELECT count(*) FROM evil.ref").unwrap();
        }
        let append = "SELECT pgseal.ledger_append('order.placed', '{\"n\": 1}')";
        let insert = format!("INSERT INTO public.orders VALUES ('{tenant}', {n})");
        if append_first {
            tx.batch_execute(append).unwrap();
            tx.batch_execute(&insert).unwrap();
        } else {
            tx.batch_execute(&insert).unwrap();
            tx.batch_execute(append).unwrap();
        }
        tx.batch_execute("SET LOCAL citus.log_remote_commands = on")
            .unwrap();
        tx.commit().unwrap();
    };
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let session = || {
        let seen = notices.clone();
        let mut cfg = cc.coordinator.config();
        cfg.user("app").notice_callback(move |m| {
            seen.lock().unwrap().push(m.message().to_owned());
        });
        cfg.connect(postgres::NoTls).unwrap()
    };
    // Each case in a session of its own, then all of them in one session, in
    // reverse order: the statements pgseal keeps as plans for a backend's life (the
    // two-phase marker's DELETE among them) are reused under other settings.
    let mut one = session();
    for (round, order) in [
        (0, (0..cases.len()).collect::<Vec<_>>()),
        (1, (0..cases.len()).rev().collect::<Vec<_>>()),
    ] {
        for n in order {
            let (settings, reach_coordinator, append_first) = cases[n];
            let mut fresh;
            let s = if round == 0 {
                fresh = session();
                &mut fresh
            } else {
                one.batch_execute("RESET ALL").unwrap();
                &mut one
            };
            s.batch_execute(settings).unwrap();
            notices.lock().unwrap().clear();
            case(s, n, reach_coordinator, append_first);
            let got = notices.lock().unwrap().clone();
            assert!(
                got.iter().any(|m| m.contains("PREPARE TRANSACTION")),
                "round {round}, case {n} ({settings:?}, reach coordinator {reach_coordinator}, append first {append_first}): no two-phase commit: {got:?}"
            );
        }
    }
    // ledger_audit on a table whose rows are on the workers, where no entry can be
    // appended, is refused rather than fail every write there.
    for rel in ["orders", "evil.ref"] {
        assert_eq!(
            sqlstate(c.execute("SELECT pgseal.ledger_audit($1::text::regclass)", &[&rel])),
            "0A000",
            "{rel}"
        );
    }
    // Outside a transaction block with citus.function_opens_transaction_block off, a
    // function's writes on the workers commit before anything here: refused.
    let mut s = app(&cc.coordinator);
    s.batch_execute("SET citus.function_opens_transaction_block = off; SET app.tenant_id = 't0'")
        .unwrap();
    assert_eq!(
        sqlstate(s.execute("SELECT pgseal.ledger_append('order.placed')", &[])),
        "0A000"
    );
    let pwned = pgseal_tests::count(
        &mut c,
        "SELECT count(*) FROM pg_class WHERE relname = 'ran_as_superuser'",
    );
    assert_eq!(pwned, 0, "the caller's function ran as a superuser");
    assert_eq!(
        pgseal_tests::count(
            &mut c,
            "SELECT count(*) FROM pgseal.ledger WHERE event = 'order.placed'"
        ),
        2 * cases.len() as i64
    );
}

#[test]
fn subjects_and_offboarding_work_on_distributed_tables_through_the_coordinator() {
    if !citus::enabled(
        "subjects_and_offboarding_work_on_distributed_tables_through_the_coordinator",
    ) {
        return;
    }
    let cc = CitusCluster::start("citus-offboard");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute("CREATE ROLE notes_owner LOGIN").unwrap();
    c.batch_execute(
        "CREATE TABLE users (id text, tenant_id text NOT NULL, email text, PRIMARY KEY (tenant_id, id));
         SELECT create_distributed_table('users', 'tenant_id');
         SELECT pgseal.tenant_protect('users');
         SELECT pgseal.subject_register('users', 'id');
         CREATE TABLE plans (id text PRIMARY KEY, tenant_id text NOT NULL, name text);
         SELECT create_reference_table('plans');
         SELECT pgseal.subject_register('plans', 'id');
         CREATE TABLE notes (tenant_id text NOT NULL, body text);   -- protected, not registered
         ALTER TABLE notes OWNER TO notes_owner;   -- bound by the policies: their Citus form is recognised
         SELECT create_distributed_table('notes', 'tenant_id');
         SELECT pgseal.tenant_protect('notes');
         CREATE TABLE memos (tenant_id varchar(64) NOT NULL, body text);   -- the same on varchar
         ALTER TABLE memos OWNER TO notes_owner;
         SELECT create_distributed_table('memos', 'tenant_id');
         SELECT pgseal.tenant_protect('memos');
         SET app.tenant_id = 'acme';
         INSERT INTO notes SELECT 'acme', 'note ' || g FROM generate_series(1, 3) g;
         INSERT INTO memos VALUES ('acme', 'memo');
         INSERT INTO users SELECT 'u' || g, 'acme', 'u' || g || '@acme.example' FROM generate_series(1, 250) g;
         INSERT INTO plans VALUES ('p-acme', 'acme', 'gold');
         SELECT pgseal.ledger_append('order.paid', jsonb_build_object('n', g), NULL, ARRAY['u1'])
           FROM generate_series(1, 5) g;
         SET app.tenant_id = 'globex';
         INSERT INTO users SELECT 'u' || g, 'globex', 'u' || g || '@globex.example' FROM generate_series(1, 40) g;
         INSERT INTO plans VALUES ('p-globex', 'globex', 'silver');
         INSERT INTO notes VALUES ('globex', 'kept');
         RESET app.tenant_id;
         SELECT pgseal.tenant_offboard('acme', '0');",
    )
    .unwrap();
    // A subject's export and erasure, through the coordinator, under its tenant.
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT pgseal.set_tenant('globex')", &[])
        .unwrap();
    let exported: String = tx
        .query_one("SELECT pgseal.subject_export('globex', 'u7')::text", &[])
        .unwrap()
        .get(0);
    assert!(exported.contains("u7@globex.example"), "{exported}");
    let receipt: String = tx
        .query_one("SELECT pgseal.subject_erase('globex', 'u7')::text", &[])
        .unwrap()
        .get(0);
    assert!(receipt.contains("\"deleted\": 1"), "{receipt}");
    tx.commit().unwrap();
    assert_eq!(
        pgseal_tests::count(
            &mut c,
            "SELECT count(*) FROM users WHERE tenant_id = 'globex' AND id = 'u7'"
        ),
        0
    );
    let export = offboard_acme(&cc, "citus-offboard-files");
    assert_eq!(
        pgseal_tests::exported_per_table(&export),
        [
            ("public.memos", 1),
            ("public.notes", 3),
            ("public.plans", 1),
            ("public.users", 250)
        ]
        .map(|(t, n)| (t.to_owned(), n))
        .into(),
        "{export}"
    );
    assert!(!export.contains("globex"), "{export}");
    let tables = ["users", "plans", "notes", "memos"];
    assert_eq!(pgseal_tests::tenant_rows(&mut c, &tables, "acme"), 0);
    assert_eq!(pgseal_tests::tenant_rows(&mut c, &tables, "globex"), 41);
    let (ok, erased): (bool, i64) = {
        let r = c
            .query_one("SELECT ok, erased FROM pgseal.ledger_verify('acme')", &[])
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(ok);
    assert!(erased >= 5, "{erased}");
}

/// Runs pgseald's offboarding against the coordinator, exporting into a fresh
/// directory named `files`; it must finish tenant acme's. Returns acme's export.
fn offboard_acme(cc: &CitusCluster, files: &str) -> String {
    let dir = pgseal_tests::fresh_dir(files);
    let (code, out) = Pgseald::new(["offboard", "run", "--export-dir"])
        .args([dir.to_str().unwrap()])
        .on(&cc.coordinator)
        .run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tenant acme: done"), "{out}");
    std::fs::read_to_string(dir.join("acme.offboard.jsonl")).unwrap()
}

/// A distributed table that the offboarding's export did not read (protected after
/// it) is not deleted from: protected before the first delete, its rows send the
/// offboarding back to exporting; protected once a table was deleted from, they
/// are left and stop the deletes.
#[test]
fn a_distributed_table_protected_after_the_export_is_not_deleted_from() {
    if !citus::enabled("a_distributed_table_protected_after_the_export_is_not_deleted_from") {
        return;
    }
    let cc = CitusCluster::start("citus-offboard-late");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute(
        "CREATE TABLE users (id text, tenant_id text NOT NULL, PRIMARY KEY (tenant_id, id));
         SELECT create_distributed_table('users', 'tenant_id');
         SELECT pgseal.subject_register('users', 'id');
         CREATE TABLE late (tenant_id text NOT NULL, note text);
         SELECT create_distributed_table('late', 'tenant_id');
         SET app.tenant_id = 'acme';
         INSERT INTO users SELECT 'u' || g, 'acme' FROM generate_series(1, 20) g;
         INSERT INTO late VALUES ('acme', 'written before, protected after the export');
         RESET app.tenant_id;
         SELECT pgseal.tenant_offboard('acme', '0');",
    )
    .unwrap();
    c.batch_execute(
        "BEGIN; SELECT pgseal.set_tenant('acme');
         SELECT count(*) FROM pgseal._offboard_export('acme');
         SELECT pgseal._offboard_advance('acme', 'scheduled', 'exported', '/x', repeat('a', 64));
         COMMIT;",
    )
    .unwrap();
    // Protected before the first delete: the tables' rows differ from the
    // export's, and nothing is deleted yet: exported again.
    c.batch_execute("SELECT pgseal.tenant_protect('late')")
        .unwrap();
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT pgseal.set_tenant('acme')", &[]).unwrap();
    let n: i64 = tx
        .query_one("SELECT pgseal._offboard_delete('acme', 1000)", &[])
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    assert_eq!(n, 0);
    let step: String = c
        .query_one(
            "SELECT step FROM pgseal.tenant_offboardings WHERE tenant_id = 'acme'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(step, "scheduled");
    assert_eq!(
        pgseal_tests::count(
            &mut c,
            "SELECT count(*) FROM users WHERE tenant_id = 'acme'"
        ),
        20
    );
    // Protected once a table was deleted from: the deletes stop on it.
    c.batch_execute("SELECT pgseal.tenant_unprotect('late')")
        .unwrap();
    c.batch_execute(
        "BEGIN; SELECT pgseal.set_tenant('acme');
         SELECT count(*) FROM pgseal._offboard_export('acme');
         SELECT pgseal._offboard_advance('acme', 'scheduled', 'exported', '/x', repeat('a', 64));
         SELECT pgseal._offboard_delete('acme', 1000);
         COMMIT;",
    )
    .unwrap();
    c.batch_execute("SELECT pgseal.tenant_protect('late')")
        .unwrap();
    let mut refused = None;
    for _ in 0..10 {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant('acme')", &[]).unwrap();
        match tx.query_one("SELECT pgseal._offboard_delete('acme', 1000)", &[]) {
            Ok(r) => {
                let n: i64 = r.get(0);
                tx.commit().unwrap();
                if n == 0 {
                    break;
                }
            }
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("the deletes stop on the table the export did not read");
    assert_eq!(e.code().map(|s| s.code()), Some("55000"), "{e}");
    let message = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("(table public.late)"), "{message}");
    assert_eq!(
        pgseal_tests::count(&mut c, "SELECT count(*) FROM late WHERE tenant_id = 'acme'"),
        1
    );
    assert_eq!(
        pgseal_tests::count(
            &mut c,
            "SELECT count(*) FROM users WHERE tenant_id = 'acme'"
        ),
        0
    );
}

/// A new tenant's first ledger entries and first seals, sent through two nodes at
/// the same moment (the coordinator and a worker, then both workers), all commit:
/// one key each, every chain gapless and verifying, every value opening.
#[test]
fn a_new_tenants_first_writes_through_two_nodes_at_once_all_commit() {
    if !citus::enabled("a_new_tenants_first_writes_through_two_nodes_at_once_all_commit") {
        return;
    }
    const TENANTS: usize = 24;
    let cc = CitusCluster::start("citus-first-writes");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute("CREATE ROLE app LOGIN; GRANT pgseal_ledger, pgseal_seal TO app")
        .unwrap();
    let pairs = [
        (cc.coordinator.config(), cc.workers[0].config()),
        (cc.workers[0].config(), cc.workers[1].config()),
    ];
    let mut failures = Vec::new();
    // (tenant, what the call returned) of every call that committed.
    let mut done: Vec<(String, String)> = Vec::new();
    for (p, (one, two)) in pairs.iter().enumerate() {
        for (what, call) in [
            (
                "entry",
                "SELECT hash FROM pgseal.ledger_append('first.write')",
            ),
            ("seal", "SELECT pgseal.vault_seal('s3cret')"),
        ] {
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
            let threads: Vec<_> = [one.clone(), two.clone()]
                .into_iter()
                .map(|mut config| {
                    config.user("app");
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        let mut s = config.connect(postgres::NoTls).unwrap();
                        let mut out = Vec::new();
                        for t in 0..TENANTS {
                            let tenant = format!("n{p}{what}{t}");
                            barrier.wait();
                            let r = (|| {
                                let mut tx = s.transaction()?;
                                tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])?;
                                let v: String = tx.query_one(call, &[])?.get(0);
                                tx.commit()?;
                                Ok(v)
                            })();
                            out.push(
                                r.map(|v| (tenant.clone(), v))
                                    .map_err(|e| format!("{tenant}: {}", message::<()>(Err(e)))),
                            );
                        }
                        out
                    })
                })
                .collect();
            for t in threads {
                for r in t.join().unwrap() {
                    match r {
                        Ok(v) => done.push(v),
                        Err(e) => failures.push(e),
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(done.len(), 2 * 2 * 2 * TENANTS);
    let entry_tenants: Vec<String> = (0..2)
        .flat_map(|p| (0..TENANTS).map(move |t| format!("n{p}entry{t}")))
        .collect();
    for (t, entries, last, ok) in chains(&mut c, &entry_tenants) {
        assert_eq!((entries, last, ok), (2, 2, true), "{t}");
    }
    for (tenant, sealed) in done.iter().filter(|(t, _)| t.contains("seal")) {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[tenant])
            .unwrap();
        let opened: String = tx
            .query_one("SELECT pgseal.vault_decrypt($1)", &[sealed])
            .unwrap()
            .get(0);
        assert_eq!(opened, "s3cret", "{tenant}");
        tx.commit().unwrap();
    }
    // One key a tenant and purpose, on every copy of the key table: a ledger key
    // for each chain, a data key for each sealing tenant (whose decrypts above were
    // recorded in its own chain, under a ledger key of its own).
    for copy in on_key_copies(
        &mut c,
        "SELECT count(*) FILTER (WHERE n <> 1) || ' ' || count(*) FILTER (WHERE purpose = 'dek') \
         || ' ' || count(*) FILTER (WHERE purpose = 'ledger') FROM \
         (SELECT purpose, count(*) AS n FROM %s WHERE tenant_id LIKE 'n%%' GROUP BY tenant_id, purpose) k",
    ) {
        assert_eq!(copy, format!("0 {} {}", 2 * TENANTS, 4 * TENANTS));
    }
}

/// A transaction of `a` under `tenant`, with the caller's own schema `evil` first in
/// its `search_path` (sent to the workers, as `set_tenant` turned propagation on).
/// Plants in `schema` (owned by the connected role) `pwn()`, which raises
/// "`what` ran as …" when run by any role but `role`, and overloads of Citus's
/// `assign_distributed_transaction_id` (each signature Citus may call) that run it.
fn plant_assign_overloads(c: &mut postgres::Client, schema: &str, role: &str, what: &str) {
    let mut sql = format!(
        "CREATE FUNCTION {schema}.pwn() RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             IF current_user <> '{role}' THEN
                 RAISE EXCEPTION '{what} ran as %', current_user;
             END IF;
         END $$;"
    );
    for args in [
        "int, int, text",
        "int, bigint, text",
        "int, bigint, timestamptz",
    ] {
        sql.push_str(&format!(
            "CREATE FUNCTION {schema}.assign_distributed_transaction_id({args}) RETURNS void
                 LANGUAGE sql AS 'SELECT {schema}.pwn()';"
        ));
    }
    c.batch_execute(&sql).unwrap();
}

/// A table of the coordinator, `(id, tenant_id, v)`, owned by `people_owner`,
/// registered for subjects by `id`, readable and deletable by `app`, holding `row`,
/// with an AFTER DELETE trigger of its owner's that runs `body`. One statement at a
/// time: Citus sends each DDL statement's text to the workers.
fn owner_trigger_table(c: &mut postgres::Client, table: &str, body: &str, row: &str) {
    for sql in [
        format!("CREATE TABLE {table} (id text NOT NULL, tenant_id text NOT NULL, v text)"),
        format!(
            "CREATE FUNCTION public.{table}_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 {body}
                 RETURN OLD;
             END $$"
        ),
        format!("ALTER TABLE {table} OWNER TO people_owner"),
        format!("ALTER FUNCTION public.{table}_deleted() OWNER TO people_owner"),
        format!(
            "CREATE TRIGGER {table}_deleted AFTER DELETE ON {table}
                 FOR EACH ROW EXECUTE FUNCTION public.{table}_deleted()"
        ),
        format!("SELECT pgseal.subject_register('{table}', 'id')"),
        format!("GRANT SELECT, DELETE ON {table} TO app"),
        format!("INSERT INTO {table} VALUES {row}"),
    ] {
        c.batch_execute(&sql).unwrap();
    }
}

/// `subject_erase(tenant, id)` in `tx`, which must delete one row of the first
/// table that holds the subject.
fn erased_one(tx: &mut postgres::Transaction, tenant: &str, id: &str, what: &str) {
    let out: String = tx
        .query_one("SELECT pgseal.subject_erase($1, $2)::text", &[&tenant, &id])
        .unwrap_or_else(|e| panic!("{what}: {}", message::<()>(Err(e))))
        .get(0);
    assert!(out.contains("\"deleted\": 1"), "{what}: {out}");
}

/// No node's server log holds a line with `needle` (a worker's error reaches the
/// coordinator's client only as a lost connection).
fn assert_no_node_logged(cc: &CitusCluster, needle: &str, what: &str) {
    for node in cc.nodes() {
        let log = node.server_log();
        let line = log.lines().find(|l| l.contains(needle));
        assert!(line.is_none(), "{what}, port {}: {line:?}", node.port);
    }
}

/// The distinct values of `expr` in `table`'s shards, as the transaction's next
/// query reads them on the workers (or its error).
fn on_the_workers(
    tx: &mut postgres::Transaction,
    expr: &str,
    table: &str,
) -> Result<Vec<String>, String> {
    tx.query(&format!("SELECT DISTINCT {expr} FROM {table}"), &[])
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .map_err(|e| message::<()>(Err(e)))
}

fn with_evil_path<'a>(a: &'a mut postgres::Client, tenant: &str) -> postgres::Transaction<'a> {
    let mut tx = a.transaction().unwrap();
    tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])
        .unwrap();
    tx.batch_execute("SET LOCAL search_path = evil, pg_catalog")
        .unwrap();
    tx
}

/// Statements pgseal runs as another role while Citus runs: Citus sends statements
/// on its tables to the other nodes (or to this one, local execution off) as the
/// current role, over connections on which it first replays the caller's
/// `SET LOCAL`s and then calls `assign_distributed_transaction_id` unqualified. A
/// caller's `search_path` naming its own function by that name runs nothing as
/// that role: `subject_export` (granted to application roles) and `subject_erase`
/// as a registered Citus table's owner; `subject_erase` of a table of the
/// coordinator whose owner's trigger writes a Citus table; `_offboard_finish`
/// (`pgseal_admin`) reading the key table as the extension's owner; an
/// offboarding's export and deletes of a Citus table as its owner.
#[test]
fn statements_run_as_another_role_through_citus_run_nothing_of_the_callers() {
    if !citus::enabled("statements_run_as_another_role_through_citus_run_nothing_of_the_callers") {
        return;
    }
    let cc = CitusCluster::start("citus-subject-owner");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute(
        "CREATE ROLE app LOGIN; CREATE ROLE people_owner LOGIN;
         GRANT pgseal_ledger, pgseal_admin TO app;
         CREATE SCHEMA evil AUTHORIZATION app;
         CREATE TABLE people (id text NOT NULL, tenant_id text NOT NULL, email text,
                              PRIMARY KEY (tenant_id, id));
         ALTER TABLE people OWNER TO people_owner;
         SELECT create_distributed_table('people', 'tenant_id');
         SELECT pgseal.tenant_protect('people');
         SELECT pgseal.subject_register('people', 'id');
         GRANT SELECT, DELETE ON people TO app;
         SET app.tenant_id = 'acme';
         INSERT INTO people SELECT 'u' || g, 'acme', 'u' || g || '@acme.example' FROM generate_series(1, 20) g;
         RESET app.tenant_id;",
    )
    .unwrap();
    let mut a = app(&cc.coordinator);
    a.batch_execute("GRANT USAGE ON SCHEMA evil TO PUBLIC")
        .unwrap();
    plant_assign_overloads(&mut a, "evil", "app", "evil code");
    for (call, want) in [
        (
            "SELECT pgseal.subject_export('acme', 'u7')::text",
            "u7@acme.example",
        ),
        (
            "SELECT pgseal.subject_erase('acme', 'u7')::text",
            "\"deleted\": 1",
        ),
    ] {
        let mut tx = with_evil_path(&mut a, "acme");
        let r: Result<String, _> = tx.query_one(call, &[]).map(|r| r.get(0));
        let out = r.unwrap_or_else(|e| panic!("{call}: {}", message::<()>(Err(e))));
        assert!(out.contains(want), "{call}: {out}");
        tx.commit().unwrap();
    }
    // Erased on its worker: the other rows stay.
    assert_eq!(
        pgseal_tests::count(
            &mut c,
            "SELECT count(*) FROM people WHERE tenant_id = 'acme'"
        ),
        19
    );

    // A table of the coordinator, registered, whose owner's trigger records each
    // deletion in a Citus table: the erasure's DELETE runs it as the owner.
    c.batch_execute(
        "CREATE TABLE erasures (tenant_id text NOT NULL, id text);
         SELECT create_distributed_table('erasures', 'tenant_id');",
    )
    .unwrap();
    c.batch_execute("ALTER TABLE erasures OWNER TO people_owner")
        .unwrap();
    owner_trigger_table(
        &mut c,
        "contacts",
        "INSERT INTO public.erasures VALUES (OLD.tenant_id, OLD.id);",
        "('u8', 'acme', '555')",
    );
    let mut tx = with_evil_path(&mut a, "acme");
    erased_one(&mut tx, "acme", "u8", "erasure through a trigger");
    tx.commit().unwrap();
    assert_eq!(
        pgseal_tests::count(&mut c, "SELECT count(*) FROM erasures WHERE id = 'u8'"),
        1
    );

    // The same, with a pinned scope of pgseal's inside the owner's: the trigger
    // first seals a value of a new tenant (its key is made through Citus, its
    // parsing pinned), then writes the Citus table as the owner. The inner scope's
    // end must leave the workers pinned for the outer scope's statements.
    c.batch_execute("GRANT pgseal_seal TO people_owner")
        .unwrap();
    owner_trigger_table(
        &mut c,
        "badges",
        "PERFORM pgseal.vault_seal('badge', 'code');
         INSERT INTO public.erasures VALUES (OLD.tenant_id, OLD.id);",
        "('u9', 'acme3', 'b-9')",
    );
    let mut tx = with_evil_path(&mut a, "acme3");
    erased_one(
        &mut tx,
        "acme3",
        "u9",
        "erasure through a trigger that makes a key",
    );
    tx.commit().unwrap();
    assert_eq!(
        pgseal_tests::count(&mut c, "SELECT count(*) FROM erasures WHERE id = 'u9'"),
        1
    );

    // The last step of an offboarding reads the key table (a reference table) as
    // the extension's owner; with local execution off, over a connection.
    c.batch_execute(
        "BEGIN; SELECT pgseal.set_tenant('gone'); SELECT pgseal.ledger_append('setup'); COMMIT;
         INSERT INTO pgseal.tenant_offboardings (tenant_id, due_at, scheduled_by, step)
             VALUES ('gone', now(), 'app', 'erased');",
    )
    .unwrap();
    let mut tx = a.transaction().unwrap();
    tx.batch_execute(
        "SET LOCAL citus.propagate_set_commands = 'local';
         SET LOCAL citus.enable_local_execution = off;
         SET LOCAL search_path = evil, pg_catalog",
    )
    .unwrap();
    let r = message(tx.query_one("SELECT pgseal._offboard_finish('gone')::text", &[]));
    assert!(!r.contains("evil code ran"), "{r}");
    tx.rollback().unwrap();

    // An offboarding's export and deletes read and delete a Citus table's rows as
    // its owner.
    c.batch_execute(
        "SET app.tenant_id = 'leaving';
         INSERT INTO people VALUES ('l1', 'leaving', 'l1@leaving.example');
         RESET app.tenant_id;
         SELECT pgseal.tenant_offboard('leaving', '0');",
    )
    .unwrap();
    let mut tx = with_evil_path(&mut a, "leaving");
    let lines = tx
        .query("SELECT * FROM pgseal._offboard_export('leaving')", &[])
        .unwrap_or_else(|e| panic!("the export: {}", message::<()>(Err(e))));
    assert!(
        lines
            .iter()
            .any(|l| l.get::<_, String>(0).contains("l1@leaving.example")),
        "the export holds the tenant's row"
    );
    tx.execute(
        "SELECT pgseal._offboard_advance('leaving', 'scheduled', 'exported', '/x', repeat('a', 64))",
        &[],
    )
    .unwrap_or_else(|e| panic!("the advance: {}", message::<()>(Err(e))));
    tx.commit().unwrap();
    let mut tx = with_evil_path(&mut a, "leaving");
    let deleted: i64 = tx
        .query_one("SELECT pgseal._offboard_delete('leaving', 100)", &[])
        .unwrap_or_else(|e| panic!("the delete: {}", message::<()>(Err(e))))
        .get(0);
    assert_eq!(deleted, 1);
    tx.commit().unwrap();

    // Citus sends no SET LOCAL outside a transaction block once a function turned
    // citus.function_opens_transaction_block off: the caller's earlier one stays
    // the last Citus replays unless pgseal's pin is sent all the same. A key made
    // for a new tenant, and an organisation member's copy, written as the
    // extension's owner (a superuser) from such a function.
    c.batch_execute("GRANT pgseal_seal TO app").unwrap();
    // Citus sends a SET made inside a function called from one (not one made in
    // the outermost function's own body).
    a.batch_execute(
        "CREATE FUNCTION evil.set_path() RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             SET LOCAL search_path = evil, pg_catalog;
         END $$",
    )
    .unwrap();
    for (tenant, write) in [
        ("acme4", "PERFORM pgseal.vault_seal('x', 'c')"),
        (
            "acme5",
            "INSERT INTO pgseal.org_members VALUES ('acme5', 'orgz', 'zoe', 'owner')",
        ),
    ] {
        a.batch_execute(&format!(
            "CREATE OR REPLACE FUNCTION evil.go() RETURNS void LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM pgseal.set_tenant('{tenant}', 'zoe');
                 PERFORM evil.set_path();
                 PERFORM pg_catalog.set_config('citus.function_opens_transaction_block', 'off', true);
                 {write};
             END $$"
        ))
        .unwrap();
        let r = message(a.query_one("SELECT evil.go()", &[]));
        assert!(!r.contains("evil code ran"), "{write}: {r}");
        // A worker's error reaches this node as a lost connection: its log tells.
        assert_no_node_logged(&cc, "evil code ran as", write);
    }

    // A table owner's code that sends its own search_path from inside pgseal's
    // scope: afterwards the workers parse the caller's statements as the caller
    // had them, never under the owner's path.
    c.batch_execute(
        "CREATE SCHEMA owner_s AUTHORIZATION people_owner;
         GRANT USAGE ON SCHEMA owner_s TO PUBLIC;",
    )
    .unwrap();
    let mut o = cc.coordinator.connect_as("people_owner");
    plant_assign_overloads(&mut o, "owner_s", "people_owner", "owner code");
    owner_trigger_table(
        &mut c,
        "cards",
        "SET LOCAL search_path = owner_s, pg_catalog;",
        "('c10', 'acme', '4111')",
    );
    // A table the erasure does not touch, for the caller's next query.
    for sql in [
        "CREATE TABLE probe (tenant_id text NOT NULL, n int)",
        "SELECT create_distributed_table('probe', 'tenant_id', colocate_with => 'none')",
        "INSERT INTO probe SELECT 't' || g, g FROM generate_series(1, 8) g",
        "GRANT SELECT ON probe TO app",
    ] {
        c.batch_execute(sql).unwrap();
    }
    let mut tx = a.transaction().unwrap();
    tx.batch_execute("SELECT pgseal.set_tenant('acme')")
        .unwrap();
    erased_one(&mut tx, "acme", "c10", "erasure of cards");
    let seen = on_the_workers(
        &mut tx,
        "pg_catalog.current_setting('search_path')",
        "public.probe",
    );
    assert_eq!(
        seen,
        Ok(vec!["\"$user\", public".to_string()]),
        "the workers' path for the caller's next query"
    );
    tx.rollback().unwrap();

    // The same, with the owner's code also turning propagation off, so that
    // pgseal's sending back of the caller's values would not be sent, in an
    // offboarding's deletes (no statement of pgseal's through Citus follows them
    // in the call to send them back either).
    owner_trigger_table(
        &mut c,
        "zz_cards",
        "SET LOCAL search_path = owner_s, pg_catalog;
         SET LOCAL app.tenant_id = 'acme';
         PERFORM pg_catalog.set_config('citus.propagate_set_commands', 'none', true);",
        "('z10', 'leaving2', '4111')",
    );
    c.batch_execute("SELECT pgseal.tenant_offboard('leaving2', '0')")
        .unwrap();
    let mut tx = a.transaction().unwrap();
    tx.batch_execute("SELECT pgseal.set_tenant('leaving2')")
        .unwrap();
    tx.query("SELECT * FROM pgseal._offboard_export('leaving2')", &[])
        .unwrap_or_else(|e| panic!("the export: {}", message::<()>(Err(e))));
    tx.execute(
        "SELECT pgseal._offboard_advance('leaving2', 'scheduled', 'exported', '/x', repeat('a', 64))",
        &[],
    )
    .unwrap_or_else(|e| panic!("the advance: {}", message::<()>(Err(e))));
    tx.commit().unwrap();
    let mut tx = a.transaction().unwrap();
    tx.batch_execute("SELECT pgseal.set_tenant('leaving2')")
        .unwrap();
    let deleted: i64 = tx
        .query_one("SELECT pgseal._offboard_delete('leaving2', 100)", &[])
        .unwrap_or_else(|e| panic!("the delete: {}", message::<()>(Err(e))))
        .get(0);
    assert_eq!(deleted, 1);
    let seen = on_the_workers(
        &mut tx,
        "pg_catalog.current_setting('search_path') || ' / ' || pg_catalog.current_setting('app.tenant_id')",
        "public.probe",
    );
    assert_eq!(
        seen,
        Ok(vec!["\"$user\", public / leaving2".to_string()]),
        "the workers' path and tenant for the caller's next query, propagation turned off in the scope"
    );
    tx.rollback().unwrap();
    assert_no_node_logged(
        &cc,
        "owner code ran as",
        "propagation turned off in the scope",
    );

    // The connections pgseal's statements began as another role stay in the
    // transaction after them, and get every SET Citus sends later; Citus's
    // `citus_get_transaction_clock()` (executable by every role) then sends an
    // unqualified `citus_get_node_clock()` over each of them.
    a.batch_execute(
        "CREATE FUNCTION evil.citus_get_node_clock() RETURNS pg_catalog.cluster_clock
             LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM evil.pwn();
                 RETURN pg_catalog.citus_get_node_clock();
             END $$",
    )
    .unwrap();
    let mut tx = with_evil_path(&mut a, "acme9");
    tx.batch_execute("SELECT pgseal.vault_seal('x', 'c')")
        .unwrap();
    let r = tx.query_one("SELECT pg_catalog.citus_get_transaction_clock()", &[]);
    assert_eq!(sqlstate(r), "0A000", "the clock after pgseal's statements");
    drop(tx);
    // In a transaction where pgseal ran nothing as another role, the clock works.
    let mut tx = a.transaction().unwrap();
    tx.batch_execute("SELECT pgseal.set_tenant('acme9')")
        .unwrap();
    let r = message(tx.query_one("SELECT pg_catalog.citus_get_transaction_clock()", &[]));
    assert_eq!(r, "ok", "the clock alone");
    drop(tx);
    assert_no_node_logged(&cc, "evil code ran as", "the clock");

    // A table owner's deferred constraint trigger fires on the workers when the
    // transaction commits (at Citus's PREPARE or COMMIT), on the owner's
    // connections, under the settings Citus sent there last: after pgseal's scope,
    // the caller's own search_path, in which the trigger's unqualified lower()
    // would be the caller's.
    a.batch_execute(
        "CREATE FUNCTION evil.lower(text) RETURNS text LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM evil.pwn();
             RETURN $1;
         END $$",
    )
    .unwrap();
    for sql in [
        "CREATE FUNCTION public.people_checked() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM lower(OLD.email);
             RETURN OLD;
         END $$",
        "ALTER FUNCTION public.people_checked() OWNER TO people_owner",
        "SET citus.enable_unsafe_triggers = on",
        "CREATE CONSTRAINT TRIGGER people_checked AFTER DELETE ON people
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.people_checked()",
        "RESET citus.enable_unsafe_triggers",
    ] {
        c.batch_execute(sql).unwrap();
    }
    let before = pgseal_tests::count(
        &mut c,
        "SELECT count(*) FROM people WHERE tenant_id = 'acme'",
    );
    let mut tx = with_evil_path(&mut a, "acme");
    erased_one(
        &mut tx,
        "acme",
        "u12",
        "erasure of a table with its owner's deferred trigger",
    );
    assert_eq!(message(tx.commit()), "ok", "the erasure's commit");
    assert_no_node_logged(&cc, "evil code ran as", "an owner's deferred trigger");
    assert_eq!(
        pgseal_tests::count(
            &mut c,
            "SELECT count(*) FROM people WHERE tenant_id = 'acme'"
        ),
        before - 1,
        "erased, with the trigger run"
    );

    // The caller's path sent after the erasure, before the commit.
    let mut tx = a.transaction().unwrap();
    tx.batch_execute("SELECT pgseal.set_tenant('acme')")
        .unwrap();
    erased_one(
        &mut tx,
        "acme",
        "u13",
        "erasure of a table with its owner's deferred trigger, path sent after it",
    );
    tx.batch_execute("SET LOCAL search_path = evil, pg_catalog")
        .unwrap();
    assert_eq!(
        message(tx.commit()),
        "ok",
        "the erasure's commit, the caller's path sent after it"
    );
    assert_no_node_logged(
        &cc,
        "evil code ran as",
        "an owner's deferred trigger, the caller's path sent after the erasure",
    );

    // A session that calls itself one of Citus's own (application_name, which any
    // role may set) may prepare a transaction with its remote transactions open:
    // Citus keeps the connections pgseal's statements began as another role (an
    // erasure's, as the table's owner) into the session's next transaction, where
    // the clock would call the caller's function over them.
    let mut p = app(&cc.coordinator);
    p.batch_execute(
        "BEGIN; SELECT pgseal.set_tenant('acme'); SELECT pgseal.subject_erase('acme', 'u14');
         SET application_name = 'citus_internal gpid=10000000001';
         PREPARE TRANSACTION 'pgseal_left_open'",
    )
    .unwrap();
    let r = p.batch_execute(
        "BEGIN; SAVEPOINT s;
         SET LOCAL citus.propagate_set_commands = local;
         SET LOCAL search_path = evil, pg_catalog;
         SELECT pg_catalog.citus_get_transaction_clock()",
    );
    assert_eq!(
        sqlstate(r),
        "0A000",
        "the clock after a prepared transaction"
    );
    p.batch_execute("ROLLBACK").unwrap();
    c.batch_execute("ROLLBACK PREPARED 'pgseal_left_open'")
        .unwrap();
    assert_no_node_logged(
        &cc,
        "evil code ran as",
        "the clock after a prepared transaction",
    );

    // A second set_tenant() in a transaction sets citus.propagate_set_commands
    // again (which Citus never sends): pgseal's statements through Citus still
    // run (a new tenant's key).
    let mut tx = a.transaction().unwrap();
    let r = message(tx.batch_execute(
        "SELECT pgseal.set_tenant('acme'); SELECT pgseal.set_tenant('acme11'); SELECT pgseal.vault_seal('w', 'c')",
    ));
    assert_eq!(r, "ok", "a new tenant's key after a second set_tenant()");
    tx.commit().unwrap();

    // Citus's own connections as its extension's owner (a superuser) in the
    // caller's transaction: a new colocation group of create_distributed_table,
    // which a table's owner may call, is written to the workers' metadata over
    // them, after Citus replayed the caller's SETs there and called
    // assign_distributed_transaction_id unqualified.
    c.batch_execute("CREATE SCHEMA appdata AUTHORIZATION app")
        .unwrap();
    a.batch_execute(
        "CREATE TABLE appdata.mine (tenant_id text NOT NULL, n int);
         INSERT INTO appdata.mine SELECT 't' || g, g FROM generate_series(1, 8) g;",
    )
    .unwrap();
    let mut tx = with_evil_path(&mut a, "acme");
    let r = message(tx.query_one(
        "SELECT pg_catalog.create_distributed_table('appdata.mine', 'tenant_id', colocate_with => 'none')::text",
        &[],
    ));
    assert_eq!(r, "ok", "create_distributed_table under the caller's path");
    // The caller's own connections still parse under its path.
    let seen = on_the_workers(
        &mut tx,
        "pg_catalog.current_setting('search_path')",
        "appdata.mine",
    );
    assert_eq!(
        seen,
        Ok(vec!["evil, pg_catalog".to_string()]),
        "the caller's path on its own connections"
    );
    tx.commit().unwrap();
    assert_no_node_logged(&cc, "evil code ran as", "Citus's superuser connections");

    // The same, with the caller's path sent while a replayed SET made the
    // superuser's connections act as the caller, and reset after it.
    for (table, switch, back) in [
        ("mine_role", "SET LOCAL ROLE app", "RESET ROLE"),
        (
            "mine_auth",
            "SET LOCAL SESSION AUTHORIZATION app",
            "RESET SESSION AUTHORIZATION",
        ),
    ] {
        a.batch_execute(&format!(
            "CREATE TABLE appdata.{table} (tenant_id text NOT NULL, n int)"
        ))
        .unwrap();
        let mut tx = a.transaction().unwrap();
        tx.batch_execute("SELECT pgseal.set_tenant('acme')")
            .unwrap();
        tx.batch_execute(switch).unwrap();
        tx.batch_execute("SET LOCAL search_path = evil, pg_catalog")
            .unwrap();
        tx.batch_execute(back).unwrap();
        let r = message(tx.query_one(
            &format!(
                "SELECT pg_catalog.create_distributed_table('appdata.{table}', 'tenant_id', colocate_with => 'none')::text"
            ),
            &[],
        ));
        assert_eq!(r, "ok", "create_distributed_table after {switch}");
        tx.commit().unwrap();
        assert_no_node_logged(&cc, "evil code ran as", switch);
    }
}

#[test]
fn pgseals_statements_leave_the_workers_parsing_as_the_caller_sent_it() {
    if !citus::enabled("pgseals_statements_leave_the_workers_parsing_as_the_caller_sent_it") {
        return;
    }
    let cc = CitusCluster::start("citus-parsing");
    schema(&cc);
    let mut c = cc.coordinator.connect();
    c.batch_execute("CREATE SCHEMA caller_s").unwrap();
    // How tenant A's worker parses what the transaction sends it.
    let on_worker = |tx: &mut postgres::Transaction| -> String {
        tx.query_one(
            "SELECT pg_catalog.current_setting('search_path') || ' / ' || \
                    pg_catalog.current_setting('standard_conforming_strings') \
               FROM public.notes WHERE tenant_id OPERATOR(pg_catalog.=) 'A' \
                AND id OPERATOR(pg_catalog.=) 1",
            &[],
        )
        .unwrap()
        .get(0)
    };
    // Each case: what the caller sends first, and what the worker then has. The
    // pgseal call is a SECURITY DEFINER function with its own search_path whose
    // ledger entry (the transaction's first) runs an owner statement through Citus
    // with the parsing pinned; the pinning sent its values to the workers first.
    let cases = [
        ("", "\"$user\", public / on"),
        (
            "SET LOCAL search_path = caller_s, public",
            "caller_s, public / on",
        ),
        (
            "SAVEPOINT s; SET LOCAL search_path = caller_s; ROLLBACK TO SAVEPOINT s",
            "\"$user\", public / on",
        ),
        (
            "SET LOCAL search_path = caller_s; RESET search_path",
            "\"$user\", public / on",
        ),
        (
            "SET LOCAL standard_conforming_strings = off",
            "\"$user\", public / off",
        ),
        // Citus replays a released savepoint's SETs on no new connection.
        (
            "SAVEPOINT s; SET LOCAL search_path = caller_s; RELEASE SAVEPOINT s",
            "\"$user\", public / on",
        ),
        // A session-level SET here reaches no worker.
        (
            "SET search_path = caller_s, public",
            "\"$user\", public / on",
        ),
    ];
    // The calls: that function; and after it an organisation member added, whose
    // copy on the workers is written by a trigger that pins the parsing too (the
    // member's ledger entry, not the chain's first in the transaction, then sends
    // nothing).
    let calls = [
        "SELECT pgseal.retention_hold('A', true)",
        "SELECT pgseal.retention_hold('A', true); \
         INSERT INTO pgseal.org_members VALUES ('A', 'org9', 'u1', 'owner')",
    ];
    for call in calls {
        for (sent, want) in cases {
            let mut tx = c.transaction().unwrap();
            tx.batch_execute("SELECT pgseal.set_tenant('A')").unwrap();
            if !sent.is_empty() {
                tx.batch_execute(sent).unwrap();
            }
            assert_eq!(on_worker(&mut tx), want, "{sent}: before {call}");
            let here = |tx: &mut postgres::Transaction| -> String {
                tx.query_one(
                    "SELECT pg_catalog.current_setting('search_path') || ' / ' || \
                            pg_catalog.current_setting('standard_conforming_strings')",
                    &[],
                )
                .unwrap()
                .get(0)
            };
            let here_before = here(&mut tx);
            tx.batch_execute(call).unwrap();
            assert_eq!(on_worker(&mut tx), want, "{sent}: after {call}");
            assert_eq!(here(&mut tx), here_before, "{sent}: this node after {call}");
            tx.rollback().unwrap();
        }
    }
}

/// `org_protect`'s tables are offboarded on Citus: the coordinator sends each of the
/// offboarding's statements a grant (`pgseal.offboard_grant`), which shows the
/// table's owner all of the tenant's rows on the workers' shards, whatever user or
/// organisation they belong to. A grant is a MAC under the master key: a forged one
/// shows nothing, and a real one, read from a worker's log, shows nothing under
/// another tenant, to another role, or on another table.
#[test]
fn org_protect_tables_are_offboarded_on_citus_by_a_grant_that_opens_nothing_else() {
    if !citus::enabled(
        "org_protect_tables_are_offboarded_on_citus_by_a_grant_that_opens_nothing_else",
    ) {
        return;
    }
    let cc = CitusCluster::start("citus-org-offboard");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute("CREATE ROLE docs_owner LOGIN").unwrap();
    c.batch_execute("CREATE ROLE app LOGIN").unwrap();
    c.batch_execute(
        "CREATE TABLE docs (id int, tenant_id text NOT NULL, owner_id text, org_id text, body text,
                            PRIMARY KEY (tenant_id, id));
         ALTER TABLE docs OWNER TO docs_owner;
         SELECT create_distributed_table('docs', 'tenant_id');
         SELECT pgseal.org_protect('docs', 'owner_id', 'org_id');
         CREATE TABLE memos (id int, tenant_id text NOT NULL, owner_id text, org_id text, body text,
                             PRIMARY KEY (tenant_id, id));
         ALTER TABLE memos OWNER TO docs_owner;
         SELECT create_distributed_table('memos', 'tenant_id');
         SELECT pgseal.org_protect('memos', 'owner_id', 'org_id');
         GRANT SELECT ON docs, memos TO app;
         INSERT INTO docs VALUES
             (1, 'acme', 'olga', 'org1', 'org doc'), (2, 'acme', 'zed', NULL, 'zed personal'),
             (3, 'acme', 'mia', 'org2', 'other org'),
             (11, 'globex', 'olga', 'org1', 'globex doc'), (12, 'globex', 'vic', NULL, 'vic personal');
         INSERT INTO memos VALUES (1, 'acme', 'olga', 'org1', 'memo');
         -- A table of the coordinator alone in a database with Citus: org_protect's
         -- Citus form, offboarded by the backend's own flag (no grant is sent).
         CREATE TABLE drafts (id int, tenant_id text NOT NULL, owner_id text, org_id text, body text);
         ALTER TABLE drafts OWNER TO docs_owner;
         SELECT pgseal.org_protect('drafts', 'owner_id', 'org_id');
         INSERT INTO drafts VALUES (1, 'acme', 'zed', NULL, 'draft'), (2, 'acme', 'olga', 'org1', 'draft 2'),
                                   (3, 'globex', 'vic', NULL, 'kept');
         SELECT pgseal.tenant_offboard('acme', '0');",
    )
    .unwrap();
    // The statements the workers run are logged there: where the grants can be read.
    for w in &cc.workers {
        let mut wc = w.connect();
        wc.batch_execute("ALTER SYSTEM SET log_statement = 'all'")
            .unwrap();
        wc.batch_execute("SELECT pg_reload_conf()").unwrap();
    }
    let export = offboard_acme(&cc, "citus-org-offboard-files");
    assert_eq!(
        pgseal_tests::exported_per_table(&export),
        [
            ("public.docs", 3),
            ("public.drafts", 2),
            ("public.memos", 1)
        ]
        .map(|(t, n)| (t.to_owned(), n))
        .into(),
        "{export}"
    );
    assert!(!export.contains("globex"), "{export}");
    let tables = ["docs", "memos", "drafts"];
    assert_eq!(pgseal_tests::tenant_rows(&mut c, &tables, "acme"), 0);
    assert_eq!(pgseal_tests::tenant_rows(&mut c, &tables, "globex"), 3);
    let receipt = pgseal_tests::offboarded_receipt(&mut c, "acme");
    assert_eq!(receipt["deleted"]["public.docs"], 3, "{receipt}");
    assert_eq!(receipt["deleted"]["public.memos"], 1, "{receipt}");
    assert_eq!(receipt["deleted"]["public.drafts"], 2, "{receipt}");
    assert_eq!(
        receipt["protected_tables_not_offboarded"],
        serde_json::json!([]),
        "{receipt}"
    );
    // A grant the coordinator sent, as a worker logged it.
    let logs: String = cc.workers.iter().map(|w| w.server_log()).collect();
    let grant = logs
        .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '.'))
        .find(|w| w.starts_with("v1.") && w.len() > 64)
        .unwrap_or_else(|| panic!("no grant in the workers' logs"))
        .to_owned();
    let parts: Vec<&str> = grant.split('.').collect();
    assert_eq!(parts.len(), 5, "{grant}");
    // Rows the grant would show, were it taken for another scope: acme's again (one
    // per table, of another user), and globex's.
    c.batch_execute(
        "INSERT INTO docs VALUES (21, 'acme', 'zed', NULL, 'back'); \
         INSERT INTO memos VALUES (22, 'acme', 'zed', NULL, 'back');",
    )
    .unwrap();
    // Its key's check value with a MAC of zeros, for ever.
    let zeros = format!(
        "v1.{}.{}.{}.{}",
        parts[1],
        i64::MAX,
        parts[3],
        "0".repeat(64)
    );
    let mut flipped = grant.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    for node in cc.nodes() {
        for (role, tenant, table, value) in [
            // A forged grant, and the real one changed by a bit.
            ("docs_owner", "acme", "docs", zeros.as_str()),
            ("docs_owner", "acme", "docs", flipped.as_str()),
            ("docs_owner", "acme", "memos", zeros.as_str()),
            // The real one under another tenant, on another table, to another role.
            ("docs_owner", "globex", "docs", grant.as_str()),
            ("docs_owner", "globex", "memos", grant.as_str()),
            ("app", "globex", "docs", grant.as_str()),
        ] {
            let mut s = node.connect_as(role);
            let mut tx = s.transaction().unwrap();
            tx.batch_execute(&format!(
                "SELECT pgseal.set_tenant('{tenant}', 'nobody'); SET LOCAL pgseal.offboard_grant = '{value}'"
            ))
            .unwrap();
            let seen: i64 = tx
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .unwrap()
                .get(0);
            assert_eq!(
                seen, 0,
                "{role} {tenant} {table} {value} through {}",
                node.port
            );
            let _ = tx.rollback();
        }
    }
    // A grant whose key check value is not this master key's fails (55000): a
    // node whose key differs from the coordinator's must not show nothing.
    let other_key = format!(
        "v1.{}.{}.{}.{}",
        parts[1],
        i64::MAX,
        "0".repeat(16),
        "0".repeat(64)
    );
    for node in cc.nodes() {
        let mut s = node.connect_as("docs_owner");
        let mut tx = s.transaction().unwrap();
        tx.batch_execute(&format!(
            "SELECT pgseal.set_tenant('globex', 'nobody'); SET LOCAL pgseal.offboard_grant = '{other_key}'"
        ))
        .unwrap();
        assert_eq!(
            sqlstate(tx.query_one("SELECT count(*) FROM docs", &[])),
            "55000",
            "through {}",
            node.port
        );
    }
    // The same for memos, whose grants name memos: a docs grant shows no memo.
    let docs_grants: Vec<&str> = logs
        .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '.'))
        .filter(|w| w.starts_with("v1.") && w.len() > 64)
        .collect();
    assert!(docs_grants.len() >= 2, "{docs_grants:?}");
    for g in &docs_grants {
        let mut s = cc.workers[0].connect_as("docs_owner");
        let mut tx = s.transaction().unwrap();
        tx.batch_execute(&format!(
            "SELECT pgseal.set_tenant('globex', 'nobody'); SET LOCAL pgseal.offboard_grant = '{g}'"
        ))
        .unwrap();
        let seen: i64 = tx
            .query_one(
                "SELECT (SELECT count(*) FROM docs) + (SELECT count(*) FROM memos)",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(seen, 0, "{g}");
        let _ = tx.rollback();
    }
}

/// The deletes of a Citus table take only the rows the export read (their keys on
/// the shards' nodes, sent to the shards). A row changed after the export sends the
/// offboarding back to exporting while nothing is deleted; a row a shard's own
/// policy hid from the export (the offboarding checks the coordinator's policies),
/// shown again once deletes began, is left and stops them (55000); a foreign key's
/// ON DELETE CASCADE between distributed tables that would take a row written after
/// the export stops them too, undone. A reference table's rows are keyed by their
/// values (subjects_and_offboarding_work_on_distributed_tables_through_the_coordinator).
#[test]
fn a_citus_tables_rows_are_deleted_only_as_the_export_read_them() {
    if !citus::enabled("a_citus_tables_rows_are_deleted_only_as_the_export_read_them") {
        return;
    }
    let cc = CitusCluster::start("citus-offboard-whole");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute("CREATE ROLE docs_owner LOGIN").unwrap();
    c.batch_execute(
        "CREATE TABLE docs (id int, tenant_id text NOT NULL, body text, PRIMARY KEY (tenant_id, id));
         ALTER TABLE docs OWNER TO docs_owner;
         SELECT create_distributed_table('docs', 'tenant_id');
         SELECT pgseal.tenant_protect('docs');
         -- A table of the coordinator alone, deleted from first (name order).
         CREATE TABLE aa_local (id int, tenant_id text NOT NULL);
         ALTER TABLE aa_local OWNER TO docs_owner;
         SELECT pgseal.tenant_protect('aa_local');
         INSERT INTO docs VALUES (1, 'acme', 'one'), (2, 'acme', 'two'), (3, 'acme', 'hidden'),
                                 (1, 'initech', 'first'), (2, 'initech', 'second'),
                                 (1, 'globex', 'kept');
         INSERT INTO aa_local SELECT g, t FROM generate_series(1, 3) g, unnest(ARRAY['acme', 'initech', 'hooli']) t;
         CREATE TABLE orders (id int, tenant_id text NOT NULL, PRIMARY KEY (tenant_id, id));
         SELECT create_distributed_table('orders', 'tenant_id', colocate_with => 'docs');
         CREATE TABLE items (id int, tenant_id text NOT NULL, order_id int, PRIMARY KEY (tenant_id, id),
                             FOREIGN KEY (tenant_id, order_id) REFERENCES orders ON DELETE CASCADE);
         SELECT create_distributed_table('items', 'tenant_id', colocate_with => 'docs');
         SELECT pgseal.tenant_protect('orders');
         SELECT pgseal.tenant_protect('items');
         INSERT INTO orders VALUES (1, 'hooli'), (2, 'hooli');
         INSERT INTO items VALUES (1, 'hooli', 1), (2, 'hooli', 2);
         -- A cascade through a table outside the offboarded ones (no tenant column):
         -- a folder's delete takes its links, and a link's its pins.
         CREATE TABLE folders (id int, tenant_id text NOT NULL, PRIMARY KEY (tenant_id, id));
         SELECT create_distributed_table('folders', 'tenant_id', colocate_with => 'docs');
         CREATE TABLE links (id int, account text NOT NULL, folder_id int, PRIMARY KEY (account, id),
                             FOREIGN KEY (account, folder_id) REFERENCES folders ON DELETE CASCADE);
         SELECT create_distributed_table('links', 'account', colocate_with => 'docs');
         CREATE TABLE pins (id int, tenant_id text NOT NULL, link_id int, PRIMARY KEY (tenant_id, id),
                            FOREIGN KEY (tenant_id, link_id) REFERENCES links ON DELETE CASCADE);
         SELECT create_distributed_table('pins', 'tenant_id', colocate_with => 'docs');
         SELECT pgseal.tenant_protect('folders');
         SELECT pgseal.tenant_protect('pins');
         INSERT INTO folders SELECT 1, t FROM unnest(ARRAY['wayne', 'kent']) t;
         INSERT INTO links SELECT g, t, 1 FROM generate_series(1, 2) g, unnest(ARRAY['wayne', 'kent']) t;
         INSERT INTO pins SELECT g, t, g FROM generate_series(1, 2) g, unnest(ARRAY['wayne', 'kent']) t;",
    )
    .unwrap();
    let export_step = |c: &mut postgres::Client, tenant: &str| -> String {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])
            .unwrap();
        let lines: Vec<String> = tx
            .query("SELECT * FROM pgseal._offboard_export($1)", &[&tenant])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.execute(
            "SELECT pgseal._offboard_advance($1, 'scheduled', 'exported', '/x', repeat('a', 64))",
            &[&tenant],
        )
        .unwrap();
        tx.commit().unwrap();
        lines.join("\n")
    };
    let delete_batch = |c: &mut postgres::Client, tenant: &str, batch: i32| {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant])
            .unwrap();
        let n = tx
            .query_one("SELECT pgseal._offboard_delete($1, $2)", &[&tenant, &batch])
            .map(|r| r.get::<_, i64>(0));
        if n.is_ok() {
            tx.commit().unwrap();
        }
        n
    };
    let step = |c: &mut postgres::Client, tenant: &str| -> String {
        c.query_one(
            "SELECT step FROM pgseal.tenant_offboardings WHERE tenant_id = $1",
            &[&tenant],
        )
        .unwrap()
        .get(0)
    };

    // A row changed after the export, before any delete: exported again.
    c.batch_execute("SELECT pgseal.tenant_offboard('initech', '0')")
        .unwrap();
    let export = export_step(&mut c, "initech");
    assert!(
        export.contains("second") && !export.contains("changed"),
        "{export}"
    );
    c.batch_execute(
        "BEGIN; SELECT pgseal.set_tenant('initech'); UPDATE docs SET body = 'changed' WHERE id = 2; COMMIT;",
    )
    .unwrap();
    assert_eq!(delete_batch(&mut c, "initech", 1000).unwrap(), 0);
    assert_eq!(step(&mut c, "initech"), "scheduled");
    assert_eq!(
        pgseal_tests::count(
            &mut c,
            "SELECT count(*) FROM docs WHERE tenant_id = 'initech'"
        ),
        2
    );
    let export = export_step(&mut c, "initech");
    assert!(export.contains("changed"), "{export}");
    while delete_batch(&mut c, "initech", 1000).unwrap() > 0 {}
    for table in ["docs", "aa_local"] {
        let sql = format!("SELECT count(*) FROM {table} WHERE tenant_id = 'initech'");
        assert_eq!(pgseal_tests::count(&mut c, &sql), 0, "{table}");
    }

    // A row hidden from the export by the shard's own policy, shown again once a
    // batch was deleted: the deletes stop, and every row of the table stays.
    c.batch_execute("SELECT pgseal.tenant_offboard('acme', '0')")
        .unwrap();
    let (shard, port): (String, i32) = {
        let r = c
            .query_one(
                "SELECT shard_name, nodeport FROM citus_shards WHERE table_name = 'docs'::regclass \
                   AND shardid = get_shard_id_for_distribution_column('docs', 'acme')",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    let mut w = cc.node_at(port as u16).connect();
    let qual: String = w
        .query_one(
            "SELECT pg_get_expr(polqual, polrelid) FROM pg_policy \
              WHERE polrelid = $1::text::regclass AND polname = 'pgseal_tenant'",
            &[&shard],
        )
        .unwrap()
        .get(0);
    w.batch_execute(&format!(
        "ALTER POLICY pgseal_tenant ON {shard} USING (({qual}) AND body <> 'hidden')"
    ))
    .unwrap();
    let export = export_step(&mut c, "acme");
    assert_eq!(
        pgseal_tests::exported_per_table(&export),
        [("public.aa_local", 3), ("public.docs", 2)]
            .map(|(t, n)| (t.to_owned(), n))
            .into(),
        "{export}"
    );
    assert_eq!(delete_batch(&mut c, "acme", 1).unwrap(), 1);
    w.batch_execute(&format!(
        "ALTER POLICY pgseal_tenant ON {shard} USING ({qual})"
    ))
    .unwrap();
    let refused = loop {
        match delete_batch(&mut c, "acme", 1000) {
            Ok(n) => assert!(n > 0, "the deletes ended with the hidden row unrefused"),
            Err(e) => break e,
        }
    };
    let message = refused.as_db_error().unwrap().to_string();
    assert_eq!(sqlstate::<()>(Err(refused)), "55000", "{message}");
    assert!(
        message.contains("export does not hold") && message.contains("docs"),
        "{message}"
    );
    assert_eq!(
        pgseal_tests::count(&mut c, "SELECT count(*) FROM docs WHERE tenant_id = 'acme'"),
        1
    );
    assert_eq!(
        pgseal_tests::count(&mut c, "SELECT count(*) FROM docs WHERE body = 'hidden'"),
        1
    );

    // An item written after the export, of an order exported: the order's delete
    // would cascade to it. Stopped, undone.
    c.batch_execute("SELECT pgseal.tenant_offboard('hooli', '0')")
        .unwrap();
    let export = export_step(&mut c, "hooli");
    assert_eq!(
        pgseal_tests::exported_per_table(&export),
        [
            ("public.aa_local", 3),
            ("public.items", 2),
            ("public.orders", 2)
        ]
        .map(|(t, n)| (t.to_owned(), n))
        .into(),
        "{export}"
    );
    assert_eq!(delete_batch(&mut c, "hooli", 1).unwrap(), 1);
    c.batch_execute(
        "BEGIN; SELECT pgseal.set_tenant('hooli'); INSERT INTO items VALUES (3, 'hooli', 2); COMMIT;",
    )
    .unwrap();
    let refused = loop {
        match delete_batch(&mut c, "hooli", 1000) {
            Ok(n) => assert!(n > 0, "the deletes ended with the cascade unrefused"),
            Err(e) => break e,
        }
    };
    let message = refused.as_db_error().unwrap().to_string();
    assert_eq!(sqlstate::<()>(Err(refused)), "55000", "{message}");
    assert!(
        message.contains("ON DELETE action") && message.contains("items"),
        "{message}"
    );
    assert_eq!(
        pgseal_tests::count(
            &mut c,
            "SELECT count(*) FROM items WHERE tenant_id = 'hooli'"
        ),
        1
    );
    assert_eq!(
        pgseal_tests::count(
            &mut c,
            "SELECT count(*) FROM orders WHERE tenant_id = 'hooli'"
        ),
        2
    );

    // Pins reached from folders through links: deleted before them.
    c.batch_execute("SELECT pgseal.tenant_offboard('wayne', '0')")
        .unwrap();
    export_step(&mut c, "wayne");
    while delete_batch(&mut c, "wayne", 1000).unwrap() > 0 {}
    for table in ["folders", "pins"] {
        let sql = format!("SELECT count(*) FROM {table} WHERE tenant_id = 'wayne'");
        assert_eq!(pgseal_tests::count(&mut c, &sql), 0, "{table}");
    }
    // A pin written after the export, which the folder's delete would cascade to
    // through its link: stopped, undone.
    c.batch_execute("SELECT pgseal.tenant_offboard('kent', '0')")
        .unwrap();
    export_step(&mut c, "kent");
    // The pins first, in one statement (a Citus table's ignores the batch size).
    assert_eq!(delete_batch(&mut c, "kent", 1).unwrap(), 2);
    c.batch_execute(
        "BEGIN; SELECT pgseal.set_tenant('kent'); INSERT INTO pins VALUES (3, 'kent', 2); COMMIT;",
    )
    .unwrap();
    let refused = loop {
        match delete_batch(&mut c, "kent", 1000) {
            Ok(n) => assert!(
                n > 0,
                "the deletes ended with the cascade through links unrefused"
            ),
            Err(e) => break e,
        }
    };
    let message = refused.as_db_error().unwrap().to_string();
    assert_eq!(sqlstate::<()>(Err(refused)), "55000", "{message}");
    assert!(message.contains("pins"), "{message}");
    assert_eq!(
        pgseal_tests::count(
            &mut c,
            "SELECT count(*) FROM pins WHERE tenant_id = 'kent' AND id = 3"
        ),
        1
    );
    assert_eq!(
        pgseal_tests::count(
            &mut c,
            "SELECT count(*) FROM docs WHERE tenant_id = 'globex'"
        ),
        1
    );
}

/// A table owner's function in an index predicate that only a shard on a worker has
/// (made there with `citus.enable_manual_changes_to_shards`, unseen by the
/// coordinator's catalog) runs as whoever plans the shard's query: pgseald's tenant
/// listing and the key usage never plan a Citus table's shards as the extension owner
/// (a superuser), but as the table's owner or not at all.
#[test]
fn a_shards_own_index_code_never_runs_as_the_extension_owner() {
    if !citus::enabled("a_shards_own_index_code_never_runs_as_the_extension_owner") {
        return;
    }
    let cc = CitusCluster::start("citus-shard-code");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute(
        "CREATE ROLE trap_owner LOGIN;
         CREATE TABLE trap (id int, tenant_id text NOT NULL, secret text, PRIMARY KEY (tenant_id, id));
         ALTER TABLE trap OWNER TO trap_owner;
         SELECT create_distributed_table('trap', 'tenant_id');
         INSERT INTO trap SELECT g, t, NULL FROM generate_series(1, 3) g, unnest(ARRAY['a', 'b', 'c', 'd']) t;
         SELECT pgseal.vault_register_column('trap', 'secret', 'trap.secret');",
    )
    .unwrap();
    for w in &cc.workers {
        w.connect()
            .batch_execute(
                "SET citus.enable_ddl_propagation = off;
                 CREATE FUNCTION public.trap_pred(int) RETURNS boolean IMMUTABLE LANGUAGE plpgsql AS $f$
                 BEGIN
                     IF (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER) THEN
                         RAISE EXCEPTION 'owner code ran as a superuser';
                     END IF;
                     RETURN true;
                 END $f$;
                 ALTER FUNCTION public.trap_pred(int) OWNER TO trap_owner;
                 GRANT CREATE ON SCHEMA public TO trap_owner;",
            )
            .unwrap();
    }
    let shards: Vec<(String, i32)> = c
        .query(
            "SELECT shard_name, nodeport FROM citus_shards WHERE table_name = 'trap'::regclass",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(!shards.is_empty());
    // Made by the table's owner, on its worker.
    for (shard, port) in &shards {
        cc.node_at(*port as u16)
            .connect_as("trap_owner")
            .batch_execute(&format!(
                "SET citus.enable_ddl_propagation = off; SET citus.enable_manual_changes_to_shards = on; \
                 CREATE INDEX ON {shard} (id) WHERE public.trap_pred(1)"
            ))
            .unwrap();
    }
    // The trap springs for a superuser planning a query on a shard.
    let (shard, port) = &shards[0];
    let sprung = cc
        .node_at(*port as u16)
        .connect()
        .simple_query(&format!("SELECT count(*) FROM {shard} WHERE id = 1"));
    assert!(
        format!("{:?}", sprung.err()).contains("owner code ran as a superuser"),
        "the trap does not spring"
    );
    let tenants: Vec<String> = c
        .query(
            "SELECT * FROM pgseal._tenants_of('public.trap') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tenants, vec!["a", "b", "c", "d"]);
    c.query("SELECT * FROM pgseal._key_usage()", &[]).unwrap();
}

/// pgseald lists a Citus table's tenants (for a retention rule without a tenant)
/// on the nodes that hold its shards, each shard checked in its own node's catalog:
/// a protected table whose row level security binds its owner (FORCE, an owner
/// that is no superuser) is listed and swept without a tenant context, whatever its
/// name; a shard's own index that runs its owner's code makes its node scan it as
/// that owner, restricted, which fails the listing (no tenant context there) rather
/// than run that code as a superuser or leave the shard's tenants out.
#[test]
fn a_protected_citus_tables_tenants_are_listed_on_the_nodes_that_hold_them() {
    if !citus::enabled("a_protected_citus_tables_tenants_are_listed_on_the_nodes_that_hold_them") {
        return;
    }
    let cc = CitusCluster::start("citus-tenant-list");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute(
        "CREATE ROLE ev_owner LOGIN;
         CREATE TABLE \"ev'$$\" (id bigint GENERATED ALWAYS AS IDENTITY, tenant_id text NOT NULL,
                                 created_at timestamptz NOT NULL, PRIMARY KEY (tenant_id, id));
         ALTER TABLE \"ev'$$\" OWNER TO ev_owner;
         SELECT create_distributed_table('\"ev''$$\"', 'tenant_id');
         SELECT pgseal.tenant_protect('\"ev''$$\"');
         INSERT INTO \"ev'$$\" (tenant_id, created_at)
         SELECT 't' || (g % 9), CASE WHEN g % 2 = 0 THEN now() - interval '400 days' ELSE now() END
           FROM generate_series(1, 900) g;
         SELECT pgseal.retention_set('\"ev''$$\"', '30 days');",
    )
    .unwrap();
    let forced: bool = c
        .query_one(
            "SELECT relforcerowsecurity FROM pg_class WHERE oid = '\"ev''$$\"'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(forced, "the policies do not bind the owner");
    let list = "SELECT * FROM pgseal._tenants_of('public.\"ev''$$\"') ORDER BY 1";
    let listed: Vec<String> = c
        .query(list, &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let all: Vec<String> = (0..9).map(|i| format!("t{i}")).collect();
    assert_eq!(listed, all);
    let (code, out) = Pgseald::new(["retention", "run"]).on(&cc.coordinator).run();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        pgseal_tests::count(&mut c, "SELECT count(*) FROM \"ev'$$\""),
        450,
        "{out}"
    );
    assert_eq!(
        pgseal_tests::count(
            &mut c,
            "SELECT count(DISTINCT tenant_id) FROM pgseal.ledger WHERE event = 'retention.deleted'"
        ),
        9,
        "{out}"
    );

    // Tenant values whose text a node's settings would change: the listing gives
    // the text this node's session prints, whatever the workers' defaults.
    for w in &cc.workers {
        let mut wc = w.connect();
        for set in [
            "ALTER SYSTEM SET DateStyle = 'SQL, DMY'",
            "ALTER SYSTEM SET extra_float_digits = -10",
            "SELECT pg_reload_conf()",
        ] {
            wc.batch_execute(set).unwrap();
        }
    }
    c.batch_execute(
        "CREATE TABLE days (id int, tenant_id date NOT NULL, PRIMARY KEY (tenant_id, id));
         SELECT create_distributed_table('days', 'tenant_id');
         INSERT INTO days VALUES (1, '2024-01-02'), (2, '2024-03-04'), (3, '2024-03-04');
         CREATE TABLE floats (id int, tenant_id float8 NOT NULL, PRIMARY KEY (tenant_id, id));
         SELECT create_distributed_table('floats', 'tenant_id');
         INSERT INTO floats VALUES (1, '0.1'), (2, '0.3333333333333333');",
    )
    .unwrap();
    for w in &cc.workers {
        setting_reached(w, "DateStyle", "SQL, DMY");
        setting_reached(w, "extra_float_digits", "-10");
    }
    let of = |c: &mut postgres::Client, t: &str| -> Vec<String> {
        c.query(
            &format!("SELECT * FROM pgseal._tenants_of('{t}') ORDER BY 1"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert_eq!(of(&mut c, "public.days"), vec!["2024-01-02", "2024-03-04"]);
    assert_eq!(
        of(&mut c, "public.floats"),
        vec!["0.1", "0.3333333333333333"]
    );

    // A table made on a worker under the name of a shard another worker holds is
    // not read as that shard.
    let (moved, moved_id, elsewhere): (String, i64, i32) = c
        .query_one(
            "SELECT shard_name, shardid, nodeport FROM citus_shards \
              WHERE table_name = '\"ev''$$\"'::regclass ORDER BY shardid LIMIT 1",
            &[],
        )
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .unwrap();
    let other = cc
        .workers
        .iter()
        .find(|w| w.port != elsewhere as u16)
        .unwrap();
    let mut oc = other.connect();
    oc.batch_execute(&format!(
        "SET citus.enable_ddl_propagation = off;
         CREATE TABLE public.{moved} (id int, tenant_id text);
         INSERT INTO public.{moved} VALUES (1, 'decoy');"
    ))
    .unwrap();
    // Shards are shown to this session as to the sessions Citus opens.
    oc.batch_execute("SET citus.show_shards_for_app_name_prefixes = '*'")
        .unwrap();
    let err = oc
        .query(
            "SELECT pgseal._shard_tenants('public.\"ev''$$\"', ARRAY[$1::bigint], '0')",
            &[&moved_id],
        )
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("a shard of the table is not on this node"),
        "{err:?}"
    );
    oc.batch_execute(&format!(
        "SET citus.enable_ddl_propagation = off; DROP TABLE public.{moved};"
    ))
    .unwrap();

    // A lock held on a shard, on its worker: the node waits for it no longer than
    // the caller's lock_timeout, and the listing fails rather than wait on.
    let (locked, locked_port): (String, i32) = c
        .query_one(
            "SELECT shard_name, nodeport FROM citus_shards \
              WHERE table_name = '\"ev''$$\"'::regclass ORDER BY shardid DESC LIMIT 1",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    let mut holder = cc.node_at(locked_port as u16).connect();
    let mut held = holder.transaction().unwrap();
    held.batch_execute(&format!(
        "SET LOCAL citus.enable_manual_changes_to_shards = on; LOCK TABLE public.{locked} IN ACCESS EXCLUSIVE MODE"
    ))
    .unwrap();
    c.batch_execute("SET statement_timeout = '30s'; SET lock_timeout = '300ms'")
        .unwrap();
    let began = std::time::Instant::now();
    let err = c.query(list, &[]).unwrap_err();
    assert_eq!(
        err.code().map(|s| s.code().to_owned()).as_deref(),
        Some("55000"),
        "{err:?}"
    );
    assert!(
        began.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        began.elapsed()
    );
    assert!(
        cc.coordinator
            .server_log()
            .lines()
            .any(|l| l.contains("could not list the tenants of") && l.contains("lock timeout")),
        "the node's lock wait was not cut short"
    );
    held.rollback().unwrap();
    c.batch_execute("RESET statement_timeout; RESET lock_timeout")
        .unwrap();

    // The owner's function in a partial index that one shard alone has, on its
    // worker: that node plans the shard's scan as the owner, restricted, where the
    // policies need a tenant (a default tenant in the worker's settings does not
    // stand in for one); the listing fails, naming the node's error.
    c.batch_execute("GRANT CREATE ON SCHEMA public TO ev_owner")
        .unwrap();
    for w in &cc.workers {
        let mut wc = w.connect();
        wc.batch_execute("ALTER SYSTEM SET app.tenant_id = 't1'")
            .unwrap();
        wc.batch_execute("SELECT pg_reload_conf()").unwrap();
    }
    for w in &cc.workers {
        setting_reached(w, "app.tenant_id", "t1");
    }
    owner_code_on_one_shard(&cc, &mut c, "\"ev'$$\"", "ev_owner");
    let err = c.query(list, &[]).unwrap_err();
    assert_eq!(
        err.code().map(|s| s.code().to_owned()).as_deref(),
        Some("55000"),
        "{err:?}"
    );
    assert!(
        format!("{err:?}").contains("could not list the tenants"),
        "{err:?}"
    );
    // The coordinator's warning carries the node's own error: the policies' need
    // of a tenant, not the trap's.
    let log = cc.coordinator.server_log();
    assert!(
        log.lines().any(|l| l.contains("could not list the tenants of")
            && l.contains("no tenant context")),
        "{log}"
    );
    assert!(!log.contains("owner code ran as a superuser"), "{log}");
}

/// `key_usage` counts a Citus table's sealed values on the nodes that hold its
/// shards, each shard checked in its own node's catalog: every value is counted
/// under its key, also with more shards on a node than one statement there takes; a shard's own index that runs its owner's code leaves the table
/// uncounted, with a warning, and the code never runs as a superuser.
#[test]
fn a_citus_tables_sealed_values_are_counted_on_the_nodes_that_hold_them() {
    if !citus::enabled("a_citus_tables_sealed_values_are_counted_on_the_nodes_that_hold_them") {
        return;
    }
    let cc = CitusCluster::start("citus-key-usage");
    let mut c = cc.coordinator.connect();
    distributed_pgseal(&mut c);
    c.batch_execute(
        "CREATE ROLE creds_owner LOGIN;
         GRANT CREATE ON SCHEMA public TO creds_owner;
         CREATE TABLE creds (id int, tenant_id text NOT NULL, token text, PRIMARY KEY (tenant_id, id));
         ALTER TABLE creds OWNER TO creds_owner;
         SET citus.shard_count = 160;
         SELECT create_distributed_table('creds', 'tenant_id');
         RESET citus.shard_count;
         SELECT pgseal.vault_register_column('creds', 'token');",
    )
    .unwrap();
    for (i, t) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1)", &[t]).unwrap();
        tx.execute(
            "INSERT INTO creds SELECT g, $1, pgseal.vault_seal('tok' || g) FROM generate_series(1, $2) g",
            &[t, &(10 * (i as i32 + 1))],
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let usage = |c: &mut postgres::Client| -> Vec<(String, Option<i64>)> {
        c.query(
            "SELECT tenant_id, sum(rows)::bigint FROM pgseal.key_usage GROUP BY 1 ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    };
    let want: Vec<(String, Option<i64>)> = ["a", "b", "c", "d", "e"]
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), Some(10 * (i as i64 + 1))))
        .collect();
    assert_eq!(usage(&mut c), want);
    // Each key's count is the number of values under it.
    let direct: Vec<(String, i64)> = c
        .query(
            "SELECT split_part(token, ':', 2), count(*) FROM creds GROUP BY 1 ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let counted: Vec<(String, i64)> = c
        .query(
            "SELECT key_id, rows FROM pgseal.key_usage WHERE rows > 0 ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(counted, direct);

    // A table whose only shard has no active placement: its tenants cannot be
    // listed (55000), and no key's count is known, rather than none.
    c.batch_execute(
        "SET citus.shard_count = 1;
         CREATE TABLE lonely (id int, tenant_id text NOT NULL, token text, PRIMARY KEY (tenant_id, id));
         SELECT create_distributed_table('lonely', 'tenant_id', colocate_with => 'none');
         RESET citus.shard_count;
         SELECT pgseal.vault_register_column('lonely', 'token');
         INSERT INTO lonely VALUES (1, 'a', NULL);
         UPDATE pg_dist_placement SET shardstate = 3
          WHERE shardid = (SELECT shardid FROM pg_dist_shard WHERE logicalrelid = 'lonely'::regclass);",
    )
    .unwrap();
    let err = c
        .query("SELECT * FROM pgseal._tenants_of('public.lonely')", &[])
        .unwrap_err();
    assert_eq!(
        err.code().map(|s| s.code().to_owned()).as_deref(),
        Some("55000"),
        "{err:?}"
    );
    let unknown: Vec<(String, Option<i64>)> = want.iter().map(|(t, _)| (t.clone(), None)).collect();
    assert_eq!(usage(&mut c), unknown);
    c.batch_execute(
        "UPDATE pg_dist_placement SET shardstate = 1
          WHERE shardid = (SELECT shardid FROM pg_dist_shard WHERE logicalrelid = 'lonely'::regclass)",
    )
    .unwrap();
    assert_eq!(usage(&mut c), want);

    // The owner's function in a partial index of one shard, made on its worker.
    owner_code_on_one_shard(&cc, &mut c, "creds", "creds_owner");
    // No count is known then (none is taken for zero).
    assert_eq!(usage(&mut c), unknown);
    let log = cc.coordinator.server_log();
    assert!(
        log.lines()
            .any(|l| l.contains("key_usage does not count public.creds")
                && l.contains("would run code its owner wrote")),
        "{log}"
    );
    assert!(!log.contains("owner code ran as a superuser"), "{log}");
}

/// Waits until a new session on `node` shows `value` for setting `name` (after an
/// `ALTER SYSTEM` and a reload, which the postmaster takes in its own time).
fn setting_reached(node: &pgseal_tests::Cluster, name: &str, value: &str) {
    let began = std::time::Instant::now();
    loop {
        let shown: Option<String> = node
            .connect()
            .query_one("SELECT current_setting($1, true)", &[&name])
            .unwrap()
            .get(0);
        if shown.as_deref() == Some(value) {
            return;
        }
        assert!(
            began.elapsed() < std::time::Duration::from_secs(30),
            "{name} never reached {value}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// As `owner` (who may create in schema public), on the worker that holds the
/// first shard of `table` (a quoted name): a function of the owner's that raises
/// when it runs as a superuser, in a partial index that only that shard has
/// (made with DDL propagation off), so that whoever plans a query on the shard
/// runs it.
fn owner_code_on_one_shard(cc: &CitusCluster, c: &mut postgres::Client, table: &str, owner: &str) {
    let (shard, port): (String, i32) = c
        .query_one(
            "SELECT shard_name, nodeport FROM citus_shards \
              WHERE table_name = $1::text::regclass ORDER BY shardid LIMIT 1",
            &[&table],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    cc.node_at(port as u16)
        .connect_as(owner)
        .batch_execute(&format!(
            "SET citus.enable_ddl_propagation = off; SET citus.enable_manual_changes_to_shards = on;
             CREATE FUNCTION public.{owner}_pred(int) RETURNS boolean IMMUTABLE LANGUAGE plpgsql AS $f$
             BEGIN
                 IF (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER) THEN
                     RAISE EXCEPTION 'owner code ran as a superuser';
                 END IF;
                 RETURN true;
             END $f$;
             CREATE INDEX ON {shard} (id) WHERE public.{owner}_pred(1);"
        ))
        .unwrap();
}
