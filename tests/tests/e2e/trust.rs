//! Trust (issue 14): identities and scopes, repository roots, secret files, restores that
//! cannot destroy. The real `sendense-hub` (its `node enroll|rotate|revoke` commands too) and
//! `sendense-node` binaries; the job and restore scopes on a real backup and restore of a QEMU
//! VM.

use super::sys::{Sys, SysOptions, hub_bin, node_bin, terminal};
use sendense_tests::hub::{Api, HubOptions, HubProcess};
use sendense_tests::nbd::QemuNbd;
use sendense_tests::node::{NodeOptions, NodeProcess};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// `403 forbidden` whose detail names `scope`.
fn assert_forbidden(what: &str, (s, v): (u16, Value), scope: &str) {
    assert_eq!(s, 403, "{what}: {v}");
    assert_eq!(v["error"], "forbidden", "{what}: {v}");
    let detail = v["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with(&format!("scope {scope}: ")),
        "{what}: the detail names the scope {scope}: {v}"
    );
}

fn registration(name: &str) -> Value {
    // Nothing listens on port 9: the hub's inventory pull fails in the background, logged.
    json!({"name": name, "api_url": "http://127.0.0.1:9", "version": "test"})
}

fn vm(name: &str, node: &str, size: u64) -> Value {
    json!({"vm_name": name, "node": node,
           "disks": [{"disk_key": 2000, "unit_number": 0, "size_bytes": size, "label": "d"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_credentials_are_scoped_revoked_at_once_and_rotated_without_a_gap() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&hub_bin(), HubOptions::new(tmp.path().join("hub"))).unwrap();
    let admin = hub.api();

    // Enrollment prints the credential alone; the hub keeps only its hash.
    let (ok, out, err) = hub.node_command(&["enroll", "na"]).unwrap();
    assert!(ok, "{err}");
    let secret = out.trim();
    assert_eq!(secret.len(), 64, "{out}");
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()), "{out}");
    for f in ["hub.db", "hub.db-wal"] {
        let bytes = std::fs::read(hub.opts.data_dir.join(f)).unwrap_or_default();
        assert!(
            !bytes.windows(64).any(|w| w == secret.as_bytes()),
            "{f} holds the secret itself"
        );
    }
    let (ok, _, err) = hub.node_command(&["enroll", "na"]).unwrap();
    assert!(
        !ok && err.contains("already holds a valid credential"),
        "{err}"
    );
    let na = Api {
        token: Some(secret.to_string()),
        ..admin.clone()
    };
    let nb = hub.node_api("nb").unwrap();

    // Each node registers as itself only.
    let (s, v) = na.post("/api/v1/nodes", &registration("na")).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = nb.post("/api/v1/nodes", &registration("nb")).await;
    assert_eq!(s, 201, "{v}");
    assert_forbidden(
        "registering as another node",
        na.post("/api/v1/nodes", &registration("nb")).await,
        "node:na",
    );

    // Two nodes with a `web01`: two VMs, never a takeover. The first keeps the name; the
    // second's is `web01.nb` on the hub, and `web01` to its own node.
    let (s, v) = na.post("/api/v1/vms", &vm("web01", "na", MIB)).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = nb.post("/api/v1/vms", &vm("web01", "nb", 2 * MIB)).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["vm_name"], "web01.nb", "{v}");
    assert_eq!(v["node_vm_name"], "web01", "{v}");
    // Registered again (the next inventory): the same VM, not a third.
    let (s, v) = nb.post("/api/v1/vms", &vm("web01", "nb", 2 * MIB)).await;
    assert_eq!((s, &v["vm_name"]), (201, &json!("web01.nb")), "{v}");
    let web01 = admin.get_ok("/api/v1/vms/web01").await;
    assert_eq!(web01["node"], "na", "{web01}");
    assert_eq!(web01["disks"][0]["size_bytes"], MIB, "{web01}");
    let theirs = admin.get_ok("/api/v1/vms/web01.nb").await;
    assert_eq!(theirs["node"], "nb", "{theirs}");
    assert_eq!(theirs["disks"][0]["size_bytes"], 2 * MIB, "{theirs}");
    let listed = admin.get_ok("/api/v1/vms").await;
    let named: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["vm_name"].as_str())
        .filter(|n| n.starts_with("web01"))
        .collect();
    assert_eq!(named, ["web01", "web01.nb"], "{listed}");
    // Each node reads its own `web01`.
    let (s, v) = na.get("/api/v1/vms/web01").await;
    assert_eq!((s, &v["node"]), (200, &json!("na")), "{v}");
    let (s, v) = nb.get("/api/v1/vms/web01").await;
    assert_eq!((s, &v["vm_name"]), (200, &json!("web01.nb")), "{v}");
    assert_forbidden(
        "a VM for another node",
        nb.post("/api/v1/vms", &vm("web02", "na", MIB)).await,
        "node:nb",
    );

    // Another node's VM: not readable, not backed up.
    let (s, v) = na.post("/api/v1/vms", &vm("db01", "na", MIB)).await;
    assert_eq!(s, 201, "{v}");
    assert_forbidden(
        "another node's VM",
        nb.get("/api/v1/vms/db01").await,
        "node:nb",
    );
    assert_forbidden(
        "another node's VM by its hub name",
        na.get("/api/v1/vms/web01.nb").await,
        "node:na",
    );
    assert_forbidden(
        "a backup of another node's VM",
        nb.post(
            "/api/v1/backups",
            &json!({"vm_name": "db01", "repository_id": "default", "backup_type": "full"}),
        )
        .await,
        "node:nb",
    );

    // What only the admin does.
    let repo = hub.opts.data_dir.join("r2").display().to_string();
    assert_forbidden(
        "repository registration",
        na.post("/api/v1/repositories", &json!({"id": "r2", "path": repo}))
            .await,
        "admin",
    );
    for path in [
        "/api/v1/vms",
        "/api/v1/repositories",
        "/api/v1/ports",
        "/api/v1/nodes",
    ] {
        assert_forbidden(path, na.get(path).await, "admin");
    }
    let (s, v) = admin
        .post("/api/v1/repositories", &json!({"id": "r2", "path": repo}))
        .await;
    assert_eq!(s, 201, "{v}");

    // Revoked: refused from the next request on.
    let (ok, _, err) = hub.node_command(&["revoke", "nb"]).unwrap();
    assert!(ok, "{err}");
    let (s, v) = nb.get("/api/v1/nodes/nb").await;
    assert_eq!(s, 401, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("revoked"), "{v}");

    // Rotation: the old credential works until the node uses the new one, then not at all.
    let (ok, out, err) = hub.node_command(&["rotate", "na"]).unwrap();
    assert!(ok, "{err}");
    let na2 = Api {
        token: Some(out.trim().to_string()),
        ..admin.clone()
    };
    assert_eq!(
        na.get("/api/v1/nodes/na").await.0,
        200,
        "old, before the switch"
    );
    assert_eq!(na2.get("/api/v1/nodes/na").await.0, 200, "new");
    let (s, v) = na.get("/api/v1/nodes/na").await;
    assert_eq!(s, 401, "old, after the node used the new one: {v}");
    assert_eq!(na2.get("/api/v1/nodes/na").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repositories_only_under_the_roots_and_never_the_hubs_own_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&hub_bin(), HubOptions::new(tmp.path().join("hub"))).unwrap();
    let data = hub.opts.data_dir.display().to_string();
    for (path, words) in [
        ("/etc".to_string(), "not under a repository root"),
        (data.clone(), "the hub's data directory"),
        (format!("{data}/logs"), "log directory"),
    ] {
        let (s, v) = hub
            .api()
            .post("/api/v1/repositories", &json!({"id": "bad", "path": path}))
            .await;
        assert_eq!(s, 422, "{path}: {v}");
        let detail = v["detail"].as_str().unwrap();
        assert!(detail.starts_with("path: "), "names the field: {v}");
        assert!(detail.contains(words), "{path}: names the rule: {v}");
    }
    assert!(
        !Path::new("/etc/bad").exists(),
        "nothing is created for a refused path"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_files_others_may_read_are_refused_by_both_agents_naming_file_and_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = tmp.path().join("hub");
    let runs = [
        Command::new(hub_bin())
            .arg("--data-dir")
            .arg(&data)
            .arg("--token-file")
            .arg(&token)
            .args(["--listen", "127.0.0.1:0"])
            .env_remove("SENDENSE_HUB_CONFIG")
            .output()
            .unwrap(),
        Command::new(node_bin())
            .args(["--name", "n1", "--listen", "127.0.0.1:0"])
            .arg("--token-file")
            .arg(&token)
            .output()
            .unwrap(),
    ];
    for out in runs {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(&token.display().to_string()), "{err}");
        assert!(err.contains("0644"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }
    assert_eq!(std::fs::read_to_string(&token).unwrap(), "s3cret\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_nodes_credential_cannot_touch_a_nodes_jobs_or_restores() {
    let sys = Sys::start("e2etrust", SysOptions::default()).await;
    let node = sys.node.opts.name.clone();
    // The real node registered, pushed its inventory and copied with its own credential (the
    // hub called it with that credential too): the backup completes.
    let b = sys.backup_completes("full").await;
    let bid = b["backup_id"].as_str().unwrap().to_string();
    let (r, restored) = sys.restore(&bid, 2000, "restored.qcow2").await;
    assert_eq!(r["status"], "completed", "{r}");
    let rid = r["restore_id"].as_str().unwrap().to_string();

    let other = sys.hub.node_api("node-other").unwrap();
    let scope = "node:node-other";
    let progress = json!({"disks": []});
    for (what, answer) in [
        (
            "GET backup",
            other.get(&format!("/api/v1/backups/{bid}")).await,
        ),
        (
            "backup progress",
            other
                .post(&format!("/api/v1/backups/{bid}/progress"), &progress)
                .await,
        ),
        (
            "backup completion",
            other
                .post(
                    &format!("/api/v1/backups/{bid}/complete"),
                    &json!({"status": "failed", "error_message": "x", "disks": []}),
                )
                .await,
        ),
        (
            "backup cancel",
            other
                .post(&format!("/api/v1/backups/{bid}/cancel"), &json!({}))
                .await,
        ),
        (
            "GET restore",
            other.get(&format!("/api/v1/restores/{rid}")).await,
        ),
        (
            "restore progress",
            other
                .post(
                    &format!("/api/v1/restores/{rid}/progress"),
                    &json!({"bytes_done": 1, "bytes_total": 2}),
                )
                .await,
        ),
        (
            "restore completion",
            other
                .post(
                    &format!("/api/v1/restores/{rid}/complete"),
                    &json!({"status": "failed", "bytes_written": 0, "verified_ranges": 0}),
                )
                .await,
        ),
        (
            "a restore onto another node",
            other
                .post(
                    "/api/v1/restores",
                    &json!({"backup_id": bid, "disk_key": 2000,
                            "target": {"node": node, "path": "/tmp/x.qcow2"}}),
                )
                .await,
        ),
        (
            "another node's backup restored onto itself",
            other
                .post(
                    "/api/v1/restores",
                    &json!({"backup_id": bid, "disk_key": 2000,
                            "target": {"node": "node-other", "path": "/tmp/x.qcow2"}}),
                )
                .await,
        ),
    ] {
        assert_forbidden(what, answer, scope);
    }
    // Nothing of that changed the jobs.
    let b2 = sys.api.get_ok(&format!("/api/v1/backups/{bid}")).await;
    assert_eq!(b2["status"], "completed", "{b2}");
    let r2 = sys.api.get_ok(&format!("/api/v1/restores/{rid}")).await;
    assert_eq!(r2["status"], "completed", "{r2}");

    // A restore onto an existing file is refused and the file is left as it was.
    let before = std::fs::read(&restored).unwrap();
    let (s, r) = sys
        .api
        .post(
            "/api/v1/restores",
            &json!({"backup_id": bid, "disk_key": 2000,
                    "target": {"node": node, "path": restored.display().to_string()}}),
        )
        .await;
    if s == 202 {
        let rid = r["restore_id"].as_str().unwrap();
        let t = Instant::now();
        let end = loop {
            let r = sys.api.get_ok(&format!("/api/v1/restores/{rid}")).await;
            if terminal(&r) {
                break r;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "{r}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(end["status"], "failed", "{end}");
    } else {
        assert!((400..500).contains(&s), "{s}: {r}");
        assert!(r["detail"].as_str().unwrap().contains("exists"), "{r}");
    }
    assert_eq!(
        std::fs::read(&restored).unwrap(),
        before,
        "the file is intact"
    );
}

/// A 64 MiB point with 40 MiB of data, served read-only on 127.0.0.1 as export `point`.
async fn source(dir: &Path) -> QemuNbd {
    let image = dir.join("point.qcow2");
    sendense_tests::disks::create_qcow2(&image, 64 * MIB);
    sendense_tests::disks::write_pattern(&image, 0, 40 * MIB, 0x5a);
    QemuNbd::builder(&image, "point")
        .read_only()
        .tcp_on("127.0.0.1", sendense_tests::net::free_port())
        .start_async()
        .await
}

fn restore_start(id: &str, src: &QemuNbd, path: &Path) -> Value {
    json!({
        "restore_id": id,
        "source": src.uri(),
        "source_export": {"host": "127.0.0.1", "port": src.port(), "export": "point"},
        "path": path,
        "size_bytes": 64 * MIB,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_removes_only_the_file_it_created() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(tmp.path()).await;
    // Throttled (4 MiB/s: about 10 s for the data), so the test acts mid-copy.
    let node = NodeProcess::start(
        &node_bin(),
        NodeOptions {
            env: vec![(
                agent_node::copy::THROTTLE_ENV.to_string(),
                (4 * MIB).to_string(),
            )],
            ..NodeOptions::new(tmp.path().join("node"), "node-r")
        },
    )
    .unwrap();
    let targets = tmp.path().join("targets");
    std::fs::create_dir_all(&targets).unwrap();

    // Onto an existing file: refused, the file untouched.
    let existing = targets.join("existing.qcow2");
    std::fs::write(&existing, b"someone's disk").unwrap();
    let (s, v) = node
        .post("/restore/start", restore_start("r-exists", &src, &existing))
        .await;
    assert!((400..500).contains(&s), "{s}: {v}");
    assert!(v["detail"].as_str().unwrap().contains("exists"), "{v}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"someone's disk");

    // Mid-copy, the target path is replaced by another file; the restore then fails
    // (cancelled) and deletes nothing that is not its own.
    let target = targets.join("restored.qcow2");
    let (s, v) = node
        .post("/restore/start", restore_start("r-swap", &src, &target))
        .await;
    assert_eq!(s, 202, "{v}");
    node.wait_restore("r-swap", 30, |v| v["bytes_written"].as_u64() > Some(0))
        .await;
    let moved = targets.join("moved-away.qcow2");
    std::fs::rename(&target, &moved).unwrap();
    std::fs::write(&target, b"another restore's image").unwrap();
    let (s, v) = node.post("/restore/r-swap/cancel", json!({})).await;
    assert!((200..300).contains(&s), "{s}: {v}");
    let end = node
        .wait_restore("r-swap", 30, |v| {
            v["status"] == "cancelled" || v["status"] == "failed"
        })
        .await;
    assert_ne!(end["status"], "completed", "{end}");
    assert_eq!(
        std::fs::read(&target).unwrap(),
        b"another restore's image",
        "the file now at the path is not the restore's: left alone"
    );
    assert_eq!(std::fs::read(&existing).unwrap(), b"someone's disk");

    // An ordinary failure (cancelled mid-copy) removes the restore's own image.
    let own = targets.join("own.qcow2");
    let (s, v) = node
        .post("/restore/start", restore_start("r-own", &src, &own))
        .await;
    assert_eq!(s, 202, "{v}");
    node.wait_restore("r-own", 30, |v| v["bytes_written"].as_u64() > Some(0))
        .await;
    let (s, v) = node.post("/restore/r-own/cancel", json!({})).await;
    assert!((200..300).contains(&s), "{s}: {v}");
    node.wait_restore("r-own", 30, |v| {
        v["status"] == "cancelled" || v["status"] == "failed"
    })
    .await;
    assert!(!own.exists(), "the restore's own partial image is removed");
    assert!(target.exists() && existing.exists() && moved.exists());
}
