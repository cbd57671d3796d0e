//! Drawing. [`render`] takes `&App`: it reads the state and never changes it, so what is on
//! screen is a function of the state alone (and the render tests pin it down).
//!
//! - `header`: hub identity, health, database, link state, clock; the unreachable banner.
//! - `jobs`, `vms`, `ports`, `tunnel`, `processes`, `events`, `policies`: one module per view
//!   (`policies` also draws the prune preview dialog).
//! - `files`: the file browser of a point, drawn in place of the view while it is open.
//! - `popup`: help overlay, start dialog, y/n confirmations.
//! - `theme`: colours and status symbols (every colour comes with a word or a symbol).

mod events;
mod files;
mod header;
mod jobs;
mod policies;
mod popup;
mod ports;
mod processes;
pub(crate) mod theme;
mod tunnel;
mod vms;

#[cfg(test)]
mod tests;

use crate::app::{App, Mode, NoticeLevel, View};
use crate::strings;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table, TableState, Tabs, Wrap};

/// Draw the whole screen.
pub fn render(app: &App, frame: &mut Frame) {
    let header_height = if app.is_unreachable() { 3 } else { 2 };
    let [header, tabs, body, footer] = Layout::vertical([
        Constraint::Length(header_height),
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    header::render(app, frame, header);
    render_tabs(app, frame, tabs);
    match (&app.browser, app.view) {
        (Some(b), _) => files::render(app, b, frame, body),
        (None, view) => render_view(app, view, frame, body),
    }
    render_footer(app, frame, footer);
    render_overlay(app, frame);
}

fn render_view(app: &App, view: View, frame: &mut Frame, body: Rect) {
    match view {
        View::Jobs => jobs::render(app, frame, body),
        View::Vms => vms::render(app, frame, body),
        View::Ports => ports::render(app, frame, body),
        View::Tunnel => tunnel::render(app, frame, body),
        View::Processes => processes::render(app, frame, body),
        View::Events => events::render(app, frame, body),
        View::Policies => policies::render(app, frame, body),
    }
}

fn render_overlay(app: &App, frame: &mut Frame) {
    match &app.mode {
        Mode::Help => popup::help(frame, frame.area()),
        Mode::Start(form) => popup::start(app, form, frame, frame.area()),
        Mode::ConfirmStart(form) => {
            let repo = app
                .repositories
                .get(form.repository)
                .map(|r| r.id.as_str())
                .unwrap_or(strings::NONE);
            let text = strings::confirm_start(form.backup_type.as_str(), &form.vm_name, repo);
            popup::confirm(&text, frame, frame.area());
        }
        Mode::ConfirmCancel {
            backup_id,
            vm_name,
            status,
        } => {
            let text = strings::confirm_cancel(&backup_id.0, vm_name, status.as_str());
            popup::confirm(&text, frame, frame.area());
        }
        Mode::ConfirmCancelRestore {
            restore_id,
            vm_name,
            status,
        } => {
            let text = strings::confirm_cancel_restore(restore_id, vm_name, status.as_str());
            popup::confirm(&text, frame, frame.area());
        }
        Mode::ConfirmCancelRecovery {
            recovery_id,
            vm_name,
            node,
            status,
        } => {
            let text =
                strings::confirm_cancel_recovery(recovery_id, vm_name, node, status.as_str());
            popup::confirm(&text, frame, frame.area());
        }
        Mode::ConfirmPolicy { question, .. } => popup::confirm(question, frame, frame.area()),
        Mode::PrunePreview(plan) => policies::prune::render(plan, frame, frame.area()),
        Mode::Normal | Mode::Filter | Mode::Files | Mode::FilesPrompt { .. } => {}
    }
}

fn render_tabs(app: &App, frame: &mut Frame, area: Rect) {
    let titles = View::ALL
        .iter()
        .enumerate()
        .map(|(i, v)| Line::from(format!("{} {}", i + 1, v.title())));
    let tabs = Tabs::new(titles)
        .select(app.view.index())
        .style(theme::dim())
        .highlight_style(theme::tab_selected())
        .divider("│");
    frame.render_widget(tabs, area);
}

fn render_footer(app: &App, frame: &mut Frame, area: Rect) {
    let line = if app.mode == Mode::Filter {
        Line::from(vec![
            Span::styled(format!(" /{} ", strings::FILTER_EDITING), theme::key()),
            Span::raw(format!(" {}█", app.filter(app.view))),
        ])
    } else if let Some(notice) = app.current_notice() {
        let (sym, style) = match notice.level {
            NoticeLevel::Info => (strings::SYM_OK, theme::info()),
            NoticeLevel::Error => (strings::SYM_BAD, theme::bad()),
        };
        Line::from(Span::styled(format!(" {sym} {}", notice.text), style))
    } else if app.browser.is_some() {
        // The browser's own keys: its errors are in its status line.
        Line::from(Span::styled(
            format!(" {}", files::hints(app)),
            theme::key(),
        ))
    } else if let Some(err) = app.snapshot_errors.first() {
        Line::from(Span::styled(
            format!(" {} {err}", strings::SYM_WARN),
            theme::warn(),
        ))
    } else {
        let view_hint = match app.view {
            View::Jobs if app.detail().is_some() => strings::HINT_DETAIL,
            View::Jobs => strings::HINT_JOBS,
            View::Vms => strings::HINT_VMS,
            View::Events => strings::HINT_EVENTS,
            View::Policies if app.views.policies.detail.is_some() => strings::HINT_POLICY_DETAIL,
            View::Policies => strings::HINT_POLICIES,
            _ => "",
        };
        let mut spans = vec![Span::styled(
            format!(" {}", strings::HINT_COMMON),
            theme::dim(),
        )];
        if !view_hint.is_empty() {
            spans.push(Span::styled(format!("  {view_hint}"), theme::key()));
        }
        Line::from(spans)
    };
    frame.render_widget(Paragraph::new(line), area);
}

/// A bordered block titled with the view name, its row count and the filter in force.
fn titled_block(title: &str, count: Option<usize>, filter: &str) -> Block<'static> {
    let mut text = format!(" {title}");
    if let Some(n) = count {
        text.push_str(&format!(" ({n})"));
    }
    text.push(' ');
    let mut block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme::border())
        .title(Span::styled(
            text,
            Style::default().add_modifier(Modifier::BOLD),
        ));
    if !filter.is_empty() {
        block = block.title(Span::styled(
            format!(" {}: {filter} ", strings::FILTER),
            theme::key(),
        ));
    }
    block
}

/// A selectable list inside `block`: one header style, selection mark and highlight for every
/// view, with the selected row kept in sight.
fn render_list<'a, C: Into<Constraint>>(
    frame: &mut Frame,
    area: Rect,
    rows: impl IntoIterator<Item = Row<'a>>,
    widths: impl IntoIterator<Item = C>,
    header: Vec<&'a str>,
    block: Block<'a>,
    selected: usize,
) {
    let table = Table::new(rows, widths)
        .header(Row::new(header).style(theme::header()))
        .row_highlight_style(theme::selected())
        .highlight_symbol(strings::SYM_SELECTED)
        .block(block);
    let mut state = TableState::default().with_selected(Some(selected));
    frame.render_stateful_widget(table, area, &mut state);
}

/// The selected row's details in full, under a list, below a rule. `trim` drops the leading
/// spaces of wrapped lines.
fn detail_strip<'a>(frame: &mut Frame, area: Rect, text: impl Into<Text<'a>>, trim: bool) {
    frame.render_widget(
        Paragraph::new(text).wrap(Wrap { trim }).block(
            Block::default()
                .borders(Borders::TOP)
                .border_style(theme::border()),
        ),
        area,
    );
}

/// A one-line message inside a bordered block (empty lists, nothing matches).
fn empty(frame: &mut Frame, area: Rect, block: Block<'static>, text: &str) {
    frame.render_widget(
        Paragraph::new(Line::from(Span::styled(format!(" {text}"), theme::dim()))).block(block),
        area,
    );
}

/// Text for a list that has no rows: empty because of the filter, or really empty.
fn empty_text<'a>(app: &App, view: View, when_empty: &'a str) -> &'a str {
    if app.filter(view).is_empty() {
        when_empty
    } else {
        strings::NOTHING_MATCHES
    }
}
