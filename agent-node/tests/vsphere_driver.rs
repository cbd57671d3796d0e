//! The vSphere driver against the govmomi simulator (`sendense_tests::vcsim`): inventory, one
//! snapshot per backup, nbdkit exports that read the frozen disks, release, crash recovery,
//! change tracking and the incremental base check.

use agent_node::config::VsphereConfig;
use agent_node::source::vsphere::VsphereDriver;
use agent_node::source::{ReleaseOutcome, Snapshot, SnapshotRequest, SourceDriver, SourceError};
use agent_node::vsphere::{Secret, TlsPolicy};
use sendense_shared::api::BackupType;
use sendense_shared::ids::{BackupId, DiskKey};
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient};
use sendense_tests::net::free_port;
use sendense_tests::vcsim::{Vcsim, VcsimOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

#[tokio::test]
async fn inventory_shows_the_two_disk_vm() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let d = VsphereDriver::new(
        &config(&sim, TlsPolicy::CaFile(sim.cert_pem.clone())),
        NODE,
        run.path().into(),
    );
    let vms = d.list_vms().await.unwrap();
    assert_eq!(vms.len(), 1, "{vms:?}");
    let vm = &vms[0];
    assert_eq!(vm.vm_name, sim.vm.name);
    assert_eq!(vm.vm_id, sim.vm.uuid);
    assert_eq!(vm.driver, "vsphere");
    let keys: Vec<i64> = vm.disks.iter().map(|d| d.disk_key.0).collect();
    assert_eq!(keys, [2000, 2001]);
    assert_ne!(vm.disks[0].unit_number, vm.disks[1].unit_number);
    for (disk, want) in vm.disks.iter().zip(&sim.vm.disks) {
        assert_eq!(disk.size_bytes, want.capacity_bytes);
        assert_eq!(disk.unit_number, want.unit_number);
        assert_eq!(disk.label, want.label);
        assert_eq!(disk.backing_file.as_deref(), Some(want.file_name.as_str()));
        assert!(
            disk.controller.as_deref().is_some_and(|c| !c.is_empty()),
            "{disk:?}"
        );
    }
    assert_eq!(vm.change_tracking, Some(false));
    let e = d.vm("nope").await.unwrap_err();
    assert!(matches!(e, SourceError::UnknownVm { .. }), "{e}");

    // An allowlist without the VM hides it.
    let mut only_other = config(&sim, pin(&sim));
    only_other.vms = Some(["other".to_string()].into());
    let d = VsphereDriver::new(&only_other, NODE, run.path().into());
    assert!(d.list_vms().await.unwrap().is_empty());
    assert!(matches!(
        d.vm(&sim.vm.name).await,
        Err(SourceError::UnknownVm { .. })
    ));
}

#[tokio::test]
async fn a_full_snapshot_exports_the_frozen_disks_and_release_leaves_nothing() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let d = VsphereDriver::new(&config(&sim, pin(&sim)), NODE, run.path().into());
    sim.write_disk(2000, 0, &pattern(0x11, MIB)).unwrap();
    sim.write_disk(2000, 3 * MIB, &pattern(0x22, MIB)).unwrap();
    sim.write_disk(2001, 5 * MIB, &pattern(0x33, 64 * 1024))
        .unwrap();
    let frozen = [sim.disk_image(2000).unwrap(), sim.disk_image(2001).unwrap()];

    // CBT is off: a full reads every block (no area list).
    let req = request(&sim, "full-1", BackupType::Full, BTreeMap::new());
    let snap = d.snapshot(&req).await.unwrap();
    assert_eq!(
        sim.snapshot_names().unwrap(),
        ["sendense-node-a-full-1"],
        "exactly one snapshot, named after the backup"
    );
    let again = d
        .snapshot(&request(&sim, "full-2", BackupType::Full, BTreeMap::new()))
        .await;
    assert!(
        matches!(again, Err(SourceError::SnapshotHeld { .. })),
        "{again:?}"
    );
    // The guest keeps writing: the exports show the disks as the snapshot froze them.
    sim.write_disk(2000, 0, &pattern(0x99, 64 * 1024)).unwrap();
    assert_eq!(snap.disks.len(), 2);
    for (disk, want) in snap.disks.iter().zip(&frozen) {
        assert_eq!(disk.areas, None, "CBT off: no area list");
        assert!(disk.dirty_bitmap.is_none());
        assert_eq!(disk.size_bytes, want.len() as u64);
        let got = read_export(&disk.socket, &disk.export).await;
        assert!(
            got == *want,
            "disk {}: export differs from the frozen data",
            disk.disk_key
        );
    }
    let pids = nbdkit_pids(run.path());
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|&p| alive(p)));

    d.release(&snap, ReleaseOutcome::Success).await.unwrap();
    assert!(sim.snapshot_names().unwrap().is_empty(), "snapshot removed");
    assert!(pids.iter().all(|&p| !alive(p)), "nbdkit stopped");
    for disk in &snap.disks {
        assert!(!disk.socket.exists(), "{} left", disk.socket.display());
    }
    assert!(
        files(run.path()).is_empty(),
        "left in the run dir: {:?}",
        files(run.path())
    );
    // The write after the snapshot survived consolidation.
    assert_eq!(sim.read_disk(2000, 0, 4).unwrap(), [0x99; 4]);
    // Released twice: nothing to do.
    d.release(&snap, ReleaseOutcome::Success).await.unwrap();
}

#[tokio::test]
async fn recovery_after_a_crash_removes_the_snapshot_and_kills_nbdkit() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let cfg = config(&sim, TlsPolicy::CaFile(sim.cert_pem.clone()));
    let d = VsphereDriver::new(&cfg, NODE, run.path().into());
    let snap: Snapshot = d
        .snapshot(&request(&sim, "crashed", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    let pids = nbdkit_pids(run.path());
    assert_eq!(pids.len(), 2);
    // The node dies without releasing: its driver is gone, the snapshot and nbdkits stay.
    drop(d);
    assert_eq!(sim.snapshot_names().unwrap(), ["sendense-node-a-crashed"]);
    assert!(pids.iter().all(|&p| alive(p)));

    // Restarted while the vCenter is unreachable: the nbdkits go, the snapshot and its journal
    // entry stay, and the report says why, once.
    let port = free_port();
    let mut down = cfg.clone();
    down.url = format!("https://127.0.0.1:{port}");
    let report = VsphereDriver::new(&down, NODE, run.path().into())
        .recover()
        .await;
    assert_eq!(report.exports_removed.len(), 2, "{report:?}");
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(
        report.errors[0].contains("1 journal entries kept")
            && report.errors[0].contains(&port.to_string()),
        "{report:?}"
    );
    assert!(pids.iter().all(|&p| !alive(p)), "leftover nbdkit killed");
    assert_eq!(sim.snapshot_names().unwrap(), ["sendense-node-a-crashed"]);

    let d = VsphereDriver::new(&cfg, NODE, run.path().into());
    let report = d.recover().await;
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(removed(&report, "sendense-node-a-crashed"), "{report:?}");
    assert!(sim.snapshot_names().unwrap().is_empty());
    assert!(pids.iter().all(|&p| !alive(p)), "leftover nbdkit killed");
    for disk in &snap.disks {
        assert!(!disk.socket.exists());
    }
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));
    // A snapshot named like ours that no journal knows (journal lost) is removed too.
    let d2 = VsphereDriver::new(&cfg, NODE, tempfile::tempdir().unwrap().path().into());
    let snap = d2
        .snapshot(&request(
            &sim,
            "no-journal",
            BackupType::Full,
            BTreeMap::new(),
        ))
        .await
        .unwrap();
    let report = d.recover().await;
    assert!(removed(&report, "sendense-node-a-no-journal"), "{report:?}");
    assert!(sim.snapshot_names().unwrap().is_empty());
    d2.release(&snap, ReleaseOutcome::Failure).await.unwrap();
}

#[tokio::test]
async fn cbt_areas_and_change_ids_drive_incrementals() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let d = VsphereDriver::new(&config(&sim, pin(&sim)), NODE, run.path().into());
    d.enable_change_tracking(&sim.vm.name).await.unwrap();
    assert!(sim.state().unwrap().unwrap().cbt_enabled);
    assert_eq!(
        d.vm(&sim.vm.name).await.unwrap().change_tracking,
        Some(true)
    );
    sim.write_disk(2000, 2 * MIB, &pattern(0x44, MIB)).unwrap();

    // Full with CBT on: the allocated areas, and a change id per disk.
    let full = d
        .snapshot(&request(&sim, "f1", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    let areas = full.disks[0].areas.clone().expect("CBT on: an area list");
    assert!(
        areas.iter().any(|&(o, l)| o <= 2 * MIB && o + l >= 3 * MIB),
        "the written MiB is in the allocated areas: {areas:?}"
    );
    let ids: BTreeMap<DiskKey, String> = full
        .disks
        .iter()
        .map(|disk| (disk.disk_key, disk.change_id.clone().expect("a change id")))
        .collect();
    d.release(&full, ReleaseOutcome::Success).await.unwrap();

    // Changes after the full: only they are listed for the incremental.
    sim.write_disk(2000, 10 * MIB, &pattern(0x55, 64 * 1024))
        .unwrap();
    let inc = request(&sim, "i1", BackupType::Incremental, ids.clone());
    d.check_incremental_base(&inc).await.unwrap();
    let snap = d.snapshot(&inc).await.unwrap();
    let a0 = snap.disks[0].areas.clone().unwrap();
    assert!(!a0.is_empty(), "the change is listed");
    assert!(
        a0.iter()
            .all(|&(o, l)| o >= 10 * MIB - 64 * 1024 && o + l <= 10 * MIB + 128 * 1024),
        "only the changed block: {a0:?}"
    );
    assert_eq!(
        snap.disks[1].areas,
        Some(vec![]),
        "nothing changed on disk 2001"
    );
    let data = read_export(&snap.disks[0].socket, &snap.disks[0].export).await;
    assert_eq!(
        &data[10 * MIB as usize..][..64 * 1024],
        &pattern(0x55, 64 * 1024)[..]
    );
    d.release(&snap, ReleaseOutcome::Success).await.unwrap();

    // Without the hub's change ids: refused, naming the disk.
    let e = d
        .check_incremental_base(&request(
            &sim,
            "i2",
            BackupType::Incremental,
            BTreeMap::new(),
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SourceError::IncrementalBase { disk_key, .. } if *disk_key == DiskKey(2000)),
        "{e}"
    );
    // After a CBT reset the old change ids are of another epoch: refused before any snapshot.
    sim.reset_cbt().unwrap();
    let e = d
        .check_incremental_base(&request(&sim, "i3", BackupType::Incremental, ids.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SourceError::IncrementalBase { detail, .. } if detail.contains("reset")),
        "{e}"
    );
    let e = d
        .snapshot(&request(&sim, "i3", BackupType::Incremental, ids))
        .await
        .unwrap_err();
    assert!(matches!(e, SourceError::IncrementalBase { .. }), "{e}");
    assert!(
        sim.snapshot_names().unwrap().is_empty(),
        "no snapshot taken"
    );
}

#[tokio::test]
async fn bad_credentials_an_unreachable_server_and_a_vanished_vm() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let mut wrong = config(&sim, pin(&sim));
    wrong.password = Secret::new("not-the-password-7f3a".into());
    let e = VsphereDriver::new(&wrong, NODE, run.path().into())
        .list_vms()
        .await
        .unwrap_err();
    assert!(matches!(e, SourceError::Endpoint { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&sim.user) && text.contains(&sim.url),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");

    let port = free_port();
    let mut gone = config(&sim, pin(&sim));
    gone.url = format!("https://127.0.0.1:{port}");
    let e = VsphereDriver::new(&gone, NODE, run.path().into())
        .snapshot(&request(&sim, "x", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap_err();
    assert!(matches!(e, SourceError::Endpoint { .. }), "{e}");
    assert!(e.to_string().contains(&port.to_string()), "{e}");

    // A pin that is not the server's certificate.
    let pinned_wrong = config(&sim, TlsPolicy::Pinned([7; 32]));
    let e = VsphereDriver::new(&pinned_wrong, NODE, run.path().into())
        .vm(&sim.vm.name)
        .await
        .unwrap_err();
    assert!(matches!(e, SourceError::Endpoint { .. }), "{e}");
    assert!(
        e.to_string().contains("certificate") && e.to_string().contains(&sim.cert_sha256),
        "the error names the certificate the server showed: {e}"
    );

    // nbdkit cannot start after the snapshot was taken: the snapshot is removed again.
    let mut no_nbdkit = config(&sim, pin(&sim));
    no_nbdkit.nbdkit = PathBuf::from("/nonexistent/nbdkit");
    let e = VsphereDriver::new(&no_nbdkit, NODE, run.path().into())
        .snapshot(&request(&sim, "n1", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SourceError::Tool { detail, .. } if detail.contains("/nonexistent/nbdkit")),
        "{e}"
    );
    assert!(sim.snapshot_names().unwrap().is_empty(), "snapshot removed");
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));

    // The VM disappears while its snapshot is held: release still cleans up.
    let d = VsphereDriver::new(&config(&sim, pin(&sim)), NODE, run.path().into());
    let snap = d
        .snapshot(&request(&sim, "v1", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    let pids = nbdkit_pids(run.path());
    sim.destroy_vm().unwrap();
    d.release(&snap, ReleaseOutcome::Failure).await.unwrap();
    assert!(pids.iter().all(|&p| !alive(p)));
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));
    assert!(matches!(
        d.vm(&sim.vm.name).await,
        Err(SourceError::UnknownVm { .. })
    ));
}

/// `POST /api/v1/vms/{vm}/change-tracking` through the node's router.
async fn post_change_tracking(
    driver: std::sync::Arc<dyn SourceDriver>,
    vm: &str,
) -> (u16, serde_json::Value) {
    use agent_node::api::{NodeState, router};
    use agent_node::copy::CopyOptions;
    use agent_node::jobs::Jobs;
    use http_body_util::BodyExt;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;
    let jobs = Jobs::new(
        driver,
        None,
        CopyOptions::default(),
        CancellationToken::new(),
    );
    let app = router(std::sync::Arc::new(NodeState {
        name: "n".into(),
        token: "tok".into(),
        started_at: chrono::Utc::now(),
        jobs,
        tunnel: None,
        restores: std::sync::Arc::new(agent_node::restore::Restores::new(
            std::env::temp_dir(),
            CopyOptions::default(),
            CancellationToken::new(),
        )),
    }));
    let resp = app
        .oneshot(
            axum::http::Request::post(format!("/api/v1/vms/{vm}/change-tracking"))
                .header("authorization", "Bearer tok")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

#[tokio::test]
async fn the_change_tracking_route_turns_cbt_on() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let d = std::sync::Arc::new(VsphereDriver::new(
        &config(&sim, pin(&sim)),
        NODE,
        run.path().into(),
    ));
    assert!(!sim.state().unwrap().unwrap().cbt_enabled);
    let (status, body) = post_change_tracking(d.clone(), &sim.vm.name).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"vm_name": sim.vm.name, "change_tracking": true})
    );
    assert!(
        sim.state().unwrap().unwrap().cbt_enabled,
        "ReconfigVM_Task ran"
    );
    let (status, body) = post_change_tracking(d.clone(), "nope").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));

    let port = free_port();
    let mut gone = config(&sim, pin(&sim));
    gone.url = format!("https://127.0.0.1:{port}");
    let (status, body) = post_change_tracking(
        std::sync::Arc::new(VsphereDriver::new(&gone, NODE, run.path().into())),
        &sim.vm.name,
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "hypervisor_unavailable");
    assert!(
        body["detail"].as_str().unwrap().contains(&port.to_string()),
        "{body}"
    );
}

#[tokio::test]
async fn nbdkit_names_a_refused_cookie_and_an_untrusted_certificate() {
    use agent_node::source::nbdkit::{CaInfo, Nbdkit, NbdkitSpec, Plugin};
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let path = sim.vm.disks[0]
        .file_name
        .split_once("] ")
        .unwrap()
        .1
        .replace(".vmdk", "-flat.vmdk");
    let url = format!(
        "{}/folder/{path}?dcPath={}&dsName={}",
        sim.url, sim.datacenter, sim.datastore
    );
    let spec = |cookie: &str, cainfo: Option<CaInfo>| NbdkitSpec {
        run_dir: run.path().to_path_buf(),
        stem: "t-2000".into(),
        export: "vm1-disk-2000".into(),
        plugin: Plugin::Curl {
            url: url.clone(),
            cookie: cookie.into(),
            cookie_renew_secs: None,
            cainfo,
            insecure: false,
        },
    };
    // A session the server does not know.
    let e = Nbdkit::start(
        Path::new("nbdkit"),
        spec(
            "vmware_soap_session=\"52000000-0000-0000-0000-000000000000\"",
            Some(CaInfo::File(sim.cert_pem.clone())),
        ),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("vm1-disk-2000") && e.contains("HTTP 401"), "{e}");
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));
    // A live session, but the simulator's self-signed certificate is not in the system store.
    let cookie = format!(
        "vmware_soap_session={}",
        sim.login_cookie(&sim.user, &sim.password).unwrap()
    );
    let e = Nbdkit::start(Path::new("nbdkit"), spec(&cookie, None))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("certificate"), "{e}");
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));
    // The same session with the certificate trusted: the export serves the disk.
    let n = Nbdkit::start(
        Path::new("nbdkit"),
        spec(
            &cookie,
            Some(CaInfo::Pem(std::fs::read_to_string(&sim.cert_pem).unwrap())),
        ),
    )
    .await
    .unwrap();
    let data = read_export(&n.socket(), n.export()).await;
    assert!(
        data == sim.disk_image(2000).unwrap(),
        "bytes through nbdkit curl"
    );
    let pid = n.pid();
    n.stop().await;
    assert!(!alive(pid));
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));
}

#[tokio::test]
async fn the_daemon_serves_qemu_and_vsphere_vms_from_one_config() {
    use agent_node::config::{NodeConfig, ServeArgs};
    let sim = sim();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "tok\n").unwrap();
    // The node refuses a token file group or others may read.
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "token_file = \"{}\"\nrun_dir = \"{}\"\n[qmp]\nkvm1 = \"{}\"\n[vsphere]\nurl = \"{}\"\nuser = \"{}\"\npassword_file = \"{}\"\nca_file = \"{}\"\n",
            token.display(),
            dir.path().join("run").display(),
            dir.path().join("kvm1.qmp").display(),
            sim.url,
            sim.user,
            sim.password_file().display(),
            sim.cert_pem.display()
        ),
    )
    .unwrap();
    let config = NodeConfig::load(&ServeArgs {
        config: Some(cfg),
        ..Default::default()
    })
    .unwrap();
    assert!(config.vsphere.is_some());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let daemon = tokio::spawn(agent_node::daemon::run(config, listener, shutdown.clone()));
    let http = reqwest::Client::new();
    let inv: serde_json::Value = http
        .get(format!("{base}/api/v1/inventory"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The QEMU VM's socket does not answer, so it is left out; the vSphere VM is there.
    let vms = inv["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{inv}");
    assert_eq!(vms[0]["vm_name"], sim.vm.name.as_str());
    assert_eq!(vms[0]["driver"], "vsphere");
    assert_eq!(vms[0]["disks"].as_array().unwrap().len(), 2);
    // Calls for the QEMU VM go to the QEMU driver and name its failure.
    let resp = http
        .post(format!("{base}/api/v1/vms/kvm1/change-tracking"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 502);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("kvm1"), "{body}");
    let resp = http
        .post(format!("{base}/api/v1/vms/{}/change-tracking", sim.vm.name))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(sim.state().unwrap().unwrap().cbt_enabled);
    shutdown.cancel();
    daemon.await.unwrap().unwrap();
}

#[tokio::test]
async fn qemu_and_vsphere_behind_one_driver_and_a_name_in_both_is_refused() {
    use agent_node::qmp::QmpLog;
    use agent_node::source::multi::MultiDriver;
    use agent_node::source::qemu::QemuDriver;
    use std::sync::Arc;
    let sim = sim();
    let kvm = support::TestVm::start(&[16 * MIB], |_| {}).await;
    let run = tempfile::tempdir().unwrap();
    let vsphere: Arc<dyn SourceDriver> = Arc::new(VsphereDriver::new(
        &config(&sim, pin(&sim)),
        NODE,
        run.path().into(),
    ));
    let qemu = |name: &str| -> Arc<dyn SourceDriver> {
        Arc::new(QemuDriver::new(
            [(name.to_string(), kvm.node_qmp.clone())],
            run.path().into(),
            Arc::new(QmpLog::new(None)),
        ))
    };
    let both = MultiDriver::start(vec![("qemu", qemu("kvm1")), ("vsphere", vsphere.clone())])
        .await
        .unwrap();
    let vms = both.list_vms().await.unwrap();
    let listed: Vec<(&str, &str)> = vms.iter().map(|v| (v.vm_name.as_str(), v.driver)).collect();
    assert_eq!(
        listed,
        [("kvm1", "qemu"), (sim.vm.name.as_str(), "vsphere")]
    );
    assert_eq!(both.vm("kvm1").await.unwrap().disks.len(), 1);
    assert_eq!(both.vm(&sim.vm.name).await.unwrap().disks.len(), 2);
    let snap = both
        .snapshot(&request(&sim, "m1", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    assert_eq!(sim.snapshot_names().unwrap(), ["sendense-node-a-m1"]);
    both.release(&snap, ReleaseOutcome::Success).await.unwrap();
    assert!(sim.snapshot_names().unwrap().is_empty());

    // The QEMU VM under the vSphere VM's name: refused at start, naming both drivers. (QEMU
    // serves one client per QMP socket: the first composite lets go of it first.)
    drop(both);
    let e = MultiDriver::start(vec![("qemu", qemu(&sim.vm.name)), ("vsphere", vsphere)])
        .await
        .err()
        .expect("a duplicate name is refused")
        .to_string();
    assert!(
        e.contains(&format!("{:?}", sim.vm.name)) && e.contains("qemu") && e.contains("vsphere"),
        "{e}"
    );
}

#[test]
fn the_vddk_thumbprint_is_the_sha1_fingerprint_openssl_prints() {
    let sim = sim();
    let pem = std::fs::read_to_string(&sim.cert_pem).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha1", "-in"])
        .arg(&sim.cert_pem)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    // "SHA1 Fingerprint=AA:BB:..."
    let text = String::from_utf8(out.stdout).unwrap();
    let want = text.trim().rsplit('=').next().unwrap();
    assert_eq!(
        agent_node::source::vsphere::sha1_thumbprint(&pem).as_deref(),
        Some(want)
    );
    assert_eq!(
        agent_node::source::vsphere::sha1_thumbprint("not a pem"),
        None
    );
}

#[tokio::test]
async fn an_expired_session_is_opened_again() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let d = VsphereDriver::new(&config(&sim, pin(&sim)), NODE, run.path().into());
    let snap = d
        .snapshot(&request(&sim, "s1", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    // The session the driver uses, as it handed it to nbdkit.
    let cookie_file = run.path().join("nbdkit-s1-2000.cookie");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&cookie_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the cookie file is private");
    let cookie = std::fs::read_to_string(&cookie_file).unwrap();
    let value = cookie
        .strip_prefix("vmware_soap_session=")
        .expect("a session cookie");
    // The server ends that session (as an idle timeout would).
    let (status, _, body) = sim
        .soap_call(
            Some(value),
            r#"<Logout xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this></Logout>"#,
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let url = sim.datastore_file_url(&sim.vm.disks[0].file_name);
    assert_eq!(
        sim.range_get(&url, Some(value), 0, 512).unwrap().0,
        401,
        "the session is gone"
    );
    // The next calls log in again and work: release removes the snapshot.
    assert_eq!(d.list_vms().await.unwrap().len(), 1);
    d.release(&snap, ReleaseOutcome::Success).await.unwrap();
    assert!(sim.snapshot_names().unwrap().is_empty());
}

/// A snapshot taken behind the driver's back (another node, an older version), as raw SOAP.
fn raw_snapshot(sim: &Vcsim, name: &str, description: &str) {
    let cookie = sim.login_cookie(&sim.user, &sim.password).unwrap();
    let (status, _, body) = sim
        .soap_call(
            Some(&cookie),
            &format!(
                concat!(
                    r#"<CreateSnapshot_Task xmlns="urn:vim25"><_this type="VirtualMachine">{}</_this>"#,
                    "<name>{}</name><description>{}</description><memory>false</memory>",
                    "<quiesce>false</quiesce></CreateSnapshot_Task>"
                ),
                sim.vm.moref, name, description
            ),
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let t = std::time::Instant::now();
    while !sim.snapshot_names().unwrap().iter().any(|n| n == name) {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "snapshot {name} did not appear in the simulator's snapshot tree"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[tokio::test]
async fn recovery_removes_only_this_nodes_snapshots() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let cfg = config(&sim, pin(&sim));
    // This node crashed holding a snapshot.
    let d = VsphereDriver::new(&cfg, NODE, run.path().into());
    d.snapshot(&request(&sim, "mine", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    drop(d);
    // Node "node-a-b" (whose snapshot names start with "sendense-node-a-") and node "other"
    // hold snapshots of the same VM; an older version left one that names no node.
    raw_snapshot(
        &sim,
        "sendense-node-a-b-7",
        r#"Taken by Sendense node "node-a-b" for backup 7 at 2026-11-27T04:00:00Z."#,
    );
    raw_snapshot(
        &sim,
        "sendense-other-9",
        r#"Taken by Sendense node "other" for backup 9 at 2026-11-27T04:00:00Z."#,
    );
    raw_snapshot(
        &sim,
        "sendense-5f1c",
        "Taken by Sendense for backup 5f1c at 2026-11-27T03:00:00Z.",
    );
    // The journal is lost too: only the name and description tell which snapshot is ours.
    for f in files(run.path()) {
        if f.starts_with("vsphere-snapshot-") {
            std::fs::remove_file(run.path().join(f)).unwrap();
        }
    }

    let report = VsphereDriver::new(&cfg, NODE, run.path().into())
        .recover()
        .await;
    assert!(removed(&report, "sendense-node-a-mine"), "{report:?}");
    assert_eq!(report.snapshots_removed.len(), 1, "{report:?}");
    let mut left = sim.snapshot_names().unwrap();
    left.sort();
    assert_eq!(
        left,
        ["sendense-5f1c", "sendense-node-a-b-7", "sendense-other-9"],
        "the other nodes' snapshots survive this node's recovery"
    );
    // The one nobody can vouch for is left, and the report says so.
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(
        report.errors[0].contains("sendense-5f1c") && report.errors[0].contains("by hand"),
        "{report:?}"
    );

    // The other nodes' snapshots are not swept before this node's next backup either: without
    // VDDK the VM is refused (it has snapshots), and they stay.
    let e = VsphereDriver::new(&cfg, NODE, run.path().into())
        .snapshot(&request(&sim, "next", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap_err();
    assert!(matches!(e, SourceError::Unsupported { .. }), "{e}");
    assert_eq!(sim.snapshot_names().unwrap().len(), 3);
}

/// A snapshot this node left (journal lost) is removed before the next backup, which then goes
/// ahead: without VDDK a VM with any snapshot left would be refused.
#[tokio::test]
async fn a_snapshot_this_node_left_is_removed_and_the_next_backup_goes_ahead() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    raw_snapshot(
        &sim,
        "sendense-node-a-old",
        r#"Taken by Sendense node "node-a" for backup old at 2026-11-27T04:00:00Z."#,
    );
    let d = VsphereDriver::new(&config(&sim, pin(&sim)), NODE, run.path().into());
    let snap = d
        .snapshot(&request(&sim, "new", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    assert_eq!(
        sim.snapshot_names().unwrap(),
        ["sendense-node-a-new"],
        "the leftover is gone, the new one taken"
    );
    d.release(&snap, ReleaseOutcome::Success).await.unwrap();
    assert!(sim.snapshot_names().unwrap().is_empty());
}

#[tokio::test]
async fn a_vm_with_an_independent_disk_is_shown_as_such_and_refused() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let d = VsphereDriver::new(&config(&sim, pin(&sim)), NODE, run.path().into());
    sim.set_disk_mode(2001, "independent_persistent").unwrap();
    let vm = d.vm(&sim.vm.name).await.unwrap();
    assert_eq!(
        vm.disks[0].label, sim.vm.disks[0].label,
        "a persistent disk keeps its label"
    );
    let label = &vm.disks[1].label;
    assert!(
        label.starts_with(&sim.vm.disks[1].label)
            && label.contains("independent_persistent")
            && label.contains("cannot be backed up"),
        "{label}"
    );
    let e = d
        .snapshot(&request(&sim, "ind-1", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("disk 2001")
            && e.contains("independent_persistent")
            && e.contains("not be consistent"),
        "the error names the disk and why: {e}"
    );
    assert!(
        sim.snapshot_names().unwrap().is_empty(),
        "no snapshot taken"
    );
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));
    // Made persistent again, the VM is backed up.
    sim.set_disk_mode(2001, "persistent").unwrap();
    let snap = d
        .snapshot(&request(&sim, "ind-2", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    assert_eq!(snap.disks.len(), 2);
    d.release(&snap, ReleaseOutcome::Success).await.unwrap();
    assert!(sim.snapshot_names().unwrap().is_empty());
}

/// Reads `len` bytes at `offset` of an export through a new connection.
async fn try_read(socket: &Path, export: &str, offset: u64, len: u32) -> Result<Vec<u8>, String> {
    let c = connect(socket, export).await?;
    let r = c
        .read(offset, len)
        .await
        .map(|b| b.to_vec())
        .map_err(|e| e.to_string());
    let _ = c.disconnect().await;
    r
}

#[tokio::test]
async fn a_session_ended_mid_export_is_renewed_and_nbdkit_reads_again() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let mut cfg = config(&sim, pin(&sim));
    cfg.session_keepalive = std::time::Duration::from_secs(1);
    let d = VsphereDriver::new(&cfg, NODE, run.path().into());
    sim.write_disk(2000, 0, &pattern(0x5a, 64 * 1024)).unwrap();
    let snap = d
        .snapshot(&request(&sim, "ka-1", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    let disk = &snap.disks[0];
    let pids = nbdkit_pids(run.path());
    let cookie_file = run.path().join("nbdkit-ka-1-2000.cookie");
    let first = std::fs::read_to_string(&cookie_file).unwrap();
    let value = first
        .strip_prefix("vmware_soap_session=")
        .expect("a session cookie")
        .trim_matches('"')
        .to_string();
    assert_eq!(
        try_read(&disk.socket, &disk.export, 0, 512).await.unwrap(),
        pattern(0x5a, 512)
    );

    // A connection open across the session's end, like the copy engine's.
    let held = connect(&disk.socket, &disk.export).await.unwrap();
    // The session ends behind the driver's back (an administrator, or vCenter's idle timeout).
    let (status, _, body) = sim
        .soap_call(
            Some(&value),
            r#"<Logout xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this></Logout>"#,
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let url = sim.datastore_file_url(&sim.vm.disks[0].file_name);
    assert_eq!(
        sim.range_get(&url, Some(&value), 0, 512).unwrap().0,
        401,
        "the old session is gone"
    );

    // The keepalive notices, logs in again and rewrites the cookie file; nbdkit re-reads it and
    // serves the disk again (the same nbdkit processes: no restart). The very first read after
    // the logout already succeeds: nbdkit's retry-request filter holds it over the gap (the
    // copy engine would otherwise have seen EIO).
    let read = held.read(0, 512).await.map(|b| b.to_vec());
    let _ = held.disconnect().await;
    match read {
        Ok(data) => assert!(data == pattern(0x5a, 512), "other bytes after the logout"),
        Err(e) => panic!(
            "the first read after the logout failed: {e} (cookie file now {:?})",
            std::fs::read_to_string(&cookie_file)
        ),
    }
    let renewed = std::fs::read_to_string(&cookie_file).unwrap();
    assert_ne!(renewed, first, "a new session's cookie");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&cookie_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the rewritten cookie file is private");
    assert_eq!(nbdkit_pids(run.path()), pids, "the same nbdkits");
    assert!(pids.iter().all(|&p| alive(p)));
    // Every disk reads again, the second too.
    let d1 = &snap.disks[1];
    assert!(try_read(&d1.socket, &d1.export, 0, 512).await.is_ok());

    d.release(&snap, ReleaseOutcome::Success).await.unwrap();
    assert!(sim.snapshot_names().unwrap().is_empty());
    assert!(pids.iter().all(|&p| !alive(p)));
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));
}
