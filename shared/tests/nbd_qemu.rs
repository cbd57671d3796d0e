//! The NBD client against a real `qemu-nbd` (qcow2 images in a temporary directory; TCP on a
//! free loopback port, or a unix socket).

use bytes::Bytes;
use sendense_shared::nbd::{
    BASE_ALLOCATION, ConnectOptions, NbdAddr, NbdClient, NbdError, STATE_HOLE, STATE_ZERO,
};
use sendense_tests::nbd::{QemuNbd, QemuNbdBuilder};
use sendense_tests::net::free_port;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// qemu-nbd (qcow2, `--cache=none`) serving `image` as `export`; `extra` flags before the image.
fn serve(image: &Path, export: &str, extra: &[&str]) -> QemuNbdBuilder {
    QemuNbd::builder(image, export)
        .args(&["--cache=none"])
        .args(extra)
}

fn qemu_img(args: &[&str]) {
    let st = Command::new("qemu-img")
        .args(args)
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img {args:?}: {st}");
}

fn qemu_io(image: &Path, script: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", script])
        .arg(image)
        .output()
        .expect("qemu-io");
    assert!(out.status.success(), "qemu-io {script}: {out:?}");
}

fn image(dir: &Path, name: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), size]);
    p
}

fn alloc_opts() -> ConnectOptions {
    ConnectOptions {
        meta_contexts: vec![BASE_ALLOCATION.into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn tcp_handshake_reports_size_flags_and_contexts() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.qcow2", "64M");
    let srv = serve(&img, "disk-a", &[]).start();
    let c = NbdClient::connect(&srv.addr, &alloc_opts()).await.unwrap();
    assert_eq!(c.size(), 64 << 20);
    assert!(!c.read_only());
    assert!(
        c.can_multi_conn(),
        "qemu-nbd --shared=8 advertises multi-conn"
    );
    assert!(c.meta_context_id(BASE_ALLOCATION).is_some());
    assert!(c.meta_context_id("qemu:dirty-bitmap:nope").is_none());
    c.disconnect().await.unwrap();

    // The same export read-only, and the URI form the hub hands out.
    drop(srv);
    let port = free_port();
    let srv = serve(&img, "disk-a", &["--read-only"])
        .tcp_on("127.0.0.1", port)
        .start();
    let addr = NbdAddr::parse(&format!("nbd://127.0.0.1:{port}/disk-a")).unwrap();
    assert_eq!(addr, srv.addr);
    let c = NbdClient::connect(&addr, &ConnectOptions::default())
        .await
        .unwrap();
    assert!(c.read_only());
    let e = c.write(0, Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(e, NbdError::ReadOnly), "{e}");
}

#[tokio::test]
async fn unknown_export_and_closed_port_name_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.qcow2", "1M");
    let port = free_port();
    let srv = serve(&img, "right", &[]).tcp_on("127.0.0.1", port).start();
    let wrong = NbdAddr::Tcp {
        host: "127.0.0.1".into(),
        port,
        export: "wrong".into(),
    };
    let e = NbdClient::connect(&wrong, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, NbdError::ExportNotFound { .. }), "{e}");
    assert!(e.to_string().contains("\"wrong\""), "{e}");
    drop(srv);
    let e = NbdClient::connect(&wrong, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, NbdError::Connect { .. }), "{e}");
    assert!(e.to_string().contains(&port.to_string()), "{e}");
}

#[tokio::test]
async fn write_read_zero_trim_and_block_status_over_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "b.qcow2", "16M");
    let sock = dir.path().join("nbd.sock");
    let srv = serve(&img, "b", &["--discard=unmap"])
        .unix(sock.clone())
        .start();
    let uri = format!("nbd+unix:///b?socket={}", sock.display());
    assert_eq!(NbdAddr::parse(&uri).unwrap(), srv.addr);
    let c = NbdClient::connect(&srv.addr, &alloc_opts()).await.unwrap();

    // An unwritten image is one hole that reads as zeroes.
    let ext = c.block_status(BASE_ALLOCATION, 0, 16 << 20).await.unwrap();
    assert_eq!(ext[0].flags, STATE_HOLE | STATE_ZERO, "{ext:?}");
    assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 16 << 20);
    assert_eq!(c.read(4096, 8192).await.unwrap(), vec![0u8; 8192]);

    let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    c.write(1 << 20, Bytes::from(data.clone())).await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(c.read(1 << 20, 1 << 20).await.unwrap(), data);
    // A read straddling data and hole comes back whole.
    let mixed = c.read((2 << 20) - 4096, 8192).await.unwrap();
    assert_eq!(&mixed[..4096], &data[data.len() - 4096..]);
    assert_eq!(&mixed[4096..], &[0u8; 4096][..]);

    let ext = c
        .block_status(BASE_ALLOCATION, 1 << 20, 1 << 20)
        .await
        .unwrap();
    assert_eq!(
        ext[0].flags & STATE_HOLE,
        0,
        "written data is allocated: {ext:?}"
    );

    c.write_zeroes(1 << 20, 65536, false).await.unwrap();
    assert_eq!(c.read(1 << 20, 65536).await.unwrap(), vec![0u8; 65536]);
    c.trim((1 << 20) + 65536, 65536).await.unwrap();
    c.flush().await.unwrap();

    // Out of range is refused locally, before anything is sent.
    let e = c.read((16 << 20) - 10, 20).await.unwrap_err();
    assert!(matches!(e, NbdError::OutOfRange { .. }), "{e}");
    c.disconnect().await.unwrap();

    // What the client wrote is in the image.
    drop(srv);
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "read -P 0 1M 64k",
            "-c",
            "read -P 0 0 1M",
        ])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success()
            && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"),
        "{out:?}"
    );
}

#[tokio::test]
async fn many_requests_in_flight_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "c.qcow2", "64M");
    // Known pattern: each MiB i holds byte i+1.
    for i in 0..64 {
        qemu_io(&img, &format!("write -P {} {}M 1M", i + 1, i));
    }
    let srv = serve(&img, "c", &["--read-only"]).start();
    let c = NbdClient::connect(&srv.addr, &ConnectOptions::default())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..256u64 {
        let c = c.clone();
        // Mixed sizes so that replies complete out of order.
        let len: u32 = if i % 3 == 0 { 1 << 20 } else { 4096 };
        let off = (i % 64) << 20;
        tasks.push(tokio::spawn(async move {
            let d = c.read(off, len).await.unwrap();
            assert!(
                d.iter().all(|&b| b as u64 == off / (1 << 20) + 1),
                "read at {off}"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn pending_requests_fail_when_the_server_dies() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.qcow2", "256M");
    qemu_io(&img, "write -P 5 0 256M");
    let mut srv = serve(&img, "d", &["--read-only"]).start();
    let c = NbdClient::connect(&srv.addr, &ConnectOptions::default())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..64u64 {
        let c = c.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut errors = 0;
            for j in 0..8 {
                if c.read(((i * 8 + j) % 128) << 21, 1 << 21).await.is_err() {
                    errors += 1;
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            errors
        }));
    }
    // Killed once data flows (the first of 512 reads of 2 MiB answered), not after a guess.
    let t = std::time::Instant::now();
    while done.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "no read answered");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    srv.kill();
    let mut failed = 0;
    for t in tasks {
        failed += tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("a request hung after the server died")
            .unwrap();
    }
    assert!(failed > 0, "killing the server mid-copy must fail requests");
    let e = c.read(0, 4096).await.unwrap_err();
    assert!(
        matches!(e, NbdError::Closed { .. } | NbdError::Io { .. }),
        "{e}"
    );
}

/// The shared read-back verification against a real qemu-nbd: equal ranges pass (counted as
/// they are verified, a range longer than one read included), a changed byte fails with the
/// range named, a range past the end is refused before any read, a cancel stops it.
#[tokio::test]
async fn verification_reads_back_and_names_the_mismatching_range() {
    use sendense_shared::api::{ChecksumRange, ChunkChecksums};
    use sendense_shared::nbd::verify::{self, MAX_READ, VerifyError};
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio_util::sync::CancellationToken;

    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "v.qcow2", "64M");
    qemu_io(&img, "write -P 0x5a 0 20M");
    let sum = |offset: u64, length: u64, byte: u8| ChecksumRange {
        offset,
        length,
        blake3: blake3::hash(&vec![byte; length as usize])
            .to_hex()
            .to_string(),
    };
    // 20 MiB of 0x5a at 0 (longer than one read), then zeroes; the ranges out of order.
    let ranges = vec![
        sum(4 << 20, 4 << 20, 0x5a),
        sum(0, 2 * MAX_READ + 4096, 0x5a),
        sum(32 << 20, 1 << 20, 0),
        sum(20 << 20, 4096, 0),
    ];
    let sums = ChunkChecksums {
        chunk_size: 4 << 20,
        ranges: ranges.clone(),
    };
    let srv = serve(&img, "v", &["--read-only"]).start();
    let cancel = CancellationToken::new();
    let summary = verify::verify_disk(&srv.addr, &sums, &cancel)
        .await
        .unwrap();
    assert_eq!(summary.ranges, 4);
    assert_eq!(summary.bytes, ranges.iter().map(|r| r.length).sum::<u64>());
    let counted = AtomicU64::new(0);
    verify::verify_export(&srv.addr, &ranges, &cancel, Some(&counted))
        .await
        .unwrap();
    assert_eq!(counted.load(Ordering::Relaxed), 4);

    // The third range claims 0x5a where the image holds zeroes.
    let mut bad = ranges.clone();
    bad[2] = sum(32 << 20, 1 << 20, 0x5a);
    let counted = AtomicU64::new(0);
    match verify::verify_export(&srv.addr, &bad, &cancel, Some(&counted)).await {
        Err(VerifyError::Mismatch {
            offset,
            length,
            expected,
            actual,
        }) => {
            assert_eq!((offset, length), (32 << 20, 1 << 20));
            assert_eq!(expected, bad[2].blake3);
            assert_eq!(actual, sum(32 << 20, 1 << 20, 0).blake3);
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert_eq!(counted.load(Ordering::Relaxed), 2, "the ranges before it");
    let e = verify::verify_export(&srv.addr, &bad, &cancel, None)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("checksum mismatch at {}+{}", 32 << 20, 1 << 20)),
        "{e}"
    );

    let past = vec![sum(64 << 20, 4096, 0)];
    assert!(matches!(
        verify::verify_export(&srv.addr, &past, &cancel, None).await,
        Err(VerifyError::OutOfBounds { offset, length: 4096, size })
            if offset == 64 << 20 && size == 64 << 20
    ));
    cancel.cancel();
    assert!(matches!(
        verify::verify_export(&srv.addr, &ranges, &cancel, None).await,
        Err(VerifyError::Cancelled)
    ));
    let closed = NbdAddr::Tcp {
        host: "127.0.0.1".into(),
        port: free_port(),
        export: "v".into(),
    };
    assert!(matches!(
        verify::verify_disk(&closed, &sums, &CancellationToken::new()).await,
        Err(VerifyError::Connect { .. })
    ));
}

/// A server that stops answering (qemu-nbd SIGSTOPped: alive, socket open, silent) fails a
/// request at its deadline with an error naming the command and the range, and every later
/// request on that connection at once.
#[tokio::test]
async fn a_silent_server_fails_the_request_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.qcow2", "16M");
    let mut srv = serve(&img, "d", &[]).start();
    let opts = ConnectOptions {
        request_timeout: Some(Duration::from_millis(500)),
        ..Default::default()
    };
    let c = NbdClient::connect(&srv.addr, &opts).await.unwrap();
    c.read(0, 4096).await.expect("a read before the stall");
    let pid = nix::unistd::Pid::from_raw(srv.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let t = std::time::Instant::now();
    let e = c.read(1 << 20, 65536).await.unwrap_err();
    let waited = t.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(
        matches!(
            e,
            NbdError::Deadline {
                command: "READ",
                offset: 1048576,
                length: 65536,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("stopped answering"), "{e}");
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
    let later = c.read(0, 4096).await.unwrap_err();
    assert!(matches!(later, NbdError::Deadline { .. }), "{later}");
    srv.kill();
}
