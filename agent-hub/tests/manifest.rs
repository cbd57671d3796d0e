//! Whole-disk checksums against real images: `qemu-img`/`qemu-io` make a QCOW2 chain, a
//! read-only `qemu-nbd` serves it, and the read-back must catch a flipped byte in a data
//! cluster on disk and garbage where the checksums say the disk holds zeroes.

use agent_hub::manifest::{self, Manifest};
use sendense_shared::api::{CellChecksum, CellRun, GridChecksums};
use sendense_tests::nbd::QemuNbd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_util::sync::CancellationToken;

const CELL: u64 = 1 << 20;
const SIZE: u64 = 16 << 20;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(image: &Path, cmd: &str) {
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(image));
}

async fn serve(image: &Path, dir: &Path) -> QemuNbd {
    QemuNbd::builder(image, "check")
        .unix(dir.join(format!(
            "{}.sock",
            image.file_name().unwrap().to_string_lossy()
        )))
        .read_only()
        .start_async()
        .await
}

/// The grid a writer would send for `image`: every cell hashed from the raw bytes
/// (`qemu-img convert`), all-zero cells as zero runs.
fn writer_grid(image: &Path, dir: &Path) -> GridChecksums {
    let raw = dir.join("reference.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image)
        .arg(&raw));
    let bytes = std::fs::read(&raw).unwrap();
    let mut grid = GridChecksums {
        cell_size: CELL,
        disk_size: bytes.len() as u64,
        cells: Vec::new(),
        zero_cells: Vec::new(),
    };
    for (i, c) in bytes.chunks(CELL as usize).enumerate() {
        if c.iter().all(|&b| b == 0) {
            grid.zero_cells.push(CellRun {
                first: i as u64,
                count: 1,
            });
        } else {
            grid.cells.push(CellChecksum {
                index: i as u64,
                blake3: blake3::hash(c).to_hex().to_string(),
            });
        }
    }
    grid
}

/// Host offset in the QCOW2 file of the guest offset `at` (`qemu-img map`).
fn host_offset(image: &Path, at: u64) -> u64 {
    let map: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(image)))
    .unwrap();
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        if (start..start + len).contains(&at) && e["data"] == true {
            return e["offset"].as_u64().unwrap() + (at - start);
        }
    }
    panic!(
        "guest offset {at} has no data cluster in {}",
        image.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_data_cluster_and_garbage_in_a_hole_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg(SIZE.to_string()));
    qemu_io(&base, "write -P 0x11 0 1M");
    qemu_io(&base, "write -P 0x22 5M 64k");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
        ])
        .arg(&top));
    qemu_io(&top, "write -P 0x33 5M 4k");
    qemu_io(&top, "write -P 0x44 9M 8k");

    // The truth: a full of the base, an incremental listing only the cells it touched.
    let base_m = Manifest::from_grid(&writer_grid(&base, dir.path()), None).unwrap();
    let full_top = writer_grid(&top, dir.path());
    let mut incr = full_top.clone();
    incr.cells.retain(|c| c.index == 5 || c.index == 9);
    incr.zero_cells.clear();
    let top_m = Manifest::from_grid(&incr, Some(&base_m)).unwrap();
    assert_eq!(top_m, Manifest::from_grid(&full_top, None).unwrap());

    let cancel = CancellationToken::new();
    let read = AtomicU64::new(0);
    {
        let nbd = serve(&top, dir.path()).await;
        let r = manifest::check(&nbd.addr, &top_m, &cancel, &read)
            .await
            .unwrap();
        assert!(r.is_clean(), "{}", r.describe_mismatches());
        // Cells 0, 5 and 9 hold data; the 13 others are zero by block status, not read.
        assert_eq!((r.cells, r.cells_read, r.bytes_read), (16, 3, 3 * CELL));
        assert_eq!(read.load(Ordering::Relaxed), 3 * CELL);
        // A hub-alone writer: the hub computes the same checksums from the image.
        let computed = manifest::compute(&nbd.addr, CELL, &cancel, &read)
            .await
            .unwrap();
        assert_eq!(computed, top_m);
    }

    // Bit rot: one byte of a base data cluster the top does not cover (the top's 4 KiB write
    // at 5M copied that whole 64 KiB cluster into the top).
    let at = host_offset(&base, 100_000);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&base)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    drop(f);
    // Garbage where the truth says zeroes (a hole of the point).
    qemu_io(&top, "write -P 0x5a 12M 4k");

    let nbd = serve(&top, dir.path()).await;
    let r = manifest::check(&nbd.addr, &top_m, &cancel, &read)
        .await
        .unwrap();
    assert_eq!(r.mismatch_count, 2, "{r:?}");
    let cells: Vec<u64> = r.mismatches.iter().map(|m| m.index).collect();
    assert_eq!(cells, [0, 12]);
    assert_eq!(
        r.mismatches[1].expected,
        blake3::hash(&[0u8; CELL as usize]).to_hex().to_string()
    );
    let text = r.describe_mismatches();
    assert!(
        text.starts_with("cell 0 (offset 0, 1048576 bytes): stored BLAKE3 ")
            && text.ends_with("(and 1 more cell(s))"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_the_read_back_and_a_wrong_size_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(SIZE.to_string()));
    qemu_io(&img, "write -P 0x11 0 16M");
    let m = Manifest::from_grid(&writer_grid(&img, dir.path()), None).unwrap();
    let nbd = serve(&img, dir.path()).await;
    let cancel = CancellationToken::new();
    cancel.cancel();
    let e = manifest::check(&nbd.addr, &m, &cancel, &AtomicU64::new(0))
        .await
        .unwrap_err();
    assert!(matches!(e, manifest::ManifestError::Cancelled), "{e}");
    let mut bigger = writer_grid(&img, dir.path());
    bigger.disk_size += CELL;
    bigger.zero_cells.push(CellRun {
        first: 16,
        count: 1,
    });
    let m = Manifest::from_grid(&bigger, None).unwrap();
    let e = manifest::check(&nbd.addr, &m, &CancellationToken::new(), &AtomicU64::new(0))
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "the image is {SIZE} bytes, its checksums cover {}",
            SIZE + CELL
        )
    );
}
