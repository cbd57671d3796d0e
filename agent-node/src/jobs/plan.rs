//! Validation of a backup start, without I/O: the request and the VM as the driver described it
//! become a [`BackupPlan`] (routed targets, the snapshot request, the disks to report) or a
//! typed [`StartError`]. [`super::Jobs::start`] gathers the inputs (the driver's answer), calls
//! [`validate`], checks the incremental base, then applies the plan (registers and spawns).

use crate::source::{SnapshotRequest, SourceError, SourceVm};
use sendense_shared::api::{BackupType, NbdTls, NodeBackupStart};
use sendense_shared::errors::ErrorCode;
use sendense_shared::ids::{BackupId, DiskKey};
use sendense_shared::nbd::NbdAddr;
use sendense_shared::targets::{NbdUri, parse_targets};
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// Why a start was refused.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("unknown VM {vm:?}")]
    UnknownVm { vm: String },
    #[error("backup_id is empty")]
    EmptyId,
    #[error("nbd_targets: {0}")]
    Targets(#[from] sendense_shared::targets::TargetsError),
    #[error("targets: disk key {disk_key} appears twice")]
    DuplicateTarget { disk_key: DiskKey },
    #[error("targets: disk {disk_key}: {why}")]
    BadTarget {
        disk_key: DiskKey,
        why: &'static str,
    },
    #[error("nbd_targets misses disk(s) {} of VM {vm}: a VM is backed up whole", key_list(.missing))]
    MissingDisks { vm: String, missing: Vec<DiskKey> },
    #[error("nbd_targets names disk key(s) {} that VM {vm} does not have", key_list(.unknown))]
    UnknownDisks { vm: String, unknown: Vec<DiskKey> },
    #[error("VM {vm} already has a running backup {backup_id}")]
    VmBusy { vm: String, backup_id: BackupId },
    #[error("backup id {backup_id} was already used (status {status})")]
    DuplicateId {
        backup_id: BackupId,
        status: &'static str,
    },
    /// The incremental has no valid changed-block map: do a full backup.
    #[error("{0}")]
    BitmapMissing(SourceError),
    #[error("{0}")]
    Source(SourceError),
    #[error("node is shutting down")]
    ShuttingDown,
}

impl StartError {
    /// The wire code of this refusal, where one names it exactly.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            StartError::BitmapMissing(_) => Some(ErrorCode::BitmapMissing),
            _ => None,
        }
    }
}

pub(crate) fn key_list(keys: &[DiskKey]) -> String {
    keys.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A start that passed validation: everything [`super::Jobs`] needs to run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPlan {
    /// Each disk's target, routed (through the tunnel's forwards when there is one).
    pub targets: Vec<(DiskKey, NbdAddr)>,
    pub request: SnapshotRequest,
    /// (disk key, size) of every disk of the VM, in the driver's order.
    pub disks: Vec<(DiskKey, u64)>,
    /// Cell size of the whole-disk checksum grid the hub asked for (none: no grid).
    pub checksum_grid: Option<u64>,
    /// TLS material of the targets that require it (the hub's `nbd_tls`), by disk.
    pub target_tls: BTreeMap<DiskKey, NbdTls>,
}

/// Checks `req` against `vm` and routes every target through `route`. Targets come from
/// `req.targets` (structured) when it is not empty, otherwise from the `nbd_targets` string.
pub fn validate(
    req: &NodeBackupStart,
    vm: &SourceVm,
    route: impl Fn(NbdAddr) -> NbdAddr,
) -> Result<BackupPlan, StartError> {
    if req.backup_id.0.trim().is_empty() {
        return Err(StartError::EmptyId);
    }
    let targets = targets(req)?;
    let vm_keys: BTreeSet<DiskKey> = vm.disks.iter().map(|d| d.disk_key).collect();
    let given: BTreeSet<DiskKey> = targets.iter().map(|(k, _)| *k).collect();
    let unknown: Vec<DiskKey> = given.difference(&vm_keys).copied().collect();
    if !unknown.is_empty() {
        return Err(StartError::UnknownDisks {
            vm: vm.vm_name.clone(),
            unknown,
        });
    }
    let missing: Vec<DiskKey> = vm_keys.difference(&given).copied().collect();
    if !missing.is_empty() {
        return Err(StartError::MissingDisks {
            vm: vm.vm_name.clone(),
            missing,
        });
    }
    Ok(BackupPlan {
        targets: targets
            .into_iter()
            .map(|(k, uri)| (k, route(NbdAddr::from(uri))))
            .collect(),
        request: snapshot_request(req),
        disks: vm
            .disks
            .iter()
            .map(|d| (d.disk_key, d.size_bytes))
            .collect(),
        checksum_grid: req.checksum_grid,
        target_tls: req
            .targets
            .iter()
            .filter_map(|t| Some((t.disk_key, t.export.tls.clone()?)))
            .collect(),
    })
}

/// What the driver is asked for: the snapshot of the request's VM, and for an incremental the
/// base it must start from.
pub fn snapshot_request(req: &NodeBackupStart) -> SnapshotRequest {
    SnapshotRequest {
        backup_id: req.backup_id.clone(),
        vm_name: req.vm_name.clone(),
        backup_type: req.backup_type,
        previous_backup_id: req.previous_backup_id.clone(),
        previous_change_ids: req
            .previous_change_ids
            .iter()
            .map(|c| (c.disk_key, c.change_id.clone()))
            .collect(),
        require_application_consistency: req.require_application_consistency,
    }
}

/// Whether the plan needs the driver's incremental-base check before it is applied.
pub fn needs_base_check(plan: &BackupPlan) -> bool {
    plan.request.backup_type == BackupType::Incremental
}

/// The request's targets as URIs: structured when given (no string round trip), else parsed.
fn targets(req: &NodeBackupStart) -> Result<Vec<(DiskKey, NbdUri)>, StartError> {
    if req.targets.is_empty() {
        return Ok(parse_targets(&req.nbd_targets)?
            .into_iter()
            .map(|t| (t.disk_key, t.uri))
            .collect());
    }
    let mut out: Vec<(DiskKey, NbdUri)> = Vec::with_capacity(req.targets.len());
    for t in &req.targets {
        let bad = |why| StartError::BadTarget {
            disk_key: t.disk_key,
            why,
        };
        // The same limits the string parser applies to its URIs.
        let e = &t.export;
        if let Some(socket) = &e.socket {
            sendense_shared::targets::check_socket(socket).map_err(bad)?;
        } else if e.host.is_empty() || e.host.contains(['/', '[', ']', ',', ' ', '\0']) {
            return Err(bad("empty host or a bad character in it"));
        } else if e.port == 0 {
            return Err(bad("port 0"));
        }
        if e.export.is_empty() || e.export.len() > 4096 || e.export.chars().any(char::is_control) {
            return Err(bad(
                "empty export name, longer than 4096 bytes, or a control character",
            ));
        }
        if out.iter().any(|(k, _)| *k == t.disk_key) {
            return Err(StartError::DuplicateTarget {
                disk_key: t.disk_key,
            });
        }
        out.push((t.disk_key, NbdUri::from(t.export.clone())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceDisk;
    use sendense_shared::api::{DiskChangeId, DiskTarget, NbdExport};

    fn vm(keys: &[i64]) -> SourceVm {
        SourceVm {
            vm_name: "vm1".into(),
            vm_id: "vm1".into(),
            disks: keys
                .iter()
                .map(|&k| SourceDisk {
                    disk_key: DiskKey(k),
                    unit_number: 0,
                    size_bytes: 1 << 20,
                    label: format!("disk-{k}"),
                    controller: None,
                    backing_file: None,
                    thin_provisioned: None,
                })
                .collect(),
            driver: "qemu",
            change_tracking: None,
        }
    }

    fn req(nbd_targets: &str, targets: Vec<DiskTarget>) -> NodeBackupStart {
        NodeBackupStart {
            backup_id: BackupId("b1".into()),
            vm_name: "vm1".into(),
            backup_type: BackupType::Incremental,
            nbd_targets: nbd_targets.into(),
            targets,
            previous_backup_id: Some(BackupId("b0".into())),
            previous_change_ids: vec![DiskChangeId {
                disk_key: DiskKey(2000),
                change_id: "c/1".into(),
            }],
            checksum_grid: None,
            require_application_consistency: false,
        }
    }

    fn target(key: i64, host: &str, port: u16) -> DiskTarget {
        DiskTarget {
            disk_key: DiskKey(key),
            export: NbdExport {
                tls: None,
                host: host.into(),
                port,
                export: format!("vm1-disk-{key}"),
                socket: None,
            },
        }
    }

    /// The tunnel's rule: loopback ports of the hub go to the bind address.
    fn tunnel(a: NbdAddr) -> NbdAddr {
        match a {
            NbdAddr::Tcp { port, export, .. } => NbdAddr::Tcp {
                host: "127.0.0.2".into(),
                port,
                export,
            },
            other => other,
        }
    }

    fn tcp(host: &str, port: u16, key: i64) -> NbdAddr {
        NbdAddr::Tcp {
            host: host.into(),
            port,
            export: format!("vm1-disk-{key}"),
        }
    }

    #[test]
    fn a_string_plan_is_routed_and_carries_the_snapshot_request() {
        let r = req(
            "2000:nbd://127.0.0.1:10100/vm1-disk-2000,2001:nbd://[::1]:10101/vm1-disk-2001",
            vec![],
        );
        let plan = validate(&r, &vm(&[2000, 2001]), tunnel).unwrap();
        assert_eq!(
            plan.targets,
            vec![
                (DiskKey(2000), tcp("127.0.0.2", 10100, 2000)),
                (DiskKey(2001), tcp("127.0.0.2", 10101, 2001)),
            ]
        );
        assert_eq!(
            plan.disks,
            vec![(DiskKey(2000), 1 << 20), (DiskKey(2001), 1 << 20)]
        );
        assert_eq!(plan.request.backup_id, BackupId("b1".into()));
        assert_eq!(plan.request.previous_backup_id, Some(BackupId("b0".into())));
        assert_eq!(
            plan.request
                .previous_change_ids
                .get(&DiskKey(2000))
                .map(String::as_str),
            Some("c/1")
        );
        assert!(needs_base_check(&plan));
    }

    #[test]
    fn structured_targets_win_over_the_string() {
        // The string is junk: with structured targets it is only for logs.
        let r = req("not a targets string", vec![target(2000, "::1", 10100)]);
        let plan = validate(&r, &vm(&[2000]), |a| a).unwrap();
        assert_eq!(plan.targets, vec![(DiskKey(2000), tcp("::1", 10100, 2000))]);
        let plan = validate(&r, &vm(&[2000]), tunnel).unwrap();
        assert_eq!(
            plan.targets,
            vec![(DiskKey(2000), tcp("127.0.0.2", 10100, 2000))]
        );
    }

    #[test]
    fn refusals_are_typed() {
        let one = vm(&[2000]);
        let mut r = req("2000:nbd://127.0.0.1:1/e", vec![]);
        r.backup_id = BackupId(" ".into());
        assert!(matches!(
            validate(&r, &one, |a| a),
            Err(StartError::EmptyId)
        ));
        let r = req("x", vec![]);
        assert!(matches!(
            validate(&r, &one, |a| a),
            Err(StartError::Targets(_))
        ));
        let r = req("", vec![target(2000, "h", 1), target(2000, "h", 2)]);
        assert!(matches!(
            validate(&r, &one, |a| a),
            Err(StartError::DuplicateTarget {
                disk_key: DiskKey(2000)
            })
        ));
        for bad in [target(2000, "", 1), target(2000, "h", 0), {
            let mut t = target(2000, "h", 1);
            t.export.export = "a\nb".into();
            t
        }] {
            let r = req("", vec![bad]);
            assert!(
                matches!(validate(&r, &one, |a| a), Err(StartError::BadTarget { .. })),
                "{r:?}"
            );
        }
        let r = req("", vec![target(2000, "h", 1), target(2002, "h", 2)]);
        match validate(&r, &one, |a| a) {
            Err(e @ StartError::UnknownDisks { .. }) => {
                assert!(e.to_string().contains("2002"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        let r = req("", vec![target(2000, "h", 1)]);
        match validate(&r, &vm(&[2000, 2001]), |a| a) {
            Err(e @ StartError::MissingDisks { .. }) => {
                assert!(e.to_string().contains("2001"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_bitmap_missing_has_its_own_code() {
        let e = StartError::BitmapMissing(SourceError::IncrementalBase {
            vm: "vm1".into(),
            disk_key: DiskKey(2000),
            detail: "no bitmap".into(),
        });
        assert_eq!(e.code(), Some(ErrorCode::BitmapMissing));
        assert_eq!(StartError::EmptyId.code(), None);
    }
}
