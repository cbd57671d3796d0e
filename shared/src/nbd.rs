//! Async NBD client on tokio, written for Sendense: fixed newstyle handshake, `NBD_OPT_GO` by
//! export name, structured replies, meta contexts (`base:allocation`,
//! `qemu:dirty-bitmap:NAME`), and READ, WRITE, WRITE_ZEROES, TRIM, FLUSH, BLOCK_STATUS, DISC.
//!
//! One [`NbdClient`] is one connection. It is `Clone` and may be used from many tasks at once:
//! each call registers its request under a fresh handle and waits for its own reply, so many
//! requests are in flight together and the server may answer them in any order. A writer task
//! owns the socket's write half, a reader task the read half (see `connection`).
//!
//! Trust: the server is not trusted. Every length read from the wire is checked against the
//! request it answers or a fixed cap before memory is allocated for it; a protocol violation
//! (bad magic, wrong length, unknown handle, a socket closed mid-reply) fails the connection and
//! every request pending on it with an [`NbdError`]. The reply parser is the pure function
//! [`reply::decode`], which has a fuzz target in `shared/fuzz`.
//!
//! Modules: `proto` (wire constants), `handshake` (negotiation), [`reply`] (reply parser),
//! `connection` (reader and writer tasks, the table of requests in flight), [`verify`] (read-back
//! of checksummed ranges, used by the hub for backups and by the node for restores), [`tls`]
//! (`NBD_OPT_STARTTLS` with rustls and an x509 client certificate, when
//! [`ConnectOptions::tls`] is set).

mod connection;
mod handshake;
pub mod proto;
pub mod reply;
pub mod tls;
pub mod verify;

use crate::targets::NbdUri;
use bytes::Bytes;
use connection::{Done, Outgoing, Pending, Shared};
use proto::*;
use reply::Expect;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

/// The meta context of allocation status: flags [`STATE_HOLE`] and [`STATE_ZERO`].
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Flag of a `qemu:dirty-bitmap:NAME` extent: the area changed.
pub const STATE_DIRTY: u32 = 1;
pub use proto::{STATE_HOLE, STATE_ZERO};

/// Name of the meta context of a QEMU dirty bitmap.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// Largest READ or WRITE payload sent when the server states no maximum block size (the
/// protocol's recommended default limit).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Where an NBD export is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdAddr {
    Tcp {
        host: String,
        port: u16,
        export: String,
    },
    Unix {
        path: PathBuf,
        export: String,
    },
}

impl NbdAddr {
    /// Parses `nbd://host:port/export` or `nbd+unix:///export?socket=/path/to/socket`.
    /// Percent-encoding is not decoded.
    pub fn parse(uri: &str) -> Result<Self, NbdError> {
        let bad = |reason: String| NbdError::Address {
            uri: uri.chars().take(200).collect(),
            reason,
        };
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let rest = rest
                .strip_prefix('/')
                .ok_or_else(|| bad("expected nbd+unix:///<export>?socket=<path>".into()))?;
            let (export, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("missing ?socket=<path>".into()))?;
            let mut path = None;
            for kv in query.split('&') {
                match kv.split_once('=') {
                    Some(("socket", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                    Some(("socket", _)) => return Err(bad("empty socket path".into())),
                    _ => return Err(bad(format!("unknown query parameter {kv:?}"))),
                }
            }
            let path = path.ok_or_else(|| bad("missing ?socket=<path>".into()))?;
            if export.len() > 4096 {
                return Err(bad("export name longer than 4096 bytes".into()));
            }
            if export.contains('\0') || export.chars().any(char::is_control) {
                return Err(bad("bad character in export name".into()));
            }
            return Ok(NbdAddr::Unix {
                path,
                export: export.to_string(),
            });
        }
        if uri.starts_with("nbd://") {
            let u = NbdUri::parse(uri).map_err(|e| bad(e.to_string()))?;
            return Ok(NbdAddr::Tcp {
                host: u.host,
                port: u.port,
                export: u.export,
            });
        }
        Err(bad("scheme must be nbd:// or nbd+unix://".into()))
    }

    pub fn export(&self) -> &str {
        match self {
            NbdAddr::Tcp { export, .. } | NbdAddr::Unix { export, .. } => export,
        }
    }
}

impl From<NbdUri> for NbdAddr {
    fn from(u: NbdUri) -> Self {
        match u.socket {
            Some(path) => NbdAddr::Unix {
                path: PathBuf::from(path),
                export: u.export,
            },
            None => NbdAddr::Tcp {
                host: u.host,
                port: u.port,
                export: u.export,
            },
        }
    }
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddr::Tcp { host, port, export } => write!(
                f,
                "{}",
                NbdUri {
                    host: host.clone(),
                    port: *port,
                    export: export.clone(),
                    socket: None,
                }
            ),
            NbdAddr::Unix { path, export } => {
                write!(f, "nbd+unix:///{export}?socket={}", path.display())
            }
        }
    }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Meta contexts to negotiate, e.g. [`BASE_ALLOCATION`] or `qemu:dirty-bitmap:NAME`. A
    /// context the server does not grant is simply absent ([`NbdClient::meta_context_id`]).
    pub meta_contexts: Vec<String>,
    /// Bound on TCP/unix connect plus the whole handshake (TLS included).
    pub connect_timeout: Duration,
    /// Upgrade with `NBD_OPT_STARTTLS` right after the greeting and present this client
    /// certificate; the server must be signed by its CA. `None`: plain NBD.
    pub tls: Option<crate::api::NbdTls>,
    /// Deadline of every request from sending to its whole reply. A request past it fails with
    /// [`NbdError::Deadline`] and the connection is closed (a late reply could not be told
    /// from a protocol error). `None`: no deadline.
    pub request_timeout: Option<Duration>,
}

/// TCP keepalive on every NBD socket: a peer that vanished without a FIN (a host gone, a
/// NAT that dropped the flow) is noticed in about a minute instead of the kernel's two hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

fn set_keepalive(s: &tokio::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = socket2::SockRef::from(s).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "TCP keepalive not set on an NBD socket");
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            meta_contexts: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            tls: None,
            request_timeout: None,
        }
    }
}

/// One extent of a block status reply: `length` bytes with the context's status `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u32,
}

/// Errors of the NBD client. Cloneable, because one connection failure is handed to every
/// request that was pending on it.
#[derive(Debug, Clone, Error)]
pub enum NbdError {
    #[error("bad NBD address {uri:?}: {reason}")]
    Address { uri: String, reason: String },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("connecting to {addr}: no handshake within {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("NBD handshake failed: {reason}")]
    Handshake { reason: String },
    /// STARTTLS refused, bad TLS material, or the TLS handshake failed (a certificate the
    /// server or the client does not accept).
    #[error("NBD TLS: {reason}")]
    Tls { reason: String },
    #[error("server refused {option}: {reply}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    OptionRefused {
        option: &'static str,
        reply: &'static str,
        message: String,
    },
    #[error("export {export:?} does not exist on the server{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    ExportNotFound { export: String, message: String },
    #[error("server does not support {what}")]
    Unsupported { what: &'static str },
    #[error("export is read-only")]
    ReadOnly,
    #[error("meta context {context:?} was not negotiated with the server")]
    NoMetaContext { context: String },
    #[error("{command} at {offset}+{length} is outside the export of {size} bytes")]
    OutOfRange {
        command: &'static str,
        offset: u64,
        length: u64,
        size: u64,
    },
    #[error("{command} of {length} bytes exceeds the limit of {max} bytes per request")]
    TooLarge {
        command: &'static str,
        length: u64,
        max: u64,
    },
    #[error("server failed {command} at {offset}+{length}: {errno} ({code}){}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Server {
        command: &'static str,
        offset: u64,
        length: u32,
        code: u32,
        errno: &'static str,
        message: String,
    },
    #[error("NBD protocol violation by the server: {reason}")]
    Protocol { reason: String },
    #[error("I/O error {during}")]
    Io {
        during: &'static str,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("NBD connection closed: {reason}")]
    Closed { reason: String },
    /// No whole reply within the request deadline ([`ConnectOptions::request_timeout`]).
    #[error(
        "{command} at {offset}+{length}: no reply within {after:?} (the server stopped answering)"
    )]
    Deadline {
        command: &'static str,
        offset: u64,
        length: u32,
        after: Duration,
    },
}

struct Inner {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Outgoing>,
    next_handle: AtomicU64,
    size: u64,
    flags: u16,
    structured: bool,
    contexts: Vec<(String, u32)>,
    block_size: Option<(u32, u32, u32)>,
    request_timeout: Option<Duration>,
}

/// One NBD connection; clones share it.
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("size", &self.inner.size)
            .field("flags", &self.inner.flags)
            .field("contexts", &self.inner.contexts)
            .finish()
    }
}

impl NbdClient {
    /// Connects and negotiates; returns once the export is open for transmission.
    pub async fn connect(addr: &NbdAddr, opts: &ConnectOptions) -> Result<NbdClient, NbdError> {
        let timeout = opts.connect_timeout;
        let what = addr.to_string();
        let attempt = async {
            match addr {
                NbdAddr::Tcp { host, port, export } => {
                    let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(|e| NbdError::Connect {
                            addr: what.clone(),
                            source: Arc::new(e),
                        })?;
                    // Request headers are small; waiting for Nagle would add latency to each.
                    let _ = s.set_nodelay(true);
                    set_keepalive(&s);
                    if opts.tls.is_some() {
                        return tls::connect_over(s, export, opts).await;
                    }
                    let (rd, wr) = s.into_split();
                    Self::from_halves(rd, wr, export, opts).await
                }
                NbdAddr::Unix { path, export } => {
                    let s = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                        NbdError::Connect {
                            addr: what.clone(),
                            source: Arc::new(e),
                        }
                    })?;
                    if opts.tls.is_some() {
                        return tls::connect_over(s, export, opts).await;
                    }
                    let (rd, wr) = s.into_split();
                    Self::from_halves(rd, wr, export, opts).await
                }
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| NbdError::ConnectTimeout {
                addr: what.clone(),
                timeout,
            })?
    }

    /// Negotiates over an already connected stream, given as its two halves (owned halves of
    /// a socket avoid the lock that `tokio::io::split` puts between them).
    pub(crate) async fn from_halves<R, W>(
        rd: R,
        wr: W,
        export: &str,
        opts: &ConnectOptions,
    ) -> Result<NbdClient, NbdError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut stream = tokio::io::join(rd, wr);
        handshake::greet(&mut stream).await?;
        let (rd, wr) = stream.into_inner();
        Self::after_greeting(rd, wr, export, opts).await
    }

    /// Option haggling and `NBD_OPT_GO` on a greeted stream, then the reader and writer tasks.
    pub(crate) async fn after_greeting<R, W>(
        rd: R,
        wr: W,
        export: &str,
        opts: &ConnectOptions,
    ) -> Result<NbdClient, NbdError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut stream = tokio::io::join(rd, wr);
        let n = handshake::negotiate(&mut stream, export, &opts.meta_contexts).await?;
        let (rd, wr) = stream.into_inner();
        let shared = Shared::new();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(connection::reader_loop(rd, shared.clone(), n.structured));
        tokio::spawn(connection::writer_loop(wr, rx, shared.clone()));
        Ok(NbdClient {
            inner: Arc::new(Inner {
                shared,
                tx,
                next_handle: AtomicU64::new(1),
                size: n.size,
                flags: n.flags,
                structured: n.structured,
                contexts: n.contexts,
                block_size: n.block_size,
                request_timeout: opts.request_timeout,
            }),
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    pub fn read_only(&self) -> bool {
        self.inner.flags & TFLAG_READ_ONLY != 0
    }

    /// The server says several connections to this export see each other's writes after a
    /// FLUSH on any of them, so a copy may spread over connections.
    pub fn can_multi_conn(&self) -> bool {
        self.inner.flags & TFLAG_CAN_MULTI_CONN != 0
    }

    pub fn can_write_zeroes(&self) -> bool {
        self.inner.flags & TFLAG_SEND_WRITE_ZEROES != 0
    }

    pub fn can_trim(&self) -> bool {
        self.inner.flags & TFLAG_SEND_TRIM != 0
    }

    pub fn structured_replies(&self) -> bool {
        self.inner.structured
    }

    /// Minimum, preferred and maximum block size, if the server stated them.
    pub fn block_size(&self) -> Option<(u32, u32, u32)> {
        self.inner.block_size
    }

    /// Largest READ/WRITE payload this client will send.
    pub fn max_payload(&self) -> u32 {
        match self.inner.block_size {
            Some((_, _, max)) if max > 0 => max,
            _ => DEFAULT_MAX_PAYLOAD,
        }
    }

    /// Id of a negotiated meta context.
    pub fn meta_context_id(&self, name: &str) -> Option<u32> {
        self.inner
            .contexts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdError> {
        self.check_range(CMD_READ, offset, len as u64)?;
        self.check_payload(CMD_READ, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        match self.submit(0, CMD_READ, offset, len, None, 0).await? {
            Done::Data(d) if d.len() == len as usize => Ok(d),
            other => Err(NbdError::Protocol {
                reason: format!("READ of {len} bytes answered with {other:?}"),
            }),
        }
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), NbdError> {
        self.check_writable()?;
        let len = data.len() as u64;
        self.check_range(CMD_WRITE, offset, len)?;
        self.check_payload(CMD_WRITE, len)?;
        if len == 0 {
            return Ok(());
        }
        self.submit(0, CMD_WRITE, offset, len as u32, Some(data), 0)
            .await
            .map(drop)
    }

    /// Writes `len` zero bytes. `no_hole` asks the server to allocate rather than punch a hole.
    pub async fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool) -> Result<(), NbdError> {
        self.check_writable()?;
        if !self.can_write_zeroes() {
            return Err(NbdError::Unsupported {
                what: "NBD_CMD_WRITE_ZEROES",
            });
        }
        self.check_range(CMD_WRITE_ZEROES, offset, len as u64)?;
        if len == 0 {
            return Ok(());
        }
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.submit(flags, CMD_WRITE_ZEROES, offset, len, None, 0)
            .await
            .map(drop)
    }

    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.check_writable()?;
        if !self.can_trim() {
            return Err(NbdError::Unsupported {
                what: "NBD_CMD_TRIM",
            });
        }
        self.check_range(CMD_TRIM, offset, len as u64)?;
        if len == 0 {
            return Ok(());
        }
        self.submit(0, CMD_TRIM, offset, len, None, 0)
            .await
            .map(drop)
    }

    /// Makes completed writes durable. A server that does not offer FLUSH writes through, so
    /// there is nothing to do then.
    pub async fn flush(&self) -> Result<(), NbdError> {
        if self.inner.flags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.submit(0, CMD_FLUSH, 0, 0, None, 0).await.map(drop)
    }

    /// Status of `[offset, offset+len)` in the meta context `context`. The server may describe
    /// less than asked (query again from where it stopped) and the last extent may run past
    /// the requested range; every extent has a non-zero length.
    pub async fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<Extent>, NbdError> {
        let id = self
            .meta_context_id(context)
            .ok_or_else(|| NbdError::NoMetaContext {
                context: context.to_string(),
            })?;
        self.check_range(CMD_BLOCK_STATUS, offset, len as u64)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        match self
            .submit(0, CMD_BLOCK_STATUS, offset, len, None, id)
            .await?
        {
            Done::Extents(e) => Ok(e),
            other => Err(NbdError::Protocol {
                reason: format!("BLOCK_STATUS answered with {other:?}"),
            }),
        }
    }

    /// Sends NBD_CMD_DISC and closes this connection (for every clone).
    pub async fn disconnect(self) -> Result<(), NbdError> {
        let msg = Outgoing {
            header: encode_request(0, CMD_DISC, 0, 0, 0),
            payload: None,
            last: true,
        };
        self.inner
            .tx
            .send(msg)
            .await
            .map_err(|_| self.closed_error())?;
        // The writer shuts the socket down after DISC; the server then closes its side.
        self.inner.tx.closed().await;
        self.inner.shared.fail(NbdError::Closed {
            reason: "disconnected by this client".into(),
        });
        Ok(())
    }

    fn closed_error(&self) -> NbdError {
        self.inner
            .shared
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| NbdError::Closed {
                reason: "connection tasks stopped".into(),
            })
    }

    fn check_writable(&self) -> Result<(), NbdError> {
        if self.read_only() {
            return Err(NbdError::ReadOnly);
        }
        Ok(())
    }

    fn check_range(&self, cmd: u16, offset: u64, len: u64) -> Result<(), NbdError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => Ok(()),
            _ => Err(NbdError::OutOfRange {
                command: command_name(cmd),
                offset,
                length: len,
                size: self.inner.size,
            }),
        }
    }

    fn check_payload(&self, cmd: u16, len: u64) -> Result<(), NbdError> {
        let max = self.max_payload() as u64;
        if len > max {
            return Err(NbdError::TooLarge {
                command: command_name(cmd),
                length: len,
                max,
            });
        }
        Ok(())
    }

    async fn submit(
        &self,
        flags: u16,
        cmd: u16,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
        context: u32,
    ) -> Result<Done, NbdError> {
        let handle = self.inner.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut t = self.inner.shared.lock();
            if let Some(e) = &t.closed {
                return Err(e.clone());
            }
            let expect = Expect {
                command: cmd,
                offset,
                length,
            };
            t.pending.insert(handle, Pending::new(expect, context, tx));
        }
        let msg = Outgoing {
            header: encode_request(flags, cmd, handle, offset, length),
            payload,
            last: false,
        };
        if self.inner.tx.send(msg).await.is_err() {
            self.inner.shared.lock().pending.remove(&handle);
            return Err(self.closed_error());
        }
        let reply = match self.inner.request_timeout {
            None => rx.await,
            Some(after) => match tokio::time::timeout(after, rx).await {
                Ok(r) => r,
                Err(_) => {
                    let e = NbdError::Deadline {
                        command: command_name(cmd),
                        offset,
                        length,
                        after,
                    };
                    // Every request on this connection fails now, the later ones included: a
                    // server that sat on one request for that long is not trusted with more.
                    self.inner.shared.lock().pending.remove(&handle);
                    self.inner.shared.fail(e.clone());
                    return Err(e);
                }
            },
        };
        match reply {
            Ok(r) => r,
            Err(_) => Err(self.closed_error()),
        }
    }
}

#[cfg(test)]
mod tests;
