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
//! - [`e2e::instant`]: instant recovery of the real guest through hub and node: the guest up
//!   before half its data is home, a stalled export paused and resumed, no NBD node at the end,
//!   the guest's acknowledged writes kept; a cancel leaves nothing.
//! - [`e2e::files`]: file-level browsing of a backup point in a libguestfs appliance: listings
//!   with metadata, tar downloads byte-equal, links returned as links, bad paths named, a killed
//!   hub leaves no appliance.
//! - [`e2e::bootcheck`]: verify jobs that boot a point on the hub: a good point passes, a broken
//!   root fails with its console lines; cancel and a hub crash mid-boot leave nothing.
//! - [`e2e::integrity`]: garbage where the node wrote nothing (a hole, an unchanged area of an
//!   incremental) fails the whole-disk read-back.
//! - [`e2e::metrics`]: the metrics pass promtool on live scrapes, a real Prometheus scrapes hub
//!   and node and sees a finished backup, the alert rules pass their unit tests.
//! - [`e2e::policies`]: ninety simulated days of a daily policy (test clock): the surviving
//!   points equal the PBS rules, survivors read equal to their instants, no stray file.
//! - [`e2e::concurrency`]: several VMs at once and the port ceiling.
//! - [`e2e::console_policies`]: the Policies view in tmux against the real stack: protect a
//!   point, preview and run a prune with keys.
//! - [`e2e::console_live`]: the real console in tmux, driven by keys (also needs
//!   `cargo build --bin sendense-console`).
//! - [`e2e::trust`]: node credentials and their scopes, repository roots, secret file modes,
//!   restores that cannot destroy.
//! - [`e2e::squatter`]: squatters on both forwarded ports of a killed tunnel get no credential,
//!   are named in both tunnel states, and the tunnel comes back after they leave.
//! - [`e2e::stalls`]: a target or a source that stops answering mid-copy fails the job at the
//!   node's watchdog, named, with nothing held.
//! - [`e2e::flood`]: an unprivileged local user floods every NBD endpoint during a job through
//!   the tunnel and squats the NBD port range; every connect is refused, the job completes.
//! - [`e2e::tunnel`]: a full backup with hub and node talking only through the SSH tunnel.
//! - [`e2e::vcsim_harness`]: the vSphere simulator harness itself (needs Go and govmomi:
//!   `scripts/setup.sh packages`).
//! - [`e2e::vsphere`]: backups of a simulated vSphere VM through hub and node.

mod e2e {
    pub mod backup;
    pub mod bootcheck;
    pub mod cancel;
    pub mod concurrency;
    pub mod console_cli;
    pub mod console_live;
    pub mod console_policies;
    pub mod faults;
    pub mod files;
    pub mod flood;
    pub mod guest;
    pub mod instant;
    pub mod integrity;
    pub mod metrics;
    pub mod policies;
    pub mod restore;
    pub mod squatter;
    pub mod stalls;
    pub mod sys;
    pub mod trust;
    pub mod tunnel;
    pub mod vcsim_harness;
    pub mod vsphere;
}
