//! Restores in the state: listed with the backups, followed by events, opened, cancelled.

use super::{press, typ};
use crate::app::*;
use crate::fixtures::{self, GIB, RUNNING_JOB, RUNNING_RESTORE};
use chrono::Duration;
use crossterm::event::KeyCode;
use sendense_shared::api::{HubEvent, JobStatus};
use sendense_shared::ids::BackupId;

fn with_restore(done: u64) -> App {
    let mut app = fixtures::app();
    app.apply(
        Update::Event(HubEvent::Restore {
            restore: fixtures::running_restore(done),
        }),
        fixtures::now(),
    );
    app
}

#[test]
fn a_restore_is_listed_among_the_backups_newest_first() {
    let app = with_restore(GIB);
    let ids: Vec<&str> = app.visible_jobs().iter().map(|j| j.id()).collect();
    // Created 40 s ago: newer than every backup of the fixtures.
    assert_eq!(ids[0], RUNNING_RESTORE);
    assert_eq!(ids[1], RUNNING_JOB);
    assert_eq!(ids.len(), 6, "5 backups and the restore");
    assert_eq!(app.row_count(View::Jobs), 6);
    assert_eq!(
        app.vm_of(&BackupId(RUNNING_RESTORE.into())),
        Some("pgtest1")
    );
}

#[test]
fn restore_events_update_it_in_place_and_give_a_rate() {
    let mut app = with_restore(GIB);
    let mib = 1024 * 1024;
    app.apply(
        Update::Event(HubEvent::Restore {
            restore: fixtures::running_restore(GIB + 300 * mib),
        }),
        fixtures::now() + Duration::seconds(2),
    );
    assert_eq!(
        app.restores.len(),
        1,
        "the same restore is updated, not added"
    );
    assert_eq!(app.restores[0].bytes_done, GIB + 300 * mib);
    assert_eq!(app.restore_rate(&app.restores[0]), Some(150 * mib));

    // Once it ended there is no rate, and a snapshot replaces the list.
    app.apply(
        Update::Event(HubEvent::Restore {
            restore: fixtures::failed_restore(),
        }),
        fixtures::now() + Duration::seconds(3),
    );
    assert_eq!(app.restores[0].status, JobStatus::Failed);
    assert_eq!(app.restore_rate(&app.restores[0]), None);
    app.apply(
        Update::Snapshot(Box::new(Snapshot {
            health: Some(fixtures::health()),
            restores: Some(vec![]),
            ..Default::default()
        })),
        fixtures::now() + Duration::seconds(4),
    );
    assert!(app.restores.is_empty());
}

#[test]
fn enter_opens_the_restore_and_c_asks_naming_it_then_y_cancels_it() {
    let mut app = with_restore(GIB);
    press(&mut app, KeyCode::Enter);
    assert_eq!(app.detail(), Some(&JobRef::Restore(RUNNING_RESTORE.into())));
    assert_eq!(
        app.detail_restore().map(|r| r.restore_id.as_str()),
        Some(RUNNING_RESTORE)
    );
    assert!(app.detail_backup().is_none());
    press(&mut app, KeyCode::Char('c'));
    assert_eq!(
        app.mode,
        Mode::ConfirmCancelRestore {
            restore_id: RUNNING_RESTORE.into(),
            vm_name: "pgtest1".into(),
            status: JobStatus::Running,
        }
    );
    assert_eq!(press(&mut app, KeyCode::Char('x')), None);
    assert_eq!(
        press(&mut app, KeyCode::Char('y')),
        Some(Action::CancelRestore(RUNNING_RESTORE.into()))
    );
    assert_eq!(app.mode, Mode::Normal);
}

#[test]
fn cancel_of_a_restore_can_be_aborted_and_a_finished_one_is_refused() {
    let mut app = with_restore(GIB);
    press(&mut app, KeyCode::Char('c'));
    assert_eq!(press(&mut app, KeyCode::Char('n')), None);
    assert_eq!(app.mode, Mode::Normal);
    assert_eq!(
        app.current_notice().unwrap().text,
        crate::strings::NOTICE_CANCEL_ABORTED
    );
    app.apply(
        Update::Event(HubEvent::Restore {
            restore: fixtures::failed_restore(),
        }),
        fixtures::now(),
    );
    assert_eq!(press(&mut app, KeyCode::Char('c')), None);
    assert_eq!(app.mode, Mode::Normal);
    let text = &app.current_notice().unwrap().text;
    assert!(
        text.contains(RUNNING_RESTORE) && text.contains("already failed"),
        "{text}"
    );
}

#[test]
fn the_filter_finds_restores_by_kind_and_target() {
    let mut app = with_restore(GIB);
    press(&mut app, KeyCode::Char('/'));
    typ(&mut app, "restore");
    let ids: Vec<&str> = app.visible_jobs().iter().map(|j| j.id()).collect();
    assert_eq!(ids, vec![RUNNING_RESTORE]);
    press(&mut app, KeyCode::Esc);
    press(&mut app, KeyCode::Char('/'));
    typ(&mut app, "node-a");
    assert_eq!(app.visible_jobs().len(), 1);
}

#[test]
fn in_the_detail_of_a_restore_j_and_k_stay_on_its_one_disk() {
    let mut app = with_restore(GIB);
    press(&mut app, KeyCode::Enter);
    press(&mut app, KeyCode::Char('j'));
    press(&mut app, KeyCode::Char('j'));
    assert_eq!(app.views.jobs.detail_scroll, 0);
    press(&mut app, KeyCode::Esc);
    assert_eq!(app.detail(), None);
    assert_eq!(app.selected(View::Jobs), 0);
}
