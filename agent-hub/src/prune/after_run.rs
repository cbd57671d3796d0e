//! What a policy does after each completed backup of a VM ([`crate::policies::AfterRun`]):
//! first a synthetic full when the policy's chain limit says `synthetic` and the chain is
//! longer than `max_chain_length`, then a prune with the policy's retention (when it has a keep
//! rule). Both are ordinary prune jobs (journal, events, cancel); one waits for the other, as
//! two jobs never work on one chain at once.
//!
//! The retention prune is created before the hook returns (a run's completion is followed by
//! its prune job, visible in `GET /api/v1/prune`); after a synthetic full it is started once
//! that job ended, from a task of the hub's tracker.
//!
//! With the policy's `boot_check`, a verify job boots the new point first (from a task: the
//! hook returns at once) and the prune follows only when it booted: a point that does not boot
//! keeps every older point, and the event `retention_skipped` on it says why.

use super::{PruneError, Pruner, Started};
use crate::events::Level;
use crate::policies::AfterRun;
use crate::retention;
use crate::verify::Trigger;
use sendense_shared::api::{
    Backup, BootCheckSpec, BootStatus, ChainLimit, Policy, PruneRequest, VerifyRequest,
};
use sendense_shared::errors::chain;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// The prune engine as the policies' after-run hook.
#[derive(Clone)]
pub struct PruneAfterRun {
    pub pruner: Pruner,
    /// Boot-checks the new point first when the policy says `boot_check`.
    pub verify: crate::verify::Verifier,
    pub log: crate::events::JobLog,
}

/// How often a waiting retention prune looks whether the synthetic full ended.
const POLL: Duration = Duration::from_millis(500);

impl AfterRun for PruneAfterRun {
    fn after_backup<'a>(
        &'a self,
        policy: &'a Policy,
        backup: &'a Backup,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let Some(spec) = policy.boot_check.clone() else {
                return self.after(policy, &backup.vm_name).await;
            };
            // A boot takes a while (about 15 s under TCG): the run's hook returns, a task
            // boots the point and prunes only once it booted.
            let me = self.clone();
            let policy = policy.clone();
            let backup = backup.clone();
            self.pruner.deps().tasks.spawn(async move {
                if me.boots(&policy, &backup, spec).await {
                    me.after(&policy, &backup.vm_name).await;
                }
            });
        })
    }
}

impl PruneAfterRun {
    /// Boot-checks `backup` (a verify job with `boot`, waited for); answers whether the
    /// retention prune may go on. A point that did not boot, or whose check could not run,
    /// keeps every older point: an event on the point says so.
    async fn boots(&self, policy: &Policy, backup: &Backup, spec: BootCheckSpec) -> bool {
        let id = &backup.backup_id;
        let req = VerifyRequest {
            backup_id: Some(id.clone()),
            vm_name: None,
            repository_id: None,
            boot: Some(spec),
        };
        let skipped = |why: String| async move {
            self.log
                .record(
                    id,
                    None,
                    Level::Warn,
                    "retention_skipped",
                    &format!(
                        "policy {}: {why}; its retention prune is skipped this run, every older \
                         point is kept",
                        policy.name
                    ),
                    None,
                )
                .await;
            false
        };
        let job = match self.verify.start(&req, Trigger::Policy).await {
            Ok(j) => j,
            Err(e) => return skipped(format!("the boot check did not start: {}", chain(&e))).await,
        };
        tracing::info!(backup_id = %id, policy = %policy.name, verify_id = %job.verify_id,
            "boot check of the policy's new point started");
        loop {
            match self.verify.get(&job.verify_id).await {
                Ok(j) if j.status.is_terminal() => break,
                Ok(_) => tokio::time::sleep(POLL).await,
                Err(e) => {
                    return skipped(format!(
                        "the boot check could not be followed: {}",
                        chain(&e)
                    ))
                    .await;
                }
            }
        }
        let check = match self.pruner.deps().db.get_backup(id).await {
            Ok(b) => b.boot_check,
            Err(e) => return skipped(format!("the point could not be read: {}", chain(&e))).await,
        };
        match check.as_deref() {
            Some(c) if c.status == BootStatus::BootOk => true,
            Some(c) => {
                let detail = c.detail.as_deref().unwrap_or("no detail");
                skipped(format!(
                    "point {id} did not boot ({}: {detail})",
                    c.status.as_str()
                ))
                .await
            }
            None => skipped(format!("point {id} has no boot check result")).await,
        }
    }

    async fn after(&self, policy: &Policy, vm: &str) {
        let synthetic = match (policy.chain_limit, policy.max_chain_length) {
            (ChainLimit::Synthetic, Some(n)) => self.pruner.synthetic(vm, n).await,
            _ => Ok(None),
        };
        match synthetic {
            Ok(None) => retain(&self.pruner, policy, vm).await,
            Ok(Some(job)) => {
                tracing::info!(%vm, policy = %policy.name, prune_id = %job.prune_id,
                    "synthetic full started (chain longer than max_chain_length)");
                let pruner = self.pruner.clone();
                let policy = policy.clone();
                let vm = vm.to_string();
                self.pruner.deps().tasks.spawn(async move {
                    loop {
                        match pruner.get(&job.prune_id).await {
                            Ok(j) if j.status.is_terminal() => break,
                            Ok(_) => tokio::time::sleep(POLL).await,
                            Err(e) => {
                                tracing::warn!(%vm, error = %sendense_shared::errors::chain(&e),
                                    "cannot follow the synthetic full; retention prune skipped this run");
                                return;
                            }
                        }
                    }
                    retain(&pruner, &policy, &vm).await;
                });
            }
            Err(e) => {
                tracing::warn!(%vm, policy = %policy.name, error = %sendense_shared::errors::chain(&e),
                    "synthetic full not started");
                retain(&self.pruner, policy, vm).await;
            }
        }
    }
}

/// A prune of `vm` with the policy's retention; a refusal (a job on the chain, a database
/// error) is logged: the next run prunes again.
async fn retain(pruner: &Pruner, policy: &Policy, vm: &str) {
    if !retention::keeps_something(&policy.retention) {
        return;
    }
    let req = PruneRequest {
        vm_name: vm.to_string(),
        retention: Some(policy.retention.clone()),
        dry_run: false,
    };
    match pruner.start(&req).await {
        Ok(Started::Job(j)) => {
            tracing::info!(%vm, policy = %policy.name, prune_id = %j.prune_id,
                steps = j.steps_total, "retention prune started after the policy's run");
        }
        Ok(Started::DryRun(_)) => {}
        Err(e @ PruneError::Busy { .. }) => {
            tracing::info!(%vm, error = %e, "retention prune deferred to the next run");
        }
        Err(e) => {
            tracing::warn!(%vm, policy = %policy.name, error = %sendense_shared::errors::chain(&e),
                "retention prune not started");
        }
    }
}
