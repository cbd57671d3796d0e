//! Runs one test body against every database dialect the hub supports: SQLite in a temporary
//! file, and the real MariaDB/MySQL server at `SENDENSE_TEST_MYSQL_URL` (a server URL without a
//! database; each run creates its own database and drops it afterwards, even when the body
//! panics).

#![allow(dead_code)]

use agent_hub::db::Db;
use sqlx::{AssertSqlSafe, Connection};
use std::future::Future;

pub const MYSQL_URL_VAR: &str = "SENDENSE_TEST_MYSQL_URL";

/// A migrated, empty database for one test run.
pub struct TestDb {
    pub db: Db,
    /// URL of this very database, to open more pools on it ("another hub process").
    pub url: String,
    /// `"sqlite"` or `"mysql"`, for assertion messages.
    pub dialect: &'static str,
}

impl TestDb {
    /// A second, independent pool on the same database.
    pub async fn another_pool(&self) -> Db {
        Db::connect(&self.url).await.expect("second pool opens")
    }
}

/// Runs `body` once on SQLite and once on MySQL/MariaDB.
pub async fn on_each_dialect<F, Fut>(test: &str, body: F)
where
    F: Fn(TestDb) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    on_sqlite(&body, true).await;
    on_mysql(test, &body, true).await;
}

/// Like [`on_each_dialect`], but the database is left empty: no migration applied (for tests
/// of the migrations themselves, e.g. upgrading a database of an older hub).
pub async fn on_each_bare_dialect<F, Fut>(test: &str, body: F)
where
    F: Fn(TestDb) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    on_sqlite(&body, false).await;
    on_mysql(test, &body, false).await;
}

async fn on_sqlite<F, Fut>(body: &F, migrate: bool)
where
    F: Fn(TestDb) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/hub.db", dir.path().display());
    let db = Db::connect(&url).await.expect("SQLite database opens");
    if migrate {
        db.migrate().await.expect("SQLite migrations apply");
    }
    let outcome = tokio::spawn(body(TestDb {
        db,
        url,
        dialect: "sqlite",
    }))
    .await;
    drop(dir);
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// The server URL, or `None` (after saying so) when the variable is unset outside CI.
pub fn mysql_server_url() -> Option<String> {
    match std::env::var(MYSQL_URL_VAR) {
        Ok(u) if !u.trim().is_empty() => Some(u.trim().trim_end_matches('/').to_string()),
        _ if std::env::var_os("CI").is_some() => panic!(
            "{MYSQL_URL_VAR} is not set: run scripts/setup.sh, which starts MariaDB and prints the URL to export"
        ),
        _ => {
            eprintln!(
                "SKIPPED the MySQL/MariaDB half of this test: {MYSQL_URL_VAR} is not set \
                 (run scripts/setup.sh and export the URL it prints)"
            );
            None
        }
    }
}

async fn on_mysql<F, Fut>(test: &str, body: &F, migrate: bool)
where
    F: Fn(TestDb) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(server) = mysql_server_url() else {
        return;
    };
    let name = database_name(test);
    let mut admin = sqlx::MySqlConnection::connect(&server)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {MYSQL_URL_VAR}: {e}"));
    // The name is made here from [a-z0-9_] only, never from outside input.
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
        .execute(&mut admin)
        .await
        .expect("test database is created");
    let url = format!("{server}/{name}");
    let opened = match Db::connect(&url).await {
        Ok(db) if migrate => db.migrate().await.map(|()| db),
        Ok(db) => Ok(db),
        Err(e) => Err(e),
    };
    let outcome = match opened {
        Ok(db) => {
            tokio::spawn(body(TestDb {
                db,
                url,
                dialect: "mysql",
            }))
            .await
        }
        Err(e) => tokio::spawn(async move { panic!("MySQL test database: {e}") }).await,
    };
    sqlx::query(AssertSqlSafe(format!("DROP DATABASE `{name}`")))
        .execute(&mut admin)
        .await
        .expect("test database is dropped");
    let _ = admin.close().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

fn database_name(test: &str) -> String {
    let short: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(30)
        .collect();
    let unique = uuid::Uuid::new_v4().simple().to_string();
    format!("sdt_{short}_{}", &unique[..12])
}
