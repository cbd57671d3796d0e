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
                        Event::default().comment(format!("lagged: {n} events lost, re-read lists"))
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

/// The job event log: one place that writes an event to the database, the event stream and the
/// hub's log, for every kind of job (backups, restores, the reconciler's notes about either).
#[derive(Clone)]
pub struct JobLog {
    db: Db,
    bus: EventBus,
}

impl JobLog {
    pub fn new(db: Db, bus: EventBus) -> Self {
        JobLog { db, bus }
    }

    pub fn bus(&self) -> &EventBus {
        &self.bus
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
        match self
            .db
            .append_job_event(backup, job, level.as_str(), step, message, disk)
            .await
        {
            Ok(ev) => self.bus.publish(HubEvent::JobEvent { event: ev }),
            Err(e) => tracing::error!(
                backup_id = %backup,
                error = %sendense_shared::errors::chain(&e),
                "cannot record job event"
            ),
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
    }
}
