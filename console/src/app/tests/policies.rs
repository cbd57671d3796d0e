//! The Policies view's state: keys to the actions they ask for (with their y/n), what is
//! re-read on which update, and the hub's run and prune events folded in.

use super::press;
use crate::app::{Action, App, Mode, PolicyDetail, Update, View};
use crate::fixtures::{self, NIGHTLY};
use crossterm::event::KeyCode;
use sendense_shared::api::{BackupType, HubEvent, JobStatus, RunStatus};
use sendense_shared::ids::BackupId;

/// The fixture console with the nightly policy's detail open and read.
fn detail() -> App {
    let mut app = fixtures::app();
    press(&mut app, KeyCode::Char('7'));
    press(&mut app, KeyCode::Char('G'));
    let load = press(&mut app, KeyCode::Enter);
    assert_eq!(
        load,
        Some(Action::LoadPolicy {
            id: NIGHTLY.into(),
            vms: vec!["pgtest1".into(), "webfront".into()],
        }),
        "Enter opens the detail and asks for its runs and the points of its VMs (web* reaches webfront)"
    );
    let mut points = std::collections::BTreeMap::new();
    points.insert("pgtest1".to_string(), fixtures::pgtest1_points());
    points.insert("webfront".to_string(), fixtures::webfront_points());
    app.apply(
        Update::PolicyDetail(Box::new(PolicyDetail {
            policy_id: NIGHTLY.into(),
            runs: Some(fixtures::nightly_runs()),
            points,
            errors: vec![],
        })),
        fixtures::now(),
    );
    app
}

#[test]
fn run_now_and_disable_ask_first_and_send_the_policy_back_with_enabled_flipped() {
    let mut app = detail();
    assert_eq!(press(&mut app, KeyCode::Char('r')), None);
    assert!(
        matches!(&app.mode, Mode::ConfirmPolicy { question, .. } if question == "Run policy nightly now (its 2 VMs)?"),
        "{:?}",
        app.mode
    );
    assert_eq!(
        press(&mut app, KeyCode::Char('y')),
        Some(Action::RunPolicy {
            id: NIGHTLY.into(),
            name: "nightly".into()
        })
    );

    press(&mut app, KeyCode::Char('e'));
    assert_eq!(press(&mut app, KeyCode::Char('n')), None, "n sends nothing");
    assert_eq!(app.mode, Mode::Normal);
    press(&mut app, KeyCode::Char('e'));
    match press(&mut app, KeyCode::Char('y')) {
        Some(Action::UpdatePolicy { id, request }) => {
            assert_eq!(id, NIGHTLY);
            assert!(!request.enabled, "enabled flipped");
            let nightly = &fixtures::policies()[0];
            assert_eq!(request.schedule, nightly.schedule, "the rest unchanged");
            assert_eq!(request.retention, nightly.retention);
            assert_eq!(request.vms, nightly.vms);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn protect_toggles_the_selected_point_and_a_backup_event_marks_it() {
    let mut app = detail();
    // The protected point is the seventh of pgtest1's.
    for _ in 0..6 {
        press(&mut app, KeyCode::Char('j'));
    }
    assert_eq!(
        press(&mut app, KeyCode::Char('p')),
        Some(Action::Protect {
            backup_id: BackupId("b-22ff5b60".into()),
            protect: false
        })
    );
    press(&mut app, KeyCode::Char('g'));
    assert_eq!(
        press(&mut app, KeyCode::Char('p')),
        Some(Action::Protect {
            backup_id: BackupId("b-91d4f7aa".into()),
            protect: true
        })
    );
    // The hub answers the protected backup: its point shows it at once, and the open detail
    // is re-read (the rules count protected points out).
    let mut b = crate::fixtures::backups()
        .into_iter()
        .find(|b| b.backup_id.0 == "b-91d4f7aa")
        .expect("fixture backup");
    b.protected = true;
    let update = Update::Event(HubEvent::Backup { backup: b });
    assert!(matches!(
        app.reload_on(&update),
        Some(Action::LoadPolicy { .. })
    ));
    app.apply(update, fixtures::now());
    assert!(app.detail_points()[0].protected);
}

#[test]
fn prune_preview_then_y_starts_the_prune_of_the_shown_vm() {
    let mut app = detail();
    press(&mut app, KeyCode::Char('l'));
    assert_eq!(app.detail_vm().as_deref(), Some("webfront"));
    press(&mut app, KeyCode::Char('h'));
    assert_eq!(
        press(&mut app, KeyCode::Char('x')),
        Some(Action::PreviewPrune("pgtest1".into()))
    );
    app.apply(
        Update::PrunePreview(Box::new(fixtures::pgtest1_plan())),
        fixtures::now(),
    );
    assert!(matches!(app.mode, Mode::PrunePreview(_)));
    assert_eq!(press(&mut app, KeyCode::Esc), None, "Esc closes");
    assert_eq!(app.mode, Mode::Normal);
    app.apply(
        Update::PrunePreview(Box::new(fixtures::pgtest1_plan())),
        fixtures::now(),
    );
    assert_eq!(
        press(&mut app, KeyCode::Char('y')),
        Some(Action::Prune("pgtest1".into()))
    );

    // A plan that removes nothing is not started.
    let mut plan = fixtures::pgtest1_plan();
    for p in &mut plan.points {
        p.action = sendense_shared::api::PruneAction::Keep;
    }
    app.apply(Update::PrunePreview(Box::new(plan)), fixtures::now());
    assert_eq!(press(&mut app, KeyCode::Char('y')), None);
}

#[test]
fn policy_keys_elsewhere_say_where_they_work() {
    let mut app = fixtures::app();
    assert_eq!(press(&mut app, KeyCode::Char('r')), None);
    assert!(app.current_notice().unwrap().text.contains("press 7"));
    press(&mut app, KeyCode::Char('7'));
    assert_eq!(
        press(&mut app, KeyCode::Char('x')),
        None,
        "x needs the detail"
    );
    assert!(
        app.current_notice()
            .unwrap()
            .text
            .contains("Enter on a policy")
    );
}

#[test]
fn run_and_prune_events_update_the_view_and_ask_for_a_reload() {
    let mut app = detail();
    let mut run = fixtures::nightly_runs()[0].clone();
    run.run_id = "run-0200".into();
    run.planned_at = fixtures::now();
    run.queued_at = fixtures::now();
    run.status = RunStatus::Queued;
    run.backup_type = Some(BackupType::Full);
    let update = Update::Event(HubEvent::PolicyRun { run: run.clone() });
    assert!(matches!(
        app.reload_on(&update),
        Some(Action::LoadPolicy { id, .. }) if id == NIGHTLY
    ));
    app.apply(update, fixtures::now());
    assert_eq!(app.runs_of(NIGHTLY)[0].run_id, "run-0200", "newest first");
    let nightly = app.policies.iter().find(|p| p.id == NIGHTLY).unwrap();
    assert_eq!(nightly.last_run.as_ref().unwrap().status, RunStatus::Queued);

    // A prune still running changes no point yet; its end does.
    let mut prune = fixtures::prunes()[0].clone();
    let running = Update::Event(HubEvent::Prune {
        prune: prune.clone(),
    });
    assert_eq!(app.reload_on(&running), None);
    prune.status = JobStatus::Completed;
    let ended = Update::Event(HubEvent::Prune {
        prune: prune.clone(),
    });
    assert!(app.reload_on(&ended).is_some());
    app.apply(ended, fixtures::now());
    assert_eq!(app.prunes[0].status, JobStatus::Completed);
    assert!(app.running_prune("webfront").is_none());

    // Nothing is re-read for a policy that is not open.
    press(&mut app, KeyCode::Esc);
    assert_eq!(app.view, View::Policies);
    assert_eq!(
        app.reload_on(&Update::Event(HubEvent::PolicyRun { run })),
        None
    );
}
