//! The merge engine: runs one journaled [`Step`] from whatever phase it reached, so the same
//! code runs a step the first time and finishes it after a crash ([`run_step`]).
//!
//! # Why `qemu-img commit` and `qemu-img rebase` (not a qemu-storage-daemon job)
//! - A merge at a chain's base (`commit -d -b BASE CHILD`, then BASE renamed over CHILD) writes
//!   only what the layers above the base hold: a 1 GiB incremental into a 4 GiB full writes
//!   1 GiB, never the full's 4 GiB (`rebase -b ""` of the child would copy the whole full into
//!   it). `-d` leaves the child and the middle layers untouched, so at every moment before the
//!   rename the child still reads its own instant (every cluster the commit has written into
//!   the base equals what the child's chain returns there, and the child reads its own layers
//!   first); the rename is atomic, and after it the child's path holds a self-contained image
//!   of the same bytes. Measured with bench/prune.sh (release, 3 pairs, load average 7 on 2
//!   shared cores): merging a 1 GiB incremental into a 4 GiB full takes 9.1 s as a prune job
//!   (8.9-9.5) against 1.0 s for `qemu-img commit -d` alone on copies of the same images;
//!   the difference is almost all the read-back of the merged 4 GiB image against the
//!   child's checksums (what keeps them true), plus the estimate's `qemu-img map`s, `check -r
//!   leaks`, the fsynced rename and the catalog transactions.
//! - A middle point goes by `rebase -b BELOW CHILD` in safe mode: qemu-img copies into the
//!   child each cluster where the old and the new backing chains differ (QEMU reads only the
//!   layers between, since the new backing is in the old chain) and writes the new backing
//!   name last, so the child is readable and equal at every moment, and an interrupted rebase
//!   is simply run again.
//! - Both are one process with a PID the journal records; a killed hub leaves at most an
//!   orphan qemu-img that the next start stops (checked in `/proc/PID/cmdline`) before it runs
//!   the step again. A storage-daemon job would add pause/resume and progress, at the price of
//!   a second long-lived daemon per merge and QMP plumbing; nothing here needs pausing within a
//!   step (cancel acts between steps).
//!
//! # Crash safety (every remaining point readable and equal to its instant)
//! - delete: the points leave the catalog first (one transaction with the journal), then
//!   their files go; a crash in between leaves files the journal names, deleted at start-up.
//! - rebase: the child is rewritten in place only by qemu-img's safe rebase (equal at every
//!   moment); it is read back against its own sidecar before the catalog names its new parent
//!   (a mismatch undoes the header change with `rebase -u` back onto the old parent, whose
//!   files are still there); the rebased-over points leave the catalog in that same
//!   transaction; their files go after.
//! - merge: the merged points leave the catalog before the commit starts (the base stops
//!   being its own instant as soon as it is written); the merged base is read back against
//!   the child's sidecar before it is renamed over the child; a crash before the rename
//!   leaves the child reading through its old (unchanged) layers and the written base: equal;
//!   the start-up commits again (idempotent) and renames.
//! - Checksums stay true: a point's sidecar is whole-disk (inherited cells resolved), and no
//!   surviving point's bytes change, so every sidecar still describes its point; the read-back
//!   proves it for the rewritten ones.
//! - Never delete data on a database error: every file removal comes after the transaction
//!   that records it.
//!
//! # Test knob
//! `SENDENSE_HUB_TEST_PRUNE_PAUSE=<moment>` (environment; never set in production) makes a
//! running prune stop at a named moment, after writing `<data dir>/prune-paused` with the
//! moment's name, until that file is removed (so a test can cancel the job there and let the
//! step finish) or for good (a test SIGKILLs the hub exactly there): `before-copy` (journal
//! written, catalog of a merge changed, no image written yet), `during-copy` (qemu-img started
//! and recorded; it keeps running), `after-copy` (qemu-img done, nothing renamed or
//! cataloged), `after-rename` (merge: the base renamed over the child, catalog not yet
//! updated), `before-delete` (catalog done, files of removed points still there).
//! `SENDENSE_HUB_TEST_PRUNE_RATE=<bytes/s>` rate-limits `qemu-img commit` so `during-copy` is
//! truly in the middle of the copy. The start-up recovery never pauses.

use super::journal::{self, Step};
use super::qemu;
use crate::db::{Db, DbError};
use crate::events::{JobLog, Level};
use crate::manifest::Manifest;
use crate::readback::{ReadBack, ReadBackError};
use crate::repository::RepoError;
use sendense_shared::api::Integrity;
use sendense_shared::ids::{BackupId, DiskKey};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use tokio_util::sync::CancellationToken;

/// The test knob (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct Knob {
    pub pause: Option<String>,
    pub rate: Option<u64>,
    pub marker: PathBuf,
}

impl Knob {
    /// From `SENDENSE_HUB_TEST_PRUNE_PAUSE` / `_RATE`; the marker file in `data_dir`.
    pub fn from_env(data_dir: &Path) -> Knob {
        let pause = std::env::var("SENDENSE_HUB_TEST_PRUNE_PAUSE")
            .ok()
            .filter(|s| !s.is_empty());
        let rate = std::env::var("SENDENSE_HUB_TEST_PRUNE_RATE")
            .ok()
            .and_then(|s| s.parse().ok());
        if pause.is_some() || rate.is_some() {
            tracing::warn!(
                ?pause,
                ?rate,
                "TEST KNOB: prune jobs pause or are slowed (SENDENSE_HUB_TEST_PRUNE_*)"
            );
        }
        Knob {
            pause,
            rate,
            marker: data_dir.join("prune-paused"),
        }
    }

    async fn at(&self, moment: &str) {
        if self.pause.as_deref() == Some(moment) {
            tracing::warn!(
                moment,
                "TEST KNOB: prune paused until its marker file is removed"
            );
            let _ = std::fs::write(&self.marker, moment);
            while self.marker.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            tracing::warn!(moment, "TEST KNOB: prune goes on");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("database while {doing}")]
    Db {
        doing: &'static str,
        #[source]
        source: DbError,
    },
    #[error(transparent)]
    Qemu(#[from] RepoError),
    #[error(transparent)]
    ReadBack(#[from] ReadBackError),
    #[error("reading the checksums of {point} disk {disk}")]
    Manifest {
        point: BackupId,
        disk: DiskKey,
        #[source]
        source: crate::manifest::ManifestError,
    },
    #[error(
        "{point} disk {disk} does not read back equal to its checksums after the {what}: {detail}; \
         {undo}"
    )]
    Mismatch {
        point: BackupId,
        disk: DiskKey,
        what: &'static str,
        detail: String,
        undo: &'static str,
    },
    #[error("{point} disk {disk}: {reason}")]
    Chain {
        point: BackupId,
        disk: DiskKey,
        reason: String,
    },
    #[error("cannot rename {} over {}", from.display(), to.display())]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn dbe(doing: &'static str) -> impl FnOnce(DbError) -> StepError {
    move |source| StepError::Db { doing, source }
}

/// What a step needs.
pub struct Engine<'a> {
    pub db: &'a Db,
    pub readback: &'a ReadBack,
    pub log: &'a JobLog,
    pub knob: &'a Knob,
}

/// What a finished step did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    pub bytes_freed: u64,
}

impl Engine<'_> {
    async fn event(
        &self,
        prune_id: &str,
        on: Option<&BackupId>,
        level: Level,
        step: &str,
        msg: &str,
    ) {
        match on {
            Some(b) => {
                self.log
                    .record(b, Some(prune_id), level, step, msg, None)
                    .await
            }
            None => tracing::info!(prune_id, step, "{msg}"),
        }
    }

    /// Runs `step` (journal row `seq` of `prune_id`) from `phase` to `done`.
    pub async fn run_step(
        &self,
        prune_id: &str,
        seq: u32,
        step: &Step,
        phase: &str,
    ) -> Result<Outcome, StepError> {
        match step {
            Step::Delete { points, files } => {
                if phase == journal::PLANNED {
                    self.db
                        .step_drop_points(prune_id, seq, points, journal::STARTED)
                        .await
                        .map_err(dbe("dropping points from the catalog"))?;
                }
                self.knob.at("before-delete").await;
                let freed = qemu::remove_all(files)?;
                self.done(prune_id, seq).await?;
                Ok(Outcome { bytes_freed: freed })
            }
            Step::Rebase {
                child,
                drop,
                disks,
                files,
            } => {
                if phase == journal::PLANNED {
                    self.db
                        .set_step_phase(prune_id, seq, journal::STARTED)
                        .await
                        .map_err(dbe("starting a rebase step"))?;
                }
                if phase == journal::PLANNED || phase == journal::STARTED {
                    self.knob.at("before-copy").await;
                    for d in disks {
                        if qemu::backing_of(&d.image).await? == d.new_backing {
                            continue;
                        }
                        let run = qemu::rebase(&d.image, d.new_backing.as_deref())?;
                        self.running(prune_id, seq, &run).await?;
                        run.wait().await?;
                        self.db
                            .set_step_pid(prune_id, seq, None)
                            .await
                            .map_err(dbe("clearing a step's qemu-img"))?;
                        qemu::repair_leaks(&d.image).await?;
                    }
                    self.knob.at("after-copy").await;
                    for d in disks {
                        if let Err(e) = self.verify(child, d.disk_key, &d.image, "rebase").await {
                            // Back onto the old parent: its files are all still there, and
                            // every cluster the rebase copied equals what it held.
                            let mut undone = true;
                            for d in disks {
                                if let Some(old) = &d.old_backing
                                    && qemu::rebase_unsafe(&d.image, old).await.is_err()
                                {
                                    undone = false;
                                }
                            }
                            let _ = self.db.set_step_phase(prune_id, seq, journal::FAILED).await;
                            return Err(match e {
                                StepError::Mismatch {
                                    point,
                                    disk,
                                    what,
                                    detail,
                                    ..
                                } => StepError::Mismatch {
                                    point,
                                    disk,
                                    what,
                                    detail,
                                    undo: if undone {
                                        "the child was put back onto its old parent (nothing removed)"
                                    } else {
                                        "the child could not be put back onto its old parent"
                                    },
                                },
                                e => e,
                            });
                        }
                    }
                    let cat: Vec<_> = disks
                        .iter()
                        .map(|d| (d.disk_key, d.new_parent.clone(), d.new_backing.clone()))
                        .collect();
                    self.db
                        .step_rebased(prune_id, seq, child, &cat, drop, journal::CATALOGED)
                        .await
                        .map_err(dbe("recording the rebased point"))?;
                }
                self.knob.at("before-delete").await;
                let freed = qemu::remove_all(files)?;
                self.done(prune_id, seq).await?;
                Ok(Outcome { bytes_freed: freed })
            }
            Step::Merge {
                child,
                drop,
                disks,
                files,
            } => {
                if phase == journal::PLANNED {
                    self.db
                        .step_drop_points(prune_id, seq, drop, journal::STARTED)
                        .await
                        .map_err(dbe("dropping merged points from the catalog"))?;
                }
                if phase == journal::PLANNED || phase == journal::STARTED {
                    self.knob.at("before-copy").await;
                    for d in disks {
                        if !d.base.exists() {
                            // Renamed already (a step finished after a crash), or lost.
                            if qemu::backing_of(&d.image).await?.is_some() {
                                return Err(StepError::Chain {
                                    point: child.clone(),
                                    disk: d.disk_key,
                                    reason: format!(
                                        "the merge base {} is gone while {} still has a backing file",
                                        d.base.display(),
                                        d.image.display()
                                    ),
                                });
                            }
                            continue;
                        }
                        let run = qemu::commit(&d.image, &d.base, self.knob.rate)?;
                        self.running(prune_id, seq, &run).await?;
                        run.wait().await?;
                        self.db
                            .set_step_pid(prune_id, seq, None)
                            .await
                            .map_err(dbe("clearing a step's qemu-img"))?;
                        qemu::repair_leaks(&d.base).await?;
                        self.knob.at("after-copy").await;
                        if let Err(e) = self.verify(child, d.disk_key, &d.base, "merge").await {
                            let _ = self.db.set_step_phase(prune_id, seq, journal::FAILED).await;
                            return Err(e);
                        }
                        qemu::rename_durably(&d.base, &d.image).map_err(|source| {
                            StepError::Rename {
                                from: d.base.clone(),
                                to: d.image.clone(),
                                source,
                            }
                        })?;
                    }
                    self.knob.at("after-rename").await;
                    self.db
                        .step_merged(prune_id, seq, child, journal::CATALOGED)
                        .await
                        .map_err(dbe("recording the merged point"))?;
                }
                self.knob.at("before-delete").await;
                let freed = qemu::remove_all(files)?;
                self.done(prune_id, seq).await?;
                self.event(
                    prune_id,
                    Some(child),
                    Level::Info,
                    "prune_merged",
                    &format!("{} merged into this point, now a full", drop.len()),
                )
                .await;
                Ok(Outcome { bytes_freed: freed })
            }
        }
    }

    async fn running(
        &self,
        prune_id: &str,
        seq: u32,
        run: &qemu::Running,
    ) -> Result<(), StepError> {
        self.db
            .set_step_pid(prune_id, seq, Some(run.pid))
            .await
            .map_err(dbe("recording a step's qemu-img"))?;
        self.knob.at("during-copy").await;
        Ok(())
    }

    async fn done(&self, prune_id: &str, seq: u32) -> Result<(), StepError> {
        self.db
            .set_step_phase(prune_id, seq, journal::DONE)
            .await
            .map_err(dbe("finishing a prune step"))
    }

    /// Reads `image` (served alone or with its chain) back against the sidecar of `point`'s
    /// disk. A point without a sidecar (legacy) or already corrupt is not re-verified (there is
    /// nothing true to compare with), said in its events.
    async fn verify(
        &self,
        point: &BackupId,
        disk: DiskKey,
        image: &Path,
        what: &'static str,
    ) -> Result<(), StepError> {
        let b = self
            .db
            .get_backup(point)
            .await
            .map_err(dbe("reading the point to re-verify"))?;
        let rows = self
            .db
            .backup_disks(point)
            .await
            .map_err(dbe("reading the point's disks"))?;
        let row = rows.iter().find(|r| r.result.disk_key == disk);
        let Some((path, digest)) =
            row.and_then(|r| Some((r.manifest_path.clone()?, r.manifest_blake3.clone())))
        else {
            self.log
                .record(
                    point,
                    None,
                    Level::Warn,
                    "prune_reverify",
                    &format!("disk {disk}: no checksum sidecar: the {what} is not re-verified"),
                    Some(disk),
                )
                .await;
            return Ok(());
        };
        if b.integrity == Integrity::Corrupt {
            return Ok(());
        }
        let m = Manifest::read(Path::new(&path), digest.as_deref())
            .await
            .map_err(|source| StepError::Manifest {
                point: point.clone(),
                disk,
                source,
            })?;
        let read = AtomicU64::new(0);
        let rep = self
            .readback
            .check(image, &m, &CancellationToken::new(), &read)
            .await?;
        if !rep.is_clean() {
            return Err(StepError::Mismatch {
                point: point.clone(),
                disk,
                what,
                detail: rep.describe_mismatches(),
                undo: "nothing was renamed or removed",
            });
        }
        self.log
            .record(point, None, Level::Info, "prune_reverify",
                &format!("disk {disk}: after the {what} the image reads back equal to its checksums ({} cells)", rep.cells), Some(disk))
            .await;
        Ok(())
    }
}
