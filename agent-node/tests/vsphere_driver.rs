//! The vSphere driver against the govmomi simulator (`sendense_tests::vcsim`): inventory, one
//! snapshot per backup, nbdkit exports that read the frozen disks, release, crash recovery,
//! change tracking and the incremental base check.
//!
//! One test binary; the helpers are here, the tests in `vsphere_driver/`: `inventory`,
//! `backups` (snapshot, export, release, CBT), `recovery`, `sessions` (endpoint errors, cookies,
//! certificates, expired sessions).

use agent_node::config::VsphereConfig;
use agent_node::source::SnapshotRequest;
use sendense_shared::api::BackupType;
use sendense_shared::ids::{BackupId, DiskKey};
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient};
use sendense_tests::vcsim::{Vcsim, VcsimOptions};
use sendense_vsphere::{Secret, TlsPolicy};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[path = "vsphere_driver/backups.rs"]
mod backups;
#[path = "vsphere_driver/inventory.rs"]
mod inventory;
#[path = "vsphere_driver/recovery.rs"]
mod recovery;
#[path = "vsphere_driver/sessions.rs"]
mod sessions;

const MIB: u64 = 1 << 20;
/// The node the drivers of these tests belong to.
const NODE: &str = "node-a";

// The QEMU test VM of the node tests, for the composite driver.
#[allow(dead_code)]
#[path = "node/support.rs"]
mod support;

fn sim() -> Vcsim {
    Vcsim::start(VcsimOptions::default()).expect("start the simulator")
}

fn pin(sim: &Vcsim) -> TlsPolicy {
    let hex = &sim.cert_sha256;
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    TlsPolicy::Pinned(out)
}

fn config(sim: &Vcsim, tls: TlsPolicy) -> VsphereConfig {
    VsphereConfig {
        url: sim.url.clone(),
        user: sim.user.clone(),
        password: Secret::new(sim.password.clone()),
        tls,
        quiesce: false,
        vms: None,
        nbdkit: PathBuf::from("nbdkit"),
        vddk_libdir: None,
        session_keepalive: std::time::Duration::from_secs(300),
    }
}

fn request(
    sim: &Vcsim,
    id: &str,
    ty: BackupType,
    ids: BTreeMap<DiskKey, String>,
) -> SnapshotRequest {
    SnapshotRequest {
        backup_id: BackupId::from(id),
        vm_name: sim.vm.name.clone(),
        backup_type: ty,
        previous_backup_id: None,
        previous_change_ids: ids,
        require_application_consistency: false,
    }
}

/// A new connection to an nbdkit export.
async fn connect(socket: &Path, export: &str) -> Result<NbdClient, String> {
    NbdClient::connect(
        &NbdAddr::Unix {
            path: socket.to_path_buf(),
            export: export.to_string(),
        },
        &ConnectOptions::default(),
    )
    .await
    .map_err(|e| e.to_string())
}

/// Every byte of an export.
async fn read_export(socket: &Path, export: &str) -> Vec<u8> {
    let c = connect(socket, export)
        .await
        .expect("connect to the nbdkit export");
    let mut out = Vec::with_capacity(c.size() as usize);
    let mut at = 0;
    while at < c.size() {
        let n = (c.size() - at).min(4 * MIB);
        out.extend_from_slice(&c.read(at, n as u32).await.unwrap());
        at += n;
    }
    c.disconnect().await.unwrap();
    out
}

/// PIDs of the nbdkits recorded in `run_dir`.
fn nbdkit_pids(run_dir: &Path) -> Vec<u32> {
    std::fs::read_dir(run_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pid"))
        .map(|e| {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            v["pid"].as_u64().unwrap() as u32
        })
        .collect()
}

/// Whether recovery reports the snapshot `name` removed.
fn removed(report: &agent_node::source::RecoveryReport, name: &str) -> bool {
    report.snapshots_removed.iter().any(|s| s.contains(name))
}

fn alive(pid: u32) -> bool {
    sendense_shared::child::pid_alive(pid)
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn pattern(byte: u8, len: u64) -> Vec<u8> {
    vec![byte; len as usize]
}
