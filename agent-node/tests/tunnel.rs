//! Integration tests of the tunnel against a real OpenSSH `sshd` (generated host and user keys,
//! the restricted key line of `sendense-node tunnel authorized-key`), real `ssh`, real
//! `qemu-nbd`. Forwards bind 127.0.0.2 so they never collide with the hub side's 127.0.0.1.

#[path = "tunnel/support.rs"]
mod support;

// The node's own test harness: a real QEMU VM, a recording hub.
#[allow(dead_code)]
#[path = "node/support.rs"]
mod node_support;

#[path = "tunnel/job.rs"]
mod job;

#[path = "tunnel/flow.rs"]
mod flow;

#[path = "tunnel/errors.rs"]
mod errors;

#[path = "tunnel/restricted.rs"]
mod restricted;

#[path = "tunnel/daemon.rs"]
mod daemon;

#[path = "tunnel/links.rs"]
mod links;
