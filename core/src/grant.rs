//! Offboarding grants: what lets the nodes of a Citus cluster show an offboarding's
//! statements all of a tenant's rows in a table `org_protect` protects.
//!
//! On one node the condition of `org_protect`'s offboarding policies is a flag of the
//! backend that runs the offboarding. A Citus worker runs those statements in a
//! backend of its own, which has no such flag; the coordinator sends it a grant
//! instead, as a setting (`pgseal.offboard_grant`). Any role can set a setting, so a
//! grant is a MAC that only a node holding the master key can make: HMAC-SHA256, under
//! a key derived from one master key version, over what it grants (the database, the
//! table's qualified name, the role the statements run as, the tenant) and when it
//! expires. A node checks it against its own database, the table the policy names, its
//! current role and tenant, and its clock.
//!
//! A grant also carries its key's check value (an HMAC of a fixed label under the
//! grant key, 8 bytes): a node whose master key of that version differs from the
//! coordinator's can tell it apart from a grant for another scope, and fail rather
//! than show nothing.
//!
//! Text form: `v1.<master key version>.<expiry, Unix seconds>.<16 hex digits of the
//! key check>.<64 hex digits of MAC>`.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::keys::SecretKey;

/// HKDF info of the grant key: no other pgseal key is derived with it.
const KEY_INFO: &[u8] = b"pgseal offboard grant v1";
/// The MAC's domain label, first in what it covers.
const LABEL: &[u8] = b"pgseal.offboard_grant.v1";
/// What the key check value is the MAC of.
const CHECK_LABEL: &[u8] = b"pgseal.offboard_grant.v1.key_check";

/// What a grant lets see: one table's rows of one tenant, to one role, in one
/// database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope<'a> {
    pub database: &'a str,
    /// The table's schema-qualified name, as `format('%I.%I')` writes it.
    pub table: &'a str,
    pub role: &'a str,
    pub tenant: &'a str,
}

/// A grant as parsed from its text (`Grant::parse`), not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The master key version its key is derived from.
    pub version: u32,
    /// When it stops counting, in Unix seconds.
    pub expires: i64,
    check: [u8; 8],
    mac: [u8; 32],
}

/// An HMAC under the grant key derived from `master`.
fn keyed(master: &SecretKey) -> Hmac<Sha256> {
    let mut key = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, master.expose())
        .expand(KEY_INFO, &mut key[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    Hmac::<Sha256>::new_from_slice(&key[..]).expect("HMAC takes any key length")
}

/// The grant key's check value.
fn key_check(master: &SecretKey) -> [u8; 8] {
    let mut mac = keyed(master);
    mac.update(CHECK_LABEL);
    let full = mac.finalize().into_bytes();
    let mut check = [0u8; 8];
    check.copy_from_slice(&full[..8]);
    check
}

fn grant_mac(master: &SecretKey, version: u32, expires: i64, scope: &Scope<'_>) -> Hmac<Sha256> {
    let mut mac = keyed(master);
    // Each field length-prefixed, so that no two scopes cover the same bytes.
    for field in [
        LABEL,
        &version.to_be_bytes(),
        &expires.to_be_bytes(),
        scope.database.as_bytes(),
        scope.table.as_bytes(),
        scope.role.as_bytes(),
        scope.tenant.as_bytes(),
    ] {
        mac.update(&(field.len() as u64).to_be_bytes());
        mac.update(field);
    }
    mac
}

impl Grant {
    /// A grant of `scope` until `expires`, under master key `version`.
    pub fn sign(master: &SecretKey, version: u32, expires: i64, scope: &Scope<'_>) -> Grant {
        let mac = grant_mac(master, version, expires, scope)
            .finalize()
            .into_bytes()
            .into();
        Grant {
            version,
            expires,
            check: key_check(master),
            mac,
        }
    }

    /// Parses a grant's text; None for anything else, a spelling of the same values
    /// other than the one `Display` writes included (leading zeros or `+`, uppercase
    /// hex): one grant has one text.
    pub fn parse(text: &str) -> Option<Grant> {
        let grant = Self::parse_fields(text)?;
        (grant.to_string() == text).then_some(grant)
    }

    fn parse_fields(text: &str) -> Option<Grant> {
        let mut parts = text.split('.');
        if parts.next()? != "v1" {
            return None;
        }
        let version = parts.next()?.parse::<u32>().ok()?;
        let expires = parts.next()?.parse::<i64>().ok()?;
        let check_hex = parts.next()?;
        let mac_hex = parts.next()?;
        if parts.next().is_some() || check_hex.len() != 16 || mac_hex.len() != 64 {
            return None;
        }
        let mut check = [0u8; 8];
        hex::decode_to_slice(check_hex, &mut check).ok()?;
        let mut mac = [0u8; 32];
        hex::decode_to_slice(mac_hex, &mut mac).ok()?;
        Some(Grant {
            version,
            expires,
            check,
            mac,
        })
    }

    /// Whether a node holding `master` made this grant for `scope` (its MAC, in
    /// constant time), expired or not.
    pub fn names(&self, master: &SecretKey, scope: &Scope<'_>) -> bool {
        grant_mac(master, self.version, self.expires, scope)
            .verify_slice(&self.mac)
            .is_ok()
    }

    /// Whether it was made under `master`'s grant key, by its check value (not a
    /// proof: anyone can copy a grant's check value; `names` is).
    pub fn made_under(&self, master: &SecretKey) -> bool {
        self.check == key_check(master)
    }

    /// Whether it no longer counts at `now` (Unix seconds).
    pub fn expired(&self, now: i64) -> bool {
        expired_at(self.expires, now)
    }
}

/// Whether a grant that expires at `expires` no longer counts at `now` (Unix
/// seconds): from its expiry second on, by the checking node's clock.
pub fn expired_at(expires: i64, now: i64) -> bool {
    now >= expires
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "v1.{}.{}.{}.{}",
            self.version,
            self.expires,
            hex::encode(self.check),
            hex::encode(self.mac)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Grant {
        /// Whether this grant, made under `master`, grants `scope` at `now`.
        fn grants(&self, master: &SecretKey, scope: &Scope<'_>, now: i64) -> bool {
            !self.expired(now) && self.names(master, scope)
        }
    }

    const SCOPE: Scope<'static> = Scope {
        database: "app",
        table: "public.docs",
        role: "docs_owner",
        tenant: "acme",
    };

    #[test]
    fn a_grant_grants_its_scope_until_it_expires() {
        let k = SecretKey::random();
        let g = Grant::sign(&k, 3, 1_000, &SCOPE);
        let back = Grant::parse(&g.to_string()).unwrap();
        assert_eq!(back, g);
        assert!(back.grants(&k, &SCOPE, 999));
        assert!(!back.grants(&k, &SCOPE, 1_000));
        assert!(!back.grants(&k, &SCOPE, 5_000));
    }

    #[test]
    fn a_grant_grants_nothing_else() {
        let k = SecretKey::random();
        let g = Grant::sign(&k, 1, 1_000, &SCOPE);
        for other in [
            Scope {
                database: "app2",
                ..SCOPE
            },
            Scope {
                table: "public.docs2",
                ..SCOPE
            },
            Scope {
                table: "public.doc",
                ..SCOPE
            },
            Scope {
                role: "app",
                ..SCOPE
            },
            Scope {
                tenant: "globex",
                ..SCOPE
            },
            Scope {
                tenant: "",
                ..SCOPE
            },
            // A field's bytes moved into its neighbour.
            Scope {
                table: "public.docsdocs_owner",
                role: "",
                ..SCOPE
            },
        ] {
            assert!(!g.grants(&k, &other, 0), "{other:?}");
        }
        // Another master key, or another version or expiry than it was signed with.
        let other = SecretKey::random();
        assert!(!g.grants(&other, &SCOPE, 0));
        assert!(g.made_under(&k));
        assert!(!g.made_under(&other));
        let mut moved = g.clone();
        moved.expires = 2_000;
        assert!(!moved.grants(&k, &SCOPE, 0));
        let mut moved = g.clone();
        moved.version = 2;
        assert!(!moved.grants(&k, &SCOPE, 0));
    }

    #[test]
    fn only_a_grants_exact_text_parses() {
        let k = SecretKey::random();
        let text = Grant::sign(&k, 1, 1_000, &SCOPE).to_string();
        assert!(text.starts_with("v1.1.1000."), "{text}");
        assert_eq!(text.len(), "v1.1.1000.".len() + 16 + 1 + 64);
        for bad in [
            String::new(),
            "v1".to_owned(),
            text.replacen("v1.", "v2.", 1),
            format!("{text}.0"),
            text[..text.len() - 2].to_owned(),
            format!("{}zz", &text[..text.len() - 2]),
            text.replacen(".1000.", ".-x.", 1),
            // The same values spelled otherwise than pgseal writes them.
            text.replacen("v1.1.", "v1.01.", 1),
            text.replacen("v1.1.", "v1.+1.", 1),
            text.replacen(".1000.", ".01000.", 1),
            text.replacen(".1000.", ".+1000.", 1),
            format!(
                "{}{}",
                &text[..text.len() - 64],
                text[text.len() - 64..].to_uppercase()
            ),
            text.replacen(".1000.", ".1000..", 1),
            format!(" {text}"),
        ] {
            assert!(Grant::parse(&bad).is_none(), "{bad}");
        }
        // A flipped bit of the MAC parses, and grants nothing.
        let mut flipped = text.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let g = Grant::parse(std::str::from_utf8(&flipped).unwrap()).unwrap();
        assert!(!g.grants(&k, &SCOPE, 0));
    }
}
