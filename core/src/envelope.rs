//! The text envelope of a sealed value: `v2:<keyId>:<base64url(nonce ‖ ciphertext ‖ tag)>`.

use aes_gcm::aead::{Aead, AeadInPlace, Payload};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use zeroize::{Zeroize, Zeroizing};

use crate::aad::{value_aad, with_value_aad};
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
        let (key_id, b64) = split(text)?;
        let mut payload = vec![0u8; decoded_len_max(b64.len())];
        let n = decode_into(b64, &mut payload)?;
        payload.truncate(n);
        Ok(Envelope { key_id, payload })
    }

    pub fn nonce(&self) -> &[u8] {
        &self.payload[..NONCE_LEN]
    }
}

/// Splits the text form into its key id and its base64url payload, checking the
/// prefix and the key id. The payload is checked when it is decoded.
pub fn split(text: &str) -> Result<(&str, &str), CoreError> {
    let rest = text
        .strip_prefix(PREFIX)
        .ok_or(CoreError::Malformed("expected the prefix v2:"))?;
    // A byte search: ':' is ASCII, so the split point is a char boundary.
    let colon = rest
        .bytes()
        .position(|b| b == b':')
        .ok_or(CoreError::Malformed("expected v2:<keyId>:<payload>"))?;
    let (key_id, b64) = (&rest[..colon], &rest[colon + 1..]);
    if !is_valid_key_id(key_id) {
        return Err(CoreError::Malformed("invalid key id"));
    }
    Ok((key_id, b64))
}

/// The most bytes `b64_len` characters of unpadded base64url can decode to: the
/// size of the buffer [`decode_into`] needs.
pub fn decoded_len_max(b64_len: usize) -> usize {
    b64_len / 4 * 3 + (b64_len % 4) * 3 / 4
}

/// Decodes a payload (nonce ‖ ciphertext ‖ tag, nothing secret) into `out`, which
/// needs `decoded_len_max(b64.len())` bytes, and returns its length, which is at
/// least a nonce and a tag. Only canonical unpadded base64url is accepted.
pub fn decode_into(b64: &str, out: &mut [u8]) -> Result<usize, CoreError> {
    const NOT_BASE64: CoreError = CoreError::Malformed("payload is not unpadded base64url");
    // base64-simd decodes a whole payload in a few vector instructions; the `base64`
    // crate's scalar decoder was a tenth of `vault_decrypt`'s time. Its length
    // check comes first because `decode` panics on a short buffer.
    let n = base64_simd::URL_SAFE_NO_PAD
        .decoded_length(b64.as_bytes())
        .map_err(|_| NOT_BASE64)?;
    if n > out.len() {
        return Err(NOT_BASE64);
    }
    base64_simd::URL_SAFE_NO_PAD
        .decode(b64.as_bytes(), base64_simd::Out::from_slice(&mut out[..n]))
        .map_err(|_| NOT_BASE64)?;
    if n < NONCE_LEN + TAG_LEN {
        return Err(CoreError::Malformed("payload too short"));
    }
    Ok(n)
}

/// Opens a payload that [`decode_into`] wrote, in place: decrypts it, checks that
/// the plaintext is UTF-8 text and moves it to the start of `payload`. Returns the
/// plaintext's length. On any error every byte of `payload` is zero, so a caller
/// that frees the buffer leaves nothing behind.
pub fn open_text_in_place(
    cipher: &Aes256Gcm,
    tenant: &str,
    context: Option<&str>,
    key_id: &str,
    payload: &mut [u8],
) -> Result<usize, CoreError> {
    let mut open = || {
        check_payload_len(payload)?;
        let (nonce, rest) = payload.split_at_mut(NONCE_LEN);
        let (ct, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        with_value_aad(tenant, key_id, context, |aad| {
            cipher.decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                aad,
                ct,
                Tag::from_slice(tag),
            )
        })
        .map_err(|_| CoreError::AuthFailed)?;
        let len = ct.len();
        payload.copy_within(NONCE_LEN..NONCE_LEN + len, 0);
        std::str::from_utf8(&payload[..len]).map_err(|_| CoreError::NotText)?;
        Ok(len)
    };
    let r = open();
    if r.is_err() {
        payload.zeroize();
    }
    r
}

/// Refuses a payload too short to hold a nonce and a tag. `decode_into` and
/// `Envelope::parse` never return one, but `Envelope`'s fields and
/// `open_text_in_place`'s buffer can come from anywhere.
fn check_payload_len(payload: &[u8]) -> Result<(), CoreError> {
    if payload.len() < NONCE_LEN + TAG_LEN {
        return Err(CoreError::Malformed("payload too short"));
    }
    Ok(())
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

/// Seals `plaintext` with a fresh random 96-bit nonce: operating-system randomness
/// fetched `NONCES_AHEAD` nonces at a time (`NonceBuffer`), checked against the
/// process id the kernel reports (`getpid`, not a value a caller keeps), so that a
/// process forked by anything, a language handler's `fork()` included, fetches its
/// own.
pub fn seal(
    cipher: &Aes256Gcm,
    tenant: &str,
    key_id: &str,
    context: Option<&str>,
    plaintext: &[u8],
) -> String {
    thread_local! {
        static AHEAD: std::cell::RefCell<NonceBuffer> =
            const { std::cell::RefCell::new(NonceBuffer::empty()) };
    }
    let nonce = AHEAD.with(|b| b.borrow_mut().take(std::process::id()));
    seal_with_nonce(cipher, tenant, key_id, context, plaintext, &nonce)
}

/// How many nonces one `getrandom` fetches: a system call per 32 seals rather than
/// per seal (it was a tenth of a seal's time). What is fetched ahead is at most 31
/// nonces, used by this thread only.
const NONCES_AHEAD: usize = 32;

/// Nonces fetched ahead from the operating system's CSPRNG, and the process that
/// fetched them. Each is handed out once (its bytes are zeroed as it is taken). A
/// fork copies the buffer with the rest of memory: `take` in any other process
/// fetches anew first, so a parent and its child never hand out the same nonce.
#[derive(Clone)]
struct NonceBuffer {
    pid: u32,
    bytes: [u8; NONCE_LEN * NONCES_AHEAD],
    next: usize,
}

impl NonceBuffer {
    const fn empty() -> Self {
        NonceBuffer {
            pid: 0,
            bytes: [0; NONCE_LEN * NONCES_AHEAD],
            next: NONCES_AHEAD,
        }
    }

    fn take(&mut self, pid: u32) -> [u8; NONCE_LEN] {
        if self.pid != pid || self.next == NONCES_AHEAD {
            random_bytes(&mut self.bytes);
            self.pid = pid;
            self.next = 0;
        }
        let slot = &mut self.bytes[self.next * NONCE_LEN..(self.next + 1) * NONCE_LEN];
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(slot);
        slot.fill(0);
        self.next += 1;
        nonce
    }
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
    check_payload_len(&env.payload)?;
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

/// Opens a parsed envelope, decrypting in place in its own payload buffer (no second
/// allocation), and checks that the plaintext is UTF-8 text.
pub fn open_text(
    cipher: &Aes256Gcm,
    tenant: &str,
    context: Option<&str>,
    env: Envelope<'_>,
) -> Result<Zeroizing<String>, CoreError> {
    let mut buf = Zeroizing::new(env.payload);
    let len = open_text_in_place(cipher, tenant, context, env.key_id, &mut buf)?;
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

    /// Every nonce is new: across refills, and in a process forked with a copy of
    /// the buffer (another process id), which must not hand out the parent's next.
    #[test]
    fn nonces_fetched_ahead_are_handed_out_once_and_not_in_a_forked_copy() {
        let mut seen = std::collections::HashSet::new();
        let mut parent = NonceBuffer::empty();
        for _ in 0..3 * NONCES_AHEAD + 5 {
            assert!(
                seen.insert(parent.take(100)),
                "a nonce was handed out twice"
            );
        }
        let mut child = parent.clone();
        let (from_parent, from_child) = (parent.take(100), child.take(101));
        assert_ne!(from_parent, from_child);
        assert!(seen.insert(from_parent) && seen.insert(from_child));
        // A copy that stays in the process hands out the same bytes: the process id
        // is what tells a fork apart.
        let mut copy = parent.clone();
        assert_eq!(parent.take(100), copy.take(100));
        assert_ne!(parent.take(100), [0u8; NONCE_LEN]);
    }
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

    #[test]
    fn only_canonical_base64url_decodes() {
        let (_, s) = sealed("x", None);
        let (key_id, b64) = split(&s).unwrap();
        let mut out = vec![0u8; 64];
        assert_eq!(decode_into(b64, &mut out).unwrap(), 29);
        // 39 characters: the last one carries 6 bits of which only 2 are data. Every
        // other character with the same 2 data bits is the same bytes spelled
        // differently, and is refused, as are padding, the standard alphabet and
        // a length no byte count encodes to.
        let last = b64.as_bytes()[38];
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let pos = alphabet.iter().position(|&c| c == last).unwrap();
        let twin = alphabet[pos ^ 1] as char;
        let spelled = format!("{}{}", &b64[..38], twin);
        assert!(decode_into(&spelled, &mut out).is_err());
        for bad in [
            format!("{b64}="),
            b64.replace(['-', '_'], "+"),
            format!("{b64}AA"),
        ] {
            if bad != b64 {
                assert!(decode_into(&bad, &mut out).is_err(), "{bad}");
            }
        }
        assert!(Envelope::parse(&format!("v2:{key_id}:{spelled}")).is_err());
    }

    #[test]
    fn payloads_shorter_than_a_nonce_and_a_tag_are_refused() {
        let c = SecretKey::random().cipher();
        for n in [0, 1, NONCE_LEN - 1, NONCE_LEN, NONCE_LEN + TAG_LEN - 1] {
            let env = Envelope {
                key_id: "kid",
                payload: vec![0u8; n],
            };
            assert!(
                matches!(open(&c, "t", None, &env), Err(CoreError::Malformed(_))),
                "{n}"
            );
            let mut buf = vec![0xAAu8; n];
            let r = open_text_in_place(&c, "t", None, "kid", &mut buf);
            assert!(matches!(r, Err(CoreError::Malformed(_))), "{n}");
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn decoded_len_max_is_the_exact_length_of_every_payload_size() {
        for n in 0..100 {
            let text = URL_SAFE_NO_PAD.encode(vec![7u8; n]);
            assert_eq!(decoded_len_max(text.len()), n, "{n} bytes");
        }
    }

    /// Decodes and opens in one buffer, as `vault_decrypt` does.
    fn open_text_into(
        c: &Aes256Gcm,
        tenant: &str,
        ctx: Option<&str>,
        key_id: &str,
        b64: &str,
        out: &mut [u8],
    ) -> Result<usize, CoreError> {
        let n = decode_into(b64, out)?;
        open_text_in_place(c, tenant, ctx, key_id, &mut out[..n])
    }

    #[test]
    fn open_text_into_agrees_with_open_text_and_leaves_only_the_plaintext() {
        let (k, s) = sealed("sk-live-0123456789", Some("ctx"));
        let (key_id, b64) = split(&s).unwrap();
        let mut out = vec![0xAAu8; decoded_len_max(b64.len())];
        let n =
            open_text_into(&k.cipher(), "tenant-a", Some("ctx"), key_id, b64, &mut out).unwrap();
        let via_parse = open_text(
            &k.cipher(),
            "tenant-a",
            Some("ctx"),
            Envelope::parse(&s).unwrap(),
        );
        assert_eq!(&out[..n], via_parse.unwrap().as_bytes());
        assert_eq!(&out[..n], b"sk-live-0123456789");
    }

    #[test]
    fn a_failed_open_leaves_only_zeros() {
        let (k, s) = sealed("sk-live-0123456789", None);
        let (key_id, b64) = split(&s).unwrap();
        // Wrong tenant: authentication fails after the payload was decoded into `out`.
        let mut out = vec![0xAAu8; decoded_len_max(b64.len())];
        let e = open_text_into(&k.cipher(), "tenant-b", None, key_id, b64, &mut out).unwrap_err();
        assert_eq!(e, CoreError::AuthFailed);
        assert!(out.iter().all(|&b| b == 0));
        // Not text: a value sealed from bytes that are not UTF-8.
        let c = k.cipher();
        let bin = seal(&c, "t", "kid", None, &[0xff, 0xfe, 0x41]);
        let (key_id, b64) = split(&bin).unwrap();
        let mut out = vec![0xAAu8; decoded_len_max(b64.len())];
        assert_eq!(
            open_text_into(&c, "t", None, key_id, b64, &mut out).unwrap_err(),
            CoreError::NotText
        );
        assert!(out.iter().all(|&b| b == 0));
        // A buffer too small for the payload is refused before anything is written.
        let mut small = vec![0xAAu8; 4];
        assert!(matches!(
            open_text_into(&c, "t", None, key_id, b64, &mut small).unwrap_err(),
            CoreError::Malformed(_)
        ));
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
            let tampered = format(env.key_id, &env.payload);
            let (key_id, b64) = split(&tampered).unwrap();
            let mut out = vec![0u8; decoded_len_max(b64.len())];
            prop_assert!(open_text_into(&c, "t", Some("ctx"), key_id, b64, &mut out).is_err());
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
