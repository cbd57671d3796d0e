//! Tunnel: per node, the SSH tunnel's state, since when, restarts, last error and forwards.

use super::{empty, empty_text, theme, titled_block};
use crate::app::{App, View};
use crate::format;
use crate::strings;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Wrap};

pub fn render(app: &App, frame: &mut Frame, area: Rect) {
    let rows_list = app.tunnel_rows();
    let block = titled_block(
        strings::VIEW_TUNNEL,
        Some(rows_list.len()),
        app.filter(View::Tunnel),
    );
    if rows_list.is_empty() {
        empty(
            frame,
            area,
            block,
            empty_text(app, View::Tunnel, strings::NO_NODES),
        );
        return;
    }
    let selected = app.selected(View::Tunnel);
    let table_height = (rows_list.len() as u16 + 3).min(area.height / 2).max(4);
    let [top, bottom] =
        Layout::vertical([Constraint::Length(table_height), Constraint::Min(3)]).areas(area);

    let rows = rows_list.iter().map(|r| {
        let (sym, word, style) = theme::tunnel_of(r.tunnel);
        let none = || strings::NONE.to_string();
        Row::new(vec![
            Cell::from(r.node.to_string()),
            Cell::from(Span::styled(format!("{sym} {word}"), style)),
            Cell::from(
                r.tunnel
                    .map(|t| format::age(t.since, app.now))
                    .unwrap_or_else(none),
            ),
            Cell::from(format!(
                "{:>8}",
                r.tunnel
                    .map(|t| t.restarts.to_string())
                    .unwrap_or_else(none)
            )),
            Cell::from(
                r.info
                    .and_then(|n| n.last_seen_at)
                    .map(|t| format::age(t, app.now))
                    .unwrap_or_else(none),
            ),
            Cell::from(Span::styled(
                r.tunnel
                    .and_then(|t| t.last_error.clone())
                    .unwrap_or_else(none),
                theme::bad(),
            )),
        ])
    });
    super::render_list(
        frame,
        top,
        rows,
        [
            Constraint::Length(10),
            Constraint::Length(12),
            Constraint::Length(7),
            Constraint::Length(8),
            Constraint::Length(7),
            Constraint::Min(10),
        ],
        vec![
            strings::COL_NODE,
            strings::COL_STATE,
            strings::COL_SINCE,
            strings::COL_RESTARTS,
            strings::COL_SEEN,
            strings::COL_LAST_ERROR,
        ],
        block,
        selected,
    );

    let Some(row) = rows_list.get(selected) else {
        return;
    };
    let mut lines = Vec::new();
    if let Some(n) = row.info {
        lines.push(Line::from(format!(
            "{} {} · {} {}",
            strings::API_URL,
            n.api_url,
            strings::VERSION,
            n.version
        )));
    }
    if let Some(e) = row.probe_error {
        lines.push(Line::from(Span::styled(
            format!("{} {}: {e}", strings::SYM_WARN, strings::PROBE_FAILED),
            theme::warn(),
        )));
    }
    if let Some(t) = row.tunnel {
        let (sym, word, style) = theme::tunnel_of(Some(t));
        lines.push(Line::from(vec![
            Span::styled(format!("{sym} {word}"), style),
            Span::raw(format!(
                " {} {} ({}) · {} {}",
                strings::COL_SINCE.to_lowercase(),
                format::stamp(t.since),
                format::age(t.since, app.now),
                strings::COL_RESTARTS.to_lowercase(),
                t.restarts
            )),
        ]));
        if let Some(e) = &t.last_error {
            lines.push(Line::from(Span::styled(
                format!("{} {}: {e}", strings::SYM_BAD, strings::LAST_ERROR),
                theme::bad(),
            )));
        }
        if theme::is_direct(t) {
            lines.push(Line::from(Span::styled(strings::NO_TUNNEL, theme::dim())));
        } else if t.forwards.is_empty() {
            lines.push(Line::from(Span::styled(strings::NO_FORWARDS, theme::dim())));
        }
        for f in &t.forwards {
            lines.push(Line::from(format!("  {f}")));
        }
    }
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(titled_block(
                &format!("{} {}", strings::FORWARDS_OF, row.node),
                None,
                "",
            )),
        bottom,
    );
}
