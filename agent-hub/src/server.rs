//! Start-up and the serve loop, wiring only: [`Hub::open`] builds the services from a
//! [`HubConfig`] (token, database, migrations, default repository, reconciler), [`serve`] runs
//! the API on a listener the caller bound (tests bind port 0) until `shutdown` fires, then
//! drains: open requests end, live jobs are failed and every qemu-nbd is stopped.

use crate::config::{DEFAULT_REPOSITORY_ID, HubConfig};
use crate::db::{Db, redact};
use crate::events::{EventBus, JobLog};
use crate::hub::{AppState, Hub};
use crate::jobs::JobManager;
use crate::node_client::NodeClient;
use crate::nodes::Nodes;
use crate::ports::PortAllocator;
use crate::restores::{RestoreDeps, Restores};
use chrono::Utc;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why the hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data directory {path}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Token(#[from] crate::auth::AuthError),
    #[error("database {url}")]
    Database {
        url: String,
        #[source]
        source: crate::db::DbError,
    },
    #[error("default repository {path}")]
    Repository {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registering the default repository")]
    RegisterRepository(#[source] crate::db::DbError),
    #[error("the NBD socket directory (nbd_listen = \"unix\")")]
    NbdSockets(#[source] crate::qemu_nbd::QemuNbdError),
    #[error("the NBD CA (nbd_tls = true)")]
    NbdCa(#[source] crate::nbd_ca::NbdCaError),
    #[error("the test clock (test_clock_file)")]
    TestClock(#[source] crate::clock::ClockError),
    #[error("the webhooks ([[webhook]])")]
    Webhooks(#[source] crate::webhooks::WebhookError),
    #[error("serving the API")]
    Serve(#[source] std::io::Error),
}

impl Hub {
    /// Opens everything the config names, runs migrations, registers the default repository,
    /// and runs the start-up reconciler. Does not bind the API port.
    pub async fn open(config: HubConfig) -> Result<AppState, StartError> {
        // The database, the token and the logs live there: 0700.
        sendense_shared::fsmode::private_dir(&config.data_dir).map_err(|e| {
            StartError::DataDir {
                path: config.data_dir.clone(),
                source: std::io::Error::other(sendense_shared::errors::chain(&e)),
            }
        })?;
        let token = crate::auth::load_or_create(&config.token_file)?;
        let db_err = |source| StartError::Database {
            url: redact(&config.database_url),
            source,
        };
        let db = Db::connect(&config.database_url).await.map_err(db_err)?;
        let db = match &config.test_clock_file {
            None => db,
            Some(f) => {
                let clock = crate::clock::FileClock::open(f).map_err(StartError::TestClock)?;
                tracing::warn!(file = %f.display(), now = %crate::clock::Clock::now(&clock),
                    "TEST KNOB: the hub's time comes from a file (test_clock_file), not the wall clock");
                db.with_clock(Arc::new(clock))
            }
        };
        db.migrate().await.map_err(db_err)?;
        tracing::info!(url = %redact(&config.database_url), kind = ?db.kind(), "database ready");

        std::fs::create_dir_all(&config.default_repository).map_err(|source| {
            StartError::Repository {
                path: config.default_repository.clone(),
                source,
            }
        })?;
        let repo_path = config.default_repository.display().to_string();
        match db.get_repository(DEFAULT_REPOSITORY_ID).await {
            Ok(_) => {}
            Err(crate::db::DbError::NotFound { .. }) => {
                db.insert_repository(DEFAULT_REPOSITORY_ID, &repo_path)
                    .await
                    .map_err(StartError::RegisterRepository)?;
                tracing::info!(path = %repo_path, "registered repository 'default'");
            }
            Err(e) => return Err(StartError::RegisterRepository(e)),
        }

        let credentials = crate::auth::Credentials::new(
            db.clone(),
            &crate::auth::load_or_create(&config.credential_key_file)?,
            config.credential_grace,
        );
        let node_client = NodeClient::new(credentials.clone(), config.node_timeout);
        let mut config = config;
        if config.nbd_tls {
            let ca = crate::nbd_ca::NbdCa::open(&config.data_dir).map_err(StartError::NbdCa)?;
            tracing::info!(dir = %ca.server_dir().display(), "NBD exports require TLS client certificates");
            config.qemu_nbd.tls = Some(ca);
        } else {
            tracing::warn!(
                "nbd_tls = false: NBD exports are served without TLS; any local user can open a running job's exports"
            );
        }
        let bus = EventBus::new();
        let log = JobLog::new(db.clone(), bus.clone());
        let ports = PortAllocator::new(db.clone(), config.nbd_ports, config.nbd_bind);
        let ports = Arc::new(match config.nbd_listen {
            crate::qemu_nbd::NbdListen::Unix => {
                config.qemu_nbd.socket_dir = Some(
                    crate::qemu_nbd::socket_dir(
                        &config.nbd_socket_dir,
                        config.nbd_socket_group.as_deref(),
                    )
                    .map_err(StartError::NbdSockets)?,
                );
                ports.slots_only()
            }
            crate::qemu_nbd::NbdListen::Tcp => ports,
        });
        let tasks = TaskTracker::new();
        let readback = crate::readback::ReadBack::new(
            config.qemu_nbd.clone(),
            config.data_dir.join("readback"),
        );
        let jobs = JobManager::new(crate::jobs::JobDeps {
            db: db.clone(),
            ports: ports.clone(),
            qemu_nbd: config.qemu_nbd.clone(),
            log: log.clone(),
            nodes: node_client.clone(),
            tasks: tasks.clone(),
            node_watch_interval: config.node_watch_interval,
            node_lost_after: config.node_lost_after,
            job_stall_after: config.job_stall_after,
            readback: readback.clone(),
            db_patience: config.db_outage_patience,
        });
        let restores = Restores::new(RestoreDeps {
            db: db.clone(),
            ports: ports.clone(),
            qemu_nbd: config.qemu_nbd.clone(),
            log: log.clone(),
            nodes: node_client.clone(),
            tasks: tasks.clone(),
            node_watch_interval: config.node_watch_interval,
            node_lost_after: config.node_lost_after,
        });
        let recoveries = crate::recoveries::Recoveries::new(crate::recoveries::RecoveryDeps {
            db: db.clone(),
            ports: ports.clone(),
            qemu_nbd: config.qemu_nbd.clone(),
            log: log.clone(),
            nodes: node_client.clone(),
            tasks: tasks.clone(),
            node_watch_interval: config.node_watch_interval,
            node_lost_after: config.node_lost_after,
            restarts: crate::recoveries::exports::RestartPolicy {
                give_up_after: config.recovery_export_grace,
                ..Default::default()
            },
        });
        let nodes = Nodes::new(db.clone(), bus.clone(), node_client.clone(), tasks.clone());
        // Before the policies: their after-run hook prunes.
        let prune = crate::prune::Pruner::new(crate::prune::PruneDeps {
            db: db.clone(),
            readback: readback.clone(),
            log: log.clone(),
            tasks: tasks.clone(),
            knob: crate::prune::engine::Knob::from_env(&config.data_dir),
        });

        let verify = crate::verify::Verifier::new(crate::verify::VerifyDeps {
            db: db.clone(),
            readback: readback.clone(),
            log: log.clone(),
            tasks: tasks.clone(),
            clock: db.clock(),
            boot_root: crate::bootcheck::root(&config.data_dir),
        });
        let policies = crate::policies::Policies::new(crate::policies::PolicyDeps {
            db: db.clone(),
            jobs: jobs.clone(),
            bus: bus.clone(),
            nodes: node_client,
            ports: ports.clone(),
            nbd_bind: config.nbd_bind,
            limits: crate::policies::Limits {
                per_hub: config.max_concurrent_backups,
                per_node: config.max_concurrent_backups_per_node,
            },
            after_run: Arc::new(crate::prune::after_run::PruneAfterRun {
                pruner: prune.clone(),
                verify: verify.clone(),
                log: log.clone(),
            }),
        });
        if let Err(e) = verify.recover().await {
            tracing::warn!(error = %sendense_shared::errors::chain(&e), "cannot end the verify jobs a previous run left");
        }

        let report = crate::reconciler::reconcile(&db, &ports, &log, &config, &readback).await;
        tracing::info!(summary = %report, "start-up reconciliation done");
        // The nodes of recoveries it failed still run their VMs (paused, without exports).
        recoveries.cancel_leftovers(report.recoveries_left.clone());
        recoveries.resume_after_restart(report.recoveries_resumed.clone());

        let shutdown = CancellationToken::new();
        let hub_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| config.listen.to_string());
        let webhooks = crate::webhooks::Webhooks::start(
            &config.webhooks,
            hub_name,
            db.clock(),
            &tasks,
            shutdown.clone(),
        )
        .map_err(StartError::Webhooks)?;

        let files = crate::files::FileBrowser::new(
            config.files.clone(),
            db.clock(),
            config.data_dir.join("files"),
        );
        Ok(Arc::new(Hub {
            files,
            webhooks: Arc::new(webhooks),
            config,
            db,
            ports,
            jobs,
            restores,
            recoveries,
            verify,
            policies,
            prune,
            nodes,
            bus,
            readback,
            metrics: Arc::new(crate::metrics::Metrics::new()),
            auth: crate::auth::Authenticator {
                admin: token.clone(),
                credentials,
            },
            token,
            started_at: Utc::now(),
            shutdown,
            tasks,
        }))
    }
}

/// How often the hub asks its nodes for their tunnel state.
const TUNNEL_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Probes every node's tunnel (through the reverse forward when there is one) on a timer and
/// publishes changes on the event bus; a node that does not answer is logged at debug level only,
/// since an unreachable node is also what `GET /api/v1/tunnel` reports.
fn spawn_tunnel_prober(state: &AppState) {
    let hub = state.clone();
    state.tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = hub.shutdown.cancelled() => return,
                _ = tokio::time::sleep(TUNNEL_PROBE_INTERVAL) => {}
            }
            match hub.nodes.probe_tunnels_paced().await {
                Ok(v) => {
                    for t in v.iter().filter(|t| !t.live) {
                        tracing::debug!(node = %t.node, error = ?t.error, "tunnel probe: node did not answer");
                    }
                }
                Err(e) => tracing::warn!(error = %sendense_shared::errors::chain(&e), "tunnel probe failed"),
            }
        }
    });
}

/// Serves the API on `listener` until `shutdown` fires; then stops accepting, lets open
/// requests finish, fails every live job (stopping its qemu-nbd, releasing its ports) and waits
/// for the job tasks.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let addr = listener.local_addr().map_err(StartError::Serve)?;
    tracing::info!(%addr, pid = std::process::id(), "sendense-hub API listening");
    let app = crate::api::router(state.clone());
    spawn_tunnel_prober(&state);
    crate::metrics::spawn(
        state.metrics.clone(),
        &state.bus,
        &state.tasks,
        state.shutdown.clone(),
    );
    crate::webhooks::spawn(
        state.clone(),
        state.webhooks.clone(),
        state.config.alerts.clone(),
        state.config.alert_check_interval,
    );
    crate::verify::schedule::spawn(
        crate::verify::schedule::Scheduler::new(state.verify.clone()),
        &state.tasks,
        state.shutdown.clone(),
    );
    crate::policies::scheduler::spawn(
        state.policies.clone(),
        state.config.policy_check_interval,
        &state.tasks,
        state.shutdown.clone(),
    );
    state.files.spawn_reaper(
        std::time::Duration::from_secs(1),
        &state.tasks,
        state.shutdown.clone(),
    );
    let stop = shutdown.clone();
    let hub_stop = state.shutdown.clone();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            stop.cancelled().await;
            // SSE streams hold their connection open forever; end them so draining finishes.
            hub_stop.cancel();
        })
        .await
        .map_err(StartError::Serve);
    tracing::info!("API stopped; stopping live jobs and their qemu-nbd processes");
    // Every kind of job at once: a restore must not wait for the backups to unwind.
    state.prune.shutdown().await;
    state.files.shutdown().await;
    tokio::join!(
        state.jobs.shutdown("hub stopped (SIGTERM) during the job"),
        state
            .restores
            .shutdown("hub stopped (SIGTERM) during the restore"),
        state.recoveries.shutdown(
            "hub stopped (SIGTERM) during the recovery: its exports are gone; the node was told \
             to stop the recovered VM"
        ),
        state
            .verify
            .shutdown("hub stopped (SIGTERM) during the verify job"),
    );
    state.tasks.close();
    state.tasks.wait().await;
    tracing::info!("sendense-hub stopped");
    result
}
