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
/// `User-Agent` (the hub logs it). Every new connection must first prove it reaches the hub
/// that issued `node`'s credential (`sendense_shared::client::proof`): the local forward of a
/// tunnel whose ssh died is a port anyone may bind, and it gets neither the credential nor a
/// report.
pub fn connect(base: &str, token: &str, node: &str) -> HubClient {
    HubClient::proven(
        base,
        token,
        concat!("sendense-node/", env!("CARGO_PKG_VERSION")),
        node,
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

    /// A hub answering the proof challenge as the hub of `node1` holding `tok`, and every
    /// other request with `status` and `body`; counts those other requests.
    async fn hub(status: &'static str, body: &'static str) -> (String, Arc<AtomicU32>) {
        let (url, seen, _) = hub_counting_proofs(status, body).await;
        (url, seen)
    }

    /// [`hub`], also counting the proofs asked.
    async fn hub_counting_proofs(
        status: &'static str,
        body: &'static str,
    ) -> (String, Arc<AtomicU32>, Arc<AtomicU32>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(AtomicU32::new(0));
        let count = seen.clone();
        let proofs = Arc::new(AtomicU32::new(0));
        let proved = proofs.clone();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let count = count.clone();
                let proved = proved.clone();
                tokio::spawn(async move {
                    // Requests of one connection, one after the other (the proof, then the
                    // report on the same connection).
                    loop {
                        let mut req = Vec::new();
                        let mut buf = [0u8; 4096];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match sock.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        let text = String::from_utf8_lossy(&req).into_owned();
                        let line = text.lines().next().unwrap_or_default().to_string();
                        let resp = if let Some(q) = line.strip_prefix("GET /api/v1/proof?") {
                            proved.fetch_add(1, Ordering::SeqCst);
                            let q = q.split(' ').next().unwrap();
                            let nonce = q
                                .split('&')
                                .find_map(|kv| kv.strip_prefix("nonce="))
                                .unwrap();
                            let proof = sendense_shared::proof::prove(
                                &"tok".into(),
                                sendense_shared::proof::Role::Hub,
                                "node1",
                                nonce,
                            );
                            let b = format!(r#"{{"proofs":["{proof}"]}}"#);
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
                                b.len()
                            )
                        } else {
                            // Reports carry a body: read it so the next request starts clean.
                            count.fetch_add(1, Ordering::SeqCst);
                            let head_end =
                                req.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                            let len: usize = text
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse().unwrap())
                                })
                                .unwrap_or(0);
                            while req.len() < head_end + len {
                                match sock.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => req.extend_from_slice(&buf[..n]),
                                }
                            }
                            format!(
                                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            )
                        };
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, seen, proofs)
    }

    /// A squatter: a listener that records every byte it receives and answers whatever it
    /// is asked with a 200 and an empty JSON object (as a naive fake hub would).
    async fn squatter(proof_body: &'static str) -> (String, Arc<std::sync::Mutex<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let got: Arc<std::sync::Mutex<Vec<u8>>> = Arc::default();
        let rec = got.clone();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let rec = rec.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => rec.lock().unwrap().extend_from_slice(&buf[..n]),
                        }
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{proof_body}",
                            proof_body.len()
                        );
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, got)
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
        let c = connect(&url, "tok", "node1");
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
        let c = connect(&url, "tok", "node1");
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

    #[tokio::test]
    async fn a_squatter_that_cannot_prove_gets_no_credential_nor_report() {
        // One answers nonsense, one a proof made with another key.
        let wrong = Box::leak(
            format!(
                r#"{{"proofs":["{}"]}}"#,
                sendense_shared::proof::prove(
                    &"other".into(),
                    sendense_shared::proof::Role::Hub,
                    "node1",
                    &sendense_shared::proof::nonce()
                )
            )
            .into_boxed_str(),
        );
        for body in ["{}", &*wrong] {
            let (url, got) = squatter(body).await;
            let c = connect(&url, "tok", "node1");
            let e = c.restore_progress("r-1", &PROGRESS).await.unwrap_err();
            assert!(e.proof_failure().is_some(), "{e:?}");
            assert!(
                !e.is_refused(),
                "a squatter is retried like an unreachable hub"
            );
            let shown = sendense_shared::errors::chain(&e);
            let endpoint = url.trim_start_matches("http://");
            assert!(
                shown.contains(&format!(
                    "the endpoint at {endpoint} did not prove it is the hub of node \"node1\": squatted port?"
                )),
                "{shown}"
            );
            let bytes = String::from_utf8_lossy(&got.lock().unwrap()).to_ascii_lowercase();
            assert!(bytes.starts_with("get /api/v1/proof?nonce="), "{bytes}");
            assert!(!bytes.contains("authorization"), "{bytes}");
            assert!(
                !bytes.contains("tok\r") && !bytes.contains("bearer"),
                "{bytes}"
            );
            assert!(!bytes.contains("progress"), "{bytes}");
        }
    }

    #[tokio::test]
    async fn the_proof_is_asked_once_per_connection_not_per_report() {
        let (url, seen, proofs) = hub_counting_proofs("202 Accepted", "").await;
        let c = connect(&url, "tok", "node1");
        for _ in 0..3 {
            c.restore_progress("r-1", &PROGRESS).await.unwrap();
        }
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        // One keep-alive connection, proven once.
        assert_eq!(proofs.load(Ordering::SeqCst), 1);
    }
}
