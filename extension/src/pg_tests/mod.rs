//! In-process tests, run by `cargo pgrx test` (see scripts/pgtest.sh).
mod evidence;
mod grants;
mod helpers;
mod jobs;
mod ledger;
mod offboard;
mod subjects;
mod tenancy;
mod vault;
