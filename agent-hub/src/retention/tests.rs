//! Hand-worked examples of the PBS rules, and an independent set-based computation checked
//! against [`apply`] on random histories.

use super::*;
use chrono::FixedOffset;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn pts(times: &[&str]) -> Vec<Candidate<String>> {
    times
        .iter()
        .map(|t| Candidate {
            key: t.to_string(),
            at: at(t),
            protected: false,
            countable: true,
        })
        .collect()
}

/// `(time, kept_by)` newest first.
fn run(points: &[Candidate<String>], r: &Retention) -> Vec<(String, Option<KeepReason>)> {
    apply(points, r, &Utc)
        .into_iter()
        .map(|v| (v.key, v.kept_by))
        .collect()
}

fn kept(v: &[(String, Option<KeepReason>)]) -> Vec<(&str, KeepReason)> {
    v.iter()
        .filter_map(|(k, r)| r.map(|r| (k.as_str(), r)))
        .collect()
}

/// One point a day at noon, January 2024, keep-last 3, keep-daily 5, keep-weekly 2:
/// last keeps the 31st, 30th, 29th; daily the 28th..24th; weekly skips ISO week 4 (Jan 22-28,
/// already kept), keeps the newest of week 3 (Sunday the 21st) and of week 2 (the 14th), and
/// stops at week 1.
#[test]
fn last_daily_weekly_by_hand() {
    let days: Vec<String> = (1..=31)
        .map(|d| format!("2024-01-{d:02}T12:00:00Z"))
        .collect();
    let refs: Vec<&str> = days.iter().map(String::as_str).collect();
    let r = Retention {
        keep_last: Some(3),
        keep_daily: Some(5),
        keep_weekly: Some(2),
        ..Default::default()
    };
    let v = run(&pts(&refs), &r);
    use KeepReason::*;
    assert_eq!(
        kept(&v),
        vec![
            ("2024-01-31T12:00:00Z", Last),
            ("2024-01-30T12:00:00Z", Last),
            ("2024-01-29T12:00:00Z", Last),
            ("2024-01-28T12:00:00Z", Daily),
            ("2024-01-27T12:00:00Z", Daily),
            ("2024-01-26T12:00:00Z", Daily),
            ("2024-01-25T12:00:00Z", Daily),
            ("2024-01-24T12:00:00Z", Daily),
            ("2024-01-21T12:00:00Z", Weekly),
            ("2024-01-14T12:00:00Z", Weekly),
        ]
    );
    assert_eq!(v.len(), 31);
}

#[test]
fn newest_of_each_day_and_empty_days_not_counted() {
    let p = pts(&[
        "2024-01-10T08:00:00Z",
        "2024-01-10T20:00:00Z",
        "2024-01-09T08:00:00Z",
        "2024-01-01T20:00:00Z",
    ]);
    let r = Retention {
        keep_daily: Some(2),
        ..Default::default()
    };
    let v = run(&p, &r);
    assert_eq!(
        kept(&v),
        vec![
            ("2024-01-10T20:00:00Z", KeepReason::Daily),
            ("2024-01-09T08:00:00Z", KeepReason::Daily)
        ]
    );
    // Three days hold a point, 8 days apart: keep-daily 3 reaches back to the 1st.
    let r = Retention {
        keep_daily: Some(3),
        ..Default::default()
    };
    assert_eq!(kept(&run(&p, &r)).len(), 3);
}

#[test]
fn protected_points_are_kept_and_not_counted() {
    let mut p = pts(&[
        "2024-01-10T20:00:00Z",
        "2024-01-10T08:00:00Z",
        "2024-01-09T20:00:00Z",
        "2024-01-08T20:00:00Z",
        "2024-01-01T00:00:00Z",
    ]);
    p[0].protected = true;
    p[4].protected = true;
    let r = Retention {
        keep_daily: Some(2),
        ..Default::default()
    };
    use KeepReason::*;
    assert_eq!(
        kept(&run(&p, &r)),
        vec![
            ("2024-01-10T20:00:00Z", Protected),
            ("2024-01-10T08:00:00Z", Daily),
            ("2024-01-09T20:00:00Z", Daily),
            ("2024-01-01T00:00:00Z", Protected),
        ]
    );
}

#[test]
fn corrupt_points_do_not_count_and_go() {
    let mut p = pts(&[
        "2024-01-10T20:00:00Z",
        "2024-01-09T20:00:00Z",
        "2024-01-08T20:00:00Z",
    ]);
    p[0].countable = false;
    let r = Retention {
        keep_last: Some(2),
        ..Default::default()
    };
    assert_eq!(
        kept(&run(&p, &r)),
        vec![
            ("2024-01-09T20:00:00Z", KeepReason::Last),
            ("2024-01-08T20:00:00Z", KeepReason::Last)
        ]
    );
}

/// 2024-12-30 (a Monday) is in ISO week 2025-W01; the 29th (Sunday) in 2024-W52.
#[test]
fn iso_weeks_and_years_across_new_year() {
    let p = pts(&[
        "2025-01-02T12:00:00Z",
        "2024-12-30T12:00:00Z",
        "2024-12-29T12:00:00Z",
    ]);
    let w = run(
        &p,
        &Retention {
            keep_weekly: Some(2),
            ..Default::default()
        },
    );
    assert_eq!(
        kept(&w),
        vec![
            ("2025-01-02T12:00:00Z", KeepReason::Weekly),
            ("2024-12-29T12:00:00Z", KeepReason::Weekly)
        ]
    );
    let y = run(
        &p,
        &Retention {
            keep_yearly: Some(2),
            ..Default::default()
        },
    );
    assert_eq!(
        kept(&y),
        vec![
            ("2025-01-02T12:00:00Z", KeepReason::Yearly),
            ("2024-12-30T12:00:00Z", KeepReason::Yearly)
        ]
    );
}

/// 23:30 UTC and 00:30 UTC the next day are one day at UTC+2.
#[test]
fn periods_are_in_the_given_time_zone() {
    let p = pts(&["2024-03-11T00:30:00Z", "2024-03-10T23:30:00Z"]);
    let r = Retention {
        keep_daily: Some(2),
        ..Default::default()
    };
    assert_eq!(kept(&run(&p, &r)).len(), 2);
    let plus2 = FixedOffset::east_opt(2 * 3600).unwrap();
    let v = apply(&p, &r, &plus2);
    assert_eq!(v.iter().filter(|v| v.kept_by.is_some()).count(), 1, "{v:?}");
    assert_eq!(v[0].kept_by, Some(KeepReason::Daily));
    // A named zone: Europe/London is UTC+1 in summer.
    let q = pts(&["2024-07-01T23:30:00Z", "2024-07-01T22:30:00Z"]);
    let v = apply(&q, &r, &chrono_tz::Europe::London);
    assert_eq!(v.iter().filter(|v| v.kept_by.is_some()).count(), 2);
}

/// A later rule does not see points an earlier rule marked removed: with keep-daily 1 and
/// keep-hourly... in PBS order hourly runs first; here daily removes the morning point of the
/// kept day, and monthly then starts from the older days.
#[test]
fn a_point_marked_removed_is_not_seen_by_later_rules() {
    let p = pts(&[
        "2024-02-02T10:00:00Z",
        "2024-02-02T09:00:00Z",
        "2024-01-31T10:00:00Z",
    ]);
    let r = Retention {
        keep_daily: Some(1),
        keep_monthly: Some(2),
        ..Default::default()
    };
    assert_eq!(
        kept(&run(&p, &r)),
        vec![
            ("2024-02-02T10:00:00Z", KeepReason::Daily),
            ("2024-01-31T10:00:00Z", KeepReason::Monthly)
        ]
    );
}

#[test]
fn no_rule_keeps_by_no_rule() {
    let p = pts(&["2024-02-02T10:00:00Z", "2024-02-01T10:00:00Z"]);
    assert!(!keeps_something(&Retention::default()));
    assert!(
        run(&p, &Retention::default())
            .iter()
            .all(|(_, r)| r.is_none())
    );
}

// ---- the independent computation -------------------------------------------------------

/// Set-based reading of the PBS documentation: per rule, among the points no earlier rule
/// marked (and not protected, and countable), take the periods that hold no kept point, the
/// `n` newest of them; keep the newest point of each, mark the others of those periods
/// removed.
fn brute<Tz: TimeZone>(
    points: &[Candidate<u32>],
    r: &Retention,
    tz: &Tz,
) -> Vec<(u32, Option<KeepReason>)> {
    #[derive(Clone, Copy, PartialEq)]
    enum S {
        Free,
        Kept(KeepReason),
        Gone,
    }
    let mut st = vec![S::Free; points.len()];
    for (rule, n) in rules(r) {
        if n == 0 {
            continue;
        }
        let eligible =
            |i: usize, st: &[S]| st[i] == S::Free && !points[i].protected && points[i].countable;
        let blocked: HashSet<(i64, i64)> = (0..points.len())
            .filter(|&i| matches!(st[i], S::Kept(_)))
            .map(|i| period(rule, points[i].at, tz))
            .collect();
        let mut periods: Vec<((i64, i64), DateTime<Utc>)> = Vec::new();
        for (i, p) in points.iter().enumerate() {
            if !eligible(i, &st) {
                continue;
            }
            let id = period(rule, p.at, tz);
            if blocked.contains(&id) {
                continue;
            }
            match periods.iter_mut().find(|(q, _)| *q == id) {
                Some((_, newest)) => *newest = (*newest).max(p.at),
                None => periods.push((id, p.at)),
            }
        }
        periods.sort_by_key(|p| std::cmp::Reverse(p.1));
        periods.truncate(n as usize);
        let before = st.clone();
        for (i, p) in points.iter().enumerate() {
            if !eligible(i, &before) {
                continue;
            }
            let id = period(rule, p.at, tz);
            if let Some(&(_, newest)) = periods.iter().find(|q| q.0 == id) {
                // Instants are distinct: the newest is the one point at that instant.
                st[i] = if p.at == newest {
                    S::Kept(rule)
                } else {
                    S::Gone
                };
            }
        }
    }
    let mut out: Vec<(u32, DateTime<Utc>, Option<KeepReason>)> = points
        .iter()
        .zip(&st)
        .map(|(p, s)| {
            let k = if p.protected {
                Some(KeepReason::Protected)
            } else if let S::Kept(r) = s {
                Some(*r)
            } else {
                None
            };
            (p.key, p.at, k)
        })
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.1));
    out.into_iter().map(|(k, _, r)| (k, r)).collect()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn apply_equals_the_set_based_computation_on_random_histories() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let base = at("2023-11-20T00:00:00Z").timestamp();
    for case in 0..3000 {
        let n = 1 + rng.below(60) as usize;
        // Distinct instants (PBS's points have distinct times), spread over up to 3 years,
        // sometimes dense (hours), sometimes sparse (weeks).
        let spread = [6 * 3600, 86_400 * 3, 86_400 * 60, 86_400 * 1100][rng.below(4) as usize];
        let mut seen = HashSet::new();
        let mut points = Vec::new();
        while points.len() < n {
            let t = base + rng.below(spread) as i64;
            if seen.insert(t) {
                points.push(Candidate {
                    key: points.len() as u32,
                    at: DateTime::from_timestamp(t, 0).unwrap(),
                    protected: rng.below(10) == 0,
                    countable: rng.below(15) != 0,
                });
            }
        }
        let mut pick = || match rng.below(3) {
            0 => None,
            _ => Some(rng.below(6) as u32),
        };
        let r = Retention {
            keep_last: pick(),
            keep_hourly: pick(),
            keep_daily: pick(),
            keep_weekly: pick(),
            keep_monthly: pick(),
            keep_yearly: pick(),
        };
        let tz = FixedOffset::east_opt((rng.below(27) as i32 - 12) * 3600).unwrap();
        let got: Vec<(u32, Option<KeepReason>)> = apply(&points, &r, &tz)
            .into_iter()
            .map(|v| (v.key, v.kept_by))
            .collect();
        let want = brute(&points, &r, &tz);
        assert_eq!(got, want, "case {case}: {r:?} tz {tz}");
        // Invariants a user would check: protected kept; no rule keeps more than its count.
        for (rule, n) in rules(&r) {
            let c = got.iter().filter(|(_, k)| *k == Some(rule)).count();
            assert!(c <= n as usize, "{rule:?} kept {c} > {n}");
        }
        for p in &points {
            if p.protected {
                assert!(got.contains(&(p.key, Some(KeepReason::Protected))));
            }
        }
    }
}
