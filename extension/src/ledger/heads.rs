//! This transaction's view of the chain heads it appends to.
//!
//! The first append for a tenant in a transaction locks its chain and reads its
//! heads row (`chain_lock`); the head is kept here, so later appends in the same
//! transaction need neither. A subtransaction abort marks every head stale: it is
//! re-locked and re-read before its next use.

use std::cell::RefCell;
use std::collections::HashMap;

use pgseal_core::ledger::{EntryMac, Hash};

use crate::pg::head_read::HeadRow;

/// How far a tenant's heads row may fall behind its last entry. Appends move it
/// only when it is this many entries behind (and pruning moves it), so a single
/// append inserts its entry and writes nothing else; the head is read from the
/// last entry (`pg::head_read`). Verification checks that the chain passes through
/// the row's (seq, hash), and reaches it: a tail cut off behind the row is a gap.
pub(crate) const HEAD_STRIDE: i64 = 64;

struct Head {
    seq: i64,
    hash: Hash,
    mac: EntryMac,
    /// The committed head, as this transaction first read it.
    committed: (i64, Hash),
    /// A subtransaction aborted since the head was read: re-lock and re-read.
    stale: bool,
    /// Where the tenant's heads row is, when known: the row can then be moved
    /// without SPI (`pg::head_write`). Forgotten whenever SPI or an abort moves it.
    row: Option<HeadRow>,
}

thread_local! {
    static HEADS: RefCell<HashMap<String, Head>> = RefCell::new(HashMap::new());
}

/// Whether `tenant`'s head is known and current (loaded in this transaction, with
/// no subtransaction abort since).
pub(super) fn is_current(tenant: &str) -> bool {
    HEADS.with(|h| h.borrow().get(tenant).map(|x| x.stale)) == Some(false)
}

/// Keeps `tenant`'s head as just loaded (after the chain lock), with its MAC key
/// and, when read directly, where its row is. The committed head is kept from the
/// first load of the transaction.
pub(super) fn loaded(tenant: &str, head: (i64, Hash), mac: EntryMac, row: Option<HeadRow>) {
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

/// Where `tenant`'s heads row is, if known; forgotten by taking it, since the
/// write about to happen moves it.
pub(super) fn take_row(tenant: &str) -> Option<HeadRow> {
    HEADS.with(|h| h.borrow_mut().get_mut(tenant).and_then(|v| v.row.take()))
}

/// Where `tenant`'s heads row is now (after a write that knows it).
pub(super) fn put_row(tenant: &str, row: HeadRow) {
    HEADS.with(|h| {
        if let Some(v) = h.borrow_mut().get_mut(tenant) {
            v.row = Some(row);
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
            v.row = None;
        })
    });
}

/// Forgets every head (the transaction ended).
pub(super) fn clear() {
    HEADS.with(|h| h.borrow_mut().clear());
}
