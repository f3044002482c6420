//! A table owner's code that pgseal's statements run, where only a real commit
//! shows it: pgseal runs its statements on registered tables (an erasure's, an
//! offboarding's) as each table's owner, so the owner's triggers run with the
//! owner's rights; a deferred constraint trigger would fire later, at the commit,
//! where PostgreSQL before 18 runs it as the role current then (the caller: here
//! a superuser). pgseal's scope is a security-restricted operation, at whose end
//! PostgreSQL refuses to leave a deferred trigger queued.

use pgseal_tests::{count, sqlstate, Cluster, KEY_V1};

/// A registered table of `people_owner`, holding subjects u1 and u2 of tenant acme,
/// with the owner's trigger `kind` (a constraint trigger's timing clause) that tries
/// to make its owner a superuser with the rights of whoever runs it, and records
/// who that was in `seen`.
fn trojan_table(c: &mut postgres::Client, table: &str, kind: &str) {
    c.batch_execute(&format!(
        "CREATE TABLE public.{table} (id text NOT NULL, tenant_id text NOT NULL);
         ALTER TABLE public.{table} OWNER TO people_owner;
         CREATE CONSTRAINT TRIGGER {table}_gone AFTER DELETE ON public.{table}
             {kind} FOR EACH ROW EXECUTE FUNCTION public.people_gone();
         SELECT pgseal.subject_register('public.{table}', 'id');
         INSERT INTO public.{table} VALUES ('u1', 'acme'), ('u2', 'acme');"
    ))
    .unwrap();
}

#[test]
fn a_table_owners_deferred_trigger_never_runs_as_the_erasing_role() {
    let cl = Cluster::start("owner_deferred", &[KEY_V1], &[]);
    let mut c = cl.connect();
    c.batch_execute(
        "CREATE EXTENSION pgseal;
         CREATE ROLE people_owner;
         CREATE TABLE public.seen (who text, escalated boolean);
         ALTER TABLE public.seen OWNER TO people_owner;
         CREATE FUNCTION public.people_gone() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             BEGIN
                 EXECUTE 'ALTER ROLE people_owner SUPERUSER';
                 INSERT INTO public.seen VALUES (current_user, true);
             EXCEPTION WHEN OTHERS THEN
                 INSERT INTO public.seen VALUES (current_user, false);
             END;
             RETURN OLD;
         END $$;
         ALTER FUNCTION public.people_gone() OWNER TO people_owner;",
    )
    .unwrap();
    let erase = |c: &mut postgres::Client, table: &str| -> String {
        let mut tx = c.transaction().unwrap();
        tx.batch_execute("SELECT pgseal.set_tenant('acme')")
            .unwrap();
        let r = tx.query_one("SELECT pgseal.subject_erase('acme', 'u1')", &[]);
        let state = sqlstate(r);
        let committed = if state == "00000" {
            sqlstate(tx.commit())
        } else {
            drop(tx);
            state
        };
        let left = count(
            c,
            &format!("SELECT count(*) FROM public.{table} WHERE id = 'u1'"),
        );
        let superuser = count(
            c,
            "SELECT count(*) FROM pg_catalog.pg_roles WHERE rolname = 'people_owner' AND rolsuper",
        );
        assert_eq!(
            superuser, 0,
            "{table}: the owner's code made it a superuser"
        );
        format!("{committed}, {left} left")
    };
    let seen = |c: &mut postgres::Client| -> String {
        let rows = c
            .query(
                "SELECT who || ':' || escalated FROM public.seen ORDER BY 1",
                &[],
            )
            .unwrap();
        let seen: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        c.batch_execute("TRUNCATE public.seen").unwrap();
        seen.join(",")
    };

    // Fired when the erasure's statement ends, inside pgseal's scope: as the owner.
    trojan_table(&mut c, "badges", "DEFERRABLE INITIALLY IMMEDIATE");
    assert_eq!(erase(&mut c, "badges"), "00000, 0 left");
    assert_eq!(seen(&mut c), "people_owner:false");
    c.batch_execute("DROP TABLE public.badges").unwrap();

    // Due at the commit, after pgseal's scope: PostgreSQL refuses to queue it at
    // the end of the statement, inside the security-restricted operation that
    // pgseal's scope is (42501), so the erasure fails and deletes nothing.
    trojan_table(&mut c, "people", "DEFERRABLE INITIALLY DEFERRED");
    assert_eq!(erase(&mut c, "people"), "42501, 1 left");
    assert_eq!(seen(&mut c), "");

    // The owner's own trigger defers it from inside the scope: the same.
    c.batch_execute(
        "CREATE FUNCTION public.defer_all() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             SET CONSTRAINTS ALL DEFERRED;
             RETURN OLD;
         END $$;
         ALTER FUNCTION public.defer_all() OWNER TO people_owner;
         DROP TRIGGER people_gone ON public.people;
         CREATE CONSTRAINT TRIGGER people_gone AFTER DELETE ON public.people
             DEFERRABLE INITIALLY IMMEDIATE FOR EACH ROW EXECUTE FUNCTION public.people_gone();
         CREATE TRIGGER people_defer BEFORE DELETE ON public.people
             FOR EACH ROW EXECUTE FUNCTION public.defer_all();",
    )
    .unwrap();
    assert_eq!(erase(&mut c, "people"), "42501, 1 left");
    assert_eq!(seen(&mut c), "");
}
