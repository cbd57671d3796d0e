//! VMs: what the hub can back up, their disks, and their last backup.

use super::{empty, empty_text, theme, titled_block};
use crate::app::{App, View};
use crate::format;
use crate::strings;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::Span;
use ratatui::widgets::{Cell, Row, Table};

pub fn render(app: &App, frame: &mut Frame, area: Rect) {
    let list = app.visible_vms();
    let block = titled_block(strings::VIEW_VMS, Some(list.len()), app.filter(View::Vms));
    if list.is_empty() {
        empty(
            frame,
            area,
            block,
            empty_text(app, View::Vms, strings::NO_VMS),
        );
        return;
    }
    let selected = app.selected(View::Vms);
    let vm = list[selected];
    let disks_height = (vm.disks.len() as u16 + 3).min(8);
    let [top, bottom] =
        Layout::vertical([Constraint::Min(4), Constraint::Length(disks_height)]).areas(area);

    let rows = list.iter().map(|v| {
        let size: u64 = v.disks.iter().map(|d| d.size_bytes).sum();
        let last = match (&v.last_backup_id, v.last_backup_at) {
            (Some(id), Some(at)) => {
                format!(
                    "{} ({}) {}",
                    format::stamp(at),
                    format::age(at, app.now),
                    format::short_id(&id.0)
                )
            }
            (Some(id), None) => format::short_id(&id.0),
            _ => strings::NONE.to_string(),
        };
        let active = app
            .backups
            .iter()
            .find(|b| b.vm_name == v.vm_name && !b.status.is_terminal());
        let mut name = vec![Span::raw(v.vm_name.clone())];
        if let Some(b) = active {
            let (sym, style) = theme::job(b.status);
            name.push(Span::styled(format!(" {sym}"), style));
        }
        Row::new(vec![
            Cell::from(ratatui::text::Line::from(name)),
            Cell::from(
                v.node
                    .clone()
                    .unwrap_or_else(|| strings::NO_NODE.to_string()),
            ),
            Cell::from(format!("{:>5}", v.disks.len())),
            Cell::from(format!("{:>10}", format::bytes(size))),
            Cell::from(last),
        ])
    });
    super::render_list(
        frame,
        top,
        rows,
        [
            Constraint::Length(14),
            Constraint::Length(12),
            Constraint::Length(5),
            Constraint::Length(10),
            Constraint::Min(10),
        ],
        vec![
            strings::COL_VM,
            strings::COL_NODE,
            strings::COL_DISKS,
            strings::COL_SIZE,
            strings::COL_LAST_BACKUP,
        ],
        block,
        selected,
    );

    let mut disks_title = format!("{} {}", strings::DISKS_OF, vm.vm_name);
    if let Some(b) = app
        .backups
        .iter()
        .find(|b| b.vm_name == vm.vm_name && !b.status.is_terminal())
    {
        let (sym, _) = theme::job(b.status);
        disks_title.push_str(&format!(
            " · {sym} {} {} {}",
            strings::BACKUP,
            b.backup_id,
            b.status.as_str()
        ));
    }
    let disks_block = titled_block(&disks_title, None, "");
    let rows = vm.disks.iter().map(|d| {
        Row::new(vec![
            Cell::from(d.disk_key.to_string()),
            Cell::from(format!("{:>4}", d.unit_number)),
            Cell::from(format!("{:>10}", format::bytes(d.size_bytes))),
            Cell::from(d.label.clone()),
        ])
    });
    let disks = Table::new(
        rows,
        [
            Constraint::Length(6),
            Constraint::Length(4),
            Constraint::Length(10),
            Constraint::Min(10),
        ],
    )
    .header(
        Row::new(vec![
            strings::COL_KEY,
            strings::COL_UNIT,
            strings::COL_SIZE,
            strings::COL_LABEL,
        ])
        .style(theme::header()),
    )
    .block(disks_block);
    frame.render_widget(disks, bottom);
}
