//! The tenant ledger: appends, verification, checkpoints, pruning, audit capture.
//!
//! The append path, in the order an entry takes it:
//! - `append`: `ledger_append`'s checks, then the entry's commitment, hash and MAC;
//! - `chain_lock`: the tenant's chain lock and head, on its first append in a
//!   transaction; `heads` keeps the head for the transaction's later appends and
//!   publishes it at commit to `shared_heads`, where the next holder of the lock
//!   takes it;
//! - `pending`: the entries appended and not yet written, by subtransaction;
//! - `writer`: writes them in batches (one tenant at a time), at statement
//!   end, past a bound, before a read of the chain, and at pre-commit;
//! - `mac`: each tenant's MAC key; `actor`: the actor and `db_role` an entry names.
//!
//! And around it:
//! - `verify`: `ledger_verify`, reading the chain back through `pgseal-core`;
//! - `access`: who may act on which tenant's ledger;
//! - `admin`: pruning, and tenant resolution for exports;
//! - `checkpoints`: signed checkpoints (each extends the tenant's previous one) and
//!   the public key;
//! - `guard`: the write guard on the ledger's tables, and the scopes pgseal writes in;
//! - `audit`: row triggers and the per-transaction decrypt audit;
//! - `names`: pgseal's own chains and reserved event names;
//! - `evidence`: the entries recorded for every change that affects protection;
//! - `erase`: erasing the payloads of a data subject's entries (issue 19);
//! - `forward`: `ledger_append` on a Citus worker, appended on the coordinator.
//!
//! Its transaction-end work is `TXN`, registered with `txn`.

pub mod access;
pub mod actor;
pub mod admin;
pub mod append;
pub mod audit;
mod audit_trigger;
mod chain_lock;
mod checkpoints;
pub mod erase;
pub mod evidence;
mod forward;
pub(crate) mod guard;
pub mod heads;
pub mod mac;
pub mod names;
pub(crate) mod pending;
pub mod shared_heads;
pub mod verify;
pub mod writer;

use pgrx::pg_sys;

use crate::txn::{End, Participant, Phase, PreCommit, StatementEnd};

/// Microseconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01 (UTC).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// The ledger's transaction-end work: the decrypt audit is recorded at
/// pre-commit; pending entries are written when the statement that appended them
/// ends and at pre-commit; a subtransaction abort drops what it appended.
pub const TXN: Participant = Participant {
    pre_commit: &[
        PreCommit {
            phase: Phase::DecryptAudit,
            has_work: audit::has_pending,
            run: audit::flush_decrypts,
        },
        PreCommit {
            phase: Phase::LedgerWrite,
            has_work: pending::has_pending,
            run: write_pending,
        },
    ],
    before_prepare: Some(refuse_prepare_holding_pgseal_chains),
    end: Some(transaction_ended),
    subxact_committed: Some(subtransaction_committed),
    subxact_aborted: Some(subtransaction_aborted),
    statement_end: Some(StatementEnd {
        has_work: pending::has_pending,
        run: writer::flush,
    }),
    ..Participant::NONE
};

/// A prepared transaction keeps its locks after its session ends, beyond every idle
/// timeout: one that holds a lock of pgseal's own chains (it appended there: a
/// protection change or a TRUNCATE outside a tenant context, a registration; or
/// pruned one, or made the checkpoint key) would keep every other such change
/// waiting until an administrator ends it.
fn refuse_prepare_holding_pgseal_chains() -> crate::error::SealResult<()> {
    if crate::locks::holds_pgseal_chain_lock() {
        return Err(crate::error::SealError::NotSupported(
            "a transaction holding a lock of pgseal's own chains (_pgseal…) cannot be prepared",
        ));
    }
    Ok(())
}

fn write_pending(_preparing: bool) -> crate::error::SealResult<()> {
    writer::flush()
}

/// Transaction end: hands the decrypt audit's unrecorded counts on, keeps the MAC
/// keys a committed (not a prepared) transaction used, and forgets every head and
/// pending entry.
fn transaction_ended(how: End) {
    audit::transaction_ended(match how {
        End::Committed => "committed",
        End::Prepared => "prepared",
        End::Aborted => "rolled back",
    });
    actor::forget();
    // A prepared transaction may still be rolled back (ROLLBACK PREPARED, or Citus
    // rolling back a worker's forwarded entry), taking a key it made with it: its
    // keys are read again by the next transaction that needs them.
    mac::transaction_ended(how == End::Committed);
    crate::pg::head_read::forget_relids();
    guard::reset();
    heads::transaction_ended(how == End::Committed, how == End::Prepared);
    shared_heads::transaction_ended();
    crate::locks::transaction_ended();
    pending::clear();
    audit::reset();
}

/// A subtransaction committed: its pending entries pass to its parent.
fn subtransaction_committed(subxact: pg_sys::SubTransactionId, parent: pg_sys::SubTransactionId) {
    pending::subtransaction_committed(subxact, parent);
}

/// A subtransaction aborted: keys it may have created are forgotten, its pending
/// entries go, and every chain head is re-read before its next use.
fn subtransaction_aborted(subxact: pg_sys::SubTransactionId) {
    mac::subtransaction_aborted();
    pending::subtransaction_aborted(subxact);
    heads::mark_stale();
}
