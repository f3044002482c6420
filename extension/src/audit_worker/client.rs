//! The backend's side: handing an entry to the audit writer of this database.
//!
//! - `append_durably` waits until the writer has committed the entry (or fails
//!   closed): it runs before a decrypt returns its plaintext.
//! - `append_later` hands an entry over without waiting: it runs when a transaction
//!   has ended, where nothing may raise an error.
//! - `seal_counts_later` hands a Citus worker's seal counts over without waiting, for
//!   the writer to add to the key table's counts on the coordinator;
//!   `drain_seal_counts_later` asks it to move those that prepared transactions
//!   left in the node's outbox table.

use serde::{Deserialize, Serialize};

use super::queue::{self, Failure, State, QUEUE};
use crate::error::{SealError, SealResult};

/// One ledger entry for a writer to append on a backend's behalf.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Entry {
    pub tenant: String,
    pub actor: String,
    /// The database role of the backend the entry is appended for.
    pub role: String,
    pub event: String,
    /// JSON text.
    pub payload: String,
}

/// What a backend asks of the writer (a slot's body, as JSON).
#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// A ledger entry to append.
    Append(Entry),
    /// Seals made on a Citus worker, per key: added to `pgseal.tenant_keys.encryptions`
    /// on the coordinator, which Citus writes to every copy of the table.
    SealCounts {
        key_ids: Vec<String>,
        seals: Vec<i64>,
    },
    /// Seal counts a Citus worker's prepared transactions left in this node's
    /// `pgseal._seal_counts_outbox`: added on the coordinator once those
    /// transactions have committed (`writer::drain_seal_counts`).
    DrainSealCounts,
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
    let body = serde_json::to_vec(&Request::Append(entry.clone()))
        .map_err(|_| SealError::Internal("audit entry"))?;
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
            if failure == Failure::KeyDestroyed {
                return Err(SealError::KeyDestroyed);
            }
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
    let Ok(body) = serde_json::to_vec(&Request::Append(entry.clone())) else {
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
    let queued = enqueue_unwaited(&body, retry_ms);
    if !queued {
        pgrx::log!(
            "pgseal: the audit queue is full; a {:?} entry for tenant {:?} was not recorded",
            entry.event,
            entry.tenant
        );
    }
    queued
}

/// Queues `body` for the writer of this database, nobody waiting for it.
fn enqueue_unwaited(body: &[u8], retry_ms: i64) -> bool {
    let db = my_database();
    let mut q = QUEUE.exclusive();
    let t = q.enqueue(db, 0, queue::now() + retry_ms * 1000, body);
    q.wake_for(db);
    t.is_some()
}

/// Hands seal counts (per key id) made in this Citus worker's transaction to the
/// writer, which adds them on the coordinator; does not wait. Counts are merged into
/// a request of this database that still waits in the queue, so sealing
/// transactions take one slot between them rather than one each, however fast they
/// come; a request the coordinator did not take is queued again (`writer::finish`).
/// Never raises: counts with no room in the queue are logged (the worker's
/// shared-memory total still has them until it restarts; docs/SCALING.md).
pub fn seal_counts_later(key_ids: &[String], seals: &[i64]) {
    for (ids, n) in key_ids
        .chunks(KEYS_PER_REQUEST)
        .zip(seals.chunks(KEYS_PER_REQUEST))
    {
        if !queue_seal_counts(ids, n) {
            pgrx::log!(
                "pgseal: the seal counts of {} keys could not be queued for the coordinator",
                ids.len()
            );
        }
    }
}

/// Keys per `SealCounts` request of one transaction: 200 key ids of pgseal's 16
/// characters with their counts take under 6 KB of JSON, within a slot
/// (`queue::BUF`).
const KEYS_PER_REQUEST: usize = 200;

/// Merges the counts into this database's waiting request, or queues a request of
/// their own when there is none or it is full; false when no slot was free.
fn queue_seal_counts(key_ids: &[String], seals: &[i64]) -> bool {
    let db = my_database();
    let mut q = QUEUE.exclusive();
    let waiting = q
        .slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.dboid == db && s.counts && s.state == State::Queued)
        .find_map(|(i, s)| match serde_json::from_slice::<Request>(s.body()) {
            Ok(Request::SealCounts { key_ids, seals }) => Some((i, key_ids, seals)),
            _ => None,
        });
    let mut merged: Vec<(String, i64)> = Vec::new();
    let mut into = None;
    if let Some((i, key_ids, seals)) = waiting {
        merged = key_ids.into_iter().zip(seals).collect();
        into = Some(i);
    }
    for (id, n) in key_ids.iter().zip(seals) {
        match merged.iter_mut().find(|(k, _)| k == id) {
            Some((_, m)) => *m = m.saturating_add(*n),
            None => merged.push((id.clone(), *n)),
        }
    }
    let (ids, counts): (Vec<String>, Vec<i64>) = merged.into_iter().unzip();
    let request = Request::SealCounts {
        key_ids: ids,
        seals: counts,
    };
    let body = serde_json::to_vec(&request).ok();
    let stored = match (body, into) {
        (Some(body), Some(i)) if body.len() <= queue::BUF => {
            let slot = &mut q.slots[i];
            slot.buf[..body.len()].copy_from_slice(&body);
            slot.len = body.len() as u32;
            true
        }
        // The waiting request is full: these counts go in a request of their own.
        _ => {
            let own = Request::SealCounts {
                key_ids: key_ids.to_vec(),
                seals: seals.to_vec(),
            };
            match serde_json::to_vec(&own) {
                Ok(body) if body.len() <= queue::BUF => {
                    match q.enqueue(db, 0, queue::now(), &body) {
                        Some(ticket) => {
                            if let Some(s) = q.slot_mut(ticket) {
                                s.counts = true;
                            }
                            true
                        }
                        None => false,
                    }
                }
                _ => false,
            }
        }
    };
    q.wake_for(db);
    stored
}

/// Asks this database's writer to move the seal counts that this Citus worker's
/// prepared transactions left in `pgseal._seal_counts_outbox` (`cache`), without
/// waiting: one request of this database waits for them at a time (a request still
/// queued takes this one in). Never raises: with no free slot it is logged, and the
/// counts wait in the table for the next request.
pub fn drain_seal_counts_later() {
    let db = my_database();
    let is_drain = |s: &queue::Slot| {
        s.dboid == db
            && s.counts
            && s.state == State::Queued
            && matches!(
                serde_json::from_slice::<Request>(s.body()),
                Ok(Request::DrainSealCounts)
            )
    };
    // Asked for already (the writer runs it when it is due): a shared look, so that
    // the `COMMIT PREPARED`s of a busy node do not queue on the exclusive lock.
    if QUEUE.share().slots.iter().any(is_drain) {
        return;
    }
    let mut q = QUEUE.exclusive();
    if !q.slots.iter().any(is_drain) {
        let body = serde_json::to_vec(&Request::DrainSealCounts).expect("a unit request");
        match q.enqueue(db, 0, queue::now(), &body) {
            Some(ticket) => {
                if let Some(s) = q.slot_mut(ticket) {
                    s.counts = true;
                }
            }
            None => pgrx::log!(
                "pgseal: the audit queue is full; seal counts of prepared transactions wait in pgseal._seal_counts_outbox"
            ),
        }
    }
    q.wake_for(db);
}

thread_local! {
    /// Whether Citus is installed in this session's database, as first seen by
    /// `prepared_committed` (a catalog lookup it would otherwise make at every
    /// `COMMIT PREPARED`; Citus is not installed or dropped under a running node).
    static CITUS_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// A `COMMIT PREPARED` has just committed in this session: on a Citus node, the
/// seal counts the prepared transaction may have left in the outbox table appear
/// now, so the writer is asked to move them (`drain_seal_counts_later`). This also
/// moves counts whose earlier request was lost (a restart, a full queue).
pub fn prepared_committed() {
    let citus = CITUS_HERE.with(|c| match c.get() {
        Some(known) => known,
        None => {
            let here = crate::pg::citus::present();
            c.set(Some(here));
            here
        }
    });
    if citus {
        drain_seal_counts_later();
    }
}
