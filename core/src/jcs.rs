//! RFC 8785 (JCS) serialisation without recursion, so that any nesting depth
//! PostgreSQL's `jsonb` accepts canonicalises (a recursive parser stops at a fixed
//! depth, or exhausts a backend's stack).
//!
//! The text is parsed into a flat arena of nodes (children are indices, so
//! dropping it is not recursive either), then written out with an explicit stack:
//! object members sorted by the UTF-16 code units of their names, duplicate names
//! resolved to the last value (as `jsonb` and serde_json do), numbers in the
//! shortest ECMAScript form of their double (`ryu-js`), strings with JCS's minimal
//! escaping.

use std::fmt::Write as _;

/// Why a text is not JSON. Fixed phrases: they never carry input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotJson(pub &'static str);

enum Node {
    Null,
    Bool(bool),
    Number(f64),
    Str(String),
    /// Element node indices.
    Array(Vec<usize>),
    /// (name, value node index), in input order.
    Object(Vec<(String, usize)>),
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
    nodes: Vec<Node>,
}

/// A container being filled while parsing.
enum Open {
    Array(usize),
    /// The object node, and the member name read but whose value is still to come.
    Object(usize, Option<String>),
}

impl<'a> Parser<'a> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), NotJson> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(NotJson("unexpected character"))
        }
    }

    fn hex4(&mut self) -> Result<u32, NotJson> {
        let s = self
            .b
            .get(self.i..self.i + 4)
            .ok_or(NotJson("truncated \\u escape"))?;
        let s = std::str::from_utf8(s).map_err(|_| NotJson("bad \\u escape"))?;
        let v = u32::from_str_radix(s, 16).map_err(|_| NotJson("bad \\u escape"))?;
        self.i += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<String, NotJson> {
        // The opening quote is consumed by the caller.
        let mut out = String::new();
        loop {
            let start = self.i;
            while self.i < self.b.len() && !matches!(self.b[self.i], b'"' | b'\\' | 0..=0x1f) {
                self.i += 1;
            }
            let run = std::str::from_utf8(&self.b[start..self.i])
                .map_err(|_| NotJson("invalid UTF-8"))?;
            out.push_str(run);
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = self.peek().ok_or(NotJson("truncated escape"))?;
                    self.i += 1;
                    match c {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xD800..0xDC00).contains(&hi) {
                                if !(self.eat(b'\\') && self.eat(b'u')) {
                                    return Err(NotJson("lone surrogate"));
                                }
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(NotJson("lone surrogate"));
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else if (0xDC00..0xE000).contains(&hi) {
                                return Err(NotJson("lone surrogate"));
                            } else {
                                hi
                            };
                            out.push(char::from_u32(cp).ok_or(NotJson("bad \\u escape"))?);
                        }
                        _ => return Err(NotJson("bad escape")),
                    }
                }
                Some(_) => return Err(NotJson("control character in a string")),
                None => return Err(NotJson("unterminated string")),
            }
        }
    }

    fn number(&mut self) -> Result<f64, NotJson> {
        let start = self.i;
        self.eat(b'-');
        let digits = |p: &mut Self| {
            let s = p.i;
            while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                p.i += 1;
            }
            p.i - s
        };
        let int = digits(self);
        if int == 0 || (int > 1 && self.b[self.i - int] == b'0') {
            return Err(NotJson("bad number"));
        }
        if self.eat(b'.') && digits(self) == 0 {
            return Err(NotJson("bad number"));
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if digits(self) == 0 {
                return Err(NotJson("bad number"));
            }
        }
        let text = std::str::from_utf8(&self.b[start..self.i]).expect("ASCII");
        let d: f64 = text.parse().map_err(|_| NotJson("bad number"))?;
        if d.is_finite() {
            Ok(d)
        } else {
            Err(NotJson("number out of range"))
        }
    }

    fn push(&mut self, n: Node) -> usize {
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    /// Parses the whole text; returns the root node's index.
    fn parse(&mut self) -> Result<usize, NotJson> {
        let mut stack: Vec<Open> = Vec::new();
        let root;
        'value: loop {
            self.ws();
            // One value starts here: a scalar, or a container that opens.
            let node = match self.peek().ok_or(NotJson("unexpected end"))? {
                b'{' => {
                    self.i += 1;
                    let id = self.push(Node::Object(Vec::new()));
                    self.ws();
                    if self.eat(b'}') {
                        id
                    } else {
                        stack.push(Open::Object(id, Some(self.member_name()?)));
                        continue 'value;
                    }
                }
                b'[' => {
                    self.i += 1;
                    let id = self.push(Node::Array(Vec::new()));
                    self.ws();
                    if self.eat(b']') {
                        id
                    } else {
                        stack.push(Open::Array(id));
                        continue 'value;
                    }
                }
                b'"' => {
                    self.i += 1;
                    let s = self.string()?;
                    self.push(Node::Str(s))
                }
                b't' => {
                    self.literal(b"true")?;
                    self.push(Node::Bool(true))
                }
                b'f' => {
                    self.literal(b"false")?;
                    self.push(Node::Bool(false))
                }
                b'n' => {
                    self.literal(b"null")?;
                    self.push(Node::Null)
                }
                b'-' | b'0'..=b'9' => {
                    let d = self.number()?;
                    self.push(Node::Number(d))
                }
                _ => return Err(NotJson("unexpected character")),
            };
            // Attach the finished value, closing every container it completes.
            let mut done = node;
            loop {
                match stack.last_mut() {
                    None => {
                        root = done;
                        break 'value;
                    }
                    Some(Open::Array(id)) => {
                        let id = *id;
                        if let Node::Array(items) = &mut self.nodes[id] {
                            items.push(done);
                        }
                        self.ws();
                        if self.eat(b',') {
                            continue 'value;
                        }
                        if !self.eat(b']') {
                            return Err(NotJson("expected , or ]"));
                        }
                        stack.pop();
                        done = id;
                    }
                    Some(Open::Object(id, name)) => {
                        let id = *id;
                        let name = name.take().expect("a member name precedes its value");
                        if let Node::Object(members) = &mut self.nodes[id] {
                            members.push((name, done));
                        }
                        self.ws();
                        if self.eat(b',') {
                            self.ws();
                            let next = self.member_name()?;
                            if let Some(Open::Object(_, slot)) = stack.last_mut() {
                                *slot = Some(next);
                            }
                            continue 'value;
                        }
                        if !self.eat(b'}') {
                            return Err(NotJson("expected , or }"));
                        }
                        stack.pop();
                        done = id;
                    }
                }
            }
        }
        self.ws();
        if self.i != self.b.len() {
            return Err(NotJson("trailing characters"));
        }
        Ok(root)
    }

    /// `"name" :`, with whitespace around.
    fn member_name(&mut self) -> Result<String, NotJson> {
        self.ws();
        if !self.eat(b'"') {
            return Err(NotJson("expected a member name"));
        }
        let name = self.string()?;
        self.ws();
        if !self.eat(b':') {
            return Err(NotJson("expected :"));
        }
        Ok(name)
    }
}

pub(crate) fn write_string(out: &mut String, s: &str) {
    out.push('"');
    // Every escaped character is ASCII, so the runs between them are whole
    // characters and are copied as they are.
    let mut run = 0;
    for (i, &c) in s.as_bytes().iter().enumerate() {
        let escape = match c {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            c if c < 0x20 => "",
            _ => continue,
        };
        out.push_str(&s[run..i]);
        if escape.is_empty() {
            write!(out, "\\u{:04x}", c).expect("writing to a String");
        } else {
            out.push_str(escape);
        }
        run = i + 1;
    }
    out.push_str(&s[run..]);
    out.push('"');
}

pub(crate) fn write_number(out: &mut String, d: f64) {
    if d == 0.0 {
        out.push('0'); // -0 too, as JCS requires
    } else {
        out.push_str(ryu_js::Buffer::new().format_finite(d));
    }
}

/// RFC 8785 member order: by UTF-16 code units (for ASCII names, by bytes).
pub(crate) fn member_order(a: &str, b: &str) -> std::cmp::Ordering {
    if a.is_ascii() && b.is_ascii() {
        a.cmp(b)
    } else {
        a.encode_utf16().cmp(b.encode_utf16())
    }
}

/// Work items of `Writer`: a value still to write, text to emit after a
/// container's members, or a member name.
enum Item<'a, V> {
    Value(V),
    Text(&'static str),
    Name(&'a str),
}

/// Writes a tree of values as RFC 8785 text with an explicit stack, so that any
/// depth works: the caller's function writes a scalar into `out`, or hands a
/// container's elements to `array` or its members to `object`, which lay out the
/// brackets, commas and names. Shared by the text parser's tree here and the
/// `jsonb` reader (`crate::jsonb`).
pub(crate) struct Writer<'a, V> {
    pub(crate) out: String,
    stack: Vec<Item<'a, V>>,
}

impl<'a, V> Writer<'a, V> {
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        Writer {
            out: String::with_capacity(bytes),
            stack: Vec::new(),
        }
    }

    /// Writes `root`, calling `value` for it and for every value handed on.
    pub(crate) fn write<E>(
        mut self,
        root: V,
        mut value: impl FnMut(&mut Self, V) -> Result<(), E>,
    ) -> Result<String, E> {
        self.stack.push(Item::Value(root));
        while let Some(item) = self.stack.pop() {
            match item {
                Item::Text(t) => self.out.push_str(t),
                Item::Name(n) => {
                    write_string(&mut self.out, n);
                    self.out.push(':');
                }
                Item::Value(v) => value(&mut self, v)?,
            }
        }
        Ok(self.out)
    }

    /// Writes `v` next, in place of the value being written (a wrapped scalar).
    pub(crate) fn then(&mut self, v: V) {
        self.stack.push(Item::Value(v));
    }

    /// An array of `items`, in order.
    pub(crate) fn array<I>(&mut self, items: I)
    where
        I: IntoIterator<Item = V>,
        I::IntoIter: DoubleEndedIterator + ExactSizeIterator,
    {
        self.out.push('[');
        self.stack.push(Item::Text("]"));
        for (k, v) in items.into_iter().enumerate().rev() {
            self.stack.push(Item::Value(v));
            if k > 0 {
                self.stack.push(Item::Text(","));
            }
        }
    }

    /// An object of `members` in any order: sorted by `member_order` (a stable
    /// sort keeps equal names in input order), then the last value of each name
    /// kept, as `jsonb` and serde_json keep it.
    pub(crate) fn object(&mut self, mut members: Vec<(&'a str, V)>) {
        members.sort_by(|a, b| member_order(a.0, b.0));
        let mut deduped: Vec<(&'a str, V)> = Vec::with_capacity(members.len());
        for m in members {
            match deduped.last_mut() {
                Some(last) if last.0 == m.0 => *last = m,
                _ => deduped.push(m),
            }
        }
        self.out.push('{');
        self.stack.push(Item::Text("}"));
        for (k, (name, v)) in deduped.into_iter().enumerate().rev() {
            self.stack.push(Item::Value(v));
            self.stack.push(Item::Name(name));
            if k > 0 {
                self.stack.push(Item::Text(","));
            }
        }
    }
}

/// The RFC 8785 text of the JSON text `json`, at any nesting depth.
pub fn canonicalize(json: &str) -> Result<String, NotJson> {
    let mut p = Parser {
        b: json.as_bytes(),
        i: 0,
        nodes: Vec::new(),
    };
    let root = p.parse()?;
    let nodes = p.nodes;
    Writer::with_capacity(json.len()).write(root, |w, id: usize| {
        match &nodes[id] {
            Node::Null => w.out.push_str("null"),
            Node::Bool(b) => w.out.push_str(if *b { "true" } else { "false" }),
            Node::Number(d) => write_number(&mut w.out, *d),
            Node::Str(s) => write_string(&mut w.out, s),
            Node::Array(items) => w.array(items.iter().copied()),
            Node::Object(members) => {
                w.object(members.iter().map(|(n, c)| (n.as_str(), *c)).collect())
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nests_as_deep_as_jsonb_allows() {
        for depth in [200usize, 100_000] {
            let deep = "[".repeat(depth) + &"]".repeat(depth);
            assert_eq!(canonicalize(&deep).unwrap(), deep);
            let obj = r#"{"a":"#.repeat(depth) + "1" + &"}".repeat(depth);
            assert_eq!(canonicalize(&obj).unwrap(), obj);
        }
    }

    #[test]
    fn refuses_what_is_not_json() {
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\"}",
            "01",
            "1.",
            "-",
            "\"\\ud800\"",
            "\"a",
            "[1] 2",
            "nul",
            "{\"a\":1,}",
            "\"\u{1}\"",
        ] {
            assert!(canonicalize(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn duplicate_names_keep_the_last_value() {
        assert_eq!(
            canonicalize(r#"{"b":1,"a":2,"b":3}"#).unwrap(),
            r#"{"a":2,"b":3}"#
        );
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            (-(1i64 << 53)..(1i64 << 53)).prop_map(serde_json::Value::from),
            (-1e300f64..1e300).prop_map(serde_json::Value::from),
            ".*".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(6, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
                prop::collection::btree_map(".*", inner, 0..8)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Same text as the serde_json_canonicalizer crate for every JSON value it
        /// can read (its parser stops at depth 128).
        #[test]
        fn agrees_with_serde_json_canonicalizer(v in json_value(), pretty in any::<bool>()) {
            let text = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }.unwrap();
            let expected = serde_json_canonicalizer::pipe(&text).unwrap();
            prop_assert_eq!(canonicalize(&text).unwrap(), expected);
        }

        /// Arbitrary text never panics.
        #[test]
        fn never_panics(s in ".*") {
            let _ = canonicalize(&s);
        }
    }
}
