//! VMs: what the hub can back up, their disks, and their last backup with its integrity and
//! consistency (a VM whose last point is corrupt stands out: its next backup is a full).

use super::jobs::point;
use super::{empty, empty_text, theme, titled_block};
use crate::app::{App, View};
use crate::format;
use crate::strings;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Row, Table};
use sendense_shared::api::{Backup, Integrity, Vm, VmDisk};

/// `vsphere · CBT on`, `qemu`: the source driver and its change tracking, when the node said.
fn source(vm: &Vm) -> Option<String> {
    let cbt = vm.change_tracking.map(|on| {
        if on {
            strings::CBT_ON
        } else {
            strings::CBT_OFF
        }
    });
    match (vm.driver.as_deref(), cbt) {
        (Some(d), Some(c)) => Some(format!("{d} · {c}")),
        (Some(d), None) => Some(d.to_string()),
        (None, Some(c)) => Some(c.to_string()),
        (None, None) => None,
    }
}

fn has_facts(d: &VmDisk) -> bool {
    d.controller.is_some() || d.backing_file.is_some() || d.thin_provisioned.is_some()
}

/// The VM's backup that is not over yet, if any.
fn active_backup<'a>(app: &'a App, vm: &Vm) -> Option<&'a Backup> {
    app.backups
        .iter()
        .find(|b| b.vm_name == vm.vm_name && !b.status.is_terminal())
}

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
    let wide = area.width >= 120;
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
        let active = active_backup(app, v);
        let last_point = app.last_point(v);
        let corrupt = last_point.is_some_and(|b| b.integrity == Integrity::Corrupt);
        let mut name = vec![Span::raw(v.vm_name.clone())];
        if let Some(b) = active {
            let (sym, style) = theme::job(b.status);
            name.push(Span::styled(format!(" {sym}"), style));
        }
        if corrupt {
            name.push(Span::styled(format!(" {}", strings::SYM_BAD), theme::bad()));
        }
        // Narrow: no column for the point; a corrupt one turns its Last backup cell red (the
        // name carries the symbol, the disks title says why).
        let last = if corrupt && !wide {
            Span::styled(last, theme::bad())
        } else {
            Span::raw(last)
        };
        let mut cells = vec![
            Cell::from(Line::from(name)),
            Cell::from(
                v.node
                    .clone()
                    .unwrap_or_else(|| strings::NO_NODE.to_string()),
            ),
            Cell::from(format!("{:>5}", v.disks.len())),
            Cell::from(format!("{:>10}", format::bytes(size))),
        ];
        if wide {
            cells.push(Cell::from(
                source(v).unwrap_or_else(|| strings::NONE.to_string()),
            ));
        }
        cells.push(Cell::from(last));
        if wide {
            cells.push(Cell::from(last_point_line(last_point)));
        }
        Row::new(cells)
    });
    let mut widths = vec![
        Constraint::Length(14),
        Constraint::Length(12),
        Constraint::Length(5),
        Constraint::Length(10),
        Constraint::Min(10),
    ];
    let mut header = vec![
        strings::COL_VM,
        strings::COL_NODE,
        strings::COL_DISKS,
        strings::COL_SIZE,
        strings::COL_LAST_BACKUP,
    ];
    if wide {
        widths.insert(4, Constraint::Length(17));
        header.insert(4, strings::COL_SOURCE);
        widths[5] = Constraint::Length(33);
        widths.push(Constraint::Min(20));
        header.push(strings::LAST_POINT_COL);
    }
    super::render_list(frame, top, rows, widths, header, block, selected);

    // The narrow layout has no column to spare: the selected VM's source goes in the title of
    // its disks.
    let mut disks_title = format!("{} {}", strings::DISKS_OF, vm.vm_name);
    if let Some(s) = source(vm) {
        disks_title.push_str(&format!(" ({s})"));
    }
    if let Some(b) = active_backup(app, vm) {
        let (sym, _) = theme::job(b.status);
        disks_title.push_str(&format!(
            " · {sym} {} {} {}",
            strings::BACKUP,
            b.backup_id,
            b.status.as_str()
        ));
    }
    if let Some(b) = app
        .last_point(vm)
        .filter(|b| b.integrity == Integrity::Corrupt)
    {
        let (sym, word, _) = theme::integrity(b.integrity);
        disks_title.push_str(&format!(
            " · {} {sym} {word} · {}",
            strings::LAST_POINT,
            strings::NEXT_FULL
        ));
    }
    let disks_block = titled_block(&disks_title, None, "");
    // Controller, thin/thick and backing file of a hypervisor that names them (vSphere), on a
    // wide screen.
    let facts = wide && vm.disks.iter().any(has_facts);
    let none = || strings::NONE.to_string();
    let rows = vm.disks.iter().map(|d| {
        let mut cells = vec![
            Cell::from(d.disk_key.to_string()),
            Cell::from(format!("{:>4}", d.unit_number)),
            Cell::from(format!("{:>10}", format::bytes(d.size_bytes))),
            Cell::from(d.label.clone()),
        ];
        if facts {
            cells.push(Cell::from(d.controller.clone().unwrap_or_else(none)));
            cells.push(Cell::from(
                d.thin_provisioned
                    .map(|t| if t { strings::THIN } else { strings::THICK }.to_string())
                    .unwrap_or_else(none),
            ));
            cells.push(Cell::from(d.backing_file.clone().unwrap_or_else(none)));
        }
        Row::new(cells)
    });
    let mut widths = vec![
        Constraint::Length(6),
        Constraint::Length(4),
        Constraint::Length(10),
        Constraint::Min(10),
    ];
    let mut header = vec![
        strings::COL_KEY,
        strings::COL_UNIT,
        strings::COL_SIZE,
        strings::COL_LABEL,
    ];
    if facts {
        widths[3] = Constraint::Length(16);
        widths.extend([
            Constraint::Length(20),
            Constraint::Length(5),
            Constraint::Min(10),
        ]);
        header.extend([
            strings::COL_CONTROLLER,
            strings::COL_PROVISIONING,
            strings::COL_BACKING_FILE,
        ]);
    }
    let disks = Table::new(rows, widths)
        .header(Row::new(header).style(theme::header()))
        .block(disks_block);
    frame.render_widget(disks, bottom);
}

/// `✔ verified · ✔ application`, `✖ CORRUPT · next backup: full`: the last point as the wide
/// list shows it.
fn last_point_line(b: Option<&Backup>) -> Line<'static> {
    let Some(b) = b else {
        return Line::from(strings::NONE);
    };
    let mut spans = vec![point::integrity_cell(b)];
    if b.integrity == Integrity::Corrupt {
        spans.push(Span::styled(
            format!(" · {}", strings::NEXT_FULL),
            theme::bad(),
        ));
    } else if b.consistency.is_some() {
        spans.push(Span::raw(" · "));
        spans.push(point::consistency_cell(b));
    }
    Line::from(spans)
}
