//! Restore jobs: the hub's `/api/v1/restores`, the node's `/api/v1/restore/*`, and what the
//! node reports of one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{JobStatus, NbdExport};
use crate::ids::{BackupId, DiskKey, NbdPort};

/// Where a restore writes: a new image file on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RestoreTarget {
    /// Name of a registered node; it writes the image.
    pub node: String,
    /// Absolute path, on the node, of the new QCOW2 image (`.qcow2`); must not exist yet, its
    /// directory must. With `vm`: the VM's disk image to replace; left out (empty), the disk's
    /// image as the point recorded it (its hardware).
    #[serde(default)]
    pub path: String,
    /// Into this VM's own disk (the hub's name of a VM of `node`, as `GET /api/v1/vms` lists
    /// it): the VM must be powered off. The node restores into a new image beside the disk and
    /// renames it over the disk only once it was read back equal, so a failed restore leaves
    /// the VM's disk as it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
}

/// `POST /api/v1/restores` of the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RestoreRequest {
    /// A completed (verified) backup: the point to restore.
    pub backup_id: BackupId,
    /// Which disk of it; may be left out when the backup has one disk.
    #[serde(default)]
    pub disk_key: Option<DiskKey>,
    pub target: RestoreTarget,
}

/// A restore as the hub reports it (`GET /api/v1/restores[/{id}]`). Status: `preparing`
/// (export of the backup point), `running` (the node copies), then `completed` (copied and
/// verified on the node) or `failed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Restore {
    pub restore_id: String,
    pub backup_id: BackupId,
    pub vm_name: String,
    pub disk_key: DiskKey,
    pub target: RestoreTarget,
    pub status: JobStatus,
    /// The backup point (QCOW2 on the hub, with its backing chain) served read-only.
    pub source_qcow2: String,
    /// Port of the read-only qemu-nbd while the restore holds it.
    pub nbd_port: Option<NbdPort>,
    pub nbd_export_name: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub error_message: Option<String>,
}

/// `POST /api/v1/restore/start` of the node: copy `source` into a new image at `path`. The node
/// runs it as a job of its own (drained on shutdown, its qemu-nbd journalled for start-up
/// recovery) and pushes progress and its result to the hub
/// (`POST /api/v1/restores/{id}/progress` and `/complete`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRestoreStart {
    #[schema(pattern = r"^(\.?[A-Za-z0-9_-])+\.?$", max_length = 128)]
    pub restore_id: String,
    /// NBD URI of the hub's read-only export of the backup point (for logs; the node connects
    /// to `source_export` when present).
    pub source: String,
    /// The same export, structured. The host is the hub's; a node behind a tunnel reaches it
    /// on its `--tunnel-bind` address, as for backup targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_export: Option<NbdExport>,
    /// Absolute path of the new QCOW2 image on the node.
    #[schema(pattern = "^/")]
    pub path: String,
    /// Virtual size of the new image.
    pub size_bytes: u64,
    /// Cell size of the whole-disk checksum grid to report in [`RestoreCompletion::grid`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum_grid: Option<u64>,
    /// Replace the disk image `path` (which must exist) of this powered-off VM of the node
    /// (a name of its `[qmp]` table): refused while the VM's QMP socket answers or a process
    /// holds `path` open. The copy goes into a new image beside `path`, in `path`'s format and
    /// with its mode and owner, renamed over it once read back equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_vm: Option<String>,
}

/// `GET /api/v1/restore/{id}` of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRestoreState {
    pub restore_id: String,
    pub path: String,
    pub status: JobStatus,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_written: u64,
    /// Ranges read back from the new image and found equal to what was read from the source.
    pub verified_ranges: u64,
    pub error_message: Option<String>,
}

/// `POST /api/v1/restores/{id}/progress` of the hub (node → hub, about once a second).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RestoreProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes per second over the last few seconds.
    #[serde(default)]
    pub rate_bps: u64,
}

/// `POST /api/v1/restores/{id}/complete` of the hub (node → hub): the restore's end as the node
/// saw it. `completed` means copied, flushed and read back equal; a `failed` or `cancelled`
/// restore's partial image has been deleted by the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RestoreCompletion {
    pub status: JobStatus,
    pub bytes_written: u64,
    /// Ranges read back from the new image and found equal to what was read from the source.
    pub verified_ranges: u64,
    #[serde(default)]
    pub error_message: Option<String>,
    /// The machine-readable cause of a failure, when the node has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<crate::errors::ErrorCode>,
    /// Whole-disk checksums of what the node read and wrote (grid of
    /// [`NodeRestoreStart::checksum_grid`]): the hub compares them with the point's stored
    /// checksums before it calls the restore completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<super::GridChecksums>,
}
