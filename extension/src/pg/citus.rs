//! Where pgseal runs on a Citus cluster (docs/SCALING.md): whether Citus is installed
//! in this database, and whether this node is one of its workers.
//!
//! Relies on: Citus's catalog `pg_catalog.pg_dist_local_group`, which exists where
//! the `citus` extension is installed and holds this node's group (0 on the
//! coordinator), written by Citus only (superuser-owned). It is read by name at run
//! time, through SPI, as pgseal's owner.

use pgrx::prelude::*;

use crate::error::SealResult;
use crate::privilege::as_owner;
use crate::txn::Participant;

/// Whether the `citus` extension is installed in this database.
pub fn present() -> bool {
    // SAFETY: get_extension_oid looks the name up in pg_extension inside the running
    // transaction; with missing_ok it returns InvalidOid instead of raising.
    unsafe { pg_sys::get_extension_oid(c"citus".as_ptr(), true) != pg_sys::InvalidOid }
}

/// Whether this node is a Citus worker: Citus is installed and this node's group is
/// not the coordinator's (0). A node that no coordinator has added (Citus installs
/// with group 0) is a cluster of its own, a coordinator.
/// Read once per transaction (`TXN` forgets it when the transaction ends).
pub fn is_worker() -> SealResult<bool> {
    if let Some(known) = WORKER.with(|w| w.get()) {
        return Ok(known);
    }
    let worker = present()
        && as_owner(|| Spi::get_one::<i32>("SELECT groupid FROM pg_catalog.pg_dist_local_group"))?
            != Some(0);
    WORKER.with(|w| w.set(Some(worker)));
    Ok(worker)
}

thread_local! {
    /// `is_worker`'s answer in the running transaction.
    static WORKER: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Forgets `is_worker`'s answer when a transaction ends: Citus may be installed, or
/// this node added to a cluster, before the next.
pub const TXN: Participant = Participant {
    end: Some(|_| WORKER.with(|w| w.set(None))),
    ..Participant::NONE
};

/// How the caller's session parses SQL, to restore on the other nodes after
/// `with_remote_parsing_pinned`: its `search_path` (the schemas it resolves to, each
/// quoted) and `standard_conforming_strings`. None without Citus. Read before
/// `as_owner` pins the path, under the caller's own settings (the query names
/// everything with its schema).
pub struct CallerParsing {
    search_path: String,
    standard_conforming_strings: String,
}

pub fn caller_parsing() -> SealResult<Option<CallerParsing>> {
    if !present() {
        return Ok(None);
    }
    let (path, scs) = Spi::get_two::<String, String>(
        "SELECT (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(s.n), ', ' ORDER BY s.i) \
                 FROM pg_catalog.unnest(pg_catalog.current_schemas(false)) WITH ORDINALITY AS s(n, i) \
                 WHERE s.n OPERATOR(pg_catalog.!~) '^pg_(toast_)?temp_'), \
                pg_catalog.current_setting('standard_conforming_strings')",
    )?;
    Ok(Some(CallerParsing {
        search_path: path.unwrap_or_else(|| "''".to_owned()),
        standard_conforming_strings: if scs.as_deref() == Some("off") {
            "off"
        } else {
            "on"
        }
        .to_owned(),
    }))
}

/// Runs `f`, whose statements on a Citus table Citus sends to other nodes as text
/// under the extension owner, with how those nodes parse them pinned: Citus first
/// replays the caller's `SET LOCAL`s of the transaction there, so a caller's
/// `search_path` (a schema with its own `bytea` or `text`, whose checks run its
/// functions) would steer the owner's statements on every other node. `f` runs
/// after a propagated `SET LOCAL search_path = pg_catalog, pg_temp` and
/// `standard_conforming_strings = on`; the caller's values are set again after it.
/// Citus's logging of the commands it sends (which would show wrapped keys to the
/// caller) is off meanwhile. Call it inside `as_owner`, whose GUC nest level takes
/// back these settings on this node when it returns. Without Citus (`caller` None),
/// just `f`.
pub fn with_remote_parsing_pinned<R>(
    caller: Option<&CallerParsing>,
    f: impl FnOnce() -> SealResult<R>,
) -> SealResult<R> {
    let Some(caller) = caller else {
        return f();
    };
    Spi::run(
        "SELECT pg_catalog.set_config('citus.propagate_set_commands', 'local', true), \
                pg_catalog.set_config('citus.log_remote_commands', 'off', true), \
                pg_catalog.set_config('citus.log_local_commands', 'off', true)",
    )?;
    // One statement per SPI call: Citus sends a SET's whole query string along.
    Spi::run("SET LOCAL search_path TO pg_catalog, pg_temp")?;
    Spi::run("SET LOCAL standard_conforming_strings TO on")?;
    let r = f()?;
    Spi::run(&format!("SET LOCAL search_path TO {}", caller.search_path))?;
    Spi::run(&format!(
        "SET LOCAL standard_conforming_strings TO {}",
        caller.standard_conforming_strings
    ))?;
    Ok(r)
}
