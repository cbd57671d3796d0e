//! Instant recovery through the real hub and node: a 2-disk point of the real guest
//! ([`sendense_tests::guest`]) booted as a new QEMU VM on the node while its disks stream home
//! from the hub's read-only exports.
//!
//! - The guest's init reaches its ready line while less than half of the bytes are home (the
//!   streams start bounded at 256 KiB/s per disk so that the boot under TCG wins the race,
//!   then `POST .../speed` lifts the bound); its writer appends checksummed records during the
//!   stream.
//! - The hub's export of the data disk dies (SIGKILL) while its image is away, so the hub's
//!   restarts fail for a while: the stream pauses and the recovery says what is at risk; when
//!   the image is back the hub serves it again on the same socket and the stream resumes.
//! - The hub SIGKILLed mid-stream and started again takes the recovery back: its disks are
//!   served again on the same sockets and the stream goes on (the VM is not stopped).
//! - At the end the VM references no NBD node (QMP), runs from its overlays alone, and the data
//!   disk holds every record the guest acknowledged; the hub holds no port or process.
//! - A second recovery, cancelled mid-stream, leaves no QEMU, overlay or port.
//! - Measured and printed: request → ready line, and the stream's throughput against a plain
//!   restore of the same point.

use super::bootcheck::guest_disks;
use super::sys::{Jobs, hub_bin, node_bin, node_options};
use sendense_tests::guest::GuestImages;
use sendense_tests::hub::{Api, HubOptions, HubProcess};
use sendense_tests::node::NodeProcess;
use sendense_tests::qemu::{Qmp, TestVm};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// How long a guest may take to its ready line under TCG on a loaded machine.
const BOOT_LIMIT: Duration = Duration::from_secs(150);

async fn wait<F, Fut>(what: &str, within: Duration, mut f: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    let t = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn totals(r: &Value) -> (u64, u64) {
    r["disks"]
        .as_array()
        .unwrap()
        .iter()
        .fold((0, 0), |(d, t), k| {
            (
                d + k["bytes_done"].as_u64().unwrap(),
                t + k["bytes_total"].as_u64().unwrap(),
            )
        })
}

fn serial(r: &Value) -> String {
    r["serial_log"]
        .as_str()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default()
}

async fn recovery(api: &Api, id: &str) -> Value {
    api.get_ok(&format!("/api/v1/recoveries/{id}")).await
}

async fn assert_hub_holds_nothing(api: &Api, r: &Value) {
    let ports = api.get_ok("/api/v1/ports").await;
    assert_eq!(ports["allocations"], json!([]), "{ports}");
    for d in r["disks"].as_array().unwrap() {
        assert_eq!(d["nbd_port"], Value::Null, "{d}");
    }
    let procs = api.get_ok("/api/v1/processes").await;
    for p in procs.as_array().unwrap() {
        assert!(
            !p["alive"].as_bool().unwrap_or(false)
                || !sendense_tests::pid_alive(p["pid"].as_u64().unwrap() as u32),
            "a qemu-nbd is still alive: {p}"
        );
    }
}

/// A plain restore of each disk of `point` into a new image; answers the seconds it took and
/// the bytes (virtual) it covered.
async fn plain_restores(api: &Api, node: &str, point: &str, dir: &Path) -> (f64, u64) {
    let t = Instant::now();
    let mut bytes = 0;
    for key in [2000, 2001] {
        let path = dir.join(format!("plain-{key}.qcow2"));
        let (s, r) = api
            .post(
                "/api/v1/restores",
                &json!({"backup_id": point, "disk_key": key,
                        "target": {"node": node, "path": path.display().to_string()}}),
            )
            .await;
        assert_eq!(s, 202, "{r}");
        let id = r["restore_id"].as_str().unwrap().to_string();
        let r = wait("the plain restore", Duration::from_secs(120), || async {
            let r = api.get_ok(&format!("/api/v1/restores/{id}")).await;
            super::sys::terminal(&r).then_some(r)
        })
        .await;
        assert_eq!(r["status"], "completed", "{r:#}");
        bytes += r["bytes_total"].as_u64().unwrap();
    }
    (t.elapsed().as_secs_f64(), bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instant_recovery_of_the_real_guest_through_hub_and_node() {
    let g = GuestImages::get().expect("guest images (scripts/setup.sh)");
    let tmp = tempfile::Builder::new()
        .prefix("sdinst-")
        .tempdir()
        .unwrap();
    // A fixed port: the restarted hub is found by the node where it knows it.
    let mut hopts = HubOptions::new(tmp.path().join("hub"));
    hopts.listen = format!("127.0.0.1:{}", sendense_tests::net::free_port());
    let mut hub = HubProcess::start(&hub_bin(), hopts).expect("start sendense-hub");
    let mut api = hub.api();
    let scratch = tmp.path().join("scratch");
    let src = TestVm::start("irsrc", &tmp.path().join("vm"), &[1 << 20, 1 << 20], |i| {
        guest_disks(&g, &scratch, "irsrc", i, false)
    })
    .await
    .unwrap();
    let nopts = node_options(
        &hub,
        tmp.path(),
        "irsrc",
        vec![("irsrc".into(), src.node_qmp.clone())],
        None,
    );
    let node = NodeProcess::start(&node_bin(), nopts).expect("start sendense-node");
    let node_name = node.opts.name.clone();
    let jobs = Jobs {
        api: &api,
        node: &node,
        vm: "irsrc",
        repository: "default",
    };
    jobs.wait_vm_imported(|d| d.len() == 2).await;
    let (point, _) = jobs.backup("full").await;
    let b = jobs.wait_completed(&point).await;
    drop(src);

    let (plain_secs, plain_bytes) = plain_restores(&api, &node_name, &point, tmp.path()).await;

    // Refusals name the field; nothing is held after them.
    let (s, v) = api
        .post(
            "/api/v1/recoveries",
            &json!({"backup_id": point, "node": node_name, "vm_name": "bad name"}),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["detail"].as_str().unwrap().starts_with("vm_name"), "{v}");

    let append = "console=ttyS0 root=/dev/vda rw quiet loglevel=1 panic=-1 sendense.qga=off";
    let requested = Instant::now();
    let (s, r) = api
        .post(
            "/api/v1/recoveries",
            &json!({"backup_id": point, "node": node_name, "vm_name": "irrec",
                    "kernel": g.kernel.display().to_string(),
                    "initrd": g.initrd.display().to_string(),
                    "append": append, "memory_mib": 512, "speed_bps": 256 * 1024}),
        )
        .await;
    assert_eq!(s, 202, "{r:#}");
    let id = r["recovery_id"].as_str().unwrap().to_string();
    assert_eq!(r["status"], "running", "{r:#}");
    let disks = r["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{r:#}");
    assert!(disks.iter().all(|d| d["qemu_nbd_pid"].is_u64()), "{r:#}");

    let at_ready = wait("the guest's ready line", BOOT_LIMIT, || async {
        let r = recovery(&api, &id).await;
        serial(&r).contains("DATA mounted").then_some(r)
    })
    .await;
    let to_ready = requested.elapsed();
    let (done, total) = totals(&at_ready);
    eprintln!(
        "instant: request → guest ready line {:.1} s, {} of {} MiB home ({:.1} %)",
        to_ready.as_secs_f64(),
        done / MIB,
        total / MIB,
        100.0 * done as f64 / total as f64
    );
    assert!(
        done * 2 < total,
        "half home before the ready line: {at_ready:#}"
    );
    assert!(at_ready["vm_started_at"].is_string(), "{at_ready:#}");
    wait(
        "the guest's writer acks",
        Duration::from_secs(60),
        || async {
            let r = recovery(&api, &id).await;
            serial(&r).contains("ACK 3").then_some(r)
        },
    )
    .await;

    // The data disk's export dies while its image is away: the hub's restarts fail until
    // the image is back, long enough for QEMU's reads to fail and the stream to pause.
    let data = &at_ready["disks"][1];
    let image = PathBuf::from(data["source_qcow2"].as_str().unwrap());
    let away = image.with_extension("away");
    std::fs::rename(&image, &away).unwrap();
    let pid = data["qemu_nbd_pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = Instant::now();
    let stalled = loop {
        let r = recovery(&api, &id).await;
        if r["stalled"].is_string() {
            break r;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let ev = api.event_lines(&point).await;
            panic!(
                "no stall reported within 60 s: {r:#}\nevents: {ev:#?}\nnode log:\n{}\nhub log:\n{}",
                node.stderr(),
                hub.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let words = stalled["stalled"].as_str().unwrap();
    eprintln!("instant: stalled: {words} (VM {})", stalled["vm_state"]);
    assert!(
        words.contains("2001") && words.contains("paused"),
        "the stall names the disk and what happens: {words}"
    );
    assert_ne!(stalled["status"], "failed", "{stalled:#}");
    std::fs::rename(&away, &image).unwrap();
    wait(
        "the export served again",
        Duration::from_secs(60),
        || async {
            let r = recovery(&api, &id).await;
            r["stalled"].is_null().then_some(r)
        },
    )
    .await;

    // The hub itself is SIGKILLed mid-stream and started again: it takes the recovery back
    // (its disks served again on the same sockets), the VM is not stopped.
    hub.kill9();
    let opts = hub.opts.clone();
    drop(hub);
    hub = HubProcess::start(&hub_bin(), opts).expect("restart sendense-hub");
    api = hub.api();
    let back = wait(
        "the recovery taken back",
        Duration::from_secs(60),
        || async {
            let ev = api.event_lines(&point).await;
            ev.iter()
                .any(|l| l.starts_with("recovery_taken_back:"))
                .then_some(Value::Null)
        },
    )
    .await;
    let _ = back;
    let r = recovery(&api, &id).await;
    assert_eq!(r["status"], "running", "after the hub's restart: {r:#}");
    // The operator lifts the bound through the console, by the recovery's short id.
    let out = std::process::Command::new(sendense_tests::bin_path("sendense-console"))
        .arg("--hub")
        .arg(&hub.url)
        .arg("--token-file")
        .arg(hub.opts.data_dir.join("token"))
        .args(["recover", "speed", &id[..8], "0", "--json"])
        .env("HOME", tmp.path())
        .env_remove("SENDENSE_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "recover speed: {err}");
    assert!(err.contains("no bound"), "{err}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let lifted = Instant::now();
    let (home_at_lift, _) = totals(&v);
    let end = wait("the recovery's end", Duration::from_secs(180), || async {
        let r = recovery(&api, &id).await;
        super::sys::terminal(&r).then_some(r)
    })
    .await;
    let stream_secs = lifted.elapsed().as_secs_f64();
    assert_eq!(
        end["status"],
        "completed",
        "{end:#}\nnode log:\n{}",
        node.stderr()
    );
    assert_eq!(end["stalled"], Value::Null, "{end:#}");
    let events = api.get_ok(&format!("/api/v1/recoveries/{id}/events")).await;
    let steps: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["step"].as_str().unwrap_or_default())
        .collect();
    for want in [
        "recovery_stalled",
        "export_restarted",
        "recovery_resumed",
        "recovery_speed",
        "recovery_completed",
    ] {
        assert!(steps.contains(&want), "{want} missing: {steps:?}");
    }
    assert_hub_holds_nothing(&api, &end).await;
    eprintln!(
        "instant: rest of the stream after the stall ({} MiB) in {stream_secs:.1} s, unbounded, \
         including the resume (QEMU's NBD reconnect backs off up to ~16 s)",
        (total - home_at_lift) / MIB
    );

    // The VM runs on local disks alone and the guest keeps writing.
    let qmp = Qmp::connect(Path::new(end["qmp_socket"].as_str().unwrap()))
        .await
        .expect("the recovered VM's QMP");
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let nbd: Vec<&Value> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["drv"] == "nbd")
        .collect();
    assert!(nbd.is_empty(), "the VM still references the hub: {nbd:?}");
    let acks = serial(&end).matches("ACK ").count();
    wait(
        "the guest writes after the stream",
        Duration::from_secs(60),
        || async { (serial(&end).matches("ACK ").count() > acks + 2).then_some(Value::Null) },
    )
    .await;
    let acks = serial(&end).matches("ACK ").count();
    let qemu_pid = end["qemu_pid"].as_u64().unwrap() as u32;
    let _ = qmp.execute("quit", json!({})).await;
    let t = Instant::now();
    while sendense_tests::pid_alive(qemu_pid) {
        assert!(t.elapsed() < Duration::from_secs(20), "QEMU did not quit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each overlay is a whole disk now; the data disk holds every acknowledged record (QEMU
    // quit under a running guest: e2fsck replays ext4's journal first).
    let overlays: Vec<PathBuf> = end["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d["overlay"].as_str().unwrap()))
        .collect();
    for o in &overlays {
        let info = sendense_tests::run_stdout(
            std::process::Command::new("qemu-img")
                .args(["info", "--output=json", "-U"])
                .arg(o),
        );
        let info: Value = serde_json::from_str(&info).unwrap();
        assert!(info.get("backing-filename").is_none(), "{info}");
    }
    let raw = tmp.path().join("data.raw");
    sendense_tests::run(
        std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&overlays[1])
            .arg(&raw),
    );
    let fsck = std::process::Command::new("e2fsck")
        .arg("-fy")
        .arg(&raw)
        .output()
        .unwrap();
    assert!(fsck.status.code().is_some_and(|c| c <= 1), "{fsck:?}");
    let cat = std::process::Command::new("debugfs")
        .args(["-R", "cat /records"])
        .arg(&raw)
        .output()
        .unwrap();
    let records = sendense_tests::guest::parse_records(&String::from_utf8_lossy(&cat.stdout));
    let whole = records
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.checksum_ok))
        .count();
    assert!(whole >= acks, "{whole} whole records, {acks} acknowledged");
    for o in &overlays {
        std::fs::remove_file(o).unwrap();
    }

    // The stream's throughput with no bound and no stall, against the plain restore of the
    // same point (both cover every virtual byte of both disks; the restore copies allocated
    // data only, block-stream asks the export for every cluster).
    let t = Instant::now();
    let (s, r) = api
        .post(
            "/api/v1/recoveries",
            &json!({"backup_id": point, "node": node_name, "vm_name": "irfast",
                    "kernel": g.kernel.display().to_string(),
                    "initrd": g.initrd.display().to_string(), "append": append}),
        )
        .await;
    assert_eq!(s, 202, "{r:#}");
    let fid = r["recovery_id"].as_str().unwrap().to_string();
    let fast = wait(
        "the unbounded recovery",
        Duration::from_secs(120),
        || async {
            let r = recovery(&api, &fid).await;
            super::sys::terminal(&r).then_some(r)
        },
    )
    .await;
    let fast_secs = t.elapsed().as_secs_f64();
    assert_eq!(fast["status"], "completed", "{fast:#}");
    let (_, fast_total) = totals(&fast);
    let stream_mibs = fast_total as f64 / MIB as f64 / fast_secs;
    let plain_mibs = plain_bytes as f64 / MIB as f64 / plain_secs;
    eprintln!(
        "instant: unbounded recovery request → completed {fast_secs:.2} s ({stream_mibs:.1} MiB/s \
         of virtual size, VM start included); plain restore of the same point {plain_secs:.2} s \
         ({plain_mibs:.1} MiB/s); ratio {:.2}",
        stream_mibs / plain_mibs
    );
    let fq = Qmp::connect(Path::new(fast["qmp_socket"].as_str().unwrap()))
        .await
        .expect("the fast VM's QMP");
    let fpid = fast["qemu_pid"].as_u64().unwrap() as u32;
    let _ = fq.execute("quit", json!({})).await;
    let t = Instant::now();
    while sendense_tests::pid_alive(fpid) {
        assert!(t.elapsed() < Duration::from_secs(20), "QEMU did not quit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for d in fast["disks"].as_array().unwrap() {
        std::fs::remove_file(d["overlay"].as_str().unwrap()).unwrap();
    }

    // A recovery cancelled mid-stream leaves nothing: no QEMU, no overlay, no port.
    let (s, r) = api
        .post(
            "/api/v1/recoveries",
            &json!({"backup_id": b["backup_id"], "node": node_name, "vm_name": "ircan",
                    "kernel": g.kernel.display().to_string(),
                    "initrd": g.initrd.display().to_string(),
                    "append": append, "speed_bps": 64 * 1024}),
        )
        .await;
    assert_eq!(s, 202, "{r:#}");
    let cid = r["recovery_id"].as_str().unwrap().to_string();
    let running = wait("the VM started", Duration::from_secs(60), || async {
        let r = recovery(&api, &cid).await;
        (r["qemu_pid"].is_u64() && r["disks"][0]["overlay"].is_string()).then_some(r)
    })
    .await;
    let (s, v) = api
        .post(&format!("/api/v1/recoveries/{cid}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 202, "{v}");
    let end = wait("the cancel's end", Duration::from_secs(60), || async {
        let r = recovery(&api, &cid).await;
        super::sys::terminal(&r).then_some(r)
    })
    .await;
    assert_eq!(end["status"], "cancelled", "{end:#}");
    assert!(
        end["error_message"]
            .as_str()
            .unwrap_or_default()
            .contains("lost"),
        "says the guest's writes are lost: {end:#}"
    );
    let pid = running["qemu_pid"].as_u64().unwrap() as u32;
    let t = Instant::now();
    while sendense_tests::pid_alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "QEMU {pid} outlived the cancel"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for d in running["disks"].as_array().unwrap() {
        let o = Path::new(d["overlay"].as_str().unwrap());
        assert!(!o.exists(), "{} left behind", o.display());
    }
    assert_hub_holds_nothing(&api, &end).await;
    drop(node);
    drop(hub);
}
