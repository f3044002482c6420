//! Attack tier, tenancy: plays an application that tries to break the organisation
//! invariants and to read a tenant's rows after its transaction, against a real
//! cluster, as the non-superuser login role `app`. Each assertion names its probe.
//!
//! - Organisations: an admin cannot grant or take the owner role; only a user who
//!   already owns an organisation of the tenant (or a pgseal_admin member) creates
//!   one; the last owner stays while the organisation has members; and two sessions
//!   racing to create one organisation, or to step down as its owners, cannot both
//!   win.
//! - WITH HOLD cursors: with `pgseal.strict_context = on`, a cursor declared under a
//!   tenant does not outlive the transaction, so no later client of the connection
//!   can FETCH that tenant's rows.

use std::time::{Duration, Instant};

use pgseal_tests::{sqlstate, Cluster, KEY_V1};

/// Runs `sql` for app user `user` of `tenant` in a transaction of its own, committed
/// when it succeeds; the SQLSTATE it ended with.
fn attempt(c: &mut postgres::Client, tenant: &str, user: &str, sql: &str) -> String {
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT pgseal.set_tenant($1, $2)", &[&tenant, &user])
        .unwrap();
    let state = sqlstate(tx.batch_execute(sql));
    if state == "00000" {
        tx.commit().unwrap();
    } else {
        let _ = tx.rollback();
    }
    state
}

/// "user:role" for every member of an organisation, as the superuser sees them.
fn members(admin: &mut postgres::Client, tenant: &str, org: &str) -> String {
    admin
        .query_one(
            "SELECT coalesce(string_agg(user_id || ':' || role, ',' ORDER BY user_id), '') \
             FROM pgseal.org_members WHERE tenant_id = $1 AND org_id = $2",
            &[&tenant, &org],
        )
        .unwrap()
        .get(0)
}

/// Two app sessions race: the first runs `first` in an open transaction; the second
/// runs `second` in another thread, and the first commits once the second waits for
/// a lock (or after a few seconds, if it never does). The second's SQLSTATE, after
/// it committed or rolled back.
fn race(
    cl: &Cluster,
    isolation: &str,
    first: (&str, &str, &str),
    second: (&str, &str, &str),
) -> String {
    let begin = format!("BEGIN ISOLATION LEVEL {isolation}");
    let mut c1 = cl.connect_as("app");
    c1.batch_execute(&begin).unwrap();
    c1.execute("SELECT pgseal.set_tenant($1, $2)", &[&first.0, &first.1])
        .unwrap();
    c1.batch_execute(first.2)
        .unwrap_or_else(|e| panic!("race: the first session's statement: {e}"));

    let mut c2 = cl.connect_as("app");
    let pid2: i32 = c2.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let (tenant, user, sql) = (
        second.0.to_owned(),
        second.1.to_owned(),
        second.2.to_owned(),
    );
    let second = std::thread::spawn(move || {
        c2.batch_execute(&begin).unwrap();
        c2.execute("SELECT pgseal.set_tenant($1, $2)", &[&tenant, &user])
            .unwrap();
        let state = sqlstate(c2.batch_execute(&sql));
        let end = if state == "00000" {
            "COMMIT"
        } else {
            "ROLLBACK"
        };
        let commit = sqlstate(c2.batch_execute(end));
        if state == "00000" {
            commit
        } else {
            state
        }
    });

    let mut watcher = cl.connect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !second.is_finished() {
        let waiting: bool = watcher
            .query_one(
                "SELECT coalesce(bool_or(wait_event_type = 'Lock'), false) FROM pg_stat_activity WHERE pid = $1",
                &[&pid2],
            )
            .unwrap()
            .get(0);
        if waiting {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    c1.batch_execute("COMMIT").unwrap();
    second.join().expect("the second session's thread")
}

const ORGS: &str = "
    CREATE EXTENSION pgseal;
    CREATE ROLE app LOGIN;
    CREATE ROLE ops LOGIN IN ROLE pgseal_admin;
    INSERT INTO pgseal.org_members VALUES
        ('A', 'org1', 'olga', 'owner'), ('A', 'org1', 'adam', 'admin'),
        ('A', 'org1', 'mia', 'member'),
        ('A', 'home', 'tom', 'owner'),
        ('A', 'duo', 'pat', 'owner'), ('A', 'duo', 'quinn', 'owner'), ('A', 'duo', 'rex', 'member'),
        ('A', 'solo', 'sue', 'owner'),
        ('B', 'b1', 'nina', 'owner');
";

#[test]
fn organisation_invariants_hold_against_an_attacker() {
    let cl = Cluster::start("attack-tenancy-orgs", &[KEY_V1], &[]);
    let mut admin = cl.connect();
    admin.batch_execute(ORGS).unwrap();
    let mut app = cl.connect_as("app");
    let org1 = members(&mut admin, "A", "org1");

    // An admin of org1 tries every way to the owner role, or to be rid of the owner.
    for (probe, sql) in [
        ("admin inserts an owner row", "INSERT INTO pgseal.org_members VALUES ('A', 'org1', 'eve', 'owner')"),
        ("admin promotes themself", "UPDATE pgseal.org_members SET role = 'owner' WHERE org_id = 'org1' AND user_id = 'adam'"),
        ("admin promotes a member", "UPDATE pgseal.org_members SET role = 'owner' WHERE org_id = 'org1' AND user_id = 'mia'"),
        ("admin upserts themself to owner", "INSERT INTO pgseal.org_members VALUES ('A', 'org1', 'adam', 'admin') ON CONFLICT (tenant_id, org_id, user_id) DO UPDATE SET role = 'owner'"),
        ("admin demotes the owner", "UPDATE pgseal.org_members SET role = 'member' WHERE org_id = 'org1' AND user_id = 'olga'"),
        ("admin deletes the owner", "DELETE FROM pgseal.org_members WHERE org_id = 'org1' AND user_id = 'olga'"),
        ("admin takes over the owner's row", "UPDATE pgseal.org_members SET user_id = 'adam2' WHERE org_id = 'org1' AND user_id = 'olga'"),
        ("admin deletes every member of the organisation", "DELETE FROM pgseal.org_members WHERE org_id = 'org1'"),
    ] {
        assert_eq!(attempt(&mut app, "A", "adam", sql), "42501", "probe: {probe}");
    }
    assert_eq!(
        members(&mut admin, "A", "org1"),
        org1,
        "probes as admin changed nothing"
    );

    // Creating an organisation, which makes its creator the first owner.
    for (probe, tenant, user, state) in [
        (
            "a member who owns nothing creates an organisation",
            "A",
            "mia",
            "42501",
        ),
        (
            "an admin who owns nothing creates an organisation",
            "A",
            "adam",
            "42501",
        ),
        (
            "an outsider creates an organisation",
            "A",
            "nobody",
            "42501",
        ),
        (
            "an owner in tenant B only creates one in tenant A",
            "A",
            "nina",
            "42501",
        ),
        (
            "an owner of another organisation of the tenant creates one",
            "A",
            "tom",
            "00000",
        ),
    ] {
        let sql = format!(
            "INSERT INTO pgseal.org_members VALUES ('{tenant}', 'new-{user}', '{user}', 'owner')"
        );
        assert_eq!(
            attempt(&mut app, tenant, user, &sql),
            state,
            "probe: {probe}"
        );
    }
    assert_eq!(members(&mut admin, "A", "new-tom"), "tom:owner");
    for user in ["mia", "adam", "nobody", "nina"] {
        assert_eq!(
            members(&mut admin, "A", &format!("new-{user}")),
            "",
            "no organisation new-{user}"
        );
    }
    // A member of pgseal_admin may add the first owner (for the user it acts as).
    let mut ops = cl.connect_as("ops");
    assert_eq!(
        attempt(
            &mut ops,
            "A",
            "zoe",
            "INSERT INTO pgseal.org_members VALUES ('A', 'ops-org', 'zoe', 'owner')"
        ),
        "00000",
        "probe: pgseal_admin creates an organisation's first owner"
    );

    // The last owner stays while the organisation has other members.
    for (probe, sql) in [
        ("last owner demotes themself", "UPDATE pgseal.org_members SET role = 'admin' WHERE org_id = 'org1' AND user_id = 'olga'"),
        ("last owner deletes themself", "DELETE FROM pgseal.org_members WHERE org_id = 'org1' AND user_id = 'olga'"),
        ("last owner renames themself away", "UPDATE pgseal.org_members SET org_id = 'home' WHERE org_id = 'org1' AND user_id = 'olga'"),
    ] {
        let state = attempt(&mut app, "A", "olga", sql);
        assert!(state == "23514" || (state == "42501" && probe.contains("renames")), "probe: {probe}: {state}");
    }
    assert_eq!(
        attempt(&mut app, "A", "olga", "UPDATE pgseal.org_members SET role = 'admin' WHERE org_id = 'org1' AND user_id = 'olga'"),
        "23514",
        "probe: last owner demotes themself (exact SQLSTATE)"
    );
    assert_eq!(
        members(&mut admin, "A", "org1"),
        org1,
        "org1 still has its owner"
    );
    // Control: with a second owner first, the first may step down.
    assert_eq!(attempt(&mut app, "A", "olga", "UPDATE pgseal.org_members SET role = 'owner' WHERE org_id = 'org1' AND user_id = 'adam'"), "00000", "owner promotes the admin");
    assert_eq!(attempt(&mut app, "A", "olga", "UPDATE pgseal.org_members SET role = 'admin' WHERE org_id = 'org1' AND user_id = 'olga'"), "00000", "former last owner steps down");
    assert_eq!(
        members(&mut admin, "A", "org1"),
        "adam:owner,mia:member,olga:admin"
    );

    // Races. Two owners of the tenant create the same organisation at once: the
    // second must wait and then find it taken.
    for (isolation, org) in [
        ("READ COMMITTED", "raced-rc"),
        ("REPEATABLE READ", "raced-rr"),
        ("SERIALIZABLE", "raced-s"),
    ] {
        let first = format!("INSERT INTO pgseal.org_members VALUES ('A', '{org}', 'tom', 'owner')");
        let second =
            format!("INSERT INTO pgseal.org_members VALUES ('A', '{org}', 'sue', 'owner')");
        let state = race(&cl, isolation, ("A", "tom", &first), ("A", "sue", &second));
        assert!(
            state == "42501" || state == "40001",
            "probe: two sessions race to create an organisation ({isolation}): the second ended with {state}"
        );
        assert_eq!(
            members(&mut admin, "A", org),
            "tom:owner",
            "probe: race to create ({isolation}): one owner"
        );
    }
    // Both owners of 'duo' step down at once: one of them must stay.
    let state = race(
        &cl,
        "READ COMMITTED",
        ("A", "pat", "UPDATE pgseal.org_members SET role = 'member' WHERE org_id = 'duo' AND user_id = 'pat'"),
        ("A", "quinn", "UPDATE pgseal.org_members SET role = 'member' WHERE org_id = 'duo' AND user_id = 'quinn'"),
    );
    assert_eq!(state, "23514", "probe: two owners step down at once");
    assert_eq!(
        members(&mut admin, "A", "duo"),
        "pat:member,quinn:owner,rex:member",
        "probe: two owners step down at once: one owner stays"
    );
    let state = race(
        &cl,
        "REPEATABLE READ",
        (
            "A",
            "quinn",
            "UPDATE pgseal.org_members SET role = 'owner' WHERE org_id = 'duo' AND user_id = 'rex'",
        ),
        (
            "A",
            "quinn",
            "DELETE FROM pgseal.org_members WHERE org_id = 'duo' AND user_id = 'quinn'",
        ),
    );
    // The first made rex an owner, so quinn may leave; under REPEATABLE READ the
    // second cannot see that and must retry instead of judging by a stale snapshot.
    assert!(
        state == "40001" || state == "00000",
        "probe: owner leaves while another is promoted (REPEATABLE READ): {state}"
    );
    let duo = members(&mut admin, "A", "duo");
    assert!(
        duo.contains(":owner"),
        "probe: owner leaves while another is promoted: {duo}"
    );
}

const CURSORS: &str = "
    CREATE EXTENSION pgseal;
    CREATE ROLE app LOGIN;
    CREATE ROLE app_loose LOGIN;
    CREATE TABLE notes (id int PRIMARY KEY, tenant_id text NOT NULL, body text);
    CREATE INDEX ON notes (tenant_id);
    SELECT pgseal.tenant_protect('notes');
    INSERT INTO notes VALUES (1, 'A', 'a1'), (2, 'A', 'a2'), (11, 'B', 'b1');
    GRANT SELECT ON notes TO app, app_loose;
    ALTER ROLE app SET pgseal.strict_context = on;
    -- A procedure that commits inside a loop over a query: PostgreSQL pins and holds
    -- that loop's portal across the commit; strict_context must leave it alone.
    CREATE PROCEDURE public.walk_notes(INOUT n int DEFAULT 0) LANGUAGE plpgsql AS $$
    DECLARE r record;
    BEGIN
        PERFORM pgseal.set_tenant('A', 'u');
        FOR r IN SELECT tenant_id FROM notes LOOP
            n := n + 1;
            COMMIT;
        END LOOP;
    END
    $$;
    GRANT EXECUTE ON PROCEDURE public.walk_notes(int) TO app;
";

/// The first column of every row of a simple query, or its SQLSTATE.
fn rows(c: &mut postgres::Client, sql: &str) -> Result<Vec<String>, String> {
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
fn with_hold_cursor_does_not_outlive_the_tenant_context() {
    let cl = Cluster::start("attack-tenancy-cursor", &[KEY_V1], &[]);
    cl.connect().batch_execute(CURSORS).unwrap();
    let mut app = cl.connect_as("app");
    let mut leaked: Vec<String> = Vec::new();

    // 1. Declared in an explicit transaction, fetched after its commit.
    match rows(
        &mut app,
        "BEGIN; SELECT pgseal.set_tenant('A', 'u'); \
         DECLARE c1 CURSOR WITH HOLD FOR SELECT tenant_id FROM notes; COMMIT",
    ) {
        Ok(_) => match rows(&mut app, "FETCH ALL FROM c1") {
            Err(state) => assert_eq!(
                state, "34000",
                "probe: FETCH after COMMIT (explicit transaction)"
            ),
            Ok(r) => leaked.extend(r.into_iter().map(|t| format!("explicit transaction: {t}"))),
        },
        Err(state) => eprintln!("the COMMIT was refused ({state}); nothing to fetch"),
    }

    // 2. Inside its transaction the cursor works as usual; after the commit it is gone.
    let inside = rows(
        &mut app,
        "BEGIN; SELECT pgseal.set_tenant('A', 'u'); \
         DECLARE c2 CURSOR WITH HOLD FOR SELECT tenant_id FROM notes ORDER BY id; FETCH 1 FROM c2",
    )
    .expect("WITH HOLD cursor inside its transaction");
    assert!(
        inside.iter().any(|t| t == "A"),
        "the cursor reads its own tenant's rows before commit: {inside:?}"
    );
    rows(&mut app, "COMMIT").unwrap();
    match rows(&mut app, "FETCH ALL FROM c2") {
        Err(state) => assert_eq!(state, "34000", "probe: FETCH the rest after COMMIT"),
        Ok(r) => leaked.extend(r.into_iter().map(|t| format!("partly fetched cursor: {t}"))),
    }

    // 3. One implicit transaction: a session-level SET and the DECLARE in one query string.
    match rows(
        &mut app,
        "SET app.tenant_id = 'A'; DECLARE c3 CURSOR WITH HOLD FOR SELECT tenant_id FROM notes",
    ) {
        Ok(_) => match rows(&mut app, "FETCH ALL FROM c3") {
            Err(state) => assert_eq!(state, "34000", "probe: FETCH after an implicit transaction"),
            Ok(r) => leaked.extend(r.into_iter().map(|t| format!("implicit transaction: {t}"))),
        },
        Err(state) => eprintln!("the implicit transaction was refused ({state})"),
    }

    // 4. The extended query protocol.
    {
        let mut tx = app.transaction().unwrap();
        tx.execute("SELECT pgseal.set_tenant($1, 'u')", &[&"A"])
            .unwrap();
        tx.execute(
            "DECLARE c4 CURSOR WITH HOLD FOR SELECT tenant_id FROM notes",
            &[],
        )
        .unwrap();
        let _ = tx.commit();
    }
    match app.query("FETCH ALL FROM c4", &[]) {
        Err(e) => assert_eq!(
            sqlstate::<()>(Err(e)),
            "34000",
            "probe: FETCH after COMMIT (extended protocol)"
        ),
        Ok(r) => leaked.extend(
            r.iter()
                .map(|row| format!("extended protocol: {}", row.get::<_, String>(0))),
        ),
    }
    // 5. Listing cursors after the commit shows none to open by name.
    let listed = rows(&mut app, "SELECT name FROM pg_cursors").unwrap();
    assert!(
        listed.is_empty(),
        "probe: pg_cursors after commit: {listed:?}"
    );
    assert!(
        leaked.is_empty(),
        "rows of tenant A read after its transaction: {leaked:?}"
    );

    // A procedure that commits inside a loop over a query still runs to its end.
    let n: String = rows(&mut app, "CALL public.walk_notes()")
        .expect("probe: procedure committing inside a cursor loop")
        .pop()
        .unwrap();
    assert_eq!(n, "2", "the loop saw tenant A's two rows");

    // Control: without strict_context the held cursor does outlive the transaction,
    // which is the leak this guards against (and why this test can fail).
    let mut loose = cl.connect_as("app_loose");
    rows(
        &mut loose,
        "BEGIN; SELECT pgseal.set_tenant('A', 'u'); \
         DECLARE c5 CURSOR WITH HOLD FOR SELECT tenant_id FROM notes; COMMIT",
    )
    .unwrap();
    let seen =
        rows(&mut loose, "FETCH ALL FROM c5").expect("the held cursor without strict_context");
    assert_eq!(
        seen,
        vec!["A", "A"],
        "control: the cursor kept tenant A's rows"
    );
}

#[test]
fn tenant_ids_that_are_not_utf8_never_share_a_tenant() {
    // In a database whose encoding lets any byte into a setting (SQL_ASCII; a
    // LATIN1 database's non-ASCII tenant ids are the same bytes), two tenant ids
    // that differ only in bytes that are not UTF-8 must not become one tenant:
    // neither its keys, its rows nor its chain. pgseal refuses such a tenant
    // context (22021) wherever it reads it.
    let cl = Cluster::start("tenant_not_utf8", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE DATABASE ascii TEMPLATE template0 ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'",
    )
    .unwrap();
    let mut a = cl.connect_to("ascii", "postgres");
    a.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE TABLE docs (id int PRIMARY KEY, tenant_id text NOT NULL, secret text);
         SELECT pgseal.tenant_protect('docs');
         CREATE ROLE app_ascii LOGIN;
         GRANT pgseal_decrypt, pgseal_ledger TO app_ascii;
         GRANT SELECT, INSERT ON docs TO app_ascii;",
    )
    .unwrap();
    // Rows a superuser put in, past every policy: one under that tenant id, one
    // under the id its bytes become when they are replaced as not UTF-8.
    a.batch_execute(
        "INSERT INTO docs VALUES (2, E'acme\\xff', 'x'), (3, E'acme\\xef\\xbf\\xbd', 'y')",
    )
    .unwrap();
    let mut app = cl.connect_to("ascii", "app_ascii");
    // The first tenant, 'acme' and byte 0xff, seals a value and appends.
    let as_ff = "SET app.tenant_id = E'acme\\xff'";
    let states: Vec<String> = [
        "INSERT INTO docs VALUES (1, current_setting('app.tenant_id'), pgseal.vault_seal('s3cret-of-ff', 'docs.secret'))",
        "SELECT pgseal.ledger_append('note')",
        "SELECT pgseal.current_tenant()",
        "SELECT count(*) FROM docs",
    ]
    .iter()
    .map(|sql| {
        app.batch_execute("BEGIN").unwrap();
        app.batch_execute(as_ff).unwrap();
        let s = sqlstate(app.batch_execute(sql));
        app.batch_execute("ROLLBACK").unwrap();
        s
    })
    .collect();
    assert_eq!(states, ["22021"; 4], "refused wherever the tenant is read");
    app.batch_execute("BEGIN").unwrap();
    // The other tenant id ('acme' and byte 0xfe) sees neither.
    app.batch_execute("SET LOCAL app.tenant_id = E'acme\\xfe'")
        .unwrap();
    let seen = sqlstate(app.query("SELECT id FROM docs", &[]));
    app.batch_execute("ROLLBACK").unwrap();
    assert_eq!(seen, "22021", "no row of either id");
    let keys: i64 = a
        .query_one(
            "SELECT count(*) FROM pgseal.tenant_keys WHERE tenant_id LIKE 'acme%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(keys, 0, "no key made for either id");
    // The user id, which organisation policies compare and entries record as
    // their actor, likewise.
    let states: Vec<String> = [
        "SELECT pgseal.current_user_id()",
        "SELECT pgseal.ledger_append('note')",
    ]
    .iter()
    .map(|sql| {
        app.batch_execute(
            "BEGIN; SET LOCAL app.tenant_id = 'acme'; SET LOCAL app.user_id = E'bob\\xff'",
        )
        .unwrap();
        let s = sqlstate(app.batch_execute(sql));
        app.batch_execute("ROLLBACK").unwrap();
        s
    })
    .collect();
    assert_eq!(states, ["22021"; 2], "the user context");
    // A role whose name is not UTF-8 (role names are in a shared catalog: any
    // database of the cluster can make one): its entries would record it as
    // another role's name.
    a.batch_execute(
        "DO $$ BEGIN EXECUTE pg_catalog.format('CREATE ROLE %I', 'bob' || chr(255)); \
                     EXECUTE pg_catalog.format('GRANT pgseal_ledger TO %I', 'bob' || chr(255)); \
                     EXECUTE pg_catalog.format('SET ROLE %I', 'bob' || chr(255)); END $$",
    )
    .unwrap();
    let state = sqlstate(a.batch_execute(
        "BEGIN; SET LOCAL app.tenant_id = 'acme'; SET LOCAL app.user_id = 'bob'; \
         SELECT pgseal.ledger_append('note')",
    ));
    a.batch_execute("ROLLBACK; RESET ROLE").unwrap();
    assert_eq!(state, "22021", "the role's name");
}
