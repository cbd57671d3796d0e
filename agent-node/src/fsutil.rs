//! File helpers the drivers share:
//!
//! - [`atomic_write`], used by every crash journal (QEMU's and vSphere's), because a journal
//!   that a crash leaves half-written is worse than none: start-up recovery would find a file
//!   it cannot read and the snapshot it described;
//! - [`CreatedFile`], a file this node created exclusively and may therefore delete: a restore's
//!   target, removed on failure only while the path still holds that same file (device and
//!   inode), so a failed restore never deletes what someone else put there.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
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

/// Removes `path`; one that is already gone is fine.
pub fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The JSON crash journals of the node's jobs (restores, recoveries): one file
/// `<run_dir>/<prefix><id>.json` per job, written by [`atomic_write`], read back at start-up.
pub mod journal {
    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use std::path::{Path, PathBuf};

    /// Where the entry of job `id` (a validated name) lives.
    pub fn path(run_dir: &Path, prefix: &str, id: &str) -> PathBuf {
        run_dir.join(format!("{prefix}{id}.json"))
    }

    /// Writes (or rewrites) an entry atomically.
    pub fn write<T: Serialize>(path: &Path, entry: &T) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(entry).map_err(std::io::Error::other)?;
        super::atomic_write(path, &text)
    }

    /// Every journal file of `prefix` in `run_dir` (sorted), with its entry or why it could
    /// not be read (`what` names the kind: "not a restore journal").
    pub fn all<T: DeserializeOwned>(
        run_dir: &Path,
        prefix: &str,
        what: &str,
    ) -> Vec<(PathBuf, Result<T, String>)> {
        let Ok(dir) = std::fs::read_dir(run_dir) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".json"))
            })
            .collect();
        paths.sort();
        paths
            .into_iter()
            .map(|p| {
                let entry = std::fs::read(&p)
                    .map_err(|e| format!("{}: {e}", p.display()))
                    .and_then(|t| {
                        serde_json::from_slice(&t)
                            .map_err(|e| format!("{}: not a {what} journal: {e}", p.display()))
                    });
                (p, entry)
            })
            .collect()
    }
}

/// A file created by [`CreatedFile::create`]: its path and the identity (device, inode) of
/// what was created there, kept open.
#[derive(Debug)]
pub struct CreatedFile {
    path: PathBuf,
    file: File,
    dev: u64,
    ino: u64,
}

impl CreatedFile {
    /// Creates `path` with `O_CREAT | O_EXCL | O_NOFOLLOW`: an existing file (or a symlink
    /// planted there, dangling or not) is an `AlreadyExists` error and is left as it was. The
    /// mode is `mode` whatever the umask.
    pub fn create(path: &Path, mode: u32) -> std::io::Result<CreatedFile> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .mode(mode)
            .open(path)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        let meta = file.metadata()?;
        Ok(CreatedFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A name of the created file that does not go through its path: `/proc/<pid>/fd/<fd>`,
    /// valid while `self` lives. A child (`qemu-img create`) given it writes into this very
    /// inode even if the path was replaced by a symlink meanwhile.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.file.as_raw_fd()
        ))
    }

    /// The path still names the created file (not following a symlink).
    pub fn is_at_path(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }

    /// Deletes the path if it still names the created file; answers whether it did. Anything
    /// else found there (a file moved in, a symlink) is left alone.
    pub fn remove(&self) -> std::io::Result<bool> {
        if !self.is_at_path() {
            return Ok(false);
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_file_is_exclusive_private_and_removed_only_while_it_is_ours() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.qcow2");
        // Existing files and planted symlinks are refused and left as they were.
        std::fs::write(&p, b"someone's disk").unwrap();
        let e = CreatedFile::create(&p, 0o640).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"someone's disk");
        std::fs::remove_file(&p).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        assert!(CreatedFile::create(&p, 0o640).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        std::fs::remove_file(&p).unwrap();

        let c = CreatedFile::create(&p, 0o640).unwrap();
        assert_eq!(mode(&p), 0o640);
        assert!(c.is_at_path());
        // Written through the fd path, as qemu-img is: lands in the created inode.
        std::fs::write(c.fd_path(), b"restored").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"restored");
        // Replaced behind our back: not ours any more, not deleted.
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"another restore's image").unwrap();
        assert!(!c.is_at_path());
        assert!(!c.remove().unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"another restore's image");
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        assert!(!c.remove().unwrap());
        assert!(p.symlink_metadata().is_ok() && victim.exists());

        let dir2 = tempfile::tempdir().unwrap();
        let q = dir2.path().join("mine.qcow2");
        let c = CreatedFile::create(&q, 0o640).unwrap();
        assert!(c.remove().unwrap());
        assert!(!q.exists());
    }

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
