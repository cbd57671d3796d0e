//! A QEMU VM's hardware as the node recorded it at backup time ([`VmHardware`]): what an
//! instant recovery or a restore as a new VM starts the VM with. Node → hub in the backup's
//! completion report ([`super::CompletionReport::hardware`]), stored per backup point, shown in
//! [`super::Backup::hardware`].

use serde::{Deserialize, Serialize};

use crate::ids::DiskKey;

/// The hardware of a QEMU VM at the time of a backup, from its QMP answers and its command
/// line (`/proc/PID/cmdline` of the QEMU process behind the QMP socket).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmHardware {
    /// Guest memory (`query-memory-size-summary`'s base memory), MiB.
    pub memory_mib: u64,
    /// vCPUs (`query-cpus-fast`).
    pub cpus: u32,
    /// Machine type as on the command line or QOM (`pc-i440fx-8.0`, `q35`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Accelerator(s) of the command line (`kvm`, `tcg`, `kvm:tcg`), when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// The guest's disks, in disk-key order (the backup's disks).
    #[serde(default)]
    pub disks: Vec<HardwareDisk>,
    #[serde(default)]
    pub nics: Vec<HardwareNic>,
    /// Direct kernel boot (`-kernel`), as a path on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// The kernel command line (`-append`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// The QEMU process's command line; empty when it could not be read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    /// The QEMU process (peer of the QMP socket) at backup time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// One disk of a [`VmHardware`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HardwareDisk {
    pub disk_key: DiskKey,
    /// The guest device's id (`-device ...,id=vd0`) or the drive's name.
    pub device_id: String,
    pub virtual_size: u64,
    /// `virtio`, `scsi`, `ide`, `sata`, `nvme`, or QEMU's device type when none of these.
    pub bus: String,
    /// The image behind the disk on the node (QEMU's `filename` of the format node).
    pub image_path: String,
    /// The format node's driver (`qcow2`, `raw`).
    pub format: String,
}

/// One network interface of a [`VmHardware`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HardwareNic {
    /// QEMU's name of the NIC (its device id, or e.g. `net0`).
    pub name: String,
    /// `52:54:00:12:34:56`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The device model (`virtio-net-pci`, `e1000`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}
