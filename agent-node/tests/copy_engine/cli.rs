//! `sendense-node copy` as a user runs it.

use crate::support::*;
use std::process::Command;

#[test]
fn copy_command_copies_and_prints_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src_img = create(d, "src.qcow2", 32 * MIB);
    qemu_io(&src_img, &["write -P 0x7 1M 3M".into()]);
    let dst_img = create(d, "dst.qcow2", 32 * MIB);
    let src = source(d, &src_img, Listen::Tcp, &[]);
    let dst = target(d, &dst_img, Listen::Unix);
    let out = Command::new(env!("CARGO_BIN_EXE_sendense-node"))
        .args([
            "copy",
            "--from",
            &src.uri(),
            "--to",
            &dst.uri(),
            "--destination-is-zero",
        ])
        .args([
            "--request-size",
            "512k",
            "--connections",
            "2",
            "--in-flight",
            "8M",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains(&format!("read {} bytes", 3 * MIB)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("skipped {} bytes", 29 * MIB)),
        "{stdout}"
    );
    assert!(stdout.contains("MiB/s"), "{stdout}");
    drop((src, dst));
    assert!(identical(&src_img, &dst_img));

    // A bad URI fails with the option named, and no copy.
    let out = Command::new(env!("CARGO_BIN_EXE_sendense-node"))
        .args([
            "copy",
            "--from",
            "http://x/y",
            "--to",
            "nbd://127.0.0.1:1/z",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--from") && stderr.contains("scheme"),
        "{stderr}"
    );
}
