//! What is known of a backup point: its integrity (verified, hub-computed, legacy, CORRUPT,
//! unverified) and its consistency (application or crash, and why), as list cells and as the
//! lines of a job's detail. Shared with the VMs view (a VM's last point).

use crate::format;
use crate::strings;
use crate::ui::theme;
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use sendense_shared::api::{Backup, Integrity, JobStatus};

/// Whether the point's integrity is worth showing: a completed point, or one found corrupt
/// (a job still running or failed is not a point yet).
fn has_integrity(b: &Backup) -> bool {
    b.status == JobStatus::Completed || b.integrity == Integrity::Corrupt
}

/// `✔ verified`, `✖ CORRUPT`, … or `—` for a job that is not a point.
pub fn integrity_cell(b: &Backup) -> Span<'static> {
    if !has_integrity(b) {
        return Span::raw(strings::NONE);
    }
    let (sym, word, style) = theme::integrity(b.integrity);
    Span::styled(format!("{sym} {word}"), style)
}

/// `✔ application`, `▲ crash`, or `—` when the writer did not say.
pub fn consistency_cell(b: &Backup) -> Span<'static> {
    match &b.consistency {
        Some(c) => {
            let (sym, word, style) = theme::consistency(c.level);
            Span::styled(format!("{sym} {word}"), style)
        }
        None => Span::raw(strings::NONE),
    }
}

/// The integrity and why, for the selected job's strip and the detail: `None` for a job that
/// is not a point.
pub fn integrity_line(b: &Backup) -> Option<Line<'static>> {
    if !has_integrity(b) {
        return None;
    }
    let (sym, word, style) = theme::integrity(b.integrity);
    let why = match (b.integrity, b.integrity_detail.as_deref()) {
        (_, Some(d)) => Some(d.to_string()),
        (Integrity::HubComputed, None) => Some(strings::HUB_COMPUTED_WHY.to_string()),
        (Integrity::Legacy, None) => Some(strings::LEGACY_WHY.to_string()),
        _ => None,
    };
    let mut spans = vec![
        Span::styled(format!("{} ", strings::INTEGRITY), theme::dim()),
        Span::styled(format!("{sym} {word}"), style),
    ];
    if let Some(at) = b.verified_at {
        spans.push(Span::raw(format!(
            " · {} {}",
            strings::VERIFIED_AT,
            format::clock(at)
        )));
    }
    if let Some(why) = why {
        let style = if b.integrity == Integrity::Corrupt {
            style
        } else {
            Style::default()
        };
        spans.push(Span::styled(format!(": {why}"), style));
    }
    if b.integrity == Integrity::Corrupt {
        spans.push(Span::styled(format!(" · {}", strings::NEXT_FULL), style));
    }
    Some(Line::from(spans))
}

/// `consistency ✔ application: guest file systems frozen (2 file systems) · freeze 38 ms`.
pub fn consistency_line(b: &Backup) -> Option<Line<'static>> {
    let c = b.consistency.as_ref()?;
    let (sym, word, style) = theme::consistency(c.level);
    let mut spans = vec![
        Span::styled(format!("{} ", strings::CONSISTENCY), theme::dim()),
        Span::styled(format!("{sym} {word}"), style),
        Span::raw(format!(": {}", c.reason)),
    ];
    if let Some(ms) = c.freeze_ms {
        spans.push(Span::raw(format!(" · {} {ms} ms", strings::FREEZE)));
    }
    Some(Line::from(spans))
}

/// Rows `lines` take when word-wrapped to `width` (as `Wrap { trim: false }` breaks them: at
/// spaces, a word longer than the width cut), so a block above others is sized to its text.
pub fn wrapped_rows(lines: &[Line], width: u16) -> u16 {
    let width = width.max(1) as usize;
    lines
        .iter()
        .map(|l| {
            let text: String = l.spans.iter().map(|s| s.content.as_ref()).collect();
            let (mut rows, mut col) = (1usize, 0usize);
            for word in text.split(' ') {
                let w = word.chars().count();
                let need = if col == 0 { w } else { col + 1 + w };
                if need <= width {
                    col = need;
                } else if w <= width {
                    rows += 1;
                    col = w;
                } else {
                    // Cut across rows.
                    rows += usize::from(col > 0) + (w - 1) / width;
                    col = (w - 1) % width + 1;
                }
            }
            rows as u16
        })
        .sum()
}
