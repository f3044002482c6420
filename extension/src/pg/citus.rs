//! Where pgseal runs on a Citus cluster (docs/SCALING.md): whether Citus is installed
//! in this database, and whether this node is one of its workers.
//!
//! Relies on: Citus's catalog `pg_catalog.pg_dist_local_group`, which exists where
//! the `citus` extension is installed and holds this node's group (0 on the
//! coordinator), written by Citus only (superuser-owned). It is read by name at run
//! time, through SPI, as pgseal's owner.

use pgrx::prelude::*;

use crate::error::{OrRaise, SealResult};
use crate::privilege::as_owner;
use crate::txn::Participant;

/// Whether the `citus` extension is installed in this database.
///
/// Citus can be installed only where the server preloads its library (its
/// `CREATE EXTENSION` refuses otherwise), so without that no catalog is read: the
/// hot paths (every append, every key load) ask this, and the lookup in
/// `pg_extension` (an index scan, not a cached one) was a visible share of them.
pub fn present() -> bool {
    if !preloaded() {
        return false;
    }
    // SAFETY: get_extension_oid looks the name up in pg_extension inside the running
    // transaction; with missing_ok it returns InvalidOid instead of raising.
    unsafe { pg_sys::get_extension_oid(c"citus".as_ptr(), true) != pg_sys::InvalidOid }
}

/// Whether Citus manages `rel` (a distributed or reference table, listed in
/// `pg_dist_partition`): its rows live on other nodes, where a row's place and
/// inserting transaction mean nothing to this one.
pub fn manages(rel: pg_sys::Oid) -> SealResult<bool> {
    if !present() {
        return Ok(false);
    }
    Ok(as_owner(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p \
              WHERE p.logicalrelid OPERATOR(pg_catalog.=) $1::pg_catalog.oid)",
            &[rel.into()],
        )
    })? == Some(true))
}

/// Whether Citus keeps more than one copy of `rel`'s rows (a reference table, or
/// a shard with several active placements), each at its own places on its node.
pub fn has_copies(rel: pg_sys::Oid) -> SealResult<bool> {
    Ok(as_owner(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p \
                             WHERE p.logicalrelid OPERATOR(pg_catalog.=) $1::pg_catalog.oid \
                               AND p.partmethod OPERATOR(pg_catalog.=) 'n' AND p.repmodel OPERATOR(pg_catalog.=) 't') \
                 OR EXISTS (SELECT 1 FROM pg_catalog.pg_dist_shard s \
                              JOIN pg_catalog.pg_dist_placement l ON l.shardid OPERATOR(pg_catalog.=) s.shardid \
                             WHERE s.logicalrelid OPERATOR(pg_catalog.=) $1::pg_catalog.oid \
                               AND l.shardstate OPERATOR(pg_catalog.=) 1 \
                             GROUP BY s.shardid HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 1)",
            &[rel.into()],
        )
    })? == Some(true))
}

thread_local! {
    /// `preloaded`'s answer: `shared_preload_libraries` is fixed at server start.
    static PRELOADED: std::cell::OnceCell<bool> = const { std::cell::OnceCell::new() };
}

/// Whether `shared_preload_libraries` names Citus's library (`citus`, with or
/// without a directory or `$libdir/`, and with or without a suffix).
pub(crate) fn preloaded() -> bool {
    PRELOADED.with(|p| {
        *p.get_or_init(|| {
            // SAFETY: GetConfigOption returns the setting's current value (a string
            // owned by the GUC machinery, valid until the setting changes, which a
            // PGC_POSTMASTER setting does not); it is copied out at once.
            let list = unsafe {
                let v = pg_sys::GetConfigOption(c"shared_preload_libraries".as_ptr(), true, false);
                (!v.is_null()).then(|| std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned())
            };
            list.is_some_and(|l| names_citus(&l))
        })
    })
}

/// Whether a `shared_preload_libraries` value lists Citus.
fn names_citus(list: &str) -> bool {
    list.split(',').any(|item| {
        let item = item.trim().trim_matches('"');
        let base = item.rsplit('/').next().unwrap_or(item);
        let stem = base.split('.').next().unwrap_or(base);
        stem == "citus"
    })
}

#[cfg(test)]
mod tests {
    use super::names_citus;

    #[test]
    fn preload_lists_are_read_as_postgresql_lists_them() {
        assert!(names_citus("citus"));
        assert!(names_citus("citus,pgseal"));
        assert!(names_citus(" pgseal , citus "));
        assert!(names_citus("'$libdir/citus'".trim_matches('\'')));
        assert!(names_citus("$libdir/citus.so, pgseal"));
        assert!(names_citus("\"citus\""));
        assert!(!names_citus("pgseal"));
        assert!(!names_citus(""));
        assert!(!names_citus("citus_columnar_x, pgseal"));
        assert!(!names_citus("pg_stat_statements,pgseal"));
    }
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
        && as_owner(|| {
            crate::pg::plans::select_first(
                "SELECT groupid FROM pg_catalog.pg_dist_local_group",
                &[],
                &[],
                |r| Ok(r.get::<i32>(1)?),
            )
        })?
        .ok_or(crate::error::SealError::Internal(
            "pg_dist_local_group has no row",
        ))? != Some(0);
    WORKER.with(|w| w.set(Some(worker)));
    Ok(worker)
}

/// Makes Citus commit this transaction's writes on other nodes with two-phase commit.
///
/// Citus sees only the writes it sends to other nodes. When they all went to one
/// node, it commits that node's part at pre-commit, before this node's own commit,
/// which can still fail (a serialization failure at commit under SERIALIZABLE): a
/// business row on a worker then stays committed while the ledger entry that
/// records it, written here, is rolled back. With two-phase commit the other nodes
/// only prepare at pre-commit, and are committed after this node commits, or rolled
/// back when it does not. Citus turns it on for every transaction that modifies a
/// table of its own on this node (its local execution; or, where the transaction
/// reaches this node's tables over a connection, a modification over a second
/// connection), so pgseal's first ledger write of a transaction on a Citus
/// coordinator deletes from `pgseal._two_phase`, an empty table that
/// `citus_distribute()` makes and hands to Citus (tested: an order on a worker and
/// its entry here never part, and Citus prepares the worker's part whatever the
/// caller set). The DELETE has no condition (one that is always false lets Citus's
/// planner prune the table's one shard away when the caller turned its fast path
/// off, and nothing would run) and, as every owner statement that Citus may send
/// over a connection (here: to this node itself, when the caller turned Citus's
/// local execution off; a transaction may not switch between the two, so the
/// caller's choice stands), with the remote parsing pinned. Refuses (55000) before `citus_distribute()` has run; and (0A000) outside
/// a transaction block when the caller turned `citus.function_opens_transaction_block`
/// off, where a function's writes on the workers commit at once, before anything
/// here.
pub fn commit_remote_writes_in_two_phases() -> SealResult<()> {
    thread_local! {
        /// Whether `pgseal._two_phase` was found in Citus's metadata (it stays there).
        static MANAGED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    require_function_transaction_block()?;
    let caller = caller_parsing()?;
    as_owner(|| {
        if !MANAGED.with(|m| m.get()) {
            let managed = Spi::get_one::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p \
                 WHERE p.logicalrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('pgseal._two_phase'))",
            )?;
            if managed != Some(true) {
                return Err(crate::error::SealError::Refused(
                    "on a Citus coordinator pgseal writes its ledger only after pgseal.citus_distribute() (without it a ledger entry could commit apart from the transaction's writes on the workers)",
                ));
            }
            MANAGED.with(|m| m.set(true));
        }
        with_remote_parsing_pinned(caller.as_ref(), || {
            crate::pg::plans::run("DELETE FROM pgseal._two_phase", &[], &[])
        })
    })
}

/// Refuses (0A000) a ledger write outside a transaction block when the caller
/// turned `citus.function_opens_transaction_block` off: a function's writes on
/// other nodes then commit at once, each on its own, and could not commit together
/// with the ledger entry.
pub fn require_function_transaction_block() -> SealResult<()> {
    // SAFETY: GetConfigOption with missing_ok returns NULL for an unknown setting,
    // else its current value as a string PostgreSQL keeps; IsTransactionBlock reads
    // the transaction state.
    let unblocked = unsafe {
        let v = pg_sys::GetConfigOption(
            c"citus.function_opens_transaction_block".as_ptr(),
            true,
            false,
        );
        !v.is_null()
            && std::ffi::CStr::from_ptr(v).to_bytes() == b"off"
            && !pg_sys::IsTransactionBlock()
    };
    if unblocked {
        return Err(crate::error::SealError::NotSupported(
            "with citus.function_opens_transaction_block off, pgseal writes its ledger only inside a transaction block (BEGIN … COMMIT): a function's writes on the workers would commit before its ledger entry",
        ));
    }
    Ok(())
}

/// Whether this session is one Citus opened to run another node's statements here:
/// Citus names such sessions `citus_internal gpid=…` in `application_name` and tells
/// them apart by that name itself. Either name counts: the one the session started
/// with (the setting's reset value, from the startup packet, which no statement of
/// the session changes: a query Citus pushed here may call
/// `set_config('application_name', …)` before it reaches pgseal, and Citus itself
/// then takes the session for a client's) and the current one. A client may take
/// the name too, which only refuses it what such sessions are refused.
pub fn in_citus_internal_session() -> bool {
    let internal = |v: *const std::ffi::c_char| {
        // SAFETY: `v` is NULL or a NUL-terminated string PostgreSQL keeps for the
        // setting; it is read at once.
        !v.is_null()
            && unsafe { std::ffi::CStr::from_ptr(v) }
                .to_bytes()
                .starts_with(b"citus_internal")
    };
    // SAFETY: `application_name` is a built-in setting, so neither call fails; each
    // returns its value as a string PostgreSQL keeps (or NULL).
    let (started_as, now) = unsafe {
        (
            pg_sys::GetConfigOptionResetString(c"application_name".as_ptr()),
            pg_sys::GetConfigOption(c"application_name".as_ptr(), true, false),
        )
    };
    internal(started_as) || internal(now)
}

/// Makes Citus commit a worker's distributed transaction in two phases, so that a
/// ledger entry it forwarded to the coordinator (`ledger::forward`) commits after
/// this node's own commit, or rolls back with it.
///
/// Citus decides that from the writes it planned: it uses two-phase commit once a
/// transaction modifies a Citus table through its local execution on this node, or
/// modifies over a second connection (to another node, or to this node itself with
/// local execution turned off), but not for one modifying statement over one
/// connection, which the forwarded entry alone is: Citus would commit the entry at
/// this node's pre-commit, before this node's own writes (tables Citus does not
/// manage) commit, which can still fail. So after the entry has been sent, the
/// first forwarded append of a transaction deletes nothing from
/// `pgseal._two_phase_shards`, a table distributed over the workers that
/// `citus_distribute()` makes, by a key whose shard is placed on this node when one
/// is (else on another worker): Citus runs it through its local execution, or over a
/// second connection, and either turns two-phase commit on. The caller runs it as
/// the owner with the remote parsing pinned (`with_remote_parsing_pinned`), as every
/// owner statement Citus may send: in the same scope as the forwarded INSERT, so
/// that the settings are sent once.
pub fn commit_forwarded_entries_in_two_phases() -> SealResult<()> {
    if TWO_PHASE_ASKED.with(|a| a.get()) {
        return Ok(());
    }
    thread_local! {
        /// A shard of `_two_phase_shards` on a worker, this node's when it has one,
        /// and a key in it; checked each transaction (a rebalance moves shards,
        /// maybe to the coordinator, where the DELETE would ride the connection the
        /// entry went over and turn nothing on). The key is the first integer
        /// whose hash falls in the shard's range, found with the series in the
        /// select list, which stops at the first match (in FROM it would be built
        /// whole first: half a second).
        static KEY: std::cell::Cell<Option<(i64, i32)>> = const { std::cell::Cell::new(None) };
    }
    {
        let cached = match KEY.with(|k| k.get()) {
            Some((shard, key)) => on_a_worker(shard)?.then_some(key),
            None => None,
        };
        let key = match cached {
            Some(k) => k,
            None => {
                let (shard, k) = crate::pg::plans::select_first(
                    "SELECT r.shardid, g.k FROM ( \
                        SELECT s.shardid, s.shardminvalue::pg_catalog.int4 AS lo, s.shardmaxvalue::pg_catalog.int4 AS hi, \
                               p.groupid OPERATOR(pg_catalog.=) (SELECT l.groupid FROM pg_catalog.pg_dist_local_group l) AS here \
                          FROM pg_catalog.pg_dist_shard s \
                          JOIN pg_catalog.pg_dist_placement p ON p.shardid OPERATOR(pg_catalog.=) s.shardid \
                          JOIN pg_catalog.pg_dist_node n ON n.groupid OPERATOR(pg_catalog.=) p.groupid \
                         WHERE s.logicalrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('pgseal._two_phase_shards') \
                           AND p.groupid OPERATOR(pg_catalog.<>) 0 AND p.shardstate OPERATOR(pg_catalog.=) 1 \
                           AND n.isactive AND n.noderole::pg_catalog.text OPERATOR(pg_catalog.=) 'primary' \
                         ORDER BY 4 DESC, s.shardid LIMIT 1) r, \
                     LATERAL (SELECT s.k FROM (SELECT pg_catalog.generate_series(0, 10000000) AS k) s \
                               WHERE pg_catalog.worker_hash(s.k) OPERATOR(pg_catalog.>=) r.lo \
                                 AND pg_catalog.worker_hash(s.k) OPERATOR(pg_catalog.<=) r.hi LIMIT 1) g",
                    &[],
                    &[],
                    |r| Ok(r.get::<i64>(1)?.zip(r.get::<i32>(2)?)),
                )?
                .flatten()
                .ok_or(crate::error::SealError::Refused(
                    "pgseal._two_phase_shards has no shard on an active worker: run pgseal.citus_distribute() on the coordinator after adding the workers, and keep its shards off the coordinator",
                ))?;
                KEY.with(|c| c.set(Some((shard, k))));
                k
            }
        };
        crate::pg::plans::run(
            "DELETE FROM pgseal._two_phase_shards WHERE k OPERATOR(pg_catalog.=) $1",
            &[crate::pg::plans::INT4],
            &[key.into()],
        )?;
        // A move of the shard that committed between the check and the DELETE
        // (which now holds the shard's lock, and a move waits for it) is seen here.
        let shard = KEY.with(|k| k.get()).map(|(s, _)| s);
        if !shard.map(on_a_worker).transpose()?.unwrap_or(false) {
            KEY.with(|k| k.set(None));
            return Err(crate::error::SealError::Refused(
                "the shard of pgseal._two_phase_shards this session used moved off the workers during the append: retry the transaction",
            ));
        }
    }
    TWO_PHASE_ASKED.with(|a| a.set(true));
    Ok(())
}

/// Whether Citus places `shard` on an active primary worker (not the coordinator),
/// as this transaction's snapshot of its metadata says.
fn on_a_worker(shard: i64) -> SealResult<bool> {
    Ok(crate::pg::plans::select_first(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_placement p \
           JOIN pg_catalog.pg_dist_node n ON n.groupid OPERATOR(pg_catalog.=) p.groupid \
          WHERE p.shardid OPERATOR(pg_catalog.=) $1 AND p.groupid OPERATOR(pg_catalog.<>) 0 \
            AND p.shardstate OPERATOR(pg_catalog.=) 1 AND n.isactive \
            AND n.noderole::pg_catalog.text OPERATOR(pg_catalog.=) 'primary')",
        &[crate::pg::plans::INT8],
        &[shard.into()],
        |r| Ok(r.get::<bool>(1)?.unwrap_or(false)),
    )?
    .unwrap_or(false))
}

thread_local! {
    /// Whether `commit_forwarded_entries_in_two_phases` ran in this transaction.
    static TWO_PHASE_ASKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// `is_worker`'s answer in the running transaction.
    static WORKER: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// `local_placement`'s answers in the running transaction, by table.
    static PLACEMENTS: std::cell::RefCell<std::collections::HashMap<&'static str, Option<String>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// This node's placement of `pgseal.<table>` where Citus replicates that table (a
/// reference table) to this node: the placement's qualified name, which a function
/// inside a query Citus pushed to this node can read (it may not run a distributed
/// query). None when Citus does not list a placement of it on this node, or the
/// placement is not there. The placement is named by its shard id and is a table of
/// pgseal's schema, where only pgseal's owner creates tables; Citus's metadata is
/// written by superusers only. Read once a transaction, as the owner.
pub fn local_placement(table: &'static str) -> SealResult<Option<String>> {
    if let Some(known) = PLACEMENTS.with(|m| m.borrow().get(table).cloned()) {
        return Ok(known);
    }
    let found = if present() {
        as_owner(|| {
            crate::pg::plans::select_first(
                "SELECT pg_catalog.format('%I.%I', 'pgseal', $1 OPERATOR(pg_catalog.||) '_' OPERATOR(pg_catalog.||) s.shardid) \
                   FROM pg_catalog.pg_dist_shard s \
                   JOIN pg_catalog.pg_dist_placement p ON p.shardid OPERATOR(pg_catalog.=) s.shardid \
                   JOIN pg_catalog.pg_dist_local_group g ON g.groupid OPERATOR(pg_catalog.=) p.groupid \
                  WHERE s.logicalrelid OPERATOR(pg_catalog.=) \
                        pg_catalog.to_regclass(pg_catalog.format('%I.%I', 'pgseal', $1)) \
                    AND pg_catalog.to_regclass(pg_catalog.format('%I.%I', 'pgseal', \
                        $1 OPERATOR(pg_catalog.||) '_' OPERATOR(pg_catalog.||) s.shardid)) IS NOT NULL \
                  LIMIT 1",
                &[crate::pg::plans::TEXT],
                &[table.into()],
                |r| Ok(r.get::<String>(1)?),
            )
        })?
        .flatten()
    } else {
        None
    };
    PLACEMENTS.with(|m| m.borrow_mut().insert(table, found.clone()));
    Ok(found)
}

/// Forgets `is_worker`'s answer and the settings sent to the workers when a
/// transaction ends: Citus may be installed, or this node added to a cluster,
/// before the next. Whether it ran statements as another role outlives a
/// `PREPARE TRANSACTION`: Citus lets a session that calls itself one of its own
/// (by `application_name`, which any role may set) prepare with its remote
/// transactions open, and keeps those connections, begun as that role, into the
/// session's next transactions until one commits or aborts.
pub const TXN: Participant = Participant {
    end: Some(|how| {
        if how != crate::txn::End::Prepared {
            RAN_AS_ANOTHER_ROLE.with(|r| r.set(false));
        }
        WORKER.with(|w| w.set(None));
        TWO_PHASE_ASKED.with(|a| a.set(false));
        PLACEMENTS.with(|m| m.borrow_mut().clear());
        REPLAYED.with(|r| r.borrow_mut().clear());
        SENT_PARSING.with(|r| r.borrow_mut().clear());
        OPEN_PINS.with(|r| r.borrow_mut().clear());
        PINNING.with(|p| p.set(false));
    }),
    // Citus replays a subtransaction's SETs on new connections only until it ends,
    // committed or not (`PopSubXact`): what it (and any inside it, whose ids are
    // larger) sent is forgotten here too.
    subxact_committed: Some(|my, _| forget_sent_from(my)),
    subxact_aborted: Some(|my| {
        forget_sent_from(my);
        OPEN_PINS.with(|r| r.borrow_mut().retain(|id| *id < my));
    }),
    ..Participant::NONE
};

/// Whether this transaction ran statements through Citus as another role (and so
/// may hold connections begun as that role until it ends), even in a subtransaction
/// since rolled back: Citus keeps such connections in the transaction.
pub fn ran_as_another_role() -> bool {
    RAN_AS_ANOTHER_ROLE.with(|r| r.get())
}

/// Forgets the parse settings sent from subtransaction `my` on (`SENT_PARSING`).
fn forget_sent_from(my: pg_sys::SubTransactionId) {
    SENT_PARSING.with(|r| r.borrow_mut().retain(|(id, ..)| *id < my));
}

/// Proof that Citus is present, for `with_remote_parsing_pinned`, which then sends
/// the workers again how the caller's transaction had them parse SQL: the
/// `search_path` and `standard_conforming_strings` the caller last sent them with
/// `SET LOCAL` (or `RESET`) in this transaction, as `on_set_statement` recorded
/// them, or the workers' defaults when it sent none. That is what the workers had,
/// whatever this session's own values are where pgseal's code runs (an owner
/// scope, or a function's `SET search_path` clause, which Citus never sends).
pub struct CallerParsing(());

/// `CallerParsing` when Citus is present, else None.
pub fn caller_parsing() -> SealResult<Option<CallerParsing>> {
    Ok(present().then_some(CallerParsing(())))
}

/// The two settings that decide how the workers parse what Citus sends them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parsing {
    SearchPath,
    StandardConformingStrings,
}

impl Parsing {
    const ALL: [Parsing; 2] = [Parsing::SearchPath, Parsing::StandardConformingStrings];

    fn of(name: &str) -> Option<Parsing> {
        if name.eq_ignore_ascii_case("search_path") {
            Some(Parsing::SearchPath)
        } else if name.eq_ignore_ascii_case("standard_conforming_strings") {
            Some(Parsing::StandardConformingStrings)
        } else {
            None
        }
    }

    fn name(self) -> &'static std::ffi::CStr {
        match self {
            Parsing::SearchPath => c"search_path",
            Parsing::StandardConformingStrings => c"standard_conforming_strings",
        }
    }

    /// pgseal's own value (the owner's parsing).
    fn pinned(self) -> &'static std::ffi::CStr {
        match self {
            Parsing::SearchPath => c"pg_catalog, pg_temp",
            Parsing::StandardConformingStrings => c"on",
        }
    }
}

/// Sends the workers the caller's value of each parse setting again (see
/// `CallerParsing`), `search_path` last (so nothing of pgseal's is sent under the
/// caller's), then pins this node's values back for the rest of the owner scope: a
/// `SET LOCAL` changes them here too (the nest level in which `pin_remote` saved
/// them undoes that when it ends). Only when no pinned scope is open any more
/// (`OPEN_PINS`): inside another, the caller's `search_path` would be the last
/// setting Citus replays on the connections that scope's statements open as
/// another role.
fn restore_callers_parsing() -> SealResult<()> {
    if OPEN_PINS.with(|r| !r.borrow().is_empty()) {
        return Ok(());
    }
    let _pinning = Pinning::start();
    // Sent whatever a table owner's code in the scope set this to (its settings
    // are discarded with the scope, after this). Plain SETs, not a DO block as
    // the pin is: where Citus sends no SET from a function's statement outside a
    // transaction block, the workers stay pinned for the rest of the statement,
    // which is safe (a DO block here cost each ledger-writing transaction on the
    // coordinator about a third of a millisecond).
    crate::privilege::set_setting(
        c"citus.propagate_set_commands",
        c"local",
        pg_sys::GucAction::GUC_ACTION_LOCAL,
    );
    for which in [Parsing::StandardConformingStrings, Parsing::SearchPath] {
        let sent = SENT_PARSING.with(|r| {
            r.borrow()
                .iter()
                .rev()
                .find(|(_, w, _)| *w == which)
                .and_then(|(_, _, v)| v.clone())
        });
        let name = which.name().to_string_lossy();
        match sent {
            None => Spi::run(&format!("SET LOCAL {name} TO DEFAULT"))?,
            Some(value) => {
                // Set here first, then sent as this node's current value: the
                // value is never part of a statement's text.
                crate::privilege::set_setting(
                    which.name(),
                    &value,
                    pg_sys::GucAction::GUC_ACTION_LOCAL,
                );
                Spi::run(&format!("SET LOCAL {name} FROM CURRENT"))?;
            }
        }
        crate::privilege::set_setting(
            which.name(),
            which.pinned(),
            pg_sys::GucAction::GUC_ACTION_LOCAL,
        );
    }
    Ok(())
}

/// Runs `f`, whose statements on a Citus table Citus sends to other nodes as text
/// under the extension owner, with how those nodes parse them pinned: Citus first
/// replays the caller's `SET LOCAL`s of the transaction there, so a caller's
/// `search_path` (a schema with its own `bytea` or `text`, whose checks run its
/// functions) would steer the owner's statements on every other node. `f` runs
/// after a propagated `SET LOCAL search_path = pg_catalog, pg_temp` and
/// `standard_conforming_strings = on`; after it the workers get the values the
/// caller had sent them again (`CallerParsing`), and this node keeps pgseal's.
/// Citus's logging of the commands it sends, the relaying of the workers' messages,
/// and this session's debug output (which would show wrapped keys to the caller)
/// are off meanwhile. Refused when the transaction sent other settings that Citus
/// replays (`check_replayed_settings`). Call it inside `as_owner`, whose GUC nest level takes
/// back these settings on this node when it returns. Without Citus (`caller` None),
/// just `f`.
pub fn with_remote_parsing_pinned<R>(
    caller: Option<&CallerParsing>,
    f: impl FnOnce() -> SealResult<R>,
) -> SealResult<R> {
    let Some(CallerParsing(())) = caller else {
        return f();
    };
    check_replayed_settings(true)?;
    pin_remote()?;
    let r = {
        let _open = OpenPin::open();
        f()?
    };
    restore_callers_parsing()?;
    Ok(r)
}

/// A pinned scope, open in `OPEN_PINS` until dropped (also when an ERROR unwinds).
struct OpenPin(usize);

impl OpenPin {
    fn open() -> OpenPin {
        // SAFETY: reads the running subtransaction's id.
        let id = unsafe { pg_sys::GetCurrentSubTransactionId() };
        OpenPin(OPEN_PINS.with(|r| {
            let mut r = r.borrow_mut();
            r.push(id);
            r.len() - 1
        }))
    }
}

impl Drop for OpenPin {
    fn drop(&mut self) {
        OPEN_PINS.with(|r| r.borrow_mut().truncate(self.0));
    }
}

thread_local! {
    /// Settings this transaction sent to the Citus workers with `SET LOCAL` (or
    /// RESET) that pgseal does not pin itself: Citus replays them on every
    /// connection of the transaction, those pgseal opens as its owner included.
    static REPLAYED: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Set while pgseal issues its own `SET LOCAL`s (`with_remote_parsing_pinned`).
    static PINNING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Whether this transaction (or one this session prepared since its last
    /// commit or abort) pinned the workers' parsing for statements it ran as
    /// another role (`pin_remote`): Citus may have begun connections as that role,
    /// which stay in the transaction (`citus_clock`).
    static RAN_AS_ANOTHER_ROLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The values of `search_path` and `standard_conforming_strings` the caller sent
    /// the workers in this transaction (None: `RESET` or `TO DEFAULT`), in order,
    /// by the subtransaction that sent each (`CallerParsing`).
    static SENT_PARSING: std::cell::RefCell<Vec<(pg_sys::SubTransactionId, Parsing, Option<std::ffi::CString>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// The scopes with the workers' parsing pinned that are open now, by the
    /// subtransaction that opened each (`with_remote_parsing_pinned`,
    /// `_citus_owner_check` until `_citus_owner_done`).
    static OPEN_PINS: std::cell::RefCell<Vec<pg_sys::SubTransactionId>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Settings whose replay on the owner's connections is harmless: the tenant and
/// user settings, time limits, and the transaction's isolation.
fn replay_is_harmless(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let tenant =
        crate::gucs::with_tenant_setting_name(|n| n.to_string_lossy().to_ascii_lowercase());
    let user = crate::gucs::user_setting_name()
        .to_string_lossy()
        .to_ascii_lowercase();
    name == tenant
        || name == user
        || matches!(
            name.as_str(),
            "statement_timeout"
                | "lock_timeout"
                | "idle_in_transaction_session_timeout"
                | "transaction"
        )
}

/// For the `ProcessUtility` hook: a `SET`/`RESET` statement that Citus will send to
/// the workers (and replay on every later connection of the transaction) is
/// recorded when it is not harmless (`replay_is_harmless`), and Citus is given a
/// text rebuilt from the parsed statement (`rebuilt_set`) instead of the caller's:
/// Citus replays the text it is given, so `SET LOCAL a = 1; DO $$ … $$` sent as one
/// message would run the `DO` again on each connection, including those pgseal
/// opens as its owner. Returns the query string to pass on.
///
/// # Safety
/// `pstmt` is the statement being run and `query_string` its source text, as
/// PostgreSQL passes them to the hook; `set` is its VariableSetStmt.
pub unsafe fn on_set_statement(
    pstmt: *mut pg_sys::PlannedStmt,
    set: *const pg_sys::VariableSetStmt,
    query_string: *const std::ffi::c_char,
) -> *const std::ffi::c_char {
    // The setting first (a lookup in memory; it is unknown without Citus loaded),
    // the catalog only then: this runs for every SET, set_tenant's included.
    // SAFETY: GetConfigOption with missing_ok returns NULL for an unknown setting, else
    // its current value as a string PostgreSQL keeps.
    let propagating = unsafe {
        let v = pg_sys::GetConfigOption(c"citus.propagate_set_commands".as_ptr(), true, false);
        !v.is_null() && std::ffi::CStr::from_ptr(v).to_bytes() == b"local"
    };
    if !propagating || !present() {
        return query_string;
    }
    // SAFETY: the caller passes the statement's VariableSetStmt.
    let set = unsafe { &*set };
    use pg_sys::VariableSetKind::*;
    let name = name_of(set);
    let replayed = match set.kind {
        VAR_SET_VALUE | VAR_SET_CURRENT | VAR_SET_DEFAULT => set.is_local,
        VAR_RESET => true,
        VAR_RESET_ALL => true,
        VAR_SET_MULTI => name.eq_ignore_ascii_case("TRANSACTION"),
        _ => false,
    };
    // Settings Citus never sends (`IsSettingSafeToPropagate`), such as
    // `set_tenant()`'s own `citus.propagate_set_commands`, are neither replayed
    // nor recorded.
    if !replayed
        || [
            "application_name",
            "citus.propagate_set_commands",
            "client_encoding",
            "exit_on_error",
            "max_stack_depth",
        ]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
    {
        return query_string;
    }
    // Citus would send a `SET LOCAL ROLE` (or SESSION AUTHORIZATION) to every
    // connection of the transaction too. It opens connections as the role the
    // session acts as anyway, so nothing is sent: a role changed by a replayed SET
    // on another role's connection (a superuser may take any) made the caller's
    // `search_path` pass `rebuilt_set`'s test there, to be reset right after it.
    //
    // Nor is any SET or RESET (SET TRANSACTION included) that a table owner's code
    // makes inside one of pgseal's pinned scopes (not pgseal's own pin): this
    // node discards it when the scope ends, but the workers would keep it for the
    // rest of the transaction, on the caller's connections too (a parse setting,
    // which `rebuilt_set` aims at the session role's connections; the tenant and
    // user settings, which every connection takes), and the owner's code can turn
    // propagation off before pgseal sends the caller's values back.
    let owners_code = OPEN_PINS.with(|r| !r.borrow().is_empty()) && !PINNING.with(|p| p.get());
    if name.eq_ignore_ascii_case("role")
        || name.eq_ignore_ascii_case("session_authorization")
        || owners_code
    {
        // SAFETY: pstrdup copies a NUL-terminated literal into the current memory
        // context, which lives as long as the statement.
        return unsafe { pg_sys::pstrdup(c"SELECT 1".as_ptr()) };
    }
    if !PINNING.with(|p| p.get()) {
        let what = if set.kind == VAR_RESET_ALL {
            "RESET ALL".to_owned()
        } else {
            name
        };
        if set.kind == VAR_RESET_ALL || !replay_is_harmless(&what) {
            REPLAYED.with(|r| r.borrow_mut().push(what));
        }
        // No pinned scope is open here (an owner's SET in one returned above).
        // SAFETY: as above.
        unsafe { record_sent_parsing(set, &name_of(set)) };
    }
    // SAFETY: the arguments are the statement's, as PostgreSQL passed them.
    unsafe { rebuilt_set(pstmt, set, &name_of(set), query_string) }
}

/// Records a caller's `SET LOCAL`/`RESET` of a parse setting that Citus replays
/// (`SENT_PARSING`): the value as the setting's parser reads it (as `rebuilt_set`
/// sends it), None for its default; `RESET ALL` resets both.
///
/// # Safety
/// `set` is the statement being run, as PostgreSQL passed it to the hook.
unsafe fn record_sent_parsing(set: &pg_sys::VariableSetStmt, name: &str) {
    use pg_sys::VariableSetKind::*;
    let sent: Vec<(Parsing, Option<std::ffi::CString>)> = match set.kind {
        VAR_RESET_ALL => Parsing::ALL.iter().map(|w| (*w, None)).collect(),
        _ => {
            let Some(which) = Parsing::of(name) else {
                return;
            };
            // SAFETY: as in `rebuilt_set`: ExtractSetVariableArgs flattens the
            // statement's arguments (NULL for none), GetConfigOptionByName reads a
            // known setting's current value; both palloc'd.
            let value = unsafe {
                match set.kind {
                    VAR_SET_VALUE => pg_sys::ExtractSetVariableArgs(set as *const _ as *mut _),
                    VAR_SET_CURRENT => pg_sys::GetConfigOptionByName(
                        which.name().as_ptr(),
                        std::ptr::null_mut(),
                        false,
                    ),
                    _ => std::ptr::null_mut(),
                }
            };
            let value = (!value.is_null()).then(|| {
                // SAFETY: a NUL-terminated palloc'd string from above.
                unsafe { std::ffi::CStr::from_ptr(value) }.to_owned()
            });
            // SET … TO '' (no value) is the empty list, not the default.
            let value = match set.kind {
                VAR_SET_VALUE | VAR_SET_CURRENT => Some(value.unwrap_or_default()),
                _ => None,
            };
            vec![(which, value)]
        }
    };
    // SAFETY: reads the running subtransaction's id.
    let id = unsafe { pg_sys::GetCurrentSubTransactionId() };
    SENT_PARSING.with(|r| {
        r.borrow_mut()
            .extend(sent.into_iter().map(|(w, v)| (id, w, v)))
    });
}

/// The statement's setting name, as written (empty for RESET ALL).
fn name_of(set: &pg_sys::VariableSetStmt) -> String {
    if set.name.is_null() {
        return String::new();
    }
    // SAFETY: a VariableSetStmt's name is a NUL-terminated string when set.
    unsafe { std::ffi::CStr::from_ptr(set.name) }
        .to_string_lossy()
        .into_owned()
}

/// The text Citus is given for a SET it will replay: rebuilt from the parsed
/// statement, never a slice of the caller's text. Citus joins the texts of all the
/// transaction's SETs into the message that begins each new connection, so a slice
/// ending in `--` or `/*`, or a string literal read under another
/// `standard_conforming_strings` there, could turn the next part into a statement
/// of the caller's (run as whoever opened the connection: pgseal's owner too).
/// Values go through `set_config()` with quoted literals (`E''` where a backslash
/// is), names through `quote_identifier`; `SET TRANSACTION` is passed on only when
/// it is made of words and commas, else refused (0A000).
///
/// A value of `search_path` or `standard_conforming_strings` takes effect only on
/// the connections of the role this session acts as (`GetOuterUserId`: what Citus
/// opens for its own statements); on any other role's (pgseal's owner scopes,
/// Citus's own superuser connections for a new colocation group or an object's
/// dependencies, a SECURITY DEFINER function's role) the replay sets pgseal's
/// values instead, and a reset of them is followed by those. There, Citus calls
/// `assign_distributed_transaction_id` unqualified at once, and a table owner's
/// deferred trigger fires at the commit: under the caller's path, the caller's own
/// functions of those names ran as that role.
///
/// # Safety
/// As `on_set_statement`.
unsafe fn rebuilt_set(
    pstmt: *mut pg_sys::PlannedStmt,
    set: &pg_sys::VariableSetStmt,
    name: &str,
    query_string: *const std::ffi::c_char,
) -> *const std::ffi::c_char {
    use pg_sys::VariableSetKind::*;
    // Values and names go to the workers as they are: bytes that are not UTF-8 (a
    // SQL_ASCII database lets them into a setting) are refused (22021), never
    // replaced (a tenant id would reach the workers as another one).
    let utf8 = |v: &std::ffi::CStr| -> String {
        crate::context::utf8_text(v.to_bytes(), "a setting sent to the Citus workers").or_raise()
    };
    let lit = |v: &std::ffi::CStr| -> String {
        // SAFETY: quote_literal_cstr returns a palloc'd quoted copy of a C string.
        utf8(unsafe { std::ffi::CStr::from_ptr(pg_sys::quote_literal_cstr(v.as_ptr())) })
    };
    let ident = |v: &std::ffi::CStr| -> String {
        // SAFETY: quote_identifier returns its argument or a palloc'd quoted copy.
        utf8(unsafe { std::ffi::CStr::from_ptr(pg_sys::quote_identifier(v.as_ptr())) })
    };
    let cname = std::ffi::CString::new(name).unwrap_or_default();
    // The role this session acts as (a SECURITY DEFINER function's or a table
    // owner's scope aside), whose connections Citus opens for its statements.
    // SAFETY: GetUserNameFromId returns a palloc'd copy of an existing role's name.
    let role = lit(unsafe {
        std::ffi::CStr::from_ptr(pg_sys::GetUserNameFromId(pg_sys::GetOuterUserId(), false))
    });
    // After a reset of parse settings, pgseal's values on any other role's connection.
    let pin_elsewhere = |settings: &[Parsing]| -> String {
        settings
            .iter()
            .map(|w| {
                format!(
                    "; SELECT pg_catalog.set_config({}, {}, true) \
                     WHERE CURRENT_USER OPERATOR(pg_catalog.<>) {role}::pg_catalog.name",
                    lit(w.name()),
                    lit(w.pinned())
                )
            })
            .collect()
    };
    let text = match set.kind {
        VAR_SET_VALUE | VAR_SET_CURRENT => {
            // SAFETY: ExtractSetVariableArgs flattens a SET's arguments the way the
            // setting's parser reads them (palloc'd; NULL for none). FROM CURRENT
            // takes the value the setting has now.
            let value = unsafe {
                if set.kind == VAR_SET_VALUE {
                    pg_sys::ExtractSetVariableArgs(set as *const _ as *mut _)
                } else {
                    pg_sys::GetConfigOptionByName(cname.as_ptr(), std::ptr::null_mut(), false)
                }
            };
            let value = if value.is_null() {
                String::new()
            } else {
                // SAFETY: a NUL-terminated palloc'd string from above.
                lit(unsafe { std::ffi::CStr::from_ptr(value) })
            };
            let value = if value.is_empty() {
                "''".to_owned()
            } else {
                value
            };
            match Parsing::of(name) {
                // Applied only where the role that sent it is the connection's.
                Some(which) => format!(
                    "SELECT pg_catalog.set_config({}, CASE WHEN CURRENT_USER OPERATOR(pg_catalog.=) {role}::pg_catalog.name \
                     THEN {value} ELSE {} END, true)",
                    lit(&cname),
                    lit(which.pinned())
                ),
                None => format!(
                    "SELECT pg_catalog.set_config({}, {value}, true)",
                    lit(&cname)
                ),
            }
        }
        VAR_SET_DEFAULT => format!(
            "SET LOCAL {} TO DEFAULT{}",
            ident(&cname),
            pin_elsewhere(Parsing::of(name).as_slice())
        ),
        VAR_RESET => format!(
            "RESET {}{}",
            ident(&cname),
            pin_elsewhere(Parsing::of(name).as_slice())
        ),
        VAR_RESET_ALL => format!("RESET ALL{}", pin_elsewhere(&Parsing::ALL)),
        _ => {
            // SET TRANSACTION …: its text, when it is only words, spaces and commas.
            // SAFETY: stmt_location and stmt_len delimit this statement in
            // query_string (a length of 0 means to the end).
            let slice = unsafe {
                let loc = (*pstmt).stmt_location.max(0) as usize;
                let all = std::ffi::CStr::from_ptr(query_string).to_bytes();
                let len = if (*pstmt).stmt_len > 0 {
                    (*pstmt).stmt_len as usize
                } else {
                    all.len().saturating_sub(loc)
                };
                all.get(loc..loc + len).unwrap_or_default().to_vec()
            };
            let slice = String::from_utf8_lossy(&slice);
            let slice = slice.trim().trim_end_matches(';').trim_end();
            if slice.is_empty()
                || !slice.chars().all(|c| {
                    c.is_ascii_alphabetic() || c == ' ' || c == ',' || c == '\n' || c == '\t'
                })
            {
                crate::error::SealError::NotSupported(
                    "on Citus, write SET TRANSACTION as words alone, or before set_tenant()",
                )
                .raise();
            }
            slice.to_owned()
        }
    };
    let text = std::ffi::CString::new(text).unwrap_or_default();
    // SAFETY: pstrdup copies into the current memory context, which lives as long
    // as the statement.
    unsafe { pg_sys::pstrdup(text.as_ptr()) }
}

/// Refuses (0A000) statements that pgseal runs as its owner through Citus when this
/// transaction sent settings to the workers that Citus would replay on the owner's
/// connections (`on_set_statement`); `pinned_path` says whether the caller pins
/// `search_path` and `standard_conforming_strings` on the other nodes itself.
pub fn check_replayed_settings(pinned_path: bool) -> SealResult<()> {
    let found = REPLAYED.with(|r| {
        r.borrow().iter().any(|n| {
            !(pinned_path
                && (n.eq_ignore_ascii_case("search_path")
                    || n.eq_ignore_ascii_case("standard_conforming_strings")))
        })
    });
    if found {
        return Err(crate::error::SealError::NotSupported(
            "pgseal does not run its statements through Citus in a transaction that sent settings to the workers with SET LOCAL or RESET (other than the tenant and user settings, search_path and time limits): set them before set_tenant(), or in another transaction",
        ));
    }
    Ok(())
}

/// `pgseal._citus_owner_check() → true`: for pgseal's SECURITY DEFINER functions
/// that read or write Citus tables; refuses as `check_replayed_settings`, then sends
/// `SET LOCAL search_path = pg_catalog, pg_temp` and `standard_conforming_strings =
/// on` to the workers, and opens a pinned scope (`OPEN_PINS`) until
/// `_citus_owner_done()` closes it and, outermost, sends them the caller's again.
#[pg_extern(volatile, parallel_unsafe)]
fn _citus_owner_check() -> bool {
    use crate::error::OrRaise;
    if present() {
        check_replayed_settings(true).or_raise();
        pin_remote().or_raise();
        std::mem::forget(OpenPin::open());
    }
    true
}

/// `pgseal._citus_owner_done() → true`: ends what `_citus_owner_check()` began, for
/// a function whose caller goes on with its own statements in the transaction
/// (`_org_members_copy_sync`): sends the workers the caller's parse settings again
/// (`CallerParsing`). Without it they would parse the rest of the caller's
/// transaction under pgseal's `pg_catalog, pg_temp`.
#[pg_extern(volatile, parallel_unsafe)]
fn _citus_owner_done() -> bool {
    use crate::error::OrRaise;
    if present() {
        OPEN_PINS.with(|r| r.borrow_mut().pop());
        restore_callers_parsing().or_raise();
    }
    true
}

/// Sends pgseal's parse settings to the workers (see `with_remote_parsing_pinned`).
/// Marks pgseal's own SETs (not recorded) until dropped, also when an ERROR unwinds.
struct Pinning;

impl Pinning {
    fn start() -> Pinning {
        PINNING.with(|p| p.set(true));
        Pinning
    }
}

impl Drop for Pinning {
    fn drop(&mut self) {
        PINNING.with(|p| p.set(false));
    }
}

fn pin_remote() -> SealResult<()> {
    RAN_AS_ANOTHER_ROLE.with(|r| r.set(true));
    let _pinning = Pinning::start();
    for (name, value) in [
        (c"citus.propagate_set_commands", c"local"),
        (c"citus.log_remote_commands", c"off"),
        (c"citus.log_local_commands", c"off"),
        (c"citus.worker_min_messages", c"warning"),
        (c"client_min_messages", c"warning"),
        (c"debug_print_parse", c"off"),
        (c"debug_print_rewritten", c"off"),
        (c"debug_print_plan", c"off"),
        // Saved here as well, so that the `SET LOCAL`s below and those
        // `restore_callers_parsing` sends leave this node's values as they were
        // when the nest level ends (a `SET LOCAL` in a nest level where the setting
        // was not saved outlives it).
        (c"search_path", c"pg_catalog, pg_temp"),
        (c"standard_conforming_strings", c"on"),
    ] {
        crate::privilege::save_setting(name, value);
    }
    // In a DO block: Citus sends a SET LOCAL to the workers only in what it takes
    // for a transaction block of several statements, which a DO block always is,
    // but a statement of a function called from the outermost statement outside
    // one, or any function's once a caller turned
    // `citus.function_opens_transaction_block` off, is not; the caller's own
    // `search_path`, sent earlier, would then stay the last that Citus replays on
    // the connections it begins for the owner's statements. (Each SET reaches
    // Citus as the text `on_set_statement` rebuilds.)
    crate::pg::plans::run(PIN, &[], &[])?;
    Ok(())
}

/// Sends the workers setting `name` at this node's current value (`SET LOCAL name
/// FROM CURRENT`: the value is not part of this node's statement; Citus sends it
/// to the workers as a quoted literal of the `set_config` call it rebuilds) as pgseal's own
/// setting, not the caller's (not recorded among the settings it sent), from a DO
/// block as `pin_remote` sends its own, inside a pinned scope
/// (`with_remote_parsing_pinned`): Citus replays it on every later connection of the
/// transaction. `name` is pgseal's (letters, digits, `.` and `_` only).
pub fn send_own_setting(name: &std::ffi::CStr) -> SealResult<()> {
    let name = name.to_str().unwrap_or_default();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
    {
        return Err(crate::error::SealError::Internal("a setting pgseal sends"));
    }
    let _pinning = Pinning::start();
    Spi::run(&format!(
        "DO $pgseal$ BEGIN SET LOCAL {name} FROM CURRENT; END $pgseal$"
    ))?;
    Ok(())
}

/// pgseal's parse settings, sent to every connection of the transaction.
const PIN: &str = "DO $pgseal$ BEGIN SET LOCAL search_path TO pg_catalog, pg_temp; \
                   SET LOCAL standard_conforming_strings TO on; END $pgseal$";
