//! The prune plan of one VM: retention's verdict on each point, turned into chain operations
//! ([`Step`]s) and the per-point actions and bytes the API shows.
//!
//! A VM's points form chains (a full, then incrementals whose images' backing files are the
//! previous point's images). The removed points fall into *runs*: maximal stretches of removed
//! points one above the other in a chain. A run
//! - with no kept point above it (the newest points of a chain) is deleted outright
//!   ([`PruneAction::Delete`] for each);
//! - between two kept points is skipped by rebasing the kept child onto the kept point below
//!   (safe mode: the data of the run the child reads is copied into it): the run's top point is
//!   [`PruneAction::RebaseChild`], the others [`PruneAction::Delete`];
//! - at the base of a chain (it holds the full) is merged into the kept child above it, which
//!   becomes the chain's full: the base is [`PruneAction::MergeIntoChild`], the others
//!   [`PruneAction::Delete`].
//!
//! Per disk: a disk added in a later point has no image below it and is left alone; a disk
//! whose chain ends inside a rebased run gets no backing file (all its data copied in).

use super::journal::{MergeDisk, RebaseDisk, Step};
use crate::retention::Verdict;
use chrono::{DateTime, Utc};
use sendense_shared::api::{BackupType, KeepReason, PruneAction, PrunePoint};
use sendense_shared::ids::{BackupId, DiskKey};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

/// One disk image of a point as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointDisk {
    pub disk_key: DiskKey,
    pub image: PathBuf,
    pub parent: Option<BackupId>,
}

/// One completed point of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainPoint {
    pub backup_id: BackupId,
    pub backup_type: BackupType,
    pub created_at: DateTime<Utc>,
    pub protected: bool,
    /// Integrity `corrupt`: never kept by a rule (see [`crate::retention`]).
    pub corrupt: bool,
    pub disks: Vec<PointDisk>,
    /// Bytes its images and sidecars use on disk.
    pub bytes_used: u64,
}

impl ChainPoint {
    pub fn parent(&self) -> Option<&BackupId> {
        self.disks.iter().find_map(|d| d.parent.as_ref())
    }

    fn disk(&self, key: DiskKey) -> Option<&PointDisk> {
        self.disks.iter().find(|d| d.disk_key == key)
    }

    /// Its images and their sidecars.
    pub fn files(&self) -> Vec<PathBuf> {
        self.disks
            .iter()
            .flat_map(|d| [d.image.clone(), crate::manifest::sidecar_path(&d.image)])
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(
        "point {point} has {children} points built on it (the chain branches there): prune \
         handles linear chains only; keep it or delete its newer branch first"
    )]
    Branch { point: BackupId, children: usize },
    #[error("disk {disk} of point {point}: {reason}")]
    Chain {
        point: BackupId,
        disk: DiskKey,
        reason: String,
    },
}

/// The plan before its byte estimates: per point (newest first) its verdict and action, and
/// the steps in the order they run.
#[derive(Debug, Clone)]
pub struct Planned {
    pub points: Vec<PrunePoint>,
    pub steps: Vec<Step>,
}

/// Builds the plan of `points` (newest first) under `verdicts` (from [`crate::retention`]);
/// `removing` says whether any rule is used at all (otherwise every point is kept).
pub fn build(
    points: &[ChainPoint],
    verdicts: &[Verdict<BackupId>],
    removing: bool,
) -> Result<Planned, PlanError> {
    let by_id: HashMap<&BackupId, &ChainPoint> = points.iter().map(|p| (&p.backup_id, p)).collect();
    let verdict: HashMap<&BackupId, Option<KeepReason>> =
        verdicts.iter().map(|v| (&v.key, v.kept_by)).collect();
    let removed = |id: &BackupId| removing && verdict.get(id).copied().flatten().is_none();
    let mut children: HashMap<&BackupId, Vec<&BackupId>> = HashMap::new();
    for p in points {
        if let Some(parent) = p.parent()
            && by_id.contains_key(parent)
        {
            children.entry(parent).or_default().push(&p.backup_id);
        }
    }
    let kids = |id: &BackupId| children.get(id).map_or(0, Vec::len);
    let mut action: HashMap<BackupId, PruneAction> = HashMap::new();
    let mut steps = Vec::new();
    let mut seen: HashSet<&BackupId> = HashSet::new();
    for top in points.iter().filter(|p| removed(&p.backup_id)) {
        if !seen.insert(&top.backup_id) {
            continue;
        }
        if kids(&top.backup_id) > 1 {
            return Err(PlanError::Branch {
                point: top.backup_id.clone(),
                children: kids(&top.backup_id),
            });
        }
        // The run, top first.
        let mut run: Vec<&ChainPoint> = vec![top];
        while let Some(parent) = run.last().and_then(|p| p.parent())
            && let Some(pp) = by_id.get(parent)
            && removed(parent)
            && kids(parent) == 1
        {
            seen.insert(parent);
            run.push(pp);
        }
        let child = children
            .get(&top.backup_id)
            .and_then(|c| c.first())
            .and_then(|c| by_id.get(*c))
            .copied();
        let below = run
            .last()
            .and_then(|p| p.parent())
            .and_then(|p| by_id.get(p))
            .copied();
        let in_run: HashSet<&BackupId> = run.iter().map(|p| &p.backup_id).collect();
        let drop: Vec<BackupId> = run.iter().map(|p| p.backup_id.clone()).collect();
        let files: Vec<PathBuf> = run.iter().flat_map(|p| p.files()).collect();
        match (child, below) {
            (None, _) => {
                for p in &run {
                    action.insert(p.backup_id.clone(), PruneAction::Delete);
                }
                steps.push(Step::Delete {
                    points: drop,
                    files,
                });
            }
            (Some(k), Some(_)) => {
                let mut disks = Vec::new();
                for d in &k.disks {
                    let Some(parent) = d.parent.as_ref().filter(|p| in_run.contains(p)) else {
                        continue;
                    };
                    // Down the disk's own chain to the first image outside the run.
                    let mut at = parent.clone();
                    let new_parent = loop {
                        let p = by_id[&at];
                        match p.disk(d.disk_key).and_then(|pd| pd.parent.clone()) {
                            Some(next) if in_run.contains(&next) => at = next,
                            other => break other,
                        }
                    };
                    let new_backing = match &new_parent {
                        Some(np) => {
                            let img = by_id.get(np).and_then(|p| p.disk(d.disk_key)).ok_or_else(
                                || PlanError::Chain {
                                    point: k.backup_id.clone(),
                                    disk: d.disk_key,
                                    reason: format!(
                                        "its chain names point {np}, which has no such disk"
                                    ),
                                },
                            )?;
                            Some(relative(&d.image, &img.image, k, d.disk_key)?)
                        }
                        None => None,
                    };
                    let old = by_id[parent]
                        .disk(d.disk_key)
                        .ok_or_else(|| PlanError::Chain {
                            point: k.backup_id.clone(),
                            disk: d.disk_key,
                            reason: format!("its parent {parent} has no such disk"),
                        })?;
                    disks.push(RebaseDisk {
                        disk_key: d.disk_key,
                        image: d.image.clone(),
                        old_backing: Some(relative(&d.image, &old.image, k, d.disk_key)?),
                        new_backing,
                        new_parent,
                    });
                }
                action.insert(top.backup_id.clone(), PruneAction::RebaseChild);
                for p in &run[1..] {
                    action.insert(p.backup_id.clone(), PruneAction::Delete);
                }
                steps.push(Step::Rebase {
                    child: k.backup_id.clone(),
                    drop,
                    disks,
                    files,
                });
            }
            (Some(k), None) => {
                let mut disks = Vec::new();
                for d in &k.disks {
                    let Some(parent) = d.parent.as_ref().filter(|p| in_run.contains(p)) else {
                        continue;
                    };
                    let mut at = parent.clone();
                    while let Some(next) =
                        by_id[&at].disk(d.disk_key).and_then(|pd| pd.parent.clone())
                    {
                        if !in_run.contains(&next) {
                            return Err(PlanError::Chain {
                                point: k.backup_id.clone(),
                                disk: d.disk_key,
                                reason: format!("its chain leaves the merged points at {next}"),
                            });
                        }
                        at = next;
                    }
                    let base = by_id[&at].disk(d.disk_key).expect("walked through it");
                    disks.push(MergeDisk {
                        disk_key: d.disk_key,
                        base: base.image.clone(),
                        image: d.image.clone(),
                    });
                }
                let bases: HashSet<&PathBuf> = disks.iter().map(|d| &d.base).collect();
                let files = files.into_iter().filter(|f| !bases.contains(f)).collect();
                let base = run.last().expect("a run has a point");
                action.insert(base.backup_id.clone(), PruneAction::MergeIntoChild);
                for p in &run[..run.len() - 1] {
                    action.insert(p.backup_id.clone(), PruneAction::Delete);
                }
                steps.push(Step::Merge {
                    child: k.backup_id.clone(),
                    drop,
                    disks,
                    files,
                });
            }
        }
    }
    let points = points
        .iter()
        .map(|p| {
            let kept_by = verdict.get(&p.backup_id).copied().flatten();
            let act = action
                .get(&p.backup_id)
                .copied()
                .unwrap_or(PruneAction::Keep);
            PrunePoint {
                backup_id: p.backup_id.clone(),
                backup_type: p.backup_type,
                created_at: p.created_at,
                protected: p.protected,
                kept_by,
                action: act,
                bytes_freed: if act == PruneAction::Delete {
                    p.bytes_used
                } else {
                    0
                },
                bytes_used: p.bytes_used,
            }
        })
        .collect();
    Ok(Planned { points, steps })
}

fn relative(
    image: &std::path::Path,
    backing: &std::path::Path,
    k: &ChainPoint,
    disk: DiskKey,
) -> Result<String, PlanError> {
    crate::repository::relative_backing(image, backing)
        .map(|p| p.display().to_string())
        .map_err(|e| PlanError::Chain {
            point: k.backup_id.clone(),
            disk,
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests;
