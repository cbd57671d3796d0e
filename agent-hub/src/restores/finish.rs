//! The end of a restore: the one unwinding path (qemu-nbd stopped, port released, then the
//! terminal status) and the drain on hub shutdown.

use super::{ACTIVE, Held, LiveRestore, Outcome, Restores};
use crate::events::Level;
use sendense_shared::api::JobStatus;
use sendense_shared::errors::chain;
use std::sync::Arc;

impl Restores {
    /// The hub is stopping: every live restore is told to the node as cancelled and fails with
    /// `reason`; their qemu-nbd stop and ports are released.
    pub async fn shutdown(&self, reason: &str) {
        let live: Vec<Arc<LiveRestore>> = self
            .inner
            .live
            .lock()
            .expect("live map")
            .values()
            .cloned()
            .collect();
        // All at once: each may wait for its node's answer to the cancel.
        futures_util::future::join_all(live.iter().map(|r| async move {
            let _ = self.forward_cancel(r).await;
            let mut held = r.held.lock().await;
            self.finish(r, &mut held, Outcome::Failed(reason.to_string()))
                .await;
        }))
        .await;
    }

    /// The one unwinding path: stops qemu-nbd, releases the port, then writes the terminal
    /// status. Idempotent.
    pub(super) async fn finish(&self, live: &LiveRestore, held: &mut Held, outcome: Outcome) {
        if held.finished {
            return;
        }
        let d = self.deps();
        let id = &live.id;
        let mut released = Vec::new();
        if let Some((server, port)) = held.server.take() {
            let pid = server.pid();
            let rep = server.stop().await;
            if let Err(e) = d.db.mark_process_stopped(pid, port, &rep.status).await {
                tracing::error!(restore_id = %id, error = %chain(&e), "cannot record qemu-nbd stop");
            }
            released.push(format!("qemu-nbd pid {pid} stopped"));
        }
        if let Some(port) = held.port.take() {
            match d.ports.release_port(port).await {
                Ok(()) => released.push(format!("port {port} released")),
                Err(e) => {
                    self.event(
                        live,
                        Level::Error,
                        "restore_ports_release_failed",
                        format!("releasing port {port} failed: {}", chain(&e)),
                    )
                    .await
                }
            }
        }
        let (to, from, error, level, step, msg): (_, &[JobStatus], _, _, _, _) = match &outcome {
            Outcome::Completed {
                bytes_written,
                verified_ranges,
            } => (
                JobStatus::Completed,
                &[JobStatus::Running],
                None,
                Level::Info,
                "restore_completed",
                format!(
                    "restore {id}: {bytes_written} bytes written into {} and verified on the node \
                     ({verified_ranges} range(s))",
                    live.node.name
                ),
            ),
            Outcome::Cancelled => (
                JobStatus::Cancelled,
                &[JobStatus::Cancelling],
                None,
                Level::Warn,
                "restore_cancelled",
                format!("restore {id} cancelled"),
            ),
            Outcome::Failed(cause) => (
                JobStatus::Failed,
                ACTIVE,
                Some(cause.as_str()),
                Level::Error,
                "restore_failed",
                format!("restore {id}: {cause}"),
            ),
        };
        let moved = d.db.transition_restore(id, from, to, error).await;
        let (level, step, msg) = match moved {
            Ok(true) => (level, step, msg),
            // A cancel won the race against a completion (or the reverse): the status that
            // won stands; say what this path saw.
            Ok(false) => {
                let now = self.get(id).await.map(|r| r.status);
                match now {
                    Ok(JobStatus::Cancelling) => {
                        let _ =
                            d.db.transition_restore(
                                id,
                                &[JobStatus::Cancelling],
                                JobStatus::Cancelled,
                                None,
                            )
                            .await;
                        (
                            Level::Warn,
                            "restore_cancelled",
                            format!("restore {id} cancelled (then: {msg})"),
                        )
                    }
                    _ => (level, step, msg),
                }
            }
            Err(e) => (
                Level::Error,
                "restore_status_failed",
                format!("restore {id}: cannot record its end ({msg}): {}", chain(&e)),
            ),
        };
        held.finished = true;
        live.ended.cancel();
        self.inner.live.lock().expect("live map").remove(id);
        let released = if released.is_empty() {
            String::new()
        } else {
            format!("; {}", released.join(", "))
        };
        self.event(live, level, step, format!("{msg}{released}"))
            .await;
        self.publish(id).await;
        self.publish_resources().await;
    }
}
