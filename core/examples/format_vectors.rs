//! Prints the test vectors that docs/FORMAT.md carries (run when the format changes):
//! `cargo run -p pgseal-core --example format_vectors`.

use pgseal_core::envelope::seal_with_nonce;
use pgseal_core::keys::SecretKey;
use pgseal_core::wrap::{wrap_with_nonce, Purpose, WrapLabel};

fn key(seed: u8) -> SecretKey {
    let bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(7).wrapping_add(seed)).collect();
    SecretKey::from_slice(&bytes).unwrap()
}

fn nonce(seed: u8) -> [u8; 12] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
}

fn main() {
    let cases: [(&str, &str, Option<&str>, &str); 4] = [
        ("acme", "AAECAwQFBgcICQoL", Some("integrations.token"), "sk-live-51HxExampleToken"),
        ("42", "kIdOfTenant42xyz", None, ""),
        ("5f0e8a52-6c5e-4d37-9c61-0e5f1f4a2b10", "Z-_z09Z-_z09Z-_z", Some(""), "smtp p\u{e4}ssw\u{f6}rd ✓"),
        ("acme", "AAECAwQFBgcICQoL", Some("ai.openai"), "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOP"),
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
    for (i, (purpose, tenant, kid, ver)) in
        [(Purpose::Dek, "acme", "AAECAwQFBgcICQoL", 1u32), (Purpose::Ledger, "42", "LedgerKeyId00001", 7)].iter().enumerate()
    {
        let kek = key(100 + i as u8);
        let dek = key(200 + i as u8);
        let n = nonce(50 + i as u8);
        let w = wrap_with_nonce(&kek, WrapLabel { purpose: *purpose, tenant, key_id: kid, kek_version: *ver }, &dek, &n);
        println!(
            "{}",
            serde_json::json!({"kek": hex::encode(kek.expose()), "kek_version": ver, "purpose": purpose.as_str(),
                "tenant": tenant, "key_id": kid, "key": hex::encode(dek.expose()), "nonce": hex::encode(n),
                "wrapped": hex::encode(w)})
        );
    }
}
