//! Start-up recovery of prune jobs a killed hub left unfinished: the step in progress (journal
//! phase `started` or `cataloged`) is finished (rolled forward: every phase of a step can be
//! run again, see `crate::prune::engine`) after any qemu-img it left running is stopped
//! (checked in `/proc/PID/cmdline`, never by name); steps not begun stay undone. The job then
//! ends `completed` if nothing is left, else `failed` (or `cancelled` if it was being
//! cancelled) saying what was finished and what was not run.

use crate::db::Db;
use crate::events::JobLog;
use crate::prune::engine::{Engine, Knob};
use crate::prune::journal::{self, Step};
use crate::prune::qemu;
use crate::readback::ReadBack;
use sendense_shared::api::JobStatus;

/// What recovery did, for the start-up log.
#[derive(Debug, Default, Clone, Copy)]
pub struct PruneReport {
    pub jobs: usize,
    pub steps_finished: usize,
    pub orphans_stopped: usize,
    pub errors: usize,
}

pub async fn recover(db: &Db, readback: &ReadBack, log: &JobLog) -> PruneReport {
    let mut rep = PruneReport::default();
    let jobs = match db.list_prunes().await {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(error = %sendense_shared::errors::chain(&e), "reconciler: cannot list prune jobs");
            rep.errors += 1;
            return rep;
        }
    };
    // Never the test knob's pauses here: a test restarts the hub with the same environment.
    let knob = Knob::default();
    let engine = Engine {
        db,
        readback,
        log,
        knob: &knob,
    };
    for job in jobs.into_iter().filter(|j| !j.status.is_terminal()) {
        rep.jobs += 1;
        let id = job.prune_id.clone();
        let steps = db.prune_steps(&id).await.unwrap_or_default();
        let mut notes = Vec::new();
        let mut failed = false;
        for row in &steps {
            if row.phase != journal::STARTED && row.phase != journal::CATALOGED {
                continue;
            }
            let step: Step = match serde_json::from_str(&row.step_json) {
                Ok(s) => s,
                Err(e) => {
                    notes.push(format!(
                        "step {}: unreadable journal entry: {e}",
                        row.seq + 1
                    ));
                    failed = true;
                    continue;
                }
            };
            if let Some(pid) = row.pid {
                let images: Vec<std::path::PathBuf> = match &step {
                    Step::Rebase { disks, .. } => disks.iter().map(|d| d.image.clone()).collect(),
                    Step::Merge { disks, .. } => disks.iter().map(|d| d.image.clone()).collect(),
                    Step::Delete { .. } => Vec::new(),
                };
                for img in images {
                    if qemu::stop_orphan(pid, &img).await {
                        rep.orphans_stopped += 1;
                        tracing::warn!(prune_id = %id, pid, image = %img.display(),
                            "reconciler: stopped the qemu-img a killed hub left running (verified in /proc)");
                    }
                }
            }
            match engine.run_step(&id, row.seq, &step, &row.phase).await {
                Ok(_) => {
                    rep.steps_finished += 1;
                    notes.push(format!(
                        "step {} ({}) finished at start-up from phase {}",
                        row.seq + 1,
                        step.describe(),
                        row.phase
                    ));
                }
                Err(e) => {
                    rep.errors += 1;
                    failed = true;
                    notes.push(format!(
                        "step {} ({}): {}",
                        row.seq + 1,
                        step.describe(),
                        sendense_shared::errors::chain(&e)
                    ));
                }
            }
        }
        let after = db.prune_steps(&id).await.unwrap_or_default();
        let done = after.iter().filter(|s| s.phase == journal::DONE).count();
        let undone = after.len() - done;
        let _ = db
            .set_prune_progress(&id, done as u32, job.bytes_done)
            .await;
        let (to, why) = if failed {
            (
                JobStatus::Failed,
                format!("hub restarted during the prune: {}", notes.join("; ")),
            )
        } else if undone == 0 {
            (JobStatus::Completed, String::new())
        } else if job.status == JobStatus::Cancelling {
            (
                JobStatus::Cancelled,
                format!("hub restarted during the prune; {undone} step(s) not run"),
            )
        } else {
            (
                JobStatus::Failed,
                format!(
                    "hub restarted during the prune{}{}; {undone} step(s) not run (prune again)",
                    if notes.is_empty() { "" } else { ": " },
                    notes.join("; ")
                ),
            )
        };
        let from = [
            JobStatus::Pending,
            JobStatus::Running,
            JobStatus::Cancelling,
        ];
        let why = (!why.is_empty()).then_some(why);
        if let Err(e) = db.transition_prune(&id, &from, to, why.as_deref()).await {
            rep.errors += 1;
            tracing::error!(prune_id = %id, error = %sendense_shared::errors::chain(&e), "reconciler: cannot end the prune job");
        }
        tracing::warn!(prune_id = %id, status = to.as_str(), reason = ?why, "reconciler: prune job ended");
    }
    rep
}
