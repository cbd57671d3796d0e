//! Retention: which backup points keep-rules keep, exactly as Proxmox Backup Server computes it
//! (`pbs-datastore/src/prune.rs`, `compute_prune_info` and `mark_selections`).
//!
//! The rules run in a fixed order — keep-last, keep-hourly, keep-daily, keep-weekly (ISO
//! weeks, `%G/%V`), keep-monthly, keep-yearly — over the points sorted newest first. Each rule
//! with a count `n`:
//! - skips the points an earlier rule already marked (kept *or* removed);
//! - does not count a period (hour, day, ISO week, month, year in the given time zone) that
//!   already holds a point an earlier rule kept;
//! - keeps the newest unmarked point of each new period and marks the other unmarked points of
//!   that period removed (so a later, coarser rule does not see them either), until `n`
//!   periods are kept; it stops at the first point of the `n+1`-th period, leaving the rest
//!   unmarked for the next rule.
//!
//! Periods without a point are not counted (a daily rule of 7 keeps the newest point of the 7
//! newest days that hold one, however far apart). Points no rule keeps are removed; a rule
//! whose count is 0 or absent is not used, and when no rule is used no rule keeps anything
//! (`kept_by` absent): a prune refuses such a retention, as PBS does, and the points listing
//! shows the points without a rule.
//!
//! A protected point is kept ([`KeepReason::Protected`]) and takes no part in the counts: a
//! rule that meets it marks it protected and goes on, as PBS does.
//!
//! Which points are points: only `completed` backups. Failed and cancelled jobs are not
//! points at all (their images are deleted when they end). A `corrupt` point (a verify job
//! found it differing from its checksums, or it depends on one that does) is not counted
//! either: it cannot stand for its period, since a restore of it is refused. It is removed by
//! a prune unless it is protected ([`Candidate::countable`] = false); that is the only way
//! such a point goes, and keeping it would make a rule skip a good point.
//!
//! Periods are computed in a time zone given as any [`chrono::TimeZone`] (the policy's
//! `chrono_tz::Tz`, a `FixedOffset`, or `Utc`).

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use sendense_shared::api::{KeepReason, Retention};
use std::collections::HashSet;

/// One point as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<K> {
    /// The caller's key (a backup id).
    pub key: K,
    /// The point's instant.
    pub at: DateTime<Utc>,
    pub protected: bool,
    /// `false` for a corrupt point: never kept by a rule, removed unless protected.
    pub countable: bool,
}

/// The verdict on one point: the first rule that keeps it, or `None` (removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict<K> {
    pub key: K,
    pub at: DateTime<Utc>,
    pub kept_by: Option<KeepReason>,
}

/// Whether any rule is used (otherwise nothing is pruned).
pub fn keeps_something(r: &Retention) -> bool {
    rules(r).iter().any(|(_, n)| *n > 0)
}

fn rules(r: &Retention) -> [(KeepReason, u32); 6] {
    [
        (KeepReason::Last, r.keep_last.unwrap_or(0)),
        (KeepReason::Hourly, r.keep_hourly.unwrap_or(0)),
        (KeepReason::Daily, r.keep_daily.unwrap_or(0)),
        (KeepReason::Weekly, r.keep_weekly.unwrap_or(0)),
        (KeepReason::Monthly, r.keep_monthly.unwrap_or(0)),
        (KeepReason::Yearly, r.keep_yearly.unwrap_or(0)),
    ]
}

/// The period a point falls in for `rule`, in `tz` (keep-last: the instant itself, so every
/// point is its own period).
pub fn period<Tz: TimeZone>(rule: KeepReason, at: DateTime<Utc>, tz: &Tz) -> (i64, i64) {
    let l = at.with_timezone(tz);
    let (y, m, d, h) = (
        i64::from(l.year()),
        i64::from(l.month()),
        i64::from(l.day()),
        i64::from(l.hour()),
    );
    match rule {
        KeepReason::Last | KeepReason::Protected => (at.timestamp_micros(), 0),
        KeepReason::Hourly => (y * 10_000 + m * 100 + d, h),
        KeepReason::Daily => (y * 10_000 + m * 100 + d, 0),
        KeepReason::Weekly => {
            let w = l.iso_week();
            (i64::from(w.year()), i64::from(w.week()))
        }
        KeepReason::Monthly => (y, m),
        KeepReason::Yearly => (y, 0),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    Keep(KeepReason),
    Remove,
}

/// Applies `retention` to `points` in time zone `tz`; answers a verdict per point, newest
/// first (ties: the order given).
pub fn apply<K: Clone, Tz: TimeZone>(
    points: &[Candidate<K>],
    retention: &Retention,
    tz: &Tz,
) -> Vec<Verdict<K>> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| points[b].at.cmp(&points[a].at));
    let mut mark: Vec<Option<Mark>> = vec![None; points.len()];
    let used = keeps_something(retention);
    if used {
        for (rule, keep) in rules(retention) {
            if keep > 0 {
                select(points, &order, &mut mark, rule, keep as usize, tz);
            }
        }
    }
    order
        .into_iter()
        .map(|i| {
            let p = &points[i];
            let kept_by = if p.protected {
                Some(KeepReason::Protected)
            } else {
                match mark[i] {
                    Some(Mark::Keep(r)) => Some(r),
                    _ => None,
                }
            };
            Verdict {
                key: p.key.clone(),
                at: p.at,
                kept_by,
            }
        })
        .collect()
}

/// PBS's `mark_selections` for one rule.
fn select<K, Tz: TimeZone>(
    points: &[Candidate<K>],
    order: &[usize],
    mark: &mut [Option<Mark>],
    rule: KeepReason,
    keep: usize,
    tz: &Tz,
) {
    let already: HashSet<(i64, i64)> = order
        .iter()
        .filter(|&&i| matches!(mark[i], Some(Mark::Keep(_))))
        .map(|&i| period(rule, points[i].at, tz))
        .collect();
    let mut included: HashSet<(i64, i64)> = HashSet::new();
    for &i in order {
        let p = &points[i];
        if mark[i].is_some() || p.protected {
            // Protected points are kept whatever happens and count for nothing.
            continue;
        }
        if !p.countable {
            mark[i] = Some(Mark::Remove);
            continue;
        }
        let id = period(rule, p.at, tz);
        if already.contains(&id) {
            continue;
        }
        if !included.contains(&id) {
            if included.len() >= keep {
                break;
            }
            included.insert(id);
            mark[i] = Some(Mark::Keep(rule));
        } else {
            mark[i] = Some(Mark::Remove);
        }
    }
}

#[cfg(test)]
mod tests;
