//! `files ls BACKUP [--disk D] [--fs DEV] [PATH] [--json]` and
//! `files get BACKUP [--disk D] [--fs DEV] PATH > out.tar`: browse a backup point on the hub
//! without restoring it. Paths are bytes (a guest name need not be UTF-8).

use super::{exit, fail, print_json};
use futures_util::StreamExt;
use sendense_shared::api::{FileEntry, FileListing};
use sendense_shared::client::{FileQuery, HubClient};
use sendense_shared::ids::BackupId;
use std::io::{IsTerminal, Write};

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

/// `files get`: the tar stream to stdout, never to a terminal.
pub(super) async fn get(client: &HubClient, backup: &str, q: FileQuery) -> u8 {
    let mut out = std::io::stdout().lock();
    if out.is_terminal() {
        eprintln!(
            "error: refusing to write a tar archive to a terminal; redirect stdout: files get ... > out.tar"
        );
        return exit::USAGE;
    }
    let resp = match client
        .files_archive(&BackupId(backup.to_string()), &q)
        .await
    {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let mut body = resp.bytes_stream();
    let mut n: u64 = 0;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => {
                if let Err(e) = out.write_all(&c) {
                    eprintln!("error: writing the archive to stdout: {e}");
                    return exit::ERROR;
                }
                n += c.len() as u64;
            }
            Err(e) => {
                eprintln!(
                    "error: the archive broke off after {n} bytes (the hub's log says why): {e}"
                );
                return exit::FAILED;
            }
        }
    }
    if let Err(e) = out.flush() {
        eprintln!("error: writing the archive to stdout: {e}");
        return exit::ERROR;
    }
    eprintln!("{n} bytes of tar written");
    exit::OK
}

/// `drwxr-x--- 1234:5678  4096 2026-12-01 10:00 name -> target`.
pub fn entry_line(e: &FileEntry) -> String {
    let mut perms = String::new();
    perms.push(e.kind.letter());
    for shift in [6, 3, 0] {
        let bits = (e.mode >> shift) & 7;
        perms.push(if bits & 4 != 0 { 'r' } else { '-' });
        perms.push(if bits & 2 != 0 { 'w' } else { '-' });
        perms.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    let when = chrono::DateTime::from_timestamp(e.mtime, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| e.mtime.to_string());
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
