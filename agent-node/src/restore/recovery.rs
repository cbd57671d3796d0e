//! Start-up recovery of restores a killed node left: for every journal entry, the private
//! qemu-nbd it names is stopped when `/proc/PID/cmdline` shows it is still that qemu-nbd
//! (qemu-nbd serving that socket and that image: PIDs are reused, and a process is never found
//! by its name), then the partial image and the socket are deleted, and the entry goes last (a
//! recovery that could not finish is retried at the next start).
//!
//! Runs before the API serves, so no restore of this process can be mistaken for a leftover.

use super::journal;
use sendense_shared::child;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a leftover qemu-nbd may take to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What [`recover`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreRecovery {
    /// "qemu-nbd PID 123 (restore r1)" for each stopped process.
    pub stopped: Vec<String>,
    pub files_removed: Vec<PathBuf>,
    pub errors: Vec<String>,
}

/// True when `pid` is alive and is qemu-nbd serving `socket` from `image`.
pub fn is_our_qemu_nbd(pid: u32, socket: &Path, image: &Path) -> bool {
    if !child::pid_alive(pid) {
        return false;
    }
    let Some(cmdline) = child::read_cmdline(pid) else {
        return false;
    };
    let is_qemu_nbd = cmdline
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == "qemu-nbd");
    let socket = socket.to_string_lossy();
    is_qemu_nbd
        && cmdline.windows(2).any(|w| w[0] == "-k" && w[1] == socket)
        && cmdline.last().map(String::as_str) == Some(&*image.to_string_lossy())
}

/// Undoes every restore journalled in `run_dir`.
pub async fn recover(run_dir: &Path) -> RestoreRecovery {
    let mut report = RestoreRecovery::default();
    for (path, entry) in journal::all(run_dir) {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // Not ours to interpret: left for an operator, named in the log.
                report.errors.push(e);
                continue;
            }
        };
        let mut done = true;
        if let Some(pid) = entry.qemu_nbd_pid
            && is_our_qemu_nbd(pid, &entry.socket, &entry.image)
        {
            match child::stop_group(pid, STOP_GRACE).await {
                Ok(_) => report
                    .stopped
                    .push(format!("qemu-nbd PID {pid} (restore {})", entry.restore_id)),
                Err(e) => {
                    done = false;
                    report.errors.push(format!(
                        "qemu-nbd PID {pid} of restore {}: {}",
                        entry.restore_id,
                        sendense_shared::errors::chain(&e)
                    ));
                }
            }
        }
        for f in [&entry.image, &entry.socket] {
            match std::fs::remove_file(f) {
                Ok(()) => report.files_removed.push(f.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    done = false;
                    report.errors.push(format!("{}: {e}", f.display()));
                }
            }
        }
        if done {
            match journal::remove(&path) {
                Ok(()) => report.files_removed.push(path),
                Err(e) => report.errors.push(format!("{}: {e}", path.display())),
            }
        }
    }
    // Half-written journal files (a crash between write and rename) name nothing complete.
    if let Ok(dir) = std::fs::read_dir(run_dir) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(journal::PREFIX)
                && name.ends_with(".json.tmp")
                && std::fs::remove_file(e.path()).is_ok()
            {
                report.files_removed.push(e.path());
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use journal::Entry;

    #[tokio::test]
    async fn a_journalled_qemu_nbd_is_stopped_and_a_reused_pid_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("r1.qcow2");
        let socket = dir.path().join("restore-r1.sock");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg("1M")
            .status()
            .unwrap();
        assert!(st.success());
        let mut cmd = tokio::process::Command::new("qemu-nbd");
        cmd.args(["-f", "qcow2", "-x", "restore", "-t", "-k"])
            .arg(&socket)
            .arg(&image)
            .process_group(0);
        let mut server = cmd.spawn().unwrap();
        let pid = server.id().unwrap();
        // A process that is not qemu-nbd, recorded as if its PID had been reused.
        let mut sleeper = tokio::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let sleeper_pid = sleeper.id().unwrap();
        let other_image = dir.path().join("r2.qcow2");
        std::fs::write(&other_image, b"partial").unwrap();
        for (id, image, socket, pid) in [
            ("r1", image.clone(), socket.clone(), pid),
            (
                "r2",
                other_image.clone(),
                dir.path().join("restore-r2.sock"),
                sleeper_pid,
            ),
        ] {
            journal::write(
                &journal::path(dir.path(), id),
                &Entry {
                    restore_id: id.into(),
                    image,
                    socket,
                    qemu_nbd_pid: Some(pid),
                },
            )
            .unwrap();
        }
        let t = std::time::Instant::now();
        while !socket.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "qemu-nbd did not listen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::write(dir.path().join("restore-r3.json.tmp"), "{").unwrap();

        let report = recover(dir.path()).await;
        assert_eq!(report.errors, Vec::<String>::new());
        assert_eq!(
            report.stopped,
            vec![format!("qemu-nbd PID {pid} (restore r1)")]
        );
        // Stopped by SIGTERM (recovery waited until it was gone); reaped here, its parent.
        server.wait().await.unwrap();
        assert!(!image.exists() && !other_image.exists());
        assert!(
            sleeper.try_wait().unwrap().is_none(),
            "the reused PID is left alone"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert!(left.is_empty(), "{left:?}");
        let _ = sleeper.kill().await;
        assert_eq!(recover(dir.path()).await, RestoreRecovery::default());
    }
}
