//! Instant recoveries, the hub's side: the real hub binary and real qemu-nbd serving every
//! chosen disk of a point read-only, with TLS client certificates, on unix sockets and on TCP.
//!
//! The node is a stand-in: an axum server on 127.0.0.1 that records the hub's start request
//! and cancels and answers the node's recovery API, while the test posts the node's progress
//! and completion itself and reads the exports with the TLS material of the start request, as
//! the node's QEMU would. Why a stand-in: the real node (QEMU on overlays, `block-stream`,
//! reconnects) is tested end to end in the workspace's e2e suite and in the node's own tests;
//! here the test must control exactly what the node reports (a stall, a disk not home, a
//! completion racing a cancel) and when, and read what the hub serves byte for byte.
//!
//! Every test ends asserting what an operator would check: no port held, no qemu-nbd of the
//! recovery alive (PIDs gone from `/proc`), no process recorded alive.

mod ends;
mod exports;
mod refusals;

use super::env::*;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use sendense_shared::api::{
    JobStatus, NbdExport, NodeRecoveryStart, NodeRecoveryState, RecoveryDiskProgress,
};
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient};
use sendense_tests::{disks, pid_alive};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NODE: &str = "rnode";

/// What the stand-in node saw, and the state it answers `GET /api/v1/recovery/{id}` with
/// (the last one the test reported).
#[derive(Default)]
struct Seen {
    starts: Vec<NodeRecoveryStart>,
    cancels: Vec<String>,
    states: HashMap<String, NodeRecoveryState>,
}

type Shared = Arc<Mutex<Seen>>;

/// The node's recovery API on 127.0.0.1, registered as node `rnode`; stopped on drop.
struct FakeNode {
    seen: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn first_state(req: &NodeRecoveryStart) -> NodeRecoveryState {
    NodeRecoveryState {
        recovery_id: req.recovery_id.clone(),
        vm_name: req.vm_name.clone(),
        status: JobStatus::Running,
        vm_state: Some("prelaunch".into()),
        qemu_pid: None,
        qmp_socket: None,
        serial_log: None,
        disks: Vec::new(),
        stalled: None,
        error_message: None,
    }
}

/// `202` with the first state; a VM named `taken-*` is refused as one the node runs already.
async fn start(
    State(seen): State<Shared>,
    Json(req): Json<NodeRecoveryStart>,
) -> (StatusCode, Json<Value>) {
    if req.vm_name.starts_with("taken-") {
        let detail = format!("a VM named {} runs on this node already", req.vm_name);
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": "already_exists", "detail": detail})),
        );
    }
    let st = first_state(&req);
    let mut s = seen.lock().unwrap();
    s.states.insert(req.recovery_id.clone(), st.clone());
    s.starts.push(req);
    (
        StatusCode::ACCEPTED,
        Json(serde_json::to_value(st).unwrap()),
    )
}

async fn state(
    State(seen): State<Shared>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<NodeRecoveryState>, StatusCode> {
    let s = seen.lock().unwrap();
    s.states
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or(StatusCode::NOT_FOUND)
}

async fn cancel(State(seen): State<Shared>, UrlPath(id): UrlPath<String>) -> Json<Value> {
    seen.lock().unwrap().cancels.push(id.clone());
    Json(json!({"recovery_id": id, "status": "cancelling"}))
}

impl FakeNode {
    async fn start(env: &Env) -> FakeNode {
        let seen: Shared = Arc::default();
        let app = Router::new()
            .route("/api/v1/recovery/start", post(start))
            .route("/api/v1/recovery/{id}", get(state))
            .route("/api/v1/recovery/{id}/cancel", post(cancel))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let (s, n) = env
            .api
            .post(
                "/api/v1/nodes",
                &json!({"name": NODE, "api_url": url, "version": "test"}),
            )
            .await;
        assert_eq!(s, 201, "{n}");
        FakeNode { seen, task }
    }

    fn start_of(&self, id: &str) -> NodeRecoveryStart {
        let s = self.seen.lock().unwrap();
        let found = s.starts.iter().find(|s| s.recovery_id == id).cloned();
        found.unwrap_or_else(|| panic!("no start request for {id}"))
    }

    async fn wait_cancel(&self, id: &str) {
        let t = Instant::now();
        while !self.seen.lock().unwrap().cancels.iter().any(|c| c == id) {
            assert!(
                t.elapsed() < JOB_LIMIT,
                "the node was never told to cancel {id}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The hub again in its production data path: TLS with client certificates, exports on
/// `listen` (`unix`, the default, or `tcp`). The points are written first by a hub-alone
/// writer (nbdcopy, no certificate), which only the test mode allows.
fn production(env: &mut Env, listen: &str) {
    env.hub.stop();
    let args = &mut env.hub.opts.extra_args;
    for (flag, value) in [("--nbd-tls", "true"), ("--nbd-listen", listen)] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value.to_string();
    }
    env.start_again();
}

/// A verified full backup of a 2-disk VM: its id and the point's images, in disk-key order.
async fn two_disk_point(env: &Env, vm: &str) -> (String, Vec<PathBuf>) {
    let srcs = env.vm_with_sources(vm, &[2000, 2001]).await;
    let (id, b) = env.backup(vm, "full").await;
    let mut done = Vec::new();
    for ((key, uri), src) in targets(&b).iter().zip(&srcs) {
        disks::nbdcopy_into(src, uri);
        done.push(json!({"disk_key": key, "status": "completed", "grid": grid_of(src, 4 * MIB)}));
    }
    let b = env
        .complete_ok(&id, &json!({"status": "completed", "disks": done}))
        .await;
    assert_eq!(b["integrity"], "verified", "{b:#}");
    (id, image_paths(&b))
}

async fn request(env: &Env, body: Value) -> (u16, Value) {
    env.api.post("/api/v1/recoveries", &body).await
}

/// Starts a recovery that must be accepted: its record (`running`) and the node's start.
async fn recover(env: &Env, node: &FakeNode, body: Value) -> (Value, NodeRecoveryStart) {
    let (s, r) = request(env, body).await;
    assert_eq!(s, 202, "{r:#}");
    assert_eq!(r["status"], "running", "{r:#}");
    let id = r["recovery_id"].as_str().unwrap();
    (r.clone(), node.start_of(id))
}

fn addr(e: &NbdExport) -> NbdAddr {
    match &e.socket {
        Some(s) => NbdAddr::Unix {
            path: s.into(),
            export: e.export.clone(),
        },
        None => NbdAddr::Tcp {
            host: e.host.clone(),
            port: e.port,
            export: e.export.clone(),
        },
    }
}

/// The whole export, read as the node's QEMU does: with the start request's certificate.
async fn read_export(e: &NbdExport) -> Vec<u8> {
    let opts = ConnectOptions {
        tls: e.tls.clone(),
        ..ConnectOptions::default()
    };
    let c = NbdClient::connect(&addr(e), &opts)
        .await
        .unwrap_or_else(|err| panic!("connecting to {e}: {err}"));
    assert!(c.read_only(), "{e} must be read-only");
    let size = c.size();
    let mut out = Vec::with_capacity(size as usize);
    while (out.len() as u64) < size {
        let n = (size - out.len() as u64).min(4 * MIB) as u32;
        out.extend_from_slice(&c.read(out.len() as u64, n).await.unwrap());
    }
    c.disconnect().await.unwrap();
    out
}

/// The node's state with each disk of `st`'s start at `done` bytes in `stream`.
fn node_state(
    st: &NodeRecoveryStart,
    done: u64,
    stream: &str,
    qemu_pid: Option<u32>,
    stalled: Option<&str>,
) -> NodeRecoveryState {
    NodeRecoveryState {
        recovery_id: st.recovery_id.clone(),
        vm_name: st.vm_name.clone(),
        status: JobStatus::Running,
        vm_state: Some(
            if stalled.is_some() {
                "paused"
            } else {
                "running"
            }
            .into(),
        ),
        qemu_pid,
        qmp_socket: qemu_pid.map(|_| format!("/run/sendense-node/{}/qmp.sock", st.vm_name)),
        serial_log: qemu_pid.map(|_| format!("/var/log/sendense-node/{}.log", st.vm_name)),
        disks: st
            .disks
            .iter()
            .map(|d| RecoveryDiskProgress {
                disk_key: d.disk_key,
                overlay: format!("/var/lib/recovered/{}-{}.qcow2", st.vm_name, d.disk_key),
                bytes_done: done.min(d.size_bytes),
                bytes_total: d.size_bytes,
                rate_bps: 1 << 20,
                stream: stream.into(),
            })
            .collect(),
        stalled: stalled.map(str::to_string),
        error_message: None,
    }
}

/// Posts a progress report as the node, which then answers the hub's questions with it.
async fn report(env: &Env, node: &FakeNode, st: &NodeRecoveryState) -> Value {
    node.seen
        .lock()
        .unwrap()
        .states
        .insert(st.recovery_id.clone(), st.clone());
    let (s, r) = env
        .api
        .post(
            &format!("/api/v1/recoveries/{}/progress", st.recovery_id),
            &serde_json::to_value(st).unwrap(),
        )
        .await;
    assert_eq!(s, 200, "{r:#}");
    r
}

async fn post_end(env: &Env, st: &NodeRecoveryState, status: &str) -> (u16, Value) {
    env.api
        .post(
            &format!("/api/v1/recoveries/{}/complete", st.recovery_id),
            &json!({"status": status, "state": st}),
        )
        .await
}

async fn wait_status(env: &Env, id: &str, want: &str) -> Value {
    let t = Instant::now();
    loop {
        let r = env.api.get_ok(&format!("/api/v1/recoveries/{id}")).await;
        if r["status"] == want {
            return r;
        }
        assert!(
            t.elapsed() < JOB_LIMIT,
            "recovery {id} is not {want}: {r:#}\n{:#?}",
            events(env, id).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `step: message` of the recovery's own events.
async fn events(env: &Env, id: &str) -> Vec<String> {
    let v = env
        .api
        .get_ok(&format!("/api/v1/recoveries/{id}/events"))
        .await;
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}: {}",
                e["step"].as_str().unwrap(),
                e["message"].as_str().unwrap()
            )
        })
        .collect()
}

fn pids(r: &Value) -> Vec<u32> {
    r["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["qemu_nbd_pid"].as_u64().expect("a qemu-nbd pid") as u32)
        .collect()
}

/// Nothing of an ended recovery is held: its record names no port or PID, no port is
/// allocated, none of `gone` lives, no process is recorded alive.
async fn assert_released(env: &Env, r: &Value, gone: &[u32]) {
    for d in r["disks"].as_array().unwrap() {
        assert!(
            d["nbd_port"].is_null() && d.get("qemu_nbd_pid").is_none_or(Value::is_null),
            "an ended recovery names what it held: {r:#}"
        );
    }
    let ports = env.api.get_ok("/api/v1/ports").await;
    assert_eq!(
        ports["allocations"],
        json!([]),
        "ports still held: {ports:#}"
    );
    for pid in gone {
        assert!(!pid_alive(*pid), "qemu-nbd pid {pid} still runs");
    }
    let procs = env.api.get_ok("/api/v1/processes").await;
    let alive: Vec<&Value> = procs
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["alive"] == true)
        .collect();
    assert!(alive.is_empty(), "processes recorded alive: {alive:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_two_disk_point_is_served_until_the_node_has_every_disk_home() {
    let mut env = Env::start();
    let (id, images) = two_disk_point(&env, "inst1").await;
    production(&mut env, "unix");
    let node = FakeNode::start(&env).await;

    let (r, st) = recover(
        &env,
        &node,
        json!({"backup_id": id, "node": NODE, "vm_name": "inst1-r", "memory_mib": 256,
               "speed_bps": 1048576, "overlay_dir": "/var/lib/recovered"}),
    )
    .await;
    let rid = r["recovery_id"].as_str().unwrap().to_string();
    assert_eq!(r["source_vm"], "inst1");
    assert_eq!(
        (r["node"].as_str(), r["vm_name"].as_str()),
        (Some(NODE), Some("inst1-r"))
    );
    // What the node is asked: the request over the defaults (no hardware was recorded).
    assert_eq!(
        (st.memory_mib, st.cpus, st.machine.as_deref()),
        (256, 1, None)
    );
    assert_eq!(st.speed_bps, Some(1 << 20));
    assert_eq!(st.overlay_dir.as_deref(), Some("/var/lib/recovered"));
    let keys: Vec<i64> = st.disks.iter().map(|d| d.disk_key.0).collect();
    assert_eq!(keys, [2000, 2001], "every disk, in disk-key order");

    // Both exports serve the point's images, read-only, to the recovery's certificate only.
    for (d, image) in st.disks.iter().zip(&images) {
        assert_eq!(d.size_bytes, DISK_SIZE);
        assert!(
            d.export.socket.is_some(),
            "a unix socket export: {}",
            d.export
        );
        assert!(
            d.export.tls.is_some(),
            "TLS material for the node: {}",
            d.export
        );
        let served = read_export(&d.export).await;
        assert!(
            served == disks::read_raw(image),
            "disk {} differs from {}",
            d.disk_key,
            image.display()
        );
        let plain = NbdClient::connect(&addr(&d.export), &ConnectOptions::default()).await;
        assert!(plain.is_err(), "{} opened without a certificate", d.export);
    }
    // The ports and the processes views show them, under the point.
    let held = pids(&r);
    let ports = env.api.get_ok("/api/v1/ports").await;
    let allocs = ports["allocations"].as_array().unwrap();
    assert_eq!(allocs.len(), 2, "{ports:#}");
    for (a, d) in allocs.iter().zip(r["disks"].as_array().unwrap()) {
        assert_eq!(a["backup_id"], id.as_str());
        assert_eq!(
            (&a["port"], &a["disk_key"]),
            (&d["nbd_port"], &d["disk_key"])
        );
    }
    let procs = env.api.get_ok("/api/v1/processes").await;
    for pid in &held {
        assert!(pid_alive(*pid));
        let p = procs.as_array().unwrap().iter().find(|p| p["pid"] == *pid);
        let p = p.unwrap_or_else(|| panic!("qemu-nbd {pid} not in {procs:#}"));
        assert_eq!(
            (p["alive"].as_bool(), p["backup_id"].as_str()),
            (Some(true), Some(id.as_str()))
        );
    }
    // No prune rewrites the chain the VM reads.
    let (s, v) = env
        .api
        .post(
            "/api/v1/prune",
            &json!({"vm_name": "inst1", "retention": {"keep_last": 1}}),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    assert!(v["detail"].as_str().unwrap().contains(&rid), "{v}");

    // Progress: the VM started, the streams run, then a stall the node describes, then not.
    let r = report(
        &env,
        &node,
        &node_state(&st, 8 * MIB, "running", Some(4711), None),
    )
    .await;
    assert_eq!(r["qemu_pid"], 4711, "{r:#}");
    assert!(r["vm_started_at"].is_string(), "{r:#}");
    assert_eq!(r["vm_state"], "running");
    let d = &r["disks"][1];
    assert_eq!(
        (d["bytes_done"].as_u64(), d["bytes_total"].as_u64()),
        (Some(8 * MIB), Some(DISK_SIZE))
    );
    assert_eq!(
        (d["stream"].as_str(), d["rate_bps"].as_u64()),
        (Some("running"), Some(1 << 20))
    );
    assert_eq!(d["overlay"], "/var/lib/recovered/inst1-r-2001.qcow2");
    let words = "the export of disk 2001 does not answer: the VM is paused, the guest waits";
    for done in [9, 10] {
        report(
            &env,
            &node,
            &node_state(&st, done * MIB, "paused", Some(4711), Some(words)),
        )
        .await;
    }
    let r = env.api.get_ok(&format!("/api/v1/recoveries/{rid}")).await;
    assert_eq!(
        (r["stalled"].as_str(), r["vm_state"].as_str()),
        (Some(words), Some("paused"))
    );
    report(
        &env,
        &node,
        &node_state(&st, 32 * MIB, "running", Some(4711), None),
    )
    .await;
    let r = env.api.get_ok(&format!("/api/v1/recoveries/{rid}")).await;
    assert!(r.get("stalled").is_none_or(Value::is_null), "{r:#}");
    assert_eq!(r["disks"][0]["bytes_done"], 32 * MIB);

    // A report of a disk the recovery does not have, or "completed" with a disk not home.
    let mut stray = node_state(&st, 0, "running", None, None);
    stray.disks[0].disk_key = sendense_shared::ids::DiskKey(2005);
    let (s, v) = env
        .api
        .post(
            &format!("/api/v1/recoveries/{rid}/progress"),
            &serde_json::to_value(&stray).unwrap(),
        )
        .await;
    assert_refused_naming(s, &v, "disks: disk 2005");
    let mut half = node_state(&st, DISK_SIZE, "finished", Some(4711), None);
    half.disks[1].stream = "running".into();
    let (s, v) = post_end(&env, &half, "completed").await;
    assert_refused_naming(s, &v, "state.disks: disk 2001");
    assert_eq!(
        wait_status(&env, &rid, "running").await["status"],
        "running"
    );

    // Every disk home: completed, and nothing is held any more.
    let home = node_state(&st, DISK_SIZE, "finished", Some(4711), None);
    let (s, v) = post_end(&env, &home, "completed").await;
    assert_eq!(s, 200, "{v:#}");
    assert_eq!(v["status"], "completed", "{v:#}");
    assert!(v["completed_at"].is_string());
    assert!(
        v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["stream"] == "finished")
    );
    assert_released(&env, &v, &held).await;
    // The node retrying its report gets the same answer.
    let (s, again) = post_end(&env, &home, "completed").await;
    assert_eq!((s, &again["status"]), (200, &json!("completed")), "{again}");

    let ev = events(&env, &rid).await;
    for step in [
        "recovery_created",
        "recovery_started",
        "recovery_node_accepted",
        "recovery_vm_started",
        "recovery_stalled",
        "recovery_resumed",
        "recovery_completed",
    ] {
        assert!(ev.iter().any(|e| e.starts_with(step)), "no {step}: {ev:#?}");
    }
    let stalls: Vec<&String> = ev
        .iter()
        .filter(|e| e.starts_with("recovery_stalled"))
        .collect();
    assert_eq!(stalls.len(), 1, "one event per stall: {ev:#?}");
    assert!(stalls[0].contains(words), "{stalls:?}");
    // The point's log has them too, tagged with the recovery.
    let b = env
        .api
        .get_ok(&format!("/api/v1/backups/{id}/events"))
        .await;
    assert!(
        b.as_array()
            .unwrap()
            .iter()
            .any(|e| e["job_id"] == rid.as_str() && e["step"] == "recovery_completed"),
        "{b:#}"
    );
}
