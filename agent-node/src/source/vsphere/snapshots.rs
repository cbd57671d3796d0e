//! The snapshot's life: taking it (journal first, one `CreateSnapshot_Task`, then the exports),
//! removing it (one that is gone counts as removed), releasing what a backup held, and whose a
//! snapshot is ([`ownership`]).

use super::inventory::check_frozen;
use super::session::KeepAlive;
use super::{DRIVER, Holding, SNAPSHOT_KIND, VM_KIND, VsphereDriver, areas::check_base, journal};
use crate::source::nbdkit::Nbdkit;
use crate::source::{Snapshot, SnapshotRequest, SourceError};
use sendense_shared::api::BackupType;
use sendense_shared::ids::BackupId;
use sendense_shared::names::validate_name;
use sendense_vsphere::{MoRef, SnapshotInfo};
use std::path::Path;

/// Prefix of every snapshot a node creates: `sendense-<node>-<backup id>`.
pub const SNAPSHOT_PREFIX: &str = "sendense-";
/// In a snapshot's description, before the quoted node name.
const OWNER_MARK: &str = "Sendense node \"";

impl VsphereDriver {
    /// Removes a snapshot; one that is gone (or whose VM is) counts as removed.
    pub(super) async fn remove_snapshot(
        &self,
        vm_name: &str,
        snapshot: &MoRef,
    ) -> Result<(), SourceError> {
        match self
            .call(|c| async move { c.remove_snapshot(snapshot).await })
            .await
        {
            Ok(()) => {
                tracing::info!(vm = %vm_name, snapshot = %snapshot.value, "snapshot removed");
                Ok(())
            }
            Err(e) if e.fault() == Some("ManagedObjectNotFound") => {
                tracing::info!(vm = %vm_name, snapshot = %snapshot.value, "snapshot already gone");
                Ok(())
            }
            Err(e) => Err(self.error(vm_name, "RemoveSnapshot_Task", e)),
        }
    }

    /// Removes every snapshot of `vm` named `name` (after a create task whose answer was lost).
    pub(super) async fn remove_named(
        &self,
        vm: &MoRef,
        vm_name: &str,
        name: &str,
    ) -> Result<(), SourceError> {
        let info = match self.call(|c| async move { c.vm(vm).await }).await {
            Ok(info) => info,
            Err(e) if e.fault() == Some("ManagedObjectNotFound") => return Ok(()),
            Err(e) => return Err(self.error(vm_name, "reading the VM's snapshots", e)),
        };
        for s in info.snapshots.iter().filter(|s| s.name == name) {
            self.remove_snapshot(vm_name, &s.moref).await?;
        }
        Ok(())
    }

    pub(super) async fn take(
        &self,
        request: &SnapshotRequest,
    ) -> Result<(Snapshot, Holding), SourceError> {
        let vm_name = request.vm_name.as_str();
        let mut vm = self.find(vm_name, "snapshot").await?;
        if vm.disks.is_empty() {
            return Err(SourceError::NoDisks { vm: vm.name });
        }
        check_frozen(&vm)?;
        if request.backup_type == BackupType::Incremental {
            check_base(&vm, request)?;
        }
        let stale: Vec<MoRef> = vm
            .snapshots
            .iter()
            .filter(|s| ownership(&self.node, s) == Some(Ownership::Mine))
            .map(|s| s.moref.clone())
            .collect();
        for s in &stale {
            tracing::warn!(vm = %vm_name, snapshot = %s.value, "removing a Sendense snapshot an earlier run left");
            self.remove_snapshot(vm_name, s).await?;
        }
        // RemoveSnapshot_Task runs with removeChildren=false: exactly the removed ones are gone
        // from the (flattened) tree, so the list is brought up to date here instead of listing
        // the whole inventory of every datacenter again.
        vm.snapshots.retain(|s| !stale.contains(&s.moref));
        if !self.uses_vddk() {
            let foreign: Vec<&str> = vm.snapshots.iter().map(|s| s.name.as_str()).collect();
            if !foreign.is_empty() {
                tracing::warn!(vm = %vm_name, snapshots = ?foreign, "VM has snapshots; HTTPS file access cannot read delta disks");
                return Err(SourceError::Unsupported {
                    vm: vm.name,
                    driver: DRIVER,
                    what: "backing up a VM that already has snapshots without VDDK (set vddk_libdir, or remove the snapshots)",
                });
            }
        }
        std::fs::create_dir_all(&self.run_dir).map_err(|source| SourceError::Io {
            what: "creating run directory",
            path: self.run_dir.clone(),
            source,
        })?;
        let stem = self.stem(&request.backup_id);
        let journal_path = journal::path(&self.run_dir, &stem);
        let name = snapshot_name(&self.node, &request.backup_id);
        let mut entry = journal::Entry {
            backup_id: request.backup_id.0.clone(),
            vm_name: vm.name.clone(),
            vm_moref: vm.moref.value.clone(),
            snapshot_name: name.clone(),
            snapshot_moref: None,
        };
        // The journal goes first: whatever happens after this line, a restarted node can undo.
        journal::write(&journal_path, &entry).map_err(|source| SourceError::Io {
            what: "writing snapshot journal",
            path: journal_path.clone(),
            source,
        })?;
        let description = format!(
            "Taken by {OWNER_MARK}{}\" for backup {} at {}. Sendense removes it when the backup ends, or at the node's next start-up.",
            self.node,
            request.backup_id,
            chrono::Utc::now().to_rfc3339()
        );
        let (vm_ref, desc, quiesce) = (&vm.moref, description.as_str(), self.quiesce);
        let created = self
            .call(|c| {
                let name = name.as_str();
                async move { c.create_snapshot(vm_ref, name, desc, quiesce).await }
            })
            .await;
        let snapshot = match created {
            Ok(s) => s,
            Err(e) => {
                let err = self.error(vm_name, "CreateSnapshot_Task", e);
                // The task may have made the snapshot before its answer was lost.
                match self.remove_named(&vm.moref, vm_name, &name).await {
                    Ok(()) => {
                        let _ = journal::remove(&journal_path);
                    }
                    Err(re) => {
                        tracing::error!(vm = %vm_name, error = %re, "cleanup after a failed snapshot")
                    }
                }
                return Err(err);
            }
        };
        tracing::info!(vm = %vm_name, backup_id = %request.backup_id, snapshot = %snapshot.value,
            disks = vm.disks.len(), "snapshot taken (one CreateSnapshot_Task)");
        entry.snapshot_moref = Some(snapshot.value.clone());
        if let Err(e) = journal::write(&journal_path, &entry) {
            // The first entry (by name) still lets a restart find it.
            tracing::warn!(path = %journal_path.display(), error = %e, "cannot update snapshot journal");
        }
        match self.export(&vm, &snapshot, request, &stem).await {
            Ok((disks, exports)) => Ok((
                Snapshot {
                    backup_id: request.backup_id.clone(),
                    vm_name: vm.name.clone(),
                    backup_type: request.backup_type,
                    disks,
                    consistency: None,
                    hardware: None,
                },
                Holding {
                    backup_id: request.backup_id.clone(),
                    snapshot,
                    journal: journal_path,
                    keepalive: KeepAlive::start(
                        self.session.clone(),
                        vm.name.clone(),
                        exports.iter().filter_map(Nbdkit::cookie_file).collect(),
                        self.keepalive,
                    ),
                    exports,
                },
            )),
            Err(e) => {
                tracing::warn!(vm = %vm_name, backup_id = %request.backup_id, error = %e,
                    "exporting the snapshot failed; removing it");
                match self.remove_snapshot(vm_name, &snapshot).await {
                    Ok(()) => {
                        let _ = journal::remove(&journal_path);
                    }
                    Err(re) => {
                        tracing::error!(vm = %vm_name, error = %re, "removing the snapshot after a failure")
                    }
                }
                Err(e)
            }
        }
    }

    pub(super) async fn release_holding(
        &self,
        vm_name: &str,
        h: Holding,
    ) -> Result<(), SourceError> {
        // First, so that no cookie file is written after nbdkit's files are removed.
        h.keepalive.stop().await;
        for n in &h.exports {
            n.stop().await;
        }
        self.remove_snapshot(vm_name, &h.snapshot).await?;
        journal::remove(&h.journal).map_err(|source| SourceError::Io {
            what: "removing snapshot journal",
            path: h.journal.clone(),
            source,
        })
    }

    /// Removes the snapshot of a journal entry (by reference, or by name when the create task
    /// never answered), then the entry.
    pub(super) async fn release_entry(
        &self,
        path: &Path,
        e: &journal::Entry,
    ) -> Result<String, SourceError> {
        let what = match &e.snapshot_moref {
            Some(m) => {
                self.remove_snapshot(&e.vm_name, &MoRef::new(SNAPSHOT_KIND, m.clone()))
                    .await?;
                format!("VM {}: snapshot {} ({m})", e.vm_name, e.snapshot_name)
            }
            None => {
                self.remove_named(
                    &MoRef::new(VM_KIND, e.vm_moref.clone()),
                    &e.vm_name,
                    &e.snapshot_name,
                )
                .await?;
                format!("VM {}: snapshot {}", e.vm_name, e.snapshot_name)
            }
        };
        journal::remove(path).map_err(|source| SourceError::Io {
            what: "removing snapshot journal",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(what)
    }
}

/// `sendense-<node>-<backup id>`.
pub(super) fn snapshot_name(node: &str, backup_id: &BackupId) -> String {
    format!("{SNAPSHOT_PREFIX}{node}-{backup_id}")
}

/// Which Sendense node took a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// This node: named `sendense-<node>-...` and its description names this node.
    Mine,
    /// The node the description names (not this one).
    Node(String),
    /// Named `sendense-...` but its description names no node (an older version took it), or
    /// names this node under another name.
    Unknown,
}

/// Whose a snapshot is, as seen by the node `node`; `None` when Sendense did not take it.
pub fn ownership(node: &str, s: &SnapshotInfo) -> Option<Ownership> {
    if !s.name.starts_with(SNAPSHOT_PREFIX) {
        return None;
    }
    let owner = s
        .description
        .split_once(OWNER_MARK)
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(name, _)| name);
    Some(match owner {
        None => Ownership::Unknown,
        // Renamed by hand, or a node name with a quote: not clearly ours, so not removed.
        Some(o) if o == node && !s.name.starts_with(&format!("{SNAPSHOT_PREFIX}{node}-")) => {
            Ownership::Unknown
        }
        Some(o) if o == node => Ownership::Mine,
        Some(o) => Ownership::Node(o.to_string()),
    })
}

/// The backup id when it is a safe file name and the nbdkit socket path stays short, else a
/// hash of it.
pub(super) fn file_stem(run_dir: &Path, backup_id: &BackupId) -> String {
    let id = backup_id.0.as_str();
    // "<run_dir>/nbdkit-<stem>-<key>.sock" must fit a unix socket path (107 bytes).
    let fits =
        run_dir.as_os_str().len() + "/nbdkit-".len() + id.len() + "-2147483647.sock".len() <= 107;
    if validate_name("backup id", id).is_ok() && fits {
        id.to_string()
    } else {
        blake3::hash(id.as_bytes()).to_hex()[..16].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_mine_only_by_name_and_description() {
        let snap = |name: &str, description: &str| SnapshotInfo {
            moref: MoRef::new(SNAPSHOT_KIND, "snapshot-1"),
            name: name.into(),
            description: description.into(),
        };
        let by = |node: &str| format!("Taken by {OWNER_MARK}{node}\" for backup b at t.");
        let name = snapshot_name("a", &BackupId::from("b-1"));
        assert_eq!(name, "sendense-a-b-1");
        assert_eq!(
            ownership("a", &snap(&name, &by("a"))),
            Some(Ownership::Mine)
        );
        // Node "a-b" took "sendense-a-b-7": not node a's, although the name fits.
        assert_eq!(
            ownership("a", &snap("sendense-a-b-7", &by("a-b"))),
            Some(Ownership::Node("a-b".into()))
        );
        assert_eq!(
            ownership("a", &snap("sendense-x-1", &by("a"))),
            Some(Ownership::Unknown)
        );
        assert_eq!(
            ownership(
                "a",
                &snap("sendense-5f1c", "Taken by Sendense for backup 5f1c at t.")
            ),
            Some(Ownership::Unknown)
        );
        assert_eq!(ownership("a", &snap("before upgrade", &by("a"))), None);
    }

    #[test]
    fn file_stems_are_safe_and_short() {
        let run = Path::new("/run/sendense-node");
        assert_eq!(file_stem(run, &BackupId::from("b-1")), "b-1");
        let odd = file_stem(run, &BackupId::from("a/b"));
        assert_eq!(odd.len(), 16);
        let long = file_stem(Path::new(&"/x".repeat(45)), &BackupId::from("b-1"));
        assert_eq!(long.len(), 16);
    }
}
