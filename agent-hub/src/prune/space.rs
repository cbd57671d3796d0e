//! Bytes: what a step copies and frees (estimated from `qemu-img map` before it runs), and a
//! repository's space with its forecast.
//!
//! # Estimates
//! - delete: the points' files as they use the disk now (exact).
//! - rebase: the child gets the data its chain reads from the rebased-over layers (map depths
//!   1..=n); freed = the dropped files less that.
//! - merge: the base gets every range the layers above it hold; the base grows by those it
//!   did not hold itself; freed = the dropped middle files, the base's sidecar and the child's
//!   old image, less that growth.
//!
//! # Growth and forecast
//! Growth is measured from the catalog and the files, no sampling needed: the bytes the
//! repository's points completed in the last 14 days use on disk now, less the bytes prune
//! steps freed in those days, divided by the days covered (14, or since the repository's
//! oldest point when younger, at least one). `full_in_days` = free bytes / that growth, when
//! it grows. The freed bytes are counted per hub (prune steps record no repository): with
//! several repositories the growth of each is understated by the others' prunes.

use super::journal::Step;
use super::plan::ChainPoint;
use super::qemu::{self, data_at, minus};
use crate::db::Db;
use crate::repository::RepoError;
use sendense_shared::api::{JobStatus, RepositorySpace, VmSpace};
use sendense_shared::ids::BackupId;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// `(bytes copied, bytes freed)` of a step, estimated.
pub async fn estimate(
    step: &Step,
    by_id: &HashMap<&BackupId, &ChainPoint>,
) -> Result<(u64, u64), RepoError> {
    let used = |ids: &[BackupId]| -> u64 {
        ids.iter()
            .filter_map(|i| by_id.get(i))
            .map(|p| p.bytes_used)
            .sum()
    };
    match step {
        Step::Delete { points, .. } => Ok((0, used(points))),
        Step::Rebase { drop, disks, .. } => {
            let n = drop.len() as u32;
            let mut copy = 0;
            for d in disks {
                let ext = qemu::map(&d.image).await?;
                copy += data_at(&ext, 1..n + 1)
                    .iter()
                    .map(|(a, b)| b - a)
                    .sum::<u64>();
            }
            Ok((copy, used(drop).saturating_sub(copy)))
        }
        Step::Merge {
            drop, disks, files, ..
        } => {
            let mut copy = 0;
            let mut growth = 0;
            let mut child_images = 0;
            for d in disks {
                let ext = qemu::map(&d.image).await?;
                // child at depth 0, the dropped points above the base at 1.., the base last.
                let base_depth = drop.len() as u32;
                let above = data_at(&ext, 0..base_depth);
                let base_own = data_at(&qemu::map(&d.base).await?, 0..1);
                copy += above.iter().map(|(a, b)| b - a).sum::<u64>();
                growth += minus(&above, &base_own);
                child_images += qemu::allocated(&d.image);
            }
            let dropped: u64 = files.iter().map(|f| qemu::allocated(f)).sum();
            Ok((copy, (dropped + child_images).saturating_sub(growth)))
        }
    }
}

const WINDOW_DAYS: i64 = 14;

/// `GET /api/v1/repositories/{id}/space`.
pub async fn repository_space(db: &Db, id: &str) -> Result<RepositorySpace, super::PruneError> {
    let e = |doing| super::db_err(doing);
    let repo = db
        .get_repository(id)
        .await
        .map_err(e("reading the repository"))?;
    let s = crate::repository::space(std::path::Path::new(&repo.path)).map_err(|source| {
        super::PruneError::Estimate {
            vm: String::new(),
            source,
        }
    })?;
    let points = db
        .list_backups_in(&[JobStatus::Completed])
        .await
        .map_err(e("listing points"))?;
    let now = db.clock().now();
    let since = now - chrono::Duration::days(WINDOW_DAYS);
    let mut vms: BTreeMap<String, (u32, u64)> = BTreeMap::new();
    let mut recent = 0u64;
    let mut oldest = now;
    for p in points.iter().filter(|p| p.repository_id == id) {
        let bytes: u64 = p
            .disk_results
            .iter()
            .map(|d| {
                let img = PathBuf::from(&d.qcow2_path);
                qemu::allocated(&img) + qemu::allocated(&crate::manifest::sidecar_path(&img))
            })
            .sum();
        let v = vms.entry(p.vm_name.clone()).or_default();
        v.0 += 1;
        v.1 += bytes;
        let done = p.completed_at.unwrap_or(p.created_at);
        if done >= since {
            recent += bytes;
        }
        oldest = oldest.min(p.created_at);
    }
    let freed = db
        .bytes_pruned_since(since.timestamp_micros())
        .await
        .map_err(e("summing what prunes freed"))?;
    let days = ((now - oldest).num_seconds() as f64 / 86_400.0).clamp(1.0, WINDOW_DAYS as f64);
    let growth = (recent as f64 - freed as f64) / days;
    let used: u64 = vms.values().map(|v| v.1).sum();
    Ok(RepositorySpace {
        repository_id: id.to_string(),
        total_bytes: s.total_bytes,
        free_bytes: s.free_bytes,
        used_bytes: used,
        vms: vms
            .into_iter()
            .map(|(vm_name, (points, bytes))| VmSpace {
                vm_name,
                points,
                bytes,
            })
            .collect(),
        growth_bytes_per_day: growth,
        full_in_days: (growth > 0.0).then(|| s.free_bytes as f64 / growth),
    })
}
