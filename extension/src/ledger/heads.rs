//! This transaction's view of the chain heads it appends to.
//!
//! The first append for a tenant in a transaction locks its chain and loads its
//! head (`chain_lock`); the head is kept here, so later appends in the same
//! transaction need neither. A subtransaction abort marks every head stale: it is
//! re-locked and re-read before its next use. When the transaction commits, the
//! heads it holds are published for the next holder of each chain's lock
//! (`shared_heads`).

use std::cell::RefCell;
use std::collections::HashMap;

use pgseal_core::ledger::{EntryMac, Hash};

use super::shared_heads::{self, ChainKey, Published};
use crate::pg::head_read::HeadRow;

/// How far a tenant's heads row may fall behind its last entry. Appends move it
/// only when it is this many entries behind (and pruning moves it), so a single
/// append inserts its entry and writes nothing else; the head is read from the
/// last entry (`pg::head_read`). Verification checks that the chain passes through
/// the row's (seq, hash), and reaches it: a tail cut off behind the row is a gap.
pub(crate) const HEAD_STRIDE: i64 = 64;

/// What this transaction knows of a tenant's heads row.
pub enum Row {
    /// Where it is and what it holds: it can be moved without SPI (`pg::head_write`).
    Known(HeadRow),
    /// Only the seq it holds (a published head): entries are written without
    /// SPI, and the row is located before it is moved.
    Behind(i64),
    /// Nothing: SPI, pruning or an abort may have moved it.
    Unknown,
}

struct Head {
    seq: i64,
    hash: Hash,
    mac: EntryMac,
    /// The committed head, as this transaction first read it.
    committed: (i64, Hash),
    /// A subtransaction aborted since the head was read: re-lock and re-read.
    stale: bool,
    row: Row,
    /// The chain's key in `shared_heads`.
    key: ChainKey,
}

thread_local! {
    static HEADS: RefCell<HashMap<String, Head>> = RefCell::new(HashMap::new());
}

/// Whether `tenant`'s head is known and current (loaded in this transaction, with
/// no subtransaction abort since).
pub(super) fn is_current(tenant: &str) -> bool {
    HEADS.with(|h| h.borrow().get(tenant).map(|x| x.stale)) == Some(false)
}

/// Whether this transaction has loaded `tenant`'s head before (it may be stale).
pub(super) fn was_loaded(tenant: &str) -> bool {
    HEADS.with(|h| h.borrow().contains_key(tenant))
}

/// Keeps `tenant`'s head as just loaded (after the chain lock), with its MAC key,
/// what is known of its heads row, and its key in `shared_heads`. The committed
/// head is kept from the first load of the transaction.
pub(super) fn loaded(tenant: &str, head: (i64, Hash), mac: EntryMac, row: Row, key: ChainKey) {
    HEADS.with(|h| {
        let mut h = h.borrow_mut();
        let committed = h.get(tenant).map_or(head, |old| old.committed);
        h.insert(
            tenant.to_owned(),
            Head {
                seq: head.0,
                hash: head.1,
                mac,
                committed,
                stale: false,
                row,
                key,
            },
        );
    });
}

/// The next entry's seq, the hash it links to, and the MAC key, for a current head.
pub(super) fn next(tenant: &str) -> (i64, Hash, EntryMac) {
    HEADS.with(|h| {
        let h = h.borrow();
        let head = &h[tenant];
        (head.seq + 1, head.hash, head.mac.clone())
    })
}

/// Moves `tenant`'s head to the entry just appended.
pub(super) fn advance(tenant: &str, seq: i64, hash: Hash) {
    HEADS.with(|h| {
        let mut h = h.borrow_mut();
        let head = h.get_mut(tenant).expect("head loaded before appending");
        head.seq = seq;
        head.hash = hash;
    });
}

/// What is known of `tenant`'s heads row; forgotten by taking it, since the
/// write about to happen may move it.
pub(super) fn take_row(tenant: &str) -> Row {
    HEADS.with(|h| {
        h.borrow_mut().get_mut(tenant).map_or(Row::Unknown, |v| {
            std::mem::replace(&mut v.row, Row::Unknown)
        })
    })
}

/// What is known of `tenant`'s heads row now (after a write that knows it).
pub(super) fn put_row(tenant: &str, row: Row) {
    HEADS.with(|h| {
        if let Some(v) = h.borrow_mut().get_mut(tenant) {
            v.row = row;
        }
    });
}

/// The committed head of a tenant this transaction appended to, as it was read
/// before the first append; `None` when this transaction has not appended.
pub fn committed_head(tenant: &str) -> Option<(i64, Hash)> {
    HEADS.with(|h| h.borrow().get(tenant).map(|v| v.committed))
}

/// A subtransaction aborted: every head is re-read (and re-locked) before its
/// next use, and the heads rows, which may have moved back, are forgotten.
pub(super) fn mark_stale() {
    HEADS.with(|h| {
        h.borrow_mut().values_mut().for_each(|v| {
            v.stale = true;
            v.row = Row::Unknown;
        })
    });
}

/// The transaction ended: when it committed, each head it holds is published,
/// or, when not known to be its last entry (stale, or its heads row moved
/// elsewhere), removed; a prepared transaction removes them all (its commit
/// happens in another session). Then every head is forgotten. Runs after the
/// commit, with the chain locks still held; must not raise.
pub(super) fn transaction_ended(committed: bool, prepared: bool) {
    let heads = HEADS.with(|h| std::mem::take(&mut *h.borrow_mut()));
    if !committed && !prepared {
        return;
    }
    for head in heads.into_values() {
        let row_seq = match head.row {
            Row::Known(ref r) if committed && !head.stale => Some(r.seq),
            Row::Behind(s) if committed && !head.stale => Some(s),
            _ => None,
        };
        match row_seq {
            Some(row_seq) => shared_heads::publish(
                &head.key,
                Published {
                    seq: head.seq,
                    hash: head.hash,
                    row_seq,
                },
            ),
            None => shared_heads::forget(&head.key),
        }
    }
}
