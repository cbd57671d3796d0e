//! A child spawned and supervised here: its own process group, the tail of its stderr, an exit
//! report published once stderr reached EOF, and stop = SIGTERM to the group, bounded wait,
//! SIGKILL, reap.

use std::collections::VecDeque;
use std::fmt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::process::{ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;

use super::{ChildError, ExitReport, STDERR_TAIL_BYTES, shell_words, signal_group_quietly};

/// After the child exits, how long to wait for its stderr pipe to close before publishing the
/// exit report anyway (a grandchild may hold the pipe open).
const STDERR_DRAIN_BOUND: Duration = Duration::from_millis(500);

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
    /// This side sent SIGKILL (the grace ran out, or [`Supervised::kill_now`]).
    killed: Arc<AtomicBool>,
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
    pub fn spawn(cmd: Command) -> Result<Supervised, ChildError> {
        Supervised::spawn_inner(cmd).map(|(s, _)| s)
    }

    /// [`Supervised::spawn`] with stdin and stdout as pipes, handed to the caller: for a child
    /// driven over its stdin (the hub's guestfish sessions).
    pub fn spawn_piped(
        mut cmd: Command,
    ) -> Result<(Supervised, ChildStdin, ChildStdout), ChildError> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let (s, child) = Supervised::spawn_inner(cmd)?;
        let (stdin, stdout) = child;
        match (stdin, stdout) {
            (Some(i), Some(o)) => Ok((s, i, o)),
            _ => {
                s.kill_now();
                Err(ChildError::NoPid {
                    program: s.command_line()[0].clone(),
                })
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn spawn_inner(
        mut cmd: Command,
    ) -> Result<(Supervised, (Option<ChildStdin>, Option<ChildStdout>)), ChildError> {
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
        let pipes = (child.stdin.take(), child.stdout.take());

        let stderr = Arc::new(Mutex::new(StderrTail::default()));
        let drain = child
            .stderr
            .take()
            .map(|pipe| tokio::spawn(drain_stderr(pipe, Arc::clone(&stderr), pid)));
        let requested = Arc::new(AtomicBool::new(false));
        let killed = Arc::new(AtomicBool::new(false));
        let (exit_tx, exit_rx) = watch::channel(None);

        let monitor_stderr = Arc::clone(&stderr);
        let monitor_requested = Arc::clone(&requested);
        let monitor_killed = Arc::clone(&killed);
        tokio::spawn(async move {
            // `wait` reaps: once it returns, the PID may be reused by the system.
            let status = child.wait().await;
            if let Some(drain) = drain {
                let _ = tokio::time::timeout(STDERR_DRAIN_BOUND, drain).await;
            }
            let tail = lock(&monitor_stderr).to_string();
            let asked = monitor_requested.load(Ordering::SeqCst);
            let report = match status {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    // A death by a signal this side did not send is not the stop's, even while
                    // a stop was under way (a SIGKILL from elsewhere racing our SIGTERM).
                    let ours = match status.signal() {
                        None => true,
                        Some(s) if s == Signal::SIGTERM as i32 => true,
                        Some(s) if s == Signal::SIGKILL as i32 => {
                            monitor_killed.load(Ordering::SeqCst)
                        }
                        Some(_) => false,
                    };
                    ExitReport::from_status(&status, tail, asked && ours)
                }
                Err(e) => ExitReport {
                    status: format!("unknown (waiting for it failed: {e})"),
                    code: None,
                    signal: None,
                    stderr_tail: tail,
                    requested: asked,
                },
            };
            tracing::debug!(pid, status = %report.status, requested = report.requested, "child exited");
            exit_tx.send_replace(Some(report));
        });

        Ok((
            Supervised {
                inner: Arc::new(Inner {
                    pid,
                    command_line,
                    stderr,
                    exit_rx,
                    requested,
                    killed,
                    stop_lock: tokio::sync::Mutex::new(()),
                }),
            },
            pipes,
        ))
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
                self.inner.killed.store(true, Ordering::SeqCst);
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
            self.inner.killed.store(true, Ordering::SeqCst);
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
}
