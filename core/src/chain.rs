//! Streaming verification of one tenant's chain.
//!
//! Entries are pushed in the order they were stored (by seq). At every position the
//! verifier knows the seq and prev_hash the entry must have, so the first failure it
//! reports names that expected seq: a deleted, inserted, swapped or edited entry is
//! reported at exactly the position where the chain stops being the one written.
//!
//! An entry is hashed by its format (`fmt`, see `ledger.rs`): format 1 entries
//! (written before format 2) over their payload, format 2 entries over their
//! payload commitment. A format 2 entry whose payload and salt are both absent and
//! whose commitment is stored is *erased*: its stored commitment stands in for
//! the payload, and it is counted in `Report::erased`. A chain may start with
//! format 1 entries and go on with format 2; a format 1 entry after a format 2
//! one is a hash mismatch (entries are never written that way).

use crate::canonical::canonical_payload;
use crate::ledger::{
    entry_hash, entry_hash_v2, payload_commitment, EntryFields, EntryFieldsV2, EntryMac, Hash,
    Salt, FMT_V1, FMT_V2,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    HashMismatch,
    MacMismatch,
    BrokenLink,
    Gap,
    Duplicate,
    /// The chain starts at an anchor (`ledger_heads`) that no `ledger.pruned`
    /// entry records: the entries before it were not removed by a prune.
    AnchorMismatch,
}

impl Problem {
    /// The text `pgseal.ledger_verify` reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::HashMismatch => "hash mismatch",
            Problem::MacMismatch => "mac mismatch",
            Problem::BrokenLink => "broken link",
            Problem::Gap => "gap",
            Problem::Duplicate => "duplicate",
            Problem::AnchorMismatch => "anchor mismatch",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// The seq expected at the failing position.
    pub seq: i64,
    pub problem: Problem,
}

/// A stored payload as the verifier is handed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload<'a> {
    /// JSON text in any formatting; the verifier makes it canonical.
    Json(&'a str),
    /// Text already in RFC 8785 form: `jsonb::canonical_from_jsonb` of the stored
    /// value, which skips the text round trip.
    Canonical(&'a str),
}

impl<'a> Payload<'a> {
    /// The canonical text that was hashed.
    fn canonical(self) -> Result<std::borrow::Cow<'a, str>, Problem> {
        match self {
            Payload::Json(text) => canonical_payload(text)
                .map(std::borrow::Cow::Owned)
                .map_err(|_| Problem::HashMismatch),
            Payload::Canonical(text) => Ok(std::borrow::Cow::Borrowed(text)),
        }
    }
}

/// One entry as stored: `payload` is the stored JSON, absent when erased. The format 2 fields (`db_role`, `subjects`, `salt`, `commitment`)
/// are absent in a format 1 entry; `subjects` absent and empty are the same.
#[derive(Debug, Clone)]
pub struct StoredEntry<'a> {
    /// `FMT_V1` or `FMT_V2`; any other value fails as a hash mismatch.
    pub fmt: i16,
    pub tenant: &'a str,
    pub seq: i64,
    pub recorded_at_us: i64,
    pub actor: &'a str,
    pub event: &'a str,
    pub payload: Option<Payload<'a>>,
    pub db_role: Option<&'a str>,
    pub subjects: Option<&'a [String]>,
    pub salt: Option<&'a [u8]>,
    pub commitment: Option<&'a [u8]>,
    pub prev_hash: &'a [u8],
    pub hash: &'a [u8],
    pub mac: Option<&'a [u8]>,
}

impl<'a> StoredEntry<'a> {
    /// A format 1 entry (no format 2 fields).
    #[allow(clippy::too_many_arguments)]
    pub fn v1(
        tenant: &'a str,
        seq: i64,
        recorded_at_us: i64,
        actor: &'a str,
        event: &'a str,
        payload: &'a str,
        prev_hash: &'a [u8],
        hash: &'a [u8],
        mac: Option<&'a [u8]>,
    ) -> Self {
        StoredEntry {
            fmt: FMT_V1,
            tenant,
            seq,
            recorded_at_us,
            actor,
            event,
            payload: Some(Payload::Json(payload)),
            db_role: None,
            subjects: None,
            salt: None,
            commitment: None,
            prev_hash,
            hash,
            mac,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub checked: i64,
    /// How many of the checked entries are erased (verified by their stored
    /// payload commitment).
    pub erased: i64,
    pub failure: Option<Failure>,
    /// seq and hash of the last entry that verified, if any.
    pub last: Option<(i64, Hash)>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

pub struct Verifier {
    next_seq: i64,
    prev: Hash,
    mac: Option<EntryMac>,
    checked: i64,
    erased: i64,
    /// A format 2 entry has been checked: format 1 may not follow.
    seen_v2: bool,
    failure: Option<Failure>,
    last: Option<(i64, Hash)>,
}

impl Verifier {
    /// Starts at `first_seq`, whose entry must link to `prev`. With `mac`, every
    /// MAC is checked too (offline verification has no MAC key).
    pub fn new(first_seq: i64, prev: Hash, mac: Option<EntryMac>) -> Self {
        Verifier {
            next_seq: first_seq,
            prev,
            mac,
            checked: 0,
            erased: 0,
            seen_v2: false,
            failure: None,
            last: None,
        }
    }

    /// Checks the next entry. Returns false once a failure has been found; later
    /// entries are then ignored.
    pub fn push(&mut self, e: &StoredEntry<'_>) -> bool {
        if self.failure.is_some() {
            return false;
        }
        match self.check(e) {
            Ok((hash, erased)) => {
                self.checked += 1;
                self.erased += i64::from(erased);
                self.seen_v2 |= e.fmt == FMT_V2;
                self.last = Some((e.seq, hash));
                self.prev = hash;
                self.next_seq += 1;
                true
            }
            Err(problem) => {
                self.failure = Some(Failure {
                    seq: self.next_seq,
                    problem,
                });
                false
            }
        }
    }

    /// The entry's hash, and whether it is erased.
    fn check(&self, e: &StoredEntry<'_>) -> Result<(Hash, bool), Problem> {
        if e.seq < self.next_seq {
            return Err(Problem::Duplicate);
        }
        if e.seq > self.next_seq {
            return Err(Problem::Gap);
        }
        let Ok(prev_hash) = <&Hash>::try_from(e.prev_hash) else {
            return Err(Problem::HashMismatch);
        };
        let (hash, erased) = match e.fmt {
            FMT_V1 if !self.seen_v2 => (hash_v1(e, prev_hash)?, false),
            FMT_V2 => hash_v2(e, prev_hash)?,
            _ => return Err(Problem::HashMismatch),
        };
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&hash[..], e.hash)) {
            return Err(Problem::HashMismatch);
        }
        if *prev_hash != self.prev {
            return Err(Problem::BrokenLink);
        }
        if let Some(m) = &self.mac {
            match e.mac {
                Some(mac) if m.verify(&hash, mac) => {}
                _ => return Err(Problem::MacMismatch),
            }
        }
        Ok((hash, erased))
    }

    /// Ends verification. `head` is the (seq, hash) the chain must reach, when
    /// known (the ledger's recorded head, or a checkpoint): a chain that stops
    /// short of it has a gap, and one that reaches it with another hash was rewritten.
    pub fn finish(mut self, head: Option<(i64, Hash)>) -> Report {
        if self.failure.is_none() {
            if let Some((head_seq, head_hash)) = head {
                let reached = self.next_seq - 1;
                if reached < head_seq {
                    self.failure = Some(Failure {
                        seq: self.next_seq,
                        problem: Problem::Gap,
                    });
                } else if reached == head_seq && head_seq > 0 && self.prev != head_hash {
                    self.failure = Some(Failure {
                        seq: head_seq,
                        problem: Problem::HashMismatch,
                    });
                }
            }
        }
        Report {
            checked: self.checked,
            erased: self.erased,
            failure: self.failure,
            last: self.last,
        }
    }
}

/// The format 1 hash of `e`, which must have a payload and no format 2 field.
fn hash_v1(e: &StoredEntry<'_>, prev_hash: &Hash) -> Result<Hash, Problem> {
    let v2_field = e.db_role.is_some()
        || e.subjects.is_some_and(|s| !s.is_empty())
        || e.salt.is_some()
        || e.commitment.is_some();
    let (Some(payload), false) = (e.payload, v2_field) else {
        return Err(Problem::HashMismatch);
    };
    let payload = payload.canonical()?;
    Ok(entry_hash(&EntryFields {
        prev_hash,
        tenant: e.tenant,
        seq: e.seq,
        recorded_at_us: e.recorded_at_us,
        actor: e.actor,
        event: e.event,
        payload: &payload,
    }))
}

/// The payload commitment of a format 2 entry, and whether it is erased: from the
/// salt and payload when both are present (a stored commitment must then equal
/// it), else the stored commitment when both are absent.
fn commitment_v2(e: &StoredEntry<'_>) -> Result<(Hash, bool), Problem> {
    let stored = match e.commitment {
        Some(c) => Some(<Hash>::try_from(c).map_err(|_| Problem::HashMismatch)?),
        None => None,
    };
    match (e.payload, e.salt, stored) {
        (Some(payload), Some(salt), stored) => {
            let salt = <&Salt>::try_from(salt).map_err(|_| Problem::HashMismatch)?;
            let payload = payload.canonical()?;
            let c = payload_commitment(salt, &payload);
            match stored {
                Some(s) if !bool::from(subtle::ConstantTimeEq::ct_eq(&s[..], &c[..])) => {
                    Err(Problem::HashMismatch)
                }
                _ => Ok((c, false)),
            }
        }
        (None, None, Some(c)) => Ok((c, true)),
        _ => Err(Problem::HashMismatch),
    }
}

/// The format 2 hash of `e`, and whether it is erased.
fn hash_v2(e: &StoredEntry<'_>, prev_hash: &Hash) -> Result<(Hash, bool), Problem> {
    let Some(db_role) = e.db_role else {
        return Err(Problem::HashMismatch);
    };
    let (commitment, erased) = commitment_v2(e)?;
    let hash = entry_hash_v2(&EntryFieldsV2 {
        prev_hash,
        tenant: e.tenant,
        seq: e.seq,
        recorded_at_us: e.recorded_at_us,
        actor: e.actor,
        db_role,
        event: e.event,
        subjects: e.subjects.unwrap_or(&[]),
        commitment: &commitment,
    });
    Ok((hash, erased))
}
