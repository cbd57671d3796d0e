//! Which retention and time zone apply to a VM when a prune request names none: the policy
//! that covers it (the `policies` table, read directly). The rule is the contract's
//! (`sendense_shared::api::VmSelector`): a policy naming the VM explicitly wins; otherwise the
//! highest `priority` among those whose patterns or nodes reach it, ties to the one created
//! first. Disabled policies count too: their retention is still what the operator chose.

use crate::db::PolicyRetention;
use sendense_shared::api::{Retention, VmSelector};

/// The retention, time zone and policy name that apply to `vm` (on `node`), if a policy
/// covers it.
pub fn covering(
    policies: &[PolicyRetention],
    vm: &str,
    node: Option<&str>,
) -> Option<(Retention, chrono_tz::Tz, String)> {
    let mut best: Option<(bool, i64, i64, &PolicyRetention)> = None;
    for p in policies {
        let Ok(sel) = serde_json::from_str::<VmSelector>(&p.vms_json) else {
            continue;
        };
        let named = sel.names.iter().any(|n| n == vm);
        let reached = named
            || sel.patterns.iter().any(|g| glob(g, vm))
            || node.is_some_and(|n| sel.nodes.iter().any(|x| x == n));
        if !reached {
            continue;
        }
        let key = (named, p.priority, -p.created_at);
        if best.is_none_or(|(n, pr, c, _)| key > (n, pr, c)) {
            best = Some((key.0, key.1, key.2, p));
        }
    }
    let p = best?.3;
    let retention = serde_json::from_str(&p.retention_json).ok()?;
    let tz = p.timezone.parse().unwrap_or(chrono_tz::UTC);
    Some((retention, tz, p.name.clone()))
}

/// Shell-style glob over a whole name: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`.
pub fn glob(pattern: &str, name: &str) -> bool {
    fn m(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| m(&p[1..], &n[i..])),
            Some('?') => !n.is_empty() && m(&p[1..], &n[1..]),
            Some('[') => {
                let Some(end) = p.iter().skip(1).position(|&c| c == ']').map(|i| i + 1) else {
                    return n.first() == Some(&'[') && m(&p[1..], &n[1..]);
                };
                let Some(&c) = n.first() else { return false };
                let set = &p[1..end];
                let (neg, set) = match set.first() {
                    Some('!') | Some('^') => (true, &set[1..]),
                    _ => (false, set),
                };
                let mut hit = false;
                let mut i = 0;
                while i < set.len() {
                    if i + 2 < set.len() && set[i + 1] == '-' {
                        hit |= set[i] <= c && c <= set[i + 2];
                        i += 3;
                    } else {
                        hit |= set[i] == c;
                        i += 1;
                    }
                }
                hit != neg && m(&p[end + 1..], &n[1..])
            }
            Some(&c) => n.first() == Some(&c) && m(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    m(&p, &n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("pg*", "pg1"));
        assert!(glob("db-?", "db-a"));
        assert!(!glob("db-?", "db-ab"));
        assert!(glob("web[0-9]", "web7"));
        assert!(!glob("web[!0-9]", "web7"));
        assert!(glob("*", ""));
        assert!(!glob("a*b", "ac"));
    }

    fn pol(id: &str, vms: &str, prio: i64, at: i64, keep: u32) -> PolicyRetention {
        PolicyRetention {
            policy_id: id.into(),
            name: id.into(),
            vms_json: vms.into(),
            timezone: "Europe/London".into(),
            retention_json: format!("{{\"keep_last\":{keep}}}"),
            priority: prio,
            enabled: true,
            created_at: at,
        }
    }

    #[test]
    fn explicit_name_then_priority_then_age() {
        let ps = vec![
            pol("a", r#"{"patterns":["pg*"]}"#, 5, 1, 1),
            pol("b", r#"{"patterns":["*"]}"#, 9, 2, 2),
            pol("c", r#"{"names":["pg1"]}"#, 0, 3, 3),
            pol("d", r#"{"nodes":["n1"]}"#, 9, 0, 4),
        ];
        assert_eq!(covering(&ps, "pg1", None).unwrap().0.keep_last, Some(3));
        // b and d tie on priority 9: d was created first.
        assert_eq!(
            covering(&ps, "pg2", Some("n1")).unwrap().0.keep_last,
            Some(4)
        );
        assert_eq!(covering(&ps, "pg2", None).unwrap().0.keep_last, Some(2));
        assert_eq!(
            covering(&ps, "pg2", None).unwrap().1,
            chrono_tz::Europe::London
        );
        assert!(covering(&ps[..1], "web", None).is_none());
    }
}
