//! The hub's live stream (`GET /api/v1/events`) and the entries of a job's event log.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Backup, PortsView, ProcessInfo, Restore, TunnelState};
use crate::ids::{BackupId, DiskKey};

/// One message of the hub's `GET /api/v1/events` stream (`data:` is this, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// An instant recovery changed (status, each disk's stream, the VM's state, a stall).
    Recovery { recovery: super::Recovery },
    /// A verify job changed (status, progress, points found corrupt).
    Verify { verify: super::VerifyJob },
    /// A policy run was queued, started, or ended.
    PolicyRun { run: super::PolicyRun },
    /// A prune or synthetic-full job changed (status, steps, bytes merged).
    Prune { prune: super::PruneJob },
    /// This subscriber fell behind and `lost` events were dropped for it: re-read the lists.
    Lagged { lost: u64 },
}

/// One entry of a job's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
