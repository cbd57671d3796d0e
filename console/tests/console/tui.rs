//! The TUI itself, driven through tmux like an operator at an 80×24 terminal: start a backup
//! with keys, cancel it with the confirmation, then SIGTERM, which must leave the terminal
//! restored (alternate screen left) and exit 0. Against the fake hub (see `main.rs`).

use crate::fake_hub::{FakeHub, TOKEN};
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
    std::fs::write(&token, TOKEN).unwrap();
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
