//! The loop that keeps ssh running, one per link: preflight, write the link's config, spawn,
//! watch for its forwards, watch for the exit, name the cause, wait a jittered backoff, start
//! over. The tunnel's state is made of the links' states at every change of one of them.

use super::config::{BackoffPolicy, Forward, TunnelConfig};
use super::preflight::{PreflightError, tcp_connect};
use super::ssh_config::{self, HOST_ALIAS};
use super::stderr::{SshFailure, classify, forwards_established, last_own_line};
use chrono::Utc;
use rand::Rng;
use sendense_shared::api::{TunnelLink, TunnelState, TunnelStateKind};
use sendense_shared::backoff::Backoff;
use sendense_shared::child::{ChildError, Supervised};
use sendense_shared::nbd::NbdAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often ssh's stderr is looked at while the forwards are being set up.
const MARKER_POLL: Duration = Duration::from_millis(50);
/// How long [`Tunnel::explain_failure`] waits for the supervisor to see ssh's exit.
pub const EXPLAIN_WAIT: Duration = Duration::from_secs(3);
/// How long [`Tunnel::explain_failure`] waits while ssh still looks alive.
pub const EXPLAIN_ALIVE: Duration = Duration::from_millis(500);
/// SIGTERM → SIGKILL grace for ssh on shutdown.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Why one attempt ended (becomes `last_error`).
#[derive(Debug, Error)]
pub enum AttemptError {
    #[error("preflight")]
    Preflight(#[from] PreflightError),
    #[error("writing the ssh config file into {dir}")]
    ConfigFile {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting ssh")]
    Spawn(#[from] ChildError),
    #[error(transparent)]
    Ssh(#[from] SshFailure),
    #[error("ssh (PID {pid}) did not establish the forwards within {waited:?}; stopped it{last}")]
    NotUp {
        pid: u32,
        waited: Duration,
        last: String,
    },
}

/// A handle on the running tunnel: one supervised ssh process per link (see
/// [`TunnelConfig::links`]), each with a state of its own, and the tunnel's state made of them.
/// Dropping it does not stop ssh: cancel the shutdown token given to [`Tunnel::start`] and await
/// [`Tunnel::stopped`].
pub struct Tunnel {
    cfg: TunnelConfig,
    /// The whole tunnel: `up` when every link is up, `down` when any is down.
    state: watch::Sender<TunnelState>,
    links: Vec<Link>,
    /// Orders the links' errors: the tunnel's `last_error` is the newest one.
    errors: AtomicU64,
    task: Mutex<Vec<JoinHandle<()>>>,
}

/// One ssh process and its share of the forwards.
struct Link {
    /// Its own state (`forwards` lists its share).
    state: watch::Sender<TunnelState>,
    child: Mutex<Option<Supervised>>,
    slots: Vec<u16>,
    /// Sequence number of its `last_error` (0: none).
    error_seq: AtomicU64,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("target", &self.cfg.target)
            .field("links", &self.links.len())
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl Tunnel {
    /// Starts supervising every link; ssh itself is started by each link's task (after its
    /// preflight). Must be called inside a tokio runtime.
    pub fn start(cfg: TunnelConfig, shutdown: CancellationToken) -> Arc<Tunnel> {
        let now = Utc::now();
        let down = |forwards: Vec<String>| TunnelState {
            state: TunnelStateKind::Down,
            since: now,
            restarts: 0,
            last_error: None,
            forwards,
            links: Vec::new(),
        };
        let count = usize::from(cfg.links.max(1));
        let links: Vec<Link> = (0..count)
            .map(|k| Link {
                state: watch::channel(down(
                    cfg.link_forwards(k)
                        .iter()
                        .map(Forward::to_string)
                        .collect(),
                ))
                .0,
                child: Mutex::new(None),
                slots: cfg.link_slots(k),
                error_seq: AtomicU64::new(0),
            })
            .collect();
        let (state, _) = watch::channel(down(
            cfg.forwards().iter().map(Forward::to_string).collect(),
        ));
        let tunnel = Arc::new(Tunnel {
            cfg,
            state,
            links,
            errors: AtomicU64::new(0),
            task: Mutex::new(Vec::new()),
        });
        tunnel.aggregate();
        let handles = (0..count)
            .map(|k| {
                let t = Arc::clone(&tunnel);
                let stop = shutdown.clone();
                tokio::spawn(async move { t.supervise(k, stop).await })
            })
            .collect();
        *lock(&tunnel.task) = handles;
        tunnel
    }

    pub fn config(&self) -> &TunnelConfig {
        &self.cfg
    }

    /// The state as `GET /api/v1/tunnel` serves it (with one entry per link in `links`).
    pub fn state(&self) -> TunnelState {
        self.state.borrow().clone()
    }

    /// Every change of the state.
    pub fn subscribe(&self) -> watch::Receiver<TunnelState> {
        self.state.subscribe()
    }

    /// The state of link 0 alone, the one that carries the hub's API forward and the reverse
    /// forward: whether the hub's URL is served, whatever the other links do.
    pub fn subscribe_api(&self) -> watch::Receiver<TunnelState> {
        self.links[0].state.subscribe()
    }

    /// The PID of link 0's ssh (the API link), if it runs.
    pub fn ssh_pid(&self) -> Option<u32> {
        self.link_pid(0)
    }

    /// The PID of each link's ssh, if it runs.
    pub fn ssh_pids(&self) -> Vec<Option<u32>> {
        (0..self.links.len()).map(|k| self.link_pid(k)).collect()
    }

    /// The link that carries NBD slot `port`.
    pub fn link_of_slot(&self, port: u16) -> usize {
        self.cfg.link_of_slot(port)
    }

    fn link_pid(&self, k: usize) -> Option<u32> {
        lock(&self.links[k].child)
            .as_ref()
            .filter(|c| c.is_alive())
            .map(Supervised::pid)
    }

    /// Returns once every link's supervisor ended (after the shutdown token fired and ssh was
    /// stopped).
    pub async fn stopped(&self) {
        let handles = std::mem::take(&mut *lock(&self.task));
        for h in handles {
            let _ = h.await;
        }
    }
    /// A target on the hub's loopback inside the forwarded NBD range is reached through the
    /// forward on the bind address, and a socket of the hub's export directory through its
    /// streamlocal forward in `<run_dir>/nbd`; anything else is left alone.
    pub fn route(&self, addr: NbdAddr) -> NbdAddr {
        match addr {
            NbdAddr::Unix { path, export } => match self.forwarded_socket(&path) {
                Some(local) => NbdAddr::Unix {
                    path: local,
                    export,
                },
                None => NbdAddr::Unix { path, export },
            },
            NbdAddr::Tcp { host, port, export }
                if self.cfg.nbd_ports.contains(port) && is_loopback(&host) =>
            {
                NbdAddr::Tcp {
                    host: self.cfg.bind.to_string(),
                    port,
                    export,
                }
            }
            other => other,
        }
    }

    /// True when `addr` is one of this tunnel's local NBD forwards.
    pub fn carries(&self, addr: &NbdAddr) -> bool {
        match addr {
            NbdAddr::Tcp { host, port, .. } => {
                self.cfg.nbd_unix().is_none()
                    && self.cfg.nbd_ports.contains(*port)
                    && host.parse() == Ok(self.cfg.bind)
            }
            NbdAddr::Unix { path, .. } => {
                self.cfg.nbd_unix().is_some()
                    && path.parent() == Some(self.cfg.local_nbd_dir().as_path())
                    && self.slot_of(path).is_some()
            }
        }
    }

    /// The local end of the streamlocal forward to the hub's socket `hub_path`
    /// (`<hub_nbd_dir>/<port>.sock` with the port in the forwarded range).
    fn forwarded_socket(&self, hub_path: &Path) -> Option<PathBuf> {
        let hub_dir = self.cfg.nbd_unix()?;
        if hub_path.parent() != Some(hub_dir) {
            return None;
        }
        let slot = self.slot_of(hub_path)?;
        Some(self.cfg.local_nbd_dir().join(format!("{slot}.sock")))
    }

    fn slot_of(&self, path: &Path) -> Option<u16> {
        sendense_shared::targets::socket_slot(path.to_str()?)
            .filter(|p| self.cfg.nbd_ports.contains(*p))
    }

    /// For an error of a copy through the tunnel: what the tunnel did. The copy may notice
    /// ssh's death before the supervisor does (sockets close before the process is reaped, and
    /// the exit report waits for ssh's stderr), so while the state still says `up` this waits
    /// for the supervisor's verdict: up to [`EXPLAIN_WAIT`] once an ssh is gone, and no longer
    /// than [`EXPLAIN_ALIVE`] while every link's ssh still lives (then the failure was not the
    /// tunnel's).
    pub async fn explain_failure(&self) -> String {
        let start = Instant::now();
        while start.elapsed() < EXPLAIN_WAIT && self.state.borrow().state == TunnelStateKind::Up {
            let alive = self
                .ssh_pids()
                .into_iter()
                .all(|p| p.is_some_and(sendense_shared::child::pid_alive));
            if alive && start.elapsed() >= EXPLAIN_ALIVE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.describe()
    }

    /// The tunnel's state in words, e.g. "through the ssh tunnel to u@h:443 (now down since
    /// 01:02:03, 1 restart(s), last error: ssh (PID 42) killed by SIGKILL)".
    pub fn describe(&self) -> String {
        let s = self.state();
        let state = s.state.as_str();
        let mut out = format!(
            "through the ssh tunnel to {} (now {state} since {}, {} restart(s)",
            self.cfg.target,
            s.since.format("%H:%M:%S"),
            s.restarts
        );
        if let Some(e) = s.last_error {
            out.push_str(&format!(", last error: {e}"));
        }
        out.push(')');
        out
    }

    /// Moves link `k` to `kind` (and `f` on its state), then the tunnel's state with it.
    fn set(&self, k: usize, kind: TunnelStateKind, f: impl FnOnce(&mut TunnelState)) {
        let link = &self.links[k];
        link.state.send_modify(|s| {
            let before = s.last_error.clone();
            if s.state != kind {
                s.state = kind;
                s.since = Utc::now();
            }
            f(s);
            if s.last_error != before {
                let seq = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
                link.error_seq.store(seq, Ordering::Relaxed);
            }
        });
        self.aggregate();
    }

    /// The tunnel's state from its links': `up` when all are, `down` when one is, `connecting`
    /// else; restarts summed; the newest error, naming its link when there are several.
    fn aggregate(&self) {
        let many = self.links.len() > 1;
        let links: Vec<TunnelLink> = self
            .links
            .iter()
            .enumerate()
            .map(|(k, l)| {
                let s = l.state.borrow();
                TunnelLink {
                    link: u16::try_from(k).unwrap_or(u16::MAX),
                    state: s.state,
                    since: s.since,
                    restarts: s.restarts,
                    last_error: s.last_error.clone(),
                    pid: self.link_pid(k),
                    slots: l.slots.clone(),
                    api: k == 0,
                }
            })
            .collect();
        let kind = if links.iter().all(|l| l.state == TunnelStateKind::Up) {
            TunnelStateKind::Up
        } else if links.iter().any(|l| l.state == TunnelStateKind::Down) {
            TunnelStateKind::Down
        } else {
            TunnelStateKind::Connecting
        };
        let newest = (0..self.links.len())
            .filter(|k| links[*k].last_error.is_some())
            .max_by_key(|k| self.links[*k].error_seq.load(Ordering::Relaxed));
        let last_error = newest.and_then(|k| {
            let e = links[k].last_error.clone()?;
            Some(if many {
                format!("link {k} of {}: {e}", links.len())
            } else {
                e
            })
        });
        let restarts = links.iter().map(|l| l.restarts).sum();
        self.state.send_modify(|s| {
            if s.state != kind {
                s.state = kind;
                s.since = Utc::now();
            }
            s.restarts = restarts;
            s.last_error = last_error;
            s.links = links;
        });
    }

    async fn supervise(self: Arc<Self>, k: usize, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        let mut first = true;
        while !shutdown.is_cancelled() {
            self.set(k, TunnelStateKind::Connecting, |s| {
                if !first {
                    s.restarts += 1;
                }
            });
            first = false;
            let started = Instant::now();
            let (result, up_for) = self.attempt(k, &shutdown).await;
            if shutdown.is_cancelled() {
                break;
            }
            let error = match result {
                Ok(()) => "ssh ended without an error".to_string(),
                Err(e) => with_squatter(&e, self.cfg.bind),
            };
            tracing::warn!(target = %self.cfg.target, link = k, error = %error,
                ran = ?started.elapsed(), "tunnel attempt ended");
            self.set(k, TunnelStateKind::Down, |s| s.last_error = Some(error));
            if up_for.is_some_and(|d| d >= self.cfg.backoff.healthy_after) {
                failures = 0;
            }
            let delay = backoff(&self.cfg.backoff, failures);
            failures = failures.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        self.set(k, TunnelStateKind::Down, |_| {});
        tracing::info!(target = %self.cfg.target, link = k, "tunnel supervisor stopped");
    }

    /// One run of link `k`'s ssh; answers why it ended and how long it was up.
    async fn attempt(
        &self,
        k: usize,
        shutdown: &CancellationToken,
    ) -> (Result<(), AttemptError>, Option<Duration>) {
        let t = &self.cfg.target;
        let preflight = tokio::select! {
            r = tcp_connect(&t.host, t.port, self.cfg.preflight_timeout) => r,
            _ = shutdown.cancelled() => return (Ok(()), None),
        };
        if let Err(e) = preflight {
            return (Err(e.into()), None);
        }
        let file = match ssh_config::write(&self.cfg, k) {
            Ok(f) => f,
            Err(source) => {
                let dir = self.cfg.run_dir.display().to_string();
                return (Err(AttemptError::ConfigFile { dir, source }), None);
            }
        };
        let mut cmd = tokio::process::Command::new(&self.cfg.ssh);
        cmd.arg("-F")
            .arg(&file)
            .arg("-N")
            .arg(HOST_ALIAS)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let child = match Supervised::spawn(cmd) {
            Ok(c) => c,
            Err(e) => return (Err(e.into()), None),
        };
        let pid = child.pid();
        tracing::info!(pid, link = k, command = %child.command_line_string(), "ssh started");
        *lock(&self.links[k].child) = Some(child.clone());
        self.aggregate();
        let mut exit = child.exit_watch();
        let forwards = self.cfg.link_forwards(k);
        let locals = forwards
            .iter()
            .filter(|f| matches!(f, Forward::Local { .. } | Forward::LocalUnix { .. }))
            .count();
        let remote = forwards.iter().any(|f| matches!(f, Forward::Remote { .. }));
        let spawned = Instant::now();
        let mut up_since: Option<Instant> = None;
        let mut poll = tokio::time::interval(MARKER_POLL);
        let result = loop {
            tokio::select! {
                // The watch guard must not live in select!'s output (it is not Send).
                _ = async { let _ = exit.wait_for(Option::is_some).await; } => {
                    let report = child.exit_report().unwrap_or_else(|| {
                        // The monitor task is gone: only possible while the runtime shuts down.
                        sendense_shared::child::ExitReport {
                            status: "unknown".into(), code: None, signal: None,
                            stderr_tail: child.stderr_tail(), requested: false,
                        }
                    });
                    break Err(classify(&report, pid, &self.cfg).into());
                }
                _ = shutdown.cancelled() => {
                    child.stop(STOP_GRACE).await;
                    break Ok(());
                }
                _ = poll.tick(), if up_since.is_none() => {
                    if forwards_established(&child.stderr_tail(), locals, remote) {
                        up_since = Some(Instant::now());
                        tracing::info!(pid, link = k, forwards = forwards.len(), "tunnel link up");
                        self.set(k, TunnelStateKind::Up, |_| {});
                    } else if spawned.elapsed() >= self.cfg.up_timeout {
                        child.stop(STOP_GRACE).await;
                        let last = last_own_line(&child.stderr_tail())
                            .map(|l| format!("; ssh said: {l}"))
                            .unwrap_or_default();
                        break Err(AttemptError::NotUp { pid, waited: self.cfg.up_timeout, last });
                    }
                }
            }
        };
        *lock(&self.links[k].child) = None;
        (result, up_since.map(|t| t.elapsed()))
    }
}

/// Delay before the next attempt after `failures` consecutive failures: `initial` doubling up
/// to `max`, then 75-125 % of that, so that many nodes cut off together do not return together.
/// The pacing is the workspace's one [`Backoff`]; only the random factor is the tunnel's.
pub fn backoff(policy: &BackoffPolicy, failures: u32) -> Duration {
    Backoff::new(policy.initial, policy.max)
        .jittered(failures, rand::rng().random_range(0.75..=1.25))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cause of a failed attempt, naming the process that holds the local forward port when
/// that is why ssh failed (a squatter: it keeps the tunnel down while it holds the port; the
/// supervisor's backoff retries until it leaves).
fn with_squatter(e: &AttemptError, bind: std::net::IpAddr) -> String {
    let mut error = sendense_shared::errors::chain(e);
    if let AttemptError::Ssh(SshFailure::LocalPortInUse { port, .. }) = e
        && let Some(h) = sendense_shared::portholder::holder_at(Some(bind), *port)
    {
        error.push_str(&format!("; {h}"));
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jittered_and_caps() {
        let p = BackoffPolicy::default();
        for _ in 0..50 {
            let d0 = backoff(&p, 0);
            assert!(d0 >= Duration::from_millis(375) && d0 <= Duration::from_millis(625));
            let d3 = backoff(&p, 3);
            assert!(d3 >= Duration::from_millis(3000) && d3 <= Duration::from_millis(5000));
            assert!(backoff(&p, 40) <= p.max);
            assert!(backoff(&p, 40) >= p.max.mul_f64(0.75));
        }
    }
}
