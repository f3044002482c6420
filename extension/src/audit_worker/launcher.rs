//! The audit launcher: the one background worker registered from `_PG_init`. It
//! connects to no database; when a request arrives for a database that has no
//! writer, it starts one (a dynamic background worker bound to that database).

use std::time::Duration;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::pg_guard;
use pgrx::pg_sys;

use super::queue::{self, Failure, State, QUEUE};

/// A writer that has not started this long after it was asked for is given up (µs).
const START_TIMEOUT_US: i64 = 10_000_000;

/// Registers the launcher. Called from `_PG_init` while the postmaster loads
/// `shared_preload_libraries`. It runs once recovery has finished (nothing can be
/// written before), and is restarted 1 s after a crash; after SIGTERM it stays down,
/// and decrypts then fail closed (55000).
pub fn register() {
    BackgroundWorkerBuilder::new("pgseal audit launcher")
        .set_type("pgseal audit launcher")
        .set_function("pgseal_audit_launcher_main")
        .set_library("pgseal")
        .enable_shmem_access(None)
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pgseal_audit_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    {
        let mut q = QUEUE.exclusive();
        // SAFETY: MyProcPid is set for every process.
        q.launcher_pid = unsafe { pg_sys::MyProcPid };
        q.launcher_latch = queue::my_latch();
    }
    // SAFETY: registers a plain function, called once when this process exits.
    unsafe { pg_sys::before_shmem_exit(Some(leave), pg_sys::Datum::from(0)) };
    while BackgroundWorker::wait_latch(Some(Duration::from_millis(500))) {
        sweep();
        start_missing_writers();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn leave(_code: i32, _arg: pg_sys::Datum) {
    let mut q = QUEUE.exclusive();
    q.launcher_pid = 0;
    q.launcher_latch = 0;
}

/// Starts a writer for every database with queued requests and no writer; fails the
/// requests of a database whose writer cannot be started or did not start in time.
fn start_missing_writers() {
    let now = queue::now();
    let mut to_start = Vec::new();
    {
        let mut q = QUEUE.exclusive();
        let waiting: Vec<u32> = q
            .slots
            .iter()
            .filter(|s| s.state == State::Queued)
            .map(|s| s.dboid)
            .collect();
        for db in waiting {
            match q.writer_of(db) {
                Some(w) if w.pid == 0 && now - w.requested_at > START_TIMEOUT_US => {
                    fail_requests(&mut q, db);
                }
                Some(_) => {}
                None => match q.writers.iter_mut().find(|w| w.dboid == 0) {
                    Some(w) => {
                        *w = queue::Writer {
                            dboid: db,
                            pid: 0,
                            latch: 0,
                            requested_at: now,
                        };
                        to_start.push(db);
                    }
                    None => fail_requests(&mut q, db),
                },
            }
        }
    }
    for db in to_start {
        if start_writer(db).is_err() {
            pgrx::log!("pgseal audit launcher: no background worker slot for a writer (max_worker_processes)");
            let mut q = QUEUE.exclusive();
            fail_requests(&mut q, db);
        }
    }
}

/// A slot left behind is given back: one whose waiting backend has exited (a crash
/// of a backend restarts the server; this covers exits that skipped their hooks), and
/// one taken by a writer that is gone (requeued for the next writer).
fn sweep() {
    let mut q = QUEUE.exclusive();
    let live_writers: Vec<u32> = q
        .writers
        .iter()
        .filter(|w| w.pid != 0)
        .map(|w| w.dboid)
        .collect();
    for s in q.slots.iter_mut() {
        let waiter_gone = s.latch != 0 && s.pid != 0 && !process_exists(s.pid);
        match s.state {
            State::Free => {}
            State::DoneOk | State::DoneFailed if waiter_gone => s.state = State::Free,
            State::Queued if waiter_gone => s.state = State::Free,
            State::Taken | State::Abandoned if !live_writers.contains(&s.dboid) => {
                s.state = if s.state == State::Taken && !waiter_gone {
                    State::Queued
                } else {
                    State::Free
                };
            }
            _ => {}
        }
    }
}

fn process_exists(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists (and may be
    // signalled: every backend runs as the same OS user as the launcher).
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Fails every waiting request of `db` with NoWriter and forgets a writer that did
/// not start.
fn fail_requests(q: &mut queue::Queue, db: u32) {
    for s in q
        .slots
        .iter_mut()
        .filter(|s| s.dboid == db && s.state == State::Queued)
    {
        if s.latch == 0 {
            s.state = State::Free;
        } else {
            s.state = State::DoneFailed;
            s.failure = Failure::NoWriter;
            queue::set_latch(s.latch);
        }
    }
    if let Some(w) = q.writer_of_mut(db) {
        if w.pid == 0 {
            *w = queue::Writer::default();
        }
    }
}

fn start_writer(db: u32) -> Result<(), ()> {
    BackgroundWorkerBuilder::new("pgseal audit writer")
        .set_type("pgseal audit writer")
        .set_function("pgseal_audit_writer_main")
        .set_library("pgseal")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_argument(Some(pg_sys::Datum::from(db)))
        .load_dynamic()
        .map(|_| ())
        .map_err(|_| ())
}
