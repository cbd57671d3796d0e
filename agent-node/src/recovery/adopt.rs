//! Start-up: the recoveries an earlier node process left (their journals). Runs before the API
//! serves, so no recovery of this process can be mistaken for a leftover. For each journal:
//! - its QEMU (the journal's PID, else the PID file QEMU wrote) is alive and
//!   `/proc/PID/cmdline` names the recovery's QMP socket (PIDs are reused; a process is never
//!   found by its name): re-adopted. QMP is reconnected, the recovery is listed again, watched,
//!   reported and finished like any;
//! - QEMU is gone: its overlays and run files are removed, the journal last, and the hub is
//!   told `failed` (the recovered VM's QEMU was gone when the node restarted).
//!
//! A QEMU that runs but whose QMP does not answer is left as it is, journal included, and
//! named in the report: killing it could lose what its guest wrote.

use super::{Recoveries, RecoveryJob, journal, run};
use crate::instant::{self, InstantDisk, InstantSpec, InstantVm};
use sendense_shared::api::JobStatus;
use sendense_shared::errors::{ErrorCode, chain};
use sendense_shared::ids::DiskKey;
use std::path::PathBuf;
use std::sync::Arc;

/// What [`adopt`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AdoptReport {
    /// "recovery r1: QEMU PID 123" for each re-adopted VM.
    pub adopted: Vec<String>,
    /// Recoveries whose QEMU was gone (cleaned up, reported failed).
    pub gone: Vec<String>,
    pub files_removed: Vec<PathBuf>,
    pub errors: Vec<String>,
}

/// What the journalled VM's message says when its QEMU was gone.
pub const QEMU_GONE: &str = "the recovered VM's QEMU was gone when the node restarted; its \
     overlays were removed: what the guest wrote is lost";

/// The engine's view of a journalled recovery (what watching and cleaning up need: no TLS
/// material, no hardware).
fn spec_of(entry: &journal::Entry) -> InstantSpec {
    InstantSpec {
        name: entry.vm_name.clone(),
        memory_mib: 0,
        cpus: 0,
        machine: String::new(),
        kernel: None,
        initrd: None,
        append: None,
        disks: entry
            .disks
            .iter()
            .map(|d| InstantDisk {
                disk_key: d.disk_key,
                server: d.server.clone(),
                export: d.export.clone(),
                tls: None,
                size: d.size,
                overlay: d.overlay.clone(),
            })
            .collect(),
        run_dir: entry.run_dir.clone(),
        speed: entry.speed_bps,
        paused: false,
        agent_socket: Some(super::agent_socket(&entry.run_dir)),
    }
}

/// Re-adopts or cleans up every recovery journalled in the node's run directory.
pub async fn adopt(rec: &Arc<Recoveries>) -> AdoptReport {
    let mut report = AdoptReport::default();
    for (path, entry) in journal::all(&rec.run_dir) {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // Not ours to interpret: left for an operator, named in the log.
                report.errors.push(e);
                continue;
            }
        };
        let id = entry.recovery_id.clone();
        // The file names what it may delete: only the files a recovery of this node makes.
        if sendense_shared::names::validate_name("recovery_id", &id).is_err()
            || path != journal::path(&rec.run_dir, &id)
            || entry.run_dir != rec.run_dir_of(&id)
        {
            report.errors.push(format!(
                "{}: names another recovery or run directory; left alone",
                path.display()
            ));
            continue;
        }
        let spec = spec_of(&entry);
        let job = Arc::new(RecoveryJob::new(
            id.clone(),
            entry.vm_name.clone(),
            entry.run_dir.clone(),
            spec.disks
                .iter()
                .map(|d| (DiskKey(d.disk_key), d.overlay.clone(), d.size)),
        ));
        let socket = instant::qmp_socket(&entry.run_dir);
        let pid = [entry.qemu_pid, instant::read_pid_file(&entry.run_dir)]
            .into_iter()
            .flatten()
            .find(|p| instant::is_our_qemu(*p, &socket));
        if let Some(pid) = pid {
            match InstantVm::adopt(spec, pid, rec.log.clone()).await {
                Ok(vm) => {
                    job.set_pid(pid);
                    if entry.qemu_pid != Some(pid) {
                        entry.qemu_pid = Some(pid);
                        if let Err(e) = journal::write(&path, &entry) {
                            report.errors.push(format!("{}: {e}", path.display()));
                        }
                    }
                    if let Err(e) = rec.insert(job.clone()) {
                        report.errors.push(format!("recovery {id}: {e}"));
                        continue;
                    }
                    report
                        .adopted
                        .push(format!("recovery {id}: QEMU PID {pid}"));
                    tracing::info!(recovery_id = %id, vm = %entry.vm_name, qemu_pid = pid,
                        "re-adopted the recovered VM; watching its streams again");
                    let r = rec.clone();
                    rec.ctx
                        .tracker
                        .spawn(async move { run::run_adopted(r, job, vm).await });
                }
                Err(e) => report.errors.push(format!(
                    "recovery {id}: QEMU PID {pid} runs but its QMP socket {} does not answer \
                     ({}); left as it is",
                    socket.display(),
                    chain(&e)
                )),
            }
            continue;
        }
        // QEMU is gone: what the guest wrote is gone with its overlays.
        let mut done = true;
        for d in &entry.disks {
            match std::fs::remove_file(&d.overlay) {
                Ok(()) => report.files_removed.push(d.overlay.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    done = false;
                    report.errors.push(format!("{}: {e}", d.overlay.display()));
                }
            }
        }
        if entry.run_dir.exists() {
            match std::fs::remove_dir_all(&entry.run_dir) {
                Ok(()) => report.files_removed.push(entry.run_dir.clone()),
                Err(e) => {
                    done = false;
                    report
                        .errors
                        .push(format!("{}: {e}", entry.run_dir.display()));
                }
            }
        }
        if !done {
            continue;
        }
        match journal::remove(&path) {
            Ok(()) => report.files_removed.push(path.clone()),
            Err(e) => report.errors.push(format!("{}: {e}", path.display())),
        }
        job.finish(
            JobStatus::Failed,
            Some(QEMU_GONE.to_string()),
            Some(ErrorCode::JobFailed),
        );
        tracing::warn!(recovery_id = %id, vm = %entry.vm_name, "{QEMU_GONE}");
        report.gone.push(format!("recovery {id}"));
        if rec.insert(job.clone()).is_ok() {
            let r = rec.clone();
            rec.ctx.tracker.spawn(async move {
                run::report_final(&r.ctx, &job).await;
            });
        }
    }
    // Half-written journal files (a crash between write and rename) name nothing complete.
    if let Ok(dir) = std::fs::read_dir(&rec.run_dir) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(journal::PREFIX)
                && name.ends_with(".json.tmp")
                && std::fs::remove_file(e.path()).is_ok()
            {
                report.files_removed.push(e.path());
            }
        }
    }
    report
}
