//! In-process tests, run by `cargo pgrx test` (see scripts/pgtest.sh).
mod vault;
mod ledger;
mod tenancy;
mod jobs;
