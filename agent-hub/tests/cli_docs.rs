//! What the Debian package ships from the hub's command line: man pages and completions that
//! name every subcommand, and `--log-format json` logs a shipper can parse line by line.

use sendense_tests::cli_docs::{check_docs, json_lines, run_until_then_term};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_sendense-hub");

#[test]
fn man_pages_and_completions_name_every_subcommand() {
    let paths = check_docs(Path::new(BIN));
    for want in [
        &["node"][..],
        &["node", "enroll"],
        &["node", "revoke"],
        &["check-image"],
    ] {
        assert!(
            paths.iter().any(|p| p == want),
            "{want:?} not among {paths:?}"
        );
    }
}

#[test]
fn log_format_json_writes_one_object_a_line_on_stderr_and_in_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let logs = dir.path().join("logs");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (stderr, status) = run_until_then_term(
        Command::new(BIN)
            .env_remove("SENDENSE_HUB_LOG")
            .env_remove("SENDENSE_HUB_CONFIG")
            .env("SENDENSE_HUB_LOG_FORMAT", "text")
            .arg("--log-format")
            .arg("json")
            .arg("--data-dir")
            .arg(&data)
            .arg("--log-dir")
            .arg(&logs)
            .args(["--listen", "127.0.0.1:0"]),
        "sendense-hub API listening",
    );
    assert!(status.success(), "{status}: {stderr}");
    let lines = json_lines(&stderr);
    let start = lines
        .iter()
        .find(|l| l["message"] == "sendense-hub starting")
        .unwrap_or_else(|| panic!("no start line: {stderr}"));
    assert_eq!(start["level"], "INFO");
    assert_eq!(start["target"], "sendense_hub");
    assert_eq!(
        start["version"],
        sendense_shared::identity::VERSION,
        "{start:?}"
    );
    assert!(start["pid"].is_u64(), "fields at the top level: {start:?}");
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "stop signal received: draining"),
        "{stderr}"
    );
    let file = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("sendense-hub.log"))
        .expect("a daily log file");
    let text = std::fs::read_to_string(&file).unwrap();
    let in_file = json_lines(&text);
    assert!(
        in_file
            .iter()
            .any(|l| l["message"] == "sendense-hub starting"),
        "{text}"
    );
}
