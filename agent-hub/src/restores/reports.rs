//! The node's reports of a restore: progress about once a second, and its end (checked
//! against the point's stored checksums).

use super::truth::Truth;
use super::{Outcome, RestoreError, Restores};
use sendense_shared::api::{HubEvent, JobStatus, Restore, RestoreCompletion, RestoreProgress};

impl Restores {
    /// `POST /api/v1/restores/{id}/progress` (node → hub).
    pub async fn progress(&self, id: &str, p: RestoreProgress) -> Result<Restore, RestoreError> {
        let r = self.get(id).await?;
        if r.status.is_terminal() || r.status == JobStatus::Cancelling {
            return Err(RestoreError::WrongState {
                id: id.to_string(),
                status: r.status.as_str(),
                what: "progress is accepted only while the restore runs; stop writing",
            });
        }
        if p.bytes_done > p.bytes_total {
            return Err(RestoreError::Invalid {
                detail: format!(
                    "bytes_done: {} exceeds bytes_total {}",
                    p.bytes_done, p.bytes_total
                ),
            });
        }
        if let Some(live) = self.live(id) {
            live.touch();
        }
        self.deps()
            .db
            .set_restore_progress(id, p.bytes_done, p.bytes_total)
            .await
            .map_err(Self::db_err(id, "recording progress"))?;
        let r = self.get(id).await?;
        self.deps()
            .log
            .bus()
            .publish(HubEvent::Restore { restore: r.clone() });
        Ok(r)
    }

    /// `POST /api/v1/restores/{id}/complete` (node → hub): the node's end of the restore.
    pub async fn complete(&self, id: &str, c: RestoreCompletion) -> Result<Restore, RestoreError> {
        let r = self.get(id).await?;
        if r.status.is_terminal() {
            // A repeated report (the node retrying after a timeout) of the same end.
            let same = matches!(
                (c.status, r.status),
                (JobStatus::Completed, JobStatus::Completed)
                    | (JobStatus::Cancelled, JobStatus::Cancelled)
            );
            if same {
                return Ok(r);
            }
            return Err(RestoreError::WrongState {
                id: id.to_string(),
                status: r.status.as_str(),
                what: "the restore ended already",
            });
        }
        let completed = c.status == JobStatus::Completed;
        let outcome = match c.status {
            JobStatus::Completed => Outcome::Completed {
                bytes_written: c.bytes_written,
                verified_ranges: c.verified_ranges,
            },
            JobStatus::Cancelled if r.status == JobStatus::Cancelling => Outcome::Cancelled,
            JobStatus::Failed | JobStatus::Cancelled => Outcome::Failed(format!(
                "node: {}",
                c.error_message
                    .unwrap_or_else(|| format!("restore {}", c.status.as_str()))
            )),
            other => {
                return Err(RestoreError::Invalid {
                    detail: format!(
                        "status: {:?} is not an end (completed, failed or cancelled)",
                        other.as_str()
                    ),
                });
            }
        };
        let Some(live) = self.live(id) else {
            return Err(RestoreError::WrongState {
                id: id.to_string(),
                status: r.status.as_str(),
                what: "this hub process does not run it",
            });
        };
        live.touch();
        // What the node wrote, against the point's stored checksums: only then completed.
        let outcome = if completed {
            match self.check_truth(&r, c.grid.as_ref()).await {
                Truth::Differs(cause) => Outcome::Failed(cause),
                truth => {
                    self.record_truth(&live, &truth).await;
                    outcome
                }
            }
        } else {
            outcome
        };
        let mut held = live.held.lock().await;
        self.finish(&live, &mut held, outcome).await;
        drop(held);
        self.get(id).await
    }
}
