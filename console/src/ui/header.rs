//! The two header lines: who the hub is and how it is, or plainly that it does not answer.

use super::theme;
use crate::app::{App, Reach, Stream};
use crate::format;
use crate::strings;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use sendense_shared::api::DatabaseKind;

/// `00:12:03 UTC `
const CLOCK_WIDTH: usize = 13;

pub fn render(app: &App, frame: &mut Frame, area: Rect) {
    // One row each; a row outside `area` (the third, when the hub answers) is empty.
    let row = |i: u16| {
        let r = Rect::new(area.x, area.y.saturating_add(i), area.width, 1);
        r.intersection(area)
    };
    let (top, bottom, third) = (row(0), row(1), row(2));
    let brand = Span::styled(
        format!(" {} ", strings::APP_NAME),
        Style::default().add_modifier(Modifier::REVERSED | Modifier::BOLD),
    );
    let sep = || Span::styled(" │ ", theme::dim());

    let (line1, line2) = match &app.reach {
        Reach::Unreachable {
            retries,
            last_error,
            since,
        } => {
            let l1 = Line::from(vec![
                brand,
                Span::styled(
                    format!(
                        " {} {} {}",
                        strings::SYM_BAD,
                        strings::UNREACHABLE,
                        app.hub_url
                    ),
                    theme::bad(),
                ),
                Span::styled(format!(" · {} {retries}", strings::RETRY), theme::warn()),
                Span::raw(format!(
                    " · {} {}",
                    strings::DOWN_SINCE,
                    format::clock(*since)
                )),
            ]);
            let l2 = Line::from(Span::styled(
                format!(" {}: {last_error}", strings::LAST_ERROR),
                theme::bad(),
            ));
            let contact = app
                .last_contact
                .map(format::clock)
                .unwrap_or_else(|| strings::NEVER.to_string());
            let l3 = Line::from(Span::styled(
                format!(
                    " {} {contact}: {}",
                    strings::LAST_CONTACT,
                    strings::DATA_STALE
                ),
                theme::warn(),
            ));
            frame.render_widget(Paragraph::new(l3), third);
            (l1, l2)
        }
        Reach::Connecting => (
            Line::from(vec![
                brand,
                Span::styled(
                    format!(
                        " {} {} {} …",
                        strings::SYM_BUSY,
                        strings::CONNECTING,
                        app.hub_url
                    ),
                    theme::warn(),
                ),
            ]),
            Line::default(),
        ),
        Reach::Reachable => {
            let mut spans = vec![brand];
            match &app.health {
                Some(h) => {
                    spans.push(Span::raw(format!(
                        " {} {} {} {}",
                        strings::HUB,
                        h.version,
                        strings::PID,
                        h.pid
                    )));
                    spans.push(sep());
                    let healthy = h.status == "healthy";
                    spans.push(Span::styled(
                        format!(
                            "{} {}",
                            if healthy {
                                strings::SYM_OK
                            } else {
                                strings::SYM_WARN
                            },
                            h.status
                        ),
                        if healthy {
                            theme::good()
                        } else {
                            theme::warn()
                        },
                    ));
                    if let Some(db) = &h.database {
                        spans.push(sep());
                        let kind = match db.kind {
                            DatabaseKind::Sqlite => "sqlite",
                            DatabaseKind::Mysql => "mysql",
                        };
                        let (sym, word, style) = if db.ok {
                            (strings::SYM_OK, strings::DB_OK, theme::good())
                        } else {
                            (strings::SYM_BAD, strings::DB_FAILING, theme::bad())
                        };
                        spans.push(Span::raw(format!("{} {kind} ", strings::DB)));
                        spans.push(Span::styled(format!("{sym} {word}"), style));
                    }
                }
                None => spans.push(Span::raw(format!(" {} {}", strings::HUB, app.hub_url))),
            }
            spans.push(sep());
            spans.push(match &app.stream {
                Stream::Up => Span::styled(format!("◉ {}", strings::LIVE), theme::good()),
                Stream::Down { .. } => Span::styled(
                    format!("{} {}", strings::SYM_WARN, strings::POLLING),
                    theme::warn(),
                ),
            });
            // exe path, commit and URL share the line with the clock: the path gives way
            // first (its end, the binary's name, stays), then the URL.
            let room = (area.width as usize).saturating_sub(CLOCK_WIDTH + 1);
            let (exe, commit) = app
                .health
                .as_ref()
                .map(|h| (h.executable.as_str(), h.git_commit.as_str()))
                .unwrap_or((strings::NONE, strings::NONE));
            let fixed = |url: &str| {
                format!(" {}  · {} {commit}", strings::EXE, strings::COMMIT)
                    .chars()
                    .count()
                    + if url.is_empty() {
                        0
                    } else {
                        3 + url.chars().count()
                    }
            };
            let url = if room >= fixed(&app.hub_url) + 16 {
                app.hub_url.as_str()
            } else {
                ""
            };
            let exe = format::truncate_left(exe, room.saturating_sub(fixed(url)));
            let mut parts = vec![
                Span::styled(format!(" {} ", strings::EXE), theme::dim()),
                Span::raw(exe),
                Span::styled(format!(" · {} ", strings::COMMIT), theme::dim()),
                Span::raw(commit.to_string()),
            ];
            if !url.is_empty() {
                parts.push(Span::styled(" · ", theme::dim()));
                parts.push(Span::raw(url.to_string()));
            }
            let l2 = Line::from(parts);
            (Line::from(spans), l2)
        }
    };

    let clock = format!("{} {} ", format::clock(app.now), strings::UTC);
    debug_assert_eq!(clock.chars().count(), CLOCK_WIDTH);
    let [left2, right2] = Layout::horizontal([
        Constraint::Min(0),
        Constraint::Length(clock.chars().count() as u16),
    ])
    .areas(bottom);
    frame.render_widget(Paragraph::new(line1), top);
    frame.render_widget(Paragraph::new(line2), left2);
    frame.render_widget(
        Paragraph::new(Line::from(Span::styled(
            clock,
            Style::default().add_modifier(Modifier::BOLD),
        ))),
        right2,
    );
}
