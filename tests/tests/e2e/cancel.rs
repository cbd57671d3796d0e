//! Cancel from the API in each phase of a job: `preparing`, `running`, `finalizing`. Each ends
//! `cancelled` with nothing held (no qemu-nbd, no port, no snapshot, no partial image), and the
//! next backup of the VM succeeds.
//!
//! To hold a job in `preparing` and in `finalizing` long enough to cancel it there without
//! timed sleeps, the hub runs with a `PATH` whose `qemu-nbd` waits 1 s before it starts the real
//! one, and whose `qemu-img check` waits 2 s (every other `qemu-img` runs at once). The hub
//! finds both tools through `PATH`, as it does in production.

use super::sys::{SLOW_BPS, Sys, SysOptions};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn which(tool: &str) -> String {
    let out = sendense_tests::run(
        std::process::Command::new("sh").args(["-c", &format!("command -v {tool}")]),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn slow_tools(o: &mut sendense_tests::hub::HubOptions, dir: &Path) {
    let bin = dir.join("slow-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let scripts = [
        (
            "qemu-nbd",
            format!("#!/bin/sh\nsleep 1\nexec {} \"$@\"\n", which("qemu-nbd")),
        ),
        (
            "qemu-img",
            format!(
                "#!/bin/sh\n[ \"$1\" = check ] && sleep 2\nexec {} \"$@\"\n",
                which("qemu-img")
            ),
        ),
    ];
    for (name, text) in scripts {
        let p = bin.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = std::env::var("PATH").unwrap_or_default();
    o.env
        .push(("PATH".into(), format!("{}:{path}", bin.display())));
}

/// Polls the VM's jobs until one is in `status`; answers its id.
async fn wait_job_in(sys: &Sys, status: &str) -> String {
    let t = Instant::now();
    loop {
        let list = sys.api.get_ok("/api/v1/backups").await;
        if let Some(b) = list
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["vm_name"] == json!(sys.vm_name) && b["status"] == status)
        {
            return b["backup_id"].as_str().unwrap().to_string();
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no job of {} reached {status}: {list:#}",
            sys.vm_name
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn cancel(sys: &Sys, id: &str, phase: &str) -> Value {
    let (s, c) = sys
        .api
        .post(&format!("/api/v1/backups/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 202, "cancel in {phase}: {c}");
    assert!(
        c["status"] == "cancelling" || c["status"] == "cancelled",
        "cancel in {phase}: {c}"
    );
    let b = sys
        .api
        .wait_status(id, &["cancelled"], super::sys::JOB_LIMIT)
        .await;
    sys.assert_event(id, "cancel_requested", &[phase]).await;
    for d in b["disk_results"].as_array().unwrap() {
        assert_eq!(d["status"], "cancelled", "{d}");
    }
    sys.assert_clean(&b).await;
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_in_every_phase() {
    let sys = Sys::start(
        "e2ecancel",
        SysOptions {
            throttle_bps: Some(SLOW_BPS),
            hub: Some(Box::new(slow_tools)),
            ..Default::default()
        },
    )
    .await;

    // preparing: the POST is still waiting for the exports when the cancel comes.
    let api = sys.api.clone();
    let vm = sys.vm_name.clone();
    let post = tokio::spawn(async move {
        api.post(
            "/api/v1/backups",
            &json!({"vm_name": vm, "repository_id": "default", "backup_type": "full"}),
        )
        .await
    });
    let id = wait_job_in(&sys, "preparing").await;
    cancel(&sys, &id, "preparing").await;
    let (s, v) = post.await.unwrap();
    assert!(
        s >= 400,
        "the start of a job cancelled while preparing answered {s}: {v}"
    );
    sys.assert_event(&id, "prepare_interrupted", &[]).await;
    // The node was never asked to copy.
    assert_eq!(sys.node.get(&format!("/backup/{id}")).await.0, 404);

    // running: the node is copying; it stops and releases its snapshot.
    let (id, _) = sys.backup("full").await;
    sys.wait_node_copying(&id).await;
    cancel(&sys, &id, "running").await;
    sys.assert_event(&id, "node_cancel", &["confirmed"]).await;
    // The hub's "confirmed" means the node answered its cancel, and the node cancels the job's
    // token before it answers: whatever the copy meets afterwards (the hub's exports going
    // away), the node settles a cancelled job as `cancelled` (agent_node::jobs, settle).
    let t = std::time::Instant::now();
    let n = loop {
        let (_, n) = sys.node.get(&format!("/backup/{id}")).await;
        if super::sys::terminal(&n) {
            break n;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "node job: {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(n["status"], "cancelled", "{n}");
    assert_eq!(n["error_message"], "cancelled", "{n}");

    // finalizing: the copy is complete, the hub verifies.
    let (id, _) = sys.backup("full").await;
    let id2 = wait_job_in(&sys, "finalizing").await;
    assert_eq!(id, id2);
    cancel(&sys, &id, "finalizing").await;

    // After all that, a backup completes.
    sys.backup_completes("full").await;
}
