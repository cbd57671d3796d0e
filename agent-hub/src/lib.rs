//! `sendense-hub`: the backup server.
//!
//! - [`db`]: the database (SQLite or MySQL/MariaDB through one `AnyPool`), every table's queries.
//! - [`ports`]: the NBD port allocator over `nbd_port_allocations`, with bind tests.
//! - [`repository`]: QCOW2 images and chains on disk, free-space checks, `qemu-img check`.

pub mod db;
pub mod ports;
pub mod repository;
