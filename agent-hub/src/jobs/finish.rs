//! The end of a job. [`finish`] is the only path that releases a job's resources, whatever
//! ended it (completion, failure, cancel, a dead qemu-nbd, hub shutdown). [`finalize`] verifies
//! a completed copy before finishing. [`watch_export`] turns an unexpected qemu-nbd exit into a
//! failed job.

use super::{JobManager, Level, LiveJob, Resources};
use crate::db::DiskUpdate;
use crate::qemu_nbd::QemuNbd;
use sendense_shared::api::{CompletionReport, DiskStatus, JobStatus};
use sendense_shared::ids::{DiskKey, NbdPort};
use std::sync::Arc;
use std::time::Instant;

/// How a job ends, as its finisher sees it.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Verified; keep the images.
    Completed,
    /// With the cause, which becomes the job's `error_message`.
    Failed(String),
    /// One of the job's qemu-nbd exited on its own; the message is that death's diagnosis, the
    /// root cause of whatever the writer reports next.
    ExportDied(String),
    /// Cancel (or an interrupted preparation).
    Cancelled,
}

/// Stops every qemu-nbd, releases the ports, deletes the images unless the job completed, sets
/// disk statuses and then the terminal job status. Idempotent; answers the terminal status it
/// wrote (`None` when the job was already finished).
pub async fn finish(
    jm: &JobManager,
    job: &LiveJob,
    res: &mut Resources,
    outcome: Outcome,
) -> Option<JobStatus> {
    if res.finished {
        return None;
    }
    let id = &job.id;
    let db = &jm.deps().db;
    let t = Instant::now();
    let deaths = stop_exports(jm, job, res).await;
    // A qemu-nbd that died on its own is the root cause of whatever the writer then reported
    // ("connection closed"), whichever of the two reached the job first.
    for (disk, death) in &deaths {
        let _ = jm
            .deps()
            .db
            .update_disk(
                id,
                *disk,
                &DiskUpdate {
                    status: Some(DiskStatus::Failed),
                    error_message: Some(Some(death.clone())),
                    ..Default::default()
                },
            )
            .await;
    }
    let deaths: Vec<String> = deaths.into_iter().map(|d| d.1).collect();
    let outcome = match outcome {
        Outcome::Failed(msg) if !deaths.is_empty() => {
            Outcome::Failed(format!("{} (then: {msg})", deaths.join("; ")))
        }
        Outcome::ExportDied(msg) => Outcome::Failed(msg),
        other => other,
    };
    if res.ports_held {
        match jm.deps().ports.release(id).await {
            Ok(n) => {
                jm.event(
                    id,
                    Level::Info,
                    "ports_released",
                    format!("released {n} NBD port(s)"),
                    None,
                )
                .await
            }
            Err(e) => {
                jm.event(
                    id,
                    Level::Error,
                    "ports_release_failed",
                    format!(
                        "releasing the job's NBD ports failed: {}",
                        sendense_shared::errors::chain(&e)
                    ),
                    None,
                )
                .await
            }
        }
        res.ports_held = false;
        jm.publish_ports().await;
    }

    let current = db.get_backup(id).await.ok().map(|b| b.status);
    let terminal = match outcome {
        Outcome::Completed if current == Some(JobStatus::Finalizing) => {
            set_disks(jm, job, DiskStatus::Completed).await;
            match db
                .transition_backup(id, &[JobStatus::Finalizing], JobStatus::Completed, None)
                .await
            {
                Ok(true) => {
                    res.images.clear();
                    JobStatus::Completed
                }
                _ => end_unsuccessfully(jm, job, res, Some("cancelled during finalization")).await,
            }
        }
        Outcome::Completed => {
            end_unsuccessfully(
                jm,
                job,
                res,
                Some("the job left finalizing before it completed"),
            )
            .await
        }
        Outcome::Failed(msg) | Outcome::ExportDied(msg) => {
            end_unsuccessfully(jm, job, res, Some(&msg)).await
        }
        Outcome::Cancelled => end_unsuccessfully(jm, job, res, None).await,
    };
    res.finished = true;
    job.ended.cancel();
    jm.remove_live(id);
    jm.event(
        id,
        match terminal {
            JobStatus::Completed => Level::Info,
            JobStatus::Cancelled => Level::Warn,
            _ => Level::Error,
        },
        terminal.as_str(),
        format!(
            "job {}; resources released in {} ms",
            terminal.as_str(),
            t.elapsed().as_millis()
        ),
        None,
    )
    .await;
    jm.publish(id).await;
    jm.publish_processes().await;
    Some(terminal)
}

/// Deletes the partial images and writes `cancelled` (if a cancel was asked) or `failed`.
/// No `cause` means a cancel (or an interrupted preparation).
async fn end_unsuccessfully(
    jm: &JobManager,
    job: &LiveJob,
    res: &mut Resources,
    cause: Option<&str>,
) -> JobStatus {
    let id = &job.id;
    let db = &jm.deps().db;
    delete_images(jm, job, res).await;
    let status = db.get_backup(id).await.ok().map(|b| b.status);
    if status == Some(JobStatus::Cancelling) {
        set_disks(jm, job, DiskStatus::Cancelled).await;
        if let Ok(true) = db
            .transition_backup(id, &[JobStatus::Cancelling], JobStatus::Cancelled, None)
            .await
        {
            return JobStatus::Cancelled;
        }
    }
    let cause = cause
        .unwrap_or("interrupted: the hub is stopping")
        .to_string();
    set_disks(jm, job, DiskStatus::Failed).await;
    match db
        .transition_backup(id, super::ACTIVE, JobStatus::Failed, Some(&cause))
        .await
    {
        Ok(_) => {}
        Err(e) => tracing::error!(backup_id = %id, error = %e, "cannot mark job failed"),
    }
    db.get_backup(id)
        .await
        .map(|b| b.status)
        .unwrap_or(JobStatus::Failed)
}

/// Sets every disk not already failed to `status`.
async fn set_disks(jm: &JobManager, job: &LiveJob, status: DiskStatus) {
    let db = &jm.deps().db;
    let Ok(b) = db.get_backup(&job.id).await else {
        return;
    };
    for d in &b.disk_results {
        if d.status == DiskStatus::Failed && status != DiskStatus::Completed {
            continue;
        }
        if let Err(e) = db
            .update_disk(
                &job.id,
                d.disk_key,
                &DiskUpdate {
                    status: Some(status),
                    ..Default::default()
                },
            )
            .await
        {
            tracing::error!(backup_id = %job.id, disk = d.disk_key.0, error = %e, "cannot set disk status");
        }
    }
}

/// Stops every running qemu-nbd of the job (SIGTERM to its group, bounded wait, SIGKILL, reap)
/// and records how each ended. qemu-nbd flushes the image on SIGTERM. Answers a sentence per
/// qemu-nbd that had exited on its own.
pub async fn stop_exports(
    jm: &JobManager,
    job: &LiveJob,
    res: &mut Resources,
) -> Vec<(DiskKey, String)> {
    let mut deaths = Vec::new();
    for e in res.exports.drain(..) {
        let t = Instant::now();
        let pid = e.server.pid();
        let rep = e.server.stop().await;
        let how = if rep.requested {
            "stopped"
        } else {
            "had already exited"
        };
        if let Err(err) = jm
            .deps()
            .db
            .mark_process_stopped(pid, e.port, &rep.status)
            .await
        {
            tracing::error!(pid, error = %err, "cannot record qemu-nbd stop");
        }
        let tail = rep.stderr_tail.trim();
        if !rep.requested {
            deaths.push((
                e.disk_key,
                format!(
                    "qemu-nbd of disk {} (pid {pid}, port {}) exited unexpectedly: {}{}",
                    e.disk_key,
                    e.port,
                    rep.status,
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!("; stderr: {tail}")
                    }
                ),
            ));
        }
        jm.event(
            &job.id,
            if rep.requested {
                Level::Info
            } else {
                Level::Warn
            },
            "qemu_nbd_stopped",
            format!(
                "disk {}: qemu-nbd pid {pid} (port {}, export {}) {how}: {} after {} ms{}",
                e.disk_key,
                e.port,
                e.export_name,
                rep.status,
                t.elapsed().as_millis(),
                if tail.is_empty() {
                    String::new()
                } else {
                    format!("; stderr: {tail}")
                }
            ),
            Some(e.disk_key),
        )
        .await;
    }
    deaths
}

async fn delete_images(jm: &JobManager, job: &LiveJob, res: &mut Resources) {
    for (disk, path) in res.images.drain(..) {
        match crate::repository::remove_image(&path).await {
            Ok(()) => {
                jm.event(
                    &job.id,
                    Level::Info,
                    "image_deleted",
                    format!("disk {disk}: deleted partial image {}", path.display()),
                    Some(disk),
                )
                .await
            }
            Err(e) => {
                jm.event(
                    &job.id,
                    Level::Error,
                    "image_delete_failed",
                    format!("disk {disk}: cannot delete {}: {e}", path.display()),
                    Some(disk),
                )
                .await
            }
        }
    }
}

/// Watches one qemu-nbd; an exit nobody asked for fails the disk at once (its stderr as the
/// disk's `error_message`) and then the whole job.
pub fn watch_export(
    jm: &JobManager,
    job: &Arc<LiveJob>,
    disk: DiskKey,
    port: NbdPort,
    server: QemuNbd,
) {
    let jm = jm.clone();
    let job = job.clone();
    let pid = server.pid();
    let mut rx = server.exit_watch();
    drop(server);
    jm.deps().tasks.clone().spawn(async move {
        let report = loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                break r;
            }
            if rx.changed().await.is_err() {
                return;
            }
        };
        if report.requested {
            return;
        }
        let tail = report.stderr_tail.trim();
        let msg = format!(
            "qemu-nbd of disk {disk} (pid {pid}, port {port}) exited unexpectedly: {}{}",
            report.status,
            if tail.is_empty() {
                String::new()
            } else {
                format!("; stderr: {tail}")
            }
        );
        if let Err(e) = jm
            .deps()
            .db
            .update_disk(
                &job.id,
                disk,
                &DiskUpdate {
                    status: Some(DiskStatus::Failed),
                    error_message: Some(Some(msg.clone())),
                    ..Default::default()
                },
            )
            .await
        {
            tracing::error!(backup_id = %job.id, error = %e, "cannot record qemu-nbd death");
        }
        jm.event(
            &job.id,
            Level::Error,
            "qemu_nbd_died",
            msg.clone(),
            Some(disk),
        )
        .await;
        let mut res = job.res.lock().await;
        finish(&jm, &job, &mut res, Outcome::ExportDied(msg)).await;
    });
}

/// After a `completed` report: verify checksums through the still-running exports, stop the
/// exports (qemu-nbd flushes), `qemu-img check` each image, then finish.
pub async fn finalize(jm: &JobManager, job: Arc<LiveJob>, report: CompletionReport) {
    let mut res = job.res.lock().await;
    if res.finished {
        return;
    }
    let id = job.id.clone();
    let db = &jm.deps().db;
    let mut failure: Option<String> = None;

    for d in &report.disks {
        let Some(sums) = &d.checksums else { continue };
        if job.cancel.is_cancelled() {
            finish(jm, &job, &mut res, Outcome::Cancelled).await;
            return;
        }
        let Some(e) = res.exports.iter().find(|e| e.disk_key == d.disk_key) else {
            failure = Some(format!(
                "disk {}: no running export to verify against",
                d.disk_key
            ));
            break;
        };
        // Read back through the job's still-running qemu-nbd, not with `qemu-img`: it has the
        // image open already (a second opener would have to break qemu's image lock and could
        // read metadata not yet flushed) and serves exactly what the writer wrote, through the
        // path a restore uses. It runs with `--shared=N`, so a connected writer is no obstacle.
        let addr = e.server.nbd_addr();
        let t = Instant::now();
        match sendense_shared::nbd::verify::verify_disk(&addr, sums, &job.cancel).await {
            Ok(s) => {
                let _ = db
                    .update_disk(
                        &id,
                        d.disk_key,
                        &DiskUpdate {
                            checksum_status: Some("passed".into()),
                            checksum_ranges: Some(s.ranges as u64),
                            checksum_mismatches: Some(0),
                            ..Default::default()
                        },
                    )
                    .await;
                jm.event(
                    &id,
                    Level::Info,
                    "checksums_verified",
                    format!(
                        "disk {}: {} range(s), {} bytes read back through {addr} match the \
                         writer's BLAKE3 checksums ({} ms)",
                        d.disk_key,
                        s.ranges,
                        s.bytes,
                        t.elapsed().as_millis()
                    ),
                    Some(d.disk_key),
                )
                .await
            }
            Err(sendense_shared::nbd::verify::VerifyError::Cancelled) => {
                jm.event(
                    &id,
                    Level::Warn,
                    "verification_cancelled",
                    format!(
                        "disk {}: verification stopped by a cancel after {} ms",
                        d.disk_key,
                        t.elapsed().as_millis()
                    ),
                    Some(d.disk_key),
                )
                .await;
                finish(jm, &job, &mut res, Outcome::Cancelled).await;
                return;
            }
            Err(err) => {
                let msg = format!("disk {}: verification failed: {err}", d.disk_key);
                let mismatch = matches!(
                    err,
                    sendense_shared::nbd::verify::VerifyError::Mismatch { .. }
                );
                let _ = db
                    .update_disk(
                        &id,
                        d.disk_key,
                        &DiskUpdate {
                            status: Some(DiskStatus::Failed),
                            error_message: Some(Some(msg.clone())),
                            checksum_status: Some("failed".into()),
                            checksum_ranges: Some(sums.ranges.len() as u64),
                            // Verification stops at the first mismatch.
                            checksum_mismatches: Some(u64::from(mismatch)),
                            ..Default::default()
                        },
                    )
                    .await;
                jm.event(
                    &id,
                    Level::Error,
                    "checksums_mismatch",
                    msg.clone(),
                    Some(d.disk_key),
                )
                .await;
                failure = Some(msg);
                break;
            }
        }
    }
    for d in report.disks.iter().filter(|d| d.checksums.is_none()) {
        let _ = db
            .update_disk(
                &id,
                d.disk_key,
                &DiskUpdate {
                    checksum_status: Some("skipped".into()),
                    ..Default::default()
                },
            )
            .await;
    }
    if failure.is_none() && !report.disks.iter().any(|d| d.checksums.is_some()) {
        jm.event(
            &id,
            Level::Warn,
            "checksums_absent",
            "the writer sent no checksums; only qemu-img check verifies the images",
            None,
        )
        .await;
    }

    if failure.is_none() {
        let deaths = stop_exports(jm, &job, &mut res).await;
        if !deaths.is_empty() {
            failure = Some(
                deaths
                    .into_iter()
                    .map(|d| d.1)
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
        for (disk, path) in res.images.clone() {
            if job.cancel.is_cancelled() || failure.is_some() {
                break;
            }
            let t = Instant::now();
            let checked = crate::repository::qemu_img_check(&path).await;
            let summary = match &checked {
                Ok(c) => c.summary(),
                Err(e) => format!("qemu-img check failed: {e}"),
            };
            let _ = db
                .update_disk(
                    &id,
                    disk,
                    &DiskUpdate {
                        qemu_img_check: Some(summary),
                        ..Default::default()
                    },
                )
                .await;
            match checked {
                Ok(c) if c.is_clean() => {
                    jm.event(
                        &id,
                        Level::Info,
                        "image_checked",
                        format!(
                            "disk {disk}: qemu-img check {}: {} in {} ms",
                            path.display(),
                            c.summary(),
                            t.elapsed().as_millis()
                        ),
                        Some(disk),
                    )
                    .await
                }
                Ok(c) => {
                    let msg = format!(
                        "disk {disk}: qemu-img check {}: {}",
                        path.display(),
                        c.summary()
                    );
                    jm.event(
                        &id,
                        Level::Error,
                        "image_check_failed",
                        msg.clone(),
                        Some(disk),
                    )
                    .await;
                    failure = Some(msg);
                    break;
                }
                Err(e) => {
                    let msg = format!("disk {disk}: qemu-img check {} failed: {e}", path.display());
                    jm.event(
                        &id,
                        Level::Error,
                        "image_check_failed",
                        msg.clone(),
                        Some(disk),
                    )
                    .await;
                    failure = Some(msg);
                    break;
                }
            }
        }
    }
    let outcome = if job.cancel.is_cancelled() {
        Outcome::Cancelled
    } else if let Some(f) = failure {
        Outcome::Failed(f)
    } else {
        Outcome::Completed
    };
    finish(jm, &job, &mut res, outcome).await;
}
