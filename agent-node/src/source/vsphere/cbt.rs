//! Changed block tracking rules, as pure functions: when an incremental may start from the
//! hub's change ids, and how `QueryChangedDiskAreas` answers become the copy's area list.

/// The part of a change id that names the tracking epoch: `"52 3d ... 5e/17"` → `"52 3d ... 5e"`.
/// vSphere gives the epoch a new uuid whenever tracking is reset (turned off and on, disk
/// resized, some storage migrations); changes since an id of an older epoch cannot be asked for.
pub fn epoch(change_id: &str) -> &str {
    change_id
        .split_once('/')
        .map_or(change_id, |(u, _)| u)
        .trim()
}

/// Why an incremental cannot start from `previous` on a disk whose current change id is
/// `current` (CBT on or off per `cbt_enabled`); `None` when it can.
pub fn base_problem(
    previous: Option<&str>,
    cbt_enabled: bool,
    current: Option<&str>,
) -> Option<String> {
    let Some(previous) = previous.filter(|p| !p.trim().is_empty()) else {
        return Some(
            "no change id of the previous backup (the hub sent none for this disk)".into(),
        );
    };
    if !cbt_enabled {
        return Some("changed block tracking is off on the VM".into());
    }
    let Some(current) = current.filter(|c| !c.trim().is_empty()) else {
        return Some(
            "the disk has no change id yet (tracking starts with the next snapshot)".into(),
        );
    };
    if epoch(previous) != epoch(current) {
        return Some(format!(
            "changed block tracking was reset since the previous backup (its change id {previous:?}, the disk's now {current:?})"
        ));
    }
    None
}

/// Sorts `areas`, merges overlapping and touching ones, clips them to `[0, capacity)` and
/// drops empty ones: the shape the copy engine requires.
pub fn normalize(mut areas: Vec<(u64, u64)>, capacity: u64) -> Vec<(u64, u64)> {
    areas.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(areas.len());
    for (offset, length) in areas {
        let end = offset.saturating_add(length).min(capacity);
        if end <= offset {
            continue;
        }
        match out.last_mut() {
            Some((o, l)) if *o + *l >= offset => *l = (*o + *l).max(end) - *o,
            _ => out.push((offset, end - offset)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_decides_whether_changes_can_be_asked_for() {
        let a1 = "52 3d 1e 9a 4f 6b 2c 70-8e 11 22 33 44 55 66 77/17";
        let a2 = "52 3d 1e 9a 4f 6b 2c 70-8e 11 22 33 44 55 66 77/42";
        let b = "52 aa 1e 9a 4f 6b 2c 70-8e 11 22 33 44 55 66 77/3";
        assert_eq!(base_problem(Some(a1), true, Some(a2)), None);
        let missing = base_problem(None, true, Some(a2)).unwrap();
        assert!(missing.contains("hub sent none"), "{missing}");
        assert!(
            base_problem(Some(a1), false, Some(a2))
                .unwrap()
                .contains("off")
        );
        assert!(
            base_problem(Some(a1), true, None)
                .unwrap()
                .contains("no change id")
        );
        let reset = base_problem(Some(a1), true, Some(b)).unwrap();
        assert!(reset.contains("reset") && reset.contains("/3"), "{reset}");
        assert_eq!(epoch("*"), "*");
    }

    #[test]
    fn areas_are_merged_sorted_and_clipped() {
        assert_eq!(
            normalize(
                vec![(100, 50), (0, 10), (10, 5), (120, 10), (200, 0), (990, 100)],
                1000
            ),
            vec![(0, 15), (100, 50), (990, 10)]
        );
        assert_eq!(normalize(vec![(2000, 5)], 1000), vec![]);
    }
}
