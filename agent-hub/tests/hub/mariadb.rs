//! The main scenarios on a real MariaDB (`SENDENSE_TEST_MYSQL_URL`, a server URL without
//! database; `scripts/setup.sh` prints one). Each test creates and drops its own database.

use super::env::Env;
use sqlx::Connection;

/// A database of its own on the MariaDB server, for one hub.
struct TestDatabase {
    conn: sqlx::mysql::MySqlConnection,
    name: String,
    url: String,
}

impl TestDatabase {
    async fn create() -> TestDatabase {
        let base = std::env::var("SENDENSE_TEST_MYSQL_URL").expect(
            "SENDENSE_TEST_MYSQL_URL must name a MariaDB server (run `bash scripts/setup.sh`; \
             scripts/test.sh sets it)",
        );
        let base = base.trim_end_matches('/').to_string();
        let name = format!("sendense_hub_it_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::mysql::MySqlConnection::connect(&base)
            .await
            .expect("connect to MariaDB");
        // The name is ours (a UUID), not input.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let url = format!("{base}/{name}");
        TestDatabase { conn, name, url }
    }

    /// A hub on this database, checked to say so.
    async fn hub(&self) -> Env {
        let env = Env::start_with(|o| o.database_url = Some(self.url.clone()));
        let h = env.api.get_ok("/health").await;
        assert_eq!(h["database"]["kind"], "mysql", "{h}");
        assert_eq!(h["database"]["ok"], true, "{h}");
        env
    }

    async fn drop_database(mut self) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE `{}`",
            self.name
        )))
        .execute(&mut self.conn)
        .await
        .expect("drop test database");
    }
}

/// Runs `scenario` against a hub on a fresh MariaDB database, dropped afterwards (once the hub
/// is gone).
async fn on_mariadb(scenario: impl AsyncFnOnce(&Env)) {
    let db = TestDatabase::create().await;
    {
        let env = db.hub().await;
        scenario(&env).await;
    }
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn full_then_incremental_on_mariadb() {
    on_mariadb(super::backup::full_then_incremental).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn change_ids_then_fallback_on_mariadb() {
    on_mariadb(super::cbt::change_ids_then_fallback).await;
}
