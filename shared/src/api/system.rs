//! What the hub holds for running jobs: NBD ports (`/api/v1/ports`) and qemu-nbd processes
//! (`/api/v1/processes`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{BackupId, DiskKey, NbdPort};

/// One held port of `GET /api/v1/ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortAllocation {
    pub port: NbdPort,
    pub backup_id: BackupId,
    pub disk_key: DiskKey,
    pub allocated_at: DateTime<Utc>,
}

/// A port of the range found bound by a process that is not ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SquattedPort {
    pub port: NbdPort,
    pub seen_at: DateTime<Utc>,
    /// What the bind test said, e.g. "Address already in use".
    pub detail: String,
}

/// `GET /api/v1/ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortsView {
    /// Inclusive range `[first, last]`.
    pub range: [u16; 2],
    pub allocations: Vec<PortAllocation>,
    #[serde(default)]
    pub squatted: Vec<SquattedPort>,
}

/// One qemu-nbd of `GET /api/v1/processes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
