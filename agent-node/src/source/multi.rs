//! Several drivers behind one [`SourceDriver`]: the node serves QEMU VMs (from `[qmp]`) and
//! vSphere VMs (from `[vsphere]`) at once, and the jobs, the API and the hub see one inventory.
//!
//! - `list_vms` concatenates the drivers' lists in driver order. A driver that cannot list
//!   (vCenter down) is left out with a warning while another answers; only when every driver
//!   fails is the first error returned.
//! - Every other call is routed by VM name to the driver that has the VM: the one remembered
//!   from an earlier call or listing, else the first driver whose `vm()` does not answer
//!   [`SourceError::UnknownVm`].
//! - A VM name must belong to one driver: [`MultiDriver::start`] refuses the same name in two
//!   drivers' inventories. A duplicate that appears later (a VM created in vCenter with the name
//!   of a QEMU VM) is left out of the later driver's list with an error in the log: routing keeps
//!   going to the first.
//! - `recover` runs every driver's recovery and merges the reports.

use super::{
    BoxFuture, RecoveryReport, ReleaseOutcome, Snapshot, SnapshotRequest, SourceDriver,
    SourceError, SourceVm,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// Why the composite could not be built.
#[derive(Debug, Error)]
pub enum MultiError {
    #[error(
        "VM name {vm:?} is served by both the {first} and the {second} driver; a VM name must be unique on a node (rename one, or leave it out of [vsphere] vms)"
    )]
    DuplicateVm {
        vm: String,
        first: &'static str,
        second: &'static str,
    },
    #[error("no source driver configured: give [qmp] VMs or a [vsphere] section")]
    NoDrivers,
}

struct Member {
    /// For messages: "qemu", "vsphere".
    name: &'static str,
    driver: Arc<dyn SourceDriver>,
}

/// The composite driver.
pub struct MultiDriver {
    members: Vec<Member>,
    /// VM name → index in `members`, learnt from listings and routed calls.
    owner: Mutex<HashMap<String, usize>>,
}

impl MultiDriver {
    /// Builds the composite from `(name, driver)` pairs and checks, from each driver's
    /// inventory now, that no VM name is in two of them. A driver that cannot list now (its
    /// hypervisor is down) is not checked; see the module doc for later duplicates.
    pub async fn start(
        drivers: Vec<(&'static str, Arc<dyn SourceDriver>)>,
    ) -> Result<MultiDriver, MultiError> {
        if drivers.is_empty() {
            return Err(MultiError::NoDrivers);
        }
        let multi = MultiDriver {
            members: drivers
                .into_iter()
                .map(|(name, driver)| Member { name, driver })
                .collect(),
            owner: Mutex::new(HashMap::new()),
        };
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, m) in multi.members.iter().enumerate() {
            match m.driver.list_vms().await {
                Ok(vms) => {
                    for vm in vms {
                        if let Some(&first) = seen.get(&vm.vm_name) {
                            return Err(MultiError::DuplicateVm {
                                vm: vm.vm_name,
                                first: multi.members[first].name,
                                second: m.name,
                            });
                        }
                        seen.insert(vm.vm_name, i);
                    }
                }
                Err(e) => {
                    tracing::warn!(driver = m.name, error = %e,
                        "cannot list this driver's VMs at start-up; its VM names are checked for duplicates once it answers");
                }
            }
        }
        *multi.lock() = seen;
        Ok(multi)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.owner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The driver that has `vm_name`.
    async fn route(&self, vm_name: &str) -> Result<&Arc<dyn SourceDriver>, SourceError> {
        let known = self.lock().get(vm_name).copied();
        if let Some(i) = known {
            return Ok(&self.members[i].driver);
        }
        for (i, m) in self.members.iter().enumerate() {
            match m.driver.vm(vm_name).await {
                Err(SourceError::UnknownVm { .. }) => continue,
                // Known to this driver, even if its hypervisor fails right now: the call goes
                // there and reports that failure.
                _ => {
                    self.lock().insert(vm_name.to_string(), i);
                    return Ok(&m.driver);
                }
            }
        }
        Err(SourceError::UnknownVm {
            vm: vm_name.to_string(),
        })
    }

    /// Runs `call` on the driver that has `vm_name`, and forgets where the VM lives when that
    /// driver no longer knows it (deleted, renamed).
    async fn routed<'a, T>(
        &'a self,
        vm_name: &str,
        call: impl FnOnce(&'a Arc<dyn SourceDriver>) -> BoxFuture<'a, Result<T, SourceError>>,
    ) -> Result<T, SourceError> {
        let r = call(self.route(vm_name).await?).await;
        if matches!(r, Err(SourceError::UnknownVm { .. })) {
            self.lock().remove(vm_name);
        }
        r
    }
}

impl SourceDriver for MultiDriver {
    fn list_vms(&self) -> BoxFuture<'_, Result<Vec<SourceVm>, SourceError>> {
        Box::pin(async move {
            let mut all: Vec<SourceVm> = Vec::new();
            let mut owners: HashMap<String, usize> = HashMap::new();
            let mut first_error = None;
            let mut answered = 0;
            for (i, m) in self.members.iter().enumerate() {
                match m.driver.list_vms().await {
                    Ok(vms) => {
                        answered += 1;
                        for vm in vms {
                            if let Some(&first) = owners.get(&vm.vm_name) {
                                tracing::error!(vm = %vm.vm_name, first = self.members[first].name,
                                    second = m.name, "the same VM name in two drivers; the second is left out");
                                continue;
                            }
                            owners.insert(vm.vm_name.clone(), i);
                            all.push(vm);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(driver = m.name, error = %e, "listing VMs failed; they are left out");
                        first_error.get_or_insert(e);
                    }
                }
            }
            if answered == 0
                && let Some(e) = first_error
            {
                return Err(e);
            }
            let mut known = self.lock();
            for (vm, i) in owners {
                known.insert(vm, i);
            }
            Ok(all)
        })
    }

    fn vm<'a>(&'a self, vm_name: &'a str) -> BoxFuture<'a, Result<SourceVm, SourceError>> {
        Box::pin(async move { self.routed(vm_name, |d| d.vm(vm_name)).await })
    }

    fn check_incremental_base<'a>(
        &'a self,
        request: &'a SnapshotRequest,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            self.routed(&request.vm_name, |d| d.check_incremental_base(request))
                .await
        })
    }

    fn snapshot<'a>(
        &'a self,
        request: &'a SnapshotRequest,
    ) -> BoxFuture<'a, Result<Snapshot, SourceError>> {
        Box::pin(async move { self.routed(&request.vm_name, |d| d.snapshot(request)).await })
    }

    fn release<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        outcome: ReleaseOutcome,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            self.route(&snapshot.vm_name)
                .await?
                .release(snapshot, outcome)
                .await
        })
    }

    fn recover(&self) -> BoxFuture<'_, RecoveryReport> {
        Box::pin(async move {
            let mut all = RecoveryReport::default();
            for m in &self.members {
                let r = m.driver.recover().await;
                all.exports_removed.extend(r.exports_removed);
                all.jobs_cancelled.extend(r.jobs_cancelled);
                all.nodes_removed.extend(r.nodes_removed);
                all.files_removed.extend(r.files_removed);
                all.bitmaps_rolled_back.extend(r.bitmaps_rolled_back);
                all.snapshots_removed.extend(r.snapshots_removed);
                all.errors
                    .extend(r.errors.into_iter().map(|e| format!("{}: {e}", m.name)));
            }
            all
        })
    }

    fn enable_change_tracking<'a>(
        &'a self,
        vm_name: &'a str,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            self.routed(vm_name, |d| d.enable_change_tracking(vm_name))
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{SnapshotDisk, SourceDisk};
    use sendense_shared::api::BackupType;
    use sendense_shared::ids::{BackupId, DiskKey};

    /// A driver with a fixed list of VM names that records which calls reached it.
    struct Fixed {
        name: &'static str,
        vms: Vec<&'static str>,
        down: bool,
        calls: Mutex<Vec<String>>,
    }

    impl Fixed {
        fn new(name: &'static str, vms: &[&'static str]) -> Arc<Fixed> {
            Fixed::with(name, vms, false)
        }
        fn with(name: &'static str, vms: &[&'static str], down: bool) -> Arc<Fixed> {
            Arc::new(Fixed {
                name,
                vms: vms.to_vec(),
                down,
                calls: Mutex::new(Vec::new()),
            })
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        fn has(&self, vm: &str) -> Result<(), SourceError> {
            self.calls.lock().unwrap().push(vm.to_string());
            if !self.vms.contains(&vm) {
                return Err(SourceError::UnknownVm { vm: vm.into() });
            }
            if self.down {
                return Err(SourceError::Endpoint {
                    endpoint: self.name.into(),
                    detail: "down".into(),
                });
            }
            Ok(())
        }
        fn source_vm(&self, vm: &str) -> SourceVm {
            SourceVm {
                vm_name: vm.into(),
                vm_id: format!("{}-{vm}", self.name),
                disks: vec![SourceDisk {
                    disk_key: DiskKey(2000),
                    unit_number: 0,
                    size_bytes: 1,
                    label: "d".into(),
                    controller: None,
                    backing_file: None,
                    thin_provisioned: None,
                }],
                driver: self.name,
                change_tracking: None,
            }
        }
    }

    impl SourceDriver for Fixed {
        fn list_vms(&self) -> BoxFuture<'_, Result<Vec<SourceVm>, SourceError>> {
            Box::pin(async move {
                if self.down {
                    return Err(SourceError::Endpoint {
                        endpoint: self.name.into(),
                        detail: "down".into(),
                    });
                }
                Ok(self.vms.iter().map(|v| self.source_vm(v)).collect())
            })
        }
        fn vm<'a>(&'a self, vm_name: &'a str) -> BoxFuture<'a, Result<SourceVm, SourceError>> {
            Box::pin(async move { self.has(vm_name).map(|_| self.source_vm(vm_name)) })
        }
        fn check_incremental_base<'a>(
            &'a self,
            request: &'a SnapshotRequest,
        ) -> BoxFuture<'a, Result<(), SourceError>> {
            Box::pin(async move { self.has(&request.vm_name) })
        }
        fn snapshot<'a>(
            &'a self,
            request: &'a SnapshotRequest,
        ) -> BoxFuture<'a, Result<Snapshot, SourceError>> {
            Box::pin(async move {
                self.has(&request.vm_name)?;
                Ok(Snapshot {
                    backup_id: request.backup_id.clone(),
                    vm_name: request.vm_name.clone(),
                    backup_type: request.backup_type,
                    disks: vec![SnapshotDisk {
                        disk_key: DiskKey(2000),
                        size_bytes: 1,
                        socket: self.name.into(),
                        export: String::new(),
                        dirty_bitmap: None,
                        areas: None,
                        change_id: None,
                    }],
                    consistency: None,
                    hardware: None,
                })
            })
        }
        fn release<'a>(
            &'a self,
            snapshot: &'a Snapshot,
            _outcome: ReleaseOutcome,
        ) -> BoxFuture<'a, Result<(), SourceError>> {
            Box::pin(async move { self.has(&snapshot.vm_name) })
        }
        fn recover(&self) -> BoxFuture<'_, RecoveryReport> {
            Box::pin(async move {
                RecoveryReport {
                    exports_removed: vec![format!("{}-export", self.name)],
                    errors: vec!["could not".into()],
                    ..Default::default()
                }
            })
        }
        fn enable_change_tracking<'a>(
            &'a self,
            vm_name: &'a str,
        ) -> BoxFuture<'a, Result<(), SourceError>> {
            Box::pin(async move { self.has(vm_name) })
        }
    }

    fn request(vm: &str) -> SnapshotRequest {
        SnapshotRequest {
            backup_id: BackupId::from("b1"),
            vm_name: vm.into(),
            backup_type: BackupType::Full,
            previous_backup_id: None,
            previous_change_ids: Default::default(),
            require_application_consistency: false,
        }
    }

    #[tokio::test]
    async fn calls_go_to_the_driver_that_has_the_vm() {
        let q = Fixed::new("qemu", &["k1", "k2"]);
        let v = Fixed::new("vsphere", &["w1"]);
        let m = MultiDriver::start(vec![("qemu", q.clone()), ("vsphere", v.clone())])
            .await
            .unwrap();
        let names: Vec<String> = m
            .list_vms()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.vm_id)
            .collect();
        assert_eq!(names, ["qemu-k1", "qemu-k2", "vsphere-w1"]);
        let snap = m.snapshot(&request("w1")).await.unwrap();
        assert_eq!(snap.disks[0].socket, std::path::PathBuf::from("vsphere"));
        m.release(&snap, ReleaseOutcome::Success).await.unwrap();
        m.enable_change_tracking("w1").await.unwrap();
        m.check_incremental_base(&request("k2")).await.unwrap();
        assert_eq!(v.calls(), ["w1", "w1", "w1"], "routed from the listing");
        assert_eq!(q.calls(), ["k2"]);
        let e = m.vm("nope").await.unwrap_err();
        assert!(matches!(e, SourceError::UnknownVm { .. }), "{e}");
        let r = m.recover().await;
        assert_eq!(r.exports_removed, ["qemu-export", "vsphere-export"]);
        assert_eq!(r.errors, ["qemu: could not", "vsphere: could not"]);
    }

    #[tokio::test]
    async fn an_unlisted_vm_is_found_by_asking_each_driver() {
        let q = Fixed::new("qemu", &["k1"]);
        let v = Fixed::with("vsphere", &["w1"], true);
        let m = MultiDriver::start(vec![("qemu", q.clone()), ("vsphere", v.clone())])
            .await
            .unwrap();
        // The vSphere driver cannot list: its VMs are left out, QEMU's still listed.
        let vms = m.list_vms().await.unwrap();
        assert_eq!(vms.len(), 1);
        // A call for its VM still reaches it and reports its failure, not "unknown VM".
        let e = m.snapshot(&request("w1")).await.unwrap_err();
        assert!(matches!(e, SourceError::Endpoint { .. }), "{e}");
        assert_eq!(q.calls(), ["w1"]);
        // Only one driver and it is down: the listing fails with its error.
        let only = MultiDriver::start(vec![("vsphere", v.clone())])
            .await
            .unwrap();
        assert!(matches!(
            only.list_vms().await,
            Err(SourceError::Endpoint { .. })
        ));
    }

    #[tokio::test]
    async fn the_same_name_in_two_drivers_is_refused_at_start() {
        let e = MultiDriver::start(vec![
            ("qemu", Fixed::new("qemu", &["a", "db1"])),
            ("vsphere", Fixed::new("vsphere", &["db1"])),
        ])
        .await
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("\"db1\"") && e.contains("qemu") && e.contains("vsphere"),
            "{e}"
        );
        assert!(matches!(
            MultiDriver::start(vec![]).await,
            Err(MultiError::NoDrivers)
        ));
    }
}
