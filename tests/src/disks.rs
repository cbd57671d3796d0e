//! Source disks with known data, and the tools a test uses to write and compare them:
//! `qemu-img`, `qemu-io`, `nbdcopy`.

use crate::run;
use std::path::Path;
use std::process::Command;

/// A fresh qcow2 of `size` bytes virtual.
pub fn create_qcow2(path: &Path, size: u64) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string()));
}

/// Writes `len` bytes of `pattern` at `offset` into a qcow2 (qemu-io, `write -P`).
pub fn write_pattern(path: &Path, offset: u64, len: u64, pattern: u8) {
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P 0x{pattern:02x} {offset} {len}"))
        .arg(path));
}

/// Writes zeroes at `offset` (qemu-io, `write -z`).
pub fn write_zeroes(path: &Path, offset: u64, len: u64) {
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -z {offset} {len}"))
        .arg(path));
}

/// Copies a qcow2 image into an NBD export with `nbdcopy`, reading the source through a
/// private read-only qemu-nbd that nbdcopy runs itself (no second listening port).
pub fn nbdcopy_into(src: &Path, uri: &str) -> std::process::Output {
    let mut cmd = Command::new("nbdcopy");
    cmd.arg("--")
        .args(["[", "qemu-nbd", "-r", "-f", "qcow2"])
        .arg(src)
        .arg("]")
        .arg(uri);
    run(&mut cmd)
}

/// `qemu-img compare` of two images (content, not format): true when equal.
pub fn images_equal(a: &Path, b: &Path) -> bool {
    compare(&[], a, b)
}

/// `qemu-img compare` of a raw file (a disk at an instant) with a qcow2 image: true when equal.
/// The formats are given because a raw file's first bytes could look like any format.
pub fn raw_equals_qcow2(raw: &Path, image: &Path) -> bool {
    compare(&["-f", "raw", "-F", "qcow2"], raw, image)
}

fn compare(formats: &[&str], a: &Path, b: &Path) -> bool {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["compare", "-U"]).args(formats).arg(a).arg(b);
    eprintln!("+ {}", crate::describe(&cmd));
    let out = cmd.output().expect("qemu-img compare");
    eprintln!(
        "  {} {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out.status.code() == Some(0)
}

/// `qemu-img info --output=json` of an image (with `-U`: it may be open elsewhere).
pub fn info(path: &Path) -> serde_json::Value {
    let out = run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path));
    serde_json::from_slice(&out.stdout).expect("qemu-img info JSON")
}

/// The whole virtual content of an image (via `qemu-img convert -O raw`), for computing the
/// checksums a writer would report. Meant for the small disks of tests.
pub fn read_raw(path: &Path) -> Vec<u8> {
    let tmp = tempfile::NamedTempFile::new().expect("temp file");
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(path)
        .arg(tmp.path()));
    std::fs::read(tmp.path()).expect("read raw image")
}
