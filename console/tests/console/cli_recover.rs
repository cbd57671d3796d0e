//! `recover start|list|show|cancel` run as the real binary against the fake hub: the id on
//! stdout, each disk's progress and the outcome on stderr, the exit status, and what reached
//! the hub.

use crate::cli::Shell;
use crate::fake_hub::recoveries::RECOVERY_FLAKY_ERROR;
use crate::fake_hub::{FakeHub, TOKEN};
use sendense_shared::api::{BackupType, JobStatus, Recovery};
use sendense_shared::ids::DiskKey;

async fn hub_with_point(vm: &str) -> FakeHub {
    let hub = FakeHub::start(&["repo-a"]).await;
    let mut b = crate::fake_hub::backup("b-done", vm, "repo-a", BackupType::Full);
    b.status = JobStatus::Completed;
    hub.state.lock().unwrap().backups.push(b);
    hub
}

const FIRST: &str = "7ec00001-0000-4000-8000-000000000001";

#[tokio::test]
async fn start_wait_follows_each_disk_home_and_says_the_vm_runs_on_its_own() {
    let hub = hub_with_point("pgtest1").await;
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh
        .run(&[
            "recover",
            "start",
            "b-done",
            "--node",
            "node-a",
            "--name",
            "pg-rec",
            "--disks",
            "2001,2000",
            "--memory",
            "2048",
            "--cpus",
            "2",
            "--speed",
            "50M",
            "--overlay-dir",
            "/srv/rec",
            "--wait",
        ])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), FIRST, "stdout is the recovery id");
    assert!(
        r.stderr.contains(&format!(
            "started recovery {FIRST} of backup b-done (pgtest1) as VM pg-rec on node-a: 2 disk(s)"
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!(
            "{FIRST} running vm running · disk 2000 256.0 MiB/1.0 GiB 256.0 MiB/s ETA 3s · disk 2001 256.0 MiB/1.0 GiB 256.0 MiB/s ETA 3s"
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!("recovery {FIRST} completed"))
            && r.stderr.contains(
                "2.0 GiB streamed home; VM pg-rec on node-a now runs from local disks alone"
            ),
        "{}",
        r.stderr
    );
    let st = hub.state.lock().unwrap();
    let req = &st.recovery_start_requests[0];
    assert_eq!(req.backup_id.0, "b-done");
    assert_eq!(req.vm_name, "pg-rec");
    assert_eq!(
        req.disks,
        Some(vec![DiskKey(2001), DiskKey(2000)]),
        "guest order"
    );
    assert_eq!(req.memory_mib, Some(2048));
    assert_eq!(req.cpus, Some(2));
    assert_eq!(req.speed_bps, Some(50 * 1024 * 1024));
    assert_eq!(req.overlay_dir.as_deref(), Some("/srv/rec"));
    assert_eq!(req.kernel, None, "left to the point's recorded hardware");
    assert_eq!(st.recoveries[0].status, JobStatus::Completed);
}

#[tokio::test]
async fn a_failing_recovery_exits_3_naming_the_cause() {
    let hub = hub_with_point("flaky").await;
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh
        .run(&[
            "recover",
            "start",
            "b-done",
            "--node",
            "node-a",
            "--name",
            "flaky-rec",
            "--wait",
        ])
        .await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("recovery {FIRST} failed: {RECOVERY_FLAKY_ERROR}")),
        "{}",
        r.stderr
    );
}

#[tokio::test]
async fn cancel_by_short_id_ends_a_waiting_start_with_exit_4_and_says_writes_are_lost() {
    let hub = hub_with_point("slowvm").await;
    let sh = Shell::new(&hub.url, TOKEN);
    let waiting = sh
        .console(&[
            "recover", "start", "b-done", "--node", "node-b", "--name", "slow-rec", "--wait",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while hub.state.lock().unwrap().recoveries.is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r = sh.run(&["recover", "cancel", "7ec00001"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "recovery {FIRST} of VM slow-rec on node-b is cancelling: the VM is stopped and its overlays removed; what the guest wrote is lost"
        )),
        "{}",
        r.stderr
    );
    assert_eq!(r.stdout.trim(), FIRST);

    let r = crate::cli::done(waiting.wait_with_output().await.unwrap());
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "recovery {FIRST} was cancelled: VM slow-rec was stopped and its overlays removed; what the guest wrote is lost"
        )),
        "{}",
        r.stderr
    );
    assert_eq!(
        hub.state.lock().unwrap().recovery_cancel_requests,
        vec![FIRST.to_string()],
        "the short id was resolved to the whole one"
    );
}

#[tokio::test]
async fn list_and_show_read_the_hubs_recoveries_and_refusals_name_the_field() {
    let hub = hub_with_point("pgtest1").await;
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh
        .run(&[
            "recover", "start", "b-done", "--node", "node-a", "--name", "pg-rec",
        ])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), FIRST);

    let r = sh.run(&["recover", "list"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "ID        POINT   NODE    VM      STATUS   HOME  STATE\n7ec00001  b-done  node-a  pg-rec  pending    0%  —\n"
    );
    let r = sh.run(&["recover", "list", "--json"]).await;
    let list: Vec<Recovery> = serde_json::from_str(&r.stdout).expect("stdout is the JSON list");
    assert_eq!(list[0].recovery_id, FIRST);

    // Each show moves the fake one step: preparing, then running with its exports.
    sh.run(&["recover", "show", "7ec00001"]).await;
    let r = sh.run(&["recover", "show", "7ec00001"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    for want in [
        &format!("recovery {FIRST} running of point b-done (pgtest1)")[..],
        "qemu pid    4242",
        "disk 2000: stream running · 256.0 MiB/1.0 GiB (25%) · rate 256.0 MiB/s · ETA 3s",
        "  port 10140 · export recovery-2000 · qemu-nbd pid 51300",
        "  overlay /srv/recovery/pg-rec/disk-2000.qcow2",
    ] {
        assert!(r.stdout.contains(want), "{want}:\n{}", r.stdout);
    }

    let r = sh.run(&["recover", "show", "deadbeef"]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("error: no recovery has an id starting with 'deadbeef'"),
        "{}",
        r.stderr
    );
    let r = sh
        .run(&[
            "recover", "start", "b-done", "--node", "node-a", "--name", "bad name",
        ])
        .await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("422") && r.stderr.contains("vm_name: \"bad name\" is not a VM name"),
        "{}",
        r.stderr
    );
    let r = sh
        .run(&[
            "recover", "start", "b-done", "--node", "node-a", "--name", "x", "--speed", "fast",
        ])
        .await;
    assert_eq!(r.code, 2, "clap refuses it: {}", r.stderr);
    assert!(r.stderr.contains("\"fast\" is not a rate"), "{}", r.stderr);
    let r = sh
        .run(&[
            "recover",
            "start",
            "b-done",
            "--node",
            "node-a",
            "--name",
            "x",
            "--overlay-dir",
            "rec",
        ])
        .await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("is not absolute"), "{}", r.stderr);
    assert_eq!(
        hub.state.lock().unwrap().recovery_start_requests.len(),
        2,
        "bad usage never reaches the hub"
    );
}

#[tokio::test]
async fn files_get_writes_the_hubs_tar_to_stdout_and_names_a_refusal() {
    let hub = hub_with_point("pgtest1").await;
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh
        .run(&["files", "get", "b-done", "/etc", "--disk", "2000"])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        crate::fake_hub::files::TAR,
        "the body as the hub sent it"
    );
    assert!(
        r.stderr.contains(&format!(
            "{} bytes of tar written",
            crate::fake_hub::files::TAR.len()
        )),
        "{}",
        r.stderr
    );
    let r = sh.run(&["files", "get", "b-done", "/nope"]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("path: /nope: no such file or directory"),
        "{}",
        r.stderr
    );
}
