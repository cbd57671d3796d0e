//! Start-up reconciliation: after a crash (or SIGKILL) the database still says that some
//! qemu-nbd processes run, some ports are held and some jobs are active. Nothing of that
//! belongs to this new process, so:
//!
//! 1. every qemu-nbd recorded alive is checked against `/proc/PID/cmdline` (a qemu-nbd serving
//!    that port and export) and only then stopped by PID/process group; a reused PID is left
//!    alone and said so. Never by name.
//! 2. a job left `finalizing` whose images read back equal to their stored whole-disk
//!    checksums is completed ([`finalizing`]); every other job in a non-terminal state is
//!    marked `failed` ("hub restarted during the job"), its disks failed, and then (only once
//!    the catalog records it failed) the images it created (`<backup_id>.qcow2` and its
//!    checksum sidecar, never a backing file) deleted.
//!    Every restore in a non-terminal state is marked `failed` too ("hub restarted during
//!    the restore"); the node deletes its partial image (its reads fail, or its own start-up
//!    recovery runs). Every active instant recovery is marked `failed` ([`recoveries`]: its
//!    exports are gone, the VM on the node is paused); its node is told to stop the VM once
//!    the hub runs.
//!    A prune job left running has its step in progress finished ([`prune`]).
//! 3. every port allocation is released (no job is live in a process that just started).
//!
//! Each action is logged and, when it concerns a job, appended to that job's events.
//!
//! Assumes one hub process per database: a second hub started on the same MariaDB database
//! would take the first one's live jobs for leftovers (and their qemu-nbd, if on the same host).
//! Recording the owning hub instance per job would lift this; nothing needs it yet.

mod finalizing;
pub mod prune;
pub mod recoveries;

use crate::config::HubConfig;
use crate::db::{Db, DiskUpdate};
use crate::events::{JobLog, Level};
use crate::ports::PortAllocator;
use crate::qemu_nbd::{OrphanOutcome, stop_orphan};
use sendense_shared::api::{DiskStatus, JobStatus};
use sendense_shared::ids::BackupId;
use std::fmt;
use std::path::Path;

/// The reason written into jobs the reconciler ends.
pub const RESTART_REASON: &str = "hub restarted during the job";

/// The reason written into restores the reconciler ends.
pub const RESTART_REASON_RESTORE: &str = "hub restarted during the restore";

/// What the reconciler did, for the start-up log line.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub processes_stopped: usize,
    pub processes_gone: usize,
    pub processes_not_ours: usize,
    pub jobs_failed: usize,
    pub jobs_completed: usize,
    pub restores_failed: usize,
    pub recoveries_failed: usize,
    /// The recoveries it failed: their nodes are to be told to stop the VMs.
    pub recoveries_left: Vec<crate::recoveries::finish::Leftover>,
    /// The recoveries it found running: the hub takes them back (their ports are kept).
    pub recoveries_resumed: Vec<sendense_shared::api::Recovery>,
    pub images_deleted: usize,
    pub ports_released: u64,
    pub errors: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} orphan qemu-nbd stopped, {} already gone, {} PIDs reused by others left alone, \
             {} jobs failed, {} finalizing jobs proven and completed, {} restores failed, {} recoveries failed, {} partial images deleted, {} ports released, \
             {} errors",
            self.processes_stopped,
            self.processes_gone,
            self.processes_not_ours,
            self.jobs_failed,
            self.jobs_completed,
            self.restores_failed,
            self.recoveries_failed,
            self.images_deleted,
            self.ports_released,
            self.errors.len()
        )
    }
}

async fn event(log: &JobLog, id: &BackupId, level: &str, step: &str, msg: String) {
    let level = match level {
        "error" => Level::Error,
        "warn" => Level::Warn,
        _ => Level::Info,
    };
    log.record(id, None, level, step, &msg, None).await;
}

/// Runs the three passes; never fails start-up (a step that errs is logged and counted).
pub async fn reconcile(
    db: &Db,
    ports: &PortAllocator,
    log: &JobLog,
    cfg: &HubConfig,
    readback: &crate::readback::ReadBack,
) -> Report {
    let mut rep = Report::default();
    let grace = cfg.qemu_nbd.stop_grace;

    // 1. Orphan qemu-nbd processes.
    match db.live_processes().await {
        Ok(procs) => {
            for p in procs {
                let outcome = stop_orphan(p.pid, p.port.0, &p.export_name, grace).await;
                let (level, exit, msg) = match &outcome {
                    Ok(OrphanOutcome::Stopped) => {
                        rep.processes_stopped += 1;
                        (
                            "warn",
                            "stopped by the reconciler".to_string(),
                            format!(
                                "reconciler: orphan qemu-nbd pid {} (port {}, export {}, disk {}) \
                                 left by the previous hub process was verified in /proc and stopped",
                                p.pid, p.port, p.export_name, p.disk_key
                            ),
                        )
                    }
                    Ok(OrphanOutcome::AlreadyGone) => {
                        rep.processes_gone += 1;
                        (
                            "info",
                            "gone before the reconciler ran".to_string(),
                            format!(
                                "reconciler: qemu-nbd pid {} (port {}, disk {}) was already gone",
                                p.pid, p.port, p.disk_key
                            ),
                        )
                    }
                    Ok(OrphanOutcome::NotOurs { cmdline }) => {
                        rep.processes_not_ours += 1;
                        (
                            "warn",
                            "pid reused by another process".to_string(),
                            format!(
                                "reconciler: pid {} recorded for qemu-nbd (port {}, disk {}) is now \
                                 {cmdline:?}; not ours, left alone",
                                p.pid, p.port, p.disk_key
                            ),
                        )
                    }
                    Err(e) => {
                        rep.errors.push(e.to_string());
                        (
                            "error",
                            format!("reconciler could not stop it: {e}"),
                            format!(
                                "reconciler: stopping orphan qemu-nbd pid {} (port {}) failed: {e}",
                                p.pid, p.port
                            ),
                        )
                    }
                };
                if let Err(e) = db.mark_process_stopped(p.pid, p.port, &exit).await {
                    rep.errors.push(e.to_string());
                }
                event(log, &p.backup_id, level, "reconciler_process", msg).await;
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "reconciler: cannot list recorded qemu-nbd processes");
            rep.errors.push(e.to_string());
        }
    }

    // 2. Jobs that were active.
    match db.list_backups_in(crate::jobs::ACTIVE).await {
        Ok(jobs) => {
            for b in jobs {
                let mut why = None;
                if b.status == JobStatus::Finalizing {
                    match finalizing::prove(db, readback, &b).await {
                        Ok(how) => {
                            rep.jobs_completed += 1;
                            event(
                                log,
                                &b.backup_id,
                                "info",
                                "reconciler_job",
                                format!(
                                    "reconciler: the job was finalizing when the hub stopped; \
                                     completed: {how}"
                                ),
                            )
                            .await;
                            continue;
                        }
                        Err(cause) => why = Some(cause),
                    }
                }
                fail_job(db, log, &mut rep, &b, why).await;
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "reconciler: cannot list active jobs");
            rep.errors.push(e.to_string());
        }
    }

    // 2b. Restores that were active: their qemu-nbd was stopped above and their port is
    // released below; the node deletes its partial image when its copy fails or it restarts.
    match db.list_restores_in(crate::restores::ACTIVE).await {
        Ok(restores) => {
            for r in restores {
                let reason = format!("{RESTART_REASON_RESTORE} (it was {})", r.status.as_str());
                match db
                    .transition_restore(
                        &r.restore_id,
                        crate::restores::ACTIVE,
                        JobStatus::Failed,
                        Some(&reason),
                    )
                    .await
                {
                    Ok(_) => {
                        rep.restores_failed += 1;
                        log.record(
                            &r.backup_id,
                            Some(&r.restore_id),
                            Level::Error,
                            "reconciler_restore",
                            &format!(
                                "reconciler: restore {} marked failed: {reason}",
                                r.restore_id
                            ),
                            Some(r.disk_key),
                        )
                        .await;
                    }
                    Err(e) => rep.errors.push(sendense_shared::errors::chain(&e)),
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %sendense_shared::errors::chain(&e), "reconciler: cannot list active restores");
            rep.errors.push(sendense_shared::errors::chain(&e));
        }
    }

    // 2b'. Instant recoveries that were active (see [`recoveries`]).
    recoveries::fail_active(db, log, &mut rep).await;

    // 2c. Prune jobs: the step in progress finished (see [`prune`]).
    let p = prune::recover(db, readback, log).await;
    if p.jobs > 0 {
        tracing::warn!(
            jobs = p.jobs,
            steps_finished = p.steps_finished,
            orphans_stopped = p.orphans_stopped,
            errors = p.errors,
            "reconciler: prune jobs a previous hub process left unfinished were ended"
        );
    }
    for _ in 0..p.errors {
        rep.errors
            .push("a prune step could not be finished at start-up (see the prune job)".into());
    }

    // 3. Port allocations: none can belong to a live job of this new process.
    match ports.view().await {
        Ok(view) => {
            // The ports of the recoveries taken back stay theirs: their VMs reconnect there.
            let kept: Vec<u16> = rep
                .recoveries_resumed
                .iter()
                .flat_map(|r| r.disks.iter().filter_map(|d| d.nbd_port.map(|p| p.0)))
                .collect();
            let mut seen: Vec<BackupId> = Vec::new();
            for a in &view.allocations {
                if kept.contains(&a.port.0) {
                    continue;
                }
                if view
                    .allocations
                    .iter()
                    .any(|x| x.backup_id == a.backup_id && kept.contains(&x.port.0))
                {
                    // Another port of this point is a kept recovery's: only this one goes.
                    match ports.release_port(a.port).await {
                        Ok(()) => rep.ports_released += 1,
                        Err(e) => rep.errors.push(e.to_string()),
                    }
                    continue;
                }
                if seen.contains(&a.backup_id) {
                    continue;
                }
                seen.push(a.backup_id.clone());
                match ports.release(&a.backup_id).await {
                    Ok(n) => {
                        rep.ports_released += n;
                        let held: Vec<String> = view
                            .allocations
                            .iter()
                            .filter(|x| x.backup_id == a.backup_id)
                            .map(|x| x.port.to_string())
                            .collect();
                        event(
                            log,
                            &a.backup_id,
                            "warn",
                            "reconciler_ports",
                            format!(
                                "reconciler: released {n} NBD port(s) ({}) held without a live job",
                                held.join(", ")
                            ),
                        )
                        .await;
                    }
                    Err(e) => rep.errors.push(e.to_string()),
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "reconciler: cannot read port allocations");
            rep.errors.push(e.to_string());
        }
    }
    rep
}

/// Marks `b` failed and, once the catalog records it, deletes the images it created.
async fn fail_job(
    db: &Db,
    log: &JobLog,
    rep: &mut Report,
    b: &sendense_shared::api::Backup,
    unproven: Option<String>,
) {
    let was = b.status.as_str();
    let reason = match &unproven {
        Some(cause) => {
            format!("{RESTART_REASON} (it was {was}; its images could not be proven: {cause})")
        }
        None => format!("{RESTART_REASON} (it was {was})"),
    };
    for d in &b.disk_results {
        if d.status != DiskStatus::Failed
            && let Err(e) = db
                .update_disk(
                    &b.backup_id,
                    d.disk_key,
                    &DiskUpdate {
                        status: Some(DiskStatus::Failed),
                        error_message: Some(Some(RESTART_REASON.to_string())),
                        ..Default::default()
                    },
                )
                .await
        {
            rep.errors.push(e.to_string());
        }
    }
    match db
        .transition_backup(
            &b.backup_id,
            crate::jobs::ACTIVE,
            JobStatus::Failed,
            Some(&reason),
        )
        .await
    {
        Ok(_) => {
            rep.jobs_failed += 1;
            event(
                log,
                &b.backup_id,
                "error",
                "reconciler_job",
                format!("reconciler: job marked failed: {reason}"),
            )
            .await;
        }
        // A database error is never a reason to delete data: the images stay for the next try.
        Err(e) => {
            rep.errors.push(e.to_string());
            return;
        }
    }
    for d in &b.disk_results {
        let path = Path::new(&d.qcow2_path);
        let _ = std::fs::remove_file(crate::manifest::sidecar_path(path));
        if !path.exists() {
            continue;
        }
        match crate::repository::remove_image(path).await {
            Ok(()) => {
                rep.images_deleted += 1;
                event(
                    log,
                    &b.backup_id,
                    "info",
                    "reconciler_image",
                    format!(
                        "reconciler: deleted partial image {} of disk {}",
                        d.qcow2_path, d.disk_key
                    ),
                )
                .await;
            }
            Err(e) => {
                rep.errors.push(e.to_string());
                event(
                    log,
                    &b.backup_id,
                    "error",
                    "reconciler_image",
                    format!("reconciler: cannot delete {}: {e}", d.qcow2_path),
                )
                .await;
            }
        }
    }
}
