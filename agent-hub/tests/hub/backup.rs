//! The critical path: full then incremental backup of a 2-disk VM written by nbdcopy/qemu-io.

use super::env::{DISK_SIZE, Env, JOB_LIMIT, MIB, checksums_of, disk, targets};
use futures_util::StreamExt;
use sendense_tests::disks;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn full_then_incremental_of_a_two_disk_vm() {
    let env = Env::start();
    full_then_incremental(&env).await;
}

/// The whole scenario, also run on MariaDB.
pub async fn full_then_incremental(env: &Env) {
    let api = &env.api;
    let health = api.get_ok("/health").await;
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["pid"], env.hub.pid());

    let srcs = env.vm_with_sources("pgtest1", &[2000, 2001]).await;
    let vm = api.get_ok("/api/v1/vms/pgtest1").await;
    assert_eq!(vm["disks"][1]["unit_number"], 1, "{vm}");

    // Event stream, opened before the job so it sees all of it.
    let sse = reqwest::Client::new()
        .get(format!("{}/api/v1/events", env.hub.url))
        .bearer_auth(&env.hub.token)
        .send()
        .await
        .expect("SSE");
    assert_eq!(sse.status(), 200);
    let mut sse = sse.bytes_stream();

    // Full.
    let (s, b) = env.start_backup("pgtest1", "full").await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["status"], "running", "{b}");
    assert_eq!(b["backup_type"], "full");
    let id = b["backup_id"].as_str().unwrap().to_string();
    let t = targets(&b);
    assert_eq!(t.len(), 2, "{b}");
    for (k, uri) in &t {
        let d = disk(&b, *k);
        assert!(uri.contains(&format!("/pgtest1-disk-{k}")), "{uri}");
        assert!(
            uri.contains(&format!(":{}/", d["nbd_port"])),
            "{uri} vs {d}"
        );
        let pid = d["qemu_nbd_pid"].as_u64().unwrap() as u32;
        assert!(sendense_tests::pid_alive(pid), "qemu-nbd {pid} not running");
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(cmdline.contains("qemu-nbd"), "{cmdline}");
    }
    assert_eq!(
        disk(&b, 2000)["unit_number"].as_u64(),
        Some(0),
        "unit numbers per disk"
    );
    assert_eq!(disk(&b, 2001)["unit_number"].as_u64(), Some(1));
    let ports = api.get_ok("/api/v1/ports").await;
    assert_eq!(ports["allocations"].as_array().unwrap().len(), 2, "{ports}");
    let procs = api.get_ok("/api/v1/processes").await;
    assert_eq!(
        procs
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["alive"] == true)
            .count(),
        2,
        "{procs}"
    );

    for (i, (_, uri)) in t.iter().enumerate() {
        disks::nbdcopy_into(&srcs[i], uri);
    }
    let (s, v) = api
        .post(
            &format!("/api/v1/backups/{id}/progress"),
            &json!({"disks": [
                {"disk_key": 2000, "bytes_done": DISK_SIZE, "bytes_total": DISK_SIZE, "status": "running"},
                {"disk_key": 2001, "bytes_done": DISK_SIZE / 2, "bytes_total": DISK_SIZE, "status": "running"}]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["bytes_transferred"],
        json!(DISK_SIZE + DISK_SIZE / 2),
        "{v}"
    );
    let (s, v) = api
        .post(
            &format!("/api/v1/backups/{id}/complete"),
            &json!({"status": "completed", "disks": [
                {"disk_key": 2000, "status": "completed", "checksums": checksums_of(&srcs[0])},
                {"disk_key": 2001, "status": "completed", "checksums": checksums_of(&srcs[1])}]}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let done = api
        .wait_status(&id, &["completed", "failed"], JOB_LIMIT)
        .await;
    let events = api.event_lines(&id).await;
    assert_eq!(done["status"], "completed", "{done:#}\n{events:#?}");
    for (i, k) in [2000, 2001].iter().enumerate() {
        let img = PathBuf::from(disk(&done, *k)["qcow2_path"].as_str().unwrap());
        assert!(
            img.starts_with(
                env.hub
                    .opts
                    .data_dir
                    .join("repo/pgtest1")
                    .join(k.to_string())
            ),
            "{}",
            img.display()
        );
        assert!(
            disks::images_equal(&img, &srcs[i]),
            "disk {k} differs from its source"
        );
    }
    env.assert_nothing_held(&done).await;
    let ver = api
        .get_ok(&format!("/api/v1/backups/{id}/verification"))
        .await;
    for v in ver.as_array().unwrap() {
        assert_eq!(v["checksum_status"], "passed", "{ver}");
        assert_eq!(v["checksum_ranges"], (DISK_SIZE / (4 * MIB)), "{ver}");
        assert_eq!(v["checksum_mismatches"], 0, "{ver}");
        assert!(
            v["qemu_img_check"].as_str().unwrap().contains("clean"),
            "{ver}"
        );
    }
    for step in [
        "qemu_nbd_started",
        "checksums_verified",
        "image_checked",
        "ports_released",
        "completed",
    ] {
        assert!(
            events.iter().filter(|e| e.starts_with(step)).count() >= 1,
            "no {step} event: {events:#?}"
        );
    }

    // The event stream carried the job to completed.
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = String::new();
        while let Some(chunk) = sse.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk.expect("SSE chunk")));
            let done = buf.lines().any(|l| {
                l.strip_prefix("data:")
                    .and_then(|d| serde_json::from_str::<Value>(d.trim()).ok())
                    .is_some_and(|v| {
                        v["kind"] == "backup"
                            && v["backup"]["backup_id"] == id.as_str()
                            && v["backup"]["status"] == "completed"
                    })
            });
            if done {
                return buf;
            }
        }
        buf
    })
    .await
    .expect("SSE shows the job completed within 10 s");
    assert!(seen.contains("event: job_event"), "{seen}");
    drop(sse);

    // Incremental: change the sources, write only the changes into the exports.
    let (s, b2) = env.start_backup("pgtest1", "incremental").await;
    assert_eq!(s, 202, "{b2}");
    assert_eq!(b2["backup_type"], "incremental", "{b2}");
    let id2 = b2["backup_id"].as_str().unwrap().to_string();
    let changes: [(usize, &str); 2] = [
        (0, &format!("write -P 0x5a {} {}", 8 * MIB, MIB)),
        (1, &format!("write -z {} {}", 5 * MIB, MIB)),
    ];
    let t2 = targets(&b2);
    for (i, cmd) in changes {
        sendense_tests::run(
            Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", cmd])
                .arg(&srcs[i]),
        );
        sendense_tests::run(Command::new("qemu-io").args(["-f", "raw", "-c", cmd, &t2[i].1]));
    }
    let (s, v) = api
        .post(
            &format!("/api/v1/backups/{id2}/complete"),
            &json!({"status": "completed", "disks": [
                {"disk_key": 2000, "status": "completed"},
                {"disk_key": 2001, "status": "completed"}]}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let done2 = api
        .wait_status(&id2, &["completed", "failed"], JOB_LIMIT)
        .await;
    assert_eq!(
        done2["status"],
        "completed",
        "{done2:#}\n{:#?}",
        api.event_lines(&id2).await
    );
    for (i, k) in [2000, 2001].iter().enumerate() {
        let top = PathBuf::from(disk(&done2, *k)["qcow2_path"].as_str().unwrap());
        let base = PathBuf::from(disk(&done, *k)["qcow2_path"].as_str().unwrap());
        let info = disks::info(&top);
        let backing = info["backing-filename"].as_str().unwrap_or_default();
        assert!(
            !backing.starts_with('/'),
            "backing file must be relative: {backing}"
        );
        assert_eq!(
            top.parent().unwrap().join(backing).canonicalize().unwrap(),
            base.canonicalize().unwrap(),
            "disk {k}: backing file"
        );
        assert!(
            disks::images_equal(&top, &srcs[i]),
            "disk {k}: chain top differs from changed source"
        );
        assert!(
            !disks::images_equal(&base, &srcs[i]),
            "disk {k}: the change should not be in the base"
        );
    }
    env.assert_nothing_held(&done2).await;
    let ver = api
        .get_ok(&format!("/api/v1/backups/{id2}/verification"))
        .await;
    for v in ver.as_array().unwrap() {
        assert_eq!(v["checksum_status"], "skipped", "{ver}");
        assert_eq!(v["parent_backup_id"], id.as_str(), "{ver}");
    }
    let vm = api.get_ok("/api/v1/vms/pgtest1").await;
    assert_eq!(vm["last_backup_id"], id2.as_str(), "{vm}");
}
