//! Incremental copies from a qcow2 dirty bitmap exported by `qemu-nbd -B NAME`
//! (`qemu:dirty-bitmap:NAME`) onto a target whose backing file is the previous copy.

use crate::support::*;
use agent_node::copy::{CopyError, CopyOptions, ExtentSource};

const SIZE: u64 = 64 * MIB;

#[tokio::test]
async fn incremental_copies_only_dirty_extents_and_zeroes_inside_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The disk at the time of the previous backup.
    let src_img = create(d, "src.qcow2", SIZE);
    qemu_io(
        &src_img,
        &["write -P 0x11 0 16M".into(), "write -P 0x22 30M 2M".into()],
    );
    let base = d.join("base.qcow2");
    std::fs::copy(&src_img, &base).unwrap();
    // Track changes from now on, then change: new data (1M at 10M, inside old data), an
    // allocated zero-filled area (512K at 20M), and a zeroed area over old data (1M at 30M,
    // written as a zero cluster so that base:allocation says it reads as zeroes).
    run(
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "-f",
            "qcow2",
            src_img.to_str().unwrap(),
            "since-full",
        ],
    );
    qemu_io(
        &src_img,
        &[
            "write -P 0x44 10M 1M".into(),
            "write -P 0 20M 512k".into(),
            "write -z 30M 1M".into(),
        ],
    );
    // The target: an overlay on the previous copy, like the hub's incremental image.
    let dst_img = create_overlay(d, "incr.qcow2", &base);
    assert!(
        !identical(&src_img, &dst_img),
        "the change must be visible before the copy"
    );

    let src = source(d, &src_img, Listen::Unix, &["--bitmap=since-full"]);
    let dst = target(d, &dst_img, Listen::Unix);
    let out = copy(
        &src.addr,
        &dst.addr,
        ExtentSource::DirtyBitmap("since-full".into()),
        &CopyOptions::default(),
    )
    .await
    .unwrap();
    let changed = MIB + 512 * KIB + MIB;
    assert_eq!(
        out.bytes_read,
        MIB + 512 * KIB,
        "the zero cluster is not read"
    );
    assert_eq!(out.bytes_written, MIB);
    assert_eq!(out.bytes_zeroed, 512 * KIB + MIB);
    assert_eq!(out.bytes_skipped, SIZE - changed);
    assert_eq!(verify_checksums(&dst.addr, &out.checksums).await, changed);
    drop((src, dst));
    assert!(identical(&src_img, &dst_img));
}

#[tokio::test]
async fn a_missing_bitmap_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, src, dst) = served_pair(d, SIZE, &[]);
    let e = copy(
        &src.addr,
        &dst.addr,
        ExtentSource::DirtyBitmap("nope".into()),
        &CopyOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, CopyError::MissingContext { .. }), "{e}");
    assert!(e.to_string().contains("qemu:dirty-bitmap:nope"), "{e}");
}
