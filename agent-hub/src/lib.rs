//! `sendense-hub`, the backup server, as a library; `main.rs` only parses flags and calls
//! [`server::serve`].
//!
//! - [`config`]: defaults, TOML file, `SENDENSE_HUB_*` environment, flags.
//! - [`logging`]: stderr plus daily log files.
//! - [`auth`]: the bearer token file and the `/api/v1` check.
//! - [`server`]: start-up ([`server::Hub::open`]) and the serve loop with graceful stop.
//! - [`api`]: the HTTP routes, [`api::ApiError`], the JSON extractor.
//! - [`events`]: the event bus behind `GET /api/v1/events` (server-sent events).
//! - [`jobs`]: the life of a backup job: prepare, progress, completion, verification, cancel.
//! - [`restores`]: a backup point served read-only to a node that writes it into a new image.
//! - [`reconciler`]: start-up cleanup of what a crashed hub left behind.
//! - [`db`]: the database (SQLite or MySQL/MariaDB through one `AnyPool`), every table's queries.
//! - [`ports`]: the NBD port allocator over `nbd_port_allocations`, with bind tests.
//! - [`repository`]: QCOW2 images and chains on disk, free-space checks, `qemu-img check`.
//! - [`qemu_nbd`]: one supervised qemu-nbd per disk export.

pub mod api;
pub mod auth;
pub mod config;
pub mod db;
pub mod events;
pub mod jobs;
pub mod logging;
pub mod ports;
pub mod qemu_nbd;
pub mod reconciler;
pub mod repository;
pub mod restores;
pub mod server;
