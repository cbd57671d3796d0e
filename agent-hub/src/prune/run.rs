//! Admission of a prune job (nothing else may use the VM's chain) and its runner: the steps
//! one after another, cancel between them, progress and events.

use super::engine::Engine;
use super::journal::{self, Step};
use super::{CancellationToken, PruneError, Pruner, db_err};
use crate::db::NewStep;
use crate::events::Level;
use sendense_shared::api::{Backup, JobStatus, PruneJob, PrunePlan};

impl Pruner {
    /// Refuses while another job uses the chain; stores the job and its journal; runs it.
    pub(super) async fn launch(
        &self,
        vm: &str,
        kind: &str,
        plan: PrunePlan,
        steps: Vec<(Step, u64, u64)>,
    ) -> Result<PruneJob, PruneError> {
        let db = self.db();
        let job = PruneJob {
            prune_id: uuid::Uuid::new_v4().to_string(),
            vm_name: vm.to_string(),
            kind: kind.to_string(),
            status: JobStatus::Pending,
            plan,
            steps_total: steps.len() as u32,
            steps_done: 0,
            bytes_total: steps.iter().map(|s| s.1).sum(),
            bytes_done: 0,
            error_message: None,
            created_at: db.clock().now(),
            started_at: None,
            completed_at: None,
        };
        let rows: Vec<NewStep> = steps
            .iter()
            .map(|(s, copy, freed)| NewStep {
                kind: s.kind(),
                step_json: serde_json::to_string(s).expect("steps serialise"),
                bytes_copied: *copy,
                bytes_freed: *freed,
            })
            .collect();
        {
            let _admission = self.inner.admission.lock().await;
            if let Some(job) = self.chain_user(vm).await? {
                return Err(PruneError::Busy { vm: vm.into(), job });
            }
            db.create_prune(&job, &rows)
                .await
                .map_err(db_err("storing the prune job"))?;
        }
        let cancel = CancellationToken::new();
        self.lock_live()
            .insert(job.prune_id.clone(), cancel.clone());
        tracing::info!(prune_id = %job.prune_id, vm, kind, steps = steps.len(), "prune job started");
        let me = self.clone();
        let id = job.prune_id.clone();
        let steps: Vec<Step> = steps.into_iter().map(|s| s.0).collect();
        self.deps().tasks.spawn(async move {
            me.run(&id, steps, &cancel).await;
            me.lock_live().remove(&id);
        });
        self.publish(&job.prune_id).await;
        Ok(job)
    }

    /// The job (backup, restore, recovery, verify, prune) that uses `vm`'s chain now, named.
    pub async fn chain_user(&self, vm: &str) -> Result<Option<String>, PruneError> {
        let db = self.db();
        if let Some(p) = db
            .active_prune_of_vm(vm)
            .await
            .map_err(db_err("checking for prune jobs"))?
        {
            return Ok(Some(format!("prune job {p}")));
        }
        let backups = db
            .list_backups_in(crate::jobs::ACTIVE)
            .await
            .map_err(db_err("checking for running backups"))?;
        if let Some(b) = backups.iter().find(|b| b.vm_name == vm) {
            return Ok(Some(format!(
                "backup {} ({})",
                b.backup_id,
                b.status.as_str()
            )));
        }
        let restores = db
            .list_restores_in(crate::restores::ACTIVE)
            .await
            .map_err(db_err("checking for running restores"))?;
        if let Some(r) = restores.iter().find(|r| r.vm_name == vm) {
            return Ok(Some(format!(
                "restore {} of point {}",
                r.restore_id, r.backup_id
            )));
        }
        // A recovered VM reads the point's chain through its exports until every disk is home.
        let recoveries = db
            .list_recoveries_in(crate::recoveries::ACTIVE)
            .await
            .map_err(db_err("checking for running recoveries"))?;
        if let Some(r) = recoveries.iter().find(|r| r.source_vm == vm) {
            return Ok(Some(format!(
                "recovery {} of point {} (VM {} on node {})",
                r.recovery_id, r.backup_id, r.vm_name, r.node
            )));
        }
        let verifies = db
            .list_verifies()
            .await
            .map_err(db_err("checking for verify jobs"))?;
        let points: Vec<Backup> = db
            .list_backups_in(&[JobStatus::Completed])
            .await
            .map_err(db_err("listing points"))?
            .into_iter()
            .filter(|b| b.vm_name == vm)
            .collect();
        for v in verifies.iter().filter(|v| !v.status.is_terminal()) {
            let touches = v.scope == format!("vm:{vm}")
                || points.iter().any(|p| {
                    v.scope == format!("backup:{}", p.backup_id)
                        || v.scope == format!("repository:{}", p.repository_id)
                });
            if touches {
                return Ok(Some(format!("verify job {} ({})", v.verify_id, v.scope)));
            }
        }
        Ok(None)
    }

    async fn run(&self, id: &str, steps: Vec<Step>, cancel: &CancellationToken) {
        let db = self.db();
        if let Err(e) = db
            .transition_prune(id, &[JobStatus::Pending], JobStatus::Running, None)
            .await
        {
            tracing::error!(prune_id = id, error = %sendense_shared::errors::chain(&e), "cannot start the prune job");
            return;
        }
        self.publish(id).await;
        let vm = match db.get_prune(id).await {
            Ok(j) => j.vm_name,
            Err(_) => return,
        };
        let rows = db.prune_steps(id).await.unwrap_or_default();
        let engine = Engine {
            db,
            readback: &self.deps().readback,
            log: &self.deps().log,
            knob: &self.deps().knob,
        };
        let mut bytes_done = 0u64;
        for (seq, step) in steps.iter().enumerate() {
            let seq = seq as u32;
            if cancel.is_cancelled() {
                let _ = db
                    .transition_prune(
                        id,
                        &[JobStatus::Cancelling, JobStatus::Running],
                        JobStatus::Cancelled,
                        Some(&format!(
                            "cancelled before step {} of {}",
                            seq + 1,
                            steps.len()
                        )),
                    )
                    .await;
                self.publish(id).await;
                return;
            }
            // A backup, restore, recovery or verify admitted in the instant between the two checks.
            match self.chain_user(&vm).await {
                Ok(Some(user)) if !user.starts_with("prune job") => {
                    self.fail(
                        id,
                        &format!(
                            "{user} started on VM {vm:?}; step {} of {} not run",
                            seq + 1,
                            steps.len()
                        ),
                    )
                    .await;
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    self.fail(id, &sendense_shared::errors::chain(&e)).await;
                    return;
                }
            }
            let anchor = step.child().cloned();
            if let Some(a) = &anchor {
                self.deps()
                    .log
                    .record(
                        a,
                        Some(id),
                        Level::Info,
                        "prune_step",
                        &format!("step {}/{}: {}", seq + 1, steps.len(), step.describe()),
                        None,
                    )
                    .await;
            }
            match engine.run_step(id, seq, step, journal::PLANNED).await {
                Ok(_) => {
                    bytes_done += rows.get(seq as usize).map_or(0, |r| r.bytes_copied);
                    let _ = db.set_prune_progress(id, seq + 1, bytes_done).await;
                    self.publish(id).await;
                }
                Err(e) => {
                    let msg = format!(
                        "step {}/{} ({}): {}",
                        seq + 1,
                        steps.len(),
                        step.describe(),
                        sendense_shared::errors::chain(&e)
                    );
                    if let Some(a) = &anchor {
                        self.deps()
                            .log
                            .record(a, Some(id), Level::Error, "prune_failed", &msg, None)
                            .await;
                    }
                    self.fail(id, &msg).await;
                    return;
                }
            }
        }
        let _ = db
            .transition_prune(
                id,
                &[JobStatus::Running, JobStatus::Cancelling],
                JobStatus::Completed,
                None,
            )
            .await;
        tracing::info!(prune_id = id, "prune job completed");
        self.publish(id).await;
    }

    async fn fail(&self, id: &str, why: &str) {
        tracing::warn!(prune_id = id, why, "prune job failed");
        let _ = self
            .db()
            .transition_prune(
                id,
                &[
                    JobStatus::Pending,
                    JobStatus::Running,
                    JobStatus::Cancelling,
                ],
                JobStatus::Failed,
                Some(why),
            )
            .await;
        self.publish(id).await;
    }
}
