//! PostgreSQL plumbing: code that relies on PostgreSQL's internal contracts rather
//! than on pgrx's safe API. Read `README.md` here before editing any of it.
//!
//! - `citus`: whether Citus is installed, and whether this node is a Citus worker;
//! - `compat`: structures whose layout differs between the versions pgseal builds for;
//! - `rls_guard`: refuses COPY FROM, and INSERT … SELECT that Citus copies, into a
//!   table under row level security, before Citus can write without the check;
//! - `xact`: reads of transaction globals (read-only, recovery);
//! - `snapshot`: the active snapshot SPI needs outside a statement;
//! - `plans`: SPI plans kept for the life of the backend;
//! - `head_read`, `head_write`: a chain's head read, and its entries written,
//!   without SPI;
//! - `ledger_append_fn`: `ledger_append`'s materialize-mode C entry point;
//! - `jsonb`: `jsonb` arguments read through `jsonb_out`;
//! - `plaintext`: `vault_decrypt`'s result written in place.

pub mod citus;
pub mod compat;
pub mod head_read;
pub mod head_write;
pub mod jsonb;
mod ledger_append_fn;
pub mod plaintext;
pub mod plans;
pub mod rls_guard;
pub mod snapshot;
pub mod xact;
