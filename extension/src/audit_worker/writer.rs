//! The audit writer: one background worker per database, started by the launcher.
//! It appends the queued entries of its database, each in a transaction of its own
//! that it commits before it acknowledges, and exits after a minute without work.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_guard;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::PgTryBuilder;

use super::client::{Entry, Request};
use super::queue::{self, Failure, State, QUEUE};

/// Set in the writer process only: the one process that appends to the audit chain.
static IS_WRITER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set once this writer has seen its SIGTERM (`stopping`).
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this writer has been asked to stop. pgrx's `sigterm_received()` clears
/// the flag it reads, so what it saw is kept here: the main loop and a wait on the
/// coordinator's answer (`pg::libpq::give_up_when`) both read it, and a SIGTERM
/// during a forward ends that wait at once instead of after the answer's deadline.
fn stopping() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    if BackgroundWorker::sigterm_received() {
        STOPPING.store(true, Relaxed);
    }
    STOPPING.load(Relaxed)
}

thread_local! {
    /// Set while `_audit_append_forwarded` appends a Citus worker's entry on the
    /// coordinator, on that writer's behalf.
    static FORWARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this process is an audit writer, or is appending for a worker's writer.
pub fn is_writer() -> bool {
    IS_WRITER.load(std::sync::atomic::Ordering::Relaxed) || FORWARDED.with(|f| f.get())
}

/// A writer with nothing to do for this long exits (µs).
const IDLE_US: i64 = 60_000_000;
/// A busy chain is tried again after this long (µs).
const RETRY_US: i64 = 20_000;
/// How long (µs) an end-of-transaction entry waits for its tenant's chain before it
/// goes to the audit chain.
const UNWAITED_CHAIN_US: i64 = 2_000_000;
/// Seal counts the coordinator did not take are sent again after this long (µs).
const COUNTS_RETRY_US: i64 = 1_000_000;

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pgseal_audit_writer_main(arg: pg_sys::Datum) {
    let dboid = arg.value() as u32;
    IS_WRITER.store(true, std::sync::atomic::Ordering::Relaxed);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(dboid)), None);
    register(dboid);
    configure_session();
    // Counts that prepared transactions left in the outbox table, whose request a
    // restart or a full queue lost, are moved by each writer that starts on a Citus
    // node (and by the next `COMMIT PREPARED`).
    if in_transaction(|| Ok(crate::pg::citus::present())).unwrap_or(false) {
        super::client::drain_seal_counts_later();
    }
    let mut last_work = queue::now();
    let mut worked = false;
    // After work the queue is read again at once, without waiting for the latch: a
    // backend's wake-up that came during the work may have been consumed by it (a
    // lock wait, or Citus's wait for the coordinator, resets this process's latch),
    // and would otherwise wait for the timeout.
    // A SIGTERM is read through `stopping`, which keeps what pgrx's clearing read
    // saw (`wait_latch` reads and clears it too, and then returns false): a SIGTERM
    // read and lost once kept a writer with a busy entry to retry waiting for the
    // entry's whole retry window (60 s).
    crate::pg::libpq::give_up_when(stopping);
    loop {
        if stopping() {
            break;
        }
        if !worked && !BackgroundWorker::wait_latch(Some(Duration::from_millis(500))) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reads postgresql.conf in this process, as the docs of
            // background workers prescribe after SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        worked = process(dboid);
        if worked {
            last_work = queue::now();
        } else if queue::now() - last_work > IDLE_US && retire(dboid) {
            break;
        }
    }
}

/// Enters this process as the writer of `dboid` and arranges that it leaves that
/// entry on every exit.
fn register(dboid: u32) {
    {
        let mut q = QUEUE.exclusive();
        // SAFETY: MyProcPid is set for every process.
        let pid = unsafe { pg_sys::MyProcPid };
        let latch = queue::my_latch();
        match q.writer_of_mut(dboid) {
            Some(w) => {
                w.pid = pid;
                w.latch = latch;
            }
            None => {
                if let Some(w) = q.writers.iter_mut().find(|w| w.dboid == 0) {
                    *w = queue::Writer {
                        dboid,
                        pid,
                        latch,
                        requested_at: queue::now(),
                    };
                }
            }
        }
    }
    // SAFETY: registers a plain function, called once when this process exits.
    unsafe { pg_sys::before_shmem_exit(Some(unregister), pg_sys::Datum::from(dboid)) };
}

#[pg_guard]
unsafe extern "C-unwind" fn unregister(_code: i32, arg: pg_sys::Datum) {
    let dboid = arg.value() as u32;
    // SAFETY: MyProcPid is set for every process.
    let pid = unsafe { pg_sys::MyProcPid };
    let mut q = QUEUE.exclusive();
    if let Some(w) = q.writer_of_mut(dboid) {
        if w.pid == pid {
            *w = queue::Writer::default();
        }
    }
}

/// Leaves the writer's entry when no request of its database is pending.
fn retire(dboid: u32) -> bool {
    let mut q = QUEUE.exclusive();
    let pending = q
        .slots
        .iter()
        .any(|s| s.dboid == dboid && matches!(s.state, State::Queued | State::Taken));
    if pending {
        return false;
    }
    if let Some(w) = q.writer_of_mut(dboid) {
        *w = queue::Writer::default();
    }
    true
}

/// Settings of the writer's session that the server's or the database's
/// configuration must not change: a database set read-only by default, with a short
/// statement timeout or another isolation level must not stop the audit or change
/// what it reads, and no role's objects are on its search path. (That an
/// acknowledged entry survives a crash is each transaction's: `in_transaction`.)
fn configure_session() {
    use crate::privilege::set_setting;
    use pg_sys::GucAction::GUC_ACTION_SET;
    // Nothing the writer parses resolves a name through a schema a role can create
    // objects in (its SQL runs as the owner under a pinned path too; this covers
    // anything outside that).
    set_setting(c"search_path", c"pg_catalog, pg_temp", GUC_ACTION_SET);
    set_setting(c"default_transaction_read_only", c"off", GUC_ACTION_SET);
    set_setting(c"statement_timeout", c"0", GUC_ACTION_SET);
    // `drain_seal_counts` reads the outbox with a snapshot taken after its check for
    // prepared transactions: each statement its own snapshot.
    set_setting(
        c"default_transaction_isolation",
        c"read committed",
        GUC_ACTION_SET,
    );
}

/// Takes the ready requests of `dboid` and appends each; true when there were any.
fn process(dboid: u32) -> bool {
    let now = queue::now();
    // A backend waiting for its entry takes the audit chain at once when the
    // tenant's is busy; an end-of-transaction count waits for the tenant's chain
    // (the transaction that just ended may still hold it) for `UNWAITED_CHAIN_US`,
    // then takes the audit chain too: a chain held longer (any role can hold its
    // own tenant's) must not keep counts in the queue, whose slots every database
    // shares.
    let batch: Vec<(u64, Vec<u8>, bool, LastTry)> = {
        let mut q = QUEUE.exclusive();
        q.slots
            .iter_mut()
            .filter(|s| s.dboid == dboid && s.state == State::Queued && s.retry_at <= now)
            .map(|s| {
                s.state = State::Taken;
                let system_ok = s.latch != 0
                    || now + RETRY_US >= s.deadline
                    || now >= s.queued_at + UNWAITED_CHAIN_US;
                // An unwaited request is tried until its deadline (`finish`).
                let last_try = if s.latch == 0 {
                    LastTry::From(s.deadline - COUNTS_RETRY_US)
                } else {
                    LastTry::Never
                };
                (s.ticket, s.body().to_vec(), system_ok, last_try)
            })
            .collect()
    };
    for (ticket, body, system_ok, last_try) in &batch {
        let outcome = match serde_json::from_slice::<Request>(body) {
            Ok(Request::Append(entry)) => append(&entry, *system_ok, *last_try),
            Ok(Request::SealCounts { key_ids, seals }) => add_seal_counts(&key_ids, &seals),
            Ok(Request::DrainSealCounts) => drain_seal_counts(),
            Err(_) => Outcome::Failed("malformed audit request".into()),
        };
        finish(*ticket, outcome);
    }
    !batch.is_empty()
}

/// When a request's try is its last (a failure is then not tried again).
#[derive(Clone, Copy)]
enum LastTry {
    /// A request someone waits for: its failure is answered at once.
    Never,
    /// An unwaited request: a try that starts at this time (`queue::now`) or later
    /// is its last before its deadline.
    From(i64),
    /// A request forwarded by a Citus worker, which does not send it again.
    Always,
}

impl LastTry {
    fn now(self) -> bool {
        match self {
            LastTry::Never => false,
            LastTry::From(at) => queue::now() >= at,
            LastTry::Always => true,
        }
    }
}

enum Outcome {
    /// (in the audit chain, seq)
    Appended(bool, i64),
    /// A decrypt's start under a destroyed key: refused, nothing recorded.
    KeyDestroyed,
    Busy,
    /// Done for now; asked again in `COUNTS_RETRY_US` (`drain_seal_counts`).
    Again,
    Failed(String),
    /// Failed before anything could be recorded: a local append whose transaction
    /// aborted, or a forward that failed before its statement was sent (tried
    /// again for a request nobody waits for; a failure after sending is not, since
    /// the coordinator may have recorded it).
    Unsent(String),
}

/// Appends one entry in a transaction of its own. Another transaction holding the
/// tenant's chain is not waited for (that would stall every other request, and the
/// holder may be the very backend waiting for this entry): with `system_ok` the
/// entry goes to the audit chain `_pgseal_audit` instead (its payload names the
/// tenant), which only this database's writer appends to; otherwise back to the
/// queue.
///
/// On a Citus worker the entry is appended on the coordinator, where pgseal's ledger
/// is kept (docs/SCALING.md): `forward`.
fn append(e: &Entry, system_ok: bool, last_try: LastTry) -> Outcome {
    let forwarded = std::cell::Cell::new(false);
    let destroyed = std::cell::Cell::new(false);
    let r = in_transaction(|| {
        if start_under_destroyed_key(e)? {
            destroyed.set(true);
            return Ok(Ok(None));
        }
        if crate::pg::citus::is_worker()? {
            forwarded.set(true);
            return Ok(forward(e, system_ok));
        }
        append_here(e, system_ok, last_try).map(Ok)
    });
    match r {
        Ok(Ok(None)) if destroyed.get() => Outcome::KeyDestroyed,
        Ok(Ok(Some((in_system, seq)))) => Outcome::Appended(in_system, seq),
        Ok(Ok(None)) => Outcome::Busy,
        Ok(Err(msg)) | Err(msg) if forwarded.get() && super::coordinator::last_was_sent() => {
            Outcome::Failed(msg)
        }
        Ok(Err(msg)) | Err(msg) => Outcome::Unsent(msg),
    }
}

/// Whether `e` is a decrypt's start under a key that is destroyed now. The
/// decrypting backend read the key as committed when it read it (or, in parallel
/// mode or through a Citus text statement, under its statement's snapshot), and a
/// shred may have committed since: the writer's transaction reads it as it is, and
/// the decrypt is refused (22023) before its plaintext returns, as a decrypt that
/// reads the key after the shred is.
fn start_under_destroyed_key(e: &Entry) -> crate::error::SealResult<bool> {
    if e.event != "vault.decrypt_started" {
        return Ok(false);
    }
    let Some(key_id) = key_id_of(e) else {
        return Ok(false);
    };
    Ok(crate::keystore::fetch(&key_id)?
        .is_some_and(|k| k.state == crate::keystore::KeyState::Destroyed))
}

/// The key a decrypt record names (its payload's `key_id`).
fn key_id_of(e: &Entry) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(&e.payload)
        .ok()
        .and_then(|p| p.get("key_id")?.as_str().map(str::to_owned))
}

/// `append`'s work on the node that keeps the ledger: (in the audit chain, seq), or
/// None when the chains it may use are busy.
fn append_here(
    e: &Entry,
    system_ok: bool,
    last_try: LastTry,
) -> crate::error::SealResult<Option<(bool, i64)>> {
    let system = crate::ledger::names::AUDIT_CHAIN;
    // Each chain's key before its lock, as every append takes them, and neither
    // waited for: a key or a chain another transaction holds counts as busy.
    let free = |chain: &str| -> crate::error::SealResult<bool> {
        Ok(crate::ledger::mac::available_without_waiting(chain)?
            && crate::locks::ledger_tenant_try(chain))
    };
    let chain = if free(&e.tenant)? {
        e.tenant.as_str()
    } else if system_ok && free(system)? {
        system
    } else {
        return Ok(None);
    };
    let (seq, _) =
        crate::ledger::append::append_with_role(chain, &e.event, &e.payload, &e.actor, &e.role)?;
    erase_late_record(e, chain == system, seq, last_try)?;
    Ok(Some((chain == system, seq)))
}

/// A decrypt's count can arrive after the tenant's offboarding erased its payloads
/// (its transaction was open across the shred, or the writer retried it):
/// `offboard::erase_if_offboarded` erases it, in a subtransaction after the entry
/// is written. When that fails, the count is tried again, and its last try records
/// it with its payload (logged) rather than lose it: the count is evidence. (A
/// start never needs it: one under a destroyed key is refused.)
fn erase_late_record(
    e: &Entry,
    in_audit_chain: bool,
    seq: i64,
    last_try: LastTry,
) -> crate::error::SealResult<()> {
    if e.event != "vault.decrypt" || !crate::offboard::past_erase_step(&e.tenant)? {
        return Ok(());
    }
    let Some(key_id) = key_id_of(e) else {
        return Ok(());
    };
    crate::ledger::writer::flush()?;
    let erased = crate::pg::xact::in_subtransaction(|| {
        crate::offboard::erase_if_offboarded(&e.tenant, &key_id, in_audit_chain, seq)
    });
    match erased {
        Ok(()) => Ok(()),
        Err(f) if last_try.now() => {
            pgrx::log!(
                "pgseal audit writer: a decrypt count of tenant {:?} (seq {seq}{}) keeps its payload: erasing it for the tenant's offboarding failed on its last try: {}",
                e.tenant,
                if in_audit_chain { " of the audit chain" } else { "" },
                f.message()
            );
            Ok(())
        }
        Err(f) => f.raise(),
    }
}

/// Appends `e` on the Citus coordinator: `pgseal._audit_append_forwarded` there, over
/// the writer's connection to it (`coordinator`), in a transaction of its own that
/// commits before it answers, so the entry is durable there when this returns
/// Ok(Some).
fn forward(e: &Entry, system_ok: bool) -> Result<Option<(bool, i64)>, String> {
    let row = super::coordinator::query_row(
        c"SELECT pgseal._audit_append_forwarded($1, $2, $3, $4, $5, $6::pg_catalog.bool)",
        &[
            &e.tenant,
            &e.event,
            &e.payload,
            &e.actor,
            &e.role,
            if system_ok { "t" } else { "f" },
        ],
    )
    .map_err(|err| format!("the coordinator did not record the entry: {err}"))?;
    match row.first() {
        Some(Some(result)) => parse_forwarded(result)
            .ok_or_else(|| "the coordinator answered the forwarded entry unexpectedly".to_owned()),
        _ => Err("the coordinator answered the forwarded entry unexpectedly".to_owned()),
    }
}

/// Adds a Citus worker's seal counts to the key table: on the coordinator through
/// `pgseal._seal_counts_forwarded` (a worker cannot write the reference table
/// itself while Citus runs a shard's statement in its transaction), here otherwise.
fn add_seal_counts(key_ids: &[String], seals: &[i64]) -> Outcome {
    let r = in_transaction(|| add_counts_in_transaction(key_ids, seals));
    match r {
        Ok(Ok(())) => Outcome::Appended(false, 0),
        Ok(Err(msg)) | Err(msg) => Outcome::Failed(msg),
    }
}

/// `add_seal_counts`'s work inside the writer's transaction: on a worker, the
/// coordinator's answer (Err: its message); elsewhere, the key table updated here.
fn add_counts_in_transaction(
    key_ids: &[String],
    seals: &[i64],
) -> crate::error::SealResult<Result<(), String>> {
    if crate::pg::citus::is_worker()? {
        return Ok(forward_seal_counts(key_ids, seals));
    }
    crate::keystore::add_encryptions(key_ids.to_vec(), seals.to_vec(), vec![None; seals.len()])
        .map(Ok)
}

/// Moves the seal counts that this Citus worker's prepared transactions left in
/// `pgseal._seal_counts_outbox` (`cache::write_seal_counts`) to the key table on the
/// coordinator, in one transaction that deletes them here only once the coordinator
/// has taken them (a failure leaves them for the next try; an answer lost after the
/// coordinator committed counts them twice, the safe direction). A prepared
/// transaction's rows appear when it commits, whichever session commits it, and
/// never if it is rolled back; so while this database has prepared transactions,
/// whose rows may still appear, the request is asked again every
/// `COUNTS_RETRY_US`. The check comes before the rows are read, so rows that appear
/// after the read belong to a transaction the check saw prepared.
fn drain_seal_counts() -> Outcome {
    let r = in_transaction(|| {
        let prepared = Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_xacts p \
                             WHERE p.database OPERATOR(pg_catalog.=) pg_catalog.current_database())",
        )?
        .unwrap_or(true);
        let (ids, seals): (Vec<String>, Vec<i64>) = Spi::connect_mut(|c| {
            let rows = c.update(
                "WITH d AS (DELETE FROM pgseal._seal_counts_outbox RETURNING key_id, seals) \
                 SELECT d.key_id, pg_catalog.sum(d.seals)::pg_catalog.int8 FROM d GROUP BY d.key_id",
                None,
                &[],
            )?;
            let mut out = Vec::new();
            for row in rows {
                if let (Some(id), Some(n)) = (row.get::<String>(1)?, row.get::<i64>(2)?) {
                    out.push((id, n));
                }
            }
            Ok::<_, pgrx::spi::Error>(out)
        })?
        .into_iter()
        .unzip();
        let added = if ids.is_empty() {
            Ok(())
        } else {
            add_counts_in_transaction(&ids, &seals)?
        };
        // A failure must take the deletes back: an error, so the transaction aborts.
        if let Err(msg) = added {
            pgrx::log!("pgseal audit writer: {msg}");
            return Err(crate::error::SealError::Refused(
                "the seal counts were not added; they stay in pgseal._seal_counts_outbox",
            ));
        }
        Ok(prepared)
    });
    match r {
        Ok(true) => Outcome::Again,
        Ok(false) => Outcome::Appended(false, 0),
        Err(msg) => Outcome::Failed(msg),
    }
}

/// Sends the counts to the coordinator, over the writer's connection to it
/// (`coordinator`), in a `DO` block whose `lock_timeout` Citus sends on to every
/// node the update reaches (see `_seal_counts_forwarded`). The writer waits 10 s
/// for the answer; an answer lost after the update committed (or later than that)
/// makes the writer send the counts again, and they are then counted twice (the
/// safe direction for the encryption limit). The block turns
/// propagation on with `set_config` (a `SET LOCAL` of it would count, where
/// propagation is already on server-wide, as a setting sent to the workers, and
/// pgseal's owner statements would then be refused). A `DO` block takes no
/// parameters: the key ids, checked to be what the key table allows
/// (`keys::is_valid_key_id`: letters, digits, `_`, `-`), and the counts (integers)
/// are written into its text.
fn forward_seal_counts(key_ids: &[String], seals: &[i64]) -> Result<(), String> {
    if !key_ids
        .iter()
        .all(|id| pgseal_core::keys::is_valid_key_id(id))
    {
        return Err("a seal count names a malformed key id".to_owned());
    }
    let block = seal_counts_block(key_ids, seals);
    let block = std::ffi::CString::new(block).map_err(|_| "a seal count's block".to_owned())?;
    super::coordinator::execute(&block)
        .map_err(|err| format!("the coordinator did not add the seal counts: {err}"))
}

/// The `DO` block of `forward_seal_counts` (its key ids already checked).
fn seal_counts_block(key_ids: &[String], seals: &[i64]) -> String {
    let ids: Vec<String> = key_ids.iter().map(|id| format!("'{id}'")).collect();
    let counts: Vec<String> = seals.iter().map(i64::to_string).collect();
    format!(
        "DO $pgseal$ BEGIN PERFORM pg_catalog.set_config('citus.propagate_set_commands', 'local', true); \
         SET LOCAL lock_timeout = '2s'; \
         PERFORM pgseal._seal_counts_forwarded(ARRAY[{}]::pg_catalog.text[], ARRAY[{}]::pg_catalog.int8[]); END $pgseal$",
        ids.join(","),
        counts.join(",")
    )
}

/// `pgseal._seal_counts_forwarded(key_ids, seals)`: a Citus worker's audit writer
/// adds the seals made on its node to the keys' counts here, on the coordinator.
/// Superuser only (a count only ever grows, but a role could otherwise push a key
/// to its limit): no role is granted it, and it checks.
#[pg_extern(volatile, parallel_unsafe)]
fn _seal_counts_forwarded(key_ids: Vec<String>, seals: Vec<i64>) {
    use crate::error::{OrRaise, SealError};
    // SAFETY: superuser() reads the current user's role attributes; no preconditions
    // inside a transaction.
    if !unsafe { pg_sys::superuser() } {
        Err::<(), _>(SealError::Forbidden(
            "only a superuser (a Citus worker's audit writer) adds forwarded seal counts",
        ))
        .or_raise();
    }
    crate::pg::xact::require_read_write("_seal_counts_forwarded").or_raise();
    // A key row held by another transaction (a rotation, a prepared transaction)
    // must not hold up the worker's audit writer, which waits for this call: give
    // up after 2 s, and the worker sends the counts again later. The writer calls
    // it in a `DO` block that has set the same `lock_timeout` with `SET LOCAL` and
    // propagation on, so Citus sends it to every node it updates (it propagates no
    // `SET LOCAL` of a function's own statements outside a block); this covers the
    // waits on this node whoever calls.
    let timeout: crate::error::SealResult<()> =
        Spi::run("SELECT pg_catalog.set_config('lock_timeout', '2s', true)").map_err(Into::into);
    timeout.or_raise();
    if key_ids.len() != seals.len() || seals.iter().any(|&n| n < 0) {
        Err::<(), _>(SealError::InvalidArgument(
            "key_ids and seals must be arrays of the same length, with no negative count",
        ))
        .or_raise();
    }
    // The worker deletes its outbox rows once this answers: flushed here also with
    // `synchronous_commit = off` configured, as `_audit_append_forwarded` is.
    durable_commit();
    let n = seals.len();
    crate::keystore::add_encryptions(key_ids, seals, vec![None; n]).or_raise();
}

/// `_audit_append_forwarded`'s answer: `busy`, or `<in audit chain t|f>:<seq>`.
fn parse_forwarded(result: &str) -> Option<Option<(bool, i64)>> {
    if result == "busy" {
        return Some(None);
    }
    let (system, seq) = result.split_once(':')?;
    let system = match system {
        "t" => true,
        "f" => false,
        _ => return None,
    };
    Some(Some((system, seq.parse().ok()?)))
}

/// `pgseal._audit_append_forwarded(tenant, event, payload, actor, db_role,
/// system_ok)`: a Citus worker's audit writer appends its entry here, on the
/// coordinator, as `append` would (the tenant's chain, else with `system_ok` the
/// audit chain, else `busy`), in the calling connection's transaction, which
/// commits before the worker reads the answer. Superuser only (it records any role
/// and pgseal's reserved events): no role is granted it, and it checks.
#[pg_extern(volatile, parallel_unsafe)]
fn _audit_append_forwarded(
    tenant: &str,
    event: &str,
    payload: &str,
    actor: &str,
    db_role: &str,
    system_ok: bool,
) -> String {
    use crate::error::OrRaise;
    // SAFETY: superuser() reads the current user's role attributes; no preconditions
    // inside a transaction.
    if !unsafe { pg_sys::superuser() } {
        Err::<(), _>(crate::error::SealError::Forbidden(
            "only a superuser (a Citus worker's audit writer) appends forwarded audit entries",
        ))
        .or_raise();
    }
    crate::pg::xact::require_read_write("_audit_append_forwarded").or_raise();
    // The worker's writer acknowledges the entry once this answers, which is after
    // this transaction commits: with `synchronous_commit = off` configured here the
    // commit is flushed all the same (as in the writer's own session).
    durable_commit();
    let e = Entry {
        tenant: tenant.to_owned(),
        actor: actor.to_owned(),
        role: db_role.to_owned(),
        event: event.to_owned(),
        payload: payload.to_owned(),
    };
    /// Clears `FORWARDED` however the append ends (an ERROR unwinds through it).
    struct Forwarding;
    impl Drop for Forwarding {
        fn drop(&mut self) {
            FORWARDED.with(|f| f.set(false));
        }
    }
    FORWARDED.with(|f| f.set(true));
    let forwarding = Forwarding;
    // The worker does not send a request again once it was sent: this is its
    // last try.
    let r = append_here(&e, system_ok, LastTry::Always);
    drop(forwarding);
    match r.or_raise() {
        None => "busy".to_owned(),
        Some((system, seq)) => format!("{}:{seq}", if system { "t" } else { "f" }),
    }
}

/// Makes the current transaction's commit wait for its local flush when
/// `synchronous_commit` is `off` (a stronger setting is left as it is).
fn durable_commit() {
    use crate::privilege::{set_setting, setting_is};
    if setting_is(c"synchronous_commit", b"off") {
        set_setting(
            c"synchronous_commit",
            c"local",
            pg_sys::GucAction::GUC_ACTION_LOCAL,
        );
    }
}

/// Runs `f` in a transaction and commits it; an error (from `f` or from the commit)
/// aborts the transaction and is returned as its message. The commit is flushed
/// locally before this returns, also when `synchronous_commit = off` is configured
/// (checked in each transaction: a reload may set it after the writer started), since
/// an entry it appends is acknowledged once this returns and must survive a crash.
fn in_transaction<R>(f: impl FnOnce() -> crate::error::SealResult<R>) -> Result<R, String> {
    // SAFETY: starts a transaction with a snapshot, as BackgroundWorker::transaction
    // does; it is committed or aborted below before this function returns.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    durable_commit();
    let r = PgTryBuilder::new(AssertUnwindSafe(|| match f() {
        Ok(v) => {
            // SAFETY: pops the snapshot pushed above and commits; an ERROR in the
            // commit is caught below.
            unsafe {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Ok(v)
        }
        Err(e) => Err(e.to_string()),
    }))
    .catch_others(|e| {
        Err(match e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r.message().to_owned(),
            CaughtError::RustPanic { ereport, .. } => ereport.message().to_owned(),
        })
    })
    .execute();
    if r.is_err() {
        // SAFETY: the transaction started above is still open (the error came before
        // or during its commit); aborting it releases its locks and snapshot.
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    r
}

/// Puts a request the writer took back in the queue, to be tried again in `after_us`
/// (one given up meanwhile, no longer Taken, is freed).
fn requeue(s: &mut queue::Slot, after_us: i64) {
    if s.state == State::Taken {
        s.state = State::Queued;
        s.retry_at = queue::now() + after_us;
    } else {
        s.state = State::Free;
    }
}

/// Records the outcome in the request's slot and wakes its backend.
fn finish(ticket: u64, outcome: Outcome) {
    let mut q = QUEUE.exclusive();
    let Some(s) = q.slot_mut(ticket) else { return };
    let nobody_waits = s.latch == 0 || s.state == State::Abandoned;
    let failure = match outcome {
        Outcome::Appended(in_system, seq) => {
            s.seq = seq;
            s.system = in_system;
            None
        }
        Outcome::KeyDestroyed => Some(Failure::KeyDestroyed),
        Outcome::Busy if queue::now() < s.deadline => return requeue(s, RETRY_US),
        Outcome::Busy => Some(Failure::ChainBusy),
        Outcome::Again => return requeue(s, COUNTS_RETRY_US),
        // A request nobody waits for (a transaction's decrypt count) that failed
        // before anything was recorded is tried again until its deadline, as a busy
        // chain's is: on a Citus worker a coordinator restarting or unreachable for
        // a moment must not lose the counts of the transactions that ended
        // meanwhile (one that failed after it was sent may be on record there, and
        // is not sent twice). Logged once.
        Outcome::Unsent(msg)
            if s.latch == 0
                && !s.counts
                && s.state == State::Taken
                && queue::now() < s.deadline =>
        {
            if s.failure != Failure::Error {
                pgrx::log!("pgseal audit writer: an end-of-transaction request could not be completed, and is tried again until its deadline: {msg}");
                s.failure = Failure::Error;
            }
            return requeue(s, COUNTS_RETRY_US);
        }
        Outcome::Failed(msg) | Outcome::Unsent(msg) => {
            pgrx::log!("pgseal audit writer: a request could not be completed: {msg}");
            Some(Failure::Error)
        }
    };
    // A Citus worker's seal counts the coordinator did not take are tried again
    // (later counts are merged into them meanwhile), not dropped.
    if s.counts && failure.is_some() && s.state == State::Taken {
        s.state = State::Queued;
        s.retry_at = queue::now() + COUNTS_RETRY_US;
        return;
    }
    if nobody_waits {
        if failure.is_some() && s.latch == 0 {
            pgrx::log!("pgseal audit writer: an end-of-transaction request (a decrypt count, or a Citus worker's seal counts) was not recorded");
        }
        s.state = State::Free;
        return;
    }
    match failure {
        None => s.state = State::DoneOk,
        Some(f) => {
            s.state = State::DoneFailed;
            s.failure = f;
        }
    }
    queue::set_latch(s.latch);
}
