//! A restore checked against the stored truth: the whole-disk checksums the node computed of
//! what it wrote, compared cell by cell with the point's sidecar (the checksums stored at
//! backup time, [`crate::manifest`]), before the restore is called completed.
//!
//! The node's own read-back only proves the new image equals what it read from the hub's
//! export; this proves what it read equals what was backed up.

use super::{LiveRestore, Restores};
use crate::events::Level;
use crate::manifest::Manifest;
use sendense_shared::api::{GridChecksums, Restore};
use sendense_shared::errors::chain;
use std::path::Path;

/// What the comparison found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Truth {
    /// Every cell equal; how many cells.
    Matches { cells: u64 },
    /// Not compared, and why (an older node without a grid, a legacy point without a sidecar).
    NotCompared(String),
    /// The restore must fail: the message names the first differing cell (or why the stored
    /// checksums could not be read).
    Differs(String),
}

impl Restores {
    /// Compares the node's `grid` of restore `r` with the point's stored checksums of that disk.
    pub(super) async fn check_truth(&self, r: &Restore, grid: Option<&GridChecksums>) -> Truth {
        let Some(grid) = grid else {
            return Truth::NotCompared(
                "the node sent no whole-disk checksums of what it wrote (a node older than \
                 them)"
                    .into(),
            );
        };
        let disks = match self.deps().db.backup_disks(&r.backup_id).await {
            Ok(d) => d,
            Err(e) => {
                return Truth::Differs(format!(
                    "cannot read the point's stored checksums to compare with: {}",
                    chain(&e)
                ));
            }
        };
        let row = disks.iter().find(|d| d.result.disk_key == r.disk_key);
        let Some(path) = row.and_then(|d| d.manifest_path.as_deref()) else {
            return Truth::NotCompared(format!(
                "backup {} has no stored whole-disk checksums for disk {} (a legacy point, \
                 completed before they existed)",
                r.backup_id, r.disk_key
            ));
        };
        let digest = row.and_then(|d| d.manifest_blake3.as_deref());
        let stored = match Manifest::read(Path::new(path), digest).await {
            Ok(m) => m,
            Err(e) => {
                return Truth::Differs(format!(
                    "cannot compare with the point's stored checksums: {}",
                    chain(&e)
                ));
            }
        };
        let written = match Manifest::from_grid(grid, None) {
            Ok(m) => m,
            Err(e) => {
                return Truth::Differs(format!(
                    "the node's checksums of {} cannot be compared: {}",
                    r.target.path,
                    chain(&e)
                ));
            }
        };
        compare(r, &stored, &written)
    }

    /// Records what [`Restores::check_truth`] found when the restore completes.
    pub(super) async fn record_truth(&self, live: &LiveRestore, truth: &Truth) {
        let (step, msg) = match truth {
            Truth::Matches { cells } => (
                "restore_truth_matched",
                format!("restored disk matches the point's stored checksums ({cells} cells)"),
            ),
            Truth::NotCompared(why) => (
                "restore_truth_not_compared",
                format!("restored disk not compared with the point's stored checksums: {why}"),
            ),
            Truth::Differs(_) => return,
        };
        self.event(live, Level::Info, step, msg).await;
    }
}

/// Cell by cell; the geometry first (a different grid or disk size cannot be equal).
fn compare(r: &Restore, stored: &Manifest, written: &Manifest) -> Truth {
    let target = format!(
        "the restored image {} on node {}",
        r.target.path, r.target.node
    );
    let kept = "(the image stays on the node: it was written, but does not match)";
    if (stored.cell_size, stored.disk_size) != (written.cell_size, written.disk_size) {
        return Truth::Differs(format!(
            "{target} does not match the point's stored checksums: the node's grid is {} bytes \
             in cells of {}, the stored one {} bytes in cells of {} {kept}",
            written.disk_size, written.cell_size, stored.disk_size, stored.cell_size
        ));
    }
    let diff = stored.diff(written);
    let Some(&first) = diff.first() else {
        return Truth::Matches {
            cells: stored.cells(),
        };
    };
    let (offset, length) = stored.cell(first);
    let more = if diff.len() > 1 {
        format!(" (and {} more cell(s))", diff.len() - 1)
    } else {
        String::new()
    };
    Truth::Differs(format!(
        "{target} does not match the point's stored checksums: cell {first} (offset {offset}, \
         {length} bytes): stored BLAKE3 {}, the node wrote {}{more} {kept}",
        stored.hash_hex(first),
        written.hash_hex(first)
    ))
}
