//! The end of a job. [`finish`] is the only path that releases a job's resources, whatever
//! ended it (completion, failure, cancel, a dead qemu-nbd, hub shutdown);
//! [`super::finalize`] proves a completed copy before finishing. [`watch_export`] turns an
//! unexpected qemu-nbd exit into a failed job.
//!
//! Images are deleted only for a job the catalog records as failed or cancelled: a completed
//! job whose last writes the database does not take is waited for ([`super::patience`]), and
//! past the hub's patience left `finalizing`, images kept, for the reconciler.

use super::patience::{Patience, db_retry};
use super::{JobManager, Level, LiveJob, Resources};
use crate::db::DiskUpdate;
use crate::qemu_nbd::QemuNbd;
use sendense_shared::api::{DiskStatus, JobStatus};
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

    let patience = Patience::new(jm.deps().db_patience);
    let terminal = match outcome {
        Outcome::Completed => {
            set_disks(jm, job, DiskStatus::Completed).await;
            match db_retry(jm, id, "recording the job completed", patience, || {
                db.transition_backup(id, &[JobStatus::Finalizing], JobStatus::Completed, None)
            })
            .await
            {
                Some(true) => {
                    res.images.clear();
                    JobStatus::Completed
                }
                // The catalog positively says the job left `finalizing` (a cancel won).
                Some(false) => {
                    end_unsuccessfully(jm, job, res, Some("cancelled during finalization")).await
                }
                // Never delete a verified point for a database that does not answer.
                None => {
                    res.images.clear();
                    JobStatus::Finalizing
                }
            }
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
    let patience = Patience::new(jm.deps().db_patience);
    delete_images(jm, job, res).await;
    let status = db_retry(jm, id, "reading the job's status", patience, || {
        db.get_backup(id)
    })
    .await
    .map(|b| b.status);
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
    // A job left active would refuse every later backup of the VM: wait for the database.
    if db_retry(jm, id, "recording the job failed", patience, || {
        db.transition_backup(id, super::ACTIVE, JobStatus::Failed, Some(&cause))
    })
    .await
    .is_none()
    {
        tracing::error!(backup_id = %id, "cannot mark job failed; the reconciler will");
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
/// and records how each ended. qemu-nbd flushes the image on SIGTERM and exits 0. Answers a
/// sentence per qemu-nbd that did not end that way: it had exited on its own, or it needed the
/// SIGKILL or exited with an error (its image may lack its last writes). All of them at once
/// (one slow to exit does not hold up the others), the sentences in the exports' order.
pub async fn stop_exports(
    jm: &JobManager,
    job: &LiveJob,
    res: &mut Resources,
) -> Vec<(DiskKey, String)> {
    let stops = res.exports.drain(..).map(|e| stop_export(jm, job, e));
    futures_util::future::join_all(stops)
        .await
        .into_iter()
        .flatten()
        .collect()
}

async fn stop_export(jm: &JobManager, job: &LiveJob, e: super::Export) -> Vec<(DiskKey, String)> {
    let mut deaths = Vec::new();
    let t = Instant::now();
    let pid = e.server.pid();
    let rep = e.server.stop().await;
    let how = if rep.requested {
        "stopped"
    } else {
        "had already exited"
    };
    let stopped_in = t.elapsed();
    // Waited for: a process recorded alive would be taken for an orphan later.
    let patience = Patience::new(jm.deps().db_patience);
    if db_retry(jm, &job.id, "recording the qemu-nbd stop", patience, || {
        jm.deps().db.mark_process_stopped(pid, e.port, &rep.status)
    })
    .await
    .is_none()
    {
        tracing::error!(pid, "cannot record qemu-nbd stop");
    }
    let tail = rep.stderr_tail.trim();
    if rep.requested && rep.code != Some(0) {
        deaths.push((
            e.disk_key,
            format!(
                "qemu-nbd of disk {} (pid {pid}, port {}) did not stop cleanly: {} (a clean \
                     stop exits 0 after flushing; the image may lack its last writes){}",
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
            stopped_in.as_millis(),
            if tail.is_empty() {
                String::new()
            } else {
                format!("; stderr: {tail}")
            }
        ),
        Some(e.disk_key),
    )
    .await;
    deaths
}

async fn delete_images(jm: &JobManager, job: &LiveJob, res: &mut Resources) {
    for (disk, path) in res.images.drain(..) {
        // The checksum sidecar goes with its image (there is none before finalization).
        let sidecar = crate::manifest::sidecar_path(&path);
        if let Err(e) = std::fs::remove_file(&sidecar)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!(path = %sidecar.display(), error = %e, "cannot delete sidecar");
        }
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
