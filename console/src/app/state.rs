//! What each view remembers, one struct per view: adding a [`View`] does not compile until
//! [`ViewStates`] has a place for it. Also the throughput history of disks, and the three kinds
//! of job the Jobs view lists.

use crate::view::View;
use chrono::{DateTime, Utc};
use sendense_shared::api::{Backup, JobStatus, Recovery, Restore};
use sendense_shared::ids::BackupId;
use std::collections::VecDeque;

/// Throughput samples kept per disk (one per hub update, at most one per second).
const MAX_RATE_SAMPLES: usize = 120;
/// Window over which a disk's rate is averaged.
const RATE_WINDOW_SECS: i64 = 10;

/// Selection and filter of one list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListState {
    /// Selected row, as last moved to; read through `App::selected`, which keeps it inside
    /// the rows there are now.
    pub selected: usize,
    pub filter: String,
}

/// The Jobs view: its list, and the job whose detail is open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobsState {
    pub list: ListState,
    pub detail: Option<JobRef>,
    /// First disk shown in the job detail.
    pub detail_scroll: usize,
}

/// The Policies view: its list, the policy whose detail is open, and in the detail the VM
/// whose points are shown and the selected point.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoliciesState {
    pub list: ListState,
    /// Id of the open policy.
    pub detail: Option<String>,
    /// Place of the shown VM among the policy's VMs (kept inside them when read).
    pub vm: usize,
    /// Selected point of that VM (kept inside its points when read).
    pub point: usize,
}

/// The state of every view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewStates {
    pub jobs: JobsState,
    pub vms: ListState,
    pub ports: ListState,
    pub tunnel: ListState,
    pub processes: ListState,
    pub events: ListState,
    pub policies: PoliciesState,
}

impl ViewStates {
    pub fn list(&self, view: View) -> &ListState {
        match view {
            View::Jobs => &self.jobs.list,
            View::Vms => &self.vms,
            View::Ports => &self.ports,
            View::Tunnel => &self.tunnel,
            View::Processes => &self.processes,
            View::Events => &self.events,
            View::Policies => &self.policies.list,
        }
    }

    pub fn list_mut(&mut self, view: View) -> &mut ListState {
        match view {
            View::Jobs => &mut self.jobs.list,
            View::Vms => &mut self.vms,
            View::Ports => &mut self.ports,
            View::Tunnel => &mut self.tunnel,
            View::Processes => &mut self.processes,
            View::Events => &mut self.events,
            View::Policies => &mut self.policies.list,
        }
    }
}

/// Which job: a backup, a restore or an instant recovery (their ids are of different kinds).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JobRef {
    Backup(BackupId),
    Restore(String),
    Recovery(String),
}

/// One row of the Jobs view.
#[derive(Debug, Clone, Copy)]
pub enum JobRow<'a> {
    Backup(&'a Backup),
    Restore(&'a Restore),
    Recovery(&'a Recovery),
}

impl<'a> JobRow<'a> {
    pub fn id(&self) -> &'a str {
        match self {
            JobRow::Backup(b) => &b.backup_id.0,
            JobRow::Restore(r) => &r.restore_id,
            JobRow::Recovery(r) => &r.recovery_id,
        }
    }

    pub fn vm_name(&self) -> &'a str {
        match self {
            JobRow::Backup(b) => &b.vm_name,
            JobRow::Restore(r) => &r.vm_name,
            JobRow::Recovery(r) => &r.vm_name,
        }
    }

    pub fn status(&self) -> JobStatus {
        match self {
            JobRow::Backup(b) => b.status,
            JobRow::Restore(r) => r.status,
            JobRow::Recovery(r) => r.status,
        }
    }

    pub fn created_at(&self) -> DateTime<Utc> {
        match self {
            JobRow::Backup(b) => b.created_at,
            JobRow::Restore(r) => r.created_at,
            JobRow::Recovery(r) => r.created_at,
        }
    }

    pub fn job_ref(&self) -> JobRef {
        match self {
            JobRow::Backup(b) => JobRef::Backup(b.backup_id.clone()),
            JobRow::Restore(r) => JobRef::Restore(r.restore_id.clone()),
            JobRow::Recovery(r) => JobRef::Recovery(r.recovery_id.clone()),
        }
    }
}

/// Bytes-done samples of one disk, for its rate, ETA and sparkline.
#[derive(Debug, Clone, Default)]
pub struct DiskHistory {
    samples: VecDeque<(DateTime<Utc>, u64)>,
    /// One rate (bytes/s) per recorded sample, oldest first.
    pub rates: VecDeque<u64>,
}

impl DiskHistory {
    pub(super) fn record(&mut self, now: DateTime<Utc>, bytes_done: u64) {
        if let Some(&(t, b)) = self.samples.back() {
            if bytes_done < b {
                // The copy restarted: old samples describe another run.
                self.samples.clear();
                self.rates.clear();
            } else if (now - t).num_milliseconds() < 1000 {
                return;
            }
        }
        self.samples.push_back((now, bytes_done));
        while self.samples.len() > 2 && (now - self.samples[0].0).num_seconds() > RATE_WINDOW_SECS {
            self.samples.pop_front();
        }
        if let Some(rate) = self.rate() {
            self.rates.push_back(rate);
            if self.rates.len() > MAX_RATE_SAMPLES {
                self.rates.pop_front();
            }
        }
    }

    /// Average bytes/s over the window, once there are two samples.
    pub fn rate(&self) -> Option<u64> {
        let (t0, b0) = *self.samples.front()?;
        let (t1, b1) = *self.samples.back()?;
        let ms = (t1 - t0).num_milliseconds();
        if ms <= 0 {
            return None;
        }
        Some(((b1.saturating_sub(b0)) as f64 * 1000.0 / ms as f64) as u64)
    }
}
