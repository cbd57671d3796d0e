//! Instant recovery's engine on real parts: qemu-nbd exports a 2-disk point read-only (as the
//! hub does), the node's [`InstantVm`] starts QEMU on local overlays backed by them and streams
//! every block home while "the guest" writes (QMP `qemu-io` on the guest device, as the
//! integration notes recommend without a guest OS); a SIGKILLed export pauses the stream, a
//! restarted one on the same port lets it resume and complete; at the end QMP shows no NBD
//! node and each overlay equals the point plus the writes. Cancel leaves nothing behind.

use agent_node::instant::{InstantDisk, InstantSpec, InstantVm, NbdServer};
use agent_node::qmp::QmpLog;
use sendense_tests::nbd::QemuNbd;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A raw image of `size` bytes whose every 4 KiB block is distinct (nothing reads as zero).
fn point_image(path: &Path, size: u64, seed: u8) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    for (i, block) in data.chunks_mut(4096).enumerate() {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) ^ (j as u8) ^ seed ^ ((i >> 8) as u8);
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn export(img: &Path, name: &str, port: u16) -> QemuNbd {
    QemuNbd::builder(img, name)
        .format("raw")
        .read_only()
        .tcp_on("127.0.0.1", port)
        .start()
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Waits until every disk's stream has finished, resuming paused jobs (and the VM) on the way.
async fn streams_finish(vm: &InstantVm, within: Duration) {
    wait_for("the streams complete", within, || async {
        if let Ok(stall) = vm.stalled().await {
            let _ = vm.resume(&stall).await;
        }
        vm.progress()
            .await
            .unwrap()
            .iter()
            .all(|p| p.status == "finished")
    })
    .await;
}

async fn wait_for<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_home_through_an_export_that_dies_and_returns_and_cancel_leaves_nothing() {
    let dir = tempfile::Builder::new()
        .prefix("instant-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let sizes = [16 * MIB, 48 * MIB];
    let mut expected = Vec::new();
    let mut exports = Vec::new();
    let mut disks = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let key = 2000 + i as i64;
        let img = dir.path().join(format!("point-{key}.raw"));
        expected.push(point_image(&img, *size, i as u8 + 1));
        let port = free_port();
        exports.push((
            img.clone(),
            port,
            export(&img, &format!("vm-disk-{key}"), port),
        ));
        disks.push(InstantDisk {
            disk_key: key,
            server: NbdServer::Inet {
                host: "127.0.0.1".into(),
                port,
            },
            export: format!("vm-disk-{key}"),
            tls: None,
            size: *size,
            overlay: dir.path().join(format!("overlay-{key}.qcow2")),
        });
    }
    // 12 MiB/s per disk: the 48 MiB disk needs about 4 s, time to lose its export midway.
    let speed = 12 * MIB;
    let spec = InstantSpec {
        name: "instant-vm".into(),
        memory_mib: 64,
        cpus: 1,
        machine: "q35".into(),
        kernel: None,
        initrd: None,
        append: None,
        disks: disks.clone(),
        run_dir: dir.path().join("run"),
        speed: Some(speed),
        paused: true,
        agent_socket: None,
    };
    let log = Arc::new(QmpLog::new(None));
    let requested = Instant::now();
    let vm = InstantVm::start(spec.clone(), log.clone()).await.unwrap();
    // Before any byte is home, the device reads the point through the overlay.
    assert_eq!(vm.nbd_nodes().await.unwrap().len(), 2);
    vm.start_streams().await.unwrap();
    eprintln!(
        "instant: VM up with its disks readable {:?} after the request",
        requested.elapsed()
    );

    // The guest writes while the data streams home (1 MiB at 1 MiB of each disk).
    for d in &disks {
        vm.qmp
            .execute(
                "human-monitor-command",
                json!({"command-line": format!(
                    "qemu-io -d /machine/peripheral/disk{}/virtio-backend \"write -P 0x77 1M 1M\"",
                    d.disk_key)}),
            )
            .await
            .unwrap();
    }
    for e in &mut expected {
        e[MIB as usize..2 * MIB as usize].fill(0x77);
    }

    // Mid-stream the hub's export of the big disk dies (SIGKILL).
    let big = disks[1].disk_key;
    wait_for(
        "the big disk a quarter streamed",
        Duration::from_secs(30),
        || async {
            let p = vm.progress().await.unwrap();
            let b = p.iter().find(|p| p.disk_key == big).unwrap();
            b.done > b.total / 4
        },
    )
    .await;
    let at_kill = vm.progress().await.unwrap();
    let b = at_kill.iter().find(|p| p.disk_key == big).unwrap().clone();
    assert!(b.done < b.total, "{at_kill:?}");
    exports[1].2.kill();
    // Its stream stops on the error (on-error: stop) rather than failing: paused, not gone.
    wait_for(
        "the big disk's stream paused",
        Duration::from_secs(30),
        || async { vm.stalled().await.unwrap().paused_streams == vec![big] },
    )
    .await;
    let paused_at = vm.progress().await.unwrap();
    let p = paused_at.iter().find(|p| p.disk_key == big).unwrap();
    assert!(p.done < p.total, "{paused_at:?}");
    let events = vm.qmp.events();
    assert!(
        events
            .iter()
            .any(|e| e.name == "BLOCK_JOB_ERROR" && e.data["device"] == format!("stream-{big}")),
        "QMP tells the job's error: {events:?}"
    );

    // The export comes back on the same port; the stream resumes and completes.
    let (img, port, _) = &exports[1];
    exports[1].2 = export(img, &format!("vm-disk-{big}"), *port);
    let stream_started = Instant::now();
    streams_finish(&vm, Duration::from_secs(60)).await;
    let total: u64 = sizes.iter().sum();
    eprintln!(
        "instant: streams complete {:?} after the request ({} MiB, limit {} MiB/s per disk, \
         {:?} after the export's return)",
        requested.elapsed(),
        total / MIB,
        speed / MIB,
        stream_started.elapsed()
    );
    // The overlays hold everything: the NBD nodes go, and QMP shows none.
    vm.drop_nbd_nodes().await.unwrap();
    assert_eq!(vm.nbd_nodes().await.unwrap(), Vec::<String>::new());
    // With the exports gone the disks still read (the VM runs from local disks alone).
    for (_, _, nbd) in &mut exports {
        nbd.kill();
    }
    for d in &disks {
        let out = vm
            .qmp
            .execute(
                "human-monitor-command",
                json!({"command-line": format!(
                    "qemu-io -d /machine/peripheral/disk{}/virtio-backend \"read -P 0x77 1M 1M\"",
                    d.disk_key)}),
            )
            .await
            .unwrap();
        assert!(!out.to_string().contains("failed"), "{out}");
    }
    vm.quit().await.unwrap();
    for (d, e) in disks.iter().zip(&expected) {
        let want = dir.path().join(format!("want-{}.raw", d.disk_key));
        std::fs::write(&want, e).unwrap();
        let cmp = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&want)
            .arg(&d.overlay)
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "disk {} differs from the point plus the guest's writes: {}",
            d.disk_key,
            String::from_utf8_lossy(&cmp.stdout)
        );
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&d.overlay)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert!(info.get("backing-filename").is_none(), "{info}");
    }

    // Cancel: a second recovery, stopped mid-stream, leaves no process, overlay or port.
    let mut exports2 = Vec::new();
    let mut spec2 = spec.clone();
    spec2.name = "instant-cancel".into();
    for d in &mut spec2.disks {
        d.overlay = dir.path().join(format!("cancel-{}.qcow2", d.disk_key));
        let port = free_port();
        d.server = NbdServer::Inet {
            host: "127.0.0.1".into(),
            port,
        };
        let img = dir.path().join(format!("point-{}.raw", d.disk_key));
        exports2.push((export(&img, &d.export, port), port));
    }
    let vm2 = InstantVm::start(spec2.clone(), log).await.unwrap();
    vm2.start_streams().await.unwrap();
    let pid = vm2.pid();
    vm2.destroy().await.unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} still there"
    );
    for d in &spec2.disks {
        assert!(!d.overlay.exists(), "{} left behind", d.overlay.display());
    }
    for (nbd, port) in &mut exports2 {
        nbd.kill();
        wait_for("the export's port free", Duration::from_secs(5), || async {
            port_free(*port)
        })
        .await;
    }
}

/// The real guest (`sendense_tests::guest`) recovered instantly from an exported 2-disk point
/// (its root chain and its data disk, served read-only by qemu-nbd as the hub serves a
/// point): its init's ready line (`DATA mounted`) appears while less than half of the bytes
/// are home; its writer appends checksummed records during the stream; the data disk's export
/// SIGKILLed mid-stream pauses the stream (and the VM when the guest touches an unstreamed
/// block), the restarted export lets both resume and complete; no NBD node is left and the
/// records the guest acknowledged are on the local disk.
///
/// The stream is rate-limited (`speed` 256 KiB/s per disk) until the ready line so that the
/// boot under TCG cannot lose the race, then unlimited (`block-job-set-speed`): at that rate
/// half of the 160 MiB is home after 160 s, longer than the ready line is waited for. (At
/// 1 MiB/s a CI run whose boot took 45 s under load had 55.7 % home.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_guest_boots_before_half_its_data_is_home() {
    let guest = sendense_tests::guest::GuestImages::get().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("instant-guest-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let point = guest.vm_disks(dir.path(), "point").unwrap();
    let mut exports = Vec::new();
    let mut disks = Vec::new();
    for (i, img) in point.iter().enumerate() {
        let key = 2000 + i as i64;
        let port = free_port();
        let name = format!("vm-disk-{key}");
        let nbd = QemuNbd::builder(img, &name)
            .format("qcow2")
            .read_only()
            .tcp_on("127.0.0.1", port)
            .start();
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(img)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        exports.push((img.clone(), port, nbd));
        disks.push(InstantDisk {
            disk_key: key,
            server: NbdServer::Inet {
                host: "127.0.0.1".into(),
                port,
            },
            export: name,
            tls: None,
            size: info["virtual-size"].as_u64().unwrap(),
            overlay: dir.path().join(format!("overlay-{key}.qcow2")),
        });
    }
    let spec = InstantSpec {
        name: "instant-guest".into(),
        memory_mib: 512,
        cpus: 1,
        machine: "q35".into(),
        kernel: Some(guest.kernel.display().to_string()),
        initrd: Some(guest.initrd.display().to_string()),
        append: Some(
            "console=ttyS0 root=/dev/vda rw quiet loglevel=1 panic=-1 sendense.qga=off".into(),
        ),
        disks: disks.clone(),
        run_dir: dir.path().join("run"),
        speed: Some(MIB / 4),
        paused: false,
        agent_socket: None,
    };
    let requested = Instant::now();
    let vm = InstantVm::start(spec, Arc::new(QmpLog::new(None)))
        .await
        .unwrap();
    vm.start_streams().await.unwrap();
    let serial = vm.serial_log.clone();
    let read_serial = || std::fs::read_to_string(&serial).unwrap_or_default();
    wait_for(
        "the guest's ready line",
        Duration::from_secs(120),
        || async { read_serial().contains("DATA mounted") },
    )
    .await;
    let to_ready = requested.elapsed();
    let at_ready = vm.progress().await.unwrap();
    let (done, total) = at_ready
        .iter()
        .fold((0, 0), |(d, t), p| (d + p.done, t + p.total));
    eprintln!(
        "instant: guest ready line {to_ready:?} after the request, {} of {} MiB home ({:.1} %)",
        done / MIB,
        total / MIB,
        100.0 * done as f64 / total as f64
    );
    assert!(done * 2 < total, "{at_ready:?}");
    // The guest writes during the stream: its writer acknowledges fsynced records.
    wait_for(
        "the guest's writer acks",
        Duration::from_secs(60),
        || async { read_serial().contains("ACK 3") },
    )
    .await;

    // The data disk's export dies mid-stream.
    exports[1].2.kill();
    wait_for(
        "the data disk's stream paused",
        Duration::from_secs(60),
        || async {
            vm.stalled()
                .await
                .unwrap()
                .paused_streams
                .contains(&disks[1].disk_key)
        },
    )
    .await;
    let vm_paused = vm.stalled().await.unwrap().io_error;
    eprintln!("instant: export killed: stream paused, VM paused on I/O error: {vm_paused}");
    let (img, port, _) = &exports[1];
    let name = disks[1].export.clone();
    exports[1].2 = QemuNbd::builder(img, &name)
        .format("qcow2")
        .read_only()
        .tcp_on("127.0.0.1", *port)
        .start();
    for d in &disks {
        vm.qmp
            .execute(
                "block-job-set-speed",
                json!({"device": format!("stream-{}", d.disk_key), "speed": 0}),
            )
            .await
            .unwrap();
    }
    let resumed = Instant::now();
    let home_before = vm
        .progress()
        .await
        .unwrap()
        .iter()
        .map(|p| p.done)
        .sum::<u64>();
    streams_finish(&vm, Duration::from_secs(120)).await;
    let secs = resumed.elapsed().as_secs_f64();
    eprintln!(
        "instant: rest of the stream ({} MiB) unlimited in {secs:.1} s: {:.1} MiB/s \
         (including the reconnect after the export's return)",
        (total - home_before) / MIB,
        (total - home_before) as f64 / MIB as f64 / secs
    );
    vm.drop_nbd_nodes().await.unwrap();
    assert_eq!(vm.nbd_nodes().await.unwrap(), Vec::<String>::new());
    assert_eq!(vm.run_state().await.unwrap(), "running");
    let acks_before = read_serial().matches("ACK ").count();
    for (_, _, nbd) in &mut exports {
        nbd.kill();
    }
    // Without any export the guest goes on writing to its local disks.
    wait_for(
        "the guest writes with no export",
        Duration::from_secs(60),
        || async { read_serial().matches("ACK ").count() > acks_before + 2 },
    )
    .await;
    assert_eq!(vm.run_state().await.unwrap(), "running");
    vm.quit().await.unwrap();
    let overlay = &disks[1].overlay;
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(overlay)
        .arg(dir.path().join("data.raw"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // QEMU was quit under a running guest: the acknowledged records may be in ext4's journal
    // only, which e2fsck replays (debugfs does not).
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fy"])
        .arg(dir.path().join("data.raw"))
        .output()
        .unwrap();
    assert!(fsck.status.code().is_some_and(|c| c <= 1), "{fsck:?}");
    let cat = std::process::Command::new("debugfs")
        .args(["-R", "cat /records"])
        .arg(dir.path().join("data.raw"))
        .output()
        .unwrap();
    let records = sendense_tests::guest::parse_records(&String::from_utf8_lossy(&cat.stdout));
    let good = records
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.checksum_ok))
        .count();
    assert!(
        good >= acks_before,
        "{good} whole records, {acks_before} acked"
    );
}
