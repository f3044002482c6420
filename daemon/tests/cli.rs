//! The command line without a database.

use std::process::Command;

fn pgseald(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pgseald"))
        .args(args)
        .env_remove("PGSEALD_DATABASE_URL")
        .output()
        .unwrap()
}

#[test]
fn help_and_version() {
    let out = pgseald(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("status"));
    let out = pgseald(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn bad_url_is_a_clear_error() {
    let out = pgseald(&["status", "--database-url", "postgres://[::1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid connection string"));
}

#[test]
fn unreachable_database_exits_4() {
    let out = pgseald(&[
        "status",
        "--database-url",
        "host=127.0.0.1 port=1 user=x connect_timeout=2",
    ]);
    assert_eq!(out.status.code(), Some(4));
}

fn config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pgseald-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn run_refuses_a_bad_cron_expression() {
    let p = config(
        "bad-cron.toml",
        "database_url = \"host=127.0.0.1 port=1\"\n[retention]\nschedule = \"every 5 minutes\"\n",
    );
    let out = pgseald(&["run", "--config", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[retention] schedule \"every 5 minutes\" is not a valid cron expression"),
        "{err}"
    );
}

#[test]
fn run_refuses_a_bad_url_or_a_missing_file() {
    let p = config("bad-url.toml", "database_url = \"postgres://[::1\"\n");
    let out = pgseald(&["run", "--config", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid connection string"));
    let out = pgseald(&["run", "--config", "/nonexistent/pgseald.toml"]);
    assert_eq!(out.status.code(), Some(2));
}
