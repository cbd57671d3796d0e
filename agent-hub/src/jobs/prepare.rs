//! Start of a job: check, record, then for ALL disks of the VM allocate ports, create target
//! images and start qemu-nbd; any failure unwinds everything through [`super::finish`].
//!
//! The preparation runs in a tracked task that the request merely awaits: a client that hangs
//! up mid-way must not abandon half-started qemu-nbd processes.

mod exports;
mod kind;

use super::finish::{Outcome, finish};
use super::node::Previous;
use super::{JobError, JobManager, Level, LiveJob, NodeAddr, Resources};
use crate::db::{DbError, DiskUpdate, NewBackup, NewBackupDisk};
use crate::ports::PortError;
use crate::repository::RepoLayout;
use exports::start_exports;
use sendense_shared::api::{Backup, BackupRequest, BackupType, DiskStatus, JobStatus, Vm};
use sendense_shared::ids::{BackupId, DiskKey};
use sendense_shared::targets::{NbdTarget, format_targets};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Checks the request, records the job, prepares every export; answers the job `running`.
/// `policy_id`: the policy that started it (recorded on the job at once).
pub async fn start(
    jm: &JobManager,
    req: BackupRequest,
    policy_id: Option<&str>,
) -> Result<Backup, JobError> {
    let db = &jm.deps().db;
    let vm = match db.get_vm(&req.vm_name).await {
        Ok(vm) => vm,
        Err(DbError::NotFound { .. }) => {
            return Err(JobError::VmNotFound { vm: req.vm_name });
        }
        Err(e) => return Err(e.into()),
    };
    let repo = match db.get_repository(&req.repository_id).await {
        Ok(r) => r,
        Err(DbError::NotFound { .. }) => {
            return Err(JobError::RepositoryNotFound {
                id: req.repository_id,
            });
        }
        Err(e) => return Err(e.into()),
    };
    if vm.disks.is_empty() {
        return Err(JobError::Invalid {
            detail: format!("vm_name: VM {:?} has no disks to back up", vm.vm_name),
        });
    }
    let node = match &vm.node {
        None => None,
        Some(name) => match db.get_node(name).await {
            Ok(n) => Some(NodeAddr {
                name: n.name,
                api_url: n.api_url,
            }),
            Err(DbError::NotFound { .. }) => {
                return Err(JobError::NodeNotFound {
                    vm: vm.vm_name.clone(),
                    node: name.clone(),
                });
            }
            Err(e) => return Err(e.into()),
        },
    };
    // From here until the job is live (holding its space reservation), one request at a time:
    // otherwise two could both pass the busy and space checks.
    let admission = jm.inner.admission.lock().await;
    // One job per VM at a time: two would fight over the export names and the chain.
    if let Some(active) = db
        .list_backups_in(super::ACTIVE)
        .await?
        .into_iter()
        .find(|b| b.vm_name == vm.vm_name)
    {
        return Err(JobError::Busy {
            vm: vm.vm_name.clone(),
            backup_id: active.backup_id,
            status: active.status.as_str(),
        });
    }

    // Nor while a prune rewrites the chain the incremental would build on.
    if let Some(prune_id) = db.active_prune_of_vm(&vm.vm_name).await? {
        return Err(JobError::Pruning {
            vm: vm.vm_name.clone(),
            prune_id,
        });
    }
    let backup_id = BackupId(uuid::Uuid::new_v4().to_string());
    let layout = RepoLayout::new(&repo.path);
    let kind::Kind {
        effective,
        parents,
        previous,
        fallback,
    } = kind::choose(jm, &vm, req.backup_type, node.as_ref(), &backup_id).await?;
    let mut disks = Vec::with_capacity(vm.disks.len());
    for d in &vm.disks {
        let parent = parents.iter().find(|p| p.0 == d.disk_key);
        let path = layout
            .image_path(&vm.vm_name, d.disk_key, &backup_id)
            .map_err(|e| JobError::Invalid {
                detail: format!("vm_name: {e}"),
            })?;
        disks.push(NewBackupDisk {
            disk_key: d.disk_key,
            unit_number: d.unit_number,
            qcow2_path: path.display().to_string(),
            nbd_export_name: export_name(&vm.vm_name, d.disk_key),
            bytes_total: d.size_bytes,
            parent_backup_id: parent.map(|p| p.1.clone()),
            backing_path: match parent {
                Some(p) => Some(
                    crate::repository::relative_backing(&path, &p.2)
                        .map_err(|e| JobError::Invalid {
                            detail: format!("disk {}: backing file: {e}", d.disk_key),
                        })?
                        .display()
                        .to_string(),
                ),
                None => None,
            },
        });
    }
    db.create_backup(&NewBackup {
        backup_id: backup_id.clone(),
        vm_context_id: vm.vm_context_id.clone(),
        vm_name: vm.vm_name.clone(),
        backup_type: effective,
        repository_id: repo.id.clone(),
        disks,
    })
    .await?;
    // A lost policy tag is not worth failing the backup: logged.
    if let Some(p) = policy_id
        && let Err(e) = db.set_backup_policy(&backup_id, p).await
    {
        tracing::warn!(backup_id = %backup_id, policy_id = p, error = %e, "cannot record the backup's policy");
    }
    let total: u64 = vm.disks.iter().map(|d| d.size_bytes).sum();
    jm.event(
        &backup_id,
        Level::Info,
        "created",
        format!(
            "{} backup of VM {} requested ({} disk(s): {}; {} bytes virtual) into repository {} ({}); \
             writer: {}",
            effective.as_str(),
            vm.vm_name,
            vm.disks.len(),
            vm.disks
                .iter()
                .map(|d| format!("{} unit {} {} bytes", d.disk_key, d.unit_number, d.size_bytes))
                .collect::<Vec<_>>()
                .join(", "),
            total,
            repo.id,
            repo.path,
            match &node {
                Some(n) => format!("node {} at {}", n.name, n.api_url),
                None => "none (VM without node: waiting for reports from whoever writes the exports)"
                    .into(),
            }
        ),
        None,
    )
    .await;
    if let Some(why) = fallback {
        jm.event(
            &backup_id,
            Level::Warn,
            "incremental_fallback",
            format!("incremental requested, running a FULL backup instead: {why}"),
            None,
        )
        .await;
    }
    jm.publish(&backup_id).await;

    // Space: the worst case of both kinds is every block of every disk written.
    let space = crate::repository::space(Path::new(&repo.path)).map_err(|e| JobError::Prepare {
        backup_id: backup_id.clone(),
        step: "reading repository space",
        cause: e.to_string(),
    });
    let space = match space {
        Ok(s) => s,
        Err(e) => {
            fail_early(jm, &backup_id, &e.to_string()).await;
            return Err(e);
        }
    };
    let reserved = jm.reserved_in(&repo.path);
    let available = space.free_bytes.saturating_sub(reserved);
    if available < total {
        let e = JobError::InsufficientSpace {
            backup_id: backup_id.clone(),
            path: repo.path.clone(),
            needed: total,
            free: available,
            reserved,
        };
        fail_early(jm, &backup_id, &e.to_string()).await;
        return Err(e);
    }
    jm.event(
        &backup_id,
        Level::Info,
        "space_checked",
        format!(
            "repository {} has {} bytes free of {} ({reserved} reserved by running jobs); \
             job may need {}",
            repo.path, space.free_bytes, space.total_bytes, total
        ),
        None,
    )
    .await;

    let job = Arc::new(LiveJob {
        id: backup_id.clone(),
        vm_name: vm.vm_name.clone(),
        node_vm_name: vm.name_on_node().to_string(),
        node,
        disks: vm.disks.iter().map(|d| d.disk_key).collect(),
        cancel: tokio_util::sync::CancellationToken::new(),
        ended: tokio_util::sync::CancellationToken::new(),
        last_report: std::sync::Mutex::new(std::time::Instant::now()),
        last_moved: std::sync::Mutex::new(None),
        repository_path: repo.path.clone(),
        reserved_bytes: total,
        require_application_consistency: req.require_application_consistency,
        res: tokio::sync::Mutex::new(Resources::default()),
    });
    jm.insert_live(job.clone());
    drop(admission);
    let me = jm.clone();
    let handle = jm
        .deps()
        .tasks
        .spawn(async move { prepare(&me, job, vm, effective, parents, previous).await });
    match handle.await {
        Ok(r) => r,
        Err(e) => Err(JobError::Prepare {
            backup_id,
            step: "preparing",
            cause: format!("preparation task ended abnormally: {e}"),
        }),
    }
}

/// `<vm>-disk-<key>`, the original system's export names.
pub fn export_name(vm: &str, disk: DiskKey) -> String {
    format!("{vm}-disk-{disk}")
}

/// A job refused before it held anything: straight to `failed`.
async fn fail_early(jm: &JobManager, id: &BackupId, cause: &str) {
    jm.event(id, Level::Error, "refused", cause.to_string(), None)
        .await;
    if let Err(e) = jm
        .deps()
        .db
        .transition_backup(id, &[JobStatus::Pending], JobStatus::Failed, Some(cause))
        .await
    {
        tracing::error!(backup_id = %id, error = %e, "cannot mark refused job failed");
    }
    jm.publish(id).await;
}

/// The preparation proper, holding the job's resources lock throughout.
async fn prepare(
    jm: &JobManager,
    job: Arc<LiveJob>,
    vm: Vm,
    kind: BackupType,
    parents: Vec<(DiskKey, BackupId, PathBuf)>,
    previous: Option<Previous>,
) -> Result<Backup, JobError> {
    let mut res = job.res.lock().await;
    let targets = match prepare_steps(jm, &job, &mut res, &vm, &parents).await {
        Ok(t) => t,
        Err(e) => {
            // A step that failed without unwinding (a database error mid-way): unwind here,
            // so nothing stays held by a job that will never run.
            if !res.finished {
                let msg = format!("preparation failed: {}", sendense_shared::errors::chain(&e));
                jm.event(&job.id, Level::Error, "prepare_failed", msg.clone(), None)
                    .await;
                finish(jm, &job, &mut res, Outcome::Failed(msg)).await;
            }
            return Err(e);
        }
    };
    drop(res);

    if let Some(n) = job.node.clone() {
        let me = jm.clone();
        let job2 = job.clone();
        jm.deps().tasks.spawn(async move {
            super::node::start_on_node(&me, &job2, &n, kind, previous, &targets).await;
            super::node::watch_node(&me, job2, n).await;
        });
    }
    jm.get(&job.id).await
}

/// The steps proper; answers the targets once the job is `running`.
async fn prepare_steps(
    jm: &JobManager,
    job: &Arc<LiveJob>,
    res: &mut Resources,
    vm: &Vm,
    parents: &[(DiskKey, BackupId, PathBuf)],
) -> Result<Vec<NbdTarget>, JobError> {
    let id = job.id.clone();
    let db = &jm.deps().db;
    let step_err = |step: &'static str, cause: String| JobError::Prepare {
        backup_id: id.clone(),
        step,
        cause,
    };

    if !db
        .transition_backup(&id, &[JobStatus::Pending], JobStatus::Preparing, None)
        .await?
    {
        return cancelled(jm, job, res).await;
    }
    jm.publish(&id).await;
    let backup = jm.get(&id).await?;

    // 1. Ports, all or none.
    let keys: Vec<DiskKey> = vm.disks.iter().map(|d| d.disk_key).collect();
    let t = Instant::now();
    let ports = match jm.deps().ports.allocate(&id, &keys).await {
        Ok(p) => p,
        Err(e) => {
            let (err, msg) = match &e {
                PortError::Exhausted { .. } => {
                    let msg = format!(
                        "cannot get an NBD port for each of {} disk(s): {}",
                        keys.len(),
                        sendense_shared::errors::chain(&e)
                    );
                    (
                        JobError::PortsExhausted {
                            backup_id: id.clone(),
                            detail: msg.clone(),
                        },
                        msg,
                    )
                }
                other => {
                    let msg = format!(
                        "port allocation failed: {}",
                        sendense_shared::errors::chain(other)
                    );
                    (step_err("allocating NBD ports", msg.clone()), msg)
                }
            };
            jm.event(&id, Level::Error, "ports_refused", msg.clone(), None)
                .await;
            finish(jm, job, res, Outcome::Failed(msg)).await;
            return Err(err);
        }
    };
    res.ports_held = true;
    for (disk, port) in &ports {
        db.update_disk(
            &id,
            *disk,
            &DiskUpdate {
                nbd_port: Some(*port),
                status: Some(DiskStatus::Preparing),
                ..Default::default()
            },
        )
        .await?;
        jm.event(
            &id,
            Level::Info,
            "port_allocated",
            format!("disk {disk}: NBD port {port} (bind-tested free)"),
            Some(*disk),
        )
        .await;
    }
    tracing::debug!(backup_id = %id, ms = t.elapsed().as_millis() as u64, "ports allocated");
    jm.publish_ports().await;
    if job.cancel.is_cancelled() {
        return cancelled(jm, job, res).await;
    }

    // 2. Target images.
    for d in &backup.disk_results {
        let path = PathBuf::from(&d.qcow2_path);
        let size = vm
            .disks
            .iter()
            .find(|v| v.disk_key == d.disk_key)
            .map(|v| v.size_bytes)
            .unwrap_or(d.bytes_total);
        let t = Instant::now();
        let parent = parents
            .iter()
            .find(|p| p.0 == d.disk_key)
            .map(|p| p.2.clone());
        if let Some(dir) = path.parent()
            && let Err(e) = tokio::fs::create_dir_all(dir).await
        {
            let msg = format!("disk {}: cannot create {}: {e}", d.disk_key, dir.display());
            return fail(jm, job, res, "creating the disk directory", msg).await;
        }
        let created = match &parent {
            None => crate::repository::create_full(&path, size).await,
            Some(backing) => crate::repository::create_incremental(&path, backing, size).await,
        };
        if let Err(e) = created {
            let msg = format!("disk {}: cannot create {}: {e}", d.disk_key, path.display());
            return fail(jm, job, res, "creating target images", msg).await;
        }
        res.images.push((d.disk_key, path.clone()));
        jm.event(
            &id,
            Level::Info,
            "image_created",
            match &parent {
                None => format!(
                    "disk {}: created {} (qcow2, {size} bytes virtual) in {} ms",
                    d.disk_key,
                    path.display(),
                    t.elapsed().as_millis()
                ),
                Some(b) => format!(
                    "disk {}: created {} (qcow2, {size} bytes virtual, backing file {}) in {} ms",
                    d.disk_key,
                    path.display(),
                    b.display(),
                    t.elapsed().as_millis()
                ),
            },
            Some(d.disk_key),
        )
        .await;
        if job.cancel.is_cancelled() {
            return cancelled(jm, job, res).await;
        }
    }

    // 3. One qemu-nbd per disk.
    let failures = start_exports(jm, job, res, &backup, &ports).await?;
    if !failures.is_empty() {
        return fail(jm, job, res, "starting qemu-nbd", failures.join("; ")).await;
    }
    if job.cancel.is_cancelled() {
        return cancelled(jm, job, res).await;
    }
    jm.publish_processes().await;

    // 4. Targets string, then running: each export where it listens (its slot's unix socket,
    // or TCP on its port).
    let targets: Vec<NbdTarget> = backup
        .disk_results
        .iter()
        .map(|d| NbdTarget {
            disk_key: d.disk_key,
            uri: res
                .exports
                .iter()
                .find(|e| e.disk_key == d.disk_key)
                .map(|e| e.server.nbd_uri())
                .expect("an export per disk"),
        })
        .collect();
    let targets_string = format_targets(&targets);
    db.set_targets_string(&id, &targets_string).await?;
    if !db
        .transition_backup(&id, &[JobStatus::Preparing], JobStatus::Running, None)
        .await?
    {
        return cancelled(jm, job, res).await;
    }
    jm.event(
        &id,
        Level::Info,
        "running",
        format!("exports ready; NBD targets: {targets_string}"),
        None,
    )
    .await;
    jm.publish(&id).await;
    Ok(targets)
}

/// Unwinds after a failed step and answers the matching error.
async fn fail(
    jm: &JobManager,
    job: &LiveJob,
    res: &mut Resources,
    step: &'static str,
    msg: String,
) -> Result<Vec<NbdTarget>, JobError> {
    jm.event(&job.id, Level::Error, "prepare_failed", msg.clone(), None)
        .await;
    let status = finish(jm, job, res, Outcome::Failed(msg.clone())).await;
    if status == Some(JobStatus::Cancelled) {
        return Err(JobError::Cancelled { id: job.id.clone() });
    }
    Err(JobError::Prepare {
        backup_id: job.id.clone(),
        step,
        cause: msg,
    })
}

async fn cancelled(
    jm: &JobManager,
    job: &LiveJob,
    res: &mut Resources,
) -> Result<Vec<NbdTarget>, JobError> {
    jm.event(
        &job.id,
        Level::Warn,
        "prepare_interrupted",
        "preparation interrupted (cancel or hub stopping); unwinding what was prepared",
        None,
    )
    .await;
    finish(jm, job, res, Outcome::Cancelled).await;
    Err(JobError::Cancelled { id: job.id.clone() })
}
