//! The node's tunnel to the hub: OpenSSH's `ssh` as a supervised child carrying one local
//! forward per NBD port of the hub (10100-10200), one for the hub's API (8082) and one reverse
//! forward from the hub's loopback (9081) to this node's API.
//!
//! - [`config`]: `--tunnel USER@HOST:PORT`, key, known_hosts, bind address, port range.
//! - [`ssh_config`]: the ssh config file (0600, in the run dir) holding the forwards.
//! - [`preflight`]: TCP connect to exactly the configured host and port before every start.
//! - [`supervisor`]: [`Tunnel`]: start, watch, classify, restart with jittered backoff; state.
//! - [`stderr`]: ssh's stderr → `up` markers and a precise cause of each exit.
//! - [`authorized_key`]: `sendense-node tunnel authorized-key`, the hub's restricted key line.
//!
//! # Decisions
//!
//! **When is the tunnel `up`?** When ssh itself said that every forward is established: with
//! `LogLevel DEBUG1` it prints "Local forwarding listening on ADDR port N." once per bound local
//! forward and "forwarding_success: all expected forwarding replies received" once the hub's
//! sshd accepted the remote forward. `ExitOnForwardFailure=yes` makes any failed forward end ssh,
//! so these lines are proof, not a guess. A TCP connect to the local hub-API forward was the
//! alternative, but it only shows that ssh listens (not that the remote forward was accepted),
//! and its channel open makes ssh log "Connection refused" whenever the hub's API is down,
//! which would then look like a tunnel problem. `VERBOSE` does not print the forward lines.
//!
//! **States.** `connecting` from the preflight until the forwards are established, `up` until
//! ssh exits, `down` while waiting to restart (with `last_error` naming why) and after
//! shutdown. `restarts` counts attempts after the first. `last_error` keeps the last cause
//! also once the tunnel is up again, so an operator can see why it restarted.
//!
//! **Restart.** Every exit or failed preflight is followed by a delay of 0.5 s doubling up to
//! 30 s, randomised by ±25 %; a run that stayed up for 60 s resets the doubling.
//!
//! **A port nobody serves gets nothing.** While ssh is down, the node's `-L` port for the hub's
//! API and the hub's `-R` port for the node's API are free ports on loopback that any local
//! user may bind. Three things hold together: (1) the node's hub client sends nothing while
//! this tunnel's state is not `up` (`HubClient::gate_on`; reports wait and retry as for an
//! unreachable hub); (2) both sides prove every new connection before anything is written on
//! it (`sendense_shared::proof`: the endpoint shows a MAC of a fresh nonce under the node's
//! credential, with its role, so a squatter cannot answer and cannot reflect the other side's
//! API); (3) a forward port in use is named with its holder (`port 8082 held by pid 1234
//! (nc -l 8082), user 1001`) in `last_error`, here for the node's local ports and by the hub
//! for its reverse port when its probe's proof fails. The supervisor's backoff retries, so the
//! tunnel comes back once the squatter leaves (`retry_max_secs` of `[tunnel]` caps the wait).
//!
//! **A tunnel drop during a copy fails the job cleanly, it does not resume.** ssh's exit closes
//! every forwarded connection, so the copy engine's NBD connections to the hub's exports fail at
//! once; the job stops its other disks, releases the snapshot as on any failure, and reports
//! `failed` per disk with an error that names the tunnel and its state (see
//! [`Tunnel::describe`]). The final report reaches the hub once the tunnel is back (the node
//! retries it), and the hub then stops its qemu-nbd processes and frees the ports. Resuming
//! would need the copy engine to keep a durable "flushed up to" mark per disk and the hub to
//! keep the half-written target and its export across the failure; a failed job can simply be
//! started again, and the snapshot it would resume from is released anyway. So a retry is a
//! new backup (for an incremental, its dirty bitmaps are still intact: a failed incremental
//! does not consume them).

pub mod authorized_key;
pub mod config;
pub mod preflight;
pub mod ssh_config;
pub mod stderr;
pub mod supervisor;

pub use config::{TunnelArgs, TunnelConfig, TunnelConfigError, TunnelFile};
pub use supervisor::Tunnel;
