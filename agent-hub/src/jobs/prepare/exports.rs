//! One qemu-nbd per disk of a job, started concurrently and recorded.

use super::super::{Export, JobError, JobManager, Level, LiveJob, Resources};
use crate::db::DiskUpdate;
use crate::qemu_nbd::{ExportSpec, QemuNbd};
use sendense_shared::api::{Backup, DiskResult, DiskStatus, ProcessInfo};
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};
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
    let cfg = jm.deps().qemu_nbd.clone();
    let started = futures_util::future::join_all(backup.disk_results.iter().map(|d| {
        let first = ports
            .iter()
            .find(|p| p.0 == d.disk_key)
            .map(|p| p.1)
            .expect("a port per disk");
        let (cfg, id) = (&cfg, &id);
        async move {
            let t = Instant::now();
            let (r, port) = start_one(jm, cfg, id, d, first).await;
            (r, t.elapsed(), port)
        }
    }))
    .await;
    // Every one that started joins the resources first, so any failure below stops them all.
    let mut started: Vec<_> = started
        .into_iter()
        .zip(&backup.disk_results)
        .map(|((r, took, port), d)| {
            if let Ok(server) = &r {
                res.exports.push(Export {
                    disk_key: d.disk_key,
                    port,
                    export_name: d.nbd_export_name.clone(),
                    path: PathBuf::from(&d.qcow2_path),
                    server: server.clone(),
                });
            }
            (r, took, port)
        })
        .collect();
    // Any disk whose qemu-nbd did not come up fails the job; every cause is named.
    let mut failures = Vec::new();
    for (d, (r, _, port)) in backup.disk_results.iter().zip(&started) {
        if let Err(e) = r {
            let msg = format!(
                "disk {}: qemu-nbd for {} on port {port} did not become ready: {e}",
                d.disk_key, d.qcow2_path,
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
    for (d, (started, took, port)) in backup.disk_results.iter().zip(started.drain(..)) {
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

/// How often one disk moves to another port because a foreign process bound its port between
/// the allocator's bind test and qemu-nbd's own bind.
const PORT_TAKEN_MOVES: u32 = 3;

/// One disk's qemu-nbd on `port`, moved to another port of the range when a foreign process
/// took that one after its bind test. Answers the outcome and the port it ended on (the port
/// held for the disk: its row and `disk_results.nbd_port` follow every move).
async fn start_one(
    jm: &JobManager,
    cfg: &crate::qemu_nbd::QemuNbdConfig,
    id: &BackupId,
    d: &DiskResult,
    mut port: NbdPort,
) -> (Result<QemuNbd, String>, NbdPort) {
    let mut moves = 0;
    loop {
        let spec = ExportSpec {
            qcow2_path: PathBuf::from(&d.qcow2_path),
            export_name: d.nbd_export_name.clone(),
            port: port.0,
            read_only: false,
            socket: None,
            client: Some(crate::nbd_ca::backup_identity(id)),
        };
        let e = match QemuNbd::start(cfg, spec).await {
            Ok(server) => return (Ok(server), port),
            Err(e) if e.port_taken() && moves < PORT_TAKEN_MOVES => e,
            Err(e) => return (Err(e.to_string()), port),
        };
        moves += 1;
        let taken = port;
        let detail = format!("qemu-nbd found it bound after its bind test: {e}");
        let moved = async {
            let next = jm
                .deps()
                .ports
                .replace_taken(id, d.disk_key, taken, detail)
                .await
                .map_err(|pe| sendense_shared::errors::chain(&pe))?;
            jm.deps()
                .db
                .update_disk(
                    id,
                    d.disk_key,
                    &DiskUpdate {
                        nbd_port: Some(next),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|de| sendense_shared::errors::chain(&de))?;
            Ok::<_, String>(next)
        };
        match moved.await {
            Ok(next) => {
                jm.event(
                    id,
                    Level::Warn,
                    "port_taken",
                    format!(
                        "disk {}: port {taken} was bound by another process after its bind \
                         test; moved to port {next}",
                        d.disk_key
                    ),
                    Some(d.disk_key),
                )
                .await;
                jm.publish_ports().await;
                port = next;
            }
            Err(why) => return (Err(format!("{e}; no other port to move to: {why}")), port),
        }
    }
}
