//! The master key ring: every master key version the server knows.
//!
//! Sources (docs/SECURITY.md): the environment variable `PGSEAL_MASTER_KEY`
//! (64 hex characters, version 1), or the stdout of `pgseal.master_key_command`,
//! one `<version>:<64 hex>` line per version. Parse errors name a line number and
//! a fixed reason, never the line's content.

use std::collections::BTreeMap;

use crate::keys::SecretKey;
use crate::CoreError;

#[derive(Debug, Default)]
pub struct KeyRing {
    keys: BTreeMap<u32, SecretKey>,
}

fn parse_hex_key(s: &str) -> Option<SecretKey> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut buf = zeroize::Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(s, &mut buf[..]).ok()?;
    SecretKey::from_slice(&buf[..])
}

impl KeyRing {
    /// The ring given by `PGSEAL_MASTER_KEY`: one key, version 1.
    pub fn from_env_value(value: &str) -> Result<Self, CoreError> {
        let key = parse_hex_key(value).ok_or_else(|| {
            CoreError::BadMasterKey("PGSEAL_MASTER_KEY must be 64 hex characters".into())
        })?;
        let mut keys = BTreeMap::new();
        keys.insert(1, key);
        Ok(KeyRing { keys })
    }

    /// The ring given by a key command's stdout.
    pub fn from_command_output(out: &str) -> Result<Self, CoreError> {
        let mut keys = BTreeMap::new();
        for (i, line) in out.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (ver, hexkey) = line.split_once(':').ok_or_else(|| {
                CoreError::BadMasterKey(format!("line {n}: expected <version>:<64 hex>"))
            })?;
            let ver: u32 = ver
                .trim()
                .parse()
                .ok()
                .filter(|v| *v > 0 && *v <= i32::MAX as u32)
                .ok_or_else(|| {
                    CoreError::BadMasterKey(format!("line {n}: version must be a positive integer"))
                })?;
            let key = parse_hex_key(hexkey).ok_or_else(|| {
                CoreError::BadMasterKey(format!("line {n}: key must be 64 hex characters"))
            })?;
            if keys.insert(ver, key).is_some() {
                return Err(CoreError::BadMasterKey(format!(
                    "line {n}: version {ver} appears twice"
                )));
            }
        }
        if keys.is_empty() {
            return Err(CoreError::BadMasterKey(
                "the key command printed no key".into(),
            ));
        }
        Ok(KeyRing { keys })
    }

    pub fn get(&self, version: u32) -> Option<&SecretKey> {
        self.keys.get(&version)
    }

    /// Versions in ascending order.
    pub fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// The version that wraps new keys: `preferred` when given (and it must be
    /// loaded), else the highest.
    pub fn active(&self, preferred: Option<u32>) -> Option<(u32, &SecretKey)> {
        match preferred {
            Some(v) => self.keys.get(&v).map(|k| (v, k)),
            None => self.keys.iter().next_back().map(|(v, k)| (*v, k)),
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &SecretKey> {
        self.keys.values()
    }

    /// Drops (and so zeroizes) every key.
    pub fn clear(&mut self) {
        self.keys.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const K2: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";

    #[test]
    fn env_key_is_version_one() {
        let r = KeyRing::from_env_value(K1).unwrap();
        assert_eq!(r.versions(), vec![1]);
        assert_eq!(r.active(None).unwrap().0, 1);
    }

    #[test]
    fn command_output_with_versions() {
        let r = KeyRing::from_command_output(&format!("1:{K1}\n\n3:{K2}\n")).unwrap();
        assert_eq!(r.versions(), vec![1, 3]);
        assert_eq!(r.active(None).unwrap().0, 3);
        assert_eq!(r.active(Some(1)).unwrap().0, 1);
        assert!(r.active(Some(2)).is_none());
        assert_eq!(r.get(1).unwrap().expose()[1], 1);
    }

    #[test]
    fn errors_never_echo_key_material() {
        let cases = [
            format!("1:{}", &K1[..63]),
            format!("x:{K1}"),
            format!("0:{K1}"),
            K1.to_string(),
            format!("1:{K1}\n1:{K2}"),
            String::new(),
            format!("1:{}zz", &K1[..62]),
        ];
        for c in &cases {
            let e = KeyRing::from_command_output(c).unwrap_err().to_string();
            assert!(!e.contains(&K1[..16]) && !e.contains(&K2[..16]), "{e}");
        }
        let e = KeyRing::from_env_value("abc").unwrap_err().to_string();
        assert!(!e.contains("abc"));
    }
}
