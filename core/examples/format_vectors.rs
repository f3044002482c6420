//! Prints the test vectors that docs/FORMAT.md carries (run when the format changes):
//! `cargo run -p pgseal-core --example format_vectors`.

use pgseal_core::canonical::canonical_payload;
use pgseal_core::checkpoint;
use pgseal_core::envelope::seal_with_nonce;
use pgseal_core::grant::{Grant, Scope};
use pgseal_core::keys::SecretKey;
use pgseal_core::ledger::{
    entry_hash, entry_hash_v2, payload_commitment, EntryFields, EntryFieldsV2, EntryMac, GENESIS,
};
use pgseal_core::wrap::{wrap_with_nonce, Purpose, WrapLabel};

fn key(seed: u8) -> SecretKey {
    let bytes: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(seed))
        .collect();
    SecretKey::from_slice(&bytes).unwrap()
}

fn nonce(seed: u8) -> [u8; 12] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
}

fn main() {
    let cases: [(&str, &str, Option<&str>, &str); 4] = [
        (
            "acme",
            "AAECAwQFBgcICQoL",
            Some("integrations.token"),
            "sk-live-51HxExampleToken",
        ),
        ("42", "kIdOfTenant42xyz", None, ""),
        (
            "5f0e8a52-6c5e-4d37-9c61-0e5f1f4a2b10",
            "Z-_z09Z-_z09Z-_z",
            Some(""),
            "smtp p\u{e4}ssw\u{f6}rd ✓",
        ),
        (
            "acme",
            "AAECAwQFBgcICQoL",
            Some("ai.openai"),
            "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOP",
        ),
    ];
    println!("value vectors:");
    for (i, (tenant, kid, ctx, pt)) in cases.iter().enumerate() {
        let k = key(i as u8 + 1);
        let n = nonce(i as u8 + 1);
        let env = seal_with_nonce(&k.cipher(), tenant, kid, *ctx, pt.as_bytes(), &n);
        println!(
            "{}",
            serde_json::json!({"dek": hex::encode(k.expose()), "tenant": tenant, "key_id": kid,
                "context": ctx, "plaintext": pt, "nonce": hex::encode(n), "sealed": env})
        );
    }
    println!("wrap vectors:");
    for (i, (purpose, tenant, kid, ver)) in [
        (Purpose::Dek, "acme", "AAECAwQFBgcICQoL", 1u32),
        (Purpose::Ledger, "42", "LedgerKeyId00001", 7),
        (Purpose::Checkpoint, "_pgseal", "CheckpointKey001", 3),
    ]
    .iter()
    .enumerate()
    {
        let kek = key(100 + i as u8);
        let dek = key(200 + i as u8);
        let n = nonce(50 + i as u8);
        let w = wrap_with_nonce(
            &kek,
            WrapLabel {
                purpose: *purpose,
                tenant,
                key_id: kid,
                kek_version: *ver,
            },
            &dek,
            &n,
        );
        println!(
            "{}",
            serde_json::json!({"kek": hex::encode(kek.expose()), "kek_version": ver, "purpose": purpose.as_str(),
                "tenant": tenant, "key_id": kid, "key": hex::encode(dek.expose()), "nonce": hex::encode(n),
                "wrapped": hex::encode(w)})
        );
    }
    println!("ledger vectors:");
    let mac_key = key(150);
    let mut prev = GENESIS;
    let entries: [(&str, i64, i64, &str, &str, &str); 3] = [
        ("acme", 1, 1_795_000_000_000_000, "alice", "login", r#"{}"#),
        (
            "acme",
            2,
            1_795_000_000_123_456,
            "alice",
            "order.update",
            r#"{"b": [1.50, true, null], "a": "\u00e9 \"x\"", "id": 42}"#,
        ),
        (
            "acme",
            3,
            1_795_000_001_000_000,
            "svc:billing",
            "vault.decrypt",
            r#"{"count": 3, "contexts": ["ai.openai"]}"#,
        ),
    ];
    for (tenant, seq, at, actor, event, payload) in entries {
        let canonical = canonical_payload(payload).unwrap();
        let f = EntryFields {
            prev_hash: &prev,
            tenant,
            seq,
            recorded_at_us: at,
            actor,
            event,
            payload: &canonical,
        };
        let hash = entry_hash(&f);
        let mac = EntryMac::new(&mac_key).sign(&hash);
        println!(
            "{}",
            serde_json::json!({"mac_key": hex::encode(mac_key.expose()), "tenant": tenant, "seq": seq,
                "recorded_at_us": at, "actor": actor, "event": event, "payload": payload,
                "canonical_payload": canonical, "prev_hash": hex::encode(prev), "hash": hex::encode(hash),
                "mac": hex::encode(mac)})
        );
        prev = hash;
    }
    println!("ledger_v2 vectors (continuing the chain above):");
    /// seq, recorded_at_us, actor, db_role, event, subjects, payload, erased.
    type V2Entry<'a> = (
        i64,
        i64,
        &'a str,
        &'a str,
        &'a str,
        &'a [&'a str],
        &'a str,
        bool,
    );
    let v2: [V2Entry; 3] = [
        (
            4,
            1_796_000_000_000_000,
            "alice",
            "app_rw",
            "order.paid",
            &[],
            r#"{"order": 42, "to": "paid"}"#,
            false,
        ),
        (
            5,
            1_796_000_000_000_001,
            "svc:crm",
            "crm_writer",
            "subject.updated",
            &["user:17", "user:\u{e9}"],
            r#"{"n": 1.0, "field": "email"}"#,
            false,
        ),
        (
            6,
            1_796_000_000_500_000,
            "alice",
            "app_rw",
            "subject.contact",
            &["user:17"],
            r#"{"email": "a@example.com"}"#,
            true,
        ),
    ];
    for (i, (seq, at, actor, db_role, event, subjects, payload, erased)) in
        v2.into_iter().enumerate()
    {
        let canonical = canonical_payload(payload).unwrap();
        let salt: [u8; 32] =
            std::array::from_fn(|j| (j as u8).wrapping_mul(11).wrapping_add(0x40 + i as u8));
        let commitment = payload_commitment(&salt, &canonical);
        let subjects: Vec<String> = subjects.iter().map(|s| (*s).to_owned()).collect();
        let hash = entry_hash_v2(&EntryFieldsV2 {
            prev_hash: &prev,
            tenant: "acme",
            seq,
            recorded_at_us: at,
            actor,
            db_role,
            event,
            subjects: &subjects,
            commitment: &commitment,
        });
        let mac = EntryMac::new(&mac_key).sign(&hash);
        let (payload, canonical, salt) = if erased {
            (None, None, None)
        } else {
            (Some(payload), Some(canonical), Some(hex::encode(salt)))
        };
        println!(
            "{}",
            serde_json::json!({"mac_key": hex::encode(mac_key.expose()), "tenant": "acme", "seq": seq,
                "recorded_at_us": at, "actor": actor, "db_role": db_role, "event": event,
                "subjects": subjects, "payload": payload, "canonical_payload": canonical,
                "salt": salt, "commitment": hex::encode(commitment), "erased": erased,
                "prev_hash": hex::encode(prev), "hash": hex::encode(hash), "mac": hex::encode(mac)})
        );
        prev = hash;
    }
    println!("checkpoint vectors:");
    for (i, (tenant, seq, signed_at, ver)) in [
        ("acme", 3i64, "2026-11-25T12:00:00.000000Z", 1u32),
        ("42", 1, "2026-11-25T12:00:01.5Z", 2),
    ]
    .iter()
    .enumerate()
    {
        let master = key(170 + i as u8);
        let hash = [i as u8 + 0x11; 32];
        let cp = checkpoint::sign(&master, *ver, tenant, *seq, &hash, signed_at);
        println!(
            "{}",
            serde_json::json!({"master_key": hex::encode(master.expose()), "public_key": checkpoint::public_key_hex(&master),
                "checkpoint": cp})
        );
    }
    // v2, signed by a random checkpoint key (given as its seed) and naming a ledger
    // id: the first extends the first v1 vector's (seq, hash); the second is a
    // tenant's first checkpoint, which names (0, 32 zero bytes).
    for (i, (ledger_id, tenant, seq, prev_seq, signed_at, ver)) in [
        (
            "7d3f0a1c9b2e4d5f8a6c1e0b3d2f4a5c",
            "acme",
            7i64,
            3i64,
            "2026-11-26T12:00:00.000000Z",
            1u32,
        ),
        (
            "00112233445566778899aabbccddeeff",
            "42",
            2,
            0,
            "2026-11-26T12:00:01.5Z",
            2,
        ),
    ]
    .iter()
    .enumerate()
    {
        let seed = key(190 + i as u8);
        let ck = checkpoint::key_from_seed(&seed);
        let hash = [i as u8 + 0x21; 32];
        let prev_hash = if *prev_seq == 0 { GENESIS } else { [0x11; 32] };
        let cp = checkpoint::sign_after(
            &ck,
            *ver,
            ledger_id,
            tenant,
            (*seq, &hash),
            (*prev_seq, &prev_hash),
            signed_at,
        );
        println!(
            "{}",
            serde_json::json!({"checkpoint_key": hex::encode(seed.expose()), "public_key": checkpoint::verifying_key_hex(&ck),
                "checkpoint": cp})
        );
    }
    println!("grant vectors:");
    for (i, (version, expires, database, table, role, tenant)) in [
        (
            1u32,
            1_796_212_800i64,
            "app",
            "public.docs",
            "docs_owner",
            "acme",
        ),
        (
            7,
            1_796_216_400,
            "saas prod",
            "\"Tenant Data\".\"my.docs\"",
            "app",
            "5f0e8a52-6c5e-4d37-9c61-0e5f1f4a2b10",
        ),
        (4_294_967_295, 0, "d\u{e9}j\u{e0}", "s.t", "r\u{f4}le", ""),
    ]
    .iter()
    .enumerate()
    {
        let master = key(210 + i as u8);
        let scope = Scope {
            database,
            table,
            role,
            tenant,
        };
        let grant = Grant::sign(&master, *version, *expires, &scope);
        println!(
            "{}",
            serde_json::json!({"master_key": hex::encode(master.expose()), "version": version, "expires": expires,
                "database": database, "table": table, "role": role, "tenant": tenant, "grant": grant.to_string()})
        );
    }
}
