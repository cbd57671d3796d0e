//! The end of a recovery: the one unwinding path (every qemu-nbd stopped, every port
//! released, then the terminal status), the drain on hub shutdown, and the cancel the
//! reconciler sends for recoveries a previous hub process left.

use super::{ACTIVE, Held, LiveRecovery, Outcome, Recoveries};
use crate::events::Level;
use crate::node_client::NodeAddr;
use sendense_shared::api::JobStatus;
use sendense_shared::errors::chain;
use sendense_shared::ids::BackupId;
use std::sync::Arc;

/// A recovery the start-up reconciler failed, whose node is still to be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub recovery_id: String,
    pub backup_id: BackupId,
    pub node: String,
    pub vm_name: String,
}

impl Recoveries {
    /// The hub is stopping. A running recovery is parked ([`Recoveries::park`]): its VM only
    /// pauses and the next start of the hub takes it back, so a restart (an upgrade) costs
    /// the guest nothing. Any other live recovery (preparing, cancelling) is cancelled on its
    /// node and fails with `reason`; its qemu-nbd stop and its ports are released.
    pub async fn shutdown(&self, reason: &str) {
        let live: Vec<Arc<LiveRecovery>> = self
            .inner
            .live
            .lock()
            .expect("live map")
            .values()
            .cloned()
            .collect();
        // All at once: each may wait for its node's answer to the cancel.
        futures_util::future::join_all(live.iter().map(|r| async move {
            if self
                .get(&r.id)
                .await
                .is_ok_and(|x| x.status == JobStatus::Running)
            {
                self.park(r).await;
                return;
            }
            let _ = self.forward_cancel(r).await;
            let mut held = r.held.lock().await;
            self.finish(r, &mut held, Outcome::Failed(reason.to_string()))
                .await;
        }))
        .await;
    }

    /// Stops a running recovery's exports for a hub restart, keeping its status and its ports:
    /// the VM on the node pauses on its next read of data not yet home (nothing it wrote is
    /// lost) and the next start's reconciler hands it to [`Recoveries::resume_after_restart`].
    async fn park(&self, r: &Arc<LiveRecovery>) {
        let mut held = r.held.lock().await;
        if held.finished {
            return;
        }
        // First: the supervisors must not take the stops below for crashes.
        r.ended.cancel();
        let d = self.deps();
        let mut stopped = Vec::new();
        for e in held.exports.drain(..) {
            let pid = e.server.pid();
            let rep = e.server.stop().await;
            if let Err(err) = d.db.mark_process_stopped(pid, e.port, &rep.status).await {
                tracing::error!(recovery_id = %r.id, error = %chain(&err), "cannot record qemu-nbd stop");
            }
            if let Err(err) =
                d.db.set_recovery_export(&r.id, e.disk, Some(e.port), None)
                    .await
            {
                tracing::error!(recovery_id = %r.id, error = %chain(&err), "cannot record the parked export");
            }
            stopped.push(format!(
                "disk {} (qemu-nbd pid {pid}, port {})",
                e.disk, e.port
            ));
        }
        held.ports.clear();
        held.finished = true;
        self.inner.live.lock().expect("live map").remove(&r.id);
        drop(held);
        self.event(
            r,
            Level::Warn,
            "recovery_parked",
            format!(
                "the hub stops: the exports of {} stopped, their ports kept; VM {} on node {} \
                 pauses on its next read of data not yet home and goes on once the hub runs \
                 again",
                stopped.join(", "),
                r.vm_name,
                r.node.name
            ),
            None,
        )
        .await;
    }

    /// Best effort, in the background: tells each node of `left` (recoveries the reconciler
    /// failed) to stop the VM, which has lost its exports; the answer goes into the recovery's
    /// events.
    pub fn cancel_leftovers(&self, left: Vec<Leftover>) {
        for l in left {
            let me = self.clone();
            self.deps().tasks.spawn(async move {
                let d = me.deps();
                let (level, msg) = match d.db.get_node(&l.node).await {
                    Ok(n) => match d
                        .nodes
                        .cancel_recovery(&NodeAddr::from(&n), &l.recovery_id)
                        .await
                    {
                        Ok(()) => (
                            Level::Info,
                            format!(
                                "reconciler: node {} took the cancel of VM {} (it stops the VM \
                                 and removes its overlays)",
                                l.node, l.vm_name
                            ),
                        ),
                        Err(e) => (
                            Level::Warn,
                            format!(
                                "reconciler: node {} did not take the cancel of VM {}: {}",
                                l.node,
                                l.vm_name,
                                chain(&e)
                            ),
                        ),
                    },
                    Err(e) => (
                        Level::Warn,
                        format!(
                            "reconciler: node {} of VM {} cannot be told: {}",
                            l.node,
                            l.vm_name,
                            chain(&e)
                        ),
                    ),
                };
                d.log
                    .record(
                        &l.backup_id,
                        Some(&l.recovery_id),
                        level,
                        "reconciler_recovery_cancel",
                        &msg,
                        None,
                    )
                    .await;
            });
        }
    }

    /// The one unwinding path: stops every qemu-nbd, releases every port, then writes the
    /// terminal status. Idempotent.
    pub(super) async fn finish(&self, live: &LiveRecovery, held: &mut Held, outcome: Outcome) {
        if held.finished {
            return;
        }
        // First: the supervisors must not take the stops below for crashes.
        live.ended.cancel();
        let d = self.deps();
        let id = &live.id;
        let mut released = Vec::new();
        for e in held.exports.drain(..) {
            let pid = e.server.pid();
            let rep = e.server.stop().await;
            if let Err(err) = d.db.mark_process_stopped(pid, e.port, &rep.status).await {
                tracing::error!(recovery_id = %id, error = %chain(&err), "cannot record qemu-nbd stop");
            }
            released.push(format!("qemu-nbd pid {pid} (disk {}) stopped", e.disk));
        }
        for port in held.ports.drain(..) {
            match d.ports.release_port(port).await {
                Ok(()) => released.push(format!("port {port} released")),
                Err(e) => {
                    self.event(
                        live,
                        Level::Error,
                        "recovery_ports_release_failed",
                        format!("releasing port {port} failed: {}", chain(&e)),
                        None,
                    )
                    .await
                }
            }
        }
        let cancelled_words = format!(
            "cancelled: VM {} on node {} was stopped and its overlays removed; what the guest \
             wrote since the recovery started is lost",
            live.vm_name, live.node.name
        );
        let (to, from, error, level, step, msg): (_, &[JobStatus], _, _, _, _) = match &outcome {
            // From `cancelling` too: a node that completed as the cancel came has every disk
            // home and the VM running on its own; the node's truth stands.
            Outcome::Completed => (
                JobStatus::Completed,
                &[JobStatus::Running, JobStatus::Cancelling],
                None,
                Level::Info,
                "recovery_completed",
                format!(
                    "recovery {id} completed: every disk of VM {} is home on node {}; the VM \
                     runs from its local disks and no longer reads from the hub",
                    live.vm_name, live.node.name
                ),
            ),
            Outcome::Cancelled => (
                JobStatus::Cancelled,
                &[JobStatus::Cancelling],
                Some(cancelled_words.as_str()),
                Level::Warn,
                "recovery_cancelled",
                format!("recovery {id} {cancelled_words}"),
            ),
            Outcome::Failed(cause) => (
                JobStatus::Failed,
                ACTIVE,
                Some(cause.as_str()),
                Level::Error,
                "recovery_failed",
                format!("recovery {id}: {cause}"),
            ),
        };
        let moved = d.db.transition_recovery(id, from, to, error).await;
        let (level, step, msg) = match moved {
            Ok(true) => (level, step, msg),
            // A cancel won the race against another end: the cancel stands.
            Ok(false) => match self.get(id).await.map(|r| r.status) {
                Ok(JobStatus::Cancelling) => {
                    let _ =
                        d.db.transition_recovery(
                            id,
                            &[JobStatus::Cancelling],
                            JobStatus::Cancelled,
                            None,
                        )
                        .await;
                    (
                        Level::Warn,
                        "recovery_cancelled",
                        format!("recovery {id} cancelled (then: {msg})"),
                    )
                }
                _ => (level, step, msg),
            },
            Err(e) => (
                Level::Error,
                "recovery_status_failed",
                format!(
                    "recovery {id}: cannot record its end ({msg}): {}",
                    chain(&e)
                ),
            ),
        };
        held.finished = true;
        self.inner.live.lock().expect("live map").remove(id);
        let released = if released.is_empty() {
            String::new()
        } else {
            format!("; {}", released.join(", "))
        };
        self.event(live, level, step, format!("{msg}{released}"), None)
            .await;
        self.publish(id).await;
        self.publish_resources().await;
    }
}
