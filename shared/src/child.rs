//! Supervised child processes: the hub's qemu-nbd, the node's ssh, test harnesses.
//!
//! Invariants this module keeps:
//! - Every child leads its own process group (`process_group(0)`), so a stop reaches whatever it
//!   forked, and a signal meant for it can never reach the supervisor's own group.
//! - A child is never killed because its handle was dropped (`kill_on_drop(false)`): the hub may
//!   restart while its qemu-nbd processes keep serving, and the reconciler then decides.
//! - Stop is SIGTERM to the group, a bounded wait, SIGKILL to the group, and always a reap. A
//!   process is only ever signalled by PID or process group, never by name.
//! - The last 64 KiB of stderr are kept, so the reason a child died can be shown to an operator.
//!   The exit report is published only after stderr reached EOF (or a short bound passed), so it
//!   carries the child's last words.
//!
//! For processes this run did not spawn (found in a database after a restart), [`stop_group`]
//! signals a PID the caller has already verified (see [`read_cmdline`]); PIDs are reused.
//!
//! ## Parts
//!
//! - here: [`ChildError`], [`ExitReport`], [`StartGuard`], and the one check every signal passes
//!   (never PID 0 or 1, this process or its own group);
//! - `supervised`: [`Supervised`], a child spawned here: its group, stderr tail, exit watch, stop;
//! - `foreign`: [`pid_alive`], [`read_cmdline`] and [`stop_group`], for processes found through
//!   `/proc` that this run did not spawn;
//! - `shell`: [`shell_words`], a command line quoted for logs.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::unistd::{self, Pid};

mod foreign;
mod shell;
mod supervised;

pub use foreign::{pid_alive, read_cmdline, stop_group};
pub use shell::shell_words;
pub use supervised::Supervised;

/// How many bytes of a child's stderr are kept (the tail).
pub const STDERR_TAIL_BYTES: usize = 64 * 1024;

/// Errors of child supervision.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("cannot start `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program}` started but has no PID (it was already reaped)")]
    NoPid { program: String },
    #[error("refusing to signal PID {pid}: {reason}")]
    RefusedPid { pid: u32, reason: &'static str },
    #[error("cannot send {signal} to PID {pid}")]
    Signal {
        pid: u32,
        signal: Signal,
        #[source]
        source: Errno,
    },
    #[error("PID {pid} is still alive {waited:?} after SIGKILL")]
    StillAlive { pid: u32, waited: Duration },
}

/// How and why a supervised child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitReport {
    /// Human-readable: "exit status 1", "killed by SIGKILL", "killed by SIGSEGV (core dumped)".
    pub status: String,
    /// The exit code when it exited normally.
    pub code: Option<i32>,
    /// The signal number when a signal ended it.
    pub signal: Option<i32>,
    /// The last [`STDERR_TAIL_BYTES`] of its stderr (lossy UTF-8).
    pub stderr_tail: String,
    /// True when [`Supervised::stop`] (or [`Supervised::kill_now`]) caused the exit.
    pub requested: bool,
}

impl ExitReport {
    fn from_status(status: &ExitStatus, stderr_tail: String, requested: bool) -> ExitReport {
        ExitReport {
            status: describe_status(status),
            code: status.code(),
            signal: status.signal(),
            stderr_tail,
            requested,
        }
    }

    /// The last non-empty stderr line, which for most programs names the cause.
    pub fn last_stderr_line(&self) -> Option<&str> {
        self.stderr_tail
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
    }
}

impl fmt::Display for ExitReport {
    /// "exit status 1: qemu-nbd: Failed to bind socket: Address already in use".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.status)?;
        if let Some(line) = self.last_stderr_line() {
            write!(f, ": {line}")?;
        }
        Ok(())
    }
}

/// "exit status 1", "killed by SIGKILL", "killed by SIGSEGV (core dumped)".
pub fn describe_status(status: &ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
    if let Some(sig) = status.signal() {
        let name = Signal::try_from(sig)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| format!("signal {sig}"));
        let core = if status.core_dumped() {
            " (core dumped)"
        } else {
            ""
        };
        return format!("killed by {name}{core}");
    }
    status.to_string()
}

/// Kills a child whose start was abandoned: the future starting it (spawn, then wait until it
/// serves) was dropped before it could decide. [`StartGuard::defuse`] once it has decided,
/// either way; the caller then stops a child that failed to get ready itself.
pub struct StartGuard {
    child: Option<Supervised>,
    /// "qemu-nbd", "nbdkit": for the log line.
    what: &'static str,
}

impl StartGuard {
    pub fn new(child: &Supervised, what: &'static str) -> StartGuard {
        StartGuard {
            child: Some(child.clone()),
            what,
        }
    }

    pub fn defuse(mut self) {
        self.child = None;
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            tracing::warn!(
                pid = child.pid(),
                what = self.what,
                "start abandoned; killing it"
            );
            child.kill_now();
        }
    }
}

/// Checks that signalling `pid` (or its group) cannot hit the supervisor itself, init, or "every
/// process" (`kill(0)`/`kill(-1)` semantics).
fn check_signalable(pid: u32) -> Result<Pid, ChildError> {
    if pid <= 1 {
        return Err(ChildError::RefusedPid {
            pid,
            reason: "PID 0 and 1 are never signalled",
        });
    }
    let Ok(raw) = i32::try_from(pid) else {
        return Err(ChildError::RefusedPid {
            pid,
            reason: "not a valid PID",
        });
    };
    if pid == std::process::id() {
        return Err(ChildError::RefusedPid {
            pid,
            reason: "it is this process",
        });
    }
    if unistd::getpgrp().as_raw() == raw {
        return Err(ChildError::RefusedPid {
            pid,
            reason: "it is this process's own group",
        });
    }
    Ok(Pid::from_raw(raw))
}

/// Signal a group we lead-spawned; "no such process" is the normal end of a race with its exit.
fn signal_group_quietly(pid: u32, sig: Signal) {
    let Ok(pgid) = check_signalable(pid) else {
        return;
    };
    match signal::killpg(pgid, sig) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pid, signal = %sig, error = %e, "cannot signal process group"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;
    use tokio::process::Command;

    #[tokio::test]
    async fn an_abandoned_start_kills_the_child_a_defused_one_does_not() {
        let sleeper = || {
            let mut cmd = Command::new("sleep");
            cmd.arg("30").stdin(Stdio::null()).stdout(Stdio::null());
            Supervised::spawn(cmd).expect("spawn sleep")
        };
        let abandoned = sleeper();
        drop(StartGuard::new(&abandoned, "sleep"));
        let report = tokio::time::timeout(Duration::from_secs(10), abandoned.exited())
            .await
            .expect("the abandoned child exits")
            .expect("with a report");
        assert!(report.status.contains("SIGKILL"), "{}", report.status);
        let kept = sleeper();
        StartGuard::new(&kept, "sleep").defuse();
        assert!(kept.is_alive(), "a defused guard leaves the child running");
        kept.stop(Duration::from_secs(1)).await;
        assert!(!kept.is_alive());
    }

    #[tokio::test]
    async fn a_death_by_someone_elses_sigkill_is_not_the_stops_even_racing_it() {
        let sleeper = |script: &str| {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", script])
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            Supervised::spawn(cmd).expect("spawn sh")
        };
        // Our own SIGTERM: requested.
        let c = sleeper("exec sleep 30");
        let r = c.stop(Duration::from_secs(5)).await;
        assert!(r.requested && r.signal == Some(15), "{r:?}");
        // SIGTERM ignored, our SIGKILL after the grace: requested.
        let c = sleeper("trap '' TERM; sleep 30 & wait");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = c.stop(Duration::from_millis(300)).await;
        assert!(r.requested && r.signal == Some(9), "{r:?}");
        // Someone else's SIGKILL, with our stop racing it: not requested.
        let c = sleeper("trap '' TERM; sleep 30 & wait");
        tokio::time::sleep(Duration::from_millis(200)).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.pid() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let r = c.stop(Duration::from_secs(5)).await;
        assert!(!r.requested && r.signal == Some(9), "{r:?}");
    }

    #[test]
    fn refuses_to_signal_init_self_and_everyone() {
        for pid in [0, 1, std::process::id(), u32::MAX] {
            assert!(
                matches!(check_signalable(pid), Err(ChildError::RefusedPid { .. })),
                "{pid}"
            );
        }
    }

    #[test]
    fn exit_report_display_names_the_last_stderr_line() {
        let r = ExitReport {
            status: "exit status 1".into(),
            code: Some(1),
            signal: None,
            stderr_tail: "first\nqemu-nbd: Failed to bind socket: Address already in use\n\n"
                .into(),
            requested: false,
        };
        assert_eq!(
            r.to_string(),
            "exit status 1: qemu-nbd: Failed to bind socket: Address already in use"
        );
    }
}
