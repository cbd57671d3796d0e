//! The writer's reports of a backup job: progress (bytes and per-disk status) and completion
//! (checksums, change ids, the snapshot's consistency), each validated before anything is recorded; a report the database
//! did not take becomes an event naming the database's cause.

use super::{JobError, JobManager, Level, finish};
use crate::db::DbError;
use sendense_shared::api::{
    Backup, CompletionReport, CompletionStatus, Consistency, ConsistencyLevel, DiskResult,
    DiskStatus, HubEvent, JobStatus, ProgressReport, VmHardware,
};
use sendense_shared::ids::{BackupId, DiskKey};

/// Longest change id the database keeps (`backup_disks.change_id`); vSphere's are about 50.
const CHANGE_ID_MAX: usize = 255;

/// A change id is handed back to the hypervisor by the next incremental: it must come back
/// exactly as it was given, so one the database could not store whole is refused.
fn validate_change_id(i: usize, c: &str) -> Result<(), JobError> {
    let why = if c.is_empty() {
        "is empty (leave it out when the disk has none)".to_string()
    } else if c.len() > CHANGE_ID_MAX {
        format!("is {} bytes long, more than {CHANGE_ID_MAX}", c.len())
    } else if c.chars().any(char::is_control) {
        "contains a control character".to_string()
    } else {
        return Ok(());
    };
    Err(JobError::Invalid {
        detail: format!("disks[{i}].change_id {why}"),
    })
}

/// The disk `key` of backup `b` that a writer's report names as `disks[i]`.
fn reported_disk(b: &Backup, i: usize, key: DiskKey) -> Result<&DiskResult, JobError> {
    b.disk_results
        .iter()
        .find(|r| r.disk_key == key)
        .ok_or_else(|| JobError::Invalid {
            detail: format!(
                "disks[{i}].disk_key: {key} is not a disk of backup {}",
                b.backup_id
            ),
        })
}

/// A writer's `disks[i].bytes_transferred` cannot exceed the disk's `bytes_total`.
fn check_transferred(i: usize, written: Option<u64>, bytes_total: u64) -> Result<(), JobError> {
    match written {
        Some(w) if w > bytes_total => Err(JobError::Invalid {
            detail: format!("disks[{i}].bytes_transferred: {w} exceeds bytes_total {bytes_total}"),
        }),
        _ => Ok(()),
    }
}

impl JobManager {
    /// A writer's report the database did not take becomes an event naming the database's own
    /// cause (kept by the event log until the database answers again); the writer gets the
    /// error and retries.
    async fn note_db_failure<T>(
        &self,
        id: &BackupId,
        what: &str,
        r: Result<T, JobError>,
    ) -> Result<T, JobError> {
        let Err(JobError::Db(e)) = r else {
            return r;
        };
        let e = self.deps().db.diagnose(e).await;
        if matches!(e, DbError::Unreachable { .. }) {
            self.deps().log.database_unreachable().await;
        }
        self.event(
            id,
            Level::Error,
            "database_error",
            format!(
                "{what} not recorded, the writer will retry: {}",
                sendense_shared::errors::chain(&e)
            ),
            None,
        )
        .await;
        Err(JobError::Db(e))
    }

    /// How consistent the snapshot was (the guest frozen or not, and why): kept with the point
    /// and told in its events with the freeze window. Recorded once: a retried report whose
    /// consistency is already stored adds no second event.
    async fn record_consistency(&self, id: &BackupId, c: &Consistency) -> Result<(), JobError> {
        if self.get(id).await?.consistency.as_ref() == Some(c) {
            return Ok(());
        }
        self.deps().db.set_consistency(id, c).await?;
        let (level, window) = match (c.level, c.freeze_ms) {
            (ConsistencyLevel::Application, Some(ms)) => {
                (Level::Info, format!("; guest frozen for {ms} ms"))
            }
            (ConsistencyLevel::Application, None) => (Level::Info, String::new()),
            (ConsistencyLevel::Crash, _) => (Level::Warn, String::new()),
        };
        self.event(
            id,
            level,
            "consistency",
            format!("{}-consistent: {}{window}", c.level.as_str(), c.reason),
            None,
        )
        .await;
        Ok(())
    }

    /// The VM's hardware at snapshot time (QEMU), kept with the point for an instant recovery.
    /// Recorded once: a retried report whose hardware is already stored adds no second event.
    async fn record_hardware(&self, id: &BackupId, h: &VmHardware) -> Result<(), JobError> {
        if self.get(id).await?.hardware.as_deref() == Some(h) {
            return Ok(());
        }
        self.deps().db.set_hardware(id, h).await?;
        self.event(
            id,
            Level::Info,
            "hardware",
            format!(
                "VM hardware recorded: {} MiB, {} vCPU(s), {} disk(s), {} NIC(s){}",
                h.memory_mib,
                h.cpus,
                h.disks.len(),
                h.nics.len(),
                if h.kernel.is_some() {
                    ", direct kernel boot"
                } else {
                    ""
                }
            ),
            None,
        )
        .await;
        Ok(())
    }

    /// A writer's progress: bytes and per-disk status.
    pub async fn progress(
        &self,
        id: &BackupId,
        report: ProgressReport,
    ) -> Result<Backup, JobError> {
        let r = self.record_progress(id, report).await;
        self.note_db_failure(id, "progress report", r).await
    }

    async fn record_progress(
        &self,
        id: &BackupId,
        report: ProgressReport,
    ) -> Result<Backup, JobError> {
        let b = self.get(id).await?;
        // A report overtaken by the completion report is stale, not an error: the writer must
        // not read "stop writing" into it.
        if matches!(b.status, JobStatus::Finalizing | JobStatus::Completed) {
            return Ok(b);
        }
        if b.status != JobStatus::Running {
            return Err(JobError::WrongState {
                id: id.clone(),
                status: b.status.as_str(),
                what: "progress is accepted only while the job is running; stop writing".into(),
            });
        }
        if let Some(job) = self.live(id) {
            job.touch();
            job.moved(
                report.disks.iter().map(|d| d.bytes_done).sum(),
                report.disks.iter().any(|d| d.status == DiskStatus::Running),
            );
        }
        let mut reported = Vec::with_capacity(report.disks.len());
        for (i, d) in report.disks.iter().enumerate() {
            let cur = reported_disk(&b, i, d.disk_key)?;
            if d.bytes_done > d.bytes_total {
                return Err(JobError::Invalid {
                    detail: format!(
                        "disks[{i}].bytes_done: {} exceeds bytes_total {}",
                        d.bytes_done, d.bytes_total
                    ),
                });
            }
            check_transferred(i, d.bytes_transferred, d.bytes_total)?;
            reported.push((d, cur));
        }
        for (d, cur) in reported {
            // A disk the hub already failed (its qemu-nbd died) keeps that verdict.
            let status = if cur.status == DiskStatus::Failed {
                None
            } else {
                Some(d.status)
            };
            self.deps()
                .db
                .update_disk(
                    id,
                    d.disk_key,
                    &crate::db::DiskUpdate {
                        status,
                        bytes_done: Some(d.bytes_done),
                        bytes_total: Some(d.bytes_total),
                        bytes_transferred: d.bytes_transferred,
                        ..Default::default()
                    },
                )
                .await?;
            if status.is_some() && cur.status != d.status {
                self.event(
                    id,
                    Level::Info,
                    "disk_status",
                    format!(
                        "disk {}: {} -> {} ({} of {} bytes)",
                        d.disk_key,
                        cur.status.as_str(),
                        d.status.as_str(),
                        d.bytes_done,
                        d.bytes_total
                    ),
                    Some(d.disk_key),
                )
                .await;
            }
        }
        let b = self.get(id).await?;
        self.deps()
            .log
            .bus()
            .publish(HubEvent::Backup { backup: b.clone() });
        Ok(b)
    }

    /// The writer says it is done. `failed` unwinds at once; `completed` moves to `finalizing`
    /// and verifies in the background (see [`super::finalize`]).
    pub async fn complete(
        &self,
        id: &BackupId,
        report: CompletionReport,
    ) -> Result<Backup, JobError> {
        let r = self.record_completion(id, report).await;
        self.note_db_failure(id, "completion report", r).await
    }

    async fn record_completion(
        &self,
        id: &BackupId,
        report: CompletionReport,
    ) -> Result<Backup, JobError> {
        let b = self.get(id).await?;
        // A repeated `completed` report (a writer retrying after a timeout) gets the same answer.
        if report.status == CompletionStatus::Completed
            && matches!(b.status, JobStatus::Finalizing | JobStatus::Completed)
        {
            return Ok(b);
        }
        if b.status != JobStatus::Running {
            return Err(JobError::WrongState {
                id: id.clone(),
                status: b.status.as_str(),
                what: "a completion report is accepted only while the job is running".into(),
            });
        }
        for (i, d) in report.disks.iter().enumerate() {
            let cur = reported_disk(&b, i, d.disk_key)?;
            check_transferred(i, d.bytes_transferred, cur.bytes_total)?;
            if let Some(c) = &d.change_id {
                validate_change_id(i, c)?;
            }
            if let Some(c) = &d.checksums
                && (c.chunk_size == 0 || c.ranges.iter().any(|r| r.length == 0))
            {
                return Err(JobError::Invalid {
                    detail: format!("disks[{i}].checksums: chunk_size and lengths must be > 0"),
                });
            }
        }
        if report.status == CompletionStatus::Completed {
            if let Some(missing) = b
                .disk_results
                .iter()
                .find(|r| !report.disks.iter().any(|d| d.disk_key == r.disk_key))
            {
                return Err(JobError::Invalid {
                    detail: format!(
                        "disks: disk {} of backup {id} is missing from a completed report \
                         (a VM is backed up as one unit)",
                        missing.disk_key
                    ),
                });
            }
            if let Some(d) = report
                .disks
                .iter()
                .find(|d| d.status != DiskStatus::Completed)
            {
                return Err(JobError::Invalid {
                    detail: format!(
                        "disks: disk {} is {} in a report whose status is completed",
                        d.disk_key,
                        d.status.as_str()
                    ),
                });
            }
        }
        let Some(job) = self.live(id) else {
            return Err(JobError::WrongState {
                id: id.clone(),
                status: b.status.as_str(),
                what: "this hub process holds no exports for it".into(),
            });
        };
        job.touch();
        if let Some(c) = &report.consistency {
            self.record_consistency(id, c).await?;
        }
        if let Some(h) = &report.hardware {
            self.record_hardware(id, h).await?;
        }
        match report.status {
            CompletionStatus::Failed => {
                let cause = report
                    .error_message
                    .clone()
                    .or_else(|| {
                        report.disks.iter().find_map(|d| {
                            d.error_message
                                .as_ref()
                                .map(|m| format!("disk {}: {m}", d.disk_key))
                        })
                    })
                    .unwrap_or_else(|| "the writer reported failure without a message".into());
                let me = self.clone();
                let handle = self.deps().tasks.spawn(async move {
                    // Under the job's lock, and only if nothing ended the job meanwhile: the
                    // hub's own diagnosis of a disk (its qemu-nbd died, with stderr) is the root
                    // cause; the writer's view of it ("connection closed") does not replace it.
                    let mut res = job.res.lock().await;
                    if res.finished {
                        return;
                    }
                    let id = &job.id;
                    if let Ok(now) = me.get(id).await {
                        for d in &report.disks {
                            let diagnosed = now.disk_results.iter().any(|r| {
                                r.disk_key == d.disk_key
                                    && r.status == DiskStatus::Failed
                                    && r.error_message.is_some()
                            });
                            if diagnosed
                                || !(d.status == DiskStatus::Failed || d.error_message.is_some())
                            {
                                continue;
                            }
                            let upd = crate::db::DiskUpdate {
                                status: Some(DiskStatus::Failed),
                                error_message: Some(d.error_message.clone()),
                                ..Default::default()
                            };
                            if let Err(e) = me.deps().db.update_disk(id, d.disk_key, &upd).await {
                                tracing::error!(backup_id = %id, error = %e, "cannot record disk failure");
                            }
                        }
                    }
                    me.event(
                        id,
                        Level::Error,
                        "writer_failed",
                        format!("the writer reported failure: {cause}"),
                        None,
                    )
                    .await;
                    finish::finish(
                        &me,
                        &job,
                        &mut res,
                        finish::Outcome::Failed(format!("writer reported failure: {cause}")),
                    )
                    .await;
                });
                let _ = handle.await;
            }
            CompletionStatus::Completed => {
                for d in &report.disks {
                    // Kept with the backup: the next incremental asks the hypervisor for the
                    // blocks changed since this change id. Stored before the move to
                    // `finalizing`, so that a database error leaves the job running for the
                    // writer to retry rather than finalizing without a verifier; on a job that
                    // then loses a race (cancelled) they are harmless: only completed backups
                    // are built on.
                    self.deps()
                        .db
                        .update_disk(
                            id,
                            d.disk_key,
                            &crate::db::DiskUpdate {
                                bytes_transferred: d.bytes_transferred,
                                change_id: d.change_id.clone(),
                                ..Default::default()
                            },
                        )
                        .await?;
                    if let Some(c) = &d.change_id {
                        self.event(
                            id,
                            Level::Info,
                            "change_id",
                            format!(
                                "disk {}: copied at change id {c}{}",
                                d.disk_key,
                                d.bytes_transferred
                                    .map(|w| format!(", {w} bytes written"))
                                    .unwrap_or_default()
                            ),
                            Some(d.disk_key),
                        )
                        .await;
                    }
                }
                // The truth on disk before the report is acknowledged.
                super::finalize::store_truths(self, id, &report)
                    .await
                    .map_err(|e| match e {
                        super::finalize::TruthError::Db(e) => JobError::Db(e),
                        e @ super::finalize::TruthError::BadGrid { .. } => JobError::Invalid {
                            detail: e.to_string(),
                        },
                        e => JobError::Prepare {
                            backup_id: id.clone(),
                            step: "storing the whole-disk checksums",
                            cause: e.to_string(),
                        },
                    })?;
                if !self
                    .deps()
                    .db
                    .transition_backup(id, &[JobStatus::Running], JobStatus::Finalizing, None)
                    .await?
                {
                    let now = self.get(id).await?;
                    return Err(JobError::WrongState {
                        id: id.clone(),
                        status: now.status.as_str(),
                        what: "the job changed state before the completion report".into(),
                    });
                }
                let ranges: usize = report
                    .disks
                    .iter()
                    .filter_map(|d| d.checksums.as_ref().map(|c| c.ranges.len()))
                    .sum();
                self.event(
                    id,
                    Level::Info,
                    "finalizing",
                    format!(
                        "writer reported completion of {} disk(s) with {ranges} checksum range(s); \
                         verifying",
                        report.disks.len()
                    ),
                    None,
                )
                .await;
                self.publish(id).await;
                let me = self.clone();
                self.deps().tasks.spawn(async move {
                    super::finalize::finalize(&me, job, report).await;
                });
            }
        }
        self.get(id).await
    }
}
