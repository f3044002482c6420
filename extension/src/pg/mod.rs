//! PostgreSQL plumbing that the SQL surface uses: reads of backend globals and the
//! structures whose layout differs between the versions pgseal builds for. Every
//! direct read of a PostgreSQL global or struct field that is not a pgrx API goes
//! through here, so a new PostgreSQL version is ported in one place.

pub mod compat;
pub mod xact;
