//! The extent map: block status turned into segments of work (copy data, write zeroes, skip),
//! and segments cut into requests. Pure functions, so that the rules are tested without a
//! server.

use sendense_shared::nbd::{Extent, STATE_DIRTY, STATE_ZERO};

/// What to do with a range of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read from the source and write (zero blocks found inside become WRITE_ZEROES).
    Data,
    /// The source reads as zeroes there: WRITE_ZEROES without reading.
    Zero,
    /// Nothing to do: a hole on a fresh (zero) target, or an unchanged area of an incremental.
    Skip,
    /// Read for the whole-disk checksums only, not written: the unchanged part of a grid cell
    /// an incremental changed elsewhere ([`super::grid::read_for_grid`]).
    Read,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub length: u64,
    pub action: Action,
}

impl Segment {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// The action for one `base:allocation` extent. A hole that does not promise zeroes (e.g. a
/// backing chain) must be read.
pub fn allocation_action(flags: u32, target_is_zero: bool) -> Action {
    if flags & STATE_ZERO != 0 {
        if target_is_zero {
            Action::Skip
        } else {
            Action::Zero
        }
    } else {
        Action::Data
    }
}

/// Whether a `qemu:dirty-bitmap:NAME` extent changed.
pub fn is_dirty(flags: u32) -> bool {
    flags & STATE_DIRTY != 0
}

/// Lays block status extents over `[start, end)`: clips the last extent to `end` (servers may
/// describe past the request) and returns the end actually covered (servers may describe
/// less). Every extent has a non-zero length, so the covered end is past `start` whenever
/// there is at least one extent.
pub fn lay_extents(
    start: u64,
    end: u64,
    extents: &[Extent],
    mut action: impl FnMut(u32) -> Action,
    out: &mut Vec<Segment>,
) -> u64 {
    let mut at = start;
    for e in extents {
        if at >= end {
            break;
        }
        let len = e.length.min(end - at);
        out.push(Segment {
            offset: at,
            length: len,
            action: action(e.flags),
        });
        at += len;
    }
    at
}

/// Lays the changed areas of `dirty` (Data; Skip passes through) over `alloc`, which covers
/// every changed byte contiguously and in order: each changed area becomes the pieces of
/// `alloc` inside it, with their actions (data to read, zeroes to write).
pub fn intersect(dirty: &[Segment], alloc: &[Segment], out: &mut Vec<Segment>) {
    let mut i = 0;
    for seg in dirty {
        if seg.action != Action::Data {
            out.push(*seg);
            continue;
        }
        while i < alloc.len() && alloc[i].end() <= seg.offset {
            i += 1;
        }
        let mut j = i;
        while j < alloc.len() && alloc[j].offset < seg.end() {
            let a = &alloc[j];
            let (s, e) = (a.offset.max(seg.offset), a.end().min(seg.end()));
            out.push(Segment {
                offset: s,
                length: e - s,
                action: a.action,
            });
            j += 1;
        }
    }
}

/// Checks an explicit area list ([`super::ExtentSource::Areas`]) against a disk of `size`
/// bytes: every area non-empty, inside the disk, sorted and disjoint. The error says which.
pub fn check_areas(areas: &[(u64, u64)], size: u64) -> Result<(), String> {
    let mut prev_end = 0u64;
    for (i, &(offset, length)) in areas.iter().enumerate() {
        if length == 0 {
            return Err(format!("area {i} at {offset} has length 0"));
        }
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= size)
            .ok_or_else(|| {
                format!("area {i} ({offset}+{length}) ends past the disk's {size} bytes")
            })?;
        if i > 0 && offset < prev_end {
            return Err(format!(
                "area {i} at {offset} starts before the previous one ends at {prev_end} \
                 (areas must be sorted and disjoint)"
            ));
        }
        prev_end = end;
    }
    Ok(())
}

/// The parts of the sorted, disjoint `areas` inside `[start, end)`, clipped to it.
pub fn areas_in(areas: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let first = areas.partition_point(|&(o, l)| o + l <= start);
    areas[first..]
        .iter()
        .take_while(|&&(o, _)| o < end)
        .map(|&(o, l)| {
            let s = o.max(start);
            let e = (o + l).min(end);
            (s, e - s)
        })
        .collect()
}

/// Lays `areas` over the contiguous segments `inner`: inside an area a segment keeps its
/// action, outside it becomes [`Action::Skip`]. The output covers exactly what `inner` covers.
pub fn overlay_areas(areas: &[(u64, u64)], inner: &[Segment], out: &mut Vec<Segment>) {
    let mut a = 0;
    for seg in inner {
        let mut at = seg.offset;
        while at < seg.end() {
            while a < areas.len() && areas[a].0 + areas[a].1 <= at {
                a += 1;
            }
            let (next, action) = match areas.get(a) {
                Some(&(o, _)) if o > at => (o.min(seg.end()), Action::Skip),
                Some(&(o, l)) => ((o + l).min(seg.end()), seg.action),
                None => (seg.end(), Action::Skip),
            };
            out.push(Segment {
                offset: at,
                length: next - at,
                action,
            });
            at = next;
        }
    }
}

/// Merges adjacent segments with the same action, so that a long run split over several block
/// status replies becomes one run (fewer, larger WRITE_ZEROES).
#[derive(Debug, Default)]
pub struct Coalescer {
    pending: Option<Segment>,
}

impl Coalescer {
    /// Adds the next segment (in offset order); returns a finished one when the action changes.
    pub fn push(&mut self, s: Segment) -> Option<Segment> {
        match &mut self.pending {
            Some(p) if p.action == s.action && p.end() == s.offset => {
                p.length += s.length;
                None
            }
            _ => self.pending.replace(s),
        }
    }

    pub fn finish(&mut self) -> Option<Segment> {
        self.pending.take()
    }
}

/// Cuts `[offset, offset+length)` into pieces no longer than `max` that never cross a multiple
/// of `grid` (the checksum grid), so that each piece lies in one checksum chunk.
pub fn pieces(offset: u64, length: u64, max: u64, grid: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + length;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let next_grid = (at / grid + 1).saturating_mul(grid);
        let len = (end - at).min(max).min(next_grid - at);
        let p = (at, len);
        at += len;
        Some(p)
    })
}

/// Splits a buffer into maximal runs of all-zero and not-all-zero blocks of `block` bytes (the
/// last block may be shorter). Every byte is looked at: a block is zero only if all its bytes
/// are. Returns `(start, end, is_zero)` relative to the buffer.
pub fn zero_runs(data: &[u8], block: usize) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, b) in data.chunks(block).enumerate() {
        let zero = is_zero(b);
        let start = i * block;
        let end = start + b.len();
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 = end,
            _ => runs.push((start, end, zero)),
        }
    }
    runs
}

/// True when every byte is zero. Folds 4 KiB at a time (which the compiler vectorises) and
/// stops at the first non-zero block.
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sendense_shared::nbd::STATE_HOLE;

    #[test]
    fn allocation_flags_map_to_actions() {
        assert_eq!(allocation_action(0, true), Action::Data);
        // A hole without the zero promise (backing chain) is read.
        assert_eq!(allocation_action(STATE_HOLE, true), Action::Data);
        assert_eq!(
            allocation_action(STATE_HOLE | STATE_ZERO, true),
            Action::Skip
        );
        assert_eq!(
            allocation_action(STATE_HOLE | STATE_ZERO, false),
            Action::Zero
        );
        assert_eq!(allocation_action(STATE_ZERO, false), Action::Zero);
    }

    #[test]
    fn changed_areas_take_the_allocation_inside_them() {
        let seg = |offset, length, action| Segment {
            offset,
            length,
            action,
        };
        // Changed: [0,10) and [30,50); unchanged between and after.
        let dirty = [
            seg(0, 10, Action::Data),
            seg(10, 20, Action::Skip),
            seg(30, 20, Action::Data),
            seg(50, 50, Action::Skip),
        ];
        // Allocation over [0,50): data, zeroes from 5 to 40, data again.
        let alloc = [
            seg(0, 5, Action::Data),
            seg(5, 35, Action::Zero),
            seg(40, 10, Action::Data),
        ];
        let mut out = Vec::new();
        intersect(&dirty, &alloc, &mut out);
        assert_eq!(
            out,
            [
                seg(0, 5, Action::Data),
                seg(5, 5, Action::Zero),
                seg(10, 20, Action::Skip),
                seg(30, 10, Action::Zero),
                seg(40, 10, Action::Data),
                seg(50, 50, Action::Skip),
            ]
        );
    }

    #[test]
    fn extents_are_clipped_and_coverage_reported() {
        let ext = [
            Extent {
                length: 100,
                flags: 0,
            },
            Extent {
                length: 1000,
                flags: STATE_ZERO,
            },
        ];
        let mut out = Vec::new();
        let end = lay_extents(50, 500, &ext, |f| allocation_action(f, false), &mut out);
        assert_eq!(end, 500);
        assert_eq!(
            out,
            vec![
                Segment {
                    offset: 50,
                    length: 100,
                    action: Action::Data
                },
                Segment {
                    offset: 150,
                    length: 350,
                    action: Action::Zero
                },
            ]
        );
        // Less than asked: the covered end says where to ask again.
        let mut out = Vec::new();
        assert_eq!(
            lay_extents(0, 500, &ext[..1], |_| Action::Data, &mut out),
            100
        );
    }

    #[test]
    fn coalescer_merges_runs_of_one_action() {
        let mut c = Coalescer::default();
        let seg = |offset, length, action| Segment {
            offset,
            length,
            action,
        };
        assert_eq!(c.push(seg(0, 10, Action::Zero)), None);
        assert_eq!(c.push(seg(10, 10, Action::Zero)), None);
        assert_eq!(
            c.push(seg(20, 5, Action::Data)),
            Some(seg(0, 20, Action::Zero))
        );
        assert_eq!(c.finish(), Some(seg(20, 5, Action::Data)));
        assert_eq!(c.finish(), None);
    }

    #[test]
    fn pieces_respect_request_size_and_grid() {
        let p: Vec<_> = pieces(3, 20, 8, 10).collect();
        assert_eq!(p, vec![(3, 7), (10, 8), (18, 2), (20, 3)]);
        let total: u64 = pieces(0, 1 << 40, 1 << 21, 1 << 22).map(|p| p.1).sum();
        assert_eq!(total, 1 << 40);
    }

    #[test]
    fn areas_are_checked_clipped_and_overlaid() {
        assert!(check_areas(&[(0, 10), (10, 5), (100, 28)], 128).is_ok());
        assert!(check_areas(&[], 0).is_ok());
        let e = check_areas(&[(0, 10), (5, 10)], 128).unwrap_err();
        assert!(e.contains("area 1") && e.contains("disjoint"), "{e}");
        let e = check_areas(&[(120, 10)], 128).unwrap_err();
        assert!(e.contains("past the disk"), "{e}");
        assert!(
            check_areas(&[(0, 0)], 128)
                .unwrap_err()
                .contains("length 0")
        );
        assert!(check_areas(&[(u64::MAX, 2)], u64::MAX).is_err());

        let areas = [(10, 10), (30, 5), (50, 100)];
        assert_eq!(areas_in(&areas, 0, 10), vec![]);
        assert_eq!(areas_in(&areas, 15, 60), vec![(15, 5), (30, 5), (50, 10)]);
        assert_eq!(areas_in(&areas, 60, 70), vec![(60, 10)]);
        assert_eq!(areas_in(&areas, 160, 170), vec![]);

        let seg = |offset, length, action| Segment {
            offset,
            length,
            action,
        };
        // Allocation says: data 0..32, zero 32..60.
        let inner = [seg(0, 32, Action::Data), seg(32, 28, Action::Zero)];
        let mut out = Vec::new();
        overlay_areas(&areas_in(&areas, 0, 60), &inner, &mut out);
        assert_eq!(
            out,
            vec![
                seg(0, 10, Action::Skip),
                seg(10, 10, Action::Data),
                seg(20, 10, Action::Skip),
                seg(30, 2, Action::Data),
                seg(32, 3, Action::Zero),
                seg(35, 15, Action::Skip),
                seg(50, 10, Action::Zero),
            ]
        );
        assert_eq!(out.iter().map(|s| s.length).sum::<u64>(), 60);
    }

    #[test]
    fn zero_detection_looks_at_every_byte() {
        let mut d = vec![0u8; 1 << 20];
        assert!(is_zero(&d));
        // One non-zero byte anywhere, including the very last, makes the block data.
        for pos in [0, 4095, 4096, 700_001, (1 << 20) - 1] {
            d[pos] = 1;
            assert!(!is_zero(&d), "byte {pos}");
            d[pos] = 0;
        }
        d[70_000] = 9;
        assert_eq!(
            zero_runs(&d, 65536),
            vec![
                (0, 65536, true),
                (65536, 131072, false),
                (131072, 1 << 20, true)
            ]
        );
        assert_eq!(zero_runs(&d[..100], 64), vec![(0, 100, true)]);
    }
}
