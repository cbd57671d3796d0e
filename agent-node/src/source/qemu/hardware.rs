//! The VM's hardware at snapshot time ([`VmHardware`]): memory, vCPUs, machine, disks (with the
//! image each sits on), NICs and direct kernel boot, from QMP (`query-memory-size-summary`,
//! `query-cpus-fast`, `query-block`, `query-rx-filter`, `qom-get`) and from the QEMU process's
//! command line (`/proc/PID/cmdline`, the PID being the QMP socket's peer, `SO_PEERCRED`).
//! Recorded with the backup point for an instant recovery or a restore as a new VM; never a
//! reason for a backup to fail (a part QEMU does not answer is left out, logged).

use super::disks::QemuDisk;
use super::{QemuDriver, QemuVm};
use sendense_shared::api::{HardwareDisk, HardwareNic, VmHardware};
use serde_json::{Value, json};

impl QemuDriver {
    /// The hardware of `vm` whose guest disks are `disks` (from [`QemuDriver::disks`]);
    /// `None` only when even memory and vCPUs cannot be read.
    pub(super) async fn hardware(&self, vm: &QemuVm, disks: &[QemuDisk]) -> Option<VmHardware> {
        match self.hardware_inner(vm, disks).await {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(vm = %vm.name, error = %sendense_shared::errors::chain(&e),
                    "VM hardware not recorded");
                None
            }
        }
    }

    async fn hardware_inner(
        &self,
        vm: &QemuVm,
        disks: &[QemuDisk],
    ) -> Result<VmHardware, crate::source::SourceError> {
        let mem = self
            .exec(vm, "query-memory-size-summary", json!({}))
            .await?;
        let cpus = self.exec(vm, "query-cpus-fast", json!({})).await?;
        let blocks = self.exec(vm, "query-block", json!({})).await?;
        let pid = self.client(vm).await?.peer_pid();
        let argv = pid.map(read_cmdline).unwrap_or_default();
        let mut hw = VmHardware {
            memory_mib: mem.get("base-memory").and_then(Value::as_u64).unwrap_or(0) >> 20,
            cpus: cpus.as_array().map_or(0, |a| a.len() as u32),
            machine: self
                .qom_string(vm, "/machine", "type")
                .await
                .map(|t| t.trim_end_matches("-machine").to_string()),
            accel: accel_of(&argv),
            kernel: self.qom_string(vm, "/machine", "kernel").await,
            initrd: self.qom_string(vm, "/machine", "initrd").await,
            append: self.qom_string(vm, "/machine", "append").await,
            pid,
            ..VmHardware::default()
        };
        if hw.kernel.is_none() {
            hw.kernel = arg_value(&argv, "-kernel");
            hw.initrd = arg_value(&argv, "-initrd");
            hw.append = arg_value(&argv, "-append");
        }
        for d in disks {
            let block = blocks.as_array().into_iter().flatten().find(|b| {
                b.pointer("/inserted/node-name").and_then(Value::as_str)
                    == Some(d.format_node.as_str())
            });
            let image_path = block
                .and_then(|b| {
                    b.pointer("/inserted/image/filename")
                        .or_else(|| b.pointer("/inserted/file"))
                })
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let qdev = block
                .and_then(|b| b.get("qdev"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            let device_type = match device_path(qdev) {
                Some(p) => self.qom_string(vm, p, "type").await,
                None => None,
            };
            hw.disks.push(HardwareDisk {
                disk_key: d.disk.disk_key,
                device_id: d.disk.label.clone(),
                virtual_size: d.disk.size_bytes,
                bus: bus_of(device_type.as_deref().unwrap_or_default()),
                image_path,
                format: d.driver.clone(),
            });
        }
        // No NIC is an error answer of query-rx-filter on some versions: no NICs then.
        if let Ok(nics) = self.exec(vm, "query-rx-filter", json!({})).await {
            for n in nics.as_array().into_iter().flatten() {
                let Some(name) = n.get("name").and_then(Value::as_str) else {
                    continue;
                };
                let model = self
                    .qom_string(vm, &format!("/machine/peripheral/{name}"), "type")
                    .await;
                hw.nics.push(HardwareNic {
                    name: name.to_string(),
                    mac: n
                        .get("main-mac")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    model,
                });
            }
        }
        hw.argv = argv;
        Ok(hw)
    }

    /// A string QOM property, `None` when absent or empty.
    async fn qom_string(&self, vm: &QemuVm, path: &str, property: &str) -> Option<String> {
        self.exec(vm, "qom-get", json!({"path": path, "property": property}))
            .await
            .ok()?
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }
}

/// The QOM path of the guest device of a `query-block` `qdev` (`/machine/peripheral/vd0` of
/// `/machine/peripheral/vd0/virtio-backend`).
fn device_path(qdev: &str) -> Option<&str> {
    if qdev.is_empty() {
        return None;
    }
    Some(qdev.strip_suffix("/virtio-backend").unwrap_or(qdev))
}

/// The bus of a guest disk device from its QOM type.
pub(crate) fn bus_of(device_type: &str) -> String {
    let t = device_type;
    let bus = if t.starts_with("virtio-blk") {
        "virtio"
    } else if t.starts_with("scsi") || t.starts_with("virtio-scsi") {
        "scsi"
    } else if t.starts_with("ide") {
        "ide"
    } else if t.starts_with("nvme") {
        "nvme"
    } else if t.is_empty() {
        "unknown"
    } else {
        t
    };
    bus.to_string()
}

/// `/proc/PID/cmdline` split at its NULs; empty when it cannot be read.
fn read_cmdline(pid: u32) -> Vec<String> {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(raw) => raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
        Err(e) => {
            tracing::warn!(pid, error = %e, "QEMU command line not readable");
            Vec::new()
        }
    }
}

/// The value after the last `flag` (`-kernel /boot/vmlinuz`).
fn arg_value(argv: &[String], flag: &str) -> Option<String> {
    argv.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].clone())
        .next_back()
}

/// The accelerator(s) of a command line: `-accel X`, `-machine ...,accel=X`, `-enable-kvm`.
pub(crate) fn accel_of(argv: &[String]) -> Option<String> {
    if let Some(a) = arg_value(argv, "-accel") {
        return Some(a.split(',').next().unwrap_or(&a).to_string());
    }
    for flag in ["-machine", "-M"] {
        if let Some(m) = arg_value(argv, flag)
            && let Some(a) = m.split(',').find_map(|kv| kv.strip_prefix("accel="))
        {
            return Some(a.to_string());
        }
    }
    argv.iter()
        .any(|a| a == "-enable-kvm")
        .then(|| "kvm".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn accel_from_each_spelling() {
        assert_eq!(
            accel_of(&argv("qemu -machine q35,accel=tcg -m 64")).as_deref(),
            Some("tcg")
        );
        assert_eq!(
            accel_of(&argv("qemu -accel kvm,thread=multi")).as_deref(),
            Some("kvm")
        );
        assert_eq!(accel_of(&argv("qemu -enable-kvm")).as_deref(), Some("kvm"));
        assert_eq!(accel_of(&argv("qemu -m 64")), None);
    }

    #[test]
    fn bus_and_device_path() {
        assert_eq!(bus_of("virtio-blk-pci"), "virtio");
        assert_eq!(bus_of("scsi-hd"), "scsi");
        assert_eq!(bus_of("ide-hd"), "ide");
        assert_eq!(bus_of("usb-storage"), "usb-storage");
        assert_eq!(
            device_path("/machine/peripheral/disk0/virtio-backend"),
            Some("/machine/peripheral/disk0")
        );
        assert_eq!(device_path(""), None);
    }
}
