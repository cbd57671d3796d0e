//! Start-up recovery: what a crashed node (or a release that could not finish) left in QEMU
//! and in the run directory is found by its names (`tags`) and removed; the journal
//! (`journal`) says which change tracking to roll back, with the failure rotation.

use super::journal;
use super::release::{ids_of, remove_file};
use super::tags::{EXPORT_PREFIX, JOB_PREFIX, NODE_PREFIX, is_snapshot_file};
use super::{QemuDriver, QemuVm};
use crate::qmp::QmpError;
use crate::source::{RecoveryReport, ReleaseOutcome, SourceError};
use serde_json::json;

impl QemuDriver {
    /// An earlier release that did not finish (QEMU was unreachable, say) is finished first,
    /// so that its change tracking is rolled back before a new snapshot looks at it.
    pub(super) async fn finish_earlier_release(&self, vm: &QemuVm) -> Result<(), SourceError> {
        if !self.journal_path(&vm.name).exists() {
            return Ok(());
        }
        let mut report = RecoveryReport::default();
        self.recover_vm(vm, &mut report).await;
        tracing::info!(vm = %vm.name, ?report, "released a snapshot left by an earlier run");
        if !self.journal_path(&vm.name).exists() {
            return Ok(());
        }
        Err(SourceError::Tool {
            command: "release of an earlier snapshot".to_string(),
            detail: report.errors.join("; "),
        })
    }

    /// Removes everything of this node's in `vm` (by name) and, when the journal says which
    /// snapshot was held, rolls its change tracking back and removes its files and journal.
    pub(super) async fn recover_vm(&self, vm: &QemuVm, report: &mut RecoveryReport) {
        let journal_path = self.journal_path(&vm.name);
        let held = journal::read(&journal_path);
        let res: Result<(), SourceError> = async {
            let exports: Vec<String> = ids_of(
                &self.exec(vm, "query-block-exports", json!({})).await?,
                "id",
            )
            .into_iter()
            .filter(|id| id.starts_with(EXPORT_PREFIX))
            .collect();
            self.remove_exports(vm, &exports).await?;
            report.exports_removed.extend(exports);
            let jobs: Vec<String> = ids_of(&self.exec(vm, "query-jobs", json!({})).await?, "id")
                .into_iter()
                .filter(|id| id.starts_with(JOB_PREFIX))
                .collect();
            self.cancel_jobs(vm, &jobs).await?;
            report.jobs_cancelled.extend(jobs);
            let nodes: Vec<String> = ids_of(
                &self
                    .exec(vm, "query-named-block-nodes", json!({"flat": true}))
                    .await?,
                "node-name",
            )
            .into_iter()
            .filter(|n| n.starts_with(NODE_PREFIX))
            .collect();
            self.delete_nodes(vm, &nodes).await?;
            report.nodes_removed.extend(nodes);
            self.stop_nbd_server_if_idle(vm).await?;
            if let Some(state) = &held {
                match self
                    .rotate_bitmaps(vm, state, ReleaseOutcome::Failure)
                    .await
                {
                    Ok(()) => report.bitmaps_rolled_back.push(state.new_bitmap.clone()),
                    // QEMU answered but refused the rollback (e.g. a bitmap left inconsistent
                    // by a QEMU crash): change tracking cannot be trusted, so it is dropped and
                    // the next incremental says "bitmap missing" (a full follows). Keeping the
                    // journal instead would block every later snapshot of this VM.
                    Err(SourceError::Qmp {
                        source: QmpError::Command { .. },
                        ..
                    }) => {
                        let dropped = self.drop_tracking(vm, state).await;
                        report.errors.push(format!(
                            "VM {}: rollback of change tracking refused; dropped bitmaps {dropped:?}, next incremental falls back to full",
                            vm.name
                        ));
                    }
                    Err(e) => return Err(e),
                }
                for d in &state.disks {
                    if remove_file(&d.file).is_ok() {
                        report.files_removed.push(d.file.clone());
                    }
                }
                remove_file(&state.socket)?;
                remove_file(&journal_path)?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = res {
            report.errors.push(e.to_string());
        }
    }

    /// Files of snapshots whose journal was lost, and temporary files of torn journal writes.
    pub(super) fn remove_leftover_files(&self, report: &mut RecoveryReport) {
        let Ok(dir) = std::fs::read_dir(&self.run_dir) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = is_snapshot_file(&name) || journal::is_torn_write(&name);
            if ours && std::fs::remove_file(entry.path()).is_ok() {
                report.files_removed.push(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::qmp::QmpLog;
    use crate::source::SourceDriver;
    use crate::source::qemu::QemuDriver;
    use std::path::PathBuf;
    use std::sync::Arc;

    #[tokio::test]
    async fn leftover_files_and_torn_journal_writes_are_removed_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().to_path_buf();
        let names = [
            "sdfl-0123456789-0.qcow2",
            "nbd-0123456789.sock",
            "journal-vm1.json.tmp",
            "qmp.log",
            "journal-vm1.json",
            "notes.txt",
        ];
        for n in names {
            std::fs::write(run.join(n), b"x").unwrap();
        }
        // No VM configured: only the run directory is looked at.
        let d = QemuDriver::new(
            std::iter::empty::<(String, PathBuf)>(),
            run.clone(),
            Arc::new(QmpLog::new(None)),
        );
        let report = d.recover().await;
        let mut removed = report.files_removed.clone();
        removed.sort();
        let mut want: Vec<PathBuf> = names[..3].iter().map(|n| run.join(n)).collect();
        want.sort();
        assert_eq!(removed, want, "{report:?}");
        for n in &names[3..] {
            assert!(run.join(n).exists(), "{n} was removed");
        }
        assert!(report.errors.is_empty(), "{report:?}");
    }
}
