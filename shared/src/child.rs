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

use std::collections::VecDeque;
use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::unistd::{self, Pid};
use tokio::io::AsyncReadExt;
use tokio::process::{ChildStderr, Command};
use tokio::sync::watch;

/// How many bytes of a child's stderr are kept (the tail).
pub const STDERR_TAIL_BYTES: usize = 64 * 1024;

/// After the child exits, how long to wait for its stderr pipe to close before publishing the
/// exit report anyway (a grandchild may hold the pipe open).
const STDERR_DRAIN_BOUND: Duration = Duration::from_millis(500);

/// How often [`stop_group`] looks at `/proc` while waiting for a foreign process to go.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// After SIGKILL, how long [`stop_group`] waits before declaring the process unkillable
/// (uninterruptible sleep, e.g. on a dead NFS server).
const AFTER_KILL_BOUND: Duration = Duration::from_secs(5);

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

/// A child process under supervision. Cloning gives another handle to the same child.
#[derive(Clone)]
pub struct Supervised {
    inner: Arc<Inner>,
}

struct Inner {
    pid: u32,
    command_line: Vec<String>,
    stderr: Arc<Mutex<StderrTail>>,
    exit_rx: watch::Receiver<Option<ExitReport>>,
    requested: Arc<AtomicBool>,
    /// Serialises `stop` so concurrent callers do not interleave signals.
    stop_lock: tokio::sync::Mutex<()>,
}

impl fmt::Debug for Supervised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervised")
            .field("pid", &self.inner.pid)
            .field("command_line", &self.inner.command_line)
            .field("alive", &self.is_alive())
            .finish()
    }
}

impl Supervised {
    /// Spawns `cmd` in its own process group with stderr captured. stdin and stdout are left as
    /// the caller configured them (daemons should set them to `Stdio::null()`).
    ///
    /// Must be called inside a tokio runtime: a task reaps the child and publishes its exit.
    pub fn spawn(mut cmd: Command) -> Result<Supervised, ChildError> {
        let command_line: Vec<String> = {
            let std = cmd.as_std();
            std::iter::once(std.get_program())
                .chain(std.get_args())
                .map(|s| s.to_string_lossy().into_owned())
                .collect()
        };
        let program = command_line[0].clone();
        cmd.process_group(0)
            .kill_on_drop(false)
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| ChildError::Spawn {
            program: program.clone(),
            source,
        })?;
        let Some(pid) = child.id() else {
            return Err(ChildError::NoPid { program });
        };
        tracing::debug!(pid, command = %shell_words(&command_line), "spawned child");

        let stderr = Arc::new(Mutex::new(StderrTail::default()));
        let drain = child
            .stderr
            .take()
            .map(|pipe| tokio::spawn(drain_stderr(pipe, Arc::clone(&stderr), pid)));
        let requested = Arc::new(AtomicBool::new(false));
        let (exit_tx, exit_rx) = watch::channel(None);

        let monitor_stderr = Arc::clone(&stderr);
        let monitor_requested = Arc::clone(&requested);
        tokio::spawn(async move {
            // `wait` reaps: once it returns, the PID may be reused by the system.
            let status = child.wait().await;
            if let Some(drain) = drain {
                let _ = tokio::time::timeout(STDERR_DRAIN_BOUND, drain).await;
            }
            let tail = lock(&monitor_stderr).to_string();
            let requested = monitor_requested.load(Ordering::SeqCst);
            let report = match status {
                Ok(status) => ExitReport::from_status(&status, tail, requested),
                Err(e) => ExitReport {
                    status: format!("unknown (waiting for it failed: {e})"),
                    code: None,
                    signal: None,
                    stderr_tail: tail,
                    requested,
                },
            };
            tracing::debug!(pid, status = %report.status, requested, "child exited");
            exit_tx.send_replace(Some(report));
        });

        Ok(Supervised {
            inner: Arc::new(Inner {
                pid,
                command_line,
                stderr,
                exit_rx,
                requested,
                stop_lock: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The child's PID, which is also its process group ID.
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// Program and arguments as spawned.
    pub fn command_line(&self) -> &[String] {
        &self.inner.command_line
    }

    /// The command line quoted for a shell, for logs and for an operator to paste.
    pub fn command_line_string(&self) -> String {
        shell_words(&self.inner.command_line)
    }

    /// The last [`STDERR_TAIL_BYTES`] of stderr so far.
    pub fn stderr_tail(&self) -> String {
        lock(&self.inner.stderr).to_string()
    }

    /// `None` while the child runs; `Some(report)` once it exited, whatever the cause.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitReport>> {
        self.inner.exit_rx.clone()
    }

    /// Waits until the child has exited, whatever the cause, and returns its report; `None`
    /// when the supervising task ended without one (its runtime shut down). For a `select!`
    /// against a readiness probe: the watch guard never outlives this future, which keeps the
    /// caller's future `Send`.
    pub async fn exited(&self) -> Option<ExitReport> {
        let mut rx = self.exit_watch();
        rx.wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|r| r.clone())
    }

    /// The exit report, if it has exited.
    pub fn exit_report(&self) -> Option<ExitReport> {
        self.inner.exit_rx.borrow().clone()
    }

    /// True until its exit has been observed (and the child reaped).
    pub fn is_alive(&self) -> bool {
        self.inner.exit_rx.borrow().is_none()
    }

    /// SIGTERM to the group, up to `grace` for it to exit, then SIGKILL to the group; returns once
    /// the child is reaped. Whatever else of the group survived its leader gets SIGKILL too.
    /// Idempotent: later calls (and calls after a natural exit) return the same report.
    pub async fn stop(&self, grace: Duration) -> ExitReport {
        let _guard = self.inner.stop_lock.lock().await;
        if let Some(report) = self.exit_report() {
            return report;
        }
        let pid = self.inner.pid;
        self.inner.requested.store(true, Ordering::SeqCst);
        signal_group_quietly(pid, Signal::SIGTERM);
        let mut rx = self.exit_watch();
        let report = match wait_exit(&mut rx, grace).await {
            Waited::Exited(report) => report,
            // The monitor task is gone (its runtime shut down): nothing left to wait for.
            Waited::MonitorGone => return self.orphaned_report(),
            Waited::TimedOut => {
                tracing::warn!(pid, ?grace, "child ignored SIGTERM; sending SIGKILL");
                signal_group_quietly(pid, Signal::SIGKILL);
                self.wait_exit_after_kill(&mut rx).await
            }
        };
        // Members of the group that outlived the leader (e.g. ignoring SIGTERM): the group ID
        // cannot be reused while any of them lives, so this reaches only them.
        signal_group_quietly(pid, Signal::SIGKILL);
        report
    }

    /// SIGKILL to the group without waiting, for `Drop` of test harnesses and last-resort paths.
    /// The child is still reaped by the supervising task.
    pub fn kill_now(&self) {
        if self.is_alive() {
            self.inner.requested.store(true, Ordering::SeqCst);
            signal_group_quietly(self.inner.pid, Signal::SIGKILL);
        }
    }

    async fn wait_exit_after_kill(
        &self,
        rx: &mut watch::Receiver<Option<ExitReport>>,
    ) -> ExitReport {
        let pid = self.inner.pid;
        loop {
            match wait_exit(rx, Duration::from_secs(10)).await {
                Waited::Exited(report) => return report,
                Waited::MonitorGone => return self.orphaned_report(),
                // SIGKILL cannot be ignored; only uninterruptible sleep delays it. Keep waiting
                // (and saying so) rather than leave a zombie behind.
                Waited::TimedOut => {
                    tracing::warn!(pid, "child still not gone after SIGKILL; waiting")
                }
            }
        }
    }

    fn orphaned_report(&self) -> ExitReport {
        ExitReport {
            status: "unknown (its supervising task ended)".to_string(),
            code: None,
            signal: None,
            stderr_tail: self.stderr_tail(),
            requested: true,
        }
    }
}

enum Waited {
    Exited(ExitReport),
    TimedOut,
    MonitorGone,
}

async fn wait_exit(rx: &mut watch::Receiver<Option<ExitReport>>, bound: Duration) -> Waited {
    match tokio::time::timeout(bound, rx.wait_for(Option::is_some)).await {
        Ok(Ok(report)) => match report.clone() {
            Some(report) => Waited::Exited(report),
            None => Waited::MonitorGone,
        },
        Ok(Err(_)) => Waited::MonitorGone,
        Err(_) => Waited::TimedOut,
    }
}

fn lock(m: &Mutex<StderrTail>) -> std::sync::MutexGuard<'_, StderrTail> {
    // A panic while holding this lock cannot leave the buffer inconsistent in a way that matters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ring buffer of the newest stderr bytes.
#[derive(Default)]
struct StderrTail {
    bytes: VecDeque<u8>,
}

impl StderrTail {
    fn push(&mut self, chunk: &[u8]) {
        let chunk = &chunk[chunk.len().saturating_sub(STDERR_TAIL_BYTES)..];
        let overflow = (self.bytes.len() + chunk.len()).saturating_sub(STDERR_TAIL_BYTES);
        self.bytes.drain(..overflow);
        self.bytes.extend(chunk);
    }
}

impl fmt::Display for StderrTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, b) = self.bytes.as_slices();
        let mut all = Vec::with_capacity(a.len() + b.len());
        all.extend_from_slice(a);
        all.extend_from_slice(b);
        // The ring may have cut a UTF-8 sequence in two: skip the orphaned continuation bytes.
        let start = all
            .iter()
            .position(|&b| b & 0b1100_0000 != 0b1000_0000)
            .unwrap_or(all.len());
        f.write_str(&String::from_utf8_lossy(&all[start..]))
    }
}

async fn drain_stderr(mut pipe: ChildStderr, tail: Arc<Mutex<StderrTail>>, pid: u32) {
    let mut buf = vec![0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                let chunk = &buf[..n];
                for line in String::from_utf8_lossy(chunk).lines() {
                    if !line.trim().is_empty() {
                        tracing::debug!(pid, "stderr: {line}");
                    }
                }
                lock(&tail).push(chunk);
            }
            Err(e) => {
                tracing::debug!(pid, error = %e, "reading child stderr failed");
                break;
            }
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

/// `/proc/PID/cmdline` split on NUL; `None` when the process does not exist (or hides it).
pub fn read_cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args: Vec<String> = raw
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // The kernel terminates every argument with NUL, so the split leaves one empty piece at the end.
    if args.last().is_some_and(String::is_empty) {
        args.pop();
    }
    Some(args)
}

/// True when the process exists and has not finished: a zombie whose threads have all ended
/// only waits for its parent's reap and no longer holds ports or files.
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match proc_state(&format!("/proc/{pid}/stat")) {
        None | Some('X') => false,
        // A leader that has exited is a zombie while its other threads still run, and the
        // process's files (its listening socket among them) stay open until the last one ends:
        // only then is the process gone.
        Some('Z') => std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|dir| {
                dir.flatten().any(|t| {
                    t.file_name().to_str() != Some(&pid.to_string())
                        && !matches!(
                            proc_state(&t.path().join("stat").to_string_lossy()),
                            None | Some('Z') | Some('X')
                        )
                })
            })
            .unwrap_or(false),
        Some(_) => true,
    }
}

/// The state letter of a `/proc/.../stat` file: "PID (comm) S ...", where comm may contain
/// spaces and parentheses, so the state follows the last ')'.
fn proc_state(path: &str) -> Option<char> {
    let stat = std::fs::read_to_string(path).ok()?;
    let i = stat.rfind(')')?;
    stat[i + 1..].split_whitespace().next()?.chars().next()
}

/// Stops a process this run did not spawn (its parent is gone, so it cannot be reaped here):
/// SIGTERM, up to `grace`, SIGKILL, then waits for it to disappear. If it leads its own process
/// group the whole group is signalled, otherwise only the PID (a group that is not its own may
/// hold unrelated processes). Returns whether it was alive. The caller must have verified that
/// the PID is the process it means (e.g. via [`read_cmdline`]): PIDs are reused.
pub async fn stop_group(pid: u32, grace: Duration) -> Result<bool, ChildError> {
    let target = check_signalable(pid)?;
    if !pid_alive(pid) {
        return Ok(false);
    }
    let leads_group = unistd::getpgid(Some(target)).is_ok_and(|g| g == target);
    let send = |sig: Signal| -> Result<(), ChildError> {
        let r = if leads_group {
            signal::killpg(target, sig)
        } else {
            signal::kill(target, sig)
        };
        match r {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(source) => Err(ChildError::Signal {
                pid,
                signal: sig,
                source,
            }),
        }
    };
    send(Signal::SIGTERM)?;
    if wait_gone(pid, grace).await {
        return Ok(true);
    }
    tracing::warn!(pid, ?grace, "process ignored SIGTERM; sending SIGKILL");
    send(Signal::SIGKILL)?;
    if wait_gone(pid, AFTER_KILL_BOUND).await {
        Ok(true)
    } else {
        Err(ChildError::StillAlive {
            pid,
            waited: AFTER_KILL_BOUND,
        })
    }
}

async fn wait_gone(pid: u32, bound: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if !pid_alive(pid) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Quotes arguments for a POSIX shell where needed, so a logged command line can be pasted.
pub fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=+/.,:@%^".contains(&b));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_tail_keeps_the_newest_bytes() {
        let mut t = StderrTail::default();
        t.push(&vec![b'a'; STDERR_TAIL_BYTES - 2]);
        t.push(b"xyz\n");
        let s = t.to_string();
        assert_eq!(s.len(), STDERR_TAIL_BYTES);
        assert!(s.ends_with("xyz\n"));
        assert!(s.starts_with('a'));
        t.push(&vec![b'b'; STDERR_TAIL_BYTES * 2]);
        assert_eq!(t.to_string(), "b".repeat(STDERR_TAIL_BYTES));
    }

    #[test]
    fn stderr_tail_drops_a_cut_utf8_sequence() {
        let mut t = StderrTail::default();
        t.push(&vec![b'a'; STDERR_TAIL_BYTES - 1]);
        t.push("é!".as_bytes());
        assert!(t.to_string().starts_with('a') && t.to_string().ends_with("é!"));
        t.push(&vec![b'c'; STDERR_TAIL_BYTES - 2]);
        // Now the buffer starts with the continuation byte of 'é', then '!'.
        let s = t.to_string();
        assert!(s.starts_with('!'), "{:?}", &s[..4]);
    }

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

    #[test]
    fn shell_words_quotes_only_what_needs_it() {
        let args = ["qemu-nbd", "--export-name=a b", "it's", "", "/x/y.qcow2"].map(String::from);
        assert_eq!(
            shell_words(&args),
            r"qemu-nbd '--export-name=a b' 'it'\''s' '' /x/y.qcow2"
        );
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

    #[test]
    fn pid_alive_and_cmdline_of_this_process() {
        let me = std::process::id();
        assert!(pid_alive(me));
        let cmd = read_cmdline(me).expect("own cmdline");
        let exe = std::env::current_exe().unwrap();
        assert_eq!(
            std::path::Path::new(&cmd[0]).file_name(),
            exe.file_name(),
            "{cmd:?}"
        );
        assert!(!pid_alive(0));
    }
}
