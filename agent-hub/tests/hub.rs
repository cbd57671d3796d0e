//! Integration tests of `sendense-hub`: the real binary, real qemu-nbd, qemu-img, nbdcopy and
//! (for `mariadb`) a real MariaDB. One test binary, one module per theme.
//!
//! - [`env`]: a hub in a temporary directory, a VM with source disks of known data.
//! - [`backup`]: full then incremental backup of a 2-disk VM, verification, SSE.
//! - [`faults`]: cancel, a killed qemu-nbd, port exhaustion, a squatted port, a full
//!   repository, a tampered checksum, the hub SIGKILLed mid-job.
//! - [`integrity`]: whole-disk checksums, the read-back, a qemu-nbd that does not stop cleanly.
//! - [`input`]: bad JSON, unknown VM, path-escaping names, missing token.
//! - [`mariadb`]: the main backup on MariaDB.
//! - [`nbd_tls`]: a job's export with TLS and client certificates: the writer and the hub get
//!   in, a local user without a certificate and another job's certificate do not.
//! - [`prune`]: prune jobs: keep rules and protected points over merged, rebased and deleted
//!   points that still read their instants; the hub SIGKILLed at each moment of a merge.
//! - [`recoveries`]: instant recoveries: a 2-disk point served over TLS (unix sockets and TCP)
//!   while a stand-in node reports, a SIGKILLed export restarted on its port, refusals naming
//!   the field, the hub SIGKILLed mid-recovery.
//! - [`restore_truth`]: restores refused for a corrupt or unverified point, and compared with
//!   the point's stored checksums (a stand-in node).
//! - [`verify`]: verify jobs: a byte flipped on disk caught, corrupt points and their
//!   dependents, the next backup a full, cancel, bad requests, the scheduler's clock.
//! - [`policies`]: backup policies: refusals naming the field, a scheduled run queued behind a
//!   full port range, one late run after downtime, the backup types over a simulated week.
//! - [`cbt`]: change ids from a stand-in vSphere node into the next incremental, and the
//!   fallback to full without them.

mod hub {
    pub mod backup;
    pub mod cbt;
    pub mod db_down;
    pub mod env;
    pub mod faults;
    pub mod files;
    pub mod input;
    pub mod integrity;
    pub mod mariadb;
    pub mod nbd_tls;
    pub mod policies;
    pub mod prune;
    pub mod recoveries;
    pub mod restore_truth;
    pub mod verify;
    pub mod webhooks;
}
