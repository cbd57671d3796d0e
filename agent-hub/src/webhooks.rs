//! Webhooks: a JSON `POST` to each configured receiver when something needs an operator.
//!
//! **What is sent** ([`AlertKind`]): a job that failed (backup, restore, verify, prune, or a
//! scheduled run that gave up), a verification that found corrupt points, a VM whose newest
//! good point is older than its policy allows, a repository nearly full, a tunnel down for
//! longer than `tunnel_down_alert_secs`. Job ends come from the event bus; the rest is checked
//! every `alert_check_interval_secs` against the hub's clock ([`watch`]). Conditions alert once
//! when they start and again only after they cleared.
//!
//! **How** ([`Sink`]): one delivery task per receiver, in order; each delivery is retried with
//! doubling backoff (`retry_initial_ms`, capped at 5 minutes) up to `max_attempts` on a
//! connection error, a 5xx, 408 or 429; any other 4xx is final. Every attempt carries
//! `X-Sendense-Event`, `X-Sendense-Delivery` (the same id on every attempt: receivers
//! deduplicate with it), `X-Sendense-Timestamp` (Unix seconds) and `X-Sendense-Signature:
//! sha256=HEX`, the HMAC-SHA256 of `"{timestamp}.{body}"` under the receiver's secret (read from
//! `secret_file`, which others may not read). Logs name the receiver by scheme, host, port and
//! path only; the secret and signatures are never logged.

pub mod watch;

use crate::clock::Clock;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a webhook tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    JobFailed,
    VerificationFailed,
    VmWithoutGoodPoint,
    RepositoryNearlyFull,
    TunnelDown,
}

impl AlertKind {
    pub const ALL: [AlertKind; 5] = [
        AlertKind::JobFailed,
        AlertKind::VerificationFailed,
        AlertKind::VmWithoutGoodPoint,
        AlertKind::RepositoryNearlyFull,
        AlertKind::TunnelDown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::JobFailed => "job_failed",
            AlertKind::VerificationFailed => "verification_failed",
            AlertKind::VmWithoutGoodPoint => "vm_without_good_point",
            AlertKind::RepositoryNearlyFull => "repository_nearly_full",
            AlertKind::TunnelDown => "tunnel_down",
        }
    }
}

/// One thing to tell.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub kind: AlertKind,
    /// What it is about: a job id, a VM, a repository, a node.
    pub subject: String,
    /// One sentence for a chat message or a ticket title.
    pub summary: String,
    /// The details (the job's record, the ages and limits, the space figures).
    pub data: serde_json::Value,
}

/// A `[[webhook]]` table of the hub's config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL the JSON is posted to.
    pub url: String,
    /// File holding the HMAC secret (mode 0600 or 0640 with no access for others; surrounding
    /// white space is not part of it).
    pub secret_file: PathBuf,
    /// Which alerts this receiver gets [default: all].
    #[serde(default)]
    pub events: Option<Vec<AlertKind>>,
    /// Attempts per delivery [default: 8].
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Wait before the first retry, doubled after each [default: 1000 ms].
    #[serde(default)]
    pub retry_initial_ms: Option<u64>,
    /// How long one attempt may take [default: 10 s].
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// Why webhooks could not be set up (the hub does not start: a receiver configured but never
/// told would be worse than a refusal).
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook {index}: url {url:?} is not an http:// or https:// URL")]
    Url { index: usize, url: String },
    #[error("webhook {index}: cannot read its secret_file")]
    Secret {
        index: usize,
        #[source]
        source: sendense_shared::token::TokenError,
    },
    #[error("webhook {index}: {field} must be more than 0")]
    Zero { index: usize, field: &'static str },
}

/// The receiver as logs name it: scheme, host, port and path (no user, password or query,
/// which may carry a secret).
pub fn display_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}{}",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port().map(|p| format!(":{p}")).unwrap_or_default(),
            u.path()
        ),
        Err(_) => "(unparsable url)".into(),
    }
}

/// `sha256=HEX`: the HMAC-SHA256 of `"{timestamp}.{body}"` under `secret`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + tag.len() * 2);
    out.push_str("sha256=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// One receiver: its settings and the queue its delivery task drains.
pub struct Sink {
    shown: String,
    events: Vec<AlertKind>,
    tx: mpsc::Sender<Delivery>,
}

struct Delivery {
    id: String,
    kind: AlertKind,
    body: Vec<u8>,
}

struct Sender {
    url: String,
    shown: String,
    secret: sendense_shared::token::Token,
    max_attempts: u32,
    retry_initial: Duration,
    timeout: Duration,
    http: reqwest::Client,
}

/// Queue depth per receiver; past it new alerts are dropped (and logged), never the hub slowed.
const QUEUE: usize = 1024;
const RETRY_CAP: Duration = Duration::from_secs(300);

/// The configured receivers.
pub struct Webhooks {
    sinks: Vec<Sink>,
    hub: String,
    clock: Arc<dyn Clock>,
}

impl Webhooks {
    /// Checks every receiver, reads its secret and starts its delivery task on `tasks`.
    pub fn start(
        configs: &[WebhookConfig],
        hub: String,
        clock: Arc<dyn Clock>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Webhooks, WebhookError> {
        let mut sinks = Vec::new();
        for (index, c) in configs.iter().enumerate() {
            let parsed = reqwest::Url::parse(&c.url).ok();
            if !parsed.is_some_and(|u| matches!(u.scheme(), "http" | "https")) {
                return Err(WebhookError::Url {
                    index,
                    url: display_url(&c.url),
                });
            }
            let secret = sendense_shared::token::read_token_file(&c.secret_file)
                .map_err(|source| WebhookError::Secret { index, source })?;
            let max_attempts = c.max_attempts.unwrap_or(8);
            if max_attempts == 0 {
                return Err(WebhookError::Zero {
                    index,
                    field: "max_attempts",
                });
            }
            let timeout = Duration::from_secs(c.timeout_secs.unwrap_or(10));
            if timeout.is_zero() {
                return Err(WebhookError::Zero {
                    index,
                    field: "timeout_secs",
                });
            }
            let (tx, rx) = mpsc::channel(QUEUE);
            let sender = Sender {
                url: c.url.clone(),
                shown: display_url(&c.url),
                secret,
                max_attempts,
                retry_initial: Duration::from_millis(c.retry_initial_ms.unwrap_or(1000)),
                timeout,
                http: reqwest::Client::new(),
            };
            let stop = shutdown.clone();
            let clock = clock.clone();
            tasks.spawn(async move { sender.run(rx, clock, stop).await });
            sinks.push(Sink {
                shown: display_url(&c.url),
                events: c.events.clone().unwrap_or_else(|| AlertKind::ALL.to_vec()),
                tx,
            });
        }
        Ok(Webhooks { sinks, hub, clock })
    }

    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// Queues `alert` for every receiver that wants its kind.
    pub fn send(&self, alert: &Alert) {
        let id = uuid::Uuid::new_v4().to_string();
        let body = serde_json::json!({
            "delivery_id": id,
            "event": alert.kind.as_str(),
            "at": self.clock.now(),
            "hub": self.hub,
            "subject": alert.subject,
            "summary": alert.summary,
            "data": alert.data,
        });
        let body = serde_json::to_vec(&body).unwrap_or_default();
        tracing::info!(event = alert.kind.as_str(), subject = %alert.subject, "webhook alert");
        for s in self.sinks.iter().filter(|s| s.events.contains(&alert.kind)) {
            let d = Delivery {
                id: id.clone(),
                kind: alert.kind,
                body: body.clone(),
            };
            if s.tx.try_send(d).is_err() {
                tracing::warn!(receiver = %s.shown, event = alert.kind.as_str(),
                    "webhook queue full or closed; alert dropped for this receiver");
            }
        }
    }
}

impl Sender {
    async fn run(
        self,
        mut rx: mpsc::Receiver<Delivery>,
        clock: Arc<dyn Clock>,
        stop: CancellationToken,
    ) {
        loop {
            let d = tokio::select! {
                _ = stop.cancelled() => return,
                d = rx.recv() => match d { Some(d) => d, None => return },
            };
            self.deliver(&d, &*clock, &stop).await;
        }
    }

    /// Attempts `d` until it is taken, refused for good, out of attempts, or the hub stops.
    async fn deliver(&self, d: &Delivery, clock: &dyn Clock, stop: &CancellationToken) {
        let mut wait = self.retry_initial;
        for attempt in 1..=self.max_attempts {
            let ts = clock.now().timestamp();
            let sig = signature(self.secret.as_str().as_bytes(), ts, &d.body);
            let sent = self
                .http
                .post(&self.url)
                .timeout(self.timeout)
                .header("content-type", "application/json")
                .header("x-sendense-event", d.kind.as_str())
                .header("x-sendense-delivery", &d.id)
                .header("x-sendense-timestamp", ts.to_string())
                .header("x-sendense-signature", sig)
                .body(d.body.clone())
                .send()
                .await;
            let why = match sent {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(receiver = %self.shown, delivery = %d.id, attempt,
                        "webhook delivered");
                    return;
                }
                Ok(r)
                    if r.status().is_client_error()
                        && !matches!(r.status().as_u16(), 408 | 429) =>
                {
                    tracing::warn!(receiver = %self.shown, delivery = %d.id, attempt,
                        status = r.status().as_u16(), "webhook refused by the receiver; not retried");
                    return;
                }
                Ok(r) => format!("HTTP {}", r.status().as_u16()),
                Err(e) => sendense_shared::errors::chain(&e.without_url()),
            };
            if attempt == self.max_attempts {
                tracing::warn!(receiver = %self.shown, delivery = %d.id, attempts = attempt,
                    error = %why, "webhook not delivered; giving up");
                return;
            }
            tracing::warn!(receiver = %self.shown, delivery = %d.id, attempt, error = %why,
                retry_in_ms = wait.as_millis() as u64, "webhook attempt failed; retrying");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(RETRY_CAP);
        }
    }
}

/// Follows the event bus and checks the periodic conditions every `interval`, sending what
/// [`watch::Watch`] finds, until `shutdown`.
pub fn spawn(
    hub: Arc<crate::hub::Hub>,
    webhooks: Arc<Webhooks>,
    settings: watch::Settings,
    interval: Duration,
) {
    if webhooks.is_empty() {
        return;
    }
    let mut rx = hub.bus.subscribe();
    let shutdown = hub.shutdown.clone();
    let tasks = hub.tasks.clone();
    tasks.spawn(async move {
        let grace = settings.stale_grace;
        let mut w = watch::Watch::new(settings);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = rx.recv() => match ev {
                    Ok(ev) => for a in w.on_event(&ev) { webhooks.send(&a) },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "webhooks fell behind the event bus; some job ends may not be told");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    match watch::facts(&hub, grace).await {
                        Ok(f) => for a in w.check(&f, hub.db.clock().now()) { webhooks.send(&a) },
                        Err(e) => tracing::warn!(error = %sendense_shared::errors::chain(&e),
                            "webhook checks skipped this round"),
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2 ("Jefe"), with the message split as "{timestamp}.{body}".
        let s = signature(b"Jefe", 0, b"");
        assert_eq!(s.len(), 7 + 64);
        let whole = {
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"Jefe").unwrap();
            mac.update(b"what do ya want for nothing?");
            mac.finalize().into_bytes()
        };
        let hex: String = whole.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(signature(b"Jefe", 1, b"x"), signature(b"Jefe", 2, b"x"));
        assert_ne!(signature(b"a", 1, b"x"), signature(b"b", 1, b"x"));
    }

    #[test]
    fn logs_name_the_receiver_without_credentials_or_query() {
        assert_eq!(
            display_url("https://user:pw@hooks.example:8443/a/b?token=s3cret"),
            "https://hooks.example:8443/a/b"
        );
        assert_eq!(display_url("not a url"), "(unparsable url)");
    }

    #[test]
    fn kinds_are_spelled_as_the_config_spells_them() {
        for k in AlertKind::ALL {
            let j = serde_json::to_value(k).unwrap();
            assert_eq!(j, k.as_str());
        }
    }
}
