//! The main scenario on a real MariaDB (`SENDENSE_TEST_MYSQL_URL`, a server URL without
//! database; `scripts/setup.sh` prints one). The test creates and drops its own database.

use super::env::Env;
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread")]
async fn full_then_incremental_on_mariadb() {
    let base = std::env::var("SENDENSE_TEST_MYSQL_URL").expect(
        "SENDENSE_TEST_MYSQL_URL must name a MariaDB server (run `bash scripts/setup.sh`; \
         scripts/test.sh sets it)",
    );
    let base = base.trim_end_matches('/').to_string();
    let db = format!("sendense_hub_it_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::mysql::MySqlConnection::connect(&base)
        .await
        .expect("connect to MariaDB");
    // The name is ours (a UUID), not input.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{db}`")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let url = format!("{base}/{db}");
    {
        let env = Env::start_with(|o| o.database_url = Some(url.clone()));
        let h = env.api.get_ok("/health").await;
        assert_eq!(h["database"]["kind"], "mysql", "{h}");
        assert_eq!(h["database"]["ok"], true, "{h}");
        super::backup::full_then_incremental(&env).await;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE `{db}`")))
        .execute(&mut conn)
        .await
        .expect("drop test database");
}
