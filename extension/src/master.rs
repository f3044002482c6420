//! The master key ring, loaded once in the postmaster and inherited by every backend.
//!
//! The key bytes live only in this process's memory: never in a table, a setting,
//! a message or a result. They live in memory that is locked in RAM where the OS
//! allows (`mlock`, again in every backend that uses them) and left out of core
//! dumps (`pgseal_core::keys::Locked`), and they are wiped at process exit. The
//! value of `PGSEAL_MASTER_KEY` is overwritten in the environment (`environ`).

mod environ;

use std::cell::Cell;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgseal_core::keyring::KeyRing;
use pgseal_core::keys::{self, SecretKey};
use zeroize::Zeroizing;

use crate::error::{SealError, SealResult};
use crate::gucs;

pub const ENV_VAR: &str = "PGSEAL_MASTER_KEY";

struct MasterState {
    ring: Option<KeyRing>,
    /// Why no key is loaded, as a fixed phrase safe to show.
    problem: &'static str,
}

static MASTER: Mutex<MasterState> = Mutex::new(MasterState {
    ring: None,
    problem: "no master key source is configured",
});

thread_local! {
    static EXIT_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// Loads the ring from the configured source. Runs in the postmaster from `_PG_init`.
/// Failure is logged as a WARNING and leaves the server running with no key.
pub fn load_at_startup() {
    let (ring, problem) = match read_ring() {
        Ok(r) => (Some(r), ""),
        Err(problem) => {
            pgrx::warning!("pgseal: master key not loaded: {problem}; vault functions will fail with SQLSTATE 55000");
            (None, problem)
        }
    };
    if let Some(r) = &ring {
        // The ring's keys live in locked, dump-excluded memory (`SecretKey`).
        protect_key_memory();
        pgrx::log!("pgseal: master key loaded, versions {:?}", r.versions());
    }
    let mut m = MASTER.lock().unwrap_or_else(|p| p.into_inner());
    LOADED.store(ring.is_some(), Ordering::Relaxed);
    m.ring = ring;
    m.problem = if problem.is_empty() {
        "no master key source is configured"
    } else {
        problem
    };
    drop(m);
    register_exit_wipe();
}

fn read_ring() -> Result<KeyRing, &'static str> {
    // Take the variable out of the environment so that programs the server starts
    // (archive_command, COPY ... PROGRAM) never inherit it, after overwriting its
    // value where it would stay in memory, /proc/<pid>/environ's block included.
    let env_value = match std::env::var(ENV_VAR) {
        Ok(v) => Some(Zeroizing::new(v)),
        Err(std::env::VarError::NotPresent) => None,
        // Not UTF-8, so not 64 hex characters: wipe the copy, fail as malformed.
        Err(std::env::VarError::NotUnicode(raw)) => {
            drop(Zeroizing::new(raw.into_encoded_bytes()));
            Some(Zeroizing::new(String::new()))
        }
    };
    if env_value.is_some() {
        environ::scrub(ENV_VAR);
        // SAFETY: _PG_init runs in the single-threaded postmaster before any other
        // thread could read the environment.
        unsafe { std::env::remove_var(ENV_VAR) };
    }
    if let Some(cmd) = gucs::master_key_command() {
        let cmd = cmd.to_string_lossy().into_owned();
        if !cmd.trim().is_empty() {
            let out = run_key_command(&cmd)?;
            return KeyRing::from_command_output(&out).map_err(|_| "pgseal.master_key_command printed malformed output (expected '<version>:<64 hex>' lines)");
        }
    }
    match env_value {
        Some(v) => {
            KeyRing::from_env_value(&v).map_err(|_| "PGSEAL_MASTER_KEY must be 64 hex characters")
        }
        None => Err("neither pgseal.master_key_command nor PGSEAL_MASTER_KEY is set"),
    }
}

fn run_key_command(cmd: &str) -> Result<Zeroizing<String>, &'static str> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|_| "pgseal.master_key_command could not be started")?;
    let mut out = Zeroizing::new(String::new());
    let read_ok = child
        .stdout
        .take()
        .map(|mut s| s.read_to_string(&mut out).is_ok())
        .unwrap_or(false);
    let status = child
        .wait()
        .map_err(|_| "pgseal.master_key_command could not be waited for")?;
    if !status.success() {
        return Err("pgseal.master_key_command exited with a failure status");
    }
    if !read_ok {
        return Err("pgseal.master_key_command printed output that is not UTF-8");
    }
    Ok(out)
}

static MEMORY_WARNED: AtomicBool = AtomicBool::new(false);

/// Locks every key in this process's memory, which a forked backend must do again,
/// and logs once (per postmaster and its backends) when the OS refuses.
pub fn protect_key_memory() {
    if !keys::protect_process() && !MEMORY_WARNED.swap(true, Ordering::Relaxed) {
        pgrx::log!("pgseal: could not lock key memory in RAM or exclude it from core dumps (see RLIMIT_MEMLOCK); keys may be swapped out");
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn wipe_on_exit(_code: i32, _arg: pg_sys::Datum) {
    if let Ok(mut m) = MASTER.lock() {
        if let Some(r) = m.ring.as_mut() {
            r.clear();
        }
        m.ring = None;
    }
    LOADED.store(false, Ordering::Relaxed);
}

/// Registers the exit wipe once per process. A forked backend loses the
/// postmaster's exit callbacks, so each backend registers its own on first use.
fn register_exit_wipe() {
    EXIT_HOOK.with(|done| {
        if !done.get() {
            // SAFETY: on_proc_exit stores a plain function pointer; wipe_on_exit is
            // 'static and only touches our own Mutex-guarded state.
            unsafe { pg_sys::on_proc_exit(Some(wipe_on_exit), pg_sys::Datum::from(0)) };
            done.set(true);
            protect_key_memory();
        }
    });
}

/// Runs `f` with the ring, or fails with 55000 when no key is loaded.
pub fn with_ring<R>(f: impl FnOnce(&KeyRing) -> SealResult<R>) -> SealResult<R> {
    register_exit_wipe();
    let m = MASTER.lock().unwrap_or_else(|p| p.into_inner());
    match &m.ring {
        Some(r) => f(r),
        None => Err(SealError::MasterKeyNotLoaded { hint: m.problem }),
    }
}

/// The active (version, key) pair: the configured version, else the highest.
pub fn with_active<R>(f: impl FnOnce(u32, &SecretKey) -> SealResult<R>) -> SealResult<R> {
    with_ring(|ring| {
        let pref = gucs::preferred_master_version();
        match ring.active(pref) {
            Some((v, k)) => f(v, k),
            None => Err(SealError::MasterVersionMissing(pref.unwrap_or(0))),
        }
    })
}

/// Set once in the postmaster, inherited by every backend; read without a lock on
/// the decrypt path.
static LOADED: AtomicBool = AtomicBool::new(false);

pub fn is_loaded() -> bool {
    LOADED.load(Ordering::Relaxed)
}

/// Fails with 55000 (and the reason the key is missing) unless a key is loaded.
pub fn require_loaded() -> SealResult<()> {
    if is_loaded() {
        Ok(())
    } else {
        with_ring(|_| Ok(()))
    }
}

/// (loaded, active version, all versions) for `vault_status()`.
pub fn status() -> (bool, Option<i32>, Vec<i32>) {
    let m = MASTER.lock().unwrap_or_else(|p| p.into_inner());
    match &m.ring {
        None => (false, None, vec![]),
        Some(r) => {
            let active = r
                .active(gucs::preferred_master_version())
                .map(|(v, _)| v as i32);
            (
                true,
                active,
                r.versions().into_iter().map(|v| v as i32).collect(),
            )
        }
    }
}
