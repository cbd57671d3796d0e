//! The rules a [`PolicyRequest`] must pass before it is stored; every refusal names its field
//! (`schedule: ...`, `vms.names[1]: ...`). The checks that need the database (repository, VM
//! and node names, a VM named by another policy) are in [`super::Policies`].

use super::schedule::Schedule;
use chrono::Weekday;
use sendense_shared::api::{PolicyRequest, Retention};

/// Longest policy name.
pub const NAME_MAX: usize = 128;

/// Refusal of a field; the message starts with the field's name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Invalid(pub String);

fn bad(field: &str, why: impl std::fmt::Display) -> Invalid {
    Invalid(format!("{field}: {why}"))
}

/// Everything that can be said without the database; answers the parsed schedule.
pub fn check(req: &PolicyRequest) -> Result<Schedule, Invalid> {
    let name = req.name.trim();
    if name.is_empty() || name.len() > NAME_MAX || name.chars().any(char::is_control) {
        return Err(bad(
            "name",
            format!("{:?} must be 1-{NAME_MAX} printable characters", req.name),
        ));
    }
    if name != req.name {
        return Err(bad("name", "no leading or trailing spaces"));
    }
    let schedule =
        Schedule::parse(&req.schedule, &req.timezone).map_err(|e| Invalid(e.to_string()))?;
    let v = &req.vms;
    if v.names.is_empty() && v.patterns.is_empty() && v.nodes.is_empty() {
        return Err(bad(
            "vms",
            "names no VM: give at least one of names, patterns or nodes",
        ));
    }
    for (i, n) in v.names.iter().enumerate() {
        sendense_shared::names::validate_name("vm", n)
            .map_err(|e| bad(&format!("vms.names[{i}]"), e))?;
    }
    for (i, n) in v.nodes.iter().enumerate() {
        sendense_shared::names::validate_name("node", n)
            .map_err(|e| bad(&format!("vms.nodes[{i}]"), e))?;
    }
    for (i, p) in v.patterns.iter().enumerate() {
        glob_check(p).map_err(|why| bad(&format!("vms.patterns[{i}]"), format!("{p:?}: {why}")))?;
    }
    let r = &req.backup_rule;
    if r.full_every_days == Some(0) {
        return Err(bad(
            "backup_rule.full_every_days",
            "must be at least 1 (or absent)",
        ));
    }
    if r.full_every_runs == Some(0) {
        return Err(bad(
            "backup_rule.full_every_runs",
            "must be at least 1 (or absent)",
        ));
    }
    if let Some(d) = &r.weekly_full_on {
        weekday(d)?;
    }
    if req.max_chain_length == Some(0) {
        return Err(bad("max_chain_length", "must be at least 1 (or absent)"));
    }
    if i64::try_from(req.queue_window_secs).is_err() {
        return Err(bad("queue_window_secs", "too large"));
    }
    retention(&req.retention)?;
    if let Some(spec) = &req.boot_check {
        crate::bootcheck::validate(spec)
            .map_err(|e| bad(&format!("boot_check.{}", e.field), e.why))?;
    }
    Ok(schedule)
}

/// `"mon"` … `"sun"` (any case, or the full English name).
pub fn weekday(s: &str) -> Result<Weekday, Invalid> {
    s.trim().parse::<Weekday>().map_err(|_| {
        bad(
            "backup_rule.weekly_full_on",
            format!("{s:?} is not a weekday: one of mon, tue, wed, thu, fri, sat, sun"),
        )
    })
}

/// All rules absent: nothing is pruned (allowed). Rules given, every one 0: every point would
/// go, which no one means: refused.
fn retention(r: &Retention) -> Result<(), Invalid> {
    let given: Vec<u32> = [
        r.keep_last,
        r.keep_hourly,
        r.keep_daily,
        r.keep_weekly,
        r.keep_monthly,
        r.keep_yearly,
    ]
    .into_iter()
    .flatten()
    .collect();
    if !given.is_empty() && given.iter().all(|v| *v == 0) {
        return Err(bad(
            "retention",
            "every keep rule given is 0: it would keep nothing; give one above 0, or no rule \
             at all for no pruning",
        ));
    }
    Ok(())
}

/// A glob over VM names: `*` any run, `?` one character, `[abc]`, `[a-z]`, `[!x]` a class.
pub fn glob_check(p: &str) -> Result<(), &'static str> {
    if p.is_empty() {
        return Err("an empty pattern matches no VM");
    }
    let c: Vec<char> = p.chars().collect();
    let mut i = 0;
    while i < c.len() {
        if c[i] == '[' {
            let end = class_end(&c, i).ok_or("'[' without its ']'")?;
            i = end;
        }
        i += 1;
    }
    Ok(())
}

/// Index of the `]` closing the class opened at `open`.
fn class_end(c: &[char], open: usize) -> Option<usize> {
    let mut j = open + 1;
    if c.get(j) == Some(&'!') {
        j += 1;
    }
    // A `]` right after the opening (or the `!`) is a member, as in shells.
    if c.get(j) == Some(&']') {
        j += 1;
    }
    (j..c.len()).find(|&k| c[k] == ']')
}

/// `name` matches glob `p` (see [`glob_check`]; a malformed pattern matches nothing).
pub fn glob_match(p: &str, name: &str) -> bool {
    let p: Vec<char> = p.chars().collect();
    let n: Vec<char> = name.chars().collect();
    matches(&p, &n)
}

fn matches(p: &[char], n: &[char]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some('*') => (0..=n.len()).any(|k| matches(&p[1..], &n[k..])),
        Some('?') => !n.is_empty() && matches(&p[1..], &n[1..]),
        Some('[') => {
            let Some(end) = class_end(p, 0) else {
                return false;
            };
            let Some(&ch) = n.first() else {
                return false;
            };
            let (negate, body) = match p.get(1) {
                Some('!') => (true, &p[2..end]),
                _ => (false, &p[1..end]),
            };
            let mut hit = false;
            let mut k = 0;
            while k < body.len() {
                if k + 2 < body.len() && body[k + 1] == '-' {
                    hit |= body[k] <= ch && ch <= body[k + 2];
                    k += 3;
                } else {
                    hit |= body[k] == ch;
                    k += 1;
                }
            }
            hit != negate && matches(&p[end + 1..], &n[1..])
        }
        Some(c) => n.first() == Some(c) && matches(&p[1..], &n[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_shells_do() {
        assert!(glob_match("web-*", "web-01"));
        assert!(glob_match("web-*", "web-"));
        assert!(!glob_match("web-*", "db-01"));
        assert!(glob_match("db-??", "db-01"));
        assert!(!glob_match("db-??", "db-1"));
        assert!(glob_match("db-[0-9]", "db-7"));
        assert!(!glob_match("db-[!0-9]", "db-7"));
        assert!(glob_match("db-[!0-9]", "db-x"));
        assert!(glob_match("*", "anything"));
        assert!(glob_check("db-[0-9").is_err());
        assert!(glob_check("").is_err());
    }

    #[test]
    fn weekdays_are_read_in_any_case() {
        assert_eq!(weekday("sun").unwrap(), Weekday::Sun);
        assert_eq!(weekday("Monday").unwrap(), Weekday::Mon);
        let e = weekday("someday").unwrap_err().to_string();
        assert!(e.starts_with("backup_rule.weekly_full_on:"), "{e}");
    }

    #[test]
    fn a_retention_of_zeros_is_refused_and_none_is_no_pruning() {
        assert!(retention(&Retention::default()).is_ok());
        let zeros = Retention {
            keep_daily: Some(0),
            keep_weekly: Some(0),
            ..Default::default()
        };
        assert!(retention(&zeros).unwrap_err().0.starts_with("retention:"));
        let some = Retention {
            keep_daily: Some(0),
            keep_weekly: Some(4),
            ..Default::default()
        };
        assert!(retention(&some).is_ok());
    }
}
