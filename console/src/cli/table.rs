//! Human tables that fit 80 columns, and the short job ids they show.
//!
//! The hub's job ids are 36-character UUIDs: a table shows the shortest prefix (at least 8
//! characters, like a short git hash) that tells apart every id it lists, and every command
//! that takes an id takes such a prefix too ([`resolve`]), so an id copied from a table works.

use super::{exit, fail};
use crate::format;
use sendense_shared::client::HubClient;

/// The width every table is made to fit.
pub const WIDTH: usize = 80;

/// The fewest characters a short id has, and a prefix must have.
pub const MIN_PREFIX: usize = 8;

/// A column's alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// How the flexible column loses characters when the table is too wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Keep the start (names).
    End,
    /// Keep the end (paths: the file name matters most).
    Start,
}

/// Columns as wide as their longest value, two spaces apart; when that is wider than
/// [`WIDTH`], the `flex` column is cut (never below its heading) until it fits.
pub struct Table {
    heads: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
    flex: Option<(usize, Cut)>,
}

impl Table {
    pub fn new(heads: &[(&'static str, Align)]) -> Table {
        Table {
            heads: heads.to_vec(),
            rows: Vec::new(),
            flex: None,
        }
    }

    /// The column that gives way when the table is too wide.
    pub fn flex(mut self, column: usize, cut: Cut) -> Table {
        self.flex = Some((column, cut));
        self
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.heads.len());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.heads.iter().map(|(h, _)| h.len()).collect();
        for row in &self.rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let total = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
        if let Some((col, _)) = self.flex
            && total > WIDTH
        {
            let floor = self.heads[col].0.len();
            widths[col] = widths[col].saturating_sub(total - WIDTH).max(floor);
        }
        let mut out = String::new();
        let heads: Vec<String> = self.heads.iter().map(|(h, _)| h.to_string()).collect();
        for row in std::iter::once(&heads).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                let cell = match self.flex {
                    Some((col, Cut::End)) if col == i => format::truncate(cell, *w),
                    Some((col, Cut::Start)) if col == i => format::truncate_left(cell, *w),
                    _ => cell.clone(),
                };
                if i > 0 {
                    line.push_str("  ");
                }
                let last = i + 1 == row.len();
                match self.heads[i].1 {
                    Align::Right => line.push_str(&format!("{cell:>w$}")),
                    Align::Left if last => line.push_str(&cell),
                    Align::Left => line.push_str(&format!("{cell:<w$}")),
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// How many characters of each id tell `ids` apart: at least [`MIN_PREFIX`], more only when
/// two of them share that many (ids shorter than that stay whole).
pub fn short_len<'a>(ids: impl IntoIterator<Item = &'a str>) -> usize {
    let mut ids: Vec<&str> = ids.into_iter().collect();
    ids.sort_unstable();
    ids.dedup();
    let mut len = MIN_PREFIX;
    for pair in ids.windows(2) {
        let common = pair[0]
            .chars()
            .zip(pair[1].chars())
            .take_while(|(a, b)| a == b)
            .count();
        len = len.max(common + 1);
    }
    len
}

/// The first `len` characters of `id`.
pub fn short(id: &str, len: usize) -> String {
    id.chars().take(len).collect()
}

/// The one id of `ids` that is `given` or starts with it. The error names what was given and,
/// when several match, the first few of them.
pub fn pick<'a>(
    what: &str,
    given: &str,
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<String, String> {
    let mut matches: Vec<&str> = Vec::new();
    for id in ids {
        if id == given {
            return Ok(id.to_string());
        }
        if id.starts_with(given) {
            matches.push(id);
        }
    }
    if given.chars().count() < MIN_PREFIX && !matches.is_empty() {
        return Err(format!(
            "{what} id '{given}' is too short: give at least {MIN_PREFIX} characters"
        ));
    }
    match matches.as_slice() {
        [] => Err(format!("no {what} has an id starting with '{given}'")),
        [one] => Ok(one.to_string()),
        many => {
            let shown: Vec<&str> = many.iter().take(4).copied().collect();
            Err(format!(
                "{what} id '{given}' is ambiguous: {} {what}s start with it ({}{}); give more characters",
                many.len(),
                shown.join(", "),
                if many.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            ))
        }
    }
}

/// `8-4-4-4-12` hex digits: a whole id of the hub's.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Which list an id is looked up in.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Backup,
    Restore,
    Recovery,
    Verify,
}

/// `given` as a whole id: a full UUID is taken as it is (the hub answers for it); anything
/// shorter is looked up in the hub's list of that kind. The error is printed, with its exit
/// status as the `Err`.
pub async fn resolve(client: &HubClient, kind: Kind, given: &str) -> Result<String, u8> {
    if is_uuid(given) {
        return Ok(given.to_string());
    }
    let (what, ids): (&str, Result<Vec<String>, _>) = match kind {
        Kind::Backup => (
            "backup",
            client
                .backups()
                .await
                .map(|l| l.into_iter().map(|b| b.backup_id.0).collect()),
        ),
        Kind::Restore => (
            "restore",
            client
                .restores()
                .await
                .map(|l| l.into_iter().map(|r| r.restore_id).collect()),
        ),
        Kind::Recovery => (
            "recovery",
            client
                .recoveries()
                .await
                .map(|l| l.into_iter().map(|r| r.recovery_id).collect()),
        ),
        Kind::Verify => (
            "verify job",
            client
                .verify_jobs()
                .await
                .map(|l| l.into_iter().map(|v| v.verify_id).collect()),
        ),
    };
    let ids = ids.map_err(|e| fail(&e))?;
    pick(what, given, ids.iter().map(String::as_str)).map_err(|why| {
        eprintln!("error: {why}");
        exit::ERROR
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_grow_only_where_two_share_a_prefix() {
        let ids = [
            "1a2b3c4d-0000-4000-8000-000000000001",
            "9f8e7d6c-0000-4000-8000-000000000002",
        ];
        assert_eq!(short_len(ids), 8);
        let twins = [
            "1a2b3c4d-0000-4000-8000-000000000001",
            "1a2b3c4d-5000-4000-8000-000000000002",
            "77777777-0000-4000-8000-000000000003",
        ];
        assert_eq!(short_len(twins), 10);
        assert_eq!(short(twins[1], 10), "1a2b3c4d-5");
        assert_eq!(short_len(["v-1", "v-2"]), 8);
        assert_eq!(short("v-1", 8), "v-1");
    }

    #[test]
    fn a_prefix_picks_its_one_id_and_says_why_when_it_cannot() {
        let ids = [
            "1a2b3c4d-0000-4000-8000-000000000001",
            "1a2b3c4d-5000-4000-8000-000000000002",
            "77777777-0000-4000-8000-000000000003",
        ];
        assert_eq!(pick("backup", "77777777", ids).unwrap(), ids[2]);
        assert_eq!(pick("backup", "1a2b3c4d-5", ids).unwrap(), ids[1]);
        assert_eq!(pick("backup", ids[0], ids).unwrap(), ids[0]);
        let e = pick("backup", "1a2b3c4d", ids).unwrap_err();
        assert!(e.contains("ambiguous") && e.contains("2 backups"), "{e}");
        assert!(e.contains(ids[0]) && e.contains(ids[1]), "{e}");
        let e = pick("backup", "deadbeef", ids).unwrap_err();
        assert_eq!(e, "no backup has an id starting with 'deadbeef'");
        let e = pick("backup", "777", ids).unwrap_err();
        assert!(e.contains("too short"), "{e}");
        // A short whole id (not the hub's UUIDs) is still taken as it is.
        assert_eq!(pick("restore", "r1", ["r1", "r10"]).unwrap(), "r1");
    }

    #[test]
    fn a_wide_table_cuts_its_flexible_column_to_80() {
        let mut t = Table::new(&[
            ("ID", Align::Left),
            ("PATH", Align::Left),
            ("N", Align::Right),
        ])
        .flex(1, Cut::Start);
        t.row(vec![
            "a".into(),
            format!("/srv/{}/disk.qcow2", "x".repeat(90)),
            "7".into(),
        ]);
        t.row(vec!["b".into(), "/short".into(), "12".into()]);
        let out = t.render();
        for line in out.lines() {
            assert!(line.chars().count() <= WIDTH, "{line}");
        }
        assert!(out.lines().nth(1).unwrap().contains("…x"), "{out}");
        assert!(out.lines().nth(1).unwrap().contains("disk.qcow2"), "{out}");
        assert!(out.lines().nth(2).unwrap().ends_with("12"), "{out}");
    }
}
