//! The inventory as the hub sees it: a vSphere VM as a [`SourceVm`], its disks' labels saying
//! when a snapshot would not freeze them, and the refusal of such a VM.

use super::DRIVER;
use crate::source::{SourceDisk, SourceError, SourceVm};
use sendense_shared::ids::DiskKey;
use sendense_vsphere::{DiskInfo, VmInfo};

/// A VM as the inventory shows it.
pub(super) fn source_vm(vm: &VmInfo) -> SourceVm {
    SourceVm {
        vm_name: vm.name.clone(),
        vm_id: vm.uuid.clone(),
        disks: vm
            .disks
            .iter()
            .map(|d| SourceDisk {
                disk_key: DiskKey(d.key as i64),
                unit_number: d.unit_number,
                size_bytes: d.capacity_bytes,
                label: disk_label(d),
                controller: Some(d.controller_label.clone()).filter(|c| !c.is_empty()),
                backing_file: Some(d.file_name.clone()).filter(|f| !f.is_empty()),
                thin_provisioned: d.thin,
            })
            .collect(),
        driver: DRIVER,
        change_tracking: Some(vm.cbt_enabled),
    }
}

/// The inventory label: the disk's own, and for a disk that snapshots do not freeze, what it
/// is and that the VM cannot be backed up (the console and the hub show labels as they are).
pub(super) fn disk_label(d: &DiskInfo) -> String {
    match (&d.raw_mapping, d.not_frozen_by_snapshots()) {
        (_, None) => d.label.clone(),
        (Some(_), Some(_)) => format!(
            "{} (raw device mapping: not in VM snapshots, VM cannot be backed up)",
            d.label
        ),
        (None, Some(_)) => format!(
            "{} ({}: not in VM snapshots, VM cannot be backed up)",
            d.label,
            d.mode.as_deref().unwrap_or_default()
        ),
    }
}

/// Refuses a VM with a disk a snapshot does not freeze: its copy would be read while the guest
/// writes to it, so the backup would not be consistent (and an independent disk's data would
/// not even be the snapshot's instant).
pub(super) fn check_frozen(vm: &VmInfo) -> Result<(), SourceError> {
    let problems: Vec<String> = vm
        .disks
        .iter()
        .filter_map(|d| {
            d.not_frozen_by_snapshots()
                .map(|why| format!("disk {} ({}) is {why}", d.key, d.label))
        })
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    Err(SourceError::Hypervisor {
        vm: vm.name.clone(),
        operation: "snapshot",
        detail: format!(
            "refused: {}; a backup of the VM would not be consistent (make the disk persistent, or remove it from the VM)",
            problems.join("; ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{disk, vm};
    use super::*;

    #[test]
    fn inventory_maps_device_keys_units_and_cbt() {
        let v = source_vm(&vm(true, vec![disk(2000, None), disk(2001, None)]));
        assert_eq!(v.driver, "vsphere");
        assert_eq!(v.vm_id, "5029-uuid");
        assert_eq!(v.change_tracking, Some(true));
        let d = &v.disks[1];
        assert_eq!(d.disk_key, DiskKey(2001));
        assert_eq!(d.unit_number, 1);
        assert_eq!(d.controller.as_deref(), Some("SCSI controller 0"));
        assert_eq!(
            d.backing_file.as_deref(),
            Some("[LocalDS_0] vm1/vm1_2001.vmdk")
        );
        assert_eq!(d.thin_provisioned, Some(true));
    }
}
