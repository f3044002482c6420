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

/// The length of [`value_aad`]'s output.
fn value_aad_len(tenant: &str, key_id: &str, context: Option<&str>) -> usize {
    VALUE_LABEL.len()
        + 1
        + 4
        + tenant.len()
        + 4
        + key_id.len()
        + 1
        + context.map_or(0, |c| 4 + c.len())
}

/// AAD of a sealed value: label, 0x00, lp(tenant), lp(key id), then the context:
/// 0x00 when it is NULL, or 0x01 followed by lp(context).
pub fn value_aad(tenant: &str, key_id: &str, context: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(value_aad_len(tenant, key_id, context));
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

/// Calls `f` with [`value_aad`]'s bytes, built on the stack when they are short (as
/// they are for any usual tenant, key id and context), so a decrypt allocates nothing.
pub fn with_value_aad<R>(
    tenant: &str,
    key_id: &str,
    context: Option<&str>,
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    const STACK: usize = 256;
    let len = value_aad_len(tenant, key_id, context);
    if len > STACK {
        return f(&value_aad(tenant, key_id, context));
    }
    let mut buf = [0u8; STACK];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(VALUE_LABEL);
    put(&[0]);
    for field in [tenant, key_id] {
        put(&(field.len() as u32).to_be_bytes());
        put(field.as_bytes());
    }
    match context {
        None => put(&[0]),
        Some(c) => {
            put(&[1]);
            put(&(c.len() as u32).to_be_bytes());
            put(c.as_bytes());
        }
    }
    debug_assert_eq!(at, len);
    f(&buf[..len])
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
    fn the_stack_built_aad_equals_the_allocated_one() {
        let long = "t".repeat(300);
        for (t, k, c) in [
            ("acme", "AAAAAAAAAAAAAAAA", None),
            ("acme", "AAAAAAAAAAAAAAAA", Some("")),
            ("", "k", Some("integrations.token")),
            (long.as_str(), "k", None),
            ("t", "k", Some(long.as_str())),
        ] {
            let stacked = with_value_aad(t, k, c, |a| a.to_vec());
            assert_eq!(stacked, value_aad(t, k, c));
            assert_eq!(stacked.len(), value_aad_len(t, k, c));
        }
    }

    #[test]
    fn kek_version_is_bound() {
        assert_ne!(wrap_aad("dek", "t", "k", 1), wrap_aad("dek", "t", "k", 2));
    }
}
