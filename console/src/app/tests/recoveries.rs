//! Instant recoveries in the state: read from the stream's `recovery` events and snapshots,
//! listed with the other jobs, opened, filtered, cancelled.

use super::{press, typ};
use crate::app::*;
use crate::fixtures::{self, RUNNING_JOB, STALLED_RECOVERY, STREAMING_RECOVERY};
use crossterm::event::KeyCode;
use sendense_shared::api::JobStatus;

fn with_recoveries() -> App {
    let mut app = fixtures::app();
    for r in [fixtures::stalled_recovery(), fixtures::streaming_recovery()] {
        app.apply(Update::Recovery(Box::new(r)), fixtures::now());
    }
    app
}

#[test]
fn the_streams_recovery_event_becomes_an_update_and_other_kinds_still_parse() {
    let r = fixtures::streaming_recovery();
    let data = serde_json::json!({"kind": "recovery", "recovery": r}).to_string();
    match crate::sse::parse_event(&data).unwrap() {
        Update::Event(sendense_shared::api::HubEvent::Recovery { recovery }) => {
            assert_eq!(recovery, r)
        }
        other => panic!("{other:?}"),
    }
    let lagged = r#"{"kind":"lagged","lost":3}"#;
    assert!(matches!(
        crate::sse::parse_event(lagged),
        Ok(Update::Event(sendense_shared::api::HubEvent::Lagged {
            lost: 3
        }))
    ));
    assert!(crate::sse::parse_event(r#"{"kind":"no_such_kind"}"#).is_err());
}

#[test]
fn recoveries_are_listed_newest_first_among_the_jobs_and_updated_in_place() {
    let mut app = with_recoveries();
    let ids: Vec<&str> = app.visible_jobs().iter().map(|j| j.id()).collect();
    // 90 s old: newer than every backup; the stalled one (5 min) after the running job.
    assert_eq!(
        &ids[..3],
        &[STREAMING_RECOVERY, RUNNING_JOB, STALLED_RECOVERY]
    );
    assert_eq!(
        app.recovery_rate(&app.recoveries[0]),
        Some(80 * 1024 * 1024)
    );

    let mut done = fixtures::streaming_recovery();
    done.status = JobStatus::Completed;
    app.apply(Update::Recovery(Box::new(done)), fixtures::now());
    assert_eq!(app.recoveries.len(), 2, "updated, not added");
    assert_eq!(
        app.recovery_rate(&app.recoveries[0]),
        None,
        "no rate once over"
    );

    // A snapshot replaces the list; a hub without recoveries (None) leaves it.
    app.apply(
        Update::Snapshot(Box::new(Snapshot {
            recoveries: None,
            ..Default::default()
        })),
        fixtures::now(),
    );
    assert_eq!(app.recoveries.len(), 2);
    app.apply(
        Update::Snapshot(Box::new(Snapshot {
            recoveries: Some(vec![fixtures::completed_recovery()]),
            ..Default::default()
        })),
        fixtures::now(),
    );
    assert_eq!(app.recoveries.len(), 1);
}

#[test]
fn the_filter_finds_recoveries_by_kind_node_and_stall() {
    let mut app = with_recoveries();
    press(&mut app, KeyCode::Char('/'));
    typ(&mut app, "recover");
    assert_eq!(app.visible_jobs().len(), 2);
    press(&mut app, KeyCode::Esc);
    press(&mut app, KeyCode::Char('/'));
    typ(&mut app, "stalled");
    let ids: Vec<&str> = app.visible_jobs().iter().map(|j| j.id()).collect();
    assert_eq!(ids, vec![STALLED_RECOVERY]);
}

#[test]
fn enter_opens_the_recovery_j_scrolls_its_disks_and_c_y_cancels_it() {
    let mut app = with_recoveries();
    press(&mut app, KeyCode::Enter);
    assert_eq!(
        app.detail(),
        Some(&JobRef::Recovery(STREAMING_RECOVERY.into()))
    );
    press(&mut app, KeyCode::Char('j'));
    press(&mut app, KeyCode::Char('j'));
    assert_eq!(
        app.views.jobs.detail_scroll, 1,
        "two disks: stops at the last"
    );
    press(&mut app, KeyCode::Char('c'));
    assert_eq!(
        app.mode,
        Mode::ConfirmCancelRecovery {
            recovery_id: STREAMING_RECOVERY.into(),
            vm_name: "pgtest1-rec".into(),
            node: "node-a".into(),
            status: JobStatus::Running,
        }
    );
    assert_eq!(
        press(&mut app, KeyCode::Char('y')),
        Some(Action::CancelRecovery(STREAMING_RECOVERY.into()))
    );
    assert_eq!(app.mode, Mode::Normal);

    // A completed recovery's VM runs on its own: nothing to cancel.
    app.apply(
        Update::Recovery(Box::new(sendense_shared::api::Recovery {
            recovery_id: STREAMING_RECOVERY.into(),
            ..fixtures::completed_recovery()
        })),
        fixtures::now(),
    );
    assert_eq!(press(&mut app, KeyCode::Char('c')), None);
    assert!(
        app.current_notice()
            .unwrap()
            .text
            .contains("already completed")
    );
}
