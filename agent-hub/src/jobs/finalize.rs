//! After a `completed` report: make the copy durable and prove it, then finish.
//!
//! 1. **The truth first.** Each disk's whole-disk checksums ([`Manifest`]) were built from the
//!    writer's grid (an incremental inherits the parent point's cells it did not list), written
//!    to the sidecar next to the image and recorded in the catalog before the completion report
//!    was acknowledged ([`store_truths`]): a hub killed from then on leaves a job its start-up
//!    reconciler can still prove and complete.
//! 2. **Stop the writer's path.** The hub sends its own FLUSH to each writable export, stops it
//!    and checks how it ended: anything but a clean exit after SIGTERM (a SIGKILL after the
//!    grace, an error exit, an exit nobody asked for) fails that disk, naming it. Then the image
//!    and its directory are fsynced.
//! 3. **Read the whole chain back**, read-only, every disk at once ([`crate::readback`]), and
//!    compare every cell with the truth; the writer's range checksums, when sent, are checked
//!    on the same export, in the same pass (a range inside one cell is hashed from the bytes read
//!    for that cell; only ranges across cell boundaries are read again). A writer that sent no
//!    grid (a hub-alone writer) gets checksums the hub computes from the stopped image, and the
//!    point says so (`hub_computed`).
//! 4. `qemu-img check` of each image, run beside its read-back (both only read the stopped
//!    image; both must pass); then the point's integrity, then `completed`.
//!
//! Each step runs for every disk at once: a disk never waits for another's FLUSH, stop, fsync,
//! read-back or check.
//!
//! Database errors on the way are waited out ([`super::patience`]), never taken for a failure:
//! a verified point is not deleted because the catalog did not answer.

use super::finish::{Outcome, finish, stop_exports};
use super::patience::{Patience, db_retry};
use super::{JobManager, Level, LiveJob, Resources};
use crate::db::DiskUpdate;
use crate::manifest::{self, Manifest};
use crate::readback::{ReadBackError, Served};
use sendense_shared::api::{
    CompletionReport, DEFAULT_GRID_CELL, DiskCompletion, DiskStatus, Integrity,
};
use sendense_shared::ids::{BackupId, DiskKey};
use sendense_shared::nbd::verify::{VerifyError, verify_ranges};
use sendense_shared::nbd::{ConnectOptions, NbdClient};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// Where a disk's truth comes from.
enum Truth {
    /// The writer's grid, stored as the sidecar.
    Writer(Manifest),
    /// No usable grid: the hub computes checksums from the stopped image (`why` says so).
    Hub { why: String },
}

/// How a step ended when it did not succeed.
enum Stop {
    /// Fail the job with this cause.
    Fail(String),
    Cancelled,
    /// The database stayed away longer than the hub's patience: leave the job `finalizing`
    /// with its images, for the database's return or the next start's reconciler.
    Abandon,
}

/// See the module documentation.
pub async fn finalize(jm: &JobManager, job: Arc<LiveJob>, report: CompletionReport) {
    let mut res = job.res.lock().await;
    if res.finished {
        return;
    }
    let outcome = match run(jm, &job, &mut res, &report).await {
        Ok(()) => Outcome::Completed,
        Err(Stop::Cancelled) => Outcome::Cancelled,
        Err(Stop::Fail(msg)) => Outcome::Failed(msg),
        Err(Stop::Abandon) => {
            abandon(jm, &job, &mut res).await;
            return;
        }
    };
    let outcome = if job.cancel.is_cancelled() {
        Outcome::Cancelled
    } else {
        outcome
    };
    finish(jm, &job, &mut res, outcome).await;
}

fn patience(jm: &JobManager) -> Patience {
    Patience::new(jm.deps().db_patience)
}

async fn run(
    jm: &JobManager,
    job: &LiveJob,
    res: &mut Resources,
    report: &CompletionReport,
) -> Result<(), Stop> {
    let id = &job.id;
    let images = res.images.clone();
    // 1. The truth, as the catalog recorded it with the completion report (read once).
    let db = &jm.deps().db;
    let rows = db_retry(jm, id, "reading the job's disks", patience(jm), || {
        db.backup_disks(id)
    })
    .await
    .ok_or(Stop::Abandon)?;
    let mut truths = Vec::with_capacity(images.len());
    for (disk, _) in &images {
        let d = report.disks.iter().find(|d| d.disk_key == *disk);
        let row = rows.iter().find(|r| r.result.disk_key == *disk);
        truths.push(load_truth(*disk, row, d).await?);
    }
    if job.cancel.is_cancelled() {
        return Err(Stop::Cancelled);
    }
    // 2. The writer's path: FLUSH (bounded: a hung qemu-nbd is then diagnosed by its stop),
    // stop, exit statuses, fsync.
    // Every disk at once: a step per disk that waits for the one before it is time the job
    // spends doing nothing.
    let grace = jm.deps().qemu_nbd.stop_grace;
    let flushes = res.exports.iter().map(|e| async move {
        let why = match tokio::time::timeout(grace, flush(&e.server)).await {
            Ok(Ok(())) => return None,
            Ok(Err(err)) => err,
            Err(_) => format!("no answer within {} ms", grace.as_millis()),
        };
        Some(format!(
            "disk {}: the hub's FLUSH of its export failed: {why}",
            e.disk_key
        ))
    });
    let mut problems: Vec<String> = futures_util::future::join_all(flushes)
        .await
        .into_iter()
        .flatten()
        .collect();
    let unclean = stop_exports(jm, job, res).await;
    for (disk, msg) in &unclean {
        let _ = jm
            .deps()
            .db
            .update_disk(
                &job.id,
                *disk,
                &DiskUpdate {
                    status: Some(DiskStatus::Failed),
                    error_message: Some(Some(msg.clone())),
                    ..Default::default()
                },
            )
            .await;
    }
    problems.splice(0..0, unclean.into_iter().map(|d| d.1));
    if !problems.is_empty() {
        return Err(Stop::Fail(problems.join("; ")));
    }
    let syncs = images.iter().map(|(disk, path)| async move {
        let p = path.clone();
        let synced = tokio::task::spawn_blocking(move || manifest::fsync_file_and_dir(&p)).await;
        synced
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|e| Stop::Fail(format!("disk {disk}: cannot fsync {}: {e}", path.display())))
    });
    for r in futures_util::future::join_all(syncs).await {
        r?;
    }
    // 3. Every disk read back at once, and 4. each image's `qemu-img check` next to its
    // read-back (both only read the stopped image; both must pass).
    let reads = images.iter().zip(truths).map(|((disk, path), truth)| {
        let d = report.disks.iter().find(|d| d.disk_key == *disk);
        async move {
            // The check runs beside the read-back; its verdict is recorded after the
            // read-back's (the event log keeps the order a reader expects).
            let t = Instant::now();
            let (read, checked) = tokio::join!(read_back(jm, job, *disk, path, truth, d), async {
                let c = crate::repository::qemu_img_check(path).await;
                (c, t.elapsed())
            });
            let why = read?;
            if job.cancel.is_cancelled() {
                return Err(Stop::Cancelled);
            }
            check_image(jm, id, *disk, path, checked).await?;
            Ok::<_, Stop>(why)
        }
    });
    let mut hub_computed = Vec::new();
    let mut first_stop = None;
    for r in futures_util::future::join_all(reads).await {
        match r {
            Ok(Some(why)) => hub_computed.push(why),
            Ok(None) => {}
            Err(stop) => {
                first_stop.get_or_insert(stop);
            }
        }
    }
    if let Some(stop) = first_stop {
        return Err(stop);
    }
    if job.cancel.is_cancelled() {
        return Err(Stop::Cancelled);
    }
    // Then the point's integrity.
    let (integrity, detail) = if let Some(p) = corrupt_parent(jm, id, &rows).await? {
        // A verify job found the parent corrupt while this point was being written.
        (
            Integrity::Corrupt,
            Some(format!(
                "depends on corrupt point {p} (found while this point was copied)"
            )),
        )
    } else if hub_computed.is_empty() {
        (Integrity::Verified, None)
    } else {
        (Integrity::HubComputed, Some(hub_computed.join("; ")))
    };
    if integrity == Integrity::Corrupt {
        jm.event(
            id,
            Level::Error,
            "integrity_corrupt",
            detail.clone().unwrap_or_default(),
            None,
        )
        .await;
    }
    db_retry(
        jm,
        id,
        "recording the point's integrity",
        patience(jm),
        || jm.deps().db.set_integrity(id, integrity, detail.as_deref()),
    )
    .await
    .ok_or(Stop::Abandon)?;
    Ok(())
}

/// The parent point of this incremental, when the catalog now records it corrupt.
async fn corrupt_parent(
    jm: &JobManager,
    id: &BackupId,
    rows: &[crate::db::BackupDiskRow],
) -> Result<Option<BackupId>, Stop> {
    let db = &jm.deps().db;
    let Some(parent) = rows.iter().find_map(|r| r.parent_backup_id.clone()) else {
        return Ok(None);
    };
    let p = db_retry(jm, id, "reading the parent point", patience(jm), || {
        db.get_backup(&parent)
    })
    .await
    .ok_or(Stop::Abandon)?;
    Ok((p.integrity == Integrity::Corrupt).then_some(parent))
}

/// Why a completion report's checksums could not be stored (the writer gets the error).
#[derive(Debug, thiserror::Error)]
pub enum TruthError {
    #[error("disks[{index}].grid: {cause}")]
    BadGrid { index: usize, cause: String },
    #[error("disk {disk}: the parent point {parent}'s checksums cannot be used: {cause}")]
    Parent {
        disk: DiskKey,
        parent: BackupId,
        cause: String,
    },
    #[error("disk {disk}: {cause}")]
    Store { disk: DiskKey, cause: String },
    #[error("database")]
    Db(#[from] crate::db::DbError),
}

/// Builds each disk's manifest from the writer's grid (an incremental inherits the parent
/// point's cells it did not list) and stores it: the sidecar written durably, then its path
/// and digest in the catalog. Runs before the completion report is acknowledged, so a
/// `202` means the truth is on disk; a disk without a grid, or whose parent point has no
/// checksums, is left for the hub to compute at finalization.
pub async fn store_truths(
    jm: &JobManager,
    id: &BackupId,
    report: &CompletionReport,
) -> Result<(), TruthError> {
    let db = &jm.deps().db;
    let rows = db.backup_disks(id).await?;
    for (index, d) in report.disks.iter().enumerate() {
        let Some(grid) = &d.grid else { continue };
        let Some(row) = rows.iter().find(|r| r.result.disk_key == d.disk_key) else {
            continue;
        };
        let disk = d.disk_key;
        let parent = match &row.parent_backup_id {
            None => None,
            Some(parent_id) => {
                let prow = db
                    .backup_disks(parent_id)
                    .await?
                    .into_iter()
                    .find(|r| r.result.disk_key == disk);
                let Some(path) = prow.as_ref().and_then(|r| r.manifest_path.clone()) else {
                    continue; // an older parent: nothing to inherit
                };
                let want = prow.as_ref().and_then(|r| r.manifest_blake3.clone());
                let m = Manifest::read(Path::new(&path), want.as_deref())
                    .await
                    .map_err(|e| TruthError::Parent {
                        disk,
                        parent: parent_id.clone(),
                        cause: sendense_shared::errors::chain(&e),
                    })?;
                Some(m)
            }
        };
        let m = Manifest::from_grid(grid, parent.as_ref()).map_err(|e| TruthError::BadGrid {
            index,
            cause: sendense_shared::errors::chain(&e),
        })?;
        if m.disk_size != row.result.bytes_total {
            return Err(TruthError::BadGrid {
                index,
                cause: format!(
                    "disk_size {} is not the disk's {} bytes",
                    m.disk_size, row.result.bytes_total
                ),
            });
        }
        let image = Path::new(&row.result.qcow2_path);
        let sidecar = manifest::sidecar_path(image);
        let upd = m
            .store_for(image, "writer")
            .await
            .map_err(|e| TruthError::Store {
                disk,
                cause: sendense_shared::errors::chain(&e),
            })?;
        db.update_disk(id, disk, &upd).await?;
        let listed = grid.cells.len() as u64 + grid.zero_cells.iter().map(|r| r.count).sum::<u64>();
        jm.event(
            id,
            Level::Info,
            "checksums_stored",
            format!(
                "disk {disk}: whole-disk checksums of {} cells of {} bytes stored in {} ({listed} \
                 from the writer, {} inherited from the parent point)",
                m.cells(),
                m.cell_size,
                sidecar.display(),
                m.cells() - listed
            ),
            Some(disk),
        )
        .await;
    }
    Ok(())
}

/// The truth of one disk as the catalog recorded it at the completion report.
async fn load_truth(
    disk: DiskKey,
    row: Option<&crate::db::BackupDiskRow>,
    d: Option<&DiskCompletion>,
) -> Result<Truth, Stop> {
    match row.and_then(|r| r.manifest_path.clone()) {
        Some(path) => {
            let want = row.and_then(|r| r.manifest_blake3.clone());
            Manifest::read(Path::new(&path), want.as_deref())
                .await
                .map(Truth::Writer)
                .map_err(|e| {
                    Stop::Fail(format!(
                        "disk {disk}: {}",
                        sendense_shared::errors::chain(&e)
                    ))
                })
        }
        None if d.is_some_and(|d| d.grid.is_some()) => Ok(Truth::Hub {
            why: format!(
                "disk {disk}: the parent point has no whole-disk checksums (it is older than \
                 them), so the incremental's unchanged cells have none to inherit; the hub \
                 computed them from the stopped image"
            ),
        }),
        None => Ok(Truth::Hub {
            why: format!(
                "disk {disk}: the writer sent no whole-disk checksums; the hub computed them \
                 from the stopped image"
            ),
        }),
    }
}

/// FLUSH on the job's export, as the hub (its client certificate when the export needs TLS).
async fn flush(server: &crate::qemu_nbd::QemuNbd) -> Result<(), String> {
    let c = NbdClient::connect(&server.nbd_addr(), &server.hub_connect_options())
        .await
        .map_err(|e| sendense_shared::errors::chain(&e))?;
    let r = c
        .flush()
        .await
        .map_err(|e| sendense_shared::errors::chain(&e));
    let _ = c.disconnect().await;
    r
}

/// Reads one disk back. `Ok(Some(why))` when the hub computed the checksums itself.
async fn read_back(
    jm: &JobManager,
    job: &LiveJob,
    disk: DiskKey,
    image: &Path,
    truth: Truth,
    d: Option<&DiskCompletion>,
) -> Result<Option<String>, Stop> {
    let id = &job.id;
    let served = jm
        .deps()
        .readback
        .serve(image)
        .await
        .map_err(|e| fail_disk(disk, &e))?;
    let t = Instant::now();
    let r = read_served(jm, job, disk, image, &served, truth, d).await;
    served.close().await;
    if let Err(Stop::Cancelled) = &r {
        jm.event(
            id,
            Level::Warn,
            "verification_cancelled",
            format!(
                "disk {disk}: verification stopped by a cancel after {} ms",
                t.elapsed().as_millis()
            ),
            Some(disk),
        )
        .await;
    }
    if let Err(Stop::Fail(msg)) = &r {
        let _ = jm
            .deps()
            .db
            .update_disk(
                id,
                disk,
                &DiskUpdate {
                    status: Some(DiskStatus::Failed),
                    error_message: Some(Some(msg.clone())),
                    ..Default::default()
                },
            )
            .await;
    }
    r
}

/// A read-back found bytes that differ: the event, and the job's failure.
async fn mismatch_found(jm: &JobManager, id: &BackupId, disk: DiskKey, msg: String) -> Stop {
    jm.event(
        id,
        Level::Error,
        "checksums_mismatch",
        msg.clone(),
        Some(disk),
    )
    .await;
    Stop::Fail(msg)
}

fn fail_disk(disk: DiskKey, e: &ReadBackError) -> Stop {
    if e.is_cancel() {
        return Stop::Cancelled;
    }
    Stop::Fail(format!(
        "disk {disk}: verification failed: {}",
        sendense_shared::errors::chain(e)
    ))
}

async fn read_served(
    jm: &JobManager,
    job: &LiveJob,
    disk: DiskKey,
    image: &Path,
    served: &Served,
    truth: Truth,
    d: Option<&DiskCompletion>,
) -> Result<Option<String>, Stop> {
    let id = &job.id;
    let db = &jm.deps().db;
    let t = Instant::now();
    // The writer's range checksums (older writers send only these), on the same export: those
    // inside one cell are proven from the bytes the cells' pass reads (one read of the data
    // for both), the others (crossing a cell boundary, or beyond the disk) read on their own.
    let sums = d.and_then(|d| d.checksums.as_ref());
    let cell_size = match &truth {
        Truth::Writer(m) => m.cell_size,
        Truth::Hub { .. } => DEFAULT_GRID_CELL,
    };
    let mut inner = Vec::new();
    let mut outer_done = None;
    if let Some(sums) = sums {
        let addr = served.addr();
        let client = NbdClient::connect(&addr, &ConnectOptions::default())
            .await
            .map_err(|e| {
                Stop::Fail(format!(
                    "disk {disk}: verification failed: cannot open {addr} to read back: {}",
                    sendense_shared::errors::chain(&e)
                ))
            })?;
        let (fit, outer) = manifest::split_ranges(&sums.ranges, cell_size, client.size());
        inner = fit;
        let r = verify_ranges(&client, &outer, &job.cancel, None).await;
        let _ = client.disconnect().await;
        match r {
            Ok(s) => outer_done = Some(s),
            Err(err) => return Err(ranges_failed(jm, id, disk, sums.ranges.len(), err).await),
        }
    } else {
        let _ = db
            .update_disk(
                id,
                disk,
                &DiskUpdate {
                    checksum_status: Some("skipped".into()),
                    ..Default::default()
                },
            )
            .await;
    }

    let read = AtomicU64::new(0);
    let (outcome, ranges) = match truth {
        Truth::Writer(m) => {
            let (r, ranges) = served
                .check_with_ranges(&m, &inner, &job.cancel, &read)
                .await
                .map_err(|e| fail_disk(disk, &e))?;
            (Ok((r, m)), ranges)
        }
        Truth::Hub { why } => {
            let (m, ranges) = served
                .compute_with_ranges(DEFAULT_GRID_CELL, &inner, &job.cancel, &read)
                .await
                .map_err(|e| fail_disk(disk, &e))?;
            (Err((why, m)), ranges)
        }
    };
    // The range checksums' verdict first (a writer's own account of what it wrote).
    if let (Some(sums), Some(outer)) = (sums, outer_done) {
        let failed = ranges.first_mismatch.is_some();
        let _ = db
            .update_disk(
                id,
                disk,
                &DiskUpdate {
                    checksum_status: Some(if failed { "failed" } else { "passed" }.into()),
                    checksum_ranges: Some(sums.ranges.len() as u64),
                    checksum_mismatches: Some(ranges.mismatch_count),
                    ..Default::default()
                },
            )
            .await;
        if let Some(m) = ranges.first_mismatch {
            let err = VerifyError::Mismatch {
                offset: m.offset,
                length: m.length,
                expected: m.expected,
                actual: m.actual,
            };
            let msg = format!("disk {disk}: verification failed: {err}");
            return Err(mismatch_found(jm, id, disk, msg).await);
        }
        jm.event(
            id,
            Level::Info,
            "checksums_verified",
            format!(
                "disk {disk}: {} written range(s), {} bytes read back from the stopped image \
                 match the writer's BLAKE3 checksums ({} ms; {} of them proven from the \
                 whole-disk pass's reads)",
                sums.ranges.len(),
                outer.bytes + ranges.bytes,
                t.elapsed().as_millis(),
                ranges.ranges
            ),
            Some(disk),
        )
        .await;
    }

    match outcome {
        Ok((r, _)) => {
            let secs = t.elapsed().as_secs_f64().max(1e-3);
            if !r.is_clean() {
                let msg = format!(
                    "disk {disk}: verification failed: the image chain differs from the \
                     writer's whole-disk checksums in {} cell(s): {}",
                    r.mismatch_count,
                    r.describe_mismatches()
                );
                return Err(mismatch_found(jm, id, disk, msg).await);
            }
            jm.event(
                id,
                Level::Info,
                "image_verified",
                format!(
                    "disk {disk}: whole image chain read back read-only: all {} cells equal the \
                     writer's checksums ({} cells, {} bytes read; the rest zero by block status) \
                     in {} ms, {:.0} MiB/s",
                    r.cells,
                    r.cells_read,
                    r.bytes_read,
                    t.elapsed().as_millis(),
                    r.bytes_read as f64 / secs / 1048576.0
                ),
                Some(disk),
            )
            .await;
            Ok(None)
        }
        Err((why, m)) => {
            if sums.is_none() {
                jm.event(
                    id,
                    Level::Warn,
                    "checksums_absent",
                    format!("disk {disk}: the writer sent no checksums"),
                    Some(disk),
                )
                .await;
            }
            let upd = m.store_for(image, "hub").await.map_err(|e| {
                Stop::Fail(format!(
                    "disk {disk}: {}",
                    sendense_shared::errors::chain(&e)
                ))
            })?;
            db_retry(
                jm,
                id,
                "recording the disk's checksums",
                patience(jm),
                || jm.deps().db.update_disk(id, disk, &upd),
            )
            .await
            .ok_or(Stop::Abandon)?;
            jm.event(
                id,
                Level::Warn,
                "checksums_computed",
                format!(
                    "{why} ({} cells, {} bytes read in {} ms); later verify jobs compare with \
                     these",
                    m.cells(),
                    read.load(std::sync::atomic::Ordering::Relaxed),
                    t.elapsed().as_millis()
                ),
                Some(disk),
            )
            .await;
            Ok(Some(why))
        }
    }
}

/// The range checksums read on their own failed (a mismatch, a read error, a cancel).
async fn ranges_failed(
    jm: &JobManager,
    id: &BackupId,
    disk: DiskKey,
    count: usize,
    err: VerifyError,
) -> Stop {
    if let VerifyError::Cancelled = err {
        return Stop::Cancelled;
    }
    let msg = format!("disk {disk}: verification failed: {err}");
    let mismatch = matches!(err, VerifyError::Mismatch { .. });
    let _ = jm
        .deps()
        .db
        .update_disk(
            id,
            disk,
            &DiskUpdate {
                checksum_status: Some("failed".into()),
                checksum_ranges: Some(count as u64),
                // Verification stops at the first mismatch.
                checksum_mismatches: Some(u64::from(mismatch)),
                ..Default::default()
            },
        )
        .await;
    mismatch_found(jm, id, disk, msg).await
}

async fn check_image(
    jm: &JobManager,
    id: &BackupId,
    disk: DiskKey,
    path: &Path,
    (checked, took): (
        Result<crate::repository::CheckReport, crate::repository::RepoError>,
        std::time::Duration,
    ),
) -> Result<(), Stop> {
    let summary = match &checked {
        Ok(c) => c.summary(),
        Err(e) => format!("qemu-img check failed: {e}"),
    };
    let _ = jm
        .deps()
        .db
        .update_disk(
            id,
            disk,
            &DiskUpdate {
                qemu_img_check: Some(summary.clone()),
                ..Default::default()
            },
        )
        .await;
    match checked {
        Ok(c) if c.is_clean() => {
            jm.event(
                id,
                Level::Info,
                "image_checked",
                format!(
                    "disk {disk}: qemu-img check {}: {summary} in {} ms",
                    path.display(),
                    took.as_millis()
                ),
                Some(disk),
            )
            .await;
            Ok(())
        }
        Ok(_) | Err(_) => {
            let msg = format!("disk {disk}: qemu-img check {}: {summary}", path.display());
            jm.event(
                id,
                Level::Error,
                "image_check_failed",
                msg.clone(),
                Some(disk),
            )
            .await;
            Err(Stop::Fail(msg))
        }
    }
}

/// The database stayed away past the hub's patience: the job stays `finalizing` in the catalog
/// with its images and sidecars; this process lets go of it (its exports are stopped already
/// or now). The next start's reconciler proves and completes it, or fails it.
async fn abandon(jm: &JobManager, job: &LiveJob, res: &mut Resources) {
    let _ = stop_exports(jm, job, res).await;
    let kept: Vec<PathBuf> = res.images.drain(..).map(|(_, p)| p).collect();
    res.finished = true;
    job.ended.cancel();
    jm.remove_live(&job.id);
    tracing::error!(
        backup_id = %job.id,
        images = ?kept,
        "the database stayed unreachable past the hub's patience during finalization; the job \
         stays finalizing with its images for the reconciler"
    );
    jm.event(
        &job.id,
        Level::Error,
        "finalize_abandoned",
        format!(
            "the database did not answer for {} s during finalization; the job stays \
             finalizing with its {} image(s) kept, and the hub's next start proves and \
             completes it",
            jm.deps().db_patience.as_secs(),
            kept.len()
        ),
        None,
    )
    .await;
}
