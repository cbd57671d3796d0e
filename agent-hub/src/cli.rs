//! `sendense-hub node enroll|rotate|revoke NAME`: the node credential commands. They open the
//! hub's database (and its credential key) directly, so they work before the first start and
//! beside a running hub, which asks the database on every request: a revocation holds from the
//! node's next request on.

use crate::auth::Credentials;
use crate::config::{HubConfig, NodeCommand};
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
