//! The source's block status, asked window by window, turned into segments ([`plan`] has the
//! rules; this asks the server). Full copy: allocation decides. Incremental: the dirty bitmap
//! decides, and inside a changed area allocation finds zeroes. Areas (vSphere CBT): only the
//! areas are looked at, allocation inside them.

use super::plan::{self, Action, Segment};
use super::{CopyError, ExtentSource};
use sendense_shared::nbd::{BASE_ALLOCATION, Extent, NbdClient};

/// What the plan of one copy is made from.
pub(super) struct Planner<'a> {
    pub(super) src: &'a NbdClient,
    pub(super) extents: &'a ExtentSource,
    /// The meta context that decides what to copy (allocation or the dirty bitmap).
    pub(super) map_context: &'a str,
    /// The source answers `base:allocation`: zeroes can be found without reading.
    pub(super) alloc_ok: bool,
    /// The target reads as zeroes: holes need not be written.
    pub(super) target_is_zero: bool,
    /// BLOCK_STATUS requests count as outstanding on the source (the stall watchdog).
    pub(super) counters: &'a super::DiskCounters,
}

impl Planner<'_> {
    /// Turns the block status of `[offset, offset+window)` into segments; returns where the
    /// description stopped (servers may describe less than asked).
    pub(super) async fn window(
        &self,
        offset: u64,
        window: u64,
        out: &mut Vec<Segment>,
    ) -> Result<u64, CopyError> {
        let end = offset + window;
        match self.extents {
            ExtentSource::Allocation if !self.alloc_ok => {
                out.push(Segment {
                    offset,
                    length: window,
                    action: Action::Data,
                });
                Ok(end)
            }
            ExtentSource::Allocation => {
                let ext = self.status(self.map_context, offset, window).await?;
                Ok(plan::lay_extents(
                    offset,
                    end,
                    &ext,
                    |f| plan::allocation_action(f, self.target_is_zero),
                    out,
                ))
            }
            ExtentSource::DirtyBitmap(_) => self.dirty(offset, end, out).await,
            ExtentSource::Areas(areas) => self.areas(areas, offset, end, out).await,
        }
    }

    async fn status(&self, ctx: &str, offset: u64, length: u64) -> Result<Vec<Extent>, CopyError> {
        let _waiting = self.counters.waiting_on(super::progress::Side::Source);
        self.src
            .block_status(ctx, offset, length as u32)
            .await
            .map_err(|cause| CopyError::BlockStatus {
                offset,
                length,
                cause,
            })
    }

    async fn dirty(&self, offset: u64, end: u64, out: &mut Vec<Segment>) -> Result<u64, CopyError> {
        let ext = self.status(self.map_context, offset, end - offset).await?;
        let mut dirty = Vec::new();
        let covered = plan::lay_extents(
            offset,
            end,
            &ext,
            |f| {
                if plan::is_dirty(f) {
                    Action::Data
                } else {
                    Action::Skip
                }
            },
            &mut dirty,
        );
        if !self.alloc_ok {
            out.extend(dirty);
            return Ok(covered);
        }
        // Inside a changed area, what reads as zeroes is written as zeroes without reading it
        // (an incremental target is never assumed zero: it has a backing). The allocation of
        // the span from the first to the last changed byte is asked once (a few requests),
        // not once per changed area: thousands of scattered changes would otherwise wait on
        // as many round trips, one after the other, before their data is read.
        let data = |s: &&Segment| s.action == Action::Data;
        let (Some(first), Some(last)) = (dirty.iter().find(data), dirty.iter().rfind(data)) else {
            out.extend(dirty);
            return Ok(covered);
        };
        let (from, to) = (first.offset, last.end());
        let mut alloc = Vec::new();
        let mut at = from;
        while at < to {
            let ext = self.status(BASE_ALLOCATION, at, to - at).await?;
            let next = plan::lay_extents(
                at,
                to,
                &ext,
                |f| plan::allocation_action(f, false),
                &mut alloc,
            );
            if next == at {
                return Err(CopyError::BlockStatus {
                    offset: at,
                    length: to - at,
                    cause: sendense_shared::nbd::NbdError::Protocol {
                        reason: "block status described no byte".to_string(),
                    },
                });
            }
            at = next;
        }
        plan::intersect(&dirty, &alloc, out);
        Ok(covered)
    }

    async fn areas(
        &self,
        areas: &[(u64, u64)],
        offset: u64,
        end: u64,
        out: &mut Vec<Segment>,
    ) -> Result<u64, CopyError> {
        let inside = plan::areas_in(areas, offset, end);
        let Some(&(first, _)) = inside.first() else {
            out.push(Segment {
                offset,
                length: end - offset,
                action: Action::Skip,
            });
            return Ok(end);
        };
        // Block status only from the first area on: a window without areas (most of an
        // incremental) costs no request at all.
        let from = first.max(offset);
        let mut inner = Vec::new();
        let covered = if self.alloc_ok {
            let ext = self.status(BASE_ALLOCATION, from, end - from).await?;
            plan::lay_extents(
                from,
                end,
                &ext,
                |f| plan::allocation_action(f, self.target_is_zero),
                &mut inner,
            )
        } else {
            inner.push(Segment {
                offset: from,
                length: end - from,
                action: Action::Data,
            });
            end
        };
        if from > offset {
            out.push(Segment {
                offset,
                length: from - offset,
                action: Action::Skip,
            });
        }
        plan::overlay_areas(&inside, &inner, out);
        Ok(covered)
    }
}
