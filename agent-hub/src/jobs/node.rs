//! Calls from the hub to the node that owns a VM: start the copy once the exports are up,
//! forward a cancel. Same bearer token both ways.

use super::finish::{Outcome, finish};
use super::{JobManager, Level, LiveJob, NodeAddr};
use crate::node_client::{NodeCallError, NodeClient};
use sendense_shared::api::{
    Backup, BackupType, DiskChangeId, DiskTarget, JobStatus, NodeBackupStart,
};
use sendense_shared::errors::ErrorCode;
use sendense_shared::ids::{BackupId, DiskKey};
use sendense_shared::targets::{NbdTarget, format_targets};
use std::time::{Duration, Instant};

/// `POST {api_url}/api/v1/backup/start`; a refusal or no answer fails the job.
pub async fn start_on_node(
    jm: &JobManager,
    job: &std::sync::Arc<LiveJob>,
    node: &NodeAddr,
    kind: BackupType,
    previous: Option<Previous>,
    targets: &[NbdTarget],
) {
    let refused = match ask_node(jm, job, node, kind, previous, targets).await {
        Ok(()) => return,
        Err(r) => r,
    };
    // The node cannot do this incremental (its change tracking does not start at our chain's
    // last backup): the same job goes on as a full backup.
    let failure = match refused {
        Refusal::BitmapMissing(why) if kind == BackupType::Incremental => {
            match super::fallback::incremental_to_full(jm, job, &why).await {
                Ok(()) => match ask_node(jm, job, node, BackupType::Full, None, targets).await {
                    Ok(()) => return,
                    Err(Refusal::BitmapMissing(m) | Refusal::Other(m)) => m,
                },
                Err(e) => format!("falling back to a full backup failed: {e}"),
            }
        }
        Refusal::BitmapMissing(m) | Refusal::Other(m) => m,
    };
    let mut res = job.res.lock().await;
    finish(jm, job, &mut res, Outcome::Failed(failure)).await;
}

/// What the node said of an incremental's base before anything was prepared.
pub enum BaseCheck {
    /// It would take the incremental.
    Holds,
    /// Its change tracking does not start at the chain's last backup: do a full.
    Refused(String),
    /// It could not say (unreachable, or a node without the check): go on with the
    /// incremental; a refusal at start still falls back (see [`super::fallback`]).
    Unknown(String),
}

/// Asks the node (`POST /api/v1/backup/check`, side-effect free) whether it can do an
/// incremental of `vm` on top of `previous`, before the job prepares ports, images and
/// qemu-nbd: a refusal then costs nothing to undo.
pub async fn check_base(
    jm: &JobManager,
    node: &NodeAddr,
    backup_id: &BackupId,
    vm_name: &str,
    previous: &Previous,
) -> BaseCheck {
    let body = NodeBackupStart {
        backup_id: backup_id.clone(),
        vm_name: vm_name.to_string(),
        backup_type: BackupType::Incremental,
        nbd_targets: String::new(),
        targets: Vec::new(),
        previous_backup_id: Some(previous.backup_id.clone()),
        previous_change_ids: previous.change_ids.clone(),
        checksum_grid: Some(sendense_shared::api::DEFAULT_GRID_CELL),
        require_application_consistency: false,
    };
    match jm.deps().nodes.check_backup(node, &body).await {
        Ok(()) => BaseCheck::Holds,
        Err(e) => match refusal(e) {
            Refusal::BitmapMissing(m) => BaseCheck::Refused(m),
            Refusal::Other(m) => BaseCheck::Unknown(m),
        },
    }
}

/// Why the node did not take a start.
enum Refusal {
    /// `409 bitmap missing`: an incremental without a valid changed-block map.
    BitmapMissing(String),
    Other(String),
}

/// The backup an incremental builds on, and the change ids its disks were copied at (read with
/// it when the job chose its type, so the start does not read it again).
#[derive(Debug, Clone)]
pub struct Previous {
    pub backup_id: BackupId,
    pub change_ids: Vec<DiskChangeId>,
}

/// The change ids (vSphere CBT) the disks of `previous` were copied at, for the disks of the new
/// job that have one: the node asks the hypervisor for the blocks changed since each. A disk
/// left out (copied by a driver without change ids, or before the hub stored them) makes a
/// vSphere node refuse with `409 bitmap missing`, and the job falls back to full.
pub fn change_ids_of(previous: &Backup, disks: &[DiskKey]) -> Vec<DiskChangeId> {
    previous
        .disk_results
        .iter()
        .filter(|d| disks.contains(&d.disk_key))
        .filter_map(|d| {
            d.change_id.as_ref().map(|c| DiskChangeId {
                disk_key: d.disk_key,
                change_id: c.clone(),
            })
        })
        .collect()
}

/// The start request of `job` for the node.
fn start_body(
    job: &LiveJob,
    kind: BackupType,
    previous: Option<Previous>,
    targets: &[NbdTarget],
    tls: Option<&sendense_shared::api::NbdTls>,
) -> NodeBackupStart {
    let (previous_backup_id, previous_change_ids) = match previous {
        Some(p) if kind == BackupType::Incremental => (Some(p.backup_id), p.change_ids),
        Some(p) => (Some(p.backup_id), Vec::new()),
        None => (None, Vec::new()),
    };
    NodeBackupStart {
        backup_id: job.id.clone(),
        vm_name: job.node_vm_name.clone(),
        backup_type: kind,
        // The string stays for logs and older nodes; the node reads the structured form.
        nbd_targets: format_targets(targets),
        targets: targets
            .iter()
            .map(|t| DiskTarget {
                disk_key: t.disk_key,
                export: sendense_shared::api::NbdExport {
                    tls: tls.cloned(),
                    ..t.uri.clone().into()
                },
            })
            .collect(),
        previous_backup_id,
        previous_change_ids,
        checksum_grid: Some(sendense_shared::api::DEFAULT_GRID_CELL),
        require_application_consistency: job.require_application_consistency,
    }
}

/// What an event says about the base an incremental asks for.
fn describe_base(job: &LiveJob, body: &NodeBackupStart) -> String {
    match (&body.previous_backup_id, body.backup_type) {
        (Some(prev), BackupType::Incremental) => format!(
            ", previous backup {prev}, change ids for {} of {} disk(s){}",
            body.previous_change_ids.len(),
            job.disks.len(),
            body.previous_change_ids
                .iter()
                .map(|c| format!(" {}={}", c.disk_key, c.change_id))
                .collect::<String>()
        ),
        _ => String::new(),
    }
}

/// Reads a node's refusal: `409 bitmap_missing` is the one the job recovers from.
fn refusal(e: NodeCallError) -> Refusal {
    let msg = sendense_shared::errors::chain(&e);
    if e.status() == Some(409) && e.code() == Some(ErrorCode::BitmapMissing) {
        Refusal::BitmapMissing(msg)
    } else {
        Refusal::Other(msg)
    }
}

/// One `POST .../backup/start`; events for the request and its answer.
async fn ask_node(
    jm: &JobManager,
    job: &LiveJob,
    node: &NodeAddr,
    kind: BackupType,
    previous: Option<Previous>,
    targets: &[NbdTarget],
) -> Result<(), Refusal> {
    let url = NodeClient::url_of(node, "backup/start");
    // The job's client certificate for its exports (the hub's `nbd_tls`): issued per request,
    // any one with the job's name passes its exports' authz.
    let tls = match &jm.deps().qemu_nbd.tls {
        Some(ca) => Some(
            ca.issue_client(&crate::nbd_ca::backup_identity(&job.id))
                .map_err(|e| Refusal::Other(sendense_shared::errors::chain(&e)))?,
        ),
        None => None,
    };
    let body = start_body(job, kind, previous, targets, tls.as_ref());
    jm.event(
        &job.id,
        Level::Info,
        "node_start",
        format!(
            "asking node {} to copy: POST {url} (backup_type {}{}, nbd_targets {})",
            node.name,
            kind.as_str(),
            describe_base(job, &body),
            body.nbd_targets
        ),
        None,
    )
    .await;
    let t = Instant::now();
    let failure = match jm.deps().nodes.start_backup(node, &body).await {
        Ok(()) => {
            jm.event(
                &job.id,
                Level::Info,
                "node_accepted",
                format!(
                    "node {} accepted the copy after {} ms",
                    node.name,
                    t.elapsed().as_millis()
                ),
                None,
            )
            .await;
            return Ok(());
        }
        Err(e) => refusal(e),
    };
    let (level, m) = match &failure {
        Refusal::BitmapMissing(m) => (Level::Warn, m),
        Refusal::Other(m) => (Level::Error, m),
    };
    jm.event(&job.id, level, "node_start_failed", m.clone(), None)
        .await;
    Err(failure)
}

/// `POST {api_url}/api/v1/backup/{id}/cancel`; best effort: the hub unwinds its side anyway
/// and the node's writes fail once the exports are gone.
pub async fn forward_cancel(jm: &JobManager, id: &BackupId, node: &NodeAddr) {
    let t = Instant::now();
    let (level, msg) = match jm.deps().nodes.cancel_backup(node, &id.0).await {
        Ok(()) => (
            Level::Info,
            format!(
                "node {} confirmed the cancel after {} ms",
                node.name,
                t.elapsed().as_millis()
            ),
        ),
        Err(e) => (
            Level::Warn,
            format!(
                "the node did not confirm the cancel: {}",
                sendense_shared::errors::chain(&e)
            ),
        ),
    };
    jm.event(id, level, "node_cancel", msg, None).await;
}

/// While a node's job runs, checks on the node whenever it has been silent for a watch
/// interval: a node that forgot the job (restarted), reports it failed, or stays unreachable
/// for `node_lost_after` fails the job, so a dead node never holds ports and qemu-nbd forever.
pub async fn watch_node(jm: &JobManager, job: std::sync::Arc<LiveJob>, node: NodeAddr) {
    let interval = jm.deps().node_watch_interval;
    let lost_after = jm.deps().node_lost_after;
    let mut unreachable_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = job.ended.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match jm.deps().db.get_backup(&job.id).await.map(|b| b.status) {
            Ok(JobStatus::Running) => {}
            Ok(s) if s.is_terminal() => return,
            // Finalizing or cancelling: the node has nothing more to say.
            Ok(_) | Err(_) => continue,
        }
        let stuck = job.since_last_moved();
        if stuck >= jm.deps().job_stall_after {
            let msg = format!(
                "node {} reports the copy running but no byte of any disk moved for {} s \
                 (stalled; job_stall_after = {} s)",
                node.name,
                stuck.as_secs(),
                jm.deps().job_stall_after.as_secs()
            );
            jm.event(&job.id, Level::Error, "job_stalled", msg.clone(), None)
                .await;
            let mut res = job.res.lock().await;
            finish(jm, &job, &mut res, Outcome::Failed(msg)).await;
            return;
        }
        if job.since_last_report() < interval {
            unreachable_since = None;
            continue;
        }
        let answer = jm
            .deps()
            .nodes
            .backup_state(&node, &job.id.0, interval.max(Duration::from_secs(2)))
            .await;
        let failure = match answer {
            Ok(st) => {
                unreachable_since = None;
                matches!(st.status, JobStatus::Failed | JobStatus::Cancelled).then(|| {
                    format!(
                        "node {} reports the copy {} without a completion report: {}",
                        node.name,
                        st.status.as_str(),
                        st.error_message.unwrap_or_else(|| "no message".into())
                    )
                })
            }
            Err(e) if e.is_unknown_job() => Some(format!(
                "node {} no longer knows backup {} ({}: restarted?)",
                node.name,
                job.id,
                sendense_shared::errors::chain(&e)
            )),
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                let cause = sendense_shared::errors::chain(&e);
                if since.elapsed() < lost_after {
                    jm.event(&job.id, Level::Warn, "node_unreachable", cause, None)
                        .await;
                    None
                } else {
                    Some(format!(
                        "node {} lost: no good answer for {} s ({cause})",
                        node.name,
                        since.elapsed().as_secs()
                    ))
                }
            }
        };
        if let Some(msg) = failure {
            jm.event(&job.id, Level::Error, "node_lost", msg.clone(), None)
                .await;
            let mut res = job.res.lock().await;
            finish(jm, &job, &mut res, Outcome::Failed(msg)).await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sendense_shared::api::{DiskResult, DiskStatus};

    fn previous(change_ids: &[(i64, Option<&str>)]) -> Backup {
        Backup {
            backup_id: BackupId::from("b-prev"),
            vm_context_id: "ctx".into(),
            vm_name: "vc1".into(),
            backup_type: BackupType::Full,
            repository_id: "main".into(),
            status: JobStatus::Completed,
            disk_results: change_ids
                .iter()
                .map(|(k, c)| DiskResult {
                    disk_key: DiskKey(*k),
                    unit_number: 0,
                    nbd_port: None,
                    nbd_export_name: format!("vc1-disk-{k}"),
                    qcow2_path: format!("/repo/vc1/{k}/b-prev.qcow2"),
                    qemu_nbd_pid: None,
                    status: DiskStatus::Completed,
                    bytes_done: 1,
                    bytes_total: 1,
                    error_message: None,
                    change_id: c.map(str::to_string),
                    checksums_source: None,
                })
                .collect(),
            nbd_targets_string: String::new(),
            bytes_transferred: 1,
            total_bytes: 1,
            created_at: chrono::Utc::now(),
            started_at: None,
            completed_at: None,
            error_message: None,
            integrity: sendense_shared::api::Integrity::Verified,
            integrity_detail: None,
            verified_at: None,
            consistency: None,
            protected: false,
            policy_id: None,
            boot_check: None,
            hardware: None,
        }
    }

    #[test]
    fn change_ids_are_those_of_the_previous_backup_for_the_jobs_disks() {
        let prev = previous(&[
            (2000, Some("52 aa/4")),
            (2001, None),
            (2002, Some("52 bb/9")),
        ]);
        let ids = change_ids_of(&prev, &[DiskKey(2000), DiskKey(2001), DiskKey(2003)]);
        assert_eq!(
            ids,
            [DiskChangeId {
                disk_key: DiskKey(2000),
                change_id: "52 aa/4".into()
            }],
            "2001 has none, 2002 is not a disk of the job any more"
        );
        let none = change_ids_of(&previous(&[(2000, None)]), &[DiskKey(2000)]);
        assert!(none.is_empty());
    }
}
