//! Jobs: running verify jobs (`verify`), the list of backups, restores and instant recoveries
//! with each point's integrity and consistency (`point`), and the detail of one job with a
//! gauge per disk (a restore's detail is in `restore`, a recovery's in `recovery`).

pub(super) mod point;
mod recovery;
mod restore;
mod verify;

use super::{empty, empty_text, theme, titled_block};
use crate::app::{App, JobRow, View};
use crate::format;
use crate::strings;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Gauge, Paragraph, Row, Sparkline, Wrap};
use sendense_shared::api::{Backup, BackupType, DiskResult, DiskStatus, Integrity};

pub fn render(app: &App, frame: &mut Frame, area: Rect) {
    if let Some(b) = app.detail_backup() {
        render_detail(app, b, frame, area);
    } else if let Some(r) = app.detail_restore() {
        restore::render_detail(app, r, frame, area);
    } else if let Some(r) = app.detail_recovery() {
        recovery::render_detail(r, frame, area, app.views.jobs.detail_scroll);
    } else {
        render_list(app, frame, area);
    }
}

fn short_type(t: BackupType) -> &'static str {
    match t {
        BackupType::Full => "full",
        BackupType::Incremental => "incr",
    }
}

/// The Bytes column: written so far / the VM's size (a restore: copied so far / the disk's).
fn bytes_cell(job: JobRow<'_>) -> String {
    let (done, total) = match job {
        JobRow::Backup(b) => (b.bytes_transferred, b.total_bytes),
        JobRow::Restore(r) => (r.bytes_done, r.bytes_total),
        JobRow::Recovery(r) => format::recovery_home(r),
    };
    format!("{}/{}", format::bytes(done), format::bytes(total))
}

/// The job's own error, then each failed disk's cause; for a corrupt point, why it is.
fn errors_of(job: JobRow<'_>) -> Vec<String> {
    match job {
        JobRow::Backup(b) => b
            .error_message
            .iter()
            .cloned()
            .chain(b.disk_results.iter().filter_map(|d| {
                d.error_message
                    .as_ref()
                    .map(|e| format!("{} {}: {e}", strings::DISK, d.disk_key))
            }))
            .chain((b.integrity == Integrity::Corrupt).then(|| {
                format!(
                    "{} {}: {} · {}",
                    strings::INTEGRITY,
                    strings::CORRUPT,
                    b.integrity_detail.as_deref().unwrap_or(strings::NONE),
                    strings::NEXT_FULL
                )
            }))
            .collect(),
        JobRow::Restore(r) => r.error_message.iter().cloned().collect(),
        // The stall is no error, but it is what the operator must read first.
        JobRow::Recovery(r) => r
            .stalled
            .iter()
            .map(|s| format!("{}: {s}", strings::STALLED))
            .chain(r.error_message.iter().cloned())
            .collect(),
    }
}

fn render_list(app: &App, frame: &mut Frame, area: Rect) {
    let [verify_area, area] = Layout::vertical([
        Constraint::Length(verify::height(app, area.width)),
        Constraint::Min(0),
    ])
    .areas(area);
    if verify_area.height > 0 {
        verify::render(app, frame, verify_area);
    }
    let list = app.visible_jobs();
    let block = titled_block(strings::VIEW_JOBS, Some(list.len()), app.filter(View::Jobs));
    if list.is_empty() {
        empty(
            frame,
            area,
            block,
            empty_text(app, View::Jobs, strings::NO_JOBS),
        );
        return;
    }
    let selected = app.selected(View::Jobs);
    let wide = area.width >= 120;
    let error_of = |job: JobRow<'_>| match job {
        JobRow::Backup(b) => b.error_message.clone().or_else(|| {
            b.disk_results.iter().find_map(|d| {
                d.error_message
                    .clone()
                    .map(|e| format!("disk {}: {e}", d.disk_key))
            })
        }),
        JobRow::Restore(r) => r.error_message.clone(),
        JobRow::Recovery(r) => r.error_message.clone().or_else(|| {
            r.stalled
                .as_ref()
                .map(|s| format!("{}: {s}", strings::STALLED))
        }),
    };
    // The selected job's errors in full.
    let selected_errors: Vec<String> = list
        .get(selected)
        .map(|j| errors_of(*j))
        .unwrap_or_default();
    let error_height = if selected_errors.is_empty() {
        0
    } else if wide {
        selected_errors.len() as u16 + 1
    } else {
        5
    };
    let [table_area, error_area] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(error_height)]).areas(area);

    let mut header = vec![
        strings::COL_ID,
        strings::COL_VM,
        strings::COL_TYPE,
        strings::COL_STATUS,
        strings::COL_PROGRESS,
        strings::COL_BYTES,
        strings::COL_RATE,
    ];
    // Formatted once: the column's width and the cells both need them.
    let bytes: Vec<String> = list.iter().map(|j| bytes_cell(*j)).collect();
    // "restore" needs more room than "full"/"incr"; only then is the column wider.
    let type_width = if list
        .iter()
        .any(|j| matches!(j, JobRow::Restore(_) | JobRow::Recovery(_)))
    {
        strings::RESTORE.len() as u16
    } else {
        4
    };
    let mut widths = vec![
        Constraint::Length(10),
        Constraint::Min(8),
        Constraint::Length(type_width),
        Constraint::Length(12),
        Constraint::Length(4),
        // As wide as the longest figure ("72.0 MiB/384.0 MiB"), never cut; 17 at the least.
        Constraint::Length(
            bytes
                .iter()
                .map(|s| s.chars().count() as u16)
                .max()
                .unwrap_or(0)
                .max(17),
        ),
        Constraint::Length(11),
    ];
    if wide {
        header.push(strings::COL_INTEGRITY);
        header.push(strings::COL_CONSISTENCY);
        header.push(strings::COL_STARTED);
        header.push(strings::COL_ERROR);
        widths[1] = Constraint::Length(14);
        widths.push(Constraint::Length(14));
        widths.push(Constraint::Length(13));
        widths.push(Constraint::Length(11));
        widths.push(Constraint::Min(20));
    }
    let rows = list.iter().zip(bytes).map(|(job, bytes)| {
        let (sym, style) = theme::job(job.status());
        let (kind, pct, rate) = match *job {
            JobRow::Backup(b) => (
                short_type(b.backup_type),
                format::percent(format::done_bytes(b), b.total_bytes),
                app.job_rate(b),
            ),
            JobRow::Restore(r) => (
                strings::RESTORE,
                format::percent(r.bytes_done, r.bytes_total),
                app.restore_rate(r),
            ),
            JobRow::Recovery(r) => {
                let (done, total) = format::recovery_home(r);
                (
                    strings::RECOVERY,
                    format::percent(done, total),
                    app.recovery_rate(r),
                )
            }
        };
        let rate = rate
            .map(format::rate)
            .unwrap_or_else(|| strings::NONE.to_string());
        // No column for the integrity on a narrow screen: a corrupt point says so in its
        // status (the job completed, but what it stored is not good any more).
        let status = match *job {
            JobRow::Backup(b) if !wide && b.integrity == Integrity::Corrupt => {
                let (sym, word, style) = theme::integrity(b.integrity);
                Span::styled(format!("{sym} {word}"), style)
            }
            // A stalled recovery says so where the eye goes: its VM waits on the hub.
            JobRow::Recovery(r) if r.stalled.is_some() => Span::styled(
                format!("{} {}", strings::SYM_WARN, strings::STALLED),
                theme::warn(),
            ),
            _ => Span::styled(format!("{sym} {}", job.status().as_str()), style),
        };
        let mut cells = vec![
            Cell::from(format::short_id(job.id())),
            Cell::from(job.vm_name().to_string()),
            Cell::from(kind),
            Cell::from(status),
            Cell::from(format!("{pct:>3}%")),
            Cell::from(bytes),
            Cell::from(rate),
        ];
        if wide {
            let (integrity, consistency) = match *job {
                JobRow::Backup(b) => (point::integrity_cell(b), point::consistency_cell(b)),
                JobRow::Restore(_) | JobRow::Recovery(_) => {
                    (Span::raw(strings::NONE), Span::raw(strings::NONE))
                }
            };
            cells.push(Cell::from(integrity));
            cells.push(Cell::from(consistency));
            cells.push(Cell::from(format::stamp(job.created_at())));
            let error = error_of(*job).unwrap_or_default();
            let style = if is_stall(&error) {
                theme::warn()
            } else {
                theme::bad()
            };
            cells.push(Cell::from(Span::styled(error, style)));
        }
        Row::new(cells)
    });
    super::render_list(frame, table_area, rows, widths, header, block, selected);

    if let Some(job) = list.get(selected).filter(|_| !selected_errors.is_empty()) {
        let lines: Vec<Line> = selected_errors
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let (sym, style) = if is_stall(&e) {
                    (strings::SYM_WARN, theme::warn())
                } else {
                    (strings::SYM_BAD, theme::bad())
                };
                let lead = if i == 0 {
                    format!("{sym} {} ", format::short_id(job.id()))
                } else {
                    "  ".to_string()
                };
                // A stall is a warning in full: the colour carries to its words.
                let text = if is_stall(&e) {
                    Span::styled(e, style)
                } else {
                    Span::raw(e)
                };
                Line::from(vec![Span::styled(lead, style), text])
            })
            .collect();
        super::detail_strip(frame, error_area, lines, true);
    }
}

/// A recovery's stall among a job's errors (a warning, not a failure).
fn is_stall(e: &str) -> bool {
    e.starts_with(strings::STALLED)
}

/// One disk's gauge, for a backup's disks and a restore's one alike: the bar filled to
/// done/total, labelled `disk K · ◐ running · done/total · N%`.
pub(super) fn disk_gauge(
    frame: &mut Frame,
    area: Rect,
    key: sendense_shared::ids::DiskKey,
    (sym, style): (&str, Style),
    status: &str,
    (done, total): (u64, u64),
) {
    let label = format!(
        "{} {key} · {sym} {status} · {}/{} · {}%",
        strings::DISK,
        format::bytes(done),
        format::bytes(total),
        format::percent(done, total),
    );
    let ratio = if total == 0 {
        0.0
    } else {
        (done.min(total) as f64) / total as f64
    };
    frame.render_widget(
        Gauge::default()
            .gauge_style(style)
            .ratio(ratio)
            .label(Span::styled(
                label,
                Style::default().add_modifier(Modifier::BOLD),
            )),
        area,
    );
}

pub(super) fn opt_time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(format::clock)
        .unwrap_or_else(|| strings::NONE.to_string())
}

fn render_detail(app: &App, b: &Backup, frame: &mut Frame, area: Rect) {
    let (sym, style) = theme::job(b.status);
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme::border())
        .title(Line::from(vec![
            Span::styled(
                format!(
                    " {} {} · {} · {} ",
                    strings::JOB,
                    b.backup_id,
                    b.vm_name,
                    b.backup_type.as_str()
                ),
                Style::default().add_modifier(Modifier::BOLD),
            ),
            Span::styled(format!("{sym} {} ", b.status.as_str()), style),
        ]));
    let inner = block.inner(area);
    frame.render_widget(block, area);

    let rate = app.job_rate(b);
    let done = format::done_bytes(b);
    let remaining = b.total_bytes.saturating_sub(done);
    // What the node really wrote, when it differs from how far it got (holes and unchanged
    // areas are skipped, not written).
    let written = if b.bytes_transferred == done {
        String::new()
    } else {
        format!(
            " · {} {}",
            strings::WRITTEN,
            format::bytes(b.bytes_transferred)
        )
    };
    let eta = rate
        .filter(|r| *r > 0 && !b.status.is_terminal())
        .map(|r| format::duration_secs((remaining / r) as i64))
        .unwrap_or_else(|| strings::NONE.to_string());
    let mut summary = vec![
        Line::from(format!(
            "{} {} · {} {} · {} {} · {} {}",
            strings::REPOSITORY,
            b.repository_id,
            strings::CREATED,
            format::clock(b.created_at),
            strings::STARTED,
            opt_time(b.started_at),
            strings::FINISHED,
            opt_time(b.completed_at),
        )),
        Line::from(format!(
            "{}/{} ({}%){written} · {} {} · {} {}",
            format::bytes(done),
            format::bytes(b.total_bytes),
            format::percent(done, b.total_bytes),
            strings::RATE,
            rate.map(format::rate)
                .unwrap_or_else(|| strings::NONE.to_string()),
            strings::ETA,
            eta
        )),
    ];
    if !b.nbd_targets_string.is_empty() {
        summary.push(Line::from(vec![
            Span::styled(format!("{} ", strings::TARGETS), theme::dim()),
            Span::raw(b.nbd_targets_string.clone()),
        ]));
    }
    if let Some(err) = &b.error_message {
        summary.push(Line::from(Span::styled(
            format!("{} {}: {err}", strings::SYM_BAD, strings::ERROR),
            theme::bad(),
        )));
    }
    // The point's integrity and consistency, wrapped: their reasons are for reading in full.
    let facts: Vec<Line> = point::integrity_line(b)
        .into_iter()
        .chain(point::consistency_line(b))
        .chain(point::hardware_line(b))
        .chain(point::boot_lines(b))
        .collect();
    let [top, facts_area, _, rest] = Layout::vertical([
        Constraint::Length(summary.len() as u16),
        Constraint::Length(point::wrapped_rows(&facts, inner.width)),
        Constraint::Length(1),
        Constraint::Min(0),
    ])
    .areas(inner);
    frame.render_widget(Paragraph::new(summary), top);
    frame.render_widget(Paragraph::new(facts).wrap(Wrap { trim: false }), facts_area);

    let mut y = rest.y;
    let bottom = rest.y + rest.height;
    let start = app
        .views
        .jobs
        .detail_scroll
        .min(b.disk_results.len().saturating_sub(1));
    for (i, d) in b.disk_results.iter().enumerate().skip(start) {
        let h = disk_height(d, rest.width);
        if y + h > bottom {
            let more = Rect::new(rest.x, bottom.saturating_sub(1), rest.width, 1);
            frame.render_widget(
                Paragraph::new(Span::styled(
                    format!(
                        "▼ {} ({})",
                        strings::MORE_DISKS_BELOW,
                        b.disk_results.len() - i
                    ),
                    theme::key(),
                )),
                more,
            );
            break;
        }
        render_disk(app, b, d, frame, Rect::new(rest.x, y, rest.width, h));
        y += h;
    }
}

fn error_lines(d: &DiskResult, width: u16) -> u16 {
    match &d.error_message {
        Some(e) => {
            let len = e.chars().count() + 10;
            (len as u16).div_ceil(width.max(1)).clamp(1, 3)
        }
        None => 0,
    }
}

fn disk_height(d: &DiskResult, width: u16) -> u16 {
    // gauge, port/pid/rate, export/qcow2, sparkline, the error, a blank line
    4 + error_lines(d, width) + 1
}

fn render_disk(app: &App, b: &Backup, d: &DiskResult, frame: &mut Frame, area: Rect) {
    let [gauge_area, info_area, path_area, spark_area, err_area] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(error_lines(d, area.width)),
    ])
    .areas(area);
    disk_gauge(
        frame,
        gauge_area,
        d.disk_key,
        theme::disk(d.status),
        d.status.as_str(),
        (d.bytes_done, d.bytes_total),
    );

    let rate = app
        .disk_rate(&b.backup_id, d.disk_key)
        .filter(|_| d.status == DiskStatus::Running);
    let eta = rate
        .filter(|r| *r > 0)
        .map(|r| format::duration_secs((d.bytes_total.saturating_sub(d.bytes_done) / r) as i64))
        .unwrap_or_else(|| strings::NONE.to_string());
    let none = || strings::NONE.to_string();
    let mut info = format!(
        "{} {} · {} {} {} · {} {} · {} {}",
        strings::PORT,
        d.nbd_port.map(|p| p.to_string()).unwrap_or_else(none),
        strings::QEMU_NBD,
        strings::PID,
        d.qemu_nbd_pid.map(|p| p.to_string()).unwrap_or_else(none),
        strings::RATE,
        rate.map(format::rate).unwrap_or_else(none),
        strings::ETA,
        eta
    );
    // The change id the disk was copied at (vSphere CBT), where a wide screen has room: whole
    // when it fits, else its start and its sequence number.
    if let Some(c) = d.change_id.as_deref().filter(|_| area.width >= 120) {
        let lead = format!(" · {} ", strings::CHANGE_ID);
        let room =
            (info_area.width as usize).saturating_sub(info.chars().count() + lead.chars().count());
        if room >= 8 {
            info.push_str(&lead);
            info.push_str(&format::short_change_id(c, room));
        }
    }
    frame.render_widget(Paragraph::new(info), info_area);

    let export = format!(
        "{} {} · {} ",
        strings::EXPORT,
        d.nbd_export_name,
        strings::QCOW2
    );
    let room = (path_area.width as usize).saturating_sub(export.chars().count());
    frame.render_widget(
        Paragraph::new(format!(
            "{export}{}",
            format::truncate_left(&d.qcow2_path, room)
        )),
        path_area,
    );

    let label = format!("{} ", strings::THROUGHPUT);
    let [spark_label, spark] = Layout::horizontal([
        Constraint::Length(label.chars().count() as u16),
        Constraint::Min(0),
    ])
    .areas(spark_area);
    frame.render_widget(
        Paragraph::new(Span::styled(label, theme::dim())),
        spark_label,
    );
    let rates: Vec<u64> = app
        .history
        .get(&(b.backup_id.clone(), d.disk_key))
        .map(|h| {
            let skip = h.rates.len().saturating_sub(spark.width as usize);
            h.rates.iter().skip(skip).copied().collect()
        })
        .unwrap_or_default();
    if rates.is_empty() {
        frame.render_widget(
            Paragraph::new(Span::styled(strings::NONE, theme::dim())),
            spark,
        );
    } else {
        frame.render_widget(
            Sparkline::default().data(&rates).style(theme::busy()),
            spark,
        );
    }

    if let Some(err) = &d.error_message {
        frame.render_widget(
            Paragraph::new(Span::styled(
                format!("{} {}: {err}", strings::SYM_BAD, strings::ERROR),
                theme::bad(),
            ))
            .wrap(Wrap { trim: true }),
            err_area,
        );
    }
}
