//! pgseal-core: the pure-Rust half of pgseal.
//!
//! Everything here is independent of PostgreSQL: sealing values under a data key,
//! wrapping data keys under a master key, the text envelope, the master key ring,
//! and redaction. The extension crate is a thin binding over these functions.
//! The byte-level formats are specified in `docs/FORMAT.md`, whose vectors the
//! tests in `tests/format_vectors.rs` read.

pub mod aad;
pub mod envelope;
pub mod error;
pub mod keyring;
pub mod keys;
pub mod redact;
pub mod wrap;

pub use error::CoreError;
