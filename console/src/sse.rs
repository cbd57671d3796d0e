//! The live feed from the hub. While the event stream (`GET /api/v1/events`, `data:` lines of
//! [`HubEvent`] JSON) is open, changes arrive as they happen and a full snapshot is refreshed
//! every [`LIVE_REFRESH`]. When the stream cannot be opened or breaks, the feed polls every
//! [`POLL_INTERVAL`] and retries the stream with exponential backoff. When `/health` does not
//! answer, the hub counts as unreachable; polling goes on, so the console recovers by itself.

use crate::app::{Snapshot, Update};
use futures_util::StreamExt;
use sendense_shared::api::{Backup, HubEvent, JobEvent, Restore};
use sendense_shared::backoff::Backoff;
use sendense_shared::client::{ClientError, HubClient};
use sendense_shared::errors::chain;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
pub const LIVE_REFRESH: Duration = Duration::from_secs(10);
/// Pacing of stream retries: 1 s doubling up to 30 s.
const STREAM_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
/// A stream that stayed open this long was healthy: the next failure starts backing off anew.
const STREAM_HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// Event logs fetched per poll: every unfinished job plus this many of the newest.
const RECENT_JOBS_WITH_EVENTS: usize = 5;

/// What a `text/event-stream` body carries that the console uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
    /// The joined `data:` lines of one event.
    Data(String),
    /// A `:` comment line (keep-alives).
    Comment(String),
}

/// Splits a `text/event-stream` body into [`SseItem`]s. Other fields (`event:`, `id:`,
/// `retry:`) are ignored: the payload's JSON `kind` says what it is.
#[derive(Debug, Default)]
pub struct SseParser {
    pending: Vec<u8>,
    data: Vec<String>,
}

impl SseParser {
    /// Feed a chunk of the body; returns the items completed by it.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseItem> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.pending.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                if !self.data.is_empty() {
                    out.push(SseItem::Data(self.data.join("\n")));
                    self.data.clear();
                }
            } else if let Some(rest) = line.strip_prefix(':') {
                out.push(SseItem::Comment(rest.trim().to_string()));
            } else if let Some(rest) = line.strip_prefix("data:") {
                self.data
                    .push(rest.strip_prefix(' ').unwrap_or(rest).to_string());
            }
        }
        out
    }
}

/// What to show as "last error" when the hub does not answer: the root cause, which is the
/// part an operator acts on (the URL is shown next to it).
pub fn cause(err: &ClientError) -> String {
    if let ClientError::Unreachable { source, .. } = err {
        if source.is_timeout() {
            return "timed out".to_string();
        }
        let mut root: &(dyn std::error::Error + 'static) = source;
        while let Some(next) = root.source() {
            root = next;
        }
        return root.to_string();
    }
    chain(err)
}

/// The update one `data:` payload of the stream carries, if the console knows its kind.
pub fn parse_event(data: &str) -> Result<Update, serde_json::Error> {
    serde_json::from_str::<HubEvent>(data).map(Update::Event)
}

fn recent_restores(restores: &[Restore]) -> Vec<&Restore> {
    let mut sorted: Vec<&Restore> = restores.iter().collect();
    sorted.sort_by_key(|r| std::cmp::Reverse(r.created_at));
    sorted
        .iter()
        .enumerate()
        .filter(|(i, r)| *i < RECENT_JOBS_WITH_EVENTS || !r.status.is_terminal())
        .map(|(_, r)| *r)
        .collect()
}

fn recent_jobs(backups: &[Backup]) -> Vec<&Backup> {
    let mut sorted: Vec<&Backup> = backups.iter().collect();
    sorted.sort_by_key(|b| std::cmp::Reverse(b.created_at));
    sorted
        .iter()
        .enumerate()
        .filter(|(i, b)| *i < RECENT_JOBS_WITH_EVENTS || !b.status.is_terminal())
        .map(|(_, b)| *b)
        .collect()
}

/// The value of one part of a snapshot, or `None` with the cause noted in `errors`.
fn keep<T>(errors: &mut Vec<String>, r: Result<T, ClientError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %chain(&e), "part of the snapshot failed");
            errors.push(chain(&e));
            None
        }
    }
}

/// Like [`keep`], for the parts a hub before policies (or instant recoveries) does not serve:
/// its 404 is no error (the view is then empty), anything else is.
fn keep_optional<T>(errors: &mut Vec<String>, r: Result<T, ClientError>) -> Option<T> {
    match r {
        Err(e) if e.status() == Some(404) => None,
        r => keep(errors, r),
    }
}

/// Everything the console shows, fetched at once. Fails only when `/health` fails; other
/// parts that fail are left out and named in `errors`.
pub async fn fetch_snapshot(client: &HubClient) -> Result<Snapshot, ClientError> {
    let health = client.health().await?;
    let (
        (backups, restores, verifies, vms, repositories, ports, processes, nodes, tunnels),
        (policies, prunes, recoveries),
    ) = tokio::join!(
        async {
            tokio::join!(
                client.backups(),
                client.restores(),
                client.verify_jobs(),
                client.vms(),
                client.repositories(),
                client.ports(),
                client.processes(),
                client.nodes(),
                client.tunnel(),
            )
        },
        async { tokio::join!(client.policies(), client.prune_jobs(), client.recoveries()) },
    );
    let mut errors = Vec::new();
    let repositories = keep(&mut errors, repositories);
    let spaces = match &repositories {
        Some(repos) => {
            let answers = futures_util::future::join_all(
                repos.iter().map(|r| client.repository_space(&r.id)),
            )
            .await;
            Some(
                answers
                    .into_iter()
                    .filter_map(|a| keep_optional(&mut errors, a))
                    .collect(),
            )
        }
        None => None,
    };
    let backups: Option<Vec<Backup>> = keep(&mut errors, backups);
    let restores: Option<Vec<Restore>> = keep(&mut errors, restores);
    let snap = Snapshot {
        health: Some(health),
        verifies: keep(&mut errors, verifies),
        vms: keep(&mut errors, vms),
        repositories,
        policies: keep_optional(&mut errors, policies),
        prunes: keep_optional(&mut errors, prunes),
        recoveries: keep_optional(&mut errors, recoveries),
        spaces,
        ports: keep(&mut errors, ports),
        processes: keep(&mut errors, processes),
        nodes: keep(&mut errors, nodes),
        tunnels: keep(&mut errors, tunnels),
        events: None,
        backups: None,
        restores: None,
        errors: Vec::new(),
    };
    let events = match &backups {
        Some(list) => {
            let logs = futures_util::future::join_all(
                recent_jobs(list)
                    .into_iter()
                    .map(|b| client.backup_events(&b.backup_id)),
            )
            .await;
            let restore_logs = futures_util::future::join_all(
                recent_restores(restores.as_deref().unwrap_or_default())
                    .into_iter()
                    .map(|r| client.restore_events(&r.restore_id)),
            )
            .await;
            let mut all: Vec<JobEvent> = Vec::new();
            for log in logs.into_iter().chain(restore_logs) {
                if let Some(mut l) = keep(&mut errors, log) {
                    all.append(&mut l);
                }
            }
            Some(all)
        }
        None => None,
    };
    Ok(Snapshot {
        backups,
        restores,
        events,
        errors,
        ..snap
    })
}

/// Poll once and report; true when the hub answered.
async fn poll(client: &HubClient, tx: &mpsc::Sender<Update>) -> bool {
    match fetch_snapshot(client).await {
        Ok(snap) => {
            let _ = tx.send(Update::Snapshot(Box::new(snap))).await;
            true
        }
        Err(e) => {
            tracing::info!(error = %chain(&e), "hub poll failed");
            let _ = tx.send(Update::Unreachable { error: cause(&e) }).await;
            false
        }
    }
}

/// Shortest time between two re-reads that events asked for.
const RELIST_AFTER: Duration = Duration::from_secs(1);

/// Events after which the policies, prune jobs and space are re-read: a policy run changed, or
/// a prune ended (its progress events change nothing the lists show).
fn rereads_lists(event: &HubEvent) -> bool {
    match event {
        HubEvent::PolicyRun { .. } => true,
        HubEvent::Prune { prune } => prune.status.is_terminal(),
        _ => false,
    }
}

/// Read the open stream until it ends; returns why it ended.
async fn pump(client: &HubClient, resp: reqwest::Response, tx: &mpsc::Sender<Update>) -> String {
    let mut body = resp.bytes_stream();
    let mut parser = SseParser::default();
    // The first tick is immediate: a snapshot right after subscribing covers anything that
    // changed between the last poll and the subscription.
    let mut refresh = tokio::time::interval(LIVE_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_refresh = Instant::now();
    loop {
        tokio::select! {
            chunk = body.next() => match chunk {
                Some(Ok(bytes)) => {
                    for item in parser.push(&bytes) {
                        let data = match item {
                            SseItem::Data(data) => data,
                            SseItem::Comment(_) => continue,
                        };
                        match parse_event(&data) {
                            Ok(Update::Event(HubEvent::Lagged { lost })) => {
                                // Events were lost: the lists are re-read in full, by the
                                // refresh below, now.
                                tracing::warn!(lost, "event stream lagged");
                                refresh.reset_immediately();
                            }
                            Ok(Update::Event(event)) => {
                                // A run or the end of a prune changes the lists beside it
                                // (next run, queue length, space): re-read them soon,
                                // at most once a second however many runs start at once.
                                if rereads_lists(&event) {
                                    let soon = last_refresh + RELIST_AFTER;
                                    if soon <= Instant::now() {
                                        refresh.reset_immediately();
                                    } else {
                                        refresh.reset_at(soon);
                                    }
                                }
                                if tx.send(Update::Event(event)).await.is_err() {
                                    return String::new();
                                }
                            }
                            Ok(update) => {
                                if tx.send(update).await.is_err() {
                                    return String::new();
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, data = %data, "unknown event from the hub"),
                        }
                    }
                }
                Some(Err(e)) => return chain(&e),
                None => return "the hub closed the event stream".to_string(),
            },
            _ = refresh.tick() => {
                last_refresh = Instant::now();
                if !poll(client, tx).await {
                    return "the hub stopped answering".to_string();
                }
            }
        }
    }
}

/// Run the feed until the receiver is dropped.
pub async fn run(client: HubClient, tx: mpsc::Sender<Update>) {
    let mut backoff = STREAM_BACKOFF.attempts();
    let mut next_stream_try = Instant::now();
    while !tx.is_closed() {
        let reachable = poll(&client, &tx).await;
        if reachable && Instant::now() >= next_stream_try {
            match client.events().await {
                Ok(resp) => {
                    tracing::info!("event stream open");
                    let _ = tx.send(Update::StreamUp).await;
                    let opened = Instant::now();
                    let error = pump(&client, resp, &tx).await;
                    if tx.is_closed() {
                        return;
                    }
                    tracing::info!(%error, "event stream ended");
                    let _ = tx.send(Update::StreamDown { error }).await;
                    if opened.elapsed() >= STREAM_HEALTHY_AFTER {
                        backoff.reset();
                    }
                    next_stream_try = Instant::now() + backoff.next_delay();
                    continue;
                }
                Err(e) => {
                    tracing::info!(error = %chain(&e), "event stream unavailable");
                    let _ = tx.send(Update::StreamDown { error: chain(&e) }).await;
                    next_stream_try = Instant::now() + backoff.next_delay();
                }
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_joins_data_lines_and_survives_split_chunks() {
        let mut p = SseParser::default();
        assert_eq!(
            p.push(b": keep-alive\n\nevent: backup\nda"),
            vec![SseItem::Comment("keep-alive".into())]
        );
        assert!(p.push(b"ta: {\"a\":\r\n").is_empty());
        let out = p.push(b"data: 1}\r\n\r\ndata:x\n\n");
        assert_eq!(
            out,
            vec![
                SseItem::Data("{\"a\":\n1}".into()),
                SseItem::Data("x".into())
            ]
        );
    }

    #[test]
    fn comments_are_not_events() {
        let mut p = SseParser::default();
        let out = p.push(b":keep-alive\n\n");
        assert_eq!(out, vec![SseItem::Comment("keep-alive".into())]);
    }
}
