//! The file browser of a backup point, drawn in place of the view: the point's disks, a disk's
//! filesystems, or a directory (mode, owner, size, mtime, name; a symlink with its target),
//! and a status line that says what is under way (the appliance starting, a listing, a tar
//! being written), what failed and why, or the prompt for where the tar goes.

use super::{render_list, theme, titled_block};
use crate::app::files::{Level, escape_bytes, link_target, name_bytes};
use crate::app::{App, FileBrowser, Mode};
use crate::format;
use crate::keys::{self, Command};
use crate::strings;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row};
use sendense_shared::api::FileKind;

pub fn render(app: &App, b: &FileBrowser, frame: &mut Frame, area: Rect) {
    let lead = format!(
        "{} {} · {} {} · ",
        strings::FILES_TITLE,
        if b.vm_name.is_empty() {
            strings::NONE
        } else {
            &b.vm_name
        },
        strings::POINT,
        b.backup_id
    );
    // The place keeps its end (the directory) when the title is too long.
    let room = (area.width as usize).saturating_sub(lead.chars().count() + 8);
    let title = format!("{lead}{}", format::truncate_left(&b.location(), room));
    let block = titled_block(&title, None, "");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [list_area, status_area] =
        Layout::vertical([Constraint::Min(0), Constraint::Length(1)]).areas(inner);
    let block = Block::new();
    let selected = b.selected();
    match b.level {
        Level::Disks => {
            let rows = b
                .disks
                .iter()
                .map(|k| Row::new(vec![Cell::from(format!("{} {k}", strings::DISK))]));
            render_list(
                frame,
                list_area,
                rows,
                [Constraint::Min(10)],
                vec![strings::COL_DISK],
                block,
                selected,
            );
        }
        Level::Filesystems => {
            let fss = b
                .filesystems
                .as_ref()
                .map(|l| l.filesystems.as_slice())
                .unwrap_or_default();
            let rows = fss.iter().map(|f| {
                Row::new(vec![
                    Cell::from(f.device.clone()),
                    Cell::from(f.fs_type.clone()),
                ])
            });
            render_list(
                frame,
                list_area,
                rows,
                [Constraint::Length(24), Constraint::Fill(1)],
                vec![strings::COL_DEVICE, strings::COL_FS_TYPE],
                block,
                selected,
            );
        }
        Level::Directory => {
            let owner = |e: &sendense_shared::api::FileEntry| format!("{}:{}", e.uid, e.gid);
            let owner_width = b
                .entries()
                .iter()
                .map(|e| owner(e).len())
                .max()
                .unwrap_or(0)
                .max(strings::COL_OWNER.len()) as u16;
            let rows = b.entries().iter().map(|e| {
                let mut name = escape_bytes(&name_bytes(e));
                let style = match e.kind {
                    FileKind::Directory => {
                        name.push('/');
                        Style::default().add_modifier(Modifier::BOLD)
                    }
                    FileKind::Symlink => {
                        name.push_str(" -> ");
                        name.push_str(&link_target(e).unwrap_or_default());
                        theme::key()
                    }
                    _ => Style::default(),
                };
                Row::new(vec![
                    Cell::from(format::file_mode(e.kind, e.mode)),
                    Cell::from(owner(e)),
                    Cell::from(format!("{:>9}", format::bytes(e.size))),
                    Cell::from(format::mtime(e.mtime)),
                    Cell::from(Span::styled(name, style)),
                ])
            });
            render_list(
                frame,
                list_area,
                rows,
                [
                    Constraint::Length(10),
                    Constraint::Length(owner_width),
                    Constraint::Length(9),
                    Constraint::Length(16),
                    Constraint::Fill(1),
                ],
                vec![
                    strings::COL_MODE,
                    strings::COL_OWNER,
                    strings::COL_SIZE,
                    strings::COL_MODIFIED,
                    strings::COL_NAME_FILE,
                ],
                block,
                selected,
            );
        }
    }
    frame.render_widget(Paragraph::new(status_line(app, b)), status_area);
}

/// The one line that says what is going on, most urgent first.
fn status_line(app: &App, b: &FileBrowser) -> Line<'static> {
    if let Mode::FilesPrompt { input } = &app.mode {
        return Line::from(vec![
            Span::styled(format!("{} ", strings::FILES_PROMPT), theme::key()),
            Span::raw(format!("{input}█")),
        ]);
    }
    if let Some(e) = &b.error {
        return Line::from(Span::styled(
            format!("{} {e}", strings::SYM_BAD),
            theme::bad(),
        ));
    }
    if let Some((_, target)) = &b.loading {
        let text = if b.appliance_up {
            let place = match &target.fs {
                Some(fs) => format!("{fs}:{}", escape_bytes(&target.path_bytes())),
                None => strings::FILES_FILESYSTEMS.to_string(),
            };
            format!("{} {place}…", strings::FILES_LISTING)
        } else {
            strings::FILES_STARTING.to_string()
        };
        return Line::from(Span::styled(
            format!("{} {text}", strings::SYM_BUSY),
            theme::busy(),
        ));
    }
    if let Some(d) = &app.download {
        let secs = (app.now - d.started).num_milliseconds().max(1) as u64;
        // Where it goes: what it is is said when it is done.
        let mut text = format!(
            "{} {} {}: {}",
            strings::SYM_BUSY,
            strings::FILES_WRITING,
            d.dest,
            format::bytes(d.bytes)
        );
        if let Some(size) = d.size {
            text.push_str(&format!(
                " of ~{} ({}%)",
                format::bytes(size),
                format::percent(d.bytes, size)
            ));
        }
        text.push_str(&format!(" · {}", format::rate(d.bytes * 1000 / secs)));
        return Line::from(Span::styled(text, theme::busy()));
    }
    if let Some(n) = &b.note {
        return Line::from(Span::styled(
            format!("{} {n}", strings::SYM_IDLE),
            theme::info(),
        ));
    }
    let truncated = b.level == Level::Directory && b.dir.as_ref().is_some_and(|d| d.truncated);
    if truncated {
        return Line::from(Span::styled(
            format!("{} {}", strings::SYM_WARN, strings::FILES_TRUNCATED),
            theme::warn(),
        ));
    }
    // A symlink's whole target, which its row may not have room for.
    if let Some(e) = b
        .entries()
        .get(b.selected())
        .filter(|e| b.level == Level::Directory && e.kind == FileKind::Symlink)
    {
        return Line::from(Span::styled(
            strings::files_symlink_not_followed(
                &escape_bytes(&name_bytes(e)),
                &link_target(e).unwrap_or_default(),
            ),
            theme::key(),
        ));
    }
    let text = match b.level {
        Level::Filesystems
            if b.filesystems
                .as_ref()
                .is_some_and(|l| l.filesystems.is_empty()) =>
        {
            strings::FILES_NO_FILESYSTEM.to_string()
        }
        Level::Directory if b.entries().is_empty() => strings::FILES_EMPTY.to_string(),
        _ => format!("{} {}", b.len(), strings::ENTRIES),
    };
    Line::from(Span::styled(text, theme::dim()))
}

/// The footer while the browser is open: its keys, from the key table (the moves as one).
pub fn hints(app: &App) -> String {
    let table = match app.mode {
        Mode::FilesPrompt { .. } => keys::PROMPT,
        _ => keys::FILES,
    };
    let mut hints: Vec<String> = table
        .iter()
        .filter(|b| {
            !matches!(
                b.command,
                Command::Up | Command::Down | Command::Top | Command::Bottom
            )
        })
        .map(|b| format!("{}:{}", keys::keys_label(b), b.help))
        .collect();
    if !matches!(app.mode, Mode::FilesPrompt { .. }) {
        hints.push(strings::HINT_MOVE.into());
    }
    hints.join(" ")
}
