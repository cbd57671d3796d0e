//! The driver's SOAP session, and the keepalive that holds it open while a snapshot is held.
//!
//! nbdkit's curl plugin reads the datastore with the session's cookie while the node's own SOAP
//! client sits idle, possibly for hours on a big disk. vCenter ends a session idle for 30
//! minutes (and an administrator may end it at any time); every read after that fails with
//! HTTP 401, which the copy sees as EIO. So while a snapshot is held, [`KeepAlive`] touches the
//! session every `session_keepalive` (default 5 minutes; [`Client::keep_alive`]), which both
//! restarts the idle timer and notices a session that is gone: the client logs in again, and
//! the new cookie is written into every cookie file of the snapshot's nbdkits, which re-read
//! them (`cookie-script-renew`).

use crate::source::nbdkit;
use sendense_vsphere::{Client, Endpoint, VsphereError};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// One logged-in client, opened on first use (it logs in again by itself when the session ends).
pub struct Session {
    endpoint: Endpoint,
    slot: tokio::sync::Mutex<Option<Client>>,
}

impl Session {
    pub fn new(endpoint: Endpoint) -> Session {
        Session {
            endpoint,
            slot: tokio::sync::Mutex::new(None),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The client, logging in first when there is none.
    pub async fn get(&self) -> Result<Client, VsphereError> {
        let mut slot = self.slot.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = Client::connect(&self.endpoint).await?;
        tracing::info!(url = %self.endpoint.url, user = %self.endpoint.user, "vSphere session open");
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `f` with the client. An expired session needs nothing here: every SOAP call of
    /// the client logs in again once on `NotAuthenticated` (the `sendense_vsphere` transport).
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, VsphereError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, VsphereError>>,
    {
        f(self.get().await?).await
    }
}

/// The keepalive of one held snapshot; ends when dropped or [`KeepAlive::stop`]ped.
pub struct KeepAlive {
    task: tokio::task::JoinHandle<()>,
}

impl KeepAlive {
    /// Every `every`: touches the session and, when the cookie changed (a new login), writes it
    /// into `cookie_files`. The first round writes them all, so that an nbdkit started on an
    /// older cookie (a login in the middle of starting them) gets the current one.
    pub fn start(
        session: Arc<Session>,
        vm: String,
        cookie_files: Vec<PathBuf>,
        every: Duration,
    ) -> KeepAlive {
        let task = tokio::spawn(async move {
            let mut written = String::new();
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = session.call(|c| async move { c.keep_alive().await }).await {
                    tracing::warn!(vm = %vm, error = %e,
                        "vSphere session keepalive failed; nbdkit's reads may fail until it works again");
                    continue;
                }
                let Ok(client) = session.get().await else {
                    continue;
                };
                let cookie = client.session_cookie();
                if cookie.is_empty() || cookie == written {
                    continue;
                }
                let mut ok = true;
                for path in &cookie_files {
                    if let Err(e) = nbdkit::rewrite_cookie(path, &cookie) {
                        ok = false;
                        tracing::warn!(vm = %vm, error = %e, "cannot hand nbdkit the session cookie");
                    }
                }
                if ok {
                    if !written.is_empty() {
                        tracing::info!(vm = %vm, files = cookie_files.len(),
                            "vSphere session renewed; nbdkit's cookie files rewritten");
                    }
                    written = cookie;
                }
            }
        });
        KeepAlive { task }
    }

    /// Ends the task and waits until it has (so no cookie file is written after this).
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}
