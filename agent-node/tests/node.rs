//! Integration tests of the node against a real QEMU (`qemu-system-x86_64`, TCG), real NBD
//! exports and real `qemu-img`/`qemu-nbd`; restores and instant recoveries from a real read-only
//! qemu-nbd.

#[path = "node/support.rs"]
mod support;

#[path = "node/snapshot.rs"]
mod snapshot;

#[path = "node/freeze.rs"]
mod freeze;

#[path = "node/backup.rs"]
mod backup;

#[path = "node/api.rs"]
mod api;

#[path = "node/restore.rs"]
mod restore;

#[path = "node/recovery.rs"]
mod recovery;

#[path = "copy_engine/grid_reference.rs"]
mod grid_reference;
