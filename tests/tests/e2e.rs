//! End-to-end tests: the real `sendense-hub` and `sendense-node` binaries, a real
//! `qemu-system-x86_64` VM with two qcow2 disks, the hub's real qemu-nbd exports.
//!
//! The binaries are taken from `target/<profile>/` (see [`sendense_tests::bin_path`]); build them
//! first: `cargo build -p agent-hub -p agent-node --bins && cargo test -p sendense-tests --test e2e`
//! (`cargo test --workspace` and `scripts/test.sh` build them anyway).
//!
//! - [`e2e::sys`]: one hub + one node + one VM, the data written into the VM's disks, the checks every
//!   test repeats (nothing held afterwards, the copy equal to the snapshot).
//! - [`e2e::backup`]: full and incremental backups with guest writes in flight, inventory.
//! - [`e2e::faults`]: a process killed by PID mid-copy, a repository filling up, a tampered target.
//! - [`e2e::cancel`]: cancel in each phase of a job.
//! - [`e2e::guest`]: a real Linux guest (writer running) frozen through its agent for the
//!   snapshot, its restored data disk checked; crash-consistent with the agent stopped.
//! - [`e2e::integrity`]: garbage where the node wrote nothing (a hole, an unchanged area of an
//!   incremental) fails the whole-disk read-back.
//! - [`e2e::concurrency`]: several VMs at once and the port ceiling.
//! - [`e2e::console_live`]: the real console in tmux, driven by keys (also needs
//!   `cargo build --bin sendense-console`).
//! - [`e2e::trust`]: node credentials and their scopes, repository roots, secret file modes,
//!   restores that cannot destroy.
//! - [`e2e::squatter`]: squatters on both forwarded ports of a killed tunnel get no credential,
//!   are named in both tunnel states, and the tunnel comes back after they leave.
//! - [`e2e::tunnel`]: a full backup with hub and node talking only through the SSH tunnel.
//! - [`e2e::vcsim_harness`]: the vSphere simulator harness itself (needs Go and govmomi:
//!   `scripts/setup.sh packages`).
//! - [`e2e::vsphere`]: backups of a simulated vSphere VM through hub and node.

mod e2e {
    pub mod backup;
    pub mod cancel;
    pub mod concurrency;
    pub mod console_live;
    pub mod faults;
    pub mod guest;
    pub mod integrity;
    pub mod restore;
    pub mod squatter;
    pub mod sys;
    pub mod trust;
    pub mod tunnel;
    pub mod vcsim_harness;
    pub mod vsphere;
}
