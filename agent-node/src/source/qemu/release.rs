//! Release: undoing a snapshot in QEMU (exports, backup jobs, fleecing nodes, the NBD server),
//! its files, its change tracking, and then its journal. Every step looks at what is there
//! before removing it, so a release can be run again after a partial one (recovery does).

use super::journal::SnapshotState;
use super::{QemuDriver, QemuVm};
use crate::source::{ReleaseOutcome, SourceError};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

/// How long release waits for QEMU to finish deleting an export or cancelling a job.
const RELEASE_WAIT: Duration = Duration::from_secs(20);

impl QemuDriver {
    /// Undoes a snapshot; keeps going after errors and returns the first one.
    pub(super) async fn release_state(
        &self,
        vm: &QemuVm,
        state: &SnapshotState,
        outcome: ReleaseOutcome,
    ) -> Result<(), SourceError> {
        let mut first_err: Option<SourceError> = None;
        let mut note = |r: Result<(), SourceError>| {
            if let Err(e) = r {
                tracing::warn!(vm = %vm.name, error = %e, "release step failed");
                first_err.get_or_insert(e);
            }
        };
        let exports: Vec<String> = state.disks.iter().map(|d| d.export_id.clone()).collect();
        let jobs: Vec<String> = state.disks.iter().map(|d| d.job_id.clone()).collect();
        let nodes: Vec<String> = state.disks.iter().map(|d| d.fleece_node.clone()).collect();
        note(self.remove_exports(vm, &exports).await);
        note(self.cancel_jobs(vm, &jobs).await);
        note(self.delete_nodes(vm, &nodes).await);
        note(self.stop_nbd_server_if_idle(vm).await);
        for d in &state.disks {
            note(remove_file(&d.file));
        }
        note(remove_file(&state.socket));
        note(self.rotate_bitmaps(vm, state, outcome).await);
        // The journal stays when something could not be undone, so start-up recovery retries.
        if first_err.is_none() {
            first_err = remove_file(&self.journal_path(&vm.name)).err();
        }
        let mut held = vm.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.as_ref().map(|h| &h.backup_id) == Some(&state.backup_id) {
            *held = None;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub(super) async fn remove_exports(
        &self,
        vm: &QemuVm,
        ids: &[String],
    ) -> Result<(), SourceError> {
        let present = ids_of(
            &self.exec(vm, "query-block-exports", json!({})).await?,
            "id",
        );
        for id in ids.iter().filter(|id| present.contains(id)) {
            // `hard` drops connected clients (a copy being cancelled) instead of waiting.
            ignore_not_found(
                self.exec(vm, "block-export-del", json!({"id": id, "mode": "hard"}))
                    .await,
            )?;
        }
        // Deletion is asynchronous (BLOCK_EXPORT_DELETED); the node stays busy until then.
        self.wait_gone(vm, "query-block-exports", "id", ids, "export deletion")
            .await
    }

    pub(super) async fn cancel_jobs(&self, vm: &QemuVm, ids: &[String]) -> Result<(), SourceError> {
        let present = ids_of(
            &self.exec(vm, "query-block-jobs", json!({})).await?,
            "device",
        );
        for id in ids.iter().filter(|id| present.contains(id)) {
            ignore_not_found(
                self.exec(vm, "block-job-cancel", json!({"device": id, "force": true}))
                    .await,
            )?;
        }
        // A job that ended on its own but was not dismissed (auto-dismiss off by a crash-time
        // variant) would block the fleecing node; dismiss it.
        for j in self
            .exec(vm, "query-jobs", json!({}))
            .await?
            .as_array()
            .into_iter()
            .flatten()
        {
            let id = j.get("id").and_then(Value::as_str).unwrap_or_default();
            if ids.iter().any(|i| i == id)
                && j.get("status").and_then(Value::as_str) == Some("concluded")
            {
                ignore_not_found(self.exec(vm, "job-dismiss", json!({"id": id})).await)?;
            }
        }
        self.wait_gone(vm, "query-block-jobs", "device", ids, "block job cancel")
            .await
    }

    pub(super) async fn delete_nodes(
        &self,
        vm: &QemuVm,
        names: &[String],
    ) -> Result<(), SourceError> {
        let present = ids_of(
            &self
                .exec(vm, "query-named-block-nodes", json!({"flat": true}))
                .await?,
            "node-name",
        );
        for n in names.iter().filter(|n| present.contains(n)) {
            ignore_not_found(self.exec(vm, "blockdev-del", json!({"node-name": n})).await)?;
        }
        Ok(())
    }

    pub(super) async fn stop_nbd_server_if_idle(&self, vm: &QemuVm) -> Result<(), SourceError> {
        let exports = self.exec(vm, "query-block-exports", json!({})).await?;
        if exports.as_array().is_some_and(|a| !a.is_empty()) {
            return Ok(()); // someone else's exports still use the server
        }
        match self.exec(vm, "nbd-server-stop", json!({})).await {
            Err(SourceError::Qmp { source, .. })
                if source.refusal() == Some(crate::qmp::Refusal::NotRunning) =>
            {
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    async fn wait_gone(
        &self,
        vm: &QemuVm,
        query: &str,
        field: &str,
        ids: &[String],
        what: &str,
    ) -> Result<(), SourceError> {
        let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
        loop {
            let present = ids_of(&self.exec(vm, query, json!({})).await?, field);
            if !ids.iter().any(|id| present.contains(id)) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(SourceError::Timeout {
                    vm: vm.name.clone(),
                    what: what.to_string(),
                    secs: RELEASE_WAIT.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub(super) fn ids_of(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.get(field).and_then(Value::as_str).map(str::to_string))
        .collect()
}

fn ignore_not_found(r: Result<Value, SourceError>) -> Result<(), SourceError> {
    match r {
        Ok(_) => Ok(()),
        Err(SourceError::Qmp { source, .. })
            if source.refusal() == Some(crate::qmp::Refusal::NotFound) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

pub(super) fn remove_file(path: &Path) -> Result<(), SourceError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SourceError::Io {
            what: "removing",
            path: path.to_path_buf(),
            source,
        }),
    }
}
