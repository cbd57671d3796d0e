//! A small vSphere (vim25 SOAP) client for the dozen calls the vSphere source driver needs:
//! session, inventory of VMs and their disks, snapshots, changed block tracking, tasks.
//!
//! # Why our own client and not `vim_rs`
//! `vim_rs` 0.7 binds the whole vSphere API: a 4 MB crate of about 935,000 lines of generated
//! Rust (`src/types/structs.rs` alone is 19 MB), 22 times this whole workspace (42,700 lines),
//! plus a proc-macro crate, `phf`, `miniserde`, `indexmap` and `env_logger`. It speaks the JSON
//! API by default (the govmomi simulator we test against, and vCenter before 8.0U1, speak only
//! SOAP; SOAP is its `xml` feature on top), and its default client turns on `reqwest/default`,
//! i.e. rustls with aws-lc-rs, which needs cmake and adds about 2 minutes to a release build
//! here. We call twelve methods and read a few dozen properties.
//!
//! What this client adds, measured by `cargo build --timings -j2` of exactly its new crates in an
//! empty project (`rustls` with `ring`, `tokio-rustls`, `rustls-platform-verifier`, `roxmltree`,
//! `sha2`, `base64`, `percent-encoding`; tokio and hyper were in the workspace already): 20 s
//! wall on 2 cores, 36 s of compile time (rustls 8.3 s, ring 7.5 s with its C build, webpki
//! 2.1 s, roxmltree 1.5 s), 116 MB of `target/debug`. The client itself is about 3,000 lines with
//! its unit tests. The price is parsing the answers ourselves: tested on the XML shapes of both
//! vCenter and the simulator (which names the schema-instance prefix differently, hence
//! namespace-aware parsing), and against the simulator itself (`tests/vsphere_client.rs`).
//!
//! # Modules
//! A call reads top-down: a public method of [`Client`] (in the module of its concern) builds
//! the SOAP body, `transport`'s `Session` sends it (logging in again once when the session
//! expired), `soap` parses the answer.
//! - `client`: [`Client`]: connect (service content, login), logout, keepalive, the session
//!   cookie and server certificate nbdkit needs, datastore file URLs.
//! - `transport`: the HTTP side: URL check, announced API version, one POST per call with the
//!   session cookie, transport errors (certificate vs unreachable), Login, re-login on
//!   `NotAuthenticated`.
//! - `collector`: the property collector: RetrievePropertiesEx specs and pages, `Props` of
//!   one object, container views.
//! - `vms`: [`VmInfo`], [`DiskInfo`], [`SnapshotInfo`]; listing VMs, finding one, a snapshot's
//!   disks, datacenter and datastore names.
//! - `tasks`: task-based calls (create/remove snapshot, enable CBT) and waiting for a task.
//! - `cbt`: [`ChangedAreas`], QueryChangedDiskAreas.
//! - `error`: [`VsphereError`] and its fault type.
//! - [`tls`]: one rustls configuration per [`TlsPolicy`]; records the leaf certificate.
//! - `https`: HTTP/1.1 over tokio-rustls with hyper, a small connection pool.
//! - `soap`: envelopes, escaping, response and fault parsing.
//! - `inventory`: device lists (disks, controllers) and snapshot trees.
//! - `datastore`: datastore file URLs.
//!
//! This crate uses nothing of the node's: the node's vSphere source driver
//! (`agent_node::source::vsphere`) is its one user.

pub mod tls;

mod cbt;
mod client;
mod collector;
mod datastore;
mod error;
mod https;
mod inventory;
mod soap;
mod tasks;
mod transport;
mod vms;

pub use cbt::ChangedAreas;
pub use client::Client;
pub use error::VsphereError;
pub use vms::{DiskInfo, SnapshotInfo, VmInfo};

use std::fmt;
use std::path::PathBuf;

/// How the server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsPolicy {
    /// The system's trust store (webpki roots / platform verifier).
    System,
    /// Trust only certificates signed by the CA(s) in this PEM file.
    CaFile(PathBuf),
    /// Accept exactly the server certificate whose SHA-256 (of the DER) is this.
    Pinned([u8; 32]),
    /// No verification at all (only when configured `insecure = true`).
    Insecure,
}

/// A password or other secret: never in logs, never in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(\"***\")")
    }
}

/// Where and as whom to log in.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `"https://vcenter.example"` or `"https://127.0.0.1:8989"` (no path; the client uses /sdk).
    pub url: String,
    pub user: String,
    /// Read from a file by the config layer; never logged, never in Debug output.
    pub password: Secret,
    pub tls: TlsPolicy,
}

/// A managed object reference, e.g. ("VirtualMachine", "vm-42").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MoRef {
    pub kind: String,
    pub value: String,
}

impl MoRef {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }
}

impl fmt::Display for MoRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_shows_in_debug() {
        let endpoint = Endpoint {
            url: "https://127.0.0.1:1".into(),
            user: "root".into(),
            password: Secret::new("hunter2".into()),
            tls: TlsPolicy::Insecure,
        };
        let debug = format!("{endpoint:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("root"), "{debug}");
        assert_eq!(endpoint.password.expose(), "hunter2");
    }
}
