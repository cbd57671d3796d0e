//! Carrying out the Policies view's actions: each call's outcome comes back as updates (a
//! notice, and what changed: the policy, the point, the runs and points re-read, the preview).

use crate::app::{Action, PolicyDetail, Update};
use crate::sse::cause;
use crate::strings;
use sendense_shared::api::{HubEvent, PruneRequest};
use sendense_shared::client::HubClient;
use std::collections::BTreeMap;

fn failed(what: &str, e: &sendense_shared::client::ClientError) -> Vec<Update> {
    vec![Update::ActionFailed {
        message: strings::notice_action_failed(what, &cause(e)),
    }]
}

/// The updates that say how `action` went.
pub(super) async fn perform(client: &HubClient, action: Action) -> Vec<Update> {
    match action {
        Action::RunPolicy { id, name } => match client.run_policy_now(&id).await {
            Ok(runs) => {
                let mut out = vec![Update::ActionDone {
                    message: strings::notice_run_started(&name, runs.len()),
                }];
                out.extend(
                    runs.into_iter()
                        .map(|run| Update::Event(HubEvent::PolicyRun { run })),
                );
                out
            }
            Err(e) => failed(&format!("Run of policy {name}"), &e),
        },
        Action::UpdatePolicy { id, request } => {
            match client.update_policy(&id, &request).await {
                Ok(policy) => {
                    let message = strings::notice_policy_updated(&policy.name, policy.enabled);
                    // The list is re-read for the stored policy (next run, queue).
                    let policies = client.policies().await.ok();
                    let mut out = vec![Update::ActionDone { message }];
                    if let Some(policies) = policies {
                        out.push(Update::Snapshot(Box::new(crate::app::Snapshot {
                            policies: Some(policies),
                            ..Default::default()
                        })));
                    }
                    out
                }
                Err(e) => failed(&format!("Update of policy {}", request.name), &e),
            }
        }
        Action::Protect { backup_id, protect } => {
            match client.set_protected(&backup_id, protect).await {
                Ok(backup) => vec![
                    Update::ActionDone {
                        message: strings::notice_protected(&backup.backup_id.0, backup.protected),
                    },
                    Update::Event(HubEvent::Backup { backup }),
                ],
                Err(e) => failed(&format!("Protection of {backup_id}"), &e),
            }
        }
        Action::PreviewPrune(vm) => {
            let req = PruneRequest {
                vm_name: vm.clone(),
                retention: None,
                dry_run: true,
            };
            match client.prune_plan(&req).await {
                Ok(plan) => vec![Update::PrunePreview(Box::new(plan))],
                Err(e) => failed(&format!("Prune preview of {vm}"), &e),
            }
        }
        Action::Prune(vm) => {
            let req = PruneRequest {
                vm_name: vm.clone(),
                retention: None,
                dry_run: false,
            };
            match client.start_prune(&req).await {
                Ok(prune) => vec![
                    Update::ActionDone {
                        message: strings::notice_prune_started(&prune.prune_id, &vm),
                    },
                    Update::Event(HubEvent::Prune { prune }),
                ],
                Err(e) => failed(&format!("Prune of {vm}"), &e),
            }
        }
        Action::LoadPolicy { id, vms } => vec![Update::PolicyDetail(Box::new(
            load(client, &id, &vms).await,
        ))],
        Action::Quit
        | Action::Start(_)
        | Action::Cancel(_)
        | Action::CancelRestore(_)
        | Action::CancelRecovery(_)
        | Action::ListFiles { .. }
        | Action::GetFiles { .. } => vec![],
    }
}

/// The runs of policy `id` and the points of `vms`, all asked at once.
async fn load(client: &HubClient, id: &str, vms: &[String]) -> PolicyDetail {
    let (runs, points) = tokio::join!(
        client.policy_runs(id),
        futures_util::future::join_all(vms.iter().map(|vm| client.vm_points(vm))),
    );
    let mut errors = Vec::new();
    let runs = runs
        .map_err(|e| errors.push(sendense_shared::errors::chain(&e)))
        .ok();
    let mut by_vm = BTreeMap::new();
    for (vm, answer) in vms.iter().zip(points) {
        match answer {
            Ok(p) => {
                by_vm.insert(vm.clone(), p);
            }
            // A VM with no record on the hub (a name the policy lists ahead of its first
            // backup) has no points: nothing to say.
            Err(e) if e.status() == Some(404) => {
                by_vm.insert(vm.clone(), Vec::new());
            }
            Err(e) => errors.push(sendense_shared::errors::chain(&e)),
        }
    }
    PolicyDetail {
        policy_id: id.to_string(),
        runs,
        points: by_vm,
        errors,
    }
}
