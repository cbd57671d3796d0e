//! HTTPS/1.1 to one vSphere server: hyper's client connection over tokio-rustls with our own
//! `rustls::ClientConfig`, and a small pool of idle connections.
//!
//! Why not reqwest, which the node already uses for the hub: reqwest's rustls support without
//! aws-lc-rs (`rustls-no-provider`) panics in every `reqwest::Client` built without a process-wide
//! crypto provider, and cargo unifies that feature into the hub's, the console's and every test's
//! plain-HTTP clients. Speaking HTTP/1.1 through hyper directly keeps TLS to this module.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A RetrievePropertiesEx over a large inventory can take minutes on a busy vCenter.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);
/// Connections idle longer than this are not reused: the server may have closed them, and a
/// request sent into a closed connection cannot always be told apart from one that was processed.
const IDLE_REUSE: Duration = Duration::from_secs(20);
/// A bound on one answer so that a broken server cannot exhaust memory.
const MAX_BODY: usize = 512 << 20;

/// An HTTP answer: status, the Set-Cookie values, the body as text.
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) set_cookies: Vec<String>,
    pub(crate) body: String,
}

pub(crate) struct Https {
    /// Host without brackets, for connecting.
    host: String,
    port: u16,
    /// `host:port` as the Host header wants it.
    authority: String,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    idle: Mutex<Vec<(SendRequest<Full<Bytes>>, Instant)>>,
}

impl Https {
    /// `host` as in the URL (IPv6 in brackets), `port` the URL's or 443.
    pub(crate) fn new(
        host: &str,
        port: u16,
        config: rustls::ClientConfig,
    ) -> Result<Self, BoxError> {
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server_name = ServerName::try_from(bare.clone())
            .map_err(|e| format!("{host} is not a valid TLS server name: {e}"))?;
        Ok(Self {
            authority: if port == 443 {
                host.to_string()
            } else {
                format!("{host}:{port}")
            },
            host: bare,
            port,
            server_name,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// One request; `path` is origin-form ("/sdk").
    pub(crate) async fn request(
        &self,
        method: hyper::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: String,
    ) -> Result<Reply, BoxError> {
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let mut request = builder.body(Full::new(Bytes::from(body)))?;
        // One retry, only on a pooled connection and only when hyper hands the request back
        // unsent (the connection turned out closed).
        loop {
            let (mut sender, pooled) = match self.take_idle() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            let response = match tokio::time::timeout(
                ANSWER_TIMEOUT,
                sender.try_send_request(request),
            )
            .await
            {
                Err(_) => {
                    return Err(format!("no answer within {} s", ANSWER_TIMEOUT.as_secs()).into());
                }
                Ok(Ok(response)) => response,
                Ok(Err(mut e)) => match e.take_message() {
                    Some(unsent) if pooled => {
                        request = unsent;
                        continue;
                    }
                    _ => return Err(e.into_error().into()),
                },
            };
            let status = response.status().as_u16();
            let set_cookies = response
                .headers()
                .get_all(hyper::header::SET_COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_string))
                .collect();
            let collected = tokio::time::timeout(
                ANSWER_TIMEOUT,
                Limited::new(response.into_body(), MAX_BODY).collect(),
            )
            .await
            .map_err(|_| format!("answer not complete within {} s", ANSWER_TIMEOUT.as_secs()))??;
            self.put_idle(sender);
            let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
            return Ok(Reply {
                status,
                set_cookies,
                body,
            });
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, BoxError> {
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| format!("connect timed out after {} s", CONNECT_TIMEOUT.as_secs()))??;
        tcp.set_nodelay(true)?;
        let tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.tls.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| {
            format!(
                "TLS handshake timed out after {} s",
                CONNECT_TIMEOUT.as_secs()
            )
        })??;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "vSphere connection ended");
            }
        });
        Ok(sender)
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((sender, since)) = idle.pop() {
            if since.elapsed() < IDLE_REUSE && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // A handful is plenty: the driver runs a few calls at a time.
        if idle.len() < 8 {
            idle.push((sender, Instant::now()));
        }
    }
}
