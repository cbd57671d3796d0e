//! The checks of a restore request: the point restorable, the target path on the node, the
//! disk of the backup point.

use super::RestoreError;
use sendense_shared::api::{Backup, DiskResult, JobStatus, RestoreRequest, RestoreTarget, Vm};
use std::path::Path;

/// A point is offered for restore only once completed and while its integrity allows it: a
/// `corrupt` point holds bytes that differ from its stored checksums, an `unverified` one was
/// never read back against them.
pub(super) fn check_restorable(backup: &Backup) -> Result<(), RestoreError> {
    match unreadable(backup) {
        None => Ok(()),
        Some(reason) => Err(RestoreError::NotRestorable {
            id: backup.backup_id.clone(),
            reason,
        }),
    }
}

/// Why `backup` may not be read as a restore's (or an instant recovery's) source, after
/// "backup <id> "; `None` when it may.
pub(crate) fn unreadable(backup: &Backup) -> Option<String> {
    if backup.status != JobStatus::Completed {
        return Some(format!(
            "is {}: only a completed (verified) backup can be restored",
            backup.status.as_str()
        ));
    }
    if !backup.integrity.restorable() {
        let detail = backup
            .integrity_detail
            .as_deref()
            .unwrap_or("no detail recorded");
        return Some(format!(
            "is {}: {detail}; only a verified, hub-computed or legacy point can be restored",
            backup.integrity.as_str()
        ));
    }
    None
}

pub(super) fn check_target_path(p: &str) -> Result<(), RestoreError> {
    let path = Path::new(p);
    let bad = |why: &str| {
        Err(RestoreError::Invalid {
            detail: format!("target.path: {p:?} {why}"),
        })
    };
    if let Err(why) = sendense_shared::names::check_plain_absolute(p) {
        return bad(why);
    }
    if path.extension().and_then(|e| e.to_str()) != Some("qcow2") {
        return bad("must end in .qcow2 (the node writes a new QCOW2 image)");
    }
    Ok(())
}

/// A restore into `vm`'s own disk: the image to replace (`target.path`, or the disk's image as
/// the point recorded it) and the VM's name on its node. The VM must live on `target.node`.
pub(super) fn replace_target(
    backup: &Backup,
    disk: &DiskResult,
    target: &RestoreTarget,
    vm: &Vm,
) -> Result<(String, String), RestoreError> {
    let invalid = |detail| Err(RestoreError::Invalid { detail });
    if vm.node.as_deref() != Some(target.node.as_str()) {
        return invalid(format!(
            "target.vm: VM {} is on {}, not on node {}",
            vm.vm_name,
            vm.node
                .as_deref()
                .map_or("no node".to_string(), |n| format!("node {n}")),
            target.node
        ));
    }
    let path = if target.path.is_empty() {
        let recorded = backup
            .hardware
            .as_ref()
            .and_then(|h| h.disks.iter().find(|d| d.disk_key == disk.disk_key))
            .map(|d| d.image_path.clone())
            .filter(|p| !p.is_empty());
        match recorded {
            Some(p) => p,
            None => {
                return invalid(format!(
                    "target.path: backup {} records no image of disk {} (no hardware); name                      the VM's disk image to replace",
                    backup.backup_id, disk.disk_key
                ));
            }
        }
    } else {
        target.path.clone()
    };
    if let Err(why) = sendense_shared::names::check_plain_absolute(&path) {
        return invalid(format!("target.path: {path:?} {why} (a path on the node)"));
    }
    Ok((path, vm.name_on_node().to_string()))
}

fn keys(b: &Backup) -> String {
    b.disk_results
        .iter()
        .map(|d| d.disk_key.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The disk of `backup` the request names (or its only one).
pub(super) fn pick_disk(backup: &Backup, req: &RestoreRequest) -> Result<DiskResult, RestoreError> {
    let invalid = |detail| Err(RestoreError::Invalid { detail });
    match req.disk_key {
        Some(k) => match backup.disk_results.iter().find(|d| d.disk_key == k) {
            Some(d) => Ok(d.clone()),
            None => invalid(format!(
                "disk_key: backup {} has no disk {k} (it has {})",
                backup.backup_id,
                keys(backup)
            )),
        },
        None if backup.disk_results.len() == 1 => Ok(backup.disk_results[0].clone()),
        None => invalid(format!(
            "disk_key: backup {} has {} disks ({}); name the one to restore",
            backup.backup_id,
            backup.disk_results.len(),
            keys(backup)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_paths_are_checked() {
        assert!(check_target_path("/var/lib/vm/restored.qcow2").is_ok());
        for (p, why) in [
            ("relative.qcow2", "absolute"),
            ("/a/../b.qcow2", ".."),
            ("/a/b.raw", ".qcow2"),
        ] {
            let e = check_target_path(p).unwrap_err().to_string();
            assert!(e.starts_with("target.path") && e.contains(why), "{p}: {e}");
        }
    }
}
