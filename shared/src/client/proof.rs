//! [`ProofLayer`]: a reqwest connector layer that makes every new TCP connection answer the
//! proof challenge ([`crate::proof`]) before the client may send anything on it.
//!
//! **Why per connection, in the connector.** A squatter can only get bytes by being the peer
//! of a connection: one that reached the real endpoint stays with it (the kernel does not hand
//! an established connection to whoever binds the port later), and every new connection is
//! proven before hyper writes the first request. reqwest's pool then reuses only proven
//! connections, and a connection error drops the connection, so the next one is proven again.
//! A cache per URL (prove once, then trust for N seconds) was the alternative: it leaves a
//! window in which ssh died, a squatter bound the port, and a new connection carried the
//! credential to it. The cost is one request per new connection (one round trip through the
//! tunnel), which keep-alive spreads over many calls.
//!
//! The challenge is written on the raw connection as a plain HTTP/1.1 request and its answer
//! read to the exact end of its body (`Content-Length`), so the connection is handed to hyper
//! at a request boundary and then used for the real requests.

use crate::proof::{self, ProofAnswer, Role};
use crate::token::Token;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Where the keys to check a proof come from: the credentials the caller could send to that
/// endpoint (empty: it sends none, so nothing needs proving).
pub type Keys = Arc<dyn Fn() -> BoxFuture<Result<Vec<Token>, BoxError>> + Send + Sync>;

/// Keys that never change (the node's own credential).
pub fn fixed_keys(credential: Token) -> Keys {
    Arc::new(move || {
        let c = credential.clone();
        Box::pin(async move { Ok(vec![c]) })
    })
}

/// Longest answer to a challenge read (a proof answer is about 100 bytes per credential).
const ANSWER_LIMIT: usize = 16 << 10;

/// Why an endpoint was not trusted with a credential.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error(
        "the endpoint at {endpoint} did not prove it is the {role} of node {node:?}: squatted port? ({why})"
    )]
    Failed {
        endpoint: String,
        role: Role,
        node: String,
        why: String,
    },
    /// The console's case: the token was not sent.
    #[error(
        "the endpoint at {endpoint} did not prove it is the hub holding this token ({why}), so the token was not sent: a wrong token (pass the hub's token with --token-file FILE or SENDENSE_TOKEN), or not the hub (a squatted port?)"
    )]
    NotTheAdminsHub { endpoint: String, why: String },
    #[error(
        "the endpoint at {endpoint} did not answer the {role}'s proof challenge within {waited:?}: squatted port?"
    )]
    Timeout {
        endpoint: String,
        role: Role,
        waited: Duration,
    },
    #[error(
        "the endpoint at {endpoint}: the connection failed during the {role}'s proof challenge"
    )]
    Io {
        endpoint: String,
        role: Role,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the credential to check the proof of {endpoint}")]
    Keys {
        endpoint: String,
        #[source]
        source: BoxError,
    },
}

/// The [`ProofError`] somewhere in `e`'s cause chain (a reqwest error wraps the connector's).
pub fn proof_failure<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ProofError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(p) = c.downcast_ref::<ProofError>() {
            return Some(p);
        }
        cur = c.source();
    }
    None
}

struct Config {
    /// Who must answer.
    role: Role,
    node: String,
    /// `host:port` of the endpoint, for `Host` and for messages.
    endpoint: String,
    keys: Keys,
    timeout: Duration,
}

/// The layer; see the module documentation.
#[derive(Clone)]
pub struct ProofLayer {
    cfg: Arc<Config>,
}

impl ProofLayer {
    /// Connections to `endpoint` (`host:port`) must prove they are `role` for `node` under one
    /// of `keys`, within `timeout`.
    pub fn new(role: Role, node: &str, endpoint: &str, keys: Keys, timeout: Duration) -> Self {
        ProofLayer {
            cfg: Arc::new(Config {
                role,
                node: node.to_string(),
                endpoint: endpoint.to_string(),
                keys,
                timeout,
            }),
        }
    }
}

impl<S> tower::Layer<S> for ProofLayer {
    type Service = ProofService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ProofService {
            inner,
            cfg: self.cfg.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ProofService<S> {
    inner: S,
    cfg: Arc<Config>,
}

impl<S, R> tower::Service<R> for ProofService<S>
where
    S: tower::Service<R, Error = BoxError> + Clone + Send + 'static,
    S::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        // The clone is not ready; the one polled ready is used (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let cfg = self.cfg.clone();
        Box::pin(async move {
            let conn = inner.call(req).await?;
            let keys = (cfg.keys)().await.map_err(|source| ProofError::Keys {
                endpoint: cfg.endpoint.clone(),
                source,
            })?;
            if keys.is_empty() {
                return Ok(conn);
            }
            let mut io = TokioIo::new(conn);
            match tokio::time::timeout(cfg.timeout, challenge(&mut io, &cfg, &keys)).await {
                Ok(Ok(())) => Ok(io.into_inner()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::errors::chain(&e), "endpoint refused: no credential sent");
                    Err(e.into())
                }
                Err(_) => {
                    let e = ProofError::Timeout {
                        endpoint: cfg.endpoint.clone(),
                        role: cfg.role,
                        waited: cfg.timeout,
                    };
                    tracing::warn!(error = %e, "endpoint refused: no credential sent");
                    Err(e.into())
                }
            }
        })
    }
}

/// One challenge on `io`; `Ok` when the answer holds a valid proof under one of `keys`.
async fn challenge<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut T,
    cfg: &Config,
    keys: &[Token],
) -> Result<(), ProofError> {
    let failed = |why: String| {
        if cfg.node == proof::ADMIN {
            ProofError::NotTheAdminsHub {
                endpoint: cfg.endpoint.clone(),
                why,
            }
        } else {
            ProofError::Failed {
                endpoint: cfg.endpoint.clone(),
                role: cfg.role,
                node: cfg.node.clone(),
                why,
            }
        }
    };
    let ioerr = |source| ProofError::Io {
        endpoint: cfg.endpoint.clone(),
        role: cfg.role,
        source,
    };
    let nonce = proof::nonce();
    let request = format!(
        "GET {}?nonce={nonce}&node={} HTTP/1.1\r\nhost: {}\r\naccept: application/json\r\nuser-agent: sendense-proof\r\n\r\n",
        proof::PATH,
        percent(&cfg.node),
        cfg.endpoint
    );
    io.write_all(request.as_bytes()).await.map_err(ioerr)?;
    io.flush().await.map_err(ioerr)?;
    let (status, body) = read_answer(io).await.map_err(|e| match e {
        Answer::Io(source) => ioerr(source),
        Answer::Bad(why) => failed(why),
    })?;
    if status != 200 {
        return Err(failed(format!(
            "it answered the challenge with HTTP {status}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(200)
                .collect::<String>()
        )));
    }
    let answer: ProofAnswer = serde_json::from_slice(&body)
        .map_err(|e| failed(format!("its answer is not a proof: {e}")))?;
    if keys
        .iter()
        .any(|k| proof::verify(k, cfg.role, &cfg.node, &nonce, &answer))
    {
        Ok(())
    } else {
        Err(failed(if cfg.node == proof::ADMIN {
            "its proof does not match the admin token".to_string()
        } else {
            "its proof does not match the node's credential".to_string()
        }))
    }
}

enum Answer {
    Io(std::io::Error),
    Bad(String),
}

/// Reads one HTTP/1.1 answer with a `Content-Length` body, exactly to its end.
async fn read_answer<T: AsyncRead + Unpin>(io: &mut T) -> Result<(u16, Vec<u8>), Answer> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > ANSWER_LIMIT {
            return Err(Answer::Bad("its answer's head is too long".into()));
        }
        let n = io.read(&mut chunk).await.map_err(Answer::Io)?;
        if n == 0 {
            return Err(Answer::Bad(if buf.is_empty() {
                "it closed the connection without answering".into()
            } else {
                "it closed the connection mid-answer".into()
            }));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 ").or(l.strip_prefix("HTTP/1.0 ")))
        .and_then(|l| l.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| Answer::Bad("its answer is not HTTP/1.1".into()))?;
    let mut length = None;
    for l in lines {
        if let Some((name, value)) = l.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            if name == "content-length" {
                length = value.trim().parse::<usize>().ok();
            } else if name == "transfer-encoding" {
                return Err(Answer::Bad("its answer is not of a known length".into()));
            }
        }
    }
    let length = length.ok_or_else(|| Answer::Bad("its answer has no Content-Length".into()))?;
    if length > ANSWER_LIMIT {
        return Err(Answer::Bad("its answer is too long".into()));
    }
    while buf.len() < head_end + length {
        let n = io.read(&mut chunk).await.map_err(Answer::Io)?;
        if n == 0 {
            return Err(Answer::Bad("it closed the connection mid-answer".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if buf.len() > head_end + length {
        return Err(Answer::Bad("it sent more than its answer".into()));
    }
    Ok((status, buf[head_end..].to_vec()))
}

/// Percent-encodes all but unreserved characters (node names are plain already).
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `host:port` of a base URL such as `http://127.0.0.1:8082` (for `Host` and messages).
pub fn endpoint_of(base: &str) -> String {
    let rest = base.split_once("://").map(|(_, r)| r).unwrap_or(base);
    rest.split('/').next().unwrap_or(rest).to_string()
}
