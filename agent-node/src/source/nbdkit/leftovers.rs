//! Start-up recovery of nbdkits a crashed run left: the pid files of the run directory, each
//! process checked through `/proc` before it is stopped (PIDs are reused), and every
//! `nbdkit-*` file removed.

use super::{FILE_PREFIX, PidFile, STOP_GRACE};
use sendense_shared::child;
use std::path::{Path, PathBuf};

/// What [`stop_leftovers`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LeftoverReport {
    /// "nbdkit PID 123 (socket ...)" for each stopped process.
    pub stopped: Vec<String>,
    pub files_removed: Vec<PathBuf>,
    pub errors: Vec<String>,
}

/// True when `pid` is alive and its command line is nbdkit serving `socket`.
pub fn is_our_nbdkit(pid: u32, socket: &Path) -> bool {
    if !child::pid_alive(pid) {
        return false;
    }
    let Some(cmdline) = child::read_cmdline(pid) else {
        return false;
    };
    let is_nbdkit = cmdline
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("nbdkit"));
    let socket = socket.to_string_lossy();
    is_nbdkit
        && cmdline
            .windows(2)
            .any(|w| (w[0] == "--unix" || w[0] == "-U") && w[1] == socket)
}

/// Start-up recovery: stops every nbdkit recorded in a pid file of `run_dir` that still is our
/// nbdkit (checked through `/proc`), and removes every `nbdkit-*` file left there.
pub async fn stop_leftovers(run_dir: &Path) -> LeftoverReport {
    let mut report = LeftoverReport::default();
    let Ok(dir) = std::fs::read_dir(run_dir) else {
        return report;
    };
    let mut files: Vec<PathBuf> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(FILE_PREFIX))
        })
        .collect();
    files.sort();
    for pid_path in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "pid"))
    {
        let record = std::fs::read_to_string(pid_path)
            .ok()
            .and_then(|t| serde_json::from_str::<PidFile>(&t).ok());
        let Some(record) = record else {
            report
                .errors
                .push(format!("{}: not a pid file of ours", pid_path.display()));
            continue;
        };
        if !is_our_nbdkit(record.pid, &record.socket) {
            continue;
        }
        match child::stop_group(record.pid, STOP_GRACE).await {
            Ok(_) => report.stopped.push(format!(
                "nbdkit PID {} ({})",
                record.pid,
                record.socket.display()
            )),
            Err(e) => report.errors.push(format!(
                "nbdkit PID {} ({}): {e}",
                record.pid,
                record.socket.display()
            )),
        }
    }
    for f in files {
        if std::fs::remove_file(&f).is_ok() {
            report.files_removed.push(f);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use sendense_shared::child::Supervised;
    use std::process::Stdio;
    use std::time::Duration;
    use tokio::process::Command;

    #[tokio::test]
    async fn leftovers_are_stopped_only_when_they_are_our_nbdkit() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbdkit-old-2000.sock");
        // An nbdkit a crashed run left, recorded in its pid file.
        let mut cmd = Command::new("nbdkit");
        cmd.args(["--foreground", "--unix"])
            .arg(&sock)
            .args(["memory", "1M"])
            .stdin(Stdio::null());
        let nbdkit = Supervised::spawn(cmd).unwrap();
        let record = PidFile {
            pid: nbdkit.pid(),
            socket: sock.clone(),
            export: "e".into(),
        };
        std::fs::write(
            dir.path().join("nbdkit-old-2000.pid"),
            serde_json::to_string(&record).unwrap(),
        )
        .unwrap();
        // A pid file whose PID is now something else: left alone.
        let mut other = Command::new("sleep");
        other.arg("30").stdin(Stdio::null());
        let sleeper = Supervised::spawn(other).unwrap();
        let record = PidFile {
            pid: sleeper.pid(),
            socket: dir.path().join("nbdkit-other-2001.sock"),
            export: "e".into(),
        };
        std::fs::write(
            dir.path().join("nbdkit-other-2001.pid"),
            serde_json::to_string(&record).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join("nbdkit-old-2000.cookie"), "c").unwrap();
        std::fs::write(dir.path().join("unrelated"), "u").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "nbdkit did not listen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(is_our_nbdkit(nbdkit.pid(), &sock));
        assert!(!is_our_nbdkit(sleeper.pid(), &sock));
        let report = stop_leftovers(dir.path()).await;
        assert_eq!(report.stopped.len(), 1, "{report:?}");
        assert!(report.stopped[0].contains(&nbdkit.pid().to_string()));
        let mut exit = nbdkit.exit_watch();
        tokio::time::timeout(Duration::from_secs(10), exit.wait_for(Option::is_some))
            .await
            .expect("nbdkit gone")
            .unwrap();
        assert!(
            sleeper.is_alive(),
            "a process that is not our nbdkit is left alone"
        );
        sleeper.stop(Duration::from_secs(1)).await;
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["unrelated"]);
    }
}
