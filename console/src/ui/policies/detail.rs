//! One policy: its settings (schedule, backup rule, chain limit, retention, VMs, space), its
//! recent runs, and the points of one of its VMs with the rule that keeps each, protection
//! marks, bytes, and what the next prune would do to each.

use super::{run_kind, run_status, space_line};
use crate::app::App;
use crate::app::policies::{action_word, chain_summary, retention_summary, rule_summary};
use crate::format;
use crate::strings;
use crate::ui::jobs::point::wrapped_rows;
use crate::ui::{empty, theme, titled_block};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table, Wrap};
use sendense_shared::api::{KeepReason, Policy, PruneAction, PrunePoint};

/// `daily`, `protected`, … or `—` for a point no rule keeps.
pub(in crate::ui) fn kept_word(k: Option<KeepReason>) -> &'static str {
    match k {
        None => strings::NONE,
        Some(KeepReason::Protected) => strings::PROTECTED,
        Some(KeepReason::Last) => "last",
        Some(KeepReason::Hourly) => "hourly",
        Some(KeepReason::Daily) => "daily",
        Some(KeepReason::Weekly) => "weekly",
        Some(KeepReason::Monthly) => "monthly",
        Some(KeepReason::Yearly) => "yearly",
    }
}

/// What the next prune does to the point: `✔ keep`, `✖ delete`, `▲ merge into child`.
pub(in crate::ui) fn action_cell(p: &PrunePoint) -> Span<'static> {
    match p.action {
        PruneAction::Keep => Span::styled(
            format!("{} {}", strings::SYM_OK, strings::ACTION_KEEP),
            theme::good(),
        ),
        PruneAction::Delete => Span::styled(
            format!("{} {}", strings::SYM_BAD, action_word(p.action)),
            theme::warn(),
        ),
        a => Span::styled(
            format!("{} {}", strings::SYM_WARN, action_word(a)),
            theme::warn(),
        ),
    }
}

fn summary(app: &App, p: &Policy) -> Vec<Line<'static>> {
    let dim = |s: &str| Span::styled(format!("{s} "), theme::dim());
    let mut next = vec![
        dim(strings::SCHEDULE),
        Span::raw(format!("{} ({}) · ", p.schedule, p.timezone)),
        dim(strings::NEXT),
        super::next_run(app, p, true),
        Span::raw(format!(" · {} {}", strings::QUEUED, p.queued)),
    ];
    if p.queued > 0 {
        next[4].style = theme::warn();
    }
    let mut rule = rule_summary(&p.backup_rule);
    if let Some(c) = chain_summary(p) {
        rule.push_str(&format!(" · {c}"));
    }
    let mut lines = vec![
        Line::from(next),
        Line::from(vec![
            dim(strings::RULE),
            Span::raw(format!(
                "{rule} · {} {} · {} {}",
                strings::PRIORITY,
                p.priority,
                strings::QUEUE_WINDOW,
                format::duration_secs(p.queue_window_secs as i64)
            )),
        ]),
        Line::from(vec![
            dim(strings::KEEP),
            match retention_summary(&p.retention) {
                Some(r) => Span::raw(r),
                None => Span::styled(strings::KEEP_NOTHING_PRUNED, theme::warn()),
            },
            Span::raw(" · "),
            dim(strings::VMS_LABEL),
            Span::raw(crate::app::policies::selector_summary(&p.vms)),
        ]),
    ];
    match app.space_of(&p.repository_id) {
        Some(s) => lines.push(space_line(s)),
        None => lines.push(Line::from(vec![
            dim(strings::REPOSITORY),
            Span::raw(p.repository_id.clone()),
        ])),
    }
    lines
}

pub(super) fn render(app: &App, p: &Policy, frame: &mut Frame, area: Rect) {
    let (sym, word, style) = if p.enabled {
        (strings::SYM_OK, strings::ENABLED, theme::good())
    } else {
        (strings::SYM_IDLE, strings::DISABLED, theme::dim())
    };
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme::border())
        .title(Line::from(vec![
            Span::styled(
                format!(" {} {} · ", strings::POLICY, p.name),
                Style::default().add_modifier(Modifier::BOLD),
            ),
            Span::styled(format!("{sym} {word} "), style),
        ]));
    let lines = summary(app, p);
    let summary_height = wrapped_rows(&lines, area.width.saturating_sub(2)) + 2;
    let runs = app.runs_of(&p.id);
    let wide = area.width >= 120;
    let run_rows = runs.len().clamp(1, if area.height >= 40 { 10 } else { 3 }) as u16;
    let [top, runs_area, points_area] = Layout::vertical([
        Constraint::Length(summary_height),
        Constraint::Length(run_rows + 3),
        Constraint::Min(5),
    ])
    .areas(area);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(block),
        top,
    );
    render_runs(runs, wide, frame, runs_area);
    render_points(app, wide, frame, points_area);
}

fn render_runs(
    runs: &[sendense_shared::api::PolicyRun],
    wide: bool,
    frame: &mut Frame,
    area: Rect,
) {
    let block = titled_block(strings::RUNS_TITLE, Some(runs.len()), "");
    if runs.is_empty() {
        empty(frame, area, block, strings::NO_RUNS);
        return;
    }
    let rows = runs.iter().map(|r| {
        let mut cells = vec![
            Cell::from(format::stamp(r.planned_at)),
            Cell::from(r.vm_name.clone()),
            Cell::from(run_kind(r)),
            Cell::from(run_status(r)),
            Cell::from(
                r.backup_id
                    .as_ref()
                    .map(|b| format::short_id(&b.0))
                    .unwrap_or_else(|| strings::NONE.to_string()),
            ),
        ];
        if wide {
            cells.push(Cell::from(
                r.backup_type.map(|t| t.as_str()).unwrap_or(strings::NONE),
            ));
        }
        cells.push(Cell::from(Span::styled(
            r.reason.clone().unwrap_or_default(),
            theme::run(r.status).1,
        )));
        Row::new(cells)
    });
    let mut header = vec![
        strings::COL_PLANNED,
        strings::COL_VM,
        strings::COL_KIND,
        strings::COL_STATUS,
        strings::COL_JOB,
    ];
    let mut widths = vec![
        Constraint::Length(11),
        Constraint::Length(10),
        Constraint::Length(6),
        Constraint::Length(11),
        Constraint::Length(10),
    ];
    if wide {
        header.push(strings::COL_TYPE);
        widths[1] = Constraint::Length(16);
        widths.push(Constraint::Length(11));
    }
    header.push(strings::COL_REASON);
    widths.push(Constraint::Min(10));
    let table = Table::new(rows, widths)
        .header(Row::new(header).style(theme::header()))
        .block(block);
    frame.render_widget(table, area);
}

fn render_points(app: &App, wide: bool, frame: &mut Frame, area: Rect) {
    let Some(vm) = app.detail_vm() else {
        let block = titled_block(strings::POINTS_OF, None, "");
        empty(frame, area, block, strings::NO_POLICY_VMS);
        return;
    };
    let points = app.detail_points();
    let (place, of) = app.detail_vm_place();
    let used: u64 = points.iter().map(|p| p.bytes_used).sum();
    let mut title = format!(
        "{} {vm} ({}/{of} VMs, h/l) · {} {} · {}",
        strings::POINTS_OF,
        place + 1,
        points.len(),
        strings::POINTS,
        format::bytes(used)
    );
    if let Some(j) = app.running_prune(&vm) {
        let (sym, _) = theme::job(j.status);
        title.push_str(&format!(
            " · {sym} {} {} {}/{}",
            strings::PRUNE_RUNNING,
            j.status.as_str(),
            j.steps_done,
            j.steps_total
        ));
    }
    let block = titled_block(&title, None, "");
    if points.is_empty() {
        empty(frame, area, block, strings::NO_POINTS);
        return;
    }
    let rows = points.iter().map(|p| {
        let prot = if p.protected {
            Span::styled(format!("■ {}", strings::YES), theme::key())
        } else {
            Span::raw("")
        };
        let mut cells = vec![
            Cell::from(format::stamp(p.created_at)),
            Cell::from(match p.backup_type {
                sendense_shared::api::BackupType::Full => "full",
                sendense_shared::api::BackupType::Incremental => "incr",
            }),
            Cell::from(prot),
            Cell::from(kept_word(p.kept_by)),
            Cell::from(action_cell(p)),
            Cell::from(format!("{:>10}", format::bytes(p.bytes_used))),
        ];
        if wide {
            cells.push(Cell::from(if p.bytes_freed > 0 {
                format!("{:>10}", format::bytes(p.bytes_freed))
            } else {
                String::new()
            }));
            cells.push(Cell::from(p.backup_id.0.clone()));
        } else {
            cells.push(Cell::from(format::short_id(&p.backup_id.0)));
        }
        Row::new(cells)
    });
    let mut header = vec![
        strings::COL_CREATED,
        strings::COL_TYPE,
        strings::COL_PROTECTED,
        strings::COL_KEPT_BY,
        strings::COL_PRUNE,
        strings::COL_BYTES,
    ];
    let mut widths = vec![
        Constraint::Length(11),
        Constraint::Length(4),
        Constraint::Length(5),
        Constraint::Length(9),
        Constraint::Length(18),
        Constraint::Length(10),
    ];
    if wide {
        header.push(strings::COL_FREES);
        widths.push(Constraint::Length(10));
    }
    header.push(strings::COL_ID);
    widths.push(Constraint::Min(10));
    crate::ui::render_list(
        frame,
        area,
        rows,
        widths,
        header,
        block,
        app.selected_point(),
    );
}
