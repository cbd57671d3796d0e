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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GridChecksums {
    pub cell_size: u64,
    pub disk_size: u64,
    #[serde(default)]
    pub cells: Vec<CellChecksum>,
    #[serde(default)]
    pub zero_cells: Vec<CellRun>,
}

/// BLAKE3 (lower-case hex) of one whole grid cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CellChecksum {
    pub index: u64,
    pub blake3: String,
}

/// `count` consecutive cells from `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CellRun {
    pub first: u64,
    pub count: u64,
}

/// What is known of a backup point's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// Also boot each point that reads back clean as a throwaway VM on the hub (from overlays;
    /// nothing is written to the point) and record `boot_ok`/`boot_failed` on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootCheckSpec>,
}

/// How a boot check starts the point's disks (QEMU on the hub, `accel=tcg`, disks in unit
/// order as virtio-blk `vda`, `vdb`, ...). A field left out comes from the point's recorded
/// hardware when there is one, else from the defaults named per field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BootCheckSpec {
    /// Guest memory in MiB (default 512; 64..=16384).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// Virtual CPUs (default 1; 1..=8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Direct kernel boot: a kernel image on the hub (absolute path). Without one the guest
    /// boots from its first disk's boot loader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Initial ramdisk on the hub for `kernel` (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line for `kernel` (default `console=ttyS0 root=/dev/vda rw panic=-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// The guest is up when a serial-console line contains this text (besides its guest agent
    /// answering `guest-ping`, which always counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_line: Option<String>,
    /// How long the guest has to come up (default 120 s; 5..=1800).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// Outcome of a point's last boot check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BootStatus {
    /// A verify job is booting the point now.
    Booting,
    /// The guest came up (its agent answered, or the ready line appeared) in time.
    BootOk,
    /// It did not: QEMU exited, or the time limit passed; the console lines say why.
    BootFailed,
    /// The check was cancelled or the hub stopped during it: nothing is known.
    Interrupted,
}

impl BootStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BootStatus::Booting => "booting",
            BootStatus::BootOk => "boot_ok",
            BootStatus::BootFailed => "boot_failed",
            BootStatus::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<BootStatus> {
        Some(match s {
            "booting" => BootStatus::Booting,
            "boot_ok" => BootStatus::BootOk,
            "boot_failed" => BootStatus::BootFailed,
            "interrupted" => BootStatus::Interrupted,
            _ => return None,
        })
    }
}

/// The last boot check of a point (in the backup's API, the console's point list and detail).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BootCheck {
    pub status: BootStatus,
    /// The verify job that booted it.
    pub verify_id: String,
    pub started_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<DateTime<Utc>>,
    /// For people: what answered ("guest agent answered guest-ping") or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The guest's last serial-console lines (at most 40, each at most 200 characters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub console_tail: Vec<String>,
    /// From QEMU's start to the guest being up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_ms: Option<u64>,
    /// While `booting`: the PID of the throwaway VM's QEMU on the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_pid: Option<u32>,
}

/// A verify job (`GET /api/v1/verify[/{id}]`, `HubEvent::Verify`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
