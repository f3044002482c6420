//! Transaction-end work, registered by the capabilities that need it.
//!
//! `txn` knows no capability. Each one that keeps per-transaction state declares a
//! [`Participant`] (a `const TXN` in its module) with the callbacks it needs, and
//! `_PG_init` hands the list to [`register`]. This module installs PostgreSQL's
//! transaction and subtransaction callbacks and the executor-end hook, and calls the
//! participants from them:
//!
//! - at pre-commit and pre-prepare, each participant's work in the order of
//!   [`Phase`]: the phases that read tables under a snapshot (SPI needs one), all
//!   of them when any has work; then the last phase, which reads none, when it has;
//! - before a prepare, each participant's check (it may refuse the prepare);
//! - when the transaction has ended ([`End`]), and when a subtransaction commits or
//!   aborts;
//! - once the transaction's end is complete (`released`): after every transaction
//!   callback, other extensions' included (Citus sends `COMMIT PREPARED` to the
//!   other nodes from its own, which PostgreSQL calls after pgseal's), when the
//!   transaction's resources are released;
//! - when a statement ends, each participant's statement-end work (the ledger
//!   writes the entries the statement appended, so the next statement sees them).

use std::sync::OnceLock;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::{OrRaise, SealResult};
use crate::pg::snapshot::with_snapshot;

/// The pre-commit phases, run in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Close `WITH HOLD` cursors (`pgseal.strict_context`): first, before anything
    /// that could fail, since a cursor persisted at this commit survives the abort
    /// a later failure causes.
    CloseCursors,
    /// Record the transaction's decrypts in the ledger (appends entries).
    DecryptAudit,
    /// Write seal counts back to `pgseal.tenant_keys`.
    SealCounts,
    /// Write the ledger entries still pending.
    LedgerWrite,
    /// Clear the tenant and user settings (`pgseal.strict_context`, and always in
    /// Citus's sessions): last, so every earlier phase still sees the tenant.
    ClearContext,
}

impl Phase {
    /// Whether the phase's work reads tables (SPI needs a snapshot). The one that
    /// does not is last, so running it after the others keeps the order.
    fn needs_snapshot(self) -> bool {
        self != Phase::ClearContext
    }
}

/// Pre-commit work of one participant.
#[derive(Clone, Copy)]
pub struct PreCommit {
    pub phase: Phase,
    /// Whether there is work; when no participant has any, no snapshot is taken.
    pub has_work: fn() -> bool,
    /// The work; `preparing` is true at PREPARE TRANSACTION.
    pub run: fn(preparing: bool) -> SealResult<()>,
}

/// Work when a statement ends (the executor-end hook).
#[derive(Clone, Copy)]
pub struct StatementEnd {
    /// Checked first, so a statement with nothing to do takes no snapshot.
    pub has_work: fn() -> bool,
    pub run: fn() -> SealResult<()>,
}

/// How a transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Committed,
    Prepared,
    Aborted,
}

/// What a capability does at transaction boundaries; every callback is optional.
#[derive(Clone, Copy)]
pub struct Participant {
    /// Pre-commit work, each in its phase.
    pub pre_commit: &'static [PreCommit],
    /// Runs before the pre-commit work of a PREPARE TRANSACTION; an error refuses it.
    pub before_prepare: Option<fn() -> SealResult<()>>,
    /// Runs after the transaction ended; must not raise.
    pub end: Option<fn(End)>,
    /// Runs once the transaction's end is complete, after every transaction callback
    /// (`committed`: it committed or was prepared); must not raise.
    pub released: Option<fn(committed: bool)>,
    /// A subtransaction (`my`) committed into its parent.
    pub subxact_committed:
        Option<fn(my: pg_sys::SubTransactionId, parent: pg_sys::SubTransactionId)>,
    /// A subtransaction (`my`) aborted.
    pub subxact_aborted: Option<fn(my: pg_sys::SubTransactionId)>,
    /// Work when a statement ends.
    pub statement_end: Option<StatementEnd>,
}

impl Participant {
    /// A participant with no callbacks, for `..Participant::NONE`.
    pub const NONE: Participant = Participant {
        pre_commit: &[],
        before_prepare: None,
        end: None,
        released: None,
        subxact_committed: None,
        subxact_aborted: None,
        statement_end: None,
    };
}

struct Registry {
    all: Vec<Participant>,
    /// The pre-commit work, sorted by phase.
    pre_commit: Vec<PreCommit>,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

fn participants() -> &'static [Participant] {
    REGISTRY.get().map_or(&[], |r| r.all.as_slice())
}

fn pre_commit(preparing: bool) {
    let Some(reg) = REGISTRY.get() else { return };
    let (reads, plain) = reg
        .pre_commit
        .split_at(reg.pre_commit.partition_point(|p| p.phase.needs_snapshot()));
    if reads.iter().any(|p| (p.has_work)()) {
        with_snapshot(|| reads.iter().try_for_each(|p| (p.run)(preparing))).or_raise();
    }
    for p in plain {
        if (p.has_work)() {
            (p.run)(preparing).or_raise();
        }
    }
}

fn ended(how: End) {
    for p in participants() {
        if let Some(f) = p.end {
            f(how);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT => pre_commit(false),
        XACT_EVENT_PRE_PREPARE => {
            for p in participants() {
                if let Some(check) = p.before_prepare {
                    check().or_raise();
                }
            }
            pre_commit(true);
        }
        XACT_EVENT_COMMIT => ended(End::Committed),
        XACT_EVENT_PREPARE => ended(End::Prepared),
        XACT_EVENT_ABORT => ended(End::Aborted),
        _ => {}
    }
}

/// The top transaction's resources are released after PostgreSQL has called every
/// transaction callback; the last phase is where `released` runs.
#[pg_guard]
unsafe extern "C-unwind" fn on_release(
    phase: pg_sys::ResourceReleasePhase::Type,
    is_commit: bool,
    is_top_level: bool,
    _arg: *mut std::ffi::c_void,
) {
    // PostgreSQL calls this for every owner of the tree being released (children
    // first) and, in auxiliary processes, outside any transaction: only the top
    // transaction's own owner counts.
    // SAFETY: reads two of PostgreSQL's globals; no preconditions.
    let top = unsafe {
        pg_sys::CurrentResourceOwner == pg_sys::TopTransactionResourceOwner
            && !pg_sys::TopTransactionResourceOwner.is_null()
    };
    if !is_top_level || !top || phase != pg_sys::ResourceReleasePhase::RESOURCE_RELEASE_AFTER_LOCKS
    {
        return;
    }
    for f in participants().iter().filter_map(|p| p.released) {
        // After a commit an ERROR would become a PANIC: a panic here is logged.
        if std::panic::catch_unwind(|| f(is_commit)).is_err() {
            pgrx::log!("pgseal: work after the end of a transaction failed (see above)");
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => {
            for f in participants().iter().filter_map(|p| p.subxact_committed) {
                f(my, parent);
            }
        }
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
            for f in participants().iter().filter_map(|p| p.subxact_aborted) {
                f(my);
            }
        }
        _ => {}
    }
}

/// The executor-end hook that was installed before ours.
static PREV_EXECUTOR_END: OnceLock<pg_sys::ExecutorEnd_hook_type> = OnceLock::new();

/// Ends the query as PostgreSQL would, then runs the participants' statement-end work.
#[pg_guard]
unsafe extern "C-unwind" fn executor_end(query: *mut pg_sys::QueryDesc) {
    // SAFETY: `query` is the QueryDesc PostgreSQL passed us, handed on unchanged
    // to the previous hook or to the standard implementation, as hooks must.
    unsafe {
        match PREV_EXECUTOR_END.get().copied().flatten() {
            Some(prev) => prev(query),
            None => pg_sys::standard_ExecutorEnd(query),
        }
    }
    for w in participants().iter().filter_map(|p| p.statement_end) {
        if (w.has_work)() {
            with_snapshot(w.run).or_raise();
        }
    }
}

/// Registers the participants, PostgreSQL's callbacks and the executor-end hook;
/// called once from `_PG_init` in the postmaster, so every backend inherits them.
/// End and subtransaction callbacks run in the order of `participants`.
pub fn register(participants: &[Participant]) {
    let mut pre_commit: Vec<PreCommit> = participants
        .iter()
        .flat_map(|p| p.pre_commit.iter().copied())
        .collect();
    pre_commit.sort_by_key(|p| p.phase);
    let fresh = REGISTRY
        .set(Registry {
            all: participants.to_vec(),
            pre_commit,
        })
        .is_ok();
    if !fresh {
        return;
    }
    // SAFETY: all three are plain 'static functions with the signatures PostgreSQL
    // expects; the argument pointer is unused. The hook is chained: the previous
    // one is kept and called first. _PG_init runs once, single-threaded.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
        pg_sys::RegisterResourceReleaseCallback(Some(on_release), std::ptr::null_mut());
        let _ = PREV_EXECUTOR_END.set(pg_sys::ExecutorEnd_hook);
        pg_sys::ExecutorEnd_hook = Some(executor_end);
    }
}
