//! Events: the job event log (newest first), filterable; the selected entry in full below.

use super::{empty, empty_text, theme, titled_block};
use crate::app::{App, View};
use crate::format;
use crate::strings;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Row};

pub fn render(app: &App, frame: &mut Frame, area: Rect) {
    let list = app.visible_events();
    let block = titled_block(
        strings::VIEW_EVENTS,
        Some(list.len()),
        app.filter(View::Events),
    );
    if list.is_empty() {
        empty(
            frame,
            area,
            block,
            empty_text(app, View::Events, strings::NO_EVENTS),
        );
        return;
    }
    let wide = area.width >= 120;
    let selected = app.selected(View::Events);
    let [top, bottom] = Layout::vertical([Constraint::Min(4), Constraint::Length(4)]).areas(area);
    let rows = list.iter().map(|e| {
        let (sym, style) = theme::level(&e.level);
        let mut cells = vec![
            Cell::from(format::clock(e.at)),
            Cell::from(Span::styled(format!("{sym} {}", e.level), style)),
            Cell::from(format::short_id(&e.backup_id.0)),
        ];
        if wide {
            cells.push(Cell::from(
                app.vm_of(&e.backup_id).unwrap_or(strings::NONE).to_string(),
            ));
            cells.push(Cell::from(
                e.disk_key.map(|k| k.to_string()).unwrap_or_default(),
            ));
        }
        cells.push(Cell::from(e.step.clone()));
        cells.push(Cell::from(e.message.clone()));
        Row::new(cells)
    });
    let mut widths = vec![
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(10),
    ];
    let mut header = vec![strings::COL_TIME, strings::COL_LEVEL, strings::COL_JOB];
    if wide {
        widths.push(Constraint::Length(12));
        widths.push(Constraint::Length(4));
        header.push(strings::COL_VM);
        header.push(strings::COL_DISK);
    }
    // The hub's longest step names ("checksums_verified") fit whole.
    widths.push(Constraint::Length(18));
    widths.push(Constraint::Min(10));
    header.push(strings::COL_STEP);
    header.push(strings::COL_MESSAGE);
    super::render_list(frame, top, rows, widths, header, block, selected);

    if let Some(e) = list.get(selected) {
        let (sym, style) = theme::level(&e.level);
        let text = Line::from(vec![
            Span::styled(format!("{sym} {} ", e.step), style),
            Span::raw(e.message.clone()),
        ]);
        super::detail_strip(frame, bottom, text, true);
    }
}
