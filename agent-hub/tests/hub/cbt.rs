//! Changed-block tracking through the hub, with a stand-in for a vSphere node: inventory facts
//! stored and served, change ids kept per disk and handed to the next incremental, written
//! bytes shown instead of disk sizes, and the fallback to full when the previous backup has no
//! change ids.
//!
//! The stand-in answers the node API the way a vSphere node does (an incremental needs a
//! change id for every disk, else `409 bitmap missing`) and records every start it gets; the
//! test itself plays the node's copy engine: it writes into the hub's exports with nbdcopy and
//! qemu-io and posts progress and completion.
//!
//! Why a stand-in and not the real node on the simulator: the case this file is for, a full
//! backup of a vSphere disk that came back without a change id next to one that has one, cannot
//! be made with the real node, since the simulator gives every disk of a CBT-enabled VM a change
//! id, and its CBT reset renews them on every disk at once (that fallback, on a change id that
//! no longer works, runs with the real node in the e2e test
//! `vsphere_cbt_reset_falls_back_to_full`). Only a stand-in also sees what the hub sent the node
//! (`previous_change_ids` per disk), which is what the hub owes it.

use super::env::{
    DISK_SIZE, Env, JOB_LIMIT, MIB, assert_refused_naming, checksums_of, disk, targets,
};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use sendense_shared::api::{NodeBackupStart, NodeBackupState};
use sendense_tests::disks;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Starts = Arc<Mutex<Vec<NodeBackupStart>>>;

/// A node API on 127.0.0.1 (kernel-chosen port) that records starts; stopped on drop.
struct FakeNode {
    url: String,
    starts: Starts,
    /// The `POST /api/v1/backup/check` requests it got.
    checks: Starts,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The node's refusal of an incremental whose disks (`keys`) lack a change id, as a vSphere node
/// answers it: `409 bitmap_missing`.
fn refuse_without_change_ids(
    req: &NodeBackupStart,
    keys: &[sendense_shared::ids::DiskKey],
) -> Option<(StatusCode, Json<Value>)> {
    if req.backup_type != sendense_shared::api::BackupType::Incremental {
        return None;
    }
    let k = keys
        .iter()
        .find(|k| !req.previous_change_ids.iter().any(|c| c.disk_key == **k))?;
    Some((
        StatusCode::CONFLICT,
        Json(json!({"error": "bitmap_missing", "detail": format!(
            "bitmap missing: disk {k} has no change id in backup {:?}: CBT cannot say what changed",
            req.previous_backup_id)})),
    ))
}

async fn start(
    State(starts): State<Starts>,
    Json(req): Json<NodeBackupStart>,
) -> (StatusCode, Json<Value>) {
    starts.lock().unwrap().push(req.clone());
    let keys: Vec<_> = sendense_shared::targets::parse_targets(&req.nbd_targets)
        .unwrap()
        .iter()
        .map(|t| t.disk_key)
        .collect();
    if let Some(refusal) = refuse_without_change_ids(&req, &keys) {
        return refusal;
    }
    (
        StatusCode::ACCEPTED,
        Json(json!({"backup_id": req.backup_id})),
    )
}

/// `POST /api/v1/backup/check`: the same rule as a start, before the hub prepared anything (the
/// request carries no targets; the VM's disks are those of [`inventory`]).
async fn check(
    State(checks): State<Starts>,
    Json(req): Json<NodeBackupStart>,
) -> (StatusCode, Json<Value>) {
    checks.lock().unwrap().push(req.clone());
    let keys = [
        sendense_shared::ids::DiskKey(2000),
        sendense_shared::ids::DiskKey(2001),
    ];
    refuse_without_change_ids(&req, &keys).unwrap_or((StatusCode::OK, Json(json!({}))))
}

async fn state(
    State(starts): State<Starts>,
    UrlPath(id): UrlPath<String>,
) -> (StatusCode, Json<Value>) {
    let last = starts
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|s| s.backup_id.0 == id)
        .cloned();
    match last {
        Some(s) => (
            StatusCode::OK,
            Json(
                serde_json::to_value(NodeBackupState {
                    backup_id: s.backup_id,
                    vm_name: s.vm_name,
                    backup_type: s.backup_type,
                    status: sendense_shared::api::JobStatus::Running,
                    disks: Vec::new(),
                    error_message: None,
                })
                .unwrap(),
            ),
        ),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "not_found", "detail": id})),
        ),
    }
}

fn inventory() -> Value {
    let disk = |key: i64, unit: i64, file: &str, thin: bool| {
        json!({"disk_key": key, "unit_number": unit, "size_bytes": DISK_SIZE,
               "label": format!("Hard disk {}", unit + 1), "controller": "SCSI controller 0",
               "backing_file": format!("[datastore1] vc1/{file}"), "thin_provisioned": thin})
    };
    json!({"vms": [{"vm_name": "vc1", "vm_id": "vm-42", "driver": "vsphere",
                    "change_tracking": true,
                    "disks": [disk(2000, 0, "vc1.vmdk", true), disk(2001, 1, "vc1_1.vmdk", false)]}]})
}

impl FakeNode {
    async fn start() -> FakeNode {
        Self::start_with(true).await
    }

    /// `with_check`: whether it serves `POST /api/v1/backup/check` (a node older than the check
    /// answers it 404, and refuses only at start).
    async fn start_with(with_check: bool) -> FakeNode {
        let starts: Starts = Arc::default();
        let checks: Starts = Arc::default();
        let mut app = Router::new();
        if with_check {
            app = app.route(
                "/api/v1/backup/check",
                post(check).with_state(checks.clone()),
            );
        }
        let app = app
            .route("/api/v1/backup/start", post(start))
            .route("/api/v1/backup/{id}", get(state))
            .route(
                "/api/v1/backup/{id}/cancel",
                post(|| async { StatusCode::OK }),
            )
            .route("/api/v1/inventory", get(|| async { Json(inventory()) }))
            .with_state(starts.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeNode {
            url,
            starts,
            checks,
            task,
        }
    }

    /// The starts the hub sent for backup `id`, once there are `n`.
    async fn starts_of(&self, id: &str, n: usize) -> Vec<NodeBackupStart> {
        let t = Instant::now();
        loop {
            let got: Vec<NodeBackupStart> = self
                .starts
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.backup_id.0 == id)
                .cloned()
                .collect();
            if got.len() >= n {
                return got;
            }
            assert!(
                t.elapsed() < JOB_LIMIT,
                "the hub sent {got:?} for {id}, not {n} start(s)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Completes job `id` with per-disk reports (`None` change id: the disk has none).
async fn complete(
    env: &Env,
    id: &str,
    disks: &[(i64, Option<&str>, u64, Option<&PathBuf>)],
) -> Value {
    let disks: Vec<Value> = disks
        .iter()
        .map(|(k, c, written, src)| {
            let mut d = json!({"disk_key": k, "status": "completed", "bytes_transferred": written});
            if let Some(c) = c {
                d["change_id"] = json!(c);
            }
            if let Some(src) = src {
                d["checksums"] = checksums_of(src);
            }
            d
        })
        .collect();
    env.complete_ok(id, &json!({"status": "completed", "disks": disks}))
        .await
}

/// Asserts that the hub asked the node for an incremental on top of backup `previous`.
fn assert_incremental_on(start: &NodeBackupStart, previous: &str) {
    assert_eq!(
        start.backup_type,
        sendense_shared::api::BackupType::Incremental,
        "{start:?}"
    );
    assert_eq!(
        start.previous_backup_id.as_ref().map(|p| p.0.as_str()),
        Some(previous),
        "{start:?}"
    );
}

/// A full backup of vc1 whose disks report the given change ids; answers the completed job.
async fn full(env: &Env, node: &FakeNode, srcs: &[PathBuf], ids: [Option<&str>; 2]) -> Value {
    let (id, b) = env.backup("vc1", "full").await;
    let sent = node.starts_of(&id, 1).await;
    assert_eq!(sent[0].backup_type, sendense_shared::api::BackupType::Full);
    assert!(sent[0].previous_change_ids.is_empty(), "{sent:?}");
    for (i, (_, uri)) in targets(&b).iter().enumerate() {
        disks::nbdcopy_into(&srcs[i], uri);
    }
    complete(
        env,
        &id,
        &[
            (2000, ids[0], 4 * MIB, Some(&srcs[0])),
            (2001, ids[1], 3 * MIB, Some(&srcs[1])),
        ],
    )
    .await
}

/// The stand-in node registers as `vcnode` and pushes its inventory (the VM `vc1`).
async fn register(env: &Env, node: &FakeNode) {
    let (s, n) = env
        .api
        .post(
            "/api/v1/nodes",
            &json!({"name": "vcnode", "api_url": node.url, "version": "test"}),
        )
        .await;
    assert_eq!(s, 201, "{n}");
    let pushed = reqwest::Client::new()
        .put(format!("{}/api/v1/nodes/vcnode/inventory", env.hub.url))
        .bearer_auth(&env.hub.token)
        .json(&inventory())
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status(), 200, "{}", pushed.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn change_ids_flow_into_the_next_incremental_and_their_absence_falls_back_to_full() {
    let env = Env::start();
    change_ids_then_fallback(&env).await;
}

/// A node that cannot say beforehand (no `/backup/check`: an older node) refuses the
/// incremental at start; the same job then becomes a full one in place: its incremental images
/// are replaced by full ones on the same ports, the node is asked again for a full copy, and the
/// result is a verified full backup.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_without_the_check_refusing_at_start_falls_back_in_place() {
    let env = Env::start();
    let node = FakeNode::start_with(false).await;
    let api = &env.api;
    register(&env, &node).await;
    let srcs: Vec<PathBuf> = [0x51u8, 0x52]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let path = env.path(&format!("old-src-{i}.qcow2"));
            disks::create_qcow2(&path, DISK_SIZE);
            disks::write_pattern(&path, 0, 4 * MIB, *p);
            path
        })
        .collect();
    let done = full(&env, &node, &srcs, [Some("52 50/1"), None]).await;
    let id1 = done["backup_id"].as_str().unwrap().to_string();
    let (id2, b) = env.backup("vc1", "incremental").await;
    assert_eq!(b["backup_type"], "incremental", "nothing said no yet: {b}");
    let sent = node.starts_of(&id2, 2).await;
    assert_incremental_on(&sent[0], &id1);
    assert_eq!(
        sent[1].backup_type,
        sendense_shared::api::BackupType::Full,
        "{sent:?}"
    );
    assert_eq!(sent[1].previous_backup_id, None);
    let running = api.get_ok(&format!("/api/v1/backups/{id2}")).await;
    assert_eq!(running["backup_type"], "full", "{running}");
    let events = api.event_lines(&id2).await;
    let fallback = events
        .iter()
        .find(|e| e.starts_with("incremental_fallback:"))
        .unwrap_or_else(|| panic!("no fallback event: {events:#?}"));
    assert!(
        fallback.contains("bitmap_missing") && fallback.contains("replaced by full ones"),
        "{fallback}"
    );
    for (i, (_, uri)) in targets(&running).iter().enumerate() {
        disks::nbdcopy_into(&srcs[i], uri);
    }
    let end = complete(
        &env,
        &id2,
        &[
            (2000, Some("52 51/1"), 4 * MIB, Some(&srcs[0])),
            (2001, Some("52 51/2"), 4 * MIB, Some(&srcs[1])),
        ],
    )
    .await;
    assert_eq!(end["backup_type"], "full", "{end}");
    for (i, k) in [2000, 2001].iter().enumerate() {
        let img = PathBuf::from(disk(&end, *k)["qcow2_path"].as_str().unwrap());
        assert_eq!(disks::info(&img)["backing-filename"], Value::Null, "{k}");
        assert!(disks::images_equal(&img, &srcs[i]), "disk {k} differs");
    }
}

/// The whole scenario, also run on MariaDB.
pub async fn change_ids_then_fallback(env: &Env) {
    let node = FakeNode::start().await;
    let api = &env.api;
    // The node pushes its inventory: the hub keeps and serves the hypervisor's facts.
    register(env, &node).await;
    let vm = api.get_ok("/api/v1/vms/vc1").await;
    assert_eq!(vm["node"], "vcnode", "{vm}");
    assert_eq!(vm["driver"], "vsphere", "{vm}");
    assert_eq!(vm["change_tracking"], true, "{vm}");
    assert_eq!(vm["disks"][0]["controller"], "SCSI controller 0", "{vm}");
    assert_eq!(
        vm["disks"][1]["backing_file"], "[datastore1] vc1/vc1_1.vmdk",
        "{vm}"
    );
    assert_eq!(vm["disks"][0]["thin_provisioned"], true, "{vm}");
    assert_eq!(vm["disks"][1]["thin_provisioned"], false, "{vm}");

    let srcs: Vec<PathBuf> = [0x41u8, 0x42]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let path = env.path(&format!("vc1-src-{i}.qcow2"));
            disks::create_qcow2(&path, DISK_SIZE);
            disks::write_pattern(&path, 0, 4 * MIB, *p);
            path
        })
        .collect();

    // Full: the running figure is what the node wrote, not how far it got through the disks.
    let (id1, b) = env.backup("vc1", "full").await;
    node.starts_of(&id1, 1).await;
    for (i, (_, uri)) in targets(&b).iter().enumerate() {
        disks::nbdcopy_into(&srcs[i], uri);
    }
    let (s, v) = api
        .post(
            &format!("/api/v1/backups/{id1}/progress"),
            &json!({"disks": [
                {"disk_key": 2000, "bytes_done": DISK_SIZE, "bytes_total": DISK_SIZE, "status": "running", "bytes_transferred": 4 * MIB},
                {"disk_key": 2001, "bytes_done": DISK_SIZE / 2, "bytes_total": DISK_SIZE, "status": "running", "bytes_transferred": 2 * MIB}]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["bytes_transferred"], json!(6 * MIB), "{v}");
    let (s, v) = api
        .post(
            &format!("/api/v1/backups/{id1}/progress"),
            &json!({"disks": [{"disk_key": 2000, "bytes_done": 1, "bytes_total": DISK_SIZE, "status": "running", "bytes_transferred": DISK_SIZE + 1}]}),
        )
        .await;
    assert_refused_naming(s, &v, "disks[0].bytes_transferred");
    let (s, v) = api
        .post(
            &format!("/api/v1/backups/{id1}/complete"),
            &json!({"status": "completed", "disks": [
                {"disk_key": 2000, "status": "completed", "change_id": "x".repeat(256)},
                {"disk_key": 2001, "status": "completed"}]}),
        )
        .await;
    assert_refused_naming(s, &v, "disks[0].change_id");
    let cid = [
        "52 3f 9a 11 00 7e 4c 02-a1 9b 2c 77 0e 5d 6f 10/4",
        "52 3f 9a 11 00 7e 4c 02-a1 9b 2c 77 0e 5d 6f 11/4",
    ];
    let done1 = complete(
        env,
        &id1,
        &[
            (2000, Some(cid[0]), 4 * MIB, Some(&srcs[0])),
            (2001, Some(cid[1]), 4 * MIB, Some(&srcs[1])),
        ],
    )
    .await;
    assert_eq!(disk(&done1, 2000)["change_id"], cid[0], "{done1}");
    assert_eq!(disk(&done1, 2001)["change_id"], cid[1], "{done1}");
    assert_eq!(done1["bytes_transferred"], json!(8 * MIB), "{done1}");
    assert_eq!(done1["total_bytes"], json!(2 * DISK_SIZE), "{done1}");

    // Incremental: the hub hands the node the change id of each disk of the chain's top.
    let (id2, b2) = env.backup("vc1", "incremental").await;
    assert_eq!(b2["backup_type"], "incremental", "{b2}");
    let sent = node.starts_of(&id2, 1).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_incremental_on(&sent[0], &id1);
    let mut got: Vec<(i64, String)> = sent[0]
        .previous_change_ids
        .iter()
        .map(|c| (c.disk_key.0, c.change_id.clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [(2000, cid[0].to_string()), (2001, cid[1].to_string())]
    );
    let t2 = targets(&b2);
    let cmd = format!("write -P 0x5a {} {}", 8 * MIB, 4 * MIB);
    sendense_tests::run(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &cmd])
            .arg(&srcs[0]),
    );
    sendense_tests::run(Command::new("qemu-io").args(["-f", "raw", "-c", &cmd, &t2[0].1]));
    let done2 = complete(
        env,
        &id2,
        &[
            (2000, Some("52 3f/5"), 4 * MIB, None),
            (2001, Some("52 3f/6"), 0, None),
        ],
    )
    .await;
    assert_eq!(done2["backup_type"], "incremental", "{done2}");
    // 4 MiB changed of 128 MiB: that is what the job shows.
    assert_eq!(done2["bytes_transferred"], json!(4 * MIB), "{done2}");
    let top = PathBuf::from(disk(&done2, 2000)["qcow2_path"].as_str().unwrap());
    assert!(
        disks::images_equal(&top, &srcs[0]),
        "chain top differs from the changed source"
    );
    let ver = api
        .get_ok(&format!("/api/v1/backups/{id2}/verification"))
        .await;
    let written: Vec<(u64, u64, &str)> = ver
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["disk_key"].as_u64().unwrap(),
                v["bytes_transferred"].as_u64().unwrap(),
                v["change_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        written,
        [(2000, 4 * MIB, "52 3f/5"), (2001, 0, "52 3f/6")],
        "{ver}"
    );
    let events = api.event_lines(&id2).await;
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("node_start:") && e.contains("change ids for 2 of 2 disk(s)")),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("change_id:") && e.contains("52 3f/5")),
        "{events:#?}"
    );

    // A full whose disk 2001 came back without a change id (e.g. CBT was reset): the next
    // incremental is refused by the node and the same job runs as a full one, saying why.
    let done3 = full(env, &node, &srcs, [Some("52 40/1"), None]).await;
    assert_eq!(disk(&done3, 2001)["change_id"], Value::Null, "{done3}");
    let id3 = done3["backup_id"].as_str().unwrap().to_string();
    let (id4, _) = env.backup("vc1", "incremental").await;
    // The hub asked before it prepared anything, and the node said no.
    let checked: Vec<NodeBackupStart> = node
        .checks
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.backup_id.0 == id4)
        .cloned()
        .collect();
    assert_eq!(checked.len(), 1, "{checked:?}");
    assert_incremental_on(&checked[0], &id3);
    assert_eq!(
        checked[0].previous_change_ids.len(),
        1,
        "only disk 2000 had one: {checked:?}"
    );
    let sent = node.starts_of(&id4, 1).await;
    assert_eq!(sent.len(), 1, "one start, a full one: {sent:?}");
    assert_eq!(
        sent[0].backup_type,
        sendense_shared::api::BackupType::Full,
        "{sent:?}"
    );
    assert_eq!(sent[0].previous_backup_id, None);
    assert!(sent[0].previous_change_ids.is_empty());
    let running = api.get_ok(&format!("/api/v1/backups/{id4}")).await;
    assert_eq!(
        running["backup_type"], "full",
        "the record says full: {running}"
    );
    let events = api.event_lines(&id4).await;
    let fallback = events
        .iter()
        .find(|e| e.starts_with("incremental_fallback:"))
        .unwrap_or_else(|| panic!("no fallback event: {events:#?}"));
    assert!(fallback.contains("FULL"), "{fallback}");
    assert!(
        fallback.contains("bitmap_missing") && fallback.contains("disk 2001 has no change id"),
        "{fallback}"
    );
    // No export was prepared twice: one port and one qemu-nbd per disk, and no rebuild.
    for step in ["port_allocated:", "qemu_nbd_started:"] {
        let n = events.iter().filter(|e| e.starts_with(step)).count();
        assert_eq!(n, 2, "{step} {n} times: {events:#?}");
    }
    assert!(
        !events.iter().any(|e| e.contains("replaced by full ones")),
        "{events:#?}"
    );
    let t4 = targets(&running);
    for (i, (_, uri)) in t4.iter().enumerate() {
        disks::nbdcopy_into(&srcs[i], uri);
    }
    let done4 = complete(
        env,
        &id4,
        &[
            (2000, Some("52 41/1"), 8 * MIB, Some(&srcs[0])),
            (2001, Some("52 41/2"), 4 * MIB, Some(&srcs[1])),
        ],
    )
    .await;
    assert_eq!(done4["backup_type"], "full", "{done4}");
    let ver = api
        .get_ok(&format!("/api/v1/backups/{id4}/verification"))
        .await;
    for v in ver.as_array().unwrap() {
        assert_eq!(
            v["parent_backup_id"],
            Value::Null,
            "a full has no parent: {ver}"
        );
        assert_eq!(v["checksum_status"], "passed", "{ver}");
    }
    for (i, k) in [2000, 2001].iter().enumerate() {
        let img = PathBuf::from(disk(&done4, *k)["qcow2_path"].as_str().unwrap());
        assert_eq!(
            disks::info(&img)["backing-filename"],
            Value::Null,
            "disk {k} is a full image"
        );
        assert!(
            disks::images_equal(&img, &srcs[i]),
            "disk {k} differs from its source"
        );
    }
}
