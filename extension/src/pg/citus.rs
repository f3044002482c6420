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
