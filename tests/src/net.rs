//! Free loopback ports for tests that run in parallel with other tests on the same machine.
//!
//! A bind test alone cannot keep a range: a hub test holds its NBD ports only while an export
//! runs, so between two backups another test's bind test found them free and its hub took one
//! (CI saw "port 29281 already in use"). Every range handed out here is also reserved for the
//! life of the test process by a `flock` per port on a file under `target/test-ports/`, which
//! every test binary of the build shares; the kernel drops the locks when the process ends,
//! however it ends.

use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The reservations of this process, kept until it exits.
static HELD: Mutex<Vec<Flock<File>>> = Mutex::new(Vec::new());

/// `target/test-ports`, beside the profile directory of the running test binary.
fn lock_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let target = exe
        .ancestors()
        .find(|d| d.file_name().is_some_and(|n| n == "target"))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            exe.parent()
                .expect("executable in a directory")
                .to_path_buf()
        });
    let dir = target.join("test-ports");
    std::fs::create_dir_all(&dir).expect("create target/test-ports");
    dir
}

/// Locks `port`'s file without waiting: `None` when another test process holds it.
fn reserve(dir: &std::path::Path, port: u16) -> Option<Flock<File>> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))
        .expect("open a port lock file");
    Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()
}

/// A range of `n` consecutive ports on 127.0.0.1, reserved for this test process (see the
/// module doc) and free a moment ago, away from the hub's default 10100-10200 and from the
/// kernel's ephemeral range (32768+), so neither a default hub nor an outgoing connection lands
/// in it.
pub fn free_port_range(n: u16) -> (u16, u16) {
    free_port_range_on(n, &[Ipv4Addr::LOCALHOST])
}

/// Like [`free_port_range`], with every port free on each of `addrs` (e.g. 127.0.0.1 and
/// 127.0.0.2 for a tunnel test).
pub fn free_port_range_on(n: u16, addrs: &[Ipv4Addr]) -> (u16, u16) {
    let seed = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed) * 104_729)
        .wrapping_add(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0),
        );
    let dir = lock_dir();
    let span = 32000 - 12000 - u32::from(n);
    for attempt in 0..500u32 {
        let first = 12000 + ((seed.wrapping_add(attempt * 4099)) % span) as u16;
        let last = first + n - 1;
        let locks: Vec<Flock<File>> = (first..=last).map_while(|p| reserve(&dir, p)).collect();
        if locks.len() < usize::from(n) {
            continue;
        }
        let free =
            (first..=last).all(|p| addrs.iter().all(|ip| TcpListener::bind((*ip, p)).is_ok()));
        if free {
            HELD.lock().unwrap_or_else(|p| p.into_inner()).extend(locks);
            return (first, last);
        }
    }
    panic!("no {n} consecutive free ports on {addrs:?} in 12000-32000");
}

/// A port on 127.0.0.1 that the kernel just handed out and that was let go again: nobody
/// listens on it, and the kernel does not hand it out again soon.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
