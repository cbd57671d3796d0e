//! JSON types of the HTTP contract between hub, node and console. Field names are the
//! contract (see `shared/API.md` of the project): fields may be added, never renamed.

use crate::ids::{BackupId, DiskKey, NbdPort};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Error body of every 4xx/5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The machine-readable cause, e.g. `"invalid_field"`, `"not_found"`; callers match on it.
    pub error: crate::errors::ErrorCode,
    /// For people: what to do, or which field was wrong. Wording may change; never match it.
    pub detail: String,
}

/// Which database a hub runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseKind {
    Sqlite,
    Mysql,
}

/// Database part of `/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseHealth {
    pub kind: DatabaseKind,
    /// A `SELECT 1` answered just now.
    pub ok: bool,
}

/// `GET /health` of the hub and `GET /api/v1/health` of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `"healthy"` or `"degraded"`.
    pub status: String,
    /// Cargo package version.
    pub version: String,
    /// Short git commit the binary was built from (`-dirty` when the tree had changes).
    pub git_commit: String,
    /// RFC 3339 time of the build.
    pub build_time: String,
    /// Absolute path of the running executable (`/proc/self/exe`).
    pub executable: String,
    pub pid: u32,
    pub started_at: DateTime<Utc>,
    /// Hub only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseHealth>,
}

/// `POST /api/v1/repositories`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryRequest {
    pub id: String,
    /// Absolute directory on the hub that holds the QCOW2 chains.
    pub path: String,
}

/// A repository as the hub reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repository {
    pub id: String,
    pub path: String,
    pub free_bytes: u64,
    pub total_bytes: u64,
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

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    Full,
    Incremental,
}

impl BackupType {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Incremental => "incremental",
        }
    }
}

/// `POST /api/v1/backups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRequest {
    pub vm_name: String,
    pub repository_id: String,
    pub backup_type: BackupType,
}

/// Life of a backup job: `pending → preparing → running → finalizing → completed | failed`,
/// and `cancelling → cancelled` from any non-terminal state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Preparing,
    Running,
    Finalizing,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Preparing => "preparing",
            JobStatus::Running => "running",
            JobStatus::Finalizing => "finalizing",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelling => "cancelling",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => JobStatus::Pending,
            "preparing" => JobStatus::Preparing,
            "running" => JobStatus::Running,
            "finalizing" => JobStatus::Finalizing,
            "completed" => JobStatus::Completed,
            "failed" => JobStatus::Failed,
            "cancelling" => JobStatus::Cancelling,
            "cancelled" => JobStatus::Cancelled,
            _ => return None,
        })
    }

    /// No further transition happens from a terminal state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// Status of one disk within a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskStatus {
    Pending,
    Preparing,
    Ready,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl DiskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskStatus::Pending => "pending",
            DiskStatus::Preparing => "preparing",
            DiskStatus::Ready => "ready",
            DiskStatus::Running => "running",
            DiskStatus::Completed => "completed",
            DiskStatus::Failed => "failed",
            DiskStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => DiskStatus::Pending,
            "preparing" => DiskStatus::Preparing,
            "ready" => DiskStatus::Ready,
            "running" => DiskStatus::Running,
            "completed" => DiskStatus::Completed,
            "failed" => DiskStatus::Failed,
            "cancelled" => DiskStatus::Cancelled,
            _ => return None,
        })
    }
}

/// One disk of a backup job, as in the backup response's `disk_results[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// A backup job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// One entry of a job's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Increasing per hub.
    pub seq: i64,
    pub backup_id: BackupId,
    pub at: DateTime<Utc>,
    /// `"info"`, `"warn"` or `"error"`.
    pub level: String,
    /// Short machine-friendly step, e.g. `"port_allocated"`, `"qemu_nbd_started"`.
    pub step: String,
    /// Human sentence with the details needed to troubleshoot.
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_key: Option<DiskKey>,
    /// The job the event belongs to when it is not the backup itself: the id of a restore of
    /// it. Absent for the backup's own events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

/// Progress of one disk, node → hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressReport {
    pub disks: Vec<DiskProgress>,
}

/// Final state of one disk, node → hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCompletion {
    pub disk_key: DiskKey,
    pub status: DiskStatus,
    #[serde(default)]
    pub error_message: Option<String>,
    /// Chunk checksums computed from the snapshot while copying (for verification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksums: Option<ChunkChecksums>,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkChecksums {
    /// Largest length of one range (the split grid), e.g. 4 MiB.
    pub chunk_size: u64,
    pub ranges: Vec<ChecksumRange>,
}

/// BLAKE3 of `length` bytes of the disk at `offset`, as the snapshot held them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksumRange {
    pub offset: u64,
    pub length: u64,
    /// Lower-case hex.
    pub blake3: String,
}

/// Terminal outcome reported by the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompletionStatus {
    Completed,
    Failed,
}

/// `POST /api/v1/backups/{id}/complete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionReport {
    pub status: CompletionStatus,
    #[serde(default)]
    pub error_message: Option<String>,
    pub disks: Vec<DiskCompletion>,
}

/// One held port of `GET /api/v1/ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortAllocation {
    pub port: NbdPort,
    pub backup_id: BackupId,
    pub disk_key: DiskKey,
    pub allocated_at: DateTime<Utc>,
}

/// A port of the range found bound by a process that is not ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SquattedPort {
    pub port: NbdPort,
    pub seen_at: DateTime<Utc>,
    /// What the bind test said, e.g. "Address already in use".
    pub detail: String,
}

/// `GET /api/v1/ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortsView {
    /// Inclusive range `[first, last]`.
    pub range: [u16; 2],
    pub allocations: Vec<PortAllocation>,
    #[serde(default)]
    pub squatted: Vec<SquattedPort>,
}

/// One qemu-nbd of `GET /api/v1/processes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub port: NbdPort,
    pub export_name: String,
    pub qcow2_path: String,
    pub backup_id: BackupId,
    pub disk_key: DiskKey,
    pub alive: bool,
    pub started_at: DateTime<Utc>,
}

/// State of an SSH tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelStateKind {
    Down,
    Connecting,
    Up,
}

/// `GET /api/v1/tunnel` of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelState {
    pub state: TunnelStateKind,
    pub since: DateTime<Utc>,
    pub restarts: u32,
    pub last_error: Option<String>,
    /// Forwards as ssh spells them, e.g. `"L 127.0.0.2:10100 -> 127.0.0.1:10100"`.
    pub forwards: Vec<String>,
}

/// One entry of the hub's `GET /api/v1/tunnel` (the wire shape the hub serves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTunnel {
    /// Name of the node (as in [`Node::name`]).
    pub node: String,
    /// The node answered just now (`true`), or `tunnel` is the last state recorded (`false`).
    #[serde(default)]
    pub live: bool,
    /// `null` when the node never reported one.
    #[serde(default)]
    pub tunnel: Option<TunnelState>,
    /// Why the node could not be asked.
    #[serde(default)]
    pub error: Option<String>,
}

/// A node as the hub knows it (`GET /api/v1/nodes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub api_url: String,
    pub version: String,
    pub last_seen_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub tunnel: Option<TunnelState>,
}

/// `POST /api/v1/nodes` (node registration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub name: String,
    pub api_url: String,
    pub version: String,
}

/// One VM of the node's inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryVm {
    pub vm_name: String,
    pub vm_id: String,
    pub disks: Vec<VmDisk>,
    /// Source driver that serves the VM: `"qemu"` or `"vsphere"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Whether the hypervisor tracks changed blocks for the VM (vSphere CBT); `None` where the
    /// driver always can (QEMU's dirty bitmaps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_tracking: Option<bool>,
}

/// `GET /api/v1/inventory` of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub vms: Vec<InventoryVm>,
}

/// `POST /api/v1/backup/start` of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBackupStart {
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
}

/// A disk's change id (vSphere CBT), e.g. `"52 9c 1d ... 4b/17"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskChangeId {
    pub disk_key: DiskKey,
    pub change_id: String,
}

/// One disk of a node copy job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDiskState {
    pub disk_key: DiskKey,
    pub status: DiskStatus,
    pub bytes_total: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_skipped: u64,
    /// Bytes per second over the last few seconds.
    pub rate_bps: u64,
    pub error_message: Option<String>,
}

/// `GET /api/v1/backup/{id}` of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBackupState {
    pub backup_id: BackupId,
    pub vm_name: String,
    pub backup_type: BackupType,
    pub status: JobStatus,
    pub disks: Vec<NodeDiskState>,
    pub error_message: Option<String>,
}

/// Where a restore writes: a new image file on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreTarget {
    /// Name of a registered node; it writes the image.
    pub node: String,
    /// Absolute path, on the node, of the new QCOW2 image (`.qcow2`); must not exist yet, its
    /// directory must.
    pub path: String,
}

/// `POST /api/v1/restores` of the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// One NBD export as structured JSON (the parts of an `nbd://host:port/export` URI). IPv6
/// hosts are bare here (`::1`); the URI form puts them in brackets.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NbdExport {
    pub host: String,
    pub port: u16,
    pub export: String,
}

impl From<crate::targets::NbdUri> for NbdExport {
    fn from(u: crate::targets::NbdUri) -> Self {
        NbdExport {
            host: u.host,
            port: u.port,
            export: u.export,
        }
    }
}

impl From<NbdExport> for crate::targets::NbdUri {
    fn from(e: NbdExport) -> Self {
        crate::targets::NbdUri {
            host: e.host,
            port: e.port,
            export: e.export,
        }
    }
}

impl std::fmt::Display for NbdExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::targets::NbdUri::from(self.clone()).fmt(f)
    }
}

/// One disk's target of a node copy job, structured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskTarget {
    pub disk_key: DiskKey,
    pub export: NbdExport,
}

/// `POST /api/v1/restore/start` of the node: copy `source` into a new image at `path`. The node
/// runs it as a job of its own (drained on shutdown, its qemu-nbd journalled for start-up
/// recovery) and pushes progress and its result to the hub
/// (`POST /api/v1/restores/{id}/progress` and `/complete`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRestoreStart {
    pub restore_id: String,
    /// NBD URI of the hub's read-only export of the backup point (for logs; the node connects
    /// to `source_export` when present).
    pub source: String,
    /// The same export, structured. The host is the hub's; a node behind a tunnel reaches it
    /// on its `--tunnel-bind` address, as for backup targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_export: Option<NbdExport>,
    /// Absolute path of the new QCOW2 image on the node.
    pub path: String,
    /// Virtual size of the new image.
    pub size_bytes: u64,
}

/// `GET /api/v1/restore/{id}` of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// One message of the hub's `GET /api/v1/events` stream (`data:` is this, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HubEvent {
    /// A job changed (status, progress, disk state).
    Backup { backup: Backup },
    /// An entry was appended to a job's event log.
    JobEvent { event: JobEvent },
    /// Port allocations changed.
    Ports { ports: PortsView },
    /// qemu-nbd processes changed.
    Processes { processes: Vec<ProcessInfo> },
    /// A node's tunnel state changed.
    Tunnel { node: String, tunnel: TunnelState },
    /// A restore job changed (status, progress).
    Restore { restore: Restore },
    /// This subscriber fell behind and `lost` events were dropped for it: re-read the lists.
    Lagged { lost: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_strings_round_trip() {
        for s in [
            JobStatus::Pending,
            JobStatus::Preparing,
            JobStatus::Running,
            JobStatus::Finalizing,
            JobStatus::Completed,
            JobStatus::Failed,
            JobStatus::Cancelling,
            JobStatus::Cancelled,
        ] {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
    }

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
