//! PostgreSQL plumbing: code that relies on PostgreSQL's internal contracts rather
//! than on pgrx's safe API. Read `README.md` here before editing any of it.
//!
//! - `citus`: whether Citus is installed, and whether this node is a Citus worker;
//! - `citus_clock`: refuses Citus's transaction clock after pgseal's statements as
//!   another role (it calls a function over those roles' connections);
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
//! - `plaintext`: `vault_decrypt`'s result written in place;
//! - `libpq`: a client connection to another node through the libpq Citus loaded;
//! - `shard_nodes`: a statement on each node that holds a Citus table's shards.

/// Declares the version-1 calling convention record PostgreSQL's loader looks up
/// for a C function of pgseal's library that pgrx does not declare (`#[pg_extern]`
/// writes it for its own): `v1_finfo!(pg_finfo_<symbol>)` next to the
/// `#[unsafe(no_mangle)]` function `<symbol>`.
macro_rules! v1_finfo {
    ($finfo:ident) => {
        #[unsafe(no_mangle)]
        #[doc(hidden)]
        pub extern "C" fn $finfo() -> &'static ::pgrx::pg_sys::Pg_finfo_record {
            const V1: ::pgrx::pg_sys::Pg_finfo_record =
                ::pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}
pub(crate) use v1_finfo;

pub mod citus;
pub mod citus_clock;
pub mod compat;
pub mod head_read;
pub mod head_write;
pub mod jsonb;
mod ledger_append_fn;
pub mod libpq;
pub mod plaintext;
pub mod plans;
pub mod rls_guard;
pub mod shard_nodes;
pub mod snapshot;
pub mod xact;
