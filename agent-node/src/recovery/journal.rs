//! The recovery crash journal: one JSON file per recovery the node watches
//! (`<run_dir>/recovery-<id>.json`), written before the overlays are created and again once
//! QEMU runs, removed when the recovery has ended (completed and reported, or cleaned up). A
//! journal found at start-up is a recovery an earlier node process did not finish:
//! [`super::adopt`] re-adopts its VM or cleans up after it.
//!
//! Written like every node journal ([`crate::fsutil::atomic_write`]: mode 0600, fsync,
//! rename). It holds no TLS key: QEMU has loaded its credentials, and the material on disk is
//! in the recovery's private run directory.

use crate::instant::NbdServer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Journals and run directories of recoveries start with it.
pub(crate) const PREFIX: &str = "recovery-";

/// One disk of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub disk_key: i64,
    /// Created by this recovery (deleting it destroys nothing else).
    pub overlay: PathBuf,
    pub size: u64,
    /// The hub's export, as routed (for the operator; QEMU holds the connection).
    pub server: NbdServer,
    pub export: String,
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub recovery_id: String,
    pub vm_name: String,
    /// The recovery's run directory (QMP socket, PID file, TLS material).
    pub run_dir: PathBuf,
    pub disks: Vec<Disk>,
    /// block-stream's speed, for a stream started again after a restart.
    pub speed_bps: Option<u64>,
    /// QEMU, once it runs (else its PID file in `run_dir` may name it).
    pub qemu_pid: Option<u32>,
}

/// Where the entry of recovery `id` lives (`id` is a validated name).
pub fn path(run_dir: &Path, id: &str) -> PathBuf {
    crate::fsutil::journal::path(run_dir, PREFIX, id)
}

/// Writes (or rewrites) an entry atomically, the way every node journal is written.
pub fn write(path: &Path, entry: &Entry) -> std::io::Result<()> {
    crate::fsutil::journal::write(path, entry)
}

/// Removes an entry; a missing one is fine.
pub fn remove(path: &Path) -> std::io::Result<()> {
    crate::fsutil::remove_if_present(path)
}

/// Every journal file in `run_dir` (sorted), with its entry or why it could not be read.
pub fn all(run_dir: &Path) -> Vec<(PathBuf, Result<Entry, String>)> {
    crate::fsutil::journal::all(run_dir, PREFIX, "recovery")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn entries_are_written_private_rewritten_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let e = Entry {
            recovery_id: "r1".into(),
            vm_name: "vm1".into(),
            run_dir: dir.path().join("recovery-r1"),
            disks: vec![Disk {
                disk_key: 2000,
                overlay: "/data/vm1-disk-2000.qcow2".into(),
                size: 1 << 20,
                server: NbdServer::Unix {
                    path: "/run/sendense-nbd/10100.sock".into(),
                },
                export: "vm-disk-2000".into(),
            }],
            speed_bps: None,
            qemu_pid: None,
        };
        let p = path(dir.path(), "r1");
        write(&p, &e).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let updated = Entry {
            qemu_pid: Some(42),
            ..e
        };
        write(&p, &updated).unwrap();
        // The recovery's run directory shares the prefix; it is no journal.
        std::fs::create_dir(dir.path().join("recovery-r1")).unwrap();
        std::fs::write(path(dir.path(), "junk"), "{").unwrap();
        std::fs::write(dir.path().join("restore-r1.json"), "{}").unwrap();
        let listed = all(dir.path());
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(
            listed[0]
                .1
                .as_ref()
                .unwrap_err()
                .contains("not a recovery journal")
        );
        assert_eq!(listed[1], (p.clone(), Ok(updated)));
        remove(&p).unwrap();
        remove(&p).unwrap();
        assert_eq!(all(dir.path()).len(), 1);
    }
}
