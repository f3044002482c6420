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
//! - `writer`: one worker per database, appending the queued entries.

mod client;
mod launcher;
pub mod queue;
mod writer;

pub use client::{append_durably, append_later, Entry};
pub use launcher::register;
