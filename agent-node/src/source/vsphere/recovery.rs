//! Start-up recovery: nbdkits from pid files stopped, the journal's snapshots removed, then
//! every other snapshot of this node's own on the VMs it may back up (other nodes' are left).

use super::snapshots::{Ownership, ownership};
use super::{VsphereDriver, journal};
use crate::source::RecoveryReport;
use crate::source::nbdkit;

impl VsphereDriver {
    /// What [`crate::source::SourceDriver::recover`] does for vSphere.
    pub(super) async fn recover_leftovers(&self) -> RecoveryReport {
        let mut report = RecoveryReport::default();
        let left = nbdkit::stop_leftovers(&self.run_dir).await;
        report.exports_removed.extend(left.stopped);
        report.files_removed.extend(left.files_removed);
        report.errors.extend(left.errors);
        // Unreachable (or refusing the login): say so once, rather than wait out a connect
        // timeout per journal entry; the entries stay for the next start or snapshot.
        if let Err(e) = self.session().await {
            let e = self.error("", "log in", e);
            report.errors.push(format!(
                "cannot look for leftover Sendense snapshots ({} journal entries kept): {e}",
                journal::all(&self.run_dir).len()
            ));
            return report;
        }
        for entry in journal::all(&self.run_dir) {
            match entry {
                Err(e) => report.errors.push(e),
                Ok((_, e)) if self.holds(&e.vm_name) => {}
                Ok((path, e)) => match self.release_entry(&path, &e).await {
                    Ok(what) => report.snapshots_removed.push(what),
                    Err(err) => report.errors.push(format!(
                        "snapshot {} of VM {} (journal {}): {err}",
                        e.snapshot_name,
                        e.vm_name,
                        path.display()
                    )),
                },
            }
        }
        // The node holds nothing it did not take in this run: every other snapshot of its
        // own on the VMs it may back up is a leftover. Other nodes' are theirs to remove.
        match self.call(|c| async move { c.list_vms().await }).await {
            Ok(vms) => {
                for vm in vms
                    .iter()
                    .filter(|vm| self.allow.as_ref().is_none_or(|a| a.contains(&vm.name)))
                    .filter(|vm| !self.holds(&vm.name))
                {
                    for s in &vm.snapshots {
                        match ownership(&self.node, s) {
                            Some(Ownership::Mine) => {}
                            Some(Ownership::Node(other)) => {
                                tracing::debug!(vm = %vm.name, snapshot = %s.name, node = %other,
                                        "leaving another node's snapshot");
                                continue;
                            }
                            Some(Ownership::Unknown) => {
                                report.errors.push(format!(
                                        "snapshot {} ({}) of VM {}: taken by a Sendense version that did not record the node; not removed, as another node may be reading it (remove it by hand once no backup of the VM runs)",
                                        s.name, s.moref.value, vm.name
                                    ));
                                continue;
                            }
                            None => continue,
                        }
                        match self.remove_snapshot(&vm.name, &s.moref).await {
                            Ok(()) => report.snapshots_removed.push(format!(
                                "VM {}: snapshot {} ({})",
                                vm.name, s.name, s.moref.value
                            )),
                            Err(e) => report.errors.push(format!(
                                "snapshot {} ({}) of VM {}: {e}",
                                s.name, s.moref.value, vm.name
                            )),
                        }
                    }
                }
            }
            Err(e) => report.errors.push(format!(
                "cannot look for leftover Sendense snapshots: {}",
                self.error("", "listing VMs", e)
            )),
        }
        report
    }
}
