//! Verify jobs and repository settings, console side.

use super::{ClientError, HubClient, json_body};
use crate::api::{JobEvent, Repository, RepositoryUpdate, VerifyJob, VerifyRequest};

impl HubClient {
    /// `POST /api/v1/verify`: the hub answers 202 with the new verify job.
    pub async fn start_verify(&self, req: &VerifyRequest) -> Result<VerifyJob, ClientError> {
        self.send(
            "POST",
            "/api/v1/verify",
            || match (&req.backup_id, &req.vm_name, &req.repository_id) {
                (Some(b), _, _) => format!("verify of backup {b}"),
                (_, Some(v), _) => format!("verify of VM {v:?}"),
                (_, _, Some(r)) => format!("verify of repository {r:?}"),
                _ => "verify".into(),
            },
            Some(json_body(req)),
        )
        .await
    }

    /// `GET /api/v1/verify`.
    pub async fn verify_jobs(&self) -> Result<Vec<VerifyJob>, ClientError> {
        self.get("/api/v1/verify").await
    }

    pub async fn verify_job(&self, id: &str) -> Result<VerifyJob, ClientError> {
        self.send(
            "GET",
            &format!("/api/v1/verify/{id}"),
            || format!("verify job {id}"),
            None,
        )
        .await
    }

    /// `GET /api/v1/verify/{id}/events`: its events on every point it read.
    pub async fn verify_events(&self, id: &str) -> Result<Vec<JobEvent>, ClientError> {
        self.send(
            "GET",
            &format!("/api/v1/verify/{id}/events"),
            || format!("verify job {id}"),
            None,
        )
        .await
    }

    /// `POST /api/v1/verify/{id}/cancel`.
    pub async fn cancel_verify(&self, id: &str) -> Result<VerifyJob, ClientError> {
        self.send(
            "POST",
            &format!("/api/v1/verify/{id}/cancel"),
            || format!("verify job {id}"),
            None,
        )
        .await
    }

    /// `PUT /api/v1/repositories/{id}`: its verify interval.
    pub async fn update_repository(
        &self,
        id: &str,
        req: &RepositoryUpdate,
    ) -> Result<Repository, ClientError> {
        self.send(
            "PUT",
            &format!("/api/v1/repositories/{id}"),
            || format!("repository {id:?}"),
            Some(json_body(req)),
        )
        .await
    }
}
