//! Who may act on which tenant's ledger.

use crate::context;
use crate::error::{SealError, SealResult};

/// Whether the current user may act on `tenant`'s ledger: its own tenant, or any
/// tenant for members of `pgseal_admin`.
pub fn resolve_tenant(tenant: Option<&str>) -> SealResult<String> {
    match tenant {
        None => context::tenant(),
        Some(t) => {
            crate::limits::tenant_arg(t)?;
            let own = context::tenant().ok();
            if own.as_deref() == Some(t) || is_admin()? {
                Ok(t.to_owned())
            } else {
                Err(SealError::NotAdmin("acting on another tenant's ledger"))
            }
        }
    }
}

/// Whether the current user is a member of `pgseal_admin` (superusers are).
pub fn is_admin() -> SealResult<bool> {
    Ok(
        pgrx::Spi::get_one::<bool>("SELECT pg_catalog.pg_has_role('pgseal_admin', 'MEMBER')")?
            .unwrap_or(false),
    )
}

/// Fails unless the current user is a member of `pgseal_admin`.
pub fn require_admin(what: &'static str) -> SealResult<()> {
    if is_admin()? {
        Ok(())
    } else {
        Err(SealError::NotAdmin(what))
    }
}
