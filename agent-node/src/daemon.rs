//! The node daemon: config → source driver(s) (QEMU, vSphere, or both) → start-up recovery → tunnel → hub registration → recovered VMs re-adopted → API,
//! with one shutdown token fanned out to the API, the jobs (backups, restores, instant
//! recoveries: these leave their VMs running) and the registration task; the tunnel stops last.

use crate::api::{NodeState, inventory_vm};
use crate::config::NodeConfig;
use crate::copy::CopyOptions;
use crate::hub_client::{self, HUB_RETRY};
use crate::jobs::Jobs;
use crate::qmp::QmpLog;
use crate::source::SourceDriver;
use crate::source::multi::MultiDriver;
use crate::source::qemu::QemuDriver;
use crate::source::vsphere::VsphereDriver;
use crate::tunnel::Tunnel;
use sendense_shared::api::{NodeRegistration, VmRequest};
use sendense_shared::client::{ClientError, HubClient};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Runs the node on `listener` until `shutdown` fires; then stops accepting, cancels running
/// jobs (each releases its snapshot) and waits for them.
pub async fn run(
    config: NodeConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // The run directory holds what start-up recovery acts on (journals that say what to
    // delete) and the ssh config the tunnel runs with: refused when someone else could have
    // put files there. Not made 0700: QEMU, which may run as another user, creates fleecing
    // files and sockets in it.
    sendense_shared::fsmode::owned_dir(&config.run_dir)
        .map_err(|e| anyhow::anyhow!("run directory: {}", sendense_shared::errors::chain(&e)))?;
    let driver = source_driver(&config).await?;
    let report = driver.recover().await;
    tracing::info!(?report, "start-up recovery done");
    for e in &report.errors {
        tracing::warn!(error = %e, "start-up recovery could not finish");
    }
    // Restores a killed node left: their qemu-nbd stopped, their partial images deleted.
    let restores_left = crate::restore::recovery::recover(&config.run_dir).await;
    tracing::info!(report = ?restores_left, "restore recovery done");
    for e in &restores_left.errors {
        tracing::warn!(error = %e, "restore recovery could not finish");
    }
    let hub = config
        .hub_url
        .as_deref()
        .map(|u| hub_client::connect(u, config.token.as_str(), &config.name));
    let jobs = Jobs::new(
        driver.clone(),
        hub.clone(),
        CopyOptions::from_env(),
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
        // Nothing goes to the hub's forward while the link carrying it is not up (reports
        // wait and retry).
        if let Some(h) = hub
            .as_ref()
            .filter(|h| h.base_url() == t.config().hub_url().trim_end_matches('/'))
        {
            h.gate_on(t.subscribe_api());
        }
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
    let recoveries = crate::recovery::Recoveries::new(
        jobs.context().clone(),
        config.run_dir.clone(),
        config.recovery_dir.clone(),
    );
    // After the tunnel (their reports travel through it), before the API (a start must not
    // take a journalled recovery's id).
    let adopted = crate::recovery::adopt::adopt(&recoveries).await;
    tracing::info!(report = ?adopted, "recovered VMs re-adopted");
    for e in &adopted.errors {
        tracing::warn!(error = %e, "recovery start-up could not finish");
    }
    let state = Arc::new(NodeState {
        name: config.name.clone(),
        token: config.token.clone(),
        started_at: chrono::Utc::now(),
        jobs: jobs.clone(),
        tunnel: tunnel.clone(),
        // On the backups' context: one tracker drained below, one tunnel routing.
        restores: crate::restore::Restores::with_vms(
            jobs.context().clone(),
            config.run_dir.clone(),
            config.vms.clone(),
        ),
        recoveries,
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

/// The source driver(s) the config asks for: QEMU VMs from `[qmp]`/`--qmp`, vSphere VMs from
/// `[vsphere]`; both at once behind a [`MultiDriver`], which refuses a VM name in both.
async fn source_driver(config: &NodeConfig) -> anyhow::Result<Arc<dyn SourceDriver>> {
    let qemu = || -> Arc<dyn SourceDriver> {
        let log = Arc::new(QmpLog::new(Some(config.run_dir.join("qmp.log"))));
        Arc::new(
            QemuDriver::new(config.vms.clone(), config.run_dir.clone(), log)
                .with_guest_agents(config.guest_agents.clone(), config.guest_agent_timeout),
        )
    };
    let Some(vs) = &config.vsphere else {
        return Ok(qemu());
    };
    let vsphere = VsphereDriver::new(vs, &config.name, config.run_dir.clone());
    tracing::info!(url = %vs.url, user = %vs.user, vddk = vsphere.uses_vddk(),
        allowlist = ?vs.vms, "vSphere source configured");
    let vsphere: Arc<dyn SourceDriver> = Arc::new(vsphere);
    if config.vms.is_empty() {
        return Ok(vsphere);
    }
    Ok(Arc::new(
        MultiDriver::start(vec![("qemu", qemu()), ("vsphere", vsphere)]).await?,
    ))
}

/// How often the inventory is looked at again; VMs whose disks changed are pushed.
const INVENTORY_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Registers with the hub and pushes the inventory, retrying with backoff until both worked;
/// then pushes VMs whose disks changed (or that appeared) every [`INVENTORY_EVERY`].
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
    let mut pushed: BTreeMap<String, VmRequest> = BTreeMap::new();
    let mut registered = false;
    let mut attempts = HUB_RETRY.attempts();
    loop {
        let result: anyhow::Result<usize> = async {
            if !registered {
                hub.register_node(&reg).await?;
                registered = true;
            }
            let mut n = 0;
            for vm in driver.list_vms().await? {
                let vm = inventory_vm(vm);
                let req = VmRequest {
                    vm_name: vm.vm_name.clone(),
                    node: Some(name.clone()),
                    disks: vm.disks,
                };
                if pushed.get(&req.vm_name) != Some(&req) {
                    match hub.push_vm(&req).await {
                        Ok(()) => n += 1,
                        // The hub refused this VM (another node's VM holds its name, a disk it
                        // cannot accept, a scope): said once, and not pushed again until its
                        // definition changes. Retrying it would keep every later VM out.
                        Err(
                            e @ ClientError::Api {
                                status: 403 | 409 | 422,
                                ..
                            },
                        ) => {
                            tracing::warn!(hub = hub.base_url(), vm = %req.vm_name,
                                error = %sendense_shared::errors::chain(&e),
                                "the hub refused this VM; the node's other VMs are pushed");
                        }
                        Err(e) => return Err(e.into()),
                    }
                    pushed.insert(req.vm_name.clone(), req);
                }
            }
            Ok(n)
        }
        .await;
        let wait = match result {
            Ok(n) => {
                if n > 0 || attempts.failures() > 0 {
                    tracing::info!(
                        hub = hub.base_url(),
                        vms_pushed = n,
                        "registered with the hub, inventory pushed"
                    );
                }
                attempts.reset();
                INVENTORY_EVERY
            }
            Err(e) => {
                tracing::warn!(hub = hub.base_url(), error = %sendense_shared::errors::chain(&*e),
                    attempt = attempts.failures(), "registration or inventory push failed; retrying");
                attempts.next_delay()
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
