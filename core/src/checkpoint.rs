//! Signed ledger checkpoints (see docs/FORMAT.md, "Checkpoints").
//!
//! pgseal signs with one random Ed25519 key per database (the checkpoint key),
//! stored wrapped in `pgseal.tenant_keys` like every other key, so its public key
//! survives master key rotation. An auditor keeps old checkpoints and the public
//! key; a history rewritten later, even by someone holding the database, no
//! longer reaches a kept checkpoint's (seq, hash).
//!
//! Two message versions. pgseal signs v2, which names the database's ledger
//! (`ledger_id`) and the tenant's previous checkpoint, so that a tenant's
//! checkpoints form a chain of their own; v1 checkpoints (without `ledger_id`,
//! `prev_seq`, `prev_hash`, signed by a key derived from a master key version with
//! `signing_key`) keep verifying.
//!
//! ```text
//! v1 seed    = HKDF-SHA256(ikm = master key, salt = none, info = "pgseal:v1:checkpoint-key")
//! message v1 = "pgseal:v1:checkpoint" 0x00 lp(tenant) i64be(seq) hash(32) lp(signed_at) u32be(key_version)
//! message v2 = "pgseal:v2:checkpoint" 0x00 lp(ledger_id) lp(tenant) i64be(seq) hash(32)
//!              i64be(prev_seq) prev_hash(32) lp(signed_at) u32be(key_version)
//! ```

pub use ed25519_dalek::SigningKey;
use ed25519_dalek::{Signature, Signer, Verifier as _, VerifyingKey};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::keys::SecretKey;
use crate::ledger::{Hash, GENESIS};

pub const CHECKPOINT_LABEL: &[u8] = b"pgseal:v1:checkpoint";
pub const CHECKPOINT_LABEL_V2: &[u8] = b"pgseal:v2:checkpoint";
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
    /// v1: the master key version the signing key was derived from. v2: the master
    /// key version active when it was signed (the key itself does not change).
    pub key_version: u32,
    /// v2: the database's ledger id (`pgseal.ledger_id()`). Absent in v1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_id: Option<String>,
    /// v2: the seq of the tenant's previous checkpoint (0 for its first). Absent in v1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_seq: Option<i64>,
    /// v2: lowercase hex of the previous checkpoint's hash (64 zeros for the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_hash: Option<String>,
    /// Lowercase hex of the 64-byte Ed25519 signature.
    pub signature: String,
}

impl Checkpoint {
    /// The message version: 2 when it names a ledger or a previous checkpoint, else 1.
    pub fn version(&self) -> u32 {
        if self.prev_seq.is_some() || self.prev_hash.is_some() || self.ledger_id.is_some() {
            2
        } else {
            1
        }
    }

    /// Whether this checkpoint names `earlier` as its previous one.
    pub fn extends(&self, earlier: &Checkpoint) -> bool {
        self.tenant == earlier.tenant
            && self.prev_seq == Some(earlier.seq)
            && self
                .prev_hash
                .as_deref()
                .is_some_and(|h| h.eq_ignore_ascii_case(&earlier.hash))
    }
}

fn lp(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

#[allow(clippy::too_many_arguments)]
fn message_with(
    label: &[u8],
    ledger_id: Option<&str>,
    tenant: &str,
    seq: i64,
    hash: &Hash,
    prev: Option<(i64, &Hash)>,
    signed_at: &str,
    key_version: u32,
) -> Vec<u8> {
    let mut m =
        Vec::with_capacity(120 + tenant.len() + signed_at.len() + ledger_id.map_or(0, str::len));
    m.extend_from_slice(label);
    m.push(0);
    if let Some(id) = ledger_id {
        lp(&mut m, id.as_bytes());
    }
    lp(&mut m, tenant.as_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    if let Some((prev_seq, prev_hash)) = prev {
        m.extend_from_slice(&prev_seq.to_be_bytes());
        m.extend_from_slice(prev_hash);
    }
    lp(&mut m, signed_at.as_bytes());
    m.extend_from_slice(&key_version.to_be_bytes());
    m
}

/// The bytes a v1 checkpoint signs.
pub fn message(tenant: &str, seq: i64, hash: &Hash, signed_at: &str, key_version: u32) -> Vec<u8> {
    message_with(
        CHECKPOINT_LABEL,
        None,
        tenant,
        seq,
        hash,
        None,
        signed_at,
        key_version,
    )
}

/// The bytes a v2 checkpoint signs: the ledger id, v1's fields and the previous
/// checkpoint's (seq, hash), under its own label, so neither version's signature
/// passes as the other's.
pub fn message_v2(
    ledger_id: &str,
    tenant: &str,
    seq: i64,
    hash: &Hash,
    prev: (i64, &Hash),
    signed_at: &str,
    key_version: u32,
) -> Vec<u8> {
    message_with(
        CHECKPOINT_LABEL_V2,
        Some(ledger_id),
        tenant,
        seq,
        hash,
        Some(prev),
        signed_at,
        key_version,
    )
}

/// The v1 checkpoint signing key, derived from one master key version. pgseal no
/// longer signs with it; kept for v1 checkpoints and tests.
pub fn signing_key(master: &SecretKey) -> SigningKey {
    let mut seed = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, master.expose())
        .expand(KEY_INFO, &mut seed[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    SigningKey::from_bytes(&seed)
}

/// Lowercase hex of the public key of the v1 key derived from `master`.
pub fn public_key_hex(master: &SecretKey) -> String {
    hex::encode(signing_key(master).verifying_key().as_bytes())
}

/// The checkpoint key whose 32-byte Ed25519 seed is `seed` (the random key pgseal
/// keeps wrapped in `pgseal.tenant_keys`, purpose "checkpoint").
pub fn key_from_seed(seed: &SecretKey) -> SigningKey {
    let mut b = Zeroizing::new([0u8; 32]);
    b.copy_from_slice(seed.expose());
    SigningKey::from_bytes(&b)
}

/// Lowercase hex of a signing key's public key.
pub fn verifying_key_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().as_bytes())
}

/// Signs a v1 checkpoint (no link to a previous one). pgseal itself signs v2
/// (`sign_after`); v1 is kept for the checkpoints signed before it, and tests.
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
        ledger_id: None,
        prev_seq: None,
        prev_hash: None,
        signature: hex::encode(sig.to_bytes()),
    }
}

/// Signs, with the checkpoint key `key`, a v2 checkpoint of ledger `ledger_id` that
/// extends the tenant's previous checkpoint `prev` ((0, 32 zero bytes) for its first).
pub fn sign_after(
    key: &SigningKey,
    key_version: u32,
    ledger_id: &str,
    tenant: &str,
    (seq, hash): (i64, &Hash),
    prev: (i64, &Hash),
    signed_at: &str,
) -> Checkpoint {
    let msg = message_v2(ledger_id, tenant, seq, hash, prev, signed_at, key_version);
    let sig = key.sign(&msg);
    Checkpoint {
        tenant: tenant.to_owned(),
        seq,
        hash: hex::encode(hash),
        signed_at: signed_at.to_owned(),
        key_version,
        ledger_id: Some(ledger_id.to_owned()),
        prev_seq: Some(prev.0),
        prev_hash: Some(hex::encode(prev.1)),
        signature: hex::encode(sig.to_bytes()),
    }
}

/// The previous checkpoint a tenant's first v2 checkpoint names.
pub const FIRST_PREV: (i64, Hash) = (0, GENESIS);

/// Whether `cp` carries a valid signature under `public_key_hex`, for its version.
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
    let msg = match (
        cp.ledger_id.as_deref(),
        cp.prev_seq,
        cp.prev_hash.as_deref(),
    ) {
        (None, None, None) => message(&cp.tenant, cp.seq, &hash, &cp.signed_at, cp.key_version),
        (Some(ledger_id), Some(prev_seq), Some(prev_hash)) => {
            let Some(prev_hash) = crate::ledger::parse_hash(prev_hash) else {
                return false;
            };
            message_v2(
                ledger_id,
                &cp.tenant,
                cp.seq,
                &hash,
                (prev_seq, &prev_hash),
                &cp.signed_at,
                cp.key_version,
            )
        }
        // Some of the three without the others is neither version.
        _ => return false,
    };
    vk.verify(&msg, &Signature::from_bytes(&sig)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tampered(cp: &Checkpoint) -> Vec<Checkpoint> {
        vec![
            Checkpoint {
                seq: cp.seq + 1,
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
                key_version: cp.key_version + 1,
                ..cp.clone()
            },
        ]
    }

    #[test]
    fn sign_then_verify() {
        let mk = SecretKey::random();
        let cp = sign(&mk, 3, "acme", 42, &[7u8; 32], "2026-11-25T00:00:00Z");
        let pk = public_key_hex(&mk);
        assert!(verify(&pk, &cp));
        assert_eq!(cp.version(), 1);
        for bad in tampered(&cp) {
            assert!(!verify(&pk, &bad), "{bad:?}");
        }
        assert!(!verify(&public_key_hex(&SecretKey::random()), &cp));
    }

    #[test]
    fn v2_names_the_previous_checkpoint() {
        let mk = SecretKey::random();
        let key = key_from_seed(&mk);
        let pk = verifying_key_hex(&key);
        let id = "0123456789abcdef0123456789abcdef";
        let first = sign_after(&key, 1, id, "acme", (5, &[7u8; 32]), (0, &GENESIS), "t1");
        let second = sign_after(&key, 1, id, "acme", (9, &[9u8; 32]), (5, &[7u8; 32]), "t2");
        assert!(verify(&pk, &first) && verify(&pk, &second));
        assert_eq!((first.version(), second.version()), (2, 2));
        assert!(second.extends(&first));
        assert!(!first.extends(&second));
        let mut bad = tampered(&second);
        bad.push(Checkpoint {
            prev_seq: Some(4),
            ..second.clone()
        });
        bad.push(Checkpoint {
            prev_hash: Some(hex::encode([6u8; 32])),
            ..second.clone()
        });
        // Stripped of its link, a v2 signature does not pass as v1, nor half-linked.
        bad.push(Checkpoint {
            prev_seq: None,
            prev_hash: None,
            ..second.clone()
        });
        bad.push(Checkpoint {
            prev_hash: None,
            ..second.clone()
        });
        // Another ledger's id, or none, does not pass.
        bad.push(Checkpoint {
            ledger_id: Some("fedcba9876543210fedcba9876543210".into()),
            ..second.clone()
        });
        bad.push(Checkpoint {
            ledger_id: None,
            ..second.clone()
        });
        bad.push(Checkpoint {
            ledger_id: None,
            prev_seq: None,
            prev_hash: None,
            ..second.clone()
        });
        for b in bad {
            assert!(!verify(&pk, &b), "{b:?}");
        }
        // A v1 signature given a link does not pass as v2.
        let v1 = sign(&mk, 1, "acme", 9, &[9u8; 32], "t2");
        assert!(!verify(
            &public_key_hex(&mk),
            &Checkpoint {
                ledger_id: Some(id.into()),
                prev_seq: Some(5),
                prev_hash: Some(hex::encode([7u8; 32])),
                ..v1
            }
        ));
    }

    #[test]
    fn v1_json_has_no_link_fields() {
        let mk = SecretKey::from_slice(&[1u8; 32]).unwrap();
        let v1 = serde_json::to_value(sign(&mk, 1, "a", 1, &[1u8; 32], "t")).unwrap();
        assert!(
            v1.get("prev_seq").is_none()
                && v1.get("prev_hash").is_none()
                && v1.get("ledger_id").is_none()
        );
        let back: Checkpoint = serde_json::from_value(v1).unwrap();
        assert_eq!(back.version(), 1);
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
