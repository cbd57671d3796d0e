//! `recover start|list|show|cancel`: instant recoveries. A point boots at once as a new VM on
//! a node while its disks stream home; `completed` means the VM runs from local disks alone.
//! Outputs as for restores: the id (or `--json`) on stdout, progress and outcome on stderr.

use super::{exit, fail, follow, print_json};
use crate::format::{self, recovery_home as home, stream_eta as disk_eta, time_to_vm};
use crate::strings;
use sendense_shared::api::{JobStatus, Recovery, RecoveryRequest};
use sendense_shared::client::HubClient;

/// `--speed 50M`: bytes per second, with an optional binary suffix (`K`, `M`, `G`, `T`;
/// `50M` = 50 MiB/s, as the console shows rates), a `B`, `iB` or `/s` after it allowed.
pub fn parse_speed(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, mult) = match t.chars().last() {
        Some(c @ ('K' | 'k' | 'M' | 'm' | 'G' | 'g' | 'T' | 't')) => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => 40,
            };
            (&t[..t.len() - 1], 1u64 << shift)
        }
        _ => (t, 1),
    };
    let n: u64 = digits.trim().parse().map_err(|_| {
        format!("{s:?} is not a rate: give bytes per second, e.g. 50M (50 MiB/s) or 800K")
    })?;
    match n.checked_mul(mult) {
        Some(0) => Err(format!(
            "{s:?}: a speed of 0 would stop the streams; leave --speed out for no limit"
        )),
        Some(v) => Ok(v),
        None => Err(format!("{s:?} is too large")),
    }
}

/// `--overlay-dir`: the node reads it, so only an absolute path means the same there.
pub fn parse_overlay_dir(s: &str) -> Result<String, String> {
    if s.starts_with('/') {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not absolute: the overlays are written on the node, give its absolute path"
        ))
    }
}

/// `recover list [--json]`.
pub(super) async fn list(client: &HubClient, json: bool) -> u8 {
    match client.recoveries().await {
        Ok(mut list) => {
            list.sort_by_key(|r| std::cmp::Reverse(r.created_at));
            if json {
                print_json(&list);
            } else {
                print!("{}", recoveries_table(&list));
            }
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// `recover show ID [--json]`.
pub(super) async fn show(client: &HubClient, id: &str, json: bool) -> u8 {
    match client.recovery(id).await {
        Ok(r) => {
            if json {
                print_json(&r);
            } else {
                print!("{}", show_text(&r));
            }
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// `recover start BACKUP --node N --name VM [...] [--wait] [--json]`.
pub(super) async fn start(client: &HubClient, req: &RecoveryRequest, wait: bool, json: bool) -> u8 {
    let r = match client.start_recovery(req).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    eprintln!(
        "started recovery {} of backup {} ({}) as VM {} on {}: {} disk(s)",
        r.recovery_id,
        r.backup_id,
        r.source_vm,
        r.vm_name,
        r.node,
        r.disks.len()
    );
    if !wait {
        print_recovery(&r, json);
        return exit::OK;
    }
    if !json {
        println!("{}", r.recovery_id);
    }
    follow(
        &format!("recovery {}", r.recovery_id),
        || client.recovery(&r.recovery_id),
        |r: &Recovery| r.status,
        progress_line,
        outcome,
        json,
    )
    .await
}

/// `recover speed ID RATE [--json]`.
pub(super) async fn speed(client: &HubClient, id: &str, rate: u64, json: bool) -> u8 {
    match client.recovery_speed(id, rate).await {
        Ok(r) => {
            let words = match rate {
                0 => "no bound".to_string(),
                n => format!("at most {}/s per disk", crate::format::bytes(n)),
            };
            eprintln!(
                "recovery {} of VM {}: its streams run with {words} from now",
                r.recovery_id, r.vm_name
            );
            print_recovery(&r, json);
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// A speed for `recover speed`: as `--speed`, or `0` for no bound.
pub fn parse_speed_or_zero(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_speed(s)
}

/// `recover cancel ID [--json]`.
pub(super) async fn cancel(client: &HubClient, id: &str, json: bool) -> u8 {
    match client.cancel_recovery(id).await {
        Ok(r) => {
            eprintln!(
                "recovery {} of VM {} on {} is {}: the VM is stopped and its overlays removed; what the guest wrote is lost",
                r.recovery_id,
                r.vm_name,
                r.node,
                r.status.as_str()
            );
            print_recovery(&r, json);
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

fn print_recovery(r: &Recovery, json: bool) {
    if json {
        print_json(r);
    } else {
        println!("{}", r.recovery_id);
    }
}

/// One progress line: `6f1e… running vm running · disk 2000 1.2 GiB/16.0 GiB 45.0 MiB/s ETA
/// 5m37s · disk 2001 …`, and the stall when there is one.
pub fn progress_line(r: &Recovery) -> String {
    let mut parts = vec![format!(
        "{} {} vm {}",
        r.recovery_id,
        r.status.as_str(),
        r.vm_state.as_deref().unwrap_or(strings::NONE)
    )];
    for d in &r.disks {
        let mut p = format!(
            "disk {} {}/{}",
            d.disk_key,
            format::bytes(d.bytes_done),
            format::bytes(d.bytes_total)
        );
        if d.stream == strings::STREAM_FINISHED {
            p.push_str(" home");
        } else {
            p.push_str(&format!(" {}", format::rate(d.rate_bps)));
            if let Some(eta) = disk_eta(d) {
                p.push_str(&format!(" ETA {}", format::duration_secs(eta)));
            }
            if d.stream != strings::STREAM_RUNNING {
                p.push_str(&format!(" ({})", d.stream));
            }
        }
        parts.push(p);
    }
    let mut line = parts.join(" · ");
    if let Some(s) = &r.stalled {
        line.push_str(&format!(" · STALLED: {s}"));
    }
    line
}

/// Say how a finished recovery ended and pick the exit status.
fn outcome(r: &Recovery) -> u8 {
    match r.status {
        JobStatus::Completed => {
            let took = r
                .completed_at
                .map(|c| {
                    format!(
                        " in {}",
                        format::duration_secs((c - r.created_at).num_seconds())
                    )
                })
                .unwrap_or_default();
            let up = time_to_vm(r)
                .map(|t| format!(" (it ran {t} after the request)"))
                .unwrap_or_default();
            let (done, _) = home(r);
            eprintln!(
                "recovery {} completed{took}: {} streamed home; VM {} on {} now runs from local disks alone{up}",
                r.recovery_id,
                format::bytes(done),
                r.vm_name,
                r.node
            );
            exit::OK
        }
        JobStatus::Cancelled => {
            eprintln!(
                "recovery {} was cancelled: VM {} was stopped and its overlays removed; what the guest wrote is lost",
                r.recovery_id, r.vm_name
            );
            exit::CANCELLED
        }
        _ => {
            eprintln!(
                "recovery {} failed: {}",
                r.recovery_id,
                r.error_message
                    .as_deref()
                    .unwrap_or("no error message from the hub")
            );
            exit::FAILED
        }
    }
}

/// The human table of `recover list`, in 80 columns: short ids, the share of the disks home,
/// the VM's run state (`stalled` added while the export does not answer).
pub fn recoveries_table(list: &[Recovery]) -> String {
    use super::table::{Align::*, Cut, Table, short, short_len};
    let len = short_len(list.iter().map(|r| r.recovery_id.as_str()));
    let blen = short_len(list.iter().map(|r| r.backup_id.0.as_str()));
    let mut t = Table::new(&[
        ("ID", Left),
        ("POINT", Left),
        ("NODE", Left),
        ("VM", Left),
        ("STATUS", Left),
        ("HOME", Right),
        ("STATE", Left),
    ])
    .flex(3, Cut::End);
    for r in list {
        let (done, total) = home(r);
        let mut state = r.vm_state.clone().unwrap_or_else(|| strings::NONE.into());
        if r.stalled.is_some() {
            state.push_str(", STALLED");
        }
        t.row(vec![
            short(&r.recovery_id, len),
            short(&r.backup_id.0, blen),
            format::truncate(&r.node, 14),
            r.vm_name.clone(),
            r.status.as_str().into(),
            format!("{}%", format::percent(done, total)),
            state,
        ]);
    }
    t.render()
}

/// `recover show`: every field, the stall first.
pub fn show_text(r: &Recovery) -> String {
    let none = || strings::NONE.to_string();
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(none);
    let num = |v: Option<u32>| v.map(|p| p.to_string()).unwrap_or_else(none);
    let at = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(none)
    };
    let mut s = format!(
        "recovery {} {} of point {} ({})\n",
        r.recovery_id,
        r.status.as_str(),
        r.backup_id,
        r.source_vm
    );
    if let Some(st) = &r.stalled {
        s.push_str(&format!("STALLED: {st}\n"));
    }
    if let Some(e) = &r.error_message {
        s.push_str(&format!("error: {e}\n"));
    }
    let (done, total) = home(r);
    let rows: Vec<(&str, String)> = vec![
        ("node", r.node.clone()),
        ("vm", r.vm_name.clone()),
        ("vm state", opt(&r.vm_state)),
        ("qemu pid", num(r.qemu_pid)),
        ("qmp socket", opt(&r.qmp_socket)),
        ("serial log", opt(&r.serial_log)),
        ("created", at(Some(r.created_at))),
        ("vm started", at(r.vm_started_at)),
        ("time to vm", time_to_vm(r).unwrap_or_else(none)),
        ("completed", at(r.completed_at)),
        (
            "home",
            format!(
                "{}/{} ({}%)",
                format::bytes(done),
                format::bytes(total),
                format::percent(done, total)
            ),
        ),
    ];
    for (k, v) in rows {
        s.push_str(&format!("{k:<11} {v}\n"));
    }
    for d in &r.disks {
        s.push_str(&format!(
            "disk {}: stream {} · {}/{} ({}%) · rate {} · ETA {}\n",
            d.disk_key,
            d.stream,
            format::bytes(d.bytes_done),
            format::bytes(d.bytes_total),
            format::percent(d.bytes_done, d.bytes_total),
            format::rate(d.rate_bps),
            disk_eta(d).map(format::duration_secs).unwrap_or_else(none)
        ));
        s.push_str(&format!(
            "  port {} · export {} · qemu-nbd pid {}\n",
            d.nbd_port.map(|p| p.to_string()).unwrap_or_else(none),
            d.nbd_export_name,
            num(d.qemu_nbd_pid)
        ));
        s.push_str(&format!("  source {}\n", d.source_qcow2));
        s.push_str(&format!("  overlay {}\n", opt(&d.overlay)));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    #[test]
    fn speeds_take_binary_suffixes_and_refuse_what_is_no_rate() {
        assert_eq!(parse_speed("50M"), Ok(50 << 20));
        assert_eq!(parse_speed("50MiB/s"), Ok(50 << 20));
        assert_eq!(parse_speed("800k"), Ok(800 << 10));
        assert_eq!(parse_speed("1G"), Ok(1 << 30));
        assert_eq!(parse_speed("4096"), Ok(4096));
        assert!(parse_speed("fast").unwrap_err().contains("not a rate"));
        assert!(parse_speed("0").unwrap_err().contains("leave --speed out"));
        assert!(
            parse_speed("99999999999T")
                .unwrap_err()
                .contains("too large")
        );
        assert!(parse_overlay_dir("rec").unwrap_err().contains("absolute"));
    }

    #[test]
    fn list_fits_80_columns_and_says_home_and_stall() {
        let mut list = vec![
            fixtures::streaming_recovery(),
            fixtures::stalled_recovery(),
            fixtures::completed_recovery(),
        ];
        assert_eq!(
            recoveries_table(&list),
            "\
ID        POINT     NODE    VM            STATUS     HOME  STATE
6f1e0c2a  b-91d4f7  node-a  pgtest1-rec   running     46%  running
a3c9d2e1  b-3a7d5c  node-b  webfront-rec  running     30%  paused, STALLED
c0de5e77  b-c0ffee  node-a  mailsrv-rec   completed  100%  running
"
        );
        // The longest name a VM may have: its column gives way.
        list[0].vm_name = format!("pg{}", "x".repeat(61));
        let t = recoveries_table(&list);
        assert!(t.lines().all(|l| l.chars().count() <= 80), "{t}");
        assert!(t.contains("pgxxx") && t.contains("…  running"), "{t}");
    }

    #[test]
    fn progress_line_has_each_disks_bytes_rate_and_eta() {
        let line = progress_line(&fixtures::streaming_recovery());
        assert!(
            line.contains("disk 2000 5.3 GiB/16.0 GiB 80.0 MiB/s ETA 2m16s"),
            "{line}"
        );
        assert!(line.contains("disk 2001 4.0 GiB/4.0 GiB home"), "{line}");
        let stalled = progress_line(&fixtures::stalled_recovery());
        assert!(stalled.contains("STALLED: "), "{stalled}");
    }

    #[test]
    fn show_has_every_field_and_the_stall_first() {
        let s = show_text(&fixtures::stalled_recovery());
        let second = s.lines().nth(1).unwrap();
        assert!(second.starts_with("STALLED: "), "{s}");
        for want in [
            "vm state    paused",
            "qemu pid    9120",
            "qmp socket  /run/sendense-node/recovery/webfront-rec.qmp",
            "time to vm  6.1s",
            "completed   —",
            "disk 2000: stream paused · 3.0 GiB/10.0 GiB (30%) · rate 0 B/s · ETA —",
            "port 10142 · export recovery-a3c9d2e1-2000 · qemu-nbd pid 51344",
            "overlay /var/lib/sendense-node/recovery/webfront-rec/disk-2000.qcow2",
        ] {
            assert!(s.contains(want), "{want}:\n{s}");
        }
    }
}
