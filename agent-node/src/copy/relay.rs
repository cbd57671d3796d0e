//! A delaying TCP relay for WAN benchmarks (`sendense-node relay`, hidden): this machine has no
//! `netem`, so a round trip is simulated in user space. Every accepted connection gets its own
//! connection to the upstream address; each direction is a delay line: a reader task takes
//! whatever the socket has, stamps it with the instant it may leave (`now + delay`), and queues
//! it; a writer task sends each piece at its instant. Reading never waits for writing, so the
//! relay keeps the throughput of the link and adds only latency (a stop-and-wait relay would
//! cap a connection at one buffer per delay). The queue is bounded in bytes per direction
//! (`buffer`): past it the reader stops and TCP's own flow control pushes back, as a router's
//! queue would.
//!
//! Only for tests and benchmarks on loopback: it adds latency, never loss or reordering.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Largest read taken from a socket at once.
const READ_CHUNK: usize = 256 * 1024;

/// How a relay delays.
#[derive(Debug, Clone, Copy)]
pub struct RelayOptions {
    /// Added to each direction (a round trip gains twice this).
    pub delay: Duration,
    /// Bytes queued per direction before the reader waits.
    pub buffer: usize,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            delay: Duration::from_millis(10),
            buffer: 64 << 20,
        }
    }
}

/// Accepts on `listener` until `shutdown`, relaying each connection to `upstream`.
pub async fn serve(
    listener: TcpListener,
    upstream: SocketAddr,
    opts: RelayOptions,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    loop {
        let (down, _) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => r?,
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let up = match TcpStream::connect(upstream).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%upstream, "relay: cannot connect upstream: {e}");
                    return;
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = relay_pair(down, up, opts) => {}
            }
        });
    }
}

/// Relays one connection both ways until both directions have ended.
async fn relay_pair(a: TcpStream, b: TcpStream, opts: RelayOptions) {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    tokio::join!(delay_line(ar, bw, opts), delay_line(br, aw, opts));
}

/// One direction: reads from `from` as fast as it comes, writes to `to` `delay` later.
async fn delay_line(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    opts: RelayOptions,
) {
    let budget = Arc::new(Semaphore::new(opts.buffer.max(READ_CHUNK)));
    let (tx, mut rx) =
        mpsc::unbounded_channel::<(Instant, Vec<u8>, tokio::sync::OwnedSemaphorePermit)>();
    let reader = async move {
        loop {
            let Ok(permit) = budget.clone().acquire_many_owned(READ_CHUNK as u32).await else {
                break;
            };
            let mut buf = vec![0u8; READ_CHUNK];
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.truncate(n);
            // Keep only what the piece holds counted against the queue.
            let mut permit = permit;
            drop(permit.split(READ_CHUNK - n));
            if tx.send((Instant::now() + opts.delay, buf, permit)).is_err() {
                break;
            }
        }
        // Dropping `tx` tells the writer that nothing more comes.
    };
    let writer = async move {
        while let Some((due, buf, permit)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&buf).await.is_err() {
                return;
            }
            drop(permit);
        }
        // The reading side ended: pass the end on (half-close), after the delay of the rest.
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Options of `sendense-node relay` (a benchmark helper, hidden from `--help`).
#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// Where to listen (e.g. 127.0.0.1:0; the bound address is printed on stdout).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Where each connection is relayed to.
    #[arg(long)]
    pub to: SocketAddr,
    /// Delay added to each direction, milliseconds (a round trip gains twice this).
    #[arg(long, default_value_t = 10)]
    pub delay_ms: u64,
    /// Bytes queued per direction and connection (k, M, G suffixes).
    #[arg(long, value_parser = super::cli::parse_size, default_value = "64M")]
    pub buffer: u64,
}

/// Runs the relay until SIGINT or SIGTERM.
pub async fn run_cli(args: RelayArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        s.cancel();
    });
    let opts = RelayOptions {
        delay: Duration::from_millis(args.delay_ms),
        buffer: usize::try_from(args.buffer).unwrap_or(usize::MAX),
    };
    serve(listener, args.to, opts, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server behind the relay: what comes back is exactly what was sent, in order,
    /// whole, and after at least one round trip of the relay.
    #[tokio::test]
    async fn relay_preserves_bytes_both_ways() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = echo.accept().await.unwrap();
            let (mut r, mut w) = s.into_split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let opts = RelayOptions {
            delay: Duration::from_millis(5),
            buffer: 1 << 20,
        };
        let server = tokio::spawn(serve(relay, echo_addr, opts, shutdown.clone()));

        // 8 MiB of non-repeating bytes: more than the relay's buffer, so its flow control is
        // crossed too.
        let data: Vec<u8> = (0..8u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let started = Instant::now();
        let s = TcpStream::connect(relay_addr).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let sent = data.clone();
        let send = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        send.await.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "the relay changed the bytes");
        // Both directions were delayed: the first byte could not come back sooner.
        assert!(started.elapsed() >= 2 * opts.delay);
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
