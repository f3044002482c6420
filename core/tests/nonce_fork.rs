//! A process forked while its parent holds nonces fetched ahead (`envelope::seal`)
//! must not seal with the parent's next nonce. PostgreSQL's own children set their
//! process id before any code of pgseal runs, but a language handler's `fork()` in
//! a backend does not: the buffer is checked against the kernel's `getpid`.

use pgseal_core::envelope::{self, Envelope};
use pgseal_core::keys::SecretKey;

fn nonce_of(sealed: &str) -> Vec<u8> {
    Envelope::parse(sealed)
        .expect("a sealed value")
        .nonce()
        .to_vec()
}

#[test]
fn a_forked_child_does_not_seal_with_its_parents_next_nonce() {
    let key = SecretKey::random();
    let cipher = key.cipher();
    // The parent's buffer now holds nonces fetched ahead.
    let first = envelope::seal(&cipher, "t", "kid", None, b"before the fork");
    let mut fds = [0i32; 2];
    // SAFETY: a pipe into a valid two-element array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only seals (memory and one getrandom), writes to the pipe
    // and leaves with _exit, running no destructor or atexit handler of the parent.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let sealed = envelope::seal(&cipher, "t", "kid", None, b"in the child");
        let bytes = sealed.as_bytes();
        // SAFETY: writes the child's bytes to the pipe's write end, then exits.
        unsafe {
            libc::write(fds[1], bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0);
        }
    }
    // SAFETY: the parent closes its copy of the write end.
    unsafe { libc::close(fds[1]) };
    let in_parent = envelope::seal(&cipher, "t", "kid", None, b"in the parent");
    let mut from_child = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        // SAFETY: reads into a valid buffer from the pipe's read end.
        let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n >= 0, "read failed");
        if n == 0 {
            break;
        }
        from_child.extend_from_slice(&buf[..n as usize]);
    }
    let mut status = 0;
    // SAFETY: waits for the child this test forked.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let in_child = String::from_utf8(from_child).expect("the child's sealed value");
    assert_ne!(
        nonce_of(&in_child),
        nonce_of(&in_parent),
        "parent and child sealed with one nonce"
    );
    assert_ne!(nonce_of(&first), nonce_of(&in_parent));
}
