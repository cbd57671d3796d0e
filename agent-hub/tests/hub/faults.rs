//! Every way a job can go wrong ends in a clear state with nothing held.

use super::env::{DISK_SIZE, Env, JOB_LIMIT, MIB, checksums_of, disk, image_paths, targets};
use sendense_tests::disks;
use serde_json::{Value, json};
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// SIGKILLs the qemu-nbd that serves disk `key` of the job answer `b`; its pid.
fn kill_qemu_nbd(b: &Value, key: i64) -> i32 {
    let victim = disk(b, key)["qemu_nbd_pid"].as_u64().unwrap() as i32;
    eprintln!("+ kill -KILL {victim}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    victim
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_mid_copy_unwinds_everything() {
    let env = Env::start();
    let srcs = env.vm_with_sources("cancelvm", &[2000, 2001]).await;
    // No completed backup yet: the incremental falls back to full and says so.
    let (s, b) = env.start_backup("cancelvm", "incremental").await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["backup_type"], "full", "{b}");
    let id = b["backup_id"].as_str().unwrap().to_string();
    let t = targets(&b);
    disks::nbdcopy_into(&srcs[0], &t[0].1);
    let images = image_paths(&b);
    assert!(images.iter().all(|p| p.exists()));

    let (s, c) = env
        .api
        .post(&format!("/api/v1/backups/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 202, "{c}");
    assert!(
        c["status"] == "cancelling" || c["status"] == "cancelled",
        "{c}"
    );
    let done = env.api.wait_status(&id, &["cancelled"], JOB_LIMIT).await;
    env.assert_nothing_held(&done).await;
    for p in &images {
        assert!(!p.exists(), "partial image {} left behind", p.display());
    }
    for d in done["disk_results"].as_array().unwrap() {
        assert_eq!(d["status"], "cancelled", "{d}");
    }
    let events = env.api.event_lines(&id).await;
    assert!(
        events.iter().any(|e| e.starts_with("incremental_fallback")),
        "{events:#?}"
    );
    assert!(
        events.iter().any(|e| e.starts_with("image_deleted")),
        "{events:#?}"
    );
    let filtered = env
        .api
        .get_ok("/api/v1/backups?vm_name=cancelvm&status=cancelled&limit=1")
        .await;
    assert_eq!(filtered.as_array().unwrap().len(), 1, "{filtered}");
    assert_eq!(filtered[0]["backup_id"], id.as_str());
    assert_eq!(
        env.api.get_ok("/api/v1/processes?alive=true").await,
        json!([])
    );
    let (s, v) = env.api.get("/api/v1/backups?status=done").await;
    assert_eq!(s, 422, "{v}");
    // A finished job cannot be cancelled again, and reports are refused.
    let (s, v) = env
        .api
        .post(&format!("/api/v1/backups/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 409, "{v}");
    let (s, v) = env
        .api
        .post(
            &format!("/api/v1/backups/{id}/progress"),
            &json!({"disks": []}),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("cancelled"), "{v}");

    // The VM can be backed up again.
    let (id, _) = env.backup("cancelvm", "full").await;
    env.cancel_and_check(&id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_qemu_nbd_fails_the_job_naming_it() {
    let env = Env::start();
    env.vm_with_sources("killvm", &[2000, 2001]).await;
    let (id, b) = env.backup("killvm", "full").await;
    let killed_at = Instant::now();
    let victim = kill_qemu_nbd(&b, 2001);
    let done = env.api.wait_status(&id, &["failed"], JOB_LIMIT).await;
    eprintln!("job failed {:?} after the kill", killed_at.elapsed());
    let msg = done["error_message"].as_str().unwrap_or_default();
    assert!(msg.contains(&format!("pid {victim}")), "{msg}");
    assert!(msg.contains("SIGKILL") || msg.contains("signal"), "{msg}");
    let d = disk(&done, 2001);
    assert_eq!(d["status"], "failed", "{d}");
    assert!(
        d["error_message"]
            .as_str()
            .unwrap_or_default()
            .contains("qemu-nbd"),
        "{d}"
    );
    env.assert_nothing_held(&done).await;
    for p in image_paths(&done) {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    let events = env.api.event_lines(&id).await;
    assert!(
        events.iter().any(|e| e.starts_with("qemu_nbd_died")),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn more_disks_than_ports_is_refused_with_503() {
    let ports = sendense_tests::net::free_port_range(2);
    let env = Env::start_with(|o| o.nbd_ports = Some(ports));
    env.register_vm("bigvm", &[2000, 2001, 2002]).await;
    let (s, v) = env.start_backup("bigvm", "full").await;
    assert_eq!(s, 503, "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("{}-{}", ports.0, ports.1)),
        "range named: {detail}"
    );
    assert!(detail.contains("3 disks"), "count named: {detail}");
    let list = env.api.get_ok("/api/v1/backups").await;
    let b = &list[0];
    assert_eq!(b["status"], "failed", "{b}");
    env.assert_nothing_held(b).await;
    assert!(
        env.api
            .get_ok("/api/v1/processes")
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );
    for p in image_paths(b) {
        assert!(
            !p.exists(),
            "{} created although the job was refused",
            p.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_squatted_port_is_skipped_and_reported() {
    let ports = sendense_tests::net::free_port_range(2);
    let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, ports.0)).expect("squat the port");
    let env = Env::start_with(|o| o.nbd_ports = Some(ports));
    // Two disks, one usable port: refused, naming the squatted port.
    env.register_vm("twodisks", &[2000, 2001]).await;
    let (s, v) = env.start_backup("twodisks", "full").await;
    assert_eq!(s, 503, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains(&ports.0.to_string()),
        "{v}"
    );
    let view = env.api.get_ok("/api/v1/ports").await;
    assert_eq!(view["allocations"], json!([]), "{view}");
    assert!(
        view["squatted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == ports.0),
        "{view}"
    );
    // One disk: gets the free port, not the squatted one.
    let srcs = env.vm_with_sources("onedisk", &[2000]).await;
    let (id, b) = env.backup("onedisk", "full").await;
    assert_eq!(disk(&b, 2000)["nbd_port"], ports.1, "{b}");
    disks::nbdcopy_into(&srcs[0], &targets(&b)[0].1);
    env.complete_ok(
        &id,
        &json!({"status": "completed", "disks": [{"disk_key": 2000, "status": "completed"}]}),
    )
    .await;
    // A writer retrying its completion, or a progress report overtaken by it, is not an error.
    let (s, v) = env
        .api
        .post(
            &format!("/api/v1/backups/{id}/complete"),
            &json!({"status": "completed", "disks": [{"disk_key": 2000, "status": "completed"}]}),
        )
        .await;
    assert_eq!((s, &v["status"]), (202, &json!("completed")), "{v}");
    let (s, v) = env
        .api
        .post(
            &format!("/api/v1/backups/{id}/progress"),
            &json!({"disks": [{"disk_key": 2000, "bytes_done": 1, "bytes_total": 1, "status": "running"}]}),
        )
        .await;
    assert_eq!((s, &v["status"]), (200, &json!("completed")), "{v}");
    assert_eq!(disk(&v, 2000)["status"], "completed", "{v}");
    drop(squatter);
}

/// A PATH directory whose `qemu-nbd`, on its first run only, has a listener bound on the port it
/// was given (a python process, its PID in `squatter.pid`) before it runs the real qemu-nbd. It
/// stands in for a fault that cannot be made on cue: a foreign process binding an export's port
/// between the allocator's bind test and qemu-nbd's own bind. The real qemu-nbd then fails on the
/// real bind.
struct PortThief {
    dir: tempfile::TempDir,
    path_env: (String, String),
}

/// A PATH directory whose `qemu-nbd` runs the shell `prelude` (with the arguments as `$@`
/// and the directory as `$here`), then the real qemu-nbd; and the `PATH` a hub gets to use it.
fn wrap_qemu_nbd(prelude: &str) -> (tempfile::TempDir, (String, String)) {
    let dir = tempfile::tempdir().expect("temp dir");
    let real = sendense_tests::which("qemu-nbd").expect("qemu-nbd installed");
    let script = format!(
        "#!/bin/bash\nset -eu\nhere=$(dirname \"$0\")\n{prelude}\nexec {} \"$@\"\n",
        real.display()
    );
    let path = dir.path().join("qemu-nbd");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let env = (
        "PATH".to_string(),
        format!(
            "{}:{}",
            dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    (dir, env)
}

impl PortThief {
    fn new() -> PortThief {
        let (dir, path_env) = wrap_qemu_nbd(
            r#"if [ ! -e "$here/squatter.pid" ]; then
  for a in "$@"; do case $a in --port=*) port=${a#--port=};; esac; done
  python3 -c '
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
open(sys.argv[2], "w").write("bound")
time.sleep(120)' "$port" "$here/squatting" &
  echo $! > "$here/squatter.pid"
  for _ in $(seq 200); do [ -e "$here/squatting" ] && break; sleep 0.05; done
  echo "$port" > "$here/squatted-port"
fi"#,
        );
        PortThief { dir, path_env }
    }

    fn squatted_port(&self) -> u16 {
        let s = std::fs::read_to_string(self.dir.path().join("squatted-port"))
            .expect("the wrapper ran and squatted a port");
        s.trim().parse().unwrap()
    }
}

impl Drop for PortThief {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("squatter.pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_taken_after_its_bind_test_moves_the_disk_to_another_port() {
    let thief = PortThief::new();
    let env = Env::start_with(|o| {
        o.nbd_ports = Some(sendense_tests::net::free_port_range(4));
        o.env.push(thief.path_env.clone());
    });
    let srcs = env.vm_with_sources("movevm", &[2000]).await;
    let (id, b) = env.backup("movevm", "full").await;
    let taken = thief.squatted_port();
    let port = disk(&b, 2000)["nbd_port"].as_u64().unwrap() as u16;
    assert_ne!(port, taken, "{b}");
    let (_, uri) = &targets(&b)[0];
    assert!(
        uri.contains(&format!(":{port}/")),
        "target on the new port: {uri}"
    );
    let events = env.api.event_lines(&id).await;
    assert!(
        events.iter().any(|e| e.starts_with("port_taken:")
            && e.contains(&format!("port {taken} was bound by another process"))
            && e.contains(&format!("moved to port {port}"))),
        "{events:#?}"
    );
    let view = env.api.get_ok("/api/v1/ports").await;
    let held: Vec<u64> = view["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["port"].as_u64().unwrap())
        .collect();
    assert_eq!(
        held,
        vec![u64::from(port)],
        "only the new port is held: {view}"
    );
    assert!(
        view["squatted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == taken),
        "the taken port is reported: {view}"
    );
    disks::nbdcopy_into(&srcs[0], uri);
    let done = env
        .complete_ok(
            &id,
            &json!({"status": "completed", "disks": [{"disk_key": 2000, "status": "completed"}]}),
        )
        .await;
    env.assert_nothing_held(&done).await;
    assert!(
        disks::images_equal(&srcs[0], &image_paths(&done)[0]),
        "the image on the moved port holds the source's bytes"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_repository_is_refused_before_anything_is_held() {
    let fs = sendense_tests::tmpfs::Tmpfs::mount("8m").expect("tmpfs (tests run as root)");
    // The volume is a repository root of the hub's: repositories live only under those.
    let root = fs.path().display().to_string();
    let env = Env::start_with(|o| o.extra_args.extend(["--repository-root".into(), root]));
    let (s, r) = env
        .api
        .post(
            "/api/v1/repositories",
            &json!({"id": "small", "path": fs.path().join("repo").display().to_string()}),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    assert!(r["total_bytes"].as_u64().unwrap() <= 8 * MIB, "{r}");
    env.register_vm("fatvm", &[2000, 2001]).await;
    let (s, v) = env
        .api
        .post(
            "/api/v1/backups",
            &json!({"vm_name": "fatvm", "repository_id": "small", "backup_type": "full"}),
        )
        .await;
    assert_eq!(s, 507, "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.contains(&(2 * DISK_SIZE).to_string()),
        "needed named: {detail}"
    );
    assert!(detail.contains("free"), "{detail}");
    let list = env.api.get_ok("/api/v1/backups").await;
    assert_eq!(list[0]["status"], "failed", "{list}");
    env.assert_nothing_held(&list[0]).await;
    assert!(
        env.api
            .get_ok("/api/v1/processes")
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );
    // Two small jobs: each fits alone, the second not next to the first's reservation.
    for vm in ["small1", "small2"] {
        let (s, v) = env
            .api
            .post(
                "/api/v1/vms",
                &json!({"vm_name": vm, "node": null, "disks": [
                    {"disk_key": 2000, "unit_number": 0, "size_bytes": 5 * MIB, "label": "a"}]}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    let start = |vm: &'static str| {
        let api = env.api.clone();
        async move {
            api.post(
                "/api/v1/backups",
                &json!({"vm_name": vm, "repository_id": "small", "backup_type": "full"}),
            )
            .await
        }
    };
    let (s, first) = start("small1").await;
    assert_eq!(s, 202, "{first}");
    let (s, v) = start("small2").await;
    assert_eq!(s, 507, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("{} more reserved by running jobs", 5 * MIB)),
        "{v}"
    );
    let id = first["backup_id"].as_str().unwrap();
    env.cancel_and_check(id).await;
    let left: Vec<_> = walk(fs.path());
    assert!(
        left.iter()
            .all(|p| p.extension().is_none_or(|e| e != "qcow2")),
        "{left:?}"
    );
    drop(env);
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_block_fails_verification() {
    let env = Env::start();
    let srcs = env.vm_with_sources("tampervm", &[2000]).await;
    let (id, b) = env.backup("tampervm", "full").await;
    let t = targets(&b);
    disks::nbdcopy_into(&srcs[0], &t[0].1);
    let sums = checksums_of(&srcs[0]);
    // One block changed in the target after the writer computed its checksums.
    sendense_tests::run(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        &format!("write -P 0xee {} 4096", 5 * MIB + 8192),
        &t[0].1,
    ]));
    let (s, v) = env
        .api
        .post(
            &format!("/api/v1/backups/{id}/complete"),
            &json!({"status": "completed", "disks": [{"disk_key": 2000, "status": "completed", "checksums": sums}]}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let done = env
        .api
        .wait_status(&id, &["completed", "failed"], JOB_LIMIT)
        .await;
    assert_eq!(done["status"], "failed", "{done}");
    let msg = done["error_message"].as_str().unwrap();
    assert!(
        msg.contains("checksum mismatch at 4194304+4194304"),
        "{msg}"
    );
    let ver = env
        .api
        .get_ok(&format!("/api/v1/backups/{id}/verification"))
        .await;
    assert_eq!(ver[0]["checksum_status"], "failed", "{ver}");
    assert_eq!(ver[0]["checksum_mismatches"], 1, "{ver}");
    env.assert_nothing_held(&done).await;
    for p in image_paths(&done) {
        assert!(
            !p.exists(),
            "a failed verification must not leave a restore point: {}",
            p.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_killed_mid_job_is_reconciled_at_restart() {
    let mut env = Env::start();
    let srcs = env.vm_with_sources("crashvm", &[2000, 2001]).await;
    let (id, b) = env.backup("crashvm", "full").await;
    disks::nbdcopy_into(&srcs[0], &targets(&b)[0].1);
    let pids: Vec<u32> = b["disk_results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["qemu_nbd_pid"].as_u64().unwrap() as u32)
        .collect();
    env.hub.kill9();
    // The qemu-nbd children outlive the crash (own process groups): orphans now.
    for p in &pids {
        assert!(
            sendense_tests::pid_alive(*p),
            "qemu-nbd {p} died with the hub"
        );
    }
    env.start_again();
    let after = env.api.get_ok(&format!("/api/v1/backups/{id}")).await;
    assert_eq!(after["status"], "failed", "{after}");
    assert!(
        after["error_message"]
            .as_str()
            .unwrap()
            .contains("hub restarted during the job"),
        "{after}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| sendense_tests::pid_alive(*p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.assert_nothing_held(&after).await;
    for p in image_paths(&after) {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    let events = env.api.event_lines(&id).await;
    let recon: Vec<&String> = events
        .iter()
        .filter(|e| e.starts_with("reconciler_"))
        .collect();
    for pid in &pids {
        assert!(
            recon
                .iter()
                .any(|e| e.contains(&format!("pid {pid}")) && e.contains("stopped")),
            "no reconciler event for qemu-nbd {pid}: {recon:#?}"
        );
    }
    assert!(
        recon.iter().any(|e| e.starts_with("reconciler_ports")),
        "{recon:#?}"
    );
    assert!(
        recon.iter().any(|e| e.starts_with("reconciler_job")),
        "{recon:#?}"
    );
    assert!(env.hub.stderr().contains("start-up reconciliation done"));

    // The VM backs up fine afterwards.
    let (id, _) = env.backup("crashvm", "full").await;
    env.cancel_and_check(&id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_every_qemu_nbd() {
    let mut env = Env::start();
    env.vm_with_sources("termvm", &[2000, 2001]).await;
    let (id, b) = env.backup("termvm", "full").await;
    let pids: Vec<u32> = b["disk_results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["qemu_nbd_pid"].as_u64().unwrap() as u32)
        .collect();
    let status = env.hub.stop().expect("hub exit status");
    assert!(status.success(), "hub exit: {status}\n{}", env.hub.stderr());
    for p in &pids {
        assert!(
            !sendense_tests::pid_alive(*p),
            "qemu-nbd {p} survived SIGTERM of the hub"
        );
    }
    env.start_again();
    let after = env.api.get_ok(&format!("/api/v1/backups/{id}")).await;
    assert_eq!(after["status"], "failed", "{after}");
    assert!(
        after["error_message"].as_str().unwrap().contains("SIGTERM"),
        "{after}"
    );
    env.assert_nothing_held(&after).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_node_fails_the_job_naming_it() {
    let env = Env::start();
    // A port that was free a moment ago: nothing answers there.
    let (port, _) = sendense_tests::net::free_port_range(1);
    let (s, n) = env
        .api
        .post(
            "/api/v1/nodes",
            &json!({"name": "node1", "api_url": format!("http://127.0.0.1:{port}"), "version": "test"}),
        )
        .await;
    assert_eq!(s, 201, "{n}");
    let (s, nodes) = env.api.get("/api/v1/nodes").await;
    assert_eq!(s, 200);
    assert_eq!(nodes[0]["name"], "node1", "{nodes}");
    let (s, v) = env
        .api
        .post(
            "/api/v1/vms",
            &json!({"vm_name": "nodevm", "node": "node1", "disks": [
                {"disk_key": 2000, "unit_number": 0, "size_bytes": DISK_SIZE, "label": "a"}]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (id, _) = env.backup("nodevm", "full").await;
    let done = env.api.wait_status(&id, &["failed"], JOB_LIMIT).await;
    let msg = done["error_message"].as_str().unwrap();
    assert!(msg.contains("node node1 unreachable"), "{msg}");
    assert!(
        msg.contains(&format!("127.0.0.1:{port}/api/v1/backup/start")),
        "{msg}"
    );
    env.assert_nothing_held(&done).await;
    let events = env.api.event_lines(&id).await;
    assert!(
        events.iter().any(|e| e.starts_with("node_start:")),
        "{events:#?}"
    );
    let (s, t) = env.api.get("/api/v1/tunnel").await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t[0]["node"], "node1", "{t}");
    assert_eq!(t[0]["live"], false, "{t}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_qemu_nbd_that_cannot_start_fails_the_job_and_unwinds() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("hub.toml");
    // Through the config file: a qemu-nbd binary that does not exist.
    std::fs::write(
        &cfg,
        "log_level = \"debug\"\n[qemu_nbd]\nbinary = \"/nonexistent/qemu-nbd\"\n",
    )
    .unwrap();
    let env = Env::start_with(|o| {
        o.extra_args
            .extend(["--config".into(), cfg.display().to_string()]);
    });
    env.register_vm("nostart", &[2000, 2001]).await;
    let (s, v) = env.start_backup("nostart", "full").await;
    assert_eq!(s, 500, "{v}");
    assert_eq!(v["error"], "job_failed", "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains(" failed while "),
        "{v}"
    );
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/qemu-nbd"),
        "{v}"
    );
    let list = env.api.get_ok("/api/v1/backups").await;
    let b = &list[0];
    assert_eq!(b["status"], "failed", "{b}");
    for k in [2000, 2001] {
        let d = disk(b, k);
        assert!(
            d["error_message"]
                .as_str()
                .unwrap_or_default()
                .contains("qemu-nbd"),
            "{d}"
        );
    }
    env.assert_nothing_held(b).await;
    for p in image_paths(b) {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_while_preparing_unwinds_and_answers_the_start() {
    let env = Env::start_with(|o| o.nbd_ports = Some(sendense_tests::net::free_port_range(12)));
    let keys: Vec<i64> = (2000..2012).collect();
    env.register_vm("prepvm", &keys).await;
    let api = env.api.clone();
    let start = tokio::spawn(async move {
        api.post(
            "/api/v1/backups",
            &json!({"vm_name": "prepvm", "repository_id": "default", "backup_type": "full"}),
        )
        .await
    });
    // Catch the job while it prepares its 12 exports, and cancel it.
    let mut cancelled_in = None;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        let list = env.api.get_ok("/api/v1/backups").await;
        if let Some(b) = list.as_array().unwrap().first() {
            let status = b["status"].as_str().unwrap().to_string();
            let id = b["backup_id"].as_str().unwrap().to_string();
            let (s, c) = env
                .api
                .post(&format!("/api/v1/backups/{id}/cancel"), &json!({}))
                .await;
            assert_eq!(s, 202, "{c}");
            cancelled_in = Some((id, status));
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (id, status) = cancelled_in.expect("the job appeared in the list");
    let (s, v) = start.await.unwrap();
    eprintln!("cancel sent while {status}; start answered {s}: {v}");
    if status == "pending" || status == "preparing" {
        assert_eq!(s, 409, "{v}");
        assert!(v["detail"].as_str().unwrap().contains("cancelled"), "{v}");
    }
    let done = env.api.wait_status(&id, &["cancelled"], JOB_LIMIT).await;
    env.assert_nothing_held(&done).await;
    for p in image_paths(&done) {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_while_finalizing_unwinds() {
    // The read-back's read-only qemu-nbd starts 3 s late, so the cancel below surely lands
    // while the job is finalizing (on a loaded machine the read itself can end first).
    let (_wrapper, path) = wrap_qemu_nbd(r#"case " $* " in *" --read-only "*) sleep 3;; esac"#);
    let env = Env::start_with(|o| o.env.push(path));
    let srcs = env.vm_with_sources("finvm", &[2000]).await;
    let (id, b) = env.backup("finvm", "full").await;
    disks::nbdcopy_into(&srcs[0], &targets(&b)[0].1);
    // Many small ranges make the read-back long enough to be caught in the middle.
    let raw = disks::read_raw(&srcs[0]);
    let ranges: Vec<Value> = raw
        .chunks(4096)
        .enumerate()
        .map(|(i, c)| json!({"offset": i * 4096, "length": 4096, "blake3": blake3::hash(c).to_hex().to_string()}))
        .collect();
    let (s, v) = env
        .api
        .post(
            &format!("/api/v1/backups/{id}/complete"),
            &json!({"status": "completed", "disks": [{"disk_key": 2000, "status": "completed",
                "checksums": {"chunk_size": 4096, "ranges": ranges}}]}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["status"], "finalizing", "{v}");
    let (s, c) = env
        .api
        .post(&format!("/api/v1/backups/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 202, "{c}");
    let done = env
        .api
        .wait_status(&id, &["cancelled", "completed"], JOB_LIMIT)
        .await;
    assert_eq!(done["status"], "cancelled", "{done}");
    env.assert_nothing_held(&done).await;
    for p in image_paths(&done) {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    let events = env.api.event_lines(&id).await;
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("verification_cancelled")),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_qemu_nbd_stays_the_cause_when_the_writer_reports_first() {
    let env = Env::start();
    env.vm_with_sources("racevm", &[2000, 2001]).await;
    let (id, b) = env.backup("racevm", "full").await;
    let victim = kill_qemu_nbd(&b, 2000);
    // The writer sees its connection drop and reports at once, racing the hub's own watcher.
    let (s, v) = env
        .api
        .post(
            &format!("/api/v1/backups/{id}/complete"),
            &json!({"status": "failed", "error_message": "disk 2000: NBD connection closed",
                "disks": [
                    {"disk_key": 2000, "status": "failed", "error_message": "NBD connection closed"},
                    {"disk_key": 2001, "status": "failed", "error_message": "stopped because disk 2000 failed"}]}),
        )
        .await;
    assert!(s == 202 || s == 409, "{s} {v}");
    let done = env.api.wait_status(&id, &["failed"], JOB_LIMIT).await;
    let msg = done["error_message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("pid {victim}")) && msg.contains("exited unexpectedly"),
        "{msg}"
    );
    let d = disk(&done, 2000)["error_message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(d.contains("exited unexpectedly"), "{d}");
    env.assert_nothing_held(&done).await;
}
