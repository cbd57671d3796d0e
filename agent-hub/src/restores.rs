//! Restores: a backup point served read-only to a node, which writes it into a new image.
//!
//! `POST /api/v1/restores {"backup_id","disk_key"?,"target":{"node","path"}}`:
//! 1. the backup must be `completed` (verified): a failed or cancelled backup has no images
//!    and is never offered; the disk's QCOW2 (with its backing chain) must be on disk;
//! 2. one NBD port from the same allocator as backups (the allocation is recorded under the
//!    backup's id, so `GET /api/v1/ports` shows which backup point is being served);
//! 3. one `qemu-nbd --read-only` on that image (recorded like a backup's, so the start-up
//!    reconciler stops it after a crash);
//! 4. the node is asked to copy it (`POST /api/v1/restore/start` of the node) into
//!    `target.path`, a new QCOW2 it creates; the hub follows the node's progress
//!    (`GET /api/v1/restore/{id}`, every 250 ms), the node verifies the new image against the
//!    checksums of what it read;
//! 5. qemu-nbd stopped, port released, restore `completed` or `failed` (the node deletes a
//!    partial image).
//!
//! Each step is also an event of the backup's event log (`restore_*`). One restore per backup
//! at a time. Restores live in this hub process's memory: after a hub restart the list is empty
//! (their qemu-nbd and ports are cleaned up by the reconciler like a backup's).

use crate::db::DbError;
use crate::jobs::Level;
use crate::ports::PortError;
use crate::qemu_nbd::{ExportSpec, QemuNbd};
use crate::server::Hub;
use sendense_shared::api::{
    JobStatus, NodeRestoreStart, NodeRestoreState, ProcessInfo, Restore, RestoreRequest,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A node silent this long fails the restore.
const NODE_LOST_AFTER: Duration = Duration::from_secs(30);
const POLL_EVERY: Duration = Duration::from_millis(250);

/// Why a restore was refused.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{detail}")]
    Invalid { detail: String },
    #[error("no backup with id {id}")]
    BackupNotFound { id: String },
    #[error("no node named {node:?} is registered (GET /api/v1/nodes lists them)")]
    NodeNotFound { node: String },
    #[error("no restore with id {id}")]
    NotFound { id: String },
    #[error("backup {id} is {status}: only a completed (verified) backup can be restored")]
    NotRestorable { id: String, status: &'static str },
    #[error("backup {id} is being restored already by {restore_id}; wait for it")]
    Busy { id: String, restore_id: String },
    #[error("image {path} of backup {id} is missing")]
    ImageMissing { id: String, path: String },
    #[error("{0}")]
    Ports(String),
    #[error("serving the backup point failed: {0}")]
    Export(String),
    #[error("database")]
    Db(#[from] DbError),
}

/// The restores of this hub process.
#[derive(Default)]
pub struct Restores {
    map: Mutex<HashMap<String, Restore>>,
}

impl Restores {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Restore>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Result<Restore, RestoreError> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| RestoreError::NotFound { id: id.to_string() })
    }

    /// Newest first.
    pub fn list(&self) -> Vec<Restore> {
        let mut v: Vec<Restore> = self.lock().values().cloned().collect();
        v.sort_by_key(|r| std::cmp::Reverse(r.created_at));
        v
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Restore)) {
        if let Some(r) = self.lock().get_mut(id) {
            f(r);
        }
    }
}

fn check_target_path(p: &str) -> Result<(), RestoreError> {
    let path = Path::new(p);
    let bad = |why: &str| {
        Err(RestoreError::Invalid {
            detail: format!("target.path: {p:?} {why}"),
        })
    };
    if !path.is_absolute() {
        return bad("must be an absolute path on the node");
    }
    if p.contains('\0')
        || path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return bad("must not contain .. or NUL");
    }
    if path.extension().and_then(|e| e.to_str()) != Some("qcow2") {
        return bad("must end in .qcow2 (the node writes a new QCOW2 image)");
    }
    Ok(())
}

/// Checks the request, exports the backup point and starts the node's copy; answers the
/// restore `running`.
pub async fn start(hub: &Arc<Hub>, req: RestoreRequest) -> Result<Restore, RestoreError> {
    sendense_shared::names::validate_name("target.node", &req.target.node).map_err(|e| {
        RestoreError::Invalid {
            detail: e.to_string(),
        }
    })?;
    check_target_path(&req.target.path)?;
    let backup = match hub.db.get_backup(&req.backup_id).await {
        Ok(b) => b,
        Err(DbError::NotFound { .. }) => {
            return Err(RestoreError::BackupNotFound {
                id: req.backup_id.0,
            });
        }
        Err(e) => return Err(e.into()),
    };
    if backup.status != JobStatus::Completed {
        return Err(RestoreError::NotRestorable {
            id: req.backup_id.0,
            status: backup.status.as_str(),
        });
    }
    let disk = match req.disk_key {
        Some(k) => backup
            .disk_results
            .iter()
            .find(|d| d.disk_key == k)
            .ok_or_else(|| RestoreError::Invalid {
                detail: format!(
                    "disk_key: backup {} has no disk {k} (it has {})",
                    backup.backup_id,
                    keys(&backup)
                ),
            })?,
        None if backup.disk_results.len() == 1 => &backup.disk_results[0],
        None => {
            return Err(RestoreError::Invalid {
                detail: format!(
                    "disk_key: backup {} has {} disks ({}); name the one to restore",
                    backup.backup_id,
                    backup.disk_results.len(),
                    keys(&backup)
                ),
            });
        }
    }
    .clone();
    if !Path::new(&disk.qcow2_path).is_file() {
        return Err(RestoreError::ImageMissing {
            id: backup.backup_id.0.clone(),
            path: disk.qcow2_path.clone(),
        });
    }
    let node = match hub.db.get_node(&req.target.node).await {
        Ok(n) => n,
        Err(DbError::NotFound { .. }) => {
            return Err(RestoreError::NodeNotFound {
                node: req.target.node,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let restore_id = uuid::Uuid::new_v4().to_string();
    let export_name = format!("restore-{}", &restore_id[..8]);
    {
        // Reserve the backup for this restore before any await can let a second one in.
        let mut map = hub.restores.lock();
        if let Some(busy) = map
            .values()
            .find(|r| r.backup_id == backup.backup_id && !r.status.is_terminal())
        {
            return Err(RestoreError::Busy {
                id: backup.backup_id.0.clone(),
                restore_id: busy.restore_id.clone(),
            });
        }
        map.insert(
            restore_id.clone(),
            Restore {
                restore_id: restore_id.clone(),
                backup_id: backup.backup_id.clone(),
                vm_name: backup.vm_name.clone(),
                disk_key: disk.disk_key,
                target: req.target.clone(),
                status: JobStatus::Preparing,
                source_qcow2: disk.qcow2_path.clone(),
                nbd_port: None,
                nbd_export_name: export_name.clone(),
                bytes_done: 0,
                bytes_total: disk.bytes_total,
                created_at: chrono::Utc::now(),
                completed_at: None,
                error_message: None,
            },
        );
    }
    let fail_early = |e: RestoreError| {
        hub.restores.update(&restore_id, |r| {
            r.status = JobStatus::Failed;
            r.error_message = Some(e.to_string());
            r.completed_at = Some(chrono::Utc::now());
        });
        e
    };
    let ports = match hub
        .ports
        .allocate(&backup.backup_id, &[disk.disk_key])
        .await
    {
        Ok(p) => p,
        Err(e @ PortError::Exhausted { .. }) => {
            return Err(fail_early(RestoreError::Ports(e.to_string())));
        }
        Err(e) => return Err(fail_early(RestoreError::Ports(e.to_string()))),
    };
    let port = ports[0].1;
    let spec = ExportSpec {
        qcow2_path: disk.qcow2_path.clone().into(),
        export_name: export_name.clone(),
        port: port.0,
        read_only: true,
    };
    let server = match QemuNbd::start(&hub.config.qemu_nbd, spec).await {
        Ok(s) => s,
        Err(e) => {
            let _ = hub.ports.release_port(port).await;
            return Err(fail_early(RestoreError::Export(e.to_string())));
        }
    };
    let cmdline = sendense_shared::child::shell_words(server.command_line());
    if let Err(e) = hub
        .db
        .record_process(
            &ProcessInfo {
                pid: server.pid(),
                port,
                export_name: export_name.clone(),
                qcow2_path: disk.qcow2_path.clone(),
                backup_id: backup.backup_id.clone(),
                disk_key: disk.disk_key,
                alive: true,
                started_at: server.started_at(),
            },
            &cmdline,
        )
        .await
    {
        server.stop().await;
        let _ = hub.ports.release_port(port).await;
        return Err(fail_early(e.into()));
    }
    hub.jobs
        .event(
            &backup.backup_id,
            Level::Info,
            "restore_started",
            format!(
                "restore {restore_id}: disk {} ({}) served read-only by qemu-nbd pid {} on port \
                 {port} as export {export_name}; node {} writes it into {}",
                disk.disk_key,
                disk.qcow2_path,
                server.pid(),
                node.name,
                req.target.path
            ),
            Some(disk.disk_key),
        )
        .await;
    hub.restores.update(&restore_id, |r| {
        r.status = JobStatus::Running;
        r.nbd_port = Some(port);
    });
    let source = format!(
        "nbd://{}:{}/{export_name}",
        hub.config.qemu_nbd.bind, port.0
    );
    let h = hub.clone();
    let id = restore_id.clone();
    let body = NodeRestoreStart {
        restore_id: restore_id.clone(),
        source,
        source_export: None,
        path: req.target.path.clone(),
        size_bytes: disk.bytes_total,
    };
    hub.tasks.spawn(async move {
        let outcome = drive(&h, &id, &node.api_url, &body).await;
        let pid = server.pid();
        let rep = server.stop().await;
        let _ = h.db.mark_process_stopped(pid, port, &rep.status).await;
        let _ = h.ports.release_port(port).await;
        let r = h.restores.get(&id).ok();
        let (level, step, msg) = match &outcome {
            Ok(st) => (
                Level::Info,
                "restore_completed",
                format!(
                    "restore {id}: {} bytes written into {} and verified on the node ({} \
                     range(s)); qemu-nbd pid {pid} stopped, port {port} released",
                    st.bytes_written, st.path, st.verified_ranges
                ),
            ),
            Err(e) => (
                Level::Error,
                "restore_failed",
                format!("restore {id}: {e}; qemu-nbd pid {pid} stopped, port {port} released"),
            ),
        };
        if let Some(r) = r {
            h.jobs
                .event(&r.backup_id, level, step, msg, Some(r.disk_key))
                .await;
        }
        h.restores.update(&id, |r| {
            r.nbd_port = None;
            r.completed_at = Some(chrono::Utc::now());
            match outcome {
                Ok(st) => {
                    r.status = JobStatus::Completed;
                    r.bytes_done = st.bytes_total;
                }
                Err(e) => {
                    r.status = JobStatus::Failed;
                    r.error_message = Some(e);
                }
            }
        });
    });
    hub.restores.get(&restore_id)
}

fn keys(b: &sendense_shared::api::Backup) -> String {
    b.disk_results
        .iter()
        .map(|d| d.disk_key.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Starts the node's copy and follows it to its end.
async fn drive(
    hub: &Hub,
    id: &str,
    api_url: &str,
    body: &NodeRestoreStart,
) -> Result<NodeRestoreState, String> {
    let base = api_url.trim_end_matches('/');
    let url = format!("{base}/api/v1/restore/start");
    let r = hub
        .http
        .post(&url)
        .bearer_auth(hub.token.as_str())
        .json(body)
        .send()
        .await
        .map_err(|e| format!("node unreachable: POST {url}: {e}"))?;
    if !r.status().is_success() {
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        return Err(format!(
            "node refused the restore: POST {url} answered HTTP {status}: {}",
            text.chars().take(500).collect::<String>()
        ));
    }
    let url = format!("{base}/api/v1/restore/{id}");
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        let answer = hub
            .http
            .get(&url)
            .bearer_auth(hub.token.as_str())
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let st = match answer {
            Ok(r) if r.status().is_success() => r.json::<NodeRestoreState>().await.ok(),
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                return Err(format!(
                    "node no longer knows restore {id} (GET {url}: 404; restarted?)"
                ));
            }
            _ => None,
        };
        match st {
            Some(st) => {
                last_ok = Instant::now();
                hub.restores.update(id, |r| r.bytes_done = st.bytes_done);
                match st.status {
                    JobStatus::Completed => return Ok(st),
                    s if s.is_terminal() => {
                        return Err(format!(
                            "node: {}",
                            st.error_message
                                .unwrap_or_else(|| format!("restore {}", s.as_str()))
                        ));
                    }
                    _ => {}
                }
            }
            None if last_ok.elapsed() > NODE_LOST_AFTER => {
                return Err(format!(
                    "node lost: no answer to GET {url} for {} s",
                    last_ok.elapsed().as_secs()
                ));
            }
            None => {}
        }
    }
}
