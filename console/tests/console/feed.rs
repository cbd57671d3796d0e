//! The live feed against the fake hub: snapshot, event stream, losing the hub, recovering.

use crate::fake_hub::{FakeHub, TOKEN};
use console::app::{App, Reach, Stream, Update};
use sendense_shared::api::{BackupType, HubEvent, JobStatus};
use sendense_shared::client::HubClient;
use std::time::Duration;
use tokio::sync::mpsc;

/// Receive updates until `pred` accepts one (or fail after `secs`), folding all into `app`.
async fn until(
    rx: &mut mpsc::Receiver<Update>,
    app: &mut App,
    secs: u64,
    what: &str,
    pred: impl Fn(&Update, &App) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let u = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no update for: {what}"))
            .expect("feed ended");
        app.apply(u.clone(), chrono::Utc::now());
        if pred(&u, app) {
            return;
        }
    }
}

#[tokio::test]
async fn feed_goes_live_follows_events_and_recovers_after_the_hub_returns() {
    let hub = FakeHub::start(&["repo-a"]).await;
    let client = HubClient::new(&hub.url, Some(TOKEN.into()));
    let (tx, mut rx) = mpsc::channel(64);
    let feed = tokio::spawn(console::sse::run(client, tx));
    let mut app = App::new(&hub.url, chrono::Utc::now());

    until(&mut rx, &mut app, 10, "first snapshot", |u, _| {
        matches!(u, Update::Snapshot(_))
    })
    .await;
    assert_eq!(app.reach, Reach::Reachable);
    assert_eq!(app.health.as_ref().unwrap().git_commit, "fakehub");
    until(&mut rx, &mut app, 10, "stream up", |u, _| {
        matches!(u, Update::StreamUp)
    })
    .await;
    // Let the post-subscribe snapshot arrive, so the event below is not raced by it.
    until(&mut rx, &mut app, 10, "snapshot after subscribe", |u, _| {
        matches!(u, Update::Snapshot(_))
    })
    .await;

    let mut b = crate::fake_hub::backup("b-live", "pgtest1", "repo-a", BackupType::Full);
    b.status = JobStatus::Running;
    let msg = serde_json::to_string(&HubEvent::Backup { backup: b }).unwrap();
    hub.events.send(msg).unwrap();
    until(&mut rx, &mut app, 10, "backup event", |u, _| {
        matches!(u, Update::Event(_))
    })
    .await;
    assert_eq!(app.backups[0].backup_id.0, "b-live");
    assert_eq!(app.stream, Stream::Up);

    // Events lost on the hub's side (a job it announced to nobody), then its "lagged" notice:
    // the lists are re-read at once, well before the periodic refresh (LIVE_REFRESH, 10 s,
    // after the snapshot above) would have.
    hub.state
        .lock()
        .unwrap()
        .backups
        .push(crate::fake_hub::backup(
            "b-lost",
            "flaky",
            "repo-a",
            BackupType::Full,
        ));
    hub.events
        .send(r#"{"kind":"lagged","lost":3}"#.into())
        .unwrap();
    until(
        &mut rx,
        &mut app,
        5,
        "re-read after the lagged notice",
        |u, app| {
            matches!(u, Update::Snapshot(_))
                && app.backups.iter().any(|b| b.backup_id.0 == "b-lost")
        },
    )
    .await;

    // The hub goes away: the stream ends, then polls fail and are counted.
    let (addr, state) = hub.stop().await;
    until(
        &mut rx,
        &mut app,
        10,
        "unreachable twice",
        |_, app| matches!(app.reach, Reach::Unreachable { retries, .. } if retries >= 2),
    )
    .await;
    let Reach::Unreachable { last_error, .. } = &app.reach else {
        unreachable!()
    };
    assert!(last_error.contains("refused"), "{last_error}");
    assert_eq!(app.backups.len(), 1, "last known data kept");

    // The hub comes back on the same port: the console recovers by itself.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _hub = FakeHub::serve(listener, state);
    until(&mut rx, &mut app, 15, "recovered", |_, app| {
        app.reach == Reach::Reachable
    })
    .await;
    until(&mut rx, &mut app, 15, "stream up again", |_, app| {
        app.stream == Stream::Up
    })
    .await;
    feed.abort();
}
