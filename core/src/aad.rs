//! Canonical associated-data encodings (see docs/FORMAT.md, "Associated data").
//!
//! Every variable-length field is length-prefixed (u32, big endian) so that no
//! two distinct field tuples encode to the same bytes.

/// Domain label for sealed values.
pub const VALUE_LABEL: &[u8] = b"pgseal:v2:value";
/// Domain label for wrapped tenant keys.
pub const WRAP_LABEL: &[u8] = b"pgseal:v1:wrap";

fn push_lp(out: &mut Vec<u8>, field: &[u8]) {
    let len = u32::try_from(field.len()).expect("field longer than 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(field);
}

/// AAD of a sealed value: label, 0x00, lp(tenant), lp(key id), then the context:
/// 0x00 when it is NULL, or 0x01 followed by lp(context).
pub fn value_aad(tenant: &str, key_id: &str, context: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(VALUE_LABEL.len() + 14 + tenant.len() + key_id.len());
    out.extend_from_slice(VALUE_LABEL);
    out.push(0);
    push_lp(&mut out, tenant.as_bytes());
    push_lp(&mut out, key_id.as_bytes());
    match context {
        None => out.push(0),
        Some(c) => {
            out.push(1);
            push_lp(&mut out, c.as_bytes());
        }
    }
    out
}

/// AAD of a wrapped key: label, 0x00, lp(purpose), lp(tenant), lp(key id),
/// u32 big-endian master key version.
pub fn wrap_aad(purpose: &str, tenant: &str, key_id: &str, kek_version: u32) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(WRAP_LABEL.len() + 17 + purpose.len() + tenant.len() + key_id.len());
    out.extend_from_slice(WRAP_LABEL);
    out.push(0);
    push_lp(&mut out, purpose.as_bytes());
    push_lp(&mut out, tenant.as_bytes());
    push_lp(&mut out, key_id.as_bytes());
    out.extend_from_slice(&kek_version.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_and_empty_context_differ() {
        assert_ne!(value_aad("t", "k", None), value_aad("t", "k", Some("")));
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        assert_ne!(value_aad("ab", "c", None), value_aad("a", "bc", None));
        assert_ne!(wrap_aad("dek", "ab", "c", 1), wrap_aad("dek", "a", "bc", 1));
    }

    #[test]
    fn kek_version_is_bound() {
        assert_ne!(wrap_aad("dek", "t", "k", 1), wrap_aad("dek", "t", "k", 2));
    }
}
