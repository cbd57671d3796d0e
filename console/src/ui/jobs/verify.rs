//! Running verify jobs, above the Jobs list: one line each with its scope, points and bytes
//! read so far, and the points it found corrupt.

use crate::app::App;
use crate::format;
use crate::strings;
use crate::ui::{theme, titled_block};
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Wrap};
use sendense_shared::api::VerifyJob;

/// At most this many verify jobs are listed (the Jobs list keeps the room).
const MAX_SHOWN: usize = 3;

fn lines(app: &App) -> Vec<Line<'static>> {
    app.running_verifies()
        .into_iter()
        .take(MAX_SHOWN)
        .map(line)
        .collect()
}

/// Rows the strip needs at `width` (0 without a running verify job): its wrapped lines and the
/// borders.
pub fn height(app: &App, width: u16) -> u16 {
    let lines = lines(app);
    if lines.is_empty() {
        return 0;
    }
    super::point::wrapped_rows(&lines, width.saturating_sub(2)) + 2
}

fn line(v: &VerifyJob) -> Line<'static> {
    let (sym, style) = theme::job(v.status);
    let mut spans = vec![
        Span::styled(format!("{sym} {} ", v.status.as_str()), style),
        Span::raw(format!(
            "{} {} · {} {}/{} · {} {}/{} ({}%) · ",
            format::short_id(&v.verify_id),
            v.scope,
            strings::POINTS,
            v.points_done,
            v.points_total,
            strings::READ,
            format::bytes(v.bytes_read),
            format::bytes(v.bytes_total),
            format::percent(v.bytes_read, v.bytes_total),
        )),
    ];
    if v.corrupt.is_empty() {
        spans.push(Span::styled(strings::NONE_CORRUPT, theme::good()));
    } else {
        let ids: Vec<String> = v.corrupt.iter().map(|b| format::short_id(&b.0)).collect();
        spans.push(Span::styled(
            format!(
                "{} {} {}: {}",
                strings::SYM_BAD,
                v.corrupt.len(),
                strings::FOUND_CORRUPT,
                ids.join(", ")
            ),
            theme::bad(),
        ));
    }
    Line::from(spans)
}

pub fn render(app: &App, frame: &mut Frame, area: Rect) {
    let list = app.running_verifies();
    let block = titled_block(strings::VERIFY_JOBS, Some(list.len()), "");
    frame.render_widget(
        Paragraph::new(lines(app))
            .wrap(Wrap { trim: false })
            .block(block),
        area,
    );
}
