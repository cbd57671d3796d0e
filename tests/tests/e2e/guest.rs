//! Guest-consistent snapshots of a real Linux guest ([`sendense_tests::guest`]) through the
//! real hub and node: while the guest's writer appends fsynced, checksummed records to its
//! ext4 data disk, backups freeze the guest's file systems through its agent for the one
//! snapshot transaction. The restored data disk passes `e2fsck -fn` and holds every record the
//! guest acknowledged before the freeze; with the agent stopped in the guest the same backup
//! completes crash-consistent and says why. One booted guest for the whole story (a boot takes
//! about 14 s under TCG).

use super::sys::{JOB_LIMIT, Jobs, hub_bin, node_bin, node_options, terminal};
use sendense_tests::guest::{RECORDS_PATH, acks_before_freeze, parse_records};
use sendense_tests::hub::{HubOptions, HubProcess};
use sendense_tests::node::NodeProcess;
use sendense_tests::qemu::{GuestOptions, TestVm, VmOptions};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Bound of a guest boot (about 14 s here) up to its writer's first records.
const BOOT_LIMIT: Duration = Duration::from_secs(120);
/// The node's bound of each guest agent command in this test (a stopped agent is found in 3 s).
const AGENT_TIMEOUT_SECS: u64 = 3;
/// Application-consistent backups taken (the freeze window is measured over them).
const FROZEN_BACKUPS: usize = 4;

/// The highest `ACK N` the guest printed so far.
fn last_ack(vm: &TestVm) -> u64 {
    vm.serial()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ACK ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Waits until the writer acknowledged record `n`.
async fn wait_ack(vm: &TestVm, n: u64) {
    vm.wait_serial(&format!("ACK {n}"), Duration::from_secs(60))
        .await
        .expect("guest writer goes on");
}

/// Restores disk `key` of backup `id` into `<dir>/<name>.qcow2` on the node (the hub's restore
/// API), then converts it to raw; answers the raw image.
async fn restore_raw(
    api: &sendense_tests::hub::Api,
    node: &NodeProcess,
    dir: &Path,
    id: &str,
    key: i64,
    name: &str,
) -> PathBuf {
    let qcow2 = dir.join(format!("{name}.qcow2"));
    let (s, r) = api
        .post(
            "/api/v1/restores",
            &json!({"backup_id": id, "disk_key": key,
                    "target": {"node": node.opts.name, "path": qcow2.display().to_string()}}),
        )
        .await;
    assert_eq!(s, 202, "POST /api/v1/restores: {r}");
    let rid = r["restore_id"].as_str().unwrap().to_string();
    let t = Instant::now();
    let r = loop {
        let r = api.get_ok(&format!("/api/v1/restores/{rid}")).await;
        if terminal(&r) {
            break r;
        }
        assert!(t.elapsed() < JOB_LIMIT, "restore {rid} did not end: {r:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r["status"], "completed", "restore {rid}: {r:#}");
    let raw = dir.join(format!("{name}.raw"));
    sendense_tests::run(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(&qcow2)
            .arg(&raw),
    );
    raw
}

/// What an operator checks on a restored data disk: `e2fsck -fn` finds nothing (not even a
/// journal to replay), and the
/// records file (read with `debugfs`, no mount) is records 1..=K, every checksum valid, with
/// every record the guest acknowledged before the freeze. Answers K.
fn check_restored_data(raw: &Path, acked: &[u64]) -> u64 {
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(raw)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck -fn {}: {}\n{}{}",
        raw.display(),
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    // A crash-consistent ext4 still needs its journal replayed: e2fsck -n skips that with a
    // warning and exits 0, and the last writes are only in the journal. A frozen one is clean.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    assert!(
        !said.contains("journal recovery"),
        "the restored file system needs journal recovery (not frozen?): {said}"
    );
    let text = sendense_tests::run_stdout(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat {RECORDS_PATH}"))
            .arg(raw),
    );
    let records = parse_records(&text);
    let mut numbers = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let r = r.as_ref().unwrap_or_else(|line| {
            panic!("line {} of the records is not a record: {line:?}", i + 1)
        });
        assert!(r.checksum_ok, "record {} has a bad checksum", r.number);
        numbers.push(r.number);
    }
    let k = numbers.len() as u64;
    assert_eq!(
        numbers,
        (1..=k).collect::<Vec<_>>(),
        "records are 1..=K in order"
    );
    let last_acked = acked.iter().copied().max().unwrap_or(0);
    assert!(
        last_acked > 0,
        "the guest acknowledged records before the freeze"
    );
    assert!(
        k >= last_acked,
        "record {last_acked} was acknowledged before the freeze but the backup holds only 1..={k}"
    );
    k
}

/// Stops the guest's agent from inside the guest: `guest-exec` of `kill` (the init wrote
/// qemu-ga's pid). The test speaks raw JSON lines: it must see the agent as it is.
async fn stop_agent(socket: &Path) {
    let s = tokio::net::UnixStream::connect(socket)
        .await
        .expect("qga socket");
    let (r, mut w) = s.into_split();
    let msg = json!({"execute": "guest-exec", "arguments": {
        "path": "/bin/sh", "arg": ["-c", "kill $(cat /run/qga/pid)"]}});
    let mut bytes = vec![0xFF];
    bytes.extend_from_slice(format!("{msg}\n").as_bytes());
    w.write_all(&bytes).await.unwrap();
    let mut r = BufReader::new(r);
    let t = Instant::now();
    loop {
        let mut line = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), r.read_until(b'\n', &mut line))
            .await
            .expect("guest-exec answered")
            .unwrap();
        assert!(n > 0, "qga channel closed");
        if String::from_utf8_lossy(&line).contains("\"pid\"") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writing_guest_is_frozen_for_its_snapshot_and_crash_consistent_without_its_agent() {
    let tmp = tempfile::Builder::new()
        .prefix("sdguest-")
        .tempdir()
        .unwrap();
    let hub = HubProcess::start(&hub_bin(), HubOptions::new(tmp.path().join("hub")))
        .expect("start sendense-hub");
    let api = hub.api();
    let vm_name = "gvm1";
    let booted = Instant::now();
    let vm = TestVm::start_opts(
        VmOptions {
            name: vm_name.into(),
            dir: Some(tmp.path().join("vm")),
            guest: Some(GuestOptions::default()),
            ..VmOptions::default()
        },
        |_| {},
    )
    .await
    .expect("start the guest");
    vm.wait_serial("DATA mounted", BOOT_LIMIT)
        .await
        .expect("guest boots");
    let to_init = booted.elapsed();
    wait_ack(&vm, 3).await;
    let to_ack = booted.elapsed();
    eprintln!(
        "MEASURE guest boot: init after {:.1} s, 3 records acknowledged after {:.1} s ({})",
        to_init.as_secs_f64(),
        to_ack.as_secs_f64(),
        vm.serial()
            .lines()
            .find(|l| l.starts_with("INIT"))
            .unwrap_or_default()
    );
    let qga = vm.qga_socket.clone().expect("qga socket");
    let mut nopts = node_options(
        &hub,
        tmp.path(),
        vm_name,
        vec![(vm_name.to_string(), vm.node_qmp.clone())],
        None,
    );
    nopts.args.extend([
        "--qga".into(),
        format!("{vm_name}={}", qga.display()),
        "--guest-agent-timeout".into(),
        AGENT_TIMEOUT_SECS.to_string(),
    ]);
    let node = NodeProcess::start(&node_bin(), nopts).expect("start sendense-node");
    let jobs = Jobs {
        api: &api,
        node: &node,
        vm: vm_name,
        repository: "default",
    };
    let v = jobs.wait_vm_imported(|d| d.len() == 2).await;
    let data_key = v["disks"][1]["disk_key"].as_i64().expect("data disk key");

    let mut windows = Vec::new();
    let mut first = None;
    for i in 1..=FROZEN_BACKUPS {
        let kind = if i == 1 { "full" } else { "incremental" };
        let before = last_ack(&vm);
        let (id, _) = jobs.backup(kind).await;
        let b = jobs.wait_completed(&id).await;
        jobs.assert_hub_released(&b).await;
        let c = &b["consistency"];
        assert_eq!(
            c["level"],
            "application",
            "backup {id}: {b:#}\nnode log:\n{}",
            node.stderr()
        );
        assert!(
            c["reason"].as_str().unwrap_or_default().contains("frozen"),
            "{c}"
        );
        let ms = c["freeze_ms"]
            .as_u64()
            .expect("freeze_ms of a frozen point");
        jobs.assert_event(
            &id,
            "consistency",
            &["application-consistent", &format!("frozen for {ms} ms")],
        )
        .await;
        windows.push(ms);
        // The guest saw exactly one freeze and one thaw per backup (its fsfreeze hook), and
        // its writer goes on after the thaw.
        let serial = vm.serial();
        let count = |w: &str| serial.lines().filter(|l| l.trim() == w).count();
        assert_eq!(
            (count("FREEZE"), count("THAW")),
            (i, i),
            "serial:\n{serial}"
        );
        wait_ack(&vm, last_ack(&vm).max(before) + 2).await;
        if i == 1 {
            first = Some(id);
        }
    }
    let first = first.unwrap();
    let acked = acks_before_freeze(&vm.serial(), 1).expect("a FREEZE line");
    let raw = restore_raw(&api, &node, tmp.path(), &first, data_key, "restored-data").await;
    let k = check_restored_data(&raw, &acked);
    eprintln!(
        "restored data disk of {first}: records 1..={k}, {} acknowledged before the freeze",
        acked.len()
    );
    let mut sorted = windows.clone();
    sorted.sort_unstable();
    eprintln!(
        "MEASURE freeze window over {} backups: median {} ms, range {}..{} ms (all: {windows:?})",
        sorted.len(),
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1]
    );

    // The agent stopped inside the guest: the same backup completes, crash-consistent, saying
    // that the agent did not answer; the guest was not frozen.
    stop_agent(&qga).await;
    let freezes = vm.serial().lines().filter(|l| l.trim() == "FREEZE").count();
    let (id, _) = jobs.backup("incremental").await;
    let b = jobs.wait_completed(&id).await;
    jobs.assert_hub_released(&b).await;
    let c = &b["consistency"];
    assert_eq!(c["level"], "crash", "backup {id}: {b:#}");
    let reason = c["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("guest agent did not answer")
            && reason.contains(&format!("{AGENT_TIMEOUT_SECS} s")),
        "{reason}"
    );
    assert_eq!(c["freeze_ms"], Value::Null, "{c}");
    jobs.assert_event(
        &id,
        "consistency",
        &["crash-consistent", "guest agent did not answer"],
    )
    .await;
    assert_eq!(
        vm.serial().lines().filter(|l| l.trim() == "FREEZE").count(),
        freezes,
        "no freeze without the agent"
    );
    // Nothing left frozen and no freeze journal in the node's run directory.
    let journal = node.run_dir.join(format!("frozen-{vm_name}.json"));
    assert!(!journal.exists(), "{} left", journal.display());
    wait_ack(&vm, last_ack(&vm) + 2).await;

    // A backup that requires application consistency fails instead, naming the cause, and
    // keeps no point.
    let (s, v) = api
        .post(
            "/api/v1/backups",
            &serde_json::json!({"vm_name": vm_name, "repository_id": "default",
                "backup_type": "incremental", "require_application_consistency": true}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let id = v["backup_id"].as_str().unwrap().to_string();
    let end = api
        .wait_status(
            &id,
            &["failed", "completed"],
            std::time::Duration::from_secs(120),
        )
        .await;
    assert_eq!(end["status"], "failed", "{end:#}");
    let msg = end["error_message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("consistency_required") && msg.contains("guest agent did not answer"),
        "{msg}"
    );
    jobs.assert_hub_released(&end).await;
    for p in sendense_tests::hub::image_paths(&end) {
        assert!(!p.exists(), "{} kept", p.display());
    }
    assert!(!journal.exists(), "{} left", journal.display());
}
