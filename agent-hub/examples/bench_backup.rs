//! Benchmark of the hub's own share of a backup, with the real binary and qemu-nbd:
//! preparing exports (ports, images, qemu-nbd until its handshake) per disk count, ingest
//! through the hub's qemu-nbd (nbdcopy as writer), verification read-back with and without
//! checksums, and unwinding on cancel. Prints figures and ratios; asserts nothing about speed.
//!
//! `cargo build -p agent-hub --bin sendense-hub && cargo run -p agent-hub --example bench_backup -- [DATA_MIB]`
//! (add `--release` to both for release figures).

use sendense_tests::disks;
use sendense_tests::hub::{HubOptions, HubProcess};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

#[tokio::main]
async fn main() {
    let data_mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut opts = HubOptions::new(tmp.path().join("data"));
    opts.nbd_ports = Some(sendense_tests::net::free_port_range(20));
    let hub = HubProcess::start(&sendense_tests::bin_path("sendense-hub"), opts).expect("hub");
    let api = hub.api();
    let disk_size = (data_mib * 2).max(64) * MIB;

    println!(
        "== prepare: POST /api/v1/backups until 202 (ports, qcow2 images, qemu-nbd handshakes)"
    );
    let mut per_disk = Vec::new();
    for n in [1usize, 4, 16] {
        let vm = format!("prep{n}");
        let d: Vec<Value> = (0..n)
            .map(|i| json!({"disk_key": 2000 + i, "unit_number": i, "size_bytes": disk_size, "label": format!("d{i}")}))
            .collect();
        let (s, v) = api
            .post(
                "/api/v1/vms",
                &json!({"vm_name": vm, "node": null, "disks": d}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let t = Instant::now();
        let (s, b) = api
            .post(
                "/api/v1/backups",
                &json!({"vm_name": vm, "repository_id": "default", "backup_type": "full"}),
            )
            .await;
        let prep = t.elapsed();
        assert_eq!(s, 202, "{b}");
        let id = b["backup_id"].as_str().unwrap();
        let t = Instant::now();
        api.post(&format!("/api/v1/backups/{id}/cancel"), &json!({}))
            .await;
        api.wait_status(id, &["cancelled"], Duration::from_secs(120))
            .await;
        let unwind = t.elapsed();
        println!(
            "{n:>3} disk(s): prepare {:>6} ms ({:>5.1} ms/disk), cancel+unwind {:>6} ms ({:>5.1} ms/disk)",
            prep.as_millis(),
            prep.as_secs_f64() * 1000.0 / n as f64,
            unwind.as_millis(),
            unwind.as_secs_f64() * 1000.0 / n as f64
        );
        per_disk.push(prep.as_secs_f64() / n as f64);
    }
    println!(
        "ratio prepare per disk, 16 vs 1: {:.2}",
        per_disk[2] / per_disk[0]
    );

    println!(
        "\n== one disk, {data_mib} MiB of data in a {} MiB disk",
        disk_size / MIB
    );
    let src = tmp.path().join("src.qcow2");
    disks::create_qcow2(&src, disk_size);
    for i in 0..data_mib / 4 {
        // 4 MiB every 8 MiB: data and holes alternate, like a real disk.
        disks::write_pattern(&src, i * 8 * MIB, 4 * MIB, (i % 251) as u8 + 1);
    }
    let raw = disks::read_raw(&src);
    let chunk = 4 * MIB as usize;
    let ranges: Vec<Value> = raw
        .chunks(chunk)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|b| *b != 0))
        .map(|(i, c)| json!({"offset": i * chunk, "length": c.len(), "blake3": blake3::hash(c).to_hex().to_string()}))
        .collect();
    let checked_bytes: u64 = ranges.iter().map(|r| r["length"].as_u64().unwrap()).sum();
    let sums = json!({"chunk_size": chunk, "ranges": ranges});
    let (s, v) = api
        .post("/api/v1/vms", &json!({"vm_name": "one", "node": null, "disks": [{"disk_key": 2000, "unit_number": 0, "size_bytes": disk_size, "label": "d"}]}))
        .await;
    assert_eq!(s, 201, "{v}");
    let mut finalize = Vec::new();
    for with_sums in [false, true] {
        let (s, b) = api
            .post(
                "/api/v1/backups",
                &json!({"vm_name": "one", "repository_id": "default", "backup_type": "full"}),
            )
            .await;
        assert_eq!(s, 202, "{b}");
        let id = b["backup_id"].as_str().unwrap().to_string();
        let uri =
            sendense_shared::targets::parse_targets(b["nbd_targets_string"].as_str().unwrap())
                .unwrap()[0]
                .uri
                .to_string();
        let t = Instant::now();
        disks::nbdcopy_into(&src, &uri);
        let copy = t.elapsed();
        let mut d = json!({"disk_key": 2000, "status": "completed"});
        if with_sums {
            d["checksums"] = sums.clone();
        }
        let t = Instant::now();
        let (s, v) = api
            .post(
                &format!("/api/v1/backups/{id}/complete"),
                &json!({"status": "completed", "disks": [d]}),
            )
            .await;
        assert_eq!(s, 202, "{v}");
        let done = api
            .wait_status(&id, &["completed", "failed"], Duration::from_secs(600))
            .await;
        let fin = t.elapsed();
        assert_eq!(done["status"], "completed", "{done}");
        println!(
            "nbdcopy into the hub's qemu-nbd: {:>6} ms ({:>6.0} MiB/s of data); finalize {} checksums: {:>6} ms{}",
            copy.as_millis(),
            data_mib as f64 / copy.as_secs_f64(),
            if with_sums { "with" } else { "without" },
            fin.as_millis(),
            if with_sums {
                format!(
                    " (read back {} MiB: {:.0} MiB/s)",
                    checked_bytes / MIB,
                    (checked_bytes / MIB) as f64 / fin.as_secs_f64()
                )
            } else {
                String::new()
            }
        );
        finalize.push(fin.as_secs_f64());
    }
    println!(
        "ratio finalize with/without checksums: {:.2}",
        finalize[1] / finalize[0]
    );
}
