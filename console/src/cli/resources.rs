//! `vms`, `nodes`, `ports`, `processes`, `tunnel`, `repositories`, `health`: one table each (80
//! columns) or the hub's JSON; `events --follow`: the hub's event stream, one JSON object a line.

use super::{exit, fail, print_json};
use crate::format;
use crate::sse::{SseItem, SseParser};
use futures_util::StreamExt;
use sendense_shared::client::HubClient;
use std::fmt::Write as _;
use std::io::Write as _;

/// Prints `list` as JSON, or the table `table` makes of it.
fn show<T: serde::Serialize>(list: &T, json: bool, table: impl FnOnce(&T) -> String) -> u8 {
    if json {
        print_json(list);
    } else {
        print!("{}", table(list));
    }
    exit::OK
}

/// `vms [--json]`.
pub(super) async fn vms(client: &HubClient, json: bool) -> u8 {
    match client.vms().await {
        Ok(list) => show(&list, json, |l| {
            let mut out = format!(
                "{:<24} {:<14} {:>5} {:>10} {:<8} {}\n",
                "VM", "NODE", "DISKS", "SIZE", "DRIVER", "LAST BACKUP"
            );
            let now = chrono::Utc::now();
            for v in l {
                let size: u64 = v.disks.iter().map(|d| d.size_bytes).sum();
                let _ = writeln!(
                    out,
                    "{:<24} {:<14} {:>5} {:>10} {:<8} {}",
                    format::truncate(&v.vm_name, 24),
                    format::truncate(v.node.as_deref().unwrap_or("-"), 14),
                    v.disks.len(),
                    format::bytes(size),
                    v.driver.as_deref().unwrap_or("-"),
                    v.last_backup_at
                        .map(|t| format!("{} ago", format::age(t, now)))
                        .unwrap_or_else(|| "never".into()),
                );
            }
            out
        }),
        Err(e) => fail(&e),
    }
}

/// `nodes [--json]`.
pub(super) async fn nodes(client: &HubClient, json: bool) -> u8 {
    match client.nodes().await {
        Ok(list) => show(&list, json, |l| {
            let mut out = format!(
                "{:<16} {:<10} {:<10} {:<28} {}\n",
                "NODE", "VERSION", "TUNNEL", "API", "LAST SEEN"
            );
            let now = chrono::Utc::now();
            for n in l {
                let tunnel = n
                    .tunnel
                    .as_ref()
                    .map(|t| t.state.as_str().to_string())
                    .unwrap_or_else(|| "direct".into());
                let _ = writeln!(
                    out,
                    "{:<16} {:<10} {:<10} {:<28} {}",
                    format::truncate(&n.name, 16),
                    format::truncate(&n.version, 10),
                    tunnel,
                    format::truncate(&n.api_url, 28),
                    n.last_seen_at
                        .map(|t| format!("{} ago", format::age(t, now)))
                        .unwrap_or_else(|| "never".into()),
                );
            }
            out
        }),
        Err(e) => fail(&e),
    }
}

/// `ports [--json]`.
pub(super) async fn ports(client: &HubClient, json: bool) -> u8 {
    match client.ports().await {
        Ok(view) => show(&view, json, |v| {
            let size = u32::from(v.range[1]) - u32::from(v.range[0]) + 1;
            let mut out = format!(
                "range {}-{}: {} held, {} squatted, {} free\n",
                v.range[0],
                v.range[1],
                v.allocations.len(),
                v.squatted.len(),
                (size as usize).saturating_sub(v.allocations.len() + v.squatted.len())
            );
            if !v.allocations.is_empty() {
                out.push_str(&format!(
                    "{:<6} {:<38} {:>6} SINCE\n",
                    "PORT", "BACKUP", "DISK"
                ));
            }
            for a in &v.allocations {
                let _ = writeln!(
                    out,
                    "{:<6} {:<38} {:>6} {}",
                    a.port,
                    a.backup_id,
                    a.disk_key,
                    format::stamp(a.allocated_at)
                );
            }
            for s in &v.squatted {
                let _ = writeln!(
                    out,
                    "{:<6} squatted by another process (seen {})",
                    s.port,
                    format::stamp(s.seen_at)
                );
            }
            out
        }),
        Err(e) => fail(&e),
    }
}

/// `processes [--json]`.
pub(super) async fn processes(client: &HubClient, json: bool) -> u8 {
    match client.processes().await {
        Ok(list) => show(&list, json, |l| {
            let mut out = format!(
                "{:>8} {:<6} {:<5} {:<28} {}\n",
                "PID", "PORT", "ALIVE", "EXPORT", "BACKUP/DISK"
            );
            for p in l {
                let _ = writeln!(
                    out,
                    "{:>8} {:<6} {:<5} {:<28} {}/{}",
                    p.pid,
                    p.port,
                    if p.alive { "yes" } else { "no" },
                    format::truncate(&p.export_name, 28),
                    format::short_id(&p.backup_id.0),
                    p.disk_key
                );
            }
            out
        }),
        Err(e) => fail(&e),
    }
}

/// `tunnel [--json]`.
pub(super) async fn tunnel(client: &HubClient, json: bool) -> u8 {
    match client.tunnel().await {
        Ok(list) => show(&list, json, |l| {
            let mut out = format!(
                "{:<16} {:<5} {:<10} {:>8} {}\n",
                "NODE", "LIVE", "STATE", "RESTARTS", "SINCE / ERROR"
            );
            for t in l {
                let (state, restarts, rest) = match &t.tunnel {
                    Some(s) => (
                        s.state.as_str().to_string(),
                        s.restarts.to_string(),
                        match &s.last_error {
                            Some(e) => format!("{} {e}", format::stamp(s.since)),
                            None => format::stamp(s.since),
                        },
                    ),
                    None => (
                        "direct".into(),
                        "-".into(),
                        t.error.clone().unwrap_or_default(),
                    ),
                };
                let _ = writeln!(
                    out,
                    "{:<16} {:<5} {:<10} {:>8} {}",
                    format::truncate(&t.node, 16),
                    if t.live { "yes" } else { "no" },
                    state,
                    restarts,
                    format::truncate(&rest, 36)
                );
            }
            out
        }),
        Err(e) => fail(&e),
    }
}

/// `repositories [--json]`.
pub(super) async fn repositories(client: &HubClient, json: bool) -> u8 {
    match client.repositories().await {
        Ok(list) => show(&list, json, |l| {
            let mut out = format!(
                "{:<12} {:>10} {:>10} {:>5}  {}\n",
                "REPOSITORY", "FREE", "SIZE", "FREE%", "PATH"
            );
            for r in l {
                let _ = writeln!(
                    out,
                    "{:<12} {:>10} {:>10} {:>4}%  {}",
                    format::truncate(&r.id, 12),
                    format::bytes(r.free_bytes),
                    format::bytes(r.total_bytes),
                    format::percent(r.free_bytes, r.total_bytes),
                    format::truncate_left(&r.path, 36)
                );
            }
            out
        }),
        Err(e) => fail(&e),
    }
}

/// `health [--json]`: exit status 0 when the hub says `healthy`, 1 otherwise.
pub(super) async fn health(client: &HubClient, json: bool) -> u8 {
    match client.health().await {
        Ok(h) => {
            if json {
                print_json(&h);
            } else {
                println!(
                    "{} (sendense-hub {} {}, pid {}, up since {})",
                    h.status,
                    h.version,
                    h.git_commit,
                    h.pid,
                    format::stamp(h.started_at)
                );
            }
            if h.status == "healthy" {
                exit::OK
            } else {
                exit::ERROR
            }
        }
        Err(e) => fail(&e),
    }
}

/// `events [--follow]`: the hub's event stream, one JSON object a line (`kind` says what it
/// is), flushed as each arrives. Without `--follow` it ends after the next event; with it, it
/// runs until the stream ends or the hub goes away (exit status 1, saying why). Once the hub
/// accepted the stream, stderr says so (from then on no event is missed).
pub(super) async fn events(client: &HubClient, follow: bool) -> u8 {
    let resp = match client.events().await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    eprintln!(
        "following the events of {} ({})",
        resp.url().origin().ascii_serialization(),
        if follow {
            "until interrupted"
        } else {
            "the next one"
        }
    );
    let mut body = resp.bytes_stream();
    let mut parser = SseParser::default();
    let stdout = std::io::stdout();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "error: the event stream broke: {}",
                    sendense_shared::errors::chain(&e.without_url())
                );
                return exit::ERROR;
            }
        };
        for item in parser.push(&chunk) {
            let SseItem::Data(data) = item else { continue };
            // One line per event, whatever the hub's own formatting.
            let line = serde_json::from_str::<serde_json::Value>(&data)
                .map(|v| v.to_string())
                .unwrap_or(data);
            let mut out = stdout.lock();
            if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                // The reader went away (a closed pipe): done.
                return exit::OK;
            }
            if !follow {
                return exit::OK;
            }
        }
    }
    eprintln!("error: the hub ended the event stream");
    exit::ERROR
}
