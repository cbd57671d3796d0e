//! Recoveries a previous hub process left `running` are taken back, not failed: failing one
//! stops a running VM on the node and loses what its guest wrote, while all the VM needs is
//! its exports again. The reconciler stopped the old qemu-nbd processes and kept the
//! recoveries' ports ([`crate::reconciler::recoveries`]); here each disk is served again on the
//! same port or socket with the same export name and client identity (the CA and the server
//! certificate live in the data directory), so the node's QEMU reconnects by itself and the
//! node resumes the paused streams; then the supervisors and the node watch run as for a
//! recovery this process started. A disk that cannot be served again fails the recovery, and
//! the node is told to stop the VM.

use super::{Held, LiveRecovery, Recoveries};
use crate::events::Level;
use crate::node_client::NodeAddr;
use sendense_shared::api::Recovery;
use sendense_shared::errors::chain;
use sendense_shared::ids::DiskKey;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

impl Recoveries {
    /// Takes back every recovery of `left` (see the module doc), in the background.
    pub fn resume_after_restart(&self, left: Vec<Recovery>) {
        for r in left {
            let me = self.clone();
            self.deps()
                .tasks
                .spawn(async move { me.resume_one(r).await });
        }
    }

    async fn resume_one(&self, r: Recovery) {
        let d = self.deps();
        let id = r.recovery_id.clone();
        let node = match d.db.get_node(&r.node).await {
            Ok(n) => NodeAddr::from(&n),
            Err(e) => {
                let why = format!(
                    "the hub restarted during the recovery and cannot find node {}: {}",
                    r.node,
                    chain(&e)
                );
                let _ = d
                    .db
                    .transition_recovery(&id, super::ACTIVE, super::JobStatus::Failed, Some(&why))
                    .await;
                return;
            }
        };
        let live = Arc::new(LiveRecovery {
            id: id.clone(),
            backup_id: r.backup_id.clone(),
            node,
            vm_name: r.vm_name.clone(),
            requested: Instant::now(),
            ended: CancellationToken::new(),
            last_report: Mutex::new(Instant::now()),
            reported: std::sync::atomic::AtomicBool::new(true),
            reports: tokio::sync::Mutex::new(()),
            held: tokio::sync::Mutex::new(Held::default()),
        });
        self.inner
            .live
            .lock()
            .expect("live map")
            .insert(id.clone(), live.clone());
        let mut held = live.held.lock().await;
        held.ports = r.disks.iter().filter_map(|k| k.nbd_port).collect();
        let mut served = Vec::new();
        for disk in &r.disks {
            let Some(port) = disk.nbd_port else {
                continue;
            };
            let server = match self.serve(&live, &mut held, disk, port).await {
                Ok(s) => s,
                Err(e) => {
                    let why = format!(
                        "the hub restarted during the recovery and could not serve disk {} \
                         again on port {port}: {}",
                        disk.disk_key,
                        chain(&e)
                    );
                    drop(held);
                    self.fail_with_node_cancel(&live, why).await;
                    return;
                }
            };
            if let Err(e) = self
                .record_export(&live, disk.disk_key, port, &server)
                .await
            {
                tracing::warn!(recovery_id = %id, error = %chain(&e), "cannot record a re-served export");
            }
            served.push(format!(
                "disk {} by qemu-nbd pid {} on port {port}",
                disk.disk_key,
                server.pid()
            ));
        }
        drop(held);
        self.event(
            &live,
            Level::Warn,
            "recovery_taken_back",
            format!(
                "the hub restarted during the recovery: {} served again (same sockets, export \
                 names and identity); VM {} on node {} reconnects and its streams resume",
                served.join(", "),
                live.vm_name,
                live.node.name
            ),
            None,
        )
        .await;
        self.publish_resources().await;
        self.publish(&id).await;
        let keys: Vec<DiskKey> = r.disks.iter().map(|k| k.disk_key).collect();
        self.supervise_exports(&live, &keys);
        let me = self.clone();
        self.deps()
            .tasks
            .spawn(async move { me.watch_node(live).await });
    }
}
