//! `sendense-node`: the agent next to the hypervisor.
//!
//! - [`copy`]: the NBD copy engine (one disk, source export to target export) and the
//!   `sendense-node copy` command.

pub mod copy;
