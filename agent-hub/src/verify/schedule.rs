//! Scheduled verification: a repository with `verify_interval_secs` gets a verify job (trigger
//! `schedule`) once its last scheduled job ended that long ago, or at once when it never had
//! one. The hub checks every minute ([`spawn`]); [`Scheduler::tick`] is one check, at the
//! [`super::Clock`]'s time, so tests drive it without waiting.

use super::{Trigger, Verifier, VerifyError};
use chrono::TimeDelta;
use sendense_shared::api::{VerifyJob, VerifyRequest};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the hub looks for repositories due a verification.
pub const CHECK_EVERY: Duration = Duration::from_secs(60);

/// Starts the scheduled verify jobs of the repositories that are due.
#[derive(Clone)]
pub struct Scheduler {
    verifier: Verifier,
}

impl Scheduler {
    pub fn new(verifier: Verifier) -> Self {
        Scheduler { verifier }
    }

    /// One check: a job for every repository that is due and has none running. Answers the
    /// jobs started.
    pub async fn tick(&self) -> Result<Vec<VerifyJob>, VerifyError> {
        let deps = self.verifier.deps();
        let now = deps.clock.now();
        let repos = deps
            .db
            .list_repositories()
            .await
            .map_err(super::db_err("listing repositories"))?;
        let mut started = Vec::new();
        for r in repos {
            let Some(interval) = r.verify_interval_secs else {
                continue;
            };
            let due = match r.last_verified_at {
                None => true,
                Some(last) => {
                    let every = TimeDelta::seconds(i64::try_from(interval).unwrap_or(i64::MAX));
                    last.checked_add_signed(every).is_none_or(|at| at <= now)
                }
            };
            if !due
                || self
                    .verifier
                    .running_scope(&format!("repository:{}", r.id))
                    .await?
            {
                continue;
            }
            let req = VerifyRequest {
                repository_id: Some(r.id.clone()),
                ..Default::default()
            };
            started.push(self.verifier.start(&req, Trigger::Schedule).await?);
        }
        Ok(started)
    }
}

/// Runs [`Scheduler::tick`] every [`CHECK_EVERY`] until `shutdown` fires.
pub fn spawn(s: Scheduler, tasks: &tokio_util::task::TaskTracker, shutdown: CancellationToken) {
    tasks.spawn(async move {
        let mut every = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            match s.tick().await {
                Ok(jobs) => {
                    for j in jobs {
                        tracing::info!(verify_id = %j.verify_id, scope = %j.scope,
                            "scheduled verify job started");
                    }
                }
                Err(e) => tracing::warn!(error = %sendense_shared::errors::chain(&e),
                    "scheduled verification check failed"),
            }
        }
    });
}
