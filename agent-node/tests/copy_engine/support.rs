//! qcow2 images and qemu-nbd exports for the copy tests.

use agent_node::copy::{
    CopyError, CopyOptions, CopyOutcome, DiskCounters, ExtentSource, copy_disk,
};
use sendense_shared::api::ChunkChecksums;
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient};
use std::path::{Path, PathBuf};
use std::process::Command;
use tokio_util::sync::CancellationToken;

pub const MIB: u64 = 1 << 20;
pub const KIB: u64 = 1 << 10;

pub use sendense_tests::nbd::{QemuNbd, QemuNbdBuilder};

/// Where a test export listens.
pub enum Listen {
    /// `DIR/NAME.sock`.
    Unix,
    /// A free port of 127.0.0.1.
    Tcp,
}

/// qemu-nbd serving `image` (qcow2) as export `name`, on `dir/NAME.sock` or TCP.
pub fn export(dir: &Path, image: &Path, name: &str, listen: Listen) -> QemuNbdBuilder {
    let b = QemuNbd::builder(image, name);
    match listen {
        Listen::Unix => b.unix(dir.join(format!("{name}.sock"))),
        Listen::Tcp => b,
    }
}

/// A writable target export the way the hub serves one.
pub fn target(dir: &Path, image: &Path, listen: Listen) -> QemuNbd {
    export(dir, image, "target", listen)
        .args(&[
            "--cache=none",
            "--aio=threads",
            "--discard=unmap",
            "--detect-zeroes=unmap",
        ])
        .start()
}

/// A read-only source export; `extra` flags (e.g. `--bitmap=NAME`) before the image.
pub fn source(dir: &Path, image: &Path, listen: Listen, extra: &[&str]) -> QemuNbd {
    export(dir, image, "source", listen)
        .read_only()
        .args(extra)
        .start()
}

/// Runs `cmd args`, panicking with its command line and output when it fails; its stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    sendense_tests::run_stdout(Command::new(cmd).args(args))
}

pub fn create(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    sendense_tests::disks::create_qcow2(&p, size);
    p
}

/// `src.qcow2` holding `writes` (qemu-io commands) and an empty `dst.qcow2`, both of `size`
/// bytes, served as source and target on unix sockets: `(dst_img, src, dst)`.
pub fn served_pair(dir: &Path, size: u64, writes: &[String]) -> (PathBuf, QemuNbd, QemuNbd) {
    let src_img = create(dir, "src.qcow2", size);
    if !writes.is_empty() {
        qemu_io(&src_img, writes);
    }
    let dst_img = create(dir, "dst.qcow2", size);
    let src = source(dir, &src_img, Listen::Unix, &[]);
    let dst = target(dir, &dst_img, Listen::Unix);
    (dst_img, src, dst)
}

fn qemu_img_create(args: &[&str]) {
    let mut all = vec!["create", "-q", "-f", "qcow2"];
    all.extend_from_slice(args);
    run("qemu-img", &all);
}

/// A qcow2 overlay `name` on `base` (qcow2), like the hub's incremental image.
pub fn create_overlay(dir: &Path, name: &str, base: &Path) -> PathBuf {
    let p = dir.join(name);
    qemu_img_create(&[
        "-F",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        p.to_str().unwrap(),
    ]);
    p
}

/// The `qemu-img map --output=json` of an image: its text (for messages) and its entries.
pub fn map(image: &Path) -> (String, Vec<serde_json::Value>) {
    let text = run(
        "qemu-img",
        &["map", "--output=json", image.to_str().unwrap()],
    );
    let entries = serde_json::from_str(&text).unwrap();
    (text, entries)
}

/// [`copy_disk`] with fresh counters and no cancellation, as the tests that watch neither run it.
pub async fn copy(
    source: &NbdAddr,
    target: &NbdAddr,
    extents: ExtentSource,
    opts: &CopyOptions,
) -> Result<CopyOutcome, CopyError> {
    copy_disk(
        source,
        target,
        extents,
        opts,
        DiskCounters::new(),
        CancellationToken::new(),
    )
    .await
}

/// Runs qemu-io commands (`write -P 0x11 0 1M`, ...) on a qcow2 image.
pub fn qemu_io(image: &Path, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(image.to_str().unwrap().into());
    let out = run(
        "qemu-io",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(!out.contains("failed"), "qemu-io: {out}");
}

/// `qemu-img compare` (images stopped being served first): true when identical.
pub fn identical(a: &Path, b: &Path) -> bool {
    let st = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
        .arg(a)
        .arg(b)
        .status()
        .expect("qemu-img compare");
    match st.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("qemu-img compare failed: {st}"),
    }
}

/// Reads every checksum range back from `addr` and compares its BLAKE3; also checks that the
/// ranges are ordered, disjoint, and each inside one grid cell. Returns the bytes covered.
pub async fn verify_checksums(addr: &NbdAddr, ck: &ChunkChecksums) -> u64 {
    let c = NbdClient::connect(addr, &ConnectOptions::default())
        .await
        .unwrap();
    for w in ck.ranges.windows(2) {
        assert!(
            w[0].offset + w[0].length <= w[1].offset,
            "ranges overlap or are unordered"
        );
    }
    let mut covered = 0;
    for r in &ck.ranges {
        assert!(r.length > 0);
        assert_eq!(
            r.offset / ck.chunk_size,
            (r.offset + r.length - 1) / ck.chunk_size,
            "range at {} crosses a cell boundary",
            r.offset
        );
        let mut h = blake3::Hasher::new();
        let mut at = r.offset;
        while at < r.offset + r.length {
            let n = (r.offset + r.length - at).min(MIB);
            h.update(&c.read(at, n as u32).await.unwrap());
            at += n;
        }
        assert_eq!(
            h.finalize().to_hex().as_str(),
            r.blake3,
            "range at {}",
            r.offset
        );
        covered += r.length;
    }
    c.disconnect().await.unwrap();
    covered
}
