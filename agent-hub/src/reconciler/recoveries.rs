//! Instant recoveries a previous hub process left active. A running one whose every export has
//! a port recorded is taken back ([`crate::recoveries`]'s `resume`: its ports are kept, its
//! disks served again). Any other (preparing, cancelling): its exports died with it (the
//! qemu-nbd processes pass 1 stops, the ports pass 3 releases), so the recovered VM on the
//! node is paused on its first read of data not yet home. Each is failed saying so; the node
//! is told to stop the VM afterwards, in the background ([`crate::recoveries::Recoveries::
//! cancel_leftovers`]), since a node that does not answer must not hold up the start.

use super::Report;
use crate::db::Db;
use crate::events::{JobLog, Level};
use crate::recoveries::finish::Leftover;
use sendense_shared::api::JobStatus;
use sendense_shared::errors::chain;

/// The reason written into a recovery the reconciler ends.
pub fn restart_reason(node: &str) -> String {
    format!(
        "hub restarted during the recovery: its exports are gone; the recovered VM on node \
         {node} is paused and must be cancelled or recovered again"
    )
}

pub(super) async fn fail_active(db: &Db, log: &JobLog, rep: &mut Report) {
    let active = match db.list_recoveries_in(crate::recoveries::ACTIVE).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %chain(&e), "reconciler: cannot list active recoveries");
            rep.errors.push(chain(&e));
            return;
        }
    };
    for r in active {
        // Running with every export's port recorded: the hub serves it again at once.
        if r.status == JobStatus::Running
            && !r.disks.is_empty()
            && r.disks.iter().all(|d| d.nbd_port.is_some())
        {
            log.record(
                &r.backup_id,
                Some(&r.recovery_id),
                Level::Warn,
                "reconciler_recovery",
                &format!(
                    "reconciler: recovery {} (VM {} on node {}) was running: its ports are kept \
                     and its disks served again once the hub runs",
                    r.recovery_id, r.vm_name, r.node
                ),
                None,
            )
            .await;
            rep.recoveries_resumed.push(r);
            continue;
        }
        let reason = format!("{} (it was {})", restart_reason(&r.node), r.status.as_str());
        match db
            .transition_recovery(
                &r.recovery_id,
                crate::recoveries::ACTIVE,
                JobStatus::Failed,
                Some(&reason),
            )
            .await
        {
            Ok(_) => {
                rep.recoveries_failed += 1;
                log.record(
                    &r.backup_id,
                    Some(&r.recovery_id),
                    Level::Error,
                    "reconciler_recovery",
                    &format!(
                        "reconciler: recovery {} (VM {} on node {}) marked failed: {reason}",
                        r.recovery_id, r.vm_name, r.node
                    ),
                    None,
                )
                .await;
                rep.recoveries_left.push(Leftover {
                    recovery_id: r.recovery_id,
                    backup_id: r.backup_id,
                    node: r.node,
                    vm_name: r.vm_name,
                });
            }
            Err(e) => rep.errors.push(chain(&e)),
        }
    }
}
