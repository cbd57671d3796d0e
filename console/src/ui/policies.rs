//! Policies: the list (schedule with its time zone, VMs, next run, last run and how it ended,
//! queue length), a strip with the selected policy in full and its repository's space and
//! forecast; the detail of one policy (`detail`); the prune preview dialog (`prune`).

mod detail;
pub(super) mod prune;

use super::{empty, empty_text, theme, titled_block};
use crate::app::{App, View};
use crate::format;
use crate::strings;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Row};
use sendense_shared::api::{Policy, PolicyRun, RepositorySpace};

pub fn render(app: &App, frame: &mut Frame, area: Rect) {
    match app.detail_policy() {
        Some(p) => detail::render(app, p, frame, area),
        None => render_list(app, frame, area),
    }
}

/// `✔ completed`, `▲ gave_up`, … of a run.
pub(super) fn run_status(run: &PolicyRun) -> Span<'static> {
    let (sym, style) = theme::run(run.status);
    Span::styled(format!("{sym} {}", run.status.as_str()), style)
}

/// `sched`, `late`, `manual`.
pub(super) fn run_kind(run: &PolicyRun) -> &'static str {
    if run.manual {
        strings::KIND_MANUAL
    } else if run.late {
        strings::KIND_LATE
    } else {
        strings::KIND_SCHEDULED
    }
}

/// `11-28 01:00 (in 12h47m)`, or `○ disabled`.
fn next_run(app: &App, p: &Policy, long: bool) -> Span<'static> {
    if !p.enabled {
        return Span::styled(
            format!("{} {}", strings::SYM_IDLE, strings::DISABLED),
            theme::dim(),
        );
    }
    match p.next_run {
        Some(t) if long => Span::raw(format!(
            "{} (in {})",
            format::stamp(t),
            format::age(app.now, t)
        )),
        Some(t) => Span::raw(format::stamp(t)),
        None => Span::raw(strings::NONE),
    }
}

/// `repo-a: 500.0 GiB free of 1.0 TiB · +3.2 GiB/day · full in 156 days`.
pub(super) fn space_line(space: &RepositorySpace) -> Line<'static> {
    let growth = space.growth_bytes_per_day;
    let mut spans = vec![
        Span::styled(format!("{} ", strings::SPACE), theme::dim()),
        Span::raw(format!(
            "{}: {} {} {}",
            space.repository_id,
            format::bytes(space.free_bytes),
            strings::FREE_OF,
            format::bytes(space.total_bytes)
        )),
    ];
    if growth > 0.0 {
        spans.push(Span::raw(format!(
            " · +{}{}",
            format::bytes(growth as u64),
            strings::PER_DAY
        )));
    } else {
        spans.push(Span::raw(format!(" · {}", strings::NOT_GROWING)));
    }
    if let Some(days) = space.full_in_days {
        // Within a month is a warning; within a week, loud.
        let style = if days < 7.0 {
            theme::bad()
        } else if days < 30.0 {
            theme::warn()
        } else {
            ratatui::style::Style::default()
        };
        spans.push(Span::styled(
            format!(" · {}", strings::full_in_days(days)),
            style,
        ));
    }
    Line::from(spans)
}

/// The last run in a line: `last ✔ completed · pgtest1 · planned 11-27 01:00 · late · b-91d4…`.
fn last_run_line(run: Option<&PolicyRun>) -> Line<'static> {
    let mut spans = vec![Span::styled(format!("{} ", strings::LAST), theme::dim())];
    let Some(r) = run else {
        spans.push(Span::raw(strings::NONE));
        return Line::from(spans);
    };
    spans.push(run_status(r));
    spans.push(Span::raw(format!(
        " · {} · {} {} · {}",
        r.vm_name,
        strings::COL_PLANNED.to_lowercase(),
        format::stamp(r.planned_at),
        run_kind(r)
    )));
    if let Some(b) = &r.backup_id {
        spans.push(Span::raw(format!(" · {}", format::short_id(&b.0))));
    }
    if let Some(why) = &r.reason {
        spans.push(Span::styled(format!(" · {why}"), theme::run(r.status).1));
    }
    Line::from(spans)
}

fn render_list(app: &App, frame: &mut Frame, area: Rect) {
    let list = app.visible_policies();
    let block = titled_block(
        strings::VIEW_POLICIES,
        Some(list.len()),
        app.filter(View::Policies),
    );
    if list.is_empty() {
        empty(
            frame,
            area,
            block,
            empty_text(app, View::Policies, strings::NO_POLICIES),
        );
        return;
    }
    let selected = app.selected(View::Policies);
    let p = list[selected];
    let wide = area.width >= 120;

    let mut strip = vec![
        Line::from(vec![
            Span::styled(format!("{} ", strings::SCHEDULE), theme::dim()),
            Span::raw(format!("{} ({}) · ", p.schedule, p.timezone)),
            Span::styled(format!("{} ", strings::NEXT), theme::dim()),
            next_run(app, p, true),
            Span::raw(format!(" · {} {}", strings::QUEUED, p.queued)),
        ]),
        Line::from(vec![
            Span::styled(format!("{} ", strings::VMS_LABEL), theme::dim()),
            Span::raw(app.policy_vms(p).join(", ")),
        ]),
        last_run_line(p.last_run.as_ref()),
    ];
    // The space of the repositories the listed policies write to.
    let mut repos: Vec<&str> = list.iter().map(|p| p.repository_id.as_str()).collect();
    repos.sort_unstable();
    repos.dedup();
    strip.extend(
        repos
            .iter()
            .filter_map(|r| app.space_of(r))
            .take(if wide { 4 } else { 2 })
            .map(space_line),
    );
    let strip_height = super::jobs::point::wrapped_rows(&strip, area.width) + 1;
    let [table_area, strip_area] =
        Layout::vertical([Constraint::Min(5), Constraint::Length(strip_height)]).areas(area);

    let mut header = vec![
        strings::COL_NAME,
        strings::COL_SCHEDULE,
        strings::COL_VMS,
        strings::COL_NEXT,
        strings::COL_LAST_RUN,
        strings::COL_QUEUED,
    ];
    let mut widths = vec![
        Constraint::Length(14),
        Constraint::Length(13),
        Constraint::Min(10),
        Constraint::Length(11),
        Constraint::Length(12),
        Constraint::Length(2),
    ];
    if wide {
        header[5] = strings::COL_QUEUED_WIDE;
        header.extend([strings::COL_PRIORITY, strings::COL_REPOSITORY]);
        widths = vec![
            Constraint::Length(18),
            Constraint::Length(28),
            Constraint::Min(20),
            Constraint::Length(24),
            Constraint::Length(30),
            Constraint::Length(6),
            Constraint::Length(4),
            Constraint::Length(12),
        ];
    }
    let rows = list.iter().map(|p| {
        let schedule = if wide {
            format!("{} {}", p.schedule, p.timezone)
        } else {
            p.schedule.clone()
        };
        let last = match &p.last_run {
            Some(r) if wide => Line::from(vec![
                run_status(r),
                Span::raw(format!(" {} {}", r.vm_name, format::stamp(r.planned_at))),
            ]),
            Some(r) => Line::from(run_status(r)),
            None => Line::from(strings::NONE),
        };
        let queued = if p.queued > 0 {
            Span::styled(format!("{:>2}", p.queued), theme::warn())
        } else {
            Span::raw(format!("{:>2}", p.queued))
        };
        let mut cells = vec![
            Cell::from(p.name.clone()),
            Cell::from(schedule),
            Cell::from(crate::app::policies::selector_summary(&p.vms)),
            Cell::from(next_run(app, p, wide)),
            Cell::from(last),
            Cell::from(queued),
        ];
        if wide {
            cells.push(Cell::from(format!("{:>4}", p.priority)));
            cells.push(Cell::from(p.repository_id.clone()));
        }
        Row::new(cells)
    });
    super::render_list(frame, table_area, rows, widths, header, block, selected);
    super::detail_strip(frame, strip_area, strip, true);
}
