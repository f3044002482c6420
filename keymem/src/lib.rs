//! pgseal-keymem: memory for key material: page-aligned anonymous mappings that are
//! locked in RAM (`mlock`: never written to swap) and left out of core dumps
//! (`MADV_DONTDUMP`).
//!
//! This is the only unsafe code of pgseal's crypto core (`mmap`, `mlock`, `madvise`
//! and the raw slots behind [`Locked`]). It is a crate of its own so that
//! `pgseal-core` can `#![forbid(unsafe_code)]`; `pgseal-core` re-exports [`Locked`]
//! and [`protect_process`] as `pgseal_core::keys::{Locked, protect_process}`, the
//! paths the rest of pgseal uses. Every unsafe block states why it is sound in a
//! `// SAFETY:` note (the workspace denies `clippy::undocumented_unsafe_blocks`).
//!
//! Every `pgseal_core::keys::SecretKey` and every cached cipher lives in a fixed-size
//! slot of such a mapping. A slot is zeroed when its value is dropped, then reused;
//! mappings are never unmapped, so their number is bounded by the most keys a
//! process held at once.
//!
//! Memory locks do not survive `fork(2)` (a PostgreSQL backend is a fork of the
//! postmaster); the don't-dump mark does. So every allocation first locks all
//! mappings again when the process id changed, and [`protect_process`] does it on
//! demand. Failing to lock (`RLIMIT_MEMLOCK`) never fails an allocation: it is
//! reported by [`protect_process`] for the caller to log.

use std::marker::PhantomData;
use std::mem::{align_of, size_of, MaybeUninit};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

use zeroize::Zeroize;

/// Every slot is a multiple of this many bytes and starts on such a boundary.
const SLOT_ALIGN: usize = 64;
/// A new mapping holds at least this many slots.
const SLOTS_PER_MAP: usize = 16;

/// Free slots of one size, as addresses.
struct Pool {
    slot: usize,
    free: Vec<usize>,
}

struct Arena {
    /// The process in which every mapping was last locked (0: none yet).
    locked_pid: u32,
    /// Some mapping could not be locked in `locked_pid`.
    lock_failed: bool,
    /// Some mapping could not be excluded from core dumps (inherited by forks).
    dump_failed: bool,
    /// (address, length) of every mapping.
    maps: Vec<(usize, usize)>,
    pools: Vec<Pool>,
}

static ARENA: Mutex<Arena> = Mutex::new(Arena {
    locked_pid: 0,
    lock_failed: false,
    dump_failed: false,
    maps: Vec::new(),
    pools: Vec::new(),
});

fn arena() -> MutexGuard<'static, Arena> {
    // Nothing panics between the changes of one critical section, so a poisoned
    // arena is still consistent.
    ARENA.lock().unwrap_or_else(|p| p.into_inner())
}

fn page_size() -> usize {
    // SAFETY: sysconf only reads a constant of the running system.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// Pins `[addr, addr + len)` in RAM; false when the OS refuses.
fn lock(addr: usize, len: usize) -> bool {
    // SAFETY: the range is one of the arena's own live mappings; mlock only pins its
    // pages and changes no byte.
    unsafe { libc::mlock(addr as *const libc::c_void, len) == 0 }
}

/// A new zeroed mapping of `len` bytes and whether it is excluded from core dumps.
fn map(len: usize) -> (usize, bool) {
    // SAFETY: an anonymous private mapping at an address the kernel chooses overlaps
    // no existing memory; the result is checked against MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        panic!("pgseal: out of memory for key storage");
    }
    #[cfg(target_os = "linux")]
    // SAFETY: `p` is the mapping of `len` bytes just created; madvise only sets its
    // don't-dump flag.
    let dump_excluded = unsafe { libc::madvise(p, len, libc::MADV_DONTDUMP) == 0 };
    #[cfg(not(target_os = "linux"))]
    let dump_excluded = false;
    (p as usize, dump_excluded)
}

impl Arena {
    fn relock_if_forked(&mut self) {
        let pid = std::process::id();
        if self.locked_pid == pid {
            return;
        }
        self.locked_pid = pid;
        self.lock_failed = false;
        for &(addr, len) in &self.maps {
            self.lock_failed |= !lock(addr, len);
        }
    }

    fn take(&mut self, slot: usize) -> usize {
        self.relock_if_forked();
        let i = match self.pools.iter().position(|p| p.slot == slot) {
            Some(i) => i,
            None => {
                self.pools.push(Pool {
                    slot,
                    free: Vec::new(),
                });
                self.pools.len() - 1
            }
        };
        if self.pools[i].free.is_empty() {
            let len = (slot * SLOTS_PER_MAP).next_multiple_of(page_size());
            let (addr, dump_excluded) = map(len);
            self.dump_failed |= !dump_excluded;
            self.lock_failed |= !lock(addr, len);
            self.maps.push((addr, len));
            let free = &mut self.pools[i].free;
            free.extend((0..len / slot).rev().map(|k| addr + k * slot));
        }
        self.pools[i]
            .free
            .pop()
            .expect("a new mapping has free slots")
    }

    fn give_back(&mut self, slot: usize, addr: usize) {
        if let Some(p) = self.pools.iter_mut().find(|p| p.slot == slot) {
            p.free.push(addr);
        }
    }
}

/// Locks every key mapping in this process (again, after a fork) and reports
/// whether all of them are locked in RAM and excluded from core dumps.
pub fn protect_process() -> bool {
    let mut a = arena();
    a.relock_if_forked();
    !(a.lock_failed || a.dump_failed)
}

/// A `T` kept in locked, dump-excluded memory, zeroed when dropped. Like a `Box`.
pub struct Locked<T> {
    ptr: NonNull<T>,
    _owns: PhantomData<T>,
}

// SAFETY: a Locked<T> owns its T exclusively, as Box<T> does; the arena behind it
// is guarded by a Mutex.
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: as above; &Locked<T> only hands out &T.
unsafe impl<T: Sync> Sync for Locked<T> {}

impl<T> Locked<T> {
    const SLOT: usize = {
        assert!(
            align_of::<T>() <= SLOT_ALIGN,
            "type too strictly aligned for a key slot"
        );
        let n = if size_of::<T>() == 0 {
            1
        } else {
            size_of::<T>()
        };
        n.next_multiple_of(SLOT_ALIGN)
    };

    /// Moves the value `make` returns into a slot, then zeroes the stack copy it
    /// passed through. (Copies the compiler makes inside `make` are beyond reach.)
    pub fn new_with(make: impl FnOnce() -> T) -> Self {
        let mut tmp = MaybeUninit::new(make());
        let ptr = arena().take(Self::SLOT) as *mut T;
        // SAFETY: `ptr` is a free slot of SLOT >= size_of::<T>() bytes, aligned to
        // SLOT_ALIGN >= align_of::<T>(), now ours alone; `tmp` holds a T, which moves
        // bitwise and is never used as a T again (MaybeUninit does not drop it).
        unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr(), ptr, 1) };
        tmp.zeroize();
        Locked {
            ptr: NonNull::new(ptr).expect("slot addresses are not null"),
            _owns: PhantomData,
        }
    }

    /// Address of the slot, for tests and diagnostics.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
}

impl<T> Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the slot holds a live T owned by `self` for as long as `self` lives.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in deref, and `&mut self` makes this the only reference.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T: Clone> Clone for Locked<T> {
    fn clone(&self) -> Self {
        Locked::new_with(|| (**self).clone())
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        let p = self.ptr.as_ptr();
        // SAFETY: the slot holds a live T owned by `self`; it is dropped once, here.
        unsafe { std::ptr::drop_in_place(p) };
        // SAFETY: the slot is SLOT bytes of an arena mapping that no longer hold a T;
        // MaybeUninit<u8> accepts any bytes, and nothing else refers to them.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(p.cast::<MaybeUninit<u8>>(), Self::SLOT) };
        bytes.zeroize();
        arena().give_back(Self::SLOT, p as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A size no other test uses, so that no other thread reuses the slot meanwhile.
    type Probe = [u8; 200];

    #[test]
    fn a_dropped_slot_is_zeroed_and_reused() {
        let v = Locked::<Probe>::new_with(|| [0xAB; 200]);
        assert_eq!(v[199], 0xAB);
        let addr = v.addr();
        assert_eq!(addr % SLOT_ALIGN, 0);
        drop(v);
        for i in 0..Locked::<Probe>::SLOT {
            // SAFETY: the slot stays mapped after the drop; volatile, so the read
            // really happens.
            let b = unsafe { std::ptr::read_volatile((addr + i) as *const u8) };
            assert_eq!(b, 0, "byte {i} of a freed slot");
        }
        let again = Locked::<Probe>::new_with(|| [1; 200]);
        assert_eq!(again.addr(), addr);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_mapping_is_dontdump_and_locked_where_allowed() {
        let v = Locked::<[u8; 32]>::new_with(|| [7; 32]);
        let all = protect_process();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut flags = None;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = a <= v.addr() && v.addr() < b;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(f) = line.strip_prefix("VmFlags:") {
                    flags = Some(f.split_whitespace().map(str::to_owned).collect::<Vec<_>>());
                }
            }
        }
        let flags = flags.expect("the slot's mapping is in smaps");
        assert!(flags.iter().any(|f| f == "dd"), "{flags:?}");
        if all {
            assert!(flags.iter().any(|f| f == "lo"), "{flags:?}");
        }
    }
}
