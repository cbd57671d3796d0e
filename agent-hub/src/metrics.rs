//! Prometheus metrics of the hub: `GET /api/v1/metrics` (admin token; the text exposition
//! format), scraped as `deploy/prometheus/prometheus.yml` shows.
//!
//! Crate: `prometheus` (the TiKV client, maintained, no default features: no protobuf, no
//! process collector) for the registry, the metric types and the text encoder; it writes the
//! classic text format that `promtool check metrics` reads.
//!
//! Two kinds of figures:
//! - **counted as they happen** (counters, the duration histogram): [`spawn`] follows the
//!   hub's event bus and counts every job that reaches its end once (backup, restore, verify,
//!   prune), its duration, the bytes of completed backups, verification failures and the
//!   database's outages. The bus carries every change, so no job code knows about metrics.
//! - **read at scrape time** (gauges): active jobs, points and the age of the newest good point
//!   per VM, NBD ports free/held/squatted, live qemu-nbd processes, tunnels per node, free
//!   bytes per repository, queued policy runs. They are the catalog's and the system's state
//!   now, so they cannot drift from what the API answers.
//!
//! Labels are bounded: kinds, statuses, VM, node and repository names; never a job id.

use crate::db::Db;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use sendense_shared::api::{HubEvent, JobStatus, TunnelStateKind};
use std::collections::HashSet;
use std::sync::Mutex;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

/// The hub's metrics (one per hub, shared through `Hub`).
pub struct Metrics {
    registry: Registry,
    jobs_ended: IntCounterVec,
    job_duration: HistogramVec,
    backup_bytes: IntCounterVec,
    verification_failures: IntCounterVec,
    database_outages: IntCounter,
    events_lost: IntCounter,
    /// Jobs already counted as ended (a point marked corrupt later is published again).
    counted: Mutex<HashSet<String>>,
}

/// Job durations: seconds to hours.
const DURATION_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
];

/// Ended jobs remembered for de-duplication before the oldest are forgotten.
const COUNTED_MAX: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics registry")]
    Registry(#[from] prometheus::Error),
    #[error("reading the catalog for the metrics")]
    Db(#[from] crate::db::DbError),
    #[error("reading the NBD ports for the metrics")]
    Ports(#[from] crate::ports::PortError),
}

fn must<T>(r: Result<T, prometheus::Error>) -> T {
    // Only fails on an invalid name or a duplicate registration: a bug of this module, caught
    // by its tests before any hub runs.
    r.expect("metric definition")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let jobs_ended = must(IntCounterVec::new(
            Opts::new(
                "sendense_jobs_ended_total",
                "Jobs that reached their end, by kind and end status",
            ),
            &["kind", "status"],
        ));
        let job_duration = must(HistogramVec::new(
            HistogramOpts::new(
                "sendense_job_duration_seconds",
                "Duration of ended jobs from start to end, by kind and end status",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["kind", "status"],
        ));
        let backup_bytes = must(IntCounterVec::new(
            Opts::new(
                "sendense_backup_bytes_total",
                "Bytes of completed backups: transferred (read and written) or skipped \
                 (holes, unchanged areas), by backup type",
            ),
            &["what", "backup_type"],
        ));
        let verification_failures = must(IntCounterVec::new(
            Opts::new(
                "sendense_verification_failures_total",
                "Read-backs that found bytes unequal to the checksums: at a backup's end \
                 (finalize) or by a verify job",
            ),
            &["source"],
        ));
        let database_outages = must(IntCounter::new(
            "sendense_database_outages_total",
            "Times a job's end had to wait for an unreachable database",
        ));
        let events_lost = must(IntCounter::new(
            "sendense_metrics_events_lost_total",
            "Hub events the metrics missed (the bus overflowed); counters may be low by this",
        ));
        for c in [
            Box::new(jobs_ended.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(job_duration.clone()),
            Box::new(backup_bytes.clone()),
            Box::new(verification_failures.clone()),
            Box::new(database_outages.clone()),
            Box::new(events_lost.clone()),
        ] {
            must(registry.register(c));
        }
        Metrics {
            registry,
            jobs_ended,
            job_duration,
            backup_bytes,
            verification_failures,
            database_outages,
            events_lost,
            counted: Mutex::new(HashSet::new()),
        }
    }

    /// Whether `id` ends now for the first time (and remembers it).
    fn first_end(&self, id: String) -> bool {
        let mut c = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        if c.len() >= COUNTED_MAX {
            c.clear();
        }
        c.insert(id)
    }

    fn ended(&self, kind: &str, status: JobStatus, secs: Option<f64>) {
        self.jobs_ended
            .with_label_values(&[kind, status.as_str()])
            .inc();
        if let Some(s) = secs {
            self.job_duration
                .with_label_values(&[kind, status.as_str()])
                .observe(s.max(0.0));
        }
    }

    /// Counts what one event says has happened.
    pub fn observe(&self, ev: &HubEvent) {
        type At = chrono::DateTime<chrono::Utc>;
        // (kind, id, status, from, end) of a job event.
        let job: Option<(&str, &str, JobStatus, At, Option<At>)> = match ev {
            HubEvent::Backup { backup: b } => Some((
                "backup",
                &b.backup_id.0,
                b.status,
                b.started_at.unwrap_or(b.created_at),
                b.completed_at,
            )),
            HubEvent::Restore { restore: r } => Some((
                "restore",
                &r.restore_id,
                r.status,
                r.created_at,
                r.completed_at,
            )),
            HubEvent::Recovery { recovery: r } => Some((
                "recovery",
                &r.recovery_id,
                r.status,
                r.created_at,
                r.completed_at,
            )),
            HubEvent::Verify { verify: v } => Some((
                "verify",
                &v.verify_id,
                v.status,
                v.started_at.unwrap_or(v.created_at),
                v.completed_at,
            )),
            HubEvent::Prune { prune: p } => Some((
                "prune",
                &p.prune_id,
                p.status,
                p.started_at.unwrap_or(p.created_at),
                p.completed_at,
            )),
            HubEvent::JobEvent { event } => {
                match event.step.as_str() {
                    "checksums_mismatch" => self
                        .verification_failures
                        .with_label_values(&["backup"])
                        .inc(),
                    "database_wait" => self.database_outages.inc(),
                    _ => {}
                }
                None
            }
            HubEvent::Lagged { lost } => {
                self.events_lost.inc_by(*lost);
                None
            }
            _ => None,
        };
        let Some((kind, id, status, from, end)) = job else {
            return;
        };
        if !status.is_terminal() || !self.first_end(format!("{kind}:{id}")) {
            return;
        }
        let secs = end.map(|end| (end - from).num_milliseconds() as f64 / 1000.0);
        self.ended(kind, status, secs);
        match ev {
            HubEvent::Backup { backup: b } if b.status == JobStatus::Completed => {
                let kind = b.backup_type.as_str();
                let done: u64 = b.disk_results.iter().map(|d| d.bytes_done).sum();
                self.backup_bytes
                    .with_label_values(&["transferred", kind])
                    .inc_by(b.bytes_transferred);
                self.backup_bytes
                    .with_label_values(&["skipped", kind])
                    .inc_by(done.saturating_sub(b.bytes_transferred));
            }
            HubEvent::Verify { verify: v } if !v.corrupt.is_empty() => self
                .verification_failures
                .with_label_values(&["verify_job"])
                .inc(),
            _ => {}
        }
    }

    /// The text exposition of everything: the counters, and the gauges read now from `state`.
    pub async fn render(&self, state: &ScrapeState<'_>) -> Result<String, MetricsError> {
        let gauges = Registry::new();
        state.gauges(&gauges).await?;
        let mut families = self.registry.gather();
        families.extend(gauges.gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// What the scrape-time gauges read.
pub struct ScrapeState<'a> {
    pub db: &'a Db,
    pub ports: &'a crate::ports::PortAllocator,
}

fn gauge(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = must(IntGaugeVec::new(Opts::new(name, help), labels));
    must(reg.register(Box::new(g.clone())));
    g
}

impl ScrapeState<'_> {
    async fn gauges(&self, reg: &Registry) -> Result<(), MetricsError> {
        let now = self.db.clock().now();
        let active = gauge(
            reg,
            "sendense_jobs_active",
            "Jobs not ended yet, by kind and status",
            &["kind", "status"],
        );
        let backups = self.db.list_backups().await?;
        let points = gauge(
            reg,
            "sendense_points",
            "Completed backup points per VM (restorable or not)",
            &["vm"],
        );
        let newest = must(GaugeVec::new(
            Opts::new(
                "sendense_newest_good_point_age_seconds",
                "Age of the VM's newest completed point that is not corrupt",
            ),
            &["vm"],
        ));
        must(reg.register(Box::new(newest.clone())));
        let newest_ts = must(GaugeVec::new(
            Opts::new(
                "sendense_newest_good_point_timestamp_seconds",
                "Unix time of the VM's newest completed point that is not corrupt",
            ),
            &["vm"],
        ));
        must(reg.register(Box::new(newest_ts.clone())));
        for b in &backups {
            if !b.status.is_terminal() {
                active
                    .with_label_values(&["backup", b.status.as_str()])
                    .inc();
            }
            if b.status == JobStatus::Completed {
                points.with_label_values(&[&b.vm_name]).inc();
            }
        }
        for (vm, at) in crate::vms::newest_good_points(&backups) {
            newest
                .with_label_values(&[vm])
                .set((now - at).num_milliseconds() as f64 / 1000.0);
            newest_ts
                .with_label_values(&[vm])
                .set(at.timestamp_millis() as f64 / 1000.0);
        }
        for r in self.db.list_restores().await? {
            if !r.status.is_terminal() {
                active
                    .with_label_values(&["restore", r.status.as_str()])
                    .inc();
            }
        }
        for v in self.db.list_verifies().await? {
            if !v.status.is_terminal() {
                active
                    .with_label_values(&["verify", v.status.as_str()])
                    .inc();
            }
        }

        let vms = gauge(
            reg,
            "sendense_vms",
            "Registered VMs (1 each), by VM and node: the alert on VMs without a good point \
             joins on it",
            &["vm", "node"],
        );
        for vm in self.db.list_vms().await? {
            vms.with_label_values(&[&vm.vm_name, vm.node.as_deref().unwrap_or("")])
                .set(1);
        }
        let queued = gauge(
            reg,
            "sendense_policy_runs_queued",
            "Scheduled policy runs waiting in the admission queue",
            &[],
        );
        queued.with_label_values::<&str>(&[]).set(
            self.db
                .runs_in(sendense_shared::api::RunStatus::Queued)
                .await?
                .len() as i64,
        );

        let ports = gauge(
            reg,
            "sendense_nbd_ports",
            "NBD ports of the hub's range: free, held by a job, or squatted by another process",
            &["state"],
        );
        let view = self.ports.view().await?;
        let size = i64::from(view.range[1]) - i64::from(view.range[0]) + 1;
        let held = view.allocations.len() as i64;
        let squatted = view.squatted.len() as i64;
        ports.with_label_values(&["held"]).set(held);
        ports.with_label_values(&["squatted"]).set(squatted);
        ports
            .with_label_values(&["free"])
            .set((size - held - squatted).max(0));

        let procs = gauge(
            reg,
            "sendense_processes_alive",
            "Child processes of the hub alive now, by program",
            &["program"],
        );
        let alive = self
            .db
            .list_processes()
            .await?
            .into_iter()
            .filter(|p| {
                p.alive && crate::qemu_nbd::is_our_qemu_nbd(p.pid, p.port.0, &p.export_name)
            })
            .count();
        procs.with_label_values(&["qemu-nbd"]).set(alive as i64);

        let tunnel_up = gauge(
            reg,
            "sendense_tunnel_up",
            "1 when the node's tunnel was last seen up, else 0",
            &["node"],
        );
        let restarts = gauge(
            reg,
            "sendense_tunnel_restarts",
            "Restarts of the node's tunnel since the node started (as last reported)",
            &["node"],
        );
        for n in self.db.list_nodes().await? {
            let up = n
                .tunnel
                .as_ref()
                .is_some_and(|t| t.state == TunnelStateKind::Up);
            tunnel_up.with_label_values(&[&n.name]).set(i64::from(up));
            if let Some(t) = &n.tunnel {
                restarts
                    .with_label_values(&[&n.name])
                    .set(i64::from(t.restarts));
            }
        }

        let free = gauge(
            reg,
            "sendense_repository_free_bytes",
            "Free bytes of the file system that holds the repository",
            &["repository"],
        );
        let total = gauge(
            reg,
            "sendense_repository_size_bytes",
            "Size of the file system that holds the repository",
            &["repository"],
        );
        for r in self.db.list_repositories().await? {
            if let Ok(s) = crate::repository::space(std::path::Path::new(&r.path)) {
                free.with_label_values(&[&r.id])
                    .set(i64::try_from(s.free_bytes).unwrap_or(i64::MAX));
                total
                    .with_label_values(&[&r.id])
                    .set(i64::try_from(s.total_bytes).unwrap_or(i64::MAX));
            }
        }
        Ok(())
    }
}

/// Follows the event bus into `metrics` until `shutdown`.
pub fn spawn(
    metrics: std::sync::Arc<Metrics>,
    bus: &crate::events::EventBus,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
) {
    let mut rx = bus.subscribe();
    tasks.spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = rx.recv() => ev,
            };
            match ev {
                Ok(ev) => metrics.observe(&ev),
                Err(RecvError::Lagged(n)) => metrics.events_lost.inc_by(n),
                Err(RecvError::Closed) => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric of the module is defined validly and once (a bad name would panic at the
    /// hub's start otherwise).
    #[test]
    fn the_counters_register_and_encode() {
        let m = Metrics::new();
        m.observe(&HubEvent::Lagged { lost: 3 });
        m.observe(&HubEvent::Lagged { lost: 2 });
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("sendense_metrics_events_lost_total 5"),
            "{text}"
        );
    }
}
