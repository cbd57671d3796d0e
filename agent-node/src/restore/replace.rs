//! A restore into a powered-off VM's own disk (`replace_vm`): the checks that refuse it while
//! the VM runs, and the swap at the end.
//!
//! The restore never writes into the disk itself: it writes a new image beside it (same
//! directory, so the final rename is atomic and on one filesystem), in the disk's format, and
//! renames it over the disk only after the copy was read back equal and the VM was found still
//! powered off. A failed, cancelled or crashed restore leaves the VM's disk as it was (the
//! partial image beside it is deleted like any partial image).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why a VM's disk may not be replaced now.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    #[error("replace_vm: no VM named {vm:?} on this node (its [qmp] table names the VMs)")]
    UnknownVm { vm: String },
    #[error("path {path:?}: {why}")]
    Path { path: String, why: String },
    #[error("VM {vm} is running ({why}); power it off before restoring into its disk")]
    Running { vm: String, why: String },
}

/// The checks of the request: `path` an existing regular file (not a symlink), `vm` one of
/// the node's VMs, not running.
pub fn check(vm: &str, qmp: Option<&Path>, path: &str) -> Result<(), ReplaceError> {
    let bad = |why: &str| {
        Err(ReplaceError::Path {
            path: path.to_string(),
            why: why.to_string(),
        })
    };
    let Some(qmp) = qmp else {
        return Err(ReplaceError::UnknownVm { vm: vm.to_string() });
    };
    let p =
        sendense_shared::names::check_plain_absolute(path).map_err(|why| ReplaceError::Path {
            path: path.to_string(),
            why: why.to_string(),
        })?;
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_file() => {}
        Ok(_) => return bad("is not a regular file (a symlink or a device is not replaced)"),
        Err(_) => return bad("does not exist; restoring into a VM replaces its disk image"),
    }
    if p.parent().is_none() {
        return bad("has no directory");
    }
    check_stopped(vm, qmp, p)
}

/// The VM is powered off: its QMP socket does not answer, and no process holds the image open.
pub fn check_stopped(vm: &str, qmp: &Path, image: &Path) -> Result<(), ReplaceError> {
    if std::os::unix::net::UnixStream::connect(qmp).is_ok() {
        return Err(ReplaceError::Running {
            vm: vm.to_string(),
            why: format!("its QMP socket {} answers", qmp.display()),
        });
    }
    if let Some((pid, comm)) = holder_of(image) {
        return Err(ReplaceError::Running {
            vm: vm.to_string(),
            why: format!("process {pid} ({comm}) has {} open", image.display()),
        });
    }
    Ok(())
}

/// A process (other than this one) with `image` open, found through `/proc/*/fd`.
fn holder_of(image: &Path) -> Option<(u32, String)> {
    let want = std::fs::metadata(image).ok()?;
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::metadata(fd.path())
                .is_ok_and(|m| m.dev() == want.dev() && m.ino() == want.ino())
            {
                let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                return Some((pid, comm.trim().to_string()));
            }
        }
    }
    None
}

/// The new image's path beside the disk: `.<name>.restore-<id>` in the disk's directory.
pub fn partial_path(disk: &Path, restore_id: &str) -> PathBuf {
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    disk.with_file_name(format!(".{name}.restore-{restore_id}"))
}

/// What the new image copies of the disk it replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskShape {
    /// `qcow2` or `raw`.
    pub format: String,
    pub virtual_size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The disk's format and size (`qemu-img info`, without opening a backing chain), mode and
/// owner.
pub async fn shape(disk: &Path) -> Result<DiskShape, String> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(disk)
        .output()
        .await
        .map_err(|e| format!("running qemu-img info: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img info {}: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("qemu-img info: {e}"))?;
    let format = v["format"].as_str().unwrap_or_default().to_string();
    if format != "qcow2" && format != "raw" {
        return Err(format!(
            "{} is a {format:?} image; a restore writes qcow2 or raw",
            disk.display()
        ));
    }
    let meta = std::fs::metadata(disk).map_err(|e| format!("{}: {e}", disk.display()))?;
    Ok(DiskShape {
        format,
        virtual_size: v["virtual-size"].as_u64().unwrap_or(0),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    })
}

/// The point's disk must fit the VM's: a restore into a smaller disk would cut it.
pub fn check_fits(point_size: u64, disk: &DiskShape, path: &Path) -> Result<(), String> {
    if point_size > disk.virtual_size {
        return Err(format!(
            "the point's disk ({point_size} bytes) does not fit the VM's disk {} ({} bytes); \
             restore it into a new image instead",
            path.display(),
            disk.virtual_size
        ));
    }
    Ok(())
}

/// Gives the new image the disk's mode and owner, then renames it over the disk and syncs the
/// directory.
pub fn swap(partial: &Path, disk: &Path, shape: &DiskShape) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let f = std::fs::File::open(partial)?;
    f.sync_all()?;
    std::os::unix::fs::fchown(&f, Some(shape.uid), Some(shape.gid))?;
    f.set_permissions(std::fs::Permissions::from_mode(shape.mode))?;
    std::fs::rename(partial, disk)?;
    if let Some(dir) = disk.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_vm_and_bad_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("web01.qcow2");
        std::fs::write(&disk, b"x").unwrap();
        let qmp = dir.path().join("web01.qmp");
        let d = disk.to_str().unwrap();
        // No socket: powered off.
        assert!(check("web01", Some(&qmp), d).is_ok());
        assert!(matches!(
            check("web02", None, d),
            Err(ReplaceError::UnknownVm { .. })
        ));
        let missing = dir.path().join("none.qcow2");
        let e = check("web01", Some(&qmp), missing.to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let link = dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(&disk, &link).unwrap();
        let e = check("web01", Some(&qmp), link.to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        // A socket that answers: running.
        let _l = std::os::unix::net::UnixListener::bind(&qmp).unwrap();
        let e = check("web01", Some(&qmp), d).unwrap_err().to_string();
        assert!(
            e.contains("VM web01 is running") && e.contains("QMP socket"),
            "{e}"
        );
    }

    #[test]
    fn a_process_holding_the_image_open_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("db.raw");
        std::fs::write(&disk, b"x").unwrap();
        let qmp = dir.path().join("db.qmp");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::fs::File::open(&disk).unwrap())
            .spawn()
            .unwrap();
        let e = check_stopped("db", &qmp, &disk).unwrap_err().to_string();
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            e.contains(&format!("process {}", child.id())) && e.contains("sleep"),
            "{e}"
        );
        assert!(check_stopped("db", &qmp, &disk).is_ok());
    }

    #[test]
    fn the_partial_image_lives_beside_the_disk() {
        assert_eq!(
            partial_path(Path::new("/vm/web01.qcow2"), "r1"),
            PathBuf::from("/vm/.web01.qcow2.restore-r1")
        );
    }
}
