//! The command line without a database.

use std::process::Command;

fn pgseald(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pgseald")).args(args).env_remove("PGSEALD_DATABASE_URL").output().unwrap()
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
    let out = pgseald(&["status", "--database-url", "host=127.0.0.1 port=1 user=x connect_timeout=2"]);
    assert_eq!(out.status.code(), Some(4));
}
