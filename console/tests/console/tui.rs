//! The TUI itself, driven through tmux like an operator at an 80×24 terminal: start a backup
//! with keys, cancel it with the confirmation, then SIGTERM, which must leave the terminal
//! restored (alternate screen left) and exit 0. Against the fake hub (see `main.rs`).

use crate::fake_hub::{FakeHub, TOKEN, write_token_file};
use sendense_tests::tmux::Tmux;
use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::test]
async fn keys_start_and_cancel_a_backup_and_sigterm_restores_the_terminal() {
    let hub = FakeHub::start(&["repo-a"]).await;
    hub.state
        .lock()
        .unwrap()
        .vms
        .push(crate::fake_hub::vm("pgtest1"));
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    write_token_file(&token, TOKEN);
    let log = dir.path().join("console.log");
    let tmux = Tmux::new("sendense-console-test", Duration::from_secs(15));
    let cmd = format!(
        "{} --hub {} --token-file {} --log-file {}",
        env!("CARGO_BIN_EXE_sendense-console"),
        hub.url,
        token.display(),
        log.display()
    );
    tmux.start_ui(dir.path(), &cmd);

    tmux.wait_for("◉ live").await;
    tmux.keys(&["2"]);
    tmux.wait_for("pgtest1").await;
    tmux.keys(&["s"]);
    tmux.wait_for("Start backup").await;
    tmux.keys(&["Enter"]);
    tmux.wait_for("Start a full backup of VM pgtest1 into repository repo-a?")
        .await;
    tmux.keys(&["y"]);
    tmux.wait_for("accepted by the hub").await;
    {
        let st = hub.state.lock().unwrap();
        assert_eq!(st.start_requests.len(), 1);
        assert_eq!(st.start_requests[0].vm_name, "pgtest1");
        assert_eq!(st.start_requests[0].repository_id, "repo-a");
    }

    tmux.keys(&["1"]);
    tmux.wait_for("b-fake0001").await;
    tmux.keys(&["c"]);
    tmux.wait_for("Cancel backup b-fake0001 of VM pgtest1 (pending)?")
        .await;
    tmux.keys(&["n"]);
    tmux.wait_for("Cancel aborted").await;
    assert!(
        hub.state.lock().unwrap().cancel_requests.is_empty(),
        "n sends nothing"
    );
    tmux.keys(&["c", "y"]);
    tmux.wait_for("cancelling").await;
    assert_eq!(
        hub.state.lock().unwrap().cancel_requests,
        vec!["b-fake0001".to_string()]
    );

    tmux.keys(&["?"]);
    tmux.wait_for("cancel job (asks y/n)").await;
    tmux.keys(&["Escape"]);

    let pid = tmux.pane("#{pane_pid}");
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.pane("#{pane_dead}") != "1" {
        assert!(Instant::now() < deadline, "console did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // tmux marks the pane dead when the pty closes but fills in the exit status only once it
    // has reaped the process, which can take a while on a loaded machine: until then the
    // process is a zombie (it has exited; only tmux's wait is missing). Any status tmux does
    // report must be 0; a process killed by the signal (not handling it) would show none and
    // would not have logged the exit reason checked below.
    let pid_n: u32 = pid.parse().unwrap();
    let reaped_or_zombie = || {
        std::fs::read_to_string(format!("/proc/{pid_n}/stat"))
            .map(|st| {
                st.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    };
    while !reaped_or_zombie() {
        assert!(Instant::now() < deadline, "console did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = tmux.pane("#{pane_dead_status}");
    assert!(
        status.is_empty() || status == "0",
        "SIGTERM is a clean exit, tmux says status {status:?}"
    );
    let after = tmux.screen();
    assert!(
        !after.contains("1 Jobs │ 2 VMs"),
        "the alternate screen was left on SIGTERM:\n{after}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("SIGTERM"),
        "the log file has the exit reason:\n{logged}"
    );
}

/// A restore in the Jobs view, driven by keys: listed as a job of kind `restore`, its detail,
/// a Restore event of the stream moving its gauge, and `c` with the y/n confirmation calling
/// the restore's cancel endpoint (not the backup one).
#[tokio::test]
async fn keys_show_follow_and_cancel_a_restore() {
    use crate::fake_hub::{GIB, restores::restore};
    use sendense_shared::api::{HubEvent, JobStatus};
    use sendense_shared::ids::NbdPort;

    let hub = FakeHub::start(&["repo-a"]).await;
    let mut r = restore(
        "r-fake0042",
        "b-fake0007",
        "slowvm",
        "node-a",
        "/restore/slowvm.qcow2",
    );
    r.status = JobStatus::Running;
    r.nbd_port = Some(NbdPort(10150));
    r.bytes_done = GIB / 4;
    hub.state.lock().unwrap().restores.push(r.clone());
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    write_token_file(&token, TOKEN);
    let tmux = Tmux::new("sendense-console-restore-test", Duration::from_secs(15));
    let cmd = format!(
        "{} --hub {} --token-file {} --log-file {}",
        env!("CARGO_BIN_EXE_sendense-console"),
        hub.url,
        token.display(),
        dir.path().join("console.log").display()
    );
    tmux.start_ui(dir.path(), &cmd);

    tmux.wait_for("◉ live").await;
    tmux.wait_for("r-fake0042 slowvm    restore ◐ running     25%")
        .await;
    tmux.keys(&["Enter"]);
    tmux.wait_for("Job r-fake0042 · slowvm · restore").await;
    tmux.wait_for("target node-a:/restore/slowvm.qcow2").await;
    tmux.wait_for("source /srv/repo-a/slowvm/disk-2000/b-fake0007.qcow2")
        .await;
    tmux.wait_for("port 10150 · export restore-r-fake0042")
        .await;
    tmux.wait_for("256.0 MiB/1.0 GiB · 25%").await;

    // The snapshot taken right after subscribing has arrived by now; the event below is the
    // only source of the new figure (the hub's list still says 25 %, and the next full
    // refresh is 10 s away).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    r.bytes_done = GIB / 2;
    let msg = serde_json::to_string(&HubEvent::Restore { restore: r }).unwrap();
    hub.events.send(msg).unwrap();
    tmux.wait_for("512.0 MiB/1.0 GiB · 50%").await;

    tmux.keys(&["c"]);
    tmux.wait_for("Cancel restore r-fake0042 of VM slowvm (running)?")
        .await;
    tmux.keys(&["n"]);
    tmux.wait_for("Cancel aborted").await;
    assert!(
        hub.state.lock().unwrap().restore_cancel_requests.is_empty(),
        "n sends nothing"
    );
    tmux.keys(&["c", "y"]);
    tmux.wait_for("Job r-fake0042 is now cancelling").await;
    {
        let st = hub.state.lock().unwrap();
        assert_eq!(st.restore_cancel_requests, vec!["r-fake0042".to_string()]);
        assert!(st.cancel_requests.is_empty(), "no backup cancel was sent");
    }

    tmux.keys(&["q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.pane("#{pane_dead}") != "1" {
        assert!(Instant::now() < deadline, "console did not quit on q");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Policies view driven by keys at 80×24: the list, the detail with the VM's points, `p`
/// protecting the selected point, `x` the dry run and `y` the prune it showed, `r` run now
/// (its run arriving on the event stream), and `e` disabling the policy (a PUT of the whole
/// policy with `enabled` false).
#[tokio::test]
async fn keys_drive_the_policies_view() {
    use crate::fake_hub::policies::{point, request};
    use sendense_shared::api::{BackupType, JobStatus, KeepReason, PruneAction};

    let hub = FakeHub::start(&["repo-a"]).await;
    {
        let mut st = hub.state.lock().unwrap();
        st.vms.push(crate::fake_hub::vm("pgtest1"));
        for id in ["b-1", "b-2", "b-3"] {
            let mut b = crate::fake_hub::backup(id, "pgtest1", "repo-a", BackupType::Full);
            b.status = JobStatus::Completed;
            st.backups.push(b);
        }
        st.points.insert(
            "pgtest1".into(),
            vec![
                point("b-1", 26, Some(KeepReason::Last), PruneAction::Keep),
                point("b-2", 25, Some(KeepReason::Daily), PruneAction::Keep),
                point("b-3", 1, None, PruneAction::MergeIntoChild),
            ],
        );
    }
    let sh_dir = tempfile::tempdir().unwrap();
    let token = sh_dir.path().join("token");
    write_token_file(&token, TOKEN);
    // The policy is created through the API as an operator's script would.
    let client = sendense_shared::client::HubClient::new(&hub.url, Some(TOKEN.into()));
    client
        .create_policy(&request("nightly", "pgtest1"))
        .await
        .unwrap();
    let tmux = Tmux::new("sendense-console-policies-test", Duration::from_secs(15));
    let cmd = format!(
        "{} --hub {} --token-file {} --log-file {}",
        env!("CARGO_BIN_EXE_sendense-console"),
        hub.url,
        token.display(),
        sh_dir.path().join("console.log").display()
    );
    tmux.start_ui(sh_dir.path(), &cmd);

    tmux.wait_for("◉ live").await;
    tmux.keys(&["7"]);
    tmux.wait_for("nightly        0 1 * * *     pgtest1").await;
    tmux.wait_for("full in 250 days").await;
    tmux.keys(&["Enter"]);
    tmux.wait_for("Policy nightly · ✔ enabled").await;
    tmux.wait_for("Points of pgtest1 (1/1 VMs, h/l) · 3 points")
        .await;
    tmux.wait_for("▲ merge into child").await;

    // p on the newest point protects it.
    tmux.keys(&["p"]);
    tmux.wait_for("Point b-1 is protected").await;
    tmux.wait_for("■ yes").await;
    assert_eq!(
        hub.state.lock().unwrap().protect_requests,
        vec![("b-1".to_string(), true)]
    );

    // x asks for the dry run; n closes it; x, y starts the prune it showed.
    tmux.keys(&["x"]);
    tmux.wait_for("Prune preview · pgtest1").await;
    tmux.wait_for("Keeps 2 point(s), removes 1, frees 101.0 MiB.")
        .await;
    tmux.keys(&["n"]);
    tmux.wait_for("Prune not started").await;
    tmux.keys(&["x"]);
    tmux.wait_for("y start this prune").await;
    tmux.keys(&["y"]);
    tmux.wait_for("Prune p-fake0002 of pgtest1 started.").await;
    {
        let st = hub.state.lock().unwrap();
        let dry: Vec<bool> = st
            .prune_requests
            .iter()
            .map(|(r, q)| r.dry_run || *q)
            .collect();
        assert_eq!(dry, vec![true, true, false], "two previews, then one prune");
    }

    // r, y: run now; the run comes back on the event stream into the runs table.
    tmux.keys(&["r"]);
    tmux.wait_for("Run policy nightly now (its 1 VM)?").await;
    tmux.keys(&["y"]);
    tmux.wait_for("Policy nightly: 1 run queued.").await;
    tmux.wait_for("manual ○ queued").await;

    // e, y: disabled, the whole policy sent back.
    tmux.keys(&["e"]);
    tmux.wait_for("Disable policy nightly").await;
    tmux.keys(&["y"]);
    tmux.wait_for("Policy nightly is now disabled.").await;
    tmux.wait_for("Policy nightly · ○ disabled").await;
    {
        let st = hub.state.lock().unwrap();
        let put = st.policy_requests.last().unwrap();
        assert!(!put.enabled);
        assert_eq!(put.schedule, "0 1 * * *", "the rest sent back unchanged");
        assert_eq!(put.retention.keep_daily, Some(7));
    }

    tmux.keys(&["?"]);
    tmux.wait_for("Policies view (7)").await;
    // q closes the help (an Escape right before a q could reach the console as Alt-q).
    tmux.keys(&["q"]);
    tmux.wait_for("Recent runs").await;
    tmux.keys(&["q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.pane("#{pane_dead}") != "1" {
        assert!(Instant::now() < deadline, "console did not quit on q");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
