//! Streaming verification of one tenant's chain.
//!
//! Entries are pushed in the order they were stored (by seq). At every position the
//! verifier knows the seq and prev_hash the entry must have, so the first failure it
//! reports names that expected seq: a deleted, inserted, swapped or edited entry is
//! reported at exactly the position where the chain stops being the one written.

use crate::canonical::canonical_payload;
use crate::ledger::{entry_hash, EntryFields, EntryMac, Hash};

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

/// One entry as stored: `payload` is the stored JSON text (any formatting).
#[derive(Debug, Clone)]
pub struct StoredEntry<'a> {
    pub tenant: &'a str,
    pub seq: i64,
    pub recorded_at_us: i64,
    pub actor: &'a str,
    pub event: &'a str,
    pub payload: &'a str,
    pub prev_hash: &'a [u8],
    pub hash: &'a [u8],
    pub mac: Option<&'a [u8]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub checked: i64,
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
            Ok(hash) => {
                self.checked += 1;
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

    fn check(&self, e: &StoredEntry<'_>) -> Result<Hash, Problem> {
        if e.seq < self.next_seq {
            return Err(Problem::Duplicate);
        }
        if e.seq > self.next_seq {
            return Err(Problem::Gap);
        }
        let payload = canonical_payload(e.payload).map_err(|_| Problem::HashMismatch)?;
        let Ok(prev_hash) = <&Hash>::try_from(e.prev_hash) else {
            return Err(Problem::HashMismatch);
        };
        let fields = EntryFields {
            prev_hash,
            tenant: e.tenant,
            seq: e.seq,
            recorded_at_us: e.recorded_at_us,
            actor: e.actor,
            event: e.event,
            payload: &payload,
        };
        let hash = entry_hash(&fields);
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
        Ok(hash)
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
            failure: self.failure,
            last: self.last,
        }
    }
}
