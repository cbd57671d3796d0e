//! The hub's database: SQLite by default, MySQL/MariaDB by URL, one schema per dialect under
//! `migrations/{sqlite,mysql}` kept equivalent.
//!
//! # One `AnyPool` rather than an enum of pools
//! Every query here is written once, in the SQL both dialects accept (`?` placeholders,
//! `COALESCE`, `CASE`, `IN`), and runs through sqlx's Any driver. An enum over
//! `SqlitePool`/`MySqlPool` would have doubled every query and every row decoder, and the two
//! copies would drift. The price is the Any driver's small type set (integers, text, floats,
//! blobs): times are stored as BIGINT microseconds since the Unix epoch (UTC), flags as 0/1
//! integers, and unsigned sizes as BIGINT (checked on the way in). Where the dialects truly differ
//! (upsert syntax, fetching a generated key, locking a write transaction up front) the code
//! picks one of two *static* statements by [`DbKind`]; no SQL is ever built from user data.
//!
//! # Invariants
//! - `vm_disks` holds each disk's own `disk_key` and `unit_number` (unique per VM context).
//! - `backup_jobs.status` only moves through [`Db::transition_backup`], a single compare-and-set
//!   `UPDATE ... WHERE status IN (...)`, so a cancel racing a completion has exactly one winner.
//! - `job_events.seq` is an auto-increment key: strictly increasing per database, hence per hub.
//! - `node_credentials` holds only the BLAKE3 hash of each secret, never the secret.
//! - `policy_slots` is keyed by (policy, planned time): a slot is claimed once
//!   ([`Db::claim_slot`]); `policy_runs.status` moves by compare-and-set ([`Db::update_run`]).
//! - `recovery_jobs.status` moves by compare-and-set ([`Db::transition_recovery`]); its terminal
//!   move clears every `recovery_disks` row's port and PID.
//! - `nbd_port_allocations.port` is the primary key: the database, not the hub's memory, decides
//!   who holds a port (see [`crate::ports`]).

mod backups;
mod boot_checks;
mod credentials;
mod policies;
mod prune;
mod records;
mod recoveries;
mod restores;
mod verify_jobs;
mod vms;

pub use backups::{BackupDiskRow, DiskUpdate, NewBackup, NewBackupDisk};
pub use boot_checks::LiveBootCheck;
pub use credentials::NodeCredential;
pub use policies::{PointSummary, QueuedRun, RunChange};
pub use prune::{NewStep, PolicyRetention, StepRow};
pub use records::{ProcessRecord, RepositoryRow};
pub use verify_jobs::VerifyProgress;
pub use vms::VmSource;

use chrono::{DateTime, Utc};
use sendense_shared::api::DatabaseKind;
use sendense_shared::names::NameError;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::error::ErrorKind;
use sqlx::{AnyPool, Row, Transaction};
use std::time::Duration;
use thiserror::Error;

/// Which dialect a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DbKind {
    Sqlite,
    Mysql,
}

impl DbKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DbKind::Sqlite => "sqlite",
            DbKind::Mysql => "mysql",
        }
    }
}

impl From<DbKind> for DatabaseKind {
    fn from(k: DbKind) -> Self {
        match k {
            DbKind::Sqlite => DatabaseKind::Sqlite,
            DbKind::Mysql => DatabaseKind::Mysql,
        }
    }
}

/// Everything that can go wrong in the storage layer.
#[derive(Debug, Error)]
pub enum DbError {
    #[error(
        "database URL {url:?} is not supported: use sqlite:///path/hub.db or mysql://user:password@host:port/database"
    )]
    UnsupportedUrl { url: String },
    #[error("cannot open the {kind} database at {url}")]
    Connect {
        kind: &'static str,
        /// The URL with any password replaced by `***`.
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot apply the {kind} database migrations")]
    Migrate {
        kind: &'static str,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// `what` names the object, e.g. `repository 'main'`.
    #[error("{what} not found")]
    NotFound { what: String },
    /// A unique key already holds `what`.
    #[error("{what} already exists")]
    Conflict { what: String },
    /// A node reported a VM whose name another node's VM holds: not taken over.
    #[error(
        "VM {vm:?} is registered by node {owner:?}; node {claimant:?}'s VM of that name is not \
         taken over (VM names are unique on the hub: rename one of them on its hypervisor, or \
         an admin moves the VM with POST /api/v1/vms)"
    )]
    Owned {
        vm: String,
        owner: String,
        claimant: String,
    },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("database query failed while {doing}")]
    Query {
        doing: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("the database holds an unreadable value in {column}: {value:?}")]
    Corrupt { column: &'static str, value: String },
    /// A query found no connection in time and a fresh connection attempt failed too: the
    /// source is the database's (or the network's) own answer, e.g. "Connection refused".
    #[error("database query failed while {doing}: the database at {url} does not answer")]
    Unreachable {
        doing: &'static str,
        /// The URL with any password replaced by `***`.
        url: String,
        #[source]
        source: sqlx::Error,
    },
}

impl DbError {
    /// A deadlock, lock wait timeout or busy database: the whole transaction may be retried.
    pub fn is_retryable(&self) -> bool {
        match self {
            DbError::Query { source, .. } => is_retryable(source),
            _ => false,
        }
    }
}

/// How long a query waits for a connection. A database that is down makes sqlx retry its
/// connection attempts until then and answer only "pool timed out" (see [`Db::diagnose`] for
/// the cause); a writer's report must be answered within its own 10 s timeout.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Db::diagnose`] gives its own connection attempt.
const DIAGNOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Handle on the hub's database. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    kind: DbKind,
    /// The URL the pool connects to (with its password: never shown; see [`redact`]).
    url: std::sync::Arc<str>,
    /// Timestamps of records come from the hub's clock (a test may drive it).
    clock: std::sync::Arc<dyn crate::clock::Clock>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("kind", &self.kind).finish()
    }
}

impl Db {
    /// Opens `url`: `sqlite:///path/hub.db?mode=rwc` (the file is created if missing and
    /// `mode` is not given) or `mysql://user:password@127.0.0.1:3306/database`.
    pub async fn connect(url: &str) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let (kind, url) = if let Some(rest) = url.strip_prefix("sqlite:") {
            // SQLite would create the file with the umask's mode (0644): the catalog of every
            // backup, readable by every local user. Created 0600 first (its -wal and -shm files
            // take the database file's mode).
            if let Some(path) = sqlite_file(rest) {
                sendense_shared::fsmode::private_file(&path).map_err(|e| DbError::Connect {
                    kind: "sqlite",
                    url: redact(url),
                    source: sqlx::Error::Io(std::io::Error::other(sendense_shared::errors::chain(
                        &e,
                    ))),
                })?;
            }
            let url = if rest.contains("mode=") {
                url.to_string()
            } else if rest.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            (DbKind::Sqlite, url)
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            (DbKind::Mysql, url.replacen("mariadb://", "mysql://", 1))
        } else {
            return Err(DbError::UnsupportedUrl { url: redact(url) });
        };
        let options = AnyPoolOptions::new()
            .max_connections(match kind {
                // One writer at a time anyway; a few readers may overlap it.
                DbKind::Sqlite => 4,
                DbKind::Mysql => 8,
            })
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if kind == DbKind::Sqlite {
                        // WAL lets the API read while a job writes progress. The mode is stored
                        // in the file, so only the first connection of a new database changes
                        // it; should that fail (another process converting at the same moment)
                        // the database still works in its current mode.
                        if let Err(e) = sqlx::query("PRAGMA journal_mode = WAL").execute(conn).await
                        {
                            tracing::warn!(error = %e, "could not switch SQLite to WAL mode");
                        }
                    }
                    Ok(())
                })
            });
        let pool = options
            .connect(&url)
            .await
            .map_err(|source| DbError::Connect {
                kind: kind.as_str(),
                url: redact(&url),
                source,
            })?;
        Ok(Db {
            pool,
            kind,
            url: url.into(),
            clock: std::sync::Arc::new(crate::clock::SystemClock),
        })
    }

    /// The same database, with record timestamps from `clock`.
    pub fn with_clock(mut self, clock: std::sync::Arc<dyn crate::clock::Clock>) -> Db {
        self.clock = clock;
        self
    }

    /// The hub's clock (the one every record timestamp comes from).
    pub fn clock(&self) -> std::sync::Arc<dyn crate::clock::Clock> {
        self.clock.clone()
    }

    pub(crate) fn now_us(&self) -> i64 {
        self.clock.now().timestamp_micros()
    }

    /// Turns a pool timeout into the database's own answer: a fresh connection attempt says why
    /// no connection was to be had ("Connection refused", "Unknown database", an authentication
    /// error). Any other error, or a database that answers now, is returned as it was.
    pub async fn diagnose(&self, e: DbError) -> DbError {
        let DbError::Query {
            doing,
            source: sqlx::Error::PoolTimedOut,
        } = e
        else {
            return e;
        };
        use sqlx::Connection;
        match tokio::time::timeout(DIAGNOSE_TIMEOUT, sqlx::AnyConnection::connect(&self.url)).await
        {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                DbError::Query {
                    doing,
                    source: sqlx::Error::PoolTimedOut,
                }
            }
            Ok(Err(source)) => DbError::Unreachable {
                doing,
                url: redact(&self.url),
                source,
            },
            Err(_) => DbError::Unreachable {
                doing,
                url: redact(&self.url),
                source: sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer to a new connection within {} s",
                        DIAGNOSE_TIMEOUT.as_secs()
                    ),
                )),
            },
        }
    }

    /// Applies the dialect's migrations (`migrations/sqlite` or `migrations/mysql`).
    pub async fn migrate(&self) -> Result<(), DbError> {
        let migrator = match self.kind {
            DbKind::Sqlite => sqlx::migrate!("../migrations/sqlite"),
            DbKind::Mysql => sqlx::migrate!("../migrations/mysql"),
        };
        migrator
            .run(&self.pool)
            .await
            .map_err(|source| DbError::Migrate {
                kind: self.kind.as_str(),
                source,
            })
    }

    pub fn kind(&self) -> DbKind {
        self.kind
    }

    /// `SELECT 1` answered.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Closes every connection of the pool (tests drop databases afterwards).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Starts a transaction that will write. SQLite takes the write lock at once
    /// (`BEGIN IMMEDIATE`): a deferred transaction that reads first and writes later fails with
    /// "database is locked" instead of waiting when another connection wrote in between.
    pub(crate) async fn begin_write(
        &self,
        doing: &'static str,
    ) -> Result<Transaction<'static, sqlx::Any>, DbError> {
        let tx = match self.kind {
            DbKind::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            DbKind::Mysql => self.pool.begin().await,
        };
        tx.map_err(q(doing))
    }
}

/// Retries `f` a few times when the database reports a deadlock or a busy lock; any other
/// outcome is returned as is.
pub(crate) async fn with_retry<T, F, Fut>(mut f: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut attempt = 0u32;
    loop {
        match f().await {
            Err(e) if e.is_retryable() && attempt < 8 => {
                attempt += 1;
                tracing::debug!(attempt, error = %e, "retrying a transaction after a lock conflict");
                tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
            }
            other => return other,
        }
    }
}

/// `map_err` helper naming what the query was doing.
pub(crate) fn q(doing: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { doing, source }
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.kind() == ErrorKind::UniqueViolation)
}

pub(crate) fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.kind() == ErrorKind::ForeignKeyViolation
                // MySQL/MariaDB: 1452 "Cannot add or update a child row"
                || d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                    .is_some_and(|m| m.number() == 1452)
        }
        _ => false,
    }
}

fn is_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            if let Some(m) = d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                // 1213 deadlock, 1205 lock wait timeout
                return matches!(m.number(), 1213 | 1205);
            }
            // SQLite primary codes 5 (BUSY) and 6 (LOCKED), possibly extended.
            d.code()
                .and_then(|c| c.parse::<i32>().ok())
                .is_some_and(|c| matches!(c & 0xff, 5 | 6))
        }
        // Not a pool timeout: it already waited the whole acquire timeout (a database that is
        // down, or a pool exhausted for that long); retrying would multiply the wait.
        _ => false,
    }
}

/// The database file of a `sqlite:` URL's rest (`///abs/hub.db?mode=rwc`, `/abs/hub.db`,
/// `hub.db`); `None` for an in-memory database.
fn sqlite_file(rest: &str) -> Option<std::path::PathBuf> {
    let path = rest.strip_prefix("//").unwrap_or(rest);
    let path = path.split('?').next().unwrap_or_default();
    (!path.is_empty() && !path.starts_with(':')).then(|| std::path::PathBuf::from(path))
}

/// Hides the password of a database URL for messages and logs.
pub fn redact(url: &str) -> String {
    // The last `@` ends the credentials: a password may hold `@`, a host cannot.
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((auth, host)) = rest.rsplit_once('@')
        && let Some((user, _)) = auth.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    url.to_string()
}

pub(crate) fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

pub(crate) fn from_us(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// Sizes travel as `u64` in the API and as BIGINT (signed) in both databases.
pub(crate) fn to_db_u64(field: &'static str, v: u64) -> Result<i64, DbError> {
    i64::try_from(v).map_err(|_| DbError::Invalid {
        field,
        reason: format!("{v} is larger than {}", i64::MAX),
    })
}

pub(crate) fn from_db_u64(column: &'static str, v: i64) -> Result<u64, DbError> {
    u64::try_from(v).map_err(|_| DbError::Corrupt {
        column,
        value: v.to_string(),
    })
}

/// Typed column read with the column named in the error.
pub(crate) fn col<'r, T>(row: &'r AnyRow, name: &'static str) -> Result<T, DbError>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(name).map_err(|e| DbError::Corrupt {
        column: name,
        value: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_password() {
        assert_eq!(
            redact("mysql://sendense:secret@127.0.0.1:3306/hub"),
            "mysql://sendense:***@127.0.0.1:3306/hub"
        );
        assert_eq!(redact("sqlite:///tmp/hub.db"), "sqlite:///tmp/hub.db");
        assert_eq!(
            redact("mysql://sendense:p@ss@w0rd@127.0.0.1:3306/hub"),
            "mysql://sendense:***@127.0.0.1:3306/hub",
            "a password holding @ is hidden whole"
        );
    }

    #[test]
    fn sqlite_urls_name_their_file() {
        use std::path::PathBuf;
        assert_eq!(
            sqlite_file("///var/lib/h/hub.db?mode=rwc"),
            Some(PathBuf::from("/var/lib/h/hub.db"))
        );
        assert_eq!(sqlite_file("hub.db"), Some(PathBuf::from("hub.db")));
        assert_eq!(sqlite_file(":memory:"), None);
    }

    #[test]
    fn times_round_trip_in_microseconds() {
        let t = DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap();
        assert_eq!(from_us(t.timestamp_micros()), t);
    }

    #[tokio::test]
    async fn unsupported_url_is_named() {
        let e = Db::connect("postgres://u:pw@localhost/db")
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("postgres://u:***@localhost/db"), "{msg}");
        assert!(msg.contains("sqlite:///"), "{msg}");
    }
}
