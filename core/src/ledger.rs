//! Ledger entries: the canonical encodings, the entry hash and its MAC
//! (see docs/FORMAT.md, "Ledger entries").
//!
//! Format 2, written for every new entry:
//! ```text
//! commitment = SHA-256( "pgseal:v2:payload" 0x00 salt(32) JCS(payload) )
//! hash = SHA-256( "pgseal:v2:ledger" 0x00
//!                 prev_hash(32) lp(tenant) i64be(seq) i64be(recorded_at_us)
//!                 lp(actor) lp(db_role) lp(event)
//!                 u32be(n_subjects) lp(subject_1) .. lp(subject_n) commitment(32) )
//! ```
//! Format 1, of entries written before format 2 (still verified):
//! ```text
//! hash = SHA-256( "pgseal:v1:ledger" 0x00
//!                 prev_hash(32) lp(tenant) i64be(seq) i64be(recorded_at_us)
//!                 lp(actor) lp(event) lp(JCS(payload)) )
//! ```
//! Both: `mac = HMAC-SHA256(tenant ledger key, hash)`.
//! `lp` is a u32 big-endian length followed by the bytes; `recorded_at_us` is
//! microseconds since 1970-01-01 00:00:00 UTC.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::keys::SecretKey;

/// Every chain whose tenant id starts with this is one of pgseal's own (`_pgseal`,
/// `_pgseal_open`, `_pgseal_audit`): only pgseal appends to it, and no session acts
/// for it as its tenant.
pub const PGSEAL_CHAIN_PREFIX: &str = "_pgseal";

/// Whether `tenant` names one of pgseal's own chains.
pub fn is_pgseal_chain(tenant: &str) -> bool {
    tenant.starts_with(PGSEAL_CHAIN_PREFIX)
}

/// The label of a format 1 entry hash.
pub const ENTRY_LABEL: &[u8] = b"pgseal:v1:ledger";
/// The label of a format 2 entry hash.
pub const ENTRY_LABEL_V2: &[u8] = b"pgseal:v2:ledger";
/// The label of a format 2 payload commitment.
pub const PAYLOAD_LABEL_V2: &[u8] = b"pgseal:v2:payload";
pub const HASH_LEN: usize = 32;
pub type Hash = [u8; HASH_LEN];
pub const SALT_LEN: usize = 32;
/// The random salt of a format 2 entry's payload commitment.
pub type Salt = [u8; SALT_LEN];

/// The `fmt` column of an entry: how its hash is computed.
pub const FMT_V1: i16 = 1;
pub const FMT_V2: i16 = 2;
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

/// The hashed fields of one format 2 entry. The payload enters only through
/// `commitment` (see `payload_commitment`), so an erased entry, whose payload and
/// salt are gone, still hashes to the same value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFieldsV2<'a> {
    pub prev_hash: &'a Hash,
    pub tenant: &'a str,
    pub seq: i64,
    pub recorded_at_us: i64,
    pub actor: &'a str,
    /// The database role that appended the entry.
    pub db_role: &'a str,
    pub event: &'a str,
    /// Data-subject ids, in order.
    pub subjects: &'a [String],
    pub commitment: &'a Hash,
}

/// SHA-256 over `"pgseal:v2:payload" 0x00 salt JCS(payload)`; `payload` is already
/// canonical. The payload is the last field, so it needs no length prefix.
pub fn payload_commitment(salt: &Salt, payload: &str) -> Hash {
    let mut h = Sha256::new();
    h.update(PAYLOAD_LABEL_V2);
    h.update([0u8]);
    h.update(salt);
    h.update(payload.as_bytes());
    h.finalize().into()
}

/// SHA-256 over the canonical format 2 encoding of the fields.
pub fn entry_hash_v2(f: &EntryFieldsV2<'_>) -> Hash {
    let mut h = Sha256::new();
    h.update(ENTRY_LABEL_V2);
    h.update([0u8]);
    h.update(f.prev_hash);
    lp(&mut h, f.tenant.as_bytes());
    h.update(f.seq.to_be_bytes());
    h.update(f.recorded_at_us.to_be_bytes());
    lp(&mut h, f.actor.as_bytes());
    lp(&mut h, f.db_role.as_bytes());
    lp(&mut h, f.event.as_bytes());
    let n = u32::try_from(f.subjects.len()).expect("fewer than 2^32 subjects");
    h.update(n.to_be_bytes());
    for s in f.subjects {
        lp(&mut h, s.as_bytes());
    }
    h.update(f.commitment);
    h.finalize().into()
}

/// 32 fresh random bytes for a payload commitment, from a ChaCha20 generator per
/// thread seeded from the operating system (one `getrandom` per process, not per
/// entry). A process forked after the generator was seeded reseeds before its
/// first salt, so parent and child never share a stream.
pub fn fresh_salt() -> Salt {
    fresh_salt_in(std::process::id())
}

/// `fresh_salt` for a caller that knows its process id without asking the kernel
/// (a PostgreSQL backend's `MyProcPid`, which PostgreSQL sets in every child right
/// after the fork): the same stream and the same reseeding, without a system call
/// per salt.
pub fn fresh_salt_in(pid: u32) -> Salt {
    thread_local! {
        static SOURCE: std::cell::RefCell<SaltSource> = const { std::cell::RefCell::new(SaltSource(None)) };
    }
    SOURCE.with(|s| s.borrow_mut().next(pid))
}

/// A salt generator and the process it was seeded in. A fork copies it with the
/// rest of memory; `next` in a process other than the one that seeded it reseeds
/// first.
#[derive(Clone)]
struct SaltSource(Option<(u32, rand_chacha::ChaCha20Rng)>);

impl SaltSource {
    fn next(&mut self, pid: u32) -> Salt {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        if !matches!(&self.0, Some((p, _)) if *p == pid) {
            self.0 = Some((pid, rand_chacha::ChaCha20Rng::from_os_rng()));
        }
        let mut salt = [0u8; SALT_LEN];
        self.0
            .as_mut()
            .expect("seeded above")
            .1
            .fill_bytes(&mut salt);
        salt
    }
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

    fn v2<'a>(prev: &'a Hash, subjects: &'a [String], commitment: &'a Hash) -> EntryFieldsV2<'a> {
        EntryFieldsV2 {
            prev_hash: prev,
            tenant: "acme",
            seq: 1,
            recorded_at_us: 0,
            actor: "alice",
            db_role: "app",
            event: "login",
            subjects,
            commitment,
        }
    }

    fn subjects(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn every_v2_field_changes_the_hash() {
        let salt = [7u8; SALT_LEN];
        let c = payload_commitment(&salt, "{}");
        let two = subjects(&["s1", "s2"]);
        let base = entry_hash_v2(&v2(&GENESIS, &two, &c));
        let other = [1u8; 32];
        let c_payload = payload_commitment(&salt, "[]");
        let mut salt2 = salt;
        salt2[31] ^= 1;
        let c_salt = payload_commitment(&salt2, "{}");
        let (one, three) = (subjects(&["s1"]), subjects(&["s1", "s2", "s3"]));
        let (swapped, edited, none) = (subjects(&["s2", "s1"]), subjects(&["s1", "s3"]), vec![]);
        let d = v2(&GENESIS, &two, &c);
        let variants = [
            EntryFieldsV2 {
                prev_hash: &other,
                ..d.clone()
            },
            EntryFieldsV2 {
                tenant: "acm",
                ..d.clone()
            },
            EntryFieldsV2 {
                seq: 2,
                ..d.clone()
            },
            EntryFieldsV2 {
                recorded_at_us: 1,
                ..d.clone()
            },
            EntryFieldsV2 {
                actor: "alicf",
                ..d.clone()
            },
            EntryFieldsV2 {
                db_role: "apq",
                ..d.clone()
            },
            EntryFieldsV2 {
                db_role: "",
                ..d.clone()
            },
            EntryFieldsV2 {
                event: "logout",
                ..d.clone()
            },
            EntryFieldsV2 {
                subjects: &one,
                ..d.clone()
            },
            EntryFieldsV2 {
                subjects: &three,
                ..d.clone()
            },
            EntryFieldsV2 {
                subjects: &swapped,
                ..d.clone()
            },
            EntryFieldsV2 {
                subjects: &edited,
                ..d.clone()
            },
            EntryFieldsV2 {
                subjects: &none,
                ..d.clone()
            },
            EntryFieldsV2 {
                commitment: &c_payload,
                ..d.clone()
            },
            EntryFieldsV2 {
                commitment: &c_salt,
                ..d.clone()
            },
        ];
        for v in variants {
            assert_ne!(entry_hash_v2(&v), base, "{v:?}");
        }
        assert_ne!(c_salt, c, "the salt changes the commitment");
        assert_ne!(c_payload, c, "the payload changes the commitment");
    }

    #[test]
    fn v2_length_prefixes_separate_adjacent_fields() {
        let c = payload_commitment(&[0; SALT_LEN], "{}");
        let none: Vec<String> = vec![];
        let base = v2(&GENESIS, &none, &c);
        // actor | db_role | event, each pair of neighbours.
        let pairs = [
            (
                EntryFieldsV2 {
                    actor: "ab",
                    db_role: "c",
                    ..base.clone()
                },
                EntryFieldsV2 {
                    actor: "a",
                    db_role: "bc",
                    ..base.clone()
                },
            ),
            (
                EntryFieldsV2 {
                    db_role: "ab",
                    event: "c",
                    ..base.clone()
                },
                EntryFieldsV2 {
                    db_role: "a",
                    event: "bc",
                    ..base.clone()
                },
            ),
        ];
        for (a, b) in pairs {
            assert_ne!(entry_hash_v2(&a), entry_hash_v2(&b), "{a:?} / {b:?}");
        }
        // Subjects: a split moved between two subjects, and the count.
        let (s1, s2) = (subjects(&["ab", "c"]), subjects(&["a", "bc"]));
        let (s3, s4) = (subjects(&["abc"]), subjects(&["", "abc"]));
        for (x, y) in [(&s1, &s2), (&s3, &s4), (&s1, &s3)] {
            assert_ne!(
                entry_hash_v2(&EntryFieldsV2 {
                    subjects: x,
                    ..base.clone()
                }),
                entry_hash_v2(&EntryFieldsV2 {
                    subjects: y,
                    ..base.clone()
                }),
            );
        }
    }

    #[test]
    fn v1_and_v2_hashes_differ_for_the_same_fields() {
        let payload = "{}";
        let salt = [0u8; SALT_LEN];
        let c = payload_commitment(&salt, payload);
        let none: Vec<String> = vec![];
        assert_ne!(
            entry_hash(&fields(&GENESIS)),
            entry_hash_v2(&EntryFieldsV2 {
                db_role: "",
                ..v2(&GENESIS, &none, &c)
            })
        );
    }

    #[test]
    fn salts_are_fresh() {
        let (a, b) = (fresh_salt(), fresh_salt());
        assert_ne!(a, b);
        assert_ne!(a, [0u8; SALT_LEN]);
        let other = std::thread::spawn(fresh_salt).join().unwrap();
        assert!(other != a && other != b);
    }

    /// A fork copies the generator: the child (another process id) must not draw
    /// the parent's next salt.
    #[test]
    fn a_forked_copy_of_the_salt_source_reseeds() {
        let mut parent = SaltSource(None);
        parent.next(100);
        let mut child = parent.clone();
        let (from_parent, from_child) = (parent.next(100), child.next(101));
        assert_ne!(from_parent, from_child);
        // The same process keeps its stream: a copy that stays in it draws alike.
        let mut copy = parent.clone();
        assert_eq!(parent.next(100), copy.next(100));
    }

    #[test]
    fn parse_hash_round_trip() {
        let h = [0xabu8; 32];
        assert_eq!(parse_hash(&hex::encode(h)), Some(h));
        assert_eq!(parse_hash("ab"), None);
    }
}
