//! The node's tunnel to the hub: OpenSSH's `ssh` as a supervised child carrying one local
//! forward per NBD slot of the hub (10100-10200: by default a streamlocal forward from
//! `<run_dir>/nbd/N.sock`, 0700 directory, to the hub's export socket `<hub_nbd_dir>/N.sock`;
//! with `nbd = "tcp"` a TCP forward of port N), one for the hub's API (8082) and one reverse
//! forward from the hub's loopback (9081) to this node's API. [`Tunnel::route`] turns the hub's
//! socket path in a job's targets into the local end of its forward.
//!
//! - [`config`]: `--tunnel USER@HOST:PORT`, key, known_hosts, bind address, port range.
//! - [`ssh_config`]: the ssh config file (0600, in the run dir) holding the forwards.
//! - [`preflight`]: TCP connect to exactly the configured host and port before every start.
//! - [`supervisor`]: [`Tunnel`]: one ssh per link: start, watch, classify, restart with jittered
//!   backoff; the links' states and the tunnel's made of them.
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
//! **Links: several ssh processes share the forwards** (`[tunnel] links`, default 4). Link `k`
//! carries the NBD slots `first + k`, `first + k + links`, ... (the hub hands out the lowest
//! free slots, so the disks of one job land on different links), link 0 also the hub API
//! forward and the reverse forward; each is its own ssh connection with its own config file
//! (`tunnel.ssh_config`, `tunnel.K.ssh_config`), the same key and the same `authorized_keys`
//! line (every link asks for a subset of what the line permits). Each link is supervised on
//! its own: a SIGKILL of one restarts that one, the disks on its slots fail, the others go on.
//! The tunnel's state is made of them: `up` when every link is, `down` when one is,
//! `connecting` else; `restarts` their sum; `last_error` the newest, as `link K of N: ...`
//! (with one link exactly as before); `links` lists each (state, since, restarts, last error,
//! PID, slots). The hub client's gate watches link 0 alone: the hub's API is served while it is
//! up, whatever an NBD-only link does. Why: one ssh process encrypts every byte of every disk
//! in one thread; on a shared machine it gets one process's share of the CPU however many
//! disks it carries (see the numbers below). OpenSSH has no knob for its 16 KiB reads or its
//! 2 MiB channel window, so more processes, not bigger buffers, is what spreads the work.
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
//! **What the tunnel and the NBD authentication cost** (`bench/tunnel.sh 1024 5`, release
//! build, 1 GiB of random data in a 2 GiB qcow2, `sendense-node copy --destination-is-zero`
//! into a target with the hub's qemu-nbd options, sshd and ssh on the same loopback, AES-GCM;
//! median MiB/s of 5 runs, round-robin, on the shared 2-core machine at load 5.2-7.7):
//!
//! | exports        | direct | tunnel | tunnel/direct |
//! |----------------|--------|--------|---------------|
//! | tcp, plain     | 412.6  | 234.1  | 0.57          |
//! | tcp, TLS x509  | 336.8  | 194.3  | 0.58          |
//! | unix, plain    | 442.0  | 224.0  | 0.51          |
//! | unix, TLS x509 | 315.4  | 179.6  | 0.57          |
//!
//! TLS/plain: 0.82 direct and 0.83 through the tunnel on TCP, 0.71 and 0.80 on unix sockets.
//! The unix sockets (the default) cost nothing measurable against TCP through the tunnel
//! (179.6 against 194.3 MiB/s with TLS is within the runs' spread: 143-218 against 192-230); the one ssh
//! process encrypting on one core stays the bound, TLS adds a second encryption of the same
//! bytes. An earlier 512 MiB x 3 run at load 2.9-5.5 gave the same picture (tunnel/direct
//! 0.49-0.58, TLS/plain 0.75-0.84).
//!
//! **Links, measured** (`bench/tunnel-disks.sh 512 5`, 512 MiB of data per disk, unix sockets,
//! plain NBD, all disks at once; median tunnel/direct ratio of 5 paired runs at load 12-28):
//!
//! | disks | direct MiB/s | 1 link | 2 links | 4 links |
//! |-------|--------------|--------|---------|---------|
//! | 1     | 454          | 0.53   | 0.53    | 0.50    |
//! | 2     | 513          | 0.32   | 0.39    | 0.36    |
//! | 4     | 447          | 0.23   | 0.33    | 0.39    |
//!
//! One ssh carrying four disks got less than one disk alone (110 against 206 MiB/s); four links
//! gave 192. What bounds one disk is CPU, not a core: per GiB the direct copy costs 2.4 CPU
//! seconds (copy engine 0.9, source qemu-nbd 0.44, target qemu-nbd 1.08), the tunnel adds ssh
//! 0.75 and sshd 0.68 (and a little more in the target and the copy): 1.7× in all, so with
//! every core busy the tunnel delivers about 0.6 of direct at best, whatever the links.
//! aes128-gcm stays first (chacha20-poly1305: 1.6× the ssh CPU, 142 against 240 MiB/s); two
//! NBD connections per disk through one link did not help (208 against 240 MiB/s).
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
