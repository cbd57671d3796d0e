//! The steps of a prune job as its journal (`prune_steps`) records them, and the phases a step
//! goes through. Each step is written `planned` with everything it will touch (points, image
//! paths) before the job starts, so a start-up after a crash needs nothing else to finish it.
//!
//! | kind | phases | catalog change (one transaction with the phase) |
//! |---|---|---|
//! | `delete` | planned → started → done | `started`: the points leave the catalog; then their files go |
//! | `rebase` | planned → started → cataloged → done | `cataloged`: the child names its new parent, the rebased-over points leave |
//! | `merge` | planned → started → cataloged → done | `started`: the merged points leave (the base stops being its own instant once the commit writes); `cataloged`: the child is a full |
//!
//! `failed`: the step stopped without its catalog change and says why in the job; nothing it
//! wrote is readable through the catalog in a wrong state (see [`super::engine`]).

use sendense_shared::ids::{BackupId, DiskKey};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub const PLANNED: &str = "planned";
pub const STARTED: &str = "started";
pub const CATALOGED: &str = "cataloged";
pub const DONE: &str = "done";
pub const FAILED: &str = "failed";

/// One disk of a rebase: `image` (the kept child's) moves from `old_backing` to
/// `new_backing` (both as written in the image, relative), `None` = no backing file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebaseDisk {
    pub disk_key: DiskKey,
    pub image: PathBuf,
    pub old_backing: Option<String>,
    pub new_backing: Option<String>,
    /// The point `new_backing` belongs to.
    pub new_parent: Option<BackupId>,
}

/// One disk of a merge: the layers above `base` up to `image` are committed into `base`,
/// which then replaces `image` (rename).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeDisk {
    pub disk_key: DiskKey,
    pub base: PathBuf,
    pub image: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// Points nothing kept depends on: out of the catalog, then their files deleted.
    Delete {
        points: Vec<BackupId>,
        files: Vec<PathBuf>,
    },
    /// `child` is rebased (data copied) past `drop` onto the point below them.
    Rebase {
        child: BackupId,
        drop: Vec<BackupId>,
        disks: Vec<RebaseDisk>,
        files: Vec<PathBuf>,
    },
    /// `drop` (the chain's base and the points above it up to `child`) are merged into
    /// `child`, which becomes the chain's self-contained base.
    Merge {
        child: BackupId,
        drop: Vec<BackupId>,
        disks: Vec<MergeDisk>,
        /// Deleted once `child` is cataloged a full (the middle images, every dropped
        /// sidecar).
        files: Vec<PathBuf>,
    },
}

impl Step {
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Delete { .. } => "delete",
            Step::Rebase { .. } => "rebase",
            Step::Merge { .. } => "merge",
        }
    }

    /// The points this step removes.
    pub fn removes(&self) -> &[BackupId] {
        match self {
            Step::Delete { points, .. } => points,
            Step::Rebase { drop, .. } | Step::Merge { drop, .. } => drop,
        }
    }

    /// The kept point this step rewrites, if any (its log gets the step's events).
    pub fn child(&self) -> Option<&BackupId> {
        match self {
            Step::Delete { .. } => None,
            Step::Rebase { child, .. } | Step::Merge { child, .. } => Some(child),
        }
    }

    /// Short description for events.
    pub fn describe(&self) -> String {
        let ids = |v: &[BackupId]| {
            v.iter()
                .map(|b| b.0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Step::Delete { points, .. } => format!("delete point(s) {}", ids(points)),
            Step::Rebase { child, drop, .. } => {
                format!("rebase {child} past {} (data copied)", ids(drop))
            }
            Step::Merge { child, drop, .. } => {
                format!(
                    "merge {} into {child} (it becomes the chain's full)",
                    ids(drop)
                )
            }
        }
    }
}
