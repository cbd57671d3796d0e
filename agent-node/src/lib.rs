//! `sendense-node`: the agent next to the hypervisor. Takes one consistent snapshot of every
//! disk of a VM, copies the disks over NBD to the hub's exports, reports progress.
//!
//! - [`config`]: command line, config file and environment, merged into one [`config::NodeConfig`].
//! - [`qmp`]: QMP client (unix socket, command ids, interleaved events, command log).
//! - [`qga`]: QEMU guest agent client (sync with a random id, fsfreeze freeze/thaw/status,
//!   each bounded), what [`source::qemu`] freezes the guest with for a snapshot.
//! - [`source`]: the source-driver trait (VMs, disks, snapshot, export, release, recovery);
//!   [`source::qemu`] implements it for QEMU/KVM with image fleecing, [`source::vsphere`] for
//!   vCenter/ESXi (one VM snapshot, CBT areas, disks exported by [`source::nbdkit`]), and
//!   [`source::multi`] puts several behind one.
//! - [`jobs`]: backup jobs (snapshot, parallel copy of all disks, progress, completion, release),
//!   the pure start validation ([`jobs::plan`]) and the [`jobs::JobContext`] every job kind runs on.
//! - [`hub_client`]: the node's hub client (the shared `sendense_shared::client::HubClient`
//!   with the node's token and `User-Agent`), its retry pacing, and the one retry loop of
//!   final reports.
//! - [`api`]: the node's HTTP API (axum) and `serve`.
//! - [`metrics`]: Prometheus metrics (`GET /api/v1/metrics`) read from the node's state.
//! - [`daemon`]: wires config, driver, recovery, hub registration and the API together.
//! - [`restore`]: restore jobs: a backup point from the hub's export into a new image, verified,
//!   journalled ([`restore::journal`]) and undone by start-up recovery ([`restore::recovery`]).
//! - [`instant`]: the instant recovery engine: QEMU on local overlays backed by the hub's NBD
//!   exports (unix or TCP, TLS), one block-stream per disk, resume, drop of the NBD nodes.
//! - [`recovery`]: instant recovery jobs on that engine: validated, journalled
//!   ([`recovery::journal`]), watched and reported; the VM outlives the node, and start-up
//!   ([`recovery::adopt`]) re-adopts a journalled VM or cleans up after it.
//! - [`copy`]: the NBD copy engine (one disk, source export to target export) with the
//!   checksums of what it wrote and the whole-disk checksum grid ([`copy::grid`]), and the
//!   `sendense-node copy` command.
//! - [`tunnel`]: the supervised OpenSSH tunnel to the hub (forwards, state, restarts) and
//!   `sendense-node tunnel authorized-key`.
//! - [`logging`]: the stderr subscriber, text or JSON lines (`--log-format`).
//! - [`fsutil`]: [`fsutil::atomic_write`], how every crash journal is written (temp file 0600,
//!   fsync, rename).
//!
//! The vSphere SOAP client the vSphere driver calls is its own crate, [`sendense_vsphere`]
//! (`vsphere-client/`).

pub mod api;
pub mod config;
pub mod copy;
pub mod daemon;
pub mod fsutil;
pub mod hub_client;
pub mod instant;
pub mod jobs;
pub mod logging;
pub mod metrics;
pub mod qga;
pub mod qmp;
pub mod recovery;
pub mod restore;
pub mod source;
pub mod tunnel;
