//! The real `sendense-console` in a tmux pane at 80×24, driven by keys like an operator,
//! against a real hub, node and 2-disk QEMU VM: start a full backup from the VMs view, watch
//! its per-disk progress move in the job detail until it completes, start a second one and
//! cancel it with the y/n confirmation, cancel a restore of the first one mid-copy the same way,
//! then check what the hub and the host say afterwards.
//!
//! Everything the test knows about the console it reads from `tmux capture-pane -p`, as an
//! operator reads the screen; the hub's API and `/proc` are only asked to confirm the outcome.
//! The node's copy is throttled (`SENDENSE_COPY_THROTTLE_BPS`) so that each job runs for
//! several seconds: long enough to see progress and to cancel mid-copy without timed sleeps.

use super::sys::{MIB, Sys, SysOptions};
use sendense_tests::bin_path;
use sendense_tests::tmux::Tmux;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Each disk's 36 MiB of data takes about 9 s at this rate.
const THROTTLE_BPS: u64 = 4 * MIB;
/// Bound on anything the screen must show.
const SCREEN_LIMIT: Duration = Duration::from_secs(90);

fn console_bin() -> PathBuf {
    let p = bin_path("sendense-console");
    assert!(
        p.exists(),
        "{} missing: cargo build --bin sendense-console",
        p.display()
    );
    p
}

/// The job's overall percentage from the detail view's summary line
/// (`36.0 MiB/256.0 MiB (14%) · rate …`).
fn summary_percent(screen: &str) -> Option<u32> {
    screen.lines().find_map(|l| {
        let (_, rest) = l.split_once(" (")?;
        let (pct, _) = rest.split_once("%)")?;
        pct.trim().parse().ok()
    })
}

/// The lines of the detail view that carry a disk's gauge label (`disk 2000 · ◐ running · …`).
fn disk_lines(screen: &str) -> Vec<String> {
    screen
        .lines()
        .filter(|l| l.contains("disk 200"))
        .map(|l| {
            l.trim_matches(|c: char| c == '│' || c == '█' || c.is_whitespace())
                .to_string()
        })
        .collect()
}

/// The status part of a restore's detail title (`Job <id> · vm · restore ◐ running`).
fn restore_status(screen: &str, id: &str) -> Option<String> {
    let line = screen.lines().find(|l| l.contains(&format!("Job {id}")))?;
    let (_, after) = line.split_once(" restore ")?;
    Some(after.trim_end_matches(['─', '┐', ' ']).to_string())
}

/// The status part of the detail view's title line (`Job <id> · vm · full ◐ running`).
fn title_status(screen: &str, id: &str) -> Option<String> {
    let line = screen.lines().find(|l| l.contains(&format!("Job {id}")))?;
    let (_, after) = line.split_once(" full ")?;
    Some(after.trim_end_matches(['─', '┐', ' ']).to_string())
}

/// qemu-nbd processes on this host whose command line names a path under `dir`.
fn qemu_nbd_under(dir: &std::path::Path) -> Vec<(u32, String)> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            (cmd.starts_with("qemu-nbd") || cmd.contains("/qemu-nbd "))
                .then_some(())
                .filter(|_| cmd.contains(&dir))
                .filter(|_| sendense_tests::pid_alive(pid))
                .map(|_| (pid, cmd))
        })
        .collect()
}

/// Starts a full backup of the VM from the VMs view with keys: `2`, `s`, `f` (full: the dialog
/// proposes an incremental once the VM has a backup), Enter (the only repository), `y`.
/// Answers the id of the job the hub accepted.
async fn start_with_keys(tmux: &Tmux, sys: &Sys, known: &[String]) -> String {
    let vm = &sys.vm_name;
    tmux.keys(&["2"]);
    tmux.wait_for(&format!("Disks of {vm}")).await;
    tmux.keys(&["s"]);
    tmux.wait_for("Start backup").await;
    tmux.keys(&["f", "Enter"]);
    // The question wraps at 80 columns: its first half is on one line.
    tmux.wait_for(&format!("Start a full backup of VM {vm}"))
        .await;
    tmux.keys(&["y"]);
    let t = Instant::now();
    let id = loop {
        let list = sys.api.get_ok("/api/v1/backups").await;
        let new: Vec<&Value> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["vm_name"] == json!(vm))
            .filter(|b| !known.iter().any(|k| b["backup_id"] == json!(k)))
            .collect();
        assert!(new.len() <= 1, "one new job from the keys: {list:#}");
        if let Some(b) = new.first() {
            assert_eq!(b["backup_type"], "full", "{b:#}");
            break b["backup_id"].as_str().unwrap().to_string();
        }
        assert!(
            t.elapsed() < SCREEN_LIMIT,
            "y did not start a job:\n{}",
            tmux.screen()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tmux.wait("the hub's acceptance of the new job", |s| {
        s.lines()
            .any(|l| l.contains(&id[..8]) && l.contains("accepted by the hub"))
    })
    .await;
    id
}

/// Opens the job `id` from the Jobs view: `1`, `g` (first row), then Enter on each row in
/// turn (`Esc`, `j`) until the detail's title names it.
async fn open_job(tmux: &Tmux, id: &str) -> String {
    tmux.keys(&["1"]);
    tmux.wait_for(&id[..8]).await;
    tmux.keys(&["g"]);
    for _ in 0..20 {
        tmux.keys(&["Enter"]);
        // The block's title says which screen is up (not "targets": also in the hub's path;
        // not the footer's hints: a notice replaces them for a while).
        tmux.wait_for("┌ Job ").await;
        // `g` in the detail scrolls to its first disk.
        tmux.keys(&["g"]);
        let screen = tmux.wait_for("disk 2000").await;
        if screen.contains(&format!("Job {id}")) {
            return screen;
        }
        tmux.keys(&["Escape"]);
        // Escape then j at once would reach the console as Alt-j: wait for the list first.
        tmux.wait_for("┌ Jobs (").await;
        tmux.keys(&["j"]);
    }
    panic!("job {id} not found in the Jobs list:\n{}", tmux.screen());
}

#[tokio::test]
async fn keys_start_a_two_disk_backup_watch_it_complete_and_cancel_another() {
    let console = console_bin();
    let sys = Sys::start(
        "conlive",
        SysOptions {
            throttle_bps: Some(THROTTLE_BPS),
            ..Default::default()
        },
    )
    .await;
    let tmux = Tmux::new("sendense-console-live", SCREEN_LIMIT);
    let log = sys.path("console.log");
    // The exit status goes through a file: tmux's #{pane_dead_status} is sometimes left empty.
    let exit_file = sys.path("console.exit");
    let cmd = format!(
        "sh -c '{} --hub {} --token-file {} --log-file {}; echo $? > {}'",
        console.display(),
        sys.hub.url,
        sys.hub.opts.data_dir.join("token").display(),
        log.display(),
        exit_file.display()
    );
    tmux.start_ui(sys.tmp.path(), &cmd);
    tmux.wait_for("◉ live").await;

    // 1. A full backup started with keys; its progress moves on screen until it completes.
    let first = start_with_keys(&tmux, &sys, &[]).await;
    let screen = open_job(&tmux, &first).await;
    let mut seen: Vec<u32> = summary_percent(&screen).into_iter().collect();
    let mut disks_running = false;
    let mut gauges: Vec<Vec<String>> = Vec::new();
    let mut odd_screen = String::new();
    let done = tmux
        .wait("the first job completed with its progress moving", |s| {
            // Recorded from inside the predicate: every screen polled counts.
            if let Some(p) = summary_percent(s)
                && seen.last() != Some(&p)
            {
                seen.push(p);
            }
            let d = disk_lines(s);
            if d.len() == 2 && d.iter().all(|l| l.contains("running")) {
                disks_running = true;
            }
            if d.len() != 2 {
                odd_screen = s.to_string();
            }
            if gauges.last() != Some(&d) {
                gauges.push(d);
            }
            title_status(s, &first).is_some_and(|t| t.contains("completed"))
        })
        .await;
    assert!(
        seen.iter().any(|p| (1..100).contains(p)) && seen.windows(2).any(|w| w[1] > w[0]),
        "the overall percentage never moved mid-way: {seen:?}"
    );
    assert!(
        disks_running,
        "both disks' gauges were never seen running together: {gauges:#?}\n{odd_screen}"
    );
    let disks = disk_lines(&done);
    assert_eq!(disks.len(), 2, "one gauge per disk:\n{done}");
    for (line, key) in disks.iter().zip(["2000", "2001"]) {
        assert!(
            line.contains(&format!("disk {key}"))
                && line.contains("completed")
                && line.contains("100%"),
            "disk {key}'s gauge at the end: {line:?}\n{done}"
        );
    }
    let b = sys.wait_completed(&first).await;
    assert_eq!(b["disk_results"].as_array().unwrap().len(), 2);
    sys.assert_clean(&b).await;

    // 2. A second one, cancelled mid-copy through the y/n confirmation.
    tmux.keys(&["Escape"]);
    tmux.wait_for("┌ Jobs (").await;
    let second = start_with_keys(&tmux, &sys, std::slice::from_ref(&first)).await;
    open_job(&tmux, &second).await;
    // The node has taken the snapshot and copies every disk: a cancel now unwinds a real copy.
    sys.wait_node_copying(&second).await;
    tmux.wait("the second job running", |s| {
        title_status(s, &second).is_some_and(|t| t.contains("running"))
    })
    .await;
    tmux.keys(&["c"]);
    let ask = tmux.wait_for("Cancel backup").await;
    assert!(
        ask.contains(&second[..8]) && ask.contains(&sys.vm_name),
        "the confirmation names the job and its VM:\n{ask}"
    );
    tmux.keys(&["y"]);
    tmux.wait("the second job cancelled", |s| {
        title_status(s, &second).is_some_and(|t| t.contains("cancelled"))
    })
    .await;

    let b = sys.wait_end(&second).await;
    assert_eq!(b["status"], "cancelled", "{b:#}");
    sys.assert_clean(&b).await;

    // 3. A restore of the first backup's disk 2000 (started through the API: the console
    // watches and steers jobs) shows in the Jobs view as a restore with its disk's gauge, and is
    // cancelled mid-copy with the same y/n confirmation.
    tmux.keys(&["Escape"]);
    tmux.wait_for("┌ Jobs (").await;
    let target = sys.path("console-restore.qcow2");
    let (s, r) = sys
        .api
        .post(
            "/api/v1/restores",
            &json!({"backup_id": first, "disk_key": 2000,
                    "target": {"node": sys.node.opts.name, "path": target.display().to_string()}}),
        )
        .await;
    assert_eq!(s, 202, "POST /api/v1/restores: {r}");
    let rid = r["restore_id"].as_str().unwrap().to_string();
    open_job(&tmux, &rid).await;
    let t = Instant::now();
    loop {
        let r = sys.api.get_ok(&format!("/api/v1/restores/{rid}")).await;
        if r["status"] == "running" && r["bytes_done"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            t.elapsed() < SCREEN_LIMIT,
            "the restore never copied: {r:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tmux.wait("the restore running on screen", |s| {
        restore_status(s, &rid).is_some_and(|t| t.contains("running"))
    })
    .await;
    tmux.keys(&["c"]);
    let ask = tmux.wait_for("Cancel restore").await;
    assert!(
        ask.contains(&rid) && ask.contains(&sys.vm_name),
        "the confirmation names the restore and its VM:\n{ask}"
    );
    tmux.keys(&["y"]);
    tmux.wait("the restore cancelled on screen", |s| {
        restore_status(s, &rid).is_some_and(|t| t.contains("cancelled"))
    })
    .await;
    let end = sys.api.get_ok(&format!("/api/v1/restores/{rid}")).await;
    assert_eq!(end["status"], "cancelled", "{end:#}");
    assert_eq!(end["nbd_port"], Value::Null, "{end}");
    let t = Instant::now();
    while target.exists() {
        assert!(
            t.elapsed() < SCREEN_LIMIT,
            "the node left its partial image {}",
            target.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 4. What the hub and the host say afterwards.
    let alive = qemu_nbd_under(sys.tmp.path());
    assert!(alive.is_empty(), "qemu-nbd still running: {alive:?}");
    let first_now = sys.api.get_ok(&format!("/api/v1/backups/{first}")).await;
    assert_eq!(
        first_now["status"], "completed",
        "the cancel touched only its own job"
    );

    // 5. q quits cleanly.
    tmux.keys(&["q"]);
    let t = Instant::now();
    while tmux.pane("#{pane_dead}") != "1" {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "console did not quit on q"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = std::fs::read_to_string(&exit_file).unwrap_or_default();
    assert_eq!(
        status.trim(),
        "0",
        "q is a clean exit; screen:\n{}\nconsole log:\n{}",
        tmux.screen(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
