//! Backup jobs: the hub's `/api/v1/backups`, what the node reports of one (progress, completion
//! with checksums), and the node's `/api/v1/backup/*`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{BackupType, Consistency, DiskStatus, GridChecksums, Integrity, JobStatus, NbdExport};
use crate::ids::{BackupId, DiskKey, NbdPort};

/// `POST /api/v1/backups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupRequest {
    #[schema(pattern = r"^(\.?[A-Za-z0-9_-])+\.?$", max_length = 128)]
    pub vm_name: String,
    #[schema(pattern = r"^(\.?[A-Za-z0-9_-])+\.?$", max_length = 128)]
    pub repository_id: String,
    pub backup_type: BackupType,
    /// Fail the backup (`consistency_required`, naming the cause) rather than keep a
    /// crash-consistent point when the guest's file systems cannot be frozen.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_application_consistency: bool,
}

/// One disk of a backup job, as in the backup response's `disk_results[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskResult {
    pub disk_key: DiskKey,
    pub unit_number: i32,
    /// Port of this disk's qemu-nbd while the job holds it.
    pub nbd_port: Option<NbdPort>,
    pub nbd_export_name: String,
    /// Path of the target QCOW2 on the hub.
    pub qcow2_path: String,
    pub qemu_nbd_pid: Option<u32>,
    pub status: DiskStatus,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub error_message: Option<String>,
    /// The hypervisor's change id the disk was copied at (vSphere CBT), once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id: Option<String>,
    /// Whole-disk checksums: `writer` (computed by the node from the snapshot), `hub`
    /// (computed by the hub from the stopped image), absent while none are stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksums_source: Option<String>,
}

/// A backup job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Backup {
    pub backup_id: BackupId,
    pub vm_context_id: String,
    pub vm_name: String,
    pub backup_type: BackupType,
    pub repository_id: String,
    pub status: JobStatus,
    pub disk_results: Vec<DiskResult>,
    /// `2000:nbd://127.0.0.1:10100/vm-disk-2000,...` while the exports are up.
    pub nbd_targets_string: String,
    pub bytes_transferred: u64,
    pub total_bytes: u64,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub error_message: Option<String>,
    /// What is known of the point's bytes; only `verified`, `hub_computed` and `legacy` points
    /// are offered for restore.
    #[serde(default = "unverified")]
    pub integrity: Integrity,
    /// Why (e.g. the verify job and the cell that differed, or the parent that is corrupt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity_detail: Option<String>,
    /// When the point was last read back equal to its stored checksums.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<DateTime<Utc>>,
    /// Application- or crash-consistent, and why; absent when the writer did not say (a
    /// hub-alone writer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// Exempt from pruning and from the retention counts.
    #[serde(default)]
    pub protected: bool,
    /// The policy whose scheduled run made this point (absent for a manual backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_id: Option<String>,
    /// The point's last boot check (a verify job with `boot`), absent when it was never booted.
    /// Boxed: a backup travels in events, and most have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_check: Option<Box<super::BootCheck>>,
    /// The VM's hardware as the node recorded it at backup time (QEMU VMs; absent for other
    /// drivers and for points taken before it was recorded). Boxed: most of a backup's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<Box<super::VmHardware>>,
}

fn unverified() -> Integrity {
    Integrity::Unverified
}

/// Progress of one disk, node → hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskProgress {
    pub disk_key: DiskKey,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub status: DiskStatus,
    /// Bytes of the target the copy actually wrote (data plus explicit zeroes), without the
    /// areas it skipped (holes of a full, unchanged blocks of an incremental). `bytes_done`
    /// counts skipped areas too, so that it reaches `bytes_total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_transferred: Option<u64>,
}

/// `POST /api/v1/backups/{id}/progress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProgressReport {
    pub disks: Vec<DiskProgress>,
}

/// Final state of one disk, node → hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskCompletion {
    pub disk_key: DiskKey,
    pub status: DiskStatus,
    #[serde(default)]
    pub error_message: Option<String>,
    /// Chunk checksums computed from the snapshot while copying (for verification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksums: Option<ChunkChecksums>,
    /// Whole-disk checksums on the grid the hub asked for: what the hub stores as the point's
    /// truth and reads the whole image chain back against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<GridChecksums>,
    /// Bytes of the target the copy wrote (see [`DiskProgress::bytes_transferred`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_transferred: Option<u64>,
    /// The hypervisor's change id of the snapshot this disk was copied from (vSphere CBT): the
    /// next incremental asks for the blocks changed since it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id: Option<String>,
}

/// Checksums of the data a copy wrote, for verification after the copy: the hub reads each range
/// back from the target and compares. Ranges cover every byte the copy wrote (data and zeroes),
/// split at `chunk_size` boundaries; ranges it skipped (holes on a fresh target, unchanged areas of
/// an incremental) are not listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChunkChecksums {
    /// Largest length of one range (the split grid), e.g. 4 MiB.
    pub chunk_size: u64,
    pub ranges: Vec<ChecksumRange>,
}

/// BLAKE3 of `length` bytes of the disk at `offset`, as the snapshot held them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChecksumRange {
    pub offset: u64,
    pub length: u64,
    /// Lower-case hex.
    pub blake3: String,
}

/// Terminal outcome reported by the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CompletionStatus {
    Completed,
    Failed,
}

/// `POST /api/v1/backups/{id}/complete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CompletionReport {
    pub status: CompletionStatus,
    #[serde(default)]
    pub error_message: Option<String>,
    pub disks: Vec<DiskCompletion>,
    /// How consistent the snapshot was (guest file systems frozen or not), and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// The VM's hardware at snapshot time (QEMU driver), recorded with the point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<super::VmHardware>,
}

/// `POST /api/v1/backup/start` of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeBackupStart {
    /// Not blank.
    #[schema(value_type = String, pattern = r"\S")]
    pub backup_id: BackupId,
    pub vm_name: String,
    pub backup_type: BackupType,
    /// The NBD targets string (see [`crate::targets`]); kept for logs and older nodes.
    pub nbd_targets: String,
    /// The same targets as structured JSON; a node uses these when present and parses
    /// `nbd_targets` only when this is empty (a hub older than this field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<DiskTarget>,
    /// Incremental only: the backup the hub's chain ends with (the new image's backing file).
    /// The node refuses (409, `bitmap_missing`) when its change tracking does not start
    /// exactly at that backup's snapshot; absent means "whatever the node tracks".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_backup_id: Option<BackupId>,
    /// Incremental only: the change id each disk of the previous backup was copied at (drivers
    /// with hypervisor change tracking, i.e. vSphere CBT). A disk without one makes the node
    /// answer `409 bitmap_missing`, and the hub falls back to a full backup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_change_ids: Vec<DiskChangeId>,
    /// Cell size of the whole-disk checksum grid ([`GridChecksums`]) the node reports in
    /// [`DiskCompletion::grid`]; absent (an older hub): the node sends no grid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum_grid: Option<u64>,
    /// Fail the backup (`consistency_required`) rather than take a crash-consistent snapshot
    /// when the guest's file systems cannot be frozen.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_application_consistency: bool,
}

/// A disk's change id (vSphere CBT), e.g. `"52 9c 1d ... 4b/17"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskChangeId {
    pub disk_key: DiskKey,
    pub change_id: String,
}

/// One disk's target of a node copy job, structured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskTarget {
    pub disk_key: DiskKey,
    pub export: NbdExport,
}

/// One disk of a node copy job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeDiskState {
    pub disk_key: DiskKey,
    pub status: DiskStatus,
    pub bytes_total: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_skipped: u64,
    /// Bytes read only for the whole-disk checksum grid (not written): the unchanged parts of
    /// grid cells an incremental changed elsewhere. Absent from an older node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_read_for_grid: Option<u64>,
    /// Bytes per second over the last few seconds.
    pub rate_bps: u64,
    pub error_message: Option<String>,
}

/// `GET /api/v1/backup/{id}` of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeBackupState {
    pub backup_id: BackupId,
    pub vm_name: String,
    pub backup_type: BackupType,
    pub status: JobStatus,
    pub disks: Vec<NodeDiskState>,
    pub error_message: Option<String>,
}
