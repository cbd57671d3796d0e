//! Instant recoveries (issue 15): the hub's `/api/v1/recoveries`, the node's
//! `/api/v1/recovery/*`, and what the node reports of one.
//!
//! A recovery boots a backup point as a new QEMU VM on a node at once: the hub serves every
//! chosen disk's chain read-only over NBD, the node starts QEMU on local QCOW2 overlays backed
//! by those exports and pulls every block home (`block-stream`) while the guest runs. It is
//! `completed` when every disk is home and the VM references no NBD node: the VM then runs
//! from its overlays alone and outlives the job (and the node daemon).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{JobStatus, NbdExport};
use crate::ids::{BackupId, DiskKey, NbdPort};

/// Guest memory a node starts a recovered VM with, MiB (checked by the hub and the node alike).
pub const RECOVERY_MEMORY_MIB: std::ops::RangeInclusive<u64> = 64..=65536;
/// vCPUs a node starts a recovered VM with.
pub const RECOVERY_CPUS: std::ops::RangeInclusive<u32> = 1..=64;

/// `POST /api/v1/recoveries` of the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecoveryRequest {
    /// A completed backup point whose integrity allows reading it (as for a restore).
    pub backup_id: BackupId,
    /// Name of a registered node; it runs the recovered VM.
    pub node: String,
    /// Name of the new VM on the node (QEMU's `-name`, the overlay files' stem); must not be
    /// running there yet.
    #[schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
    pub vm_name: String,
    /// Which disks of the point, in the order the guest sees them (`vda`, `vdb`, ...); all
    /// of them, in disk-key order, when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskKey>>,
    /// Guest memory; the point's recorded hardware, else 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 64, maximum = 65536)]
    pub memory_mib: Option<u64>,
    /// vCPUs; the point's recorded hardware, else 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64)]
    pub cpus: Option<u32>,
    /// Direct kernel boot: paths on the node; the point's recorded `-kernel`/`-initrd`/
    /// `-append` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// Upper bound of each disk's stream, bytes per second (`block-stream`'s `speed`);
    /// unlimited when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub speed_bps: Option<u64>,
    /// Absolute directory on the node for the overlays (the recovered disks); the node's
    /// recovery directory when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^/")]
    pub overlay_dir: Option<String>,
}

/// One disk of a [`Recovery`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecoveryDisk {
    pub disk_key: DiskKey,
    /// The point's image of this disk on the hub (with its backing chain), served read-only.
    pub source_qcow2: String,
    /// Port of the read-only qemu-nbd while the recovery holds it.
    pub nbd_port: Option<NbdPort>,
    pub nbd_export_name: String,
    /// The qemu-nbd serving it, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_nbd_pid: Option<u32>,
    /// The local overlay on the node (the recovered disk), once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<String>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes per second over the last few seconds.
    #[serde(default)]
    pub rate_bps: u64,
    /// The stream's state as QEMU reports it (`running`, `paused`, ...), `finished` once the
    /// disk is home; `pending` before it started.
    pub stream: String,
}

/// A recovery as the hub reports it (`GET /api/v1/recoveries[/{id}]`). Status: `preparing`
/// (exports), `running` (the VM runs, the disks stream home), then `completed` (every disk
/// home, the VM runs from local disks alone), `failed` or `cancelled` (the VM stopped, its
/// overlays removed: what the guest wrote is lost).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Recovery {
    pub recovery_id: String,
    pub backup_id: BackupId,
    /// The VM the point was taken of.
    pub source_vm: String,
    pub node: String,
    /// The new VM on the node.
    pub vm_name: String,
    pub status: JobStatus,
    pub disks: Vec<RecoveryDisk>,
    /// QEMU's run state on the node (`running`, `paused`, `io-error`), as last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_state: Option<String>,
    /// The recovered VM's QEMU process on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_pid: Option<u32>,
    /// The VM's QMP socket and serial console log on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp_socket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_log: Option<String>,
    /// While the VM or a stream is paused because the hub's export does not answer: what is
    /// at risk, in words for the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When the guest was started (the request to this is the time to a running VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub error_message: Option<String>,
}

/// One disk of a [`NodeRecoveryStart`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRecoveryDisk {
    pub disk_key: DiskKey,
    /// The hub's read-only export of the disk's chain; reached through the tunnel as for a
    /// restore's source.
    pub export: NbdExport,
    /// Virtual size (the overlay's size).
    pub size_bytes: u64,
}

/// `POST /api/v1/recovery/start` of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRecoveryStart {
    #[schema(pattern = r"^(\.?[A-Za-z0-9_-])+\.?$", max_length = 128)]
    pub recovery_id: String,
    #[schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
    pub vm_name: String,
    #[schema(minimum = 64, maximum = 65536)]
    pub memory_mib: u64,
    #[schema(minimum = 1, maximum = 64)]
    pub cpus: u32,
    /// QEMU machine type (`q35`, `pc`); the node's default when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    pub machine: Option<String>,
    /// An existing file on the node (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^/")]
    pub kernel: Option<String>,
    /// An existing file on the node; needs `kernel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^/")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub speed_bps: Option<u64>,
    /// Absolute directory for the overlays; the node's recovery directory when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^/")]
    pub overlay_dir: Option<String>,
    /// In guest order.
    #[schema(min_items = 1)]
    pub disks: Vec<NodeRecoveryDisk>,
}

/// One disk's stream, node → hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecoveryDiskProgress {
    pub disk_key: DiskKey,
    pub overlay: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    #[serde(default)]
    pub rate_bps: u64,
    /// As in [`RecoveryDisk::stream`].
    pub stream: String,
}

/// `GET /api/v1/recovery/{id}` of the node, and `POST /api/v1/recoveries/{id}/progress` of
/// the hub (node → hub, about once a second).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRecoveryState {
    pub recovery_id: String,
    pub vm_name: String,
    pub status: JobStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp_socket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_log: Option<String>,
    pub disks: Vec<RecoveryDiskProgress>,
    /// As in [`Recovery::stalled`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

/// `POST /api/v1/recoveries/{id}/complete` of the hub (node → hub): the recovery's end as the
/// node saw it. `completed`: every disk home and no NBD node left in the VM; `failed` or
/// `cancelled`: the VM stopped and its overlays removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecoveryCompletion {
    pub status: JobStatus,
    pub state: NodeRecoveryState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<crate::errors::ErrorCode>,
}

/// `POST /api/v1/recoveries/{id}/speed` of the hub and `POST /api/v1/recovery/{id}/speed` of the
/// node: a new upper bound of each disk's stream (`block-job-set-speed`), e.g. lifted once the
/// guest is up, or lowered while the link is needed for something else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecoverySpeed {
    /// Bytes per second per disk; 0 lifts the bound.
    pub speed_bps: u64,
}
