//! `files ls BACKUP [--disk D] [--fs DEV] [PATH] [--json]` and
//! `files get BACKUP [--disk D] [--fs DEV] PATH > out.tar`: browse a backup point on the hub
//! without restoring it. Paths are bytes (a guest name need not be UTF-8).

use super::{exit, fail, print_json};
use futures_util::StreamExt;
use sendense_shared::api::{FileEntry, FileListing};
use sendense_shared::client::{ClientError, FileQuery, HubClient};
use sendense_shared::ids::BackupId;
use std::io::IsTerminal;

/// `files ls`.
pub(super) async fn ls(client: &HubClient, backup: &str, q: FileQuery, json: bool) -> u8 {
    if q.path.is_none() {
        eprintln!("(the first request of a session boots the hub's appliance: 15-30 s)");
    }
    match client.files(&BackupId(backup.to_string()), &q).await {
        Ok(l) => {
            if json {
                print_json(&l);
            } else {
                print!("{}", listing_text(&l));
            }
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// Why a tar archive could not be had whole.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The hub did not answer or refused (no such path, the point is busy, ...).
    #[error(transparent)]
    Refused(#[from] ClientError),
    #[error("writing the archive failed")]
    Write(#[source] std::io::Error),
    #[error("the archive broke off after {after} bytes (the hub's log says why)")]
    BrokeOff {
        after: u64,
        #[source]
        source: reqwest::Error,
    },
}

/// Stream the tar of `q` from the hub into `out`, telling `progress` the bytes written after
/// every chunk; the bytes written in all. Shared by `files get` (stdout) and the TUI's file
/// browser (a file).
pub async fn copy_archive<W: tokio::io::AsyncWrite + Unpin>(
    client: &HubClient,
    backup: &BackupId,
    q: &FileQuery,
    out: &mut W,
    mut progress: impl FnMut(u64),
) -> Result<u64, ArchiveError> {
    use tokio::io::AsyncWriteExt;
    let resp = client.files_archive(backup, q).await?;
    let mut body = resp.bytes_stream();
    let mut n: u64 = 0;
    while let Some(chunk) = body.next().await {
        let c = chunk.map_err(|source| ArchiveError::BrokeOff { after: n, source })?;
        out.write_all(&c).await.map_err(ArchiveError::Write)?;
        n += c.len() as u64;
        progress(n);
    }
    out.flush().await.map_err(ArchiveError::Write)?;
    Ok(n)
}

/// `files get`: the tar stream to stdout, never to a terminal.
pub(super) async fn get(client: &HubClient, backup: &str, q: FileQuery) -> u8 {
    if std::io::stdout().is_terminal() {
        eprintln!(
            "error: refusing to write a tar archive to a terminal; redirect stdout: files get ... > out.tar"
        );
        return exit::USAGE;
    }
    let mut out = tokio::io::stdout();
    match copy_archive(client, &BackupId(backup.to_string()), &q, &mut out, |_| {}).await {
        Ok(n) => {
            eprintln!("{n} bytes of tar written");
            exit::OK
        }
        Err(ArchiveError::Refused(e)) => fail(&e),
        Err(ArchiveError::Write(e)) => {
            eprintln!("error: writing the archive to stdout: {e}");
            exit::ERROR
        }
        Err(e @ ArchiveError::BrokeOff { .. }) => {
            eprintln!("error: {}", sendense_shared::errors::chain(&e));
            exit::FAILED
        }
    }
}

/// `drwxr-x--- 1234:5678  4096 2026-12-01 10:00 name -> target`.
pub fn entry_line(e: &FileEntry) -> String {
    let perms = crate::format::file_mode(e.kind, e.mode);
    let when = crate::format::mtime(e.mtime);
    let mut name = e.name.clone();
    if e.name_b64.is_some() {
        name.push_str(" (not UTF-8)");
    }
    if let Some(t) = &e.link_target {
        name.push_str(" -> ");
        name.push_str(t);
    }
    format!(
        "{perms} {:>11} {:>12} {when} {name}",
        format!("{}:{}", e.uid, e.gid),
        e.size
    )
}

fn listing_text(l: &FileListing) -> String {
    let mut s = String::new();
    match &l.entries {
        None => {
            s.push_str(&format!("backup {} disk {}\n", l.backup_id, l.disk_key));
            s.push_str(&format!("partitions: {}\n", list_or_none(&l.partitions)));
            s.push_str(&format!(
                "logical volumes: {}\n",
                list_or_none(&l.logical_volumes)
            ));
            s.push_str("filesystems:\n");
            for f in &l.filesystems {
                s.push_str(&format!("  {} {}\n", f.device, f.fs_type));
            }
        }
        Some(entries) => {
            s.push_str(&format!(
                "{}:{}\n",
                l.filesystem.as_deref().unwrap_or("?"),
                l.path.as_deref().unwrap_or("/")
            ));
            for e in entries {
                s.push_str(&entry_line(e));
                s.push('\n');
            }
            if l.truncated {
                s.push_str("(more entries than one listing answers)\n");
            }
        }
    }
    s
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}
