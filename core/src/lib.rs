//! pgseal-core: the pure-Rust half of pgseal.
//!
//! Everything here is independent of PostgreSQL: sealing values under a data key,
//! wrapping data keys under a master key, the text envelope, the master key ring,
//! redaction, and the tenant ledger: entry hashing, chain verification, signed
//! checkpoints and the export format. The extension crate is a thin binding over these functions.
//! The byte-level formats are specified in `docs/FORMAT.md`, whose vectors the
//! tests in `tests/format_vectors.rs` read.
//!
//! No unsafe code: the one piece that needs it, the locked, dump-excluded memory keys
//! live in, is the `pgseal-keymem` crate, re-exported as [`keys::Locked`] and
//! [`keys::protect_process`].

#![forbid(unsafe_code)]

pub mod aad;
pub mod canonical;
pub mod chain;
pub mod checkpoint;
pub mod envelope;
pub mod error;
pub mod export;
pub mod grant;
pub mod jcs;
pub mod jsonb;
pub mod keyring;
pub mod keys;
pub mod ledger;
pub mod redact;
pub mod wrap;

pub use error::CoreError;
