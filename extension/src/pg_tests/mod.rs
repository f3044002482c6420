//! In-process tests, run by `cargo pgrx test` (see scripts/pgtest.sh).
mod evidence;
mod grants;
mod helpers;
mod jobs;
mod ledger;
mod tenancy;
mod vault;
