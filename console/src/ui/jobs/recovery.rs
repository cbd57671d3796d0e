//! The detail of an instant recovery: the point it boots and where (node, new VM, QEMU, its
//! run state), a stall in the warning colour above everything else, and per disk a gauge with
//! its label beside it (stream state, share home), the bytes, rate and ETA of its stream, the
//! hub's export (port, qemu-nbd PID) and the overlay on the node the disk streams into.

use super::opt_time;
use crate::format;
use crate::strings;
use crate::ui::jobs::point::wrapped_rows;
use crate::ui::theme;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};
use sendense_shared::api::{JobStatus, Recovery, RecoveryDisk};

/// Rows of one disk: the gauge, the stream, the export, the overlay, a blank.
const DISK_ROWS: u16 = 5;

pub fn render_detail(r: &Recovery, frame: &mut Frame, area: Rect, scroll: usize) {
    let (sym, style) = theme::job(r.status);
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme::border())
        .title(Line::from(vec![
            Span::styled(
                format!(
                    " {} {} · {} · {} ",
                    strings::JOB,
                    r.recovery_id,
                    r.vm_name,
                    strings::RECOVERY
                ),
                Style::default().add_modifier(Modifier::BOLD),
            ),
            Span::styled(format!("{sym} {} ", r.status.as_str()), style),
        ]));
    let inner = block.inner(area);
    frame.render_widget(block, area);

    let summary = summary(r, inner.width as usize);
    let [top, _, rest] = Layout::vertical([
        Constraint::Length(wrapped_rows(&summary, inner.width)),
        Constraint::Length(1),
        Constraint::Min(0),
    ])
    .areas(inner);
    frame.render_widget(Paragraph::new(summary).wrap(Wrap { trim: false }), top);

    // Gauges start in one column: the labels are as wide as the widest.
    let labels: Vec<String> = r.disks.iter().map(gauge_label).collect();
    let label_width = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0) as u16 + 1;
    let bottom = rest.y + rest.height;
    let mut y = rest.y;
    let start = scroll.min(r.disks.len().saturating_sub(1));
    for (i, (d, label)) in r.disks.iter().zip(labels).enumerate().skip(start) {
        if y + DISK_ROWS - 1 > bottom {
            frame.render_widget(
                Paragraph::new(Span::styled(
                    format!("▼ {} ({})", strings::MORE_DISKS_BELOW, r.disks.len() - i),
                    theme::key(),
                )),
                Rect::new(rest.x, bottom.saturating_sub(1), rest.width, 1),
            );
            break;
        }
        let h = DISK_ROWS.min(bottom - y);
        render_disk(
            d,
            label,
            label_width,
            frame,
            Rect::new(rest.x, y, rest.width, h),
        );
        y += h;
    }
}

/// What the recovery is, the VM's state, and how it stands: stalled, home, failed, cancelled.
fn summary(r: &Recovery, width: usize) -> Vec<Line<'static>> {
    let none = || strings::NONE.to_string();
    let mut lines = vec![Line::from(format!(
        "{} {} {} {} · {} {} · {} {} · {} {}",
        strings::POINT,
        r.backup_id,
        strings::OF,
        r.source_vm,
        strings::NODE,
        r.node,
        strings::CREATED,
        format::clock(r.created_at),
        strings::VM_UP_IN,
        format::time_to_vm(r).unwrap_or_else(none),
    ))];
    let (vsym, vstyle) = theme::vm_state(r.vm_state.as_deref());
    let (done, total) = format::recovery_home(r);
    lines.push(Line::from(vec![
        Span::styled(format!("{} ", strings::VM), theme::dim()),
        Span::styled(
            format!("{vsym} {}", r.vm_state.as_deref().unwrap_or(strings::NONE)),
            vstyle,
        ),
        Span::raw(format!(
            " · {} {} {} · {} {}/{} ({}%) · {} {}",
            strings::QEMU,
            strings::PID,
            r.qemu_pid.map(|p| p.to_string()).unwrap_or_else(none),
            strings::HOME,
            format::bytes(done),
            format::bytes(total),
            format::percent(done, total),
            strings::FINISHED,
            opt_time(r.completed_at),
        )),
    ]));
    // Where to look on the node: the guest's console, and QMP on a wide screen.
    let mut files = Vec::new();
    if let Some(log) = &r.serial_log {
        files.push((strings::SERIAL, log.clone()));
    }
    if width >= 120
        && let Some(qmp) = &r.qmp_socket
    {
        files.push((strings::QMP, qmp.clone()));
    }
    if !files.is_empty() {
        let room = width / files.len();
        let mut spans = Vec::new();
        for (i, (what, path)) in files.into_iter().enumerate() {
            let lead = format!("{}{what} ", if i == 0 { "" } else { " · " });
            let fit = room.saturating_sub(lead.chars().count());
            spans.push(Span::styled(lead, theme::dim()));
            spans.push(Span::raw(format::truncate_left(&path, fit)));
        }
        lines.push(Line::from(spans));
    }
    if let Some(s) = &r.stalled {
        lines.push(Line::from(Span::styled(
            format!("{} {}: {s}", strings::SYM_WARN, strings::STALLED),
            theme::warn().add_modifier(Modifier::BOLD),
        )));
    }
    match r.status {
        JobStatus::Completed => lines.push(Line::from(Span::styled(
            format!("{} {}", strings::SYM_OK, strings::RECOVERY_HOME),
            theme::good(),
        ))),
        JobStatus::Cancelled => lines.push(Line::from(Span::styled(
            format!("{} {}", strings::SYM_WARN, strings::RECOVERY_CANCELLED),
            theme::warn(),
        ))),
        _ => {}
    }
    if let Some(e) = &r.error_message {
        lines.push(Line::from(Span::styled(
            format!("{} {}: {e}", strings::SYM_BAD, strings::ERROR),
            theme::bad(),
        )));
    }
    lines
}

/// `disk 2000 ◐ running 33%`: beside the gauge, never on it.
fn gauge_label(d: &RecoveryDisk) -> String {
    let (sym, _) = theme::stream(&d.stream);
    format!(
        "{} {} {sym} {} {:>3}%",
        strings::DISK,
        d.disk_key,
        d.stream,
        format::percent(d.bytes_done, d.bytes_total)
    )
}

fn render_disk(d: &RecoveryDisk, label: String, label_width: u16, frame: &mut Frame, area: Rect) {
    let rows = Layout::vertical([Constraint::Length(1); DISK_ROWS as usize]).split(area);
    let (_, style) = theme::stream(&d.stream);
    let [label_area, gauge_area] =
        Layout::horizontal([Constraint::Length(label_width), Constraint::Min(0)]).areas(rows[0]);
    frame.render_widget(Paragraph::new(Span::styled(label, style)), label_area);
    // Drawn as text: filled cells, then the rest shaded, so the bar reads without colour too.
    let width = gauge_area.width as u64;
    let filled = (width * d.bytes_done.min(d.bytes_total))
        .checked_div(d.bytes_total)
        .unwrap_or(0) as usize;
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled("█".repeat(filled), style),
            Span::styled(
                "░".repeat((width as usize).saturating_sub(filled)),
                theme::dim(),
            ),
        ])),
        gauge_area,
    );

    let none = || strings::NONE.to_string();
    let streaming = d.stream != strings::STREAM_FINISHED;
    let mut stream = format!(
        "  {}/{}",
        format::bytes(d.bytes_done),
        format::bytes(d.bytes_total)
    );
    if streaming {
        stream.push_str(&format!(
            " · {} {} · {} {}",
            strings::RATE,
            format::rate(d.rate_bps),
            strings::ETA,
            format::stream_eta(d)
                .map(format::duration_secs)
                .unwrap_or_else(none)
        ));
    }
    frame.render_widget(Paragraph::new(stream), rows[1]);
    // The export exists while the disk still reads from the hub.
    let export = format!(
        "  {} {} · {} {} {} · {} {}",
        strings::PORT,
        d.nbd_port.map(|p| p.to_string()).unwrap_or_else(none),
        strings::QEMU_NBD,
        strings::PID,
        d.qemu_nbd_pid.map(|p| p.to_string()).unwrap_or_else(none),
        strings::EXPORT,
        if d.nbd_port.is_some() {
            d.nbd_export_name.clone()
        } else {
            none()
        },
    );
    frame.render_widget(Paragraph::new(export), rows[2]);
    let lead = format!("  {} ", strings::OVERLAY);
    let room = (area.width as usize).saturating_sub(lead.chars().count());
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(lead, theme::dim()),
            Span::raw(format::truncate_left(
                d.overlay.as_deref().unwrap_or(strings::NONE),
                room,
            )),
        ])),
        rows[3],
    );
}
