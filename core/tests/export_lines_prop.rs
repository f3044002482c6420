//! Properties of the export-line parser and the offline verifier: arbitrary bytes
//! and arbitrary single-byte mutations of a valid export (format 1, format 2 and
//! erased lines) never panic, and an export that still verifies after a mutation
//! decodes to exactly the entries that were exported (only the informational
//! `recorded_at`, the unverifiable `mac`, and spellings of the same value may differ).

use std::sync::OnceLock;

use pgseal_core::canonical::canonical_payload;
use pgseal_core::export::{decode_line, verify_export, DecodedLine};
use pgseal_core::ledger::{
    entry_hash, entry_hash_v2, payload_commitment, EntryFields, EntryFieldsV2, Hash, FMT_V1,
    FMT_V2, GENESIS,
};
use proptest::prelude::*;
use serde_json::json;

/// What an exported entry says, in one spelling: bytes for hex, canonical JSON for
/// the payload, an empty subjects list for none.
#[derive(Debug, PartialEq, Eq)]
struct Meaning {
    fmt: i16,
    tenant: String,
    seq: i64,
    recorded_at_us: i64,
    actor: String,
    db_role: Option<String>,
    event: String,
    subjects: Vec<String>,
    payload: Option<String>,
    salt: Option<[u8; 32]>,
    commitment: Option<Hash>,
    prev_hash: Hash,
    hash: Hash,
}

fn meaning(d: DecodedLine) -> Meaning {
    Meaning {
        fmt: d.fmt,
        tenant: d.tenant_id,
        seq: d.seq,
        recorded_at_us: d.recorded_at_us,
        actor: d.actor,
        db_role: d.db_role,
        event: d.event,
        subjects: d.subjects.unwrap_or_default(),
        payload: d
            .payload
            .map(|p| canonical_payload(&p).unwrap_or_else(|_| format!("not canonical: {p}"))),
        salt: d.salt,
        commitment: d.commitment,
        prev_hash: d.prev_hash,
        hash: d.hash,
    }
}

/// A valid export of one chain: format 1 entries, then format 2, one of them erased.
fn export() -> &'static (String, Vec<DecodedLine>) {
    static E: OnceLock<(String, Vec<DecodedLine>)> = OnceLock::new();
    E.get_or_init(|| {
        let mut prev = GENESIS;
        let mut lines = Vec::new();
        for (i, kind) in "1122x2".chars().enumerate() {
            let seq = i as i64 + 1;
            let at = 1_796_000_000_000_000 + seq;
            let payload = format!("{{\"n\": {seq}.0, \"s\": \"\\u00e9\"}}");
            let canonical = canonical_payload(&payload).unwrap();
            let line = if kind == '1' {
                let hash = entry_hash(&EntryFields {
                    prev_hash: &prev,
                    tenant: "acme",
                    seq,
                    recorded_at_us: at,
                    actor: "alice",
                    event: "e",
                    payload: &canonical,
                });
                let line = json!({"tenant_id": "acme", "seq": seq, "recorded_at_us": at,
                    "recorded_at": "informational", "actor": "alice", "event": "e",
                    "payload": serde_json::from_str::<serde_json::Value>(&payload).unwrap(),
                    "prev_hash": hex::encode(prev), "hash": hex::encode(hash), "mac": hex::encode([1u8; 32])});
                prev = hash;
                line
            } else {
                let salt = [seq as u8 ^ 0x5a; 32];
                let commitment = payload_commitment(&salt, &canonical);
                let subjects = vec![format!("user:{seq}"), "user:\u{e9}".to_owned()];
                let hash = entry_hash_v2(&EntryFieldsV2 {
                    prev_hash: &prev,
                    tenant: "acme",
                    seq,
                    recorded_at_us: at,
                    actor: "alice",
                    db_role: "app_rw",
                    event: "e",
                    subjects: &subjects,
                    commitment: &commitment,
                });
                let mut line = json!({"fmt": FMT_V2, "tenant_id": "acme", "seq": seq,
                    "recorded_at_us": at, "actor": "alice", "db_role": "app_rw", "event": "e",
                    "subjects": subjects, "prev_hash": hex::encode(prev), "hash": hex::encode(hash),
                    "mac": hex::encode([1u8; 32])});
                if kind == 'x' {
                    line["payload"] = serde_json::Value::Null;
                    line["commitment"] = hex::encode(commitment).into();
                } else {
                    line["payload"] = serde_json::from_str(&payload).unwrap();
                    line["salt"] = hex::encode(salt).into();
                }
                prev = hash;
                line
            };
            lines.push(line.to_string());
        }
        let decoded = lines.iter().map(|l| decode_line(l).unwrap()).collect();
        (lines.join("\n") + "\n", decoded)
    })
}

fn verifies(text: &[u8]) -> bool {
    match verify_export(text, &[], None) {
        Ok(results) => !results.is_empty() && results.iter().all(|r| r.ok()),
        Err(_) => false,
    }
}

/// Every non-blank line decoded, or `None` when one does not decode.
fn decode_all(text: &str) -> Option<Vec<Meaning>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| decode_line(l).ok().map(meaning))
        .collect()
}

#[test]
fn the_valid_export_verifies_and_decodes_as_written() {
    let (text, decoded) = export();
    assert!(verifies(text.as_bytes()));
    let r = verify_export(text.as_bytes(), &[], None).unwrap();
    assert_eq!((r[0].report.checked, r[0].report.erased), (6, 1));
    assert_eq!(decoded[0].fmt, FMT_V1);
    assert_eq!(decoded[0].subjects, None);
    assert_eq!(decoded[2].fmt, FMT_V2);
    assert_eq!(decoded[2].db_role.as_deref(), Some("app_rw"));
    assert_eq!(
        decoded[2].subjects.as_deref(),
        Some(&["user:3".to_owned(), "user:\u{e9}".to_owned()][..])
    );
    assert!(decoded[2].salt.is_some() && decoded[2].commitment.is_none());
    // The erased line: no payload, no salt, its commitment.
    assert_eq!(decoded[4].payload, None);
    assert!(decoded[4].salt.is_none() && decoded[4].commitment.is_some());
}

#[test]
fn a_null_payload_with_a_salt_is_not_erased() {
    let (text, _) = export();
    let line = text.lines().nth(2).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["payload"] = serde_json::Value::Null;
    let d = decode_line(&v.to_string()).unwrap();
    assert_eq!(d.payload.as_deref(), Some("null"));
    assert!(!verifies(v.to_string().as_bytes()));
}

#[test]
fn unknown_fields_and_bad_hex_are_refused() {
    let (text, _) = export();
    let line = text.lines().nth(2).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["extra"] = 1.into();
    assert!(decode_line(&v.to_string()).is_err());
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["salt"] = "00".into();
    assert!(decode_line(&v.to_string()).is_err());
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Replace(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
    ]
}

fn apply(text: &str, m: &Mutation) -> Vec<u8> {
    let mut b = text.as_bytes().to_vec();
    let n = b.len();
    match *m {
        Mutation::Flip(i, bit) => b[i % n] ^= 1 << bit,
        Mutation::Replace(i, x) => b[i % n] = x,
        Mutation::Insert(i, x) => b.insert(i % (n + 1), x),
        Mutation::Delete(i) => {
            b.remove(i % n);
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = decode_line(&text);
        let _ = verify_export(&bytes[..], &[], None);
    }

    #[test]
    fn a_mutated_export_that_verifies_says_what_was_exported(m in mutation()) {
        let (text, decoded) = export();
        let mutated = apply(text, &m);
        for line in String::from_utf8_lossy(&mutated).lines() {
            let _ = decode_line(line);
        }
        if verifies(&mutated) {
            let original: Vec<Meaning> = decoded.iter().cloned().map(meaning).collect();
            let text = std::str::from_utf8(&mutated).expect("a verified export is UTF-8");
            prop_assert_eq!(decode_all(text), Some(original), "{:?}", m);
        }
    }

    #[test]
    fn a_mutated_line_decodes_to_itself_or_fails_to_verify(
        line in 0usize..6,
        muts in proptest::collection::vec(mutation(), 1..4),
    ) {
        let (text, decoded) = export();
        let lines: Vec<&str> = text.lines().collect();
        let mut bytes = lines[line].as_bytes().to_vec();
        for m in &muts {
            bytes = apply(&String::from_utf8_lossy(&bytes), m);
        }
        let changed = String::from_utf8_lossy(&bytes).into_owned();
        let Ok(d) = decode_line(&changed) else { return Ok(()) };
        let mut all: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        all[line] = changed;
        if verifies(all.join("\n").as_bytes()) {
            prop_assert_eq!(meaning(d), meaning(decoded[line].clone()), "{:?}", muts);
        }
    }
}
