//! Data keys, master keys and key identifiers.

use aes_gcm::{Aes256Gcm, KeyInit};
use rand_core::{OsRng, RngCore};

// Key memory is a crate of its own so that this one has no unsafe code (lib.rs);
// re-exported here, the path extension/ and daemon/ import it by.
pub use pgseal_keymem::{protect_process, Locked};

/// Length in bytes of every symmetric key pgseal uses (AES-256).
pub const KEY_LEN: usize = 32;
/// Random bytes behind a key id (encoded as 16 base64url characters).
pub const KEY_ID_BYTES: usize = 12;

/// 32 secret bytes in locked, dump-excluded memory, wiped when dropped. Used for
/// tenant data keys, tenant ledger keys and master key versions alike.
#[derive(Clone)]
pub struct SecretKey(Locked<[u8; KEY_LEN]>);

impl SecretKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn random() -> Self {
        let mut k = Self::zero();
        OsRng.fill_bytes(&mut k.0[..]);
        k
    }

    fn zero() -> Self {
        SecretKey(Locked::new_with(|| [0u8; KEY_LEN]))
    }

    /// Builds a key from exactly 32 bytes; `None` for any other length.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != KEY_LEN {
            return None;
        }
        let mut k = Self::zero();
        k.0.copy_from_slice(bytes);
        Some(k)
    }

    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Address of the locked cell that holds the bytes.
    pub fn region(&self) -> (*const u8, usize) {
        (self.0.as_ptr(), KEY_LEN)
    }

    /// An AES-256-GCM instance with the expanded key schedule, for one use: its
    /// round keys are wiped when it is dropped.
    pub fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(&self.0[..]).expect("32-byte key")
    }

    /// As [`cipher`](Self::cipher), kept in locked, dump-excluded memory: for a
    /// cipher held for repeated use.
    pub fn locked_cipher(&self) -> Locked<Aes256Gcm> {
        Locked::new_with(|| self.cipher())
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A new random key id: 12 random bytes as 16 base64url characters.
pub fn new_key_id() -> String {
    use base64::Engine;
    let mut raw = [0u8; KEY_ID_BYTES];
    OsRng.fill_bytes(&mut raw);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

/// Whether `s` is a syntactically valid key id: 1 to 64 characters of
/// `[A-Za-z0-9_-]`.
pub fn is_valid_key_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) {
    OsRng.fill_bytes(buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_are_short_url_safe_and_distinct() {
        let a = new_key_id();
        let b = new_key_id();
        assert_eq!(a.len(), 16);
        assert!(is_valid_key_id(&a));
        assert_ne!(a, b);
    }

    #[test]
    fn key_id_syntax() {
        assert!(!is_valid_key_id(""));
        assert!(!is_valid_key_id("a:b"));
        assert!(!is_valid_key_id("a+b"));
        assert!(!is_valid_key_id(&"a".repeat(65)));
        assert!(is_valid_key_id("AZaz09_-"));
    }

    #[test]
    fn debug_never_shows_bytes() {
        let k = SecretKey::from_slice(&[0xAB; 32]).unwrap();
        let s = format!("{k:?}");
        assert!(!s.to_lowercase().contains("ab"), "{s}");
    }

    #[test]
    fn random_keys_differ() {
        assert_ne!(SecretKey::random().expose(), SecretKey::random().expose());
    }
}
