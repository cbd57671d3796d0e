//! `sendense-node copy --from URI --to URI`: the copy engine alone (benchmarks, restores).

use super::{CopyOptions, DiskCounters, ExtentSource, copy_disk};
use anyhow::Context;
use clap::Args;
use sendense_shared::nbd::NbdAddr;
use std::io::Write;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Options of `sendense-node copy`.
#[derive(Debug, Clone, Args)]
pub struct CopyArgs {
    /// Source export: nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH.
    #[arg(long)]
    pub from: String,
    /// Target export, same forms.
    #[arg(long)]
    pub to: String,
    /// Largest READ/WRITE request (bytes; k, M, G suffixes).
    #[arg(long, value_parser = parse_size)]
    pub request_size: Option<u64>,
    /// Connections to each side (used when the server advertises multi-conn).
    #[arg(long)]
    pub connections: Option<u32>,
    /// Bound on bytes in flight (k, M, G suffixes).
    #[arg(long, value_parser = parse_size)]
    pub in_flight: Option<u64>,
    /// The target is fresh and reads as zeroes: holes are skipped instead of zeroed.
    #[arg(long)]
    pub destination_is_zero: bool,
    /// Incremental: copy only what the source's dirty bitmap NAME marks as changed.
    #[arg(long, value_name = "NAME")]
    pub dirty_bitmap: Option<String>,
    /// Checksum grid (k, M, G suffixes).
    #[arg(long, value_parser = parse_size)]
    pub checksum_chunk: Option<u64>,
    /// Also build the whole-disk checksum grid with cells of this size (k, M, G suffixes).
    #[arg(long, value_parser = parse_size)]
    pub grid_cell: Option<u64>,
    /// TLS to the target (a hub export with `nbd_tls`): a directory with `ca-cert.pem`,
    /// `client-cert.pem` and `client-key.pem` (libnbd's layout).
    #[arg(long, value_name = "DIR")]
    pub to_tls: Option<std::path::PathBuf>,
    /// Print progress to stderr once a second.
    #[arg(long)]
    pub progress: bool,
}

/// Parses `4096`, `256k`, `2M`, `1G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 256k, 2M, 1G)"))
}

pub async fn run_cli(args: CopyArgs) -> anyhow::Result<()> {
    let from = NbdAddr::parse(&args.from).context("--from")?;
    let to = NbdAddr::parse(&args.to).context("--to")?;
    let mut opts = CopyOptions::default();
    if let Some(r) = args.request_size {
        opts.request_size =
            u32::try_from(r).map_err(|_| anyhow::anyhow!("--request-size {r} is too large"))?;
    }
    if let Some(c) = args.connections {
        opts.connections = c;
    }
    if let Some(f) = args.in_flight {
        opts.max_in_flight_bytes = f;
    }
    if let Some(c) = args.checksum_chunk {
        opts.checksum_chunk_size = c;
    }
    opts.target_is_zero = args.destination_is_zero;
    opts.grid_cell = args.grid_cell;
    if let Some(dir) = &args.to_tls {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).with_context(|| format!("--to-tls: {}", p.display()))
        };
        opts.target_tls = Some(sendense_shared::api::NbdTls {
            ca_pem: read("ca-cert.pem")?,
            cert_pem: read("client-cert.pem")?,
            key_pem: read("client-key.pem")?,
        });
    }
    let extents = match args.dirty_bitmap {
        Some(b) => ExtentSource::DirtyBitmap(b),
        None => ExtentSource::Allocation,
    };
    let counters = DiskCounters::new();
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    let progress = args.progress.then(|| {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut prev = counters.snapshot();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = counters.snapshot();
                eprintln!(
                    "{:>6.1}% read {} MiB, {:.1} MiB/s",
                    100.0 * now.bytes_done() as f64 / now.bytes_total.max(1) as f64,
                    now.bytes_read >> 20,
                    now.read_rate_since(&prev) / (1 << 20) as f64
                );
                prev = now;
            }
        })
    });
    let result = copy_disk(&from, &to, extents, &opts, counters, cancel).await;
    if let Some(p) = progress {
        p.abort();
    }
    let out = result.with_context(|| format!("copy {from} -> {to}"))?;
    let secs = out.elapsed.as_secs_f64();
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "copied {from} -> {to}\nread {} bytes, written {} bytes, zeroed {} bytes, skipped {} bytes\n{:.3} s, {:.1} MiB/s (read), {} checksum ranges",
        out.bytes_read,
        out.bytes_written,
        out.bytes_zeroed,
        out.bytes_skipped,
        secs,
        out.bytes_read as f64 / (1 << 20) as f64 / secs.max(1e-9),
        out.checksums.ranges.len()
    )?;
    if let Some(g) = &out.grid {
        writeln!(
            stdout,
            "grid of {} byte cells: {} hashed, {} zero, {} bytes read for it only",
            g.cell_size,
            g.cells.len(),
            g.zero_cells.iter().map(|r| r.count).sum::<u64>(),
            out.bytes_read_for_grid
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256k"), Ok(256 << 10));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("2X").unwrap_err().contains("not a size"));
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }
}
