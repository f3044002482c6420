//! Key material hygiene against a real cluster whose master key comes from
//! `PGSEAL_MASTER_KEY`: once loaded, the value is gone from `/proc/<pid>/environ`
//! and from the private memory of the postmaster and of a backend, and a backend
//! that sealed and decrypted holds its keys in a mapping left out of core dumps
//! (and locked in RAM, unless the server logged that the OS refused).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use pgseal_tests::Cluster;

const HEX: &str = "768e655c4189c9734d7caa6bb653fe2353ec82641d45d279ae31e904821d7c29";
const SECRET: &str = "keymem-PLAINTEXT-MARKER";

fn read_proc(pid: u32, file: &str) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/{file}"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/{file} (needs root): {e}"))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether any readable private mapping of `pid` holds `needle`.
fn private_memory_contains(pid: u32, needle: &[u8]) -> bool {
    let maps = String::from_utf8(read_proc(pid, "maps")).unwrap();
    let mut mem = File::open(format!("/proc/{pid}/mem"))
        .unwrap_or_else(|e| panic!("open /proc/{pid}/mem (needs CAP_SYS_PTRACE): {e}"));
    let mut scanned = 0usize;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') || !perms.ends_with('p') {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let a = u64::from_str_radix(a, 16).unwrap();
        let b = u64::from_str_radix(b, 16).unwrap();
        let mut buf = vec![0u8; (b - a) as usize];
        // Some special mappings ([vvar]) cannot be read; they hold no environment.
        if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        scanned += buf.len();
        if contains(&buf, needle) {
            eprintln!("pid {pid}: found in {line}");
            return true;
        }
    }
    assert!(scanned > 0, "read no memory of pid {pid}");
    false
}

/// (address range, VmFlags) of every anonymous mapping (no path, so not [vvar] and
/// the like) that is excluded from core dumps.
fn dontdump_mappings(pid: u32) -> Vec<(String, Vec<String>)> {
    let smaps = String::from_utf8(read_proc(pid, "smaps")).unwrap();
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in smaps.lines() {
        let head = line.split_whitespace().collect::<Vec<_>>();
        if head
            .first()
            .is_some_and(|r| r.contains('-') && !r.ends_with(':'))
        {
            current = (head.len() == 5).then(|| head[0].to_owned());
        } else if let (Some(m), Some(f)) = (&current, line.strip_prefix("VmFlags:")) {
            let flags: Vec<String> = f.split_whitespace().map(str::to_owned).collect();
            if flags.iter().any(|x| x == "dd") {
                out.push((m.clone(), flags));
            }
        }
    }
    out
}

#[test]
fn env_master_key_is_scrubbed_and_keys_are_dontdump_and_locked() {
    let cl = Cluster::start_env_key("keymem", HEX, &[]);
    let mut c = cl.connect();
    c.batch_execute("CREATE EXTENSION pgseal").unwrap();
    let loaded: bool = c
        .query_one("SELECT loaded FROM pgseal.vault_status()", &[])
        .unwrap()
        .get(0);
    assert!(
        loaded,
        "PGSEAL_MASTER_KEY was not loaded; see {}/server.log",
        cl.dir.display()
    );

    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT set_config('app.tenant_id', 'acme', true)", &[])
        .unwrap();
    let sealed: String = tx
        .query_one("SELECT pgseal.vault_seal($1)", &[&SECRET])
        .unwrap()
        .get(0);
    let back: String = tx
        .query_one("SELECT pgseal.vault_decrypt($1)", &[&sealed])
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    assert_eq!(back, SECRET);
    let backend: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let backend = backend as u32;
    let postmaster = cl.postmaster_pid();

    for (who, pid) in [("postmaster", postmaster), ("backend", backend)] {
        let env = read_proc(pid, "environ");
        assert!(
            !contains(&env, HEX.as_bytes()),
            "the master key is in the {who}'s /proc/{pid}/environ"
        );
        assert!(
            !private_memory_contains(pid, HEX.as_bytes()),
            "the master key's hex text is in the {who}'s memory (pid {pid})"
        );
    }

    // The master key ring, made in the postmaster, and the data keys the backend
    // unwrapped (a mapping the postmaster does not have), are in don't-dump
    // mappings; the backend locked both again after its fork.
    let refused = cl.server_log().contains("could not lock key memory");
    let ring = dontdump_mappings(postmaster);
    assert!(
        !ring.is_empty(),
        "no MADV_DONTDUMP mapping in the postmaster (pid {postmaster})"
    );
    let held = dontdump_mappings(backend);
    assert!(
        held.iter().any(|(m, _)| !ring.iter().any(|(r, _)| r == m)),
        "the backend's unwrapped keys are in no MADV_DONTDUMP mapping of its own: {held:?}"
    );
    if !refused {
        for (who, maps) in [("postmaster", &ring), ("backend", &held)] {
            assert!(
                maps.iter().all(|(_, f)| f.iter().any(|x| x == "lo")),
                "a key mapping of the {who} is not locked: {maps:?}"
            );
        }
    }
}
