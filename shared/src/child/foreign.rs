//! Processes this run did not spawn (found in a database or a journal after a restart): checked
//! through `/proc`, and stopped only after the caller verified the PID is the process it means
//! (PIDs are reused).

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::unistd;

use super::{ChildError, check_signalable};

/// How often [`stop_group`] looks at `/proc` while waiting for a foreign process to go.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// After SIGKILL, how long [`stop_group`] waits before declaring the process unkillable
/// (uninterruptible sleep, e.g. on a dead NFS server).
const AFTER_KILL_BOUND: Duration = Duration::from_secs(5);

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

#[cfg(test)]
mod tests {
    use super::*;

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
