//! What is known of a backup point: its integrity (verified, hub-computed, legacy, CORRUPT,
//! unverified) and its consistency (application or crash, and why), as list cells and as the
//! lines of a job's detail. Shared with the VMs view (a VM's last point).

use crate::format;
use crate::strings;
use crate::ui::theme;
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use sendense_shared::api::{Backup, BootStatus, Integrity, JobStatus};

/// Whether the point's integrity is worth showing: a completed point, or one found corrupt
/// (a job still running or failed is not a point yet).
fn has_integrity(b: &Backup) -> bool {
    b.status == JobStatus::Completed || b.integrity == Integrity::Corrupt
}

/// `✔ verified`, `✖ CORRUPT`, … or `—` for a job that is not a point; a booted point adds its
/// last boot check (`· boot ✔`, `· boot ✖`).
pub fn integrity_cell(b: &Backup) -> Span<'static> {
    if !has_integrity(b) {
        return Span::raw(strings::NONE);
    }
    let (sym, word, style) = theme::integrity(b.integrity);
    match b.boot_check.as_ref().map(|c| boot_look(c.status)) {
        Some((bsym, _, bstyle)) => {
            // One span: a failed boot colours the cell as a failure.
            let style = if bstyle == theme::bad() {
                bstyle
            } else {
                style
            };
            Span::styled(format!("{sym} {word} · {} {bsym}", strings::BOOT), style)
        }
        None => Span::styled(format!("{sym} {word}"), style),
    }
}

/// Symbol, word and style of a boot check's outcome.
fn boot_look(s: BootStatus) -> (&'static str, &'static str, Style) {
    match s {
        BootStatus::BootOk => (strings::SYM_OK, strings::BOOT_OK, theme::good()),
        BootStatus::BootFailed => (strings::SYM_BAD, strings::BOOT_FAILED, theme::bad()),
        BootStatus::Booting => (strings::SYM_WARN, strings::BOOTING, theme::warn()),
        BootStatus::Interrupted => (strings::SYM_WARN, strings::BOOT_INTERRUPTED, theme::warn()),
    }
}

/// `boot ✔ boot ok: the guest agent answered guest-ping after 28.6 s · at 13:05:02`, and for a
/// failed boot the guest's last console lines (at most [`BOOT_TAIL_SHOWN`]).
pub fn boot_lines(b: &Backup) -> Vec<Line<'static>> {
    let Some(c) = &b.boot_check else {
        return Vec::new();
    };
    let (sym, word, style) = boot_look(c.status);
    let mut spans = vec![
        Span::styled(format!("{} ", strings::BOOT), theme::dim()),
        Span::styled(format!("{sym} {word}"), style),
    ];
    if let Some(d) = &c.detail {
        spans.push(Span::raw(format!(": {d}")));
    }
    if let Some(pid) = c.qemu_pid {
        spans.push(Span::raw(format!(" · QEMU pid {pid}")));
    }
    if let Some(at) = c.checked_at {
        spans.push(Span::raw(format!(" · {}", format::clock(at))));
    }
    let mut lines = vec![Line::from(spans)];
    if c.status == BootStatus::BootFailed {
        let skip = c.console_tail.len().saturating_sub(BOOT_TAIL_SHOWN);
        for l in c.console_tail.iter().skip(skip) {
            lines.push(Line::styled(format!("  │ {l}"), theme::dim()));
        }
    }
    lines
}

/// Console lines of a failed boot the detail shows (the API keeps up to 40).
pub const BOOT_TAIL_SHOWN: usize = 8;

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

/// `hardware 512 MiB · 1 vCPU · pc-q35-7.2 · 2 disks (virtio) · 1 NIC · kernel boot`: what the
/// node recorded of a QEMU VM at the point, what an instant recovery starts it with.
pub fn hardware_line(b: &Backup) -> Option<Line<'static>> {
    let h = b.hardware.as_deref()?;
    let mut parts = vec![format!("{} MiB", h.memory_mib), format!("{} vCPU", h.cpus)];
    parts.extend(h.machine.clone());
    let mut buses: Vec<&str> = h.disks.iter().map(|d| d.bus.as_str()).collect();
    buses.dedup();
    parts.push(format!("{} disks ({})", h.disks.len(), buses.join(", ")));
    parts.push(format!("{} NIC", h.nics.len()));
    if h.kernel.is_some() {
        parts.push("kernel boot".into());
    }
    Some(Line::from(vec![
        Span::styled(format!("{} ", strings::HARDWARE), theme::dim()),
        Span::raw(parts.join(" · ")),
    ]))
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

#[cfg(test)]
mod tests {
    use super::*;
    use sendense_shared::api::BootCheck;

    fn text(lines: &[Line]) -> String {
        lines
            .iter()
            .map(|l| {
                l.spans
                    .iter()
                    .map(|s| s.content.as_ref())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A failed boot says so in the list cell and shows the guest's last console lines in the
    /// detail; a point never booted shows nothing of it.
    #[test]
    fn a_failed_boot_shows_its_console_lines() {
        let mut b = crate::fixtures::consistent_point();
        assert!(boot_lines(&b).is_empty());
        b.boot_check = Some(Box::new(BootCheck {
            status: BootStatus::BootFailed,
            verify_id: "v1".into(),
            started_at: b.created_at,
            checked_at: Some(b.created_at),
            detail: Some("QEMU exited (exit status 0) after 25.2 s".into()),
            console_tail: (0..20).map(|i| format!("console {i}")).collect(),
            boot_ms: None,
            qemu_pid: None,
        }));
        assert!(integrity_cell(&b).content.contains("boot ✖"));
        let t = text(&boot_lines(&b));
        assert!(t.contains("BOOT FAILED: QEMU exited"), "{t}");
        assert!(t.contains("console 19") && t.contains("console 12"), "{t}");
        assert!(!t.contains("console 11"), "bounded: {t}");
    }
}
