//! `pgseald ledger verify --file`: offline verification of an export, built here
//! from the ledger vectors in docs/FORMAT.md.

use std::path::{Path, PathBuf};
use std::process::Command;

use pgseal_core::checkpoint;
use pgseal_core::keys::SecretKey;
use pgseal_core::ledger::parse_hash;
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
