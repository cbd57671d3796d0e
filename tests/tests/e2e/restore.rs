//! Restores are jobs: through the real hub and node (real QEMU, qemu-nbd on both sides), a
//! restore in the middle of its copy is cancelled from the API, survives a hub SIGKILL and
//! restart as a terminal job with everything released, and ends cleanly on SIGTERM to the hub
//! or to the node. The copy is throttled so that "mid-copy" is a state the test waits for, not
//! a sleep.

use super::sys::{JOB_LIMIT, SLOW_BPS, Sys, SysOptions, quick_node_watch, terminal};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A throttled system whose hub listens on a fixed free port (so a restarted hub is found by
/// the node at the address it knows).
async fn slow_sys(vm: &str) -> Sys {
    let port = sendense_tests::net::free_port();
    Sys::start(
        vm,
        SysOptions {
            throttle_bps: Some(SLOW_BPS),
            hub: Some(Box::new(move |o, dir| {
                o.listen = format!("127.0.0.1:{port}");
                quick_node_watch(o, dir);
            })),
            ..Default::default()
        },
    )
    .await
}

/// Restore of disk 2000 of a fresh full backup, waited for until the node has pushed progress
/// (bytes copied, not all of them). Answers the restore and the node's target path.
async fn restore_mid_copy(sys: &Sys, name: &str) -> (Value, PathBuf) {
    let b = sys.backup_completes("full").await;
    let id = b["backup_id"].as_str().unwrap();
    let path = sys.path(name);
    let (s, r) = sys
        .api
        .post(
            "/api/v1/restores",
            &json!({"backup_id": id, "disk_key": 2000,
                    "target": {"node": sys.node.opts.name, "path": path.display().to_string()}}),
        )
        .await;
    assert_eq!(s, 202, "POST /api/v1/restores: {r}");
    let rid = r["restore_id"].as_str().unwrap().to_string();
    let t = Instant::now();
    loop {
        let r = sys.api.get_ok(&format!("/api/v1/restores/{rid}")).await;
        let done = r["bytes_done"].as_u64().unwrap_or(0);
        if r["status"] == "running" && done > 0 && done < r["bytes_total"].as_u64().unwrap() {
            assert!(path.exists(), "the node writes {}", path.display());
            return (r, path);
        }
        assert!(!terminal(&r), "restore ended before mid-copy: {r:#}");
        assert!(t.elapsed() < JOB_LIMIT, "restore {rid} never copied: {r:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_restore_end(sys: &Sys, rid: &str) -> Value {
    let t = Instant::now();
    loop {
        let r = sys.api.get_ok(&format!("/api/v1/restores/{rid}")).await;
        if terminal(&r) {
            return r;
        }
        assert!(t.elapsed() < JOB_LIMIT, "restore {rid} did not end: {r:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The PID of the hub's read-only qemu-nbd serving restore `r`.
async fn export_pid(sys: &Sys, r: &Value) -> u32 {
    let procs = sys.api.get_ok("/api/v1/processes").await;
    procs
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["export_name"] == r["nbd_export_name"])
        .unwrap_or_else(|| panic!("no qemu-nbd for {r}: {procs}"))["pid"]
        .as_u64()
        .unwrap() as u32
}

/// Nothing of the restore is held on the hub: no port, its qemu-nbd gone; and the node's
/// partial image is deleted (within a few seconds: the node hears of the end through its
/// failing reads or the cancel).
async fn assert_released(sys: &Sys, r: &Value, pid: u32, partial: &Path) {
    assert_eq!(r["nbd_port"], Value::Null, "{r}");
    assert!(
        !sendense_tests::pid_alive(pid),
        "qemu-nbd {pid} of the restore survived"
    );
    let ports = sys.api.get_ok("/api/v1/ports").await;
    assert_eq!(ports["allocations"], json!([]), "{ports}");
    let t = Instant::now();
    while partial.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the node left its partial image {}",
            partial.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn restore_events(sys: &Sys, rid: &str) -> Vec<String> {
    let ev = sys
        .api
        .get_ok(&format!("/api/v1/restores/{rid}/events"))
        .await;
    ev.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}: {}",
                e["step"].as_str().unwrap_or_default(),
                e["message"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_cancelled_mid_copy() {
    let sys = slow_sys("e2ercancel").await;
    let (r, partial) = restore_mid_copy(&sys, "cancelled.qcow2").await;
    let rid = r["restore_id"].as_str().unwrap();
    let pid = export_pid(&sys, &r).await;
    let (s, v) = sys
        .api
        .post(&format!("/api/v1/restores/{rid}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 202, "{v}");
    assert!(
        v["status"] == "cancelling" || v["status"] == "cancelled",
        "{v}"
    );
    let end = wait_restore_end(&sys, rid).await;
    assert_eq!(end["status"], "cancelled", "{end:#}");
    // Cancelled means the node's side is gone too: it reports the end after deleting.
    assert!(
        !partial.exists(),
        "restore {rid} is cancelled but the node still holds {}",
        partial.display()
    );
    assert_released(&sys, &end, pid, &partial).await;
    let ev = restore_events(&sys, rid).await;
    for step in ["restore_cancel_requested:", "restore_cancelled:"] {
        assert!(ev.iter().any(|e| e.starts_with(step)), "{step} {ev:#?}");
    }
    // A finished restore cannot be cancelled again: a 409 with the code.
    let (s, v) = sys
        .api
        .post(&format!("/api/v1/restores/{rid}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 409, "{v}");
    // The next restore of the same point runs to its end.
    let id = r["backup_id"].as_str().unwrap();
    let (again, path) = sys.restore(id, 2000, "after-cancel.qcow2").await;
    assert_eq!(again["status"], "completed", "{again:#}");
    assert!(path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_killed_mid_restore_then_restarted() {
    let mut sys = slow_sys("e2erhubkill").await;
    let (r, partial) = restore_mid_copy(&sys, "hubkill.qcow2").await;
    let rid = r["restore_id"].as_str().unwrap().to_string();
    let pid = export_pid(&sys, &r).await;
    sys.hub.kill9();
    let mut opts = sys.hub.opts.clone();
    opts.nbd_ports = Some(sys.hub.nbd_ports);
    sys.hub = sendense_tests::hub::HubProcess::start(&super::sys::hub_bin(), opts)
        .expect("restart the hub");
    sys.api = sys.hub.api();
    // The reconciler ended it before the API answered anything.
    let end = sys.api.get_ok(&format!("/api/v1/restores/{rid}")).await;
    assert_eq!(end["status"], "failed", "{end:#}");
    assert!(
        end["error_message"]
            .as_str()
            .unwrap_or_default()
            .contains("hub restarted during the restore"),
        "{end:#}"
    );
    assert_released(&sys, &end, pid, &partial).await;
    let ev = restore_events(&sys, &rid).await;
    assert!(
        ev.iter().any(|e| e.starts_with("reconciler_restore:")),
        "{ev:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_hub_mid_restore() {
    let mut sys = slow_sys("e2erhubterm").await;
    let (r, partial) = restore_mid_copy(&sys, "hubterm.qcow2").await;
    let rid = r["restore_id"].as_str().unwrap().to_string();
    let pid = export_pid(&sys, &r).await;
    let t = Instant::now();
    let status = sys.hub.stop();
    assert!(
        status.is_some_and(|s| s.success()) && t.elapsed() < Duration::from_secs(15),
        "the hub did not stop cleanly on SIGTERM: {status:?} after {:?}",
        t.elapsed()
    );
    assert!(!sendense_tests::pid_alive(pid), "qemu-nbd {pid} survived");
    let mut opts = sys.hub.opts.clone();
    opts.nbd_ports = Some(sys.hub.nbd_ports);
    sys.hub = sendense_tests::hub::HubProcess::start(&super::sys::hub_bin(), opts)
        .expect("restart the hub");
    sys.api = sys.hub.api();
    let end = sys.api.get_ok(&format!("/api/v1/restores/{rid}")).await;
    assert_eq!(end["status"], "failed", "{end:#}");
    assert!(
        end["error_message"]
            .as_str()
            .unwrap_or_default()
            .contains("hub stopped (SIGTERM) during the restore"),
        "the drain, not the reconciler, ended it: {end:#}"
    );
    assert_released(&sys, &end, pid, &partial).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_node_mid_restore() {
    let mut sys = slow_sys("e2ernodeterm").await;
    let (r, partial) = restore_mid_copy(&sys, "nodeterm.qcow2").await;
    let rid = r["restore_id"].as_str().unwrap().to_string();
    let pid = export_pid(&sys, &r).await;
    let t = Instant::now();
    let status = sys.node.terminate(Duration::from_secs(30)).await;
    assert!(
        status.is_some() && t.elapsed() < Duration::from_secs(15),
        "the node did not stop on SIGTERM: {status:?} after {:?}",
        t.elapsed()
    );
    // The node deleted its partial image before it exited.
    assert!(
        !partial.exists(),
        "the node left {} behind on SIGTERM",
        partial.display()
    );
    let end = wait_restore_end(&sys, &rid).await;
    assert_eq!(end["status"], "failed", "{end:#}");
    assert_released(&sys, &end, pid, &partial).await;
}

/// Starts a restore of disk 2000 of `id` into the VM's own disk (the image the point recorded)
/// and waits for its end.
async fn restore_into_vm(sys: &Sys, id: &str) -> Value {
    let (s, r) = sys
        .api
        .post(
            "/api/v1/restores",
            &json!({"backup_id": id, "disk_key": 2000,
                    "target": {"node": sys.node.opts.name, "vm": sys.vm_name}}),
        )
        .await;
    assert_eq!(s, 202, "POST /api/v1/restores into the VM: {r}");
    assert_eq!(r["target"]["vm"], json!(sys.vm_name), "{r}");
    wait_restore_end(sys, r["restore_id"].as_str().unwrap()).await
}

fn same_image(a: &Path, b: &Path) -> bool {
    std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-U"])
        .arg(a)
        .arg(b)
        .status()
        .expect("qemu-img compare")
        .success()
}

/// A restore into the VM's own disk: refused while the VM runs (the restore fails naming the
/// VM and why, the disk untouched), and once the VM is powered off it replaces the disk with
/// the point (byte-equal), keeping the disk's mode, with no partial image left beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_into_a_stopped_vms_disk_and_refused_while_it_runs() {
    use std::os::unix::fs::PermissionsExt;
    let sys = Sys::start("rinto", SysOptions::default()).await;
    let b = sys.backup_completes("full").await;
    let id = b["backup_id"].as_str().unwrap();
    let point = PathBuf::from(
        b["disk_results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["disk_key"] == 2000)
            .unwrap()["qcow2_path"]
            .as_str()
            .unwrap(),
    );
    let disk = sys.vm.images[0].clone();
    // The guest changes the disk after the point: the restore must undo it.
    sys.vm.guest_write(0, 0x5a, 0, 4 << 20).await;
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o660)).unwrap();
    let before = sys.path("before.raw");
    sys.vm.copy_disk_now(0, &before).await;

    let r = restore_into_vm(&sys, id).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    let err = r["error_message"].as_str().unwrap_or_default();
    assert!(
        err.contains("VM rinto is running") && err.contains("power it off"),
        "the refusal names the VM and the fix: {err}"
    );
    assert!(
        same_image(&before, &disk),
        "a refused restore changed the disk"
    );

    // Powered off: QEMU quits, its QMP socket stops answering.
    let pid = sys.vm.pid();
    let _ = sys.vm.qmp().execute("quit", json!({})).await;
    let t = Instant::now();
    while sendense_tests::pid_alive(pid) {
        assert!(t.elapsed() < Duration::from_secs(20), "QEMU did not quit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = restore_into_vm(&sys, id).await;
    assert_eq!(r["status"], "completed", "{r:#}");
    assert_eq!(
        r["target"]["path"],
        json!(disk.display().to_string()),
        "{r}"
    );
    assert!(
        same_image(&point, &disk),
        "the VM's disk differs from the point"
    );
    assert!(
        !same_image(&before, &disk),
        "the guest's later write survived"
    );
    let mode = std::fs::metadata(&disk).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "the disk keeps its mode");
    let leftovers: Vec<String> = std::fs::read_dir(disk.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".restore-"))
        .collect();
    assert!(leftovers.is_empty(), "partial images left: {leftovers:?}");
    let ports = sys.api.get_ok("/api/v1/ports").await;
    assert_eq!(ports["allocations"], json!([]), "{ports}");
}
