//! The QEMU driver's guest freeze without a guest OS (the real guest is in the e2e tests):
//! what a VM without an agent, with a silent agent, and with a required freeze gets, and
//! start-up recovery thawing a guest a crashed node left frozen.

use crate::support::*;
use agent_node::qmp::QmpLog;
use agent_node::source::qemu::QemuDriver;
use agent_node::source::{ReleaseOutcome, SnapshotRequest, SourceDriver, SourceError};
use sendense_shared::api::{BackupType, ConsistencyLevel};
use sendense_shared::ids::BackupId;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn driver(vm: &TestVm, run_dir: &Path, agent: Option<PathBuf>) -> QemuDriver {
    QemuDriver::new(
        [("vm1".to_string(), vm.node_qmp.clone())],
        run_dir.to_path_buf(),
        Arc::new(QmpLog::new(None)),
    )
    .with_guest_agents(
        agent.map(|a| ("vm1".to_string(), a)),
        Duration::from_secs(1),
    )
}

fn request(id: &str, require: bool) -> SnapshotRequest {
    SnapshotRequest {
        backup_id: BackupId::from(id),
        vm_name: "vm1".into(),
        backup_type: BackupType::Full,
        previous_backup_id: None,
        previous_change_ids: Default::default(),
        require_application_consistency: require,
    }
}

/// An agent socket that accepts and never answers (qemu-ga not running in the guest: QEMU's
/// chardev still accepts the connection).
fn silent_agent(path: &Path) -> tokio::task::JoinHandle<()> {
    let l = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    })
}

/// An agent that says "frozen" until thawed; answers the commands it saw.
fn frozen_agent(path: &Path) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let l = tokio::net::UnixListener::bind(path).unwrap();
    let log = seen.clone();
    tokio::spawn(async move {
        let mut frozen = true;
        while let Ok((s, _)) = l.accept().await {
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            loop {
                let mut buf = Vec::new();
                if r.read_until(b'\n', &mut buf).await.unwrap_or(0) == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf);
                let v: serde_json::Value =
                    serde_json::from_str(text.trim_start_matches('\u{FFFD}').trim()).unwrap();
                let cmd = v["execute"].as_str().unwrap().to_string();
                log.lock().unwrap().push(cmd.clone());
                let mut out = match cmd.as_str() {
                    "guest-sync-delimited" => {
                        let mut b = vec![0xFF];
                        b.extend(format!("{{\"return\": {}}}", v["arguments"]["id"]).bytes());
                        b
                    }
                    "guest-fsfreeze-status" => {
                        let s = if frozen { "frozen" } else { "thawed" };
                        format!("{{\"return\": \"{s}\"}}").into_bytes()
                    }
                    "guest-fsfreeze-thaw" => {
                        frozen = false;
                        b"{\"return\": 2}".to_vec()
                    }
                    _ => {
                        b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no\"}}".to_vec()
                    }
                };
                out.push(b'\n');
                w.write_all(&out).await.unwrap();
            }
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_answering_agent_the_snapshot_is_crash_consistent_or_refused_when_required() {
    let vm = TestVm::temp(&[16 * MIB], |_| {}).await;
    let run_dir = vm.dir.join("run");

    // No channel configured.
    let d = driver(&vm, &run_dir, None);
    let snap = d.snapshot(&request("b1", false)).await.unwrap();
    let c = snap.consistency.clone().expect("consistency");
    assert_eq!(c.level, ConsistencyLevel::Crash);
    assert_eq!(
        c.reason,
        "no guest agent channel configured or found through QMP"
    );
    assert_eq!(c.freeze_ms, None);
    d.release(&snap, ReleaseOutcome::Success).await.unwrap();

    // QEMU's node QMP socket takes one client: each driver's goes before the next connects.
    drop(d);

    // A channel whose agent does not run: bounded by the agent timeout, then crash-consistent.
    let sock = vm.dir.join("silent.qga");
    let agent = silent_agent(&sock);
    let d = driver(&vm, &run_dir, Some(sock.clone()));
    let t = std::time::Instant::now();
    let snap = d.snapshot(&request("b2", false)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let c = snap.consistency.clone().expect("consistency");
    assert_eq!(c.level, ConsistencyLevel::Crash);
    assert!(
        c.reason
            .starts_with("guest agent did not answer within 1 s"),
        "{}",
        c.reason
    );
    d.release(&snap, ReleaseOutcome::Success).await.unwrap();

    // Required: the snapshot is refused naming the cause, nothing of it left in QEMU or in
    // the run directory, no freeze journal.
    let e = d.snapshot(&request("b3", true)).await.unwrap_err();
    assert!(
        matches!(e, SourceError::ConsistencyRequired { .. }),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("application consistency required")
            && msg.contains("guest agent did not answer within 1 s"),
        "{msg}"
    );
    assert_eq!(vm.leftovers().await, Vec::<String>::new());
    let files: Vec<String> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "qmp.log")
        .collect();
    assert_eq!(files, Vec::<String>::new());
    agent.abort();
    drop(d);

    // A missing socket (the VM's chardev is not there): crash-consistent, named.
    let d = driver(&vm, &run_dir, Some(vm.dir.join("missing.qga")));
    let snap = d.snapshot(&request("b4", false)).await.unwrap();
    let c = snap.consistency.clone().expect("consistency");
    assert!(
        c.reason.contains("guest agent channel unusable") && c.reason.contains("missing.qga"),
        "{}",
        c.reason
    );
    d.release(&snap, ReleaseOutcome::Success).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_recovery_thaws_a_guest_a_crashed_node_left_frozen() {
    let vm = TestVm::temp(&[16 * MIB], |_| {}).await;
    let run_dir = vm.dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let sock = vm.dir.join("frozen.qga");
    let seen = frozen_agent(&sock);
    // The journal a node writes before it asks for the freeze, left by a crash.
    let journal = run_dir.join("frozen-vm1.json");
    std::fs::write(
        &journal,
        serde_json::json!({"backup_id": "b0", "vm_name": "vm1", "agent_socket": sock,
                           "frozen_at": "2026-12-01T00:00:00Z"})
        .to_string(),
    )
    .unwrap();
    let d = driver(&vm, &run_dir, Some(sock.clone()));
    let report = d.recover().await;
    assert_eq!(report.guests_thawed, vec!["vm1".to_string()], "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(!journal.exists(), "the freeze journal stays after the thaw");
    let cmds = seen.lock().unwrap().clone();
    assert_eq!(
        cmds,
        [
            "guest-sync-delimited",
            "guest-fsfreeze-status",
            "guest-fsfreeze-thaw"
        ],
        "{cmds:?}"
    );
    // A second start-up finds nothing to thaw.
    let report = d.recover().await;
    assert!(report.guests_thawed.is_empty(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_channel_is_found_through_qmp() {
    // The VM has the agent's virtio port on a socket, no guest OS behind it, and the driver
    // is not told about it: it finds the socket through QMP and waits for an agent there.
    let vm = TestVm::start_opts(
        sendense_tests::qemu::VmOptions {
            name: "vm1".into(),
            sizes: vec![16 * MIB],
            agent_channel: true,
            ..Default::default()
        },
        |_| {},
    )
    .await
    .expect("start QEMU");
    let run_dir = vm.dir.join("run");
    let d = driver(&vm, &run_dir, None);
    let snap = d.snapshot(&request("b1", false)).await.unwrap();
    let c = snap.consistency.clone().expect("consistency");
    assert_eq!(c.level, ConsistencyLevel::Crash);
    assert!(
        c.reason
            .starts_with("guest agent did not answer within 1 s"),
        "{}",
        c.reason
    );
    d.release(&snap, ReleaseOutcome::Success).await.unwrap();
}
