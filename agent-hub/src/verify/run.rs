//! The life of one verify job: every point in turn, its disks at once, the findings recorded on
//! the points, progress published about once a second, throughput in the last event.

use super::Verifier;
use crate::db::{BackupDiskRow, VerifyProgress};
use crate::events::Level;
use crate::manifest::{Manifest, ManifestError};
use crate::readback::ReadBackError;
use sendense_shared::api::{BootCheckSpec, BootStatus, DEFAULT_GRID_CELL, Integrity, JobStatus};
use sendense_shared::errors::chain;
use sendense_shared::ids::BackupId;
use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often progress is written and published while a point is read.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What one disk's read found.
enum Finding {
    /// Equal to the stored checksums.
    Clean,
    /// A legacy disk: the hub computed and stored its checksums (nothing to compare with).
    Computed {
        cells: u64,
    },
    /// The bytes (or the sidecar) differ from what the catalog recorded: the point is corrupt.
    Corrupt(String),
    /// The read could not be done (no qemu-nbd, an I/O error): nothing is known.
    Error(String),
    Cancelled,
}

/// See the module documentation.
pub(super) async fn run(
    v: &Verifier,
    id: &str,
    points: Vec<BackupId>,
    boot: Option<&BootCheckSpec>,
    cancel: &CancellationToken,
) {
    let db = &v.deps().db;
    let started = Instant::now();
    let moved = db
        .transition_verify(id, &[JobStatus::Pending], JobStatus::Running, None)
        .await;
    match moved {
        Ok(true) => {}
        // Cancelled before it started.
        Ok(false) => return end(v, id, JobStatus::Cancelled, None).await,
        Err(e) => {
            let why = format!("cannot start: {}", chain(&e));
            return end(v, id, JobStatus::Failed, Some(&why)).await;
        }
    }
    v.publish(id).await;
    let total = bytes_total(v, &points).await;
    let read = AtomicU64::new(0);
    let mut progress = VerifyProgress {
        points_done: 0,
        bytes_total: total,
        bytes_read: 0,
    };
    let mut corrupt: Vec<BackupId> = Vec::new();
    let mut marked: HashSet<BackupId> = HashSet::new();
    let mut errors: Vec<String> = Vec::new();
    let mut boot_failed: Vec<BackupId> = Vec::new();
    let mut booted = 0usize;
    let mut last_point = None;
    for point in &points {
        if cancel.is_cancelled() {
            break;
        }
        last_point = Some(point.clone());
        if marked.contains(point) {
            v.deps()
                .log
                .record(
                    point,
                    Some(id),
                    Level::Warn,
                    "verify_skipped",
                    &format!(
                        "verify job {id}: not read: already marked corrupt (a point it depends \
                         on is)"
                    ),
                    None,
                )
                .await;
        } else {
            let checked = {
                let fut = verify_point(v, id, point, cancel, &read);
                tokio::pin!(fut);
                let mut tick = tokio::time::interval(PROGRESS_EVERY);
                loop {
                    tokio::select! {
                        r = &mut fut => break r,
                        _ = tick.tick() => {
                            progress.bytes_read = read.load(Ordering::Relaxed);
                            let _ = db
                                .set_verify_progress(id, progress, points.len() as u64, &corrupt)
                                .await;
                            v.publish(id).await;
                        }
                    }
                }
            };
            match checked {
                PointResult::Clean => {
                    if let Some(spec) = boot {
                        booted += 1;
                        match boot_point(v, id, point, spec, cancel).await {
                            Some(BootStatus::BootFailed) => boot_failed.push(point.clone()),
                            Some(BootStatus::Interrupted) if cancel.is_cancelled() => break,
                            Some(_) => {}
                            None => errors.push(format!(
                                "point {point}: the boot check could not be recorded"
                            )),
                        }
                    }
                }
                PointResult::Corrupt(newly) => {
                    corrupt.push(point.clone());
                    marked.extend(newly);
                }
                PointResult::Error(e) => errors.push(format!("point {point}: {e}")),
                PointResult::Cancelled => break,
            }
        }
        progress.points_done += 1;
        progress.bytes_read = read.load(Ordering::Relaxed);
        let _ = db
            .set_verify_progress(id, progress, points.len() as u64, &corrupt)
            .await;
        v.publish(id).await;
    }
    progress.bytes_read = read.load(Ordering::Relaxed);
    let _ = db
        .set_verify_progress(id, progress, points.len() as u64, &corrupt)
        .await;
    let secs = started.elapsed().as_secs_f64();
    let gib_min = progress.bytes_read as f64 / (1u64 << 30) as f64 / (secs / 60.0).max(1e-9);
    let boots = if boot.is_some() {
        format!(
            ", {booted} booted ({} failed{})",
            boot_failed.len(),
            if boot_failed.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    boot_failed
                        .iter()
                        .map(|b| b.0.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )
    } else {
        String::new()
    };
    let summary = format!(
        "verify job {id}: {} of {} point(s) read, {} corrupt{}{boots}; {} bytes read in {:.1} s \
         ({gib_min:.2} GiB/min)",
        progress.points_done,
        points.len(),
        corrupt.len(),
        if corrupt.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                corrupt
                    .iter()
                    .map(|b| b.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        progress.bytes_read,
        secs,
    );
    tracing::info!(verify_id = %id, bytes = progress.bytes_read, secs, gib_min, "{summary}");
    let (status, error) = if cancel.is_cancelled() {
        (JobStatus::Cancelled, None)
    } else if !errors.is_empty() {
        (JobStatus::Failed, Some(errors.join("; ")))
    } else {
        (JobStatus::Completed, None)
    };
    // On the last point read, or (a cancel before the first was read) on the first in scope:
    // every job that had points says how it ended.
    if let Some(p) = last_point.as_ref().or(points.first()) {
        let level =
            if status == JobStatus::Completed && corrupt.is_empty() && boot_failed.is_empty() {
                Level::Info
            } else {
                Level::Error
            };
        let step = match status {
            JobStatus::Cancelled => "verify_cancelled",
            JobStatus::Failed => "verify_failed",
            _ => "verify_completed",
        };
        v.deps()
            .log
            .record(p, Some(id), level, step, &summary, None)
            .await;
    }
    end(v, id, status, error.as_deref()).await;
}

/// Records a scheduled repository's verification time, then moves the job to its end (in
/// this order: whoever sees the job ended sees the repository's time too), publishes.
async fn end(v: &Verifier, id: &str, status: JobStatus, error: Option<&str>) {
    let db = &v.deps().db;
    if let Ok(job) = db.get_verify(id).await
        && job.trigger == super::Trigger::Schedule.as_str()
        && let Some(repo) = job.scope.strip_prefix("repository:")
        && let Err(e) = db.set_last_verified(repo, v.deps().clock.now()).await
    {
        tracing::error!(verify_id = %id, repository = %repo, error = %chain(&e),
            "cannot record the repository's verification time");
    }
    let from = [
        JobStatus::Pending,
        JobStatus::Running,
        JobStatus::Cancelling,
    ];
    if let Err(e) = db.transition_verify(id, &from, status, error).await {
        tracing::error!(verify_id = %id, error = %chain(&e), "cannot record the verify job's end");
    }
    v.publish(id).await;
}

/// Bytes the job will read at most: the data cells of every stored manifest (a legacy disk
/// without one counts its whole size).
async fn bytes_total(v: &Verifier, points: &[BackupId]) -> u64 {
    let mut total = 0;
    for p in points {
        let Ok(disks) = v.deps().db.backup_disks(p).await else {
            continue;
        };
        for d in disks {
            total += match &d.manifest_path {
                Some(path) => Manifest::read(Path::new(path), None)
                    .await
                    .map(|m| m.data_bytes())
                    .unwrap_or(d.result.bytes_total),
                None => d.result.bytes_total,
            };
        }
    }
    total
}

/// Boots `point` (it read back clean) as a throwaway VM on the hub and records the outcome on
/// it, with an event; answers the status recorded (`None`: it could not be recorded).
async fn boot_point(
    v: &Verifier,
    id: &str,
    point: &BackupId,
    spec: &BootCheckSpec,
    cancel: &CancellationToken,
) -> Option<BootStatus> {
    let db = &v.deps().db;
    let log = &v.deps().log;
    let disks = match db.backup_disks(point).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(backup_id = %point, error = %chain(&e), "boot check: cannot read the disks");
            return None;
        }
    };
    let mut disks: Vec<_> = disks.into_iter().map(|d| d.result).collect();
    disks.sort_by_key(|d| (d.unit_number, d.disk_key));
    let images = disks.iter().map(|d| d.qcow2_path.clone().into()).collect();
    // Defaults from the VM's hardware as the node recorded it at backup time.
    let hw = db.get_backup(point).await.ok().and_then(|b| b.hardware);
    let plan = crate::bootcheck::Plan::new(images, spec, hw.as_deref());
    // Short: QEMU's unix socket paths (the guest agent's, inside) must stay under 108 bytes.
    let work = v
        .deps()
        .boot_root
        .join(&uuid::Uuid::new_v4().simple().to_string()[..12]);
    if let Err(e) = db
        .start_boot_check(point, id, &work.display().to_string())
        .await
    {
        tracing::error!(backup_id = %point, error = %chain(&e), "boot check: cannot record its start");
        return None;
    }
    log.record(
        point,
        Some(id),
        Level::Info,
        "boot_check_started",
        &format!(
            "verify job {id}: booting {} disk(s) of point {point} as a throwaway VM on the hub \
             ({} MiB, {} CPU(s), TCG, {}; up to {} s) from overlays in {}",
            plan.images.len(),
            plan.memory_mib,
            plan.cpus,
            match &plan.kernel {
                Some(k) => format!("kernel {} append {:?}", k.display(), plan.append),
                None => "from its first disk".into(),
            },
            plan.timeout.as_secs(),
            work.display()
        ),
        None,
    )
    .await;
    let out = crate::bootcheck::run(&work, &plan, cancel, |pid| async move {
        if let Err(e) = db.set_boot_check_pid(point, pid).await {
            tracing::error!(backup_id = %point, pid, error = %chain(&e),
                "boot check: cannot record QEMU's pid");
        }
    })
    .await;
    if let Err(e) = db
        .finish_boot_check(
            point,
            out.status,
            &out.detail,
            &out.console_tail,
            out.boot_ms,
        )
        .await
    {
        tracing::error!(backup_id = %point, error = %chain(&e), "boot check: cannot record its outcome");
        return None;
    }
    let (level, step) = match out.status {
        BootStatus::BootOk => (Level::Info, "boot_ok"),
        BootStatus::BootFailed => (Level::Error, "boot_failed"),
        _ => (Level::Warn, "boot_check_interrupted"),
    };
    let last = out
        .console_tail
        .iter()
        .rev()
        .take(8)
        .rev()
        .cloned()
        .collect::<Vec<_>>()
        .join(" | ");
    log.record(
        point,
        Some(id),
        level,
        step,
        &format!(
            "verify job {id}: {}: {}; QEMU stopped and overlays removed{}",
            out.status.as_str(),
            out.detail,
            if last.is_empty() {
                String::new()
            } else {
                format!("; last console lines: {last}")
            }
        ),
        None,
    )
    .await;
    Some(out.status)
}

enum PointResult {
    Clean,
    /// The points marked corrupt (this one and its dependents).
    Corrupt(Vec<BackupId>),
    Error(String),
    Cancelled,
}

/// Reads every disk of `point` at once and records what was found on the point.
async fn verify_point(
    v: &Verifier,
    id: &str,
    point: &BackupId,
    cancel: &CancellationToken,
    read: &AtomicU64,
) -> PointResult {
    let db = &v.deps().db;
    let log = &v.deps().log;
    let (backup, disks) = match (db.get_backup(point).await, db.backup_disks(point).await) {
        (Ok(b), Ok(d)) => (b, d),
        (Err(e), _) | (_, Err(e)) => return PointResult::Error(chain(&e)),
    };
    let t = Instant::now();
    let before = read.load(Ordering::Relaxed);
    log.record(
        point,
        Some(id),
        Level::Info,
        "verify_started",
        &format!(
            "verify job {id}: reading {} disk(s) of point {point} ({}) back against its stored \
             checksums",
            disks.len(),
            backup.integrity.as_str()
        ),
        None,
    )
    .await;
    let reads = disks.iter().map(|d| verify_disk(v, d, cancel, read));
    let findings = futures_util::future::join_all(reads).await;
    let mut corrupt = Vec::new();
    let mut errors = Vec::new();
    let mut computed = Vec::new();
    for (d, f) in disks.iter().zip(findings) {
        let disk = d.result.disk_key;
        match f {
            Finding::Clean => {}
            Finding::Computed { cells } => computed.push(format!(
                "disk {disk}: verify job {id} computed its checksums ({cells} cells) from the \
                 image, the point having none (legacy); later verify jobs compare with these"
            )),
            Finding::Corrupt(why) => {
                log.record(
                    point,
                    Some(id),
                    Level::Error,
                    "verify_mismatch",
                    &format!("verify job {id}: disk {disk}: {why}"),
                    Some(disk),
                )
                .await;
                corrupt.push(format!("disk {disk}: {why}"));
            }
            Finding::Error(why) => {
                log.record(
                    point,
                    Some(id),
                    Level::Error,
                    "verify_error",
                    &format!("verify job {id}: disk {disk} could not be read back: {why}"),
                    Some(disk),
                )
                .await;
                errors.push(format!("disk {disk}: {why}"));
            }
            Finding::Cancelled => return PointResult::Cancelled,
        }
    }
    let bytes = read.load(Ordering::Relaxed) - before;
    if !corrupt.is_empty() {
        let detail = format!("verify job {id} found: {}", corrupt.join("; "));
        return match mark_corrupt(v, id, point, &detail).await {
            Ok(marked) => PointResult::Corrupt(marked),
            Err(e) => PointResult::Error(format!("cannot mark it corrupt: {e}")),
        };
    }
    if !errors.is_empty() {
        return PointResult::Error(errors.join("; "));
    }
    // Clean: the level stays (a hub_computed point is not upgraded), verified_at moves.
    let (level, detail) = if computed.is_empty() {
        (backup.integrity, backup.integrity_detail.clone())
    } else {
        (Integrity::HubComputed, Some(computed.join("; ")))
    };
    if let Err(e) = db.set_integrity(point, level, detail.as_deref()).await {
        return PointResult::Error(format!("cannot record the clean read: {}", chain(&e)));
    }
    for c in &computed {
        log.record(point, Some(id), Level::Warn, "checksums_computed", c, None)
            .await;
    }
    log.record(
        point,
        Some(id),
        Level::Info,
        "point_verified",
        &format!(
            "verify job {id}: every disk equal to its stored checksums ({} now); {bytes} bytes \
             read in {} ms",
            level.as_str(),
            t.elapsed().as_millis()
        ),
        None,
    )
    .await;
    PointResult::Clean
}

/// One disk: compared with its sidecar (read with the catalog's digest), or, without one, its
/// checksums computed and stored.
async fn verify_disk(
    v: &Verifier,
    d: &BackupDiskRow,
    cancel: &CancellationToken,
    read: &AtomicU64,
) -> Finding {
    let image = Path::new(&d.result.qcow2_path);
    if !image.is_file() {
        return Finding::Corrupt(format!("its image {} is missing", image.display()));
    }
    let rb = &v.deps().readback;
    let Some(path) = &d.manifest_path else {
        return compute(v, d, image, cancel, read).await;
    };
    let m = match Manifest::read(Path::new(path), d.manifest_blake3.as_deref()).await {
        Ok(m) => m,
        Err(e @ (ManifestError::Damaged { .. } | ManifestError::Read { .. })) => {
            return Finding::Corrupt(format!(
                "its stored checksums cannot be trusted: {}",
                chain(&e)
            ));
        }
        Err(e) => return Finding::Error(chain(&e)),
    };
    match rb.check(image, &m, cancel, read).await {
        Ok(r) if r.is_clean() => Finding::Clean,
        Ok(r) => Finding::Corrupt(format!(
            "the image chain differs from the stored checksums in {} cell(s): {}",
            r.mismatch_count,
            r.describe_mismatches()
        )),
        Err(e) => read_error(e),
    }
}

fn read_error(e: ReadBackError) -> Finding {
    match e {
        e if e.is_cancel() => Finding::Cancelled,
        e @ ReadBackError::Check {
            source: ManifestError::SizeMismatch { .. },
            ..
        } => Finding::Corrupt(chain(&e)),
        e => Finding::Error(chain(&e)),
    }
}

/// A legacy disk: checksums computed from the image, stored as its sidecar (source `hub`).
async fn compute(
    v: &Verifier,
    d: &BackupDiskRow,
    image: &Path,
    cancel: &CancellationToken,
    read: &AtomicU64,
) -> Finding {
    let m = match v
        .deps()
        .readback
        .compute(image, DEFAULT_GRID_CELL, cancel, read)
        .await
    {
        Ok(m) => m,
        Err(e) => return read_error(e),
    };
    let upd = match m.store_for(image, "hub").await {
        Ok(u) => u,
        Err(e) => return Finding::Error(chain(&e)),
    };
    if let Err(e) = v
        .deps()
        .db
        .update_disk(&d.backup_id, d.result.disk_key, &upd)
        .await
    {
        return Finding::Error(chain(&e));
    }
    Finding::Computed { cells: m.cells() }
}

/// Marks `point` corrupt with `detail`, and every point depending on it (its incrementals,
/// transitively) corrupt naming it. Answers every point marked.
async fn mark_corrupt(
    v: &Verifier,
    id: &str,
    point: &BackupId,
    detail: &str,
) -> Result<Vec<BackupId>, String> {
    let db = &v.deps().db;
    db.set_integrity(point, Integrity::Corrupt, Some(detail))
        .await
        .map_err(|e| chain(&e))?;
    let mut marked = vec![point.clone()];
    let mut seen: HashSet<BackupId> = marked.iter().cloned().collect();
    let mut queue: VecDeque<BackupId> = VecDeque::from([point.clone()]);
    while let Some(p) = queue.pop_front() {
        let children = db.children_of(&p).await.map_err(|e| chain(&e))?;
        for c in children {
            if !seen.insert(c.clone()) {
                continue;
            }
            let why = format!("depends on corrupt point {point} (verify job {id})");
            db.set_integrity(&c, Integrity::Corrupt, Some(&why))
                .await
                .map_err(|e| chain(&e))?;
            v.deps()
                .log
                .record(&c, Some(id), Level::Error, "dependency_corrupt", &why, None)
                .await;
            marked.push(c.clone());
            queue.push_back(c);
        }
    }
    Ok(marked)
}
