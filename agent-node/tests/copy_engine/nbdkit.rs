//! A second server implementation: nbdkit's `sparse-random` plugin as the source (random data
//! runs between holes) and its `memory` plugin as the target, both advertising multi-conn, so
//! the copy spreads over several connections.

use crate::support::*;
use agent_node::copy::{CopyOptions, ExtentSource};
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// nbdkit in the foreground on a unix socket; killed by PID and reaped on drop.
struct Nbdkit {
    child: Child,
    addr: NbdAddr,
    uri: String,
}

impl Nbdkit {
    fn start(dir: &Path, name: &str, plugin_args: &[&str]) -> Nbdkit {
        let sock = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "--exit-with-parent", "-e", name, "-U"])
            .arg(&sock)
            .args(plugin_args)
            .stdin(Stdio::null());
        eprintln!("spawning {cmd:?}");
        let mut child = cmd.spawn().expect("spawn nbdkit");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("nbdkit exited early: {st}");
            }
            assert!(Instant::now() < deadline, "nbdkit did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
        Nbdkit {
            child,
            addr: NbdAddr::Unix {
                path: sock,
                export: name.into(),
            },
            uri,
        }
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn copies_between_nbdkit_servers_over_several_connections() {
    let dir = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    let src = Nbdkit::start(
        dir.path(),
        "src",
        &[
            "sparse-random",
            "size=256M",
            "seed=4242",
            "percent=25",
            "runlength=2097152",
        ],
    );
    let dst = Nbdkit::start(dir.path(), "dst", &["memory", "size=256M"]);
    for a in [&src.addr, &dst.addr] {
        let c = NbdClient::connect(a, &ConnectOptions::default())
            .await
            .unwrap();
        assert!(
            c.can_multi_conn(),
            "{a} must offer multi-conn for this test"
        );
        c.disconnect().await.unwrap();
    }
    let opts = CopyOptions {
        connections: 4,
        target_is_zero: true,
        ..Default::default()
    };
    let out = copy(&src.addr, &dst.addr, ExtentSource::Allocation, &opts)
        .await
        .unwrap();
    assert!(out.bytes_read > 0 && out.bytes_read < size, "{out:?}");
    assert!(out.bytes_skipped > 0, "the random holes are skipped");
    assert_eq!(
        out.bytes_written + out.bytes_zeroed + out.bytes_skipped,
        size
    );
    // Pieces came back out of order over four connections; the ranges still match.
    assert_eq!(
        verify_checksums(&dst.addr, &out.checksums).await,
        out.bytes_written + out.bytes_zeroed
    );
    // Both servers are still up: compare the exports themselves.
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &src.uri, &dst.uri])
        .output()
        .unwrap();
    assert!(cmp.status.success(), "{cmp:?}");
}

/// A server without structured replies grants no `base:allocation`: the copy reads every
/// block, finds the holes by looking at the bytes, and writes them as zeroes.
#[tokio::test]
async fn a_source_without_block_status_is_copied_whole() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let src = Nbdkit::start(
        dir.path(),
        "src",
        &[
            "--no-sr",
            "sparse-random",
            "size=64M",
            "seed=7",
            "percent=30",
            "runlength=1048576",
        ],
    );
    let dst = Nbdkit::start(dir.path(), "dst", &["memory", "size=64M"]);
    let probe = NbdClient::connect(&src.addr, &ConnectOptions::default())
        .await
        .unwrap();
    assert!(!probe.structured_replies());
    probe.disconnect().await.unwrap();
    let opts = CopyOptions {
        target_is_zero: true,
        ..Default::default()
    };
    let out = copy(&src.addr, &dst.addr, ExtentSource::Allocation, &opts)
        .await
        .unwrap();
    assert_eq!(out.bytes_read, size, "no block status: everything is read");
    assert_eq!(out.bytes_skipped, 0);
    assert!(out.bytes_zeroed > 0 && out.bytes_written > 0, "{out:?}");
    assert_eq!(out.bytes_written + out.bytes_zeroed, size);
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &src.uri, &dst.uri])
        .output()
        .unwrap();
    assert!(cmp.status.success(), "{cmp:?}");
}

/// 16 MiB qcow2 source: 2 MiB of data at 1 MiB, the rest holes.
fn small_source(dir: &Path) -> (std::path::PathBuf, QemuNbd) {
    let img = create(dir, "src.qcow2", 16 * MIB);
    qemu_io(&img, &["write -P 0x61 1M 2M".into()]);
    let exp = source(dir, &img, Listen::Unix, &[]);
    (img, exp)
}

/// A target without WRITE_ZEROES (nbdkit's nozero filter): zeroes go out as ordinary writes.
#[tokio::test]
async fn zeroes_are_written_as_data_where_the_target_cannot_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (_img, src) = small_source(dir.path());
    // The pattern plugin under a copy-on-write overlay: a writable disk that starts non-zero,
    // so that a missed zero range shows in the comparison.
    let dst = Nbdkit::start(
        dir.path(),
        "dst",
        &["--filter=nozero", "--filter=cow", "pattern", "size=16M"],
    );
    let probe = NbdClient::connect(&dst.addr, &ConnectOptions::default())
        .await
        .unwrap();
    assert!(!probe.can_write_zeroes() && !probe.read_only());
    probe.disconnect().await.unwrap();
    let out = copy(
        &src.addr,
        &dst.addr,
        ExtentSource::Allocation,
        &CopyOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(out.bytes_read, 2 * MIB);
    assert_eq!(out.bytes_written, 2 * MIB);
    assert_eq!(out.bytes_zeroed, 14 * MIB);
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&_img)
        .arg(&dst.uri)
        .output()
        .unwrap();
    drop(src);
    assert!(cmp.status.success(), "{cmp:?}");
}

/// A target that fails writes (nbdkit's error filter): the copy fails with the server's errno
/// and the range.
#[tokio::test]
async fn a_failing_target_write_fails_the_copy_with_the_servers_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_img, src) = small_source(dir.path());
    let dst = Nbdkit::start(
        dir.path(),
        "dst",
        &[
            "--filter=error",
            "memory",
            "size=16M",
            "error-pwrite=ENOSPC",
            "error-pwrite-rate=100%",
        ],
    );
    let e = copy(
        &src.addr,
        &dst.addr,
        ExtentSource::Allocation,
        &CopyOptions {
            target_is_zero: true,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, agent_node::copy::CopyError::Write { .. }),
        "{e}"
    );
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(
        chain.contains("ENOSPC") && chain.contains("writing the target"),
        "{chain}"
    );
}
