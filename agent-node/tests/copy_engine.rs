//! The copy engine between real `qemu-nbd` exports of qcow2 images, checked with
//! `qemu-img compare` and by reading the target back.

#[path = "copy_engine/support.rs"]
mod support;

#[path = "copy_engine/full.rs"]
mod full;

#[path = "copy_engine/incremental.rs"]
mod incremental;

#[path = "copy_engine/cli.rs"]
mod cli;

#[path = "copy_engine/nbdkit.rs"]
mod nbdkit;

#[path = "copy_engine/areas.rs"]
mod areas;

#[path = "copy_engine/grid_reference.rs"]
mod grid_reference;

#[path = "copy_engine/grid.rs"]
mod grid;

#[path = "copy_engine/relay.rs"]
mod relay;
