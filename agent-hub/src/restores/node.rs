//! The node's side of a restore as the hub drives it: the start request, the watch of a node
//! gone quiet, the forwarded cancel.

use super::truth::Truth;
use super::{LiveRestore, Outcome, Restores};
use crate::events::Level;
use sendense_shared::api::{JobStatus, NodeRestoreStart};
use sendense_shared::errors::chain;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Restores {
    /// Asks the node to copy; a refusal fails the restore.
    pub(super) async fn run_on_node(&self, live: &Arc<LiveRestore>, body: NodeRestoreStart) {
        let t = Instant::now();
        match self.deps().nodes.start_restore(&live.node, &body).await {
            Ok(()) => {
                live.touch();
                self.event(
                    live,
                    Level::Info,
                    "restore_node_accepted",
                    format!(
                        "node {} accepted the restore after {} ms",
                        live.node.name,
                        t.elapsed().as_millis()
                    ),
                )
                .await;
            }
            Err(e) => {
                let cause = format!("the node did not take the restore: {}", chain(&e));
                let mut held = live.held.lock().await;
                self.finish(live, &mut held, Outcome::Failed(cause)).await;
            }
        }
    }

    /// While the restore runs, asks the node whenever it has been silent for a watch interval;
    /// a node that forgot the restore, ended it without a report or stays unreachable for
    /// `node_lost_after` fails it, so a dead node never holds a port and qemu-nbd forever.
    pub(super) async fn watch_node(&self, live: Arc<LiveRestore>) {
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
                .restore_state(&live.node, &live.id, interval.max(Duration::from_secs(2)))
                .await;
            let outcome = match asked {
                Ok(st) => {
                    unreachable_since = None;
                    match st.status {
                        // The push was lost; the node's own state says how it ended.
                        JobStatus::Completed => Some(Outcome::Completed {
                            bytes_written: st.bytes_written,
                            verified_ranges: st.verified_ranges,
                        }),
                        JobStatus::Failed | JobStatus::Cancelled => Some(Outcome::Failed(format!(
                            "node {} reports the restore {} without a completion report: {}",
                            live.node.name,
                            st.status.as_str(),
                            st.error_message.unwrap_or_else(|| "no message".into())
                        ))),
                        _ => {
                            // Alive and working, only quiet: its state is as good as a report.
                            live.touch();
                            let _ = self
                                .deps()
                                .db
                                .set_restore_progress(&live.id, st.bytes_done, st.bytes_total)
                                .await;
                            None
                        }
                    }
                }
                Err(e) if e.is_unknown_job() => Some(Outcome::Failed(format!(
                    "node {} no longer knows restore {} ({}: restarted?)",
                    live.node.name,
                    live.id,
                    chain(&e)
                ))),
                Err(e) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    let cause = chain(&e);
                    if since.elapsed() < lost_after {
                        self.event(&live, Level::Warn, "restore_node_unreachable", cause)
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
                if let Outcome::Completed { .. } = outcome {
                    // The node's state carries no checksums: say that this end was not
                    // compared rather than pass it silently.
                    let why = Truth::NotCompared(
                        "the node's completion report was lost; its state carries no \
                         whole-disk checksums"
                            .into(),
                    );
                    self.record_truth(&live, &why).await;
                }
                let mut held = live.held.lock().await;
                self.finish(&live, &mut held, outcome).await;
                return;
            }
        }
    }

    /// Tells the node to stop copying (best effort: its reads fail once the export is gone).
    /// `true` when the node took the cancel (it then reports the restore's end).
    pub(super) async fn forward_cancel(&self, live: &LiveRestore) -> bool {
        let t = Instant::now();
        let answer = self.deps().nodes.cancel_restore(&live.node, &live.id).await;
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
        self.event(live, level, "restore_node_cancel", msg).await;
        confirmed
    }

    /// After a confirmed cancel: waits, at most `node_lost_after`, for the node's report of the
    /// end, which it sends once its copy stopped and its partial image at `path` is deleted
    /// (the report finishes the restore). A node that stays silent is named with what may
    /// remain.
    pub(super) async fn await_node_end(&self, live: &LiveRestore, path: &str) {
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
            "restore_node_cancel_unreported",
            format!(
                "node {} did not report the cancelled restore's end within {} s: its partial \
                 image {path} may remain there (the node deletes it when its restore ends)",
                live.node.name,
                bound.as_secs()
            ),
        )
        .await;
    }
}
