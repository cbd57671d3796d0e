//! Whole-disk checksums on a fixed grid ([`GridChecksums`]): the BLAKE3 of every cell
//! `[i * cell, min((i + 1) * cell, size))` as the snapshot holds it.
//!
//! [`GridBuilder`] is fed the disk front to back, in three kinds of spans: bytes read from the
//! snapshot, zeroes (holes and zero extents, known from block status without reading), and
//! areas unchanged since the parent (an incremental). A cell of zeroes only is a zero run (it
//! costs no hashing); a cell with any data is hashed whole, zero gaps included (fed from a
//! static buffer, nothing allocated); a cell entirely unchanged is not listed. A cell that is
//! partly unchanged cannot be hashed: [`read_for_grid`] turns the unchanged edges of dirty
//! cells into reads, so that the builder never sees one (it says so if it does).

use super::plan::{Action, Segment};
use sendense_shared::api::{CellChecksum, CellRun, GridChecksums};

/// What a Skip means to the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipMeans {
    /// The source reads as zeroes there (holes of a full on a fresh target).
    Zeroes,
    /// Unchanged since the parent (an incremental): the parent's checksums hold.
    Unchanged,
}

/// Zeroes fed to a hasher in slices of this (static, so nothing is allocated).
static ZEROES: [u8; 64 * 1024] = [0u8; 64 * 1024];

fn hash_zeroes(h: &mut blake3::Hasher, mut len: u64) {
    while len > 0 {
        let n = len.min(ZEROES.len() as u64) as usize;
        h.update(&ZEROES[..n]);
        len -= n as u64;
    }
}

/// The cell being filled.
#[derive(Default)]
struct Cell {
    /// Zeroes seen before the first data byte (hashed only once data shows up).
    leading_zeroes: u64,
    /// Set at the first data byte.
    hasher: Option<blake3::Hasher>,
    unchanged: u64,
}

/// Puts the grid together from spans fed in offset order.
pub struct GridBuilder {
    cell: u64,
    size: u64,
    /// Next offset expected.
    at: u64,
    current: Cell,
    cells: Vec<CellChecksum>,
    zero_cells: Vec<CellRun>,
}

impl GridBuilder {
    pub fn new(cell: u64, size: u64) -> Self {
        assert!(cell > 0, "grid cell size 0");
        GridBuilder {
            cell,
            size,
            at: 0,
            current: Cell::default(),
            cells: Vec::new(),
            zero_cells: Vec::new(),
        }
    }

    /// Bytes the snapshot holds at `offset`.
    pub fn data(&mut self, offset: u64, mut data: &[u8]) -> Result<(), String> {
        self.expect(offset, data.len() as u64, "data")?;
        while !data.is_empty() {
            let n = (self.cell_end() - self.at).min(data.len() as u64) as usize;
            let c = &mut self.current;
            let leading = c.leading_zeroes;
            let h = c.hasher.get_or_insert_with(|| {
                let mut h = blake3::Hasher::new();
                hash_zeroes(&mut h, leading);
                h
            });
            h.update(&data[..n]);
            data = &data[n..];
            self.advance(n as u64)?;
        }
        Ok(())
    }

    /// `length` bytes at `offset` that read as zeroes.
    pub fn zero(&mut self, offset: u64, length: u64) -> Result<(), String> {
        self.expect(offset, length, "zeroes")?;
        let mut left = length;
        while left > 0 {
            let n = (self.cell_end() - self.at).min(left);
            let c = &mut self.current;
            match &mut c.hasher {
                Some(h) => hash_zeroes(h, n),
                None => c.leading_zeroes += n,
            }
            left -= n;
            self.advance(n)?;
        }
        Ok(())
    }

    /// `length` bytes at `offset` unchanged since the parent.
    pub fn unchanged(&mut self, offset: u64, length: u64) -> Result<(), String> {
        self.expect(offset, length, "unchanged area")?;
        let mut left = length;
        while left > 0 {
            let n = (self.cell_end() - self.at).min(left);
            self.current.unchanged += n;
            left -= n;
            self.advance(n)?;
        }
        Ok(())
    }

    /// `[start, end)` is exactly the next cell, none of it fed yet: its hash may be given
    /// whole ([`GridBuilder::cell_hash`]) instead of its bytes (a written range that fills a
    /// cell is hashed once for both lists).
    pub fn is_next_cell(&self, start: u64, end: u64) -> bool {
        start == self.at
            && start.is_multiple_of(self.cell)
            && end == start.saturating_add(self.cell).min(self.size)
    }

    /// The BLAKE3 of the whole cell `[start, end)` (see [`GridBuilder::is_next_cell`]).
    pub fn cell_hash(&mut self, start: u64, end: u64, blake3: String) -> Result<(), String> {
        if !self.is_next_cell(start, end) {
            return Err(format!(
                "checksum grid: {start}..{end} is not the next cell (at {})",
                self.at
            ));
        }
        self.cells.push(CellChecksum {
            index: start / self.cell,
            blake3,
        });
        self.at = end;
        Ok(())
    }

    /// The grid, once every byte of the disk was fed.
    pub fn finish(self) -> Result<GridChecksums, String> {
        if self.at != self.size {
            return Err(format!(
                "checksum grid incomplete: {} of {} bytes seen",
                self.at, self.size
            ));
        }
        Ok(GridChecksums {
            cell_size: self.cell,
            disk_size: self.size,
            cells: self.cells,
            zero_cells: self.zero_cells,
        })
    }

    fn expect(&self, offset: u64, length: u64, what: &str) -> Result<(), String> {
        if offset != self.at {
            return Err(format!(
                "checksum grid: {what} at {offset}, expected the disk's bytes at {}",
                self.at
            ));
        }
        if offset.checked_add(length).is_none_or(|e| e > self.size) {
            return Err(format!(
                "checksum grid: {what} at {offset}+{length} past the disk's {} bytes",
                self.size
            ));
        }
        Ok(())
    }

    fn cell_end(&self) -> u64 {
        ((self.at / self.cell).saturating_add(1))
            .saturating_mul(self.cell)
            .min(self.size)
    }

    /// Moves past `n` bytes of the current cell; closes it at its end.
    fn advance(&mut self, n: u64) -> Result<(), String> {
        let end = self.cell_end();
        let index = self.at / self.cell;
        let start = index * self.cell;
        self.at += n;
        if self.at < end {
            return Ok(());
        }
        let c = std::mem::take(&mut self.current);
        let len = end - start;
        if c.unchanged == len {
            return Ok(());
        }
        if c.unchanged > 0 {
            return Err(format!(
                "checksum grid: cell {index} is partly unchanged ({} of {len} bytes) and was not read whole",
                c.unchanged
            ));
        }
        match c.hasher {
            Some(h) => self.cells.push(CellChecksum {
                index,
                blake3: h.finalize().to_hex().to_string(),
            }),
            None => match self.zero_cells.last_mut() {
                Some(run) if run.first + run.count == index => run.count += 1,
                _ => self.zero_cells.push(CellRun {
                    first: index,
                    count: 1,
                }),
            },
        }
        Ok(())
    }
}

/// For an incremental's grid: the unchanged segment `seg` (Skip) with its parts that share a
/// cell with changed bytes turned into [`Action::Read`] (read for the checksums, not written),
/// so that every cell the copy touches is hashed whole. Segments cover the disk of `size`
/// bytes contiguously and adjacent Skips are merged, so a Skip that starts inside a cell
/// follows changed bytes in that cell, and one that ends inside a cell (before the disk's end)
/// is followed by changed bytes. Other segments pass unchanged.
pub fn read_for_grid(seg: Segment, cell: u64, size: u64) -> Vec<Segment> {
    if seg.action != Action::Skip || seg.length == 0 {
        return vec![seg];
    }
    let (start, end) = (seg.offset, seg.end());
    let head_end = if !start.is_multiple_of(cell) {
        (start / cell + 1).saturating_mul(cell).min(end)
    } else {
        start
    };
    let tail_start = if !end.is_multiple_of(cell) && end < size {
        (end / cell * cell).max(head_end)
    } else {
        end
    };
    let mut out = Vec::with_capacity(3);
    let mut push = |offset: u64, end: u64, action| {
        if end > offset {
            out.push(Segment {
                offset,
                length: end - offset,
                action,
            });
        }
    };
    push(start, head_end, Action::Read);
    push(head_end, tail_start, Action::Skip);
    push(tail_start, end, Action::Read);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zeroes(n: usize) -> String {
        blake3::hash(&vec![0u8; n]).to_hex().to_string()
    }

    #[test]
    fn cells_are_hashed_whole_zero_runs_coalesce_and_the_last_cell_is_short() {
        // 10 bytes, cell 4: [0,4) data+zeroes, [4,8) zeroes, [8,10) zeroes (short).
        let mut g = GridBuilder::new(4, 10);
        g.zero(0, 1).unwrap();
        g.data(1, b"ab").unwrap();
        g.zero(3, 7).unwrap();
        let grid = g.finish().unwrap();
        assert_eq!(
            grid.cells,
            [CellChecksum {
                index: 0,
                blake3: blake3::hash(b"\0ab\0").to_hex().to_string()
            }]
        );
        assert_eq!(grid.zero_cells, [CellRun { first: 1, count: 2 }]);
        assert_eq!((grid.cell_size, grid.disk_size), (4, 10));
    }

    #[test]
    fn data_across_cells_is_split_and_zero_data_is_still_hashed() {
        let mut g = GridBuilder::new(4, 8);
        g.data(0, b"abcdef").unwrap();
        g.data(6, &[0, 0]).unwrap();
        let grid = g.finish().unwrap();
        assert_eq!(
            grid.cells[0].blake3,
            blake3::hash(b"abcd").to_hex().as_str()
        );
        assert_eq!(
            grid.cells[1].blake3,
            blake3::hash(b"ef\0\0").to_hex().as_str()
        );
        assert!(grid.zero_cells.is_empty());
        // Large zero gaps hash as the zero bytes they stand for.
        let mut g = GridBuilder::new(1 << 20, 1 << 20);
        g.zero(0, (1 << 20) - 1).unwrap();
        g.data((1 << 20) - 1, &[0]).unwrap();
        assert_eq!(g.finish().unwrap().cells[0].blake3, zeroes(1 << 20));
    }

    #[test]
    fn unchanged_cells_are_left_out_and_partial_ones_refused() {
        let mut g = GridBuilder::new(4, 12);
        g.unchanged(0, 4).unwrap();
        g.zero(4, 4).unwrap();
        g.unchanged(8, 4).unwrap();
        let grid = g.finish().unwrap();
        assert!(grid.cells.is_empty());
        assert_eq!(grid.zero_cells, [CellRun { first: 1, count: 1 }]);

        let mut g = GridBuilder::new(4, 8);
        g.unchanged(0, 2).unwrap();
        let e = g.data(2, b"ab").unwrap_err();
        assert!(e.contains("cell 0 is partly unchanged"), "{e}");
    }

    #[test]
    fn spans_out_of_order_or_short_are_errors() {
        let mut g = GridBuilder::new(4, 8);
        assert!(g.data(1, b"a").unwrap_err().contains("expected"));
        assert!(g.zero(0, 9).unwrap_err().contains("past the disk"));
        g.zero(0, 5).unwrap();
        assert!(g.finish().unwrap_err().contains("5 of 8 bytes"));
    }

    #[test]
    fn unchanged_edges_of_changed_cells_are_read() {
        let seg = |offset, length, action| Segment {
            offset,
            length,
            action,
        };
        // Cell 10, disk 95: a Skip from 13 to 47 follows and precedes changed bytes.
        assert_eq!(
            read_for_grid(seg(13, 34, Action::Skip), 10, 95),
            [
                seg(13, 7, Action::Read),
                seg(20, 20, Action::Skip),
                seg(40, 7, Action::Read)
            ]
        );
        // Inside one cell: all read.
        assert_eq!(
            read_for_grid(seg(13, 4, Action::Skip), 10, 95),
            [seg(13, 4, Action::Read)]
        );
        // Aligned, or running to the disk's end: nothing to read.
        assert_eq!(
            read_for_grid(seg(20, 75, Action::Skip), 10, 95),
            [seg(20, 75, Action::Skip)]
        );
        assert_eq!(
            read_for_grid(seg(0, 20, Action::Skip), 10, 95),
            [seg(0, 20, Action::Skip)]
        );
        assert_eq!(
            read_for_grid(seg(3, 4, Action::Data), 10, 95),
            [seg(3, 4, Action::Data)]
        );
    }
}
