//! `sendense-hub check-image`, the real binary on a real image: the sidecar written by
//! `--compute`, a clean check (exit 0), a flipped byte on disk (exit 3, the cell named), a
//! sidecar that is not the catalog's (exit 1, said so).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

fn hub(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sendense-hub"))
        .arg("--data-dir")
        .arg(data)
        .arg("check-image")
        .args(args)
        .output()
        .expect("sendense-hub runs")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

#[test]
fn check_image_finds_a_flipped_byte_and_a_foreign_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let img = dir.path().join("b1.qcow2");
    let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("32M"));
    ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x42 4M 2M"])
        .arg(&img));
    let img_s = img.to_str().unwrap();

    let o = hub(&data, &[img_s, "--compute", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["cells"], 8, "{v}");
    let digest = v["digest"].as_str().unwrap().to_string();
    assert!(Path::new(&format!("{img_s}.sums")).exists());

    let o = hub(&data, &[img_s, "--digest", &digest]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("all 8 cells equal their checksums (1 read, 4194304 bytes"),
        "{}",
        text(&o)
    );

    // One byte of the data cluster at guest offset 5 MiB, on disk.
    let map: serde_json::Value = serde_json::from_slice(
        &Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(&img)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let at = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["data"] == true)
        .map(|e| e["offset"].as_u64().unwrap() + (5 << 20) - e["start"].as_u64().unwrap())
        .unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[!b[0]], at).unwrap();
    drop(f);
    let o = hub(&data, &[img_s]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains(
            "1 of 8 cells differ from their checksums: cell 1 (offset 4194304, 4194304 bytes)"
        ),
        "{}",
        text(&o)
    );

    let o = hub(&data, &[img_s, "--digest", &"0".repeat(64)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("the catalog recorded"), "{}", text(&o));
}
