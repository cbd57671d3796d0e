//! Copies driven by an explicit area list (`ExtentSource::Areas`, what vSphere CBT hands the
//! copy): only the areas are read; bytes outside stay as the target had them.

use crate::support::*;
use agent_node::copy::{CopyError, CopyOptions, ExtentSource};
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient};
use std::sync::Arc;

const SIZE: u64 = 64 * MIB;

/// Reads `[offset, offset+len)` of an export and asserts every byte is `byte`.
async fn assert_bytes(addr: &NbdAddr, offset: u64, len: u64, byte: u8, what: &str) {
    let c = NbdClient::connect(addr, &ConnectOptions::default())
        .await
        .unwrap();
    let data = c.read(offset, len as u32).await.unwrap();
    if let Some(i) = data.iter().position(|&b| b != byte) {
        panic!(
            "{what}: byte at {} is {:#x}, expected {byte:#x}",
            offset + i as u64,
            data[i]
        );
    }
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn full_copy_of_areas_reads_only_the_areas_and_skips_zeroes_on_a_fresh_target() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (dst_img, src, dst) = served_pair(
        d,
        SIZE,
        &[
            "write -P 0x11 0 4M".into(),
            "write -P 0x22 10M 2M".into(),
            // A zero cluster: base:allocation says it reads as zeroes.
            "write -z 20M 1M".into(),
            "write -P 0x33 40M 1M".into(),
        ],
    );
    // The area list covers only the first half of the data at 10M: the rest is not copied,
    // whatever the source holds there.
    let areas = vec![
        (0, 4 * MIB),
        (10 * MIB, MIB),
        (20 * MIB, MIB),
        (40 * MIB, MIB),
    ];
    let out = copy(
        &src.addr,
        &dst.addr,
        ExtentSource::Areas(Arc::new(areas)),
        &CopyOptions {
            target_is_zero: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let copied = 4 * MIB + MIB + MIB;
    assert_eq!(out.bytes_read, copied, "the zero cluster is not read");
    assert_eq!(out.bytes_written, copied);
    assert_eq!(out.bytes_zeroed, 0, "a fresh target needs no zeroes");
    assert_eq!(out.bytes_skipped, SIZE - copied);
    assert_eq!(verify_checksums(&dst.addr, &out.checksums).await, copied);
    assert_bytes(&dst.addr, 0, 4 * MIB, 0x11, "area 1").await;
    assert_bytes(&dst.addr, 10 * MIB, MIB, 0x22, "area 2").await;
    assert_bytes(&dst.addr, 11 * MIB, MIB, 0, "outside the areas").await;
    assert_bytes(&dst.addr, 40 * MIB, MIB, 0x33, "area 4").await;
    drop(dst);
    let (map, entries) = map(&dst_img);
    let allocated: u64 = entries
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(
        allocated, copied,
        "only the copied areas are allocated: {map}"
    );
}

#[tokio::test]
async fn incremental_areas_copy_changes_inside_and_leave_the_rest_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src_img = create(d, "src.qcow2", SIZE);
    qemu_io(&src_img, &["write -P 0x11 0 16M".into()]);
    let base = d.join("base.qcow2");
    std::fs::copy(&src_img, &base).unwrap();
    qemu_io(
        &src_img,
        &[
            "write -P 0x44 2M 1M".into(),
            // Zero-filled data: read, found zero, written as zeroes.
            "write -P 0 5M 512k".into(),
            // A change the area list does not name: must not reach the target.
            "write -P 0x55 8M 1M".into(),
            // Zeroed over old data: zeroed without a read.
            "write -z 12M 1M".into(),
        ],
    );
    let dst_img = create_overlay(d, "incr.qcow2", &base);
    let src = source(d, &src_img, Listen::Unix, &[]);
    let dst = target(d, &dst_img, Listen::Unix);
    let areas = vec![(2 * MIB, MIB), (5 * MIB, 512 * KIB), (12 * MIB, MIB)];
    let out = copy(
        &src.addr,
        &dst.addr,
        ExtentSource::Areas(Arc::new(areas)),
        &CopyOptions::default(),
    )
    .await
    .unwrap();
    let changed = MIB + 512 * KIB + MIB;
    assert_eq!(out.bytes_read, MIB + 512 * KIB);
    assert_eq!(out.bytes_written, MIB);
    assert_eq!(out.bytes_zeroed, 512 * KIB + MIB);
    assert_eq!(out.bytes_skipped, SIZE - changed);
    assert_eq!(verify_checksums(&dst.addr, &out.checksums).await, changed);
    assert_bytes(&dst.addr, 0, 2 * MIB, 0x11, "before the first area").await;
    assert_bytes(&dst.addr, 2 * MIB, MIB, 0x44, "changed area").await;
    assert_bytes(&dst.addr, 5 * MIB, 512 * KIB, 0, "zero-filled area").await;
    assert_bytes(&dst.addr, 8 * MIB, MIB, 0x11, "change outside the areas").await;
    assert_bytes(&dst.addr, 12 * MIB, MIB, 0, "zeroed area").await;
    assert_bytes(&dst.addr, 13 * MIB, 3 * MIB, 0x11, "after the last area").await;
    drop(dst);
    // Only the areas were written into the overlay: 8M..9M reads through to the base.
    let (map, entries) = map(&dst_img);
    let in_overlay: Vec<(u64, u64)> = entries
        .iter()
        .filter(|e| e["depth"] == 0 && (e["data"] == true || e["zero"] == true))
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert!(
        in_overlay
            .iter()
            .all(|&(s, l)| s >= 2 * MIB && s + l <= 13 * MIB && !(s < 9 * MIB && s + l > 8 * MIB)),
        "overlay holds more than the areas: {map}"
    );
}

#[tokio::test]
async fn areas_past_the_disk_or_overlapping_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, src, dst) = served_pair(d, SIZE, &[]);
    for (areas, want) in [
        (vec![(SIZE - MIB, 2 * MIB)], "past the disk"),
        (vec![(0, 2 * MIB), (MIB, MIB)], "disjoint"),
    ] {
        let e = copy(
            &src.addr,
            &dst.addr,
            ExtentSource::Areas(Arc::new(areas)),
            &CopyOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, CopyError::Options { .. }), "{e}");
        assert!(e.to_string().contains(want), "{e}");
    }
}

#[tokio::test]
async fn an_empty_area_list_copies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, src, dst) = served_pair(d, SIZE, &["write -P 0x11 0 4M".into()]);
    let out = copy(
        &src.addr,
        &dst.addr,
        ExtentSource::Areas(Arc::new(Vec::new())),
        &CopyOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        (out.bytes_read, out.bytes_written, out.bytes_zeroed),
        (0, 0, 0)
    );
    assert_eq!(out.bytes_skipped, SIZE);
    assert!(out.checksums.ranges.is_empty());
    assert_bytes(&dst.addr, 0, 4 * MIB, 0, "nothing was copied").await;
}
