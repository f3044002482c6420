//! Entries appended in this transaction and not yet written.
//!
//! Each entry remembers the subtransaction that appended it: a subtransaction
//! abort drops its entries (and those of its children), a subtransaction commit
//! hands them to its parent. The list is bounded (`must_write`); `writer::flush`
//! writes the entries of the current level.

use std::cell::{Cell, RefCell};

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;
use pgseal_core::ledger::{Hash, Salt};

/// An entry appended but not yet inserted.
pub(crate) struct Pending {
    /// The subtransaction that appended it: dropped if that one aborts.
    pub(crate) subxact: pg_sys::SubTransactionId,
    pub(crate) tenant: String,
    pub(crate) seq: i64,
    pub(crate) recorded_at: TimestampWithTimeZone,
    pub(crate) actor: String,
    /// The database role that appended it.
    pub(crate) db_role: String,
    pub(crate) event: String,
    /// Data-subject ids (none yet on any append path).
    pub(crate) subjects: Vec<String>,
    /// Canonical JSON text.
    pub(crate) payload: String,
    /// The `jsonb` varlena to store in place of `payload`'s (the caller's own
    /// value, `pg::jsonb::JsonbArg`), when there is one.
    pub(crate) stored: Option<Vec<u8>>,
    pub(crate) salt: Salt,
    pub(crate) prev: Hash,
    pub(crate) hash: Hash,
    pub(crate) mac: [u8; 32],
}

impl Pending {
    /// The payload as the `jsonb` to store: the caller's own value when it gave
    /// one, else the canonical text parsed.
    pub(crate) fn payload_datum(&self) -> crate::error::SealResult<pg_sys::Datum> {
        match &self.stored {
            Some(raw) => Ok(crate::pg::jsonb::datum_of_raw(raw)),
            None => crate::pg::jsonb::datum_of_text(&self.payload),
        }
    }

    /// Roughly the memory it holds.
    fn size(&self) -> usize {
        self.tenant.len()
            + self.actor.len()
            + self.db_role.len()
            + self.subjects.iter().map(String::len).sum::<usize>()
            + self.event.len()
            + self.payload.len()
            + self.stored.as_ref().map_or(0, Vec::len)
            + std::mem::size_of::<Self>()
    }
}

/// Pending entries are written once this many have gathered, or this many bytes.
const PENDING_MAX: usize = 1000;
const PENDING_MAX_BYTES: usize = 1 << 20;

thread_local! {
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
    static PENDING_BYTES: Cell<usize> = const { Cell::new(0) };
}

/// Adds an entry; returns whether the list has grown past its bound and should be
/// written now.
pub(super) fn push(entry: Pending) -> bool {
    let bytes = entry.size();
    PENDING.with(|p| p.borrow_mut().push(entry));
    let total = PENDING_BYTES.with(|b| {
        b.set(b.get() + bytes);
        b.get()
    });
    total >= PENDING_MAX_BYTES || PENDING.with(|p| p.borrow().len()) >= PENDING_MAX
}

/// Whether appended entries wait to be written.
pub fn has_pending() -> bool {
    PENDING.with(|p| !p.borrow().is_empty())
}

/// This transaction's last pending entry for `tenant`: its seq and hash.
pub(super) fn tail(tenant: &str) -> Option<(i64, Hash)> {
    PENDING.with(|p| {
        p.borrow()
            .iter()
            .rev()
            .find(|e| e.tenant == tenant)
            .map(|e| (e.seq, e.hash))
    })
}

fn recount() {
    PENDING_BYTES.with(|b| b.set(PENDING.with(|p| p.borrow().iter().map(Pending::size).sum())));
}

/// Takes the entries of subtransaction `current` and deeper (those of finished
/// inner ones were handed to it), in the order appended; entries of outer levels
/// stay.
pub(super) fn take_from(current: pg_sys::SubTransactionId) -> Vec<Pending> {
    let mine = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let (mine, outer): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut *p)
            .into_iter()
            .partition(|e| e.subxact >= current);
        *p = outer;
        mine
    });
    recount();
    mine
}

/// A subtransaction committed: its pending entries now belong to its parent.
pub(super) fn subtransaction_committed(
    subxact: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
) {
    PENDING.with(|p| {
        p.borrow_mut()
            .iter_mut()
            .filter(|e| e.subxact == subxact)
            .for_each(|e| e.subxact = parent)
    });
}

/// A subtransaction aborted: its pending entries go.
pub(super) fn subtransaction_aborted(subxact: pg_sys::SubTransactionId) {
    // Subtransaction ids grow, and an aborting subtransaction's open children
    // abort first, so the entries of `subxact` and its children are those >= it.
    PENDING.with(|p| p.borrow_mut().retain(|e| e.subxact < subxact));
    recount();
}

/// Forgets every pending entry (the transaction ended).
pub(super) fn clear() {
    PENDING.with(|p| p.borrow_mut().clear());
    PENDING_BYTES.with(|b| b.set(0));
}
