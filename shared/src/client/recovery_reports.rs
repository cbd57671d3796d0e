//! Instant recoveries, node side: the progress and completion reports of a recovery the node
//! runs (`/api/v1/recoveries/{id}/progress` and `/complete`), as for restores.

use super::{ClientError, HubClient};
use crate::api::{NodeRecoveryState, RecoveryCompletion};

impl HubClient {
    /// `POST /api/v1/recoveries/{id}/progress`.
    pub async fn recovery_progress(
        &self,
        id: &str,
        report: &NodeRecoveryState,
    ) -> Result<(), ClientError> {
        self.report(
            &format!("/api/v1/recoveries/{id}/progress"),
            || format!("recovery {id}"),
            report,
        )
        .await
    }

    /// `POST /api/v1/recoveries/{id}/complete`.
    pub async fn recovery_complete(
        &self,
        id: &str,
        report: &RecoveryCompletion,
    ) -> Result<(), ClientError> {
        self.report(
            &format!("/api/v1/recoveries/{id}/complete"),
            || format!("recovery {id}"),
            report,
        )
        .await
    }
}
