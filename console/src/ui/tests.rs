//! Render tests: every view at 80×24 and 160×48, drawn from the fixtures with ratatui's
//! `TestBackend` and pinned with insta snapshots (`snapshots/` beside this file).

use super::render;
use crate::app::{App, Mode, Update};
use crate::fixtures;
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;
use ratatui::backend::TestBackend;

mod policies;

fn draw(app: &App, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| render(app, f)).unwrap();
    terminal.backend().to_string()
}

fn keys(app: &mut App, keys: &[KeyCode]) {
    for k in keys {
        app.on_key(KeyEvent::new(*k, KeyModifiers::NONE));
    }
}

/// Snapshot `app` at both sizes, and check what a user must see at the small one.
fn both(name: &str, app: &App, must_show: &[&str]) {
    for (w, h) in [(80, 24), (160, 48)] {
        let screen = draw(app, w, h);
        for text in must_show {
            assert!(
                screen.contains(text),
                "{name} at {w}x{h} lacks {text:?}:\n{screen}"
            );
        }
        insta::assert_snapshot!(format!("{name}_{w}x{h}"), screen);
    }
}

#[test]
fn jobs_list() {
    let app = fixtures::app();
    both(
        "jobs",
        &app,
        &["b-7f3a9c21", "◐ running", "✖ failed", "✔ completed", "live"],
    );
}

#[test]
fn jobs_list_failed_job_selected_shows_its_error() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('j')]);
    both(
        "jobs_failed_selected",
        &app,
        &["✖ b-2c81e0d4", "qemu-nbd exited"],
    );
}

#[test]
fn job_detail_two_disks_mid_copy() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Enter]);
    both(
        "job_detail_running",
        &app,
        &[
            "disk 2000",
            "disk 2001",
            "port 10100",
            "pid 51234",
            "ETA",
            "throughput",
            "MiB/s",
        ],
    );
}

#[test]
fn job_detail_vsphere_incremental_shows_written_bytes_and_change_id() {
    let mut app = fixtures::app();
    app.backups.insert(0, fixtures::vsphere_job());
    keys(&mut app, &[KeyCode::Enter]);
    both(
        "job_detail_vsphere",
        &app,
        &["b-4e11c0a7", "40.0 GiB/40.0 GiB (100%) · written 212.0 MiB"],
    );
    // The change id only where there is room for it.
    assert!(!draw(&app, 80, 24).contains("change id"));
    let wide = draw(&app, 160, 48);
    assert!(
        wide.contains(&format!("change id {}", fixtures::CHANGE_ID)),
        "{wide}"
    );
}

#[test]
fn jobs_list_bytes_column_is_never_cut() {
    let mut app = fixtures::app();
    let mut b = fixtures::vsphere_job();
    b.bytes_transferred = 72 * 1024 * 1024;
    b.total_bytes = 384 * 1024 * 1024;
    app.backups.insert(0, b);
    // 100 columns: narrow layout, where the column was 17 wide and cut "384.0 MiB" to "384.0 Mi".
    for (w, h) in [(80, 24), (100, 30), (160, 48)] {
        let screen = draw(&app, w, h);
        assert!(screen.contains("72.0 MiB/384.0 MiB"), "{w}x{h}:\n{screen}");
    }
}

#[test]
fn vms_vsphere_selected_shows_source_and_disk_facts() {
    let mut app = fixtures::app();
    keys(
        &mut app,
        &[KeyCode::Char('2'), KeyCode::Char('j'), KeyCode::Char('j')],
    );
    both(
        "vms_vsphere",
        &app,
        &["Disks of mailsrv (vsphere · CBT on)"],
    );
    let wide = draw(&app, 160, 48);
    for text in [
        "SCSI controller 0",
        "thin",
        "[datastore1] mailsrv/mailsrv.vmdk",
    ] {
        assert!(wide.contains(text), "{text}:\n{wide}");
    }
}

#[test]
fn job_detail_failed_disk() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('j'), KeyCode::Enter]);
    both(
        "job_detail_failed",
        &app,
        &["✖ failed", "✔ completed", "✖ error: qemu-nbd (pid 50102)"],
    );
}

#[test]
fn jobs_list_shows_integrity_and_consistency_of_points() {
    let app = fixtures::app();
    // Wide: a column each.
    let wide = draw(&app, 160, 48);
    for text in [
        "Integrity",
        "Consistency",
        "✔ verified",
        "✖ CORRUPT",
        "✔ application",
        "▲ crash",
    ] {
        assert!(wide.contains(text), "{text}:\n{wide}");
    }
    // Narrow: no room for the columns; the corrupt point says so in its status.
    let narrow = draw(&app, 80, 24);
    let row = narrow
        .lines()
        .find(|l| l.contains("b-5e5e0a01"))
        .unwrap_or_else(|| panic!("no row of the corrupt point:\n{narrow}"));
    assert!(row.contains("full ✖ CORRUPT"), "{row}");
}

#[test]
fn jobs_list_corrupt_point_selected_says_why_and_next_full() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('G')]);
    both(
        "jobs_corrupt_selected",
        &app,
        &[
            "✖ b-5e5e0a01",
            "integrity CORRUPT",
            "cell 412",
            "next backup: full",
        ],
    );
}

#[test]
fn job_detail_application_consistent_point() {
    let mut app = fixtures::app();
    keys(
        &mut app,
        &[
            KeyCode::Char('j'),
            KeyCode::Char('j'),
            KeyCode::Char('j'),
            KeyCode::Enter,
        ],
    );
    both(
        "job_detail_consistent",
        &app,
        &[
            "b-91d4f7aa",
            "integrity ✔ verified · verified at",
            "consistency ✔ application: guest file systems frozen (2 file systems)",
            "38 ms",
        ],
    );
}

#[test]
fn job_detail_corrupt_point() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('G'), KeyCode::Enter]);
    both(
        "job_detail_corrupt",
        &app,
        &[
            "b-5e5e0a01",
            "integrity ✖ CORRUPT: verify job v-3d2e1f00",
            "consistency ▲ crash: no guest agent channel",
        ],
    );
    let wide = draw(&app, 160, 48);
    assert!(wide.contains("· next backup: full"), "{wide}");
}

#[test]
fn jobs_list_with_a_running_verify_job() {
    let mut app = fixtures::app();
    app.apply(
        Update::Event(sendense_shared::api::HubEvent::Verify {
            verify: fixtures::running_verify(),
        }),
        fixtures::now(),
    );
    both(
        "jobs_with_verify",
        &app,
        &[
            "Verify jobs (1)",
            "◐ running v-3d2e1f00 repository:repo-a · points 2/6 · read 30.0 GiB/90.0 GiB",
            "✖ 1 found corrupt: b-5e5e0a01",
        ],
    );
    // Once it ended, the strip is gone (its finding stays on the point itself).
    app.apply(
        Update::Event(sendense_shared::api::HubEvent::Verify {
            verify: fixtures::finished_verify(),
        }),
        fixtures::now(),
    );
    let narrow = draw(&app, 80, 24);
    assert!(!narrow.contains("Verify jobs"), "{narrow}");
    assert!(narrow.contains("✖ CORRUPT"), "{narrow}");
}

#[test]
fn vms_corrupt_last_point_stands_out_and_says_next_full() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('2'), KeyCode::Char('j')]);
    both(
        "vms_corrupt",
        &app,
        &["webfront ✖", "last point ✖ CORRUPT · next backup: full"],
    );
    let wide = draw(&app, 160, 48);
    for text in [
        "Last point",
        "✖ CORRUPT · next backup: full",
        "✔ verified · ✔ application",
    ] {
        assert!(wide.contains(text), "{text}:\n{wide}");
    }
}

#[test]
fn vms_view() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('2')]);
    both(
        "vms",
        &app,
        &["pgtest1", "legacy-db", "(none)", "virtio-disk1"],
    );
}

#[test]
fn start_dialog() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('2'), KeyCode::Char('s')]);
    both(
        "start_dialog",
        &app,
        &["Start backup", "[x] incremental", "repo-a", "offsite"],
    );
}

#[test]
fn start_confirmation() {
    let mut app = fixtures::app();
    keys(
        &mut app,
        &[
            KeyCode::Char('2'),
            KeyCode::Char('s'),
            KeyCode::Char('f'),
            KeyCode::Enter,
        ],
    );
    assert!(matches!(app.mode, Mode::ConfirmStart(_)));
    both(
        "start_confirm",
        &app,
        &["Start a full backup of VM pgtest1", "y yes"],
    );
}

#[test]
fn ports_view_with_a_squatted_port() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('3')]);
    both(
        "ports",
        &app,
        &["10100", "✖ squatted", "■ held", "! stale", "97 free"],
    );
}

#[test]
fn tunnel_view_with_a_node_down() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('4'), KeyCode::Char('j')]);
    both(
        "tunnel",
        &app,
        &[
            "✔ up",
            "✖ down",
            "Connection refused",
            "node-b",
            "cannot ask this node",
        ],
    );
}

#[test]
fn processes_view() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('5')]);
    both(
        "processes",
        &app,
        &[
            "51234",
            "✔ alive",
            "✖ DEAD",
            "/var/lib/sendense/repo-a/pgtest1",
        ],
    );
}

#[test]
fn events_view() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('6')]);
    both("events", &app, &["port_squatted", "▲ warn", "✖ error"]);
}

#[test]
fn events_view_filtered() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('6'), KeyCode::Char('/')]);
    for c in "error".chars() {
        keys(&mut app, &[KeyCode::Char(c)]);
    }
    both(
        "events_filtered",
        &app,
        &["filter: error", "qemu_nbd_exited", "job_failed"],
    );
}

#[test]
fn hub_unreachable() {
    let mut app = fixtures::app();
    for i in 1..=5 {
        app.apply(
            Update::Unreachable {
                error: "Connection refused (os error 111)".into(),
            },
            fixtures::now() + chrono::Duration::seconds(2 * i),
        );
    }
    app.now = fixtures::now() + chrono::Duration::seconds(11);
    both(
        "unreachable",
        &app,
        &[
            "HUB UNREACHABLE http://127.0.0.1:8082",
            "retry 5",
            "since 00:12:05",
            "Connection refused (os error 111)",
            "last contact 00:12:03",
            "b-7f3a9c21",
        ],
    );
}

#[test]
fn hub_connecting_with_nothing_known() {
    let app = App::new(fixtures::HUB_URL, fixtures::now());
    both(
        "connecting",
        &app,
        &["connecting to http://127.0.0.1:8082", "No backup jobs yet"],
    );
}

#[test]
fn help_overlay() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('?')]);
    both(
        "help",
        &app,
        &["Tab", "quit", "cancel job", "filter", "Enter"],
    );
}

#[test]
fn cancel_confirmation_names_the_job() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('c')]);
    both(
        "cancel_confirm",
        &app,
        &["Cancel backup b-7f3a9c21 of VM pgtest1 (running)?", "y yes"],
    );
}

#[test]
fn every_key_in_the_tables_appears_in_the_help() {
    let mut app = fixtures::app();
    keys(&mut app, &[KeyCode::Char('?')]);
    let screen = draw(&app, 80, 24);
    for map in [
        crate::keys::MAIN,
        crate::keys::FILTER,
        crate::keys::START,
        crate::keys::CONFIRM,
    ] {
        for b in map {
            assert!(
                screen.contains(b.help),
                "help lacks {:?}:\n{screen}",
                b.help
            );
        }
    }
}

#[test]
fn tiny_terminal_does_not_panic() {
    let mut app = fixtures::app();
    for view in ['1', '2', '3', '4', '5', '6'] {
        keys(&mut app, &[KeyCode::Char(view)]);
        for (w, h) in [(1, 1), (20, 5), (40, 10)] {
            draw(&app, w, h);
        }
    }
    keys(&mut app, &[KeyCode::Char('1'), KeyCode::Enter]);
    draw(&app, 30, 8);
    keys(&mut app, &[KeyCode::Char('?')]);
    draw(&app, 10, 4);
}

#[test]
fn bad_token_is_said_in_the_footer() {
    let mut app = App::new(fixtures::HUB_URL, fixtures::now());
    let snap = crate::app::Snapshot {
        health: Some(fixtures::health()),
        errors: vec![
            "401 Unauthorized: the hub at http://127.0.0.1:8082/api/v1/backups refused the token; pass the hub's token with --token-file FILE or SENDENSE_TOKEN".into(),
        ],
        ..Default::default()
    };
    app.apply(Update::Snapshot(Box::new(snap)), fixtures::now());
    app.apply(
        Update::StreamDown {
            error:
                "hub at http://127.0.0.1:8082/api/v1/events refused the token (401 Unauthorized)"
                    .into(),
        },
        fixtures::now(),
    );
    both("bad_token", &app, &["401 Unauthorized", "polling every 2s"]);
}

/// The fixture console with a restore of pgtest1's disk 2000 that copied 300 MiB in the last
/// two seconds.
fn app_with_restore() -> App {
    use sendense_shared::api::HubEvent;
    let mut app = fixtures::app();
    let mib = 1024 * 1024;
    for (secs, done) in [(2, 5 * fixtures::GIB), (0, 5 * fixtures::GIB + 300 * mib)] {
        app.apply(
            Update::Event(HubEvent::Restore {
                restore: fixtures::running_restore(done),
            }),
            fixtures::now() - chrono::Duration::seconds(secs),
        );
    }
    app
}

#[test]
fn jobs_list_with_a_restore() {
    let app = app_with_restore();
    both(
        "jobs_with_restore",
        &app,
        &["r-5d1e8a4", "restore", "◐ running", "33%", "150.0 MiB/s"],
    );
}

#[test]
fn restore_detail_shows_its_disk_source_target_and_export() {
    let mut app = app_with_restore();
    keys(&mut app, &[KeyCode::Enter]);
    both(
        "restore_detail_running",
        &app,
        &[
            "r-5d1e8a40",
            "disk 2000",
            "5.3 GiB/16.0 GiB",
            "node-a:/var/lib/libvirt/images/pgtest1-restored.qcow2",
            "b-0a1b2c3d.qcow2",
            "port 10102",
            "export restore-r-5d1e8a40",
            "ETA",
        ],
    );
    app.apply(
        Update::Event(sendense_shared::api::HubEvent::Restore {
            restore: fixtures::failed_restore(),
        }),
        fixtures::now(),
    );
    let screen = draw(&app, 80, 24);
    assert!(screen.contains("✖ failed"), "{screen}");
    assert!(screen.contains("Permission denied"), "{screen}");
    assert!(
        screen.contains("port — · export —"),
        "no export once released:\n{screen}"
    );
}

#[test]
fn cancel_confirmation_of_a_restore_names_it() {
    let mut app = app_with_restore();
    keys(&mut app, &[KeyCode::Char('c')]);
    assert!(matches!(app.mode, Mode::ConfirmCancelRestore { .. }));
    both(
        "cancel_restore_confirm",
        &app,
        &["Cancel restore r-5d1e8a40 of VM pgtest1 (running)?"],
    );
}

#[test]
fn job_detail_line_of_a_points_recorded_hardware() {
    let mut b = fixtures::consistent_point();
    assert!(crate::ui::jobs::point::hardware_line(&b).is_none());
    let disk = |k: i64| sendense_shared::api::HardwareDisk {
        disk_key: sendense_shared::ids::DiskKey(k),
        device_id: format!("disk{k}"),
        virtual_size: 1 << 30,
        bus: "virtio".into(),
        image_path: format!("/vms/{k}.qcow2"),
        format: "qcow2".into(),
    };
    b.hardware = Some(Box::new(sendense_shared::api::VmHardware {
        memory_mib: 512,
        cpus: 2,
        machine: Some("pc-q35-7.2".into()),
        disks: vec![disk(2000), disk(2001)],
        kernel: Some("/boot/vmlinuz".into()),
        ..Default::default()
    }));
    let line = crate::ui::jobs::point::hardware_line(&b).unwrap();
    let text: String = line.spans.iter().map(|s| s.content.as_ref()).collect();
    assert_eq!(
        text,
        "hardware 512 MiB · 2 vCPU · pc-q35-7.2 · 2 disks (virtio) · 0 NIC · kernel boot"
    );
}

/// The fixture console with three instant recoveries: pgtest1's streaming home on node-a,
/// webfront's stalled on node-b, mailsrv's home.
fn app_with_recoveries() -> App {
    let mut app = fixtures::app();
    for r in [
        fixtures::completed_recovery(),
        fixtures::stalled_recovery(),
        fixtures::streaming_recovery(),
    ] {
        app.apply(Update::Recovery(Box::new(r)), fixtures::now());
    }
    app
}

#[test]
fn jobs_list_with_recoveries_shows_home_rate_and_a_stall() {
    let mut app = app_with_recoveries();
    both(
        "jobs_with_recoveries",
        &app,
        &["6f1e0c2a…", "recover", "46%", "80.0 MiB/s", "▲ STALLED"],
    );
    // The stall, selected, is read in full under the list, as a warning.
    let at = app
        .visible_jobs()
        .iter()
        .position(|j| j.id() == fixtures::STALLED_RECOVERY)
        .unwrap();
    for _ in 0..at {
        keys(&mut app, &[KeyCode::Char('j')]);
    }
    both(
        "jobs_stalled_recovery_selected",
        &app,
        &["▲ a3c9d2e1… STALLED: the hub's export of disk 2000"],
    );
}

#[test]
fn recovery_detail_shows_each_disks_gauge_export_and_overlay() {
    let mut app = app_with_recoveries();
    keys(&mut app, &[KeyCode::Enter]);
    assert!(
        app.detail_recovery().is_some(),
        "the newest job is the recovery"
    );
    both(
        "recovery_detail_streaming",
        &app,
        &[
            "Job 6f1e0c2a-9b34-4d1e-8f20-7a5c3b9e1d04 · pgtest1-rec · recover ◐ running",
            "point b-91d4f7aa of pgtest1 · node node-a",
            "VM up in 4.2s",
            "VM ✔ running · QEMU pid 8812 · home 9.3 GiB/20.0 GiB (46%)",
            "disk 2000 ◐ running  33%",
            "5.3 GiB/16.0 GiB · rate 80.0 MiB/s · ETA 2m16s",
            "port 10140 · qemu-nbd pid 51300 · export recovery-6f1e0c2a-2000",
            "overlay /var/lib/sendense-node/recovery/pgtest1-rec/disk-2000.qcow2",
            "disk 2001 ✔ finished 100%",
            "port — · qemu-nbd pid — · export —",
        ],
    );
    // The label is beside the gauge, not drawn over it: the bar starts after the widest label.
    let screen = draw(&app, 80, 24);
    let row = screen
        .lines()
        .find(|l| l.contains("disk 2000 ◐ running"))
        .unwrap();
    assert!(row.contains("33%  █"), "{row}");
}

#[test]
fn recovery_detail_puts_a_stall_first_in_the_warning_colour() {
    let mut app = app_with_recoveries();
    app.recoveries
        .retain(|r| r.recovery_id == fixtures::STALLED_RECOVERY);
    keys(&mut app, &[KeyCode::Char('j'), KeyCode::Char('k')]);
    let at = app
        .visible_jobs()
        .iter()
        .position(|j| j.id() == fixtures::STALLED_RECOVERY)
        .unwrap();
    for _ in 0..at {
        keys(&mut app, &[KeyCode::Char('j')]);
    }
    keys(&mut app, &[KeyCode::Enter]);
    both(
        "recovery_detail_stalled",
        &app,
        &[
            "▲ STALLED: the hub's export of disk 2000",
            "VM ▲ paused",
            "disk 2000 ▲ paused",
        ],
    );
    // Yellow, like every warning: the colour comes with the symbol and the word.
    let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
    terminal.draw(|f| render(&app, f)).unwrap();
    let buf = terminal.backend().buffer();
    let line = (0..24)
        .find(|&y| {
            (0..80)
                .map(|x| buf[(x, y)].symbol())
                .collect::<String>()
                .contains("STALLED")
        })
        .unwrap();
    let x = (0..80).find(|&x| buf[(x, line)].symbol() == "▲").unwrap();
    assert_eq!(buf[(x, line)].fg, ratatui::style::Color::Yellow);

    // A completed one says the VM runs on its own.
    app.apply(
        Update::Recovery(Box::new(sendense_shared::api::Recovery {
            recovery_id: fixtures::STALLED_RECOVERY.into(),
            ..fixtures::completed_recovery()
        })),
        fixtures::now(),
    );
    let screen = draw(&app, 80, 24);
    assert!(
        screen.contains("✔ every disk is home: the VM runs from local disks alone"),
        "{screen}"
    );
}

#[test]
fn cancel_confirmation_of_a_recovery_says_the_writes_are_lost() {
    let mut app = app_with_recoveries();
    keys(&mut app, &[KeyCode::Char('c')]);
    assert!(matches!(app.mode, Mode::ConfirmCancelRecovery { .. }));
    both(
        "cancel_recovery_confirm",
        &app,
        &[
            "Cancel recovery 6f1e0c2a-9b34-4d1e-8f20-7a5c3b9e1d04",
            "lost",
        ],
    );
}

/// The fixture console with the browser open on pgtest1's point, cursor on it in Jobs.
fn app_with_browser() -> App {
    let mut app = fixtures::app();
    let at = app
        .visible_jobs()
        .iter()
        .position(|j| j.id() == fixtures::files::POINT)
        .unwrap();
    for _ in 0..at {
        keys(&mut app, &[KeyCode::Char('j')]);
    }
    keys(&mut app, &[KeyCode::Char('f')]);
    app
}

fn answer_listing(app: &mut App, l: sendense_shared::api::FileListing) {
    let seq = app.browser.as_ref().unwrap().loading.as_ref().unwrap().0;
    app.apply(
        Update::FileListing {
            seq,
            result: Ok(Box::new(l)),
        },
        fixtures::now(),
    );
}

#[test]
fn file_browser_says_the_appliance_is_starting_then_lists_filesystems() {
    let mut app = app_with_browser();
    both(
        "files_starting",
        &app,
        &[
            "Files of pgtest1 · point b-91d4f7aa · disk 2000",
            "◐ starting the file browser appliance…",
            "Enter:open Bksp:up g:get as tar",
        ],
    );
    answer_listing(&mut app, fixtures::files::filesystems());
    let screen = draw(&app, 80, 24);
    for want in ["/dev/sda1", "ext4", "/dev/vg0/root", "xfs", "3 entries"] {
        assert!(screen.contains(want), "{want}:\n{screen}");
    }
}

#[test]
fn file_browser_directory_shows_modes_owners_links_and_escaped_names() {
    let mut app = app_with_browser();
    answer_listing(&mut app, fixtures::files::filesystems());
    keys(&mut app, &[KeyCode::Char('j'), KeyCode::Enter]);
    answer_listing(&mut app, fixtures::files::root_dir());
    keys(&mut app, &[KeyCode::Char('j'), KeyCode::Enter]);
    // While /etc is listed, the appliance is up already: it says what it lists.
    assert!(draw(&app, 80, 24).contains("◐ listing /dev/vg0/root:/etc…"));
    answer_listing(&mut app, fixtures::files::etc_dir());
    keys(
        &mut app,
        &[KeyCode::Char('j'), KeyCode::Char('j'), KeyCode::Char('j')],
    );
    both(
        "files_etc",
        &app,
        &[
            "point b-91d4f7aa · /dev/vg0/root:/etc",
            "-rw-r--r-- 0:0",
            "caf\\xe9.conf",
            "cron d/",
            "localtime -> /usr/share/zoneinf",
            "localtime -> /usr/share/zoneinfo/Etc/UTC (a symlink: not followed)",
            "drwxr-x--- 0:26",
            "-rw-r----- 0:42",
            "2026-11-26 03:12",
        ],
    );
    let mut app2 = app.clone();
    keys(
        &mut app2,
        &[KeyCode::Char('k'), KeyCode::Char('k'), KeyCode::Char('g')],
    );
    both(
        "files_get_prompt",
        &app2,
        &[
            "write as tar to (relative to the console's directory): ./cron_d.tar█",
            "Enter:write it",
        ],
    );
    // A failure names its cause in the status line.
    keys(&mut app, &[KeyCode::Backspace]);
    let seq = app.browser.as_ref().unwrap().loading.as_ref().unwrap().0;
    app.apply(
        Update::FileListing {
            seq,
            result: Err("listing /dev/vg0/root:/ failed: hub unreachable at http://127.0.0.1:8082/api/v1/backups/b-91d4f7aa/files?disk=2000&fs=/dev/vg0/root&path=/".into()),
        },
        fixtures::now(),
    );
    let screen = draw(&app, 80, 24);
    assert!(
        screen.contains("✖ listing /dev/vg0/root:/ failed: hub unreachable"),
        "{screen}"
    );
}

#[test]
fn file_browser_shows_a_tar_being_written_and_a_truncated_directory() {
    let mut app = app_with_browser();
    answer_listing(&mut app, fixtures::files::filesystems());
    keys(&mut app, &[KeyCode::Char('j'), KeyCode::Enter]);
    answer_listing(&mut app, fixtures::files::truncated_dir());
    let screen = draw(&app, 80, 24);
    assert!(
        screen.contains("▲ more entries than one listing answers"),
        "{screen}"
    );
    keys(&mut app, &[KeyCode::Char('g'), KeyCode::Enter]);
    app.apply(
        Update::FilesProgress {
            bytes: 3 * 1024 * 1024,
        },
        fixtures::now(),
    );
    app.now = fixtures::now() + chrono::Duration::seconds(2);
    both(
        "files_writing",
        &app,
        &["◐ writing ./system_0000.journal.tar: 3.0 MiB of ~8.0 MiB (37%) · 1.5 MiB/s"],
    );
}

#[test]
fn tiny_terminal_with_a_recovery_or_the_browser_does_not_panic() {
    let mut app = app_with_recoveries();
    keys(&mut app, &[KeyCode::Enter]);
    for (w, h) in [(1, 1), (20, 5), (40, 10)] {
        draw(&app, w, h);
    }
    let mut app = app_with_browser();
    answer_listing(&mut app, fixtures::files::filesystems());
    for (w, h) in [(1, 1), (20, 5), (40, 10)] {
        draw(&app, w, h);
    }
}
