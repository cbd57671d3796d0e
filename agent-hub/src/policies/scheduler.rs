//! The scheduler: [`Policies::tick`] is one pass at the hub's clock (`db.clock().now()`, which
//! a test drives with the test clock file), in this order:
//!
//! 1. follow: every `running` run whose backup job ended takes the job's end (`completed`, or
//!    `failed` with the job's error); a completed one goes through the [`super::AfterRun`]
//!    hook;
//! 2. schedule: for each enabled policy, the schedule times after its last claimed slot (or
//!    after its last change) up to now. None: nothing. One or more: the NEWEST is claimed
//!    (a `policy_slots` row; a slot another hub or an earlier start claimed is left alone)
//!    and gets one run per VM. Several (the hub was down) give ONE run, marked `late`, whose
//!    reason and the log count the slots skipped; a run more than a minute after its time is
//!    `late` too;
//! 3. admit: queued runs in queue order (priority, highest first, then planned time) start when
//!    [`super::admission`] finds their resources, or give up after their window.
//!
//! [`spawn`] runs a tick every `policy_check_interval_secs` (default 5 s), at once when woken
//! (run-now, a backup job that ended), and first [`Policies::recover`] at start-up.

use super::select::targets;
use super::{Policies, PolicyError, schedule::Schedule};
use crate::db::{QueuedRun, RunChange};
use chrono::{DateTime, TimeDelta, Utc};
use sendense_shared::api::{HubEvent, JobStatus, Policy, PolicyRun, RunStatus};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A run started more than this after its planned time is `late`.
pub const LATE_AFTER: TimeDelta = TimeDelta::seconds(60);

/// What one tick did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    /// Slots claimed: (policy id, planned time).
    pub slots: Vec<(String, DateTime<Utc>)>,
    /// Runs that started a backup job.
    pub started: Vec<String>,
    /// Runs that ended (followed their job, gave up, or failed to start).
    pub ended: Vec<String>,
}

impl Policies {
    /// One pass of the scheduler (see the module doc).
    pub async fn tick(&self) -> Result<TickReport, PolicyError> {
        let _one = self.inner.tick.lock().await;
        let mut report = TickReport::default();
        self.follow(&mut report).await?;
        let now = self.db().clock().now();
        for p in self.db().list_policies().await? {
            if p.enabled
                && let Some(slot) = self.due_slot(&p, now).await?
            {
                report.slots.push((p.id.clone(), slot));
            }
        }
        self.admit(&mut report).await?;
        Ok(report)
    }

    /// Start-up: a run left `running` without a backup job (the hub stopped while it was
    /// starting one) is queued again within its window, or gives up; runs with a job follow
    /// that job on the next tick.
    pub async fn recover(&self) -> Result<u32, PolicyError> {
        let now = self.db().clock().now();
        let mut n = 0;
        for r in self.db().runs_in(RunStatus::Running).await? {
            if r.run.backup_id.is_some() {
                continue;
            }
            let change = if now < r.give_up_at {
                RunChange {
                    status: Some(RunStatus::Queued),
                    reason: Some(Some(
                        "queued again: the hub stopped while it was starting this run's backup"
                            .into(),
                    )),
                    ..Default::default()
                }
            } else {
                RunChange {
                    status: Some(RunStatus::GaveUp),
                    ended_at: Some(now),
                    reason: Some(Some(
                        "the hub stopped while it was starting this run's backup, and the \
                         queue window has passed since"
                            .into(),
                    )),
                    ..Default::default()
                }
            };
            if self
                .db()
                .update_run(&r.run.run_id, &[RunStatus::Running], &change)
                .await?
            {
                tracing::warn!(run_id = %r.run.run_id, vm = %r.run.vm_name,
                    to = ?change.status, "policy run left starting by a stopped hub");
                self.publish(&r.run.run_id).await;
                n += 1;
            }
        }
        Ok(n)
    }

    /// `POST /api/v1/policies/{id}/run-now`: a manual slot at now, a run per VM.
    pub async fn run_now(&self, id: &str) -> Result<Vec<PolicyRun>, PolicyError> {
        let p = self.stored(id).await?;
        let now = self.db().clock().now();
        if !self.db().claim_slot(&p.id, now, false, true).await? {
            return Err(PolicyError::Invalid(
                "run-now: a run of this policy was queued at this very instant; retry".into(),
            ));
        }
        tracing::info!(policy_id = %p.id, name = %p.name, "run-now: manual slot queued");
        let runs = self.queue_slot(&p, now, false, true, None).await?;
        self.wake();
        Ok(runs)
    }

    /// Claims the slot that is due for `p` at `now`, if any, and queues its runs.
    async fn due_slot(
        &self,
        p: &Policy,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, PolicyError> {
        let schedule = match Schedule::parse(&p.schedule, &p.timezone) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(policy_id = %p.id, error = %e, "stored policy has a bad schedule");
                return Ok(None);
            }
        };
        let last = self.db().last_scheduled_slot(&p.id).await?;
        let after = last.map_or(p.updated_at, |l| l.max(p.updated_at));
        let Some((count, newest)) = schedule.due(after, now) else {
            return Ok(None);
        };
        let late = count > 1 || now - newest > LATE_AFTER;
        if !self.db().claim_slot(&p.id, newest, late, false).await? {
            return Ok(None);
        }
        let note = late.then(|| {
            let skipped = count - 1;
            format!(
                "late: planned {newest}, started at {now}; {skipped} earlier missed slot(s) \
                 since {after} skipped (one run for the newest, never one per missed slot)"
            )
        });
        if late {
            tracing::warn!(policy_id = %p.id, name = %p.name, planned = %newest,
                missed = count, skipped = count - 1, "policy slot missed (hub down?): one late run");
        } else {
            tracing::info!(policy_id = %p.id, name = %p.name, planned = %newest, "policy slot due");
        }
        self.queue_slot(p, newest, late, false, note).await?;
        Ok(Some(newest))
    }

    /// One run per VM of the slot: queued, or skipped with its reason.
    async fn queue_slot(
        &self,
        p: &Policy,
        planned_at: DateTime<Utc>,
        late: bool,
        manual: bool,
        note: Option<String>,
    ) -> Result<Vec<PolicyRun>, PolicyError> {
        let db = self.db();
        let policies = db.list_policies().await?;
        let vms = db.list_vms().await?;
        let now = db.clock().now();
        let window = TimeDelta::seconds(i64::try_from(p.queue_window_secs).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        for t in targets(p, &policies, &vms) {
            let skipped = t.skip.is_some();
            let run = QueuedRun {
                run: PolicyRun {
                    run_id: uuid::Uuid::new_v4().to_string(),
                    policy_id: p.id.clone(),
                    vm_name: t.vm_name.clone(),
                    planned_at,
                    late,
                    manual,
                    status: if skipped {
                        RunStatus::Skipped
                    } else {
                        RunStatus::Queued
                    },
                    backup_type: None,
                    backup_id: None,
                    queued_at: now,
                    started_at: None,
                    ended_at: skipped.then_some(now),
                    reason: t.skip.clone().or_else(|| note.clone()),
                },
                priority: p.priority,
                give_up_at: now
                    .checked_add_signed(window)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC),
            };
            db.insert_run(&run).await?;
            match &t.skip {
                Some(why) => tracing::info!(policy_id = %p.id, vm = %t.vm_name, reason = %why,
                    "policy run skipped"),
                None => tracing::info!(policy_id = %p.id, vm = %t.vm_name, planned = %planned_at,
                    late, manual, "policy run queued"),
            }
            self.deps().bus.publish(HubEvent::PolicyRun {
                run: run.run.clone(),
            });
            out.push(run.run);
        }
        Ok(out)
    }

    /// Running runs take the end of their job.
    async fn follow(&self, report: &mut TickReport) -> Result<(), PolicyError> {
        let db = self.db();
        for r in db.runs_in(RunStatus::Running).await? {
            let Some(id) = &r.run.backup_id else { continue };
            let b = match db.get_backup(id).await {
                Ok(b) => b,
                Err(crate::db::DbError::NotFound { .. }) => {
                    self.end(&r, RunStatus::Failed, Some(format!("backup {id} is gone")))
                        .await?;
                    report.ended.push(r.run.run_id.clone());
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let (status, reason) = match b.status {
                JobStatus::Completed => (RunStatus::Completed, None),
                JobStatus::Failed | JobStatus::Cancelled => (
                    RunStatus::Failed,
                    Some(format!(
                        "backup {id} {}: {}",
                        b.status.as_str(),
                        b.error_message.as_deref().unwrap_or("no reason recorded")
                    )),
                ),
                _ => continue,
            };
            if self.end(&r, status, reason).await? {
                report.ended.push(r.run.run_id.clone());
                if status == RunStatus::Completed {
                    match db.get_policy(&r.run.policy_id).await {
                        Ok(p) => self.deps().after_run.after_backup(&p, &b).await,
                        Err(e) => tracing::warn!(policy_id = %r.run.policy_id, error = %e,
                            "policy of a completed run not found; no after-run hook"),
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves a running or queued run to a terminal status; `true` when this call did.
    pub(crate) async fn end(
        &self,
        r: &QueuedRun,
        status: RunStatus,
        reason: Option<String>,
    ) -> Result<bool, PolicyError> {
        let change = RunChange {
            status: Some(status),
            ended_at: Some(self.db().clock().now()),
            reason: reason.clone().map(Some),
            ..Default::default()
        };
        let won = self
            .db()
            .update_run(
                &r.run.run_id,
                &[RunStatus::Running, RunStatus::Queued],
                &change,
            )
            .await?;
        if won {
            tracing::info!(run_id = %r.run.run_id, policy_id = %r.run.policy_id,
                vm = %r.run.vm_name, status = status.as_str(),
                reason = reason.as_deref().unwrap_or(""), "policy run ended");
            self.publish(&r.run.run_id).await;
        }
        Ok(won)
    }
}

/// Runs [`Policies::recover`] once, then [`Policies::tick`] every `every` (and when woken)
/// until `shutdown` fires.
pub fn spawn(
    p: Policies,
    every: Duration,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
) {
    tasks.spawn(async move {
        match p.recover().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(runs = n, "policy runs recovered at start-up"),
            Err(e) => tracing::warn!(error = %sendense_shared::errors::chain(&e),
                "cannot recover the policy runs a previous hub left"),
        }
        let mut bus = p.deps().bus.subscribe();
        loop {
            match p.tick().await {
                Ok(r) => {
                    if !r.slots.is_empty() || !r.started.is_empty() || !r.ended.is_empty() {
                        tracing::debug!(
                            slots = r.slots.len(),
                            started = r.started.len(),
                            ended = r.ended.len(),
                            "policy scheduler tick"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %sendense_shared::errors::chain(&e),
                    "policy scheduler tick failed"),
            }
            let sleep = tokio::time::sleep(every);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = &mut sleep => break,
                    _ = p.inner.wake.notified() => break,
                    ev = bus.recv() => match ev {
                        // A job that ended may free what a queued run waits for.
                        Ok(HubEvent::Backup { backup }) if backup.status.is_terminal() => break,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            sleep.as_mut().await;
                            break;
                        }
                        Ok(_) => {}
                    },
                }
            }
        }
    });
}
