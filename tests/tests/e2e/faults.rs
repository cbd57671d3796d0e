//! Faults mid-copy, each caused by PID (never by name): the node, the hub and one qemu-nbd
//! SIGKILLed; the repository filling up; a target block tampered with before verification.
//! Each must end in a clear terminal state within a bounded time, name the cause in the job's
//! events, leave nothing held, and the next backup of the VM must succeed.

use super::sys::{MIB, SLOW_BPS, Sys, SysOptions, disk, quick_node_watch};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

fn slow() -> SysOptions {
    SysOptions {
        throttle_bps: Some(SLOW_BPS),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_mid_copy() {
    let mut sys = Sys::start(
        "e2enodekill",
        SysOptions {
            throttle_bps: Some(SLOW_BPS),
            hub: Some(Box::new(quick_node_watch)),
            ..Default::default()
        },
    )
    .await;
    let (id, _) = sys.backup("full").await;
    sys.wait_node_copying(&id).await;
    sys.node.kill9();
    let t = Instant::now();
    let b = sys.wait_end(&id).await;
    assert_eq!(b["status"], "failed", "{b:#}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "the hub took {:?} to give up the node",
        t.elapsed()
    );
    assert!(
        b["error_message"]
            .as_str()
            .unwrap_or_default()
            .contains("node"),
        "{b:#}"
    );
    sys.assert_event(&id, "node_lost", &["node", sys.node.opts.name.as_str()])
        .await;
    // The dead node left its snapshot in QEMU; started again it releases it (journal).
    sys.restart_node().await;
    sys.assert_clean(&b).await;
    sys.backup_completes("full").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_killed_mid_copy_then_restarted() {
    // The hub must come back on the address the node knows.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut sys = Sys::start(
        "e2ehubkill",
        SysOptions {
            throttle_bps: Some(SLOW_BPS),
            hub: Some(Box::new(move |o, _| o.listen = format!("127.0.0.1:{port}"))),
            ..Default::default()
        },
    )
    .await;
    let (id, running) = sys.backup("full").await;
    sys.wait_node_copying(&id).await;
    sys.hub.kill9();
    let mut opts = sys.hub.opts.clone();
    opts.nbd_ports = Some(sys.hub.nbd_ports);
    let t = Instant::now();
    sys.hub = sendense_tests::hub::HubProcess::start(&super::sys::hub_bin(), opts)
        .expect("restart the hub");
    sys.api = sys.hub.api();
    let b = sys.wait_end(&id).await;
    assert_eq!(b["status"], "failed", "{b:#}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(
        b["error_message"]
            .as_str()
            .unwrap_or_default()
            .contains("hub restarted"),
        "{b:#}"
    );
    sys.assert_event(&id, "reconciler_process", &["qemu-nbd", "stopped"])
        .await;
    // The qemu-nbd processes of the killed hub are gone (the reconciler stopped them).
    for d in running["disk_results"].as_array().unwrap() {
        let pid = d["qemu_nbd_pid"].as_u64().unwrap() as u32;
        assert!(!sendense_tests::pid_alive(pid), "qemu-nbd {pid} survived");
    }
    // The node hears of it through its failing copy and releases the snapshot. Nobody cancels
    // the node's job (the restarted hub's reconciler only stops its own qemu-nbd), so its copy
    // fails: `failed`, never `cancelled`.
    let t = Instant::now();
    loop {
        let (_, v) = sys.node.get(&format!("/backup/{id}")).await;
        if super::sys::terminal(&v) {
            assert_eq!(v["status"], "failed", "node job: {v}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "node job: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sys.assert_clean(&running_with_status(&running, &b)).await;
    sys.backup_completes("full").await;
}

/// `running`'s disk results (PIDs, ports) with the terminal status of `end`.
fn running_with_status(running: &serde_json::Value, end: &serde_json::Value) -> serde_json::Value {
    let mut v = running.clone();
    v["status"] = end["status"].clone();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_qemu_nbd_killed_mid_copy() {
    let sys = Sys::start("e2enbdkill", slow()).await;
    let (id, b) = sys.backup("full").await;
    sys.wait_node_copying(&id).await;
    let pid = disk(&b, 2000)["qemu_nbd_pid"].as_u64().unwrap() as i32;
    eprintln!("+ kill -KILL {pid} (qemu-nbd of disk 2000)");
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let t = Instant::now();
    let end = sys.wait_end(&id).await;
    assert_eq!(end["status"], "failed", "{end:#}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // Whichever the hub hears first (its watcher of the process, or the node's failed write),
    // the job names disk 2000, and an event names the dead process (`qemu_nbd_died`, or the
    // unwinding's `qemu_nbd_stopped` "had already exited") within seconds.
    assert!(
        end["error_message"]
            .as_str()
            .unwrap_or_default()
            .contains("2000"),
        "{end:#}"
    );
    let pid_s = pid.to_string();
    let t = Instant::now();
    loop {
        let ev = sys.events(&id).await;
        if ev.iter().any(|e| {
            e.contains(&format!("pid {pid_s}"))
                && (e.starts_with("qemu_nbd_died:")
                    || (e.starts_with("qemu_nbd_stopped:") && e.contains("already exited")))
        }) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no event names the killed qemu-nbd {pid_s}: {ev:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sys.assert_clean(&end).await;
    sys.backup_completes("full").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_fills_up_mid_copy() {
    let Ok(fs) = sendense_tests::tmpfs::Tmpfs::mount("300m") else {
        panic!("mounting a tmpfs needs root");
    };
    // The volume is a repository root of the hub's: repositories live only under those.
    let root = fs.path().display().to_string();
    let mut sys = Sys::start(
        "e2efull",
        SysOptions {
            hub: Some(Box::new(move |o, _| {
                o.extra_args.extend(["--repository-root".into(), root])
            })),
            ..slow()
        },
    )
    .await;
    let (s, v) = sys
        .api
        .post(
            "/api/v1/repositories",
            &serde_json::json!({"id": "small", "path": fs.path().display().to_string()}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    sys.repository = "small".into();
    let (id, _) = sys.backup("full").await;
    sys.wait_node_copying(&id).await;
    // Another tenant of the volume fills it up (written until ENOSPC).
    let filler = fs.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0x5au8; MIB as usize];
        loop {
            match f.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", filler.display()),
            }
        }
        eprintln!(
            "filled the repository: {} bytes of filler",
            f.metadata().unwrap().len()
        );
    }
    let end = sys.wait_end(&id).await;
    assert_eq!(end["status"], "failed", "{end:#}");
    let events = sys.events(&id).await;
    assert!(
        events
            .iter()
            .any(|e| e.contains("ENOSPC") || e.to_lowercase().contains("no space")),
        "the cause (no space) is not in the events: {events:#?}"
    );
    sys.assert_clean(&end).await;
    std::fs::remove_file(&filler).unwrap();
    sys.backup_completes("full").await;
}

/// Tampering: while the node copies, a block it already wrote is overwritten through the hub's
/// own export (a second NBD client: qemu-nbd runs with `--shared`), as a fault in the write
/// path or storage would. The node's checksum of that range (from the snapshot) no longer
/// matches what the hub reads back, so verification fails the job and the image is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_target_block_fails_verification() {
    // Exports without TLS: the tampering stands for a fault below the authenticated data path.
    let sys = Sys::start(
        "e2etamper",
        SysOptions {
            hub: Some(Box::new(super::sys::plain_nbd)),
            ..slow()
        },
    )
    .await;
    let (id, b) = sys.backup("full").await;
    sys.wait_node_copying(&id).await;
    // Wait until the first data area of disk 2000 (0..16 MiB) is written and the copy is past it.
    let t = Instant::now();
    loop {
        let (_, v) = sys.node.get(&format!("/backup/{id}")).await;
        let d = v["disks"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["disk_key"] == 2000).cloned())
            .unwrap_or_default();
        if d["bytes_written"].as_u64().unwrap_or(0) >= 20 * MIB {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60) && v["status"] == "running",
            "copy did not get past 20 MiB while running: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = disk(&b, 2000);
    let uri = format!(
        "nbd://127.0.0.1:{}/{}",
        d["nbd_port"],
        d["nbd_export_name"].as_str().unwrap()
    );
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw", "-c", "write -P 0xee 1048576 65536"])
        .arg(&uri);
    sendense_tests::run(&mut cmd);
    let end = sys.wait_end(&id).await;
    assert_eq!(end["status"], "failed", "{end:#}");
    sys.assert_event(&id, "checksums_mismatch", &["2000", "mismatch"])
        .await;
    assert!(
        disk(&end, 2000)["error_message"]
            .as_str()
            .unwrap_or_default()
            .contains("verification failed"),
        "{end:#}"
    );
    sys.assert_clean(&end).await;
    // A failed backup is no base for an incremental: the next one is a full, and says why.
    let (id2, b2) = sys.backup("incremental").await;
    assert_eq!(b2["backup_type"], "full", "{b2}");
    let end2 = sys.wait_completed(&id2).await;
    sys.assert_event(&id2, "incremental_fallback", &["no completed backup"])
        .await;
    sys.assert_clean(&end2).await;
}
