//! A test hub and its VM.

use sendense_tests::disks;
use sendense_tests::hub::{Api, HubOptions, HubProcess};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const MIB: u64 = 1 << 20;
pub const DISK_SIZE: u64 = 64 * MIB;
pub const JOB_LIMIT: Duration = Duration::from_secs(60);

pub struct Env {
    pub hub: HubProcess,
    pub api: Api,
    pub tmp: tempfile::TempDir,
}

impl Env {
    pub fn start() -> Env {
        Self::start_with(|_| {})
    }

    pub fn start_with(adjust: impl FnOnce(&mut HubOptions)) -> Env {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut opts = HubOptions::new(tmp.path().join("data"));
        // These tests write with nbdcopy/qemu-io on the hub (a hub-alone writer, no client
        // certificate, at `nbd://127.0.0.1:PORT`): the documented `nbd_tls = false` mode on TCP
        // (`nbd_listen = "tcp"`). TLS: `hub::nbd_tls`.
        opts.extra_args
            .extend(["--nbd-tls".to_string(), "false".to_string()]);
        opts.extra_args
            .extend(["--nbd-listen".to_string(), "tcp".to_string()]);
        adjust(&mut opts);
        let hub = HubProcess::start(Path::new(env!("CARGO_BIN_EXE_sendense-hub")), opts)
            .expect("start sendense-hub");
        let api = hub.api();
        Env { hub, api, tmp }
    }

    /// After a SIGKILL: start again.
    pub fn start_again(&mut self) {
        let mut opts = self.hub.opts.clone();
        opts.nbd_ports = Some(self.hub.nbd_ports);
        self.hub = HubProcess::start(Path::new(env!("CARGO_BIN_EXE_sendense-hub")), opts)
            .expect("start sendense-hub again");
        self.api = self.hub.api();
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Source images `src-<key>.qcow2` with a few MiB of known data each, and the VM registered
    /// with `node: null`.
    pub async fn vm_with_sources(&self, vm: &str, keys: &[i64]) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let p = self.path(&format!("{vm}-src-{k}.qcow2"));
            disks::create_qcow2(&p, DISK_SIZE);
            disks::write_pattern(&p, 0, MIB, 0x11 + i as u8);
            disks::write_pattern(&p, 5 * MIB + 4096, 2 * MIB, 0xa0 + i as u8);
            disks::write_pattern(&p, DISK_SIZE - MIB, MIB, 0x33);
            out.push(p);
        }
        self.register_vm(vm, keys).await;
        out
    }

    pub async fn register_vm(&self, vm: &str, keys: &[i64]) -> Value {
        let disks: Vec<Value> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                json!({"disk_key": k, "unit_number": i, "size_bytes": DISK_SIZE, "label": format!("disk {i}")})
            })
            .collect();
        let (s, v) = self
            .api
            .post(
                "/api/v1/vms",
                &json!({"vm_name": vm, "node": null, "disks": disks}),
            )
            .await;
        assert_eq!(s, 201, "register VM: {v}");
        v
    }

    pub async fn start_backup(&self, vm: &str, kind: &str) -> (u16, Value) {
        self.api
            .post(
                "/api/v1/backups",
                &json!({"vm_name": vm, "repository_id": "default", "backup_type": kind}),
            )
            .await
    }

    /// Starts a backup of `vm` that must be accepted (202): its id and the hub's answer.
    pub async fn backup(&self, vm: &str, kind: &str) -> (String, Value) {
        let (s, b) = self.start_backup(vm, kind).await;
        assert_eq!(s, 202, "{b}");
        (b["backup_id"].as_str().unwrap().to_string(), b)
    }

    /// A full backup of a new one-disk VM `vm` written by `nbdcopy` and completed without any
    /// checksums, as a hub-alone writer does: its sources, id and completed record.
    pub async fn hub_alone_full(&self, vm: &str) -> (Vec<PathBuf>, String, Value) {
        let srcs = self.vm_with_sources(vm, &[2000]).await;
        let (id, b) = self.backup(vm, "full").await;
        disks::nbdcopy_into(&srcs[0], &targets(&b)[0].1);
        let done = self
            .complete_ok(
                &id,
                &json!({"status": "completed", "disks": [{"disk_key": 2000, "status": "completed"}]}),
            )
            .await;
        (srcs, id, done)
    }

    /// A full backup of a new one-disk VM `vm` written by `nbdcopy` and completed with the
    /// whole-disk grid (4 MiB cells) a node would report: its sources, id and completed record.
    pub async fn gridded_full(&self, vm: &str) -> (Vec<PathBuf>, String, Value) {
        let srcs = self.vm_with_sources(vm, &[2000]).await;
        let (id, b) = self.backup(vm, "full").await;
        disks::nbdcopy_into(&srcs[0], &targets(&b)[0].1);
        let body = json!({"status": "completed", "disks": [{"disk_key": 2000,
            "status": "completed", "grid": grid_of(&srcs[0], 4 * MIB)}]});
        let done = self.complete_ok(&id, &body).await;
        (srcs, id, done)
    }

    /// Cancels job `id`, waits for `cancelled` and asserts that nothing stays held.
    pub async fn cancel_and_check(&self, id: &str) -> Value {
        self.api
            .post(&format!("/api/v1/backups/{id}/cancel"), &json!({}))
            .await;
        let done = self.api.wait_status(id, &["cancelled"], JOB_LIMIT).await;
        self.assert_nothing_held(&done).await;
        done
    }

    /// Completes job `id` as a writer does (`body` is the `complete` request), waits for its end
    /// and asserts it `completed` (the events in the message otherwise) with nothing held.
    pub async fn complete_ok(&self, id: &str, body: &Value) -> Value {
        let (s, v) = self
            .api
            .post(&format!("/api/v1/backups/{id}/complete"), body)
            .await;
        assert_eq!(s, 202, "{v}");
        let done = self
            .api
            .wait_status(id, &["completed", "failed"], JOB_LIMIT)
            .await;
        assert_eq!(
            done["status"],
            "completed",
            "{done:#}\n{:#?}",
            self.api.event_lines(id).await
        );
        self.assert_nothing_held(&done).await;
        done
    }

    /// Asserts what an operator would check once a job is over: no qemu-nbd of it alive, no
    /// port held, no process recorded alive.
    pub async fn assert_nothing_held(&self, backup: &Value) {
        self.api.assert_nothing_held(backup).await;
    }
}

/// Asserts that a request was refused as invalid (422) with a detail naming `field`.
pub fn assert_refused_naming(status: u16, answer: &Value, field: &str) {
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"], "invalid_field", "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().contains(field),
        "{answer}"
    );
}

/// `(disk_key, uri)` of a running backup's targets string.
pub fn targets(backup: &Value) -> Vec<(i64, String)> {
    let s = backup["nbd_targets_string"]
        .as_str()
        .expect("targets string");
    sendense_shared::targets::parse_targets(s)
        .expect("valid targets string")
        .into_iter()
        .map(|t| (t.disk_key.0, t.uri.to_string()))
        .collect()
}

/// The checksums a writer would report for a whole disk image: BLAKE3 per 4 MiB chunk.
pub fn checksums_of(image: &Path) -> Value {
    let raw = disks::read_raw(image);
    let chunk = 4 * MIB as usize;
    let ranges: Vec<Value> = raw
        .chunks(chunk)
        .enumerate()
        .map(|(i, c)| {
            json!({"offset": i * chunk, "length": c.len(), "blake3": blake3::hash(c).to_hex().to_string()})
        })
        .collect();
    json!({"chunk_size": chunk, "ranges": ranges})
}

/// The harness's lookups on a backup record, shared with the e2e suite.
pub use sendense_tests::hub::{disk_result as disk, image_paths};

/// The whole-disk grid a writer would report for `image` (cells of `cell` bytes): every
/// all-zero cell in a zero run, every other cell hashed.
pub fn grid_of(image: &Path, cell: u64) -> Value {
    let raw = disks::read_raw(image);
    let mut cells = Vec::new();
    let mut zero: Vec<Value> = Vec::new();
    for (i, c) in raw.chunks(cell as usize).enumerate() {
        if c.iter().all(|&b| b == 0) {
            zero.push(json!({"first": i, "count": 1}));
        } else {
            cells.push(json!({"index": i, "blake3": blake3::hash(c).to_hex().to_string()}));
        }
    }
    json!({"cell_size": cell, "disk_size": raw.len(), "cells": cells, "zero_cells": zero})
}

/// A one-disk VM `vm` (disk 2000 of `size` bytes, `node: null`) whose source holds `data`
/// bytes of a pattern from 0: a disk large enough that finalizing it takes a while.
pub async fn big_vm(env: &Env, vm: &str, size: u64, data: u64) -> PathBuf {
    let p = env.path(&format!("{vm}-src-2000.qcow2"));
    disks::create_qcow2(&p, size);
    disks::write_pattern(&p, 0, data, 0x6b);
    let (s, v) = env
        .api
        .post(
            "/api/v1/vms",
            &json!({"vm_name": vm, "node": null, "disks": [{"disk_key": 2000, "unit_number": 0, "size_bytes": size, "label": "disk 0"}]}),
        )
        .await;
    assert_eq!(s, 201, "register VM: {v}");
    p
}
