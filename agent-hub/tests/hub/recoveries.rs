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

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_export_comes_back_on_the_same_port_with_the_same_bytes() {
    let mut env = Env::start();
    let (id, images) = two_disk_point(&env, "inst2").await;
    production(&mut env, "tcp");
    let node = FakeNode::start(&env).await;
    let (r, st) = recover(
        &env,
        &node,
        json!({"backup_id": id, "node": NODE, "vm_name": "inst2-r", "disks": [2001, 2000]}),
    )
    .await;
    let rid = r["recovery_id"].as_str().unwrap().to_string();
    let keys: Vec<i64> = st.disks.iter().map(|d| d.disk_key.0).collect();
    assert_eq!(keys, [2001, 2000], "the request's (guest) order");
    let before = pids(&r);
    let victim = &st.disks[0];
    let port = victim.export.port;
    assert!(victim.export.socket.is_none(), "TCP: {}", victim.export);
    let want = disks::read_raw(&images[1]);
    assert!(read_export(&victim.export).await == want);

    eprintln!("+ kill -KILL {}", before[0]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = Instant::now();
    let r = loop {
        let r = env.api.get_ok(&format!("/api/v1/recoveries/{rid}")).await;
        match r["disks"][0]["qemu_nbd_pid"].as_u64() {
            Some(p) if p as u32 != before[0] => break r,
            _ => {}
        }
        assert!(
            t.elapsed() < JOB_LIMIT,
            "no new qemu-nbd: {r:#}\n{:#?}",
            events(&env, &rid).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let now = pids(&r);
    assert!(
        !pid_alive(before[0]) && pid_alive(now[0]),
        "{before:?} -> {now:?}"
    );
    assert_eq!(now[1], before[1], "the other disk's export was left alone");
    assert_eq!(r["status"], "running", "{r:#}");
    assert_eq!(r["disks"][0]["nbd_port"], port, "the same port");
    let ports = env.api.get_ok("/api/v1/ports").await;
    assert!(
        ports["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["port"] == port && a["backup_id"] == id.as_str()),
        "{ports:#}"
    );
    // The node's certificate of the start request opens it, and it serves the same bytes.
    assert!(
        read_export(&victim.export).await == want,
        "the restarted export differs"
    );
    let procs = env.api.get_ok("/api/v1/processes").await;
    let rec = |pid: u32| {
        procs
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"] == pid)
            .cloned()
    };
    assert_eq!(rec(before[0]).unwrap()["alive"], false, "{procs:#}");
    let new = rec(now[0]).unwrap();
    assert_eq!(
        (new["alive"].as_bool(), new["port"].as_u64()),
        (Some(true), Some(port.into()))
    );
    let ev = events(&env, &rid).await;
    let restarted: Vec<&String> = ev
        .iter()
        .filter(|e| e.starts_with("export_restarted"))
        .collect();
    assert_eq!(restarted.len(), 1, "{ev:#?}");
    let (old, new) = (format!("pid {}", before[0]), format!("pid {}", now[0]));
    assert!(
        restarted[0].contains("disk 2001")
            && restarted[0].contains(&old)
            && restarted[0].contains(&new)
            && restarted[0].contains("SIGKILL"),
        "{restarted:?}"
    );

    // Cancel: the node is told, reports its end, and the hub lets go of everything.
    let (s, c) = env
        .api
        .post(&format!("/api/v1/recoveries/{rid}/cancel"), &json!({}))
        .await;
    assert_eq!((s, &c["status"]), (202, &json!("cancelling")), "{c:#}");
    node.wait_cancel(&rid).await;
    let mut end = node_state(&st, 16 * MIB, "cancelled", Some(4712), None);
    end.status = JobStatus::Cancelled;
    let (s, v) = post_end(&env, &end, "cancelled").await;
    assert_eq!(s, 200, "{v:#}");
    let done = wait_status(&env, &rid, "cancelled").await;
    assert_released(&env, &done, &now).await;
    let (s, v) = env
        .api
        .post(&format!("/api/v1/recoveries/{rid}/cancel"), &json!({}))
        .await;
    assert_eq!((s, &v["error"]), (409, &json!("wrong_state")), "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_are_refused_naming_the_field_and_a_vm_name_is_taken_once_per_node() {
    let env = Env::start();
    let node = FakeNode::start(&env).await;
    let (_, id, _) = env.gridded_full("inst3").await;
    let ok = json!({"backup_id": id, "node": NODE, "vm_name": "inst3-r"});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };

    let (s, v) = request(&env, with("backup_id", json!("no-such-backup"))).await;
    assert_eq!((s, &v["error"]), (404, &json!("not_found")), "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("no-such-backup"),
        "{v}"
    );
    let (s, v) = request(&env, with("node", json!("no-such-node"))).await;
    assert_eq!(s, 404, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("no-such-node"),
        "{v}"
    );
    for (field, value, named) in [
        ("vm_name", json!("-bad name"), "vm_name"),
        ("vm_name", json!("x".repeat(64)), "vm_name"),
        ("disks", json!([2005]), "disks: backup"),
        (
            "disks",
            json!([2000, 2000]),
            "disks: disk 2000 is named twice",
        ),
        ("disks", json!([]), "disks"),
        ("speed_bps", json!(0), "speed_bps"),
        ("overlay_dir", json!("relative/dir"), "overlay_dir"),
        ("memory_mib", json!(0), "memory_mib"),
        ("kernel", json!("vmlinuz"), "kernel"),
    ] {
        let (s, v) = request(&env, with(field, value)).await;
        assert_refused_naming(s, &v, named);
    }
    // A node credential may not start one (admin scope), nor read another node's.
    let other = env.hub.node_api("othernode").unwrap();
    let (s, v) = other.post("/api/v1/recoveries", &ok).await;
    assert_eq!((s, &v["error"]), (403, &json!("forbidden")), "{v}");
    // Nothing was prepared for any refusal.
    assert_eq!(env.api.get_ok("/api/v1/recoveries").await, json!([]));
    assert_eq!(
        env.api.get_ok("/api/v1/ports").await["allocations"],
        json!([])
    );

    let (r, st) = recover(&env, &node, ok.clone()).await;
    let rid = r["recovery_id"].as_str().unwrap().to_string();
    // The point's other fields stay free; the name on the node does not.
    let (s, v) = request(&env, ok.clone()).await;
    assert_eq!((s, &v["error"]), (409, &json!("already_exists")), "{v}");
    let msg = v["detail"].as_str().unwrap();
    assert!(
        msg.starts_with("vm_name") && msg.contains(&rid) && msg.contains(NODE),
        "{v}"
    );
    for path in [
        format!("/api/v1/recoveries/{rid}"),
        format!("/api/v1/recoveries/{rid}/events"),
    ] {
        let (s, v) = other.get(&path).await;
        assert_eq!(s, 403, "{path}: {v}");
        assert!(
            v["detail"].as_str().unwrap().contains("node:othernode"),
            "{v}"
        );
    }
    let (s, v) = other
        .post(
            &format!("/api/v1/recoveries/{rid}/progress"),
            &serde_json::to_value(node_state(&st, 0, "running", None, None)).unwrap(),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = other
        .post(&format!("/api/v1/recoveries/{rid}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 403, "{v}");

    // The node refuses a second VM (its own 409, its words): failed, nothing held for it.
    let (s, v) = request(&env, with("vm_name", json!("taken-inst3"))).await;
    assert_eq!((s, &v["error"]), (409, &json!("already_exists")), "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("runs on this node already"),
        "{v}"
    );
    let list = env.api.get_ok("/api/v1/recoveries").await;
    let refused = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["vm_name"] == "taken-inst3")
        .unwrap();
    assert_eq!(refused["status"], "failed", "{refused:#}");
    let ports = env.api.get_ok("/api/v1/ports").await;
    assert_eq!(
        ports["allocations"].as_array().unwrap().len(),
        1,
        "only the first's: {ports:#}"
    );

    // Cancelled before the node reports anything: the first ends, the name is free again.
    let held = pids(&r);
    env.api
        .post(&format!("/api/v1/recoveries/{rid}/cancel"), &json!({}))
        .await;
    node.wait_cancel(&rid).await;
    let mut end = node_state(&st, 0, "cancelled", None, None);
    end.status = JobStatus::Cancelled;
    post_end(&env, &end, "cancelled").await;
    let done = wait_status(&env, &rid, "cancelled").await;
    assert_released(&env, &done, &held).await;
    let (s, v) = request(&env, ok).await;
    assert_eq!(s, 202, "the name is free once the recovery ended: {v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_killed_mid_recovery_fails_it_at_restart_and_holds_nothing() {
    let mut env = Env::start();
    let (id, _) = two_disk_point(&env, "inst4").await;
    production(&mut env, "unix");
    let node = FakeNode::start(&env).await;
    let (r, st) = recover(
        &env,
        &node,
        json!({"backup_id": id, "node": NODE, "vm_name": "inst4-r"}),
    )
    .await;
    let rid = r["recovery_id"].as_str().unwrap().to_string();
    report(
        &env,
        &node,
        &node_state(&st, 4 * MIB, "running", Some(4713), None),
    )
    .await;
    let held = pids(&r);

    env.hub.kill9();
    // Its own process groups: the exports outlive the hub, until the reconciler.
    assert!(held.iter().all(|p| pid_alive(*p)), "{held:?}");
    env.start_again();
    let r = env.api.get_ok(&format!("/api/v1/recoveries/{rid}")).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    let msg = r["error_message"].as_str().unwrap();
    assert!(
        msg.contains("hub restarted during the recovery")
            && msg.contains(&format!("the recovered VM on node {NODE} is paused"))
            && msg.contains("must be cancelled or recovered again"),
        "{msg}"
    );
    assert_released(&env, &r, &held).await;
    // The node is told to stop the VM that lost its disks.
    node.wait_cancel(&rid).await;
    let ev = events(&env, &rid).await;
    assert!(
        ev.iter().any(|e| e.starts_with("reconciler_recovery:")),
        "{ev:#?}"
    );
    // Its end, reported late, is taken as the end of what the hub ended.
    let mut end = node_state(&st, 4 * MIB, "cancelled", Some(4713), None);
    end.status = JobStatus::Cancelled;
    let (s, v) = post_end(&env, &end, "cancelled").await;
    assert_eq!((s, &v["status"]), (200, &json!("failed")), "{v:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_that_cannot_come_back_fails_the_recovery_naming_the_disk() {
    let mut env = Env::start();
    let (id, images) = two_disk_point(&env, "inst5").await;
    production(&mut env, "tcp");
    let node = FakeNode::start(&env).await;
    let (r, st) = recover(
        &env,
        &node,
        json!({"backup_id": id, "node": NODE, "vm_name": "inst5-r", "disks": [2000]}),
    )
    .await;
    let rid = r["recovery_id"].as_str().unwrap().to_string();
    assert_eq!(st.disks.len(), 1, "only the disk asked for: {st:?}");
    let held = pids(&r);
    // The image goes away under the running export (qemu-nbd keeps its open file), then the
    // export dies: no restart can open the image again.
    let moved = images[0].with_extension("moved");
    std::fs::rename(&images[0], &moved).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(held[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let done = wait_status(&env, &rid, "failed").await;
    let msg = done["error_message"].as_str().unwrap();
    assert!(
        msg.contains("disk 2000")
            && msg.contains("could not be kept up after 5 restart attempt(s)")
            && msg.contains("not found"),
        "{msg}"
    );
    let ev = events(&env, &rid).await;
    let failed = ev
        .iter()
        .filter(|e| e.starts_with("export_restart_failed: disk 2000"))
        .count();
    assert_eq!(failed, 5, "{ev:#?}");
    // The VM cannot read its disk any more: the node is told to stop it.
    node.wait_cancel(&rid).await;
    assert_released(&env, &done, &held).await;
    std::fs::rename(&moved, &images[0]).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_to_the_hub_stops_the_exports_and_tells_the_node() {
    let mut env = Env::start();
    let (id, _) = two_disk_point(&env, "inst6").await;
    production(&mut env, "unix");
    let node = FakeNode::start(&env).await;
    let (r, _) = recover(
        &env,
        &node,
        json!({"backup_id": id, "node": NODE, "vm_name": "inst6-r"}),
    )
    .await;
    let rid = r["recovery_id"].as_str().unwrap().to_string();
    let held = pids(&r);
    let status = env.hub.stop().expect("the hub stops on SIGTERM");
    assert!(status.success(), "{status:?}");
    node.wait_cancel(&rid).await;
    assert!(held.iter().all(|p| !pid_alive(*p)), "{held:?}");
    env.start_again();
    let r = env.api.get_ok(&format!("/api/v1/recoveries/{rid}")).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert!(
        r["error_message"]
            .as_str()
            .unwrap()
            .starts_with("hub stopped (SIGTERM) during the recovery"),
        "{r:#}"
    );
    assert_released(&env, &r, &held).await;
}
