//! A policy's schedule: a five-field cron expression read in an IANA time zone.
//!
//! # Crates
//! - `croner` parses the expression and finds the next and previous times in a chrono time
//!   zone. Chosen because it is maintained, follows the Open Cron Pattern Specification and
//!   handles DST explicitly (a time in a spring-forward gap runs once, right after the gap; a
//!   time of an autumn overlap runs once, at its first instance), with tests for both. Default
//!   features off except `chrono` (no serde, no jiff). The `cron` crate wants seven fields
//!   (seconds, years) and leaves DST to the caller.
//! - `chrono-tz` supplies the zones: its pre-generated tables need no build script (features
//!   `std` only).

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// Past this many schedule times a missed stretch is not counted further (a `* * * * *`
/// policy after a month of downtime); the count then says "at least".
pub const COUNT_LIMIT: usize = 100_000;

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
}

/// Why a schedule was refused; each names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error(
        "schedule: {expr:?} is not a five-field cron expression (minute hour day-of-month month \
         day-of-week, e.g. \"0 1 * * *\"): {reason}"
    )]
    Cron { expr: String, reason: String },
    #[error("timezone: {tz:?} is not an IANA time zone (e.g. \"Europe/London\", \"UTC\")")]
    TimeZone { tz: String },
}

/// The zone of a policy, or the error naming `timezone`.
pub fn time_zone(tz: &str) -> Result<Tz, ScheduleError> {
    tz.parse::<Tz>()
        .map_err(|_| ScheduleError::TimeZone { tz: tz.to_string() })
}

impl Schedule {
    pub fn parse(expr: &str, tz: &str) -> Result<Schedule, ScheduleError> {
        let tz = time_zone(tz)?;
        let parser = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build();
        let cron = parser.parse(expr).map_err(|e| ScheduleError::Cron {
            expr: expr.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Schedule { cron, tz })
    }

    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// The first schedule time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The newest schedule time at or before `t`.
    pub fn last_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The schedule times in `(after, until]`: how many (at most [`COUNT_LIMIT`]) and the
    /// newest. `None` when there is none.
    pub fn due(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Option<(usize, DateTime<Utc>)> {
        let newest = self.last_at_or_before(until)?;
        if newest <= after {
            return None;
        }
        let mut count = 0;
        let mut t = after;
        while let Some(n) = self.next_after(t) {
            if n > newest || count >= COUNT_LIMIT {
                break;
            }
            count += 1;
            t = n;
        }
        Some((count.max(1), newest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn one_in_the_morning_in_london_follows_the_clock_change() {
        let s = Schedule::parse("0 1 * * *", "Europe/London").unwrap();
        // Winter: 01:00 GMT is 01:00 UTC.
        assert_eq!(
            s.next_after(at("2026-03-27T12:00:00Z")),
            Some(at("2026-03-28T01:00:00Z"))
        );
        // 29 March 2026: the clocks go from 01:00 GMT to 02:00 BST, so 01:00 does not exist
        // that night; the run is right after the gap (02:00 BST = 01:00 UTC), once.
        assert_eq!(
            s.next_after(at("2026-03-28T01:00:00Z")),
            Some(at("2026-03-29T01:00:00Z"))
        );
        // Summer: 01:00 BST is 00:00 UTC.
        assert_eq!(
            s.next_after(at("2026-03-29T01:00:00Z")),
            Some(at("2026-03-30T00:00:00Z"))
        );
    }

    #[test]
    fn an_hour_that_happens_twice_in_autumn_runs_once() {
        let s = Schedule::parse("30 1 * * *", "Europe/London").unwrap();
        // 25 October 2026: 01:30 happens at 00:30 UTC (BST) and again at 01:30 UTC (GMT).
        assert_eq!(
            s.next_after(at("2026-10-24T12:00:00Z")),
            Some(at("2026-10-25T00:30:00Z"))
        );
        assert_eq!(
            s.next_after(at("2026-10-25T00:30:00Z")),
            Some(at("2026-10-26T01:30:00Z"))
        );
    }

    #[test]
    fn missed_slots_are_counted_and_the_newest_named() {
        let s = Schedule::parse("0 1 * * *", "UTC").unwrap();
        let (n, newest) = s
            .due(at("2026-03-01T01:00:00Z"), at("2026-03-03T05:00:00Z"))
            .unwrap();
        assert_eq!((n, newest), (2, at("2026-03-03T01:00:00Z")));
        assert_eq!(
            s.due(at("2026-03-03T01:00:00Z"), at("2026-03-03T05:00:00Z")),
            None
        );
    }

    #[test]
    fn bad_expressions_and_zones_name_their_field() {
        let e = Schedule::parse("0 25 * * *", "UTC")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("schedule:"), "{e}");
        let e = Schedule::parse("0 1 * *", "UTC").unwrap_err().to_string();
        assert!(e.starts_with("schedule:"), "{e}");
        let e = Schedule::parse("0 0 1 * * *", "UTC")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("schedule:"), "six fields: {e}");
        let e = Schedule::parse("0 1 * * *", "Mars/Olympus")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("timezone:"), "{e}");
    }
}
