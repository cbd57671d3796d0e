//! Helpers for the end-to-end tests (`tests/tests/`) and the hub's integration tests
//! (`agent-hub/tests/`): locating the built binaries, starting them on free loopback ports with
//! temporary data directories, and cleaning up every child in `Drop`. Each helper prints the
//! full command line it runs, so a failing test can be replayed by hand.
//!
//! - [`hub`]: [`hub::HubProcess`], a running `sendense-hub`, and [`hub::Api`], its HTTP client.
//! - [`disks`]: source images with known data (`qemu-img`, `qemu-io`), `nbdcopy` into an
//!   export, `qemu-img compare`.
//! - [`net`]: free port ranges on 127.0.0.1.
//! - [`tmpfs`]: a small mounted tmpfs (a repository that fills up), unmounted in `Drop`.
//! - [`node`]: [`node::NodeProcess`], a running `sendense-node` registered with a test hub.
//! - [`tmux`]: [`tmux::Tmux`], a private tmux server to drive a terminal program (the console).
//! - [`qemu`]: [`qemu::TestVm`], a real `qemu-system-x86_64` with qcow2 disks and a QMP socket
//!   for the node plus one for the test (guest writes, leftover checks).
//! - [`vcsim`]: [`vcsim::Vcsim`], govmomi's vSphere simulator (launcher in `tests/vcsim/`) with a
//!   2-disk VM whose snapshots freeze data and whose CBT answers `QueryChangedDiskAreas`.

pub mod disks;
pub mod hub;
pub mod net;
pub mod node;
pub mod qemu;
pub mod tmpfs;
pub mod tmux;
pub mod vcsim;

use std::path::PathBuf;

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
