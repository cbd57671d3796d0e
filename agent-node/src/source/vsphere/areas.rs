//! What to copy of each disk: whether an incremental may start from the hub's change ids, and
//! the areas `QueryChangedDiskAreas` gives (looped over the disk; the rules are in [`super::cbt`]).

use super::{VsphereDriver, cbt};
use crate::source::{SnapshotRequest, SourceError};
use sendense_shared::api::BackupType;
use sendense_shared::ids::DiskKey;
use sendense_vsphere::{DiskInfo, MoRef, VmInfo};

/// Whether an incremental of `vm` may start from the request's change ids.
pub(super) fn check_base(vm: &VmInfo, request: &SnapshotRequest) -> Result<(), SourceError> {
    if vm.disks.is_empty() {
        return Err(SourceError::NoDisks {
            vm: vm.name.clone(),
        });
    }
    for d in &vm.disks {
        let key = DiskKey(d.key as i64);
        if let Some(detail) = cbt::base_problem(
            request.previous_change_ids.get(&key).map(String::as_str),
            vm.cbt_enabled,
            d.change_id.as_deref(),
        ) {
            return Err(SourceError::IncrementalBase {
                vm: vm.name.clone(),
                disk_key: key,
                detail,
            });
        }
    }
    Ok(())
}

impl VsphereDriver {
    /// What to copy of one disk: `QueryChangedDiskAreas` looped over the disk.
    pub(super) async fn areas(
        &self,
        vm: &VmInfo,
        snapshot: &MoRef,
        disk: &DiskInfo,
        request: &SnapshotRequest,
    ) -> Result<Option<Vec<(u64, u64)>>, SourceError> {
        let key = DiskKey(disk.key as i64);
        let incremental = request.backup_type == BackupType::Incremental;
        let change_id = if incremental {
            request
                .previous_change_ids
                .get(&key)
                .cloned()
                .ok_or_else(|| SourceError::IncrementalBase {
                    vm: vm.name.clone(),
                    disk_key: key,
                    detail: "no change id of the previous backup (the hub sent none for this disk)"
                        .into(),
                })?
        } else if vm.cbt_enabled {
            "*".to_string()
        } else {
            return Ok(None);
        };
        let capacity = disk.capacity_bytes;
        let mut areas = Vec::new();
        let mut start = 0u64;
        while start < capacity {
            let (vm_ref, cid) = (&vm.moref, change_id.as_str());
            let answer = self
                .call(|c| async move {
                    c.query_changed_disk_areas(vm_ref, snapshot, disk.key, start, cid)
                        .await
                })
                .await;
            let r = match answer {
                Ok(r) => r,
                Err(e) if incremental && e.fault() == Some("FileFault") => {
                    return Err(SourceError::IncrementalBase {
                        vm: vm.name.clone(),
                        disk_key: key,
                        detail: format!("the host does not know change id {change_id:?}: {e}"),
                    });
                }
                Err(e) if !incremental && e.fault().is_some() => {
                    // A full is correct without the map, only slower.
                    tracing::warn!(vm = %vm.name, disk_key = %key, error = %e,
                        "QueryChangedDiskAreas(\"*\") failed; reading every block of the disk");
                    return Ok(None);
                }
                Err(e) => return Err(self.error(&vm.name, "QueryChangedDiskAreas", e)),
            };
            let next = r.start_offset.saturating_add(r.length);
            areas.extend(r.areas);
            if next <= start {
                return Err(SourceError::Hypervisor {
                    vm: vm.name.clone(),
                    operation: "QueryChangedDiskAreas",
                    detail: format!(
                        "disk {key}: the answer for offset {start} covers nothing (startOffset {}, length {})",
                        r.start_offset, r.length
                    ),
                });
            }
            start = next;
        }
        Ok(Some(cbt::normalize(areas, capacity)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{disk, incremental, vm};
    use super::*;

    #[test]
    fn incremental_base_names_the_disk_and_the_reason() {
        let a = "52 aa/4";
        let v = vm(
            true,
            vec![disk(2000, Some("52 aa/9")), disk(2001, Some("52 bb/2"))],
        );
        let e = check_base(&v, &incremental(&[(2000, a)])).unwrap_err();
        assert!(
            matches!(&e, SourceError::IncrementalBase { disk_key, detail, .. }
                if *disk_key == DiskKey(2001) && detail.contains("hub sent none")),
            "{e}"
        );
        let e = check_base(&v, &incremental(&[(2000, a), (2001, "52 cc/1")])).unwrap_err();
        assert!(e.to_string().contains("reset"), "{e}");
        assert!(check_base(&v, &incremental(&[(2000, a), (2001, "52 bb/1")])).is_ok());
        let off = vm(false, v.disks.clone());
        let e = check_base(&off, &incremental(&[(2000, a), (2001, "52 bb/1")])).unwrap_err();
        assert!(e.to_string().contains("off"), "{e}");
    }
}
