//! The vault's SQL functions: seal, decrypt, redact, rewrap, and key administration.
//!
//! Privileges are granted in `sql/finalize.sql`; these functions run as the caller
//! and switch to the extension owner only around their own table access.

use pgrx::prelude::*;
use pgseal_core::envelope::{self, Envelope};
use pgseal_core::redact::redact;
use pgseal_core::wrap::Purpose;
use zeroize::Zeroizing;

use crate::cache;
use crate::context;
use crate::error::{OrRaise, SealError, SealResult};
use crate::keystore;
use crate::ledger::evidence;
use crate::limits;
use crate::master;
use crate::pg::plaintext::PlainText;
use crate::pg::xact::require_read_write;

fn seal_for_tenant(tenant: &str, plaintext: &str, context: Option<&str>) -> SealResult<String> {
    limits::check("plaintext", plaintext, limits::PLAINTEXT)?;
    limits::context(context)?;
    let key = cache::active_key(tenant, Purpose::Dek)?;
    seal_under(&key, tenant, plaintext, context)
}

/// Seals `plaintext` under `key`, the tenant's active data key as `cache::active_key`
/// just returned it (having checked the key's encryption limit), after the caller's
/// checks of the plaintext and context; counts the seal (`cache::note_seal`).
fn seal_under(
    key: &cache::LiveKey,
    tenant: &str,
    plaintext: &str,
    context: Option<&str>,
) -> SealResult<String> {
    let sealed = envelope::seal(
        &key.cipher,
        tenant,
        &key.key_id,
        context,
        plaintext.as_bytes(),
    );
    cache::note_seal(&key.key_id);
    Ok(sealed)
}

/// Opens a sealed value for the current tenant.
fn open_for_current(
    sealed: &str,
    context: Option<&str>,
) -> SealResult<(
    std::rc::Rc<str>,
    std::rc::Rc<cache::LiveKey>,
    Zeroizing<String>,
)> {
    master::require_loaded()?;
    limits::context(context)?;
    let tenant = context::tenant_shared()?;
    let env = Envelope::parse(sealed)?;
    let key = tenant_key(&tenant, env.key_id)?;
    let plain = envelope::open_text(&key.cipher, &tenant, context, env)?;
    Ok((tenant, key, plain))
}

/// The data key `key_id`, which must belong to `tenant`.
fn tenant_key(tenant: &str, key_id: &str) -> SealResult<std::rc::Rc<cache::LiveKey>> {
    let key = cache::key_by_id(key_id)?;
    if key.tenant != tenant || key.purpose != Purpose::Dek {
        return Err(SealError::WrongTenant);
    }
    Ok(key)
}

/// A seal counts against its key's limit at its transaction's commit, which a
/// parallel worker's never reaches for it.
const SEAL_IN_PARALLEL_WORKER: &str = "vault_seal and vault_rewrap cannot run in a parallel worker, where their seals would go uncounted against the key's limit (mark the function around them PARALLEL UNSAFE)";

/// Seals `plaintext` for the current tenant under its active data key.
/// Returns `v2:<keyId>:<base64url(nonce ‖ ciphertext ‖ tag)>`.
#[pg_extern(volatile, parallel_unsafe)]
fn vault_seal(plaintext: Option<&str>, context: default!(Option<&str>, "NULL")) -> Option<String> {
    let plaintext = plaintext?;
    let r = (|| {
        crate::pg::xact::require_not_parallel_worker(SEAL_IN_PARALLEL_WORKER)?;
        master::require_loaded()?;
        let tenant = context::tenant()?;
        require_read_write("vault_seal")?;
        seal_for_tenant(&tenant, plaintext, context)
    })();
    Some(r.or_raise())
}

/// Decrypts a value sealed for the current tenant. NULL in gives NULL out.
#[pg_extern(volatile, parallel_unsafe)]
fn vault_decrypt(
    sealed: Option<&str>,
    context: default!(Option<&str>, "NULL"),
) -> Option<PlainText> {
    let sealed = sealed?;
    crate::ledger::audit::before_decrypt().or_raise();
    Some(decrypt_to_text(sealed, context).or_raise())
}

/// Decodes and decrypts straight into the result text (see `pg/plaintext.rs`). The
/// checks run in the order `open_for_current`'s do: envelope shape (22P02), then
/// the key (22023, or 42501 for another tenant's), then authentication.
fn decrypt_to_text(sealed: &str, context: Option<&str>) -> SealResult<PlainText> {
    master::require_loaded()?;
    limits::context(context)?;
    let tenant = context::tenant_shared()?;
    let (key_id, b64) = envelope::split(sealed)?;
    let mut used_key = None;
    let text = PlainText::fill(envelope::decoded_len_max(b64.len()), |out| {
        let n = envelope::decode_into(b64, out)?;
        let key = tenant_key(&tenant, key_id)?;
        // With pgseal.audit_decrypt = on this waits until the decrypt is on record,
        // before the plaintext exists.
        crate::ledger::audit::before_open(&key.key_id, &tenant, context)?;
        let len =
            envelope::open_text_in_place(&key.cipher, &tenant, context, key_id, &mut out[..n])?;
        used_key = Some(key);
        Ok::<_, SealError>(len)
    })?;
    if let Some(key) = used_key {
        crate::ledger::audit::note_decrypt(&key.key_id, &tenant, context);
    }
    Ok(text)
}

/// A display value: the first `visible` characters and `…`, never more than a
/// quarter of the secret. It needs no decrypt privilege. `context` must match the
/// one used at seal time (it is an addition to the documented two-argument form,
/// because a context-bound value cannot be opened without its context).
#[pg_extern(volatile, parallel_unsafe)]
fn vault_redact(
    sealed: Option<&str>,
    visible: default!(Option<i32>, 4),
    context: default!(Option<&str>, "NULL"),
) -> Option<String> {
    let sealed = sealed?;
    let Some(visible) = visible else {
        SealError::NullArgument("visible").raise()
    };
    if visible < 0 {
        SealError::InvalidArgument("visible must not be negative").raise();
    }
    let (_, _, plain) = open_for_current(sealed, context).or_raise();
    Some(redact(&plain, visible as usize))
}

/// Reseals a value under the tenant's active key. The plaintext never leaves the
/// function. A value already under the active key is returned unchanged.
#[pg_extern(volatile, parallel_unsafe)]
fn vault_rewrap(sealed: Option<&str>, context: default!(Option<&str>, "NULL")) -> Option<String> {
    let sealed = sealed?;
    let r = (|| {
        crate::pg::xact::require_not_parallel_worker(SEAL_IN_PARALLEL_WORKER)?;
        let (tenant, opened_with, plain) = open_for_current(sealed, context)?;
        require_read_write("vault_rewrap")?;
        let active = cache::active_key(&tenant, Purpose::Dek)?;
        // The key that opened it is the one the value names (`tenant_key`).
        if opened_with.key_id == active.key_id {
            return Ok(sealed.to_owned());
        }
        limits::check("plaintext", &plain, limits::PLAINTEXT)?;
        seal_under(&active, &tenant, &plain, context)
    })();
    Some(r.or_raise())
}

/// Creates a new active data key for `tenant` and returns its key id. Old keys keep
/// decrypting. Recorded in the tenant's ledger (`key.rotated`).
#[pg_extern(volatile, parallel_unsafe, strict)]
fn tenant_key_rotate(tenant: &str) -> String {
    let r = (|| {
        limits::tenant_arg(tenant)?;
        master::require_loaded()?;
        require_read_write("tenant_key_rotate")?;
        let (stored, _) = cache::rotate(tenant, Purpose::Dek)?;
        cache::forget_all();
        Ok(stored.key_id)
    })();
    r.or_raise()
}

/// Rewraps up to `batch` tenant keys that are not under the active master key
/// version; returns how many it did (0 means done). Sealed rows are not touched.
/// A call that moved keys appends one `key.rewrapped` entry, with counts per
/// tenant, to the system chain.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn kek_rewrap(batch: default!(i32, 1000)) -> i32 {
    let r = (|| {
        require_read_write("kek_rewrap")?;
        let (n, moved) = keystore::kek_rewrap(batch)?;
        if let Some(payload) = moved {
            evidence::record(
                crate::ledger::names::SYSTEM_TENANT,
                "key.rewrapped",
                payload,
            )?;
        }
        if n > 0 {
            cache::forget_all();
        }
        Ok(n)
    })();
    r.or_raise()
}

/// Destroys the tenant's data keys. Every value sealed for it then fails to
/// decrypt, in every session. Returns the number of keys destroyed. The shred is
/// recorded in the tenant's ledger (`key.shredded`), so it needs the master key.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn tenant_shred(tenant: &str) -> i32 {
    let r = (|| {
        limits::tenant_arg(tenant)?;
        master::require_loaded()?;
        require_read_write("tenant_shred")?;
        let ids = keystore::shred(tenant)?;
        cache::forget_all();
        let n = ids.len() as i32;
        // Recorded also when there were no keys.
        evidence::record(
            tenant,
            "key.shredded",
            serde_json::json!({ "keys": n, "key_ids": ids }),
        )?;
        Ok(n)
    })();
    r.or_raise()
}

/// Whether the master key is loaded, the version that wraps new keys, and every
/// loaded version. Never shows key bytes.
#[pg_extern(stable, parallel_safe)]
fn vault_status() -> TableIterator<
    'static,
    (
        name!(loaded, bool),
        name!(active_version, Option<i32>),
        name!(versions, Vec<i32>),
    ),
> {
    let (loaded, active, versions) = master::status();
    TableIterator::once((loaded, active, versions))
}
