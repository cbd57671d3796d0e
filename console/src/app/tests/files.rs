//! The file browser: opened from a point, its listings asked as actions and folded in when
//! they answer, Enter and Backspace through disks, filesystems and directories, exact name
//! bytes in the paths it asks for, and `g` with its prompt.

use super::{press, typ};
use crate::app::files::{
    FileTarget, Level, default_tar_path, escape_bytes, name_bytes, path_bytes,
};
use crate::app::*;
use crate::fixtures::{self, files as fx};
use crossterm::event::KeyCode;
use sendense_shared::api::JobStatus;
use sendense_shared::ids::DiskKey;

/// The fixture console with the Jobs view's cursor on pgtest1's completed point.
fn on_point() -> App {
    let mut app = fixtures::app();
    let at = app
        .visible_jobs()
        .iter()
        .position(|j| j.id() == fx::POINT)
        .unwrap();
    for _ in 0..at {
        press(&mut app, KeyCode::Char('j'));
    }
    app
}

/// The action's listing number and target.
fn listing(a: Option<Action>) -> (u64, FileTarget) {
    match a {
        Some(Action::ListFiles { seq, target, .. }) => (seq, target),
        other => panic!("not a listing: {other:?}"),
    }
}

fn answer(app: &mut App, seq: u64, l: sendense_shared::api::FileListing) {
    app.apply(
        Update::FileListing {
            seq,
            result: Ok(Box::new(l)),
        },
        fixtures::now(),
    );
}

fn browser(app: &App) -> &FileBrowser {
    app.browser.as_ref().unwrap()
}

/// Open the browser on the point and answer its filesystems, then `/`.
fn at_root() -> App {
    let mut app = on_point();
    let (seq, _) = listing(press(&mut app, KeyCode::Char('f')));
    answer(&mut app, seq, fx::filesystems());
    press(&mut app, KeyCode::Char('j'));
    let (seq, _) = listing(press(&mut app, KeyCode::Enter));
    answer(&mut app, seq, fx::root_dir());
    app
}

#[test]
fn f_on_a_point_asks_for_its_filesystems_and_enter_descends_into_them() {
    let mut app = on_point();
    let (seq, target) = listing(press(&mut app, KeyCode::Char('f')));
    assert_eq!(app.mode, Mode::Files);
    assert_eq!(browser(&app).backup_id.0, fx::POINT);
    assert_eq!(
        target,
        FileTarget {
            disk: Some(DiskKey(2000)),
            fs: None,
            path: vec![]
        },
        "the point's one disk, no path: its filesystems"
    );
    assert!(
        !browser(&app).appliance_up,
        "the first listing boots the appliance"
    );
    answer(&mut app, seq, fx::filesystems());
    let b = browser(&app);
    assert_eq!(b.level, Level::Filesystems);
    assert_eq!(b.len(), 3);

    press(&mut app, KeyCode::Char('j'));
    let (seq, target) = listing(press(&mut app, KeyCode::Enter));
    assert_eq!(target.fs.as_deref(), Some(fx::ROOT_FS));
    assert_eq!(
        target.query().to_query(),
        "disk=2000&fs=/dev/vg0/root&path=/"
    );
    answer(&mut app, seq, fx::root_dir());
    let b = browser(&app);
    assert_eq!(b.level, Level::Directory);
    assert_eq!(b.location(), "/dev/vg0/root:/");

    // Into /etc, and Backspace back to / with etc selected again.
    press(&mut app, KeyCode::Char('j'));
    let (seq, target) = listing(press(&mut app, KeyCode::Enter));
    assert_eq!(target.path_bytes(), b"/etc");
    answer(&mut app, seq, fx::etc_dir());
    assert_eq!(browser(&app).location(), "/dev/vg0/root:/etc");
    let (seq, target) = listing(press(&mut app, KeyCode::Backspace));
    assert_eq!(target.path_bytes(), b"/");
    answer(&mut app, seq, fx::root_dir());
    let b = browser(&app);
    assert_eq!(
        b.entries()[b.selected()].name,
        "etc",
        "back on the directory it left"
    );
}

#[test]
fn backspace_at_a_filesystems_root_shows_the_filesystems_then_says_it_is_the_top() {
    let mut app = at_root();
    assert_eq!(press(&mut app, KeyCode::Backspace), None, "listed already");
    let b = browser(&app);
    assert_eq!(b.level, Level::Filesystems);
    assert_eq!(b.selected(), 1, "the filesystem it left");
    assert_eq!(b.at.fs, None);
    assert_eq!(press(&mut app, KeyCode::Backspace), None);
    assert_eq!(
        browser(&app).note.as_deref(),
        Some(crate::strings::FILES_AT_TOP),
        "one disk: the filesystems are the top"
    );
    press(&mut app, KeyCode::Esc);
    assert!(app.browser.is_none());
    assert_eq!(app.mode, Mode::Normal);
}

#[test]
fn a_point_with_two_disks_starts_at_its_disks() {
    let mut app = fixtures::app();
    let mut b = fixtures::running_job([fixtures::GIB, fixtures::GIB]);
    b.status = JobStatus::Completed;
    app.backups = vec![b];
    assert_eq!(
        press(&mut app, KeyCode::Char('f')),
        None,
        "nothing to list yet"
    );
    assert_eq!(browser(&app).level, Level::Disks);
    press(&mut app, KeyCode::Char('j'));
    let (seq, target) = listing(press(&mut app, KeyCode::Enter));
    assert_eq!(target.disk, Some(DiskKey(2001)));
    assert_eq!(
        browser(&app).level,
        Level::Disks,
        "moves only when answered"
    );
    answer(&mut app, seq, fx::filesystems());
    assert_eq!(browser(&app).level, Level::Filesystems);
    assert_eq!(press(&mut app, KeyCode::Backspace), None);
    let b = browser(&app);
    assert_eq!((b.level, b.selected()), (Level::Disks, 1));
}

#[test]
fn a_failed_or_late_listing_leaves_the_browser_where_it_was() {
    let mut app = at_root();
    press(&mut app, KeyCode::Char('j'));
    let (first, _) = listing(press(&mut app, KeyCode::Enter));
    // Asked again before the answer: the first answer is late and dropped.
    let (second, _) = listing(press(&mut app, KeyCode::Enter));
    answer(&mut app, first, fx::etc_dir());
    assert_eq!(browser(&app).location(), "/dev/vg0/root:/");
    app.apply(
        Update::FileListing {
            seq: second,
            result: Err("listing /dev/vg0/root:/etc failed: 409 backup_busy".into()),
        },
        fixtures::now(),
    );
    let b = browser(&app);
    assert_eq!(b.location(), "/dev/vg0/root:/", "still at /");
    assert!(b.error.as_deref().unwrap().contains("backup_busy"));
    assert!(b.loading.is_none());
}

#[test]
fn names_that_are_not_utf8_are_shown_escaped_and_asked_for_by_their_bytes() {
    let l = fx::etc_dir();
    let e = &l.entries.as_ref().unwrap()[0];
    assert_eq!(name_bytes(e), fx::LATIN1_NAME);
    assert_eq!(escape_bytes(&name_bytes(e)), "caf\\xe9.conf");
    assert_eq!(escape_bytes(b"a\nb\\c\x07"), "a\\nb\\\\c\\u{7}");
    assert_eq!(escape_bytes("日本".as_bytes()), "日本");

    let mut components = vec![b"etc".to_vec()];
    assert_eq!(path_bytes(&[]), b"/");
    components.push(fx::LATIN1_NAME.to_vec());
    assert_eq!(path_bytes(&components), b"/etc/caf\xe9.conf");
    let t = FileTarget {
        disk: Some(DiskKey(2000)),
        fs: Some(fx::ROOT_FS.into()),
        path: components,
    };
    let q = t.query().to_query();
    assert!(q.contains("path_b64="), "{q}");
    assert!(!q.contains("path=/"), "{q}");
}

#[test]
fn enter_on_a_symlink_does_not_follow_it() {
    let mut app = at_root();
    // `bin -> usr/bin` is the first entry.
    press(&mut app, KeyCode::Home);
    assert_eq!(press(&mut app, KeyCode::Enter), None);
    let note = browser(&app).note.clone().unwrap();
    assert_eq!(note, "bin -> usr/bin (a symlink: not followed)");
}

#[test]
fn g_asks_where_with_a_default_and_enter_gets_the_tar() {
    let mut app = at_root();
    press(&mut app, KeyCode::Char('j'));
    assert_eq!(press(&mut app, KeyCode::Char('g')), None);
    assert_eq!(
        app.mode,
        Mode::FilesPrompt {
            input: "./etc.tar".into()
        }
    );
    // q is typed, not a quit; Backspace erases.
    for _ in 0.."etc.tar".len() {
        press(&mut app, KeyCode::Backspace);
    }
    typ(&mut app, "q-etc.tar");
    let got = press(&mut app, KeyCode::Enter);
    assert_eq!(
        got,
        Some(Action::GetFiles {
            backup_id: sendense_shared::ids::BackupId(fx::POINT.into()),
            target: FileTarget {
                disk: Some(DiskKey(2000)),
                fs: Some(fx::ROOT_FS.into()),
                path: vec![b"etc".to_vec()],
            },
            what: "/etc".into(),
            dest: "./q-etc.tar".into(),
        })
    );
    assert_eq!(app.mode, Mode::Files);
    assert_eq!(app.download.as_ref().unwrap().dest, "./q-etc.tar");
    // One at a time; the end says so and frees the slot.
    press(&mut app, KeyCode::Char('g'));
    assert_eq!(press(&mut app, KeyCode::Enter), None);
    assert_eq!(
        browser(&app).note.as_deref(),
        Some(crate::strings::FILES_ONE_AT_A_TIME)
    );
    app.apply(
        Update::FilesDone {
            message: "Wrote /etc as tar to ./q-etc.tar (10.0 KiB).".into(),
            ok: true,
        },
        fixtures::now(),
    );
    assert!(app.download.is_none());
    // Esc leaves the prompt without getting anything.
    press(&mut app, KeyCode::Char('g'));
    assert_eq!(press(&mut app, KeyCode::Esc), None);
    assert_eq!(app.mode, Mode::Files);
}

#[test]
fn default_tar_names_keep_what_a_file_name_may_have() {
    assert_eq!(default_tar_path(b"etc"), "./etc.tar");
    assert_eq!(default_tar_path(b"cron d"), "./cron_d.tar");
    assert_eq!(default_tar_path(fx::LATIN1_NAME), "./caf_.conf.tar");
    assert_eq!(default_tar_path(b"sda1"), "./sda1.tar");
    assert_eq!(default_tar_path(b".."), "./root.tar");
}

#[test]
fn f_elsewhere_or_on_a_job_that_is_no_point_says_what_it_needs() {
    let mut app = fixtures::app();
    // The first row is the running backup.
    assert_eq!(press(&mut app, KeyCode::Char('f')), None);
    assert!(app.browser.is_none());
    let text = app.current_notice().unwrap().text.clone();
    assert!(
        text.contains("only a completed point can be browsed"),
        "{text}"
    );
    press(&mut app, KeyCode::Char('2'));
    assert_eq!(press(&mut app, KeyCode::Char('f')), None);
    assert_eq!(
        app.current_notice().unwrap().text,
        crate::strings::NOTICE_BROWSE_ONLY_POINTS
    );
}
