//! Calls from the hub to the node that owns a VM: start the copy once the exports are up,
//! forward a cancel. Same bearer token both ways.

use super::finish::{Outcome, finish};
use super::{JobManager, Level, LiveJob, NodeTarget};
use sendense_shared::api::{
    Backup, BackupType, DiskChangeId, JobStatus, NodeBackupStart, NodeBackupState,
};
use sendense_shared::ids::{BackupId, DiskKey};
use std::time::Instant;

/// `POST {api_url}/api/v1/backup/start`; a refusal or no answer fails the job.
pub async fn start_on_node(
    jm: &JobManager,
    job: &std::sync::Arc<LiveJob>,
    node: &NodeTarget,
    kind: BackupType,
    previous: Option<Previous>,
    targets: &str,
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

/// One `POST .../backup/start`; events for the request and its answer.
async fn ask_node(
    jm: &JobManager,
    job: &LiveJob,
    node: &NodeTarget,
    kind: BackupType,
    previous: Option<Previous>,
    targets: &str,
) -> Result<(), Refusal> {
    let url = format!("{}/api/v1/backup/start", node.api_url.trim_end_matches('/'));
    let (previous_backup_id, previous_change_ids) = match previous {
        Some(p) if kind == BackupType::Incremental => (Some(p.backup_id), p.change_ids),
        Some(p) => (Some(p.backup_id), Vec::new()),
        None => (None, Vec::new()),
    };
    let change_ids = match (&previous_backup_id, kind) {
        (Some(prev), BackupType::Incremental) => format!(
            ", previous backup {prev}, change ids for {} of {} disk(s){}",
            previous_change_ids.len(),
            job.disks.len(),
            previous_change_ids
                .iter()
                .map(|c| format!(" {}={}", c.disk_key, c.change_id))
                .collect::<String>()
        ),
        _ => String::new(),
    };
    let body = NodeBackupStart {
        backup_id: job.id.clone(),
        vm_name: job.vm_name.clone(),
        backup_type: kind,
        nbd_targets: targets.to_string(),
        targets: Vec::new(),
        previous_backup_id,
        previous_change_ids,
    };
    jm.event(
        &job.id,
        Level::Info,
        "node_start",
        format!(
            "asking node {} to copy: POST {url} (backup_type {}{change_ids}, nbd_targets \
             {targets})",
            node.name,
            kind.as_str()
        ),
        None,
    )
    .await;
    let t = Instant::now();
    let answer = jm
        .deps()
        .http
        .post(&url)
        .bearer_auth(jm.deps().token.as_str())
        .json(&body)
        .send()
        .await;
    let failure = match answer {
        Ok(r) if r.status().is_success() => {
            jm.event(
                &job.id,
                Level::Info,
                "node_accepted",
                format!(
                    "node {} accepted the copy: HTTP {} after {} ms",
                    node.name,
                    r.status(),
                    t.elapsed().as_millis()
                ),
                None,
            )
            .await;
            return Ok(());
        }
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            let msg = format!(
                "node {} refused the copy: POST {url} answered HTTP {status}: {}",
                node.name,
                text.chars().take(500).collect::<String>()
            );
            let bitmap = status == reqwest::StatusCode::CONFLICT
                && serde_json::from_str::<sendense_shared::api::ErrorBody>(&text)
                    .is_ok_and(|b| b.error == sendense_shared::errors::ErrorCode::BitmapMissing);
            if bitmap {
                Refusal::BitmapMissing(msg)
            } else {
                Refusal::Other(msg)
            }
        }
        Err(e) => Refusal::Other(format!("node {} unreachable: POST {url}: {e}", node.name)),
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
pub async fn forward_cancel(jm: &JobManager, id: &BackupId, node: &NodeTarget) {
    let url = format!(
        "{}/api/v1/backup/{id}/cancel",
        node.api_url.trim_end_matches('/')
    );
    let t = Instant::now();
    let (level, msg) = match jm
        .deps()
        .http
        .post(&url)
        .bearer_auth(jm.deps().token.as_str())
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => (
            Level::Info,
            format!(
                "node {} confirmed the cancel: HTTP {} after {} ms",
                node.name,
                r.status(),
                t.elapsed().as_millis()
            ),
        ),
        Ok(r) => (
            Level::Warn,
            format!(
                "node {} answered the cancel (POST {url}) with HTTP {}",
                node.name,
                r.status()
            ),
        ),
        Err(e) => (
            Level::Warn,
            format!(
                "node {} unreachable for the cancel (POST {url}): {e}",
                node.name
            ),
        ),
    };
    jm.event(id, level, "node_cancel", msg, None).await;
}

/// While a node's job runs, checks on the node whenever it has been silent for a watch
/// interval: a node that forgot the job (restarted), reports it failed, or stays unreachable
/// for `node_lost_after` fails the job, so a dead node never holds ports and qemu-nbd forever.
pub async fn watch_node(jm: &JobManager, job: std::sync::Arc<LiveJob>, node: NodeTarget) {
    let interval = jm.deps().node_watch_interval;
    let lost_after = jm.deps().node_lost_after;
    let url = format!(
        "{}/api/v1/backup/{}",
        node.api_url.trim_end_matches('/'),
        job.id
    );
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
        if job.since_last_report() < interval {
            unreachable_since = None;
            continue;
        }
        let answer = jm
            .deps()
            .http
            .get(&url)
            .bearer_auth(jm.deps().token.as_str())
            .timeout(interval.max(std::time::Duration::from_secs(2)))
            .send()
            .await;
        let failure = match answer {
            Ok(r) if r.status().is_success() => {
                unreachable_since = None;
                match r.json::<NodeBackupState>().await {
                    Ok(st) if matches!(st.status, JobStatus::Failed | JobStatus::Cancelled) => {
                        Some(format!(
                            "node {} reports the copy {} without a completion report: {}",
                            node.name,
                            st.status.as_str(),
                            st.error_message.unwrap_or_else(|| "no message".into())
                        ))
                    }
                    _ => None,
                }
            }
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => Some(format!(
                "node {} no longer knows backup {} (GET {url} answered 404: restarted?)",
                node.name, job.id
            )),
            Ok(r) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                (since.elapsed() >= lost_after).then(|| {
                    format!(
                        "node {} answers GET {url} with HTTP {} for {} s",
                        node.name,
                        r.status(),
                        since.elapsed().as_secs()
                    )
                })
            }
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() < lost_after {
                    jm.event(
                        &job.id,
                        Level::Warn,
                        "node_unreachable",
                        format!("node {} did not answer GET {url}: {e}", node.name),
                        None,
                    )
                    .await;
                }
                (since.elapsed() >= lost_after).then(|| {
                    format!(
                        "node {} lost: no answer to GET {url} for {} s ({e})",
                        node.name,
                        since.elapsed().as_secs()
                    )
                })
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
                })
                .collect(),
            nbd_targets_string: String::new(),
            bytes_transferred: 1,
            total_bytes: 1,
            created_at: chrono::Utc::now(),
            started_at: None,
            completed_at: None,
            error_message: None,
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
