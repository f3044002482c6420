//! Signed checkpoints and the checkpoint public key.
//!
//! `ledger_checkpoint` signs a tenant's committed head only after verifying every
//! entry since the tenant's previous checkpoint (MACs included), and its signed
//! message names that previous checkpoint (docs/FORMAT.md, "Checkpoints", v2), so
//! the checkpoints of a tenant form a chain. Each one is kept in
//! `pgseal.ledger_checkpoints`, which only this code writes (`guard.rs`) and which
//! is unique on (tenant, previous seq): two checkpoints can never extend the same one.
//!
//! The signing key is the database's checkpoint key: a random Ed25519 seed kept
//! wrapped in `pgseal.tenant_keys` (tenant `_pgseal`, purpose `checkpoint`), made on
//! first use and rewrapped by `kek_rewrap` like every other key, so its public key
//! outlives master key rotations. Every checkpoint names the database's `ledger_id`
//! (`pgseal.ledger_identity`, made at CREATE EXTENSION and carried by pg_dump).

use pgrx::prelude::*;
use pgseal_core::checkpoint::{self, Checkpoint, SigningKey, FIRST_PREV};
use pgseal_core::ledger::{parse_hash, Hash};
use pgseal_core::wrap::Purpose;

use super::guard::{self, Scope};
use crate::error::{OrRaise, SealError, SealResult};
use crate::master;
use crate::privilege::as_owner;

const LAST: &str = "SELECT seq, pg_catalog.encode(hash, 'hex'), signed_at, key_version, prev_seq, \
            pg_catalog.encode(prev_hash, 'hex'), pg_catalog.encode(signature, 'hex') \
     FROM pgseal.ledger_checkpoints WHERE tenant_id = $1 ORDER BY seq DESC LIMIT 1";

const STORE: &str = "INSERT INTO pgseal.ledger_checkpoints \
       (tenant_id, seq, hash, signed_at, key_version, prev_seq, prev_hash, signature) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING RETURNING 1";

fn signed_at_now() -> SealResult<String> {
    Spi::get_one::<String>(
        "SELECT pg_catalog.to_char(pg_catalog.now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )?
    .ok_or(SealError::Internal("no timestamp"))
}

/// The tenant's committed head. A checkpoint covers committed entries only: this
/// transaction's own appends (already in the table once written) may still roll
/// back, so a tenant this transaction appended to is signed at the head it read
/// before its first append.
fn committed_head(tenant: &str) -> SealResult<(i64, Hash)> {
    if let Some(head) = super::heads::committed_head(tenant) {
        return Ok(head);
    }
    as_owner(|| super::verify::recorded_head(tenant))?.ok_or(SealError::InvalidArgument(
        "the tenant has no ledger entries",
    ))
}

/// The database's ledger id. A restore adds the dumped row next to the one its own
/// CREATE EXTENSION made; the older one, the original, is the ledger's id.
fn current_ledger_id() -> SealResult<String> {
    as_owner(|| {
        Spi::get_one::<String>(
            "SELECT ledger_id FROM pgseal.ledger_identity ORDER BY created_at, ledger_id LIMIT 1",
        )
    })
    .ok()
    .flatten()
    .ok_or(SealError::Internal("pgseal.ledger_identity is empty"))
}

/// The checkpoint key, made (and stored wrapped) on first use.
fn checkpoint_key() -> SealResult<SigningKey> {
    let (_, seed) =
        crate::keystore::ensure_active(super::names::SYSTEM_TENANT, Purpose::Checkpoint)?;
    Ok(checkpoint::key_from_seed(&seed))
}

/// The tenant's newest stored checkpoint.
fn last_stored(tenant: &str) -> SealResult<Option<Checkpoint>> {
    let ledger_id = current_ledger_id()?;
    as_owner(|| {
        Spi::connect(|client| {
            let rows = client.select(LAST, Some(1), &[tenant.into()])?;
            let Some(r) = rows.into_iter().next() else {
                return Ok(None);
            };
            let text = |i| -> SealResult<String> {
                r.get::<String>(i)?
                    .ok_or(SealError::Internal("NULL in pgseal.ledger_checkpoints"))
            };
            let int8 = |i| -> SealResult<i64> {
                r.get::<i64>(i)?
                    .ok_or(SealError::Internal("NULL in pgseal.ledger_checkpoints"))
            };
            Ok(Some(Checkpoint {
                tenant: tenant.to_owned(),
                seq: int8(1)?,
                hash: text(2)?,
                signed_at: text(3)?,
                key_version: r
                    .get::<i32>(4)?
                    .ok_or(SealError::Internal("NULL in pgseal.ledger_checkpoints"))?
                    as u32,
                ledger_id: Some(ledger_id),
                prev_seq: Some(int8(5)?),
                prev_hash: Some(text(6)?),
                signature: text(7)?,
            }))
        })
    })
}

/// Keeps `cp`; fails with 40001 when a concurrent transaction stored a checkpoint
/// extending the same previous one (or at the same seq) first.
fn store(cp: &Checkpoint, hash: &Hash, prev_hash: &Hash) -> SealResult<()> {
    let signature =
        hex::decode(&cp.signature).map_err(|_| SealError::Internal("signature is not hex"))?;
    let stored = as_owner(|| {
        guard::with_scope(Scope::Checkpoint, || {
            Spi::connect_mut(|client| {
                let rows = client.update(
                    STORE,
                    Some(1),
                    &[
                        cp.tenant.as_str().into(),
                        cp.seq.into(),
                        hash.to_vec().into(),
                        cp.signed_at.as_str().into(),
                        (cp.key_version as i32).into(),
                        cp.prev_seq.unwrap_or(0).into(),
                        prev_hash.to_vec().into(),
                        signature.into(),
                    ],
                )?;
                Ok::<_, SealError>(!rows.is_empty())
            })
        })
    })?;
    if stored {
        Ok(())
    } else {
        Err(SealError::Conflict(
            "a concurrent pgseal.ledger_checkpoint() for this tenant was stored first; retry",
        ))
    }
}

/// Verifies the tenant's chain since its previous checkpoint, then signs its
/// committed head (seq, hash), the ledger id and the previous checkpoint's (seq,
/// hash) with the database's checkpoint key, and keeps the
/// checkpoint. Returns the previous checkpoint again when the head has not moved.
/// Admin only.
#[pg_extern(volatile, parallel_unsafe)]
fn ledger_checkpoint(tenant: default!(Option<&str>, "NULL")) -> pgrx::JsonB {
    let r = (|| {
        master::require_loaded()?;
        super::access::require_admin("ledger_checkpoint")?;
        let tenant = super::access::resolve_tenant(tenant)?;
        crate::pg::xact::require_read_write("ledger_checkpoint")?;
        let (seq, hash) = committed_head(&tenant)?;
        let last = last_stored(&tenant)?;
        let prev: (i64, Hash) = match &last {
            Some(cp) => (
                cp.seq,
                parse_hash(&cp.hash).ok_or(SealError::Internal("bad checkpoint hash"))?,
            ),
            None => FIRST_PREV,
        };
        if seq <= prev.0 {
            return match last {
                Some(cp) if seq == prev.0 && hash == prev.1 => Ok(cp),
                // The head is behind, or elsewhere than, what was signed.
                Some(_) => Err(SealError::ChainCorrupt(seq.min(prev.0), "hash mismatch")),
                None => Err(SealError::InvalidArgument(
                    "the tenant has no committed ledger entries",
                )),
            };
        }
        let report = super::verify::verify_since(&tenant, prev, (seq, hash))?;
        if let Some(f) = report.failure {
            return Err(SealError::ChainCorrupt(f.seq, f.problem.as_str()));
        }
        let signed_at = signed_at_now()?;
        let ledger_id = current_ledger_id()?;
        let key = checkpoint_key()?;
        let ver = master::with_active(|ver, _| Ok(ver))?;
        let cp = checkpoint::sign_after(
            &key,
            ver,
            &ledger_id,
            &tenant,
            (seq, &hash),
            (prev.0, &prev.1),
            &signed_at,
        );
        store(&cp, &hash, &prev.1)?;
        Ok(cp)
    })();
    let cp = r.or_raise();
    pgrx::JsonB(
        serde_json::to_value(&cp)
            .map_err(|_| SealError::Internal("checkpoint serialisation"))
            .or_raise(),
    )
}

/// The Ed25519 public key (lowercase hex) of the database's checkpoint key, which
/// verifies every (v2) checkpoint it signed, before and after master key rotations.
/// Makes the key on first use by a member of `pgseal_admin` (which needs a
/// read-write transaction); before that, other callers get 55000: making it takes
/// the key-creation lock of pgseal's system chain, which only trusted roles take.
#[pg_extern(volatile, parallel_unsafe)]
fn ledger_public_key() -> String {
    public_key().or_raise()
}

fn public_key() -> SealResult<String> {
    master::require_loaded()?;
    if !super::access::is_admin()? {
        let stored = as_owner(|| {
            crate::keystore::fetch_active(super::names::SYSTEM_TENANT, Purpose::Checkpoint)
        })?
        .ok_or(SealError::Refused(
            "the checkpoint key is made by pgseal_admin's first ledger_checkpoint or ledger_public_key",
        ))?;
        let seed = stored.unwrap_key()?;
        return Ok(checkpoint::verifying_key_hex(&checkpoint::key_from_seed(
            &seed,
        )));
    }
    checkpoint_key().map(|k| checkpoint::verifying_key_hex(&k))
}

/// The database's ledger id (32 lowercase hex characters), named by every checkpoint.
#[pg_extern(stable, parallel_unsafe)]
fn ledger_id() -> String {
    current_ledger_id().or_raise()
}
