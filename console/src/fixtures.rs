//! Realistic hub data for the render and state tests, one part per view: `jobs` (a 2-disk job
//! mid-copy, a job with a failed disk whose qemu-nbd died, an application-consistent point, a
//! corrupt one), `vms` (and repositories), `ports` (one squatted), `processes`, `tunnel` (a node
//! whose tunnel is down), `events`, `files` (what the file browser lists of a point), `restores`, `recoveries` (one streaming, one stalled, one home), `verify` (a verify job that found corruption),
//! `policies` (policies with their runs, points, repository space, a prune plan). Here: the
//! instant they are seen from, the hub's health, and the [`snapshot`] and [`app`] built from them.

mod events;
pub mod files;
mod jobs;
mod policies;
mod ports;
mod processes;
mod recoveries;
mod restores;
mod tunnel;
mod verify;
mod vms;

pub use events::*;
pub use jobs::*;
pub use policies::*;
pub use ports::*;
pub use processes::*;
pub use recoveries::*;
pub use restores::*;
pub use tunnel::*;
pub use verify::*;
pub use vms::*;

use crate::app::{App, Snapshot, Update};
use chrono::{DateTime, Duration, TimeZone, Utc};
use sendense_shared::api::{DatabaseHealth, DatabaseKind, Health};

pub const HUB_URL: &str = "http://127.0.0.1:8082";
pub const GIB: u64 = 1024 * 1024 * 1024;
pub const RUNNING_JOB: &str = "b-7f3a9c21";
pub const FAILED_JOB: &str = "b-2c81e0d4";

/// The instant every fixture is seen from.
pub fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, 0, 12, 3).unwrap()
}

fn ago(secs: i64) -> DateTime<Utc> {
    now() - Duration::seconds(secs)
}

pub fn health() -> Health {
    Health {
        status: "healthy".into(),
        version: "0.1.0".into(),
        git_commit: "3f9c2ab".into(),
        build_time: "2026-11-26T22:40:00+00:00".into(),
        executable: "/usr/local/bin/sendense-hub".into(),
        pid: 48213,
        started_at: ago(3 * 3600 + 125),
        database: Some(DatabaseHealth {
            kind: DatabaseKind::Sqlite,
            ok: true,
        }),
    }
}

pub fn snapshot() -> Snapshot {
    Snapshot {
        health: Some(health()),
        backups: Some(backups()),
        restores: Some(vec![]),
        verifies: Some(vec![]),
        vms: Some(vms()),
        repositories: Some(repositories()),
        ports: Some(ports()),
        processes: Some(processes()),
        nodes: Some(nodes()),
        tunnels: Some(tunnels()),
        events: Some(events()),
        policies: Some(policies()),
        prunes: Some(prunes()),
        recoveries: Some(vec![]),
        spaces: Some(spaces()),
        errors: vec![],
    }
}

/// A console that has seen the fixture hub for a while: the running job's disks have ten
/// seconds of progress history (about 80 and 45 MiB/s with a dip), so rates, ETAs and
/// sparklines have something to show.
pub fn app() -> App {
    let mut app = App::new(HUB_URL, now());
    let mib = 1024 * 1024;
    let steps: [(u64, u64); 10] = [
        (80, 40),
        (85, 44),
        (82, 47),
        (60, 50),
        (40, 30),
        (78, 45),
        (84, 46),
        (86, 44),
        (81, 45),
        (80, 45),
    ];
    let end = running_job([6 * GIB + GIB / 4, GIB + GIB / 10]);
    let total: (u64, u64) = steps.iter().fold((0, 0), |a, s| (a.0 + s.0, a.1 + s.1));
    let mut done = (
        end.disk_results[0].bytes_done - total.0 * mib,
        end.disk_results[1].bytes_done - total.1 * mib,
    );
    let t0 = now() - Duration::seconds(steps.len() as i64);
    app.apply(
        Update::Snapshot(Box::new(Snapshot {
            backups: Some(vec![running_job([done.0, done.1])]),
            ..Default::default()
        })),
        t0,
    );
    for (i, (a, b)) in steps.iter().enumerate() {
        done.0 += a * mib;
        done.1 += b * mib;
        let at = t0 + Duration::seconds(i as i64 + 1);
        app.apply(
            Update::Event(sendense_shared::api::HubEvent::Backup {
                backup: running_job([done.0, done.1]),
            }),
            at,
        );
    }
    app.apply(Update::Snapshot(Box::new(snapshot())), now());
    app.apply(Update::StreamUp, now());
    app.now = now();
    app
}
