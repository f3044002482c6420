//! Signed ledger checkpoints (see docs/FORMAT.md, "Checkpoints").
//!
//! The Ed25519 signing key is derived from one master key version with HKDF, so
//! it exists only where the master key does. An auditor keeps old checkpoints and
//! the public key; a history rewritten later, even by someone holding the
//! database, no longer reaches a kept checkpoint's (seq, hash).
//!
//! ```text
//! seed    = HKDF-SHA256(ikm = master key, salt = none, info = "pgseal:v1:checkpoint-key")
//! message = "pgseal:v1:checkpoint" 0x00 lp(tenant) i64be(seq) hash(32) lp(signed_at) u32be(key_version)
//! ```

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _, VerifyingKey};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::keys::SecretKey;
use crate::ledger::Hash;

pub const CHECKPOINT_LABEL: &[u8] = b"pgseal:v1:checkpoint";
pub const KEY_INFO: &[u8] = b"pgseal:v1:checkpoint-key";

/// A checkpoint as `pgseal.ledger_checkpoint()` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub tenant: String,
    pub seq: i64,
    /// Lowercase hex of the entry hash at `seq`.
    pub hash: String,
    /// The signing time as text (RFC 3339); signed as given.
    pub signed_at: String,
    /// Master key version the signing key was derived from.
    pub key_version: u32,
    /// Lowercase hex of the 64-byte Ed25519 signature.
    pub signature: String,
}

fn lp(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// The bytes that are signed.
pub fn message(tenant: &str, seq: i64, hash: &Hash, signed_at: &str, key_version: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + tenant.len() + signed_at.len());
    m.extend_from_slice(CHECKPOINT_LABEL);
    m.push(0);
    lp(&mut m, tenant.as_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    lp(&mut m, signed_at.as_bytes());
    m.extend_from_slice(&key_version.to_be_bytes());
    m
}

/// The checkpoint signing key derived from one master key version.
pub fn signing_key(master: &SecretKey) -> SigningKey {
    let mut seed = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, master.expose())
        .expand(KEY_INFO, &mut seed[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    SigningKey::from_bytes(&seed)
}

/// Lowercase hex of the public key.
pub fn public_key_hex(master: &SecretKey) -> String {
    hex::encode(signing_key(master).verifying_key().as_bytes())
}

pub fn sign(
    master: &SecretKey,
    key_version: u32,
    tenant: &str,
    seq: i64,
    hash: &Hash,
    signed_at: &str,
) -> Checkpoint {
    let sig = signing_key(master).sign(&message(tenant, seq, hash, signed_at, key_version));
    Checkpoint {
        tenant: tenant.to_owned(),
        seq,
        hash: hex::encode(hash),
        signed_at: signed_at.to_owned(),
        key_version,
        signature: hex::encode(sig.to_bytes()),
    }
}

/// Whether `cp` carries a valid signature under `public_key_hex`.
pub fn verify(public_key_hex: &str, cp: &Checkpoint) -> bool {
    let mut pk = [0u8; 32];
    let mut sig = [0u8; 64];
    if hex::decode_to_slice(public_key_hex.trim(), &mut pk).is_err()
        || hex::decode_to_slice(&cp.signature, &mut sig).is_err()
    {
        return false;
    }
    let Some(hash) = crate::ledger::parse_hash(&cp.hash) else {
        return false;
    };
    let Ok(vk) = VerifyingKey::from_bytes(&pk) else {
        return false;
    };
    let msg = message(&cp.tenant, cp.seq, &hash, &cp.signed_at, cp.key_version);
    vk.verify(&msg, &Signature::from_bytes(&sig)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify() {
        let mk = SecretKey::random();
        let cp = sign(&mk, 3, "acme", 42, &[7u8; 32], "2026-11-25T00:00:00Z");
        let pk = public_key_hex(&mk);
        assert!(verify(&pk, &cp));
        for bad in [
            Checkpoint {
                seq: 43,
                ..cp.clone()
            },
            Checkpoint {
                tenant: "acmf".into(),
                ..cp.clone()
            },
            Checkpoint {
                hash: hex::encode([8u8; 32]),
                ..cp.clone()
            },
            Checkpoint {
                signed_at: "2026-11-25T00:00:01Z".into(),
                ..cp.clone()
            },
            Checkpoint {
                key_version: 4,
                ..cp.clone()
            },
        ] {
            assert!(!verify(&pk, &bad), "{bad:?}");
        }
        assert!(!verify(&public_key_hex(&SecretKey::random()), &cp));
    }

    #[test]
    fn key_is_deterministic_per_master_key() {
        let mk = SecretKey::from_slice(&[1u8; 32]).unwrap();
        assert_eq!(public_key_hex(&mk), public_key_hex(&mk.clone()));
        assert_ne!(
            public_key_hex(&mk),
            public_key_hex(&SecretKey::from_slice(&[2u8; 32]).unwrap())
        );
    }
}
