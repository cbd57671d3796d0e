//! Realistic hub data for the render and state tests: a 2-disk job mid-copy, a job with a failed
//! disk (its qemu-nbd died), a squatted port, a node whose tunnel is down, job events; restores
//! in `restores`.

mod restores;
pub use restores::*;

use crate::app::{App, Snapshot, Update};
use chrono::{DateTime, Duration, TimeZone, Utc};
use sendense_shared::api::{
    Backup, BackupType, DatabaseHealth, DatabaseKind, DiskResult, DiskStatus, Health, JobEvent,
    JobStatus, Node, NodeTunnel, PortAllocation, PortsView, ProcessInfo, Repository, SquattedPort,
    TunnelState, TunnelStateKind, Vm, VmDisk,
};
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};

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

/// One disk result: `(key, unit)`, `(vm, job)`, `(port, qemu-nbd pid)`, status,
/// `(bytes done, bytes total)`, error.
fn disk(
    (key, unit): (i64, i32),
    (vm, job): (&str, &str),
    (port, pid): (Option<u16>, Option<u32>),
    status: DiskStatus,
    (done, total): (u64, u64),
    error: Option<&str>,
) -> DiskResult {
    DiskResult {
        disk_key: DiskKey(key),
        unit_number: unit,
        nbd_port: port.map(NbdPort),
        nbd_export_name: format!("{vm}-disk-{key}"),
        qcow2_path: format!("/var/lib/sendense/repo-a/{vm}/disk-{key}/{job}.qcow2"),
        qemu_nbd_pid: pid,
        status,
        bytes_done: done,
        bytes_total: total,
        error_message: error.map(str::to_string),
        change_id: None,
    }
}

/// A full backup of pgtest1's two disks, mid-copy. `done` is bytes done per disk.
pub fn running_job(done: [u64; 2]) -> Backup {
    let disks = vec![
        disk(
            (2000, 0),
            ("pgtest1", RUNNING_JOB),
            (Some(10100), Some(51234)),
            DiskStatus::Running,
            (done[0], 16 * GIB),
            None,
        ),
        disk(
            (2001, 1),
            ("pgtest1", RUNNING_JOB),
            (Some(10101), Some(51236)),
            DiskStatus::Running,
            (done[1], 4 * GIB),
            None,
        ),
    ];
    Backup {
        backup_id: BackupId(RUNNING_JOB.into()),
        vm_context_id: "ctx-pgtest1".into(),
        vm_name: "pgtest1".into(),
        backup_type: BackupType::Full,
        repository_id: "repo-a".into(),
        status: JobStatus::Running,
        bytes_transferred: done[0] + done[1],
        total_bytes: 20 * GIB,
        disk_results: disks,
        nbd_targets_string: "2000:nbd://127.0.0.1:10100/pgtest1-disk-2000,2001:nbd://127.0.0.1:10101/pgtest1-disk-2001".into(),
        created_at: ago(95),
        started_at: Some(ago(92)),
        completed_at: None,
        error_message: None,
    }
}

pub const QEMU_NBD_ERROR: &str = "qemu-nbd (pid 50102) exited with status 1: Failed to blk_new_open '/var/lib/sendense/repo-a/webfront/disk-2001/b-2c81e0d4.qcow2': Permission denied";

/// An incremental of webfront whose second disk failed when its qemu-nbd died.
pub fn failed_job() -> Backup {
    let disks = vec![
        disk(
            (2000, 0),
            ("webfront", FAILED_JOB),
            (None, Some(50100)),
            DiskStatus::Completed,
            (3 * GIB / 2, 3 * GIB / 2),
            None,
        ),
        disk(
            (2001, 1),
            ("webfront", FAILED_JOB),
            (Some(10102), Some(50102)),
            DiskStatus::Failed,
            (310 * 1024 * 1024, 8 * GIB),
            Some(QEMU_NBD_ERROR),
        ),
    ];
    Backup {
        backup_id: BackupId(FAILED_JOB.into()),
        vm_context_id: "ctx-webfront".into(),
        vm_name: "webfront".into(),
        backup_type: BackupType::Incremental,
        repository_id: "repo-a".into(),
        status: JobStatus::Failed,
        bytes_transferred: 3 * GIB / 2 + 310 * 1024 * 1024,
        total_bytes: 3 * GIB / 2 + 8 * GIB,
        disk_results: disks,
        nbd_targets_string: String::new(),
        created_at: ago(1900),
        started_at: Some(ago(1898)),
        completed_at: Some(ago(1620)),
        error_message: Some("disk 2001 failed: qemu-nbd exited with status 1".into()),
    }
}

fn finished_job(id: &str, vm: &str, status: JobStatus, created: i64, total: u64) -> Backup {
    let disk_status = if status == JobStatus::Completed {
        DiskStatus::Completed
    } else {
        DiskStatus::Cancelled
    };
    let done = if status == JobStatus::Completed {
        total
    } else {
        total / 3
    };
    Backup {
        backup_id: BackupId(id.into()),
        vm_context_id: format!("ctx-{vm}"),
        vm_name: vm.into(),
        backup_type: BackupType::Full,
        repository_id: "repo-a".into(),
        status,
        disk_results: vec![disk(
            (2000, 0),
            (vm, id),
            (None, None),
            disk_status,
            (done, total),
            None,
        )],
        nbd_targets_string: String::new(),
        bytes_transferred: done,
        total_bytes: total,
        created_at: ago(created),
        started_at: Some(ago(created - 2)),
        completed_at: Some(ago(created - 300)),
        error_message: None,
    }
}

/// The change id a vSphere disk was copied at (CBT).
pub const CHANGE_ID: &str = "52 3f 9a 11 00 7e 4c 02-a1 9b 2c 77 0e 5d 6f 10/4";

/// A completed CBT incremental of mailsrv (vSphere): 212 MiB changed of 40 GiB.
pub fn vsphere_job() -> Backup {
    let mut b = finished_job("b-4e11c0a7", "mailsrv", JobStatus::Completed, 600, 40 * GIB);
    b.backup_type = BackupType::Incremental;
    b.bytes_transferred = 212 * 1024 * 1024;
    b.disk_results[0].change_id = Some(CHANGE_ID.into());
    b
}

pub fn backups() -> Vec<Backup> {
    vec![
        running_job([6 * GIB + GIB / 4, GIB + GIB / 10]),
        failed_job(),
        finished_job(
            "b-c0ffee01",
            "mailsrv",
            JobStatus::Cancelled,
            5400,
            40 * GIB,
        ),
        finished_job(
            "b-91d4f7aa",
            "pgtest1",
            JobStatus::Completed,
            86_400,
            20 * GIB,
        ),
    ]
}

fn vm_disk(key: i64, unit: i32, size: u64, label: &str) -> VmDisk {
    VmDisk {
        disk_key: DiskKey(key),
        unit_number: unit,
        size_bytes: size,
        label: label.into(),
        controller: None,
        backing_file: None,
        thin_provisioned: None,
    }
}

pub fn vms() -> Vec<Vm> {
    vec![
        Vm {
            vm_context_id: "ctx-pgtest1".into(),
            vm_name: "pgtest1".into(),
            node: Some("node-a".into()),
            disks: vec![
                vm_disk(2000, 0, 16 * GIB, "virtio-disk0"),
                vm_disk(2001, 1, 4 * GIB, "virtio-disk1"),
            ],
            last_backup_id: Some(BackupId("b-91d4f7aa".into())),
            last_backup_at: Some(ago(86_100)),
            driver: Some("qemu".into()),
            change_tracking: None,
        },
        Vm {
            vm_context_id: "ctx-webfront".into(),
            vm_name: "webfront".into(),
            node: Some("node-a".into()),
            disks: vec![
                vm_disk(2000, 0, 3 * GIB / 2, "virtio-disk0"),
                vm_disk(2001, 1, 8 * GIB, "virtio-disk1"),
            ],
            last_backup_id: Some(BackupId("b-5e5e0a01".into())),
            last_backup_at: Some(ago(7 * 86_400)),
            driver: Some("qemu".into()),
            change_tracking: None,
        },
        Vm {
            vm_context_id: "ctx-mailsrv".into(),
            vm_name: "mailsrv".into(),
            node: Some("node-b".into()),
            disks: vec![VmDisk {
                controller: Some("SCSI controller 0".into()),
                backing_file: Some("[datastore1] mailsrv/mailsrv.vmdk".into()),
                thin_provisioned: Some(true),
                ..vm_disk(2000, 0, 40 * GIB, "Hard disk 1")
            }],
            last_backup_id: None,
            last_backup_at: None,
            driver: Some("vsphere".into()),
            change_tracking: Some(true),
        },
        Vm {
            vm_context_id: "ctx-legacy-db".into(),
            vm_name: "legacy-db".into(),
            node: None,
            disks: vec![
                vm_disk(2000, 0, 100 * GIB, "Hard disk 1"),
                vm_disk(2001, 1, 250 * GIB, "Hard disk 2"),
                vm_disk(2002, 2, 2 * GIB, "Hard disk 3"),
            ],
            last_backup_id: None,
            last_backup_at: None,
            driver: None,
            change_tracking: None,
        },
    ]
}

pub fn repositories() -> Vec<Repository> {
    vec![
        Repository {
            id: "repo-a".into(),
            path: "/var/lib/sendense/repo-a".into(),
            free_bytes: 812 * GIB,
            total_bytes: 2048 * GIB,
        },
        Repository {
            id: "offsite".into(),
            path: "/mnt/offsite/sendense".into(),
            free_bytes: 95 * GIB,
            total_bytes: 4096 * GIB,
        },
    ]
}

pub fn ports() -> PortsView {
    let alloc = |port: u16, job: &str, key: i64, secs: i64| PortAllocation {
        port: NbdPort(port),
        backup_id: BackupId(job.into()),
        disk_key: DiskKey(key),
        allocated_at: ago(secs),
    };
    PortsView {
        range: [10100, 10200],
        allocations: vec![
            alloc(10100, RUNNING_JOB, 2000, 93),
            alloc(10101, RUNNING_JOB, 2001, 93),
            alloc(10102, FAILED_JOB, 2001, 1899),
        ],
        squatted: vec![SquattedPort {
            port: NbdPort(10105),
            seen_at: ago(40),
            detail: "bind 127.0.0.1:10105: Address already in use (not a Sendense qemu-nbd)".into(),
        }],
    }
}

pub fn processes() -> Vec<ProcessInfo> {
    let p =
        |pid: u32, port: u16, vm: &str, job: &str, key: i64, alive: bool, secs: i64| ProcessInfo {
            pid,
            port: NbdPort(port),
            export_name: format!("{vm}-disk-{key}"),
            qcow2_path: format!("/var/lib/sendense/repo-a/{vm}/disk-{key}/{job}.qcow2"),
            backup_id: BackupId(job.into()),
            disk_key: DiskKey(key),
            alive,
            started_at: ago(secs),
        };
    vec![
        p(51234, 10100, "pgtest1", RUNNING_JOB, 2000, true, 93),
        p(51236, 10101, "pgtest1", RUNNING_JOB, 2001, true, 93),
        p(50102, 10102, "webfront", FAILED_JOB, 2001, false, 1899),
    ]
}

pub fn tunnel_up() -> TunnelState {
    TunnelState {
        state: TunnelStateKind::Up,
        since: ago(3 * 3600),
        restarts: 0,
        last_error: None,
        forwards: vec![
            "L 127.0.0.1:8082 -> 127.0.0.1:8082".into(),
            "L 127.0.0.1:10100-10200 -> 127.0.0.1:10100-10200".into(),
            "R 127.0.0.1:9081 -> 127.0.0.1:8081".into(),
        ],
    }
}

pub fn tunnel_down() -> TunnelState {
    TunnelState {
        state: TunnelStateKind::Down,
        since: ago(620),
        restarts: 7,
        last_error: Some(
            "ssh exited with status 255: connect to host hub.example port 443: Connection refused"
                .into(),
        ),
        forwards: vec![],
    }
}

pub fn nodes() -> Vec<Node> {
    vec![
        Node {
            name: "node-a".into(),
            api_url: "http://127.0.0.1:9081".into(),
            version: "0.1.0".into(),
            last_seen_at: Some(ago(2)),
            tunnel: Some(tunnel_up()),
        },
        Node {
            name: "node-b".into(),
            api_url: "http://127.0.0.1:9082".into(),
            version: "0.1.0".into(),
            last_seen_at: Some(ago(630)),
            tunnel: Some(tunnel_down()),
        },
    ]
}

pub fn tunnels() -> Vec<NodeTunnel> {
    vec![
        NodeTunnel {
            node: "node-a".into(),
            live: true,
            tunnel: Some(tunnel_up()),
            error: None,
        },
        NodeTunnel {
            node: "node-b".into(),
            live: false,
            tunnel: Some(tunnel_down()),
            error: Some(
                "GET http://127.0.0.1:9082/api/v1/tunnel: error sending request: connection refused"
                    .into(),
            ),
        },
    ]
}

pub fn event(
    seq: i64,
    job: &str,
    secs: i64,
    level: &str,
    step: &str,
    message: &str,
    disk: Option<i64>,
) -> JobEvent {
    JobEvent {
        seq,
        backup_id: BackupId(job.into()),
        at: ago(secs),
        level: level.into(),
        step: step.into(),
        message: message.into(),
        disk_key: disk.map(DiskKey),
        job_id: None,
    }
}

pub fn events() -> Vec<JobEvent> {
    vec![
        event(
            101,
            FAILED_JOB,
            1900,
            "info",
            "job_created",
            "incremental backup of webfront into repo-a",
            None,
        ),
        event(
            102,
            FAILED_JOB,
            1899,
            "info",
            "port_allocated",
            "disk 2001: port 10102",
            Some(2001),
        ),
        event(
            103,
            FAILED_JOB,
            1898,
            "info",
            "qemu_nbd_started",
            "disk 2001: qemu-nbd pid 50102 on 127.0.0.1:10102 export webfront-disk-2001",
            Some(2001),
        ),
        event(
            104,
            FAILED_JOB,
            1625,
            "error",
            "qemu_nbd_exited",
            QEMU_NBD_ERROR,
            Some(2001),
        ),
        event(
            105,
            FAILED_JOB,
            1620,
            "error",
            "job_failed",
            "disk 2001 failed: qemu-nbd exited with status 1",
            None,
        ),
        event(
            201,
            RUNNING_JOB,
            95,
            "info",
            "job_created",
            "full backup of pgtest1 into repo-a",
            None,
        ),
        event(
            202,
            RUNNING_JOB,
            94,
            "info",
            "port_allocated",
            "disk 2000: port 10100; disk 2001: port 10101",
            None,
        ),
        event(
            203,
            RUNNING_JOB,
            93,
            "info",
            "qemu_nbd_started",
            "disk 2000: qemu-nbd pid 51234 on 127.0.0.1:10100 export pgtest1-disk-2000",
            Some(2000),
        ),
        event(
            204,
            RUNNING_JOB,
            93,
            "info",
            "qemu_nbd_started",
            "disk 2001: qemu-nbd pid 51236 on 127.0.0.1:10101 export pgtest1-disk-2001",
            Some(2001),
        ),
        event(
            205,
            RUNNING_JOB,
            92,
            "info",
            "node_started",
            "node-a accepted the job (one snapshot of 2 disks)",
            None,
        ),
        event(
            206,
            RUNNING_JOB,
            40,
            "warn",
            "port_squatted",
            "port 10105 is bound by another process; skipped",
            None,
        ),
    ]
}

pub fn snapshot() -> Snapshot {
    Snapshot {
        health: Some(health()),
        backups: Some(backups()),
        restores: Some(vec![]),
        vms: Some(vms()),
        repositories: Some(repositories()),
        ports: Some(ports()),
        processes: Some(processes()),
        nodes: Some(nodes()),
        tunnels: Some(tunnels()),
        events: Some(events()),
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
