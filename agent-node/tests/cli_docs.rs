//! What the Debian package ships from the node's command line: man pages and completions that
//! name every subcommand, and `--log-format json` logs a shipper can parse line by line.

use sendense_tests::cli_docs::{check_docs, json_lines, run_until_then_term};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_sendense-node");

#[test]
fn man_pages_and_completions_name_every_subcommand() {
    let paths = check_docs(Path::new(BIN));
    for want in [
        &["serve"][..],
        &["copy"],
        &["tunnel"],
        &["tunnel", "authorized-key"],
    ] {
        assert!(
            paths.iter().any(|p| p == want),
            "{want:?} not among {paths:?}"
        );
    }
}

#[test]
fn log_format_json_writes_one_object_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let run = dir.path().join("run");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"n1\"\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\nrun_dir = \"{}\"\n",
            token.display(),
            run.display()
        ),
    )
    .unwrap();
    let (stderr, status) = run_until_then_term(
        Command::new(BIN)
            .env_remove("RUST_LOG")
            .env("SENDENSE_NODE_LOG_FORMAT", "json")
            .arg("--config")
            .arg(&config),
        "node serving",
    );
    assert!(status.success(), "{status}: {stderr}");
    let lines = json_lines(&stderr);
    let serving = lines
        .iter()
        .find(|l| l["message"] == "node serving")
        .unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(serving["level"], "INFO");
    assert_eq!(
        serving["name"], "n1",
        "fields at the top level: {serving:?}"
    );
    assert!(
        serving["target"]
            .as_str()
            .unwrap()
            .starts_with("agent_node"),
        "{serving:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "shutting down: cancelling jobs, releasing snapshots"),
        "{stderr}"
    );
}
