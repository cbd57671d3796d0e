//! Processes: every qemu-nbd the hub runs, alive or not, and what it serves.

use super::{empty, empty_text, theme, titled_block};
use crate::app::{App, View};
use crate::format;
use crate::strings;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Row};

pub fn render(app: &App, frame: &mut Frame, area: Rect) {
    let list = app.visible_processes();
    let block = titled_block(
        strings::VIEW_PROCESSES,
        Some(list.len()),
        app.filter(View::Processes),
    );
    if list.is_empty() {
        empty(
            frame,
            area,
            block,
            empty_text(app, View::Processes, strings::NO_PROCESSES),
        );
        return;
    }
    let wide = area.width >= 120;
    let selected = app.selected(View::Processes);
    let [top, bottom] = Layout::vertical([
        Constraint::Min(4),
        Constraint::Length(if wide { 0 } else { 4 }),
    ])
    .areas(area);
    let rows = list.iter().map(|p| {
        let (sym, word, style) = if p.alive {
            (strings::SYM_OK, strings::ALIVE, theme::good())
        } else if app.process_dead_while_needed(p) {
            (strings::SYM_BAD, strings::DEAD, theme::bad())
        } else {
            (strings::SYM_IDLE, strings::EXITED, theme::dim())
        };
        let up = if p.alive {
            format::age(p.started_at, app.now)
        } else {
            strings::NONE.to_string()
        };
        let mut cells = vec![
            Cell::from(format!("{:>7}", p.pid)),
            Cell::from(p.port.to_string()),
            Cell::from(Span::styled(format!("{sym} {word}"), style)),
            Cell::from(up),
            Cell::from(format::short_id(&p.backup_id.0)),
            Cell::from(p.disk_key.to_string()),
            Cell::from(p.export_name.clone()),
        ];
        if wide {
            cells.push(Cell::from(p.qcow2_path.clone()));
        }
        Row::new(cells)
    });
    let mut widths = vec![
        Constraint::Length(7),
        Constraint::Length(5),
        // "○ exited"
        Constraint::Length(8),
        Constraint::Length(6),
        Constraint::Length(10),
        Constraint::Length(4),
        Constraint::Min(12),
    ];
    let mut header = vec![
        strings::COL_PID,
        strings::COL_PORT,
        strings::COL_ALIVE,
        strings::COL_UPTIME,
        strings::COL_JOB,
        strings::COL_DISK,
        strings::COL_EXPORT,
    ];
    if wide {
        widths[6] = Constraint::Length(22);
        widths.push(Constraint::Min(20));
        header.push(strings::COL_QCOW2);
    }
    super::render_list(frame, top, rows, widths, header, block, selected);

    if let Some(p) = list.get(selected).filter(|_| !wide) {
        let vm = app.vm_of(&p.backup_id).unwrap_or(strings::NONE);
        let lines = vec![
            Line::from(format!("{} {}", strings::QCOW2, p.qcow2_path)),
            Line::from(format!(
                "{} {} ({vm}) {} {} · {} {}",
                strings::JOB,
                p.backup_id,
                strings::DISK,
                p.disk_key,
                strings::EXPORT,
                p.export_name
            )),
        ];
        super::detail_strip(frame, bottom, lines, false);
    }
}
