//! Repositories and VMs as the hub keeps them (`/api/v1/repositories`, `/api/v1/vms`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{BackupId, DiskKey};

/// `POST /api/v1/repositories`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryRequest {
    pub id: String,
    /// Absolute directory on the hub that holds the QCOW2 chains.
    pub path: String,
    /// Re-read every completed point of the repository this often (a scheduled verify job);
    /// absent: only on demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_interval_secs: Option<u64>,
}

/// `PUT /api/v1/repositories/{id}`: what may change of a repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryUpdate {
    /// Re-read every completed point this often; `null` (or absent): only on demand.
    #[serde(default)]
    pub verify_interval_secs: Option<u64>,
}

/// A repository as the hub reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repository {
    pub id: String,
    pub path: String,
    pub free_bytes: u64,
    pub total_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_interval_secs: Option<u64>,
    /// When the last scheduled verify job of this repository ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified_at: Option<DateTime<Utc>>,
}

/// One disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    pub disk_key: DiskKey,
    /// Position on its controller: 0, 1, 2 ... (distinct per disk).
    pub unit_number: i32,
    /// Virtual size of the disk.
    pub size_bytes: u64,
    /// Human label, e.g. the QEMU device id or `"Hard disk 1"`.
    pub label: String,
    /// Controller the disk hangs on, e.g. `"SCSI controller 0"` (vSphere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    /// The hypervisor's file behind the disk, e.g. `"[datastore1] vm1/vm1.vmdk"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Thin (space allocated on write) or thick, when the hypervisor says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thin_provisioned: Option<bool>,
}

/// `POST /api/v1/vms`: register a VM by hand (or from node inventory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequest {
    pub vm_name: String,
    /// Node that owns the VM, or `null` for a VM whose exports are written by someone else.
    #[serde(default)]
    pub node: Option<String>,
    pub disks: Vec<VmDisk>,
}

/// A VM as the hub reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub vm_context_id: String,
    pub vm_name: String,
    pub node: Option<String>,
    pub disks: Vec<VmDisk>,
    /// Last completed backup, if any.
    #[serde(default)]
    pub last_backup_id: Option<BackupId>,
    #[serde(default)]
    pub last_backup_at: Option<DateTime<Utc>>,
    /// Source driver that serves the VM (`"qemu"`, `"vsphere"`), as the node's inventory said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Whether the hypervisor tracks changed blocks (vSphere CBT), as the node's inventory said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_tracking: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_request_node_defaults_to_none() {
        let r: VmRequest = serde_json::from_str(
            r#"{"vm_name":"pg","disks":[{"disk_key":2000,"unit_number":1,"size_bytes":1,"label":"a"}]}"#,
        )
        .unwrap();
        assert_eq!(r.node, None);
        assert_eq!(r.disks[0].disk_key, DiskKey(2000));
        assert_eq!(r.disks[0].unit_number, 1);
    }
}
