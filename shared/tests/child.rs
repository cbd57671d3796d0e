//! Child supervision with ordinary programs: exit reports, stderr, process groups, stop and reap.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::{self, Pid};
use sendense_shared::child::{
    ChildError, ExitReport, Supervised, pid_alive, read_cmdline, stop_group,
};
use tokio::process::Command;

/// Kills the child's group if a test fails half-way, so no test leaves a process behind.
struct Guard(Supervised);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.kill_now();
    }
}

/// A process started outside any supervision (as if by an earlier run), killed on drop if still
/// ours (checked through its command line).
struct Detached {
    pid: u32,
    cmdline: Vec<String>,
}

impl Drop for Detached {
    fn drop(&mut self) {
        if pid_alive(self.pid) && read_cmdline(self.pid).as_ref() == Some(&self.cmdline) {
            let _ = signal::kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
    }
}

fn spawn(program: &str, args: &[&str]) -> Guard {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null());
    let child = Supervised::spawn(cmd).expect("spawn");
    eprintln!("spawned {} as {}", child.command_line_string(), child.pid());
    Guard(child)
}

async fn exited(child: &Supervised, bound: Duration) -> ExitReport {
    let mut rx = child.exit_watch();
    let r = tokio::time::timeout(bound, rx.wait_for(Option::is_some))
        .await
        .expect("child did not exit in time")
        .expect("monitor gone");
    r.clone().expect("report")
}

async fn stderr_contains(child: &Supervised, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !child.stderr_tail().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "stderr never said {needle:?}: {:?}",
            child.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn exit_code_and_stderr_are_reported() {
    let g = spawn("sh", &["-c", "echo err >&2; exit 3"]);
    let r = exited(&g.0, Duration::from_secs(5)).await;
    assert_eq!(r.status, "exit status 3");
    assert_eq!(r.code, Some(3));
    assert_eq!(r.signal, None);
    assert_eq!(r.stderr_tail, "err\n");
    assert!(!r.requested);
    assert!(!g.0.is_alive());
    assert_eq!(r.to_string(), "exit status 3: err");
    // Reaped: no zombie left under our PID.
    assert!(!Path::new(&format!("/proc/{}", g.0.pid())).exists());
    // Stop after a natural exit is harmless and reports the same exit.
    assert_eq!(g.0.stop(Duration::from_secs(1)).await, r);
}

#[tokio::test]
async fn stop_terminates_the_group_and_reaps() {
    let g = spawn("sleep", &["30"]);
    let pid = g.0.pid();
    assert!(pid_alive(pid));
    assert_eq!(g.0.command_line(), ["sleep", "30"]);
    // Between fork and exec the child's /proc cmdline is still this test's: the spawn
    // returns once forked, so wait (bounded) for the exec.
    let t = std::time::Instant::now();
    while read_cmdline(pid).unwrap() != ["sleep", "30"] {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{:?}",
            read_cmdline(pid)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pgid = unistd::getpgid(Some(Pid::from_raw(pid as i32))).unwrap();
    assert_eq!(pgid.as_raw() as u32, pid, "child must lead its own group");
    assert_ne!(pgid, unistd::getpgrp(), "child must not share our group");

    let r = g.0.stop(Duration::from_secs(5)).await;
    assert_eq!(r.status, "killed by SIGTERM");
    assert_eq!(r.signal, Some(Signal::SIGTERM as i32));
    assert!(r.requested);
    assert!(!g.0.is_alive());
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "not reaped");
    assert_eq!(g.0.stop(Duration::from_secs(5)).await, r, "idempotent");
}

#[tokio::test]
async fn concurrent_stops_agree() {
    let g = spawn("sleep", &["30"]);
    let other = g.0.clone();
    let (a, b) = tokio::join!(
        g.0.stop(Duration::from_secs(5)),
        other.stop(Duration::from_secs(5))
    );
    assert_eq!(a, b);
    assert!(a.requested);
}

#[tokio::test]
async fn a_child_ignoring_sigterm_is_killed_after_grace_with_its_group() {
    // The shell ignores TERM, and so does the sleep it forks (SIG_IGN survives exec). It prints
    // the sleep's PID once the trap is in place.
    let g = spawn(
        "sh",
        &[
            "-c",
            "trap '' TERM; sleep 30 & echo \"grandchild $!\" >&2; wait",
        ],
    );
    stderr_contains(&g.0, "grandchild ").await;
    let grandchild: u32 =
        g.0.stderr_tail()
            .trim()
            .strip_prefix("grandchild ")
            .unwrap()
            .parse()
            .unwrap();
    assert!(pid_alive(grandchild));

    let grace = Duration::from_millis(500);
    let t = Instant::now();
    let r = g.0.stop(grace).await;
    let took = t.elapsed();
    assert!(
        took >= grace,
        "stop returned before the grace ended: {took:?}"
    );
    assert!(took < grace + Duration::from_secs(5), "stop hung: {took:?}");
    assert_eq!(r.status, "killed by SIGKILL");
    assert!(r.requested);
    assert!(!Path::new(&format!("/proc/{}", g.0.pid())).exists());
    // The grandchild (reparented once the shell died) was killed with the group.
    let deadline = Instant::now() + Duration::from_secs(2);
    while pid_alive(grandchild) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!pid_alive(grandchild), "grandchild {grandchild} survived");
}

#[tokio::test]
async fn an_external_sigkill_is_reported() {
    let g = spawn("sleep", &["30"]);
    signal::kill(Pid::from_raw(g.0.pid() as i32), Signal::SIGKILL).unwrap();
    let r = exited(&g.0, Duration::from_secs(2)).await;
    assert_eq!(r.status, "killed by SIGKILL");
    assert!(!r.requested, "nobody asked for this exit");
}

#[tokio::test]
async fn a_missing_program_names_it() {
    let err = Supervised::spawn(Command::new("/nonexistent/sendense-no-such-binary")).unwrap_err();
    assert!(
        matches!(&err, ChildError::Spawn { program, .. } if program == "/nonexistent/sendense-no-such-binary")
    );
    assert!(
        err.to_string()
            .contains("/nonexistent/sendense-no-such-binary")
    );
}

/// Starts `sleep SECS` in a new session through a shell that exits at once, so the sleep is no
/// child of ours: what a reconciler finds after a restart.
fn detached_sleep(secs: &str) -> Detached {
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("setsid sleep {secs} </dev/null >/dev/null 2>&1 & echo $!"),
        ])
        .output()
        .unwrap();
    let pid: u32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let want = vec!["sleep".to_string(), secs.to_string()];
    // setsid may still be exec'ing sleep.
    let deadline = Instant::now() + Duration::from_secs(5);
    while read_cmdline(pid).as_ref() != Some(&want) {
        assert!(Instant::now() < deadline, "detached sleep did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    Detached { pid, cmdline: want }
}

#[tokio::test]
async fn stop_group_stops_a_process_we_did_not_spawn() {
    let d = detached_sleep("31");
    let pid = d.pid;
    assert!(pid_alive(pid));
    assert!(stop_group(pid, Duration::from_secs(5)).await.unwrap());
    assert!(!pid_alive(pid));
    assert!(
        !stop_group(pid, Duration::from_secs(5)).await.unwrap(),
        "second stop finds it gone"
    );
}

#[tokio::test]
async fn stop_group_refuses_our_own_process_and_init() {
    for pid in [0, 1, std::process::id()] {
        let err = stop_group(pid, Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(matches!(err, ChildError::RefusedPid { .. }), "{pid}: {err}");
    }
    assert!(pid_alive(std::process::id()), "we are still here");
}

#[test]
fn read_cmdline_of_a_missing_pid_is_none() {
    // PIDs above pid_max never exist.
    assert_eq!(read_cmdline(i32::MAX as u32), None);
    assert!(!pid_alive(i32::MAX as u32));
}
