//! File helpers the drivers share. One today: [`atomic_write`], used by every crash journal
//! (QEMU's and vSphere's), because a journal that a crash leaves half-written is worse than
//! none: start-up recovery would find a file it cannot read and the snapshot it described.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The temporary file [`atomic_write`] writes `path`'s new contents to: `<path>.tmp`, in the
/// same directory (a rename is atomic only within one file system).
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".tmp");
    PathBuf::from(name)
}

/// Replaces `path` by `contents` so that a reader (or a node restarted after a crash) sees the
/// old file or the new one, never a mix: write to [`temp_path`] with mode 0600 (a journal names
/// the node's snapshots and files; no one else needs to read it), fsync it, rename it over
/// `path`, fsync the directory so the rename itself survives a power cut. A temporary file
/// left by an earlier torn write is overwritten.
pub fn atomic_write(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // `mode` applies only when the file is created; a leftover may have had other bits.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn writes_whole_files_with_mode_0600_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal-vm.json");
        atomic_write(&p, b"first").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        assert_eq!(mode(&p), 0o600);
        // A file that was readable by others becomes 0600 when rewritten.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        atomic_write(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(mode(&p), 0o600);
        assert!(!temp_path(&p).exists());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [OsString::from("journal-vm.json")]);
    }

    #[test]
    fn a_torn_write_leaves_the_previous_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal-vm.json");
        atomic_write(&p, b"{\"complete\": true}").unwrap();
        // What a crash in the middle of the next write leaves: a partial temporary file,
        // readable by others (as if created under a lax umask).
        let tmp = temp_path(&p);
        std::fs::write(&tmp, b"{\"compl").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"complete\": true}");
        // The next write goes through in spite of the leftover, and takes its place.
        atomic_write(&p, b"{\"complete\": 2}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"complete\": 2}");
        assert_eq!(mode(&p), 0o600);
        assert!(!tmp.exists());
    }

    #[test]
    fn temporary_is_beside_the_file() {
        assert_eq!(
            temp_path(Path::new("/run/x/vsphere-snapshot-b.json")),
            Path::new("/run/x/vsphere-snapshot-b.json.tmp")
        );
    }
}
