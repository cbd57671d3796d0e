//! Human units for sizes, rates and durations, shared by the UI and the CLI.

use chrono::{DateTime, Utc};
use sendense_shared::api::{Backup, FileKind, Recovery, RecoveryDisk};

const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

/// `1.5 GiB`, `512 B`: binary units, one decimal from KiB up.
pub fn bytes(n: u64) -> String {
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `85.3 MiB/s`.
pub fn rate(bytes_per_sec: u64) -> String {
    format!("{}/s", bytes(bytes_per_sec))
}

/// `4s`, `3m07s`, `2h05m`, `3d04h`.
pub fn duration_secs(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Age of `then` at `now`, e.g. `3m07s ago`-style without the suffix.
pub fn age(then: DateTime<Utc>, now: DateTime<Utc>) -> String {
    duration_secs((now - then).num_seconds())
}

/// `00:12:03` (UTC).
pub fn clock(t: DateTime<Utc>) -> String {
    t.format("%H:%M:%S").to_string()
}

/// `11-27 00:12` (UTC), for timestamps that may be days old.
pub fn stamp(t: DateTime<Utc>) -> String {
    t.format("%m-%d %H:%M").to_string()
}

/// Percentage done, 0-100, of `done` out of `total` (0 when the total is unknown).
pub fn percent(done: u64, total: u64) -> u16 {
    if total == 0 {
        return 0;
    }
    ((done.min(total) as f64 / total as f64) * 100.0).floor() as u16
}

/// How far a job got through its disks: the sum of the disks' bytes done (skipped areas
/// included), which reaches the total at the end. The job's `bytes_transferred` is what the
/// node really wrote, a few MiB for an incremental of a large disk: right to show as bytes,
/// wrong as progress.
pub fn done_bytes(b: &Backup) -> u64 {
    if b.disk_results.is_empty() {
        return b.bytes_transferred;
    }
    b.disk_results.iter().map(|d| d.bytes_done).sum()
}

/// `drwxr-x---`: a guest file's kind and permission bits, as `ls -l` writes them.
pub fn file_mode(kind: FileKind, mode: u32) -> String {
    let mut perms = String::new();
    perms.push(kind.letter());
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        perms.push(if bits & 4 != 0 { 'r' } else { '-' });
        perms.push(if bits & 2 != 0 { 'w' } else { '-' });
        perms.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    perms
}

/// `2026-12-01 10:00` (UTC) of a guest file's mtime, seconds since the epoch.
pub fn mtime(secs: i64) -> String {
    DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| secs.to_string())
}

/// Bytes home and bytes in all of an instant recovery's disks.
pub fn recovery_home(r: &Recovery) -> (u64, u64) {
    r.disks.iter().fold((0, 0), |(d, t), disk| {
        (d + disk.bytes_done, t + disk.bytes_total)
    })
}

/// Seconds one disk's stream still needs at its rate, while it streams.
pub fn stream_eta(d: &RecoveryDisk) -> Option<i64> {
    (d.rate_bps > 0 && d.bytes_done < d.bytes_total)
        .then(|| (d.bytes_total.saturating_sub(d.bytes_done) / d.rate_bps) as i64)
}

/// From the request to a running guest (`vm_started_at - created_at`): `4.2s`, `1m05s`.
pub fn time_to_vm(r: &Recovery) -> Option<String> {
    let started = r.vm_started_at?;
    let ms = (started - r.created_at).num_milliseconds().max(0);
    Some(if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        duration_secs(ms / 1000)
    })
}

/// A change id (vSphere CBT, e.g. `52 3f 9a … 6f 10/4`) in at most `max` characters: the
/// start, which names the disk's tracking epoch, and the sequence number after the last `/`,
/// which is what moves from one backup to the next.
pub fn short_change_id(id: &str, max: usize) -> String {
    let count = id.chars().count();
    if count <= max {
        return id.to_string();
    }
    let tail = id.rfind('/').map(|i| &id[i..]).unwrap_or("");
    let tail_len = tail.chars().count();
    if tail_len + 2 > max {
        return truncate(id, max);
    }
    let mut out: String = id.chars().take(max - 1 - tail_len).collect();
    out.push('…');
    out.push_str(tail);
    out
}

/// Cut `s` to at most `max` characters, marking the cut with `…`.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    if max == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// A job id short enough for a table column: ids up to 10 characters stay whole, longer ones
/// (the hub's UUIDs) keep their first 8 characters, like a short git hash. Filters still match
/// the whole id, and the detail and confirmations show it in full.
pub fn short_id(id: &str) -> String {
    if id.chars().count() <= 10 {
        return id.to_string();
    }
    let mut out: String = id.chars().take(8).collect();
    out.push('…');
    out
}

/// Keep the end of `s` (paths: the file name matters most), marking the cut with `…`.
pub fn truncate_left(s: &str, max: usize) -> String {
    let count = s.chars().count();
    if count <= max {
        return s.to_string();
    }
    if max == 0 {
        return String::new();
    }
    let mut out = String::from("…");
    out.extend(s.chars().skip(count - (max - 1)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_pick_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(16 * 1024 * 1024 * 1024), "16.0 GiB");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_secs(4), "4s");
        assert_eq!(duration_secs(187), "3m07s");
        assert_eq!(duration_secs(7500), "2h05m");
        assert_eq!(duration_secs(-5), "0s");
    }

    #[test]
    fn percent_handles_unknown_total_and_overshoot() {
        assert_eq!(percent(5, 0), 0);
        assert_eq!(percent(50, 100), 50);
        assert_eq!(percent(150, 100), 100);
    }

    #[test]
    fn short_ids_keep_a_prefix() {
        assert_eq!(short_id("b-7f3a9c21"), "b-7f3a9c21");
        assert_eq!(
            short_id("6271dd38-33d7-4ee0-883c-985223027b87"),
            "6271dd38…"
        );
    }

    #[test]
    fn change_ids_keep_their_start_and_sequence() {
        let id = "52 3f 9a 11 00 7e 4c 02-a1 9b 2c 77 0e 5d 6f 10/4";
        assert_eq!(short_change_id(id, 60), id);
        assert_eq!(short_change_id(id, 16), "52 3f 9a 11 0…/4");
        assert_eq!(short_change_id(id, 16).chars().count(), 16);
        assert_eq!(short_change_id("abcdefgh", 4), "abc…");
        assert_eq!(short_change_id("ab/123456", 4), "ab/…");
    }

    #[test]
    fn truncation_marks_the_cut() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
        assert_eq!(truncate_left("/var/lib/x.qcow2", 8), "…x.qcow2");
    }
}
