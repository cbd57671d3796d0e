//! The Policies view, its detail and the prune preview, at 80×24 and 160×48.

use super::{both, draw, keys};
use crate::app::{App, PolicyDetail, Update};
use crate::fixtures;
use crossterm::event::KeyCode;

/// The fixture console in the Policies view.
fn policies_app() -> App {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('7')]);
    app
}

/// The nightly policy's detail open, its runs and points read.
fn detail_app() -> App {
    let mut app = policies_app();
    // nightly is second by name (archive, mail-hourly, nightly): the last row.
    keys(&mut app, &[KeyCode::Char('G'), KeyCode::Enter]);
    let mut points = std::collections::BTreeMap::new();
    points.insert("pgtest1".to_string(), fixtures::pgtest1_points());
    points.insert("webfront".to_string(), fixtures::webfront_points());
    app.apply(
        Update::PolicyDetail(Box::new(PolicyDetail {
            policy_id: fixtures::NIGHTLY.into(),
            runs: Some(fixtures::nightly_runs()),
            points,
            errors: vec![],
        })),
        fixtures::now(),
    );
    app
}

#[test]
fn policies_list() {
    let app = policies_app();
    both(
        "policies",
        &app,
        &[
            "7 Policies",
            "nightly",
            "0 1 * * *",
            "pgtest1, web*",
            "node:node-b",
            "○ disabled",
            "▲ gave_up",
            "✔ completed",
            "full in 156 days",
        ],
    );
}

#[test]
fn policies_list_selected_policy_says_why_its_last_run_gave_up() {
    let mut app = policies_app();
    keys(&mut app, &[KeyCode::Char('j')]);
    both(
        "policies_gave_up_selected",
        &app,
        &[
            "(UTC)",
            "queued 1",
            "waited 6h00m for a free",
            "full in 23 days",
        ],
    );
}

#[test]
fn policy_detail_runs_rules_and_points() {
    let app = detail_app();
    both(
        "policy_detail",
        &app,
        &[
            "Policy nightly",
            "✔ enabled",
            "0 1 * * * (Europe/London)",
            "full on sun",
            "last 2 · daily 7 · weekly 4 · monthly 3",
            "Recent runs",
            "✔ completed",
            "Points of pgtest1 (1/2 VMs",
            "✔ keep",
        ],
    );
    // The runs of every kind and the oldest points where there is room for them.
    let wide = draw(&app, 160, 48);
    for text in [
        "weekly",
        "■ yes",
        "rebase child",
        "manual",
        "late",
        "○ skipped",
        "✖ failed",
        "merge into child",
        "protected",
        "b-11aa6c70",
    ] {
        assert!(wide.contains(text), "{text}:\n{wide}");
    }
}

#[test]
fn policy_detail_second_vm_and_prune_running() {
    let mut app = detail_app();
    keys(&mut app, &[KeyCode::Char('l')]);
    both(
        "policy_detail_webfront",
        &app,
        &["Points of webfront (2/2 VMs", "◐ prune running 2/4"],
    );
}

#[test]
fn prune_preview_lists_kept_and_removed_points_with_bytes() {
    let mut app = detail_app();
    app.apply(
        Update::PrunePreview(Box::new(fixtures::pgtest1_plan())),
        fixtures::now(),
    );
    both(
        "prune_preview",
        &app,
        &[
            "Prune preview · pgtest1",
            "Keeps 6 point(s), removes 2, frees 13.1 GiB.",
            "keep weekly",
            "keep protected",
            "rebase child",
            "merge into child",
            "13.0 GiB",
            "y start this prune",
        ],
    );
}

#[test]
fn policy_detail_at_80x24_scrolls_to_the_oldest_points() {
    let mut app = detail_app();
    keys(&mut app, &[KeyCode::Char('G')]);
    let screen = draw(&app, 80, 24);
    for text in [
        "▶ 11-15 01:00 full",
        "merge into child",
        "■ yes",
        "protected",
    ] {
        assert!(screen.contains(text), "{text}:\n{screen}");
    }
}
