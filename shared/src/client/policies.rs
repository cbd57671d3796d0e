//! Policies, their runs, retention points, protection, prune jobs and repository space, console
//! side (the endpoints of [`crate::api::policies`]).
//!
//! Where the contract leaves an answer's shape open, these methods take what a hub may sensibly
//! answer rather than guess one: `run-now` may answer the runs it queued (a list or one run) or
//! something else (then no runs are returned, and the caller re-reads the runs); `protect` may
//! answer the backup or nothing (then the backup is read back); the points of a VM may come as
//! a list or as a [`PrunePlan`]; a delete's body is not read.

use super::{ClientError, HubClient, json_body};
use crate::api::{
    Backup, Policy, PolicyRequest, PolicyRun, PruneJob, PrunePlan, PrunePoint, PruneRequest,
    RepositorySpace,
};
use crate::ids::BackupId;
use serde::Deserialize;

/// What `run-now` answers (see the module doc).
#[derive(Deserialize)]
#[serde(untagged)]
enum RunNowAnswer {
    Runs(Vec<PolicyRun>),
    Run(Box<PolicyRun>),
    // Anything else (e.g. the policy): taken, not read.
    Other(#[allow(dead_code)] serde::de::IgnoredAny),
}

/// What `GET /api/v1/vms/{name}/points` answers (see the module doc).
#[derive(Deserialize)]
#[serde(untagged)]
enum PointsAnswer {
    List(Vec<PrunePoint>),
    Plan(PrunePlan),
}

/// A path segment with the characters that would change the path escaped (VM names are
/// checked names, but a policy id or a name typed on the command line may be anything).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl HubClient {
    /// `GET /api/v1/policies`.
    pub async fn policies(&self) -> Result<Vec<Policy>, ClientError> {
        self.get("/api/v1/policies").await
    }

    /// `GET /api/v1/policies/{id}`.
    pub async fn policy(&self, id: &str) -> Result<Policy, ClientError> {
        self.send(
            "GET",
            &format!("/api/v1/policies/{}", segment(id)),
            || format!("policy {id:?}"),
            None,
        )
        .await
    }

    /// `POST /api/v1/policies`: the stored policy (201).
    pub async fn create_policy(&self, req: &PolicyRequest) -> Result<Policy, ClientError> {
        self.send(
            "POST",
            "/api/v1/policies",
            || format!("policy {:?}", req.name),
            Some(json_body(req)),
        )
        .await
    }

    /// `PUT /api/v1/policies/{id}`: a whole replacement; the stored policy.
    pub async fn update_policy(
        &self,
        id: &str,
        req: &PolicyRequest,
    ) -> Result<Policy, ClientError> {
        self.send(
            "PUT",
            &format!("/api/v1/policies/{}", segment(id)),
            || format!("policy {id:?}"),
            Some(json_body(req)),
        )
        .await
    }

    /// `DELETE /api/v1/policies/{id}` (the answer's body, if any, is not read).
    pub async fn delete_policy(&self, id: &str) -> Result<(), ClientError> {
        self.call(
            "DELETE",
            &format!("/api/v1/policies/{}", segment(id)),
            || format!("policy {id:?}"),
            None,
        )
        .await
        .map(|_| ())
    }

    /// `POST /api/v1/policies/{id}/run-now`: the runs it queued, when the hub answers them.
    pub async fn run_policy_now(&self, id: &str) -> Result<Vec<PolicyRun>, ClientError> {
        let answer: RunNowAnswer = self
            .send(
                "POST",
                &format!("/api/v1/policies/{}/run-now", segment(id)),
                || format!("policy {id:?}"),
                None,
            )
            .await?;
        Ok(match answer {
            RunNowAnswer::Runs(runs) => runs,
            RunNowAnswer::Run(run) => vec![*run],
            RunNowAnswer::Other(_) => Vec::new(),
        })
    }

    /// `GET /api/v1/policies/{id}/runs`: its recent runs.
    pub async fn policy_runs(&self, id: &str) -> Result<Vec<PolicyRun>, ClientError> {
        self.send(
            "GET",
            &format!("/api/v1/policies/{}/runs", segment(id)),
            || format!("policy {id:?}"),
            None,
        )
        .await
    }

    /// `GET /api/v1/vms/{name}/points`: the VM's points with the rule that keeps each.
    pub async fn vm_points(&self, vm: &str) -> Result<Vec<PrunePoint>, ClientError> {
        let answer: PointsAnswer = self
            .send(
                "GET",
                &format!("/api/v1/vms/{}/points", segment(vm)),
                || format!("VM {vm:?}"),
                None,
            )
            .await?;
        Ok(match answer {
            PointsAnswer::List(points) => points,
            PointsAnswer::Plan(plan) => plan.points,
        })
    }

    /// `POST /api/v1/backups/{id}/protect` (`protect`) or `.../unprotect`: the backup after.
    pub async fn set_protected(&self, id: &BackupId, protect: bool) -> Result<Backup, ClientError> {
        let verb = if protect { "protect" } else { "unprotect" };
        let (url, bytes) = self
            .call(
                "POST",
                &format!("/api/v1/backups/{}/{verb}", segment(&id.0)),
                || format!("backup {id}"),
                None,
            )
            .await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return self.backup(id).await;
        }
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode { url, source })
    }

    /// `POST /api/v1/prune?dry_run=true`: what a prune of the VM would keep and remove.
    pub async fn prune_plan(&self, req: &PruneRequest) -> Result<PrunePlan, ClientError> {
        let req = PruneRequest {
            dry_run: true,
            ..req.clone()
        };
        self.send(
            "POST",
            "/api/v1/prune?dry_run=true",
            || format!("prune of VM {:?}", req.vm_name),
            Some(json_body(&req)),
        )
        .await
    }

    /// `POST /api/v1/prune`: the prune job it started (202).
    pub async fn start_prune(&self, req: &PruneRequest) -> Result<PruneJob, ClientError> {
        let req = PruneRequest {
            dry_run: false,
            ..req.clone()
        };
        self.send(
            "POST",
            "/api/v1/prune",
            || format!("prune of VM {:?}", req.vm_name),
            Some(json_body(&req)),
        )
        .await
    }

    /// `GET /api/v1/prune`.
    pub async fn prune_jobs(&self) -> Result<Vec<PruneJob>, ClientError> {
        self.get("/api/v1/prune").await
    }

    /// `GET /api/v1/prune/{id}`.
    pub async fn prune_job(&self, id: &str) -> Result<PruneJob, ClientError> {
        self.send(
            "GET",
            &format!("/api/v1/prune/{}", segment(id)),
            || format!("prune job {id}"),
            None,
        )
        .await
    }

    /// `POST /api/v1/prune/{id}/cancel`.
    pub async fn cancel_prune(&self, id: &str) -> Result<PruneJob, ClientError> {
        self.send(
            "POST",
            &format!("/api/v1/prune/{}/cancel", segment(id)),
            || format!("prune job {id}"),
            None,
        )
        .await
    }

    /// `GET /api/v1/repositories/{id}/space`: free space, per-VM use and the forecast.
    pub async fn repository_space(&self, id: &str) -> Result<RepositorySpace, ClientError> {
        self.send(
            "GET",
            &format!("/api/v1/repositories/{}/space", segment(id)),
            || format!("repository {id:?}"),
            None,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::segment;

    #[test]
    fn path_segments_cannot_leave_their_place() {
        assert_eq!(segment("pol-1_a.b"), "pol-1_a.b");
        assert_eq!(segment("../x y/?"), "..%2Fx%20y%2F%3F");
    }
}
