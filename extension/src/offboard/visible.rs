//! What lets an offboarding see all of a tenant's rows in a table `org_protect`
//! protects. Its policies show a row to the organisations' members and to the
//! user who owns it, and they bind the table's owner too (FORCE), by whose rights
//! the offboarding's statements run; `org_protect` adds two more, for SELECT and
//! DELETE, whose condition is `pgseal._offboard_visible('<the table>')`: true only
//! while one of those statements runs on that table (`as_offboarding_owner`), as
//! its owner. Its restrictive policy still limits every row to the tenant. No other
//! table's rows, no other role and no other statement of the transaction see more.

use std::cell::Cell;

use pgrx::prelude::*;

use crate::error::{SealError, SealResult};
use crate::privilege::as_table_owner_pinned;

thread_local! {
    /// The table an offboarding statement runs on now, and its owner.
    static VISIBLE: Cell<Option<(pg_sys::Oid, pg_sys::Oid)>> = const { Cell::new(None) };
}

/// Puts the previous value back when dropped, also while unwinding from an error.
struct Restore(Option<(pg_sys::Oid, pg_sys::Oid)>);

impl Drop for Restore {
    fn drop(&mut self) {
        VISIBLE.with(|v| v.set(self.0));
    }
}

/// Runs `f` as table `rel`'s owner `owner` (`as_table_owner_pinned`), with
/// `_offboard_visible(rel)` true for the owner meanwhile.
pub(super) fn as_offboarding_owner<R, E>(
    rel: pg_sys::Oid,
    owner: pg_sys::Oid,
    f: impl FnOnce() -> Result<R, E>,
) -> SealResult<R>
where
    SealError: From<E>,
{
    let _restore = Restore(VISIBLE.with(|v| v.replace(Some((rel, owner)))));
    as_table_owner_pinned(owner, || {
        // No parallel worker, which has no flag, reads the table meanwhile (in
        // `as_table_owner`'s setting level, discarded on return).
        crate::privilege::save_setting(c"max_parallel_workers_per_gather", c"0");
        f()
    })
}

/// `pgseal._offboard_visible(rel) → boolean`: whether an offboarding statement on
/// table `rel` runs now, as its owner (the condition of `org_protect`'s offboarding
/// policies). False for every other table, role and statement, and in a parallel
/// worker (parallel safe, so that the policies leave queries on the table free to
/// run in parallel: the offboarding's own statements run with none).
#[pg_extern(stable, strict, parallel_safe)]
fn _offboard_visible(rel: pg_sys::Oid) -> bool {
    // SAFETY: reads the backend's current user id; no preconditions.
    let user = unsafe { pg_sys::GetUserId() };
    VISIBLE.with(|v| v.get()) == Some((rel, user))
}

/// Forgets the table at every transaction end (it is put back on return anyway).
fn forget(_: crate::txn::End) {
    VISIBLE.with(|v| v.set(None));
}

/// The flag lasts no longer than its transaction.
pub const TXN: crate::txn::Participant = crate::txn::Participant {
    end: Some(forget),
    ..crate::txn::Participant::NONE
};
