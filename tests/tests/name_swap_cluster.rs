//! The schema swap (a finding of the attacker review of issue 19's exports): pgseal
//! builds some statements from a registered table's name and runs them with more
//! rights than the role that owns the table's schema. That role cannot rename the
//! table while pgseal holds a lock on it, but ALTER SCHEMA … RENAME takes no lock on
//! the tables inside. So it holds the table's lock from another session (an
//! uncommitted DROP TABLE), lets pgseal block on it, renames the schema, creates a
//! schema of the old name with a view named like the table, whose scan calls its
//! function, and rolls the DROP back. Had pgseal read the name before the swap, it
//! would now parse that name into the view and run the function with its own
//! rights. Each statement that names a registered table is played this way; the
//! function records who it ran as, and must never have run as anyone but the
//! attacker.

use std::time::{Duration, Instant};

use pgseal_tests::{Cluster, KEY_V1};

const SETUP: &str = "
    CREATE EXTENSION pgseal;
    CREATE ROLE mallory LOGIN;
    CREATE ROLE victim;
    GRANT CREATE ON DATABASE postgres TO mallory;
    CREATE SCHEMA app AUTHORIZATION mallory;
    CREATE SCHEMA mallory_s AUTHORIZATION mallory;
    CREATE TABLE public.seen (who text);
    GRANT INSERT ON public.seen TO PUBLIC;
    CREATE TABLE app.t (id text PRIMARY KEY, tenant_id text NOT NULL, token text);
    ALTER TABLE app.t OWNER TO victim;
    GRANT USAGE ON SCHEMA app TO victim;
    SELECT pgseal.subject_register('app.t', 'id');
    SELECT pgseal.vault_register_column('app.t', 'token', 'c');
";

/// The attacker's function and trigger function, in its own schema.
const PWN: &str = "
    CREATE FUNCTION mallory_s.pwn() RETURNS boolean LANGUAGE plpgsql AS $$
    BEGIN INSERT INTO public.seen VALUES (current_user); RETURN true; END $$;
    CREATE FUNCTION mallory_s.pwn_trg() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM mallory_s.pwn(); RETURN OLD; END $$;
";

/// Waits until backend `pid` (running `call`) waits for a heavyweight lock.
fn wait_for_a_lock(cl: &Cluster, pid: i32, call: &str) {
    let mut watch = cl.connect();
    let started = Instant::now();
    while !watch
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock')",
            &[&pid],
        )
        .unwrap()
        .get::<_, bool>(0)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{call}: never waited for the table's lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Plays the swap against `call` (run by `caller` in a session of its own, which
/// first runs `prelude`), and returns the call's outcome (00000, or the error's
/// SQLSTATE and message).
fn swap_during(cl: &Cluster, caller: &str, prelude: &str, call: &str) -> String {
    let mut holder = cl.connect_as("mallory");
    holder.batch_execute("BEGIN; DROP TABLE app.t").unwrap();
    let mut victim = cl.connect_as(caller);
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let script = format!("BEGIN; {prelude}; {call}; COMMIT");
    let handle = std::thread::spawn(move || match victim.batch_execute(&script) {
        Ok(()) => "00000".to_owned(),
        Err(e) => format!(
            "{}: {}",
            e.code().map_or("?", |c| c.code()),
            e.as_db_error()
                .map_or(String::new(), |d| d.message().to_owned())
        ),
    });
    wait_for_a_lock(cl, pid, call);
    let mut swapper = cl.connect_as("mallory");
    swapper
        .batch_execute(
            "ALTER SCHEMA app RENAME TO app_old;
             CREATE SCHEMA app;
             CREATE VIEW app.t AS SELECT 'u1'::text AS id, 'acme'::text AS tenant_id, NULL::text AS token
              WHERE mallory_s.pwn();
             CREATE TRIGGER t INSTEAD OF DELETE OR UPDATE ON app.t FOR EACH ROW EXECUTE FUNCTION mallory_s.pwn_trg();
             GRANT USAGE ON SCHEMA app TO PUBLIC;
             GRANT ALL ON app.t TO PUBLIC;",
        )
        .unwrap();
    holder.batch_execute("ROLLBACK").unwrap();
    let outcome = handle.join().unwrap();
    // Back as it was, for the next call.
    swapper
        .batch_execute(
            "DROP SCHEMA app CASCADE;
             ALTER SCHEMA app_old RENAME TO app;",
        )
        .unwrap();
    outcome
}

#[test]
fn a_schema_renamed_while_pgseal_waits_never_puts_another_relation_under_the_name() {
    let cl = Cluster::start("name_swap", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(SETUP).unwrap();
    cl.connect_as("mallory").batch_execute(PWN).unwrap();
    c.batch_execute(
        "SELECT pgseal.set_tenant('acme');
         INSERT INTO app.t VALUES ('u1', 'acme', pgseal.vault_seal('s', 'c')), ('u2', 'acme', NULL);",
    )
    .unwrap();
    // The trap works: scanning the view runs the function as whoever scans.
    cl.connect_as("mallory")
        .batch_execute(
            "CREATE VIEW mallory_s.probe AS SELECT 1 AS x WHERE mallory_s.pwn();
             SELECT * FROM mallory_s.probe;
             DROP VIEW mallory_s.probe;",
        )
        .unwrap();
    assert_eq!(
        pgseal_tests::count(&mut c, "SELECT count(*) FROM public.seen"),
        1
    );
    c.batch_execute("TRUNCATE public.seen").unwrap();

    let tenant = "SELECT pgseal.set_tenant('acme')";
    let calls = [
        (tenant, "SELECT pgseal.subject_export('acme', 'u1')"),
        (tenant, "SELECT * FROM pgseal.key_usage"),
        (tenant, "SELECT * FROM pgseal._tenants_of('app.t')"),
        (tenant, "SELECT pgseal.subject_erase('acme', 'u1')"),
        // Last: it leaves the tenant's offboarding scheduled.
        (
            "SELECT pgseal.set_tenant('acme'); SELECT pgseal.tenant_offboard('acme', '0')",
            "SELECT * FROM pgseal._offboard_export('acme')",
        ),
    ];
    let mut findings = Vec::new();
    for (prelude, call) in calls {
        let outcome = swap_during(&cl, "postgres", prelude, call);
        let ran_as: Vec<String> = c
            .query(
                "SELECT DISTINCT who FROM public.seen WHERE who <> 'mallory'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !ran_as.is_empty() {
            findings.push(format!("{call} ({outcome}): ran as {ran_as:?}"));
        }
        // The call worked, on the real table.
        if outcome != "00000" {
            findings.push(format!("{call}: {outcome}"));
        }
        c.batch_execute("TRUNCATE public.seen").unwrap();
    }
    assert!(findings.is_empty(), "{}", findings.join("\n"));
    // The erasure reached the real table.
    assert_eq!(
        pgseal_tests::count(&mut c, "SELECT count(*) FROM app.t WHERE id = 'u1'"),
        0
    );
}

#[test]
fn statements_on_registered_tables_refuse_a_snapshot_older_than_their_locks() {
    // Under REPEATABLE READ the catalog checks made before a statement runs as the
    // table's owner would read the transaction's snapshot, blind to a trigger added
    // while pgseal waited for its lock: refused (0A000), nothing done.
    let cl = Cluster::start("name_swap_rr", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(SETUP).unwrap();
    c.batch_execute(
        "SELECT pgseal.set_tenant('acme');
         INSERT INTO app.t VALUES ('u1', 'acme', NULL);",
    )
    .unwrap();
    for call in [
        "SELECT pgseal.subject_erase('acme', 'u1')",
        "SELECT pgseal.subject_export('acme', 'u1')",
    ] {
        let r = c.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT pgseal.set_tenant('acme'); {call}; COMMIT"
        ));
        assert_eq!(pgseal_tests::sqlstate(r), "0A000", "{call}");
        c.batch_execute("ROLLBACK").unwrap();
    }
    assert_eq!(pgseal_tests::count(&mut c, "SELECT count(*) FROM app.t"), 1);
}

#[test]
fn a_column_type_changed_while_pgseal_waits_is_seen_after_the_lock() {
    // The table's owner changes the tenant and sealed columns to its own enum,
    // whose cast to text is its function, in a transaction it commits once pgseal
    // waits for the table's lock. Checked only before the lock, the column would
    // pass as text and the scan, run as the extension owner, would call the cast.
    let cl = Cluster::start("type_swap", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE ROLE mallory LOGIN;
         CREATE SCHEMA mallory_s AUTHORIZATION mallory;
         CREATE TABLE public.seen (who text);
         GRANT INSERT ON public.seen TO PUBLIC;
         CREATE TABLE public.m (id int PRIMARY KEY, tenant_id text NOT NULL, token text);
         ALTER TABLE public.m OWNER TO mallory;
         SELECT pgseal.vault_register_column('public.m', 'token', 'c');
         SELECT pgseal.set_tenant('acme');
         SELECT pgseal.vault_seal('s', 'c'); -- a data key, so key_usage counts
         INSERT INTO public.m VALUES (1, 'acme', 'v2:x');",
    )
    .unwrap();
    cl.connect_as("mallory")
        .batch_execute(
            "CREATE TYPE mallory_s.e1 AS ENUM ('acme');
             CREATE FUNCTION mallory_s.pwn(v mallory_s.e1) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO public.seen VALUES (current_user); RETURN pg_catalog.format('%s', v); END $$;
             CREATE CAST (mallory_s.e1 AS text) WITH FUNCTION mallory_s.pwn(mallory_s.e1);
             CREATE TYPE mallory_s.e2 AS ENUM ('v2:x');
             CREATE FUNCTION mallory_s.pwn(v mallory_s.e2) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO public.seen VALUES (current_user); RETURN pg_catalog.format('%s', v); END $$;
             CREATE CAST (mallory_s.e2 AS text) WITH FUNCTION mallory_s.pwn(mallory_s.e2) AS IMPLICIT;",
        )
        .unwrap();
    // The tenant column to an enum whose cast to text `_tenants_scan`'s `::text`
    // would call; the sealed column to one whose implicit cast `_key_usage`'s text
    // functions would call.
    // Or the sealed column renamed away and a new one of that enum put under its
    // name (the column is used by the name read after the lock, and is text).
    for (call, change, refused, reset) in [
        (
            "SELECT * FROM pgseal._tenants_of('public.m')",
            "ALTER TABLE public.m ALTER tenant_id TYPE mallory_s.e1 USING tenant_id::mallory_s.e1",
            true,
            "ALTER TABLE public.m ALTER tenant_id TYPE text USING pg_catalog.format('%s', tenant_id)",
        ),
        (
            "SELECT * FROM pgseal.key_usage",
            "ALTER TABLE public.m ALTER token TYPE mallory_s.e2 USING token::mallory_s.e2",
            true,
            "ALTER TABLE public.m ALTER token TYPE text USING pg_catalog.format('%s', token)",
        ),
        (
            "SELECT * FROM pgseal.key_usage",
            "ALTER TABLE public.m RENAME token TO token_old;
             ALTER TABLE public.m ADD COLUMN token mallory_s.e2 DEFAULT 'v2:x'",
            false,
            "ALTER TABLE public.m DROP COLUMN token; ALTER TABLE public.m RENAME token_old TO token",
        ),
    ] {
        let mut holder = cl.connect_as("mallory");
        holder.batch_execute(&format!("BEGIN; {change}")).unwrap();
        let mut victim = cl.connect();
        let pid: i32 = victim
            .query_one("SELECT pg_backend_pid()", &[])
            .unwrap()
            .get(0);
        let script = call.to_owned();
        let handle =
            std::thread::spawn(move || pgseal_tests::sqlstate(victim.batch_execute(&script)));
        wait_for_a_lock(&cl, pid, call);
        holder.batch_execute("COMMIT").unwrap();
        let outcome = handle.join().unwrap();
        let ran_as: Vec<String> = c
            .query(
                "SELECT DISTINCT who FROM public.seen WHERE who <> 'mallory'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            ran_as.is_empty(),
            "{call} ({outcome}): the cast ran as {ran_as:?}"
        );
        if refused {
            assert_ne!(outcome, "00000", "{call}: the changed column was used");
        } else {
            assert_eq!(outcome, "00000", "{call}");
        }
        cl.connect_as("mallory").batch_execute(reset).unwrap();
        c.batch_execute("TRUNCATE public.seen").unwrap();
    }
}

#[test]
fn a_name_the_database_cannot_spell_in_utf8_is_refused_not_approximated() {
    // In a LATIN1 database, a table named "société" has bytes that are not UTF-8.
    // Turned into a Rust string lossily, its name in pgseal's statement would read
    // back as "sociï¿½tï¿½" (U+FFFD's UTF-8 bytes, read as LATIN1): a name the
    // schema's owner can take first, with a view that runs its code as the table's
    // owner. pgseal must refuse the name instead.
    let cl = Cluster::start("name_latin1", &[KEY_V1], &[]);
    let mut admin = cl.connect();
    admin
        .batch_execute(
            "CREATE DATABASE lat ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        )
        .unwrap();
    admin
        .batch_execute(
            "CREATE ROLE mallory LOGIN;
             CREATE ROLE victim LOGIN;
             GRANT CREATE ON DATABASE lat TO mallory;",
        )
        .unwrap();
    let mut c = cl.connect_to("lat", "postgres");
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE SCHEMA app AUTHORIZATION mallory;
         CREATE SCHEMA mallory_s AUTHORIZATION mallory;
         CREATE TABLE public.seen (who text);
         GRANT INSERT ON public.seen TO PUBLIC;
         CREATE SEQUENCE public.hits;  -- counts the trap's runs, rolled back or not
         GRANT USAGE ON SEQUENCE public.hits TO PUBLIC;
         CREATE TABLE app.\"société\" (id text PRIMARY KEY, tenant_id text NOT NULL);
         ALTER TABLE app.\"société\" OWNER TO victim;
         GRANT USAGE ON SCHEMA app TO victim;
         SELECT pgseal.subject_register('app.\"société\"', 'id');
         SELECT pgseal.set_tenant('acme');
         INSERT INTO app.\"société\" VALUES ('u1', 'acme');",
    )
    .unwrap();
    let mut m = cl.connect_to("lat", "mallory");
    m.batch_execute(
        "CREATE FUNCTION mallory_s.pwn() RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN PERFORM nextval('public.hits'); INSERT INTO public.seen VALUES (current_user); RETURN true; END $$;",
    )
    .unwrap();
    m.batch_execute(
        "CREATE VIEW app.\"sociï¿½tï¿½\" AS SELECT 'u1'::text AS id, 'acme'::text AS tenant_id WHERE mallory_s.pwn();
         GRANT SELECT ON app.\"sociï¿½tï¿½\" TO PUBLIC;",
    )
    .unwrap();
    // The trap works: reading the view runs the function as whoever reads it.
    cl.connect_to("lat", "victim")
        .batch_execute("SELECT * FROM app.\"sociï¿½tï¿½\"")
        .unwrap_or_else(|e| panic!("victim cannot read the planted view: {e}"));
    assert_eq!(
        pgseal_tests::count(&mut c, "SELECT count(*) FROM public.seen"),
        1
    );
    let hits = || -> i64 {
        let mut c = cl.connect_to("lat", "postgres");
        pgseal_tests::count(
            &mut c,
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM public.hits",
        )
    };
    assert_eq!(hits(), 1);

    c.batch_execute("SELECT pgseal.tenant_offboard('acme', '0')")
        .unwrap();
    for call in [
        "SELECT pgseal.subject_export('acme', 'u1')",
        "SELECT count(*) FROM pgseal._offboard_export('acme')",
    ] {
        let err = c
            .batch_execute(&format!(
                "BEGIN; SELECT pgseal.set_tenant('acme'); {call}; COMMIT"
            ))
            .expect_err(call);
        c.batch_execute("ROLLBACK").unwrap();
        // subject_export fails earlier, reading the registered name back as text
        // (pgrx refuses a datum that is not UTF-8: XX000); the offboarding export
        // reaches the pinned name, which refuses it.
        assert_eq!(hits(), 1, "{call}: the planted view's function ran");
        if call.contains("_offboard_export") {
            assert_eq!(err.code().map(|s| s.code()), Some("55000"), "{call}: {err}");
        }
    }
}
