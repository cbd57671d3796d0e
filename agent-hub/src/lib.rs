//! `sendense-hub`: the backup server.
//!
//! - [`qemu_nbd`]: one qemu-nbd per disk: start until an NBD handshake answers, exit watch with
//!   the stderr cause, stop (SIGTERM, grace, SIGKILL, reap), and the reconciler's orphan stop.

pub mod qemu_nbd;
