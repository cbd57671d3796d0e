//! The checks of a recovery request and the VM's configuration: each field of the request
//! over the point's recorded hardware over the defaults.

use super::RecoveryError;
use sendense_shared::api::{Backup, DiskResult, RecoveryRequest};
use sendense_shared::ids::DiskKey;
use std::collections::BTreeSet;

/// Guest memory when neither the request nor the point's hardware says.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// vCPUs when neither the request nor the point's hardware says.
pub const DEFAULT_CPUS: u32 = 1;

/// What the node is asked to start, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    /// In guest order.
    pub disks: Vec<DiskResult>,
    pub memory_mib: u64,
    pub cpus: u32,
    pub machine: Option<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
    pub speed_bps: Option<u64>,
    pub overlay_dir: Option<String>,
}

impl Plan {
    /// The configuration in words, for the recovery's first event.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} MiB, {} vCPU(s), machine {}",
            self.memory_mib,
            self.cpus,
            self.machine.as_deref().unwrap_or("(the node's default)")
        );
        if let Some(k) = &self.kernel {
            s.push_str(&format!(", kernel {k}"));
        }
        if let Some(i) = &self.initrd {
            s.push_str(&format!(", initrd {i}"));
        }
        if let Some(a) = &self.append {
            s.push_str(&format!(", append {a:?}"));
        }
        match self.speed_bps {
            Some(b) => s.push_str(&format!(", streams at most {b} bytes/s per disk")),
            None => s.push_str(", streams unlimited"),
        }
        match &self.overlay_dir {
            Some(d) => s.push_str(&format!(", overlays in {d}")),
            None => s.push_str(", overlays in the node's recovery directory"),
        }
        s
    }
}

fn invalid<T>(detail: String) -> Result<T, RecoveryError> {
    Err(RecoveryError::Invalid { detail })
}

/// The contract's pattern of a VM name: `^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`.
fn check_vm_name(name: &str) -> Result<(), RecoveryError> {
    sendense_shared::names::check_simple_name(name, 63).or_else(|why| {
        invalid(format!(
            "vm_name: {name:?} {why}: 1-63 letters, digits, '.', '_' or '-', starting with a \
             letter or digit (it names the QEMU VM and its overlay files on the node)"
        ))
    })
}

/// An absolute path on the node without `..`, NUL or newline.
fn check_node_path(field: &str, p: &str) -> Result<(), RecoveryError> {
    sendense_shared::names::check_plain_absolute(p)
        .map(drop)
        .or_else(|why| invalid(format!("{field}: {p:?} {why} (a path on the node)")))
}

/// What can be checked before anything is read: every field on its own.
pub(super) fn check_fields(req: &RecoveryRequest) -> Result<(), RecoveryError> {
    sendense_shared::names::validate_name("node", &req.node).map_err(|e| {
        RecoveryError::Invalid {
            detail: e.to_string(),
        }
    })?;
    check_vm_name(&req.vm_name)?;
    if let Some(disks) = &req.disks {
        if disks.is_empty() {
            return invalid(
                "disks: is empty; leave it out to recover every disk of the point".into(),
            );
        }
        let mut seen = BTreeSet::new();
        if let Some(dup) = disks.iter().find(|k| !seen.insert(**k)) {
            return invalid(format!(
                "disks: disk {dup} is named twice (each disk is one guest device)"
            ));
        }
    }
    use sendense_shared::api::{RECOVERY_CPUS, RECOVERY_MEMORY_MIB};
    if let Some(m) = req.memory_mib.filter(|m| !RECOVERY_MEMORY_MIB.contains(m)) {
        return invalid(format!(
            "memory_mib: {m} is outside {}..={} (what a node starts; it is in MiB)",
            RECOVERY_MEMORY_MIB.start(),
            RECOVERY_MEMORY_MIB.end()
        ));
    }
    if let Some(c) = req.cpus.filter(|c| !RECOVERY_CPUS.contains(c)) {
        return invalid(format!(
            "cpus: {c} is outside {}..={}",
            RECOVERY_CPUS.start(),
            RECOVERY_CPUS.end()
        ));
    }
    if req.speed_bps == Some(0) {
        return invalid(
            "speed_bps: must be more than 0 bytes per second; leave it out for no limit".into(),
        );
    }
    if let Some(d) = &req.overlay_dir {
        check_node_path("overlay_dir", d)?;
    }
    for (field, v) in [("kernel", &req.kernel), ("initrd", &req.initrd)] {
        if let Some(p) = v {
            check_node_path(field, p)?;
        }
    }
    if req.append.as_deref().is_some_and(|a| a.contains('\0')) {
        return invalid("append: must not contain NUL".into());
    }
    Ok(())
}

fn keys(b: &Backup) -> String {
    b.disk_results
        .iter()
        .map(|d| d.disk_key.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The disks (the request's, in its order, or all in disk-key order) and the configuration:
/// the request's fields over the point's recorded hardware over the defaults.
pub(super) fn plan(backup: &Backup, req: &RecoveryRequest) -> Result<Plan, RecoveryError> {
    let disks = match &req.disks {
        Some(wanted) => wanted
            .iter()
            .map(|k| pick(backup, *k))
            .collect::<Result<Vec<_>, _>>()?,
        None => {
            let mut all = backup.disk_results.clone();
            all.sort_by_key(|d| d.disk_key);
            all
        }
    };
    if disks.is_empty() {
        return invalid(format!(
            "disks: backup {} has no disks to recover",
            backup.backup_id
        ));
    }
    let hw = backup.hardware.as_deref();
    Ok(Plan {
        disks,
        memory_mib: req
            .memory_mib
            .or(hw.map(|h| h.memory_mib).filter(|m| *m > 0))
            .unwrap_or(DEFAULT_MEMORY_MIB),
        cpus: req
            .cpus
            .or(hw.map(|h| h.cpus).filter(|c| *c > 0))
            .unwrap_or(DEFAULT_CPUS),
        machine: hw.and_then(|h| h.machine.clone()),
        kernel: req.kernel.clone().or(hw.and_then(|h| h.kernel.clone())),
        initrd: req.initrd.clone().or(hw.and_then(|h| h.initrd.clone())),
        append: req.append.clone().or(hw.and_then(|h| h.append.clone())),
        speed_bps: req.speed_bps,
        overlay_dir: req.overlay_dir.clone(),
    })
}

fn pick(backup: &Backup, k: DiskKey) -> Result<DiskResult, RecoveryError> {
    match backup.disk_results.iter().find(|d| d.disk_key == k) {
        Some(d) => Ok(d.clone()),
        None => invalid(format!(
            "disks: backup {} has no disk {k} (it has {})",
            backup.backup_id,
            keys(backup)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sendense_shared::ids::BackupId;

    fn req() -> RecoveryRequest {
        RecoveryRequest {
            backup_id: BackupId("b1".into()),
            node: "node1".into(),
            vm_name: "web01-recovered".into(),
            disks: None,
            memory_mib: None,
            cpus: None,
            kernel: None,
            initrd: None,
            append: None,
            speed_bps: None,
            overlay_dir: None,
        }
    }

    fn refused(r: RecoveryRequest) -> String {
        check_fields(&r).unwrap_err().to_string()
    }

    #[test]
    fn vm_names_follow_the_contracts_pattern() {
        for ok in ["a", "web01", "Web.01_x-y", &"a".repeat(63)] {
            assert!(check_vm_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-web",
            ".web",
            "web 01",
            "web/01",
            "wéb",
            &"a".repeat(64),
        ] {
            let e = check_vm_name(bad).unwrap_err().to_string();
            assert!(e.starts_with("vm_name: "), "{bad}: {e}");
        }
    }

    #[test]
    fn each_field_is_named_in_its_refusal() {
        assert!(check_fields(&req()).is_ok());
        let cases: Vec<(RecoveryRequest, &str)> = vec![
            (
                RecoveryRequest {
                    node: "../n".into(),
                    ..req()
                },
                "node",
            ),
            (
                RecoveryRequest {
                    disks: Some(vec![]),
                    ..req()
                },
                "disks: is empty",
            ),
            (
                RecoveryRequest {
                    disks: Some(vec![DiskKey(2000), DiskKey(2001), DiskKey(2000)]),
                    ..req()
                },
                "disks: disk 2000 is named twice",
            ),
            (
                RecoveryRequest {
                    memory_mib: Some(0),
                    ..req()
                },
                "memory_mib",
            ),
            (
                RecoveryRequest {
                    cpus: Some(0),
                    ..req()
                },
                "cpus",
            ),
            (
                RecoveryRequest {
                    speed_bps: Some(0),
                    ..req()
                },
                "speed_bps",
            ),
            (
                RecoveryRequest {
                    overlay_dir: Some("relative/dir".into()),
                    ..req()
                },
                "overlay_dir",
            ),
            (
                RecoveryRequest {
                    overlay_dir: Some("/a/../b".into()),
                    ..req()
                },
                "overlay_dir",
            ),
            (
                RecoveryRequest {
                    kernel: Some("vmlinuz".into()),
                    ..req()
                },
                "kernel",
            ),
        ];
        for (r, field) in cases {
            let e = refused(r);
            assert!(e.starts_with(field), "{field}: {e}");
        }
    }

    fn point(hw: Option<sendense_shared::api::VmHardware>) -> Backup {
        let mut b: Backup = serde_json::from_value(serde_json::json!({
            "backup_id": "b1", "vm_context_id": "c", "vm_name": "web01",
            "backup_type": "full", "repository_id": "default", "status": "completed",
            "disk_results": [], "nbd_targets_string": "", "bytes_transferred": 0,
            "total_bytes": 0, "created_at": "2026-12-01T00:00:00Z"
        }))
        .expect("a minimal backup");
        for k in [2001, 2000] {
            b.disk_results.push(
                serde_json::from_value(serde_json::json!({
                    "disk_key": k, "unit_number": k - 2000, "nbd_port": null,
                    "nbd_export_name": "x", "qcow2_path": format!("/r/{k}.qcow2"),
                    "status": "completed", "bytes_done": 1, "bytes_total": 1
                }))
                .expect("a minimal disk"),
            );
        }
        b.hardware = hw.map(Box::new);
        b
    }

    #[test]
    fn the_request_wins_over_the_hardware_over_the_defaults() {
        let p = plan(&point(None), &req()).unwrap();
        let keys: Vec<i64> = p.disks.iter().map(|d| d.disk_key.0).collect();
        assert_eq!(keys, [2000, 2001], "every disk, in disk-key order");
        assert_eq!((p.memory_mib, p.cpus, p.machine), (512, 1, None));

        let hw = sendense_shared::api::VmHardware {
            memory_mib: 2048,
            cpus: 4,
            machine: Some("q35".into()),
            kernel: Some("/boot/vmlinuz".into()),
            append: Some("console=ttyS0".into()),
            ..Default::default()
        };
        let p = plan(&point(Some(hw.clone())), &req()).unwrap();
        assert_eq!((p.memory_mib, p.cpus), (2048, 4));
        assert_eq!(p.machine.as_deref(), Some("q35"));
        assert_eq!(p.kernel.as_deref(), Some("/boot/vmlinuz"));
        assert_eq!(p.initrd, None);

        let asked = RecoveryRequest {
            memory_mib: Some(1024),
            kernel: Some("/other/vmlinuz".into()),
            disks: Some(vec![DiskKey(2001), DiskKey(2000)]),
            ..req()
        };
        let p = plan(&point(Some(hw)), &asked).unwrap();
        assert_eq!((p.memory_mib, p.cpus), (1024, 4));
        assert_eq!(p.kernel.as_deref(), Some("/other/vmlinuz"));
        assert_eq!(p.append.as_deref(), Some("console=ttyS0"));
        let keys: Vec<i64> = p.disks.iter().map(|d| d.disk_key.0).collect();
        assert_eq!(keys, [2001, 2000], "the request's (guest) order");

        let unknown = RecoveryRequest {
            disks: Some(vec![DiskKey(2005)]),
            ..req()
        };
        let e = plan(&point(None), &unknown).unwrap_err().to_string();
        assert!(
            e.starts_with("disks: ") && e.contains("no disk 2005") && e.contains("2001, 2000"),
            "{e}"
        );
    }
}
