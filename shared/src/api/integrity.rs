//! Integrity of backup points: whole-disk checksums on a fixed grid ([`GridChecksums`]), the
//! state of a point ([`Integrity`]), how consistent its snapshot was ([`Consistency`]), and
//! verify jobs that re-read completed points ([`VerifyJob`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::JobStatus;
use crate::ids::BackupId;

/// Default cell of the checksum grid: 4 MiB (the hub tells the node which grid to use, see
/// [`super::NodeBackupStart::checksum_grid`]).
pub const DEFAULT_GRID_CELL: u64 = 4 * 1024 * 1024;

/// Whole-disk checksums of one disk of a backup point, as the writer computed them from the
/// snapshot: one BLAKE3 per cell `[i * cell_size, min((i + 1) * cell_size, disk_size))`.
///
/// - `cells` are cells the writer hashed whole: the bytes the snapshot held, zeroes included;
/// - `zero_cells` are runs of whole cells the snapshot holds only zeroes in (holes, zero
///   extents); their checksum is the BLAKE3 of that many zero bytes;
/// - a cell in neither list is unchanged since the parent point (an incremental) and inherits
///   the parent's checksum; a full lists every cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GridChecksums {
    pub cell_size: u64,
    pub disk_size: u64,
    #[serde(default)]
    pub cells: Vec<CellChecksum>,
    #[serde(default)]
    pub zero_cells: Vec<CellRun>,
}

/// BLAKE3 (lower-case hex) of one whole grid cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellChecksum {
    pub index: u64,
    pub blake3: String,
}

/// `count` consecutive cells from `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellRun {
    pub first: u64,
    pub count: u64,
}

/// What is known of a backup point's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Integrity {
    /// Not (yet) read back against whole-disk checksums: running, or it failed.
    Unverified,
    /// Every cell of every disk read back equal to the checksums the writer computed from the
    /// snapshot.
    Verified,
    /// The writer sent no whole-disk checksums (a hub-alone writer): the hub computed them
    /// from the stopped image. Later verify jobs still catch bit rot, but nothing proves the
    /// image equals the source.
    HubComputed,
    /// Completed before whole-disk checksums existed (only the written ranges were read
    /// back); a verify job gives it hub-computed checksums.
    Legacy,
    /// A verify job found bytes that differ from the stored checksums, in this point or in one
    /// it depends on. Never offered for restore; the VM's next backup is a full.
    Corrupt,
}

impl Integrity {
    pub fn as_str(self) -> &'static str {
        match self {
            Integrity::Unverified => "unverified",
            Integrity::Verified => "verified",
            Integrity::HubComputed => "hub_computed",
            Integrity::Legacy => "legacy",
            Integrity::Corrupt => "corrupt",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "unverified" => Integrity::Unverified,
            "verified" => Integrity::Verified,
            "hub_computed" => Integrity::HubComputed,
            "legacy" => Integrity::Legacy,
            "corrupt" => Integrity::Corrupt,
            _ => return None,
        })
    }

    /// May a restore read this point?
    pub fn restorable(self) -> bool {
        matches!(
            self,
            Integrity::Verified | Integrity::HubComputed | Integrity::Legacy
        )
    }
}

/// How consistent a backup point's snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsistencyLevel {
    /// The guest's file systems were frozen (guest agent) for the snapshot instant.
    Application,
    /// Only crash-consistent: as if the power had been cut at the snapshot instant.
    Crash,
}

impl ConsistencyLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsistencyLevel::Application => "application",
            ConsistencyLevel::Crash => "crash",
        }
    }
}

/// The consistency of a backup point and why (node → hub in the completion report, then in
/// the backup's API and the console).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consistency {
    pub level: ConsistencyLevel,
    /// For people: "guest file systems frozen (3 file systems)", "no guest agent channel",
    /// "guest agent did not answer within 10 s", "freeze refused: ...".
    pub reason: String,
    /// Time between the freeze and the thaw, when there was a freeze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_ms: Option<u64>,
}

/// `POST /api/v1/verify`: what to re-read. Exactly one of the fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRequest {
    /// One backup point (with the points it depends on read as part of its chain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<BackupId>,
    /// Every completed point of one VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    /// Every completed point in one repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_id: Option<String>,
}

/// A verify job (`GET /api/v1/verify[/{id}]`, `HubEvent::Verify`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyJob {
    pub verify_id: String,
    /// `backup:<id>`, `vm:<name>` or `repository:<id>`.
    pub scope: String,
    /// `manual` or `schedule`.
    pub trigger: String,
    pub status: JobStatus,
    pub points_total: u64,
    pub points_done: u64,
    pub bytes_total: u64,
    /// Bytes read back so far (cells the image holds as zeroes are checked by block status
    /// and not read).
    pub bytes_read: u64,
    /// Points found corrupt (a mismatch in the point itself; dependents are marked too).
    #[serde(default)]
    pub corrupt: Vec<BackupId>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub error_message: Option<String>,
}
