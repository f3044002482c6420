//! `#[pg_test]`s for the ledger: each function and each error path with its SQLSTATE.
//! Every test runs in one transaction that is rolled back, so commit-time behaviour
//! (the decrypt audit entry, the heads flush) is tested out of process.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pg_tests::helpers::{lock_ledger_tables, one, run, sqlstate, tenant};

    fn append(event: &str, payload: &str) -> (i64, String) {
        let (seq, hash) = Spi::get_two_with_args::<i64, String>(
            "SELECT seq, hash FROM pgseal.ledger_append($1, $2::jsonb)",
            &[event.into(), payload.into()],
        )
        .unwrap();
        (seq.unwrap(), hash.unwrap())
    }

    /// The events of `tenant`'s stored entries, in seq order.
    fn events(tenant: &str) -> Vec<String> {
        Spi::connect(|c| {
            c.select(
                "SELECT event FROM pgseal.ledger WHERE tenant_id = $1 ORDER BY seq",
                None,
                &[tenant.into()],
            )
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect()
        })
    }

    /// (ok, checked, first_bad_seq, problem) of ledger_verify(args).
    fn verify(args: &str) -> (bool, i64, Option<i64>, Option<String>) {
        Spi::connect(|c| {
            let row = c
                .select(&format!("SELECT ok, checked, first_bad_seq, problem FROM pgseal.ledger_verify({args})"), None, &[])
                .unwrap()
                .first();
            (
                row.get::<bool>(1).unwrap().unwrap(),
                row.get::<i64>(2).unwrap().unwrap(),
                row.get::<i64>(3).unwrap(),
                row.get::<String>(4).unwrap(),
            )
        })
    }

    /// Lets a superuser edit the ledger behind pgseal's back, as an attacker with
    /// full database access could. Rolled back with the test. The test must have
    /// called `lock_ledger_tables()` before its first append (asserted).
    fn disable_guards() {
        assert_ledger_tables_locked();
        run("ALTER EVENT TRIGGER pgseal_ledger_ddl_guard DISABLE");
        run("ALTER TABLE pgseal.ledger DISABLE TRIGGER pgseal_ledger_guard");
    }

    /// `disable_guards()` for `pgseal.ledger_heads` as well.
    fn disable_heads_guard() {
        assert_ledger_tables_locked();
        run("ALTER EVENT TRIGGER pgseal_ledger_ddl_guard DISABLE");
        run("ALTER TABLE pgseal.ledger_heads DISABLE TRIGGER pgseal_heads_write_guard");
    }

    /// The `#[pg_test]`s run in parallel against one database, and most append.
    /// A test that appends (RowExclusiveLock) and then lifts a guard (ALTER
    /// TABLE, ShareRowExclusiveLock) upgrades its lock while others hold theirs:
    /// the deadlock CI met. So a test takes both tables' strong locks first.
    fn assert_ledger_tables_locked() {
        let held = one::<i64>(
            "SELECT count(*) FROM pg_catalog.pg_locks WHERE pid = pg_catalog.pg_backend_pid() \
             AND granted AND mode = 'ShareRowExclusiveLock' \
             AND relation IN ('pgseal.ledger'::pg_catalog.regclass, 'pgseal.ledger_heads'::pg_catalog.regclass)",
        );
        assert_eq!(
            held, 2,
            "call lock_ledger_tables() first in a test that lifts the ledger's guards"
        );
    }

    #[pg_test]
    fn append_gives_gapless_seq_per_tenant_and_hex_hashes() {
        tenant("acme");
        let (s1, h1) = append("login", "{}");
        let (s2, h2) = append("order.update", r#"{"id": 7, "status": "paid"}"#);
        assert_eq!((s1, s2), (1, 2));
        assert_eq!(h1.len(), 64);
        assert!(
            h1.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{h1}"
        );
        assert_ne!(h1, h2);
        tenant("globex");
        assert_eq!(append("login", "{}").0, 1);
        tenant("acme");
        assert_eq!(append("logout", "{}").0, 3);
        let prev: String = one("SELECT encode(prev_hash, 'hex') FROM pgseal.ledger WHERE tenant_id = 'acme' AND seq = 2");
        assert_eq!(prev, h1);
        let first_prev: String = one("SELECT encode(prev_hash, 'hex') FROM pgseal.ledger WHERE tenant_id = 'acme' AND seq = 1");
        assert_eq!(first_prev, "0".repeat(64));
    }

    #[pg_test]
    fn append_works_in_every_calling_form() {
        // ledger_append returns its row in materialize mode; each place SQL can
        // call a set-returning function must accept it.
        tenant("acme");
        append("from", "{}");
        assert_eq!(
            one::<i64>("SELECT (pgseal.ledger_append('select-list')).seq"),
            2
        );
        run("DO $$ BEGIN PERFORM pgseal.ledger_append('perform'); END $$");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM generate_series(1, 3) g, LATERAL pgseal.ledger_append('lateral-' || g) a"),
            3
        );
        assert_eq!(
            events("acme"),
            [
                "from",
                "select-list",
                "perform",
                "lateral-1",
                "lateral-2",
                "lateral-3"
            ]
        );
        assert_eq!(verify(""), (true, 6, None, None));
    }

    #[pg_test]
    fn append_fails_closed_without_tenant() {
        assert_eq!(
            sqlstate("SELECT * FROM pgseal.ledger_append('login')"),
            "42501"
        );
        tenant("");
        assert_eq!(
            sqlstate("SELECT * FROM pgseal.ledger_append('login')"),
            "42501"
        );
    }

    #[pg_test]
    fn append_rejects_bad_input() {
        tenant("acme");
        assert_eq!(sqlstate("SELECT * FROM pgseal.ledger_append('')"), "22023");
        assert_eq!(
            sqlstate("SELECT * FROM pgseal.ledger_append(NULL)"),
            "22023"
        );
        // JCS would round this number, so its hash could not tell it from its neighbour.
        assert_eq!(
            sqlstate(r#"SELECT * FROM pgseal.ledger_append('x', '{"n": 12345678901234567891}')"#),
            "22023"
        );
        assert_eq!(
            sqlstate(r#"SELECT * FROM pgseal.ledger_append('x', '{"n": "12345678901234567891"}')"#),
            "00000"
        );
    }

    #[pg_test]
    fn actor_defaults_to_user_setting_then_session_user() {
        tenant("acme");
        append("a", "{}");
        let session: String = one("SELECT session_user::text");
        assert_eq!(
            one::<String>("SELECT actor FROM pgseal.ledger WHERE tenant_id = 'acme' AND seq = 1"),
            session
        );
        run("SET LOCAL app.user_id = 'user-42'");
        append("b", "{}");
        assert_eq!(
            one::<String>("SELECT actor FROM pgseal.ledger WHERE tenant_id = 'acme' AND seq = 2"),
            "user-42"
        );
        run("SELECT * FROM pgseal.ledger_append('c', '{}', 'svc:billing')");
        assert_eq!(
            one::<String>("SELECT actor FROM pgseal.ledger WHERE tenant_id = 'acme' AND seq = 3"),
            "svc:billing"
        );
    }

    /// Appends inside a subtransaction that fails.
    fn doomed_append() {
        run("DO $$ BEGIN
               BEGIN
                 PERFORM pgseal.ledger_append('doomed');
                 RAISE EXCEPTION 'roll back the subtransaction';
               EXCEPTION WHEN OTHERS THEN NULL;
               END;
             END $$");
    }

    #[pg_test]
    fn rolled_back_subtransactions_leave_no_gap() {
        tenant("acme");
        // The first append (and the tenant's ledger key) rolled back entirely.
        doomed_append();
        assert_eq!(append("a", "{}").0, 1);
        doomed_append();
        assert_eq!(append("b", "{}").0, 2);
        doomed_append();
        assert_eq!(verify(""), (true, 2, None, None));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.ledger WHERE event = 'doomed'"),
            0
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.tenant_keys WHERE purpose = 'ledger'"),
            1
        );
    }

    #[pg_test]
    fn heads_are_read_back_by_exact_tenant_id() {
        // Ids that differ only in case, an accent or a trailing space are separate
        // chains. After a rolled-back subtransaction every head is read back from
        // its row (under READ COMMITTED without SPI), this transaction's writes
        // included.
        let ids = ["Acme", "acme", "ácme", "acme "];
        for (i, t) in ids.iter().enumerate() {
            tenant(t);
            for n in 1..=i as i64 + 1 {
                assert_eq!(append("e", "{}").0, n);
            }
        }
        doomed_append();
        for (i, t) in ids.iter().enumerate() {
            tenant(t);
            assert_eq!(append("again", "{}").0, i as i64 + 2);
        }
        for (i, t) in ids.iter().enumerate() {
            let quoted = pgrx::spi::quote_literal(t);
            assert_eq!(verify(&quoted), (true, i as i64 + 2, None, None), "{t:?}");
        }
    }

    /// Entries written without SPI since the backend started.
    fn written_directly() -> u64 {
        crate::pg::head_write::written()
    }

    #[pg_test]
    fn single_entries_are_written_directly_and_keep_added_indexes_current() {
        // Other tests append at the same time. This one has its own tenant, and
        // takes both tables' locks before the guard is disabled: all at once or
        // none (appenders lock the two tables in either order, so waiting for the
        // second while holding the first could deadlock).
        tenant("direct-writes");
        lock_ledger_tables();
        // Indexes a DBA might add. The one on the heads' seq makes every move of
        // a heads row a non-HOT update, which must insert into both indexes.
        run("ALTER EVENT TRIGGER pgseal_ledger_ddl_guard DISABLE");
        run("CREATE INDEX ledger_by_event ON pgseal.ledger (event)");
        run("CREATE INDEX heads_by_seq ON pgseal.ledger_heads (seq)");
        let head_row =
            || one::<i64>("SELECT seq FROM pgseal.ledger_heads WHERE tenant_id = 'direct-writes'");
        let before = written_directly();
        for (n, event) in ["a", "b", "c"].iter().enumerate() {
            assert_eq!(append(event, r#"{"k": 1}"#).0, n as i64 + 1);
        }
        assert_eq!(written_directly() - before, 3);
        // A single append inserts its entry and nothing else: the heads row moves
        // only once it is HEAD_STRIDE entries behind, and the head is read from
        // the last entry.
        assert_eq!(head_row(), 0);
        let stride = crate::ledger::heads::HEAD_STRIDE;
        for n in 4..=stride + 2 {
            assert_eq!(append("x", r#"{"k": 2}"#).0, n);
            assert_eq!(head_row(), if n < stride { 0 } else { stride });
        }
        assert_eq!(written_directly() - before, stride as u64 + 2);
        run("SET LOCAL enable_seqscan = off");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.ledger WHERE event = 'b' AND tenant_id = 'direct-writes'"),
            1
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT tenant_id FROM pgseal.ledger_heads WHERE seq = {stride}"
            )),
            "direct-writes"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.ledger_heads WHERE seq < 3 AND tenant_id = 'direct-writes'"),
            0
        );
        run("RESET enable_seqscan");
        assert_eq!(verify(""), (true, stride + 2, None, None));
        // A trigger on the insert is fired: such writes go through SPI.
        run("CREATE TEMP TABLE seen (event text)");
        run(
            "CREATE FUNCTION pg_temp.seen() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO seen VALUES (NEW.event); RETURN NEW; END $$",
        );
        run("CREATE TRIGGER seen AFTER INSERT ON pgseal.ledger FOR EACH ROW EXECUTE FUNCTION pg_temp.seen()");
        let before = written_directly();
        assert_eq!(append("d", "{}").0, stride + 3);
        assert_eq!(written_directly(), before);
        assert_eq!(
            one::<String>("SELECT string_agg(event, ',') FROM seen"),
            "d"
        );
        // So does a rule, and there PostgreSQL refuses a DO ALSO rule on a table
        // written inside WITH: the append fails and writes nothing, as it did
        // before the direct write, rather than going around the rule.
        run("ALTER EVENT TRIGGER pgseal_ledger_drop_guard DISABLE");
        run("DROP TRIGGER seen ON pgseal.ledger");
        // (After an SPI write the row's place is unknown until it is read again,
        // as it is after a rolled-back subtransaction.)
        doomed_append();
        run("CREATE RULE seen AS ON INSERT TO pgseal.ledger DO ALSO INSERT INTO seen VALUES (NEW.event)");
        assert_eq!(sqlstate("SELECT pgseal.ledger_append('e')"), "0A000");
        assert_eq!(written_directly(), before);
        assert_eq!(
            one::<String>("SELECT string_agg(event, ',') FROM seen"),
            "d"
        );
        assert_eq!(verify(""), (true, stride + 3, None, None));
        let events = events("direct-writes");
        assert_eq!(events.len() as i64, stride + 3);
        assert_eq!(
            (&events[..3], &events[stride as usize + 2]),
            (&["a", "b", "c"].map(String::from)[..], &"d".to_owned())
        );
        // Both the direct writes (a, b, c, x…) and the SPI one (d) wrote format 2.
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 'direct-writes' AND fmt = 2 \
                 AND db_role = current_user AND length(salt) = 32 AND subjects = '{}' AND commitment IS NULL"
            ),
            stride + 3
        );
    }

    /// Creates `pg_temp.appends_inside(doomed)`: a subtransaction that appends 'b'
    /// and commits, then, when `doomed`, one that appends and rolls back.
    fn create_appends_inside() {
        run(
            "CREATE FUNCTION pg_temp.appends_inside(doomed boolean) RETURNS int LANGUAGE plpgsql AS $$
             BEGIN
               BEGIN
                 PERFORM pgseal.ledger_append('b');
               EXCEPTION WHEN OTHERS THEN RETURN -1;
               END;
               IF doomed THEN
                 BEGIN
                   PERFORM pgseal.ledger_append('doomed');
                   RAISE EXCEPTION 'roll back the subtransaction';
                 EXCEPTION WHEN OTHERS THEN RETURN 0;
                 END;
               END IF;
               RETURN 0;
             END $$",
        );
    }

    #[pg_test]
    fn a_failed_subtransaction_keeps_the_statement_s_earlier_entries() {
        tenant("acme");
        // 'a' is appended by the statement itself and still waits to be written when
        // the function's first subtransaction appends 'b' and commits, and its
        // second appends, fails and rolls back.
        create_appends_inside();
        let seqs = Spi::get_three::<i64, i32, i64>(
            "SELECT (SELECT seq FROM pgseal.ledger_append('a')), pg_temp.appends_inside(true), \
                    (SELECT seq FROM pgseal.ledger_append('c'))",
        )
        .unwrap();
        assert_eq!(seqs, (Some(1), Some(0), Some(3)));
        let events = events("acme");
        assert_eq!(events, ["a", "b", "c"]);
        assert_eq!(verify(""), (true, 3, None, None));
    }

    #[pg_test]
    fn a_statement_s_entry_written_after_an_inner_level_s_does_not_move_the_head_back() {
        tenant("acme");
        // 'a' is appended by the statement and waits for its end; 'b' is appended
        // in a subtransaction the statement opens, and written when its PERFORM
        // ends. 'a' is then written alone, after 'b': the heads row must stay at
        // 'b', or the next transaction would append at seq 2 again.
        create_appends_inside();
        let seqs = Spi::get_two::<i64, i32>(
            "SELECT (SELECT seq FROM pgseal.ledger_append('a')), pg_temp.appends_inside(false)",
        )
        .unwrap();
        assert_eq!(seqs, (Some(1), Some(0)));
        assert_eq!(events("acme"), ["a", "b"]);
        assert_eq!(verify(""), (true, 2, None, None));
        assert_eq!(append("c", "{}").0, 3);
        assert_eq!(verify(""), (true, 3, None, None));
    }

    #[pg_test]
    fn appends_beyond_one_batch_in_one_statement_are_all_written() {
        tenant("acme");
        let before = written_directly();
        let n: i64 = one("SELECT count(*) FROM generate_series(1, 2500) g, LATERAL pgseal.ledger_append('bulk', pg_catalog.to_jsonb(g)) a");
        assert_eq!(n, 2500);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 'acme'"),
            2500
        );
        assert_eq!(
            one::<i64>("SELECT seq FROM pgseal.ledger_heads WHERE tenant_id = 'acme'"),
            2500
        );
        // Every batch without SPI (its heads row was read directly).
        assert_eq!(written_directly() - before, 2500);
        assert_eq!(verify(""), (true, 2500, None, None));
    }

    #[pg_test]
    fn payload_is_stored_as_given_and_hashed_canonically() {
        // The caller's jsonb is stored as it is (1.50 keeps its scale); the entry
        // commits to the canonical form of its text (1.5), which verification
        // derives from the stored value again, in one statement and in a batch.
        tenant("acme");
        append("x", r#"{"b": 1.50, "a": [true, null]}"#);
        Spi::run(
            "SELECT count(*) FROM generate_series(1, 3) g, \
             LATERAL pgseal.ledger_append('y', jsonb_build_object('n', g::numeric + 0.10))",
        )
        .unwrap();
        let p: String =
            one("SELECT payload::text FROM pgseal.ledger WHERE tenant_id = 'acme' AND seq = 1");
        assert_eq!(p, r#"{"a": [true, null], "b": 1.50}"#);
        let p: String =
            one("SELECT payload::text FROM pgseal.ledger WHERE tenant_id = 'acme' AND seq = 4");
        assert_eq!(p, r#"{"n": 3.10}"#);
        assert_eq!(verify(""), (true, 4, None, None));
    }

    /// Values of every shape the binary reader must agree on: fixed edge cases
    /// (escapes, UTF-16 member order, numbers at the edges of a double, deep
    /// nesting, containers past the 32-child offset stride), generated objects with
    /// numbers of every scale, and audit-style row images.
    const JSONB_CORPUS: &str = r#"
        WITH fixed(v) AS (VALUES
            ('{}'::jsonb), ('[]'), ('"x"'), ('0'), ('-0.0'), ('1.50'), ('1e2'), ('1e-7'),
            ('1e21'), ('1e-320'), ('1e308'), ('1e309'), ('0.1'), ('123456789012345678'),
            ('9007199254740992'), ('9007199254740993'), ('-0.000001'), ('1234.5678e10'),
            ('true'), ('false'), ('null'), ('[[[]]]'), ('{"a":{"b":{}}}'),
            ('"a\"b\\c\n\t\r\b\f\u0001\u001f é 😀 \u2028 /"'),
            ('{"\ue000":1,"\ud800\udc00":2,"a":3,"aa":4,"b":5,"":6,"é":7}'),
            ((repeat('[', 2000) || '1' || repeat(']', 2000))::jsonb),
            ((repeat('{"k":', 500) || '[]' || repeat('}', 500))::jsonb),
            ('1e-290'), ('1e290'), ('123456789012345e278'), ('9.99999999999999e292'),
            ('2.2250738585072014e-308'), ('5e-324'), ('4.9406564584124654e-324'),
            ('1.7976931348623157e308'), ('1.7976931348623158e308'), ('-1e-300'), ('1e-400'),
            ('123456789012345.6'), ('0.30000000000000004'), ('1e23'), ('-0e5'), ('0.000'),
            (jsonb_build_object('n', round(1.5::numeric, 100))),
            (to_jsonb(1e-310::float8)), (to_jsonb(0.1::float4)),
            (jsonb_path_query_first('{"a":1.5}', '$.a * 3')),
            (jsonb_path_query_first('"1.23"', '$.double()')),
            ('{"a":[1,2.50,{"b":3}]}'::jsonb -> 'a'), ('{"a":1.50}'::jsonb -> 'a'),
            (jsonb_build_array('1.50'::jsonb, '"s"'::jsonb)),
            ('{"b":1}'::jsonb || '{"a":2.0,"b":3}'), ('[1]'::jsonb || '2'),
            (jsonb_set('{"a":[1,2]}', '{a,1}', '"x\u0001"')),
            (jsonb_build_object('a', 1, 'a', 2)), (to_jsonb(ARRAY[[1.5, 2], [3, 4]]::numeric[])),
            (to_jsonb(chr(127) || chr(8232) || chr(8233) || chr(65279) || chr(65534) || E'\x01')),
            (to_jsonb(('1.' || repeat('0', 16000))::numeric)),
            ((SELECT jsonb_agg(CASE WHEN x % 2 = 0 THEN to_jsonb(repeat('s', x % 5))
                                    ELSE to_jsonb(x * 1.5) END) FROM generate_series(1, 31) x)),
            ((SELECT jsonb_agg(CASE WHEN x % 2 = 0 THEN to_jsonb(repeat('s', x % 5))
                                    ELSE to_jsonb(x * 1.5) END) FROM generate_series(1, 65) x)),
            ((SELECT jsonb_object_agg(repeat('k', x % 7) || x, CASE WHEN x % 3 = 0 THEN '[1.25]'::jsonb
                                      ELSE to_jsonb(repeat('v', x % 3)) END) FROM generate_series(1, 64) x))
        ),
        generated AS (
            SELECT jsonb_build_object(
                'i', (random() * 1e6)::int - 500000,
                'n', round((random() * 1e8)::numeric, g % 12),
                'big', (random() * 1e18)::numeric(30, 0),
                'f', random(),
                'p', round(random()::numeric, 3 + g % 15) * power(10::numeric, (g % 80) - 40),
                's', md5(g::text) || chr(32 + g % 500) || chr(57344 + g % 50) || chr(65536 + g),
                'b', g % 2 = 0, 'z', NULL,
                'a', (SELECT jsonb_agg(x * 1.1) FROM generate_series(1, g % 40) x),
                'o', (SELECT jsonb_object_agg('k' || x || repeat('é', x % 3), x)
                      FROM generate_series(1, g % 45) x),
                'u', jsonb_build_object(chr(57344 + g % 50), 1, chr(65536 + g % 50), 2, 'x', 3)
            ) FROM generate_series(1, 3000) g
        ),
        images AS (
            SELECT to_jsonb(r) FROM (
                SELECT g AS id, timestamptz '2026-12-03 10:00+00' + g * interval '1 minute' AS at,
                       g * 1.25 AS amount, g % 3 = 0 AS paid, NULL::text AS note,
                       'customer ' || g AS name, (g * 7919) % 1000003 AS ref,
                       ARRAY[g, g + 1] AS pair, g::numeric / 7 AS ratio
                FROM generate_series(1, 500) g) r
        )
        SELECT v, v::text FROM fixed
        UNION ALL SELECT *, jsonb_build_object::text FROM generated
        UNION ALL SELECT *, to_jsonb::text FROM images"#;

    #[pg_test]
    fn jsonb_binary_canonical_matches_text() {
        // The ledger hashes the canonical form that `pgseal_core::jsonb` reads
        // from a value's binary form; it must be, for every value, the canonical
        // form of the value's text (what entries written before were hashed over),
        // refusals of numbers RFC 8785 would round included.
        Spi::run("SELECT setseed(0.42)").unwrap();
        let (mut checked, mut inexact) = (0, 0);
        Spi::connect(|c| {
            let mut t = c.select(JSONB_CORPUS, None, &[]).unwrap();
            while t.next().is_some() {
                let datum = t.get_datum_by_ordinal(1).unwrap().unwrap();
                let text: String = t.get(2).unwrap().unwrap();
                // SAFETY: a non-NULL jsonb datum of the current row, which SPI keeps
                // for the connection.
                let bytes = unsafe { crate::pg::head_read::varlena_bytes(datum) };
                let binary = pgseal_core::jsonb::canonical_from_jsonb(bytes)
                    .map_err(pgseal_core::CoreError::from);
                let from_text = pgseal_core::canonical::canonical_payload(&text);
                assert_eq!(binary, from_text, "{text}");
                checked += 1;
                inexact += usize::from(from_text.is_err());
            }
        });
        assert_eq!(checked, 27 + 34 + 3000 + 500);
        // Both outcomes are exercised.
        assert!(inexact > 100 && inexact < 3000, "{inexact} inexact");
    }

    #[pg_test]
    fn verify_passes_on_an_intact_chain_and_ranges() {
        tenant("acme");
        for i in 0..5 {
            append("e", &format!(r#"{{"i": {i}}}"#));
        }
        assert_eq!(verify(""), (true, 5, None, None));
        assert_eq!(verify("NULL, 2, 4"), (true, 3, None, None));
        assert_eq!(verify("'acme', 5"), (true, 1, None, None));
        tenant("nobody-yet");
        assert_eq!(verify(""), (true, 0, None, None));
        assert_eq!(
            sqlstate("SELECT * FROM pgseal.ledger_verify(NULL, 0)"),
            "22023"
        );
    }

    #[pg_test]
    fn verify_reads_compressed_and_out_of_line_fields() {
        lock_ledger_tables();
        // ledger_verify borrows most fields straight from the stored tuple; long ones
        // are stored compressed (a repeated actor) or out of line (an event of hex
        // digits), and must be read back whole.
        // `ledger_append` now refuses an actor or event over 1 KB, so these are
        // appended below it (pgseal's own entries, and rows written before the
        // limit, can still hold them).
        tenant("acme-long");
        append("short", "{}");
        let actor = "a".repeat(20000);
        crate::ledger::append::append("acme-long", "order.update", r#"{"n": 1}"#, &actor).unwrap();
        let event: String =
            one("SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i");
        crate::ledger::append::append("acme-long", &event, "{}", "alice").unwrap();
        let compressed = one::<bool>(
            "SELECT pg_column_compression(actor) IS NOT NULL FROM pgseal.ledger \
             WHERE tenant_id = 'acme-long' AND seq = 2",
        );
        assert!(compressed);
        let event_len = one::<i32>(
            "SELECT length(event) FROM pgseal.ledger WHERE tenant_id = 'acme-long' AND seq = 3",
        );
        assert_eq!(event_len, 12800);
        assert_eq!(verify(""), (true, 3, None, None));
        disable_guards();
        run("UPDATE pgseal.ledger SET actor = repeat('a', 19999) || 'b' WHERE tenant_id = 'acme-long' AND seq = 2");
        assert_eq!(
            verify(""),
            (false, 1, Some(2), Some("hash mismatch".into()))
        );
    }

    #[pg_test]
    fn verify_finds_an_edited_payload() {
        lock_ledger_tables();
        tenant("acme-edit");
        for _ in 0..4 {
            append("e", r#"{"amount": 10}"#);
        }
        disable_guards();
        run(
            r#"UPDATE pgseal.ledger SET payload = '{"amount": 1000}' WHERE tenant_id = 'acme-edit' AND seq = 3"#,
        );
        assert_eq!(
            verify(""),
            (false, 2, Some(3), Some("hash mismatch".into()))
        );
    }

    #[pg_test]
    fn verify_finds_a_forged_mac_and_a_deleted_entry() {
        lock_ledger_tables();
        tenant("acme-mac");
        for _ in 0..4 {
            append("e", "{}");
        }
        disable_guards();
        run("UPDATE pgseal.ledger SET mac = sha256(mac) WHERE tenant_id = 'acme-mac' AND seq = 2");
        assert_eq!(verify(""), (false, 1, Some(2), Some("mac mismatch".into())));
        run("DELETE FROM pgseal.ledger WHERE tenant_id = 'acme-mac' AND seq = 2");
        assert_eq!(verify(""), (false, 1, Some(2), Some("gap".into())));
        // A range that ends before the gap verifies.
        assert!(verify("NULL, 1, 1").0);
        // (Cut-off tails: `a_tail_cut_behind_the_heads_row_is_a_gap…` here, and
        // the checkpoint test in tests/tests/ledger_cluster.rs.)
    }

    #[pg_test]
    fn verify_finds_an_edited_link() {
        lock_ledger_tables();
        tenant("acme-link");
        for _ in 0..3 {
            append("e", "{}");
        }
        disable_guards();
        // Replace entry 2's hash with the hash of different content: entry 2
        // then mismatches, so first rewrite entry 3's link to it.
        run("UPDATE pgseal.ledger SET prev_hash = sha256(prev_hash) WHERE tenant_id = 'acme-link' AND seq = 3");
        assert_eq!(verify("").2, Some(3));
        assert_eq!(verify("").3.as_deref(), Some("hash mismatch"));
    }

    #[pg_test]
    fn ledger_is_append_only() {
        tenant("acme");
        append("e", "{}");
        assert_eq!(sqlstate("UPDATE pgseal.ledger SET event = 'x'"), "42501");
        assert_eq!(sqlstate("DELETE FROM pgseal.ledger"), "42501");
        assert_eq!(sqlstate("TRUNCATE pgseal.ledger"), "42501");
        assert_eq!(sqlstate("TRUNCATE pgseal.ledger_heads"), "42501");
        assert_eq!(
            sqlstate("ALTER TABLE pgseal.ledger DISABLE TRIGGER pgseal_ledger_guard"),
            "42501"
        );
        assert_eq!(
            sqlstate("ALTER TABLE pgseal.ledger ADD COLUMN note text"),
            "42501"
        );
        assert_eq!(sqlstate("CREATE TRIGGER t BEFORE INSERT ON pgseal.ledger FOR EACH ROW EXECUTE FUNCTION pgseal._ledger_guard()"), "42501");
        assert_eq!(
            sqlstate("DROP POLICY ledger_admin ON pgseal.ledger"),
            "42501"
        );
        // A direct DROP fails on the extension's dependency; taken out of the
        // extension first, the drop guard refuses it.
        assert_eq!(sqlstate("DROP TABLE pgseal.ledger"), "2BP01");
        run("ALTER EXTENSION pgseal DROP TABLE pgseal.ledger");
        assert_eq!(sqlstate("DROP TABLE pgseal.ledger"), "42501");
        assert_eq!(one::<i64>("SELECT count(*) FROM pgseal.ledger"), 1);
        assert_eq!(verify(""), (true, 1, None, None));
    }

    #[pg_test]
    fn other_tenants_need_admin() {
        tenant("acme");
        append("e", "{}");
        run("CREATE ROLE ledger_app IN ROLE pgseal_ledger");
        run("CREATE ROLE ledger_boss IN ROLE pgseal_admin");
        run("CREATE ROLE nobody");
        run("SET LOCAL ROLE ledger_app");
        tenant("globex");
        assert_eq!(
            sqlstate("SELECT * FROM pgseal.ledger_verify('acme')"),
            "42501"
        );
        assert_eq!(
            sqlstate("SELECT * FROM pgseal.ledger_export('acme')"),
            "42501"
        );
        assert_eq!(sqlstate("SELECT pgseal.ledger_checkpoint()"), "42501");
        assert_eq!(sqlstate("SELECT pgseal.ledger_prune('globex', 1)"), "42501");
        // Its own tenant is fine, and RLS hides the other tenant's rows.
        assert_eq!(sqlstate("SELECT * FROM pgseal.ledger_append('e')"), "00000");
        assert_eq!(one::<i64>("SELECT count(*) FROM pgseal.ledger"), 1);
        assert_eq!(sqlstate("UPDATE pgseal.ledger SET event = 'x'"), "42501");
        run("RESET ROLE");
        run("SET LOCAL ROLE ledger_boss");
        assert!(verify("'acme'").0);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.ledger_export('acme')"),
            1
        );
        run("RESET ROLE");
        run("SET LOCAL ROLE nobody");
        assert_eq!(sqlstate("SELECT * FROM pgseal.ledger_append('e')"), "42501");
        assert_eq!(sqlstate("SELECT * FROM pgseal.ledger_verify()"), "42501");
        assert_eq!(sqlstate("SELECT count(*) FROM pgseal.ledger"), "42501");
        assert_eq!(sqlstate("SELECT pgseal.ledger_public_key()"), "42501");
        run("RESET ROLE");
    }

    #[pg_test]
    fn export_carries_every_field_needed_to_verify() {
        tenant("acme");
        let (_, h1) = append("login", r#"{"ip": "10.0.0.1"}"#);
        append("logout", "{}");
        let lines: Vec<String> = Spi::connect(|c| {
            c.select("SELECT e::text FROM pgseal.ledger_export() e", None, &[])
                .unwrap()
                .map(|r| r.get::<String>(1).unwrap().unwrap())
                .collect()
        });
        assert_eq!(lines.len(), 2);
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["hash"], h1.as_str());
        assert_eq!(first["seq"], 1);
        for field in [
            "tenant_id",
            "recorded_at",
            "recorded_at_us",
            "actor",
            "event",
            "payload",
            "prev_hash",
            "mac",
        ] {
            assert!(!first[field].is_null(), "{field} missing");
        }
        let report =
            pgseal_core::export::verify_export(lines.join("\n").as_bytes(), &[], None).unwrap();
        assert_eq!(report.len(), 1);
        assert!(report[0].report.ok(), "{report:?}");
        assert_eq!(report[0].report.checked, 2);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.ledger_export(NULL, 2)"),
            1
        );
    }

    #[pg_test]
    fn checkpoint_signs_only_committed_entries() {
        // Only committed entries are signed (out-of-process tests sign them); this
        // transaction's appends are not yet, so there is nothing to sign.
        tenant("acme");
        append("e", "{}");
        assert_eq!(sqlstate("SELECT pgseal.ledger_checkpoint()"), "22023");
        assert_eq!(
            sqlstate("SELECT pgseal.ledger_checkpoint('never-appended')"),
            "22023"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.ledger_checkpoints"),
            0
        );
        let pk: String = one("SELECT pgseal.ledger_public_key()");
        assert_eq!(pk.len(), 64);
    }

    #[pg_test]
    fn prune_keeps_an_anchor_and_still_verifies() {
        // These entries are fresh: only a superuser may let them go.
        run("SET LOCAL pgseal.ledger_min_retention = '0'");
        tenant("acme");
        for _ in 0..5 {
            append("e", "{}");
        }
        let anchor: String = one(
            "SELECT encode(hash, 'hex') FROM pgseal.ledger WHERE tenant_id = 'acme' AND seq = 2",
        );
        assert_eq!(one::<i64>("SELECT pgseal.ledger_prune('acme', 3)"), 2);
        assert_eq!(
            one::<i64>("SELECT min(seq) FROM pgseal.ledger WHERE tenant_id = 'acme'"),
            3
        );
        assert_eq!(one::<String>("SELECT encode(anchor_hash, 'hex') FROM pgseal.ledger_heads WHERE tenant_id = 'acme'"), anchor);
        let last: String = one(
            "SELECT event FROM pgseal.ledger WHERE tenant_id = 'acme' ORDER BY seq DESC LIMIT 1",
        );
        assert_eq!(last, "ledger.pruned");
        assert_eq!(verify(""), (true, 4, None, None));
        assert_eq!(one::<i64>("SELECT pgseal.ledger_prune('acme', 2)"), 0);
        assert_eq!(sqlstate("SELECT pgseal.ledger_prune('acme', 100)"), "22023");
        assert_eq!(sqlstate("SELECT pgseal.ledger_prune('acme', 0)"), "22023");
        assert_eq!(sqlstate("SELECT pgseal.ledger_prune('', 1)"), "22023");
    }

    #[pg_test]
    fn prune_refuses_a_chain_that_does_not_verify() {
        lock_ledger_tables();
        tenant("acme-prune");
        for _ in 0..3 {
            append("e", "{}");
        }
        disable_guards();
        run(
            r#"UPDATE pgseal.ledger SET event = 'forged' WHERE tenant_id = 'acme-prune' AND seq = 1"#,
        );
        run("SET LOCAL pgseal.ledger_min_retention = '0'");
        assert_eq!(
            sqlstate("SELECT pgseal.ledger_prune('acme-prune', 3)"),
            "XX001"
        );
    }

    /// Issue 20: a value jsonb accepts at any depth is audited, appended and
    /// verified (a recursive JSON parser refused it at about 128 levels).
    #[pg_test]
    fn deeply_nested_jsonb_is_audited_and_verifies() {
        run("CREATE TABLE public.deep_docs (id int PRIMARY KEY, tenant_id text, body jsonb)");
        run("SELECT pgseal.ledger_audit('public.deep_docs')");
        run("INSERT INTO public.deep_docs VALUES (2, 'deep', (repeat('[',200) || repeat(']',200))::jsonb)");
        run("INSERT INTO public.deep_docs VALUES (3, 'deep', (repeat('{\"a\":',5000) || '1' || repeat('}',5000))::jsonb)");
        tenant("deep");
        run("SELECT * FROM pgseal.ledger_append('doc.deep', (repeat('[',3000) || repeat(']',3000))::jsonb)");
        assert_eq!(events("deep"), ["row.insert", "row.insert", "doc.deep"]);
        assert!(one::<bool>("SELECT ok FROM pgseal.ledger_verify('deep')"));
        assert_eq!(
            one::<i64>("SELECT checked FROM pgseal.ledger_verify('deep')"),
            3
        );
    }

    /// Issue 20: a row whose tenant column is longer than a tenant id may be, or
    /// written under an over-long user id, is still written and still audited.
    #[pg_test]
    fn an_over_limit_tenant_column_never_blocks_the_write() {
        run("CREATE TABLE public.wide_docs (id int PRIMARY KEY, tenant_id text, body text)");
        run("SELECT pgseal.ledger_audit('public.wide_docs')");
        run("SELECT set_config('app.user_id', repeat('u', 2000), true)");
        run("INSERT INTO public.wide_docs VALUES (1, repeat('t', 300), 'x')");
        // In pgseal's open chain: any writer of an audited table can cause it, so
        // never the system chain (whose lock it would then hold).
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.ledger WHERE tenant_id = '_pgseal'"),
            0
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM public.wide_docs"), 1);
        let p: pgrx::JsonB = one(
            "SELECT payload FROM pgseal.ledger WHERE tenant_id = '_pgseal_open' AND event = 'row.insert'",
        );
        let expected = format!(
            "sha256:{}",
            one::<String>("SELECT encode(sha256(convert_to(repeat('t', 300), 'UTF8')), 'hex')")
        );
        assert_eq!(p.0["tenant_over_limit"], serde_json::json!(expected));
        assert_eq!(p.0["entry"]["after"]["body"], "x");
        let actor: String = one(
            "SELECT actor FROM pgseal.ledger WHERE tenant_id = '_pgseal_open' AND event = 'row.insert'",
        );
        assert!(actor.starts_with("sha256:"), "{actor}");
        assert!(one::<bool>(
            "SELECT ok FROM pgseal.ledger_verify('_pgseal_open')"
        ));
    }

    #[pg_test]
    fn audit_triggers_record_row_changes() {
        run("CREATE TABLE public.orders (id int PRIMARY KEY, tenant_id text, status text, token text, amount numeric)");
        run("SELECT pgseal.ledger_audit('public.orders')");
        tenant("acme");
        run("INSERT INTO public.orders VALUES (1, 'acme', 'new', pgseal.vault_seal('sk-live-secret'), 123456789012345678901.5)");
        run("UPDATE public.orders SET status = 'paid' WHERE id = 1");
        run("INSERT INTO public.orders VALUES (2, 'globex', 'new', NULL, 1)");
        run("DELETE FROM public.orders WHERE id = 1");
        let events = events("acme");
        assert_eq!(events, ["row.insert", "row.update", "row.delete"]);
        let upd: pgrx::JsonB =
            one("SELECT payload FROM pgseal.ledger WHERE tenant_id = 'acme' AND seq = 2");
        assert_eq!(upd.0["before"], serde_json::json!({"status": "new"}));
        assert_eq!(upd.0["after"], serde_json::json!({"status": "paid"}));
        assert_eq!(upd.0["key"], serde_json::json!({"id": 1}));
        assert_eq!(upd.0["table"], "public.orders");
        let ins: pgrx::JsonB =
            one("SELECT payload FROM pgseal.ledger WHERE tenant_id = 'acme' AND seq = 1");
        let token = ins.0["after"]["token"].as_str().unwrap().to_owned();
        assert!(
            token.starts_with("v2:"),
            "sealed values are recorded as envelopes"
        );
        assert!(!ins.0.to_string().contains("sk-live-secret"));
        // A numeric a double cannot hold is kept exactly, as a string.
        assert_eq!(ins.0["after"]["amount"], "123456789012345678901.5");
        // The row's own tenant column decides the chain.
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 'globex'"),
            1
        );
        assert_eq!(verify(""), (true, 3, None, None));
        assert!(verify("'globex'").0);
        run("SELECT pgseal.ledger_unaudit('public.orders')");
        run("UPDATE public.orders SET status = 'x'");
        assert_eq!(one::<i64>("SELECT count(*) FROM pgseal.ledger"), 4);
    }

    #[pg_test]
    fn audit_takes_the_context_tenant_without_a_tenant_column() {
        run("CREATE TABLE public.notes (id int PRIMARY KEY, body text)");
        run("SELECT pgseal.ledger_audit('public.notes', '{insert}')");
        assert_eq!(
            sqlstate("INSERT INTO public.notes VALUES (1, 'x')"),
            "42501"
        );
        tenant("acme");
        run("INSERT INTO public.notes VALUES (1, 'x')");
        run("UPDATE public.notes SET body = 'y'");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgseal.ledger WHERE tenant_id = 'acme'"),
            1
        );
    }

    #[pg_test]
    fn audit_rejects_bad_arguments() {
        run("CREATE TABLE public.t (id int)");
        run("CREATE VIEW public.v AS SELECT 1 AS x");
        assert_eq!(
            sqlstate("SELECT pgseal.ledger_audit('public.t', '{}')"),
            "22023"
        );
        assert_eq!(
            sqlstate("SELECT pgseal.ledger_audit('public.t', '{MERGE}')"),
            "22023"
        );
        assert_eq!(sqlstate("SELECT pgseal.ledger_audit('public.v')"), "42809");
        assert_eq!(
            sqlstate("SELECT pgseal.ledger_audit('pgseal.ledger')"),
            "22023"
        );
        assert_eq!(sqlstate("SELECT pgseal.ledger_audit('public.t')"), "00000");
    }

    #[pg_test]
    fn decrypt_refuses_a_read_only_transaction_while_audited() {
        tenant("acme");
        let sealed: String = one("SELECT pgseal.vault_seal('s3cret')");
        run("SET LOCAL transaction_read_only = on");
        let q = format!(
            "SELECT pgseal.vault_decrypt({})",
            pgrx::spi::quote_literal(&sealed)
        );
        assert_eq!(sqlstate(&q), "25006");
        run("SET LOCAL pgseal.audit_decrypt = off");
        assert_eq!(sqlstate(&q), "00000");
    }

    #[pg_test]
    fn kek_rewrap_moves_ledger_keys_and_old_macs_verify() {
        run("SET LOCAL pgseal.master_key_active = 1");
        tenant("acme");
        append("e", "{}");
        append("e", "{}");
        assert_eq!(one::<i32>("SELECT kek_version FROM pgseal.tenant_keys WHERE tenant_id = 'acme' AND purpose = 'ledger'"), 1);
        run("SET LOCAL pgseal.master_key_active = 0");
        assert!(one::<i32>("SELECT pgseal.kek_rewrap()") >= 1);
        assert_eq!(one::<i32>("SELECT kek_version FROM pgseal.tenant_keys WHERE tenant_id = 'acme' AND purpose = 'ledger'"), 2);
        // The rewrap is recorded in the system chain; the tenant's next entry is
        // MACed with the rewrapped key, and the old MACs still verify.
        assert_eq!(events("acme"), ["e", "e"]);
        assert_eq!(verify(""), (true, 2, None, None));
        append("e", "{}");
        assert_eq!(verify(""), (true, 3, None, None));
    }

    #[pg_test]
    fn prune_keeps_young_entries_and_held_tenants() {
        // A tenant of its own: the hold is recorded in its chain, and no other
        // test waits for that chain's lock.
        tenant("held");
        for _ in 0..3 {
            append("e", "{}");
        }
        // The default keeps ten years (GoBD).
        assert_eq!(
            one::<String>("SHOW pgseal.ledger_min_retention"),
            "10 years"
        );
        assert_eq!(sqlstate("SELECT pgseal.ledger_prune('held', 3)"), "55000");
        run("SET LOCAL pgseal.ledger_min_retention = '1 hour'");
        assert_eq!(sqlstate("SELECT pgseal.ledger_prune('held', 3)"), "55000");
        run("SET LOCAL pgseal.ledger_min_retention = '-1 day'");
        assert_eq!(sqlstate("SELECT pgseal.ledger_prune('held', 3)"), "22023");
        run("SET LOCAL pgseal.ledger_min_retention = '0'");
        // A legal hold stops every prune of the tenant, even one of nothing.
        run("SELECT pgseal.retention_hold('held', true)");
        assert_eq!(sqlstate("SELECT pgseal.ledger_prune('held', 3)"), "55000");
        assert_eq!(sqlstate("SELECT pgseal.ledger_prune('held', 1)"), "55000");
        run("SELECT pgseal.retention_hold('held', false)");
        assert_eq!(sqlstate("SELECT pgseal.ledger_prune('held', 1)"), "00000");
        assert_eq!(
            one::<i64>("SELECT min(seq) FROM pgseal.ledger WHERE tenant_id = 'held'"),
            1
        );
        // Only a superuser changes the setting.
        run("CREATE ROLE retention_boss IN ROLE pgseal_admin");
        run("SET LOCAL ROLE retention_boss");
        assert_eq!(
            sqlstate("SET LOCAL pgseal.ledger_min_retention = '0'"),
            "42501"
        );
        run("RESET ROLE");
        assert_eq!(one::<i64>("SELECT pgseal.ledger_prune('held', 3)"), 2);
    }

    // -----------------------------------------------------------------------
    // Entry format 2 (docs/FORMAT.md, "Ledger entries").

    /// The export lines of `tenant`'s chain.
    fn export_lines(tenant: &str) -> Vec<String> {
        Spi::connect(|c| {
            c.select(
                "SELECT e::text FROM pgseal.ledger_export($1) e",
                None,
                &[tenant.into()],
            )
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect()
        })
    }

    /// The offline verification report of `tenant`'s export.
    fn verify_offline(tenant: &str) -> pgseal_core::chain::Report {
        let lines = export_lines(tenant);
        let r = pgseal_core::export::verify_export(lines.join("\n").as_bytes(), &[], None).unwrap();
        assert_eq!(r.len(), 1);
        r[0].report.clone()
    }

    #[pg_test]
    fn new_entries_are_format_2_and_record_the_calling_role() {
        tenant("fmt2-role");
        run("CREATE ROLE fmt2_writer IN ROLE pgseal_ledger");
        let owner: String = one(
            "SELECT r.rolname::text FROM pg_extension e JOIN pg_roles r ON r.oid = e.extowner \
             WHERE e.extname = 'pgseal'",
        );
        append("e", r#"{"k": 1}"#); // one entry: the direct write
                                    // Several in one statement: the batch written through SPI.
        run("SELECT pgseal.ledger_append('batch', jsonb_build_object('i', i)) FROM generate_series(1, 3) i");
        // pgseal switches to its owner inside the append; the role recorded is the
        // one the session acts as, after SET ROLE.
        run("SET LOCAL ROLE fmt2_writer");
        append("as-writer", "{}");
        run("RESET ROLE");
        let rows: Vec<(i64, i16, String, i32, String, bool)> = Spi::connect(|c| {
            c.select(
                "SELECT seq, fmt, db_role, length(salt), subjects::text, commitment IS NULL \
                 FROM pgseal.ledger WHERE tenant_id = 'fmt2-role' ORDER BY seq",
                None,
                &[],
            )
            .unwrap()
            .map(|r| {
                (
                    r.get::<i64>(1).unwrap().unwrap(),
                    r.get::<i16>(2).unwrap().unwrap(),
                    r.get::<String>(3).unwrap().unwrap(),
                    r.get::<i32>(4).unwrap().unwrap(),
                    r.get::<String>(5).unwrap().unwrap(),
                    r.get::<bool>(6).unwrap().unwrap(),
                )
            })
            .collect()
        });
        let me: String = one("SELECT current_user::text");
        assert_eq!(rows.len(), 5);
        for (seq, fmt, role, salt_len, subjects, no_commitment) in &rows {
            let want = if *seq == 5 {
                "fmt2_writer"
            } else {
                me.as_str()
            };
            assert_eq!(
                (
                    *fmt,
                    role.as_str(),
                    *salt_len,
                    subjects.as_str(),
                    *no_commitment
                ),
                (2, want, 32, "{}", true),
                "seq {seq}"
            );
        }
        if owner != me {
            assert!(
                rows.iter().all(|r| r.2 != owner),
                "the owner is never recorded"
            );
        }
        assert_eq!(
            one::<i64>(
                "SELECT count(DISTINCT salt) FROM pgseal.ledger WHERE tenant_id = 'fmt2-role'"
            ),
            5,
            "a fresh salt per entry"
        );
        assert_eq!(verify(""), (true, 5, None, None));
        // The export carries the format 2 fields, and verifies offline.
        let last: serde_json::Value =
            serde_json::from_str(export_lines("fmt2-role").last().unwrap()).unwrap();
        assert_eq!(last["fmt"], 2);
        assert_eq!(last["db_role"], "fmt2_writer");
        assert_eq!(last["subjects"], serde_json::json!([]));
        assert_eq!(last["salt"].as_str().map(str::len), Some(64));
        assert!(last.get("commitment").is_none());
        let r = verify_offline("fmt2-role");
        assert!(r.ok(), "{r:?}");
        assert_eq!((r.checked, r.erased), (5, 0));
    }

    #[pg_test]
    fn a_batch_passes_any_subjects_through_its_array_literal() {
        // The batch write passes each entry's subjects as the text of a text[]
        // literal, cast back in SQL: every string comes back as it was.
        let subjects: Vec<String> = ["user:1", "a\"b", "c\\d", "", "NULL", " x ", "{,}", "é"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        for list in [&subjects[..], &subjects[..1], &[]] {
            let literal = crate::ledger::writer::text_array_literal(list);
            let back = Spi::get_one_with_args::<Vec<String>>(
                "SELECT $1::text[]",
                &[literal.as_str().into()],
            )
            .unwrap()
            .unwrap();
            assert_eq!(back, list, "{literal}");
        }
    }

    #[pg_test]
    fn a_format_1_entry_followed_by_format_2_entries_verifies() {
        use pgseal_core::ledger::{entry_hash, EntryFields, GENESIS};
        lock_ledger_tables();
        tenant("fmt1-legacy");
        // A format 1 entry as pgseal wrote them before format 2, MAC included,
        // written behind pgseal's back as the tenant's first entry.
        let mac = crate::ledger::mac::key("fmt1-legacy", true)
            .unwrap()
            .unwrap();
        let at_us: i64 = 1_796_000_000_000_000;
        let hash = entry_hash(&EntryFields {
            prev_hash: &GENESIS,
            tenant: "fmt1-legacy",
            seq: 1,
            recorded_at_us: at_us,
            actor: "alice",
            event: "login",
            payload: r#"{"ip":"10.0.0.1"}"#,
        });
        let tag = mac.sign(&hash);
        disable_heads_guard();
        run("ALTER TABLE pgseal.ledger DISABLE TRIGGER pgseal_ledger_write_guard");
        Spi::run_with_args(
            "INSERT INTO pgseal.ledger VALUES ('fmt1-legacy', 1, to_timestamp(1796000000), 'alice', 'login', \
             '{\"ip\": \"10.0.0.1\"}', $1, $2, $3)",
            &[GENESIS.to_vec().into(), hash.to_vec().into(), tag.to_vec().into()],
        )
        .unwrap();
        Spi::run_with_args(
            "INSERT INTO pgseal.ledger_heads (tenant_id, seq, hash) VALUES ('fmt1-legacy', 1, $1)",
            &[hash.to_vec().into()],
        )
        .unwrap();
        run("ALTER TABLE pgseal.ledger ENABLE ALWAYS TRIGGER pgseal_ledger_write_guard");
        run("ALTER TABLE pgseal.ledger_heads ENABLE ALWAYS TRIGGER pgseal_heads_write_guard");
        run("ALTER EVENT TRIGGER pgseal_ledger_ddl_guard ENABLE ALWAYS");
        assert_eq!(
            one::<i16>("SELECT fmt FROM pgseal.ledger WHERE tenant_id = 'fmt1-legacy' AND seq = 1"),
            1
        );
        assert_eq!(verify(""), (true, 1, None, None));
        assert_eq!(append("e", "{}").0, 2);
        assert_eq!(append("e", r#"{"n": 2}"#).0, 3);
        assert_eq!(
            one::<String>("SELECT string_agg(fmt::text, ',' ORDER BY seq) FROM pgseal.ledger WHERE tenant_id = 'fmt1-legacy'"),
            "1,2,2"
        );
        assert_eq!(verify(""), (true, 3, None, None));
        // The export: a format 1 line has no format 2 field, and all verify offline.
        let first: serde_json::Value =
            serde_json::from_str(&export_lines("fmt1-legacy")[0]).unwrap();
        assert_eq!(first["fmt"], 1);
        for field in ["db_role", "subjects", "salt", "commitment"] {
            assert!(first.get(field).is_none(), "{field}");
        }
        let r = verify_offline("fmt1-legacy");
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.checked, 3);
        // A format 1 row cannot take a format 2 field unnoticed.
        disable_guards();
        run("UPDATE pgseal.ledger SET db_role = 'someone' WHERE tenant_id = 'fmt1-legacy' AND seq = 1");
        assert_eq!(
            verify(""),
            (false, 0, Some(1), Some("hash mismatch".into()))
        );
    }

    #[pg_test]
    fn editing_a_format_2_field_fails_verification_and_erasure_verifies() {
        lock_ledger_tables();
        tenant("fmt2-edit");
        for i in 0..3 {
            append("e", &format!(r#"{{"email": "u{i}@example.com"}}"#));
        }
        assert_eq!(verify(""), (true, 3, None, None));
        disable_guards();
        let bad = (false, 1, Some(2), Some("hash mismatch".to_owned()));
        let at2 = "WHERE tenant_id = 'fmt2-edit' AND seq = 2";
        // Each edit, then its undo.
        let edits = [
            ("SET db_role = 'intruder'", "SET db_role = current_user"),
            ("SET db_role = NULL", "SET db_role = current_user"),
            (
                "SET salt = set_byte(salt, 0, get_byte(salt, 0) # 1)",
                "SET salt = set_byte(salt, 0, get_byte(salt, 0) # 1)",
            ),
            ("SET subjects = '{user:1}'", "SET subjects = '{}'"),
            ("SET commitment = sha256('x')", "SET commitment = NULL"),
            ("SET fmt = 1", "SET fmt = 2"),
        ];
        for (edit, undo) in edits {
            run(&format!("UPDATE pgseal.ledger {edit} {at2}"));
            assert_eq!(verify(""), bad, "{edit}");
            run(&format!("UPDATE pgseal.ledger {undo} {at2}"));
            assert_eq!(verify(""), (true, 3, None, None), "{undo}");
        }
        // Erasing as format 2 defines it: payload and salt gone, the commitment
        // stored. It verifies online and offline, and offline counts it.
        let (payload, salt) = Spi::get_two::<String, Vec<u8>>(&format!(
            "SELECT payload::text, salt FROM pgseal.ledger {at2}"
        ))
        .unwrap();
        let salt: [u8; 32] = salt.unwrap().try_into().unwrap();
        let canonical = pgseal_core::canonical::canonical_payload(&payload.unwrap()).unwrap();
        let commitment = pgseal_core::ledger::payload_commitment(&salt, &canonical);
        // A wrong commitment first.
        let mut wrong = commitment;
        wrong[0] ^= 1;
        for (c, ok) in [(wrong, false), (commitment, true)] {
            Spi::run_with_args(
                &format!(
                    "UPDATE pgseal.ledger SET payload = NULL, salt = NULL, commitment = $1 {at2}"
                ),
                &[c.to_vec().into()],
            )
            .unwrap();
            if ok {
                assert_eq!(verify(""), (true, 3, None, None));
            } else {
                assert_eq!(verify(""), bad);
            }
        }
        let line: serde_json::Value = serde_json::from_str(&export_lines("fmt2-edit")[1]).unwrap();
        assert!(line["payload"].is_null() && line.get("salt").is_none());
        assert_eq!(line["commitment"], hex::encode(commitment));
        let r = verify_offline("fmt2-edit");
        assert!(r.ok(), "{r:?}");
        assert_eq!((r.checked, r.erased), (3, 1));
    }

    #[pg_test]
    fn anchors_and_ledger_rows_are_written_only_by_pgseal() {
        lock_ledger_tables();
        tenant("anchor-forged");
        for _ in 0..3 {
            append("e", "{}");
        }
        // Issue 14, hole 4: a superuser set the anchor to the head, and
        // ledger_verify then returned ok with 0 entries checked.
        let forge_anchor = "UPDATE pgseal.ledger_heads h SET anchor_seq = l.seq, anchor_hash = l.hash \
             FROM (SELECT seq, hash FROM pgseal.ledger WHERE tenant_id = 'anchor-forged' ORDER BY seq DESC LIMIT 1) l \
             WHERE h.tenant_id = 'anchor-forged'";
        assert_eq!(sqlstate(forge_anchor), "42501");
        assert_eq!(
            sqlstate(
                "UPDATE pgseal.ledger_heads SET seq = seq - 1 WHERE tenant_id = 'anchor-forged'"
            ),
            "42501"
        );
        assert_eq!(
            sqlstate("DELETE FROM pgseal.ledger_heads WHERE tenant_id = 'anchor-forged'"),
            "42501"
        );
        assert_eq!(
            sqlstate("INSERT INTO pgseal.ledger_heads (tenant_id, seq, hash) VALUES ('forged', 0, '\\x00')"),
            "42501"
        );
        // Rows are added to the ledger only by pgseal's append path.
        assert_eq!(
            sqlstate(
                "INSERT INTO pgseal.ledger SELECT tenant_id, seq + 10, recorded_at, actor, event, payload, prev_hash, hash, mac \
                 FROM pgseal.ledger WHERE tenant_id = 'anchor-forged' AND seq = 3"
            ),
            "42501"
        );
        assert_eq!(
            sqlstate("INSERT INTO pgseal.ledger_checkpoints VALUES ('anchor-forged', 3, '\\x00', 'now', 1, 0, '\\x00', '\\x00')"),
            "42501"
        );
        // ENABLE ALWAYS: replication mode does not skip the guard, nor can it be disabled.
        run("SET LOCAL session_replication_role = replica");
        assert_eq!(sqlstate(forge_anchor), "42501");
        run("SET LOCAL session_replication_role = origin");
        assert_eq!(
            sqlstate("ALTER TABLE pgseal.ledger_heads DISABLE TRIGGER pgseal_heads_write_guard"),
            "42501"
        );
        assert_eq!(verify(""), (true, 3, None, None));
        // A superuser who lifts the guards on purpose still cannot make
        // verification skip the chain: no prune recorded that anchor.
        disable_heads_guard();
        run(forge_anchor);
        assert_eq!(
            verify(""),
            (false, 0, Some(3), Some("anchor mismatch".into()))
        );
    }

    #[pg_test]
    fn a_tail_cut_behind_the_heads_row_is_a_gap() {
        lock_ledger_tables();
        tenant("cut-tail");
        let stride = crate::ledger::heads::HEAD_STRIDE;
        // One batch moves the heads row to its last entry; single appends after
        // it leave the row behind.
        one::<i64>(&format!(
            "SELECT count(*) FROM generate_series(1, {stride}) g, LATERAL pgseal.ledger_append('e', pg_catalog.to_jsonb(g)) a"
        ));
        for _ in 0..6 {
            append("e", "{}");
        }
        let last = stride + 6;
        assert_eq!(
            one::<i64>("SELECT seq FROM pgseal.ledger_heads WHERE tenant_id = 'cut-tail'"),
            stride
        );
        assert_eq!(verify(""), (true, last, None, None));
        disable_guards();
        disable_heads_guard();
        // The chain must pass through the heads row's (seq, hash): a chain
        // rewritten behind the row (by whoever can compute MACs) ends elsewhere.
        let set_row_hash = |hash: &str| {
            run(&format!(
                "UPDATE pgseal.ledger_heads SET hash = {hash} WHERE tenant_id = 'cut-tail'"
            ))
        };
        set_row_hash("decode(repeat('ab', 32), 'hex')");
        assert_eq!(
            verify(""),
            (false, last, Some(stride), Some("hash mismatch".into()))
        );
        set_row_hash(&format!(
            "(SELECT hash FROM pgseal.ledger WHERE tenant_id = 'cut-tail' AND seq = {stride})"
        ));
        assert_eq!(verify(""), (true, last, None, None));
        let cut = |after: i64| {
            run(&format!(
                "DELETE FROM pgseal.ledger WHERE tenant_id = 'cut-tail' AND seq > {after}"
            ))
        };
        // Entries cut after the heads row leave a chain that verifies: what
        // catches them is the next checkpoint (tests/tests/ledger_cluster.rs).
        cut(last - 2);
        assert_eq!(verify(""), (true, last - 2, None, None));
        // Cut behind the heads row: verification must reach the row's entry, and
        // reports the first missing one.
        cut(stride - 5);
        assert_eq!(
            verify(""),
            (false, stride - 5, Some(stride - 4), Some("gap".into()))
        );
        // Appending goes on after the heads row (here after the head this
        // transaction holds), never at a cut seq: the gap stays visible.
        assert!(append("e", "{}").0 > stride);
        assert_eq!(verify("").2, Some(stride - 4));
        // Entries without a heads row: appending would start over at seq 1 and
        // hide the removal. The head is re-read after a rolled-back subtransaction.
        run("DELETE FROM pgseal.ledger_heads WHERE tenant_id = 'cut-tail'");
        doomed_append();
        assert_eq!(sqlstate("SELECT pgseal.ledger_append('e')"), "XX001");
        assert_eq!(verify("").2, Some(1));
    }

    #[pg_test]
    fn published_heads_of_colliding_tenants_are_missed_never_mixed_up() {
        use crate::ledger::shared_heads::{forget, get, publish, ChainKey, Published};
        // Tenant ids chosen so that three chains share one pair of slots, as an
        // attacker who picks tenant ids could arrange.
        let ledger = pgrx::pg_sys::Oid::from(4_000_000_000u32);
        let mut by_set = std::collections::HashMap::<usize, Vec<String>>::new();
        let names = (0..)
            .map(|i| format!("collide-{i}"))
            .find_map(|t| {
                let v = by_set.entry(ChainKey::new(ledger, &t).set()).or_default();
                v.push(t);
                (v.len() == 3).then(|| v.clone())
            })
            .unwrap();
        let key = |t: &str| ChainKey::new(ledger, t);
        let head = |n: i64| Published {
            seq: n,
            hash: [n as u8; 32],
            row_seq: n - 1,
        };
        for (n, t) in names.iter().enumerate() {
            assert_eq!(get(&key(t)), None);
            publish(&key(t), head(n as i64 + 1));
            assert_eq!(get(&key(t)), Some(head(n as i64 + 1)), "{t}");
        }
        // Two slots for three chains: one was replaced, and is missed.
        let found: Vec<_> = names.iter().map(|t| get(&key(t))).collect();
        assert_eq!(found.iter().filter(|f| f.is_none()).count(), 1, "{found:?}");
        for (n, f) in found.iter().enumerate() {
            assert!(f.is_none() || *f == Some(head(n as i64 + 1)));
        }
        // Another database's or ledger's chain of the same tenant is another chain.
        let other = ChainKey::new(pgrx::pg_sys::Oid::from(4_000_000_001u32), &names[2]);
        assert_eq!(get(&other), None);
        for t in &names {
            forget(&key(t));
            assert_eq!(get(&key(t)), None);
        }
    }

    #[pg_test]
    fn an_anchor_moved_after_a_prune_fails_verification() {
        run("SET LOCAL pgseal.ledger_min_retention = '0'");
        lock_ledger_tables();
        tenant("anchor-moved");
        for _ in 0..4 {
            append("e", "{}");
        }
        assert_eq!(
            one::<i64>("SELECT pgseal.ledger_prune('anchor-moved', 3)"),
            2
        );
        let pruned: pgrx::JsonB = one(
            "SELECT payload FROM pgseal.ledger WHERE tenant_id = 'anchor-moved' AND event = 'ledger.pruned'",
        );
        assert_eq!(pruned.0["anchor_seq"], 2);
        assert_eq!(verify(""), (true, 3, None, None));
        disable_heads_guard();
        // The anchor moves past an entry that was never pruned.
        run("UPDATE pgseal.ledger_heads SET anchor_seq = 3, \
             anchor_hash = (SELECT hash FROM pgseal.ledger WHERE tenant_id = 'anchor-moved' AND seq = 3) \
             WHERE tenant_id = 'anchor-moved'");
        assert_eq!(
            verify(""),
            (false, 0, Some(3), Some("anchor mismatch".into()))
        );
        // A range that does not start at the anchor does not rely on it.
        assert!(verify("NULL, 5").0);
        // Nor does a prune go on from a moved anchor.
        assert_eq!(
            sqlstate("SELECT pgseal.ledger_prune('anchor-moved', 5)"),
            "XX001"
        );
    }
}
