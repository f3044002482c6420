//! Property: every single edit, delete, swap or insert in a chain of 1,000
//! entries is detected, at exactly the seq where the chain stops being the one
//! that was written.

use std::sync::OnceLock;

use pgseal_core::chain::{Problem, Report, StoredEntry, Verifier};
use pgseal_core::keys::SecretKey;
use pgseal_core::ledger::{entry_hash, EntryFields, EntryMac, Hash, GENESIS};
use proptest::prelude::*;

const N: usize = 1000;

#[derive(Clone, Debug)]
struct Owned {
    tenant: String,
    seq: i64,
    at: i64,
    actor: String,
    event: String,
    payload: String,
    prev: Vec<u8>,
    hash: Vec<u8>,
    mac: Vec<u8>,
}

impl Owned {
    fn view(&self) -> StoredEntry<'_> {
        StoredEntry::v1(
            &self.tenant,
            self.seq,
            self.at,
            &self.actor,
            &self.event,
            &self.payload,
            &self.prev,
            &self.hash,
            Some(&self.mac),
        )
    }

    fn rehash(&mut self) {
        let prev: Hash = self.prev.clone().try_into().unwrap();
        let f = EntryFields {
            prev_hash: &prev,
            tenant: &self.tenant,
            seq: self.seq,
            recorded_at_us: self.at,
            actor: &self.actor,
            event: &self.event,
            payload: &pgseal_core::canonical::canonical_payload(&self.payload).unwrap(),
        };
        self.hash = entry_hash(&f).to_vec();
    }
}

fn mac() -> &'static EntryMac {
    static M: OnceLock<EntryMac> = OnceLock::new();
    M.get_or_init(|| EntryMac::new(&SecretKey::from_slice(&[9u8; 32]).unwrap()))
}

fn chain() -> &'static Vec<Owned> {
    static C: OnceLock<Vec<Owned>> = OnceLock::new();
    C.get_or_init(|| {
        let mut prev = GENESIS.to_vec();
        (1..=N as i64)
            .map(|seq| {
                let mut e = Owned {
                    tenant: "acme".into(),
                    seq,
                    at: 1_790_000_000_000_000 + seq * 1000,
                    actor: format!("user-{}", seq % 7),
                    event: if seq % 3 == 0 {
                        "order.update".into()
                    } else {
                        "login".into()
                    },
                    payload: format!(r#"{{"n": {seq}, "items": ["a", {{"q": {}}}]}}"#, seq % 5),
                    prev: prev.clone(),
                    hash: vec![],
                    mac: vec![],
                };
                e.rehash();
                e.mac = mac().sign(&e.hash.clone().try_into().unwrap()).to_vec();
                prev = e.hash.clone();
                e
            })
            .collect()
    })
}

fn verify(entries: &[Owned]) -> Report {
    let original = chain();
    let head = original
        .last()
        .map(|e| (e.seq, e.hash.clone().try_into().unwrap()));
    let mut v = Verifier::new(1, GENESIS, Some(mac().clone()));
    for e in entries {
        if !v.push(&e.view()) {
            break;
        }
    }
    v.finish(head)
}

#[test]
fn untouched_chain_verifies() {
    let r = verify(chain());
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.checked, N as i64);
}

/// Applies one edit to entry `i`; `field` picks which stored field changes.
fn edit(e: &mut Owned, field: u8) {
    match field % 9 {
        0 => e.tenant.push('x'),
        1 => e.seq += 1,
        2 => e.at += 1,
        3 => e.actor.push('x'),
        4 => e.event.push('x'),
        5 => e.payload = r#"{"n": -1}"#.into(),
        6 => e.prev[0] ^= 1,
        7 => e.hash[5] ^= 1,
        _ => e.mac[9] ^= 1,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_edit_is_found_at_its_seq(i in 0..N, field in 0u8..9, rehash in any::<bool>()) {
        let mut c = chain().clone();
        edit(&mut c[i], field);
        // A forger who recomputes the hash still lacks the MAC key.
        if rehash && field < 7 {
            c[i].rehash();
        }
        let r = verify(&c);
        let f = r.failure.expect("edit went unnoticed");
        prop_assert_eq!(f.seq, i as i64 + 1);
        if field % 9 == 8 || (rehash && field < 7 && field != 1 && field != 6) {
            prop_assert_eq!(f.problem, Problem::MacMismatch);
        }
    }

    #[test]
    fn any_delete_is_found_at_its_seq(i in 0..N) {
        let mut c = chain().clone();
        c.remove(i);
        let f = verify(&c).failure.expect("delete went unnoticed");
        prop_assert_eq!(f.seq, i as i64 + 1);
        prop_assert_eq!(f.problem, Problem::Gap);
    }

    #[test]
    fn any_swap_is_found_at_its_seq(i in 0..N - 1) {
        let mut c = chain().clone();
        c.swap(i, i + 1);
        let f = verify(&c).failure.expect("swap went unnoticed");
        prop_assert_eq!(f.seq, i as i64 + 1);
    }

    #[test]
    fn any_insert_is_found_at_its_seq(at in 0..=N, copy_of in 0..N, forged in any::<bool>()) {
        let mut c = chain().clone();
        let mut extra = c[copy_of].clone();
        if forged {
            // A well-formed entry for this position, linked and hashed, but with
            // a MAC made without the key.
            extra.seq = at as i64 + 1;
            extra.prev = if at == 0 { GENESIS.to_vec() } else { c[at - 1].hash.clone() };
            extra.event = "forged".into();
            extra.rehash();
        } else if copy_of == at {
            // A copy of the entry it precedes is indistinguishable until the
            // original follows it; use its neighbour so the copy differs.
            extra = c[(copy_of + 1) % N].clone();
        }
        c.insert(at, extra);
        let f = verify(&c).failure.expect("insert went unnoticed");
        prop_assert_eq!(f.seq, at as i64 + 1);
    }
}
