//! The shared-memory queue between backends and the audit writers.
//!
//! One `PgLwLock` guards everything: the launcher's latch, one entry per database
//! that has a writer (or is getting one), and a fixed number of request slots. A
//! request slot carries one ledger entry to append (as JSON, at most `BUF` bytes) and
//! moves through these states:
//!
//! ```text
//! FREE -> QUEUED -> TAKEN -> DONE_OK | DONE_FAILED -> FREE   (a backend waits for it)
//! FREE -> QUEUED -> TAKEN -> FREE                            (nobody waits: latch 0)
//! QUEUED | TAKEN -> ABANDONED -> FREE                         (the waiter gave up)
//! TAKEN -> QUEUED                                             (chain busy; retried)
//! ```
//!
//! Latches are stored as addresses: every latch set here is a PGPROC's own latch,
//! which lives in the main shared memory segment at the same address in every
//! process of the server.

use pgrx::pg_sys;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::PgLwLock;

/// Requests in flight at once, over all databases.
pub const SLOTS: usize = 128;
/// Databases with an audit writer at once.
pub const WRITERS: usize = 16;
/// Bytes of one request (the JSON of one entry: tenant, actor, role, event, payload).
/// Within the argument limits (`limits.rs`) a decrypt's entry takes under 3 KB, or
/// up to six times that when every character needs a JSON escape.
pub const BUF: usize = 8192;

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum State {
    Free = 0,
    Queued,
    Taken,
    DoneOk,
    DoneFailed,
    Abandoned,
}

/// Why a writer could not append a request's entry.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Failure {
    None = 0,
    /// The append raised an error (logged by the writer).
    Error,
    /// The tenant's chain stayed locked by another transaction until the deadline.
    ChainBusy,
    /// No writer could be started for the database.
    NoWriter,
    /// A decrypt's start under a key that has been destroyed (shredded) since the
    /// decrypting transaction's snapshot: refused, not recorded.
    KeyDestroyed,
}

#[derive(Copy, Clone)]
pub struct Slot {
    pub state: State,
    pub failure: Failure,
    pub ticket: u64,
    pub dboid: u32,
    /// The waiting backend's latch; 0 when nobody waits (completion entries).
    pub latch: usize,
    /// The pid of the backend that queued it: a slot of a backend that has exited
    /// is given back (`release_all_of`, and the launcher's sweep).
    pub pid: i32,
    /// Until when (µs, PostgreSQL timestamp) a writer keeps retrying a busy chain.
    pub deadline: i64,
    /// When it was queued (µs).
    pub queued_at: i64,
    /// Not before this time (µs) is a requeued request taken again.
    pub retry_at: i64,
    /// The appended entry's seq, once DoneOk.
    pub seq: i64,
    /// Whether it went to the audit chain (the tenant's chain was busy).
    pub system: bool,
    /// Whether it carries a Citus worker's seal counts (`Request::SealCounts`),
    /// which later counts are merged into while it waits, and which is queued
    /// again when it fails.
    pub counts: bool,
    pub len: u32,
    pub buf: [u8; BUF],
}

impl Slot {
    const EMPTY: Slot = Slot {
        state: State::Free,
        failure: Failure::None,
        ticket: 0,
        dboid: 0,
        latch: 0,
        pid: 0,
        deadline: 0,
        queued_at: 0,
        retry_at: 0,
        seq: 0,
        system: false,
        counts: false,
        len: 0,
        buf: [0; BUF],
    };

    pub fn body(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

#[derive(Copy, Clone, Default)]
pub struct Writer {
    /// The database served; 0 marks a free entry.
    pub dboid: u32,
    /// The writer's pid once it runs; 0 while it is starting.
    pub pid: i32,
    pub latch: usize,
    /// When the launcher asked for it (µs).
    pub requested_at: i64,
}

#[derive(Copy, Clone)]
pub struct Queue {
    pub launcher_pid: i32,
    pub launcher_latch: usize,
    pub next_ticket: u64,
    pub writers: [Writer; WRITERS],
    pub slots: [Slot; SLOTS],
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            launcher_pid: 0,
            launcher_latch: 0,
            next_ticket: 1,
            writers: [Writer::default(); WRITERS],
            slots: [Slot::EMPTY; SLOTS],
        }
    }
}

// SAFETY: Queue is plain old data (integers, byte arrays and latch addresses kept as
// integers), valid in every process that maps the shared memory segment.
unsafe impl PGRXSharedMemory for Queue {}

// SAFETY: the name is unique to pgseal; pg_shmem_init! in _PG_init sets it up.
pub static QUEUE: PgLwLock<Queue> = unsafe { PgLwLock::new(c"pgseal_audit_queue") };

impl Queue {
    pub fn writer_of(&self, dboid: u32) -> Option<&Writer> {
        self.writers.iter().find(|w| w.dboid == dboid)
    }

    pub fn writer_of_mut(&mut self, dboid: u32) -> Option<&mut Writer> {
        self.writers.iter_mut().find(|w| w.dboid == dboid)
    }

    /// Finds the slot holding `ticket`.
    pub fn slot_mut(&mut self, ticket: u64) -> Option<&mut Slot> {
        self.slots
            .iter_mut()
            .find(|s| s.ticket == ticket && s.state != State::Free)
    }

    /// Puts a request in a free slot; returns its ticket, None when every slot is taken.
    pub fn enqueue(&mut self, dboid: u32, latch: usize, deadline: i64, body: &[u8]) -> Option<u64> {
        debug_assert!(body.len() <= BUF);
        let ticket = self.next_ticket;
        let slot = self.slots.iter_mut().find(|s| s.state == State::Free)?;
        self.next_ticket += 1;
        *slot = Slot {
            state: State::Queued,
            ticket,
            dboid,
            latch,
            // SAFETY: MyProcPid is set for every process.
            pid: unsafe { pg_sys::MyProcPid },
            deadline,
            queued_at: now(),
            len: body.len() as u32,
            ..Slot::EMPTY
        };
        slot.buf[..body.len()].copy_from_slice(body);
        Some(ticket)
    }

    /// Gives back what a waiter leaves behind: a request still queued is dropped (no
    /// writer has it), one a writer is appending is marked for the writer to free,
    /// and a finished one is freed.
    pub fn give_up(slot: &mut Slot) {
        slot.state = match slot.state {
            State::Taken => State::Abandoned,
            _ => State::Free,
        };
    }

    /// Gives up every slot that backend `pid` waits on (it is exiting).
    pub fn release_all_of(&mut self, pid: i32) {
        for s in self
            .slots
            .iter_mut()
            .filter(|s| s.pid == pid && s.latch != 0 && s.state != State::Free)
        {
            Queue::give_up(s);
        }
    }

    /// Wakes the writer of `dboid`, or the launcher when there is none yet.
    pub fn wake_for(&self, dboid: u32) {
        match self.writer_of(dboid) {
            Some(w) if w.latch != 0 => set_latch(w.latch),
            _ => set_latch(self.launcher_latch),
        }
    }
}

/// Sets the latch at `addr` (a PGPROC latch, see the module notes); 0 is no latch.
pub fn set_latch(addr: usize) {
    if addr != 0 {
        // SAFETY: addr was taken from MyLatch of a live process, which points into
        // that process's PGPROC in shared memory; PGPROCs are never freed while the
        // server runs, and setting a latch of a process that has exited is harmless.
        unsafe { pg_sys::SetLatch(addr as *mut pg_sys::Latch) };
    }
}

/// This process's latch as an address for the queue.
pub fn my_latch() -> usize {
    // SAFETY: MyLatch is set for every process attached to shared memory.
    unsafe { pg_sys::MyLatch as usize }
}

/// The current time in PostgreSQL's µs timestamps.
pub fn now() -> i64 {
    // SAFETY: GetCurrentTimestamp reads the clock; no preconditions.
    unsafe { pg_sys::GetCurrentTimestamp() }
}
