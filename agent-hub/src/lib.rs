//! `sendense-hub`, the backup server, as a library; `main.rs` only parses flags and calls
//! [`server::serve`].
//!
//! - [`clock`]: the hub's one clock (the wall clock; a file-driven test knob).
//! - [`config`]: defaults, TOML file, `SENDENSE_HUB_*` environment, flags.
//! - [`logging`]: stderr plus daily log files.
//! - [`auth`]: who calls: the admin token file and the node credentials (issued, rotated,
//!   revoked; stored as hashes).
//! - [`cli`]: the `sendense-hub node enroll|rotate|revoke NAME` commands.
//! - [`server`]: wiring only: start-up ([`hub::Hub::open`]) and the serve loop with graceful
//!   stop.
//! - [`hub`]: the state handlers reach ([`hub::Hub`]): the services below, nothing else.
//! - [`api`]: the HTTP routes, [`api::ApiError`], the JSON extractor; translates only.
//! - [`events`]: the event bus behind `GET /api/v1/events` (server-sent events) and the job
//!   event log ([`events::JobLog`]) every kind of job writes.
//! - [`jobs`]: the life of a backup job: prepare, progress, completion, verification, cancel.
//! - [`restores`]: restore jobs: a backup point served read-only to a node that writes it
//!   into a new image.
//! - [`recoveries`]: instant recoveries: a backup point's disks served read-only (and kept
//!   up) while a node boots it as a new VM and pulls every block home.
//! - [`verify`]: verify jobs (re-read completed points against their stored checksums, mark
//!   corrupt ones and their dependents), on demand and on a schedule per repository.
//! - [`policies`]: backup policies (CRUD, validation, cron schedules in a time zone) and the
//!   scheduler: slots claimed once, one late run after downtime, the admission queue, the
//!   backup type rule, the after-run hook for retention.
//! - [`retention`]: Proxmox Backup Server's keep rules as pure functions.
//! - [`prune`]: prune and synthetic-full jobs (retention → delete/rebase/merge steps with a
//!   journal), protected points, a repository's space and forecast.
//! - [`nodes`]: node registration, inventory import, tunnel probes.
//! - [`node_client`]: every hub → node call, typed ([`node_client::NodeClient`]).
//! - [`vms`]: the rules a VM record must pass.
//! - [`reconciler`]: start-up cleanup of what a crashed hub left behind.
//! - [`db`]: the database (SQLite or MySQL/MariaDB through one `AnyPool`), every table's queries.
//! - [`ports`]: the NBD port allocator over `nbd_port_allocations`, with bind tests.
//! - [`repository`]: QCOW2 images and chains on disk, free-space checks, `qemu-img check`.
//! - [`qemu_nbd`]: one supervised qemu-nbd per disk export (TLS with client certificates of
//!   [`nbd_ca`] on TCP exports).
//! - [`nbd_ca`]: the hub's private CA for the NBD data path: qemu-nbd's server certificate, the
//!   hub's and each job's client certificates.
//! - [`manifest`]: whole-disk checksums of a point (the sidecar next to each image) and the
//!   read-back that compares an image chain with them.
//! - [`metrics`]: Prometheus metrics (`GET /api/v1/metrics`): job ends counted from the event
//!   bus, the catalog's and the system's state read at scrape time.
//! - [`readback`]: an image chain served read-only on a private unix socket for the hub's own
//!   read-backs (finalize, verify jobs, the reconciler).
//!
//! Layers: `server` wires, `api` translates HTTP and reaches the services through `hub`; the
//! services (`jobs`, `restores`, `recoveries`, `verify`, `prune`, `nodes`, `policies` on `jobs`) use the low
//! modules (`db`, `ports`, `qemu_nbd`,
//! `repository`, `manifest`, `readback`, `events`, `node_client`, `nbd_ca`) and never `api`, `hub` or `server`; the
//! `reconciler` runs before any service starts, on the same low modules and the services'
//! lists of active states.

pub mod api;
pub mod auth;
pub mod bootcheck;
pub mod cli;
pub mod clock;
pub mod config;
pub mod db;
pub mod events;
pub mod files;
pub mod hub;
pub mod jobs;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod nbd_ca;
pub mod node_client;
pub mod nodes;
pub mod policies;
pub mod ports;
pub mod prune;
pub mod qemu_nbd;
pub mod readback;
pub mod reconciler;
pub mod recoveries;
pub mod repository;
pub mod restores;
pub mod retention;
pub mod server;
pub mod verify;
pub mod vms;
pub mod webhooks;
