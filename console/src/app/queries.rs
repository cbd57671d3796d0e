//! The derived views of the state that the UI draws: filtered rows of each view, port cells,
//! rates. All `&self`.

use super::{App, DEFAULT_PORT_RANGE, JobRef, JobRow, PortCell, Reach, TunnelRow};
use crate::strings;
use crate::view::View;
use sendense_shared::api::{
    Backup, DiskStatus, JobEvent, JobStatus, ProcessInfo, Recovery, Restore, Vm,
};
use sendense_shared::ids::{BackupId, DiskKey};

fn matches(filter: &str, fields: &[&str]) -> bool {
    if filter.is_empty() {
        return true;
    }
    let needle = filter.to_lowercase();
    fields.iter().any(|f| f.to_lowercase().contains(&needle))
}

impl App {
    pub fn filter(&self, view: View) -> &str {
        &self.views.list(view).filter
    }

    /// Selected row of `view`, kept inside the rows it has now.
    pub fn selected(&self, view: View) -> usize {
        let len = self.row_count(view);
        self.views.list(view).selected.min(len.saturating_sub(1))
    }

    pub fn row_count(&self, view: View) -> usize {
        match view {
            View::Jobs => self.visible_jobs().len(),
            View::Vms => self.visible_vms().len(),
            View::Ports => self.port_rows().len(),
            View::Tunnel => self.tunnel_rows().len(),
            View::Processes => self.visible_processes().len(),
            View::Events => self.visible_events().len(),
            View::Policies => self.visible_policies().len(),
        }
    }

    /// The VM of the job with this id (the event log names restores by their id too).
    pub fn vm_of(&self, id: &BackupId) -> Option<&str> {
        self.backups
            .iter()
            .find(|b| &b.backup_id == id)
            .map(|b| b.vm_name.as_str())
            .or_else(|| {
                self.restores
                    .iter()
                    .find(|r| r.restore_id == id.0)
                    .map(|r| r.vm_name.as_str())
            })
            .or_else(|| {
                self.recoveries
                    .iter()
                    .find(|r| r.recovery_id == id.0)
                    .map(|r| r.vm_name.as_str())
            })
    }

    /// A qemu-nbd process that is dead while it is still needed: its job is live, or its port
    /// is still held for it. The processes of ended jobs whose ports were released are dead as
    /// planned (the hub stopped them) and are not a problem.
    pub fn process_dead_while_needed(&self, p: &ProcessInfo) -> bool {
        if p.alive {
            return false;
        }
        let job_live = self
            .backups
            .iter()
            .any(|b| b.backup_id == p.backup_id && !b.status.is_terminal());
        job_live || self.port_process(p.port.0).is_some_and(|q| q.pid == p.pid)
    }

    /// The verify jobs the Jobs view shows: those still running, newest first.
    pub fn running_verifies(&self) -> Vec<&sendense_shared::api::VerifyJob> {
        self.verifies
            .iter()
            .filter(|v| !v.status.is_terminal())
            .collect()
    }

    /// A VM's last backup point, when the console has it.
    pub fn last_point(
        &self,
        vm: &sendense_shared::api::Vm,
    ) -> Option<&sendense_shared::api::Backup> {
        let id = vm.last_backup_id.as_ref()?;
        self.backups.iter().find(|b| &b.backup_id == id)
    }

    /// Backups, restores and instant recoveries, newest first (at the same instant a backup
    /// before a restore before a recovery).
    pub fn visible_jobs(&self) -> Vec<JobRow<'_>> {
        let f = self.filter(View::Jobs);
        let backups = self
            .backups
            .iter()
            .filter(|b| {
                matches(
                    f,
                    &[
                        &b.backup_id.0,
                        &b.vm_name,
                        b.status.as_str(),
                        b.backup_type.as_str(),
                        &b.repository_id,
                        b.integrity.as_str(),
                    ],
                )
            })
            .map(JobRow::Backup);
        let restores = self
            .restores
            .iter()
            .filter(|r| {
                matches(
                    f,
                    &[
                        &r.restore_id,
                        &r.vm_name,
                        r.status.as_str(),
                        strings::RESTORE,
                        &r.backup_id.0,
                        &r.target.node,
                        &r.target.path,
                    ],
                )
            })
            .map(JobRow::Restore);
        let recoveries = self
            .recoveries
            .iter()
            .filter(|r| {
                matches(
                    f,
                    &[
                        &r.recovery_id,
                        &r.vm_name,
                        &r.source_vm,
                        r.status.as_str(),
                        strings::RECOVERY,
                        &r.backup_id.0,
                        &r.node,
                        r.vm_state.as_deref().unwrap_or(""),
                        if r.stalled.is_some() {
                            strings::STALLED
                        } else {
                            ""
                        },
                    ],
                )
            })
            .map(JobRow::Recovery);
        // Each list is in its own order already (newest first): merge them, a later list's
        // job going first only when it is newer.
        let mut lists = [
            backups.collect::<Vec<_>>().into_iter().peekable(),
            restores.collect::<Vec<_>>().into_iter().peekable(),
            recoveries.collect::<Vec<_>>().into_iter().peekable(),
        ];
        let mut rows = Vec::new();
        loop {
            let mut pick: Option<(usize, chrono::DateTime<chrono::Utc>)> = None;
            for (i, l) in lists.iter_mut().enumerate() {
                if let Some(j) = l.peek()
                    && pick.is_none_or(|(_, t)| j.created_at() > t)
                {
                    pick = Some((i, j.created_at()));
                }
            }
            match pick.and_then(|(i, _)| lists[i].next()) {
                Some(row) => rows.push(row),
                None => return rows,
            }
        }
    }

    pub fn visible_vms(&self) -> Vec<&Vm> {
        let f = self.filter(View::Vms);
        self.vms
            .iter()
            .filter(|v| matches(f, &[&v.vm_name, v.node.as_deref().unwrap_or("")]))
            .collect()
    }

    pub fn visible_processes(&self) -> Vec<&ProcessInfo> {
        let f = self.filter(View::Processes);
        self.processes
            .iter()
            .filter(|p| {
                matches(
                    f,
                    &[
                        &p.pid.to_string(),
                        &p.port.to_string(),
                        &p.export_name,
                        &p.qcow2_path,
                        &p.backup_id.0,
                        self.vm_of(&p.backup_id).unwrap_or(""),
                        if p.alive {
                            strings::ALIVE
                        } else {
                            strings::DEAD
                        },
                    ],
                )
            })
            .collect()
    }

    /// Newest first.
    pub fn visible_events(&self) -> Vec<&JobEvent> {
        let f = self.filter(View::Events);
        self.events
            .iter()
            .rev()
            .filter(|e| {
                matches(
                    f,
                    &[
                        &e.backup_id.0,
                        self.vm_of(&e.backup_id).unwrap_or(""),
                        &e.level,
                        &e.step,
                        &e.message,
                        &e.disk_key.map(|k| k.to_string()).unwrap_or_default(),
                    ],
                )
            })
            .collect()
    }

    pub fn port_range(&self) -> [u16; 2] {
        self.ports
            .as_ref()
            .map(|p| p.range)
            .unwrap_or(DEFAULT_PORT_RANGE)
    }

    pub fn port_cell(&self, port: u16) -> PortCell {
        let Some(ports) = &self.ports else {
            return PortCell::Free;
        };
        if ports.squatted.iter().any(|s| s.port.0 == port) {
            return PortCell::Squatted;
        }
        if ports.allocations.iter().any(|a| a.port.0 == port) {
            let dead = self.port_process(port).is_some_and(|p| !p.alive);
            return if dead {
                PortCell::Stale
            } else {
                PortCell::Held
            };
        }
        PortCell::Free
    }

    /// The qemu-nbd process serving a held port: the one of the allocation's job and disk. The
    /// hub lists the processes of past jobs too, often on the same port (ports are reused), so
    /// the port alone would find an old, dead process and call a healthy export stale.
    pub fn port_process(&self, port: u16) -> Option<&ProcessInfo> {
        let alloc = self
            .ports
            .as_ref()?
            .allocations
            .iter()
            .find(|a| a.port.0 == port)?;
        self.processes.iter().find(|p| {
            p.port.0 == port && p.backup_id == alloc.backup_id && p.disk_key == alloc.disk_key
        })
    }

    /// Ports that are not free, in port order (the table under the grid).
    pub fn port_rows(&self) -> Vec<u16> {
        let Some(ports) = &self.ports else {
            return Vec::new();
        };
        let mut rows: Vec<u16> = ports
            .allocations
            .iter()
            .map(|a| a.port.0)
            .chain(ports.squatted.iter().map(|s| s.port.0))
            .collect();
        rows.sort_unstable();
        rows.dedup();
        let f = self.filter(View::Ports);
        rows.into_iter()
            .filter(|port| {
                let holder = ports.allocations.iter().find(|a| a.port.0 == *port);
                let squat = ports.squatted.iter().find(|s| s.port.0 == *port);
                matches(
                    f,
                    &[
                        &port.to_string(),
                        holder.map(|a| a.backup_id.0.as_str()).unwrap_or(""),
                        holder.and_then(|a| self.vm_of(&a.backup_id)).unwrap_or(""),
                        squat.map(|s| s.detail.as_str()).unwrap_or(""),
                        match self.port_cell(*port) {
                            PortCell::Squatted => strings::PORT_SQUATTED,
                            PortCell::Stale => strings::PORT_STALE,
                            _ => strings::PORT_HELD,
                        },
                    ],
                )
            })
            .collect()
    }

    /// One row per node the hub knows, plus nodes only seen in tunnel reports.
    pub fn tunnel_rows(&self) -> Vec<TunnelRow<'_>> {
        let mut names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        for name in self.tunnels.keys().chain(self.tunnel_errors.keys()) {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
        names.sort_unstable();
        let f = self.filter(View::Tunnel);
        names
            .into_iter()
            .map(|name| TunnelRow {
                node: name,
                info: self.nodes.iter().find(|n| n.name == name),
                tunnel: self
                    .tunnels
                    .get(name)
                    .or_else(|| self.nodes.iter().find(|n| n.name == name)?.tunnel.as_ref()),
                probe_error: self.tunnel_errors.get(name).map(String::as_str),
            })
            .filter(|r| {
                matches(
                    f,
                    &[
                        r.node,
                        r.tunnel.and_then(|t| t.last_error.as_deref()).unwrap_or(""),
                    ],
                )
            })
            .collect()
    }

    pub fn detail_backup(&self) -> Option<&Backup> {
        let Some(JobRef::Backup(id)) = self.detail() else {
            return None;
        };
        self.backups.iter().find(|b| &b.backup_id == id)
    }

    pub fn detail_restore(&self) -> Option<&Restore> {
        let Some(JobRef::Restore(id)) = self.detail() else {
            return None;
        };
        self.restores.iter().find(|r| &r.restore_id == id)
    }

    pub fn detail_recovery(&self) -> Option<&Recovery> {
        let Some(JobRef::Recovery(id)) = self.detail() else {
            return None;
        };
        self.recoveries.iter().find(|r| &r.recovery_id == id)
    }

    /// Rate of a recovery's streams (bytes/s, as the node measures them) while it runs.
    pub fn recovery_rate(&self, r: &Recovery) -> Option<u64> {
        if r.status.is_terminal() {
            return None;
        }
        let streaming: Vec<u64> = r
            .disks
            .iter()
            .filter(|d| d.stream != strings::STREAM_FINISHED)
            .map(|d| d.rate_bps)
            .collect();
        (!streaming.is_empty()).then(|| streaming.iter().sum())
    }

    /// Rate of a restore (bytes/s) while it copies.
    pub fn restore_rate(&self, restore: &Restore) -> Option<u64> {
        if restore.status != JobStatus::Running {
            return None;
        }
        self.restore_history.get(&restore.restore_id)?.rate()
    }

    /// Rate of one disk (bytes/s) while it copies.
    pub fn disk_rate(&self, id: &BackupId, disk: DiskKey) -> Option<u64> {
        self.history.get(&(id.clone(), disk))?.rate()
    }

    /// Sum of the rates of a job's running disks.
    pub fn job_rate(&self, backup: &Backup) -> Option<u64> {
        let rates: Vec<u64> = backup
            .disk_results
            .iter()
            .filter(|d| d.status == DiskStatus::Running)
            .filter_map(|d| self.disk_rate(&backup.backup_id, d.disk_key))
            .collect();
        (!rates.is_empty()).then(|| rates.iter().sum())
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self.reach, Reach::Unreachable { .. })
    }
}
