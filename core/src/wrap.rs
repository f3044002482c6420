//! Wrapping tenant keys under a master key version (see docs/FORMAT.md, "Wrapped keys").
//!
//! A wrapped key is `nonce(12) ‖ AES-256-GCM(kek, dek)(32) ‖ tag(16)`: 60 bytes. The
//! associated data binds the purpose, the tenant, the key id and the master key version,
//! so a wrapped key moved to another row, tenant or version fails to unwrap.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::Nonce;

use crate::aad::wrap_aad;
use crate::envelope::NONCE_LEN;
use crate::keys::{random_bytes, SecretKey};
use crate::CoreError;

pub const WRAPPED_LEN: usize = NONCE_LEN + 32 + 16;

/// What the wrapped key is for; part of the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A tenant data key for sealed values.
    Dek,
    /// A tenant ledger MAC key.
    Ledger,
    /// The database's checkpoint signing key (an Ed25519 seed), tenant "_pgseal".
    Checkpoint,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Dek => "dek",
            Purpose::Ledger => "ledger",
            Purpose::Checkpoint => "checkpoint",
        }
    }
}

/// Names one wrapped key: the fields bound into its associated data.
#[derive(Debug, Clone, Copy)]
pub struct WrapLabel<'a> {
    pub purpose: Purpose,
    pub tenant: &'a str,
    pub key_id: &'a str,
    pub kek_version: u32,
}

impl WrapLabel<'_> {
    fn aad(&self) -> Vec<u8> {
        wrap_aad(
            self.purpose.as_str(),
            self.tenant,
            self.key_id,
            self.kek_version,
        )
    }
}

pub fn wrap(kek: &SecretKey, label: WrapLabel<'_>, key: &SecretKey) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    random_bytes(&mut nonce);
    wrap_with_nonce(kek, label, key, &nonce)
}

/// Deterministic variant for test vectors only.
pub fn wrap_with_nonce(
    kek: &SecretKey,
    label: WrapLabel<'_>,
    key: &SecretKey,
    nonce: &[u8; NONCE_LEN],
) -> Vec<u8> {
    let aad = label.aad();
    let ct = kek
        .cipher()
        .encrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: key.expose(),
                aad: &aad,
            },
        )
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.extend_from_slice(nonce);
    out.extend_from_slice(&ct);
    out
}

pub fn unwrap(
    kek: &SecretKey,
    label: WrapLabel<'_>,
    wrapped: &[u8],
) -> Result<SecretKey, CoreError> {
    if wrapped.len() != WRAPPED_LEN {
        return Err(CoreError::Malformed("wrapped key has the wrong length"));
    }
    let aad = label.aad();
    let plain = zeroize::Zeroizing::new(
        kek.cipher()
            .decrypt(
                Nonce::from_slice(&wrapped[..NONCE_LEN]),
                Payload {
                    msg: &wrapped[NONCE_LEN..],
                    aad: &aad,
                },
            )
            .map_err(|_| CoreError::AuthFailed)?,
    );
    SecretKey::from_slice(&plain).ok_or(CoreError::Malformed("wrapped key has the wrong length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(v: u32) -> WrapLabel<'static> {
        WrapLabel {
            purpose: Purpose::Dek,
            tenant: "acme",
            key_id: "kid",
            kek_version: v,
        }
    }

    #[test]
    fn wrap_round_trip() {
        let kek = SecretKey::random();
        let dek = SecretKey::random();
        let w = wrap(&kek, label(1), &dek);
        assert_eq!(w.len(), WRAPPED_LEN);
        assert_eq!(unwrap(&kek, label(1), &w).unwrap().expose(), dek.expose());
    }

    #[test]
    fn any_label_change_fails() {
        let kek = SecretKey::random();
        let dek = SecretKey::random();
        let w = wrap(&kek, label(1), &dek);
        assert!(unwrap(&kek, label(2), &w).is_err());
        let other_tenant = WrapLabel {
            tenant: "evil",
            ..label(1)
        };
        assert!(unwrap(&kek, other_tenant, &w).is_err());
        let other_purpose = WrapLabel {
            purpose: Purpose::Ledger,
            ..label(1)
        };
        assert!(unwrap(&kek, other_purpose, &w).is_err());
        assert!(unwrap(&SecretKey::random(), label(1), &w).is_err());
        assert!(unwrap(&kek, label(1), &w[..59]).is_err());
    }

    #[test]
    fn tampering_any_byte_fails() {
        let kek = SecretKey::random();
        let w = wrap(&kek, label(1), &SecretKey::random());
        for i in 0..w.len() {
            let mut t = w.clone();
            t[i] ^= 0x01;
            assert!(unwrap(&kek, label(1), &t).is_err(), "byte {i}");
        }
    }
}
