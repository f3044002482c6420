//! The decrypt audit's background workers (docs/SECURITY.md, "Decrypt audit").
//!
//! With `pgseal.audit_decrypt = on`, the first decrypt of a key in a transaction must
//! be on disk before its plaintext is returned, whatever the transaction does next.
//! A backend cannot commit part of its own transaction, so it hands the entry to a
//! writer process that appends and commits it in a transaction of its own:
//!
//! - `queue`: the shared-memory request slots between backends and writers;
//! - `client`: the backend's side (wait for the commit, or hand over and go on);
//! - `launcher`: the worker registered from `_PG_init`, which starts writers;
//! - `writer`: one worker per database, appending the queued entries (and, on a
//!   Citus worker, adding its seal counts on the coordinator);
//! - `coordinator`: a Citus worker's writer's connection to the coordinator, kept
//!   across entries.

mod client;
mod coordinator;
mod launcher;
pub mod queue;
mod writer;

pub use client::{
    append_durably, append_later, drain_seal_counts_later, prepared_committed, seal_counts_later,
    Entry,
};
pub use launcher::register;
pub use writer::is_writer;

use pgrx::prelude::*;

/// `pgseal.audit_queue_status()`: whether the launcher runs, how many writers run,
/// and how many of the queue's request slots are in use (monitoring; pgseal_admin).
#[pg_extern(volatile, parallel_safe)]
fn audit_queue_status() -> TableIterator<
    'static,
    (
        name!(launcher_running, bool),
        name!(writers, i32),
        name!(slots, i32),
        name!(slots_in_use, i32),
    ),
> {
    let q = queue::QUEUE.share();
    let writers = q.writers.iter().filter(|w| w.pid != 0).count() as i32;
    let in_use = q
        .slots
        .iter()
        .filter(|s| s.state != queue::State::Free)
        .count() as i32;
    TableIterator::once((q.launcher_pid != 0, writers, queue::SLOTS as i32, in_use))
}
