//! Guest-consistent snapshots: the guest's file systems are frozen through its agent
//! ([`crate::qga`]) right before the one snapshot transaction and thawed right after.
//!
//! The freeze is bounded and always undone:
//! - every agent command has the driver's agent timeout (a silent agent, a hung freeze);
//! - a journal `<run_dir>/frozen-<vm>.json` is written ([`crate::fsutil::atomic_write`])
//!   *before* the freeze is asked for and removed only once the agent says it thawed, so a
//!   node that crashes while the guest is frozen thaws it at start-up ([`QemuDriver::thaw_leftover`],
//!   also run before the next freeze of the VM);
//! - a [`FrozenGuest`] dropped without [`FrozenGuest::thaw`] (the snapshot's future dropped)
//!   thaws from a spawned task.
//!
//! What happened is the point's [`Consistency`]: `application` with the freeze window, or
//! `crash` with the reason (no channel, the agent did not answer, freeze refused).

use super::{QemuDriver, QemuVm};
use crate::fsutil;
use crate::qga::{FreezeStatus, QgaClient, QgaError};
use crate::source::SourceError;
use sendense_shared::api::{Consistency, ConsistencyLevel};
use sendense_shared::errors::chain;
use sendense_shared::ids::BackupId;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The freeze journal: a guest that may be frozen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FreezeJournal {
    backup_id: BackupId,
    vm_name: String,
    agent_socket: PathBuf,
    frozen_at: chrono::DateTime<chrono::Utc>,
}

const PREFIX: &str = "frozen-";

pub(super) fn journal_path(run_dir: &Path, vm: &str) -> PathBuf {
    run_dir.join(format!("{PREFIX}{vm}.json"))
}

/// A guest whose file systems the agent froze; thaw it with [`FrozenGuest::thaw`].
pub(super) struct FrozenGuest {
    client: Option<QgaClient>,
    socket: PathBuf,
    journal: PathBuf,
    timeout: Duration,
    vm: String,
    file_systems: u64,
    since: Instant,
}

/// The outcome of asking for a freeze.
pub(super) enum FreezeAttempt {
    Frozen(FrozenGuest),
    /// Not frozen; the snapshot is crash-consistent for this reason.
    NotFrozen(String),
}

impl QemuDriver {
    /// Freezes `vm`'s guest file systems, if it has an agent channel and the agent answers.
    pub(super) async fn freeze(&self, vm: &QemuVm, backup_id: &BackupId) -> FreezeAttempt {
        let Some(socket) = self.agent_socket(vm).await else {
            return FreezeAttempt::NotFrozen(
                "no guest agent channel configured or found through QMP".to_string(),
            );
        };
        let timeout = self.agent_timeout;
        // A freeze a crashed run left in place: undone first (it would refuse ours anyway).
        if let Err(e) = self.thaw_leftover(vm).await {
            tracing::warn!(vm = %vm.name, error = %e, "thaw of an earlier freeze failed");
        }
        let mut client = match QgaClient::connect(&socket, timeout).await {
            Ok(c) => c,
            Err(e) => return FreezeAttempt::NotFrozen(not_answering(&e, timeout)),
        };
        let journal = journal_path(&self.run_dir, &vm.name);
        let entry = FreezeJournal {
            backup_id: backup_id.clone(),
            vm_name: vm.name.clone(),
            agent_socket: socket.clone(),
            frozen_at: chrono::Utc::now(),
        };
        let bytes = serde_json::to_vec_pretty(&entry).unwrap_or_default();
        if let Err(e) = fsutil::atomic_write(&journal, &bytes) {
            // Without the journal a crash could leave the guest frozen: no freeze then.
            return FreezeAttempt::NotFrozen(format!(
                "freeze journal {} could not be written: {e}",
                journal.display()
            ));
        }
        let since = Instant::now();
        let mut frozen = FrozenGuest {
            client: None,
            socket,
            journal,
            timeout,
            vm: vm.name.clone(),
            file_systems: 0,
            since,
        };
        match client.freeze().await {
            Ok(n) => {
                frozen.file_systems = n;
                frozen.client = Some(client);
                tracing::info!(vm = %vm.name, %backup_id, file_systems = n,
                    "guest file systems frozen");
                FreezeAttempt::Frozen(frozen)
            }
            Err(e) => {
                // A refused freeze thaws itself in the agent; a timed-out one may still land:
                // thaw either way (the journal stays if that fails, for the next attempt).
                let reason = match &e {
                    QgaError::Refused { desc, .. } => format!("freeze refused: {desc}"),
                    other => not_answering(other, timeout),
                };
                tracing::warn!(vm = %vm.name, %backup_id, reason = %reason, "guest freeze failed");
                if e.is_timeout() {
                    frozen.client = None;
                } else {
                    frozen.client = Some(client);
                }
                let _ = frozen.thaw().await;
                FreezeAttempt::NotFrozen(reason)
            }
        }
    }

    /// Thaws a guest the freeze journal says may be frozen (start-up recovery, and before
    /// the next freeze); the journal goes once the agent says the guest is thawed.
    pub(super) async fn thaw_leftover(&self, vm: &QemuVm) -> Result<bool, QgaError> {
        let journal = journal_path(&self.run_dir, &vm.name);
        let Some(entry) = std::fs::read(&journal)
            .ok()
            .and_then(|b| serde_json::from_slice::<FreezeJournal>(&b).ok())
        else {
            if journal.exists() {
                // Unreadable (cannot happen with atomic writes): the configured channel decides.
                if let Some(socket) = &vm.agent {
                    thaw_at(socket, self.agent_timeout).await?;
                }
                let _ = std::fs::remove_file(&journal);
            }
            return Ok(false);
        };
        thaw_at(&entry.agent_socket, self.agent_timeout).await?;
        tracing::info!(vm = %vm.name, backup_id = %entry.backup_id,
            frozen_at = %entry.frozen_at, "thawed a guest an earlier run left frozen");
        let _ = std::fs::remove_file(&journal);
        Ok(true)
    }
}

impl QemuDriver {
    /// The VM's agent channel: configured, or found through QMP (a `virtserialport` named
    /// `org.qemu.guest_agent.0` whose chardev is a unix socket QEMU listens on).
    async fn agent_socket(&self, vm: &QemuVm) -> Option<PathBuf> {
        if let Some(s) = &vm.agent {
            return Some(s.clone());
        }
        match self.discover_agent(vm).await {
            Ok(found) => {
                if let Some(s) = &found {
                    tracing::info!(vm = %vm.name, socket = %s.display(),
                        "guest agent channel found through QMP");
                }
                found
            }
            Err(e) => {
                tracing::warn!(vm = %vm.name, error = %e, "looking for a guest agent channel");
                None
            }
        }
    }

    async fn discover_agent(&self, vm: &QemuVm) -> Result<Option<PathBuf>, SourceError> {
        let mut label = None;
        'search: for parent in ["/machine/peripheral", "/machine/peripheral-anon"] {
            let children = self.exec(vm, "qom-list", json!({ "path": parent })).await?;
            for c in children.as_array().into_iter().flatten() {
                if c["type"] != "child<virtserialport>" {
                    continue;
                }
                let path = format!("{parent}/{}", c["name"].as_str().unwrap_or_default());
                let get = |property: &str| json!({"path": path, "property": property});
                let name = self.exec(vm, "qom-get", get("name")).await?;
                if name == AGENT_PORT {
                    label = self
                        .exec(vm, "qom-get", get("chardev"))
                        .await?
                        .as_str()
                        .map(str::to_string);
                    break 'search;
                }
            }
        }
        let Some(label) = label else {
            return Ok(None);
        };
        let chardevs = self.exec(vm, "query-chardev", json!({})).await?;
        Ok(chardevs
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["label"] == label.as_str())
            .and_then(|c| c["filename"].as_str())
            .and_then(listening_unix_socket))
    }
}

/// The port name QEMU's guest agent listens on in the guest.
const AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// The path of a chardev `filename` QEMU shows for a unix socket it listens on:
/// `[disconnected:]unix:/path,server=on[<->...]`.
fn listening_unix_socket(filename: &str) -> Option<PathBuf> {
    let rest = filename.strip_prefix("disconnected:").unwrap_or(filename);
    let rest = rest.strip_prefix("unix:")?;
    let (path, opts) = rest.split_once(',')?;
    opts.split([',', '<'])
        .any(|o| o == "server=on" || o == "server")
        .then(|| PathBuf::from(path))
}

/// Connects, thaws when the agent says frozen.
async fn thaw_at(socket: &Path, timeout: Duration) -> Result<(), QgaError> {
    let mut c = QgaClient::connect(socket, timeout).await?;
    if c.status().await? == FreezeStatus::Frozen {
        c.thaw().await?;
    }
    Ok(())
}

fn not_answering(e: &QgaError, timeout: Duration) -> String {
    if e.is_timeout() {
        format!(
            "guest agent did not answer within {} s ({})",
            timeout.as_secs_f64(),
            e
        )
    } else {
        format!("guest agent channel unusable: {}", chain(e))
    }
}

impl FrozenGuest {
    /// Thaws the guest; answers the consistency the freeze gave the snapshot taken while frozen.
    pub(super) async fn thaw(mut self) -> Result<Consistency, QgaError> {
        let freeze_ms = self.since.elapsed().as_millis() as u64;
        let consistency = Consistency {
            level: ConsistencyLevel::Application,
            reason: format!(
                "guest file systems frozen ({} file system{})",
                self.file_systems,
                if self.file_systems == 1 { "" } else { "s" }
            ),
            freeze_ms: Some(freeze_ms),
        };
        let r = match self.client.take() {
            Some(mut c) => c.thaw().await.map(|_| ()),
            None => thaw_at(&self.socket, self.timeout).await,
        };
        match &r {
            Ok(()) => {
                let _ = std::fs::remove_file(&self.journal);
                // Thawed: nothing left for the drop guard.
                self.journal = PathBuf::new();
                tracing::info!(vm = %self.vm, freeze_ms, "guest file systems thawed");
            }
            // The drop guard (right after this) goes on trying from a task; the journal stays
            // until one attempt succeeds, for start-up recovery if none does.
            Err(e) => {
                tracing::error!(vm = %self.vm, error = %chain(e), "guest thaw failed; retrying")
            }
        }
        r.map(|()| consistency)
    }
}

/// Attempts of the drop guard's thaw, one agent timeout apart.
const THAW_RETRIES: u32 = 5;

impl Drop for FrozenGuest {
    fn drop(&mut self) {
        if self.journal.as_os_str().is_empty() {
            return;
        }
        // Not thawed (the snapshot's future was dropped, or the thaw failed): thaw from a task.
        let (socket, journal, timeout, vm) = (
            self.socket.clone(),
            std::mem::take(&mut self.journal),
            self.timeout,
            self.vm.clone(),
        );
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            for attempt in 1..=THAW_RETRIES {
                match thaw_at(&socket, timeout).await {
                    Ok(()) => {
                        let _ = std::fs::remove_file(&journal);
                        tracing::info!(vm = %vm, attempt, "guest thawed");
                        return;
                    }
                    Err(e) => tracing::error!(vm = %vm, attempt, error = %chain(&e),
                        "guest thaw failed"),
                }
                tokio::time::sleep(timeout).await;
            }
            tracing::error!(vm = %vm, journal = %journal.display(),
                "guest may still be frozen; the freeze journal stays for the next start-up");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_unix_socket_qemu_listens_on_is_an_agent_channel() {
        for (f, want) in [
            (
                "disconnected:unix:/run/vm1.qga,server=on",
                Some("/run/vm1.qga"),
            ),
            ("unix:/run/vm1.qga,server=on<->unix:", Some("/run/vm1.qga")),
            ("unix:/run/vm1.qga", None),
            ("disconnected:unix:/run/vm1.qga,server=off", None),
            ("pty:/dev/pts/3", None),
        ] {
            assert_eq!(listening_unix_socket(f), want.map(PathBuf::from), "{f}");
        }
    }
}
