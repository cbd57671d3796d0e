//! One qemu-nbd per disk of a job, started concurrently and recorded.

use super::super::{Export, JobError, JobManager, Level, LiveJob, Resources};
use crate::db::DiskUpdate;
use crate::qemu_nbd::{ExportSpec, QemuNbd};
use sendense_shared::api::{Backup, DiskStatus, ProcessInfo};
use sendense_shared::ids::{DiskKey, NbdPort};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Starts one qemu-nbd per disk of `backup` on its port, concurrently, and records each one.
/// Every one that started joins `res` before anything can fail, so unwinding stops them all.
/// Answers the failures, each naming its disk and cause (empty: all are up).
pub(super) async fn start_exports(
    jm: &JobManager,
    job: &Arc<LiveJob>,
    res: &mut Resources,
    backup: &Backup,
    ports: &[(DiskKey, NbdPort)],
) -> Result<Vec<String>, JobError> {
    let id = job.id.clone();
    let db = &jm.deps().db;
    // Started concurrently (each waits for its own handshake, about
    // 100 ms; a 16-disk VM should not wait for them one after the other).
    let port_of = |k: DiskKey| {
        ports
            .iter()
            .find(|p| p.0 == k)
            .map(|p| p.1)
            .expect("a port per disk")
    };
    let cfg = jm.deps().qemu_nbd.clone();
    let started = futures_util::future::join_all(backup.disk_results.iter().map(|d| {
        let spec = ExportSpec {
            qcow2_path: PathBuf::from(&d.qcow2_path),
            export_name: d.nbd_export_name.clone(),
            port: port_of(d.disk_key).0,
            read_only: false,
            socket: None,
            client: Some(crate::nbd_ca::backup_identity(&id)),
        };
        let cfg = cfg.clone();
        async move {
            let t = Instant::now();
            (QemuNbd::start(&cfg, spec).await, t.elapsed())
        }
    }))
    .await;
    // Every one that started joins the resources first, so any failure below stops them all.
    let mut started: Vec<_> = started
        .into_iter()
        .zip(&backup.disk_results)
        .map(|((r, took), d)| {
            if let Ok(server) = &r {
                res.exports.push(Export {
                    disk_key: d.disk_key,
                    port: port_of(d.disk_key),
                    export_name: d.nbd_export_name.clone(),
                    path: PathBuf::from(&d.qcow2_path),
                    server: server.clone(),
                });
            }
            (r, took)
        })
        .collect();
    // Any disk whose qemu-nbd did not come up fails the job; every cause is named.
    let mut failures = Vec::new();
    for (d, (r, _)) in backup.disk_results.iter().zip(&started) {
        if let Err(e) = r {
            let msg = format!(
                "disk {}: qemu-nbd for {} on port {} did not become ready: {e}",
                d.disk_key,
                d.qcow2_path,
                port_of(d.disk_key)
            );
            db.update_disk(
                &id,
                d.disk_key,
                &DiskUpdate {
                    status: Some(DiskStatus::Failed),
                    error_message: Some(Some(msg.clone())),
                    ..Default::default()
                },
            )
            .await?;
            failures.push(msg);
        }
    }
    if !failures.is_empty() {
        return Ok(failures);
    }
    for (d, (started, took)) in backup.disk_results.iter().zip(started.drain(..)) {
        let port = port_of(d.disk_key);
        let Ok(server) = started else {
            continue;
        };
        let cmdline = sendense_shared::child::shell_words(server.command_line());
        let info = ProcessInfo {
            pid: server.pid(),
            port,
            export_name: d.nbd_export_name.clone(),
            qcow2_path: d.qcow2_path.clone(),
            backup_id: id.clone(),
            disk_key: d.disk_key,
            alive: true,
            started_at: server.started_at(),
        };
        let pid = server.pid();
        db.record_process(&info, &cmdline).await?;
        db.update_disk(
            &id,
            d.disk_key,
            &DiskUpdate {
                qemu_nbd_pid: Some(pid),
                status: Some(DiskStatus::Ready),
                ..Default::default()
            },
        )
        .await?;
        jm.event(
            &id,
            Level::Info,
            "qemu_nbd_started",
            format!(
                "disk {}: qemu-nbd pid {pid} serving export {} on port {port}, ready (NBD handshake) \
                 after {} ms: {cmdline}",
                d.disk_key,
                d.nbd_export_name,
                took.as_millis()
            ),
            Some(d.disk_key),
        )
        .await;
        super::super::finish::watch_export(jm, job, d.disk_key, port, server);
    }
    Ok(Vec::new())
}
