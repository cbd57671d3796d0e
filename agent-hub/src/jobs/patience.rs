//! Waiting out the database while a job ends: a catalog write that fails for a passing cause
//! (the server down, restarting, out of connections) is retried with backoff for up to the
//! hub's `db_outage_patience`, logged on every try, and when the database answers again the
//! wait becomes an event of the job. A database error is never taken for the job's failure:
//! past the patience the caller leaves the job as the catalog last recorded it, images kept,
//! for the next start's reconciler.

use super::{JobManager, Level};
use crate::db::DbError;
use sendense_shared::backoff::Backoff;
use sendense_shared::ids::BackupId;
use std::future::Future;
use std::time::{Duration, Instant};

/// Backoff between tries: quick at first (a restart of MariaDB takes seconds), then every 5 s.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));

/// How long a job's end waits for the database in all.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    limit: Duration,
}

impl Patience {
    pub fn new(limit: Duration) -> Self {
        Patience { limit }
    }
}

/// Errors a later try may not see: the database's connection or a query that failed in it.
/// A row that is missing or a value that is unreadable will read the same way next time.
pub fn is_passing(e: &DbError) -> bool {
    matches!(
        e,
        DbError::Unreachable { .. } | DbError::Query { .. } | DbError::Connect { .. }
    )
}

/// Runs `op` until it succeeds, fails for a lasting cause, or the patience is spent; `None`
/// then (logged and evented). `what` names the write for the log, e.g. "recording the point's
/// integrity".
pub async fn db_retry<T, F, Fut>(
    jm: &JobManager,
    id: &BackupId,
    what: &str,
    patience: Patience,
    mut op: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let began = Instant::now();
    let mut attempts = BACKOFF.attempts();
    loop {
        let e = match op().await {
            Ok(v) => {
                if attempts.failures() > 0 {
                    jm.event(
                        id,
                        Level::Info,
                        "database_back",
                        format!(
                            "the database answers again after {} s ({} failed tries); {what} \
                             done, the job goes on",
                            began.elapsed().as_secs(),
                            attempts.failures()
                        ),
                        None,
                    )
                    .await;
                }
                return Some(v);
            }
            Err(e) => jm.deps().db.diagnose(e).await,
        };
        let cause = sendense_shared::errors::chain(&e);
        if !is_passing(&e) {
            tracing::error!(backup_id = %id, error = %cause, "{what} failed; not retried");
            jm.event(
                id,
                Level::Error,
                "database_error",
                format!("{what} failed: {cause}; the job's images are kept"),
                None,
            )
            .await;
            return None;
        }
        if matches!(e, DbError::Unreachable { .. }) {
            jm.deps().log.database_unreachable().await;
        }
        if began.elapsed() >= patience.limit {
            tracing::error!(
                backup_id = %id,
                error = %cause,
                waited_secs = began.elapsed().as_secs(),
                "{what}: the database stayed away past the hub's patience"
            );
            return None;
        }
        let delay = attempts.next_delay();
        tracing::warn!(
            backup_id = %id,
            error = %cause,
            attempt = attempts.failures(),
            retry_in_ms = delay.as_millis() as u64,
            "{what} failed; retrying"
        );
        if attempts.failures() == 1 {
            // Queued by the event log until the database takes it.
            jm.event(
                id,
                Level::Warn,
                "database_wait",
                format!("{what} failed: {cause}; retrying with backoff, images kept"),
                None,
            )
            .await;
        }
        tokio::time::sleep(delay).await;
    }
}
