//! Free loopback ports for tests that run in parallel with other tests on the same machine.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A range of `n` consecutive ports on 127.0.0.1 that were all free a moment ago, away from the
/// hub's default 10100-10200 and from the kernel's ephemeral range (32768+), so neither a
/// default hub nor an outgoing connection lands in it.
pub fn free_port_range(n: u16) -> (u16, u16) {
    let seed = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed) * 104_729)
        .wrapping_add(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0),
        );
    let span = 32000 - 12000 - u32::from(n);
    for attempt in 0..500u32 {
        let first = 12000 + ((seed.wrapping_add(attempt * 4099)) % span) as u16;
        let last = first + n - 1;
        let held: Vec<TcpListener> = (first..=last)
            .map_while(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return (first, last);
        }
    }
    panic!("no {n} consecutive free ports on 127.0.0.1 in 12000-32000");
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
