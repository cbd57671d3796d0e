//! The inventory: VMs and disks as the hub sees them, a disk snapshots do not freeze, and
//! the vSphere driver beside the QEMU one (composite driver, daemon).

use super::*;
use agent_node::source::vsphere::VsphereDriver;
use agent_node::source::{ReleaseOutcome, SourceDriver, SourceError};
use sendense_shared::api::BackupType;
use sendense_vsphere::TlsPolicy;
use std::collections::BTreeMap;

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
    let kvm = support::TestVm::temp(&[16 * MIB], |_| {}).await;
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
