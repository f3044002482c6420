//! Pruning, and tenant resolution for the SQL-side export.

use pgrx::prelude::*;

use super::guard::{self, Scope};
use crate::error::{OrRaise, SealError, SealResult};
use crate::master;
use crate::privilege::as_owner;

/// Whether `ledger_prune` is deleting right now; read by the guard trigger.
#[pg_extern(volatile, parallel_unsafe)]
pub fn _ledger_pruning() -> bool {
    guard::active(Scope::Prune)
}

/// Whether an extension script is running (CREATE or ALTER EXTENSION); the DDL
/// guard lets the extension's own scripts change its tables.
#[pg_extern(volatile, parallel_unsafe)]
pub fn _creating_extension() -> bool {
    // SAFETY: a plain bool global maintained by the extension machinery.
    unsafe { pgrx::pg_sys::creating_extension }
}

/// The tenant an export may read: the caller's own, or any for `pgseal_admin`.
#[pg_extern(volatile, parallel_unsafe)]
pub fn _ledger_tenant(tenant: Option<&str>) -> String {
    // The export reads the table next: this transaction's appends go in first.
    super::writer::flush()
        .and_then(|_| super::access::resolve_tenant(tenant))
        .or_raise()
}

/// Whether `tenant` is under a legal hold (`pgseal.retention_hold`).
pub(crate) fn on_hold(tenant: &str) -> SealResult<bool> {
    as_owner(|| {
        Ok(Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pgseal.retention_holds h WHERE h.tenant_id = $1)",
            &[tenant.into()],
        )?
        .unwrap_or(true))
    })
}

/// The first seq of `chain` that a retention hold keeps
/// (`pgseal._ledger_held_from`, sql/offboarding.sql: a held tenant's chain, and in
/// the audit writer's chain the records of a held tenant's decrypts), or None.
fn held_from(chain: &str) -> SealResult<Option<i64>> {
    as_owner(|| {
        Ok(Spi::get_one_with_args::<i64>(
            "SELECT pgseal._ledger_held_from($1)",
            &[chain.into()],
        )?)
    })
}

/// Fails (55000) when an entry below `before_seq` is younger than
/// `pgseal.ledger_min_retention`.
fn require_retained(tenant: &str, before_seq: i64) -> SealResult<()> {
    let keep = crate::gucs::ledger_min_retention();
    let (negative, young) = as_owner(|| {
        Spi::get_two_with_args::<bool, bool>(
            "SELECT $3::pg_catalog.interval OPERATOR(pg_catalog.<) '0'::pg_catalog.interval, \
                    EXISTS (SELECT 1 FROM pgseal.ledger l WHERE l.tenant_id = $1 AND l.seq < $2 \
                              AND l.recorded_at > pg_catalog.now() - $3::pg_catalog.interval)",
            &[tenant.into(), before_seq.into(), keep.as_str().into()],
        )
    })?;
    if negative != Some(false) {
        return Err(SealError::InvalidArgument(
            "pgseal.ledger_min_retention must not be negative",
        ));
    }
    if young != Some(false) {
        return Err(SealError::Refused(
            "ledger entries younger than pgseal.ledger_min_retention are kept",
        ));
    }
    Ok(())
}

/// Deletes `tenant`'s entries below `before_seq`, keeping the last deleted
/// entry's (seq, hash) as the anchor verification starts from, and appends a
/// 'ledger.pruned' entry that records the anchor. Refuses to prune a range that
/// does not verify, entries younger than `pgseal.ledger_min_retention`, and a
/// tenant under a retention hold. Admin only.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn ledger_prune(tenant: &str, before_seq: i64) -> i64 {
    let r = (|| {
        master::require_loaded()?;
        super::access::require_admin("ledger_prune")?;
        crate::limits::tenant_arg(tenant)?;
        crate::pg::xact::require_read_write("ledger_prune")?;
        let head = super::chain_lock::lock(tenant)?;
        let head_seq = head.0;
        if before_seq < 1 || before_seq > head_seq + 1 {
            return Err(SealError::InvalidArgument(
                "before_seq must lie between 1 and the tenant's last seq + 1",
            ));
        }
        if on_hold(tenant)? {
            return Err(SealError::Refused(
                "the tenant is under a retention hold: its ledger is not pruned",
            ));
        }
        if tenant == super::names::AUDIT_CHAIN && held_from(tenant)?.is_some_and(|s| s < before_seq)
        {
            return Err(SealError::Refused(
                "decrypt records of a tenant under a retention hold lie in the range: _pgseal_audit is not pruned past them",
            ));
        }
        require_retained(tenant, before_seq)?;
        let report = super::verify::verify_range(tenant, None, Some(before_seq - 1))?;
        if let Some(f) = report.failure {
            return Err(SealError::ChainCorrupt(f.seq, f.problem.as_str()));
        }
        let Some((anchor_seq, anchor_hash)) = report.last else {
            return Ok(0); // Nothing below before_seq is left to prune.
        };
        let deleted = as_owner(|| -> SealResult<i64> {
            guard::with_scope(Scope::Prune, || {
                Ok(Spi::get_one_with_args::<i64>(
                    "WITH d AS (DELETE FROM pgseal.ledger WHERE tenant_id = $1 AND seq < $2 RETURNING 1) SELECT pg_catalog.count(*) FROM d",
                    &[tenant.into(), before_seq.into()],
                )?
                .unwrap_or(0))
            })
        })?;
        set_anchor(tenant, head, anchor_seq, &anchor_hash)?;
        let payload = serde_json::json!({
            "before_seq": before_seq,
            "deleted": deleted,
            "anchor_seq": anchor_seq,
            "anchor_hash": hex::encode(anchor_hash),
        });
        super::append::append(
            tenant,
            "ledger.pruned",
            &payload.to_string(),
            &super::actor::default_actor(),
        )?;
        Ok(deleted)
    })();
    r.or_raise()
}

/// Sets a tenant's anchor after pruning, with the head `(seq, hash)` the caller
/// locked (it may be past the committed one); the caller holds the tenant's lock.
fn set_anchor(
    tenant: &str,
    head: (i64, pgseal_core::ledger::Hash),
    anchor_seq: i64,
    anchor_hash: &pgseal_core::ledger::Hash,
) -> SealResult<()> {
    super::heads::take_row(tenant);
    as_owner(|| {
        super::guard::with_scope(super::guard::Scope::Prune, || {
            Spi::run_with_args(
                "UPDATE pgseal.ledger_heads SET seq = $4, hash = $5, anchor_seq = $2, anchor_hash = $3 WHERE tenant_id = $1",
                &[tenant.into(), anchor_seq.into(), anchor_hash.to_vec().into(), head.0.into(), head.1.to_vec().into()],
            )
        })?;
        Ok(())
    })
}
