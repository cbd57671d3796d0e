//! Repositories and VMs as the hub keeps them (`/api/v1/repositories`, `/api/v1/vms`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{BackupId, DiskKey};

/// `POST /api/v1/repositories`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RepositoryRequest {
    #[schema(pattern = r"^(\.?[A-Za-z0-9_-])+\.?$", max_length = 128)]
    pub id: String,
    /// Absolute directory on the hub that holds the QCOW2 chains.
    pub path: String,
    /// Re-read every completed point of the repository this often (a scheduled verify job);
    /// absent: only on demand. At least 60 (the hub looks once a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 60)]
    pub verify_interval_secs: Option<u64>,
}

/// `PUT /api/v1/repositories/{id}`: what may change of a repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RepositoryUpdate {
    /// Re-read every completed point this often; `null` (or absent): only on demand. At least
    /// 60.
    #[serde(default)]
    #[schema(minimum = 60)]
    pub verify_interval_secs: Option<u64>,
}

/// A repository as the hub reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmDisk {
    pub disk_key: DiskKey,
    /// Position on its controller: 0, 1, 2 ... (distinct per disk).
    pub unit_number: i32,
    /// Virtual size of the disk: a whole number of 512-byte sectors, not 0.
    #[schema(minimum = 512, multiple_of = 512)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmRequest {
    #[schema(pattern = r"^(\.?[A-Za-z0-9_-])+\.?$", max_length = 128)]
    pub vm_name: String,
    /// Node that owns the VM, or `null` for a VM whose exports are written by someone else.
    #[serde(default)]
    #[schema(pattern = r"^(\.?[A-Za-z0-9_-])+\.?$", max_length = 128)]
    pub node: Option<String>,
    /// At least one.
    #[schema(min_items = 1)]
    pub disks: Vec<VmDisk>,
}

/// A VM as the hub reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// The name the VM's node knows it by, when that differs from `vm_name`: another node's VM
    /// held the name first, so the hub registered this one as `<name>.<node>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_vm_name: Option<String>,
}

impl Vm {
    /// The name to use with the VM's node (its backup start names the VM this way).
    pub fn name_on_node(&self) -> &str {
        self.node_vm_name.as_deref().unwrap_or(&self.vm_name)
    }
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
