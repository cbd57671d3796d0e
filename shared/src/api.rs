//! JSON types of the HTTP contract between hub, node and console. Field names are the
//! contract (see `shared/API.md` of the project): fields may be added, never renamed.
//!
//! Every type is used as `sendense_shared::api::X`; the parts below only group them by subject:
//!
//! - here: [`ErrorBody`], [`Health`], the statuses and kinds every part shares ([`JobStatus`],
//!   [`DiskStatus`], [`BackupType`]), [`NbdExport`] and its TLS material [`NbdTls`];
//! - `vms`: repositories and VMs;
//! - `backups`: backup jobs, on the hub and on the node, and what a node reports of one;
//! - `hardware`: a QEMU VM's hardware as recorded at backup time ([`VmHardware`]);
//! - `restores`: restore jobs, likewise;
//! - `recoveries`: instant recoveries (a point booted on a node while its disks stream home);
//! - `system`: NBD port allocations and qemu-nbd processes;
//! - `nodes`: registration, tunnel state, inventory;
//! - `policies`: backup policies, their runs, retention, prune plans and jobs, repository
//!   space;
//! - `openapi`: what the hub's and the node's OpenAPI documents share (bearer scheme, error
//!   answers);
//! - `events`: the hub's event stream ([`HubEvent`]) and a job's event log ([`JobEvent`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

mod backups;
mod events;
mod files;
mod hardware;
mod integrity;
mod nodes;
pub mod openapi;
mod policies;
mod recoveries;
mod restores;
mod system;
mod vms;

pub use backups::{
    Backup, BackupRequest, ChecksumRange, ChunkChecksums, CompletionReport, CompletionStatus,
    DiskChangeId, DiskCompletion, DiskProgress, DiskResult, DiskTarget, NodeBackupStart,
    NodeBackupState, NodeDiskState, ProgressReport,
};
pub use events::{HubEvent, JobEvent};
pub use files::{FileEntry, FileKind, FileListing, GuestFilesystem};
pub use hardware::{HardwareDisk, HardwareNic, VmHardware};
pub use integrity::{
    BootCheck, BootCheckSpec, BootStatus, CellChecksum, CellRun, Consistency, ConsistencyLevel,
    DEFAULT_GRID_CELL, GridChecksums, Integrity, VerifyJob, VerifyRequest,
};
pub use nodes::{
    Inventory, InventoryVm, Node, NodeRegistration, NodeTunnel, TunnelLink, TunnelState,
    TunnelStateKind,
};
pub use policies::{
    BackupRule, ChainLimit, DEFAULT_QUEUE_WINDOW_SECS, KeepReason, Policy, PolicyRequest,
    PolicyRun, PruneAction, PruneJob, PrunePlan, PrunePoint, PruneRequest, RepositorySpace,
    Retention, RunStatus, VmSelector, VmSpace,
};
pub use recoveries::{
    NodeRecoveryDisk, NodeRecoveryStart, NodeRecoveryState, RECOVERY_CPUS, RECOVERY_MEMORY_MIB,
    Recovery, RecoveryCompletion, RecoveryDisk, RecoveryDiskProgress, RecoveryRequest,
    RecoverySpeed,
};
pub use restores::{
    NodeRestoreStart, NodeRestoreState, Restore, RestoreCompletion, RestoreProgress,
    RestoreRequest, RestoreTarget,
};
pub use system::{PortAllocation, PortsView, ProcessInfo, SquattedPort};
pub use vms::{Repository, RepositoryRequest, RepositoryUpdate, Vm, VmDisk, VmRequest};

/// Error body of every 4xx/5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The machine-readable cause, e.g. `"invalid_field"`, `"not_found"`; callers match on it.
    pub error: crate::errors::ErrorCode,
    /// For people: what to do, or which field was wrong. Wording may change; never match it.
    pub detail: String,
}

/// Which database a hub runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseKind {
    Sqlite,
    Mysql,
}

/// Database part of `/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DatabaseHealth {
    pub kind: DatabaseKind,
    /// A `SELECT 1` answered just now.
    pub ok: bool,
}

/// `GET /health` of the hub and `GET /api/v1/health` of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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

/// Life of a backup job: `pending → preparing → running → finalizing → completed | failed`,
/// and `cancelling → cancelled` from any non-terminal state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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

/// One NBD export as structured JSON (the parts of an `nbd://host:port/export` URI). IPv6
/// hosts are bare here (`::1`); the URI form puts them in brackets. With `socket` the export is
/// on that unix socket of the hub (`nbd+unix:///export?socket=PATH`); `host` and `port` then
/// still name the loopback and the slot (the socket is `<port>.sock`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NbdExport {
    pub host: String,
    #[schema(maximum = 65535)]
    pub port: u16,
    pub export: String,
    /// The hub's unix socket of this export (`nbd_listen = "unix"`, the default). Absent: TCP
    /// at `host:port` (`nbd_listen = "tcp"`, and an older hub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// TLS material for this export (the hub's qemu-nbd requires an x509 client certificate
    /// issued for this job). Absent when the hub runs with `nbd_tls = false`, and from an older
    /// hub. Sent only over the authenticated API; its `Debug` hides the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<NbdTls>,
}

/// x509 material a client presents to a TLS NBD export: the CA that signed the server (the only
/// trusted root) and the client certificate with its private key, all PEM.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NbdTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Exports are logged and put in error messages; the key must never be.
        f.debug_struct("NbdTls")
            .field("cert_pem_bytes", &self.cert_pem.len())
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl From<crate::targets::NbdUri> for NbdExport {
    fn from(u: crate::targets::NbdUri) -> Self {
        NbdExport {
            host: u.host,
            port: u.port,
            export: u.export,
            socket: u.socket,
            tls: None,
        }
    }
}

impl From<NbdExport> for crate::targets::NbdUri {
    fn from(e: NbdExport) -> Self {
        crate::targets::NbdUri {
            host: e.host,
            port: e.port,
            export: e.export,
            socket: e.socket,
        }
    }
}

impl std::fmt::Display for NbdExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::targets::NbdUri::from(self.clone()).fmt(f)
    }
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
}
