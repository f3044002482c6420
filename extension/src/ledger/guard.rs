//! Who may write pgseal's evidence: `pgseal.ledger`, `pgseal.ledger_heads` and
//! `pgseal.ledger_checkpoints`.
//!
//! `pgseal._ledger_write_guard(table)` is a BEFORE ROW trigger on the three tables
//! (ENABLE ALWAYS, so `session_replication_role` does not skip it). It refuses
//! (42501) every row write, superusers' included, except pgseal's own:
//! - `ledger`: INSERT only while pgseal writes appended entries (`Scope::Append`).
//! - `ledger_heads`: INSERT and UPDATE only while pgseal appends or prunes, and the
//!   anchor columns change only while `ledger_prune` runs (`Scope::Prune`): an
//!   anchor is evidence that entries were pruned, never a setting. DELETE never.
//! - `ledger_checkpoints`: INSERT only while `ledger_checkpoint` stores the one it
//!   signed (`Scope::Checkpoint`). UPDATE and DELETE never.
//!
//! - With `pgseal.restore = on` (superuser-only), INSERT into all three is allowed:
//!   that is how pg_restore puts a dump back (README, "Backup and restore").
//!
//! UPDATE and DELETE of ledger rows and TRUNCATE of all three are refused by
//! `_ledger_guard()` (sql/ledger_api.sql), which lets only `ledger_prune`'s deletes
//! and an erasure's updates (`Scope::Erase`, payload and salt for the commitment,
//! nothing else changed) through. A scope is a backend-local flag set around pgseal's own statements
//! (fixed SQL, run as the extension owner), so no SQL a caller sends can be in one.
//!
//! The direct write of entries (`head_write`) fires no trigger: it accepts a
//! table whose only triggers for its write are this guard, and performs the
//! guard's check itself (it is pgseal's append path, and it carries the anchor
//! over unchanged), so the guard does not send every append back to SPI.

use std::cell::Cell;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::SealError;

/// What pgseal is writing right now.
#[derive(Clone, Copy)]
pub enum Scope {
    /// Appended entries and their heads rows (`writer::flush`, a tenant's first heads row).
    Append = 1,
    /// `ledger_prune`: its deletes and the new anchor.
    Prune = 2,
    /// `ledger_checkpoint` storing a checkpoint.
    Checkpoint = 4,
    /// `subject_erase` replacing payloads by their commitments (`erase`).
    Erase = 8,
}

thread_local! {
    static SCOPES: Cell<u8> = const { Cell::new(0) };
    /// The OID of the guard function, once a trigger's function was found to be it.
    static GUARD_FN: Cell<Option<pg_sys::Oid>> = const { Cell::new(None) };
}

struct Restore(u8);

impl Drop for Restore {
    fn drop(&mut self) {
        SCOPES.with(|s| s.set(self.0));
    }
}

/// Runs `f` inside `scope`; the scope ends when `f` returns or unwinds.
pub fn with_scope<R>(scope: Scope, f: impl FnOnce() -> R) -> R {
    let before = SCOPES.with(|s| s.replace(s.get() | scope as u8));
    let _restore = Restore(before);
    f()
}

/// Whether `scope` is active.
pub fn active(scope: Scope) -> bool {
    SCOPES.with(|s| s.get() & scope as u8 != 0)
}

/// The transaction ended (an ERROR may have skipped a scope's end).
pub fn reset() {
    SCOPES.with(|s| s.set(0));
    GUARD_FN.with(|g| g.set(None));
}

/// Whether trigger function `oid` is `pgseal._ledger_write_guard()`: its C entry
/// point is this module's. Remembered until the transaction ends.
pub fn is_guard_fn(oid: pg_sys::Oid) -> bool {
    if GUARD_FN.with(|g| g.get()) == Some(oid) {
        return true;
    }
    // SAFETY: a zeroed FmgrInfo is what fmgr_info fills in; it looks the function
    // up (raising for an OID that names none: a trigger's function always exists)
    // and, for a C function, resolves its address in the loaded library.
    let addr = unsafe {
        let mut finfo: pg_sys::FmgrInfo = std::mem::zeroed();
        pg_sys::fmgr_info(oid, &mut finfo);
        finfo.fn_addr.map(|f| f as usize)
    };
    let ours = addr == Some(ledger_write_guard as *const () as usize);
    if ours {
        GUARD_FN.with(|g| g.set(Some(oid)));
    }
    ours
}

crate::pg::v1_finfo!(pg_finfo_ledger_write_guard);

/// Whether an UPDATE of a heads row keeps its anchor (columns 4 and 5).
///
/// # Safety
/// `td` is the TriggerData of a row UPDATE on `pgseal.ledger_heads`.
unsafe fn anchor_kept(td: &pg_sys::TriggerData) -> bool {
    use crate::pg::head_read::{varlena_bytes, HEADS_COLUMNS};
    // SAFETY: for a row UPDATE, tg_relation's descriptor describes both tuples;
    // heap_deform_tuple fills one datum per attribute, and only the first five
    // are read, after their types were checked. The bytes are compared before
    // the call returns, while both tuples live.
    unsafe {
        let desc = (*td.tg_relation).rd_att;
        let natts = (*desc).natts as usize;
        let attrs = crate::pg::compat::tupdesc_attrs(desc);
        if natts < HEADS_COLUMNS.len()
            || !attrs
                .iter()
                .zip(&HEADS_COLUMNS)
                .all(|(a, t)| !a.attisdropped && a.atttypid == *t)
        {
            return false;
        }
        let deform = |tuple: pg_sys::HeapTuple| {
            let mut values = vec![pg_sys::Datum::from(0usize); natts];
            let mut nulls = vec![true; natts];
            pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            (!nulls[3] && !nulls[4]).then_some(values)
        };
        let (Some(old), Some(new)) = (deform(td.tg_trigtuple), deform(td.tg_newtuple)) else {
            return false;
        };
        old[3].value() == new[3].value() && varlena_bytes(old[4]) == varlena_bytes(new[4])
    }
}

/// `pgseal._ledger_write_guard(table)`, `table` one of 'ledger', 'heads', 'checkpoints'.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn ledger_write_guard(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: PostgreSQL calls this with the trigger's call frame; its context is
    // NULL or a node, whose tag is checked before it is read as TriggerData.
    let td = unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || (*ctx).type_ != pg_sys::NodeTag::T_TriggerData {
            SealError::TriggerProtocol("pgseal._ledger_write_guard() must be called as a trigger")
                .raise()
        }
        &*ctx.cast::<pg_sys::TriggerData>()
    };
    let ev = td.tg_event;
    if ev & pg_sys::TRIGGER_EVENT_TIMINGMASK != pg_sys::TRIGGER_EVENT_BEFORE
        || ev & pg_sys::TRIGGER_EVENT_ROW == 0
    {
        SealError::TriggerProtocol(
            "pgseal._ledger_write_guard() must be a BEFORE ... FOR EACH ROW trigger",
        )
        .raise()
    }
    // SAFETY: tg_trigger is valid for the call, with tgnargs C string arguments.
    let table = unsafe {
        let t = &*td.tg_trigger;
        if t.tgnargs < 1 {
            SealError::TriggerProtocol("pgseal._ledger_write_guard() needs the table's role")
                .raise()
        }
        std::ffi::CStr::from_ptr(*t.tgargs).to_bytes()
    };
    let op = ev & pg_sys::TRIGGER_EVENT_OPMASK;
    // A restore (pg_restore, or psql running a dump) inserts the dumped rows as they
    // are: allowed only with `pgseal.restore = on`, which only a superuser can set.
    // The rows must still verify: their MACs need the restored tenants' keys.
    let restoring = op == pg_sys::TRIGGER_EVENT_INSERT && crate::gucs::restore();
    if restoring && table != b"checkpoints" {
        // A restored row may be past a chain's published head.
        super::shared_heads::restore_wrote();
    }
    let refused = match (table, op) {
        _ if restoring => None,
        (b"ledger", pg_sys::TRIGGER_EVENT_INSERT) => (!active(Scope::Append))
            .then_some("pgseal.ledger is written only by pgseal.ledger_append()"),
        (b"heads", pg_sys::TRIGGER_EVENT_INSERT) => (!active(Scope::Append))
            .then_some("pgseal.ledger_heads is written only by pgseal's ledger functions"),
        (b"heads", pg_sys::TRIGGER_EVENT_UPDATE) => {
            if active(Scope::Prune) {
                None
            } else if !active(Scope::Append) {
                Some("pgseal.ledger_heads is written only by pgseal's ledger functions")
            // SAFETY: a row UPDATE on the heads table, whose trigger data this is.
            } else if !unsafe { anchor_kept(td) } {
                Some("the anchor in pgseal.ledger_heads is changed only by pgseal.ledger_prune()")
            } else {
                None
            }
        }
        (b"checkpoints", pg_sys::TRIGGER_EVENT_INSERT) => (!active(Scope::Checkpoint))
            .then_some("pgseal.ledger_checkpoints is written only by pgseal.ledger_checkpoint()"),
        (b"ledger" | b"heads" | b"checkpoints", _) => {
            Some("pgseal's ledger tables are append-only")
        }
        _ => SealError::TriggerProtocol("pgseal._ledger_write_guard(): unknown table role").raise(),
    };
    if let Some(why) = refused {
        SealError::Forbidden(why).raise()
    }
    // The row goes ahead unchanged: the new row of an UPDATE, else the trigger row.
    let row = if op == pg_sys::TRIGGER_EVENT_UPDATE {
        td.tg_newtuple
    } else {
        td.tg_trigtuple
    };
    pg_sys::Datum::from(row)
}
