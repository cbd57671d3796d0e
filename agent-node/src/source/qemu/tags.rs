//! Names of what the node creates in QEMU and in its run directory.
//!
//! QEMU node names and job ids must be at most 31 characters, so each snapshot gets a `tag`
//! (10 hex digits of BLAKE3 of the backup id). Fleecing nodes are `sdfl-<tag>-<i>`, backup jobs
//! `sdjob-<tag>-<i>`, exports `sendense-<tag>-<i>`, temporary files `<run_dir>/sdfl-<tag>-<i>.qcow2`,
//! the NBD socket `<run_dir>/nbd-<tag>.sock`; the NBD export names are `<vm>-disk-<disk key>`,
//! bitmaps `sendense-<backup id>`. Start-up recovery removes everything with these prefixes:
//! they are the node's and nobody else's.

use sendense_shared::ids::{BackupId, DiskKey};
use std::path::{Path, PathBuf};

/// Prefix of every bitmap the node creates.
pub const BITMAP_PREFIX: &str = "sendense-";
/// Prefix of fleecing node names and their files.
pub const NODE_PREFIX: &str = "sdfl-";
/// Prefix of backup job ids.
pub const JOB_PREFIX: &str = "sdjob-";
/// Prefix of export ids.
pub const EXPORT_PREFIX: &str = "sendense-";

/// Short, QEMU-name-safe tag of a backup id.
pub(super) fn tag_of(backup_id: &BackupId) -> String {
    blake3::hash(backup_id.0.as_bytes()).to_hex()[..10].to_string()
}

/// The change-tracking bitmap that starts at the snapshot of `backup_id`.
pub(super) fn bitmap_of(backup_id: &BackupId) -> String {
    format!("{BITMAP_PREFIX}{backup_id}")
}

/// The fleecing node of disk `i` of the snapshot tagged `tag`.
pub(super) fn fleece_node(tag: &str, i: usize) -> String {
    format!("{NODE_PREFIX}{tag}-{i}")
}

/// The backup job (copy-before-write) of disk `i`.
pub(super) fn job_id(tag: &str, i: usize) -> String {
    format!("{JOB_PREFIX}{tag}-{i}")
}

/// The block export id of disk `i`.
pub(super) fn export_id(tag: &str, i: usize) -> String {
    format!("{EXPORT_PREFIX}{tag}-{i}")
}

/// The NBD export name the copy asks for.
pub(super) fn export_name(vm: &str, disk_key: DiskKey) -> String {
    format!("{vm}-disk-{disk_key}")
}

/// The fleecing node's qcow2 file.
pub(super) fn fleece_file(run_dir: &Path, tag: &str, i: usize) -> PathBuf {
    run_dir.join(format!("{}.qcow2", fleece_node(tag, i)))
}

/// The unix socket of the snapshot's NBD server.
pub(super) fn nbd_socket(run_dir: &Path, tag: &str) -> PathBuf {
    run_dir.join(format!("nbd-{tag}.sock"))
}

/// A file name in the run directory that only a snapshot of this node makes (fleecing file or
/// NBD socket), so that one found without a journal is a leftover.
pub(super) fn is_snapshot_file(name: &str) -> bool {
    (name.starts_with(NODE_PREFIX) && name.ends_with(".qcow2"))
        || (name.starts_with("nbd-") && name.ends_with(".sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_fit_qemu_node_names() {
        let t = tag_of(&BackupId::from("backup-0123456789abcdef-with-a-long-id"));
        assert_eq!(t.len(), 10);
        assert!(format!("{JOB_PREFIX}{t}-99").len() <= 31);
    }

    #[test]
    fn files_of_a_snapshot_are_recognised_as_ours() {
        let run = Path::new("/run/sendense");
        let t = tag_of(&BackupId::from("b1"));
        for p in [fleece_file(run, &t, 0), nbd_socket(run, &t)] {
            let name = p.file_name().unwrap().to_str().unwrap();
            assert!(is_snapshot_file(name), "{name}");
        }
        assert!(!is_snapshot_file("qmp.log"));
        assert!(!is_snapshot_file("journal-vm.json"));
    }
}
