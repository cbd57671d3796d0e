//! The whole-disk grid computed independently of the copy engine: the image converted to raw
//! by `qemu-img convert` and every cell of the file hashed. Shared by the copy engine and node
//! tests (included with `#[path]`).

use sendense_shared::api::GridChecksums;
use std::io::Read;
use std::path::Path;
use std::process::Command;

/// BLAKE3 (hex) of every cell of `image` (qcow2, possibly with a backing chain), read whole.
pub fn reference_grid(image: &Path, cell: u64) -> Vec<String> {
    let raw = image.with_extension("reference.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(image)
        .arg(&raw)
        .status()
        .expect("qemu-img convert");
    assert!(st.success(), "qemu-img convert {}: {st}", image.display());
    let mut f = std::fs::File::open(&raw).unwrap();
    let size = f.metadata().unwrap().len();
    let mut out = Vec::new();
    let mut buf = vec![0u8; cell as usize];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(cell) as usize;
        f.read_exact(&mut buf[..n]).unwrap();
        out.push(blake3::hash(&buf[..n]).to_hex().to_string());
        at += n as u64;
    }
    std::fs::remove_file(&raw).unwrap();
    out
}

/// The grid cell by cell: `Some(hash)` for a listed cell (zero runs as the hash of that many
/// zeroes), `None` for a cell left out (unchanged since the parent). Checks the lists are
/// ordered, inside the disk and disjoint.
pub fn expand(g: &GridChecksums) -> Vec<Option<String>> {
    assert!(g.cell_size > 0);
    let n = g.disk_size.div_ceil(g.cell_size) as usize;
    let len = |i: u64| (g.disk_size - i * g.cell_size).min(g.cell_size) as usize;
    let mut out: Vec<Option<String>> = vec![None; n];
    for w in g.cells.windows(2) {
        assert!(w[0].index < w[1].index, "cells out of order: {w:?}");
    }
    for c in &g.cells {
        assert!((c.index as usize) < n, "cell {} past the disk", c.index);
        out[c.index as usize] = Some(c.blake3.clone());
    }
    for w in g.zero_cells.windows(2) {
        assert!(
            w[0].first + w[0].count < w[1].first,
            "zero runs out of order, overlapping or not coalesced: {w:?}"
        );
    }
    for r in &g.zero_cells {
        assert!(r.count > 0);
        for i in r.first..r.first + r.count {
            assert!((i as usize) < n, "zero cell {i} past the disk");
            assert!(out[i as usize].is_none(), "cell {i} listed twice");
            out[i as usize] = Some(blake3::hash(&vec![0u8; len(i)]).to_hex().to_string());
        }
    }
    out
}

/// `child` (an incremental's grid) laid over its parent's full grid.
pub fn overlay(parent: &[String], child: &GridChecksums) -> Vec<String> {
    let c = expand(child);
    assert_eq!(c.len(), parent.len(), "grids of different disks");
    c.into_iter()
        .zip(parent)
        .map(|(c, p)| c.unwrap_or_else(|| p.clone()))
        .collect()
}
