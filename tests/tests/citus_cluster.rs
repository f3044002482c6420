//! The Citus tier (issue 18): pgseal on a coordinator and two workers, tenant tables
//! distributed by tenant. It runs when `make test` installed Citus (PostgreSQL 16 and
//! later, vendored source present: `PGSEAL_CITUS=1`); otherwise each test says that it
//! is skipped.

use pgseal_tests::citus::{self, CitusCluster};
use pgseal_tests::{matrix, sqlstate};

/// Three tables shaped like the single-node matrix's `notes`, each under
/// `tenant_protect`: distributed and then protected, protected and then distributed
/// (co-located), and a reference table (a copy on every node).
const TABLES: [&str; 3] = ["notes", "notes_early", "notes_ref"];

const SCHEMA: &str = "
    CREATE EXTENSION pgseal;
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
    cc.coordinator.connect().batch_execute(SCHEMA).unwrap();
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
    cc.coordinator.connect().batch_execute(SCHEMA).unwrap();
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

    // Each shard, read directly on the node that holds it: its own policy.
    let mut c = cc.coordinator.connect();
    let shards: Vec<(String, i32)> = c
        .query(
            "SELECT shard_name, nodeport FROM citus_shards \
             WHERE table_name::text = ANY ($1) ORDER BY 1, 2",
            &[&TABLES.to_vec()],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(shards.len() >= 2 * 32, "{} shard placements", shards.len());
    for (shard, port) in &shards {
        let mut on = app(cc.node_at(*port as u16));
        let sql = format!("SELECT tenant_id FROM {shard}");
        assert_eq!(
            tenants(&mut on, "", &sql),
            Err("42501".into()),
            "{shard} on {port}"
        );
        let seen = tenants(&mut on, "SELECT pgseal.set_tenant('B')", &sql)
            .unwrap_or_else(|e| panic!("{shard} on {port}: {e}"));
        assert!(seen.iter().all(|t| t == "B"), "{shard} on {port}: {seen:?}");
    }
}

#[test]
fn isolation_report_understands_citus_tables() {
    if !citus::enabled("isolation_report_understands_citus_tables") {
        return;
    }
    let cc = CitusCluster::start("citus-report");
    let mut c = cc.coordinator.connect();
    c.batch_execute(SCHEMA).unwrap();
    c.batch_execute(
        "CREATE TABLE by_id (id int, tenant_id text NOT NULL, PRIMARY KEY (id, tenant_id));
         CREATE INDEX ON by_id (tenant_id);
         SELECT create_distributed_table('by_id', 'id');
         SELECT pgseal.tenant_protect('by_id');",
    )
    .unwrap();
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
