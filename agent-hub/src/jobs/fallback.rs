//! An incremental the node cannot do becomes a full backup of the same job.
//!
//! The hub decides "incremental" from its own records (a completed, verified previous backup
//! whose images are on disk), but only the node knows whether its change tracking starts
//! exactly at that backup: it answers `409 bitmap missing` when it does not (the bitmap was
//! lost with a QEMU restart, or it moved on to a backup the hub did not keep, e.g. one that
//! failed verification). The job then falls back to a full backup, in place: same job, same
//! ports and export names; each incremental image (whose backing file is the previous backup)
//! is replaced by a fresh full image, its qemu-nbd restarted on it, the job recorded as `full`
//! with the reason in its events, and the node asked again for a full copy.

use super::{Export, JobManager, Level, LiveJob};
use crate::db::DiskUpdate;
use crate::qemu_nbd::{ExportSpec, QemuNbd};
use sendense_shared::api::{DiskStatus, ProcessInfo};
use std::sync::Arc;

/// Rebuilds every export of `job` as a full backup target. Answers the cause when it could
/// not (the caller fails the job, which unwinds whatever is held).
pub async fn incremental_to_full(
    jm: &JobManager,
    job: &Arc<LiveJob>,
    why: &str,
) -> Result<(), String> {
    let id = &job.id;
    let db = &jm.deps().db;
    let mut res = job.res.lock().await;
    if res.finished || job.cancel.is_cancelled() {
        return Err("the job ended before the fallback".into());
    }
    jm.event(
        id,
        Level::Warn,
        "incremental_fallback",
        format!(
            "incremental refused by the node, running a FULL backup instead: {why}; the \
             incremental images are replaced by full ones on the same ports"
        ),
        None,
    )
    .await;
    let backup = jm.get(id).await.map_err(|e| e.to_string())?;
    // In place, so that whatever happens the job's resources still list every export (a
    // stopped one is stopped again harmlessly by the unwinding).
    for i in 0..res.exports.len() {
        let e = &res.exports[i];
        let (disk_key, port, export_name, path) =
            (e.disk_key, e.port, e.export_name.clone(), e.path.clone());
        let size = backup
            .disk_results
            .iter()
            .find(|d| d.disk_key == e.disk_key)
            .map(|d| d.bytes_total)
            .unwrap_or(0);
        let old_pid = e.server.pid();
        let rep = e.server.stop().await;
        let _ = db.mark_process_stopped(old_pid, port, &rep.status).await;
        let e = Export {
            disk_key,
            port,
            export_name,
            path,
            server: res.exports[i].server.clone(),
        };
        crate::repository::remove_image(&e.path)
            .await
            .map_err(|err| format!("disk {}: removing {}: {err}", e.disk_key, e.path.display()))?;
        crate::repository::create_full(&e.path, size)
            .await
            .map_err(|err| format!("disk {}: creating {}: {err}", e.disk_key, e.path.display()))?;
        let spec = ExportSpec {
            qcow2_path: e.path.clone(),
            export_name: e.export_name.clone(),
            port: e.port.0,
            read_only: false,
            socket: None,
            client: Some(crate::nbd_ca::backup_identity(id)),
        };
        let server = QemuNbd::start(&jm.deps().qemu_nbd, spec)
            .await
            .map_err(|err| {
                format!(
                    "disk {}: qemu-nbd for the full image on port {} did not become ready: {err}",
                    e.disk_key, e.port
                )
            })?;
        let pid = server.pid();
        let cmdline = sendense_shared::child::shell_words(server.command_line());
        res.exports[i] = Export {
            disk_key: e.disk_key,
            port: e.port,
            export_name: e.export_name.clone(),
            path: e.path.clone(),
            server: server.clone(),
        };
        db.record_process(
            &ProcessInfo {
                pid,
                port: e.port,
                export_name: e.export_name.clone(),
                qcow2_path: e.path.display().to_string(),
                backup_id: id.clone(),
                disk_key: e.disk_key,
                alive: true,
                started_at: server.started_at(),
            },
            &cmdline,
        )
        .await
        .map_err(|err| err.to_string())?;
        db.update_disk(
            id,
            e.disk_key,
            &DiskUpdate {
                qemu_nbd_pid: Some(pid),
                status: Some(DiskStatus::Ready),
                ..Default::default()
            },
        )
        .await
        .map_err(|err| err.to_string())?;
        jm.event(
            id,
            Level::Info,
            "image_created",
            format!(
                "disk {}: recreated {} as a full image ({size} bytes virtual, no backing file); \
                 qemu-nbd pid {pid} serves it on port {}",
                e.disk_key,
                e.path.display(),
                e.port
            ),
            Some(e.disk_key),
        )
        .await;
        super::finish::watch_export(jm, job, e.disk_key, e.port, server);
    }
    db.set_backup_full(id)
        .await
        .map_err(|err| err.to_string())?;
    jm.publish(id).await;
    jm.publish_processes().await;
    Ok(())
}
