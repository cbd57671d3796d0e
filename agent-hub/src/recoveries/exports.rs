//! A recovery's exports: one read-only qemu-nbd per disk, and their supervision.
//!
//! The recovered VM reads every block it has not pulled home yet from these exports, for as
//! long as the streams run (minutes to hours). A qemu-nbd that exits (a crash, the OOM killer,
//! an operator's `kill`) would leave the VM paused on an I/O error for good, so each export is
//! watched: once it exits it is started again with the very spec it had (same port or unix
//! socket, same export name, same TLS client identity), so the node's QEMU, whose NBD client
//! reconnects by itself (`reconnect-delay`), finds it where it was with the certificate it
//! holds. The new PID replaces the old one in the process records and the recovery's disk,
//! and `export_restarted` names the disk and both PIDs.
//!
//! Bounded: at most [`RestartPolicy::max_in_a_row`] restarts in a row, with a doubling pause
//! between attempts; an export that then stays up for [`RestartPolicy::stable_after`] starts
//! a new count. Past the bound the recovery fails, naming the disk and the last cause (an
//! image that vanished, a port a foreign process took), and the node is told to stop the VM.

use super::{Export, Held, LiveRecovery, Outcome, Recoveries, RecoveryError};
use crate::events::Level;
use crate::qemu_nbd::{ExportSpec, QemuNbd};
use sendense_shared::api::{NodeRecoveryDisk, ProcessInfo, Recovery};
use sendense_shared::errors::chain;
use sendense_shared::ids::{DiskKey, NbdPort};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a lost export is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts in a row (without a stable period between them) before the recovery fails.
    pub max_in_a_row: u32,
    /// The pause before the first attempt; doubled for each further one.
    pub first_pause: Duration,
    pub max_pause: Duration,
    /// An export up this long has recovered: the count starts again.
    pub stable_after: Duration,
    /// The recovery fails only once the export has been lost this long too (and
    /// `max_in_a_row` attempts failed): failing it stops a running VM, whose writes are lost,
    /// so a repository that is away for a while (a remount, an NFS hiccup) only pauses it.
    pub give_up_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_in_a_row: 5,
            first_pause: Duration::from_millis(200),
            max_pause: Duration::from_secs(10),
            stable_after: Duration::from_secs(60),
            give_up_after: Duration::from_secs(1800),
        }
    }
}

impl RestartPolicy {
    fn pause(&self, attempt: u32) -> Duration {
        self.first_pause
            .saturating_mul(1 << attempt.min(16))
            .min(self.max_pause)
    }
}

impl Recoveries {
    /// Ports, one qemu-nbd per disk and their records, then `running`; answers what the node
    /// is to read, in guest order.
    pub(super) async fn export(
        &self,
        live: &LiveRecovery,
        held: &mut Held,
        row: &Recovery,
    ) -> Result<Vec<NodeRecoveryDisk>, RecoveryError> {
        let d = self.deps();
        let id = &live.id;
        let keys: Vec<DiskKey> = row.disks.iter().map(|d| d.disk_key).collect();
        let ports = d
            .ports
            .allocate(&live.backup_id, &keys)
            .await
            .map_err(|source| RecoveryError::Ports {
                id: id.clone(),
                source: Box::new(source),
            })?;
        held.ports = ports.iter().map(|(_, p)| *p).collect();
        let mut out = Vec::with_capacity(row.disks.len());
        let mut served = Vec::with_capacity(row.disks.len());
        for (disk, (_, port)) in row.disks.iter().zip(&ports) {
            let export_err = |source| RecoveryError::Export {
                id: id.clone(),
                disk: disk.disk_key,
                source: Box::new(source),
            };
            let server = self
                .serve(live, held, disk, *port)
                .await
                .map_err(export_err)?;
            let mut export = server.nbd_export();
            export.tls = server
                .client_tls(d.qemu_nbd.tls.as_ref())
                .map_err(export_err)?;
            self.record_export(live, disk.disk_key, *port, &server)
                .await?;
            served.push(format!(
                "disk {} ({}) by qemu-nbd pid {} on port {} as export {export}",
                disk.disk_key,
                disk.source_qcow2,
                server.pid(),
                port
            ));
            out.push(NodeRecoveryDisk {
                disk_key: disk.disk_key,
                export,
                size_bytes: disk.bytes_total,
            });
        }
        self.publish_resources().await;
        if !d
            .db
            .transition_recovery(
                id,
                &[sendense_shared::api::JobStatus::Preparing],
                sendense_shared::api::JobStatus::Running,
                None,
            )
            .await
            .map_err(Self::db_err(id, "moving to running"))?
        {
            return Err(RecoveryError::WrongState {
                id: id.clone(),
                status: "cancelling",
                what: "cancelled while the exports were prepared",
            });
        }
        self.publish(id).await;
        self.event(
            live,
            Level::Info,
            "recovery_started",
            format!(
                "recovery {id}: served read-only: {}; node {} starts VM {}",
                served.join("; "),
                live.node.name,
                live.vm_name
            ),
            None,
        )
        .await;
        Ok(out)
    }

    /// Starts disk `disk`'s read-only qemu-nbd on `port` (its socket follows from the port) with
    /// the recovery's client identity, and holds it: the one spec of a recovery's export, for
    /// its start and for serving it again after a hub restart.
    pub(super) async fn serve(
        &self,
        live: &LiveRecovery,
        held: &mut Held,
        disk: &sendense_shared::api::RecoveryDisk,
        port: NbdPort,
    ) -> Result<QemuNbd, crate::qemu_nbd::QemuNbdError> {
        let spec = ExportSpec {
            qcow2_path: disk.source_qcow2.clone().into(),
            export_name: disk.nbd_export_name.clone(),
            port: port.0,
            read_only: true,
            socket: None,
            client: Some(crate::nbd_ca::recovery_identity(&live.id)),
        };
        let server = QemuNbd::start(&self.deps().qemu_nbd, spec).await?;
        held.exports.push(Export {
            disk: disk.disk_key,
            port,
            server: server.clone(),
        });
        Ok(server)
    }

    /// The process record and the disk's port and PID of a started export.
    pub(super) async fn record_export(
        &self,
        live: &LiveRecovery,
        disk: DiskKey,
        port: NbdPort,
        server: &QemuNbd,
    ) -> Result<(), RecoveryError> {
        let db = &self.deps().db;
        let spec = server.spec();
        db.record_process(
            &ProcessInfo {
                pid: server.pid(),
                port,
                export_name: spec.export_name.clone(),
                qcow2_path: spec.qcow2_path.display().to_string(),
                backup_id: live.backup_id.clone(),
                disk_key: disk,
                alive: true,
                started_at: server.started_at(),
            },
            &sendense_shared::child::shell_words(server.command_line()),
        )
        .await
        .map_err(Self::db_err(&live.id, "recording the qemu-nbd process"))?;
        db.set_recovery_export(&live.id, disk, Some(port), Some(server.pid()))
            .await
            .map_err(Self::db_err(&live.id, "recording the disk's export"))
    }

    /// One supervisor per export, until the recovery ends.
    pub(super) fn supervise_exports(&self, live: &Arc<LiveRecovery>, disks: &[DiskKey]) {
        for &disk in disks {
            let me = self.clone();
            let live = live.clone();
            self.deps()
                .tasks
                .spawn(async move { me.supervise(&live, disk).await });
        }
    }

    /// Watches disk `disk`'s qemu-nbd and starts it again when it exits (see the module doc).
    async fn supervise(&self, live: &Arc<LiveRecovery>, disk: DiskKey) {
        let policy = self.deps().restarts;
        let mut in_a_row = 0u32;
        let mut lost_at: Option<Instant> = None;
        loop {
            let (server, port) = {
                let mut held = live.held.lock().await;
                if held.finished {
                    return;
                }
                match held.export_mut(disk) {
                    Some(e) => (e.server.clone(), e.port),
                    None => return,
                }
            };
            let up_since = Instant::now();
            let mut exits = server.exit_watch();
            let report = tokio::select! {
                biased;
                _ = live.ended.cancelled() => return,
                r = exits.wait_for(Option::is_some) => match r {
                    Ok(r) => r.clone().expect("waited for Some"),
                    Err(_) => return,
                },
            };
            if report.requested {
                // Our own stop: the recovery is ending.
                return;
            }
            if up_since.elapsed() >= policy.stable_after {
                in_a_row = 0;
                lost_at = None;
            }
            let lost_at = *lost_at.get_or_insert_with(Instant::now);
            let old_pid = server.pid();
            if let Err(e) = self
                .deps()
                .db
                .mark_process_stopped(old_pid, port, &report.status)
                .await
            {
                tracing::warn!(recovery_id = %live.id, error = %chain(&e), "cannot record a lost qemu-nbd");
            }
            let mut cause = report.to_string();
            self.event(
                live,
                Level::Warn,
                "export_lost",
                format!(
                    "disk {disk}: qemu-nbd pid {old_pid} (port {port}) exited: {cause}; the VM's \
                     reads of data not yet home wait for it; starting it again where it was \
                     (same port or socket, export name and client identity)"
                ),
                Some(disk),
            )
            .await;
            self.publish_resources().await;
            loop {
                if in_a_row >= policy.max_in_a_row && lost_at.elapsed() >= policy.give_up_after {
                    let why = format!(
                        "disk {disk}: its export (qemu-nbd on port {port}) could not be kept up \
                         after {in_a_row} restart attempt(s) in a row over {} s; last: {cause}",
                        lost_at.elapsed().as_secs()
                    );
                    self.fail_with_node_cancel(live, why).await;
                    return;
                }
                let pause = policy.pause(in_a_row);
                in_a_row += 1;
                tokio::select! {
                    _ = live.ended.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                let mut held = live.held.lock().await;
                if held.finished {
                    return;
                }
                match self.restart(live, &mut held, disk, &server).await {
                    Ok(new_pid) => {
                        drop(held);
                        let where_ = match &server.spec().socket {
                            Some(s) => format!("socket {}", s.display()),
                            None => format!("port {port}"),
                        };
                        self.event(
                            live,
                            Level::Warn,
                            "export_restarted",
                            format!(
                                "disk {disk}: qemu-nbd pid {old_pid} exited ({}); restarted as \
                                 pid {new_pid} on {where_}, export {}, the same client \
                                 identity (restart {in_a_row} of at most {} in a row); the \
                                 node's QEMU reconnects by itself",
                                report.status,
                                server.spec().export_name,
                                policy.max_in_a_row
                            ),
                            Some(disk),
                        )
                        .await;
                        self.publish_resources().await;
                        break;
                    }
                    Err(e) => {
                        drop(held);
                        cause = e;
                        self.event(
                            live,
                            Level::Warn,
                            "export_restart_failed",
                            format!(
                                "disk {disk}: starting qemu-nbd again on port {port} failed \
                                 (attempt {in_a_row}): {cause}"
                            ),
                            Some(disk),
                        )
                        .await;
                    }
                }
            }
        }
    }

    /// Starts `old`'s spec again and puts it in `held`; answers the new PID or the cause.
    async fn restart(
        &self,
        live: &LiveRecovery,
        held: &mut Held,
        disk: DiskKey,
        old: &QemuNbd,
    ) -> Result<u32, String> {
        let spec: ExportSpec = old.spec().clone();
        let new = QemuNbd::start(&self.deps().qemu_nbd, spec)
            .await
            .map_err(|e| chain(&e))?;
        let Some(slot) = held.export_mut(disk) else {
            new.stop().await;
            return Err("the export is no longer held".into());
        };
        slot.server = new.clone();
        let port = slot.port;
        if let Err(e) = self.record_export(live, disk, port, &new).await {
            // It serves (and `finish` stops it); only its record is behind.
            tracing::warn!(recovery_id = %live.id, error = %chain(&e), "cannot record a restarted qemu-nbd");
        }
        Ok(new.pid())
    }

    /// Fails the recovery from inside (an export that cannot be kept up), then tells the node
    /// to stop the VM that can no longer read its disks.
    pub(super) async fn fail_with_node_cancel(&self, live: &Arc<LiveRecovery>, why: String) {
        {
            let mut held = live.held.lock().await;
            self.finish(live, &mut held, Outcome::Failed(why)).await;
        }
        let _ = self.forward_cancel(live).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_bound() {
        let p = RestartPolicy::default();
        let got: Vec<u128> = (0..7).map(|a| p.pause(a).as_millis()).collect();
        assert_eq!(got, [200, 400, 800, 1600, 3200, 6400, 10000]);
    }
}
