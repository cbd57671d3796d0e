//! Overlays: the help (drawn from the key tables), the start dialog, y/n confirmations.

use super::theme;
use crate::app::{App, StartForm};
use crate::format;
use crate::keys::{self, Binding};
use crate::strings;
use ratatui::Frame;
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, BorderType, Borders, Clear, Paragraph, Wrap};
use sendense_shared::api::BackupType;

/// A centred rectangle of at most `width` × `height` inside `area`.
pub(super) fn centred(area: Rect, width: u16, height: u16) -> Rect {
    let [row] = Layout::vertical([Constraint::Length(height.min(area.height))])
        .flex(Flex::Center)
        .areas(area);
    let [cell] = Layout::horizontal([Constraint::Length(width.min(area.width))])
        .flex(Flex::Center)
        .areas(row);
    cell
}

pub(super) fn frame_block(title: &str) -> Block<'static> {
    Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Double)
        .title(Span::styled(
            format!(" {title} "),
            Style::default().add_modifier(Modifier::BOLD),
        ))
}

fn section(title: &str, bindings: &[Binding], key_width: usize) -> Vec<Line<'static>> {
    let mut lines = vec![Line::from(Span::styled(title.to_string(), theme::header()))];
    for b in bindings {
        lines.push(Line::from(vec![
            Span::styled(format!("{:<key_width$}", keys::keys_label(b)), theme::key()),
            Span::raw(format!(" {}", b.help)),
        ]));
    }
    lines
}

/// The help overlay: every binding of every key table, in two columns.
pub fn help(frame: &mut Frame, area: Rect) {
    let rect = centred(area, 78, 24);
    frame.render_widget(Clear, rect);
    let block = frame_block(strings::HELP_TITLE);
    let inner = block.inner(rect);
    frame.render_widget(block, rect);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(inner);
    frame.render_widget(
        Paragraph::new(section(strings::HELP_SECTION_MAIN, keys::MAIN, 7)),
        left,
    );
    let mut lines = section(strings::HELP_SECTION_FILTER, keys::FILTER, 7);
    lines.extend(section(strings::HELP_SECTION_START, keys::START, 11));
    lines.extend(section(strings::HELP_SECTION_CONFIRM, keys::CONFIRM, 7));
    lines.extend(section(strings::HELP_SECTION_POLICIES, keys::POLICIES, 7));
    lines.extend(section(strings::HELP_SECTION_HELP, keys::HELP, 7));
    frame.render_widget(Paragraph::new(lines), right);
}

/// The start dialog: type and repository.
pub fn start(app: &App, form: &StartForm, frame: &mut Frame, area: Rect) {
    let vm = app.vms.iter().find(|v| v.vm_name == form.vm_name);
    let (disks, size) = vm
        .map(|v| {
            (
                v.disks.len(),
                v.disks.iter().map(|d| d.size_bytes).sum::<u64>(),
            )
        })
        .unwrap_or((0, 0));
    let mark = |on: bool| if on { "[x]" } else { "[ ]" };
    let mut lines = vec![
        Line::from(vec![
            Span::styled(format!("{:<11}", strings::COL_VM), theme::dim()),
            Span::styled(
                form.vm_name.clone(),
                Style::default().add_modifier(Modifier::BOLD),
            ),
            Span::raw(format!(
                " ({disks} {}s, {})",
                strings::DISK,
                format::bytes(size)
            )),
        ]),
        Line::from(vec![
            Span::styled(format!("{:<11}", strings::START_TYPE), theme::dim()),
            Span::raw(format!(
                "{} {}   {} {}",
                mark(form.backup_type == BackupType::Full),
                strings::START_FULL,
                mark(form.backup_type == BackupType::Incremental),
                strings::START_INCREMENTAL
            )),
        ]),
    ];
    if form.backup_type == BackupType::Incremental && !form.has_previous {
        lines.push(Line::from(Span::styled(
            format!(
                "{:<11}{} {}",
                "",
                strings::SYM_WARN,
                strings::START_NO_PREVIOUS
            ),
            theme::warn(),
        )));
    }
    lines.push(Line::from(Span::styled(
        strings::START_REPOSITORY,
        theme::dim(),
    )));
    for (i, r) in app.repositories.iter().enumerate() {
        let chosen = i == form.repository;
        let text = format!(
            "{}{:<10} {:<28} {} {}",
            if chosen { strings::SYM_SELECTED } else { "  " },
            r.id,
            format::truncate(&r.path, 28),
            format::bytes(r.free_bytes),
            strings::FREE
        );
        lines.push(Line::from(Span::styled(
            text,
            if chosen {
                theme::selected()
            } else {
                Style::default()
            },
        )));
    }
    lines.push(Line::default());
    lines.push(Line::from(Span::styled(strings::START_HINT, theme::key())));
    let rect = centred(area, 72, lines.len() as u16 + 2);
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines).block(frame_block(strings::START_TITLE)),
        rect,
    );
}

/// A y/n question.
pub fn confirm(question: &str, frame: &mut Frame, area: Rect) {
    let width = 64u16;
    let text_lines = (question.chars().count() as u16).div_ceil(width - 4) + 3;
    let rect = centred(area, width, text_lines + 2);
    frame.render_widget(Clear, rect);
    let block = frame_block(strings::CONFIRM_TITLE).border_style(theme::warn());
    let lines = vec![
        Line::from(Span::styled(
            question.to_string(),
            Style::default().add_modifier(Modifier::BOLD),
        )),
        Line::default(),
        Line::from(Span::styled(strings::CONFIRM_HINT, theme::key())),
    ];
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: true }).block(block),
        rect,
    );
}
