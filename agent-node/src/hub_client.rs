//! The node's side of talking to the hub: [`connect`] builds the one typed hub client
//! ([`sendense_shared::client::HubClient`], which carries registration, inventory, and the
//! progress and completion reports of backups and restores), and [`deliver`] is the node's
//! retry policy for a job's final reports: until the hub takes or refuses a report, and only a
//! few attempts once the node is shutting down.

use sendense_shared::backoff::Backoff;
use sendense_shared::client::{ClientError, HubClient};
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Attempts at a final report once the node is shutting down: a job just cancelled by the
/// shutdown should still be heard by the hub, but the node must exit within its grace.
pub const SHUTDOWN_ATTEMPTS: u32 = 3;

/// Pacing of every retry to the hub (final reports, registration): 0.25 s doubling up to 10 s.
pub const HUB_RETRY: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));

/// The client of the hub at `base`, carrying the node's token and naming the node in the
/// `User-Agent` (the hub logs it).
pub fn connect(base: &str, token: &str) -> HubClient {
    HubClient::with_agent(
        base,
        Some(token.to_string()),
        concat!("sendense-node/", env!("CARGO_PKG_VERSION")),
    )
}

/// How [`deliver`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The hub took the report.
    Taken,
    /// The hub answered 4xx: it does not want this report; retrying will not change that.
    /// `error` is the refusal as the client words it (status, URL, the hub's error and detail).
    Refused { status: u16, error: String },
    /// The node shut down before the hub took it.
    GaveUp,
}

/// Sends one final report until the hub takes it or refuses it with a 4xx, retrying paced by
/// [`HUB_RETRY`]; once `shutdown` fired, only until `attempt` reaches [`SHUTDOWN_ATTEMPTS`].
/// `attempt` is shared by the reports of one job (its progress, then its completion), so a
/// shutting-down node spends at most that many attempts per job.
pub async fn deliver<F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    attempt: &mut u32,
    mut send: F,
) -> Delivery
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), ClientError>>,
{
    loop {
        match send().await {
            Ok(()) => return Delivery::Taken,
            Err(e) if e.is_refused() => {
                let status = e.status().unwrap_or_default();
                let error = sendense_shared::errors::chain(&e);
                tracing::warn!(what, status, error, "hub refused the report");
                return Delivery::Refused { status, error };
            }
            Err(e) => {
                tracing::warn!(what, error = %sendense_shared::errors::chain(&e), attempt = *attempt,
                    "report failed; retrying");
            }
        }
        if shutdown.is_cancelled() && *attempt >= SHUTDOWN_ATTEMPTS {
            tracing::error!(what, "shutting down before the hub took the report");
            return Delivery::GaveUp;
        }
        tokio::time::sleep(HUB_RETRY.delay(*attempt)).await;
        *attempt += 1;
    }
}

/// A job's end as every kind of job reports it: its final progress, then its completion, each
/// through [`deliver`] with one attempt count (a refused progress does not stop the
/// completion; giving up does). Answers whether the hub took the completion.
pub async fn deliver_end<P, FP, C, FC>(
    what: &str,
    shutdown: &CancellationToken,
    progress: P,
    completion: C,
) -> bool
where
    P: FnMut() -> FP,
    FP: Future<Output = Result<(), ClientError>>,
    C: FnMut() -> FC,
    FC: Future<Output = Result<(), ClientError>>,
{
    let mut attempt = 0;
    if deliver(what, shutdown, &mut attempt, progress).await == Delivery::GaveUp {
        return false;
    }
    deliver(what, shutdown, &mut attempt, completion).await == Delivery::Taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use sendense_shared::api::RestoreProgress;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A hub answering every request with `status` and `body`; counts the requests it saw.
    async fn hub(status: &'static str, body: &'static str) -> (String, Arc<AtomicU32>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(AtomicU32::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            }
        });
        (url, seen)
    }

    const PROGRESS: RestoreProgress = RestoreProgress {
        bytes_done: 1,
        bytes_total: 2,
        rate_bps: 0,
    };

    #[test]
    fn retry_pacing_is_a_quarter_second_doubling_to_ten() {
        let got: Vec<u64> = (0..8)
            .map(|a| HUB_RETRY.delay(a).as_millis() as u64)
            .collect();
        assert_eq!(got, vec![250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
    }

    #[tokio::test]
    async fn a_4xx_stops_at_once_with_the_hubs_words() {
        let (url, seen) = hub(
            "409 Conflict",
            r#"{"error":"wrong_state","detail":"restore r-1 is already completed"}"#,
        )
        .await;
        let c = connect(&url, "tok");
        let mut attempt = 0;
        let got = deliver(
            "restore r-1",
            &CancellationToken::new(),
            &mut attempt,
            || c.restore_progress("r-1", &PROGRESS),
        )
        .await;
        assert_eq!(
            got,
            Delivery::Refused {
                status: 409,
                error: format!(
                    "hub answered 409 to POST {url}/api/v1/restores/r-1/progress: wrong_state: restore r-1 is already completed"
                ),
            }
        );
        assert_eq!(attempt, 0);
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_5xx_is_retried_and_shutdown_bounds_the_attempts() {
        let (url, seen) = hub("503 Service Unavailable", "").await;
        let c = connect(&url, "tok");
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let mut attempt = 0;
        let got = deliver("restore r-1", &shutdown, &mut attempt, || {
            c.restore_progress("r-1", &PROGRESS)
        })
        .await;
        assert_eq!(got, Delivery::GaveUp);
        assert_eq!(attempt, SHUTDOWN_ATTEMPTS);
        assert_eq!(seen.load(Ordering::SeqCst), SHUTDOWN_ATTEMPTS + 1);
    }
}
