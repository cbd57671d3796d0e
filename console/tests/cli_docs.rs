//! What the Debian package ships from the console's command line: man pages and completions
//! that name every subcommand, and `--log-format json` log lines.

use sendense_tests::cli_docs::{check_docs, json_lines};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_sendense-console");

#[test]
fn man_pages_and_completions_name_every_subcommand() {
    let paths = check_docs(Path::new(BIN));
    for want in [
        &["backups", "list"][..],
        &["backup", "start"],
        &["restore", "start"],
        &["recover", "start"],
        &["recover", "show"],
        &["files", "get"],
        &["verify", "list"],
        &["policy", "create"],
        &["prune"],
    ] {
        assert!(
            paths.iter().any(|p| p == want),
            "{want:?} not among {paths:?}"
        );
    }
}

#[test]
fn log_format_json_turns_every_log_line_into_an_object() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Nothing listens there: the one-shot command logs its attempt (RUST_LOG=debug), then
    // prints its error, which is the user's message, not a log line.
    let port = sendense_tests::net::free_port();
    let out = Command::new(BIN)
        .env("RUST_LOG", "debug")
        .args(["--log-format", "json", "--hub"])
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("--token-file")
        .arg(&token)
        .args(["backups", "list"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let (errors, logs): (Vec<&str>, Vec<&str>) =
        stderr.lines().partition(|l| l.starts_with("error: "));
    assert_eq!(errors.len(), 1, "{stderr}");
    let lines = json_lines(&logs.join("\n"));
    assert!(
        lines.iter().all(|l| l["level"] == "DEBUG"
            || l["level"] == "TRACE"
            || l["level"] == "INFO"
            || l["level"] == "WARN"),
        "{stderr}"
    );
}
