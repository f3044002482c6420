//! Properties of pgseal's decoders (issue 20), through the crate's public API only:
//! the sealed-value envelope, wrapped keys, and checkpoints (their JSON records and
//! their signature check).
//!
//! - Arbitrary input never panics a decoder.
//! - Arbitrary mutations of a valid encoding (byte flips, truncations, insertions,
//!   deletions, several at once) either fail to decode or verify, or decode to
//!   exactly the original.
//!
//! `PROPTEST_CASES` sets the number of cases (256 by default; `make fuzz` raises it).

use pgseal_core::checkpoint::{self, Checkpoint, FIRST_PREV};
use pgseal_core::envelope::{self, Envelope};
use pgseal_core::keys::{new_key_id, SecretKey};
use pgseal_core::ledger::parse_hash;
use pgseal_core::wrap::{self, Purpose, WrapLabel, WRAPPED_LEN};
use proptest::prelude::*;

// ---------------------------------------------------------------- mutations

/// One edit of an encoding's bytes. Positions are indexes into the bytes as they
/// are when the edit applies.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte with a non-zero mask.
    Flip(prop::sample::Index, u8),
    /// Keep only a prefix (possibly empty).
    Truncate(prop::sample::Index),
    /// Insert a byte before a position (or at the end).
    Insert(prop::sample::Index, u8),
    /// Remove one byte.
    Delete(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Inserted bytes are mostly printable ASCII, so text decoders see text.
    let byte = prop_oneof![3 => 0x20u8..0x7f, 1 => any::<u8>()];
    prop_oneof![
        4 => (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        2 => (any::<prop::sample::Index>(), byte).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => any::<prop::sample::Index>().prop_map(Mutation::Delete),
    ]
}

/// One to four edits, applied in order.
fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..=4)
}

fn apply(bytes: &[u8], edits: &[Mutation]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for edit in edits {
        match *edit {
            Mutation::Flip(ref i, mask) if !out.is_empty() => {
                let at = i.index(out.len());
                out[at] ^= mask;
            }
            Mutation::Truncate(ref i) => out.truncate(i.index(out.len() + 1)),
            Mutation::Insert(ref i, b) => out.insert(i.index(out.len() + 1), b),
            Mutation::Delete(ref i) if !out.is_empty() => {
                out.remove(i.index(out.len()));
            }
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------- envelope

const TENANT: &str = "acme";
const CONTEXT: Option<&str> = Some("integrations.token");

/// Parses and opens `text` the way `vault_decrypt` does with the right key,
/// tenant and context: both through `Envelope::parse` + `open_text` and through
/// `split` + `decode_into` + `open_text_in_place`. Both paths must agree.
fn open_both_ways(key: &SecretKey, text: &str) -> Option<String> {
    let cipher = key.cipher();
    let by_parse = Envelope::parse(text)
        .ok()
        .and_then(|env| envelope::open_text(&cipher, TENANT, CONTEXT, env).ok())
        .map(|s| s.as_str().to_owned());
    let in_place = envelope::split(text).ok().and_then(|(key_id, b64)| {
        let mut buf = vec![0u8; envelope::decoded_len_max(b64.len())];
        let n = envelope::decode_into(b64, &mut buf).ok()?;
        let len =
            envelope::open_text_in_place(&cipher, TENANT, CONTEXT, key_id, &mut buf[..n]).ok()?;
        Some(String::from_utf8(buf[..len].to_vec()).unwrap())
    });
    assert_eq!(by_parse, in_place, "the two decrypt paths disagree");
    by_parse
}

proptest! {
    /// Any text: parsing never panics, and text that parses is exactly the
    /// canonical form of what it parsed to (one spelling per envelope).
    #[test]
    fn envelope_parse_of_any_text(text in any::<String>()) {
        if let Ok(env) = Envelope::parse(&text) {
            prop_assert!(env.payload.len() >= envelope::NONCE_LEN + envelope::TAG_LEN);
            prop_assert_eq!(envelope::format(env.key_id, &env.payload), text);
        }
    }

    /// Text shaped like an envelope (the prefix, a key id, base64url-alphabet
    /// characters) reaches the payload decoder: same property.
    #[test]
    fn envelope_parse_of_envelope_shaped_text(key_id in "[A-Za-z0-9_-]{0,70}",
                                              b64 in "[A-Za-z0-9_=+/-]{0,80}") {
        let text = format!("v2:{key_id}:{b64}");
        if let Ok(env) = Envelope::parse(&text) {
            prop_assert_eq!(envelope::format(env.key_id, &env.payload), text);
        }
    }

    /// decode_into with a buffer of any size never panics, and never reports more
    /// bytes than the buffer holds.
    #[test]
    fn decode_into_any_buffer(b64 in "[A-Za-z0-9_-]{0,80}", size in 0usize..80) {
        let mut out = vec![0u8; size];
        if let Ok(n) = envelope::decode_into(&b64, &mut out) {
            prop_assert!(n <= size);
        }
    }

    /// Opening any payload under any tenant, context and key id never panics and
    /// (with overwhelming probability) fails.
    #[test]
    fn envelope_open_of_any_payload(payload in prop::collection::vec(any::<u8>(), 0..120),
                                    tenant in ".{0,20}", ctx in prop::option::of(".{0,20}"),
                                    key_id in ".{0,20}") {
        let cipher = SecretKey::from_slice(&[7u8; 32]).unwrap().cipher();
        let env = Envelope { key_id: &key_id, payload: payload.clone() };
        prop_assert!(envelope::open(&cipher, &tenant, ctx.as_deref(), &env).is_err());
        prop_assert!(envelope::open_text(&cipher, &tenant, ctx.as_deref(), env).is_err());
        let mut buf = payload;
        prop_assert!(envelope::open_text_in_place(&cipher, &tenant, ctx.as_deref(), &key_id, &mut buf).is_err());
    }

    /// A mutated sealed value either fails to parse or open, or is the original
    /// text and opens to the original plaintext.
    #[test]
    fn envelope_mutations_fail_or_are_the_original(pt in ".{0,40}", edits in mutations()) {
        let key = SecretKey::random();
        let sealed = envelope::seal(&key.cipher(), TENANT, &new_key_id(), CONTEXT, pt.as_bytes());
        prop_assert_eq!(open_both_ways(&key, &sealed), Some(pt.clone()));
        let mutated = apply(sealed.as_bytes(), &edits);
        let Ok(text) = String::from_utf8(mutated) else {
            return Ok(()); // not text: no SQL text value can carry it
        };
        if let Some(opened) = open_both_ways(&key, &text) {
            prop_assert_eq!(&text, &sealed);
            prop_assert_eq!(opened, pt);
        }
    }
}

// ---------------------------------------------------------------- wrapped keys

fn label<'a>(tenant: &'a str, key_id: &'a str) -> WrapLabel<'a> {
    WrapLabel {
        purpose: Purpose::Dek,
        tenant,
        key_id,
        kek_version: 1,
    }
}

proptest! {
    /// Unwrapping any bytes under any label never panics and fails.
    #[test]
    fn unwrap_of_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..130),
                           tenant in ".{0,20}", key_id in ".{0,20}", version in any::<u32>(),
                           purpose in prop_oneof![Just(Purpose::Dek), Just(Purpose::Ledger), Just(Purpose::Checkpoint)]) {
        let kek = SecretKey::from_slice(&[9u8; 32]).unwrap();
        let l = WrapLabel { purpose, tenant: &tenant, key_id: &key_id, kek_version: version };
        prop_assert!(wrap::unwrap(&kek, l, &bytes).is_err());
    }

    /// Bytes of exactly the wrapped length, the case that reaches AES-GCM.
    #[test]
    fn unwrap_of_any_bytes_of_the_wrapped_length(bytes in prop::collection::vec(any::<u8>(), WRAPPED_LEN)) {
        let kek = SecretKey::from_slice(&[9u8; 32]).unwrap();
        prop_assert!(wrap::unwrap(&kek, label("acme", "kid"), &bytes).is_err());
    }

    /// A mutated wrapped key either fails to unwrap, or is the original bytes and
    /// unwraps to the original key.
    #[test]
    fn wrap_mutations_fail_or_are_the_original(edits in mutations()) {
        let kek = SecretKey::random();
        let dek = SecretKey::random();
        let key_id = new_key_id();
        let wrapped = wrap::wrap(&kek, label(TENANT, &key_id), &dek);
        let mutated = apply(&wrapped, &edits);
        if let Ok(back) = wrap::unwrap(&kek, label(TENANT, &key_id), &mutated) {
            prop_assert_eq!(&mutated, &wrapped);
            prop_assert_eq!(back.expose(), dek.expose());
        }
    }
}

// ---------------------------------------------------------------- checkpoints

/// A checkpoint with every field free, including malformed hex.
fn any_checkpoint() -> impl Strategy<Value = Checkpoint> {
    let hexish = prop_oneof!["[0-9a-fA-F]{0,130}", ".{0,70}"];
    (
        (
            ".{0,20}",
            any::<i64>(),
            hexish.clone(),
            ".{0,30}",
            any::<u32>(),
        ),
        (
            prop::option::of(".{0,40}"),
            prop::option::of(any::<i64>()),
            prop::option::of(hexish.clone()),
            hexish,
        ),
    )
        .prop_map(
            |(
                (tenant, seq, hash, signed_at, key_version),
                (ledger_id, prev_seq, prev_hash, signature),
            )| Checkpoint {
                tenant,
                seq,
                hash,
                signed_at,
                key_version,
                ledger_id,
                prev_seq,
                prev_hash,
                signature,
            },
        )
}

/// Two checkpoints are the same checkpoint when every field holds the same value;
/// hex fields are compared as the bytes they spell (verify accepts either case).
fn same_checkpoint(a: &Checkpoint, b: &Checkpoint) -> bool {
    let bytes = |h: &str| hex::decode(h).ok();
    a.tenant == b.tenant
        && a.seq == b.seq
        && parse_hash(&a.hash) == parse_hash(&b.hash)
        && a.signed_at == b.signed_at
        && a.key_version == b.key_version
        && a.ledger_id == b.ledger_id
        && a.prev_seq == b.prev_seq
        && a.prev_hash.as_deref().map(parse_hash) == b.prev_hash.as_deref().map(parse_hash)
        && bytes(&a.signature) == bytes(&b.signature)
}

/// A signed v1 checkpoint and a signed v2 one, with their public keys.
fn signed_checkpoints(tenant: &str, seq: i64, hash: &[u8; 32]) -> Vec<(String, Checkpoint)> {
    let master = SecretKey::random();
    let v1 = checkpoint::sign(&master, 3, tenant, seq, hash, "2026-12-03T09:00:00Z");
    let key = checkpoint::key_from_seed(&SecretKey::random());
    let first = checkpoint::sign_after(
        &key,
        1,
        "0123456789abcdef0123456789abcdef",
        tenant,
        (seq, hash),
        (FIRST_PREV.0, &FIRST_PREV.1),
        "2026-12-03T09:00:00.123456Z",
    );
    let second = checkpoint::sign_after(
        &key,
        2,
        "0123456789abcdef0123456789abcdef",
        tenant,
        (seq.saturating_add(5), &[0xab; 32]),
        (seq, hash),
        "2026-12-03T09:01:00Z",
    );
    vec![
        (checkpoint::public_key_hex(&master), v1),
        (checkpoint::verifying_key_hex(&key), first),
        (checkpoint::verifying_key_hex(&key), second),
    ]
}

proptest! {
    /// Any text as a checkpoint record (a line of a checkpoints file) never panics
    /// the parser, and a record that parses never panics verify.
    #[test]
    fn checkpoint_record_of_any_text(line in any::<String>(), pk in "[0-9a-f]{64}") {
        if let Ok(cp) = serde_json::from_str::<Checkpoint>(&line) {
            let _ = checkpoint::verify(&pk, &cp);
        }
    }

    /// Any checkpoint, under any public key text, never panics verify, and does
    /// not verify.
    #[test]
    fn checkpoint_verify_of_any_fields(cp in any_checkpoint(),
                                       pk in prop_oneof!["[0-9a-f]{64}", " ?[0-9a-fA-F]{0,70} ?", ".{0,70}"]) {
        prop_assert!(!checkpoint::verify(&pk, &cp));
        // The same record through JSON: what a checkpoints file would hold.
        let line = serde_json::to_string(&cp).unwrap();
        let back: Checkpoint = serde_json::from_str(&line).unwrap();
        prop_assert_eq!(back, cp);
    }

    /// A mutated checkpoint record (a JSON line) either fails to parse or to
    /// verify, or is the same checkpoint as the original.
    #[test]
    fn checkpoint_record_mutations_fail_or_are_the_original(tenant in "[a-z0-9._-]{1,12}",
                                                            seq in 1i64..1_000_000,
                                                            hash in any::<[u8; 32]>(),
                                                            which in 0usize..3,
                                                            edits in mutations()) {
        let (pk, original) = signed_checkpoints(&tenant, seq, &hash).swap_remove(which);
        prop_assert!(checkpoint::verify(&pk, &original));
        let line = serde_json::to_string(&original).unwrap();
        let mutated = apply(line.as_bytes(), &edits);
        let Ok(cp) = serde_json::from_slice::<Checkpoint>(&mutated) else {
            return Ok(());
        };
        if checkpoint::verify(&pk, &cp) {
            prop_assert!(same_checkpoint(&cp, &original),
                         "mutated record {:?} verifies as {:?}", String::from_utf8_lossy(&mutated), cp);
        }
    }

    /// Mutating one field's text directly (not through JSON, so every edit lands
    /// in a signed field or the signature) fails to verify unless the field
    /// still spells the same value.
    #[test]
    fn checkpoint_field_mutations_fail_or_are_the_original(which in 0usize..3,
                                                          field in 0usize..5,
                                                          edits in mutations()) {
        let (pk, original) = signed_checkpoints("acme", 42, &[7u8; 32]).swap_remove(which);
        let mut cp = original.clone();
        let edit = |s: &str| String::from_utf8_lossy(&apply(s.as_bytes(), &edits)).into_owned();
        match field {
            0 => cp.tenant = edit(&cp.tenant),
            1 => cp.hash = edit(&cp.hash),
            2 => cp.signed_at = edit(&cp.signed_at),
            3 => cp.signature = edit(&cp.signature),
            _ => cp.prev_hash = cp.prev_hash.as_deref().map(edit),
        }
        if checkpoint::verify(&pk, &cp) {
            prop_assert!(same_checkpoint(&cp, &original), "{:?} verifies", cp);
        }
    }

    /// Mutating the public key text never makes another key verify the
    /// checkpoint: it fails or names the same key.
    #[test]
    fn checkpoint_public_key_mutations(which in 0usize..3, edits in mutations()) {
        let (pk, original) = signed_checkpoints("acme", 42, &[7u8; 32]).swap_remove(which);
        let mutated = String::from_utf8_lossy(&apply(pk.as_bytes(), &edits)).into_owned();
        if checkpoint::verify(&mutated, &original) {
            prop_assert_eq!(hex::decode(mutated.trim()).ok(), hex::decode(&pk).ok());
        }
    }
}
