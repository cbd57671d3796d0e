//! State tests: hub updates folded in, and key handling (bounds, filter, confirmations).

use super::*;
use crate::fixtures::{self, GIB, RUNNING_JOB};
use crate::strings;
use chrono::Duration;
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use sendense_shared::api::{HubEvent, TunnelState, TunnelStateKind};

fn press(app: &mut App, code: KeyCode) -> Option<Action> {
    app.on_key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn typ(app: &mut App, text: &str) {
    for c in text.chars() {
        press(app, KeyCode::Char(c));
    }
}

#[test]
fn backup_event_updates_the_job_and_its_rate() {
    let mut app = App::new(fixtures::HUB_URL, fixtures::now());
    let t0 = fixtures::now();
    app.apply(
        Update::Event(HubEvent::Backup {
            backup: fixtures::running_job([GIB, GIB / 2]),
        }),
        t0,
    );
    assert_eq!(app.backups.len(), 1);
    assert_eq!(
        app.disk_rate(&BackupId(RUNNING_JOB.into()), DiskKey(2000)),
        None,
        "one sample has no rate"
    );

    // Two seconds later disk 2000 has copied 200 MiB more and disk 2001 100 MiB.
    let mib = 1024 * 1024;
    app.apply(
        Update::Event(HubEvent::Backup {
            backup: fixtures::running_job([GIB + 200 * mib, GIB / 2 + 100 * mib]),
        }),
        t0 + Duration::seconds(2),
    );
    assert_eq!(app.backups.len(), 1, "the same job is updated, not added");
    assert_eq!(app.backups[0].disk_results[0].bytes_done, GIB + 200 * mib);
    let id = BackupId(RUNNING_JOB.into());
    assert_eq!(app.disk_rate(&id, DiskKey(2000)), Some(100 * mib));
    assert_eq!(app.disk_rate(&id, DiskKey(2001)), Some(50 * mib));
    assert_eq!(app.job_rate(&app.backups[0]), Some(150 * mib));
}

#[test]
fn sub_second_updates_do_not_distort_the_rate() {
    let mut app = App::new(fixtures::HUB_URL, fixtures::now());
    let t0 = fixtures::now();
    let mib = 1024 * 1024;
    for (ms, done) in [
        (0, 0),
        (1000, 100 * mib),
        (1100, 101 * mib),
        (2000, 200 * mib),
    ] {
        app.apply(
            Update::Event(HubEvent::Backup {
                backup: fixtures::running_job([GIB + done, GIB]),
            }),
            t0 + Duration::milliseconds(ms),
        );
    }
    assert_eq!(
        app.disk_rate(&BackupId(RUNNING_JOB.into()), DiskKey(2000)),
        Some(100 * mib)
    );
}

#[test]
fn events_are_ordered_by_seq_and_deduplicated() {
    let mut app = App::new(fixtures::HUB_URL, fixtures::now());
    let e = |seq| {
        fixtures::event(
            seq,
            RUNNING_JOB,
            10,
            "info",
            "step",
            &format!("m{seq}"),
            None,
        )
    };
    for seq in [3, 1, 2, 2] {
        app.apply(
            Update::Event(HubEvent::JobEvent { event: e(seq) }),
            fixtures::now(),
        );
    }
    let seqs: Vec<i64> = app.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    // The Events view shows the newest first.
    let shown: Vec<i64> = app.visible_events().iter().map(|e| e.seq).collect();
    assert_eq!(shown, vec![3, 2, 1]);
}

#[test]
fn tunnel_ports_and_processes_events_replace_state() {
    let mut app = fixtures::app();
    app.apply(
        Update::Event(HubEvent::Tunnel {
            node: "node-b".into(),
            tunnel: fixtures::tunnel_up(),
        }),
        fixtures::now(),
    );
    let row = app
        .tunnel_rows()
        .into_iter()
        .find(|r| r.node == "node-b")
        .unwrap();
    assert_eq!(row.tunnel.unwrap().state, TunnelStateKind::Up);
    assert_eq!(
        row.probe_error, None,
        "the hub has just asked node-b: the probe error of the last snapshot is over"
    );

    assert_eq!(app.port_cell(10105), PortCell::Squatted);
    assert_eq!(app.port_cell(10100), PortCell::Held);
    assert_eq!(
        app.port_cell(10102),
        PortCell::Stale,
        "held port whose qemu-nbd is dead"
    );
    assert_eq!(app.port_cell(10150), PortCell::Free);
    let mut ports = fixtures::ports();
    ports.squatted.clear();
    ports.allocations.retain(|a| a.port.0 != 10100);
    app.apply(Update::Event(HubEvent::Ports { ports }), fixtures::now());
    assert_eq!(app.port_cell(10105), PortCell::Free);
    assert_eq!(app.port_cell(10100), PortCell::Free);

    app.apply(
        Update::Event(HubEvent::Processes { processes: vec![] }),
        fixtures::now(),
    );
    assert!(app.processes.is_empty());
    assert_eq!(
        app.port_cell(10102),
        PortCell::Held,
        "no dead process known any more"
    );
}

/// The hub lists the qemu-nbd processes of past jobs too; ports are reused, so an old dead
/// process often shares a port with the live export of the running job.
#[test]
fn a_dead_process_of_an_old_job_on_a_reused_port_is_not_the_port_holder() {
    let mut app = fixtures::app();
    let mut processes = fixtures::processes();
    let mut old = processes[0].clone();
    old.pid = 40001;
    old.backup_id = BackupId("b-old-finished".into());
    old.alive = false;
    processes.push(old.clone());
    app.apply(
        Update::Event(HubEvent::Processes { processes }),
        fixtures::now(),
    );
    assert_eq!(
        app.port_cell(10100),
        PortCell::Held,
        "its own qemu-nbd is alive"
    );
    assert_eq!(app.port_process(10100).map(|p| p.pid), Some(51234));
    assert!(
        !app.process_dead_while_needed(&old),
        "the old job's process was stopped as planned"
    );
    let stale = app
        .processes
        .iter()
        .find(|p| p.port.0 == 10102)
        .unwrap()
        .clone();
    assert!(
        app.process_dead_while_needed(&stale),
        "dead while its port is still held for it"
    );
}

#[test]
fn a_node_without_tunnel_is_direct_not_down() {
    use crate::ui::theme;
    let direct = TunnelState {
        state: TunnelStateKind::Down,
        since: fixtures::now(),
        restarts: 0,
        last_error: None,
        links: Vec::new(),
        forwards: vec![],
    };
    assert_eq!(
        theme::tunnel_of(Some(&direct)).1,
        crate::strings::TUNNEL_DIRECT
    );
    assert_eq!(
        theme::tunnel_of(Some(&fixtures::tunnel_down())).1,
        crate::strings::TUNNEL_DOWN
    );
    let mut starting = fixtures::tunnel_up();
    starting.state = TunnelStateKind::Down;
    assert_eq!(
        theme::tunnel_of(Some(&starting)).1,
        crate::strings::TUNNEL_DOWN,
        "a configured tunnel lists its forwards even while down"
    );
}

#[test]
fn unreachable_counts_retries_and_recovers() {
    let mut app = fixtures::app();
    let t = fixtures::now();
    app.apply(
        Update::Unreachable {
            error: "Connection refused (os error 111)".into(),
        },
        t,
    );
    app.apply(
        Update::Unreachable {
            error: "timed out".into(),
        },
        t + Duration::seconds(2),
    );
    match &app.reach {
        Reach::Unreachable {
            retries,
            last_error,
            since,
        } => {
            assert_eq!(*retries, 2);
            assert_eq!(last_error, "timed out");
            assert_eq!(*since, t);
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
    assert_eq!(app.stream, Stream::Down { error: None });
    assert_eq!(app.backups.len(), 5, "the last known data stays on screen");

    app.apply(
        Update::Snapshot(Box::new(fixtures::snapshot())),
        t + Duration::seconds(4),
    );
    assert_eq!(app.reach, Reach::Reachable);
    assert_eq!(app.last_contact, Some(t + Duration::seconds(4)));
}

#[test]
fn snapshot_without_a_part_keeps_the_previous_value() {
    let mut app = fixtures::app();
    let snap = Snapshot {
        health: Some(fixtures::health()),
        errors: vec!["GET /api/v1/tunnel: 404".into()],
        ..Default::default()
    };
    app.apply(Update::Snapshot(Box::new(snap)), fixtures::now());
    assert_eq!(app.vms.len(), 4);
    assert_eq!(
        app.snapshot_errors,
        vec!["GET /api/v1/tunnel: 404".to_string()]
    );
}

#[test]
fn j_and_k_stay_within_the_list() {
    let mut app = fixtures::app();
    assert_eq!(app.selected(View::Jobs), 0);
    press(&mut app, KeyCode::Char('k'));
    assert_eq!(app.selected(View::Jobs), 0, "k at the top stays");
    for _ in 0..10 {
        press(&mut app, KeyCode::Char('j'));
    }
    assert_eq!(
        app.selected(View::Jobs),
        4,
        "j at the bottom stays on the last of 5 jobs"
    );
    press(&mut app, KeyCode::Up);
    assert_eq!(app.selected(View::Jobs), 3);
    press(&mut app, KeyCode::Char('g'));
    assert_eq!(app.selected(View::Jobs), 0);
    press(&mut app, KeyCode::Char('G'));
    assert_eq!(app.selected(View::Jobs), 4);
}

#[test]
fn views_switch_by_tab_backtab_and_digits() {
    let mut app = fixtures::app();
    press(&mut app, KeyCode::Tab);
    assert_eq!(app.view, View::Vms);
    press(&mut app, KeyCode::BackTab);
    press(&mut app, KeyCode::BackTab);
    assert_eq!(app.view, View::Policies, "Shift-Tab wraps around");
    press(&mut app, KeyCode::Char('3'));
    assert_eq!(app.view, View::Ports);
    assert_eq!(press(&mut app, KeyCode::Char('q')), Some(Action::Quit));
}

#[test]
fn filter_narrows_the_list_and_esc_clears_it() {
    let mut app = fixtures::app();
    press(&mut app, KeyCode::Char('6'));
    let all = app.visible_events().len();
    press(&mut app, KeyCode::Char('/'));
    assert_eq!(app.mode, Mode::Filter);
    typ(&mut app, "qemu_nbdx");
    press(&mut app, KeyCode::Backspace);
    assert_eq!(app.filter(View::Events), "qemu_nbd");
    let shown: Vec<&str> = app
        .visible_events()
        .iter()
        .map(|e| e.step.as_str())
        .collect();
    assert_eq!(
        shown,
        vec![
            "qemu_nbd_started",
            "qemu_nbd_started",
            "qemu_nbd_exited",
            "qemu_nbd_started"
        ]
    );
    press(&mut app, KeyCode::Enter);
    assert_eq!(app.mode, Mode::Normal);
    assert_eq!(app.visible_events().len(), 4, "Enter keeps the filter");
    assert_eq!(app.filter(View::Jobs), "", "filters belong to one view");
    press(&mut app, KeyCode::Esc);
    assert_eq!(app.visible_events().len(), all);
}

#[test]
fn q_typed_into_a_filter_does_not_quit() {
    let mut app = fixtures::app();
    press(&mut app, KeyCode::Char('/'));
    assert_eq!(press(&mut app, KeyCode::Char('q')), None);
    assert_eq!(app.filter(View::Jobs), "q");
}

#[test]
fn cancel_asks_naming_the_job_and_y_sends_it() {
    let mut app = fixtures::app();
    // First row is the running pgtest1 job.
    assert_eq!(press(&mut app, KeyCode::Char('c')), None);
    assert_eq!(
        app.mode,
        Mode::ConfirmCancel {
            backup_id: BackupId(RUNNING_JOB.into()),
            vm_name: "pgtest1".into(),
            status: JobStatus::Running,
        }
    );
    assert_eq!(
        press(&mut app, KeyCode::Char('x')),
        None,
        "other keys are ignored"
    );
    assert_eq!(
        press(&mut app, KeyCode::Char('y')),
        Some(Action::Cancel(BackupId(RUNNING_JOB.into())))
    );
    assert_eq!(app.mode, Mode::Normal);
}

#[test]
fn cancel_n_keeps_the_job_and_finished_jobs_cannot_be_cancelled() {
    let mut app = fixtures::app();
    press(&mut app, KeyCode::Char('c'));
    assert_eq!(press(&mut app, KeyCode::Char('n')), None);
    assert_eq!(app.mode, Mode::Normal);
    assert_eq!(
        app.current_notice().unwrap().text,
        strings::NOTICE_CANCEL_ABORTED
    );

    press(&mut app, KeyCode::Char('j')); // the failed webfront job
    assert_eq!(press(&mut app, KeyCode::Char('c')), None);
    assert_eq!(app.mode, Mode::Normal);
    assert!(
        app.current_notice()
            .unwrap()
            .text
            .contains("already failed")
    );
}

#[test]
fn cancel_from_the_detail_targets_the_open_job() {
    let mut app = fixtures::app();
    press(&mut app, KeyCode::Char('j'));
    press(&mut app, KeyCode::Char('k'));
    press(&mut app, KeyCode::Enter);
    assert_eq!(
        app.detail(),
        Some(&JobRef::Backup(BackupId(RUNNING_JOB.into())))
    );
    press(&mut app, KeyCode::Char('c'));
    assert!(
        matches!(app.mode, Mode::ConfirmCancel { ref backup_id, .. } if backup_id.0 == RUNNING_JOB)
    );
    press(&mut app, KeyCode::Esc);
    press(&mut app, KeyCode::Esc);
    assert_eq!(app.detail(), None, "Esc closes the detail");
}

#[test]
fn start_picks_type_and_repository_then_confirms() {
    let mut app = fixtures::app();
    press(&mut app, KeyCode::Char('s'));
    assert_eq!(app.mode, Mode::Normal, "s only works in the VMs view");
    press(&mut app, KeyCode::Char('2'));
    press(&mut app, KeyCode::Char('j'));
    press(&mut app, KeyCode::Char('j')); // mailsrv: never backed up
    press(&mut app, KeyCode::Char('s'));
    let Mode::Start(form) = &app.mode else {
        panic!("expected the start dialog, got {:?}", app.mode)
    };
    assert_eq!(form.vm_name, "mailsrv");
    assert_eq!(
        form.backup_type,
        BackupType::Full,
        "no previous backup: full by default"
    );
    press(&mut app, KeyCode::Char('i'));
    press(&mut app, KeyCode::Char('j'));
    press(&mut app, KeyCode::Char('j'));
    press(&mut app, KeyCode::Char('t'));
    press(&mut app, KeyCode::Enter);
    assert!(matches!(app.mode, Mode::ConfirmStart(_)));
    assert_eq!(
        press(&mut app, KeyCode::Char('y')),
        Some(Action::Start(BackupRequest {
            vm_name: "mailsrv".into(),
            repository_id: "offsite".into(),
            backup_type: BackupType::Full,
            require_application_consistency: false,
        }))
    );
}

#[test]
fn start_can_be_aborted_at_both_steps() {
    let mut app = fixtures::app();
    press(&mut app, KeyCode::Char('2'));
    press(&mut app, KeyCode::Char('s'));
    assert!(matches!(&app.mode, Mode::Start(f) if f.backup_type == BackupType::Incremental));
    press(&mut app, KeyCode::Esc);
    assert_eq!(app.mode, Mode::Normal);
    press(&mut app, KeyCode::Char('s'));
    press(&mut app, KeyCode::Enter);
    assert_eq!(press(&mut app, KeyCode::Char('n')), None);
    assert_eq!(app.mode, Mode::Normal);
}

#[test]
fn start_without_repositories_says_so() {
    let mut app = fixtures::app();
    app.repositories.clear();
    press(&mut app, KeyCode::Char('2'));
    press(&mut app, KeyCode::Char('s'));
    assert_eq!(app.mode, Mode::Normal);
    assert_eq!(app.current_notice().unwrap().level, NoticeLevel::Error);
}

#[test]
fn help_opens_and_closes() {
    let mut app = fixtures::app();
    press(&mut app, KeyCode::Char('?'));
    assert_eq!(app.mode, Mode::Help);
    assert_eq!(
        press(&mut app, KeyCode::Char('q')),
        None,
        "q closes the help first"
    );
    assert_eq!(app.mode, Mode::Normal);
}

#[test]
fn enter_on_an_event_opens_its_job() {
    let mut app = fixtures::app();
    press(&mut app, KeyCode::Char('6'));
    press(&mut app, KeyCode::Char('G')); // oldest event: the failed job's creation
    press(&mut app, KeyCode::Enter);
    assert_eq!(app.view, View::Jobs);
    assert_eq!(
        app.detail(),
        Some(&JobRef::Backup(BackupId(fixtures::FAILED_JOB.into())))
    );
}

#[test]
fn notices_expire() {
    let mut app = fixtures::app();
    app.apply(
        Update::ActionFailed {
            message: "boom".into(),
        },
        fixtures::now(),
    );
    assert!(app.current_notice().is_some());
    app.now = fixtures::now() + Duration::seconds(60);
    assert!(app.current_notice().is_none());
}

#[test]
fn a_node_missing_from_the_tunnel_list_shows_its_latest_node_record() {
    let mut app = App::new(fixtures::HUB_URL, fixtures::now());
    let snap = |nodes: Vec<Node>| {
        Update::Snapshot(Box::new(Snapshot {
            health: Some(fixtures::health()),
            nodes: Some(nodes),
            ..Default::default()
        }))
    };
    let mut nodes = fixtures::nodes();
    app.apply(snap(nodes.clone()), fixtures::now());
    let state = |app: &App| {
        app.tunnel_rows()
            .into_iter()
            .find(|r| r.node == "node-b")
            .and_then(|r| r.tunnel.map(|t| t.state))
    };
    assert_eq!(state(&app), Some(TunnelStateKind::Down));
    nodes[1].tunnel = Some(fixtures::tunnel_up());
    app.apply(snap(nodes), fixtures::now());
    assert_eq!(
        state(&app),
        Some(TunnelStateKind::Up),
        "the newer nodes record, not the first one seen"
    );
}

mod files;
mod policies;
mod recoveries;
mod restores;
