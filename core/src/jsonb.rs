//! RFC 8785 (JCS) text straight from PostgreSQL's `jsonb` binary form.
//!
//! The ledger hashes the canonical text of every payload. Reading it from the
//! stored binary form skips `jsonb_out`'s text and a parse of that text: the
//! verifier and `ledger_append` call [`canonical_from_jsonb`] on the value's bytes.
//! Its output equals [`crate::canonical::canonical_payload`] of `jsonb_out`'s text
//! for every value, including the refusal of numbers RFC 8785 would round; the
//! extension's tests check that against PostgreSQL over generated values.
//!
//! The layout (PostgreSQL's `src/include/utils/jsonb.h`, unchanged since 9.4):
//! a *container* is a `u32` header (child count in the low 28 bits; flags for
//! scalar, object, array), one `u32` *JEntry* per child (an object's keys first,
//! then its values, each in the same order), then the children's data. A JEntry
//! holds the child's type in bits 28–30 and either its length or, when bit 31 is
//! set (every 32nd child), the end offset of its data. Strings are raw UTF-8;
//! `numeric`s and nested containers start at the next 4-byte boundary, the
//! padding counted in their length. A top-level scalar is a one-element array
//! flagged scalar. Words are in the machine's byte order, and the varlena headers
//! of numbers are read in the little-endian layout: on a big-endian machine this
//! returns `Unsupported` and the caller reads the text form instead.

use crate::canonical::number_is_exact;
use crate::jcs::{write_number, write_string, Writer};
use crate::CoreError;

const JB_CMASK: u32 = 0x0FFF_FFFF;
const JB_FSCALAR: u32 = 0x1000_0000;
const JB_FOBJECT: u32 = 0x2000_0000;
const JB_FARRAY: u32 = 0x4000_0000;

const JENTRY_OFFLENMASK: u32 = 0x0FFF_FFFF;
const JENTRY_TYPEMASK: u32 = 0x7000_0000;
const JENTRY_HAS_OFF: u32 = 0x8000_0000;
const JENTRY_ISSTRING: u32 = 0x0000_0000;
const JENTRY_ISNUMERIC: u32 = 0x1000_0000;
const JENTRY_ISBOOL_FALSE: u32 = 0x2000_0000;
const JENTRY_ISBOOL_TRUE: u32 = 0x3000_0000;
const JENTRY_ISNULL: u32 = 0x4000_0000;
const JENTRY_ISCONTAINER: u32 = 0x5000_0000;

/// numeric.c's header bits.
const NUMERIC_SIGN_MASK: u16 = 0xC000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_SHORT: u16 = 0x8000;
const NUMERIC_SPECIAL: u16 = 0xC000;
const NUMERIC_SHORT_SIGN_MASK: u16 = 0x2000;
const NUMERIC_SHORT_DSCALE_MASK: u16 = 0x1F80;
const NUMERIC_SHORT_DSCALE_SHIFT: u16 = 7;
const NUMERIC_DSCALE_MASK: u16 = 0x3FFF;

/// PostgreSQL's MaxAllocSize: no text longer than this can be made, so a value
/// whose text might be (the bound `canonical_from_jsonb` keeps) is left to the
/// text path, which fails as it always did.
const MAX_TEXT: u64 = 0x3FFF_FFFF;
const NUMERIC_SHORT_WEIGHT_SIGN_MASK: u16 = 0x0040;
const NUMERIC_SHORT_WEIGHT_MASK: u16 = 0x003F;

/// Why the bytes could not be read; the caller falls back to the text form on
/// `Unsupported` and `Malformed`. Fixed phrases: never any input.
///
/// `Malformed` covers every layout PostgreSQL does not write, so that the reader
/// never sees a value differently from `jsonb_out`: object keys not strictly in
/// jsonb's order (by length, then bytes; so no duplicates), a NUL in a string,
/// and a `numeric` that is not in `make_result`'s normal form (a zero first or
/// last digit group, or stored digits beyond its display scale, which
/// `numeric_out` would not print).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonbError {
    /// Not PostgreSQL's jsonb layout as this module knows it.
    Malformed(&'static str),
    /// A big-endian machine (see the module comment).
    Unsupported,
    /// A number RFC 8785 would round (as `CoreError::InexactNumber`).
    InexactNumber,
}

impl From<JsonbError> for CoreError {
    fn from(e: JsonbError) -> Self {
        match e {
            JsonbError::InexactNumber => CoreError::InexactNumber,
            JsonbError::Malformed(_) | JsonbError::Unsupported => CoreError::NotJson,
        }
    }
}

fn bad(why: &'static str) -> JsonbError {
    JsonbError::Malformed(why)
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, JsonbError> {
    let w = b.get(at..at + 4).ok_or(bad("truncated"))?;
    Ok(u32::from_ne_bytes(w.try_into().expect("4 bytes")))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, JsonbError> {
    let w = b.get(at..at + 2).ok_or(bad("truncated"))?;
    Ok(u16::from_ne_bytes(w.try_into().expect("2 bytes")))
}

fn int_align(n: usize) -> usize {
    (n + 3) & !3
}

/// One child of a container: its JEntry type and its data (padding removed for
/// numbers and containers).
#[derive(Clone, Copy)]
struct Child<'a> {
    kind: u32,
    data: &'a [u8],
}

/// The children of the container at the start of `c`, and its header.
fn children(c: &[u8]) -> Result<(u32, Vec<Child<'_>>), JsonbError> {
    let header = u32_at(c, 0)?;
    let count = (header & JB_CMASK) as usize;
    let n = if header & JB_FOBJECT != 0 {
        count.checked_mul(2).ok_or(bad("count"))?
    } else {
        count
    };
    let entries_end = n
        .checked_mul(4)
        .and_then(|x| x.checked_add(4))
        .ok_or(bad("count"))?;
    let data = c.get(entries_end..).ok_or(bad("truncated"))?;
    let mut out = Vec::with_capacity(n);
    let mut start = 0usize;
    for i in 0..n {
        let e = u32_at(c, 4 + 4 * i)?;
        let offlen = (e & JENTRY_OFFLENMASK) as usize;
        let end = if e & JENTRY_HAS_OFF != 0 {
            offlen
        } else {
            start.checked_add(offlen).ok_or(bad("length"))?
        };
        if end < start || end > data.len() {
            return Err(bad("child out of bounds"));
        }
        let kind = e & JENTRY_TYPEMASK;
        let from = match kind {
            JENTRY_ISNUMERIC | JENTRY_ISCONTAINER => int_align(start).min(end),
            _ => start,
        };
        out.push(Child {
            kind,
            data: &data[from..end],
        });
        start = end;
    }
    Ok((header, out))
}

/// A stored `numeric` (with its varlena header): its decimal text, as `digits`
/// and an exponent (`"-1234e-2"`; `"0"` for zero), and an upper bound of the
/// length of `numeric_out`'s text of it.
fn numeric_text(v: &[u8]) -> Result<(String, u64), JsonbError> {
    let first = *v.first().ok_or(bad("empty number"))?;
    let (hdr, len) = if first & 1 == 1 {
        // 1-byte varlena header; 0x01 alone would be a TOAST pointer.
        if first == 1 {
            return Err(bad("external number"));
        }
        (1, (first >> 1) as usize)
    } else {
        let w = u32_at(v, 0)?;
        if w & 3 != 0 {
            return Err(bad("compressed number"));
        }
        (4, (w >> 2) as usize)
    };
    let body = v.get(hdr..len).ok_or(bad("number length"))?;
    let h = u16_at(body, 0)?;
    let (neg, weight, dscale, digits_at) = match h & NUMERIC_SIGN_MASK {
        NUMERIC_SPECIAL => return Err(bad("NaN or infinity")),
        NUMERIC_SHORT => {
            let w = (h & NUMERIC_SHORT_WEIGHT_MASK) as i32;
            let w = if h & NUMERIC_SHORT_WEIGHT_SIGN_MASK != 0 {
                w | !(NUMERIC_SHORT_WEIGHT_MASK as i32)
            } else {
                w
            };
            let dscale = (h & NUMERIC_SHORT_DSCALE_MASK) >> NUMERIC_SHORT_DSCALE_SHIFT;
            (h & NUMERIC_SHORT_SIGN_MASK != 0, w, dscale, 2)
        }
        sign => (
            sign == NUMERIC_NEG,
            u16_at(body, 2)? as i16 as i32,
            h & NUMERIC_DSCALE_MASK,
            4,
        ),
    };
    let digits = body.get(digits_at..).ok_or(bad("number length"))?;
    if digits.len() % 2 != 0 {
        return Err(bad("number digits"));
    }
    let n = digits.len() / 2;
    // numeric_out's text: sign, integer digits (at least one), point, dscale digits.
    let bound = 3 + 4 * (weight.max(0) as u64 + 1) + u64::from(dscale);
    if n == 0 {
        return Ok(("0".to_owned(), bound));
    }
    let last = u16_at(digits, 2 * (n - 1))?;
    if u16_at(digits, 0)? == 0 || last == 0 {
        return Err(bad("number not normalised"));
    }
    // Decimal places the stored digits need; numeric_out prints only dscale.
    let places = 4 * (n as i64 - 1 - i64::from(weight));
    let trailing = (1..=4u32).take_while(|k| last % 10u16.pow(*k) == 0).count() as i64;
    if places - trailing > i64::from(dscale) {
        return Err(bad("digits beyond the display scale"));
    }
    let mut s = String::with_capacity(4 * n + 8);
    if neg {
        s.push('-');
    }
    for k in 0..n {
        let d = u16_at(digits, 2 * k)?;
        if d > 9999 {
            return Err(bad("number digit"));
        }
        let mut buf = [b'0'; 4];
        let mut x = d;
        for slot in buf.iter_mut().rev() {
            *slot = b'0' + (x % 10) as u8;
            x /= 10;
        }
        s.push_str(std::str::from_utf8(&buf).expect("ASCII digits"));
    }
    let exp = 4 * (i64::from(weight) - n as i64 + 1);
    if exp != 0 {
        s.push('e');
        s.push_str(&exp.to_string());
    }
    Ok((s, bound))
}

/// Writes a decimal of at most 15 significant digits (DBL_DIG) whose magnitude
/// is in the normal range of a double straight in RFC 8785's form (ECMAScript's
/// Number::toString), and returns true; returns false, writing nothing, for any
/// other. Such a decimal is a double exactly in the sense of
/// `canonical::number_is_exact`: it converts to a double whose shortest text is
/// that decimal, so the double's text is the decimal's digits laid out by
/// ECMAScript's rules (a test compares it with `ryu-js` over generated decimals).
fn write_short_decimal(out: &mut String, text: &str) -> bool {
    let (mantissa, exp) = match text.split_once('e') {
        Some((m, e)) => match e.parse::<i64>() {
            Ok(e) => (m, e),
            Err(_) => return false,
        },
        None => (text, 0),
    };
    let (neg, digits) = match mantissa.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, mantissa),
    };
    let digits = digits.trim_start_matches('0');
    let sig = digits.trim_end_matches('0');
    if sig.is_empty() {
        out.push('0');
        return true;
    }
    let k = sig.len() as i64;
    // value = sig × 10^(n − k): n is the position of the decimal point after
    // the first significant digit.
    let n = exp + digits.len() as i64;
    if k > 15 || !(-290..=290).contains(&n) {
        return false;
    }
    if neg {
        out.push('-');
    }
    let zeros = |out: &mut String, count: i64| (0..count).for_each(|_| out.push('0'));
    if k <= n && n <= 21 {
        out.push_str(sig);
        zeros(out, n - k);
    } else if 0 < n && n <= 21 {
        out.push_str(&sig[..n as usize]);
        out.push('.');
        out.push_str(&sig[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        zeros(out, -n);
        out.push_str(sig);
    } else {
        out.push_str(&sig[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&sig[1..]);
        }
        out.push('e');
        out.push(if n > 0 { '+' } else { '-' });
        out.push_str(&(n - 1).abs().to_string());
    }
    true
}

/// Writes the JCS form of a stored `numeric`; returns `numeric_text`'s bound.
fn write_numeric(out: &mut String, v: &[u8]) -> Result<u64, JsonbError> {
    let (text, bound) = numeric_text(v)?;
    if write_short_decimal(out, &text) {
        return Ok(bound);
    }
    if !number_is_exact(&text) {
        return Err(JsonbError::InexactNumber);
    }
    let d: f64 = text.parse().map_err(|_| bad("number"))?;
    write_number(out, d);
    Ok(bound)
}

fn utf8(b: &[u8]) -> Result<&str, JsonbError> {
    if b.contains(&0) {
        return Err(bad("NUL in a string"));
    }
    std::str::from_utf8(b).map_err(|_| bad("string is not UTF-8"))
}

/// jsonb's order of object keys: by length, then bytes.
fn jsonb_key_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// The RFC 8785 text of the `jsonb` value whose bytes, after the varlena header,
/// are `container`.
pub fn canonical_from_jsonb(container: &[u8]) -> Result<String, JsonbError> {
    if cfg!(target_endian = "big") {
        return Err(JsonbError::Unsupported);
    }
    let mut top = true;
    // An upper bound of the length of jsonb_out's text (an escape is at most 6
    // bytes a byte; numbers by numeric_text), checked at the end.
    let mut text_bound: u64 = 0;
    let root = Child {
        kind: JENTRY_ISCONTAINER,
        data: container,
    };
    let writer = Writer::with_capacity(container.len() + container.len() / 4);
    let out = writer.write(root, |w, child: Child<'_>| {
        let is_top = std::mem::replace(&mut top, false);
        text_bound = text_bound.saturating_add(8);
        match child.kind {
            JENTRY_ISSTRING => {
                text_bound = text_bound.saturating_add(6 * child.data.len() as u64);
                write_string(&mut w.out, utf8(child.data)?)
            }
            JENTRY_ISNUMERIC => {
                let bound = write_numeric(&mut w.out, child.data)?;
                text_bound = text_bound.saturating_add(bound);
            }
            JENTRY_ISBOOL_FALSE => w.out.push_str("false"),
            JENTRY_ISBOOL_TRUE => w.out.push_str("true"),
            JENTRY_ISNULL => w.out.push_str("null"),
            JENTRY_ISCONTAINER => {
                let (header, kids) = children(child.data)?;
                if header & JB_FSCALAR != 0 {
                    // Only the top level is a wrapped scalar.
                    if !is_top || header & JB_FARRAY == 0 || kids.len() != 1 {
                        return Err(bad("misplaced scalar"));
                    }
                    if kids[0].kind == JENTRY_ISCONTAINER {
                        return Err(bad("scalar container"));
                    }
                    w.then(kids[0]);
                } else if header & JB_FOBJECT != 0 && header & JB_FARRAY == 0 {
                    let pairs = kids.len() / 2;
                    let mut members = Vec::with_capacity(pairs);
                    for k in 0..pairs {
                        if kids[k].kind != JENTRY_ISSTRING {
                            return Err(bad("object key is not a string"));
                        }
                        if k > 0
                            && jsonb_key_order(kids[k - 1].data, kids[k].data)
                                != std::cmp::Ordering::Less
                        {
                            return Err(bad("object keys out of order"));
                        }
                        text_bound = text_bound.saturating_add(6 * kids[k].data.len() as u64 + 8);
                        members.push((utf8(kids[k].data)?, kids[pairs + k]));
                    }
                    w.object(members);
                } else if header & JB_FARRAY != 0 && header & JB_FOBJECT == 0 {
                    w.array(kids);
                } else {
                    return Err(bad("container type"));
                }
            }
            _ => return Err(bad("entry type")),
        }
        Ok(())
    })?;
    if text_bound > MAX_TEXT {
        return Err(bad("text form may exceed PostgreSQL's allocation limit"));
    }
    Ok(out)
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    //! Layouts built by hand from jsonb.h and numeric.c. The extension's test
    //! `jsonb_binary_canonical_matches_text` checks the server's own bytes.
    use super::*;

    /// A container with `header` (flags and count) and `kids` (JEntry type, data),
    /// padding numbers and containers to 4 bytes as PostgreSQL does.
    fn container(header: u32, kids: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut entries = Vec::new();
        let mut data: Vec<u8> = Vec::new();
        for (kind, bytes) in kids {
            let start = data.len();
            if matches!(*kind, JENTRY_ISNUMERIC | JENTRY_ISCONTAINER) {
                data.resize(int_align(start), 0);
            }
            data.extend_from_slice(bytes);
            entries.push(kind | (data.len() - start) as u32);
        }
        let mut v = header.to_le_bytes().to_vec();
        for e in entries {
            v.extend_from_slice(&e.to_le_bytes());
        }
        v.extend_from_slice(&data);
        v
    }

    /// A short-header numeric (1-byte varlena header) of base-10000 `digits`,
    /// display scale 0.
    fn short_numeric(neg: bool, weight: i32, digits: &[u16]) -> Vec<u8> {
        short_numeric_scaled(neg, weight, 0, digits)
    }

    fn short_numeric_scaled(neg: bool, weight: i32, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut h: u16 = NUMERIC_SHORT | (dscale << NUMERIC_SHORT_DSCALE_SHIFT);
        if neg {
            h |= NUMERIC_SHORT_SIGN_MASK;
        }
        if weight < 0 {
            h |= NUMERIC_SHORT_WEIGHT_SIGN_MASK;
        }
        h |= (weight as u16) & NUMERIC_SHORT_WEIGHT_MASK;
        let len = 1 + 2 + 2 * digits.len();
        let mut v = vec![((len as u8) << 1) | 1];
        v.extend_from_slice(&h.to_le_bytes());
        for d in digits {
            v.extend_from_slice(&d.to_le_bytes());
        }
        v
    }

    /// A long-header numeric (4-byte varlena header).
    fn long_numeric(neg: bool, weight: i16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let len = 4 + 4 + 2 * digits.len();
        let mut v = ((len as u32) << 2).to_le_bytes().to_vec();
        v.extend_from_slice(&(if neg { NUMERIC_NEG } else { 0 } | dscale).to_le_bytes());
        v.extend_from_slice(&weight.to_le_bytes());
        for d in digits {
            v.extend_from_slice(&d.to_le_bytes());
        }
        v
    }

    fn scalar(kind: u32, bytes: Vec<u8>) -> Vec<u8> {
        container(JB_FSCALAR | JB_FARRAY | 1, &[(kind, bytes)])
    }

    #[test]
    fn scalars() {
        let s = scalar(JENTRY_ISSTRING, b"a\"b\n".to_vec());
        assert_eq!(canonical_from_jsonb(&s).unwrap(), r#""a\"b\n""#);
        let t = scalar(JENTRY_ISBOOL_TRUE, vec![]);
        assert_eq!(canonical_from_jsonb(&t).unwrap(), "true");
        let n = scalar(JENTRY_ISNULL, vec![]);
        assert_eq!(canonical_from_jsonb(&n).unwrap(), "null");
    }

    #[test]
    fn objects_sort_by_utf16_and_numbers_are_jcs() {
        // {"bb": 1.5, "a": -12, "\u{e000}": [], "\u{10000}": {}}, keys as jsonb
        // stores them (by length, then bytes); JCS puts U+10000 (a surrogate
        // pair) before U+E000.
        let keys: [&str; 4] = ["a", "bb", "\u{e000}", "\u{10000}"];
        let values = [
            (JENTRY_ISNUMERIC, short_numeric(true, 0, &[12])),
            (JENTRY_ISNUMERIC, long_numeric(false, 0, 1, &[1, 5000])),
            (JENTRY_ISCONTAINER, container(JB_FARRAY, &[])),
            (JENTRY_ISCONTAINER, container(JB_FOBJECT, &[])),
        ];
        let mut kids: Vec<(u32, Vec<u8>)> = keys
            .iter()
            .map(|k| (JENTRY_ISSTRING, k.as_bytes().to_vec()))
            .collect();
        kids.extend(values);
        let c = container(JB_FOBJECT | 4, &kids);
        assert_eq!(
            canonical_from_jsonb(&c).unwrap(),
            "{\"a\":-12,\"bb\":1.5,\"\u{10000}\":{},\"\u{e000}\":[]}"
        );
    }

    #[test]
    fn numeric_text_reads_weights_and_signs() {
        let t = |v: Vec<u8>| numeric_text(&v).unwrap().0;
        assert_eq!(t(short_numeric(false, 1, &[12, 3400])), "00123400");
        assert_eq!(t(short_numeric_scaled(true, -1, 1, &[5000])), "-5000e-4");
        assert_eq!(t(short_numeric(false, 0, &[])), "0");
        assert_eq!(t(long_numeric(true, -3, 14, &[25])), "-0025e-12");
    }

    #[test]
    fn numerics_numeric_out_would_print_differently_are_left_to_the_text_path() {
        let m = |v: Vec<u8>| matches!(numeric_text(&v), Err(JsonbError::Malformed(_)));
        // 1500.75 with display scale 0: numeric_out prints 1500.
        assert!(m(short_numeric_scaled(false, 0, 0, &[1500, 7500])));
        assert!(m(short_numeric_scaled(false, 0, 1, &[1500, 7500])));
        assert!(!m(short_numeric_scaled(false, 0, 2, &[1500, 7500])));
        // Leading or trailing zero digit groups: make_result strips them.
        assert!(m(short_numeric(false, 1, &[0, 5])));
        assert!(m(short_numeric(false, 1, &[5, 0])));
    }

    #[test]
    fn keys_out_of_jsonb_order_or_repeated_are_malformed() {
        for keys in [["b", "a"], ["a", "a"], ["aa", "b"]] {
            let kids: Vec<(u32, Vec<u8>)> = keys
                .iter()
                .map(|k| (JENTRY_ISSTRING, k.as_bytes().to_vec()))
                .chain([(JENTRY_ISNULL, vec![]), (JENTRY_ISNULL, vec![])])
                .collect();
            let c = container(JB_FOBJECT | 2, &kids);
            let r = canonical_from_jsonb(&c);
            assert!(matches!(r, Err(JsonbError::Malformed(_))), "{keys:?}");
        }
        let both = container(JB_FOBJECT | JB_FARRAY, &[]);
        assert!(matches!(
            canonical_from_jsonb(&both),
            Err(JsonbError::Malformed(_))
        ));
        let nul = scalar(JENTRY_ISSTRING, b"a\0b".to_vec());
        assert!(matches!(
            canonical_from_jsonb(&nul),
            Err(JsonbError::Malformed(_))
        ));
    }

    #[test]
    fn a_huge_display_scale_is_left_to_the_text_path() {
        // 1.000…0 with 16,383 zeros, 70,000 times: 1.1 GB of text from 1 MB.
        let one = long_numeric(false, 0, NUMERIC_DSCALE_MASK, &[1]);
        let kids: Vec<(u32, Vec<u8>)> = (0..70_000)
            .map(|_| (JENTRY_ISNUMERIC, one.clone()))
            .collect();
        let c = container(JB_FARRAY | 70_000, &kids);
        assert!(matches!(
            canonical_from_jsonb(&c),
            Err(JsonbError::Malformed(_))
        ));
        let few = container(JB_FARRAY | 2, &kids[..2]);
        assert_eq!(canonical_from_jsonb(&few).unwrap(), "[1,1]");
    }

    /// What `write_numeric` writes for `text` by the general path: parse, check,
    /// shortest double text.
    fn via_double(text: &str) -> Option<String> {
        if !number_is_exact(text) {
            return None;
        }
        let mut out = String::new();
        write_number(&mut out, text.parse().unwrap());
        Some(out)
    }

    #[test]
    fn short_decimals_are_written_as_their_double() {
        for t in [
            "0012345678901234e-4",
            "-5000e-4",
            "1e290",
            "25e-12",
            "0",
            "1e21",
            "1e20",
            "123e18",
            "1e-6",
            "1e-7",
            "-15e-7",
            "1234567890123450000",
            "00010000e-8",
        ] {
            let mut out = String::new();
            if write_short_decimal(&mut out, t) {
                assert_eq!(Some(out), via_double(t), "{t}");
            }
        }
        let mut out = String::new();
        assert!(!write_short_decimal(&mut out, "12345678901234567891"));
        assert!(!write_short_decimal(&mut out, "1e300"));
        assert!(out.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn short_decimals_agree_with_ryu(
            neg in proptest::bool::ANY,
            sig in 1u64..1_000_000_000_000_000,
            pad in 0usize..6,
            exp in -300i64..300,
        ) {
            let text = format!("{}{}{}e{exp}", if neg { "-" } else { "" }, "0".repeat(pad), sig);
            let mut out = String::new();
            if write_short_decimal(&mut out, &text) {
                proptest::prop_assert_eq!(Some(out), via_double(&text), "{}", text);
            }
        }
    }

    #[test]
    fn inexact_numbers_are_refused() {
        // 12345678901234567891 = 1234 5678 9012 3456 7891, weight 4.
        let n = short_numeric(false, 4, &[1234, 5678, 9012, 3456, 7891]);
        let c = scalar(JENTRY_ISNUMERIC, n);
        assert_eq!(canonical_from_jsonb(&c), Err(JsonbError::InexactNumber));
    }

    #[test]
    fn garbage_is_malformed_never_a_panic() {
        let five = (JB_FARRAY | 5).to_le_bytes();
        for bytes in [&b""[..], &[1, 2, 3], &[0xff; 16], &five] {
            assert!(matches!(
                canonical_from_jsonb(bytes),
                Err(JsonbError::Malformed(_))
            ));
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = canonical_from_jsonb(&b);
        }
    }
}
