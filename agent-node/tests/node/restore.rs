//! Restores through the real node binary: the backup point is an image served by a real
//! read-only qemu-nbd (as the hub serves it), the node writes a new qcow2 through its own
//! qemu-nbd. The hub's side is the recording stand-in ([`HubRecorder`]): it answers the node's
//! progress and completion pushes and keeps them, which is what these tests check; the real
//! hub's handling of them is tested in the hub and end-to-end suites.

use crate::support::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SIZE: u64 = 64 * MIB;

/// 40 MiB of data in three areas of a 64 MiB disk (so both data and holes are restored),
/// served read-only on `host:port` as export `point` (as the hub serves a backup point).
async fn source(dir: &Path, host: &str, port: u16) -> QemuNbd {
    let image = dir.join("point.qcow2");
    sendense_tests::disks::create_qcow2(&image, SIZE);
    write_pattern(&image, 0, 16 * MIB, 0x11);
    write_pattern(&image, 24 * MIB, 16 * MIB, 0x22);
    write_pattern(&image, 56 * MIB, 8 * MIB, 0x33);
    QemuNbd::builder(&image, "point")
        .read_only()
        .tcp_on(host, port)
        .start_async()
        .await
}

/// A restore `id` through a throttled node (4 MiB/s: about 10 s for the 40 MiB of data, so a test acts
/// on it mid-copy), waited for until it has written: the source export, the stand-in hub, the
/// node, the target path and the node's private qemu-nbd.
struct MidCopy {
    _src: QemuNbd,
    hub: HubRecorder,
    node: NodeProcess,
    target: PathBuf,
    pid: u32,
}

async fn restore_mid_copy(dir: &Path, id: &str) -> MidCopy {
    let src = source(dir, "127.0.0.1", free_port()).await;
    let hub = HubRecorder::start().await;
    let node = start_node(throttled(dir, &hub.url, 4 * MIB));
    let target = dir.join("restored.qcow2");
    let (code, body) = node
        .post(
            "/restore/start",
            start_body(id, src.host(), src.port(), &target),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let pid = private_qemu_nbd(&node, id, &target).await;
    node.wait_restore(id, 30, |v| v["bytes_written"].as_u64() > Some(0))
        .await;
    MidCopy {
        _src: src,
        hub,
        node,
        target,
        pid,
    }
}

/// The start request of restore `id` from `host:port` into `path`.
fn start_body(id: &str, host: &str, port: u16, path: &Path) -> Value {
    json!({
        "restore_id": id,
        "source": format!("nbd://{host}:{port}/point"),
        "source_export": {"host": host, "port": port, "export": "point"},
        "path": path,
        "size_bytes": SIZE,
    })
}

/// A node reading at most `bps` bytes per second (the copy engine's test throttle).
fn throttled(dir: &Path, hub: &str, bps: u64) -> NodeOptions {
    NodeOptions {
        env: vec![(agent_node::copy::THROTTLE_ENV.to_string(), bps.to_string())],
        ..node_opts(dir, None, Some(hub))
    }
}

/// The restore's journal entry in the node's run dir (it names the private qemu-nbd).
fn journal(node: &NodeProcess, id: &str) -> Value {
    let p = node.run_dir.join(format!("restore-{id}.json"));
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// The PID of the restore's private qemu-nbd, once the journal has it; checked to be qemu-nbd
/// serving `image`.
async fn private_qemu_nbd(node: &NodeProcess, id: &str, image: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = node.run_dir.join(format!("restore-{id}.json"));
        if p.exists()
            && let Some(pid) = journal(node, id)["qemu_nbd_pid"].as_u64()
        {
            let pid = pid as u32;
            let cmdline = sendense_shared::child::read_cmdline(pid).unwrap_or_default();
            assert_eq!(
                cmdline.first().map(String::as_str),
                Some("qemu-nbd"),
                "{cmdline:?}"
            );
            assert_eq!(cmdline.last().map(PathBuf::from).as_deref(), Some(image));
            return pid;
        }
        assert!(Instant::now() < deadline, "no journalled qemu-nbd");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// No restore file (journal, socket) is left in the node's run dir.
fn no_restore_files(run_dir: &Path) {
    let left: Vec<String> = std::fs::read_dir(run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("restore-"))
        .collect();
    assert!(left.is_empty(), "run dir holds {left:?}");
}

async fn wait_gone(pid: u32, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while sendense_shared::child::pid_alive(pid) {
        assert!(Instant::now() < deadline, "qemu-nbd PID {pid} still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_equals_the_source_and_reports_progress_and_completion() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), "127.0.0.1", free_port()).await;
    let hub = HubRecorder::start().await;
    // 16 MiB/s over 40 MiB of data: long enough for a few periodic progress pushes.
    let node = start_node(throttled(dir.path(), &hub.url, 16 * MIB));
    let target = dir.path().join("restored.qcow2");
    let (code, body) = node
        .post(
            "/restore/start",
            start_body("r1", src.host(), src.port(), &target),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["status"], "running");
    let (code, again) = node
        .post(
            "/restore/start",
            start_body("r1", src.host(), src.port(), &target),
        )
        .await;
    assert_eq!(code, 409, "{again}");
    let done = node
        .wait_restore("r1", 60, |v| {
            v["status"].as_str().is_some_and(|s| s != "running")
        })
        .await;
    assert_eq!(done["status"], "completed", "{done}\n{}", node.stderr());
    assert_eq!(done["bytes_done"], SIZE);
    images_equal(&src.uri(), target.to_str().unwrap()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o640,
        "a restored disk is not for every local user"
    );

    let complete = hub.wait_for("/restores/r1/complete", 30).await;
    assert_eq!(complete.len(), 1);
    let c = &complete[0].body;
    assert_eq!(c["status"], "completed", "{c}");
    assert!(c["verified_ranges"].as_u64() > Some(0), "{c}");
    assert_eq!(c["verified_ranges"], done["verified_ranges"]);
    assert!(c["bytes_written"].as_u64() >= Some(40 * MIB), "{c}");
    assert_eq!(c["error_message"], Value::Null);
    assert_eq!(
        complete[0].auth.as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    let progress = hub.calls_to("/restores/r1/progress");
    assert!(progress.len() >= 2, "{progress:?}");
    let last = &progress.last().unwrap().body;
    assert_eq!(
        (last["bytes_done"].as_u64(), last["bytes_total"].as_u64()),
        (Some(SIZE), Some(SIZE))
    );
    // The final progress goes before the completion.
    let calls = hub.calls.lock().unwrap().clone();
    let at = |suffix: &str| {
        calls
            .iter()
            .rposition(|c| c.path.ends_with(suffix))
            .unwrap()
    };
    assert!(at("/restores/r1/progress") < at("/restores/r1/complete"));
    no_restore_files(&node.run_dir);

    let (code, body) = node.post("/restore/r1/cancel", json!({})).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("wrong_state")),
        "{body}"
    );
    let (code, body) = node.post("/restore/nope/cancel", json!({})).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_reports_the_whole_disk_grid_of_what_it_read() {
    use crate::grid_reference::{expand, reference_grid};
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), "127.0.0.1", free_port()).await;
    let hub = HubRecorder::start().await;
    let node = start_node(node_opts(dir.path(), None, Some(&hub.url)));
    // 3 MiB cells: 64 MiB is no multiple (the last cell is 1 MiB), and the 16 MiB hole at 40M
    // holds whole cells.
    let cell = 3 * MIB;
    for (id, grid) in [("r-grid", Some(cell)), ("r-plain", None)] {
        let target = dir.path().join(format!("{id}.qcow2"));
        let mut body = start_body(id, src.host(), src.port(), &target);
        if let Some(cell) = grid {
            body["checksum_grid"] = json!(cell);
        }
        let (code, body) = node.post("/restore/start", body).await;
        assert_eq!(code, 202, "{body}");
        let complete = hub.wait_for(&format!("/restores/{id}/complete"), 60).await;
        let c = &complete[0].body;
        assert_eq!(c["status"], "completed", "{c}");
        let Some(cell) = grid else {
            assert_eq!(c.get("grid"), None, "no grid unless the hub asks: {c}");
            continue;
        };
        let g: sendense_shared::api::GridChecksums =
            serde_json::from_value(c["grid"].clone()).unwrap();
        assert_eq!((g.cell_size, g.disk_size), (cell, SIZE));
        assert!(!g.zero_cells.is_empty(), "holes are zero runs: {c}");
        let want: Vec<Option<String>> = reference_grid(&dir.path().join("point.qcow2"), cell)
            .into_iter()
            .map(Some)
            .collect();
        assert_eq!(expand(&g), want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_restore_stops_its_qemu_nbd_and_deletes_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let MidCopy {
        _src,
        hub,
        node,
        target,
        pid,
    } = restore_mid_copy(dir.path(), "r2").await;
    let (code, body) = node.post("/restore/r2/cancel", json!({})).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["status"], "cancelling");
    let done = node
        .wait_restore("r2", 30, |v| v["status"] != "cancelling")
        .await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(
        done["bytes_done"].as_u64() < Some(SIZE),
        "it was mid-copy: {done}"
    );
    let complete = hub.wait_for("/restores/r2/complete", 30).await;
    assert_eq!(complete[0].body["status"], "cancelled");
    assert_eq!(complete[0].body["error_message"], "cancelled");
    assert_eq!(complete[0].body["error_code"], "cancelled");
    assert!(!target.exists(), "the partial image is deleted");
    wait_gone(pid, 5).await;
    no_restore_files(&node.run_dir);
    let (code, body) = node.post("/restore/r2/cancel", json!({})).await;
    assert_eq!(code, 409, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_restore_ends_it_cleanly_within_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let MidCopy {
        _src,
        hub,
        mut node,
        target,
        pid,
    } = restore_mid_copy(dir.path(), "r3").await;
    let t = Instant::now();
    assert!(
        node.terminate(Duration::from_secs(15)).await.is_some(),
        "node did not exit within 15 s of SIGTERM"
    );
    eprintln!("node exited {:?} after SIGTERM", t.elapsed());
    let complete = hub.calls_to("/restores/r3/complete");
    assert_eq!(complete.len(), 1, "{:?}", hub.calls.lock().unwrap());
    assert_eq!(complete[0].body["status"], "cancelled");
    assert_eq!(
        complete[0].body["error_message"],
        "cancelled: the node is shutting down"
    );
    assert!(!target.exists(), "the partial image is deleted");
    assert!(
        !sendense_shared::child::pid_alive(pid),
        "qemu-nbd {pid} left"
    );
    no_restore_files(&node.run_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_left_by_a_killed_node_is_undone_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let MidCopy {
        _src,
        hub,
        mut node,
        target,
        pid,
    } = restore_mid_copy(dir.path(), "r4").await;
    node.kill9();
    // The private qemu-nbd has its own process group: it outlives the node.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        sendense_shared::child::pid_alive(pid),
        "qemu-nbd {pid} should be left over"
    );
    assert!(target.exists());
    drop(node);

    let node = start_node(throttled(dir.path(), &hub.url, 4 * MIB));
    // Recovery runs before the API answers.
    assert!(
        !sendense_shared::child::pid_alive(pid),
        "recovery stopped qemu-nbd {pid}"
    );
    assert!(!target.exists(), "recovery deleted the partial image");
    no_restore_files(&node.run_dir);
    assert!(
        node.stderr()
            .contains(&format!("qemu-nbd PID {pid} (restore r4)")),
        "{}",
        node.stderr()
    );
    let (code, _) = node.get("/restore/r4").await;
    assert_eq!(code, 404, "a restarted node does not know the restore");
}

/// With a tunnel configured (`--tunnel-bind 127.0.0.2`), a source on the hub's loopback
/// (`127.0.0.1:P`, P in the forwarded range) is read from the forward's address 127.0.0.2:P.
/// The tunnel's ssh never connects here (its target port is closed): routing is configuration,
/// and the source qemu-nbd listens where the forward would, on 127.0.0.2 only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_reads_the_source_through_the_tunnel_bind_address() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..4).map(|_| free_on_both()).collect();
    let src = source(dir.path(), "127.0.0.2", ports[0]).await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", ports[0])).is_err(),
        "nothing serves the hub's address itself"
    );
    let hub = HubRecorder::start().await;
    let identity = dir.path().join("id");
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&identity, "not used: ssh never gets that far\n").unwrap();
    std::fs::write(&known_hosts, "").unwrap();
    let tunnel = sendense_tests::node::TunnelOptions {
        target: format!("sendense@127.0.0.1:{}", ports[3]),
        identity,
        known_hosts,
        bind: "127.0.0.2".into(),
        nbd_ports: (ports[0], ports[0]),
        hub_api_port: ports[1],
        reverse_port: ports[2],
    };
    let node = start_node(NodeOptions {
        tunnel: Some(tunnel),
        ..node_opts(dir.path(), None, Some(&hub.url))
    });
    let target = dir.path().join("restored.qcow2");
    let (code, body) = node
        .post(
            "/restore/start",
            start_body("r5", "127.0.0.1", ports[0], &target),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let done = node
        .wait_restore("r5", 60, |v| {
            v["status"].as_str().is_some_and(|s| s != "running")
        })
        .await;
    assert_eq!(done["status"], "completed", "{done}\n{}", node.stderr());
    images_equal(&src.uri(), target.to_str().unwrap()).unwrap();
    let complete = hub.wait_for("/restores/r5/complete", 30).await;
    assert_eq!(complete[0].body["status"], "completed");
}

/// A port free on 127.0.0.1 and on 127.0.0.2.
fn free_on_both() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
