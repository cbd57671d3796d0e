//! Which kind of backup a job is: a full one, an incremental on the VM's last verified point,
//! or a full one because the records or the node say an incremental cannot be done (among
//! them a corrupt chain: the newest point, or any point it builds on, found corrupt by a verify
//! job). Decided before anything is prepared.

use super::super::node::{BaseCheck, Previous, change_ids_of, check_base};
use super::super::{JobError, JobManager, NodeAddr};
use sendense_shared::api::{Backup, BackupType, Integrity, Vm};
use sendense_shared::ids::{BackupId, DiskKey};
use std::collections::HashSet;
use std::path::PathBuf;

/// The kind a job runs as, and why when it is not the one asked for.
pub(super) struct Kind {
    pub effective: BackupType,
    /// Per disk of an incremental: the backup and image its new image is based on.
    pub parents: Vec<(DiskKey, BackupId, PathBuf)>,
    pub previous: Option<Previous>,
    /// Why a requested incremental runs as a full backup.
    pub fallback: Option<String>,
}

impl Kind {
    fn full(previous: Option<Previous>, why: Option<String>) -> Kind {
        Kind {
            effective: BackupType::Full,
            parents: Vec::new(),
            previous,
            fallback: why,
        }
    }
}

/// The hub's records first ([`from_records`]), then one round trip to the node before anything
/// is prepared: a node that cannot do the incremental says so now, and the job is a full one
/// from the start (no export is built twice). A node that cannot say (unreachable, older)
/// leaves the incremental; a refusal at start still falls back in place.
pub(super) async fn choose(
    jm: &JobManager,
    vm: &Vm,
    requested: BackupType,
    node: Option<&NodeAddr>,
    backup_id: &BackupId,
) -> Result<Kind, JobError> {
    let kind = from_records(jm, vm, requested).await?;
    let (Some(node), BackupType::Incremental, Some(p)) = (node, kind.effective, &kind.previous)
    else {
        return Ok(kind);
    };
    match check_base(jm, node, backup_id, vm.name_on_node(), p).await {
        BaseCheck::Refused(why) => Ok(Kind::full(
            None,
            Some(format!(
                "the node refused the incremental before any export was prepared: {why}"
            )),
        )),
        BaseCheck::Unknown(why) => {
            tracing::info!(vm = %vm.vm_name, cause = %why, "incremental base not checked; going on");
            Ok(kind)
        }
        BaseCheck::Holds => Ok(kind),
    }
}

/// Full stays full. Incremental needs the last completed backup of the VM with an image, still
/// on disk, for every current disk; otherwise the job falls back to full and says why.
async fn from_records(jm: &JobManager, vm: &Vm, requested: BackupType) -> Result<Kind, JobError> {
    if requested == BackupType::Full {
        return Ok(Kind::full(None, None));
    }
    let Some(last) = jm
        .deps()
        .db
        .last_completed_backup(&vm.vm_context_id)
        .await?
    else {
        return Ok(Kind::full(
            None,
            Some(format!(
                "VM {} has no completed backup to build on",
                vm.vm_name
            )),
        ));
    };
    if let Some(why) = corrupt_in_chain(jm, &last).await? {
        return Ok(Kind::full(None, Some(why)));
    }
    let mut parents = Vec::new();
    for d in &vm.disks {
        let Some(prev) = last.disk_results.iter().find(|r| r.disk_key == d.disk_key) else {
            return Ok(Kind::full(
                None,
                Some(format!(
                    "disk {} is not in the last completed backup {}",
                    d.disk_key, last.backup_id
                )),
            ));
        };
        let path = PathBuf::from(&prev.qcow2_path);
        if !path.is_file() {
            return Ok(Kind::full(
                None,
                Some(format!(
                    "image {} of disk {} of backup {} is missing",
                    path.display(),
                    d.disk_key,
                    last.backup_id
                )),
            ));
        }
        parents.push((d.disk_key, last.backup_id.clone(), path));
    }
    let keys: Vec<DiskKey> = vm.disks.iter().map(|d| d.disk_key).collect();
    let previous = Previous {
        change_ids: change_ids_of(&last, &keys),
        backup_id: last.backup_id,
    };
    Ok(Kind {
        effective: BackupType::Incremental,
        parents,
        previous: Some(previous),
        fallback: None,
    })
}

/// The first corrupt point of the chain an incremental on `last` would build on (`last`
/// itself, then its parents through every disk), as "the chain is corrupt: point X (why)".
async fn corrupt_in_chain(jm: &JobManager, last: &Backup) -> Result<Option<String>, JobError> {
    let db = &jm.deps().db;
    let mut seen = HashSet::new();
    let mut next = vec![last.clone()];
    while let Some(p) = next.pop() {
        if !seen.insert(p.backup_id.clone()) {
            continue;
        }
        if p.integrity == Integrity::Corrupt {
            return Ok(Some(format!(
                "the chain is corrupt: point {}{}",
                p.backup_id,
                p.integrity_detail
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            )));
        }
        let parents: HashSet<BackupId> = db
            .backup_disks(&p.backup_id)
            .await?
            .into_iter()
            .filter_map(|d| d.parent_backup_id)
            .collect();
        for id in parents {
            match db.get_backup(&id).await {
                Ok(b) => next.push(b),
                // A parent no longer in the catalog: the image check below decides.
                Err(crate::db::DbError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(None)
}
