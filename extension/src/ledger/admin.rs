//! Checkpoints, the checkpoint public key, pruning, and tenant resolution for the
//! SQL-side export.

use std::cell::Cell;

use pgrx::prelude::*;
use pgseal_core::checkpoint;
use pgseal_core::ledger::Hash;

use crate::error::{OrRaise, SealError, SealResult};
use crate::master;
use crate::privilege::as_owner;

thread_local! {
    /// Set only while `ledger_prune` deletes; the ledger's guard trigger lets
    /// deletes through only then.
    static PRUNING: Cell<bool> = const { Cell::new(false) };
}

struct PruneGuard;

impl Drop for PruneGuard {
    fn drop(&mut self) {
        PRUNING.with(|p| p.set(false));
    }
}

/// Whether `ledger_prune` is deleting right now; read by the guard trigger.
#[pg_extern(volatile, parallel_unsafe)]
pub fn _ledger_pruning() -> bool {
    PRUNING.with(|p| p.get())
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
    super::heads::flush()
        .and_then(|_| super::resolve_tenant(tenant))
        .or_raise()
}

fn signed_at_now() -> SealResult<String> {
    Spi::get_one::<String>(
        "SELECT pg_catalog.to_char(pg_catalog.now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )?
    .ok_or(SealError::Internal("no timestamp"))
}

/// Signs the tenant's current head (seq, hash) with the Ed25519 key derived from
/// the active master key version. Admin only.
#[pg_extern(volatile, parallel_unsafe)]
fn ledger_checkpoint(tenant: default!(Option<&str>, "NULL")) -> pgrx::JsonB {
    let r = (|| {
        master::require_loaded()?;
        super::require_admin("ledger_checkpoint")?;
        let tenant = super::resolve_tenant(tenant)?;
        // A checkpoint covers committed entries only: this transaction's own
        // appends (already in the heads row once written) may still roll back.
        let (seq, hash) = match super::heads::committed_head(&tenant) {
            Some(head) => head,
            None => {
                let (seq, hash) = as_owner(|| {
                    Spi::get_two_with_args::<i64, Vec<u8>>(
                        "SELECT seq, hash FROM pgseal.ledger_heads WHERE tenant_id = $1",
                        &[tenant.as_str().into()],
                    )
                })
                .map_err(|_| SealError::InvalidArgument("the tenant has no ledger entries"))?;
                let hash: Hash = hash
                    .and_then(|h| h.try_into().ok())
                    .ok_or(SealError::Internal("bad head hash"))?;
                (seq.unwrap_or(0), hash)
            }
        };
        let signed_at = signed_at_now()?;
        let cp = master::with_active(|ver, kek| {
            Ok(checkpoint::sign(kek, ver, &tenant, seq, &hash, &signed_at))
        })?;
        serde_json::to_value(&cp).map_err(|_| SealError::Internal("checkpoint serialisation"))
    })();
    pgrx::JsonB(r.or_raise())
}

/// The Ed25519 public key (lowercase hex) that verifies checkpoints signed under
/// the active master key version.
#[pg_extern(volatile, parallel_unsafe)]
fn ledger_public_key() -> String {
    master::with_active(|_, kek| Ok(checkpoint::public_key_hex(kek))).or_raise()
}

/// Deletes `tenant`'s entries below `before_seq`, keeping the last deleted
/// entry's (seq, hash) as the anchor verification starts from, and appends a
/// 'ledger.pruned' entry. Refuses to prune a range that does not verify. Admin only.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn ledger_prune(tenant: &str, before_seq: i64) -> i64 {
    let r = (|| {
        master::require_loaded()?;
        super::require_admin("ledger_prune")?;
        if tenant.is_empty() {
            return Err(SealError::InvalidArgument("tenant must not be empty"));
        }
        crate::vault::require_read_write("ledger_prune")?;
        let head = super::heads::lock(tenant)?;
        let head_seq = head.0;
        if before_seq < 1 || before_seq > head_seq + 1 {
            return Err(SealError::InvalidArgument(
                "before_seq must lie between 1 and the tenant's last seq + 1",
            ));
        }
        let report = super::verify::verify_range(tenant, None, Some(before_seq - 1))?;
        if let Some(f) = report.failure {
            return Err(SealError::ChainCorrupt(f.seq, f.problem.as_str()));
        }
        let Some((anchor_seq, anchor_hash)) = report.last else {
            return Ok(0); // Nothing below before_seq is left to prune.
        };
        let deleted = as_owner(|| -> SealResult<i64> {
            PRUNING.with(|p| p.set(true));
            let _guard = PruneGuard;
            Ok(Spi::get_one_with_args::<i64>(
                "WITH d AS (DELETE FROM pgseal.ledger WHERE tenant_id = $1 AND seq < $2 RETURNING 1) SELECT pg_catalog.count(*) FROM d",
                &[tenant.into(), before_seq.into()],
            )?
            .unwrap_or(0))
        })?;
        super::heads::set_anchor(tenant, head, anchor_seq, &anchor_hash)?;
        let payload = serde_json::json!({
            "before_seq": before_seq,
            "deleted": deleted,
            "anchor_seq": anchor_seq,
            "anchor_hash": hex::encode(anchor_hash),
        });
        super::heads::append(
            tenant,
            "ledger.pruned",
            &payload.to_string(),
            &super::default_actor(),
        )?;
        Ok(deleted)
    })();
    r.or_raise()
}
