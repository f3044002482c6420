//! The attack tier (issue 13): plays the attacker against a real cluster.
//!
//! One non-superuser LOGIN role per pgseal role (read from `pg_roles`), plus
//! `atk_writer` (INSERT/UPDATE/DELETE on an audited table, nothing else) and
//! `atk_nobody` (no pgseal role at all). In a fresh session per (hijack family, role)
//! the attacker plants a hijack, then exercises every target:
//!
//! - every function in schema `pgseal` and every SECURITY DEFINER function outside
//!   the system schemas, enumerated from `pg_proc` and called with valid arguments
//!   built from its signature (with only its required arguments, and with all);
//! - every view in schema `pgseal`;
//! - the trigger functions, fired through the tables that use them (the audited
//!   table's INSERT/UPDATE/DELETE), and the event triggers, fired by DDL;
//!
//! each in its own transaction that sets the tenant and COMMITs, so the work pgseal
//! does at commit (encryption counts, ledger flush, decrypt audit) runs too.
//!
//! Every hijack calls `pwn` (the attacker's own function, in the schema
//! `<login>_s` it owns), which raises `WARNING: pwn ran as <current_user>`; the
//! session's notices are collected. A warning naming anyone but the attacker's own
//! login role is an escalation. The families:
//!
//! - `pg_temp_domains`: a `pg_temp` domain over every base type of `pg_catalog` and
//!   `pgseal` (`pg_temp.text` also hijacks `text[]`), whose CHECK calls pwn.
//! - `pg_temp_relations`: `pg_temp` views shadowing every relation of `pg_catalog`
//!   and `pgseal` (pg_temp is searched first for relations too).
//! - `operators`: a caller-owned schema first in `search_path`, with every
//!   `pg_catalog` comparison, `||`, LIKE and JSON operator on the common types
//!   redefined to call pwn and then return the right answer.
//! - `json_cast`: the audited table has a column of an attacker-owned enum with a
//!   user-defined cast to json that calls pwn; the writer changes rows. It plants
//!   nothing in the session, so it is also the baseline for the coverage check.
//! - `view_as_table`: the attacker's view (over a function that calls pwn), its
//!   RLS-policied table, and its registered table later turned into a view (an
//!   `ON SELECT` rule, which keeps the OID), passed where pgseal expects a table.
//!
//! PL/pgSQL resolves a function's types and relations once per session, when it
//! first runs; event triggers first run at the session's first DDL, which is the
//! planting itself. So for the two pg_temp families each object is also planted as
//! the first DDL of a session of its own, followed by DDL.
//!
//! Then the lock probes: an outsider holds, at session level, every advisory lock
//! key pgseal computed before issue 13 (per-tenant ledger and key-creation locks,
//! pgseald's leader lock); appends, key creation, a decrypt's commit and pgseald's
//! leadership must still go through within `lock_timeout`.
//!
//! The test fails with one line per finding:
//! `probe=<family> role=<login> target=<target> ran as <who>`, `probe=locks …`,
//! `probe=crash …` (a backend terminated by a signal), and `coverage: …` when a
//! fixture statement or a call the issue's probes name (`COVERAGE`) fails without
//! any hijack, since the probes would then prove nothing. Run with
//! `PGSEAL_ATTACK_VERBOSE=1` to print every call's outcome.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgseal_tests::{Cluster, KEY_V1};
use sha2::Digest;

const TENANT: &str = "acme";
const USER_ID: &str = "u-atk";
const CONTEXT: &str = "t.c";
const AUDITED: &str = "public.audited";
/// The session advisory-lock key pgseald's leader election used before issue 13
/// (`LEADER_KEY` in daemon/src/scheduler.rs).
const LEADER_KEY: i64 = 0x0070_6773_6561_6c64;

/// Targets each role must be able to run (by label prefix) in `COVERAGE_FAMILY`,
/// which plants nothing session-local: otherwise the probes never reached them.
const COVERAGE_FAMILY: &str = "json_cast";
const COVERAGE: &[(&str, &str)] = &[
    ("atk_pgseal_seal", "pgseal.vault_seal("),
    ("atk_pgseal_decrypt", "pgseal.vault_decrypt("),
    ("atk_pgseal_ledger", "pgseal.ledger_append("),
    ("atk_pgseal_ledger", "pgseal.ledger_verify("),
    ("atk_pgseal_admin", "SELECT * FROM pgseal.key_usage"),
    ("atk_writer", "INSERT public.audited"),
    ("atk_writer", "UPDATE public.audited"),
    ("atk_writer", "DELETE public.audited"),
    ("atk_nobody", "DDL CREATE/ALTER/DROP TABLE"),
];

const FAMILIES: [&str; 5] = [
    "pg_temp_domains",
    "pg_temp_relations",
    "operators",
    "json_cast",
    "view_as_table",
];

/// Operators the `operators` family redefines, wherever `pg_catalog` defines them
/// on two of `OPERATOR_TYPES`.
const OPERATORS: &[&str] = &[
    "=", "<>", "<", ">", "<=", ">=", "||", "~~", "!~~", "->", "->>", "@>", "<@", "?",
];
const OPERATOR_TYPES: &[&str] = &[
    "text",
    "bytea",
    "int8",
    "int4",
    "int2",
    "name",
    "oid",
    "jsonb",
    "json",
    "bool",
    "timestamptz",
    "interval",
    "char",
    "bpchar",
    "numeric",
];

struct Attacker {
    login: String,
    /// Owned by the attacker; holds its permanent hijack objects.
    schema: String,
}

#[derive(Clone, Debug)]
struct ArgType {
    typname: String,
    typtype: String,
    /// Schema-qualified spelling, `pg_catalog.text[]` for arrays.
    qualified: String,
    elem: Option<String>,
    enum_last: Option<String>,
}

#[derive(Clone, Debug)]
struct Func {
    label: String,
    call: String,
    kind: String,
    ret: String,
    ndefaults: usize,
    secdef: bool,
    args: Vec<(String, ArgType)>,
}

impl Func {
    fn takes_regclass(&self) -> bool {
        self.args.iter().any(|(_, t)| t.typname == "regclass")
    }
    fn is_trigger(&self) -> bool {
        self.ret == "trigger" || self.ret == "event_trigger"
    }
    fn pseudo_args(&self) -> bool {
        self.args.iter().any(|(_, t)| t.typtype == "p")
    }
    /// Called last in a session: these undo fixture state the other calls need.
    fn destructive(&self) -> bool {
        [
            "shred",
            "prune",
            "unaudit",
            "unprotect",
            "drop",
            "delete",
            "remove",
        ]
        .iter()
        .any(|w| self.call.contains(w))
    }
}

/// A table some pgseal trigger function fires on (other than the audited table,
/// which has its own DML).
struct TriggerTable {
    rel: String,
    insert: String,
    update: Option<String>,
}

/// Everything the probes enumerate from the catalogs, once, as postgres.
struct Inventory {
    funcs: Vec<Func>,
    views: Vec<String>,
    trigger_tables: Vec<TriggerTable>,
    trigger_funcs_unfired: Vec<String>,
    event_triggers: Vec<String>,
    /// (domain name, qualified base type)
    domain_bases: Vec<(String, String)>,
    /// (relation name, CREATE TEMP VIEW statement shadowing it; `__PWN__` stands
    /// for the attacker's pwn function).
    shadows: Vec<(String, String)>,
    /// (operator, qualified left, right, result)
    operators: Vec<(String, String, String, String)>,
    leader_fn: bool,
}

struct Target {
    label: String,
    sql: String,
    last: bool,
}

#[derive(Default)]
struct Findings {
    failures: BTreeSet<String>,
    calls: BTreeMap<String, (usize, usize)>,
    notes: Vec<String>,
}

impl Findings {
    fn escalate(&mut self, family: &str, login: &str, target: &str, who: &str) {
        self.failures.insert(format!(
            "probe={family} role={login} target={target} ran as {who}"
        ));
    }
}

/// A session as an attacker, collecting its notices.
struct Session {
    client: postgres::Client,
    notices: Arc<Mutex<Vec<String>>>,
    login: String,
}

impl Session {
    fn open(c: &Cluster, login: &str) -> Session {
        let notices = Arc::new(Mutex::new(Vec::new()));
        let sink = notices.clone();
        let mut cfg = postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(c.port)
            .user(login)
            .dbname("postgres")
            .options("-c statement_timeout=20s")
            .notice_callback(move |n| sink.lock().unwrap().push(n.message().to_owned()));
        let client = cfg
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect as {login}: {e}"));
        Session {
            client,
            notices,
            login: login.to_owned(),
        }
    }

    /// Runs `sql` in a transaction acting for the tenant, committing it (VACUUM,
    /// which cannot run in one, on its own). The tenant is set as
    /// `pgseal.set_tenant` sets it, without calling pgseal: set_tenant is a target.
    fn exec(&mut self, sql: &str) -> Result<(), postgres::Error> {
        if sql.starts_with("VACUUM ") {
            return self.client.batch_execute(sql);
        }
        let r = self.client.batch_execute(&format!(
            "BEGIN; SET LOCAL app.tenant_id = '{TENANT}'; SET LOCAL app.user_id = '{USER_ID}'; {sql}; COMMIT"
        ));
        if r.is_err() && !self.client.is_closed() {
            let _ = self.client.batch_execute("ROLLBACK");
        }
        r
    }

    /// The roles other than the attacker's own that pwn ran as since the last call.
    fn escalated(&self) -> BTreeSet<String> {
        let mut n = self.notices.lock().unwrap();
        let who = n
            .iter()
            .filter_map(|m| m.strip_prefix("pwn ran as "))
            .map(|w| w.trim().to_owned())
            .filter(|w| *w != self.login)
            .collect();
        n.clear();
        who
    }
}

/// An error's SQLSTATE and message.
fn describe(e: &postgres::Error) -> String {
    e.as_db_error()
        .map(|d| format!("{} {}", d.code().code(), d.message()))
        .unwrap_or_else(|| e.to_string())
}

fn ledger_lock_key(tenant: &str) -> i64 {
    let d = sha2::Sha256::new()
        .chain_update(b"pgseal.ledger:")
        .chain_update(tenant.as_bytes())
        .finalize();
    i64::from_be_bytes(d[..8].try_into().unwrap())
}

fn lit(v: &str, ty: &str) -> String {
    format!("'{}'::{ty}", v.replace('\'', "''"))
}

/// A valid value for an argument, from its name and type.
fn sample(name: &str, t: &ArgType, envelope: &str, rel: &str) -> String {
    let n = name.to_ascii_lowercase();
    let q = t.qualified.as_str();
    let null = format!("NULL::{q}");
    if t.typtype == "e" {
        return t.enum_last.as_deref().map(|l| lit(l, q)).unwrap_or(null);
    }
    if let Some(elem) = &t.elem {
        return match elem.as_str() {
            "text" | "varchar" if n.contains("event") => lit("{INSERT,UPDATE,DELETE}", q),
            "text" | "varchar" => lit("{x}", q),
            "name" => lit("{tenant_id}", q),
            "int2" | "int4" | "int8" => lit("{1}", q),
            _ => null,
        };
    }
    match t.typname.as_str() {
        "text" | "varchar" | "bpchar" => {
            let v = if n.contains("column") {
                Some("tenant_id")
            } else if n.contains("sealed") || n.contains("envelope") || n.contains("token") {
                Some(envelope)
            } else if n.contains("context") {
                Some(CONTEXT)
            } else if n.contains("plaintext") || n.contains("secret") {
                Some("pw")
            } else if n.contains("tenant") {
                Some(TENANT)
            } else if n.contains("event") {
                Some("x.y")
            } else if n.contains("actor") {
                None
            } else if n.contains("user") {
                Some(USER_ID)
            } else if n.contains("org") {
                Some("org1")
            } else if n == "which" {
                Some("tenant")
            } else if n.contains("payload") || n.contains("json") {
                Some("{}")
            } else if n.contains("role") {
                Some("viewer")
            } else if n == "rel" || n.contains("table") {
                Some(rel)
            } else {
                Some("x")
            };
            v.map(|v| lit(v, q)).unwrap_or(null)
        }
        "name" => lit(
            if n.contains("time") {
                "created_at"
            } else if n.contains("owner") || n.contains("org") || n == "col" || n == "column" {
                "v"
            } else {
                "tenant_id"
            },
            q,
        ),
        "int2" | "int4" | "int8" | "numeric" | "float4" | "float8" => lit(
            if n.contains("visible") {
                "4"
            } else if n.contains("batch") {
                "10"
            } else if n.contains("before") {
                "2"
            } else if n.starts_with("to") {
                "100"
            } else {
                "1"
            },
            q,
        ),
        "bool" => lit("true", q),
        "interval" => lit("1 day", q),
        "json" | "jsonb" => lit("{}", q),
        "regclass" => lit(rel, q),
        "bytea" => lit("\\x00", q),
        "timestamptz" | "timestamp" | "date" => lit("2020-01-01", q),
        "oid" => lit("0", q),
        "regtype" => lit("pg_catalog.text", q),
        "regproc" => lit("pg_catalog.now", q),
        "regprocedure" => lit("pg_catalog.now()", q),
        "uuid" => lit("00000000-0000-0000-0000-000000000000", q),
        _ => null,
    }
}

/// The SQL calling `f` with its first `n` arguments.
fn call_sql(f: &Func, n: usize, envelope: &str, rel: &str) -> String {
    let args: Vec<String> = f.args[..n]
        .iter()
        .map(|(name, t)| sample(name, t, envelope, rel))
        .collect();
    let verb = if f.kind == "p" { "CALL" } else { "SELECT" };
    format!("{verb} {}({})", f.call, args.join(", "))
}

fn variants(f: &Func) -> Vec<usize> {
    let n = f.args.len();
    if f.ndefaults > 0 {
        vec![n - f.ndefaults, n]
    } else {
        vec![n]
    }
}

fn callable(f: &Func) -> bool {
    (f.kind == "f" || f.kind == "p") && !f.is_trigger() && !f.pseudo_args()
}

fn func_targets(f: &Func, envelope: &str, rel: &str, suffix: &str) -> Vec<Target> {
    let vs = variants(f);
    vs.iter()
        .map(|&n| Target {
            label: if vs.len() > 1 {
                format!("{} with {n} args{suffix}", f.label)
            } else {
                format!("{}{suffix}", f.label)
            },
            sql: call_sql(f, n, envelope, rel),
            last: f.destructive(),
        })
        .collect()
}

/// The statements that fire pgseal's triggers and event triggers as this attacker.
fn firing_targets(
    inv: &Inventory,
    a: &Attacker,
    writer_schema: &str,
    next_id: &mut i32,
) -> Vec<Target> {
    *next_id += 1;
    let id = *next_id;
    let mut t = vec![
        Target {
            label: format!("INSERT {AUDITED}"),
            sql: format!(
                "INSERT INTO {AUDITED} (id, tenant_id, v, created_at, c) \
                 VALUES ({id}, '{TENANT}', 'w', pg_catalog.now(), 'a'::{writer_schema}.t)"
            ),
            last: false,
        },
        Target {
            label: format!("UPDATE {AUDITED}"),
            sql: format!("UPDATE {AUDITED} SET v = 'w2', c = 'b'::{writer_schema}.t"),
            last: false,
        },
        Target {
            label: format!("DELETE {AUDITED}"),
            sql: format!("DELETE FROM {AUDITED}"),
            last: true,
        },
    ];
    for tt in &inv.trigger_tables {
        t.push(Target {
            label: format!("INSERT {}", tt.rel),
            sql: tt.insert.clone(),
            last: false,
        });
        if let Some(u) = &tt.update {
            t.push(Target {
                label: format!("UPDATE {}", tt.rel),
                sql: u.clone(),
                last: false,
            });
        }
        t.push(Target {
            label: format!("DELETE {}", tt.rel),
            sql: format!("DELETE FROM {}", tt.rel),
            last: true,
        });
        t.push(Target {
            label: format!("TRUNCATE {}", tt.rel),
            sql: format!("TRUNCATE {}", tt.rel),
            last: true,
        });
    }
    t.extend(ddl_target(inv, a, id));
    t
}

/// DDL that fires every event trigger (ddl_command_start/end, table_rewrite, sql_drop).
fn ddl_target(inv: &Inventory, a: &Attacker, id: i32) -> Option<Target> {
    if inv.event_triggers.is_empty() {
        return None;
    }
    let x = format!("{}.x_{id}", a.schema);
    Some(Target {
        label: format!(
            "DDL CREATE/ALTER/DROP TABLE (event triggers {})",
            inv.event_triggers.join(", ")
        ),
        sql: format!(
            "CREATE TABLE {x} (i pg_catalog.int4); \
             ALTER TABLE {x} ALTER COLUMN i TYPE pg_catalog.int8; \
             DROP TABLE {x}"
        ),
        last: false,
    })
}

fn view_targets(inv: &Inventory) -> Vec<Target> {
    inv.views
        .iter()
        .map(|v| Target {
            label: format!("SELECT * FROM {v}"),
            sql: format!("SELECT * FROM {v}"),
            last: false,
        })
        .collect()
}

fn targets(
    family: &str,
    inv: &Inventory,
    a: &Attacker,
    writer_schema: &str,
    envelope: &str,
    next_id: &mut i32,
) -> Vec<Target> {
    let mut t = Vec::new();
    if family == "view_as_table" {
        let s = &a.schema;
        for rel in [format!("{s}.v"), format!("{s}.tp")] {
            for f in inv
                .funcs
                .iter()
                .filter(|f| callable(f) && f.takes_regclass())
            {
                t.extend(func_targets(f, envelope, &rel, &format!(" rel={rel}")));
            }
        }
        // A table the caller registers (it has a primary key then), then turns into a
        // view with an ON SELECT rule: the OID pgseal stored now names a view.
        *next_id += 1;
        let id = *next_id;
        let rv = format!("{s}.rv_{id}");
        t.push(Target {
            label: format!("CREATE TABLE {rv}"),
            sql: format!(
                "CREATE TABLE {rv} (id pg_catalog.int4 PRIMARY KEY, tenant_id pg_catalog.text, \
                 v pg_catalog.text, created_at pg_catalog.timestamptz)"
            ),
            last: false,
        });
        for f in inv
            .funcs
            .iter()
            .filter(|f| callable(f) && f.secdef && f.takes_regclass() && !f.destructive())
        {
            // Registration (vault_register_column, retention_set, …) while it is a
            // table. Only SECURITY DEFINER ones: a trigger or row security on it
            // (ledger_audit, tenant_protect) would keep it from becoming a view.
            let n = f.args.len();
            t.push(Target {
                label: format!("{} rel={rv} (as a table)", f.label),
                sql: call_sql(f, n, envelope, &rv),
                last: false,
            });
        }
        t.push(Target {
            label: format!("drop {rv}'s primary key"),
            sql: format!("ALTER TABLE {rv} DROP CONSTRAINT rv_{id}_pkey"),
            last: false,
        });
        // PostgreSQL 15 converts only a table that has no index (relhasindex, which
        // VACUUM clears once the last index is gone).
        t.push(Target {
            label: format!("VACUUM {rv}"),
            sql: format!("VACUUM {rv}"),
            last: false,
        });
        t.push(Target {
            label: format!("turn {rv} into a view"),
            sql: format!(
                "CREATE RULE \"_RETURN\" AS ON SELECT TO {rv} DO INSTEAD \
                 SELECT 1::pg_catalog.int4 AS id, {s}.f() AS tenant_id, \
                 'v2:x:y'::pg_catalog.text AS v, pg_catalog.now() AS created_at"
            ),
            last: false,
        });
        for v in view_targets(inv) {
            t.push(Target {
                label: format!("{} after {rv} became a view", v.label),
                ..v
            });
        }
        for f in inv
            .funcs
            .iter()
            .filter(|f| callable(f) && f.takes_regclass())
        {
            t.extend(func_targets(
                f,
                envelope,
                &rv,
                &format!(" rel={rv} (now a view)"),
            ));
        }
    } else {
        for f in inv.funcs.iter().filter(|f| callable(f)) {
            t.extend(func_targets(f, envelope, AUDITED, ""));
        }
        t.extend(view_targets(inv));
        t.extend(firing_targets(inv, a, writer_schema, next_id));
    }
    // Stable: destructive calls last, otherwise in enumeration order.
    t.sort_by_key(|x| x.last);
    t
}

/// The family's session-local hijack objects, one statement each: (label, SQL).
/// They call the attacker's permanent pwn, so that one can be a session's first DDL.
fn plant_statements(family: &str, a: &Attacker, inv: &Inventory) -> Vec<(String, String)> {
    let pwn = format!("{}.pwn", a.schema);
    match family {
        "pg_temp_domains" => inv
            .domain_bases
            .iter()
            .map(|(name, base)| {
                (
                    format!("CREATE DOMAIN pg_temp.{name}"),
                    format!("CREATE DOMAIN pg_temp.{name} AS {base} CHECK ({pwn}(VALUE::pg_catalog.text))"),
                )
            })
            .collect(),
        "pg_temp_relations" => inv
            .shadows
            .iter()
            .map(|(name, sql)| (format!("CREATE TEMP VIEW {name}"), sql.replace("__PWN__", &pwn)))
            .collect(),
        _ => Vec::new(),
    }
}

/// Plants the family's session-local hijack. Returns how many objects it made.
fn plant(s: &mut Session, family: &str, a: &Attacker, inv: &Inventory) -> usize {
    if family == "operators" {
        s.client
            .batch_execute(&format!(
                "SET search_path = {}, pg_catalog, public",
                a.schema
            ))
            .unwrap();
        return inv.operators.len();
    }
    plant_statements(family, a, inv)
        .iter()
        .filter(|(_, sql)| s.client.batch_execute(sql).is_ok())
        .count()
}

/// Fixture state every session starts from, as postgres. Returns the envelope, and
/// the fixture statements that failed (a probe whose fixture is missing proves nothing).
fn refresh(pg: &mut postgres::Client) -> (String, Vec<String>) {
    let mut failed = Vec::new();
    for sql in [
        format!("DELETE FROM pgseal.sealed_columns WHERE rel <> '{AUDITED}'::regclass"),
        format!("DELETE FROM pgseal.retention_rules WHERE rel <> '{AUDITED}'::regclass"),
        format!("TRUNCATE {AUDITED}"),
        format!("SELECT pgseal.ledger_audit('{AUDITED}')"),
        format!("SELECT pgseal.retention_hold('{TENANT}', false)"),
    ] {
        if let Err(e) = pg.batch_execute(&sql) {
            failed.push(format!("{sql}: {}", describe(&e)));
        }
    }
    let envelope: String = {
        let mut tx = pg.transaction().unwrap();
        tx.batch_execute(&format!("SET LOCAL app.tenant_id = '{TENANT}'"))
            .unwrap();
        let e = tx
            .query_one(
                &format!("SELECT pgseal.vault_seal('s3cret', '{CONTEXT}')"),
                &[],
            )
            .expect("postgres seals the fixture value")
            .get(0);
        tx.commit().unwrap();
        e
    };
    for sql in [
        format!(
            "INSERT INTO {AUDITED} (id, tenant_id, v, created_at) VALUES \
             (1, '{TENANT}', '{envelope}', now()), (2, '{TENANT}', 'plain', now() - interval '400 days')"
        ),
        format!("SELECT pgseal.vault_register_column('{AUDITED}', 'v', '{CONTEXT}')"),
        format!("SELECT pgseal.retention_set('{AUDITED}', '30 days', 'created_at')"),
        format!("SELECT pgseal.retention_set('{AUDITED}', '10 days', 'created_at', '{TENANT}')"),
        // Subject export and erasure plan their statements on it as its owner.
        format!("SELECT pgseal.subject_register('{AUDITED}', 'tenant_id')"),
        format!(
            "SELECT pgseal.tenant_offboard('{TENANT}', '0') \
             WHERE NOT EXISTS (SELECT 1 FROM pgseal.tenant_offboardings WHERE tenant_id = '{TENANT}')"
        ),
        format!(
            "BEGIN; SET LOCAL app.tenant_id = '{TENANT}'; \
             SELECT * FROM pgseal.ledger_append('fixture.tick', '{{\"n\": 1}}'); \
             SELECT * FROM pgseal.ledger_append('fixture.tock', '{{\"n\": 2}}'); COMMIT"
        ),
        format!(
            "INSERT INTO pgseal.org_members VALUES ('{TENANT}', 'org1', 'u-owner', 'owner'), \
             ('{TENANT}', 'org1', '{USER_ID}', 'admin') ON CONFLICT DO NOTHING"
        ),
    ] {
        if let Err(e) = pg.batch_execute(&sql) {
            failed.push(format!("{}: {}", sql.replace(&envelope, "<envelope>"), describe(&e)));
            let _ = pg.batch_execute("ROLLBACK");
        }
    }
    (envelope, failed)
}

fn setup(c: &Cluster, pg: &mut postgres::Client) -> (Vec<Attacker>, String) {
    pg.batch_execute("CREATE EXTENSION pgseal").unwrap();
    let roles: Vec<String> = pg
        .query(
            r"SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'pgseal\_%' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!roles.is_empty(), "CREATE EXTENSION made no pgseal_* role");
    let mut attackers = Vec::new();
    for r in &roles {
        attackers.push((format!("atk_{r}"), Some(r.clone())));
    }
    attackers.push(("atk_writer".into(), None));
    attackers.push(("atk_nobody".into(), None));
    let attackers: Vec<Attacker> = attackers
        .into_iter()
        .map(|(login, granted)| {
            let schema = format!("{login}_s");
            let mut sql =
                format!("CREATE ROLE {login} LOGIN; CREATE SCHEMA {schema} AUTHORIZATION {login};");
            if let Some(g) = granted {
                sql += &format!("GRANT {g} TO {login};");
            }
            pg.batch_execute(&sql).unwrap();
            Attacker { login, schema }
        })
        .collect();

    // Each attacker's permanent objects, made by the attacker in its own schema.
    let ops: Vec<(String, String, String, String)> = operator_list(pg);
    for a in &attackers {
        let s = &a.schema;
        let mut atk = Session::open(c, &a.login);
        atk.client
            .batch_execute(&format!(
                "CREATE FUNCTION {s}.pwn(v pg_catalog.text) RETURNS pg_catalog.bool LANGUAGE plpgsql
                     AS $$BEGIN RAISE WARNING 'pwn ran as %', current_user; RETURN true; END$$;
                 CREATE FUNCTION {s}.f() RETURNS pg_catalog.text LANGUAGE plpgsql
                     AS $$BEGIN PERFORM {s}.pwn('view'); RETURN '{TENANT}'; END$$;
                 CREATE VIEW {s}.v AS SELECT 1::pg_catalog.int4 AS id, {s}.f() AS tenant_id,
                     'x'::pg_catalog.text AS v, pg_catalog.now() AS created_at;
                 CREATE TABLE {s}.tp (id pg_catalog.int4 PRIMARY KEY, tenant_id pg_catalog.text,
                     v pg_catalog.text, created_at pg_catalog.timestamptz);
                 INSERT INTO {s}.tp VALUES (1, '{TENANT}', 'x', pg_catalog.now());
                 ALTER TABLE {s}.tp ENABLE ROW LEVEL SECURITY;
                 ALTER TABLE {s}.tp FORCE ROW LEVEL SECURITY;
                 CREATE POLICY pwn ON {s}.tp USING ({s}.pwn('policy'));
                 CREATE TYPE {s}.t AS ENUM ('a', 'b');
                 CREATE FUNCTION {s}.t_json({s}.t) RETURNS pg_catalog.json LANGUAGE plpgsql
                     AS $$BEGIN PERFORM {s}.pwn('cast'); RETURN pg_catalog.to_json($1::pg_catalog.text); END$$;
                 CREATE CAST ({s}.t AS pg_catalog.json) WITH FUNCTION {s}.t_json({s}.t);
                 GRANT USAGE ON SCHEMA {s} TO PUBLIC;"
            ))
            .unwrap_or_else(|e| panic!("{}: planting permanent objects: {e}", a.login));
        let mut sql = String::new();
        for (i, (op, l, r, res)) in ops.iter().enumerate() {
            sql += &format!(
                "CREATE FUNCTION {s}.op_{i}(a {l}, b {r}) RETURNS {res} LANGUAGE plpgsql
                     AS $$BEGIN PERFORM {s}.pwn('op'); RETURN a OPERATOR(pg_catalog.{op}) b; END$$;
                 CREATE OPERATOR {s}.{op} (LEFTARG = {l}, RIGHTARG = {r}, FUNCTION = {s}.op_{i});\n"
            );
        }
        atk.client
            .batch_execute(&sql)
            .unwrap_or_else(|e| panic!("{}: planting operators: {e}", a.login));
        assert!(atk.escalated().is_empty(), "planting escalated already");
    }

    let writer_schema = attackers
        .iter()
        .find(|a| a.login == "atk_writer")
        .unwrap()
        .schema
        .clone();
    pg.batch_execute(&format!(
        "CREATE TABLE {AUDITED} (id int PRIMARY KEY, tenant_id text, v text,
             created_at timestamptz NOT NULL DEFAULT now(), c {writer_schema}.t);
         GRANT INSERT, UPDATE, DELETE ON {AUDITED} TO atk_writer;
         SELECT pgseal.ledger_audit('{AUDITED}');"
    ))
    .unwrap();
    (attackers, writer_schema)
}

fn operator_list(pg: &mut postgres::Client) -> Vec<(String, String, String, String)> {
    let q = |a: &str| format!("quote_ident({a}n.nspname) || '.' || quote_ident({a}.typname)");
    let sql = format!(
        "SELECT o.oprname::text, {}, {}, {}
         FROM pg_operator o
         JOIN pg_type l ON l.oid = o.oprleft JOIN pg_namespace ln ON ln.oid = l.typnamespace
         JOIN pg_type r ON r.oid = o.oprright JOIN pg_namespace rn ON rn.oid = r.typnamespace
         JOIN pg_type s ON s.oid = o.oprresult JOIN pg_namespace sn ON sn.oid = s.typnamespace
         WHERE o.oprnamespace = 'pg_catalog'::regnamespace AND o.oprkind = 'b'
           AND o.oprname = ANY($1) AND l.typname::text = ANY($2) AND r.typname::text = ANY($2)
         ORDER BY 1, 2, 3",
        q("l"),
        q("r"),
        q("s")
    );
    let ops: Vec<&str> = OPERATORS.to_vec();
    let types: Vec<&str> = OPERATOR_TYPES.to_vec();
    pg.query(&sql, &[&ops, &types])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

fn inventory(pg: &mut postgres::Client) -> Inventory {
    let rows = pg
        .query(
            "SELECT p.oid::regprocedure::text,
                    quote_ident(n.nspname) || '.' || quote_ident(p.proname),
                    p.prokind::text, p.prorettype::regtype::text, p.pronargdefaults::int4,
                    coalesce(p.proargnames, '{}')::text[], coalesce(p.proargmodes::text[], '{}'),
                    (SELECT coalesce(jsonb_agg(jsonb_build_object(
                         'typname', t.typname, 'typtype', t.typtype,
                         'qualified', CASE WHEN e.oid IS NOT NULL
                             THEN quote_ident(en.nspname) || '.' || quote_ident(e.typname) || '[]'
                             ELSE quote_ident(tn.nspname) || '.' || quote_ident(t.typname) END,
                         'elem', e.typname,
                         'enum_last', (SELECT x.enumlabel FROM pg_enum x WHERE x.enumtypid = t.oid
                                       ORDER BY x.enumsortorder DESC LIMIT 1))
                         ORDER BY u.i), '[]')
                     FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS u(oid, i)
                     JOIN pg_type t ON t.oid = u.oid JOIN pg_namespace tn ON tn.oid = t.typnamespace
                     LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A'
                     LEFT JOIN pg_namespace en ON en.oid = e.typnamespace),
                    p.prosecdef
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'pgseal'
                OR (p.prosecdef AND n.nspname NOT IN ('pg_catalog', 'information_schema'))
             ORDER BY 1",
            &[],
        )
        .unwrap();
    let mut funcs = Vec::new();
    for r in rows {
        let names: Vec<String> = r.get(5);
        let modes: Vec<String> = r.get(6);
        let types: serde_json::Value = r.get(7);
        let in_names: Vec<String> = if modes.is_empty() {
            names.clone()
        } else {
            names
                .iter()
                .zip(modes.iter())
                .filter(|(_, m)| matches!(m.as_str(), "i" | "b" | "v"))
                .map(|(n, _)| n.clone())
                .collect()
        };
        let args = types
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let s = |k: &str| t.get(k).and_then(|v| v.as_str()).map(str::to_owned);
                (
                    in_names.get(i).cloned().unwrap_or_default(),
                    ArgType {
                        typname: s("typname").unwrap(),
                        typtype: s("typtype").unwrap(),
                        qualified: s("qualified").unwrap(),
                        elem: s("elem"),
                        enum_last: s("enum_last"),
                    },
                )
            })
            .collect();
        funcs.push(Func {
            label: r.get(0),
            call: r.get(1),
            kind: r.get(2),
            ret: r.get(3),
            ndefaults: r.get::<_, i32>(4) as usize,
            secdef: r.get(8),
            args,
        });
    }

    let views = pg
        .query(
            "SELECT c.oid::regclass::text FROM pg_class c
             WHERE c.relnamespace = 'pgseal'::regnamespace AND c.relkind IN ('v', 'm') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    // Tables that pgseal's (or any SECURITY DEFINER) trigger functions fire on.
    let trig = pg
        .query(
            "SELECT DISTINCT tg.tgrelid::regclass::text, p.oid::regprocedure::text
             FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
             JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE NOT tg.tgisinternal
               AND (n.nspname = 'pgseal' OR (p.prosecdef AND n.nspname NOT IN ('pg_catalog', 'information_schema')))",
            &[],
        )
        .unwrap();
    let fired: BTreeSet<String> = trig.iter().map(|r| r.get(1)).collect();
    let trigger_funcs_unfired: Vec<String> = funcs
        .iter()
        .filter(|f| f.ret == "trigger" && !fired.contains(&f.label))
        .map(|f| f.label.clone())
        .collect();
    let rels: BTreeSet<String> = trig
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|r| r != AUDITED && r != "audited")
        .collect();
    let mut trigger_tables = Vec::new();
    for rel in rels {
        let cols = pg
            .query(
                "SELECT quote_ident(a.attname::text), a.attname::text, t.typname::text, t.typtype::text,
                        quote_ident(tn.nspname) || '.' || quote_ident(t.typname),
                        a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = '',
                        a.attidentity = '' AND a.attgenerated = ''
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                 JOIN pg_namespace tn ON tn.oid = t.typnamespace
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                 ORDER BY a.attnum",
                &[&rel],
            )
            .unwrap();
        let mut names = Vec::new();
        let mut vals = Vec::new();
        let mut first_plain = None;
        for c in &cols {
            let name: String = c.get(1);
            if first_plain.is_none() && c.get::<_, bool>(6) {
                first_plain = Some(c.get::<_, String>(0));
            }
            if !c.get::<_, bool>(5) {
                continue;
            }
            let t = ArgType {
                typname: c.get(2),
                typtype: c.get(3),
                qualified: c.get(4),
                elem: None,
                enum_last: None,
            };
            names.push(c.get::<_, String>(0));
            vals.push(if name == "status" {
                "'ok'".into()
            } else {
                sample(&name, &t, "", AUDITED)
            });
        }
        let insert = if names.is_empty() {
            format!("INSERT INTO {rel} DEFAULT VALUES")
        } else {
            format!(
                "INSERT INTO {rel} ({}) VALUES ({})",
                names.join(", "),
                vals.join(", ")
            )
        };
        let update = first_plain.map(|c| format!("UPDATE {rel} SET {c} = {c}"));
        trigger_tables.push(TriggerTable {
            rel,
            insert,
            update,
        });
    }

    let event_triggers = pg
        .query(
            "SELECT e.evtname::text FROM pg_event_trigger e WHERE e.evtenabled <> 'D' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    let domain_bases = pg
        .query(
            "SELECT DISTINCT ON (t.typname) quote_ident(t.typname),
                    quote_ident(n.nspname) || '.' || quote_ident(t.typname)
             FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
             WHERE n.nspname IN ('pg_catalog', 'pgseal') AND t.typtype IN ('b', 'e', 'r', 'm')
               AND NOT (t.typcategory = 'A' AND t.typelem <> 0)
             ORDER BY t.typname, n.nspname = 'pgseal'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    // Temp views named like every relation of pg_catalog and pgseal: the real rows
    // where every role may read them, else typed NULLs.
    let shadows = pg
        .query(
            "SELECT c.relname::text,
                    format('CREATE TEMP VIEW %I AS %s WHERE (SELECT __PWN__(%L))', c.relname,
                    CASE WHEN n.nspname = 'pg_catalog' AND has_table_privilege('atk_nobody', c.oid, 'SELECT')
                              AND NOT EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND t.typtype = 'p')
                         THEN format('SELECT * FROM %I.%I', n.nspname, c.relname)
                         ELSE 'SELECT ' || (SELECT string_agg(format('NULL::%s AS %I',
                                  CASE WHEN t.typtype = 'p' THEN 'pg_catalog.text'
                                       ELSE format_type(a.atttypid, a.atttypmod) END, a.attname), ', ' ORDER BY a.attnum)
                              FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
                    END, 'relation ' || c.relname)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname IN ('pg_catalog', 'pgseal') AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
             ORDER BY n.nspname = 'pgseal', c.relname",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    let leader_fn = pg
        .query_one(
            "SELECT to_regproc('pgseal._leader_try_lock') IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);

    Inventory {
        funcs,
        views,
        trigger_tables,
        trigger_funcs_unfired,
        event_triggers,
        domain_bases,
        shadows,
        operators: operator_list(pg),
        leader_fn,
    }
}

/// An outsider holds every lock key pgseal used to compute; pgseal's work must not wait.
fn lock_probes(
    c: &Cluster,
    pg: &mut postgres::Client,
    inv: &Inventory,
    attackers: &[Attacker],
    f: &mut Findings,
) {
    let (envelope, failed) = refresh(pg);
    for e in failed {
        f.failures
            .insert(format!("coverage: fixture statement failed: {e}"));
    }
    let tenants = [TENANT, "fresh-ledger", "fresh-seal"];
    let mut keys: Vec<(String, String)> = Vec::new();
    for t in tenants {
        keys.push((
            format!("sha256 ledger lock of {t}"),
            ledger_lock_key(t).to_string(),
        ));
        for purpose in ["dek", "ledger"] {
            keys.push((
                format!("key-creation lock {purpose}:{t}"),
                format!("pg_catalog.hashtextextended('pgseal.key:{purpose}:{t}', 0)"),
            ));
        }
    }
    keys.push(("pgseald leader lock".into(), LEADER_KEY.to_string()));
    let mut outsider = Session::open(c, "atk_nobody");
    let mut held = 0;
    for (label, expr) in &keys {
        match outsider
            .client
            .batch_execute(&format!("SELECT pg_catalog.pg_advisory_lock({expr})"))
        {
            Ok(()) => held += 1,
            Err(e) => f
                .notes
                .push(format!("locks: the outsider could not take {label}: {e}")),
        }
    }
    let mut calls = keys.len();
    if inv.leader_fn {
        calls += 1;
        if let Ok(row) = outsider
            .client
            .query_one("SELECT pgseal._leader_try_lock()", &[])
        {
            if row.get::<_, Option<bool>>(0) == Some(true) {
                f.failures.insert(
                    "probe=locks role=atk_nobody target=pgseal._leader_try_lock() an outsider took pgseald's leader lock"
                        .into(),
                );
            }
        }
    }

    let probes: [(&str, &str, String); 5] = [
        (
            "pgseal_ledger",
            "ledger_append for an existing tenant",
            format!("SET LOCAL app.tenant_id = '{TENANT}'; SELECT * FROM pgseal.ledger_append('lock.probe', '{{}}')"),
        ),
        (
            "pgseal_ledger",
            "ledger_append for a new tenant (ledger key creation)",
            "SET LOCAL app.tenant_id = 'fresh-ledger'; SELECT * FROM pgseal.ledger_append('lock.probe', '{}')".into(),
        ),
        (
            "pgseal_seal",
            "vault_seal for a new tenant (data key creation)",
            format!("SET LOCAL app.tenant_id = 'fresh-seal'; SELECT pgseal.vault_seal('pw', '{CONTEXT}')"),
        ),
        (
            "pgseal_decrypt",
            "vault_decrypt and its commit-time audit entry",
            format!(
                "SET LOCAL app.tenant_id = '{TENANT}'; SELECT pgseal.vault_decrypt('{envelope}', '{CONTEXT}')"
            ),
        ),
        ("pgseal_admin", "pgseald leader election", String::new()),
    ];
    for (role, label, sql) in probes {
        let login = format!("atk_{role}");
        if !attackers.iter().any(|a| a.login == login) {
            f.notes
                .push(format!("locks: no role {role}; probe {label} not run"));
            continue;
        }
        let mut s = Session::open(c, &login);
        calls += 1;
        s.client.batch_execute("SET lock_timeout = '2s'").unwrap();
        let started = Instant::now();
        let r: Result<(), String> = if sql.is_empty() {
            let q = if inv.leader_fn {
                "SELECT pgseal._leader_try_lock()".to_owned()
            } else {
                // pgseald before issue 13: a session advisory lock on LEADER_KEY.
                format!("SELECT pg_catalog.pg_try_advisory_lock({LEADER_KEY})")
            };
            match s.client.query_one(&q, &[]) {
                Ok(row) if row.get::<_, Option<bool>>(0) == Some(true) => Ok(()),
                Ok(_) => Err(format!(
                    "`{q}` returned false: an outsider holds the leadership"
                )),
                Err(e) => Err(describe(&e)),
            }
        } else {
            s.client
                .batch_execute(&format!("BEGIN; {sql}; COMMIT"))
                .map_err(|e| describe(&e))
        };
        let took = started.elapsed();
        match r {
            Ok(()) if took < Duration::from_secs(5) => {}
            Ok(()) => {
                f.failures.insert(format!(
                    "probe=locks role={login} target={label} delayed {:.1}s by the outsider's locks",
                    took.as_secs_f64()
                ));
            }
            Err(e) => {
                f.failures.insert(format!(
                    "probe=locks role={login} target={label} blocked by the outsider's locks after {:.1}s: {e}",
                    took.as_secs_f64()
                ));
            }
        }
    }
    f.calls.insert("locks".into(), (calls, held));
    drop(outsider);
}

#[test]
fn attack_tier() {
    let started = Instant::now();
    let c = Cluster::start("attack-tier", &[KEY_V1], &["log_min_messages = warning"]);
    let mut pg = c.connect();
    let (attackers, writer_schema) = setup(&c, &mut pg);
    let inv = inventory(&mut pg);
    let log_start = c.server_log().len();
    println!(
        "attack tier: {} functions ({} callable, {} trigger functions, {} unfired), {} views, \
         {} trigger tables, {} event triggers, {} domain bases, {} shadowed relations, {} operators, \
         roles: {}",
        inv.funcs.len(),
        inv.funcs.iter().filter(|f| callable(f)).count(),
        inv.funcs.iter().filter(|f| f.is_trigger()).count(),
        inv.trigger_funcs_unfired.len(),
        inv.views.len(),
        inv.trigger_tables.len(),
        inv.event_triggers.len(),
        inv.domain_bases.len(),
        inv.shadows.len(),
        inv.operators.len(),
        attackers.iter().map(|a| a.login.as_str()).collect::<Vec<_>>().join(", ")
    );
    let mut f = Findings::default();
    for func in inv.funcs.iter().filter(|x| !callable(x) && !x.is_trigger()) {
        f.notes.push(format!(
            "not called (kind {} or pseudo-type argument): {}",
            func.kind, func.label
        ));
    }
    for t in &inv.trigger_funcs_unfired {
        f.notes
            .push(format!("trigger function with no trigger to fire: {t}"));
    }

    // PGSEAL_ATTACK_VERBOSE=1 prints every call's outcome.
    let verbose = std::env::var_os("PGSEAL_ATTACK_VERBOSE").is_some();
    let mut outcomes: BTreeMap<(String, String), Option<String>> = BTreeMap::new();
    let mut next_id = 1000;
    for family in FAMILIES {
        let fam_started = Instant::now();
        let (mut calls, mut errors, mut planted) = (0, 0, 0);
        for a in &attackers {
            if pg.is_closed() {
                pg = c.connect();
            }
            let (envelope, failed) = refresh(&mut pg);
            for e in failed {
                f.failures
                    .insert(format!("coverage: fixture statement failed: {e}"));
            }
            let mut s = Session::open(&c, &a.login);
            planted = plant(&mut s, family, a, &inv);
            for who in s.escalated() {
                f.escalate(family, &a.login, "planting (DDL as the attacker)", &who);
            }
            for t in targets(family, &inv, a, &writer_schema, &envelope, &mut next_id) {
                calls += 1;
                let r = s.exec(&t.sql);
                if verbose {
                    let outcome = match &r {
                        Ok(()) => "ok".to_owned(),
                        Err(e) => describe(e),
                    };
                    println!("  {family} {} {}: {outcome}", a.login, t.label);
                }
                if r.is_err() {
                    errors += 1;
                }
                if family == COVERAGE_FAMILY {
                    outcomes.insert(
                        (a.login.clone(), t.label.clone()),
                        r.as_ref().err().map(describe),
                    );
                }
                for who in s.escalated() {
                    f.escalate(family, &a.login, &t.label, &who);
                }
                if s.client.is_closed() {
                    f.failures.insert(format!(
                        "probe={family} role={} target={} lost its connection (server crash?)",
                        a.login, t.label
                    ));
                    std::thread::sleep(Duration::from_secs(3));
                    s = Session::open(&c, &a.login);
                    plant(&mut s, family, a, &inv);
                    s.escalated();
                }
            }
            drop(s);
            // PL/pgSQL compiles a function once per session, resolving its types and
            // relations then. The event triggers run (and compile) at the first DDL of
            // a session, so the main session above, whose first DDL planted only the
            // first object, cannot reach them: here each object is its session's first DDL.
            for (label, sql) in plant_statements(family, a, &inv) {
                next_id += 1;
                let Some(ddl) = ddl_target(&inv, a, next_id) else {
                    break;
                };
                let mut s = Session::open(&c, &a.login);
                calls += 2;
                if s.client.batch_execute(&sql).is_err() {
                    errors += 1;
                }
                for who in s.escalated() {
                    f.escalate(
                        family,
                        &a.login,
                        &format!("{label} as the session's first DDL"),
                        &who,
                    );
                }
                if s.exec(&ddl.sql).is_err() {
                    errors += 1;
                }
                for who in s.escalated() {
                    f.escalate(
                        family,
                        &a.login,
                        &format!("{} after {label} as the session's first DDL", ddl.label),
                        &who,
                    );
                }
            }
        }
        println!(
            "probe family {family}: {calls} calls ({errors} refused or failed), {planted} hijack objects per session, {:.1}s",
            fam_started.elapsed().as_secs_f64()
        );
        f.calls.insert(family.into(), (calls, errors));
    }

    // Coverage: in the family that plants nothing in the session, the calls the issue's
    // probes name must work for their roles, or the hijacks above never reached them.
    for (login, prefix) in COVERAGE {
        if !attackers.iter().any(|a| a.login == *login) {
            continue;
        }
        let tried: Vec<&Option<String>> = outcomes
            .iter()
            .filter(|((l, label), _)| l == login && label.starts_with(prefix))
            .map(|(_, o)| o)
            .collect();
        if !tried.iter().any(|o| o.is_none()) {
            let why = tried
                .iter()
                .filter_map(|o| o.as_deref())
                .next()
                .unwrap_or("no such target");
            f.failures.insert(format!(
                "coverage: {login} could not run `{prefix}…` ({why}), so no probe reached it"
            ));
        }
    }

    if pg.is_closed() {
        pg = c.connect();
    }
    let lock_started = Instant::now();
    lock_probes(&c, &mut pg, &inv, &attackers, &mut f);
    let (lc, held) = f.calls["locks"];
    println!(
        "probe family locks: {lc} calls, outsider held {held} lock keys, {:.1}s",
        lock_started.elapsed().as_secs_f64()
    );

    // Backstops: pwn's WARNINGs also reach the server log, whatever a function does
    // to client_min_messages; and a backend must never crash.
    let log = c.server_log();
    let tail = &log[log_start.min(log.len())..];
    let seen: BTreeSet<String> = f
        .failures
        .iter()
        .filter_map(|e| e.rsplit_once(" ran as ").map(|(_, w)| w.to_owned()))
        .collect();
    for line in tail.lines() {
        if let Some((_, who)) = line.split_once("pwn ran as ") {
            let who = who.trim();
            if !who.starts_with("atk_") && !seen.contains(who) {
                f.failures.insert(format!(
                    "probe=server-log role=? target=? ran as {who}: {line}"
                ));
            }
        }
    }
    if log.contains("terminated by signal") {
        f.failures.insert(format!(
            "probe=crash: the server log reports a backend terminated by signal ({})",
            c.dir.join("server.log").display()
        ));
    }

    for n in &f.notes {
        println!("note: {n}");
    }
    println!(
        "attack tier finished in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        f.failures.is_empty(),
        "{} failure(s):\n{}",
        f.failures.len(),
        f.failures.iter().cloned().collect::<Vec<_>>().join("\n")
    );
}
