//! A Citus worker's audit writer keeps one connection to the coordinator, where
//! pgseal's ledger is kept (docs/SCALING.md), and appends each forwarded entry over
//! it: opening a connection per entry (Citus's `run_command_on_coordinator`) cost a
//! decrypting transaction on a worker about 30 ms (docs/BENCHMARKS.md).
//!
//! The connection is made as Citus makes its own to that node: the coordinator's
//! name and port from `pg_dist_node`, `citus.node_conninfo` (TLS settings), the
//! role's `pg_dist_authinfo` entry for the node (or for every node) and the node's
//! `pg_dist_poolinfo`, this database and the writer's role, with
//! `citus.node_connection_timeout`. The settings are read again in every
//! transaction; when they change (a new coordinator, a new password) the
//! connection is made again. Each entry is sent with its values as parameters, and
//! the coordinator commits it before it answers.

use std::cell::RefCell;
use std::time::Duration;

use pgrx::prelude::*;

use crate::pg::libpq::{quote, Conn};

/// How long a forwarded entry may take on the coordinator, its answer included.
const ANSWER: Duration = Duration::from_secs(10);

thread_local! {
    /// The open connection and the connection string it was made with.
    static LINK: RefCell<Option<(String, Conn)>> = const { RefCell::new(None) };
}

/// Runs `sql` with `params` on the coordinator and returns its first row. A kept
/// connection found closed before sending is made again; a failure after sending
/// is returned (the statement may have run) and the connection dropped.
pub fn query_row(sql: &std::ffi::CStr, params: &[&str]) -> Result<Vec<Option<String>>, String> {
    let conninfo = conninfo()?;
    LINK.with(|link| {
        let mut link = link.borrow_mut();
        // A connection made with other settings, or one the coordinator has ended
        // (a restart) while it was idle, is made again before anything is sent.
        if link
            .as_mut()
            .is_some_and(|(c, conn)| *c != conninfo || !conn.alive())
        {
            *link = None;
        }
        if link.is_none() {
            *link = Some((conninfo.clone(), Conn::open(&conninfo)?));
        }
        let (_, conn) = link.as_mut().expect("a connection was just made");
        match conn.query_row(sql, params, ANSWER) {
            Ok(Some(row)) => Ok(row),
            Ok(None) => Err("the coordinator returned no row".to_owned()),
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

/// The connection string for the coordinator, built in the current transaction
/// from Citus's catalog and settings (see the module's header). Holds the
/// authinfo's password when there is one: it never goes into a message.
fn conninfo() -> Result<String, String> {
    let row = Spi::connect(|c| {
        let t = c.select(
            "SELECT n.nodename::pg_catalog.text, n.nodeport::pg_catalog.text, \
                    pg_catalog.current_database()::pg_catalog.text, \
                    CURRENT_USER::pg_catalog.text, \
                    pg_catalog.getdatabaseencoding()::pg_catalog.text, \
                    COALESCE(pg_catalog.current_setting('citus.node_conninfo', true), ''), \
                    COALESCE(pg_catalog.current_setting('citus.node_connection_timeout', true), '30000'), \
                    COALESCE((SELECT a.authinfo FROM pg_catalog.pg_dist_authinfo a \
                               WHERE a.rolename OPERATOR(pg_catalog.=) CURRENT_USER \
                                 AND a.nodeid OPERATOR(pg_catalog.=) ANY (ARRAY[n.nodeid, 0]) \
                               ORDER BY a.nodeid OPERATOR(pg_catalog.=) 0 LIMIT 1), ''), \
                    COALESCE((SELECT p.poolinfo FROM pg_catalog.pg_dist_poolinfo p \
                               WHERE p.nodeid OPERATOR(pg_catalog.=) n.nodeid), '') \
               FROM pg_catalog.pg_dist_node n \
              WHERE n.groupid OPERATOR(pg_catalog.=) 0 \
                AND n.noderole OPERATOR(pg_catalog.=) 'primary' \
              LIMIT 1",
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for r in t {
            for i in 1..=9 {
                out.push(r.get::<String>(i)?.unwrap_or_default());
            }
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(|e| format!("reading the coordinator's address: {e}"))?;
    let [host, port, db, user, encoding, node_conninfo, timeout_ms, authinfo, poolinfo] =
        <[String; 9]>::try_from(row).map_err(|_| {
            "the coordinator is not in pg_dist_node (citus_set_coordinator_host)".to_owned()
        })?;
    Ok(build(&Parts {
        host: &host,
        port: &port,
        db: &db,
        user: &user,
        encoding: &encoding,
        node_conninfo: &node_conninfo,
        timeout_ms: &timeout_ms,
        authinfo: &authinfo,
        poolinfo: &poolinfo,
    }))
}

/// The coordinator session's settings that the coordinator's, its database's or
/// the role's configuration must not change, as in the writer's own session
/// (`writer::configure_session`): a database set read-only by default or with a
/// short statement timeout must not stop the audit (the answer's deadline bounds
/// the wait here), and nothing the session parses resolves a name through a schema
/// a role can create objects in. A commit that would not be flushed is made
/// durable by `_audit_append_forwarded` itself.
const SESSION: &str =
    "-c default_transaction_read_only=off -c statement_timeout=0 -c search_path=pg_catalog,pg_temp";

struct Parts<'a> {
    host: &'a str,
    port: &'a str,
    db: &'a str,
    user: &'a str,
    encoding: &'a str,
    node_conninfo: &'a str,
    timeout_ms: &'a str,
    authinfo: &'a str,
    poolinfo: &'a str,
}

/// The connection string, in Citus's order: `citus.node_conninfo` first, then the
/// node, database, role and encoding (the node as `hostaddr` where the settings
/// name a `host`, as Citus does), then the authinfo and the poolinfo, which libpq
/// lets override what comes before them.
fn build(p: &Parts) -> String {
    let names_host = p
        .node_conninfo
        .split_whitespace()
        .any(|w| w.split('=').next().is_some_and(|k| k.trim() == "host"));
    let timeout_s = p
        .timeout_ms
        .parse::<u64>()
        .map_or(30, |ms| ms.div_ceil(1000).max(2));
    format!(
        "{} {}={} port={} dbname={} user={} client_encoding={} application_name={} connect_timeout={} options={} {} {}",
        p.node_conninfo,
        if names_host { "hostaddr" } else { "host" },
        quote(p.host),
        quote(p.port),
        quote(p.db),
        quote(p.user),
        quote(p.encoding),
        quote("pgseal audit writer"),
        timeout_s,
        quote(SESSION),
        p.authinfo,
        p.poolinfo,
    )
}

#[cfg(test)]
mod tests {
    use super::{build, Parts};

    fn parts<'a>(node_conninfo: &'a str, authinfo: &'a str) -> Parts<'a> {
        Parts {
            host: "coord's host",
            port: "5432",
            db: "app",
            user: "postgres",
            encoding: "UTF8",
            node_conninfo,
            timeout_ms: "30500",
            authinfo,
            poolinfo: "",
        }
    }

    #[test]
    fn the_coordinators_connection_string_is_built_as_citus_builds_its_own() {
        let s = build(&parts("sslmode=require", "password=s3cret"));
        assert_eq!(
            s,
            "sslmode=require host='coord\\'s host' port='5432' dbname='app' user='postgres' \
             client_encoding='UTF8' application_name='pgseal audit writer' connect_timeout=31 \
             options='-c default_transaction_read_only=off -c statement_timeout=0 -c search_path=pg_catalog,pg_temp' \
             password=s3cret "
        );
        let s = build(&parts("host=coord.example sslmode=verify-full", ""));
        assert!(s.contains(" hostaddr='coord\\'s host' "), "{s}");
    }
}
