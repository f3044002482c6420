//! Reads the vectors in docs/FORMAT.md and checks the implementation against them.

use pgseal_core::envelope::{open_text, seal_with_nonce, Envelope};
use pgseal_core::keys::SecretKey;
use pgseal_core::wrap::{unwrap, wrap_with_nonce, Purpose, WrapLabel};
use serde_json::Value;

fn vectors(kind: &str) -> Vec<Value> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/FORMAT.md")).unwrap();
    let fence = format!("```jsonl vectors:{kind}\n");
    let start = doc
        .find(&fence)
        .unwrap_or_else(|| panic!("no {fence} block"))
        + fence.len();
    let end = start + doc[start..].find("```").unwrap();
    let v: Vec<Value> = doc[start..end]
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(v.len() >= 2, "too few {kind} vectors");
    v
}

fn key(v: &Value, field: &str) -> SecretKey {
    SecretKey::from_slice(&hex::decode(v[field].as_str().unwrap()).unwrap()).unwrap()
}

fn s<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap()
}

#[test]
fn value_vectors_seal_and_open() {
    for v in vectors("value") {
        let dek = key(&v, "dek");
        let nonce: [u8; 12] = hex::decode(s(&v, "nonce")).unwrap().try_into().unwrap();
        let ctx = v["context"].as_str();
        let sealed = seal_with_nonce(
            &dek.cipher(),
            s(&v, "tenant"),
            s(&v, "key_id"),
            ctx,
            s(&v, "plaintext").as_bytes(),
            &nonce,
        );
        assert_eq!(sealed, s(&v, "sealed"));
        let env = Envelope::parse(s(&v, "sealed")).unwrap();
        assert_eq!(env.key_id, s(&v, "key_id"));
        let pt = open_text(&dek.cipher(), s(&v, "tenant"), ctx, env).unwrap();
        assert_eq!(pt.as_str(), s(&v, "plaintext"));
    }
}

#[test]
fn wrap_vectors_wrap_and_unwrap() {
    for v in vectors("wrap") {
        let kek = key(&v, "kek");
        let purpose = match s(&v, "purpose") {
            "dek" => Purpose::Dek,
            "ledger" => Purpose::Ledger,
            "checkpoint" => Purpose::Checkpoint,
            other => panic!("unknown purpose {other}"),
        };
        let label = WrapLabel {
            purpose,
            tenant: s(&v, "tenant"),
            key_id: s(&v, "key_id"),
            kek_version: v["kek_version"].as_u64().unwrap() as u32,
        };
        let nonce: [u8; 12] = hex::decode(s(&v, "nonce")).unwrap().try_into().unwrap();
        let wrapped = wrap_with_nonce(&kek, label, &key(&v, "key"), &nonce);
        assert_eq!(hex::encode(&wrapped), s(&v, "wrapped"));
        assert_eq!(
            unwrap(&kek, label, &wrapped).unwrap().expose(),
            key(&v, "key").expose()
        );
    }
}

#[test]
fn ledger_vectors_hash_mac_and_chain() {
    use pgseal_core::canonical::canonical_payload;
    use pgseal_core::chain::{StoredEntry, Verifier};
    use pgseal_core::ledger::{entry_hash, parse_hash, EntryFields, EntryMac, GENESIS};
    let vs = vectors("ledger");
    let mac = EntryMac::new(&key(&vs[0], "mac_key"));
    let mut verifier = Verifier::new(1, GENESIS, Some(mac.clone()));
    for v in &vs {
        let canonical = canonical_payload(s(v, "payload")).unwrap();
        assert_eq!(canonical, s(v, "canonical_payload"));
        let prev = parse_hash(s(v, "prev_hash")).unwrap();
        let f = EntryFields {
            prev_hash: &prev,
            tenant: s(v, "tenant"),
            seq: v["seq"].as_i64().unwrap(),
            recorded_at_us: v["recorded_at_us"].as_i64().unwrap(),
            actor: s(v, "actor"),
            event: s(v, "event"),
            payload: &canonical,
        };
        let hash = entry_hash(&f);
        assert_eq!(hex::encode(hash), s(v, "hash"));
        assert_eq!(hex::encode(mac.sign(&hash)), s(v, "mac"));
        let mac_bytes = hex::decode(s(v, "mac")).unwrap();
        assert!(verifier.push(&StoredEntry::v1(
            f.tenant,
            f.seq,
            f.recorded_at_us,
            f.actor,
            f.event,
            s(v, "payload"),
            &prev,
            &hash,
            Some(&mac_bytes),
        )));
    }
    assert!(verifier.finish(None).ok());
}

/// The format 2 vectors continue the format 1 chain: commitment, hash and MAC of
/// each, and the six entries verified as one chain (with MACs), the erased one
/// by its stored commitment.
#[test]
fn ledger_v2_vectors_continue_the_v1_chain() {
    use pgseal_core::canonical::canonical_payload;
    use pgseal_core::chain::{Payload, StoredEntry, Verifier};
    use pgseal_core::ledger::{
        entry_hash_v2, parse_hash, payload_commitment, EntryFieldsV2, EntryMac, FMT_V2, GENESIS,
    };
    let v1 = vectors("ledger");
    let v2 = vectors("ledger_v2");
    let mac = EntryMac::new(&key(&v1[0], "mac_key"));
    let mut verifier = Verifier::new(1, GENESIS, Some(mac.clone()));
    for v in &v1 {
        let hash = hex::decode(s(v, "hash")).unwrap();
        let (prev, m) = (
            hex::decode(s(v, "prev_hash")).unwrap(),
            hex::decode(s(v, "mac")).unwrap(),
        );
        let e = StoredEntry::v1(
            s(v, "tenant"),
            v["seq"].as_i64().unwrap(),
            v["recorded_at_us"].as_i64().unwrap(),
            s(v, "actor"),
            s(v, "event"),
            s(v, "payload"),
            &prev,
            &hash,
            Some(&m),
        );
        assert!(verifier.push(&e));
    }
    let mut prev = parse_hash(s(v1.last().unwrap(), "hash")).unwrap();
    for v in &v2 {
        assert_eq!(parse_hash(s(v, "prev_hash")).unwrap(), prev);
        let erased = v["erased"].as_bool().unwrap();
        let subjects: Vec<String> = serde_json::from_value(v["subjects"].clone()).unwrap();
        let stored_commitment = parse_hash(s(v, "commitment")).unwrap();
        let salt: Option<[u8; 32]> = v["salt"]
            .as_str()
            .map(|t| hex::decode(t).unwrap().try_into().unwrap());
        let commitment = match (&salt, v["payload"].as_str()) {
            (Some(salt), Some(payload)) => {
                let canonical = canonical_payload(payload).unwrap();
                assert_eq!(canonical, s(v, "canonical_payload"));
                payload_commitment(salt, &canonical)
            }
            _ => {
                assert!(erased);
                stored_commitment
            }
        };
        assert_eq!(commitment, stored_commitment);
        let hash = entry_hash_v2(&EntryFieldsV2 {
            prev_hash: &prev,
            tenant: s(v, "tenant"),
            seq: v["seq"].as_i64().unwrap(),
            recorded_at_us: v["recorded_at_us"].as_i64().unwrap(),
            actor: s(v, "actor"),
            db_role: s(v, "db_role"),
            event: s(v, "event"),
            subjects: &subjects,
            commitment: &commitment,
        });
        assert_eq!(hex::encode(hash), s(v, "hash"));
        assert_eq!(hex::encode(mac.sign(&hash)), s(v, "mac"));
        let m = hex::decode(s(v, "mac")).unwrap();
        // As stored: the commitment only for the erased entry.
        let stored = StoredEntry {
            fmt: FMT_V2,
            tenant: s(v, "tenant"),
            seq: v["seq"].as_i64().unwrap(),
            recorded_at_us: v["recorded_at_us"].as_i64().unwrap(),
            actor: s(v, "actor"),
            event: s(v, "event"),
            payload: v["payload"].as_str().map(Payload::Json),
            db_role: Some(s(v, "db_role")),
            subjects: Some(&subjects),
            salt: salt.as_ref().map(|x| &x[..]),
            commitment: erased.then_some(&stored_commitment[..]),
            prev_hash: &prev,
            hash: &hash,
            mac: Some(&m),
        };
        assert!(verifier.push(&stored), "seq {}", v["seq"]);
        prev = hash;
    }
    let report = verifier.finish(None);
    assert!(report.ok(), "{report:?}");
    assert_eq!(
        (report.checked, report.erased),
        ((v1.len() + v2.len()) as i64, 1)
    );
}

#[test]
fn checkpoint_vectors_sign_and_verify() {
    use pgseal_core::checkpoint::{
        key_from_seed, public_key_hex, sign, sign_after, verify, verifying_key_hex, Checkpoint,
    };
    use pgseal_core::ledger::parse_hash;
    let mut versions = Vec::new();
    for v in vectors("checkpoint") {
        let cp: Checkpoint = serde_json::from_value(v["checkpoint"].clone()).unwrap();
        let hash = parse_hash(&cp.hash).unwrap();
        let again = match (
            cp.ledger_id.as_deref(),
            cp.prev_seq,
            cp.prev_hash.as_deref(),
        ) {
            // v2: signed by the random checkpoint key, given as its 32-byte seed.
            (Some(ledger_id), Some(prev_seq), Some(prev_hash)) => {
                let ck = key_from_seed(&key(&v, "checkpoint_key"));
                assert_eq!(verifying_key_hex(&ck), s(&v, "public_key"));
                sign_after(
                    &ck,
                    cp.key_version,
                    ledger_id,
                    &cp.tenant,
                    (cp.seq, &hash),
                    (prev_seq, &parse_hash(prev_hash).unwrap()),
                    &cp.signed_at,
                )
            }
            // v1: signed by the key derived from a master key version.
            _ => {
                let master = key(&v, "master_key");
                assert_eq!(public_key_hex(&master), s(&v, "public_key"));
                sign(
                    &master,
                    cp.key_version,
                    &cp.tenant,
                    cp.seq,
                    &hash,
                    &cp.signed_at,
                )
            }
        };
        assert_eq!(again, cp, "Ed25519 signatures are deterministic");
        assert!(verify(s(&v, "public_key"), &cp));
        versions.push(cp.version());
    }
    assert!(
        versions.contains(&1) && versions.contains(&2),
        "{versions:?}"
    );
}

#[test]
fn grant_vectors_sign_parse_and_name_their_scope() {
    use pgseal_core::grant::{Grant, Scope};
    for v in vectors("grant") {
        let master = key(&v, "master_key");
        let scope = Scope {
            database: s(&v, "database"),
            table: s(&v, "table"),
            role: s(&v, "role"),
            tenant: s(&v, "tenant"),
        };
        let version = u32::try_from(v["version"].as_u64().unwrap()).unwrap();
        let expires = v["expires"].as_i64().unwrap();
        let signed = Grant::sign(&master, version, expires, &scope);
        assert_eq!(signed.to_string(), s(&v, "grant"));
        let parsed = Grant::parse(s(&v, "grant")).unwrap();
        assert_eq!(parsed, signed);
        assert!(parsed.made_under(&master));
        assert!(parsed.names(&master, &scope));
        let other = Scope {
            tenant: "another",
            ..scope
        };
        assert!(!parsed.names(&master, &other));
    }
}
