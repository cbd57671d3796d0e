//! The hub's event bus: every change a watcher may care about (a job's state, a job event,
//! ports, processes, tunnels) is published here as a [`HubEvent`], and `GET /api/v1/events`
//! streams it as server-sent events, one JSON object per `data:` line.
//!
//! A broadcast channel: publishing never blocks a job; a subscriber that falls behind loses the
//! oldest messages and is told so with an SSE comment (it should re-read the lists).

use crate::db::Db;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use sendense_shared::api::HubEvent;
use sendense_shared::ids::{BackupId, DiskKey};
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast;

/// How many events a slow subscriber may lag before it loses some.
const CAPACITY: usize = 1024;

/// Fan-out of [`HubEvent`]s; cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<HubEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        EventBus {
            tx: broadcast::channel(CAPACITY).0,
        }
    }

    /// Sends to every current subscriber; nobody listening is fine.
    pub fn publish(&self, event: HubEvent) {
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.tx.subscribe()
    }

    /// The SSE response of `GET /api/v1/events`. The stream ends when the bus is dropped or
    /// `shutdown` fires (so a graceful stop is not held up by open event streams).
    pub fn sse(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
        let rx = self.subscribe();
        let stream =
            futures_util::stream::unfold((rx, shutdown), |(mut rx, shutdown)| async move {
                let item = tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    r = rx.recv() => r,
                };
                let event = match item {
                    Ok(ev) => match Event::default().json_data(&ev) {
                        Ok(e) => e.event(kind(&ev)),
                        Err(e) => Event::default().comment(format!("unserialisable event: {e}")),
                    },
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let ev = HubEvent::Lagged { lost: n };
                        match Event::default().json_data(&ev) {
                            Ok(e) => e.event(kind(&ev)),
                            Err(e) => {
                                Event::default().comment(format!("unserialisable event: {e}"))
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                Some((Ok(event), (rx, shutdown)))
            });
        Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
    }
}

/// Severity of a job event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// Events kept while the database does not take them, at most this many (the oldest go first).
const PENDING_MAX: usize = 1024;

/// After a refusal the database is not asked again for this long: events are only queued, so
/// that a database outage does not make every job step wait for a connection.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Default)]
struct Queue {
    events: std::collections::VecDeque<Pending>,
    /// When the database last refused an event.
    refused_at: Option<std::time::Instant>,
    /// A background retry is scheduled.
    retrying: bool,
}

/// An event the database did not take yet.
struct Pending {
    backup: BackupId,
    job: Option<String>,
    at_us: i64,
    level: Level,
    step: String,
    message: String,
    disk: Option<DiskKey>,
}

/// The job event log: one place that writes an event to the database, the event stream and the
/// hub's log, for every kind of job (backups, restores, the reconciler's notes about either).
///
/// An event the database refuses (it is down, locked, gone) is kept in memory, in order, and
/// written before the next event once the database answers again, with its own time: the
/// events of a database outage, which name its cause, are exactly the ones an operator needs
/// in the job's log afterwards.
#[derive(Clone)]
pub struct JobLog {
    db: Db,
    bus: EventBus,
    pending: std::sync::Arc<tokio::sync::Mutex<Queue>>,
}

impl JobLog {
    pub fn new(db: Db, bus: EventBus) -> Self {
        JobLog {
            db,
            bus,
            pending: Default::default(),
        }
    }

    pub fn bus(&self) -> &EventBus {
        &self.bus
    }

    /// The caller knows the database does not answer (it just failed to connect): the next
    /// events are queued without waiting for a connection first.
    pub async fn database_unreachable(&self) {
        self.pending.lock().await.refused_at = Some(std::time::Instant::now());
    }

    /// Appends an event to backup `backup`'s log, as an event of job `job` when that is another
    /// job about the backup (a restore of it). A failure to record is logged and otherwise
    /// ignored: losing a log line must not fail a job.
    pub async fn record(
        &self,
        backup: &BackupId,
        job: Option<&str>,
        level: Level,
        step: &str,
        message: &str,
        disk: Option<DiskKey>,
    ) {
        let disk_n = disk.map(|d| d.0);
        match level {
            Level::Info => {
                tracing::info!(backup_id = %backup, job_id = ?job, step, disk = ?disk_n, "{message}")
            }
            Level::Warn => {
                tracing::warn!(backup_id = %backup, job_id = ?job, step, disk = ?disk_n, "{message}")
            }
            Level::Error => {
                tracing::error!(backup_id = %backup, job_id = ?job, step, disk = ?disk_n, "{message}")
            }
        }
        let mut queue = self.pending.lock().await;
        queue.events.push_back(Pending {
            backup: backup.clone(),
            job: job.map(str::to_string),
            at_us: chrono::Utc::now().timestamp_micros(),
            level,
            step: step.to_string(),
            message: message.to_string(),
            disk,
        });
        if queue.refused_at.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            while queue.events.len() > PENDING_MAX {
                queue.events.pop_front();
            }
            if !queue.retrying {
                queue.retrying = true;
                let me = self.clone();
                tokio::spawn(async move { me.retry().await });
            }
            return;
        }
        if self.drain(&mut queue).await && !queue.retrying {
            queue.retrying = true;
            let me = self.clone();
            tokio::spawn(async move { me.retry().await });
        }
    }

    /// Writes the queued events, oldest first, stopping at the first refusal (the log keeps its
    /// order). After a refusal one background task retries every [`RETRY_AFTER`] until the
    /// queue is empty, so the events of an outage reach the database once it is back even if
    /// no job writes another one. Answers whether the database refused.
    async fn drain(&self, queue: &mut Queue) -> bool {
        while let Some(p) = queue.events.front() {
            let written = self
                .db
                .append_job_event_at(
                    &p.backup,
                    p.job.as_deref(),
                    p.at_us,
                    p.level.as_str(),
                    &p.step,
                    &p.message,
                    p.disk,
                )
                .await;
            match written {
                Ok(ev) => {
                    queue.events.pop_front();
                    queue.refused_at = None;
                    self.bus.publish(HubEvent::JobEvent { event: ev });
                }
                // The job is gone (its row was never written, or deleted): nothing to keep.
                Err(crate::db::DbError::NotFound { .. }) => {
                    queue.events.pop_front();
                }
                Err(e) => {
                    tracing::error!(
                        backup_id = %p.backup,
                        kept = queue.events.len(),
                        error = %sendense_shared::errors::chain(&e),
                        "cannot record job event; kept until the database answers"
                    );
                    while queue.events.len() > PENDING_MAX {
                        queue.events.pop_front();
                    }
                    queue.refused_at = Some(std::time::Instant::now());
                    return true;
                }
            }
        }
        false
    }

    /// The background retry: until the queue is empty.
    async fn retry(&self) {
        loop {
            tokio::time::sleep(RETRY_AFTER).await;
            let mut queue = self.pending.lock().await;
            if !self.drain(&mut queue).await {
                queue.retrying = false;
                return;
            }
        }
    }
}

/// SSE `event:` name, the same as the JSON `kind`, so a client may filter without parsing.
fn kind(ev: &HubEvent) -> &'static str {
    match ev {
        HubEvent::Backup { .. } => "backup",
        HubEvent::JobEvent { .. } => "job_event",
        HubEvent::Ports { .. } => "ports",
        HubEvent::Processes { .. } => "processes",
        HubEvent::Tunnel { .. } => "tunnel",
        HubEvent::Restore { .. } => "restore",
        HubEvent::Recovery { .. } => "recovery",
        HubEvent::Verify { .. } => "verify",
        HubEvent::PolicyRun { .. } => "policy_run",
        HubEvent::Prune { .. } => "prune",
        HubEvent::Lagged { .. } => "lagged",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;
    use http_body_util::BodyExt;

    /// A subscriber that fell behind gets a typed `lagged` event (kind and count), which a client
    /// matches as a value, and then the events that were kept.
    #[tokio::test]
    async fn a_slow_subscriber_is_told_it_lagged_as_an_event() {
        let bus = EventBus::new();
        let mut body = bus
            .sse(tokio_util::sync::CancellationToken::new())
            .into_response()
            .into_body();
        for i in 0..(CAPACITY + 5) {
            bus.publish(HubEvent::Tunnel {
                node: format!("n{i}"),
                tunnel: sendense_shared::api::TunnelState {
                    state: sendense_shared::api::TunnelStateKind::Up,
                    since: chrono::Utc::now(),
                    restarts: 0,
                    last_error: None,
                    links: Vec::new(),
                    forwards: Vec::new(),
                },
            });
        }
        let frame = body.frame().await.expect("a frame").expect("no error");
        let text = String::from_utf8(frame.into_data().expect("data").to_vec()).unwrap();
        assert!(text.lines().any(|l| l == "event: lagged"), "{text}");
        let json = text
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap_or_else(|| panic!("{text}"));
        let ev: HubEvent = serde_json::from_str(json).unwrap();
        assert_eq!(ev, HubEvent::Lagged { lost: 5 });
    }
}
