//! Full copies: holes, zero-filled data blocks, checksums, size and permission checks, cancel.

use crate::support::*;
use agent_node::copy::{CopyError, CopyOptions, DiskCounters, ExtentSource, copy_disk};
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 64 * MIB;

/// 64 MiB: data 0x11 in [0, 8M); zero-filled but allocated data in [16M, 20M); data 0x22 in
/// [20M, 21M); in [32M, 33M) data 0x33 with a 128 KiB run of zero bytes at 32M+128K; the rest
/// unallocated holes.
fn mixed_source(dir: &Path) -> std::path::PathBuf {
    let src = create(dir, "src.qcow2", SIZE);
    qemu_io(
        &src,
        &[
            "write -P 0x11 0 8M".into(),
            "write -P 0 16M 4M".into(),
            "write -P 0x22 20M 1M".into(),
            "write -P 0x33 32M 1M".into(),
            format!("write -P 0 {} 128k", 32 * MIB + 128 * KIB),
        ],
    );
    src
}
const READ: u64 = 8 * MIB + 4 * MIB + MIB + MIB;
const ZERO_IN_DATA: u64 = 4 * MIB + 128 * KIB;

fn opts(target_is_zero: bool) -> CopyOptions {
    CopyOptions {
        target_is_zero,
        ..Default::default()
    }
}

#[tokio::test]
async fn full_copy_to_a_fresh_target_skips_holes_and_zeroes_zero_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let src_img = mixed_source(dir.path());
    let dst_img = create(dir.path(), "dst.qcow2", SIZE);
    let src = source(dir.path(), &src_img, Listen::Unix, &[]);
    let dst = target(dir.path(), &dst_img, Listen::Unix);
    let counters = DiskCounters::new();
    let out = copy_disk(
        &src.addr,
        &dst.addr,
        ExtentSource::Allocation,
        &opts(true),
        counters.clone(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(out.bytes_read, READ);
    assert_eq!(out.bytes_zeroed, ZERO_IN_DATA, "zero-filled data blocks");
    assert_eq!(out.bytes_written, READ - ZERO_IN_DATA);
    assert_eq!(out.bytes_skipped, SIZE - READ, "holes on a fresh target");
    let snap = counters.snapshot();
    assert_eq!(snap.bytes_total, SIZE);
    assert_eq!(snap.bytes_done(), SIZE);

    // Checksum ranges: inside one 4 MiB cell each, covering exactly what was written, and
    // each equal to BLAKE3 of the target's bytes there.
    let ck = &out.checksums;
    assert_eq!(ck.chunk_size, CopyOptions::default().checksum_chunk_size);
    let covered: u64 = ck.ranges.iter().map(|r| r.length).sum();
    assert_eq!(covered, out.bytes_written + out.bytes_zeroed);
    // One range per cell a data run touches, however many requests filled it:
    // [0,4M) [4M,8M) [16M,20M) [20M,21M) [32M,33M).
    let spans: Vec<(u64, u64)> = ck.ranges.iter().map(|r| (r.offset, r.length)).collect();
    assert_eq!(
        spans,
        vec![
            (0, 4 * MIB),
            (4 * MIB, 4 * MIB),
            (16 * MIB, 4 * MIB),
            (20 * MIB, MIB),
            (32 * MIB, MIB)
        ]
    );
    assert_eq!(verify_checksums(&dst.addr, ck).await, covered);
    drop((src, dst));
    assert!(identical(&src_img, &dst_img));
}

#[tokio::test]
async fn full_copy_over_a_dirty_target_zeroes_the_holes() {
    let dir = tempfile::tempdir().unwrap();
    let src_img = mixed_source(dir.path());
    // A target full of 0xee: every hole of the source must be zeroed on it.
    let dst_img = create(dir.path(), "dst.qcow2", SIZE);
    qemu_io(&dst_img, &["write -P 0xee 0 64M".into()]);
    let src = source(dir.path(), &src_img, Listen::Tcp, &[]);
    let dst = target(dir.path(), &dst_img, Listen::Tcp);
    let out = copy(&src.addr, &dst.addr, ExtentSource::Allocation, &opts(false))
        .await
        .unwrap();
    assert_eq!(out.bytes_read, READ);
    assert_eq!(out.bytes_skipped, 0);
    assert_eq!(out.bytes_zeroed, ZERO_IN_DATA + (SIZE - READ));
    assert_eq!(out.bytes_written, READ - ZERO_IN_DATA);
    assert_eq!(
        verify_checksums(&dst.addr, &out.checksums).await,
        SIZE,
        "zeroed holes are listed too"
    );
    drop((src, dst));
    assert!(identical(&src_img, &dst_img));
}

#[tokio::test]
async fn a_small_or_read_only_target_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let src_img = create(dir.path(), "src.qcow2", SIZE);
    let small_img = create(dir.path(), "small.qcow2", SIZE - MIB);
    let src = source(dir.path(), &src_img, Listen::Unix, &[]);
    let small = target(dir.path(), &small_img, Listen::Unix);
    let e = copy(
        &src.addr,
        &small.addr,
        ExtentSource::Allocation,
        &opts(true),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, CopyError::TargetTooSmall { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&(SIZE - MIB).to_string()) && msg.contains(&SIZE.to_string()),
        "{msg}"
    );
    drop(small);

    let ro_img = create(dir.path(), "ro.qcow2", SIZE);
    let ro = export(dir.path(), &ro_img, "ro", Listen::Unix)
        .read_only()
        .start();
    let e = copy(&src.addr, &ro.addr, ExtentSource::Allocation, &opts(true))
        .await
        .unwrap_err();
    assert!(matches!(e, CopyError::TargetReadOnly { .. }), "{e}");

    // A target that is not there names the target.
    drop(ro);
    let e = copy(
        &src.addr,
        &sendense_shared::nbd::NbdAddr::parse("nbd://127.0.0.1:1/none").unwrap(),
        ExtentSource::Allocation,
        &opts(true),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, CopyError::TargetConnect { .. }), "{e}");
}

/// A 512 MiB copy (source all 0x5a) running in a task, with small requests and a small window
/// so that it takes long enough to be cut.
struct SlowCopy {
    size: u64,
    src: QemuNbd,
    _dst: QemuNbd,
    counters: std::sync::Arc<DiskCounters>,
    task: tokio::task::JoinHandle<Result<agent_node::copy::CopyOutcome, CopyError>>,
    _dir: tempfile::TempDir,
}

/// Starts a [`SlowCopy`] (`connections` when given) and answers once data flows; `cut` names
/// what the test does to it, for the failure when the copy ends first.
async fn slow_copy_flowing(
    connections: Option<u32>,
    cancel: CancellationToken,
    cut: &str,
) -> SlowCopy {
    let dir = tempfile::tempdir().unwrap();
    let size = 512 * MIB;
    let src_img = create(dir.path(), "src.qcow2", size);
    qemu_io(&src_img, &["write -P 0x5a 0 512M".into()]);
    let dst_img = create(dir.path(), "dst.qcow2", size);
    let src = source(dir.path(), &src_img, Listen::Unix, &[]);
    let dst = target(dir.path(), &dst_img, Listen::Unix);
    let mut o = CopyOptions {
        request_size: 64 * 1024,
        max_in_flight_bytes: 256 * 1024,
        ..opts(true)
    };
    if let Some(n) = connections {
        o.connections = n;
    }
    let counters = DiskCounters::new();
    let task = tokio::spawn({
        let (s, d, c) = (src.addr.clone(), dst.addr.clone(), counters.clone());
        async move { copy_disk(&s, &d, ExtentSource::Allocation, &o, c, cancel).await }
    });
    while counters.snapshot().bytes_written == 0 {
        assert!(!task.is_finished(), "copy ended before {cut}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    SlowCopy {
        size,
        src,
        _dst: dst,
        counters,
        task,
        _dir: dir,
    }
}

#[tokio::test]
async fn cancel_mid_copy_returns_cancelled() {
    let cancel = CancellationToken::new();
    let copy = slow_copy_flowing(Some(1), cancel.clone(), "it could be cancelled").await;
    cancel.cancel();
    let r = tokio::time::timeout(Duration::from_secs(20), copy.task)
        .await
        .expect("cancelled copy did not return")
        .unwrap();
    assert!(matches!(r, Err(CopyError::Cancelled)), "{r:?}");
    assert!(
        copy.counters.snapshot().bytes_read < copy.size,
        "cancel came after the end"
    );
}

#[tokio::test]
async fn a_source_dying_mid_copy_fails_the_copy() {
    let copy = slow_copy_flowing(None, CancellationToken::new(), "the source could die").await;
    drop(copy.src);
    let r = tokio::time::timeout(Duration::from_secs(20), copy.task)
        .await
        .expect("copy hung after its source died")
        .unwrap();
    let e = r.expect_err("the copy cannot succeed without its source");
    assert!(
        matches!(e, CopyError::Read { .. } | CopyError::BlockStatus { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("source"), "{e}");
}
