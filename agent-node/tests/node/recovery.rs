//! Instant recoveries through the real node binary: the backup point's disks are raw images of
//! random data served read-only by real qemu-nbd (on unix sockets or TCP, with x509 TLS as the
//! hub serves them when its `nbd_tls` is on), the node starts a real QEMU (TCG, no guest OS:
//! with no bootable disk the VM sits in its firmware, which is all a stream needs) on local
//! overlays and streams every disk home. The hub's side is the recording stand-in
//! ([`HubRecorder`]): it answers the node's progress and completion pushes and keeps them,
//! which is what these tests check; the hub's own handling of them is tested in the hub's
//! suites.

use crate::support::*;
use agent_node::qmp::{QmpClient, QmpLog};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use sendense_shared::api::NbdTls;
use sendense_shared::nbd::tls::SERVER_NAME;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A raw image of `size` random bytes; no boot signature at 510 (the firmware must not try to
/// run random code).
fn point_disk(path: &Path, size: u64) {
    let mut data = vec![0u8; size as usize];
    rand::rng().fill_bytes(&mut data);
    data[510] = 0;
    std::fs::write(path, data).unwrap();
}

/// The hub's NBD CA as the tests make it: the CA's PEM, a server directory for qemu-nbd
/// (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, the server named [`SERVER_NAME`]) and
/// the job's client material.
struct Pki {
    server_dir: PathBuf,
    client: NbdTls,
}

const CLIENT_CN: &str = "sendense-recovery-r1";

fn pki(dir: &Path) -> Pki {
    let params = |cn: &str, sans: Vec<String>| {
        let mut p = CertificateParams::new(sans).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = params("test NBD CA", vec![]);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |cn: &str, server: bool| {
        let key = KeyPair::generate().unwrap();
        let sans = if server {
            vec![SERVER_NAME.to_string()]
        } else {
            vec![]
        };
        let mut p = params(cn, sans);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        (
            p.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let server_dir = dir.join("nbd-tls");
    std::fs::create_dir(&server_dir).unwrap();
    let (cert, key) = leaf(SERVER_NAME, true);
    std::fs::write(server_dir.join("ca-cert.pem"), &ca_pem).unwrap();
    std::fs::write(server_dir.join("server-cert.pem"), cert).unwrap();
    std::fs::write(server_dir.join("server-key.pem"), key).unwrap();
    let (cert_pem, key_pem) = leaf(CLIENT_CN, false);
    Pki {
        server_dir,
        client: NbdTls {
            ca_pem,
            cert_pem,
            key_pem,
        },
    }
}

/// Where a disk's export listens.
#[derive(Clone)]
enum Listen {
    Unix(PathBuf),
    Tcp(u16),
}

/// One disk of the point: its image, its export and how it is served.
struct PointDisk {
    key: i64,
    image: PathBuf,
    size: u64,
    listen: Listen,
    tls: Option<PathBuf>,
    nbd: Option<QemuNbd>,
}

impl PointDisk {
    fn new(dir: &Path, key: i64, size: u64, listen: Listen, tls: Option<&Pki>) -> PointDisk {
        let image = dir.join(format!("point-{key}.raw"));
        point_disk(&image, size);
        let mut d = PointDisk {
            key,
            image,
            size,
            listen,
            tls: tls.map(|p| p.server_dir.clone()),
            nbd: None,
        };
        d.serve();
        d
    }

    fn export_name(&self) -> String {
        format!("src-disk-{}", self.key)
    }

    /// (Re)starts its read-only qemu-nbd, TLS with client certificates when asked (only the
    /// job's CN may connect), on the same socket or port as before.
    fn serve(&mut self) {
        let mut b = QemuNbd::builder(&self.image, &self.export_name())
            .format("raw")
            .read_only();
        b = match &self.listen {
            Listen::Unix(p) => b.unix(p),
            Listen::Tcp(port) => b.tcp_on("127.0.0.1", *port),
        };
        if let Some(dir) = &self.tls {
            b = b.args(&[
                "--object".to_string(),
                format!(
                    "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                    dir.display()
                ),
                "--object".to_string(),
                format!(
                    r#"{{"qom-type":"authz-list","id":"auth0","policy":"deny","rules":[{{"match":"CN={CLIENT_CN}","policy":"allow"}}]}}"#
                ),
                "--tls-creds=tls0".to_string(),
                "--tls-authz=auth0".to_string(),
            ]);
        }
        self.nbd = Some(b.start());
    }

    /// SIGKILL, as a hub whose qemu-nbd died.
    fn kill(&mut self) {
        if let Some(mut n) = self.nbd.take() {
            n.kill();
        }
    }

    /// The disk of the start request.
    fn request(&self, pki: Option<&Pki>) -> Value {
        let mut export = match &self.listen {
            Listen::Unix(p) => json!({"host": "", "port": 10100, "socket": p}),
            Listen::Tcp(port) => json!({"host": "127.0.0.1", "port": port}),
        };
        export["export"] = json!(self.export_name());
        if let Some(p) = pki {
            export["tls"] = serde_json::to_value(&p.client).unwrap();
        }
        json!({"disk_key": self.key, "size_bytes": self.size, "export": export})
    }
}

fn start_body(id: &str, vm: &str, disks: Vec<Value>, speed: u64, overlays: Option<&Path>) -> Value {
    let mut b = json!({
        "recovery_id": id, "vm_name": vm, "memory_mib": 64, "cpus": 1,
        "speed_bps": speed, "disks": disks,
    });
    if let Some(d) = overlays {
        b["overlay_dir"] = json!(d);
    }
    b
}

/// Kills a recovered VM's QEMU by its PID when a test ends (the VM outlives the node by
/// design, so nothing else would), only while it is still that QEMU.
struct VmGuard {
    pid: u32,
    qmp_socket: PathBuf,
}

impl VmGuard {
    fn kill(&self) {
        if agent_node::instant::is_our_qemu(self.pid, &self.qmp_socket) {
            eprintln!("+ kill -KILL {} (recovered VM's QEMU)", self.pid);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the recovery has a QEMU PID; a guard for it.
async fn vm_of(node: &NodeProcess, id: &str) -> (VmGuard, Value) {
    let v = node
        .wait_for(&format!("/recovery/{id}"), 30, |v| v["qemu_pid"].is_u64())
        .await;
    let guard = VmGuard {
        pid: v["qemu_pid"].as_u64().unwrap() as u32,
        qmp_socket: PathBuf::from(v["qmp_socket"].as_str().unwrap()),
    };
    assert!(
        agent_node::instant::is_our_qemu(guard.pid, &guard.qmp_socket),
        "{v}"
    );
    (guard, v)
}

async fn wait_recovery(
    node: &NodeProcess,
    id: &str,
    secs: u64,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    node.wait_for(&format!("/recovery/{id}"), secs, pred).await
}

fn ended(v: &Value) -> bool {
    matches!(
        v["status"].as_str(),
        Some("completed" | "failed" | "cancelled")
    )
}

/// Every byte home on some disk.
fn streamed(v: &Value) -> u64 {
    v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["bytes_done"].as_u64().unwrap())
        .sum()
}

async fn wait_gone(pid: u32, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while sendense_shared::child::pid_alive(pid) {
        assert!(Instant::now() < deadline, "QEMU PID {pid} still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The test's own QMP session with the recovered VM (the node has let go of it).
async fn qmp(socket: &Path) -> QmpClient {
    QmpClient::connect(socket, "test", Arc::new(QmpLog::new(None)))
        .await
        .unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn journal_of(node: &NodeProcess, id: &str) -> PathBuf {
    node.run_dir.join(format!("recovery-{id}.json"))
}

/// Both disks home over TLS (one through a unix socket, one over TCP): progress and the
/// completion reported, no NBD node (nor TLS credential) left in the VM, each overlay equal to
/// its point disk with no backing, the journal and the TLS material gone, and the VM still
/// running after the job and after the node stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_streams_both_disks_home_and_leaves_the_vm_running() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let disks = [
        PointDisk::new(
            dir.path(),
            2000,
            16 * MIB,
            Listen::Unix(dir.path().join("nbd-2000.sock")),
            Some(&pki),
        ),
        PointDisk::new(
            dir.path(),
            2001,
            32 * MIB,
            Listen::Tcp(free_port()),
            Some(&pki),
        ),
    ];
    let hub = HubRecorder::start().await;
    let mut node = start_node(node_opts(dir.path(), None, Some(&hub.url)));
    // 8 MiB/s a disk: about 4 s for the bigger one, a few progress pushes.
    let requested = Instant::now();
    let (code, body) = node
        .post(
            "/recovery/start",
            start_body(
                "r1",
                "vm-rec1",
                disks.iter().map(|d| d.request(Some(&pki))).collect(),
                8 * MIB,
                None,
            ),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["status"], "running");
    let (vm, running) = vm_of(&node, "r1").await;
    eprintln!(
        "recovery: QEMU running {:?} after the request",
        requested.elapsed()
    );
    // The overlays are in the node's recovery directory (0700), each 0600; the job's TLS
    // material in the recovery's private run directory.
    let recoveries = node.run_dir.join("recoveries");
    assert_eq!(mode(&recoveries), 0o700);
    let overlays: Vec<PathBuf> = disks
        .iter()
        .map(|d| recoveries.join(format!("vm-rec1-disk-{}.qcow2", d.key)))
        .collect();
    for (o, d) in overlays.iter().zip(running["disks"].as_array().unwrap()) {
        assert_eq!(d["overlay"], o.display().to_string());
        assert_eq!(mode(o), 0o600);
    }
    let run = node.run_dir.join("recovery-r1");
    assert_eq!(mode(&run), 0o700);
    let tls = run.join("tls/2000");
    assert_eq!(mode(&tls), 0o700);
    assert_eq!(mode(&tls.join("client-key.pem")), 0o600);
    assert_eq!(
        std::fs::read_to_string(tls.join("client-key.pem")).unwrap(),
        pki.client.key_pem
    );
    assert_eq!(mode(&journal_of(&node, "r1")), 0o600);
    let cmdline = sendense_shared::child::read_cmdline(vm.pid).unwrap();
    assert!(
        !cmdline.iter().any(|a| a == "-S" || a == "-no-reboot"),
        "{cmdline:?}"
    );

    let done = wait_recovery(&node, "r1", 60, ended).await;
    eprintln!(
        "recovery: both disks home {:?} after the request",
        requested.elapsed()
    );
    assert_eq!(done["status"], "completed", "{done}\n{}", node.stderr());
    assert_eq!(done["error_message"], Value::Null);
    for (d, p) in disks.iter().zip(done["disks"].as_array().unwrap()) {
        assert_eq!(p["stream"], "finished", "{done}");
        assert_eq!(
            (p["bytes_done"].as_u64(), p["bytes_total"].as_u64()),
            (Some(d.size), Some(d.size))
        );
    }
    let complete = hub.wait_for("/recoveries/r1/complete", 30).await;
    assert_eq!(complete.len(), 1);
    let c = &complete[0].body;
    assert_eq!(c["status"], "completed", "{c}");
    assert_eq!(c["state"]["qemu_pid"], vm.pid);
    assert_eq!(
        complete[0].auth.as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    let progress = hub.calls_to("/recoveries/r1/progress");
    assert!(progress.len() >= 3, "{progress:?}");
    let mid = progress
        .iter()
        .find(|p| p.body["disks"][1]["stream"] == "running")
        .expect("a progress report while the stream runs");
    assert_eq!(mid.body["vm_state"], "running");
    assert_eq!(mid.body["status"], "running");
    assert!(
        mid.body["disks"][1]["bytes_done"].as_u64() < Some(32 * MIB),
        "{}",
        mid.body
    );
    assert!(
        progress
            .iter()
            .any(|p| p.body["disks"][1]["rate_bps"].as_u64() > Some(0)),
        "{progress:?}"
    );
    assert_eq!(
        mid.body["qmp_socket"],
        run.join("qmp.sock").display().to_string()
    );
    assert_eq!(
        mid.body["serial_log"],
        run.join("serial.log").display().to_string()
    );
    // The final state goes before the completion.
    let calls = hub.calls.lock().unwrap().clone();
    let at = |suffix: &str| {
        calls
            .iter()
            .rposition(|c| c.path.ends_with(suffix))
            .unwrap()
    };
    assert!(at("/recoveries/r1/progress") < at("/recoveries/r1/complete"));
    assert!(
        !journal_of(&node, "r1").exists(),
        "journal kept after the completion"
    );
    assert!(!run.join("tls").exists(), "the TLS material is removed");

    // The node has let go of the VM: QMP shows no NBD node and no TLS credential left.
    let q = qmp(&vm.qmp_socket).await;
    let nodes = q
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let drivers: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["drv"].as_str())
        .collect();
    assert!(!drivers.contains(&"nbd"), "{drivers:?}");
    let objects = q
        .execute("qom-list", json!({"path": "/objects"}))
        .await
        .unwrap();
    assert!(!objects.to_string().contains("tls-"), "{objects}");
    assert_eq!(
        q.execute("query-status", json!({})).await.unwrap()["status"],
        "running"
    );
    // The exports go: the VM runs from its overlays alone.
    for mut d in disks {
        d.kill();
    }
    // Stopped, QEMU has flushed every overlay's metadata, so that another reader sees it all.
    q.execute("stop", json!({})).await.unwrap();
    for (d, o) in [2000, 2001].iter().zip(&overlays) {
        let raw = dir.path().join(format!("point-{d}.raw"));
        let cmp = std::process::Command::new("qemu-img")
            .args(["compare", "-U", "-f", "raw", "-F", "qcow2"])
            .arg(&raw)
            .arg(o)
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "disk {d}: {}{}",
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        );
        let info = sendense_tests::disks::info(o);
        assert!(info.get("backing-filename").is_none(), "{info}");
    }
    q.execute("cont", json!({})).await.unwrap();
    drop(q);

    // The VM outlives the node.
    assert!(node.terminate(Duration::from_secs(15)).await.is_some());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        agent_node::instant::is_our_qemu(vm.pid, &vm.qmp_socket),
        "QEMU {} went with the node",
        vm.pid
    );
    vm.kill();
    wait_gone(vm.pid, 10).await;
}

/// A cancel mid-stream kills the VM and leaves no QEMU, overlay, run file or journal; the
/// reports say what the guest lost. While it runs, its id and its VM name are taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_recovery_leaves_no_vm_no_overlay_and_no_run_files() {
    let dir = tempfile::tempdir().unwrap();
    let overlays = dir.path().join("overlays");
    std::fs::create_dir(&overlays).unwrap();
    let disks = [
        PointDisk::new(dir.path(), 1, 16 * MIB, Listen::Tcp(free_port()), None),
        PointDisk::new(
            dir.path(),
            2,
            16 * MIB,
            Listen::Unix(dir.path().join("nbd-2.sock")),
            None,
        ),
    ];
    let hub = HubRecorder::start().await;
    let node = start_node(node_opts(dir.path(), None, Some(&hub.url)));
    let body = |id: &str, vm: &str| {
        start_body(
            id,
            vm,
            disks.iter().map(|d| d.request(None)).collect(),
            MIB,
            Some(&overlays),
        )
    };
    let (code, answer) = node.post("/recovery/start", body("c1", "vm-c")).await;
    assert_eq!(code, 202, "{answer}");
    let (vm, _) = vm_of(&node, "c1").await;
    wait_recovery(&node, "c1", 30, |v| streamed(v) > 0).await;
    for (id, vm_name, why) in [
        ("c1", "vm-other", "recovery id c1 was already used"),
        ("c2", "vm-c", "VM name \"vm-c\" is used by recovery c1"),
    ] {
        let (code, answer) = node.post("/recovery/start", body(id, vm_name)).await;
        assert_eq!(
            (code, answer["error"].as_str()),
            (409, Some("already_exists")),
            "{answer}"
        );
        assert!(answer["detail"].as_str().unwrap().contains(why), "{answer}");
    }

    let (code, answer) = node.post("/recovery/c1/cancel", json!({})).await;
    assert_eq!(code, 202, "{answer}");
    assert_eq!(answer["status"], "cancelling");
    let done = wait_recovery(&node, "c1", 30, ended).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(streamed(&done) < 32 * MIB, "it was mid-stream: {done}");
    let msg = done["error_message"].as_str().unwrap();
    assert!(msg.starts_with("cancelled: "), "{msg}");
    assert!(msg.contains("what the guest wrote is lost"), "{msg}");
    let complete = hub.wait_for("/recoveries/c1/complete", 30).await;
    assert_eq!(complete[0].body["status"], "cancelled");
    assert_eq!(complete[0].body["error_code"], "cancelled");
    assert_eq!(complete[0].body["error_message"], msg);
    wait_gone(vm.pid, 10).await;
    let left: Vec<_> = std::fs::read_dir(&overlays).unwrap().flatten().collect();
    assert!(left.is_empty(), "overlays left: {left:?}");
    let left: Vec<String> = std::fs::read_dir(&node.run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("recovery-"))
        .collect();
    assert!(left.is_empty(), "run files left: {left:?}");
    let (code, answer) = node.post("/recovery/c1/cancel", json!({})).await;
    assert_eq!(
        (code, answer["error"].as_str()),
        (409, Some("wrong_state")),
        "{answer}"
    );
    // The VM name is free again.
    let (code, answer) = node.post("/recovery/start", body("c3", "vm-c")).await;
    assert_eq!(code, 202, "{answer}");
    let (vm3, _) = vm_of(&node, "c3").await;
    let (code, _) = node.post("/recovery/c3/cancel", json!({})).await;
    assert_eq!(code, 202);
    wait_recovery(&node, "c3", 30, ended).await;
    wait_gone(vm3.pid, 10).await;
}

/// The hub's export dies mid-stream (SIGKILL of its qemu-nbd): the recovery says so in
/// `stalled`, naming the disk, and its stream is paused, not failed; the export restarted on
/// the same socket lets it resume and complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_export_pauses_the_stream_then_it_resumes_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let mut disks = [
        PointDisk::new(dir.path(), 7, 16 * MIB, Listen::Tcp(free_port()), None),
        PointDisk::new(
            dir.path(),
            8,
            32 * MIB,
            Listen::Unix(dir.path().join("nbd-8.sock")),
            None,
        ),
    ];
    let hub = HubRecorder::start().await;
    let node = start_node(node_opts(dir.path(), None, Some(&hub.url)));
    let (code, answer) = node
        .post(
            "/recovery/start",
            start_body(
                "s1",
                "vm-s",
                disks.iter().map(|d| d.request(None)).collect(),
                8 * MIB,
                None,
            ),
        )
        .await;
    assert_eq!(code, 202, "{answer}");
    let (vm, _) = vm_of(&node, "s1").await;
    wait_recovery(&node, "s1", 30, |v| {
        v["disks"][1]["bytes_done"].as_u64() > Some(4 * MIB)
    })
    .await;
    let killed = Instant::now();
    disks[1].kill();
    // QEMU waits for the export's return (reconnect-delay), then the stream pauses.
    let stalled = wait_recovery(&node, "s1", 60, |v| v["stalled"].is_string()).await;
    eprintln!(
        "recovery stalled {:?} after the export died: {stalled}",
        killed.elapsed()
    );
    let words = stalled["stalled"].as_str().unwrap();
    assert!(
        words.starts_with("the hub's export of disk 8 does not answer"),
        "{words}"
    );
    assert!(
        words.contains("what the guest wrote is kept in the overlays"),
        "{words}"
    );
    assert_eq!(stalled["status"], "running");
    assert_eq!(stalled["disks"][1]["stream"], "paused", "{stalled}");
    assert!(
        matches!(stalled["vm_state"].as_str(), Some("running" | "io-error")),
        "{stalled}"
    );
    assert!(stalled["disks"][1]["bytes_done"].as_u64() < Some(32 * MIB));
    assert!(sendense_shared::child::pid_alive(vm.pid));
    // The hub hears it too.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hub
        .calls_to("/recoveries/s1/progress")
        .iter()
        .any(|c| c.body["stalled"] == stalled["stalled"])
    {
        assert!(Instant::now() < deadline, "no stalled progress report");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Soon back: QEMU's reconnect attempts back off (up to 16 s apart) the longer an export
    // is gone.
    disks[1].serve();
    let back = Instant::now();
    wait_recovery(&node, "s1", 60, |v| v["stalled"].is_null()).await;
    eprintln!(
        "recovery resumed {:?} after the export's return",
        back.elapsed()
    );
    let done = wait_recovery(&node, "s1", 90, ended).await;
    assert_eq!(done["status"], "completed", "{done}\n{}", node.stderr());
    assert_eq!(done["stalled"], Value::Null);
    let complete = hub.wait_for("/recoveries/s1/complete", 30).await;
    assert_eq!(complete[0].body["status"], "completed");
    assert!(
        node.stderr().contains("recovery stalled"),
        "{}",
        node.stderr()
    );
    for (d, raw) in [(7, &disks[0].image), (8, &disks[1].image)] {
        let o = node.run_dir.join(format!("recoveries/vm-s-disk-{d}.qcow2"));
        let q = qmp(&vm.qmp_socket).await;
        q.execute("stop", json!({})).await.unwrap();
        let cmp = std::process::Command::new("qemu-img")
            .args(["compare", "-U", "-f", "raw", "-F", "qcow2"])
            .arg(raw)
            .arg(&o)
            .output()
            .unwrap();
        assert!(cmp.status.success(), "disk {d}: {cmp:?}");
        q.execute("cont", json!({})).await.unwrap();
    }
}

/// Bad requests through the binary: each field named in a 422, an existing overlay a 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_recovery_requests_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(node_opts(dir.path(), None, None));
    let disk = json!({"disk_key": 1, "size_bytes": MIB,
        "export": {"host": "127.0.0.1", "port": 10100, "export": "e"}});
    let good = start_body("v1", "vm-v", vec![disk.clone()], MIB, Some(dir.path()));
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, "not a kernel").unwrap();
    for (key, value, field) in [
        ("recovery_id", json!("a/b"), "recovery_id"),
        ("vm_name", json!("_vm"), "vm_name"),
        ("vm_name", json!("v".repeat(64)), "vm_name"),
        ("memory_mib", json!(65537), "memory_mib"),
        ("cpus", json!(65), "cpus"),
        (
            "overlay_dir",
            json!(format!("{}/../x", dir.path().display())),
            "overlay_dir",
        ),
        ("overlay_dir", json!(kernel), "overlay_dir"),
        ("kernel", json!(dir.path()), "kernel"),
        ("initrd", json!(kernel), "initrd"),
        ("disks", json!([]), "disks"),
        (
            "disks",
            json!([{"disk_key": 1, "size_bytes": MIB,
                "export": {"host": "", "port": 1, "export": "e", "socket": "rel.sock"}}]),
            "disks[0].export",
        ),
        (
            "disks",
            json!([disk.clone(), disk.clone()]),
            "disks[1].disk_key",
        ),
    ] {
        let mut body = good.clone();
        body[key] = value;
        let (code, answer) = node.post("/recovery/start", body).await;
        assert_eq!(
            (code, answer["error"].as_str()),
            (422, Some("invalid_field")),
            "{field}: {answer}"
        );
        let detail = answer["detail"].as_str().unwrap();
        assert!(detail.starts_with(field), "{field}: {detail}");
    }
    std::fs::write(dir.path().join("vm-v-disk-1.qcow2"), "someone's disk").unwrap();
    let (code, answer) = node.post("/recovery/start", good).await;
    assert_eq!(
        (code, answer["error"].as_str()),
        (409, Some("already_exists")),
        "{answer}"
    );
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .contains("vm-v-disk-1.qcow2"),
        "{answer}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("vm-v-disk-1.qcow2")).unwrap(),
        "someone's disk"
    );
    let (code, _) = node.get("/recovery/v1").await;
    assert_eq!(code, 404, "a refused start leaves no recovery");

    // Valid, but nothing serves the export: QEMU cannot open the disk, the recovery fails
    // with QEMU's words, and nothing is left.
    let overlays = dir.path().join("o");
    std::fs::create_dir(&overlays).unwrap();
    let dead = json!({"disk_key": 1, "size_bytes": MIB,
        "export": {"host": "127.0.0.1", "port": free_port(), "export": "e"}});
    let (code, answer) = node
        .post(
            "/recovery/start",
            start_body("v2", "vm-v", vec![dead], MIB, Some(&overlays)),
        )
        .await;
    assert_eq!(code, 202, "{answer}");
    let done = wait_recovery(&node, "v2", 60, ended).await;
    assert_eq!(done["status"], "failed", "{done}");
    let msg = done["error_message"].as_str().unwrap();
    assert!(
        msg.starts_with("starting the recovered VM: qemu-system-x86_64 failed"),
        "{msg}"
    );
    assert!(msg.contains("Connection refused"), "{msg}");
    assert!(msg.ends_with("what the guest wrote is lost"), "{msg}");
    assert_eq!(std::fs::read_dir(&overlays).unwrap().count(), 0);
    assert!(!node.run_dir.join("recovery-v2").exists());
    assert!(!journal_of(&node, "v2").exists());
}

/// SIGTERM mid-stream leaves the VM running and the journal in place; the restarted node
/// re-adopts it; SIGKILL of that node mid-stream, and the next one re-adopts it again, and it
/// completes and is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_re_adopts_the_vm_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let disks = [
        PointDisk::new(
            dir.path(),
            1,
            16 * MIB,
            Listen::Unix(dir.path().join("nbd-1.sock")),
            None,
        ),
        PointDisk::new(dir.path(), 2, 24 * MIB, Listen::Tcp(free_port()), None),
    ];
    let hub = HubRecorder::start().await;
    let mut node = start_node(node_opts(dir.path(), None, Some(&hub.url)));
    let (code, answer) = node
        .post(
            "/recovery/start",
            start_body(
                "a1",
                "vm-a",
                disks.iter().map(|d| d.request(None)).collect(),
                // About 8 s for the bigger disk: two node restarts fit in it.
                3 * MIB,
                None,
            ),
        )
        .await;
    assert_eq!(code, 202, "{answer}");
    let (vm, _) = vm_of(&node, "a1").await;
    wait_recovery(&node, "a1", 30, |v| streamed(v) > 2 * MIB).await;

    assert!(
        node.terminate(Duration::from_secs(15)).await.is_some(),
        "node did not exit within 15 s of SIGTERM"
    );
    assert!(
        agent_node::instant::is_our_qemu(vm.pid, &vm.qmp_socket),
        "SIGTERM killed the VM"
    );
    assert!(
        journal_of(&node, "a1").exists(),
        "the journal is kept for the next start"
    );
    assert!(hub.calls_to("/recoveries/a1/complete").is_empty());

    node.restart().unwrap();
    // Re-adopted before the API answers.
    let (code, v) = node.get("/recovery/a1").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "running");
    assert_eq!(v["qemu_pid"], vm.pid);
    assert!(
        node.stderr().contains("re-adopted the recovered VM"),
        "{}",
        node.stderr()
    );
    let before = streamed(&wait_recovery(&node, "a1", 30, |v| v["vm_state"].is_string()).await);
    wait_recovery(&node, "a1", 30, |v| streamed(v) > before + MIB).await;
    let reports = hub.calls_to("/recoveries/a1/progress").len();

    node.kill9();
    assert!(agent_node::instant::is_our_qemu(vm.pid, &vm.qmp_socket));
    node.restart().unwrap();
    let done = wait_recovery(&node, "a1", 60, ended).await;
    assert_eq!(done["status"], "completed", "{done}\n{}", node.stderr());
    let complete = hub.wait_for("/recoveries/a1/complete", 30).await;
    assert_eq!(complete.len(), 1, "{complete:?}");
    assert_eq!(complete[0].body["status"], "completed");
    assert!(hub.calls_to("/recoveries/a1/progress").len() > reports);
    assert!(!journal_of(&node, "a1").exists());
    assert!(
        agent_node::instant::is_our_qemu(vm.pid, &vm.qmp_socket),
        "the VM runs on"
    );
    let q = qmp(&vm.qmp_socket).await;
    let nodes = q
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    assert!(!nodes.to_string().contains("\"nbd\""), "{nodes}");
}

/// A node restarted after its recovered VM's QEMU died: the overlays and run files go, the
/// journal last, and the hub hears `failed` with what was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_cleans_up_a_recovery_whose_qemu_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let disk = PointDisk::new(dir.path(), 1, 16 * MIB, Listen::Tcp(free_port()), None);
    let hub = HubRecorder::start().await;
    let mut node = start_node(node_opts(dir.path(), None, Some(&hub.url)));
    let (code, answer) = node
        .post(
            "/recovery/start",
            start_body("g1", "vm-g", vec![disk.request(None)], MIB, None),
        )
        .await;
    assert_eq!(code, 202, "{answer}");
    let (vm, v) = vm_of(&node, "g1").await;
    let overlay = PathBuf::from(v["disks"][0]["overlay"].as_str().unwrap());
    node.kill9();
    vm.kill();
    wait_gone(vm.pid, 10).await;
    assert!(overlay.exists());
    node.restart().unwrap();
    assert!(!overlay.exists(), "the overlay is removed");
    assert!(!node.run_dir.join("recovery-g1").exists());
    assert!(!journal_of(&node, "g1").exists());
    let (code, v) = node.get("/recovery/g1").await;
    assert_eq!(code, 200);
    assert_eq!(v["status"], "failed");
    let complete = hub.wait_for("/recoveries/g1/complete", 30).await;
    let c = &complete[0].body;
    assert_eq!(c["status"], "failed", "{c}");
    let msg = c["error_message"].as_str().unwrap();
    assert!(
        msg.starts_with("the recovered VM's QEMU was gone when the node restarted"),
        "{msg}"
    );
    assert!(msg.contains("what the guest wrote is lost"), "{msg}");
}

/// A hub that does not answer holds up neither the streams nor the completion on the node; the
/// journal stays until the hub has the result (a restarted node reports it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_does_not_answer_does_not_hold_the_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let disk = PointDisk::new(dir.path(), 1, 16 * MIB, Listen::Tcp(free_port()), None);
    let dead_hub = format!("http://127.0.0.1:{}", free_port());
    let node = start_node(node_opts(dir.path(), None, Some(&dead_hub)));
    let (code, answer) = node
        .post(
            "/recovery/start",
            start_body("h1", "vm-h", vec![disk.request(None)], 16 * MIB, None),
        )
        .await;
    assert_eq!(code, 202, "{answer}");
    let (vm, _) = vm_of(&node, "h1").await;
    let done = wait_recovery(&node, "h1", 60, ended).await;
    assert_eq!(done["status"], "completed", "{done}\n{}", node.stderr());
    assert!(
        journal_of(&node, "h1").exists(),
        "kept until the hub has the result"
    );
    assert!(agent_node::instant::is_our_qemu(vm.pid, &vm.qmp_socket));
}
