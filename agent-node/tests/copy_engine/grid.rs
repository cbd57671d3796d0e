//! The whole-disk checksum grid (`CopyOptions::grid_cell`) against a grid computed
//! independently (the image converted to raw and every cell hashed): full copies of random
//! layouts (data, zero clusters, allocated zeroes, holes), sizes that are no multiple of the
//! cell, incrementals whose changes cover cells partly (overlaid on the parent's grid they give
//! the new disk's grid), cancel, and the cost (an ignored test that prints medians).

use crate::grid_reference::{expand, overlay, reference_grid};
use crate::support::*;
use agent_node::copy::{CopyError, CopyOptions, DiskCounters, ExtentSource, copy_disk};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// No multiple of any cell the tests use (nor of 1 MiB).
const SIZE: u64 = 24 * MIB + 320 * KIB;
const BITMAP_GRANULARITY: u64 = 64 * KIB;

/// `n` random qemu-io writes of up to `max_len` bytes (512-byte aligned): patterns, zero
/// clusters (`write -z`) and allocated zeroes; with the ranges they cover.
fn random_writes(
    rng: &mut StdRng,
    size: u64,
    n: usize,
    max_len: u64,
) -> (Vec<String>, Vec<(u64, u64)>) {
    let mut cmds = Vec::new();
    let mut ranges = Vec::new();
    for _ in 0..n {
        let offset = rng.random_range(0..size / 512) * 512;
        let length = (rng.random_range(1..=max_len / 512) * 512).min(size - offset);
        cmds.push(match rng.random_range(0..4) {
            0 | 1 => format!("write -P {} {offset} {length}", rng.random_range(1..=255)),
            2 => format!("write -z {offset} {length}"),
            _ => format!("write -P 0 {offset} {length}"),
        });
        ranges.push((offset, length));
    }
    (cmds, ranges)
}

fn grid_opts(cell: u64, target_is_zero: bool) -> CopyOptions {
    CopyOptions {
        target_is_zero,
        grid_cell: Some(cell),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_full_grid_equals_the_image_read_whole() {
    // (seed, cell, fresh target): cells of 4 MiB, 1.5 MiB (no power of two, across the 4 MiB
    // checksum chunks), 64 KiB (the cluster size: many zero runs), and a dirty target (holes
    // written as zeroes instead of skipped).
    for (seed, cell, fresh) in [
        (1, 4 * MIB, true),
        (2, 3 * MIB / 2, true),
        (3, 64 * KIB, true),
        (4, 4 * MIB, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut rng = StdRng::seed_from_u64(seed);
        let (writes, _) = random_writes(&mut rng, SIZE, 12, 3 * MIB);
        let (dst_img, src, mut dst) = served_pair(d, SIZE, &writes);
        if !fresh {
            drop(dst);
            qemu_io(&dst_img, &[format!("write -P 0xee 0 {SIZE}")]);
            dst = target(d, &dst_img, Listen::Unix);
        }
        let out = copy(
            &src.addr,
            &dst.addr,
            ExtentSource::Allocation,
            &grid_opts(cell, fresh),
        )
        .await
        .unwrap();
        let grid = out.grid.as_ref().expect("a grid was asked for");
        assert_eq!((grid.cell_size, grid.disk_size), (cell, SIZE));
        assert_eq!(out.bytes_read_for_grid, 0, "a full reads nothing extra");
        let want: Vec<Option<String>> = reference_grid(&d.join("src.qcow2"), cell)
            .into_iter()
            .map(Some)
            .collect();
        assert_eq!(expand(grid), want, "seed {seed}, cell {cell}: {writes:?}");
        if cell == 64 * KIB {
            assert!(
                !grid.zero_cells.is_empty(),
                "holes and zero clusters are zero runs, not hashed"
            );
        }
        // The written list is still there and still right.
        verify_checksums(&dst.addr, &out.checksums).await;
        drop((src, dst));
        assert!(identical(&d.join("src.qcow2"), &dst_img), "seed {seed}");
    }
}

#[tokio::test]
async fn no_grid_unless_asked_and_a_bad_cell_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, src, dst) = served_pair(dir.path(), SIZE, &["write -P 1 0 1M".into()]);
    let out = copy(
        &src.addr,
        &dst.addr,
        ExtentSource::Allocation,
        &CopyOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(out.grid, None);
    let e = copy(
        &src.addr,
        &dst.addr,
        ExtentSource::Allocation,
        &grid_opts(512, true),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, CopyError::Options { .. }), "{e}");
    assert!(e.to_string().contains("grid"), "{e}");
}

/// The bytes of each cell that the bitmap (64 KiB granularity) marks after `writes`.
fn dirty_per_cell(writes: &[(u64, u64)], size: u64, cell: u64) -> Vec<u64> {
    let blocks = size.div_ceil(BITMAP_GRANULARITY) as usize;
    let mut dirty = vec![false; blocks];
    for &(o, l) in writes {
        for b in o / BITMAP_GRANULARITY..(o + l).div_ceil(BITMAP_GRANULARITY) {
            dirty[b as usize] = true;
        }
    }
    let mut per_cell = vec![0u64; size.div_ceil(cell) as usize];
    for (b, _) in dirty.iter().enumerate().filter(|(_, d)| **d) {
        let start = b as u64 * BITMAP_GRANULARITY;
        let end = (start + BITMAP_GRANULARITY).min(size);
        let mut at = start;
        while at < end {
            let next = ((at / cell + 1) * cell).min(end);
            per_cell[(at / cell) as usize] += next - at;
            at = next;
        }
    }
    per_cell
}

fn add_bitmap(image: &Path, name: &str) {
    run(
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "-g",
            &BITMAP_GRANULARITY.to_string(),
            "-f",
            "qcow2",
            image.to_str().unwrap(),
            name,
        ],
    );
}

#[tokio::test]
async fn an_incremental_grid_over_its_parents_equals_the_new_disk() {
    for (seed, cell) in [(11, 4 * MIB), (12, 3 * MIB / 2), (13, 256 * KIB)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut rng = StdRng::seed_from_u64(seed);
        let src_img = create(d, "src.qcow2", SIZE);
        let (writes, _) = random_writes(&mut rng, SIZE, 12, 3 * MIB);
        qemu_io(&src_img, &writes);
        // The parent: a full copy with its grid.
        let base = create(d, "base.qcow2", SIZE);
        let parent = {
            let src = source(d, &src_img, Listen::Unix, &[]);
            let dst = target(d, &base, Listen::Unix);
            let out = copy(
                &src.addr,
                &dst.addr,
                ExtentSource::Allocation,
                &grid_opts(cell, true),
            )
            .await
            .unwrap();
            let full: Vec<String> = expand(out.grid.as_ref().unwrap())
                .into_iter()
                .map(|c| c.expect("a full lists every cell"))
                .collect();
            assert_eq!(full, reference_grid(&src_img, cell), "seed {seed}");
            full
        };
        // Changes since: scattered 64 KiB blocks, small unaligned writes, zeroes, one big run.
        add_bitmap(&src_img, "since-full");
        let mut cmds = Vec::new();
        let mut changed = Vec::new();
        for _ in 0..20 {
            let o = rng.random_range(0..SIZE / (64 * KIB)) * 64 * KIB;
            let l = (64 * KIB).min(SIZE - o);
            cmds.push(format!("write -P {} {o} {l}", rng.random_range(1..=255)));
            changed.push((o, l));
        }
        let (more, ranges) = random_writes(&mut rng, SIZE, 6, 200 * KIB);
        cmds.extend(more);
        changed.extend(ranges);
        cmds.push(format!("write -z {} {}", 9 * MIB, MIB));
        changed.push((9 * MIB, MIB));
        cmds.push(format!("write -P 0x77 {} {}", 14 * MIB + 512, 5 * MIB));
        changed.push((14 * MIB + 512, 5 * MIB));
        qemu_io(&src_img, &cmds);

        let dst_img = create_overlay(d, "incr.qcow2", &base);
        let src = source(d, &src_img, Listen::Unix, &["--bitmap=since-full"]);
        let dst = target(d, &dst_img, Listen::Unix);
        let out = copy(
            &src.addr,
            &dst.addr,
            ExtentSource::DirtyBitmap("since-full".into()),
            &grid_opts(cell, false),
        )
        .await
        .unwrap();
        let grid = out.grid.as_ref().unwrap();
        assert_eq!(
            overlay(&parent, grid),
            reference_grid(&src_img, cell),
            "seed {seed}, cell {cell}"
        );
        // Exactly the changed cells are listed; the unchanged rest of those was read, not
        // written.
        let dirty = dirty_per_cell(&changed, SIZE, cell);
        let listed: Vec<bool> = expand(grid).iter().map(Option::is_some).collect();
        assert_eq!(listed, dirty.iter().map(|&b| b > 0).collect::<Vec<_>>());
        let cell_len = |i: usize| (SIZE - i as u64 * cell).min(cell);
        let extra: u64 = dirty
            .iter()
            .enumerate()
            .filter(|(_, b)| **b > 0)
            .map(|(i, b)| cell_len(i) - b)
            .sum();
        assert!(extra > 0, "seed {seed}: some cell is changed partly");
        assert_eq!(out.bytes_read_for_grid, extra, "seed {seed}, cell {cell}");
        let changed_bytes: u64 = dirty.iter().sum();
        // What is read for the grid counts as skipped (the target holds it already).
        assert_eq!(out.bytes_skipped, SIZE - changed_bytes);
        assert_eq!(
            out.bytes_written + out.bytes_zeroed,
            changed_bytes,
            "grid reads are not written"
        );
        verify_checksums(&dst.addr, &out.checksums).await;
        drop((src, dst));
        assert!(identical(&src_img, &dst_img), "seed {seed}");
    }
}

#[tokio::test]
async fn an_incremental_reading_for_its_grid_can_be_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 64 * MIB;
    let src_img = create(d, "src.qcow2", size);
    qemu_io(&src_img, &[format!("write -P 0x5a 0 {size}")]);
    let base = d.join("base.qcow2");
    std::fs::copy(&src_img, &base).unwrap();
    add_bitmap(&src_img, "b");
    // 64 KiB changed at the start of every 4 MiB cell: nearly all of the disk is read for the
    // grid.
    let cmds: Vec<String> = (0..size / (4 * MIB))
        .map(|i| format!("write -P 0x11 {} 64k", i * 4 * MIB))
        .collect();
    qemu_io(&src_img, &cmds);
    let dst_img = create_overlay(d, "incr.qcow2", &base);
    let src = source(d, &src_img, Listen::Unix, &["--bitmap=b"]);
    let dst = target(d, &dst_img, Listen::Unix);
    let opts = CopyOptions {
        throttle_bps: Some(8 * MIB),
        ..grid_opts(4 * MIB, false)
    };
    let counters = DiskCounters::new();
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let (s, t, c, k) = (
            src.addr.clone(),
            dst.addr.clone(),
            counters.clone(),
            cancel.clone(),
        );
        async move { copy_disk(&s, &t, ExtentSource::DirtyBitmap("b".into()), &opts, c, k).await }
    });
    while counters.snapshot().bytes_read_for_grid == 0 {
        assert!(
            !task.is_finished(),
            "copy ended before it could be cancelled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cancel.cancel();
    let r = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("cancelled copy did not return")
        .unwrap();
    assert!(matches!(r, Err(CopyError::Cancelled)), "{r:?}");
    assert!(
        counters.snapshot().bytes_read_for_grid < size,
        "cancel came after the end"
    );
}
