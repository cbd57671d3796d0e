//! The node's reports of a recovery: its state about once a second (streams, the VM, a
//! stall), and its end.

use super::{LiveRecovery, Outcome, Recoveries, RecoveryError};
use crate::db::DbError;
use crate::events::Level;
use sendense_shared::api::{JobStatus, NodeRecoveryState, Recovery, RecoveryCompletion};

/// Why `st` does not show every disk of `r` home (`stream` `finished`); `None` when it does.
pub(super) fn not_home(r: &Recovery, st: &NodeRecoveryState) -> Option<String> {
    for d in &r.disks {
        match st.disks.iter().find(|s| s.disk_key == d.disk_key) {
            Some(s) if s.stream == "finished" => {}
            Some(s) => {
                return Some(format!(
                    "state.disks: disk {} is {:?} ({} of {} bytes home), not finished: a \
                     recovery completes only when every disk is home",
                    d.disk_key, s.stream, s.bytes_done, s.bytes_total
                ));
            }
            None => {
                return Some(format!(
                    "state.disks: disk {} is missing: a recovery completes only when every disk \
                     is reported home",
                    d.disk_key
                ));
            }
        }
    }
    None
}

/// The report's own checks against the recovery it is about.
fn check_state(r: &Recovery, st: &NodeRecoveryState, field: &str) -> Result<(), RecoveryError> {
    let invalid = |detail| Err(RecoveryError::Invalid { detail });
    if st.recovery_id != r.recovery_id {
        return invalid(format!(
            "{field}recovery_id: {:?} is not this recovery ({})",
            st.recovery_id, r.recovery_id
        ));
    }
    for d in &st.disks {
        if !r.disks.iter().any(|x| x.disk_key == d.disk_key) {
            let has: Vec<String> = r.disks.iter().map(|x| x.disk_key.to_string()).collect();
            return invalid(format!(
                "{field}disks: disk {} is not a disk of recovery {} (it has {})",
                d.disk_key,
                r.recovery_id,
                has.join(", ")
            ));
        }
        if d.bytes_done > d.bytes_total {
            return invalid(format!(
                "{field}disks: disk {}: bytes_done {} exceeds bytes_total {}",
                d.disk_key, d.bytes_done, d.bytes_total
            ));
        }
    }
    Ok(())
}

impl Recoveries {
    /// Records a state of the node (a report, the start's answer, the watch's answer) and
    /// says in the log what changed for the operator: the VM started, a stall began or ended.
    pub(super) async fn apply_state(
        &self,
        live: &LiveRecovery,
        st: &NodeRecoveryState,
    ) -> Result<Recovery, RecoveryError> {
        let _one_at_a_time = live.reports.lock().await;
        self.apply_locked(live, st).await
    }

    /// The node's answer to the start, unless a report it pushed meanwhile (newer) was
    /// recorded already.
    pub(super) async fn apply_start_answer(
        &self,
        live: &LiveRecovery,
        st: &NodeRecoveryState,
    ) -> Result<(), RecoveryError> {
        let _one_at_a_time = live.reports.lock().await;
        if live.reported.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.apply_locked(live, st).await.map(drop)
    }

    async fn apply_locked(
        &self,
        live: &LiveRecovery,
        st: &NodeRecoveryState,
    ) -> Result<Recovery, RecoveryError> {
        let id = &live.id;
        let before = self.get(id).await?;
        check_state(&before, st, "")?;
        match self.deps().db.record_recovery_state(id, st).await {
            Ok(()) => {}
            Err(DbError::NotFound { .. }) => {
                return Err(RecoveryError::NotFound { id: id.clone() });
            }
            Err(e) => return Err(Self::db_err(id, "recording the node's state")(e)),
        }
        let after = self.get(id).await?;
        if before.qemu_pid.is_none()
            && let Some(pid) = after.qemu_pid
        {
            self.event(
                live,
                Level::Info,
                "recovery_vm_started",
                format!(
                    "VM {} runs on node {}: QEMU pid {pid}{}{}, {} ms after the request",
                    live.vm_name,
                    live.node.name,
                    after
                        .qmp_socket
                        .as_deref()
                        .map(|s| format!(", QMP {s}"))
                        .unwrap_or_default(),
                    after
                        .serial_log
                        .as_deref()
                        .map(|s| format!(", serial log {s}"))
                        .unwrap_or_default(),
                    live.requested.elapsed().as_millis()
                ),
                None,
            )
            .await;
        }
        match (&before.stalled, &after.stalled) {
            (None, Some(words)) => {
                self.event(
                    live,
                    Level::Warn,
                    "recovery_stalled",
                    format!("node {}: {words}", live.node.name),
                    None,
                )
                .await;
            }
            (Some(was), None) => {
                self.event(
                    live,
                    Level::Info,
                    "recovery_resumed",
                    format!(
                        "node {}: the stall is over (it was: {was}); VM {}",
                        live.node.name,
                        after.vm_state.as_deref().unwrap_or("state unknown")
                    ),
                    None,
                )
                .await;
            }
            // One stall, one event: its wording may change while it lasts.
            _ => {}
        }
        self.deps()
            .log
            .bus()
            .publish(sendense_shared::api::HubEvent::Recovery {
                recovery: after.clone(),
            });
        Ok(after)
    }

    /// `POST /api/v1/recoveries/{id}/progress` (node → hub).
    pub async fn progress(
        &self,
        id: &str,
        st: NodeRecoveryState,
    ) -> Result<Recovery, RecoveryError> {
        let r = self.get(id).await?;
        if r.status.is_terminal() {
            return Err(RecoveryError::WrongState {
                id: id.to_string(),
                status: r.status.as_str(),
                what: "progress is accepted only while the recovery runs",
            });
        }
        let Some(live) = self.live(id) else {
            return Err(RecoveryError::WrongState {
                id: id.to_string(),
                status: r.status.as_str(),
                what: "this hub process does not run it",
            });
        };
        live.touch();
        live.reported
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.apply_state(&live, &st).await
    }

    /// `POST /api/v1/recoveries/{id}/complete` (node → hub): the node's end of the recovery.
    pub async fn complete(
        &self,
        id: &str,
        c: RecoveryCompletion,
    ) -> Result<Recovery, RecoveryError> {
        let r = self.get(id).await?;
        check_state(&r, &c.state, "state.")?;
        if r.status.is_terminal() {
            // A repeated report (the node retrying after a timeout), or the node's end of a
            // recovery the hub ended first (a lost export, a restart, a shutdown): the VM is
            // gone either way.
            let same = match c.status {
                JobStatus::Completed => r.status == JobStatus::Completed,
                JobStatus::Failed | JobStatus::Cancelled => r.status != JobStatus::Completed,
                _ => false,
            };
            if same {
                return Ok(r);
            }
            return Err(RecoveryError::WrongState {
                id: id.to_string(),
                status: r.status.as_str(),
                what: "the recovery ended already",
            });
        }
        let outcome = match c.status {
            JobStatus::Completed => {
                if let Some(why) = not_home(&r, &c.state) {
                    return Err(RecoveryError::Invalid { detail: why });
                }
                Outcome::Completed
            }
            JobStatus::Cancelled if r.status == JobStatus::Cancelling => Outcome::Cancelled,
            JobStatus::Failed | JobStatus::Cancelled => Outcome::Failed(format!(
                "node {}: {}",
                r.node,
                c.error_message
                    .or(c.state.error_message.clone())
                    .unwrap_or_else(|| format!("recovery {}", c.status.as_str()))
            )),
            other => {
                return Err(RecoveryError::Invalid {
                    detail: format!(
                        "status: {:?} is not an end (completed, failed or cancelled)",
                        other.as_str()
                    ),
                });
            }
        };
        let Some(live) = self.live(id) else {
            return Err(RecoveryError::WrongState {
                id: id.to_string(),
                status: r.status.as_str(),
                what: "this hub process does not run it",
            });
        };
        live.touch();
        self.apply_state(&live, &c.state).await?;
        let mut held = live.held.lock().await;
        self.finish(&live, &mut held, outcome).await;
        drop(held);
        self.get(id).await
    }
}
