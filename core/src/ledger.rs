//! Ledger entries: the canonical encoding, the entry hash and its MAC
//! (see docs/FORMAT.md, "Ledger entries").
//!
//! ```text
//! hash = SHA-256( "pgseal:v1:ledger" 0x00
//!                 prev_hash(32) lp(tenant) i64be(seq) i64be(recorded_at_us)
//!                 lp(actor) lp(event) lp(JCS(payload)) )
//! mac  = HMAC-SHA256(tenant ledger key, hash)
//! ```
//! `lp` is a u32 big-endian length followed by the bytes; `recorded_at_us` is
//! microseconds since 1970-01-01 00:00:00 UTC.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::keys::SecretKey;

pub const ENTRY_LABEL: &[u8] = b"pgseal:v1:ledger";
pub const HASH_LEN: usize = 32;
pub type Hash = [u8; HASH_LEN];
/// The prev_hash of a chain's first entry.
pub const GENESIS: Hash = [0u8; HASH_LEN];

/// The hashed fields of one entry. `payload` is already canonical (RFC 8785).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFields<'a> {
    pub prev_hash: &'a Hash,
    pub tenant: &'a str,
    pub seq: i64,
    pub recorded_at_us: i64,
    pub actor: &'a str,
    pub event: &'a str,
    pub payload: &'a str,
}

fn lp(h: &mut Sha256, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("field longer than 4 GiB");
    h.update(len.to_be_bytes());
    h.update(bytes);
}

/// SHA-256 over the canonical encoding of the fields.
pub fn entry_hash(f: &EntryFields<'_>) -> Hash {
    let mut h = Sha256::new();
    h.update(ENTRY_LABEL);
    h.update([0u8]);
    h.update(f.prev_hash);
    lp(&mut h, f.tenant.as_bytes());
    h.update(f.seq.to_be_bytes());
    h.update(f.recorded_at_us.to_be_bytes());
    lp(&mut h, f.actor.as_bytes());
    lp(&mut h, f.event.as_bytes());
    lp(&mut h, f.payload.as_bytes());
    h.finalize().into()
}

/// A tenant's MAC key with its HMAC state precomputed, for many entries.
#[derive(Clone)]
pub struct EntryMac(Hmac<Sha256>);

impl EntryMac {
    pub fn new(key: &SecretKey) -> Self {
        EntryMac(Hmac::<Sha256>::new_from_slice(key.expose()).expect("HMAC takes any key length"))
    }

    pub fn sign(&self, hash: &Hash) -> Hash {
        let mut m = self.0.clone();
        m.update(hash);
        m.finalize().into_bytes().into()
    }

    /// Constant-time comparison of `mac` with the MAC of `hash`.
    pub fn verify(&self, hash: &Hash, mac: &[u8]) -> bool {
        let mut m = self.0.clone();
        m.update(hash);
        m.verify_slice(mac).is_ok()
    }
}

/// Parses 64 lowercase or uppercase hex characters.
pub fn parse_hash(hex_text: &str) -> Option<Hash> {
    let mut out = [0u8; HASH_LEN];
    hex::decode_to_slice(hex_text, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(prev: &'a Hash) -> EntryFields<'a> {
        EntryFields {
            prev_hash: prev,
            tenant: "acme",
            seq: 1,
            recorded_at_us: 0,
            actor: "alice",
            event: "login",
            payload: "{}",
        }
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = entry_hash(&fields(&GENESIS));
        let other = [1u8; 32];
        let variants = [
            EntryFields {
                prev_hash: &other,
                ..fields(&GENESIS)
            },
            EntryFields {
                tenant: "acm",
                ..fields(&GENESIS)
            },
            EntryFields {
                seq: 2,
                ..fields(&GENESIS)
            },
            EntryFields {
                recorded_at_us: 1,
                ..fields(&GENESIS)
            },
            EntryFields {
                actor: "alicf",
                ..fields(&GENESIS)
            },
            EntryFields {
                event: "logout",
                ..fields(&GENESIS)
            },
            EntryFields {
                payload: "[]",
                ..fields(&GENESIS)
            },
        ];
        for v in variants {
            assert_ne!(entry_hash(&v), base, "{v:?}");
        }
    }

    #[test]
    fn length_prefixes_separate_adjacent_fields() {
        let a = EntryFields {
            actor: "ab",
            event: "c",
            ..fields(&GENESIS)
        };
        let b = EntryFields {
            actor: "a",
            event: "bc",
            ..fields(&GENESIS)
        };
        assert_ne!(entry_hash(&a), entry_hash(&b));
    }

    #[test]
    fn mac_verifies_and_rejects() {
        let key = SecretKey::random();
        let m = EntryMac::new(&key);
        let h = entry_hash(&fields(&GENESIS));
        let mac = m.sign(&h);
        assert!(m.verify(&h, &mac));
        let mut bad = mac;
        bad[31] ^= 1;
        assert!(!m.verify(&h, &bad));
        assert!(!m.verify(&h, &mac[..31]));
        assert!(!EntryMac::new(&SecretKey::random()).verify(&h, &mac));
    }

    #[test]
    fn parse_hash_round_trip() {
        let h = [0xabu8; 32];
        assert_eq!(parse_hash(&hex::encode(h)), Some(h));
        assert_eq!(parse_hash("ab"), None);
    }
}
