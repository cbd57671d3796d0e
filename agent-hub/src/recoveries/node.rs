//! The node's side of a recovery as the hub drives it: the start request, the watch of a node
//! gone quiet, the forwarded cancel.

use super::{LiveRecovery, Outcome, Recoveries, RecoveryError};
use crate::events::Level;
use crate::node_client::NodeCallError;
use sendense_shared::api::{JobStatus, NodeRecoveryStart};
use sendense_shared::errors::chain;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Recoveries {
    /// Asks the node to start the VM; its answer is the first state. A refusal fails the
    /// recovery (its exports stop) and is answered.
    pub(super) async fn start_on_node(
        &self,
        live: &Arc<LiveRecovery>,
        body: &NodeRecoveryStart,
    ) -> Result<(), RecoveryError> {
        let t = Instant::now();
        match self.deps().nodes.start_recovery(&live.node, body).await {
            Ok(st) => {
                live.touch();
                self.event(
                    live,
                    Level::Info,
                    "recovery_node_accepted",
                    format!(
                        "node {} took the recovery after {} ms (VM {} {})",
                        live.node.name,
                        t.elapsed().as_millis(),
                        live.vm_name,
                        st.vm_state.as_deref().unwrap_or("starting")
                    ),
                    None,
                )
                .await;
                if let Err(e) = self.apply_start_answer(live, &st).await {
                    self.event(
                        live,
                        Level::Warn,
                        "recovery_node_state_refused",
                        format!("the node's first state was not recorded: {}", chain(&e)),
                        None,
                    )
                    .await;
                }
                Ok(())
            }
            Err(e) => {
                let cause = format!(
                    "node {} did not start VM {}: {}",
                    live.node.name,
                    live.vm_name,
                    chain(&e)
                );
                {
                    let mut held = live.held.lock().await;
                    self.finish(live, &mut held, Outcome::Failed(cause)).await;
                }
                // No answer is not a refusal: the node may have started the VM, which can no
                // longer read its disks.
                if !matches!(e, NodeCallError::Refused { .. }) {
                    let me = self.clone();
                    let live = live.clone();
                    self.deps().tasks.spawn(async move {
                        me.forward_cancel(&live).await;
                    });
                }
                Err(RecoveryError::NodeRefused {
                    id: live.id.clone(),
                    source: Box::new(e),
                })
            }
        }
    }

    /// While the recovery runs, asks the node whenever it has been silent for a watch interval;
    /// a node that forgot the recovery, ended it without a report or stays unreachable for
    /// `node_lost_after` fails it, so a dead node never holds ports and qemu-nbd forever.
    pub(super) async fn watch_node(&self, live: Arc<LiveRecovery>) {
        let interval = self.deps().node_watch_interval;
        let lost_after = self.deps().node_lost_after;
        let mut unreachable_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = live.ended.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            if live.since_last_report() < interval {
                unreachable_since = None;
                continue;
            }
            let asked = self
                .deps()
                .nodes
                .recovery_state(&live.node, &live.id, interval.max(Duration::from_secs(2)))
                .await;
            let outcome = match asked {
                Ok(st) => {
                    unreachable_since = None;
                    live.touch();
                    let now = self.apply_state(&live, &st).await;
                    match (st.status, now) {
                        // The push was lost; the node's own state says how it ended.
                        (JobStatus::Completed, Ok(r)) => match super::reports::not_home(&r, &st) {
                            None => Some(Outcome::Completed),
                            Some(why) => {
                                self.event(&live, Level::Warn, "recovery_node_state", why, None)
                                    .await;
                                None
                            }
                        },
                        (JobStatus::Cancelled, Ok(r)) if r.status == JobStatus::Cancelling => {
                            Some(Outcome::Cancelled)
                        }
                        (JobStatus::Failed | JobStatus::Cancelled, _) => {
                            Some(Outcome::Failed(format!(
                                "node {} reports the recovery {} without a completion report: {}",
                                live.node.name,
                                st.status.as_str(),
                                st.error_message.as_deref().unwrap_or("no message")
                            )))
                        }
                        // Alive and working, only quiet: its state is as good as a report.
                        _ => None,
                    }
                }
                Err(e) if e.is_unknown_job() => Some(Outcome::Failed(format!(
                    "node {} no longer knows recovery {} ({}: restarted?)",
                    live.node.name,
                    live.id,
                    chain(&e)
                ))),
                Err(e) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    let cause = chain(&e);
                    if since.elapsed() < lost_after {
                        self.event(&live, Level::Warn, "recovery_node_unreachable", cause, None)
                            .await;
                        None
                    } else {
                        Some(Outcome::Failed(format!(
                            "node {} lost: no good answer for {} s ({cause})",
                            live.node.name,
                            since.elapsed().as_secs()
                        )))
                    }
                }
            };
            if let Some(outcome) = outcome {
                let mut held = live.held.lock().await;
                self.finish(&live, &mut held, outcome).await;
                return;
            }
        }
    }

    /// Tells the node to stop the VM and remove its overlays (best effort: without its exports
    /// the VM cannot read what is not home anyway). `true` when the node took the cancel (it
    /// then reports the recovery's end).
    pub(super) async fn forward_cancel(&self, live: &LiveRecovery) -> bool {
        let t = Instant::now();
        let answer = self
            .deps()
            .nodes
            .cancel_recovery(&live.node, &live.id)
            .await;
        let confirmed = answer.is_ok();
        let (level, msg) = match answer {
            Ok(()) => (
                Level::Info,
                format!(
                    "node {} confirmed the cancel after {} ms",
                    live.node.name,
                    t.elapsed().as_millis()
                ),
            ),
            Err(e) => (
                Level::Warn,
                format!("the node did not confirm the cancel: {}", chain(&e)),
            ),
        };
        self.event(live, level, "recovery_node_cancel", msg, None)
            .await;
        confirmed
    }

    /// After a confirmed cancel: waits, at most `node_lost_after`, for the node's report of the
    /// end, which it sends once the VM stopped and its overlays are removed (the report
    /// finishes the recovery). A node that stays silent is named with what may remain.
    pub(super) async fn await_node_end(&self, live: &LiveRecovery) {
        let bound = self.deps().node_lost_after;
        if tokio::time::timeout(bound, live.ended.cancelled())
            .await
            .is_ok()
        {
            return;
        }
        self.event(
            live,
            Level::Warn,
            "recovery_node_cancel_unreported",
            format!(
                "node {} did not report the cancelled recovery's end within {} s: VM {} and its \
                 overlays may remain there (the node removes them when its recovery ends)",
                live.node.name,
                bound.as_secs(),
                live.vm_name
            ),
            None,
        )
        .await;
    }
}
