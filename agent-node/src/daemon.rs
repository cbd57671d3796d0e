//! The node daemon: config → QEMU driver → start-up recovery → tunnel → hub registration → API,
//! with one shutdown token fanned out to the API, the jobs and the registration task; the
//! tunnel stops last.

use crate::api::{NodeState, inventory_vm};
use crate::config::NodeConfig;
use crate::copy::CopyOptions;
use crate::hub_client::{HubClient, backoff};
use crate::jobs::Jobs;
use crate::qmp::QmpLog;
use crate::source::SourceDriver;
use crate::source::qemu::QemuDriver;
use crate::tunnel::Tunnel;
use sendense_shared::api::{NodeRegistration, VmRequest};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Runs the node on `listener` until `shutdown` fires; then stops accepting, cancels running
/// jobs (each releases its snapshot) and waits for them.
pub async fn run(
    config: NodeConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.run_dir)
        .map_err(|e| anyhow::anyhow!("creating run directory {}: {e}", config.run_dir.display()))?;
    let log = Arc::new(QmpLog::new(Some(config.run_dir.join("qmp.log"))));
    let driver: Arc<dyn SourceDriver> = Arc::new(QemuDriver::new(
        config.vms.clone(),
        config.run_dir.clone(),
        log,
    ));
    let report = driver.recover().await;
    tracing::info!(?report, "start-up recovery done");
    for e in &report.errors {
        tracing::warn!(error = %e, "start-up recovery could not finish");
    }
    let hub = config
        .hub_url
        .as_deref()
        .map(|u| HubClient::new(u, &config.token));
    let jobs = Jobs::new(
        driver.clone(),
        hub.clone(),
        CopyOptions::default(),
        shutdown.clone(),
    );
    // The tunnel outlives the API: the final reports of draining jobs still travel through it.
    let tunnel_stop = CancellationToken::new();
    let tunnel = config.tunnel.clone().map(|mut t| {
        if let Ok(addr) = listener.local_addr() {
            t.node_api = crate::tunnel::config::reachable(addr);
        }
        let t = Tunnel::start(t, tunnel_stop.clone());
        jobs.use_tunnel(t.clone());
        t
    });
    let api_url = config
        .api_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", listener.local_addr().unwrap_or(config.listen)));
    if let Some(hub) = hub {
        tokio::spawn(register(
            hub,
            config.name.clone(),
            api_url.clone(),
            driver.clone(),
            shutdown.clone(),
        ));
    }
    let state = Arc::new(NodeState {
        name: config.name.clone(),
        token: config.token.clone(),
        started_at: chrono::Utc::now(),
        jobs: jobs.clone(),
        tunnel: tunnel.clone(),
    });
    tracing::info!(name = %config.name, %api_url, vms = config.vms.len(), "node serving");
    crate::api::serve(listener, state, shutdown.clone()).await?;
    jobs.drain().await;
    tunnel_stop.cancel();
    if let Some(t) = tunnel {
        t.stopped().await;
    }
    Ok(())
}

/// Registers with the hub and pushes the inventory, retrying with backoff until both worked.
async fn register(
    hub: HubClient,
    name: String,
    api_url: String,
    driver: Arc<dyn SourceDriver>,
    shutdown: CancellationToken,
) {
    let reg = NodeRegistration {
        name: name.clone(),
        api_url,
        version: sendense_shared::identity::VERSION.to_string(),
    };
    let mut attempt = 0;
    loop {
        let result: anyhow::Result<usize> = async {
            hub.register(&reg).await?;
            let vms = driver.list_vms().await?;
            for vm in &vms {
                let vm = inventory_vm(vm.clone());
                hub.push_vm(&VmRequest {
                    vm_name: vm.vm_name,
                    node: Some(name.clone()),
                    disks: vm.disks,
                })
                .await?;
            }
            Ok(vms.len())
        }
        .await;
        match result {
            Ok(n) => {
                tracing::info!(hub = hub.base(), vms = n, "registered with the hub");
                return;
            }
            Err(e) => {
                tracing::warn!(hub = hub.base(), error = %e, attempt, "registration failed; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff(attempt)) => {}
            _ = shutdown.cancelled() => return,
        }
        attempt += 1;
    }
}
