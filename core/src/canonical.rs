//! RFC 8785 (JCS) canonical JSON for ledger payloads.
//!
//! JCS writes every number as the shortest text of an IEEE-754 double. A payload
//! number that a double cannot hold exactly (`12345678901234567891`, or
//! `0.10000000000000000001`) would then hash like a different number, so a
//! rewrite could hide behind the rounding. pgseal therefore accepts only numbers
//! whose decimal value equals their canonical text: anything else must be stored
//! as a JSON string. `lossless_numbers` does that conversion for row images.

use crate::CoreError;

/// The canonical (RFC 8785) text of `json`. Fails when `json` is not JSON, or
/// holds a number that JCS would round.
pub fn canonical_payload(json: &str) -> Result<String, CoreError> {
    for token in number_tokens(json) {
        if !number_is_exact(token) {
            return Err(CoreError::InexactNumber);
        }
    }
    crate::jcs::canonicalize(json).map_err(|_| CoreError::NotJson)
}

/// `json` with every number that JCS would round replaced by a JSON string of
/// its original text; other numbers are kept. Used for audit row images, where a
/// bigint or numeric column must not make the audited write fail.
pub fn lossless_numbers(json: &str) -> String {
    let mut out = String::with_capacity(json.len() + 8);
    let mut last = 0;
    for token in number_tokens(json) {
        if number_is_exact(token) {
            continue;
        }
        // `token` is a sub-slice of `json`; find its offset.
        let start = token.as_ptr() as usize - json.as_ptr() as usize;
        out.push_str(&json[last..start]);
        out.push('"');
        out.push_str(token);
        out.push('"');
        last = start + token.len();
    }
    out.push_str(&json[last..]);
    out
}

/// The number tokens of a JSON text, in order, skipping string contents.
fn number_tokens(json: &str) -> Vec<&str> {
    let b = json.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                tokens.push(&json[start..i]);
            }
            _ => i += 1,
        }
    }
    tokens
}

/// Whether the decimal value of `token` equals that of the shortest double text
/// for it, i.e. JCS would not change the number.
pub(crate) fn number_is_exact(token: &str) -> bool {
    // Fast path: an integer of at most 15 digits is a double exactly.
    let digits = token.strip_prefix('-').unwrap_or(token);
    if !digits.is_empty() && digits.len() <= 15 && digits.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    let Ok(d) = token.parse::<f64>() else {
        return false;
    };
    if !d.is_finite() {
        return false;
    }
    normalize(token) == normalize(&format!("{d:e}"))
}

/// (negative, significant digits without leading/trailing zeros, exponent of the
/// first digit): equal for two decimal texts exactly when their values are equal.
fn normalize(text: &str) -> (bool, String, i64) {
    let (neg, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(p) => (&rest[..p], rest[p + 1..].parse::<i64>().unwrap_or(0)),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: String = int.chars().chain(frac.chars()).collect();
    let lead = digits.len() - digits.trim_start_matches('0').len();
    let sig = digits.trim_matches('0').to_owned();
    if sig.is_empty() {
        return (false, String::new(), 0);
    }
    let point = int.len() as i64 - lead as i64 + exp;
    (neg, sig, point)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_keys_and_formats_numbers_per_jcs() {
        let c =
            canonical_payload(r#"{"b": 1.50, "a": [true, null, "x\u00e9"], "c": 1e2}"#).unwrap();
        assert_eq!(c, r#"{"a":[true,null,"xé"],"b":1.5,"c":100}"#);
    }

    #[test]
    fn rejects_numbers_a_double_cannot_hold() {
        assert_eq!(
            canonical_payload("12345678901234567891"),
            Err(CoreError::InexactNumber)
        );
        assert_eq!(
            canonical_payload(r#"{"a":0.10000000000000000001}"#),
            Err(CoreError::InexactNumber)
        );
        assert!(canonical_payload("9007199254740992").is_ok());
        assert!(canonical_payload("0.1").is_ok());
        assert!(canonical_payload("-0.0").is_ok());
    }

    #[test]
    fn numbers_inside_strings_are_not_numbers() {
        assert!(canonical_payload(r#"{"k":"12345678901234567891 \" 1"}"#).is_ok());
    }

    #[test]
    fn rejects_invalid_json() {
        assert!(matches!(canonical_payload("{"), Err(CoreError::NotJson)));
    }

    #[test]
    fn lossless_quotes_only_inexact_numbers() {
        let s = lossless_numbers(r#"{"id": 12345678901234567891, "n": 2.5, "s": "9"}"#);
        assert_eq!(s, r#"{"id": "12345678901234567891", "n": 2.5, "s": "9"}"#);
        assert!(canonical_payload(&s).is_ok());
    }

    #[test]
    fn normalize_compares_values() {
        assert_eq!(normalize("1.50"), normalize("15e-1"));
        assert_eq!(normalize("100"), normalize("1e2"));
        assert_ne!(normalize("100"), normalize("10"));
        assert_eq!(normalize("0.000"), normalize("0"));
    }
}
