//! The one test harness of the workspace: the end-to-end tests (`tests/tests/`) and the
//! integration tests of the hub, the node and `shared` use it. Locating the built binaries,
//! starting them on free loopback ports with temporary data directories, and cleaning up every
//! child in `Drop`. Each helper prints the
//! full command line it runs, so a failing test can be replayed by hand.
//!
//! - [`hub`]: [`hub::HubProcess`], a running `sendense-hub`, and [`hub::Api`], its HTTP client.
//! - [`disks`]: source images with known data (`qemu-img`, `qemu-io`), `nbdcopy` into an
//!   export, `qemu-img compare`.
//! - [`guest`]: the real Linux guest (`scripts/guest.sh`, cached under `target/guest/`) a
//!   [`qemu::TestVm`] boots with [`qemu::VmOptions::guest`], and its writer's records.
//! - [`net`]: free port ranges on 127.0.0.1.
//! - [`cli_docs`]: checks of the man pages, completions and JSON logs of each binary.
//! - [`mariadb`]: [`mariadb::PrivateMariaDb`], a MariaDB server of one test's own (its own data
//!   directory and port), stopped and started again by PID to take the database away mid-job.
//! - [`tmpfs`]: a small mounted tmpfs (a repository that fills up), unmounted in `Drop`.
//! - [`nbd`]: [`nbd::QemuNbd`], a real `qemu-nbd` export (TCP or unix socket, read-only or
//!   writable, started from sync or async code).
//! - [`node`]: [`node::NodeProcess`], a running `sendense-node` (with or without a hub, with
//!   VMs, a copy throttle, a tunnel, more flags and config as [`node::NodeOptions`] says).
//! - [`sshd`]: [`sshd::Sshd`], a real OpenSSH sshd with generated keys and the node's restricted
//!   key line, for tunnel tests.
//! - [`tmux`]: [`tmux::Tmux`], a private tmux server to drive a terminal program (the console).
//! - [`qemu`]: [`qemu::TestVm`], a real `qemu-system-x86_64` with qcow2 disks and a QMP socket
//!   for the node plus one for the test (guest writes, leftover checks, bitmaps), and on
//!   request one for an observer.
//! - [`vcsim`]: [`vcsim::Vcsim`], govmomi's vSphere simulator (launcher in `tests/vcsim/`) with a
//!   2-disk VM whose snapshots freeze data and whose CBT answers `QueryChangedDiskAreas`.

pub mod cli_docs;
pub mod disks;
pub mod guest;
pub mod hub;
pub mod mariadb;
pub mod nbd;
pub mod net;
pub mod node;
pub mod qemu;
pub mod sshd;
pub mod tmpfs;
pub mod tmux;
pub mod vcsim;

use std::path::PathBuf;

/// The first file `name` in a directory of `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// A binary of this workspace, next to the running test's `deps/` (or example's `examples/`)
/// directory (`target/debug/<name>`). Tests in the crate that owns a binary should prefer
/// `env!("CARGO_BIN_EXE_<name>")`.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") || d.ends_with("examples") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("executable lives in target/<profile>/{deps,examples}");
    dir.join(name)
}

/// Runs a command, printing it first; panics with its output when it fails.
pub fn run(cmd: &mut std::process::Command) -> std::process::Output {
    eprintln!("+ {}", describe(cmd));
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)));
    assert!(
        out.status.success(),
        "{} failed: {}\nstdout: {}\nstderr: {}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// [`run`], answering the command's stdout as text.
pub fn run_stdout(cmd: &mut std::process::Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// Everything a child wrote so far into its log file (empty when there is none yet).
pub fn read_log(path: &std::path::Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Waits until the log at `log_path` has a line holding `marker` and a word `KEY=VALUE`
/// (`key` is `"KEY="`), colour codes ignored; answers VALUE. Fails with the log when `child`
/// exits first or `limit` passes.
pub(crate) fn wait_for_log_value(
    program: &str,
    child: &mut Option<std::process::Child>,
    log_path: &std::path::Path,
    marker: &str,
    key: &str,
    limit: std::time::Duration,
) -> anyhow::Result<String> {
    let t = std::time::Instant::now();
    loop {
        let log = strip_ansi(&read_log(log_path));
        if let Some(value) = log
            .lines()
            .filter(|l| l.contains(marker))
            .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(key)))
        {
            return Ok(value.to_string());
        }
        if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            anyhow::bail!("{program} exited with {status} before logging {marker:?}:\n{log}");
        }
        if t.elapsed() > limit {
            anyhow::bail!("{program} did not log {marker:?} within {limit:?}:\n{log}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The text without terminal colour sequences (`ESC [ ... m`), whatever the logger chose.
pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The command line as a shell would show it.
pub fn describe(cmd: &std::process::Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.contains([' ', '[', ']', '"', '\'']) || a.is_empty() {
            s.push_str(&format!(" '{a}'"));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// Whether a process with this PID exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The direct children of `pid` (every thread's `children` list).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}
