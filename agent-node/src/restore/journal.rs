//! The restore crash journal: one JSON file per running restore
//! (`<run_dir>/restore-<id>.json`), written once the new image file exists and again once its
//! private qemu-nbd runs, removed when the restore has ended and cleaned up. A journal found at
//! start-up is a restore a killed node did not finish: [`super::recovery`] undoes it.
//!
//! Written atomically: a temporary file (mode 0600: it names paths and a PID), fsync, rename
//! over the entry, fsync of the directory; an entry is whole or absent, also after a power cut.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub(crate) const PREFIX: &str = "restore-";

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub restore_id: String,
    /// The new image (created by this restore: deleting it destroys nothing else).
    pub image: PathBuf,
    /// The private qemu-nbd's unix socket.
    pub socket: PathBuf,
    /// The private qemu-nbd, once it runs.
    pub qemu_nbd_pid: Option<u32>,
}

/// Where the entry of restore `id` lives (`id` is a validated name).
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
    crate::fsutil::journal::all(run_dir, PREFIX, "restore")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn entries_are_written_private_rewritten_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let e = Entry {
            restore_id: "r1".into(),
            image: "/data/r1.qcow2".into(),
            socket: dir.path().join("restore-r1.sock"),
            qemu_nbd_pid: None,
        };
        let p = path(dir.path(), "r1");
        write(&p, &e).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let updated = Entry {
            qemu_nbd_pid: Some(42),
            ..e
        };
        write(&p, &updated).unwrap();
        assert!(!p.with_extension("json.tmp").exists());
        std::fs::write(path(dir.path(), "junk"), "{").unwrap();
        std::fs::write(dir.path().join("other.json"), "{}").unwrap();
        std::fs::write(dir.path().join("restore-r1.sock"), "").unwrap();
        let listed = all(dir.path());
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(
            listed[0]
                .1
                .as_ref()
                .unwrap_err()
                .contains("not a restore journal")
        );
        assert_eq!(listed[1], (p.clone(), Ok(updated)));
        remove(&p).unwrap();
        remove(&p).unwrap();
        assert_eq!(all(dir.path()).len(), 1);
    }
}
