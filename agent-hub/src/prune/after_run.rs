//! What a policy does after each completed backup of a VM ([`crate::policies::AfterRun`]):
//! first a synthetic full when the policy's chain limit says `synthetic` and the chain is
//! longer than `max_chain_length`, then a prune with the policy's retention (when it has a keep
//! rule). Both are ordinary prune jobs (journal, events, cancel); one waits for the other, as
//! two jobs never work on one chain at once.
//!
//! The retention prune is created before the hook returns (a run's completion is followed by
//! its prune job, visible in `GET /api/v1/prune`); after a synthetic full it is started once
//! that job ended, from a task of the hub's tracker.

use super::{PruneError, Pruner, Started};
use crate::policies::AfterRun;
use crate::retention;
use sendense_shared::api::{Backup, ChainLimit, Policy, PruneRequest};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// The prune engine as the policies' after-run hook.
pub struct PruneAfterRun {
    pub pruner: Pruner,
}

/// How often a waiting retention prune looks whether the synthetic full ended.
const POLL: Duration = Duration::from_millis(500);

impl AfterRun for PruneAfterRun {
    fn after_backup<'a>(
        &'a self,
        policy: &'a Policy,
        backup: &'a Backup,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move { self.after(policy, &backup.vm_name).await })
    }
}

impl PruneAfterRun {
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
