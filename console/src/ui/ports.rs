//! Ports: the whole NBD range at a glance (one cell per port), then who holds each used port.

use super::{empty, theme, titled_block};
use crate::app::{App, PortCell, View};
use crate::format;
use crate::strings;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row};

fn cell_look(cell: PortCell) -> (&'static str, Style) {
    match cell {
        PortCell::Free => (strings::SYM_PORT_FREE, theme::dim()),
        PortCell::Held => (strings::SYM_PORT_HELD, theme::good()),
        PortCell::Stale => (strings::SYM_PORT_STALE, theme::warn()),
        PortCell::Squatted => (strings::SYM_PORT_SQUATTED, theme::bad()),
    }
}

pub fn render(app: &App, frame: &mut Frame, area: Rect) {
    let [first, last] = app.port_range();
    let count = (last.saturating_sub(first) as usize) + 1;
    // Each port takes two columns; rows start at round numbers so a port is easy to find.
    let inner_width = area.width.saturating_sub(2) as usize;
    let per_row = [50usize, 20, 10]
        .into_iter()
        .find(|n| 6 + n * 2 <= inner_width)
        .unwrap_or(10);
    let grid_rows = count.div_ceil(per_row);
    let [grid_area, table_area] =
        Layout::vertical([Constraint::Length(grid_rows as u16 + 4), Constraint::Min(3)])
            .areas(area);

    let (mut free, mut held, mut squatted) = (0, 0, 0);
    for port in first..=last {
        match app.port_cell(port) {
            PortCell::Free => free += 1,
            PortCell::Held | PortCell::Stale => held += 1,
            PortCell::Squatted => squatted += 1,
        }
    }
    let title = format!(
        "{} {first}-{last}: {free} {} · {held} {} · {squatted} {}",
        strings::PORTS_RANGE,
        strings::PORTS_SUMMARY_FREE,
        strings::PORTS_SUMMARY_HELD,
        strings::PORTS_SUMMARY_SQUATTED
    );
    let mut lines = Vec::with_capacity(grid_rows + 2);
    let ruler: String = (0..per_row).map(|i| format!("{} ", i % 10)).collect();
    lines.push(Line::from(Span::styled(
        format!("      {ruler}"),
        theme::dim(),
    )));
    for row in 0..grid_rows {
        let row_first = first as usize + row * per_row;
        let mut spans = vec![Span::styled(format!("{row_first:>5} "), theme::dim())];
        for port in row_first..(row_first + per_row).min(last as usize + 1) {
            let (sym, style) = cell_look(app.port_cell(port as u16));
            spans.push(Span::styled(format!("{sym} "), style));
        }
        lines.push(Line::from(spans));
    }
    let legend = [
        PortCell::Free,
        PortCell::Held,
        PortCell::Stale,
        PortCell::Squatted,
    ]
    .into_iter()
    .flat_map(|c| {
        let (sym, style) = cell_look(c);
        let word = match c {
            PortCell::Free => strings::PORTS_LEGEND_FREE,
            PortCell::Held => strings::PORTS_LEGEND_HELD,
            PortCell::Stale => strings::PORTS_LEGEND_STALE,
            PortCell::Squatted => strings::PORTS_LEGEND_SQUATTED,
        };
        [
            Span::styled(format!(" {sym}"), style),
            Span::raw(format!(" {word} ")),
        ]
    })
    .collect::<Vec<_>>();
    lines.push(Line::from(legend));
    frame.render_widget(
        Paragraph::new(lines).block(titled_block(&title, None, "")),
        grid_area,
    );

    let rows_list = app.port_rows();
    let block = titled_block(
        strings::VIEW_PORTS,
        Some(rows_list.len()),
        app.filter(View::Ports),
    );
    if rows_list.is_empty() {
        let text = if app.filter(View::Ports).is_empty() {
            strings::NO_PORTS_USED
        } else {
            strings::NOTHING_MATCHES
        };
        empty(frame, table_area, block, text);
        return;
    }
    let ports = app.ports.as_ref();
    let rows = rows_list.iter().map(|&port| {
        let cell = app.port_cell(port);
        let (sym, style) = cell_look(cell);
        let word = match cell {
            PortCell::Squatted => strings::PORT_SQUATTED,
            PortCell::Stale => strings::PORT_STALE,
            _ => strings::PORT_HELD,
        };
        let alloc = ports.and_then(|p| p.allocations.iter().find(|a| a.port.0 == port));
        let squat = ports.and_then(|p| p.squatted.iter().find(|s| s.port.0 == port));
        let (holder, since, detail) = match (alloc, squat) {
            (_, Some(s)) => (
                strings::NONE.to_string(),
                format::age(s.seen_at, app.now),
                s.detail.clone(),
            ),
            (Some(a), None) => {
                let vm = app.vm_of(&a.backup_id).unwrap_or(strings::NONE);
                let pid = app
                    .port_process(port)
                    .map(|p| {
                        format!(
                            "{} {} {}",
                            strings::QEMU_NBD,
                            p.pid,
                            if p.alive {
                                strings::ALIVE
                            } else {
                                strings::DEAD
                            }
                        )
                    })
                    .unwrap_or_default();
                (
                    format!(
                        "{} {vm} {} {}",
                        format::short_id(&a.backup_id.0),
                        strings::DISK,
                        a.disk_key
                    ),
                    format::age(a.allocated_at, app.now),
                    pid,
                )
            }
            (None, None) => Default::default(),
        };
        Row::new(vec![
            Cell::from(port.to_string()),
            Cell::from(Span::styled(format!("{sym} {word}"), style)),
            Cell::from(holder),
            Cell::from(since),
            Cell::from(detail),
        ])
    });
    let [list_area, detail_area] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(3)]).areas(table_area);
    let selected = app.selected(View::Ports);
    super::render_list(
        frame,
        list_area,
        rows,
        [
            Constraint::Length(5),
            Constraint::Length(10),
            Constraint::Length(29),
            Constraint::Length(6),
            Constraint::Min(10),
        ],
        vec![
            strings::COL_PORT,
            strings::COL_STATE,
            strings::COL_HOLDER,
            strings::COL_SINCE,
            "",
        ],
        block,
        selected,
    );
    if let Some(&port) = rows_list.get(selected) {
        let squat = ports.and_then(|p| p.squatted.iter().find(|s| s.port.0 == port));
        let text = match squat {
            Some(s) => Line::from(vec![
                Span::styled(
                    format!(
                        "{} {port} {}: ",
                        strings::SYM_PORT_SQUATTED,
                        strings::NOT_OURS
                    ),
                    theme::bad(),
                ),
                Span::raw(s.detail.clone()),
            ]),
            None => {
                let p = app.port_process(port);
                Line::from(match p {
                    Some(p) => format!(
                        "{port}: {} {} {} · {} {} · {}",
                        strings::QEMU_NBD,
                        strings::PID,
                        p.pid,
                        strings::EXPORT,
                        p.export_name,
                        p.qcow2_path
                    ),
                    None => format!("{port}: {}", strings::PORT_HELD),
                })
            }
        };
        super::detail_strip(frame, detail_area, text, true);
    }
}
