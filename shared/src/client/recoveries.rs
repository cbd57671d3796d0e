//! Instant recoveries, console side: `POST /api/v1/recoveries`, `GET /api/v1/recoveries[/{id}]`,
//! `POST /api/v1/recoveries/{id}/cancel`.

use super::{ClientError, HubClient, json_body};
use crate::api::{Recovery, RecoveryRequest};

impl HubClient {
    /// `POST /api/v1/recoveries`: the hub answers 201 or 202 with the new recovery.
    pub async fn start_recovery(&self, req: &RecoveryRequest) -> Result<Recovery, ClientError> {
        self.send(
            "POST",
            "/api/v1/recoveries",
            || {
                format!(
                    "recovery of backup {} as VM {:?} on node {:?}",
                    req.backup_id, req.vm_name, req.node
                )
            },
            Some(json_body(req)),
        )
        .await
    }

    /// `GET /api/v1/recoveries`.
    pub async fn recoveries(&self) -> Result<Vec<Recovery>, ClientError> {
        self.get("/api/v1/recoveries").await
    }

    pub async fn recovery(&self, id: &str) -> Result<Recovery, ClientError> {
        self.send(
            "GET",
            &format!("/api/v1/recoveries/{id}"),
            || format!("recovery {id}"),
            None,
        )
        .await
    }

    /// `POST /api/v1/recoveries/{id}/speed`: a new bound of every disk's stream (0: none).
    pub async fn recovery_speed(&self, id: &str, speed_bps: u64) -> Result<Recovery, ClientError> {
        let body = serde_json::to_vec(&crate::api::RecoverySpeed { speed_bps })
            .expect("a speed serialises");
        self.send(
            "POST",
            &format!("/api/v1/recoveries/{id}/speed"),
            || format!("recovery {id}"),
            Some(body),
        )
        .await
    }

    /// `POST /api/v1/recoveries/{id}/cancel`: the VM is stopped and its overlays removed.
    pub async fn cancel_recovery(&self, id: &str) -> Result<Recovery, ClientError> {
        self.send(
            "POST",
            &format!("/api/v1/recoveries/{id}/cancel"),
            || format!("recovery {id}"),
            None,
        )
        .await
    }
}
