//! Which backup type a policy's run asks for ([`BackupRule`] and `max_chain_length`), from the
//! VM's completed points. Days and weekdays are read in the policy's time zone, by calendar
//! date: a full taken at 01:00:03 and the run planned seven days later at 01:00:00 are seven
//! days apart.
//!
//! The job system may still turn an incremental into a full (no usable base, a corrupt chain,
//! the node's refusal); it says so in the job's events.

use crate::db::PointSummary;
use chrono::{DateTime, Datelike, Utc};
use chrono_tz::Tz;
use sendense_shared::api::{BackupType, ChainLimit, Policy};

/// The type to request and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub backup_type: BackupType,
    pub why: String,
}

fn full(why: String) -> Choice {
    Choice {
        backup_type: BackupType::Full,
        why,
    }
}

/// `points`: the VM's completed points, newest first (enough of them to reach its newest full,
/// or the whole chain limit).
pub fn choose(
    policy: &Policy,
    tz: Tz,
    planned_at: DateTime<Utc>,
    points: &[PointSummary],
) -> Choice {
    let Some(newest_full) = points
        .iter()
        .position(|p| p.backup_type == BackupType::Full)
    else {
        return full(if points.is_empty() {
            "the VM has no completed backup".into()
        } else {
            "the VM's points hold no full backup".into()
        });
    };
    let incrementals = newest_full;
    let full_at = points[newest_full]
        .created_at
        .with_timezone(&tz)
        .date_naive();
    let planned = planned_at.with_timezone(&tz);
    let rule = &policy.backup_rule;
    if let Some(d) = rule.full_every_days {
        let age = (planned.date_naive() - full_at).num_days();
        if age >= i64::from(d) {
            return full(format!(
                "the newest full is {age} day(s) old (full_every_days = {d})"
            ));
        }
    }
    if let Some(n) = rule.full_every_runs
        && incrementals >= n as usize
    {
        return full(format!(
            "{incrementals} incremental(s) since the newest full (full_every_runs = {n})"
        ));
    }
    if let Some(day) = &rule.weekly_full_on
        && let Ok(wd) = super::validate::weekday(day)
        && planned.weekday() == wd
        && full_at != planned.date_naive()
    {
        return full(format!("weekly full on {wd} (weekly_full_on)"));
    }
    if let Some(max) = policy.max_chain_length
        && policy.chain_limit == ChainLimit::Full
        && incrementals + 2 > max as usize
    {
        return full(format!(
            "the chain holds {} point(s); one more would exceed max_chain_length = {max}",
            incrementals + 1
        ));
    }
    Choice {
        backup_type: BackupType::Incremental,
        why: format!("{incrementals} incremental(s) on the newest full"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sendense_shared::api::{BackupRule, Retention, VmSelector};

    fn policy(rule: BackupRule, max: Option<u32>) -> Policy {
        Policy {
            id: "p".into(),
            name: "p".into(),
            vms: VmSelector::default(),
            repository_id: "default".into(),
            schedule: "0 1 * * *".into(),
            timezone: "Europe/London".into(),
            backup_rule: rule,
            retention: Retention::default(),
            max_chain_length: max,
            chain_limit: ChainLimit::Full,
            enabled: true,
            priority: 0,
            queue_window_secs: 60,
            boot_check: None,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            next_run: None,
            last_run: None,
            queued: 0,
        }
    }

    fn pt(kind: BackupType, at: &str) -> PointSummary {
        PointSummary {
            backup_type: kind,
            created_at: at.parse().unwrap(),
        }
    }

    #[test]
    fn days_count_by_calendar_date_in_the_zone() {
        let p = policy(
            BackupRule {
                full_every_days: Some(7),
                ..Default::default()
            },
            None,
        );
        let pts = [pt(BackupType::Full, "2026-06-01T00:00:03Z")];
        let tz: Tz = "Europe/London".parse().unwrap();
        let c = choose(&p, tz, "2026-06-08T00:00:00Z".parse().unwrap(), &pts);
        assert_eq!(c.backup_type, BackupType::Full, "{c:?}");
        let c = choose(&p, tz, "2026-06-07T00:00:00Z".parse().unwrap(), &pts);
        assert_eq!(c.backup_type, BackupType::Incremental, "{c:?}");
    }

    #[test]
    fn a_chain_at_its_limit_gets_a_full() {
        let p = policy(BackupRule::default(), Some(3));
        let tz = Tz::UTC;
        let t = "2026-06-10T01:00:00Z".parse().unwrap();
        let two = [
            pt(BackupType::Incremental, "2026-06-09T01:00:00Z"),
            pt(BackupType::Full, "2026-06-08T01:00:00Z"),
        ];
        assert_eq!(choose(&p, tz, t, &two).backup_type, BackupType::Incremental);
        let three = [
            pt(BackupType::Incremental, "2026-06-09T01:00:00Z"),
            pt(BackupType::Incremental, "2026-06-08T01:00:00Z"),
            pt(BackupType::Full, "2026-06-07T01:00:00Z"),
        ];
        assert_eq!(choose(&p, tz, t, &three).backup_type, BackupType::Full);
        assert_eq!(choose(&p, tz, t, &[]).backup_type, BackupType::Full);
    }
}
