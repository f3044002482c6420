//! A Citus worker's audit writer keeps one connection to the coordinator, where
//! pgseal's ledger is kept (docs/SCALING.md), and appends each forwarded entry over
//! it: opening a connection per entry (Citus's `run_command_on_coordinator`) cost a
//! decrypting transaction on a worker about 30 ms (docs/BENCHMARKS.md). The seal
//! counts it forwards go over the same connection.
//!
//! The connection is made as Citus makes its own to that node: the coordinator's
//! name and port from `pg_dist_node`, `citus.node_conninfo` (TLS settings), the
//! role's `pg_dist_authinfo` entry for the node (or for every node) and the node's
//! `pg_dist_poolinfo` (each read by libpq's own parser, as Citus reads them), this
//! database and the writer's role, waiting at most `citus.node_connection_timeout`
//! (10 s at the most). The settings are read again for every entry; when they
//! change (a new coordinator, a new password) the connection is made again. Each
//! entry is sent with its values as parameters, and the coordinator commits it
//! before it answers.
//!
//! Where `citus.node_conninfo` does not verify the coordinator's certificate (the
//! default, `sslmode=require`, does not), someone on the network path could answer
//! for it: docs/SCALING.md asks for `sslmode=verify-full`.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use crate::pg::libpq::{self, Conn};

/// How long a forwarded entry may take on the coordinator, its answer included.
const ANSWER: Duration = Duration::from_secs(10);
/// The longest wait for a connection (`citus.node_connection_timeout` is used when
/// shorter): the writer serves every backend of its database in turn.
const CONNECT_MAX: Duration = Duration::from_secs(10);
/// After a connection failed, entries fail at once for this long rather than each
/// wait for a coordinator that cannot be reached.
const BACKOFF: Duration = Duration::from_secs(1);

/// The coordinator session's settings that the coordinator's database's or the
/// role's configuration must not change, as in the writer's own session
/// (`writer::configure_session`): a database set read-only by default, with a short
/// timeout of any kind or another role must not stop the audit (the answer's
/// deadline bounds the wait here), nothing the session parses resolves a name
/// through a schema a role can create objects in, and the server sends no notices.
///
/// They are given twice. As startup options (`STARTUP`), which take precedence over
/// a database's or role's settings from the session's first statement on, except
/// through a pooler (`pg_dist_poolinfo`), which may refuse them. And by `SETUP`, the
/// first statement, for everything (settings the coordinator's version lacks are
/// left out), then `CHECK`: the session must be the writer's role, a superuser, or
/// the connection is not used. A commit that would not be flushed is made durable
/// by `_audit_append_forwarded` itself.
const STARTUP: &str =
    "-c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0 \
     -c idle_session_timeout=0 -c default_transaction_read_only=off";
const SETUP: &std::ffi::CStr = c"SELECT pg_catalog.set_config('role', 'none', false), \
      (SELECT pg_catalog.count(pg_catalog.set_config(s.name, v.setting, false)) \
         FROM (VALUES ('default_transaction_read_only', 'off'), \
                      ('default_transaction_isolation', 'read committed'), ('statement_timeout', '0'), \
                      ('lock_timeout', '0'), ('idle_in_transaction_session_timeout', '0'), \
                      ('idle_session_timeout', '0'), ('transaction_timeout', '0'), \
                      ('client_min_messages', 'warning'), ('search_path', 'pg_catalog, pg_temp')) \
              AS v(name, setting) \
         JOIN pg_catalog.pg_settings s ON s.name OPERATOR(pg_catalog.=) v.name)";
const CHECK: &std::ffi::CStr =
    c"SELECT pg_catalog.current_setting('is_superuser') OPERATOR(pg_catalog.=) 'on' \
        AND SESSION_USER OPERATOR(pg_catalog.=) $1 AND CURRENT_USER OPERATOR(pg_catalog.=) $1";

/// A connection's settings (keyword, value), in order.
type Settings = Vec<(String, String)>;

thread_local! {
    /// The open connection and the settings it was made with.
    static LINK: RefCell<Option<(Settings, Conn)>> = const { RefCell::new(None) };
    /// When the last connection failed.
    static FAILED_AT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `sql` with `params` on the coordinator and returns its first row. A kept
/// connection found closed before sending is made again; a failure after sending
/// is returned (the statement may have run) and the connection dropped.
pub fn query_row(sql: &std::ffi::CStr, params: &[&str]) -> Result<Vec<Option<String>>, String> {
    run(sql, params)?.ok_or_else(|| "the coordinator returned no row".to_owned())
}

/// Runs `sql`, a statement that returns no rows (a `DO` block), on the coordinator,
/// as `query_row` runs its statement.
pub fn execute(sql: &std::ffi::CStr) -> Result<(), String> {
    run(sql, &[]).map(|_| ())
}

thread_local! {
    /// Whether the last `run` sent its statement (set just before it is sent): a
    /// failure before that recorded nothing on the coordinator.
    static SENT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the last statement run here was sent to the coordinator (so that, if it
/// failed, it may still have run there).
pub fn last_was_sent() -> bool {
    SENT.get()
}

/// `query_row`'s and `execute`'s work: the statement's first row, if it returned one.
fn run(sql: &std::ffi::CStr, params: &[&str]) -> Result<Option<Vec<Option<String>>>, String> {
    SENT.set(false);
    let (settings, connect_within) = settings()?;
    LINK.with(|link| {
        let mut link = link.borrow_mut();
        // A connection made with other settings, or one the coordinator has ended
        // (a restart) while it was idle, is made again before anything is sent.
        if link
            .as_mut()
            .is_some_and(|(made_with, conn)| *made_with != settings || !conn.alive())
        {
            *link = None;
        }
        if link.is_none() {
            if FAILED_AT.get().is_some_and(|t| t.elapsed() < BACKOFF) {
                return Err("the coordinator could not be reached a moment ago".to_owned());
            }
            let user = settings
                .iter()
                .rev()
                .find(|(k, _)| k == "user")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let made = Conn::open(&settings, connect_within).and_then(|mut conn| {
                conn.query_row(SETUP, &[], ANSWER)?;
                match conn.query_row(CHECK, &[&user], ANSWER)? {
                    Some(row) if row.first() == Some(&Some("t".to_owned())) => Ok(conn),
                    _ => Err(
                        "the coordinator's session is not the audit writer's superuser role"
                            .to_owned(),
                    ),
                }
            });
            match made {
                Ok(conn) => {
                    FAILED_AT.set(None);
                    *link = Some((settings, conn));
                }
                Err(e) => {
                    FAILED_AT.set(Some(Instant::now()));
                    return Err(e);
                }
            }
        }
        let (_, conn) = link.as_mut().expect("a connection was just made");
        SENT.set(true);
        match conn.query_row(sql, params, ANSWER) {
            Ok(row) => Ok(row),
            Err(e) => {
                // The statement may have run: it is not sent again (a forwarded
                // entry would be recorded twice); the next one opens a new
                // connection.
                *link = None;
                Err(e)
            }
        }
    })
}

/// Where the coordinator is and how to connect to it (see `settings`): a plan kept
/// for the writer's life, since it runs for every forwarded entry.
const COORDINATOR: &str = "SELECT n.nodename::pg_catalog.text, n.nodeport::pg_catalog.text, \
                    pg_catalog.current_database()::pg_catalog.text, \
                    CURRENT_USER::pg_catalog.text, \
                    pg_catalog.getdatabaseencoding()::pg_catalog.text, \
                    COALESCE(pg_catalog.current_setting('citus.node_conninfo', true), ''), \
                    COALESCE(pg_catalog.current_setting('citus.node_connection_timeout', true), ''), \
                    COALESCE((SELECT a.authinfo FROM pg_catalog.pg_dist_authinfo a \
                               WHERE a.rolename OPERATOR(pg_catalog.=) CURRENT_USER \
                                 AND a.nodeid OPERATOR(pg_catalog.=) ANY (ARRAY[n.nodeid, 0]) \
                               ORDER BY a.nodeid OPERATOR(pg_catalog.=) 0 LIMIT 1), ''), \
                    COALESCE((SELECT p.poolinfo FROM pg_catalog.pg_dist_poolinfo p \
                               WHERE p.nodeid OPERATOR(pg_catalog.=) n.nodeid), '') \
               FROM pg_catalog.pg_dist_node n \
              WHERE n.groupid OPERATOR(pg_catalog.=) 0 \
                AND n.noderole OPERATOR(pg_catalog.=) 'primary' \
              LIMIT 1";

/// The settings for a connection to the coordinator, read in the current
/// transaction from Citus's catalog and settings (see the module's header), and
/// how long to wait for it. Hold the authinfo's password when there is one: it
/// never goes into a message.
fn settings() -> Result<(Settings, Duration), String> {
    let row = crate::pg::plans::select_first(COORDINATOR, &[], &[], |r| {
        (1..=9)
            .map(|i| Ok(r.get::<String>(i)?.unwrap_or_default()))
            .collect::<crate::error::SealResult<Vec<String>>>()
    })
    .map(Option::unwrap_or_default)
    .map_err(|e| format!("reading the coordinator's address: {e}"))?;
    let [host, port, db, user, encoding, node_conninfo, timeout, authinfo, poolinfo] =
        <[String; 9]>::try_from(row).map_err(|_| {
            "the coordinator is not in pg_dist_node (citus_set_coordinator_host)".to_owned()
        })?;
    let within = setting_duration(&timeout)
        .unwrap_or(CONNECT_MAX)
        .clamp(Duration::from_secs(1), CONNECT_MAX);
    let mut node = vec![
        ("host", host),
        ("port", port),
        ("dbname", db),
        ("user", user),
        ("client_encoding", encoding),
    ];
    if poolinfo.trim().is_empty() {
        node.push(("options", STARTUP.to_owned()));
    }
    let params = build(
        &libpq::parse(&node_conninfo).map_err(|e| format!("citus.node_conninfo: {e}"))?,
        &node,
        &libpq::parse(&authinfo).map_err(|e| format!("pg_dist_authinfo: {e}"))?,
        &libpq::parse(&poolinfo).map_err(|e| format!("pg_dist_poolinfo: {e}"))?,
    );
    Ok((params, within))
}

/// A time setting as `current_setting` shows it (`30s`, `500ms`, `2min`, `1h`, or
/// a bare number of milliseconds).
fn setting_duration(v: &str) -> Option<Duration> {
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    let n: u64 = v[..digits].parse().ok()?;
    let ms = match v[digits..].trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(n.checked_mul(ms)?))
}

/// The connection's settings, in Citus's order (a later keyword overrides an
/// earlier one): `citus.node_conninfo`, then the node, database, role and
/// encoding and pgseal's application name, then the authinfo's and the
/// poolinfo's settings.
fn build(
    node_conninfo: &[(String, String)],
    node: &[(&str, String)],
    authinfo: &[(String, String)],
    poolinfo: &[(String, String)],
) -> Settings {
    node_conninfo
        .iter()
        .cloned()
        .chain(node.iter().map(|(k, v)| ((*k).to_owned(), v.clone())))
        .chain(std::iter::once((
            "application_name".to_owned(),
            "pgseal audit writer".to_owned(),
        )))
        .chain(authinfo.iter().cloned())
        .chain(poolinfo.iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{build, setting_duration};
    use std::time::Duration;

    #[test]
    fn time_settings_are_read_with_their_units() {
        assert_eq!(setting_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(setting_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(setting_duration("2min"), Some(Duration::from_secs(120)));
        assert_eq!(setting_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(setting_duration("1500"), Some(Duration::from_millis(1500)));
        assert_eq!(setting_duration(""), None);
        assert_eq!(setting_duration("5 parsecs"), None);
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_coordinators_settings_come_in_citus_order() {
        let node = [
            ("host", "coord".to_owned()),
            ("user", "postgres".to_owned()),
        ];
        let got = build(
            &kv(&[("sslmode", "verify-full"), ("connect_timeout", "5")]),
            &node,
            &kv(&[("password", "s3cret")]),
            &kv(&[("host", "pooler"), ("port", "6432")]),
        );
        assert_eq!(
            got,
            kv(&[
                ("sslmode", "verify-full"),
                ("connect_timeout", "5"),
                ("host", "coord"),
                ("user", "postgres"),
                ("application_name", "pgseal audit writer"),
                ("password", "s3cret"),
                ("host", "pooler"),
                ("port", "6432"),
            ])
        );
    }
}
