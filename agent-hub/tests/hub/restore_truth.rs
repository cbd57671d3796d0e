//! Restores against the stored truth: a point offered for restore only while its integrity
//! allows it, and what the node wrote compared with the point's stored whole-disk checksums
//! before the restore is called completed.
//!
//! The node is a stand-in (an axum server that records the hub's start request and answers
//! the node's restore API); the test plays its copy engine: it reads the hub's read-only export
//! with qemu-img into a new image, computes that image's grid and posts the completion. Why a
//! stand-in: only it lets the test send what a node computed from a copy that went wrong, or
//! what an older node sends (no grid).
//!
//! The integrity of a point is set through the hub's own database layer (`Db::set_integrity`
//! on the running hub's SQLite file, as a verify job records it): a verify job that finds a
//! point corrupt is another file's subject; this one is about what a restore does with it. A
//! legacy point is made as migration 0004 leaves one (its sidecar columns NULL, integrity
//! `legacy`), with SQL on the same file.

use super::env::*;
use agent_hub::db::Db;
use axum::extract::{Path as UrlPath, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use sendense_shared::api::{Integrity, NodeRestoreStart};
use sendense_shared::ids::BackupId;
use sendense_tests::disks;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CELL: u64 = 4 * MIB;

type Starts = Arc<Mutex<Vec<NodeRestoreStart>>>;

/// The node's restore API on 127.0.0.1; stopped on drop.
struct FakeNode {
    url: String,
    starts: Starts,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(State(starts): State<Starts>, Json(req): Json<NodeRestoreStart>) -> Json<Value> {
    let id = req.restore_id.clone();
    starts.lock().unwrap().push(req);
    Json(json!({"restore_id": id}))
}

/// Running, whenever the hub asks (the test posts the end itself).
async fn state(State(starts): State<Starts>, UrlPath(id): UrlPath<String>) -> Json<Value> {
    let s = starts
        .lock()
        .unwrap()
        .iter()
        .find(|s| s.restore_id == id)
        .cloned();
    let (path, total) = s.map(|s| (s.path, s.size_bytes)).unwrap_or_default();
    Json(
        json!({"restore_id": id, "path": path, "status": "running", "bytes_done": 0,
                "bytes_total": total, "bytes_written": 0, "verified_ranges": 0,
                "error_message": null}),
    )
}

impl FakeNode {
    async fn start(env: &Env) -> FakeNode {
        let starts: Starts = Arc::default();
        let app = Router::new()
            .route("/api/v1/restore/start", post(start))
            .route("/api/v1/restore/{id}", get(state))
            .route(
                "/api/v1/restore/{id}/cancel",
                post(|| async { Json(json!({})) }),
            )
            .with_state(starts.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let (s, n) = env
            .api
            .post(
                "/api/v1/nodes",
                &json!({"name": "rnode", "api_url": url, "version": "test"}),
            )
            .await;
        assert_eq!(s, 201, "{n}");
        FakeNode { url, starts, task }
    }

    /// The hub's start request of restore `id`.
    async fn start_of(&self, id: &str) -> NodeRestoreStart {
        let t = Instant::now();
        loop {
            let got = self
                .starts
                .lock()
                .unwrap()
                .iter()
                .find(|s| s.restore_id == id)
                .cloned();
            if let Some(s) = got {
                return s;
            }
            assert!(t.elapsed() < JOB_LIMIT, "no start for {id} at {}", self.url);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A verified full backup of a one-disk VM (the writer's grid stored as the point's truth);
/// answers its id and source image.
async fn verified_point(env: &Env, vm: &str) -> (String, PathBuf) {
    let srcs = env.vm_with_sources(vm, &[2000]).await;
    let (id, b) = env.backup(vm, "full").await;
    disks::nbdcopy_into(&srcs[0], &targets(&b)[0].1);
    let body = json!({"status": "completed", "disks": [
        {"disk_key": 2000, "status": "completed", "grid": grid_of(&srcs[0], CELL)}]});
    let done = env.complete_ok(&id, &body).await;
    assert_eq!(done["integrity"], "verified", "{done:#}");
    (id, srcs[0].clone())
}

async fn request(env: &Env, backup: &str, path: &Path) -> (u16, Value) {
    env.api
        .post(
            "/api/v1/restores",
            &json!({"backup_id": backup, "target": {"node": "rnode", "path": path}}),
        )
        .await
}

/// Starts a restore of `backup`, then copies the hub's export into `path` as the node would
/// (qemu-img reading the read-only export); answers the restore's id and the start request.
async fn restore_into(
    env: &Env,
    node: &FakeNode,
    backup: &str,
    path: &Path,
) -> (String, NodeRestoreStart) {
    let (s, r) = request(env, backup, path).await;
    assert_eq!(s, 202, "{r}");
    let id = r["restore_id"].as_str().unwrap().to_string();
    let st = node.start_of(&id).await;
    assert_eq!(st.checksum_grid, Some(CELL), "{st:?}");
    sendense_tests::run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&st.source)
            .arg(path),
    );
    (id, st)
}

/// Posts the node's completion (with `grid`, when it has one) and waits for the restore's end.
async fn complete(env: &Env, id: &str, grid: Option<Value>) -> Value {
    let mut body =
        json!({"status": "completed", "bytes_written": DISK_SIZE, "verified_ranges": 16});
    if let Some(g) = grid {
        body["grid"] = g;
    }
    env.api
        .post(&format!("/api/v1/restores/{id}/complete"), &body)
        .await;
    let t = Instant::now();
    loop {
        let r = env.api.get_ok(&format!("/api/v1/restores/{id}")).await;
        if ["completed", "failed", "cancelled"].contains(&r["status"].as_str().unwrap()) {
            return r;
        }
        assert!(t.elapsed() < JOB_LIMIT, "restore {id} did not end: {r:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn restore_events(env: &Env, id: &str) -> Vec<String> {
    let v = env
        .api
        .get_ok(&format!("/api/v1/restores/{id}/events"))
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

/// The hub's export is gone and its port released once the restore ended, whatever the end.
async fn assert_restore_released(env: &Env) {
    let ports = env.api.get_ok("/api/v1/ports").await;
    assert_eq!(ports["allocations"], json!([]), "ports still held: {ports}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_or_unverified_point_is_not_offered_for_restore() {
    let env = Env::start();
    let node = FakeNode::start(&env).await;
    let (id, _) = verified_point(&env, "rotvm").await;
    let db = Db::connect(&format!(
        "sqlite://{}",
        env.tmp.path().join("data/hub.db").display()
    ))
    .await
    .expect("the hub's database");
    let detail = "verify job v-1: cell 3 (offset 12582912) differs from the stored checksum";
    db.set_integrity(&BackupId(id.clone()), Integrity::Corrupt, Some(detail))
        .await
        .unwrap();
    let target = env.path("restored.qcow2");
    let (s, v) = request(&env, &id, &target).await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["error"], "not_restorable", "{v}");
    let msg = v["detail"].as_str().unwrap();
    assert!(msg.contains("is corrupt") && msg.contains(detail), "{v}");

    db.set_integrity(&BackupId(id.clone()), Integrity::Unverified, None)
        .await
        .unwrap();
    let (s, v) = request(&env, &id, &target).await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["error"], "not_restorable", "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("is unverified"),
        "{v}"
    );
    // Refused before anything was prepared: no restore, no port, nothing asked of the node.
    assert_eq!(env.api.get_ok("/api/v1/restores").await, json!([]));
    assert_restore_released(&env).await;
    assert!(node.starts.lock().unwrap().is_empty());

    // Back to verified (a verify job that read it equal): offered again.
    db.set_integrity(&BackupId(id.clone()), Integrity::Verified, None)
        .await
        .unwrap();
    let (rid, _) = restore_into(&env, &node, &id, &target).await;
    let r = complete(&env, &rid, Some(grid_of(&target, CELL))).await;
    assert_eq!(r["status"], "completed", "{r:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_is_compared_with_the_points_stored_checksums() {
    let env = Env::start();
    let node = FakeNode::start(&env).await;
    let (id, src) = verified_point(&env, "truthvm").await;

    // What the node wrote equals the stored truth: completed, and the event says so.
    let good = env.path("good.qcow2");
    let (rid, _) = restore_into(&env, &node, &id, &good).await;
    assert!(disks::images_equal(&good, &src));
    let r = complete(&env, &rid, Some(grid_of(&good, CELL))).await;
    assert_eq!(r["status"], "completed", "{r:#}");
    let cells = DISK_SIZE / CELL;
    let ev = restore_events(&env, &rid).await;
    let want = format!(
        "restore_truth_matched: restored disk matches the point's stored checksums ({cells} cells)"
    );
    assert!(ev.contains(&want), "{ev:#?}");
    assert_restore_released(&env).await;

    // The node's copy went wrong in a cell the point holds as zeroes (cell 2, a hole of the
    // source): failed, naming that cell and its offset; the written image is left alone.
    let bad = env.path("bad.qcow2");
    let (rid, _) = restore_into(&env, &node, &id, &bad).await;
    disks::write_pattern(&bad, 9 * MIB, 4096, 0x5a);
    let r = complete(&env, &rid, Some(grid_of(&bad, CELL))).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    let msg = r["error_message"].as_str().unwrap();
    assert!(
        msg.contains("does not match the point's stored checksums")
            && msg.contains(&format!("cell 2 (offset {}", 2 * CELL))
            && msg.contains(bad.to_str().unwrap()),
        "{msg}"
    );
    assert!(!msg.contains("more cell"), "only cell 2 differs: {msg}");
    assert!(bad.exists(), "the node's image is not the hub's to delete");
    assert_restore_released(&env).await;
    let ev = restore_events(&env, &rid).await;
    assert!(
        ev.iter()
            .any(|e| e.starts_with("restore_failed") && e.contains("cell 2")),
        "{ev:#?}"
    );

    // An older node sends no grid: completed, and the event says it was not compared and why.
    let old = env.path("old.qcow2");
    let (rid, _) = restore_into(&env, &node, &id, &old).await;
    let r = complete(&env, &rid, None).await;
    assert_eq!(r["status"], "completed", "{r:#}");
    let ev = restore_events(&env, &rid).await;
    assert!(
        ev.iter()
            .any(|e| e.starts_with("restore_truth_not_compared")
                && e.contains("not compared")
                && e.contains("sent no whole-disk checksums")),
        "{ev:#?}"
    );
    assert!(
        !ev.iter().any(|e| e.starts_with("restore_truth_matched")),
        "{ev:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_legacy_point_is_not_compared_and_a_damaged_sidecar_fails_the_restore() {
    use sqlx::Connection;
    let env = Env::start();
    let node = FakeNode::start(&env).await;
    let (id, _) = verified_point(&env, "oldvm").await;
    let b = env.api.get_ok(&format!("/api/v1/backups/{id}")).await;
    let image = image_paths(&b)[0].clone();
    let sidecar = PathBuf::from(format!("{}.sums", image.display()));

    // A damaged sidecar (one byte of a stored hash flipped): the stored truth cannot be read,
    // so the restore cannot be called good.
    let original = std::fs::read(&sidecar).unwrap();
    let mut damaged = original.clone();
    damaged[40] ^= 0x01;
    std::fs::write(&sidecar, &damaged).unwrap();
    let target = env.path("damaged.qcow2");
    let (rid, _) = restore_into(&env, &node, &id, &target).await;
    let r = complete(&env, &rid, Some(grid_of(&target, CELL))).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    let msg = r["error_message"].as_str().unwrap();
    assert!(
        msg.contains("cannot compare with the point's stored checksums")
            && msg.contains(sidecar.to_str().unwrap()),
        "{msg}"
    );
    std::fs::write(&sidecar, &original).unwrap();

    // A point completed before whole-disk checksums (as migration 0004 leaves one): no
    // sidecar, `legacy`. It is restorable; the restore completes saying it was not compared.
    let url = format!("sqlite://{}", env.tmp.path().join("data/hub.db").display());
    let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query(
        "UPDATE backup_disks SET manifest_path = NULL, manifest_blake3 = NULL, \
         checksums_source = NULL WHERE backup_id = ?",
    )
    .bind(&id)
    .execute(&mut c)
    .await
    .unwrap();
    sqlx::query("UPDATE backup_jobs SET integrity = 'legacy' WHERE backup_id = ?")
        .bind(&id)
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    let target = env.path("legacy.qcow2");
    let (rid, _) = restore_into(&env, &node, &id, &target).await;
    let r = complete(&env, &rid, Some(grid_of(&target, CELL))).await;
    assert_eq!(r["status"], "completed", "{r:#}");
    let ev = restore_events(&env, &rid).await;
    assert!(
        ev.iter()
            .any(|e| e.starts_with("restore_truth_not_compared") && e.contains("legacy point")),
        "{ev:#?}"
    );
}
