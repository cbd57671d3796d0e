//! The hub's event bus: every change a watcher may care about (a job's state, a job event,
//! ports, processes, tunnels) is published here as a [`HubEvent`], and `GET /api/v1/events`
//! streams it as server-sent events, one JSON object per `data:` line.
//!
//! A broadcast channel: publishing never blocks a job; a subscriber that falls behind loses the
//! oldest messages and is told so with an SSE comment (it should re-read the lists).

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use sendense_shared::api::HubEvent;
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
