//! `pgseald ledger verify --file`: offline verification of an export, built here
//! from the ledger vectors in docs/FORMAT.md.

use std::path::{Path, PathBuf};
use std::process::Command;

use pgseal_core::checkpoint;
use pgseal_core::keys::SecretKey;
use pgseal_core::ledger::{entry_hash, parse_hash, EntryFields, Hash, GENESIS};
use serde_json::Value;

fn export_lines() -> Vec<Value> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/FORMAT.md")).unwrap();
    let fence = "```jsonl vectors:ledger";
    let start = doc.find(fence).unwrap() + fence.len();
    let end = start + doc[start..].find("```").unwrap();
    doc[start..end]
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            serde_json::json!({
                "tenant_id": v["tenant"], "seq": v["seq"], "recorded_at_us": v["recorded_at_us"],
                "actor": v["actor"], "event": v["event"],
                "payload": serde_json::from_str::<Value>(v["payload"].as_str().unwrap()).unwrap(),
                "prev_hash": v["prev_hash"], "hash": v["hash"], "mac": v["mac"],
            })
        })
        .collect()
}

fn write(name: &str, lines: &[Value]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pgseald-ledger-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
    path
}

fn verify(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgseald"))
        .args(["ledger", "verify"])
        .args(args)
        .env_remove("PGSEALD_DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `pgseald ledger verify` of an export against a checkpoint file and public key.
fn verify_with_checkpoints(
    file: &Path,
    checkpoints: &Path,
    public_key: &str,
) -> (Option<i32>, String) {
    verify(&[
        "--file",
        file.to_str().unwrap(),
        "--checkpoints",
        checkpoints.to_str().unwrap(),
        "--public-key",
        public_key,
    ])
}

#[test]
fn intact_export_verifies() {
    let f = write("intact.jsonl", &export_lines());
    let (code, out) = verify(&["--file", f.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("acme: ok, 3 entries checked"), "{out}");
}

#[test]
fn edited_deleted_or_reordered_entries_fail_with_exit_5() {
    let base = export_lines();
    let mut edited = base.clone();
    edited[1]["payload"]["id"] = 43.into();
    let mut deleted = base.clone();
    deleted.remove(1);
    let mut swapped = base.clone();
    swapped.swap(1, 2);
    for (name, lines, expect) in [
        ("edited", edited, "hash mismatch at seq 2"),
        ("deleted", deleted, "gap at seq 2"),
        ("swapped", swapped, "gap at seq 2"),
    ] {
        let f = write(&format!("{name}.jsonl"), &lines);
        let (code, out) = verify(&["--file", f.to_str().unwrap()]);
        assert_eq!(code, Some(5), "{name}: {out}");
        assert!(out.contains(expect), "{name}: {out}");
    }
}

#[test]
fn checkpoints_catch_a_rewritten_history() {
    let lines = export_lines();
    let master = SecretKey::random();
    let pk = checkpoint::public_key_hex(&master);
    let at = |i: usize| parse_hash(lines[i]["hash"].as_str().unwrap()).unwrap();
    let good = checkpoint::sign(&master, 1, "acme", 3, &at(2), "2026-11-25T00:00:00Z");
    let cps = write("good-cps.jsonl", &[serde_json::to_value(&good).unwrap()]);
    let f = write("export.jsonl", &lines);
    let (code, out) = verify_with_checkpoints(&f, &cps, &pk);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1 checkpoint(s) matched"), "{out}");

    // An auditor's old checkpoint says seq 2 had another hash: history was rewritten
    // (consistently re-hashed, so the chain alone would still look intact).
    let rewritten = checkpoint::sign(&master, 1, "acme", 2, &[0x42; 32], "2026-11-24T00:00:00Z");
    let cps = write(
        "old-cps.jsonl",
        &[serde_json::to_value(&rewritten).unwrap()],
    );
    let (code, out) = verify_with_checkpoints(&f, &cps, &pk);
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("acme: FAILED"), "{out}");
    assert!(out.contains("hash mismatch at seq 2"), "{out}");

    // A checkpoint under another key is refused outright.
    let other = checkpoint::public_key_hex(&SecretKey::random());
    let cps = write("good-cps2.jsonl", &[serde_json::to_value(&good).unwrap()]);
    let (code, out) = verify_with_checkpoints(&f, &cps, &other);
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("valid signature"), "{out}");
}

#[test]
fn unreadable_input_is_a_usage_error() {
    let (code, out) = verify(&["--file", "/nonexistent/export.jsonl"]);
    assert_eq!(code, Some(2), "{out}");
    let f = write("garbage.jsonl", &[serde_json::json!({"not": "an entry"})]);
    let (code, out) = verify(&["--file", f.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("line 1"), "{out}");
}

fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` chained export lines of `tenant` from seq 1, hashed as docs/FORMAT.md says.
fn chain(tenant: &str, n: i64) -> Vec<Value> {
    let mut prev = GENESIS;
    (1..=n)
        .map(|seq| {
            let payload = format!("{{\"order\":{seq}}}");
            let recorded_at_us = 1_795_000_000_000_000 + seq;
            let hash = entry_hash(&EntryFields {
                prev_hash: &prev,
                tenant,
                seq,
                recorded_at_us,
                actor: "alice",
                event: "order.update",
                payload: &payload,
            });
            let line = serde_json::json!({
                "tenant_id": tenant, "seq": seq, "recorded_at_us": recorded_at_us,
                "actor": "alice", "event": "order.update",
                "payload": serde_json::from_str::<Value>(&payload).unwrap(),
                "prev_hash": hex(&prev), "hash": hex(&hash), "mac": hex(&[0; 32]),
            });
            prev = hash;
            line
        })
        .collect()
}

fn hash_of(line: &Value) -> Hash {
    parse_hash(line["hash"].as_str().unwrap()).unwrap()
}

fn cp_file(name: &str, cps: &[checkpoint::Checkpoint]) -> PathBuf {
    let values: Vec<Value> = cps
        .iter()
        .map(|c| serde_json::to_value(c).unwrap())
        .collect();
    write(name, &values)
}

/// Issue 14, hole 2, as written: `cut.jsonl` is the first three lines of an export
/// whose checkpoint is at seq 10.
#[test]
fn a_cut_export_fails_against_a_later_checkpoint() {
    let master = SecretKey::random();
    let pk = checkpoint::public_key_hex(&master);
    let export = chain("acme", 10);
    let cp = checkpoint::sign(
        &master,
        1,
        "acme",
        10,
        &hash_of(&export[9]),
        "2026-12-03T08:00:00Z",
    );
    let cps = cp_file("cps.jsonl", &[cp]);

    let full = write("full.jsonl", &export);
    let (code, out) = verify_with_checkpoints(&full, &cps, &pk);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("acme: ok, 10 entries checked, 1 checkpoint(s) matched"),
        "{out}"
    );

    let cut = write("cut.jsonl", &export[..3]);
    let (code, out) = verify_with_checkpoints(&cut, &cps, &pk);
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("acme: FAILED after 3 entries"), "{out}");
    assert!(
        out.contains("checkpoint at seq 10 lies beyond the last exported entry (seq 3)"),
        "{out}"
    );
}

#[test]
fn a_checkpoint_of_a_tenant_missing_from_the_export_fails_unless_another_tenant_is_asked() {
    let master = SecretKey::random();
    let pk = checkpoint::public_key_hex(&master);
    let export = chain("acme", 4);
    let globex = chain("globex", 2);
    let at = "2026-12-03T08:00:00Z";
    let cps = cp_file(
        "two-tenants-cps.jsonl",
        &[
            checkpoint::sign(&master, 1, "acme", 4, &hash_of(&export[3]), at),
            checkpoint::sign(&master, 1, "globex", 2, &hash_of(&globex[1]), at),
        ],
    );
    let f = write("acme-only.jsonl", &export);
    let (code, out) = verify_with_checkpoints(&f, &cps, &pk);
    assert_eq!(code, Some(5), "{out}");
    assert!(
        out.contains("acme: ok, 4 entries checked, 1 checkpoint(s) matched"),
        "{out}"
    );
    assert!(
        out.contains("globex: FAILED after 0 entries: checkpoint at seq 2, but the export has no entry of this tenant"),
        "{out}"
    );

    // An explicit --tenant limits the check to that tenant, checkpoints included.
    let tenant = |t: &str| {
        verify(&[
            "--file",
            f.to_str().unwrap(),
            "--checkpoints",
            cps.to_str().unwrap(),
            "--public-key",
            &pk,
            "--tenant",
            t,
        ])
    };
    let (code, out) = tenant("acme");
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("globex"), "{out}");
    let (code, out) = tenant("globex");
    assert_eq!(code, Some(5), "{out}");
    assert!(
        out.contains("globex: FAILED") && out.contains("seq 2"),
        "{out}"
    );
    assert!(!out.contains("acme"), "{out}");

    // Checkpoints of other tenants are ignored outright, even one under another key.
    let foreign = checkpoint::sign(
        &SecretKey::random(),
        1,
        "globex",
        2,
        &hash_of(&globex[1]),
        at,
    );
    let cps = cp_file("foreign-cps.jsonl", &[foreign]);
    let (code, out) = verify(&[
        "--file",
        f.to_str().unwrap(),
        "--checkpoints",
        cps.to_str().unwrap(),
        "--public-key",
        &pk,
        "--tenant",
        "acme",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = verify_with_checkpoints(&f, &cps, &pk);
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("tenant globex at seq 2"), "{out}");

    // Both tenants exported: both verify.
    let both = write("both.jsonl", &[export, globex].concat());
    let cps = cp_file(
        "both-cps.jsonl",
        &[checkpoint::sign(
            &master,
            1,
            "globex",
            2,
            &hash_of(&chain("globex", 2)[1]),
            at,
        )],
    );
    let (code, out) = verify_with_checkpoints(&both, &cps, &pk);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("globex: ok, 2 entries checked, 1 checkpoint(s) matched"),
        "{out}"
    );
}

#[test]
fn a_checkpoint_whose_hash_differs_fails_naming_tenant_and_seq() {
    let master = SecretKey::random();
    let pk = checkpoint::public_key_hex(&master);
    let export = chain("acme", 10);
    let at = "2026-12-03T08:00:00Z";
    let cps = cp_file(
        "differs-cps.jsonl",
        &[
            checkpoint::sign(&master, 1, "acme", 10, &hash_of(&export[9]), at),
            checkpoint::sign(
                &master,
                1,
                "acme",
                6,
                &hash_of(&export[5]).map(|b| b ^ 1),
                at,
            ),
        ],
    );
    let f = write("differs.jsonl", &export);
    let (code, out) = verify_with_checkpoints(&f, &cps, &pk);
    assert_eq!(code, Some(5), "{out}");
    assert!(
        out.contains("acme: FAILED after 10 entries: hash mismatch at seq 6"),
        "{out}"
    );

    // An export that starts later (a range, or after pruning) is held to the
    // checkpoint just before its first entry through that entry's prev_hash.
    let range = write("range.jsonl", &export[5..]);
    let (code, out) = verify_with_checkpoints(&range, &cps, &pk);
    assert_eq!(code, Some(5), "{out}");
    assert!(
        out.contains("acme: FAILED after 5 entries: hash mismatch at seq 6"),
        "{out}"
    );
    let cps = cp_file(
        "range-cps.jsonl",
        &[
            checkpoint::sign(&master, 1, "acme", 2, &hash_of(&export[1]), at),
            checkpoint::sign(&master, 1, "acme", 5, &hash_of(&export[4]), at),
            checkpoint::sign(&master, 1, "acme", 10, &hash_of(&export[9]), at),
        ],
    );
    let (code, out) = verify_with_checkpoints(&range, &cps, &pk);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("acme: ok, 5 entries checked, 2 checkpoint(s) matched, 1 checkpoint(s) before the export's first entry not checked"),
        "{out}"
    );
}
