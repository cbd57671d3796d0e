//! Stalls: a peer that stops answering without going away (a SIGSTOPped process keeps its
//! socket open and never replies). The node's watchdog fails the disk once no byte moved for
//! its `SENDENSE_COPY_STALL_SECS` (3 s here), naming the side it waits on; the job unwinds as
//! on any failure, nothing stays held, and the next backup succeeds.

use super::sys::{SLOW_BPS, Sys, SysOptions, disk};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

const STALL_SECS: u64 = 3;
/// What the test allows beyond the watchdog: the unwinding (qemu-nbd's stop grace, the
/// snapshot's release) on a loaded machine.
const MARGIN: Duration = Duration::from_secs(40);

fn stalling() -> SysOptions {
    SysOptions {
        throttle_bps: Some(SLOW_BPS),
        node: Some(Box::new(|o| {
            o.env
                .push(("SENDENSE_COPY_STALL_SECS".into(), STALL_SECS.to_string()));
        })),
        ..Default::default()
    }
}

fn signal(pid: u32, s: Signal) {
    eprintln!("+ kill -{s} {pid}");
    // The process may be gone already (the hub stopped it while unwinding).
    let _ = kill(Pid::from_raw(pid as i32), s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_stops_answering_fails_the_job_naming_the_target() {
    let sys = Sys::start("e2estallt", stalling()).await;
    let (id, b) = sys.backup("full").await;
    sys.wait_node_copying(&id).await;
    let pid = disk(&b, 2000)["qemu_nbd_pid"].as_u64().unwrap() as u32;
    signal(pid, Signal::SIGSTOP);
    let t = Instant::now();
    let end = sys.wait_end(&id).await;
    let took = t.elapsed();
    signal(pid, Signal::SIGCONT);
    assert_eq!(end["status"], "failed", "{end:#}");
    assert!(
        took < Duration::from_secs(STALL_SECS) + MARGIN,
        "the stalled job took {took:?} to fail"
    );
    let msg = end["error_message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("stalled") && msg.contains("target export"),
        "the failure does not name the stalled target: {msg}"
    );
    sys.assert_clean(&end).await;
    sys.backup_completes("full").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_stops_answering_fails_the_job_naming_the_source() {
    let sys = Sys::start("e2estalls", stalling()).await;
    let (id, _) = sys.backup("full").await;
    sys.wait_node_copying(&id).await;
    // QEMU serves the snapshot: stopped, its NBD server is silent (and so is its QMP, which
    // the node needs to release the snapshot: QEMU continues once the node said why it failed).
    let qemu = sys.vm.pid();
    signal(qemu, Signal::SIGSTOP);
    let t = Instant::now();
    let failed = loop {
        let (_, v) = sys.node.get(&format!("/backup/{id}")).await;
        let text = v.to_string();
        if text.contains("stalled") {
            break text;
        }
        if t.elapsed() > Duration::from_secs(STALL_SECS) + MARGIN {
            signal(qemu, Signal::SIGCONT);
            panic!(
                "the node did not call the copy stalled: {v:#}\n{}",
                sys.node.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("+ the node called the copy stalled after {:?}", t.elapsed());
    signal(qemu, Signal::SIGCONT);
    assert!(
        failed.contains("source export"),
        "the stall does not name the source: {failed}"
    );
    let end = sys.wait_end(&id).await;
    assert_eq!(end["status"], "failed", "{end:#}");
    let msg = end["error_message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("stalled") && msg.contains("source export"),
        "{msg}"
    );
    sys.assert_clean(&end).await;
    sys.backup_completes("full").await;
}

/// The hub's backstop: a node that keeps reporting progress but moves no byte (here its own
/// watchdog is set to an hour) fails at the hub's `job_stall_after`, named as stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_reports_but_moves_nothing_fails_at_the_hub() {
    let sys = Sys::start(
        "e2estallh",
        SysOptions {
            throttle_bps: Some(SLOW_BPS),
            hub: Some(Box::new(|o, dir| {
                let cfg = dir.join("hub.toml");
                std::fs::write(
                    &cfg,
                    format!("node_watch_interval_secs = 1\njob_stall_after_secs = {STALL_SECS}\n"),
                )
                .unwrap();
                o.extra_args
                    .extend(["--config".into(), cfg.display().to_string()]);
            })),
            node: Some(Box::new(|o| {
                o.env
                    .push(("SENDENSE_COPY_STALL_SECS".into(), "3600".into()));
            })),
            ..Default::default()
        },
    )
    .await;
    let (id, b) = sys.backup("full").await;
    sys.wait_node_copying(&id).await;
    let pids: Vec<u32> = [2000, 2001]
        .iter()
        .map(|k| disk(&b, *k)["qemu_nbd_pid"].as_u64().unwrap() as u32)
        .collect();
    for p in &pids {
        signal(*p, Signal::SIGSTOP);
    }
    let t = Instant::now();
    let end = sys.wait_end(&id).await;
    let took = t.elapsed();
    for p in &pids {
        signal(*p, Signal::SIGCONT);
    }
    assert_eq!(end["status"], "failed", "{end:#}");
    assert!(took < Duration::from_secs(STALL_SECS) + MARGIN, "{took:?}");
    let msg = end["error_message"].as_str().unwrap_or_default();
    assert!(msg.contains("no byte of any disk moved"), "{msg}");
    sys.assert_event(&id, "job_stalled", &["stalled"]).await;
    sys.assert_clean(&end).await;
    sys.backup_completes("full").await;
}
