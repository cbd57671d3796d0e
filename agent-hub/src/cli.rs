//! `sendense-hub node enroll|rotate|revoke NAME`: the node credential commands. They open the
//! hub's database (and its credential key) directly, so they work before the first start and
//! beside a running hub, which asks the database on every request: a revocation holds from the
//! node's next request on.
//!
//! `sendense-hub check-image IMAGE`: an image chain read back against its checksum sidecar
//! with no database and no hub (on the hub's host, or any host the repository is copied to).

use crate::auth::Credentials;
use crate::config::{CheckImageArgs, HubConfig, NodeCommand};
use crate::db::Db;
use anyhow::Context;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Runs one node command; what the operator must do next goes to stderr, the credential alone
/// to stdout (or `--output`).
pub async fn node_command(config: &HubConfig, cmd: &NodeCommand) -> anyhow::Result<()> {
    sendense_shared::fsmode::private_dir(&config.data_dir)
        .with_context(|| format!("data directory {}", config.data_dir.display()))?;
    let url = crate::db::redact(&config.database_url);
    let db = Db::connect(&config.database_url)
        .await
        .with_context(|| format!("database {url}"))?;
    db.migrate()
        .await
        .with_context(|| format!("database {url}"))?;
    let key = crate::auth::load_or_create(&config.credential_key_file)?;
    let creds = Credentials::new(db.clone(), &key, config.credential_grace);
    let result = match cmd {
        NodeCommand::Enroll { name, output } => {
            let secret = creds.enroll(name).await?;
            emit(secret.as_str(), output.as_deref())?;
            eprintln!(
                "enrolled node {name:?}: put the credential in the node's token_file (mode \
                 0600); it acts only on {name:?}'s registration, inventory, VMs, jobs and restores"
            );
            Ok(())
        }
        NodeCommand::Rotate { name, output } => {
            let secret = creds.rotate(name).await?;
            emit(secret.as_str(), output.as_deref())?;
            eprintln!(
                "new credential for node {name:?}: replace the node's token_file with it and \
                 restart the node between jobs; the old one works until the node first uses the \
                 new one, or for {} s",
                config.credential_grace.as_secs()
            );
            Ok(())
        }
        NodeCommand::Revoke { name } => {
            let n = creds.revoke(name).await?;
            eprintln!("revoked {n} credential(s) of node {name:?}; its next request is refused");
            Ok(())
        }
    };
    db.close().await;
    result
}

/// The credential on stdout, or in `path` (0600, written to a temporary file beside it and
/// renamed over it, so a reader never sees half a credential or a wider mode).
fn emit(secret: &str, path: Option<&Path>) -> anyhow::Result<()> {
    let Some(path) = path else {
        println!("{secret}");
        return Ok(());
    };
    let name = path
        .file_name()
        .with_context(|| format!("--output {}: not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        writeln!(f, "{secret}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("writing the credential to {}", path.display()))
    })
}

/// Exit status of `check-image` when cells differ (0: all equal; 1: could not check).
pub const CHECK_IMAGE_MISMATCH: i32 = 3;

/// `check-image`: reads `args.image` back through a read-only qemu-nbd on a private socket
/// (under the data directory's `readback/`) and compares every cell with the sidecar, or with
/// `--compute` writes the sidecar. Prints what it read and how fast; answers the exit status.
pub async fn check_image(config: &HubConfig, args: &CheckImageArgs) -> anyhow::Result<i32> {
    use crate::manifest::{Manifest, sidecar_path};
    use std::sync::atomic::{AtomicU64, Ordering};
    let image = &args.image;
    anyhow::ensure!(image.is_file(), "{} is not a file", image.display());
    let sums = args.sums.clone().unwrap_or_else(|| sidecar_path(image));
    let readback =
        crate::readback::ReadBack::new(config.qemu_nbd.clone(), config.data_dir.join("readback"));
    let cancel = tokio_util::sync::CancellationToken::new();
    let read = AtomicU64::new(0);
    let t = std::time::Instant::now();
    if args.compute {
        let m = readback
            .compute(
                image,
                sendense_shared::api::DEFAULT_GRID_CELL,
                &cancel,
                &read,
            )
            .await?;
        let digest = m.write(&sums).await?;
        let secs = t.elapsed().as_secs_f64();
        let bytes = read.load(Ordering::Relaxed);
        if args.json {
            println!(
                "{}",
                serde_json::json!({"image": image, "sums": sums, "digest": digest,
                    "cells": m.cells(), "bytes_read": bytes, "seconds": secs})
            );
        } else {
            println!(
                "{}: {} cells hashed, {bytes} bytes read in {secs:.2} s; wrote {} (BLAKE3 {digest})",
                image.display(),
                m.cells(),
                sums.display()
            );
        }
        return Ok(0);
    }
    let m = Manifest::read(&sums, args.digest.as_deref()).await?;
    let r = readback.check(image, &m, &cancel, &read).await?;
    let secs = t.elapsed().as_secs_f64();
    let mib_s = r.bytes_read as f64 / secs.max(1e-3) / 1048576.0;
    if args.json {
        let mismatches: Vec<_> = r
            .mismatches
            .iter()
            .map(|m| {
                serde_json::json!({"cell": m.index, "offset": m.offset, "length": m.length,
                "expected": m.expected, "actual": m.actual})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"image": image, "sums": sums, "cells": r.cells,
                "cells_read": r.cells_read, "bytes_read": r.bytes_read, "seconds": secs,
                "mismatch_count": r.mismatch_count, "mismatches": mismatches})
        );
    } else if r.is_clean() {
        println!(
            "{}: all {} cells equal their checksums ({} read, {} bytes; the rest zero by block \
             status) in {secs:.2} s, {mib_s:.0} MiB/s",
            image.display(),
            r.cells,
            r.cells_read,
            r.bytes_read
        );
    } else {
        println!(
            "{}: {} of {} cells differ from their checksums: {}",
            image.display(),
            r.mismatch_count,
            r.cells,
            r.describe_mismatches()
        );
    }
    Ok(if r.is_clean() {
        0
    } else {
        CHECK_IMAGE_MISMATCH
    })
}
