//! qemu-nbd processes a previous hub run left behind: recognised through `/proc/PID/cmdline`
//! (port and export name), since a recorded PID may belong to anything by now.

use std::path::Path;
use std::time::Duration;

use sendense_shared::child;

use super::QemuNbdError;

/// qemu-nbd's port when none is given on its command line.
const QEMU_NBD_DEFAULT_PORT: u16 = 10809;

/// The port and export name a qemu-nbd command line serves, with qemu-nbd's defaults (10809 and
/// the empty name) when not given. `None` when argv[0] is not qemu-nbd.
fn served_by(cmdline: &[String]) -> Option<(u16, String)> {
    let program = Path::new(cmdline.first()?).file_name()?.to_str()?;
    if !program.starts_with("qemu-nbd") {
        return None;
    }
    let mut port = QEMU_NBD_DEFAULT_PORT.to_string();
    let mut export = String::new();
    let mut args = cmdline[1..].iter();
    while let Some(arg) = args.next() {
        let mut take = |slot: &mut String| {
            if let Some(v) = args.next() {
                *slot = v.clone();
            }
        };
        match arg.as_str() {
            "--" => break,
            "-p" | "--port" => take(&mut port),
            // An export of the socket directory names its slot: `<dir>/<port>.sock`.
            "-k" | "--socket" => {
                let mut socket = String::new();
                take(&mut socket);
                if let Some(slot) = sendense_shared::targets::socket_slot(&socket) {
                    port = slot.to_string();
                }
            }
            "-x" | "--export-name" => take(&mut export),
            a => {
                if let Some(v) = a.strip_prefix("--port=") {
                    port = v.to_string();
                } else if let Some(slot) = a
                    .strip_prefix("--socket=")
                    .and_then(sendense_shared::targets::socket_slot)
                {
                    port = slot.to_string();
                } else if let Some(v) = a.strip_prefix("--export-name=") {
                    export = v.to_string();
                } else if let Some(v) = a.strip_prefix("-p").filter(|_| !a.starts_with("--")) {
                    port = v.to_string();
                } else if let Some(v) = a.strip_prefix("-x").filter(|_| !a.starts_with("--")) {
                    export = v.to_string();
                }
            }
        }
    }
    Some((port.parse().ok()?, export))
}

/// True when `/proc/PID/cmdline` is a live qemu-nbd serving this port and export. The reconciler
/// never signals a PID that fails this check: PIDs are reused.
pub fn is_our_qemu_nbd(pid: u32, port: u16, export_name: &str) -> bool {
    if !child::pid_alive(pid) {
        return false;
    }
    read_cmdline_checked(pid)
        .as_deref()
        .and_then(served_by)
        .is_some_and(|(p, e)| p == port && e == export_name)
}

fn read_cmdline_checked(pid: u32) -> Option<Vec<String>> {
    child::read_cmdline(pid).filter(|c| !c.is_empty())
}

/// What [`stop_orphan`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrphanOutcome {
    /// It was our qemu-nbd and is gone now.
    Stopped,
    /// No live process has that PID.
    AlreadyGone,
    /// The PID belongs to something else now; it was left alone.
    NotOurs { cmdline: String },
}

/// The reconciler's stop after a hub restart: checks [`is_our_qemu_nbd`], then stops the process
/// group (SIGTERM, `grace`, SIGKILL).
pub async fn stop_orphan(
    pid: u32,
    port: u16,
    export_name: &str,
    grace: Duration,
) -> Result<OrphanOutcome, QemuNbdError> {
    if !child::pid_alive(pid) {
        return Ok(OrphanOutcome::AlreadyGone);
    }
    if !is_our_qemu_nbd(pid, port, export_name) {
        return Ok(match read_cmdline_checked(pid) {
            Some(cmdline) if child::pid_alive(pid) => OrphanOutcome::NotOurs {
                cmdline: child::shell_words(&cmdline),
            },
            // Kernel threads have an empty command line; they are never ours either.
            None if child::pid_alive(pid) => OrphanOutcome::NotOurs {
                cmdline: String::new(),
            },
            _ => OrphanOutcome::AlreadyGone,
        });
    }
    tracing::info!(
        pid,
        port,
        export = export_name,
        "stopping orphaned qemu-nbd"
    );
    match child::stop_group(pid, grace).await {
        Ok(true) => Ok(OrphanOutcome::Stopped),
        Ok(false) => Ok(OrphanOutcome::AlreadyGone),
        Err(source) => Err(QemuNbdError::StopOrphan { pid, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu_nbd::test_support::{spec, strings};
    use crate::qemu_nbd::{QemuNbdConfig, command_args};

    #[test]
    fn our_own_command_line_is_recognised() {
        let mut cmd = vec!["/usr/bin/qemu-nbd".to_string()];
        cmd.extend(command_args(&QemuNbdConfig::default(), &spec()));
        assert_eq!(served_by(&cmd), Some((10105, "vm1-disk-2000".into())));
    }

    #[test]
    fn other_spellings_and_programs() {
        let c = strings(&["qemu-nbd", "-p", "10100", "-x", "a", "f.qcow2"]);
        assert_eq!(served_by(&c), Some((10100, "a".into())));
        let c = strings(&["qemu-nbd", "-p10101", "-xb", "f.qcow2"]);
        assert_eq!(served_by(&c), Some((10101, "b".into())));
        let c = strings(&["qemu-nbd", "--port", "10102", "--export-name", "c", "f"]);
        assert_eq!(served_by(&c), Some((10102, "c".into())));
        let c = strings(&["qemu-nbd", "f.qcow2"]);
        assert_eq!(served_by(&c), Some((10809, String::new())));
        // After "--" everything is a file name.
        let c = strings(&["qemu-nbd", "--port=1", "--", "--port=2"]);
        assert_eq!(served_by(&c), Some((1, String::new())));
        // nbdcopy running a qemu-nbd: argv[0] decides.
        let c = strings(&[
            "nbdcopy",
            "--",
            "[",
            "qemu-nbd",
            "--port=10105",
            "-x",
            "vm1-disk-2000",
            "]",
        ]);
        assert_eq!(served_by(&c), None);
        assert_eq!(served_by(&strings(&["sleep", "30"])), None);
        assert_eq!(served_by(&[]), None);
        assert_eq!(served_by(&strings(&["qemu-nbd", "--port=notaport"])), None);
        let c = strings(&[
            "qemu-nbd",
            "--export-name=e",
            "--socket=/run/n/10107.sock",
            "f",
        ]);
        assert_eq!(served_by(&c), Some((10107, "e".to_string())));
    }
}
