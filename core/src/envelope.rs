//! The text envelope of a sealed value: `v2:<keyId>:<base64url(nonce ‖ ciphertext ‖ tag)>`.

use aes_gcm::aead::{Aead, AeadInPlace, Payload};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use zeroize::Zeroizing;

use crate::aad::value_aad;
use crate::keys::{is_valid_key_id, random_bytes};
use crate::CoreError;

pub const PREFIX: &str = "v2:";
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// A parsed envelope. It borrows the key id from the input text.
#[derive(Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub key_id: &'a str,
    /// nonce ‖ ciphertext ‖ tag
    pub payload: Vec<u8>,
}

impl<'a> Envelope<'a> {
    /// Parses the text form. Errors name the problem, never the input.
    pub fn parse(text: &'a str) -> Result<Self, CoreError> {
        let rest = text
            .strip_prefix(PREFIX)
            .ok_or(CoreError::Malformed("expected the prefix v2:"))?;
        let (key_id, b64) = rest
            .split_once(':')
            .ok_or(CoreError::Malformed("expected v2:<keyId>:<payload>"))?;
        if !is_valid_key_id(key_id) {
            return Err(CoreError::Malformed("invalid key id"));
        }
        let payload = URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|_| CoreError::Malformed("payload is not unpadded base64url"))?;
        if payload.len() < NONCE_LEN + TAG_LEN {
            return Err(CoreError::Malformed("payload too short"));
        }
        Ok(Envelope { key_id, payload })
    }

    pub fn nonce(&self) -> &[u8] {
        &self.payload[..NONCE_LEN]
    }
}

/// Formats an envelope from its key id and payload.
pub fn format(key_id: &str, payload: &[u8]) -> String {
    let mut s =
        String::with_capacity(PREFIX.len() + key_id.len() + 1 + payload.len().div_ceil(3) * 4);
    s.push_str(PREFIX);
    s.push_str(key_id);
    s.push(':');
    URL_SAFE_NO_PAD.encode_string(payload, &mut s);
    s
}

/// Seals `plaintext` with a fresh random 96-bit nonce.
pub fn seal(
    cipher: &Aes256Gcm,
    tenant: &str,
    key_id: &str,
    context: Option<&str>,
    plaintext: &[u8],
) -> String {
    let mut nonce = [0u8; NONCE_LEN];
    random_bytes(&mut nonce);
    seal_with_nonce(cipher, tenant, key_id, context, plaintext, &nonce)
}

/// Seals with a caller-chosen nonce. Only for test vectors: reusing a nonce
/// under one key destroys GCM's guarantees.
pub fn seal_with_nonce(
    cipher: &Aes256Gcm,
    tenant: &str,
    key_id: &str,
    context: Option<&str>,
    plaintext: &[u8],
    nonce: &[u8; NONCE_LEN],
) -> String {
    let aad = value_aad(tenant, key_id, context);
    let ct = cipher
        .encrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");
    let mut payload = Vec::with_capacity(NONCE_LEN + ct.len());
    payload.extend_from_slice(nonce);
    payload.extend_from_slice(&ct);
    format(key_id, &payload)
}

/// Opens a parsed envelope. The caller supplies the tenant and context it
/// expects; any mismatch is an authentication failure.
pub fn open(
    cipher: &Aes256Gcm,
    tenant: &str,
    context: Option<&str>,
    env: &Envelope<'_>,
) -> Result<Zeroizing<Vec<u8>>, CoreError> {
    let aad = value_aad(tenant, env.key_id, context);
    cipher
        .decrypt(
            Nonce::from_slice(env.nonce()),
            Payload {
                msg: &env.payload[NONCE_LEN..],
                aad: &aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| CoreError::AuthFailed)
}

/// Opens an envelope, decrypting in place in its own payload buffer (no second
/// allocation), and checks that the plaintext is UTF-8 text.
pub fn open_text(
    cipher: &Aes256Gcm,
    tenant: &str,
    context: Option<&str>,
    env: Envelope<'_>,
) -> Result<Zeroizing<String>, CoreError> {
    let aad = value_aad(tenant, env.key_id, context);
    let mut buf = Zeroizing::new(env.payload);
    let (nonce, rest) = buf.split_at_mut(NONCE_LEN);
    let (ct, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
    cipher
        .decrypt_in_place_detached(Nonce::from_slice(nonce), &aad, ct, Tag::from_slice(tag))
        .map_err(|_| CoreError::AuthFailed)?;
    let len = ct.len();
    buf.copy_within(NONCE_LEN..NONCE_LEN + len, 0);
    buf.truncate(len);
    // Move the buffer into the String; on failure take it back so it is wiped.
    match String::from_utf8(std::mem::take(&mut *buf)) {
        Ok(s) => Ok(Zeroizing::new(s)),
        Err(e) => {
            *buf = e.into_bytes();
            Err(CoreError::NotText)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{new_key_id, SecretKey};
    use proptest::prelude::*;

    fn sealed(pt: &str, ctx: Option<&str>) -> (SecretKey, String) {
        let k = SecretKey::random();
        let s = seal(&k.cipher(), "tenant-a", &new_key_id(), ctx, pt.as_bytes());
        (k, s)
    }

    #[test]
    fn round_trip_and_empty_string() {
        for pt in ["", "sk-live-0123456789", "ünïcødé ✓"] {
            let (k, s) = sealed(pt, Some("integrations.token"));
            let env = Envelope::parse(&s).unwrap();
            let back = open_text(&k.cipher(), "tenant-a", Some("integrations.token"), env).unwrap();
            assert_eq!(back.as_str(), pt);
        }
    }

    #[test]
    fn envelope_shape() {
        let (_, s) = sealed("x", None);
        let parts: Vec<&str> = s.split(':').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], "v2");
        assert_eq!(parts[1].len(), 16);
        // 12 nonce + 1 ciphertext + 16 tag = 29 bytes -> 39 base64url characters
        assert_eq!(parts[2].len(), 39);
    }

    #[test]
    fn wrong_tenant_or_context_fails() {
        let (k, s) = sealed("secret", Some("a"));
        let env = Envelope::parse(&s).unwrap();
        let c = k.cipher();
        assert_eq!(
            open(&c, "tenant-b", Some("a"), &env).unwrap_err(),
            CoreError::AuthFailed
        );
        assert_eq!(
            open(&c, "tenant-a", Some("b"), &env).unwrap_err(),
            CoreError::AuthFailed
        );
        assert_eq!(
            open(&c, "tenant-a", None, &env).unwrap_err(),
            CoreError::AuthFailed
        );
        assert!(open(&SecretKey::random().cipher(), "tenant-a", Some("a"), &env).is_err());
    }

    #[test]
    fn malformed_inputs_are_named_not_echoed() {
        for bad in [
            "",
            "v1:abc:def",
            "v2:",
            "v2:abc",
            "v2::AAAA",
            "v2:a+b:AAAA",
            "v2:abc:@@@@",
            "v2:abc:AAAA",
        ] {
            let e = Envelope::parse(bad).unwrap_err();
            assert!(matches!(e, CoreError::Malformed(_)), "{bad}");
            if bad.len() > 3 {
                assert!(
                    !e.to_string().contains(&bad[3..]),
                    "message echoes input: {e}"
                );
            }
        }
    }

    #[test]
    fn changing_the_key_id_fails_authentication() {
        let k = SecretKey::random();
        let c = k.cipher();
        let s = seal(&c, "t", "AAAAAAAAAAAAAAAA", None, b"v");
        let forged = s.replacen("AAAAAAAAAAAAAAAA", "BBBBBBBBBBBBBBBB", 1);
        let env = Envelope::parse(&forged).unwrap();
        assert_eq!(
            open(&c, "t", None, &env).unwrap_err(),
            CoreError::AuthFailed
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn tampering_any_payload_byte_is_detected(pt in proptest::collection::vec(any::<u8>(), 0..80),
                                                  pos in any::<prop::sample::Index>(),
                                                  flip in 1u8..=255) {
            let k = SecretKey::random();
            let c = k.cipher();
            let s = seal(&c, "t", "kid", Some("ctx"), &pt);
            let mut env = Envelope::parse(&s).unwrap();
            let i = pos.index(env.payload.len());
            env.payload[i] ^= flip;
            prop_assert_eq!(open(&c, "t", Some("ctx"), &env).unwrap_err(), CoreError::AuthFailed);
        }

        #[test]
        fn round_trip_any_bytes(pt in proptest::collection::vec(any::<u8>(), 0..300),
                                tenant in ".{0,40}", ctx in proptest::option::of(".{0,20}")) {
            let k = SecretKey::random();
            let c = k.cipher();
            let s = seal(&c, &tenant, "kid", ctx.as_deref(), &pt);
            let env = Envelope::parse(&s).unwrap();
            prop_assert_eq!(&open(&c, &tenant, ctx.as_deref(), &env).unwrap()[..], &pt[..]);
        }

        #[test]
        fn wrong_aad_fails(tenant in "[a-z]{1,8}", other in "[a-z]{1,8}") {
            prop_assume!(tenant != other);
            let k = SecretKey::random();
            let c = k.cipher();
            let s = seal(&c, &tenant, "kid", None, b"payload");
            let env = Envelope::parse(&s).unwrap();
            prop_assert!(open(&c, &other, None, &env).is_err());
        }
    }
}
