//! The backend's side: handing an entry to the audit writer of this database.
//!
//! - `append_durably` waits until the writer has committed the entry (or fails
//!   closed): it runs before a decrypt returns its plaintext.
//! - `append_later` hands an entry over without waiting: it runs when a transaction
//!   has ended, where nothing may raise an error.

use serde::{Deserialize, Serialize};

use super::queue::{self, Failure, State, QUEUE};
use crate::error::{SealError, SealResult};

/// One ledger entry for a writer to append on a backend's behalf.
#[derive(Serialize, Deserialize, Debug)]
pub struct Entry {
    pub tenant: String,
    pub actor: String,
    /// The database role of the backend the entry is appended for.
    pub role: String,
    pub event: String,
    /// JSON text.
    pub payload: String,
}

fn my_database() -> u32 {
    // SAFETY: MyDatabaseId is a plain global, set once the backend is connected.
    unsafe { pgrx::pg_sys::MyDatabaseId }.to_u32()
}

/// Gives up a request on every way out of the wait (an error, a cancel, a timeout):
/// a finished slot is freed, a pending one is marked for the writer to free.
struct Waiting {
    ticket: Option<u64>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let Some(ticket) = self.ticket else { return };
        let mut q = QUEUE.exclusive();
        if let Some(s) = q.slot_mut(ticket) {
            queue::Queue::give_up(s);
        }
    }
}

/// Appends `entry` through the writer and returns the chain it went to (the tenant's,
/// or the audit chain `_pgseal_audit` when the tenant's was busy) and its seq, once the writer's
/// transaction has committed. Waits at most `timeout_ms` (and honours cancels and
/// `statement_timeout`); fails with 55000 when no writer runs or can be started.
pub fn append_durably(entry: &Entry, timeout_ms: i64) -> SealResult<(String, i64)> {
    let body = serde_json::to_vec(entry).map_err(|_| SealError::Internal("audit entry"))?;
    if body.len() > queue::BUF {
        return Err(SealError::TooLong {
            what: "the decrypt's audit entry (tenant id, actor and context together)",
            max: queue::BUF,
        });
    }
    let db = my_database();
    let deadline = queue::now() + timeout_ms * 1000;
    release_at_exit();
    let mut wait = Waiting { ticket: None };
    loop {
        if let Some((system, seq)) = poll(&mut wait, db, deadline, &body)? {
            let chain = if system {
                crate::ledger::names::AUDIT_CHAIN.to_owned()
            } else {
                entry.tenant.clone()
            };
            return Ok((chain, seq));
        }
        if queue::now() > deadline {
            return Err(SealError::AuditNotRecorded(
                "the pgseal audit writer did not record the decrypt in time (pgseal.audit_decrypt_timeout)",
            ));
        }
        sleep_on_latch(50);
    }
}

/// One look at the queue: enqueues the request if it has no slot yet, and returns
/// (whether it went to the audit chain, its seq) once it is done.
fn poll(
    wait: &mut Waiting,
    db: u32,
    deadline: i64,
    body: &[u8],
) -> SealResult<Option<(bool, i64)>> {
    let mut q = QUEUE.exclusive();
    let writer_runs = q.writer_of(db).is_some_and(|w| w.pid != 0);
    let launcher_runs = q.launcher_pid != 0;
    let Some(ticket) = wait.ticket else {
        if q.launcher_pid == 0 && !writer_runs {
            return Err(SealError::AuditNotRecorded(
                "the pgseal audit worker is not running, so the decrypt cannot be recorded",
            ));
        }
        wait.ticket = q.enqueue(db, queue::my_latch(), deadline, body);
        q.wake_for(db);
        return Ok(None);
    };
    let Some(s) = q.slot_mut(ticket) else {
        return Err(SealError::Internal("audit request slot lost"));
    };
    match s.state {
        State::DoneOk => {
            let done = (s.system, s.seq);
            s.state = State::Free;
            wait.ticket = None;
            Ok(Some(done))
        }
        State::DoneFailed => {
            let failure = s.failure;
            s.state = State::Free;
            wait.ticket = None;
            Err(SealError::AuditNotRecorded(match failure {
                Failure::ChainBusy => "the tenant's ledger stayed locked by another transaction, so the decrypt could not be recorded",
                Failure::NoWriter => "no pgseal audit writer could be started for this database (max_worker_processes?)",
                _ => "the pgseal audit writer failed to record the decrypt (see the server log)",
            }))
        }
        _ if !launcher_runs && !writer_runs => Err(SealError::AuditNotRecorded(
            "the pgseal audit worker is not running, so the decrypt cannot be recorded",
        )),
        _ => Ok(None),
    }
}

thread_local! {
    static EXIT_HOOK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A backend terminated while it waits (FATAL exits without unwinding, so `Waiting`
/// never drops) gives its slots back on its way out.
fn release_at_exit() {
    if EXIT_HOOK.with(|h| h.replace(true)) {
        return;
    }
    // SAFETY: registers a plain function, called once when this process exits.
    unsafe {
        pgrx::pg_sys::before_shmem_exit(Some(release_slots_at_exit), pgrx::pg_sys::Datum::from(0))
    };
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn release_slots_at_exit(_code: i32, _arg: pgrx::pg_sys::Datum) {
    // SAFETY: MyProcPid is set for every process.
    let pid = unsafe { pgrx::pg_sys::MyProcPid };
    QUEUE.exclusive().release_all_of(pid);
}

fn sleep_on_latch(ms: i64) {
    use pgrx::pg_sys;
    // SAFETY: waiting on and resetting this process's own latch; the wait returns on
    // a latch set, the timeout, or exits the process if the postmaster died.
    // CHECK_FOR_INTERRUPTS then raises for a cancel or statement_timeout, which
    // unwinds through `Waiting`.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms as _,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
        pg_sys::check_for_interrupts!();
    }
}

/// Hands `entry` to the writer without waiting; it keeps retrying a busy chain for
/// `retry_ms`. Never raises. Returns false (and logs) when it could not be queued.
pub fn append_later(entry: &Entry, retry_ms: i64) -> bool {
    let Ok(body) = serde_json::to_vec(entry) else {
        return false;
    };
    if body.len() > queue::BUF {
        pgrx::log!(
            "pgseal: a '{}' entry for tenant {} is longer than an audit queue slot and was not recorded",
            entry.event,
            entry.tenant
        );
        return false;
    }
    let queued = {
        let db = my_database();
        let mut q = QUEUE.exclusive();
        let t = q.enqueue(db, 0, queue::now() + retry_ms * 1000, &body);
        q.wake_for(db);
        t.is_some()
    };
    if !queued {
        pgrx::log!(
            "pgseal: the audit queue is full; a '{}' entry for tenant {} was not recorded",
            entry.event,
            entry.tenant
        );
    }
    queued
}
