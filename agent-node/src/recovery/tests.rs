use super::*;
use crate::instant::Stall;
use sendense_shared::api::{NbdExport, NodeRecoveryDisk};

fn disk(key: i64) -> NodeRecoveryDisk {
    NodeRecoveryDisk {
        disk_key: DiskKey(key),
        export: NbdExport {
            host: String::new(),
            port: 10100,
            export: format!("vm-disk-{key}"),
            socket: Some("/run/sendense-nbd/10100.sock".into()),
            tls: None,
        },
        size_bytes: 1 << 20,
    }
}

fn req(dir: &Path) -> NodeRecoveryStart {
    NodeRecoveryStart {
        recovery_id: "r1".into(),
        vm_name: "vm1".into(),
        memory_mib: 512,
        cpus: 1,
        machine: None,
        kernel: None,
        initrd: None,
        append: None,
        speed_bps: None,
        overlay_dir: Some(dir.display().to_string()),
        disks: vec![disk(2000), disk(2001)],
    }
}

fn planned(r: &NodeRecoveryStart, dir: &Path) -> Result<InstantSpec, String> {
    plan(r, &dir.join("run/recovery-r1"), &dir.join("default"), |a| a).map_err(|e| e.to_string())
}

#[test]
fn a_good_request_becomes_the_engines_spec() {
    let dir = tempfile::tempdir().unwrap();
    let spec = planned(&req(dir.path()), dir.path()).unwrap();
    assert_eq!(spec.machine, "q35");
    assert!(!spec.paused, "a recovered VM starts running");
    assert_eq!(
        spec.disks[1].overlay,
        dir.path().join("vm1-disk-2001.qcow2")
    );
    assert_eq!(
        spec.disks[0].server,
        NbdServer::Unix {
            path: "/run/sendense-nbd/10100.sock".into()
        }
    );
    assert_eq!(spec.disks[0].export, "vm-disk-2000");
    assert_eq!(
        spec.agent_socket,
        Some(dir.path().join("run/recovery-r1/qga.sock"))
    );
    // Without overlay_dir: the node's recovery directory.
    let r = NodeRecoveryStart {
        overlay_dir: None,
        ..req(dir.path())
    };
    let spec = planned(&r, dir.path()).unwrap();
    assert_eq!(
        spec.disks[0].overlay,
        dir.path().join("default/vm1-disk-2000.qcow2")
    );
}

#[test]
fn exports_are_routed_as_restores_are() {
    use sendense_shared::nbd::NbdAddr;
    let dir = tempfile::tempdir().unwrap();
    let mut r = req(dir.path());
    r.disks[1].export.socket = None;
    r.disks[1].export.host = "127.0.0.1".into();
    // As a tunnel does: the hub's loopback port at the forward's address, its socket at the
    // local end of the streamlocal forward.
    let spec = plan(
        &r,
        &dir.path().join("run/recovery-r1"),
        dir.path(),
        |a| match a {
            NbdAddr::Tcp { port, export, .. } => NbdAddr::Tcp {
                host: "127.0.0.2".into(),
                port,
                export,
            },
            NbdAddr::Unix { export, .. } => NbdAddr::Unix {
                path: "/run/node/nbd/10100.sock".into(),
                export,
            },
        },
    )
    .unwrap();
    assert_eq!(
        spec.disks[0].server,
        NbdServer::Unix {
            path: "/run/node/nbd/10100.sock".into()
        }
    );
    assert_eq!(
        spec.disks[1].server,
        NbdServer::Inet {
            host: "127.0.0.2".into(),
            port: 10100
        }
    );
}

#[test]
fn every_bad_field_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vmlinuz");
    std::fs::write(&file, "k").unwrap();
    let file = file.display().to_string();
    let d = dir.path().display().to_string();
    let base = req(dir.path());
    let with = |f: &dyn Fn(&mut NodeRecoveryStart)| {
        let mut r = base.clone();
        f(&mut r);
        r
    };
    let cases: Vec<(NodeRecoveryStart, &str)> = vec![
        (with(&|r| r.vm_name = "-vm".into()), "vm_name:"),
        (with(&|r| r.vm_name = "vm 1".into()), "vm_name:"),
        (with(&|r| r.vm_name = "v".repeat(64)), "vm_name:"),
        (with(&|r| r.vm_name = String::new()), "vm_name:"),
        (with(&|r| r.memory_mib = 63), "memory_mib:"),
        (with(&|r| r.memory_mib = 65537), "memory_mib:"),
        (with(&|r| r.cpus = 0), "cpus:"),
        (with(&|r| r.cpus = 65), "cpus:"),
        (
            with(&|r| r.machine = Some("q35,accel=kvm".into())),
            "machine:",
        ),
        (with(&|r| r.kernel = Some("vmlinuz".into())), "kernel:"),
        (
            with(&|r| r.kernel = Some(format!("{d}/missing"))),
            "kernel:",
        ),
        (with(&|r| r.kernel = Some(d.clone())), "kernel:"),
        (
            with(&|r| {
                r.kernel = Some(file.clone());
                r.initrd = Some(format!("{d}/missing"));
            }),
            "initrd:",
        ),
        (with(&|r| r.initrd = Some(file.clone())), "initrd:"),
        (with(&|r| r.append = Some("quiet".into())), "append:"),
        (with(&|r| r.speed_bps = Some(0)), "speed_bps:"),
        (
            with(&|r| r.overlay_dir = Some("relative".into())),
            "overlay_dir:",
        ),
        (
            with(&|r| r.overlay_dir = Some(format!("{d}/../x"))),
            "overlay_dir:",
        ),
        (
            with(&|r| r.overlay_dir = Some(format!("{d}/missing"))),
            "overlay_dir:",
        ),
        (
            with(&|r| r.overlay_dir = Some(file.clone())),
            "overlay_dir:",
        ),
        (with(&|r| r.disks.clear()), "disks:"),
        (
            with(&|r| r.disks[1].disk_key = DiskKey(2000)),
            "disks[1].disk_key:",
        ),
        (with(&|r| r.disks[1].size_bytes = 0), "disks[1].size_bytes:"),
        (
            with(&|r| r.disks[0].export.socket = Some("relative.sock".into())),
            "disks[0].export:",
        ),
        (
            with(&|r| {
                r.disks[1].export.socket = None;
                r.disks[1].export.host = "a b".into();
            }),
            "disks[1].export:",
        ),
        (
            with(&|r| {
                r.disks[1].export.socket = None;
                r.disks[1].export.host = "127.0.0.1".into();
                r.disks[1].export.port = 0;
            }),
            "disks[1].export:",
        ),
        (
            with(&|r| r.disks[0].export.export = String::new()),
            "disks[0].export:",
        ),
        (
            with(&|r| {
                r.disks[0].export.tls = Some(sendense_shared::api::NbdTls {
                    ca_pem: "not a PEM".into(),
                    cert_pem: String::new(),
                    key_pem: String::new(),
                })
            }),
            "disks[0].export.tls:",
        ),
    ];
    for (r, want) in cases {
        let e = planned(&r, dir.path()).unwrap_err();
        assert!(e.starts_with(want), "{want}: {e}");
    }
    // A run directory too deep for a unix socket path is the id's fault.
    let deep = dir.path().join("x".repeat(100));
    let e = plan(&base, &deep, dir.path(), |a| a)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("recovery_id: too long"), "{e}");
}

#[test]
fn a_bad_id_is_named_once() {
    assert_eq!(
        strip_field(
            "recovery_id contains '/', which is not allowed",
            "recovery_id"
        ),
        "contains '/', which is not allowed"
    );
    assert_eq!(
        strip_field("recovery_id is empty", "recovery_id"),
        "is empty"
    );
}

#[test]
fn the_stall_is_worded_for_the_operator() {
    let one = stalled_words(&Stall {
        paused_streams: vec![2001],
        failed_devices: vec![],
        io_error: false,
    });
    assert!(
        one.starts_with("the hub's export of disk 2001 does not answer: the VM runs on"),
        "{one}"
    );
    assert!(
        one.ends_with("the stream resumes when the export is back"),
        "{one}"
    );
    let both = stalled_words(&Stall {
        paused_streams: vec![2001],
        failed_devices: vec![2000, 2001],
        io_error: true,
    });
    assert_eq!(
        both,
        "the hub's export of disks 2000, 2001 does not answer: the VM is paused (not crashed); \
         what the guest wrote is kept in the overlays; the streams resume when the export is back"
    );
}
