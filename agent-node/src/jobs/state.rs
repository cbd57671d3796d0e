//! One backup job's state: per-disk counters, status and errors, and the views of it (the
//! node API's [`NodeBackupState`], the hub's [`ProgressReport`] and [`CompletionReport`]).

use crate::copy::DiskCounters;
use sendense_shared::api::{
    BackupType, ChunkChecksums, CompletionReport, CompletionStatus, Consistency, DiskCompletion,
    DiskProgress, DiskStatus, GridChecksums, JobStatus, NodeBackupState, NodeDiskState,
    ProgressReport,
};
use sendense_shared::ids::{BackupId, DiskKey};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

pub(super) struct DiskEntry {
    pub(super) disk_key: DiskKey,
    pub(super) size: u64,
    pub(super) counters: Arc<DiskCounters>,
    pub(super) status: DiskStatus,
    pub(super) error: Option<String>,
    /// From the copy outcome, for the hub's verification.
    pub(super) checksums: Option<ChunkChecksums>,
    /// From the copy outcome: the whole-disk grid, when the hub asked for one.
    pub(super) grid: Option<GridChecksums>,
    /// The snapshot's change id for this disk (vSphere CBT), reported once it is copied.
    pub(super) change_id: Option<String>,
    /// Bytes read, sampled about once a second, for the rate.
    samples: RateSamples,
}

impl DiskEntry {
    pub(super) fn processed(&self) -> (u64, u64) {
        let c = self.counters.snapshot();
        let transferred = c.bytes_written + c.bytes_zeroed;
        let done = (transferred + c.bytes_skipped).min(self.size);
        (done, transferred)
    }
}

pub(super) struct JobState {
    pub(super) status: JobStatus,
    pub(super) error: Option<String>,
    pub(super) disks: Vec<DiskEntry>,
    /// The snapshot's consistency (guest frozen or not, and why), once known.
    pub(super) consistency: Option<Consistency>,
    /// The VM's hardware at snapshot time, once known (QEMU).
    pub(super) hardware: Option<sendense_shared::api::VmHardware>,
}

/// One backup job.
pub struct Job {
    pub backup_id: BackupId,
    pub vm_name: String,
    pub backup_type: BackupType,
    pub(super) cancel: CancellationToken,
    state: Mutex<JobState>,
}

impl Job {
    /// A job in `preparing`, every disk of `disks` (key, size) `preparing` too.
    pub(super) fn new(
        backup_id: BackupId,
        vm_name: String,
        backup_type: BackupType,
        disks: &[(DiskKey, u64)],
        cancel: CancellationToken,
    ) -> Job {
        Job {
            backup_id,
            vm_name,
            backup_type,
            cancel,
            state: Mutex::new(JobState {
                status: JobStatus::Preparing,
                error: None,
                consistency: None,
                hardware: None,
                disks: disks
                    .iter()
                    .map(|&(disk_key, size)| DiskEntry {
                        disk_key,
                        size,
                        counters: Arc::new(DiskCounters::default()),
                        status: DiskStatus::Preparing,
                        error: None,
                        checksums: None,
                        grid: None,
                        change_id: None,
                        samples: RateSamples::default(),
                    })
                    .collect(),
            }),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// The job as `GET /api/v1/backup/{id}` shows it.
    pub fn view(&self) -> NodeBackupState {
        let st = self.lock();
        NodeBackupState {
            backup_id: self.backup_id.clone(),
            vm_name: self.vm_name.clone(),
            backup_type: self.backup_type,
            status: st.status,
            error_message: st.error.clone(),
            disks: st
                .disks
                .iter()
                .map(|d| {
                    let c = d.counters.snapshot();
                    NodeDiskState {
                        disk_key: d.disk_key,
                        status: d.status,
                        bytes_total: d.size,
                        bytes_read: c.bytes_read,
                        bytes_written: c.bytes_written + c.bytes_zeroed,
                        bytes_skipped: c.bytes_skipped,
                        bytes_read_for_grid: Some(c.bytes_read_for_grid),
                        rate_bps: d.samples.rate(),
                        error_message: d.error.clone(),
                    }
                })
                .collect(),
        }
    }

    pub(super) fn progress(&self) -> ProgressReport {
        let st = self.lock();
        ProgressReport {
            disks: st
                .disks
                .iter()
                .map(|d| {
                    let (done, transferred) = d.processed();
                    DiskProgress {
                        disk_key: d.disk_key,
                        bytes_done: if d.status == DiskStatus::Completed {
                            d.size
                        } else {
                            done
                        },
                        bytes_total: d.size,
                        status: d.status,
                        bytes_transferred: Some(transferred),
                    }
                })
                .collect(),
        }
    }

    pub(super) fn sample(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        for d in &mut st.disks {
            // The rate is of data moved: skipped holes would make it meaningless.
            let read = d.counters.snapshot().bytes_read;
            d.samples.push(now, read);
        }
    }

    pub(super) fn set_status(&self, status: JobStatus) {
        let mut st = self.lock();
        // Once cancelling, only a terminal state replaces it.
        if st.status == JobStatus::Cancelling && !status.is_terminal() {
            return;
        }
        st.status = status;
    }

    pub(super) fn set_disks(&self, status: DiskStatus) {
        for d in &mut self.lock().disks {
            d.status = status;
        }
    }
}

/// (time, bytes) samples of the last few seconds; the rate is their slope.
#[derive(Debug, Default)]
pub(crate) struct RateSamples(VecDeque<(Instant, u64)>);

impl RateSamples {
    pub(crate) fn push(&mut self, at: Instant, bytes: u64) {
        self.0.push_back((at, bytes));
        while self.0.len() > 6 {
            self.0.pop_front();
        }
    }

    /// Bytes per second between the oldest and the newest sample.
    pub(crate) fn rate(&self) -> u64 {
        match (self.0.front(), self.0.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                ((b1.saturating_sub(*b0)) as f64 / (*t1 - *t0).as_secs_f64()) as u64
            }
            _ => 0,
        }
    }
}

impl Job {
    pub(super) fn completion(&self) -> CompletionReport {
        let st = self.lock();
        CompletionReport {
            status: if st.status == JobStatus::Completed {
                CompletionStatus::Completed
            } else {
                CompletionStatus::Failed
            },
            error_message: st.error.clone(),
            disks: st
                .disks
                .iter()
                .map(|d| DiskCompletion {
                    disk_key: d.disk_key,
                    status: d.status,
                    error_message: d.error.clone(),
                    checksums: d.checksums.clone(),
                    bytes_transferred: Some(d.processed().1),
                    change_id: d.change_id.clone(),
                    grid: d.grid.clone(),
                })
                .collect(),
            consistency: st.consistency.clone(),
            hardware: st.hardware.clone(),
        }
    }
}
