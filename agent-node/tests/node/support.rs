//! Test helpers: a real QEMU VM with qcow2 disks holding known data, two QMP sockets (one for
//! the node, one for the test), killed by PID in `Drop`.

use agent_node::qmp::{QmpClient, QmpLog};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MIB: u64 = 1024 * 1024;

/// Runs a command, panicking with its full command line and stderr when it fails.
pub fn run(cmd: &mut Command) -> String {
    let line = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {line}: {e}"));
    assert!(
        out.status.success(),
        "{line} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-io -c "write -P <pattern> <offset> <len>"` on an image that no process holds.
pub fn write_image(image: &Path, pattern: u8, offset: u64, len: u64) {
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern:#x} {offset} {len}"),
        ])
        .arg(image));
}

/// Byte-for-byte comparison of two images (any formats qemu-img reads, NBD URIs included).
pub fn images_equal(a: &str, b: &str) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["compare", "-q", a, b])
        .output()
        .expect("qemu-img compare");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img compare {a} {b}: {} {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A QEMU VM (`-S`, TCG) with qcow2 disks attached as virtio-blk devices `disk0`, `disk1`, ...
pub struct TestVm {
    pub dir: tempfile::TempDir,
    pub images: Vec<PathBuf>,
    pub node_qmp: PathBuf,
    pub test_qmp: PathBuf,
    child: Child,
    pub test_client: Option<QmpClient>,
}

impl TestVm {
    /// Creates the disk images (sizes in bytes), lets `prepare` write data into them, starts QEMU.
    pub async fn start(sizes: &[u64], prepare: impl FnOnce(&[PathBuf])) -> TestVm {
        let dir = tempfile::Builder::new()
            .prefix("sdn-")
            .tempdir()
            .expect("tempdir");
        let mut images = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let img = dir.path().join(format!("disk{i}.qcow2"));
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&img)
                .arg(size.to_string()));
            images.push(img);
        }
        prepare(&images);
        let node_qmp = dir.path().join("node.qmp");
        let test_qmp = dir.path().join("test.qmp");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-machine",
            "q35,accel=tcg",
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
        ]);
        for (i, img) in images.iter().enumerate() {
            cmd.arg("-blockdev").arg(format!(
                "driver=file,filename={},node-name=file{i}",
                img.display()
            ));
            cmd.arg("-blockdev")
                .arg(format!("driver=qcow2,file=file{i},node-name=fmt{i}"));
            cmd.arg("-device")
                .arg(format!("virtio-blk-pci,id=disk{i},drive=fmt{i}"));
        }
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", node_qmp.display()));
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", test_qmp.display()));
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        eprintln!("starting {cmd:?}");
        let child = cmd.spawn().expect("spawning qemu-system-x86_64");
        let mut vm = TestVm {
            dir,
            images,
            node_qmp,
            test_qmp,
            child,
            test_client: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = vm.child.try_wait() {
                panic!("qemu exited early: {status}");
            }
            if vm.node_qmp.exists()
                && vm.test_qmp.exists()
                && let Ok(c) =
                    QmpClient::connect(&vm.test_qmp, "test", Arc::new(QmpLog::new(None))).await
            {
                vm.test_client = Some(c);
                break;
            }
            assert!(Instant::now() < deadline, "QEMU QMP sockets did not appear");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        vm
    }

    pub fn qmp(&self) -> &QmpClient {
        self.test_client.as_ref().expect("test QMP client")
    }

    /// A guest write into disk `i` while the VM runs (through HMP's qemu-io).
    pub async fn guest_write(&self, disk: usize, pattern: u8, offset: u64, len: u64) {
        let line = format!(
            "qemu-io -d /machine/peripheral/disk{disk}/virtio-backend \"write -P {pattern:#x} {offset} {len}\""
        );
        let out = self
            .qmp()
            .execute("human-monitor-command", json!({"command-line": line}))
            .await
            .expect("human-monitor-command");
        // qemu-io prints its result on QEMU's stdout, not in the answer; an error in the
        // command line itself comes back here.
        let text = out.as_str().unwrap_or_default();
        assert!(text.is_empty(), "guest write failed: {text}");
    }

    /// Copies disk `i` as it is now into a raw file: flushes QEMU's caches of the disk, then
    /// reads the image file (`-U`: QEMU holds its lock).
    pub async fn copy_image_now(&self, disk: usize, dest: &Path) {
        let line = format!("qemu-io -d /machine/peripheral/disk{disk}/virtio-backend flush");
        self.qmp()
            .execute("human-monitor-command", json!({"command-line": line}))
            .await
            .expect("flush through HMP");
        run(Command::new("qemu-img")
            .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
            .arg(&self.images[disk])
            .arg(dest));
    }

    /// Names of block nodes, exports and jobs that the node created and that are still there.
    pub async fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let nodes = self
            .qmp()
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .unwrap();
        for n in nodes.as_array().unwrap() {
            let name = n["node-name"].as_str().unwrap_or_default();
            if !name.starts_with('#') && !name.starts_with("fmt") && !name.starts_with("file") {
                out.push(format!("node {name}"));
            }
        }
        for e in self
            .qmp()
            .execute("query-block-exports", json!({}))
            .await
            .unwrap()
            .as_array()
            .unwrap()
        {
            out.push(format!("export {}", e["id"]));
        }
        for j in self
            .qmp()
            .execute("query-block-jobs", json!({}))
            .await
            .unwrap()
            .as_array()
            .unwrap()
        {
            out.push(format!("job {}", j["device"]));
        }
        out
    }

    /// Bitmaps on disk `i`'s format node: (name, recording).
    pub async fn bitmaps(&self, disk: usize) -> Vec<(String, bool)> {
        let nodes = self
            .qmp()
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .unwrap();
        let fmt = format!("fmt{disk}");
        nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["node-name"] == Value::String(fmt.clone()))
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| {
                Some((
                    b["name"].as_str()?.to_string(),
                    b["recording"].as_bool().unwrap_or(false),
                ))
            })
            .collect()
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.test_client = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads an NBD URI (e.g. a snapshot export) into a raw file.
pub fn read_export(uri: &str, dest: &Path) {
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(uri)
        .arg(dest));
}

/// QMP commands of `log` with the given name.
pub fn commands<'a>(log: &'a [Value], name: &str) -> Vec<&'a Value> {
    log.iter().filter(|e| e["execute"] == name).collect()
}
