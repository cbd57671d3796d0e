//! The crash journal: everything a held snapshot consists of, one JSON file per VM
//! (`<run_dir>/journal-<vm>.json`). It is written before the snapshot transaction and removed
//! only when a release undid everything, so that whatever happens in between (a node crash, a
//! release QEMU refused) is undone from it by `recovery`. Written with
//! [`crate::fsutil::atomic_write`]: a crash while writing leaves the previous journal (or none)
//! and a temporary file, never a journal that cannot be read.

use crate::fsutil;
use sendense_shared::api::BackupType;
use sendense_shared::ids::{BackupId, DiskKey};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything needed to release a snapshot; also the crash journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SnapshotState {
    pub(super) backup_id: BackupId,
    pub(super) vm_name: String,
    pub(super) backup_type: BackupType,
    pub(super) tag: String,
    /// Incremental: the bitmap exported (frozen) as the changed-block map.
    pub(super) base_bitmap: Option<String>,
    pub(super) new_bitmap: String,
    pub(super) socket: PathBuf,
    pub(super) disks: Vec<StateDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StateDisk {
    pub(super) disk_key: DiskKey,
    pub(super) size_bytes: u64,
    pub(super) format_node: String,
    pub(super) fleece_node: String,
    pub(super) job_id: String,
    pub(super) export_id: String,
    pub(super) export_name: String,
    pub(super) file: PathBuf,
}

const PREFIX: &str = "journal-";

/// Where the journal of `vm` lives.
pub(super) fn path(run_dir: &Path, vm: &str) -> PathBuf {
    run_dir.join(format!("{PREFIX}{vm}.json"))
}

/// Writes the journal whole or not at all.
pub(super) fn write(path: &Path, state: &SnapshotState) -> std::io::Result<()> {
    fsutil::atomic_write(path, &serde_json::to_vec_pretty(state).unwrap_or_default())
}

/// The journal at `path`; `None` when there is none or it cannot be read.
pub(super) fn read(path: &Path) -> Option<SnapshotState> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// A file name in the run directory that is the temporary file of a journal write a crash
/// interrupted (the journal itself is intact; the leftover is removed at start-up).
pub(super) fn is_torn_write(name: &str) -> bool {
    name.starts_with(PREFIX) && name.ends_with(".json.tmp")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn state(backup: &str) -> SnapshotState {
        SnapshotState {
            backup_id: BackupId::from(backup),
            vm_name: "vm1".into(),
            backup_type: BackupType::Incremental,
            tag: "0123456789".into(),
            base_bitmap: Some("sendense-a".into()),
            new_bitmap: format!("sendense-{backup}"),
            socket: "/run/nbd-0123456789.sock".into(),
            disks: vec![StateDisk {
                disk_key: DiskKey(2000),
                size_bytes: 1 << 30,
                format_node: "fmt0".into(),
                fleece_node: "sdfl-0123456789-0".into(),
                job_id: "sdjob-0123456789-0".into(),
                export_id: "sendense-0123456789-0".into(),
                export_name: "vm1-disk-2000".into(),
                file: "/run/sdfl-0123456789-0.qcow2".into(),
            }],
        }
    }

    #[test]
    fn journal_is_private_to_the_node_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "vm1");
        assert_eq!(p, dir.path().join("journal-vm1.json"));
        write(&p, &state("b")).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read(&p), Some(state("b")));
        assert_eq!(read(&dir.path().join("journal-other.json")), None);
    }

    #[test]
    fn a_torn_write_does_not_corrupt_the_previous_journal() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "vm1");
        write(&p, &state("b")).unwrap();
        // A crash half-way through writing the next journal leaves its first bytes in the
        // temporary file, nothing in the journal itself.
        let next = serde_json::to_vec_pretty(&state("c")).unwrap();
        let tmp = fsutil::temp_path(&p);
        std::fs::write(&tmp, &next[..next.len() / 2]).unwrap();
        assert_eq!(read(&p), Some(state("b")));
        let tmp_name = tmp.file_name().unwrap().to_str().unwrap();
        assert!(is_torn_write(tmp_name), "{tmp_name}");
        assert!(!is_torn_write("journal-vm1.json"));
        // The next write is not stopped by the leftover.
        write(&p, &state("c")).unwrap();
        assert_eq!(read(&p), Some(state("c")));
        assert!(!tmp.exists());
    }
}
