//! The documented maximum sizes of what callers pass to pgseal (README, "Limits").
//! Each is checked before any key, row or index sees the value, and refused with
//! 54000 and a message that names the argument, never its value.

use crate::error::{SealError, SealResult};

/// Tenant ids: the tenant setting and every tenant argument.
pub const TENANT: usize = 256;
/// A sealed value's context (bound into its authentication).
pub const CONTEXT: usize = 1024;
/// Ledger event names.
pub const EVENT: usize = 1024;
/// Ledger actors.
pub const ACTOR: usize = 1024;
/// A data subject's id in a ledger entry (`subjects`), and a subject argument.
pub const SUBJECT: usize = 256;
/// How many subjects one ledger entry may name.
pub const SUBJECTS: usize = 64;
/// A plaintext to seal (16 MiB): its sealed form must stay far below PostgreSQL's
/// 1 GB value limit, and credentials are small.
pub const PLAINTEXT: usize = 16 << 20;

/// Refuses `value` when it is longer than `max` bytes; `what` names the argument.
pub fn check(what: &'static str, value: &str, max: usize) -> SealResult<()> {
    if value.len() > max {
        return Err(SealError::TooLong { what, max });
    }
    Ok(())
}

pub fn tenant(value: &str) -> SealResult<()> {
    check("tenant id", value, TENANT)
}

/// A tenant passed as an argument (not read from the setting, which
/// `context::tenant` checks): not empty (22023), and within `TENANT` (54000).
pub fn tenant_arg(value: &str) -> SealResult<()> {
    if value.is_empty() {
        return Err(SealError::InvalidArgument("tenant must not be empty"));
    }
    tenant(value)
}

pub fn context(value: Option<&str>) -> SealResult<()> {
    value.map_or(Ok(()), |c| check("context", c, CONTEXT))
}
