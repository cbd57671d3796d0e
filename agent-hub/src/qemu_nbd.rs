//! One `qemu-nbd` per disk: the NBD export a backup writes into.
//!
//! Each export is its own qemu-nbd process (own process group, see [`sendense_shared::child`]):
//! `--format=qcow2 --export-name=NAME --bind=ADDR --port=PORT --persistent --shared=N
//! --discard=unmap --detect-zeroes=unmap --cache=MODE [--aio=MODE] [--read-only] FILE`.
//!
//! - `--persistent`: the readiness probe connects and disconnects; without it qemu-nbd would
//!   exit after that first client.
//! - `--shared=N` with N > 1: qemu-nbd 7.2 only advertises multi-conn on a writable export when
//!   it accepts several clients, and writers use several connections per disk.
//! - `--discard=unmap` must precede `--detect-zeroes=unmap` (qemu-nbd 7.2 refuses the other
//!   order), so zeroes written by a copy engine stay holes in the QCOW2.
//! - Ready means an NBD handshake (`NBD_OPT_GO` for this export) succeeded AND the listening
//!   socket on the port belongs to the spawned PID: a foreign server still holding the port (an
//!   old qemu-nbd serving the same export name) answers the handshake while ours is dying of
//!   "Address already in use".
//! - Stop is SIGTERM to the group, `stop_grace`, SIGKILL, reap. qemu-nbd flushes the image on
//!   SIGTERM and exits with status 0.
//! - After a hub restart, [`stop_orphan`] stops a recorded PID only if `/proc/PID/cmdline` is a
//!   qemu-nbd serving the same port and export ([`is_our_qemu_nbd`]): PIDs are reused.
//!
//! ## Cache mode (measured by `bench/qemu-nbd-cache.sh`)
//!
//! Copy of N GiB of random data (from a qcow2 twice that size, the rest holes) by
//! `nbdcopy --destination-is-zero --flush` into a fresh qcow2 served by qemu-nbd with the options
//! above, plus the SIGTERM stop of that qemu-nbd: wall seconds, median of 5 runs with the modes
//! interleaved, on the shared 2-core Debian 12 build machine (qemu 7.2, ext4 on virtio, load
//! average up to 12 from other builds, hence the spread).
//!
//! | cache / aio          | 1 GiB median (range) | 2 GiB median (range) | vs writeback/threads |
//! |----------------------|----------------------|----------------------|----------------------|
//! | writeback / threads  | 3.08 (2.29-3.94)     | 5.90 (5.66-8.18)     | 1.00                 |
//! | writeback / io_uring | 3.39 (2.14-4.47)     | 6.74 (5.65-9.90)     | 1.10-1.14            |
//! | **none / threads**   | **1.78 (1.57-2.39)** | **3.38 (3.14-4.80)** | **0.57-0.58**        |
//! | none / native        | 2.88 (2.66-3.34)     | 4.60 (4.34-8.54)     | 0.78-0.94            |
//! | writethrough/threads | 11.34 (9.38-15.82)   | 30.41 (20.34-32.83)  | 3.7-5.2              |
//! | unsafe / threads     | 2.07 (1.64-5.44)     | 5.70 (3.99-6.45)     | 0.67-0.97            |
//!
//! Default: `cache=none`, `aio=threads`, the fastest in both sizes: a backup target is written
//! once and not read back through this process, so the page cache only costs a copy and a
//! write-back storm at the final flush. On a file system that refuses O_DIRECT the image is served
//! with `cache=writeback` instead (see `config::adapt_to_file_system`).
//!
//! `unsafe` ignores flushes, so an acknowledged backup could be lost on a host crash; it is
//! measured for reference only and never chosen.
//!
//! ## Where the exports listen: unix sockets by default (`nbd_listen`)
//!
//! Exports a node opens listen on `<nbd_socket_dir>/<port>.sock` (`--socket`); the allocator's
//! port numbers are only slot ids then (no TCP bind test, see [`crate::ports`]). The directory is
//! 0750 with the ssh tunnel user's group and each socket 0660 ([`socket_dir`]); the node's ssh
//! reaches them as streamlocal forwards (`-L <node_run>/nbd/N.sock:<dir>/N.sock`, one per slot,
//! static like the TCP forwards were), and the tunnel key names each socket
//! (`permitopen="[<dir>/N.sock]:*"`).
//!
//! **Why this is the default.** qemu-nbd counts a client at `accept`, before any TLS: on TCP,
//! any local user's idle connections (12 were enough) held every `--shared` slot, the job's
//! writer was refused until qemu's handshake timeout dropped them (10 s), and a steady flood
//! could fail the job. TLS with client certificates (below) keeps such a user from reading or
//! writing, but it cannot keep them from connecting. A unix socket in a directory they cannot
//! enter refuses them in `connect(2)` with EACCES, so qemu-nbd never sees them; and a local user
//! who binds the old TCP range no longer starves the allocator (`e2e::flood` floods every
//! socket and port and squats the range during a job: all refused, the job completes verified).
//! An owner-match firewall rule would do the same for TCP, but needs root at run time and a
//! firewall the hub does not own. TLS stays on over the socket (defense in depth: the tunnel
//! user's group reaches every socket, the job's certificate reaches only its own exports).
//! `nbd_listen = "tcp"` keeps `nbd_bind:port` for writers on the hub itself (nbdcopy, tests)
//! and nodes without the tunnel. The hub's own read-backs keep their private 0700 socket
//! directory and no TLS. The cost of both is measured by `bench/tunnel.sh` (see the numbers in
//! `agent-node/src/tunnel.rs`).
//!
//! ## Parts
//!
//! - `config`: [`QemuNbdConfig`] (the `[qemu_nbd]` table) and its checks, [`ExportSpec`], and
//!   [`command_args`], the command line both make.
//! - `process`: [`QemuNbd`], the supervised process: start, readiness, exit watch, stop, and the
//!   cause of an early exit read from its stderr.
//! - `orphans`: [`is_our_qemu_nbd`] and [`stop_orphan`], for PIDs recorded by an earlier run.
//! - `sockets`: [`socket_dir`], the 0750 directory of the exports' unix sockets.
//! - `duration_serde`: the config's durations (`10`, `0.5`, `"500ms"`).

use std::path::PathBuf;
use std::time::Duration;

use sendense_shared::child::ChildError;

mod config;
mod duration_serde;
mod orphans;
mod process;
mod sockets;

pub use config::{ExportSpec, NbdListen, QemuNbdConfig, command_args, socket_path};
pub use orphans::{OrphanOutcome, is_our_qemu_nbd, stop_orphan};
pub use process::QemuNbd;
pub use sockets::socket_dir;

/// Errors of the qemu-nbd manager.
#[derive(Debug, thiserror::Error)]
pub enum QemuNbdError {
    #[error("issuing the export's client certificate")]
    ClientCert(#[source] crate::nbd_ca::NbdCaError),
    #[error("opening the export socket {} to the tunnel's group", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid qemu-nbd setting `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("invalid qemu-nbd export `{field}`: {reason}")]
    InvalidSpec { field: &'static str, reason: String },
    #[error("cannot start qemu-nbd binary `{}`", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "qemu-nbd for export {export:?} on port {port} exited before it was ready ({status}): {cause}"
    )]
    ExitedBeforeReady {
        pid: u32,
        export: String,
        port: u16,
        status: String,
        /// The cause read from stderr ("port 10105 already in use", ...).
        cause: String,
        /// The whole stderr tail.
        stderr: String,
    },
    #[error(
        "qemu-nbd for export {export:?} on port {port} did not answer an NBD handshake within {waited:?} ({last_error}); it was stopped"
    )]
    NotReady {
        pid: u32,
        port: u16,
        export: String,
        waited: Duration,
        last_error: String,
    },
    #[error("cannot stop orphaned qemu-nbd PID {pid}")]
    StopOrphan {
        pid: u32,
        #[source]
        source: ChildError,
    },
}

impl QemuNbdError {
    /// qemu-nbd could not bind its TCP port because another process holds it.
    pub fn port_taken(&self) -> bool {
        matches!(self, QemuNbdError::ExitedBeforeReady { stderr, .. }
            if stderr.contains("Address already in use"))
    }
}

/// What the unit tests of every part start from.
#[cfg(test)]
mod test_support {
    use super::ExportSpec;
    use std::path::PathBuf;

    pub fn spec() -> ExportSpec {
        ExportSpec {
            qcow2_path: PathBuf::from("/repo/vm1/2000/b1.qcow2"),
            export_name: "vm1-disk-2000".into(),
            port: 10105,
            read_only: false,
            socket: None,
            client: None,
        }
    }

    pub fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }
}
