//! Tenant context: which tenant the current transaction acts for.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::{OrRaise, SealError, SealResult};
use crate::gucs;

/// Reads a setting by name; `None` when it does not exist.
pub fn read_setting(name: &CStr) -> Option<String> {
    // SAFETY: `name` is a valid NUL-terminated string. With missing_ok = true,
    // GetConfigOption returns NULL for an unknown name instead of raising; a
    // non-NULL result points to a NUL-terminated string owned by the GUC
    // machinery, which we copy before anything can change it.
    unsafe {
        let p = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        if p.is_null() {
            None
        } else {
            Some(CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }
}

/// The current tenant, failing closed: NULL or '' is "no tenant context" (42501).
pub fn tenant() -> SealResult<String> {
    gucs::with_tenant_setting_name(|name| match read_setting(name) {
        Some(t) if !t.is_empty() => Ok(t),
        _ => Err(SealError::NoTenantContext(name.to_string_lossy().into_owned())),
    })
}

/// The tenant this transaction acts for. Fails with SQLSTATE 42501 when the tenant
/// setting (`pgseal.tenant_setting`, default `app.tenant_id`) is unset or empty.
#[pg_extern(stable, parallel_safe)]
pub fn current_tenant() -> String {
    tenant().or_raise()
}
