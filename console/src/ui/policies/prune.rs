//! The prune preview: the hub's dry run of a prune of one VM, every point with the rule that
//! keeps it or what removing it takes (delete, merge into its child, rebase its child) and the
//! bytes that frees; `y` starts that prune. When the points do not all fit, the removed ones
//! are listed first (they are what the operator confirms).

use super::detail::{action_cell, kept_word};
use crate::app::policies::retention_summary;
use crate::format;
use crate::strings;
use crate::ui::{popup, theme};
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Clear, Paragraph};
use sendense_shared::api::{BackupType, PruneAction, PrunePlan, PrunePoint};

fn point_line(p: &PrunePoint) -> Line<'static> {
    let kind = match p.backup_type {
        BackupType::Full => "full",
        BackupType::Incremental => "incr",
    };
    let prot = if p.protected { "■" } else { " " };
    let what = if p.action == PruneAction::Keep {
        Span::styled(
            format!(
                "{} {:<16}",
                strings::SYM_OK,
                format!("{} {}", strings::ACTION_KEEP, kept_word(p.kept_by))
            ),
            theme::good(),
        )
    } else {
        let c = action_cell(p);
        Span::styled(format!("{:<18}", c.content), c.style)
    };
    let frees = if p.bytes_freed > 0 {
        format::bytes(p.bytes_freed)
    } else {
        String::new()
    };
    Line::from(vec![
        Span::raw(format!(
            "{} {:<4} {prot} ",
            format::stamp(p.created_at),
            kind
        )),
        what,
        Span::raw(format!(
            " {:>10} {:>10}  {}",
            format::bytes(p.bytes_used),
            frees,
            format::short_id(&p.backup_id.0)
        )),
    ])
}

pub fn render(plan: &PrunePlan, frame: &mut Frame, area: Rect) {
    let removed = plan
        .points
        .iter()
        .filter(|p| p.action != PruneAction::Keep)
        .count();
    let kept = plan.points.len() - removed;
    let mut lines = vec![
        Line::from(vec![
            Span::styled(format!("{} ", strings::COL_VM), theme::dim()),
            Span::styled(
                plan.vm_name.clone(),
                Style::default().add_modifier(Modifier::BOLD),
            ),
            Span::styled(format!(" · {} ", strings::KEEP), theme::dim()),
            Span::raw(
                retention_summary(&plan.retention)
                    .unwrap_or_else(|| strings::KEEP_NOTHING_PRUNED.to_string()),
            ),
        ]),
        Line::from(Span::styled(
            strings::prune_summary(kept, removed, &format::bytes(plan.bytes_freed)),
            Style::default().add_modifier(Modifier::BOLD),
        )),
        Line::from(Span::styled(
            format!(
                "{:<11} {:<4} {} {:<18} {:>10} {:>10}  {}",
                strings::COL_CREATED,
                strings::COL_TYPE,
                "P",
                strings::COL_KEPT_BY,
                strings::COL_BYTES,
                strings::COL_FREES,
                strings::COL_ID
            ),
            theme::header(),
        )),
    ];
    // Room for the points: the screen less the frame, the lines above, a "more" line, a blank
    // line and the hint.
    let room = (area.height as usize)
        .saturating_sub(2 + lines.len() + 3)
        .max(1);
    let points: Vec<&PrunePoint> = if plan.points.len() <= room {
        plan.points.iter().collect()
    } else {
        let (gone, kept): (Vec<&PrunePoint>, Vec<&PrunePoint>) = plan
            .points
            .iter()
            .partition(|p| p.action != PruneAction::Keep);
        gone.into_iter().chain(kept).take(room).collect()
    };
    let hidden = plan.points.len() - points.len();
    lines.extend(points.into_iter().map(point_line));
    if hidden > 0 {
        lines.push(Line::from(Span::styled(
            format!("… {hidden} {}", strings::PRUNE_MORE),
            theme::dim(),
        )));
    }
    if removed == 0 {
        lines.push(Line::from(strings::PRUNE_NOTHING));
    }
    lines.push(Line::default());
    lines.push(Line::from(Span::styled(
        if removed == 0 {
            strings::PRUNE_NOTHING_HINT
        } else {
            strings::PRUNE_HINT
        },
        theme::key(),
    )));
    let rect = popup::centred(area, 78, lines.len() as u16 + 2);
    frame.render_widget(Clear, rect);
    let title = format!(
        "{} · {} ({})",
        strings::PRUNE_TITLE,
        plan.vm_name,
        strings::PRUNE_DRY_RUN
    );
    frame.render_widget(
        Paragraph::new(lines).block(popup::frame_block(&title).border_style(theme::warn())),
        rect,
    );
}
