//! Overwriting the value of `PGSEAL_MASTER_KEY` wherever this process keeps its
//! environment, so that neither `/proc/<pid>/environ` nor the memory of the
//! postmaster and its backends shows it after the key is loaded.
//!
//! There are two copies. The strings the current `environ` array points at: on
//! Linux PostgreSQL's `save_ps_display_args` copied every variable to the heap and
//! repointed `environ` before `_PG_init` runs. And the original block the kernel
//! placed above the stack at exec, which `/proc/<pid>/environ` reads, between
//! `env_start` and `env_end` of `/proc/self/stat` (proc(5)). PostgreSQL may reuse
//! that block for the ps display, so only a place where `NAME=` still stands at
//! the start of an entry is overwritten.

use std::ffi::CStr;

use zeroize::Zeroize;

/// Zeroes the value of every `name=value` entry in both copies. Call in the
/// single-threaded postmaster before `remove_var`, which only unlinks the entry.
pub fn scrub(name: &str) {
    let prefix = format!("{name}=");
    scrub_environ(prefix.as_bytes());
    #[cfg(target_os = "linux")]
    scrub_original_block(prefix.as_bytes());
}

fn scrub_environ(prefix: &[u8]) {
    // SAFETY: `environ` is libc's array of C strings, terminated by NULL; the
    // postmaster is single-threaded here, so nothing changes it while we read.
    let mut entry_ptr = unsafe { libc::environ };
    if entry_ptr.is_null() {
        return;
    }
    loop {
        // SAFETY: `entry_ptr` points into the array, and the loop stops at its NULL.
        let entry = unsafe { *entry_ptr };
        if entry.is_null() {
            break;
        }
        let (len, hit) = {
            // SAFETY: every element is a NUL-terminated string that stays alive
            // while it is in the environment.
            let s = unsafe { CStr::from_ptr(entry) }.to_bytes();
            (s.len(), s.starts_with(prefix))
        };
        if hit {
            // SAFETY: bytes prefix.len()..len are the entry's value, inside the string
            // and before its NUL; the strings are writable (heap copies or the exec
            // block), and no reference to them is alive.
            let value = unsafe {
                std::slice::from_raw_parts_mut(
                    entry.cast::<u8>().add(prefix.len()),
                    len - prefix.len(),
                )
            };
            value.zeroize();
        }
        // SAFETY: `entry` was not the terminating NULL, so a next element exists.
        entry_ptr = unsafe { entry_ptr.add(1) };
    }
}

/// `env_start` and `env_end` of this process: fields 50 and 51 of /proc/self/stat,
/// counted after the `)` that ends the command name (field 2), which may itself
/// hold spaces and parentheses.
#[cfg(target_os = "linux")]
fn original_block() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(50 - 3);
    let start: usize = fields.next()?.parse().ok()?;
    let end: usize = fields.next()?.parse().ok()?;
    // The block is at most the argument limit; anything else is not what we expect.
    (start != 0 && start < end && end - start <= 1 << 24).then_some((start, end))
}

#[cfg(target_os = "linux")]
fn scrub_original_block(prefix: &[u8]) {
    let Some((start, end)) = original_block() else {
        return;
    };
    // SAFETY: the kernel reports [start, end) as this process's exec-time environment
    // block, at the top of the main stack, mapped read-write for the life of the
    // process; no Rust value lives there, and the postmaster is single-threaded.
    let block = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    let mut i = 0;
    while i + prefix.len() <= block.len() {
        let at_entry_start = i == 0 || block[i - 1] == 0;
        if at_entry_start && block[i..].starts_with(prefix) {
            let v = i + prefix.len();
            let stop = block[v..]
                .iter()
                .position(|&b| b == 0)
                .map_or(block.len(), |n| v + n);
            block[v..stop].zeroize();
            i = stop;
        } else {
            i += 1;
        }
    }
}
