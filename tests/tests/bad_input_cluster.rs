//! The generated bad-input matrix (issue 20): whatever a caller passes, every pgseal
//! function either does its job or refuses with an error the README documents,
//! echoes no input, and leaves the backend alive.
//!
//! Every function of schema `pgseal` is enumerated from `pg_proc` (trigger
//! functions, non-`f` kinds and pseudo-type arguments are skipped, and printed), so a
//! function added later is covered without editing this file. For each argument in
//! turn, with valid values for the others (a real tenant, a real sealed value, a real
//! table, ...), it is called with: NULL, `''`, whitespace, printable garbage, a 1 MiB
//! string, the documented maximum length + 1 (tenant 256 bytes, context, event,
//! actor and user id 1024, plaintext 16 MiB), extreme numbers, deep and huge JSON, and values of
//! another type or kind cast explicitly to the parameter's type. Each call runs under
//! the right tenant context, none, another tenant's, and (valid arguments only) an
//! over-long one, and with a 4 KiB `app.user_id` (the default actor); as `bi_all` (holding every `pgseal_*` role) and as `bi_none`
//! (holding none); each in its own transaction that is rolled back, so destructive
//! functions (tenant_shred, kek_rewrap, ledger_prune, ...) run against the fixture
//! without breaking later calls. One short sealed value is also tampered with at
//! every position and fed to every function taking a `sealed` argument.
//!
//! Assertions per call:
//! 1. the SQLSTATE is success or one the function's README row lists (codes of a row
//!    it refers to with "as X" included), plus the only codes any call may raise:
//!    42501 (PostgreSQL's own EXECUTE / object privilege checks) and 57014 (the 5 s
//!    `statement_timeout` this test sets). 22P02/22023/42P01 from PostgreSQL's input
//!    functions are not in that set: every literal is first cast on its own, and one
//!    PostgreSQL refuses before pgseal runs is not called (it is counted and printed).
//!    42883 cannot happen: every argument is cast explicitly to its declared type.
//!    A role without EXECUTE must get exactly 42501 (or NULL, when PostgreSQL
//!    folds a STRICT call with a NULL argument at plan time, before that check);
//! 2. the message, detail and hint contain no input value of 8 characters or more
//!    (nor the first 16 characters of one of 32 or more);
//! 3. the connection still works afterwards; at the end the server log has no
//!    "terminated by signal" and no PANIC.
//!
//! Plus: an over-long input gets 54000 naming the argument (or 42501), a tampered
//! envelope never succeeds, and the README's "who" column agrees with the grants.
//! All violations are collected and reported in one table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use pgseal_tests::{Cluster, KEY_V1};
use postgres::types::ToSql;

const TENANT: &str = "acme";
const OTHER_TENANT: &str = "globex";
const CONTEXT: &str = "bi.ctx";
const TABLE: &str = "bi_docs";
const USER_ID: &str = "user-7";
const PLAINTEXT: &str = "pw";
const MIB: usize = 1 << 20;

/// Documented maximum lengths in bytes, by argument name.
const LIMITS: [(&str, usize); 6] = [
    ("tenant", 256),
    ("context", 1024),
    ("event", 1024),
    ("actor", 1024),
    ("plaintext", 16 * MIB),
    ("user_id", 1024),
];

/// Argument types that name schema objects: an echo of one is allowed, since they
/// are not secrets and PostgreSQL's own messages name objects too.
const IDENTIFIER_TYPES: [&str; 3] = ["regclass", "name", "oid"];

/// SQLSTATEs any call may raise, whatever its README row says (see the module doc).
const ANY_CALL: [&str; 2] = ["42501", "57014"];

const SETUP: &str = "
    CREATE EXTENSION pgseal;
    CREATE ROLE bi_all LOGIN;
    CREATE ROLE bi_none LOGIN;
    CREATE TABLE bi_docs (id int PRIMARY KEY, tenant_id text NOT NULL, owner_id text,
        org_id text, token text, payload jsonb, created_at timestamptz DEFAULT now());
    ALTER TABLE bi_docs OWNER TO bi_all;";

#[derive(Clone, Debug)]
struct Arg {
    name: String,
    typname: String,
    /// Schema-qualified spelling, `pg_catalog.text[]` for arrays.
    qualified: String,
    elem: Option<String>,
    enum_first: Option<String>,
}

#[derive(Clone, Debug)]
struct Func {
    name: String,
    identity: String,
    oid: u32,
    args: Vec<Arg>,
    ndefaults: usize,
    strict: bool,
}

/// One argument's value: a text parameter cast to the argument's type, or an SQL
/// expression of another type cast to it.
#[derive(Clone, Debug)]
enum Value {
    Param(Option<String>),
    Expr(String),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ctx {
    Right,
    NoTenant,
    Other,
    /// A 257-byte tenant setting (one byte over the tenant id limit).
    Overlong,
    /// The right tenant, with a 4 KiB `app.user_id` (the default actor).
    LongUser,
}

impl Ctx {
    fn tenant(self) -> Option<String> {
        match self {
            Ctx::Right | Ctx::LongUser => Some(TENANT.into()),
            Ctx::NoTenant => None,
            Ctx::Other => Some(OTHER_TENANT.into()),
            Ctx::Overlong => Some(sized("BI-TENANT-CTX-", 257)),
        }
    }

    fn user(self) -> String {
        match self {
            Ctx::LongUser => sized("BI-USER-CTX-", 4096),
            _ => USER_ID.into(),
        }
    }
}

struct Session {
    role: String,
    client: postgres::Client,
}

struct Outcome {
    state: String,
    text: String,
    crashed: bool,
}

#[derive(Clone, Debug)]
struct Violation {
    func: String,
    arg: String,
    kind: String,
    role: String,
    ctx: String,
    state: String,
    message: String,
    problem: String,
}

/// What the README says about a function.
#[derive(Clone, Debug, Default)]
struct Doc {
    codes: BTreeSet<String>,
    who: String,
}

/// One call of the matrix, before it runs.
struct Call<'a> {
    func: &'a Func,
    arg: String,
    kind: String,
    /// Values for the first `values.len()` arguments (the rest take their defaults).
    values: Vec<Value>,
    /// Text of the argument under test, for the over-length rule.
    tested: Option<String>,
    tampered: bool,
}

#[derive(Default)]
struct Report {
    violations: Vec<Violation>,
    calls: usize,
    refused_by_cast: BTreeMap<String, usize>,
    baseline: BTreeMap<String, String>,
    overlong_ctx_ok: BTreeSet<String>,
    /// Every outcome as bi_all under the right tenant (printed with BI_VERBOSE=1).
    outcomes: Vec<String>,
}

// ---------------------------------------------------------------- values

/// A string of exactly `len` bytes starting with `prefix`.
fn sized(prefix: &str, len: usize) -> String {
    let mut s = String::with_capacity(len);
    s.push_str(prefix);
    let pattern = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut i = 0;
    while s.len() < len {
        s.push(pattern[i % pattern.len()] as char);
        i += 1;
    }
    s.truncate(len);
    s
}

fn limit_of(arg: &str) -> Option<usize> {
    LIMITS.iter().find(|(n, _)| *n == arg).map(|(_, l)| *l)
}

/// A valid value for an argument, from its name and type.
fn valid(a: &Arg, sealed: &str, table_oid: u32) -> Value {
    let n = a.name.to_ascii_lowercase();
    let v: Option<String> = match a.typname.as_str() {
        "text" | "varchar" => Some(
            if n.contains("sealed") {
                sealed
            } else if n == "plaintext" {
                "bi-plaintext-1"
            } else if n.contains("context") {
                CONTEXT
            } else if n.contains("tenant") {
                TENANT
            } else if n.contains("event") {
                "app.bi_event"
            } else if n.contains("actor") {
                "bi-actor"
            } else if n.contains("user") {
                USER_ID
            } else if n.contains("org") {
                "org1"
            } else if n == "which" {
                "tenant"
            } else {
                "x"
            }
            .to_owned(),
        ),
        "jsonb" | "json" => Some(r#"{"k": 1}"#.into()),
        "int2" | "int4" | "int8" | "numeric" => Some(
            if n.contains("visible") {
                "4"
            } else if n.contains("batch") {
                "10"
            } else if n.starts_with("to") {
                "100"
            } else {
                "1"
            }
            .into(),
        ),
        "regclass" => Some(TABLE.into()),
        "oid" => Some(table_oid.to_string()),
        "name" => Some(
            if n == "col" || n.contains("token") {
                "token"
            } else if n.contains("owner") {
                "owner_id"
            } else if n.contains("org") {
                "org_id"
            } else if n.contains("time") {
                "created_at"
            } else {
                "tenant_id"
            }
            .into(),
        ),
        "bool" => Some("true".into()),
        "interval" => Some("1 day".into()),
        _ if a.elem.is_some() => Some(
            if n.contains("event") {
                "{INSERT,UPDATE,DELETE}"
            } else {
                "{x}"
            }
            .into(),
        ),
        _ => a.enum_first.clone(),
    };
    Value::Param(v)
}

/// The bad inputs for one argument: (kind, value).
fn bad_inputs(a: &Arg) -> Vec<(String, Value)> {
    let p = |s: &str| Value::Param(Some(s.to_owned()));
    let mut v = vec![
        ("null".to_owned(), Value::Param(None)),
        ("empty".to_owned(), p("")),
        ("whitespace".to_owned(), p("   ")),
        (
            "garbage".to_owned(),
            p("%s%n\\x01'\";--\u{1}\u{7f}ÿ<BI-GARBAGE>"),
        ),
        (
            "1MiB".to_owned(),
            Value::Param(Some(sized("BI-MEGA-", MIB))),
        ),
    ];
    if let Some(l) = limit_of(&a.name) {
        v.push((
            format!("max+1 ({} bytes)", l + 1),
            Value::Param(Some(sized("BI-OVER-", l + 1))),
        ));
    }
    let extremes: &[&str] = match a.typname.as_str() {
        "int2" => &["0", "-1", "32767", "-32768"],
        "int4" => &["0", "-1", "2147483647", "-2147483648"],
        "int8" => &["0", "-1", "9223372036854775807", "-9223372036854775808"],
        "oid" => &["0", "4294967295"],
        "interval" => &["-100 years", "0", "178000000 years"],
        "jsonb" | "json" => &["null", "[]", "\"s\"", "{\"n\": 1e400}", "{\"n\": 0.1e-400}"],
        _ => &[],
    };
    for e in extremes {
        v.push((format!("extreme {e}"), p(e)));
    }
    if matches!(a.typname.as_str(), "jsonb" | "json") {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        v.push(("json nested 200 deep".into(), p(&deep)));
        let wide = format!("{{\"k\": \"{}\"}}", sized("BI-JSON-", MIB));
        v.push(("json 1MiB string".into(), p(&wide)));
    }
    for (kind, expr) in wrong_types(a) {
        v.push((kind, Value::Expr(expr)));
    }
    v
}

/// Values of another type (or kind of object), cast explicitly to the argument's.
fn wrong_types(a: &Arg) -> Vec<(String, String)> {
    let e = |k: &str, x: &str| (format!("wrong type: {k}"), x.to_owned());
    match a.typname.as_str() {
        "text" | "varchar" => vec![
            e("int8", "(-9223372036854775808)::int8"),
            e("jsonb", "'{\"tenant\": \"acme\"}'::jsonb"),
            e("bytea", "'\\x00ff00ff00ff00ff'::bytea"),
        ],
        "int2" | "int4" | "int8" => vec![
            e("numeric 2.5", "2.5::numeric"),
            e("float8 1e18", "1e18::float8"),
        ],
        "regclass" => vec![
            e("dangling oid", "2147483647::oid"),
            e("catalog table", "'pg_catalog.pg_class'::regclass"),
            e("pgseal's ledger", "'pgseal.ledger'::regclass"),
            e("a view", "'pg_catalog.pg_roles'::regclass"),
        ],
        "oid" => vec![
            e("int4 -1", "(-1)::int4"),
            e("catalog oid", "'pg_catalog.pg_class'::regclass::oid"),
        ],
        "bool" => vec![e("int4 0", "0::int4")],
        "jsonb" | "json" => vec![e(
            "json with duplicate keys",
            "'{\"a\": 1, \"a\": 2}'::json",
        )],
        _ if a.elem.is_some() => vec![
            e("int4[]", "ARRAY[1, 2]::int4[]"),
            e("empty array", "'{}'::text[]"),
            e("array with NULL", "'{NULL}'::text[]"),
            e("2-D array", "'{{INSERT},{DELETE}}'::text[]"),
        ],
        _ => vec![],
    }
}

// ---------------------------------------------------------------- base64url

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64url_decode(s: &str) -> Vec<u8> {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes() {
        let v = B64.iter().position(|&b| b == c).expect("base64url") as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

fn b64url_encode(b: &[u8]) -> String {
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let mut buf = [0u8; 3];
        buf[..chunk.len()].copy_from_slice(chunk);
        let v = (u32::from(buf[0]) << 16) | (u32::from(buf[1]) << 8) | u32::from(buf[2]);
        for i in 0..=chunk.len() {
            out.push(B64[((v >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Every one-position tampering of an envelope: each character of the text flipped
/// (XOR 1), and each byte of the decoded nonce ‖ ciphertext ‖ tag flipped.
fn tamperings(sealed: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let bytes = sealed.as_bytes();
    for i in 0..bytes.len() {
        let mut t = bytes.to_vec();
        t[i] ^= 1;
        out.push((format!("tampered char {i}"), String::from_utf8(t).unwrap()));
    }
    let (head, body) = sealed.rsplit_once(':').unwrap();
    let raw = b64url_decode(body);
    for i in 0..raw.len() {
        let mut t = raw.clone();
        t[i] ^= 1;
        out.push((
            format!("tampered byte {i}"),
            format!("{head}:{}", b64url_encode(&t)),
        ));
    }
    out
}

// ---------------------------------------------------------------- catalog

fn functions(pg: &mut postgres::Client) -> (Vec<Func>, Vec<String>) {
    let rows = pg
        .query(
            "SELECT p.proname::text, pg_get_function_identity_arguments(p.oid), p.oid,
                    p.prokind::text, p.prorettype::regtype::text, p.pronargdefaults::int4, p.proisstrict,
                    coalesce(p.proargnames, '{}')::text[], coalesce(p.proargmodes::text[], '{}'),
                    (SELECT coalesce(jsonb_agg(jsonb_build_object(
                         'typname', t.typname, 'typtype', t.typtype,
                         'qualified', format_type(t.oid, NULL), 'elem', e.typname,
                         'enum_first', (SELECT x.enumlabel FROM pg_enum x WHERE x.enumtypid = t.oid
                                        ORDER BY x.enumsortorder LIMIT 1)) ORDER BY u.i), '[]')
                     FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS u(oid, i)
                     JOIN pg_type t ON t.oid = u.oid
                     LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A')
             FROM pg_proc p WHERE p.pronamespace = 'pgseal'::regnamespace ORDER BY 1, 2",
            &[],
        )
        .unwrap();
    let mut funcs = Vec::new();
    let mut skipped = Vec::new();
    for r in rows {
        let (name, identity, kind, ret): (String, String, String, String) =
            (r.get(0), r.get(1), r.get(3), r.get(4));
        let label = format!("{name}({identity})");
        let types: serde_json::Value = r.get(9);
        let types = types.as_array().unwrap();
        if kind != "f" {
            skipped.push(format!("{label}: prokind '{kind}', not a plain function"));
            continue;
        }
        if ret == "trigger" || ret == "event_trigger" {
            skipped.push(format!("{label}: {ret} function, not callable from SQL"));
            continue;
        }
        if types.iter().any(|t| t["typtype"] == "p") {
            skipped.push(format!("{label}: pseudo-type argument"));
            continue;
        }
        let names: Vec<String> = r.get(7);
        let modes: Vec<String> = r.get(8);
        let in_names: Vec<String> = if modes.is_empty() {
            names
        } else {
            names
                .into_iter()
                .zip(modes)
                .filter(|(_, m)| matches!(m.as_str(), "i" | "b" | "v"))
                .map(|(n, _)| n)
                .collect()
        };
        let args = types
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let s = |k: &str| t[k].as_str().map(str::to_owned);
                Arg {
                    name: in_names
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| format!("${}", i + 1)),
                    typname: s("typname").unwrap(),
                    qualified: s("qualified").unwrap(),
                    elem: s("elem"),
                    enum_first: s("enum_first"),
                }
            })
            .collect();
        funcs.push(Func {
            name,
            identity,
            oid: r.get(2),
            args,
            ndefaults: r.get::<_, i32>(5) as usize,
            strict: r.get(6),
        });
    }
    (funcs, skipped)
}

fn can_execute(pg: &mut postgres::Client, role: &str, f: &Func) -> bool {
    pg.query_one(
        "SELECT has_function_privilege($1, $2::oid, 'EXECUTE')",
        &[&role, &f.oid],
    )
    .unwrap()
    .get(0)
}

// ---------------------------------------------------------------- README

/// SQLSTATE-like tokens: 5 characters of [0-9A-Z] with at least one digit.
fn sqlstates_in(s: &str) -> BTreeSet<String> {
    s.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| {
            w.len() == 5
                && w.chars()
                    .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
        })
        .filter(|w| w.chars().any(|c| c.is_ascii_digit()))
        .map(str::to_owned)
        .collect()
}

/// Function names a first cell names: `name(` inside backticks.
fn names_in_cell(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|t| t.split_once('('))
        .map(|(n, _)| n.trim_start_matches("pgseal.").to_owned())
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .collect()
}

/// The README's function rows: codes and "who", with "as X" references resolved.
fn readme_docs() -> BTreeMap<String, Doc> {
    let readme = std::fs::read_to_string(pgseal_tests::repo_root().join("README.md")).unwrap();
    let mut raw: BTreeMap<String, (String, String)> = BTreeMap::new();
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let rest = cells[1..].join(" | ");
        for n in names_in_cell(cells[0]) {
            raw.insert(
                n,
                (cells.get(1).copied().unwrap_or("").to_owned(), rest.clone()),
            );
        }
    }
    let refers_to = |text: &str| -> Vec<String> {
        let words: Vec<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .collect();
        words
            .windows(2)
            .filter(|w| w[0] == "as")
            .filter_map(|w| {
                raw.keys()
                    .find(|k| *k == w[1] || k.ends_with(&format!("_{}", w[1])))
                    .cloned()
            })
            .collect()
    };
    let mut docs = BTreeMap::new();
    for (name, (who, rest)) in &raw {
        let mut codes = sqlstates_in(rest);
        let mut who = who.clone();
        let mut seen = BTreeSet::from([name.clone()]);
        let mut todo = refers_to(rest);
        while let Some(r) = todo.pop() {
            if !seen.insert(r.clone()) {
                continue;
            }
            let (rwho, rrest) = &raw[&r];
            codes.extend(sqlstates_in(rrest));
            if who.starts_with("as ") {
                who = rwho.clone();
            }
            todo.extend(refers_to(rrest));
        }
        docs.insert(name.clone(), Doc { codes, who });
    }
    docs
}

// ---------------------------------------------------------------- running

fn connect(port: u16, role: &str) -> postgres::Client {
    let mut cfg = postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(role)
        .dbname("postgres")
        .options("-c statement_timeout=5s");
    cfg.connect(postgres::NoTls)
        .unwrap_or_else(|e| panic!("connect as {role}: {e}"))
}

fn error_text(e: &postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(d) => (
            d.code().code().to_owned(),
            [Some(d.message()), d.detail(), d.hint()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" | "),
        ),
        None => ("no sqlstate".to_owned(), e.to_string()),
    }
}

/// The SQL calling `f` with `values`, and its text parameters.
fn call_sql(f: &Func, values: &[Value]) -> (String, Vec<Option<String>>) {
    let mut params = Vec::new();
    let args: Vec<String> = f
        .args
        .iter()
        .zip(values)
        .map(|(a, v)| match v {
            Value::Param(p) => {
                params.push(p.clone());
                format!("${}::text::{}", params.len(), a.qualified)
            }
            Value::Expr(x) => format!("({x})::{}", a.qualified),
        })
        .collect();
    (
        format!("SELECT pgseal.{}({})", f.name, args.join(", ")),
        params,
    )
}

/// Runs one statement in its own rolled-back transaction under a tenant context,
/// then checks the connection still answers.
fn run(s: &mut Session, port: u16, ctx: Ctx, sql: &str, params: &[Option<String>]) -> Outcome {
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
    let result = (|| -> Result<Result<(), postgres::Error>, postgres::Error> {
        let mut tx = s.client.transaction()?;
        tx.execute(
            "SELECT set_config('app.tenant_id', $1, true), set_config('app.user_id', $2, true)",
            &[&ctx.tenant(), &ctx.user()],
        )?;
        let r = tx.query(sql, &refs).map(|_| ());
        tx.rollback()?;
        Ok(r)
    })();
    let alive = !s.client.is_closed() && s.client.simple_query("SELECT 1").is_ok();
    if !alive {
        s.client = connect(port, &s.role);
    }
    let (state, text) = match result {
        Ok(Ok(())) => ("00000".to_owned(), String::new()),
        Ok(Err(e)) | Err(e) => error_text(&e),
    };
    Outcome {
        state,
        text,
        crashed: !alive,
    }
}

/// The text form of a value as PostgreSQL casts it, or the SQLSTATE refusing it.
fn probe(
    pg: &mut postgres::Client,
    cache: &mut HashMap<(String, String), Result<Option<String>, String>>,
    a: &Arg,
    v: &Value,
) -> Result<Option<String>, String> {
    if let Value::Param(p) = v {
        if p.is_none() || matches!(a.typname.as_str(), "text" | "varchar") {
            return Ok(p.clone());
        }
    }
    let (sql, param) = match v {
        Value::Param(p) => (
            format!("SELECT ($1::text::{})::text", a.qualified),
            p.clone(),
        ),
        Value::Expr(x) => (format!("SELECT (({x})::{})::text", a.qualified), None),
    };
    let key = (sql.clone(), param.clone().unwrap_or_default());
    if let Some(r) = cache.get(&key) {
        return r.clone();
    }
    let r = if param.is_some() {
        pg.query_one(&sql, &[&param]).map(|r| r.get(0))
    } else {
        pg.query_one(&sql, &[]).map(|r| r.get(0))
    }
    .map_err(|e| error_text(&e).0);
    cache.insert(key, r.clone());
    r
}

/// Whether `text` repeats an input value of at least 8 characters.
fn echoes(text: &str, inputs: &[String]) -> Option<String> {
    inputs
        .iter()
        .filter(|v| v.chars().count() >= 8)
        .find_map(|v| {
            let prefix: String = v.chars().take(16).collect();
            if text.contains(v.as_str()) || (v.chars().count() >= 32 && text.contains(&prefix)) {
                Some(prefix)
            } else {
                None
            }
        })
}

/// Whether a primary message names an argument (`user_id` may read "user id").
fn names_argument(text: &str, arg: &str) -> bool {
    let t = text.to_lowercase();
    t.contains(arg) || t.contains(&arg.replace('_', " "))
}

fn short(s: &str, n: usize) -> String {
    let t: String = s.chars().take(n).collect();
    if t.len() < s.len() {
        format!("{t}…")
    } else {
        t
    }
}

struct Matrix<'a> {
    port: u16,
    admin: postgres::Client,
    sessions: Vec<Session>,
    docs: BTreeMap<String, Doc>,
    executable: HashMap<(String, u32), bool>,
    cast_cache: HashMap<(String, String), Result<Option<String>, String>>,
    report: &'a mut Report,
}

impl Matrix<'_> {
    /// Runs one call as every role under the given contexts and checks each outcome.
    fn check(&mut self, call: &Call, ctxs: &[Ctx]) {
        let mut echo_inputs = Vec::new();
        let mut identifiers = Vec::new();
        for (a, v) in call.func.args.iter().zip(&call.values) {
            match probe(&mut self.admin, &mut self.cast_cache, a, v) {
                Ok(t) if IDENTIFIER_TYPES.contains(&a.typname.as_str()) => identifiers.extend(t),
                Ok(t) => echo_inputs.extend(t),
                Err(state) => {
                    let k = format!("{} {} ({state})", a.qualified, call.kind);
                    *self.report.refused_by_cast.entry(k).or_default() += 1;
                    return;
                }
            }
        }
        let (sql, params) = call_sql(call.func, &call.values);
        for si in 0..self.sessions.len() {
            for &ctx in ctxs {
                let role = self.sessions[si].role.clone();
                let out = run(&mut self.sessions[si], self.port, ctx, &sql, &params);
                self.report.calls += 1;
                let mut inputs = echo_inputs.clone();
                inputs.extend(ctx.tenant());
                inputs.push(ctx.user());
                let can = self.executable[&(role.clone(), call.func.oid)];
                for problem in self.problems(call, can, &out, &inputs, &identifiers) {
                    self.report.violations.push(Violation {
                        func: call.func.name.clone(),
                        arg: call.arg.clone(),
                        kind: call.kind.clone(),
                        role: role.clone(),
                        ctx: format!("{ctx:?}"),
                        state: out.state.clone(),
                        message: short(&out.text, 160),
                        problem,
                    });
                }
                self.note(call, &role, ctx, &out);
            }
        }
    }

    fn note(&mut self, call: &Call, role: &str, ctx: Ctx, out: &Outcome) {
        if role == "bi_all" && ctx == Ctx::Right {
            let o = format!(
                "{} {} {}: {} {}",
                call.func.name,
                call.arg,
                short(&call.kind, 40),
                out.state,
                short(&out.text, 100)
            );
            self.report.outcomes.push(o);
        }
        if call.kind.starts_with("valid") && role == "bi_all" {
            if matches!(ctx, Ctx::Right | Ctx::LongUser) {
                let user = if ctx == Ctx::LongUser {
                    " [4 KiB app.user_id]"
                } else {
                    ""
                };
                let k = format!(
                    "{}({}) {}{user}",
                    call.func.name, call.func.identity, call.kind
                );
                self.report
                    .baseline
                    .insert(k, format!("{} {}", out.state, short(&out.text, 100)));
            }
            if ctx == Ctx::Overlong && out.state == "00000" {
                self.report.overlong_ctx_ok.insert(call.func.name.clone());
            }
        }
    }

    fn problems(
        &self,
        call: &Call,
        can: bool,
        out: &Outcome,
        inputs: &[String],
        identifiers: &[String],
    ) -> Vec<String> {
        let mut p = Vec::new();
        let st = out.state.as_str();
        if out.crashed {
            p.push("connection lost (backend crash?)".into());
        }
        let null_arg = call.values.iter().any(|v| matches!(v, Value::Param(None)));
        if !can {
            // PostgreSQL folds a STRICT call with a constant NULL argument to NULL
            // at plan time, before its EXECUTE check: pgseal's code never runs.
            let folded = st == "00000" && call.func.strict && null_arg;
            if !folded && !matches!(st, "42501" | "57014") {
                p.push("role has no EXECUTE: expected 42501".into());
            }
        } else if let Some(doc) = self.docs.get(&call.func.name) {
            if st != "00000" && !ANY_CALL.contains(&st) && !doc.codes.contains(st) {
                p.push(format!("SQLSTATE not in README row {:?}", doc.codes));
            }
        } else if st.starts_with("XX") || st == "no sqlstate" {
            p.push("internal error (function has no README row)".into());
        }
        // Object names (regclass, name, oid arguments) may appear in a message, as
        // in PostgreSQL's own ("column x of t does not exist"): they name schema
        // objects and are not secrets. Every other input must never be echoed.
        let _ = identifiers;
        if let Some(e) = echoes(&out.text, inputs) {
            p.push(format!("message echoes input '{}'", short(&e, 16)));
        }
        if let (Some(t), Some(l)) = (&call.tested, limit_of(&call.arg)) {
            if can && t.len() > l {
                if !matches!(st, "54000" | "42501" | "57014") {
                    p.push(format!("{} bytes > {l}: expected 54000", t.len()));
                } else if st == "54000"
                    && !names_argument(out.text.split(" | ").next().unwrap_or(""), &call.arg)
                {
                    p.push("54000 does not name the argument".into());
                }
            }
        }
        if call.tampered && st == "00000" && can {
            p.push("tampered envelope accepted".into());
        }
        p
    }
}

// ---------------------------------------------------------------- fixture

/// Seals `pt` for `tenant` as postgres and commits.
fn seal(pg: &mut postgres::Client, tenant: &str, pt: &str) -> String {
    let mut tx = pg.transaction().unwrap();
    tx.execute("SELECT set_config('app.tenant_id', $1, true)", &[&tenant])
        .unwrap();
    let s: String = tx
        .query_one("SELECT pgseal.vault_seal($1, $2)", &[&pt, &CONTEXT])
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    s
}

/// Extension, roles, the table, one sealed value and ledger entries per tenant.
/// Returns the short sealed value and the table's oid.
fn fixture(pg: &mut postgres::Client) -> (String, u32) {
    pg.batch_execute(SETUP).unwrap();
    let roles: Vec<String> = pg
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'pgseal\\_%' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    println!("bi_all holds: {roles:?}");
    pg.batch_execute(&format!("GRANT {} TO bi_all", roles.join(", ")))
        .unwrap();
    for t in [TENANT, OTHER_TENANT] {
        seal(pg, t, "other-value");
        pg.batch_execute(&format!(
            "BEGIN; SET LOCAL app.tenant_id = '{t}';
             SELECT pgseal.ledger_append('app.bi_setup', '{{\"n\": 1}}');
             SELECT pgseal.ledger_append('app.bi_setup', '{{\"n\": 2}}');
             INSERT INTO bi_docs (id, tenant_id, owner_id, org_id) VALUES ({}, '{t}', '{USER_ID}', 'org1');
             COMMIT",
            if t == TENANT { 1 } else { 2 }
        ))
        .unwrap();
    }
    let sealed = seal(pg, TENANT, PLAINTEXT);
    let oid: u32 = pg
        .query_one("SELECT $1::text::regclass::oid", &[&TABLE])
        .unwrap()
        .get(0);
    (sealed, oid)
}

fn calls_for<'f>(f: &'f Func, sealed: &str, oid: u32) -> Vec<(Call<'f>, Vec<Ctx>)> {
    let all = vec![Ctx::Right, Ctx::NoTenant, Ctx::Other];
    let valid: Vec<Value> = f.args.iter().map(|a| valid(a, sealed, oid)).collect();
    let mut out = vec![(
        Call {
            func: f,
            arg: "-".into(),
            kind: "valid".into(),
            values: valid.clone(),
            tested: None,
            tampered: false,
        },
        vec![
            Ctx::Right,
            Ctx::NoTenant,
            Ctx::Other,
            Ctx::Overlong,
            Ctx::LongUser,
        ],
    )];
    if f.ndefaults > 0 {
        // fewer values than arguments: the call leaves the defaulted ones out
        let values = valid[..f.args.len() - f.ndefaults].to_vec();
        out.push((
            Call {
                func: f,
                arg: "-".into(),
                kind: "valid, defaults omitted".into(),
                values,
                tested: None,
                tampered: false,
            },
            all.clone(),
        ));
    }
    for (i, a) in f.args.iter().enumerate() {
        for (kind, v) in bad_inputs(a) {
            let mut values = valid.clone();
            let tested = match &v {
                Value::Param(p) => p.clone(),
                Value::Expr(_) => None,
            };
            values[i] = v;
            out.push((
                Call {
                    func: f,
                    arg: a.name.clone(),
                    kind,
                    values,
                    tested,
                    tampered: false,
                },
                all.clone(),
            ));
        }
        if a.name.contains("sealed") {
            for (kind, t) in tamperings(sealed) {
                let mut values = valid.clone();
                values[i] = Value::Param(Some(t));
                out.push((
                    Call {
                        func: f,
                        arg: a.name.clone(),
                        kind,
                        values,
                        tested: None,
                        tampered: true,
                    },
                    vec![Ctx::Right],
                ));
            }
        }
    }
    out
}

// ---------------------------------------------------------------- report

fn print_report(r: &Report, skipped: &[String]) {
    println!("\n== skipped ({}):", skipped.len());
    skipped.iter().for_each(|s| println!("  {s}"));
    println!("\n== valid arguments, bi_all, right tenant:");
    r.baseline.iter().for_each(|(k, v)| println!("  {k}: {v}"));
    println!("\n== inputs PostgreSQL's own input functions refused (not called):");
    r.refused_by_cast
        .iter()
        .for_each(|(k, n)| println!("  {k}: {n}"));
    if std::env::var_os("BI_VERBOSE").is_some() {
        println!("\n== every outcome as bi_all, right tenant:");
        r.outcomes.iter().for_each(|o| println!("  {o}"));
    }
    println!(
        "\n== succeeded under a 257-byte tenant context: {:?}",
        r.overlong_ctx_ok
    );
    println!("\n== {} calls, {} violations", r.calls, r.violations.len());
}

fn violation_table(v: &[Violation]) -> String {
    let mut grouped: BTreeMap<(String, String, String, String, String), Vec<&Violation>> =
        BTreeMap::new();
    for x in v {
        let key = (
            x.func.clone(),
            x.arg.clone(),
            x.kind.clone(),
            x.problem.clone(),
            x.state.clone(),
        );
        grouped.entry(key).or_default().push(x);
    }
    let mut out = format!("{} violations ({} distinct):\n", v.len(), grouped.len());
    out += "function | argument | input | problem | SQLSTATE | roles/contexts | message\n";
    for ((f, a, k, p, s), xs) in grouped {
        let who: BTreeSet<String> = xs.iter().map(|x| format!("{}/{}", x.role, x.ctx)).collect();
        let who: Vec<String> = who.into_iter().collect();
        out += &format!(
            "{f} | {a} | {} | {p} | {s} | {} | {}\n",
            short(&k, 40),
            who.join(","),
            xs[0].message
        );
    }
    out
}

fn privilege_mismatches(
    docs: &BTreeMap<String, Doc>,
    funcs: &[Func],
    exec: &HashMap<(String, u32), bool>,
) -> Vec<Violation> {
    let mut v = Vec::new();
    let mut seen = BTreeSet::new();
    for f in funcs {
        let public = exec[&("bi_none".to_owned(), f.oid)];
        let problem = match docs.get(&f.name) {
            None if !f.name.starts_with('_') => Some("no README row".to_owned()),
            None => Some("no README row (internal function)".to_owned()),
            Some(d) if d.who.contains("PUBLIC") && !public => Some(format!(
                "README says PUBLIC ({}) but PUBLIC lacks EXECUTE",
                d.who
            )),
            Some(d) if !d.who.contains("PUBLIC") && d.who.contains("pgseal_") && public => {
                Some(format!("README says {} but PUBLIC may EXECUTE", d.who))
            }
            _ => None,
        };
        if let Some(problem) = problem {
            if seen.insert((f.name.clone(), problem.clone())) {
                v.push(Violation {
                    func: f.name.clone(),
                    arg: "-".into(),
                    kind: "README".into(),
                    role: "-".into(),
                    ctx: "-".into(),
                    state: "-".into(),
                    message: String::new(),
                    problem: format!("{problem}; PUBLIC EXECUTE = {public}"),
                });
            }
        }
    }
    v
}

#[test]
fn every_pgseal_function_survives_bad_input() {
    let t0 = Instant::now();
    let cl = Cluster::start("bad-input", &[KEY_V1], &["log_min_error_statement = panic"]);
    let mut admin = cl.connect();
    let (sealed, oid) = fixture(&mut admin);
    println!("short sealed value: {sealed}");
    let (funcs, skipped) = functions(&mut admin);
    let docs = readme_docs();
    let mut executable = HashMap::new();
    for f in &funcs {
        for role in ["bi_all", "bi_none"] {
            executable.insert((role.to_owned(), f.oid), can_execute(&mut admin, role, f));
        }
    }
    let mut report = Report {
        violations: privilege_mismatches(&docs, &funcs, &executable),
        ..Report::default()
    };
    let mut m = Matrix {
        port: cl.port,
        admin,
        sessions: ["bi_all", "bi_none"]
            .iter()
            .map(|r| Session {
                role: r.to_string(),
                client: connect(cl.port, r),
            })
            .collect(),
        docs,
        executable,
        cast_cache: HashMap::new(),
        report: &mut report,
    };
    for f in &funcs {
        let tf = Instant::now();
        for (call, ctxs) in calls_for(f, &sealed, oid) {
            m.check(&call, &ctxs);
        }
        println!("{}({}): {:.1?}", f.name, f.identity, tf.elapsed());
    }
    drop(m);
    let log = cl.server_log();
    for bad in ["terminated by signal", "PANIC"] {
        for line in log.lines().filter(|l| l.contains(bad)) {
            report.violations.push(Violation {
                func: "-".into(),
                arg: "-".into(),
                kind: "server log".into(),
                role: "-".into(),
                ctx: "-".into(),
                state: "-".into(),
                message: short(line, 160),
                problem: format!("server log: {bad}"),
            });
        }
    }
    print_report(&report, &skipped);
    println!("total {:.1?}", t0.elapsed());
    assert!(
        report.violations.is_empty(),
        "{}",
        violation_table(&report.violations)
    );
}
