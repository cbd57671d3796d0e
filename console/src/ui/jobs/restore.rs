//! The detail of a restore: what it reads (the backup point's QCOW2 on the hub, served by a
//! read-only qemu-nbd while the restore holds its port), where it writes (node and path), and
//! the gauge of its one disk.

use super::{disk_gauge, opt_time};
use crate::app::App;
use crate::format;
use crate::strings;
use crate::ui::theme;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Sparkline, Wrap};
use sendense_shared::api::Restore;

pub fn render_detail(app: &App, r: &Restore, frame: &mut Frame, area: Rect) {
    let (sym, style) = theme::job(r.status);
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme::border())
        .title(Line::from(vec![
            Span::styled(
                format!(
                    " {} {} · {} · {} ",
                    strings::JOB,
                    r.restore_id,
                    r.vm_name,
                    strings::RESTORE
                ),
                Style::default().add_modifier(Modifier::BOLD),
            ),
            Span::styled(format!("{sym} {} ", r.status.as_str()), style),
        ]));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let width = inner.width as usize;

    let none = || strings::NONE.to_string();
    let source_lead = format!("{} ", strings::SOURCE);
    let target = format!("{}:{}", r.target.node, r.target.path);
    let target_lead = format!("{} ", strings::TARGET);
    let mut summary = vec![
        Line::from(format!(
            "{} {} · {} {} · {} {}",
            strings::BACKUP,
            r.backup_id,
            strings::CREATED,
            format::clock(r.created_at),
            strings::FINISHED,
            opt_time(r.completed_at),
        )),
        Line::from(vec![
            Span::styled(source_lead.clone(), theme::dim()),
            Span::raw(format::truncate_left(
                &r.source_qcow2,
                width.saturating_sub(source_lead.chars().count()),
            )),
        ]),
        Line::from(vec![
            Span::styled(target_lead.clone(), theme::dim()),
            Span::raw(format::truncate_left(
                &target,
                width.saturating_sub(target_lead.chars().count()),
            )),
        ]),
    ];
    if let Some(err) = &r.error_message {
        summary.push(Line::from(Span::styled(
            format!("{} {}: {err}", strings::SYM_BAD, strings::ERROR),
            theme::bad(),
        )));
    }
    let summary_height = summary.len() as u16 + 1;
    let [top, gauge_area, info_area, spark_area, _] = Layout::vertical([
        Constraint::Length(summary_height),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(0),
    ])
    .areas(inner);
    frame.render_widget(Paragraph::new(summary).wrap(Wrap { trim: true }), top);

    disk_gauge(
        frame,
        gauge_area,
        r.disk_key,
        (sym, style),
        r.status.as_str(),
        (r.bytes_done, r.bytes_total),
    );

    let rate = app.restore_rate(r);
    let eta = rate
        .filter(|v| *v > 0)
        .map(|v| format::duration_secs((r.bytes_total.saturating_sub(r.bytes_done) / v) as i64))
        .unwrap_or_else(none);
    // The export exists only while the restore holds its port.
    let export = match r.nbd_port {
        Some(_) => r.nbd_export_name.clone(),
        None => none(),
    };
    let info = format!(
        "{} {} · {} {} · {} {} · {} {}",
        strings::PORT,
        r.nbd_port.map(|p| p.to_string()).unwrap_or_else(none),
        strings::EXPORT,
        export,
        strings::RATE,
        rate.map(format::rate).unwrap_or_else(none),
        strings::ETA,
        eta
    );
    frame.render_widget(Paragraph::new(info), info_area);

    let lead = format!("{} ", strings::THROUGHPUT);
    let [spark_label, spark] = Layout::horizontal([
        Constraint::Length(lead.chars().count() as u16),
        Constraint::Min(0),
    ])
    .areas(spark_area);
    frame.render_widget(
        Paragraph::new(Span::styled(lead, theme::dim())),
        spark_label,
    );
    let rates: Vec<u64> = app
        .restore_history
        .get(&r.restore_id)
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
}
