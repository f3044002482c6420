//! Display values for sealed secrets.

/// The ellipsis appended to every redacted value.
pub const ELLIPSIS: char = '…';

/// Shows at most `visible` leading characters followed by `…`.
///
/// It never shows more than a quarter of the secret's characters (rounded down),
/// so that a short secret (a PIN, a short password) is not all but revealed by a
/// display value. A secret of fewer than four characters shows only `…`.
pub fn redact(plaintext: &str, visible: usize) -> String {
    let total = plaintext.chars().count();
    let shown = visible.min(total / 4);
    let mut out: String = plaintext.chars().take(shown).collect();
    out.push(ELLIPSIS);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_prefix_of_long_tokens() {
        assert_eq!(redact("sk-live-0123456789abcdef", 4), "sk-l…");
        assert_eq!(redact("sk-live-0123456789abcdef", 0), "…");
    }

    #[test]
    fn never_more_than_a_quarter() {
        assert_eq!(redact("123456", 4), "1…");
        assert_eq!(redact("abc", 4), "…");
        assert_eq!(redact("", 4), "…");
    }

    #[test]
    fn counts_characters_not_bytes() {
        assert_eq!(redact("äöüßäöüß", 2), "äö…");
    }
}
