//! Prometheus metrics of the node: `GET /api/v1/metrics` (the node's credential; the text
//! exposition format), read at scrape time from the node's own state: the backup jobs it holds
//! by status and the bytes of the running ones, the tunnel (up, restarts; per ssh link too), the nbdkit children
//! alive (the vSphere disk readers) and the uptime. Same crate as the hub's (`prometheus`, no
//! default features). Labels are bounded: statuses and kinds, never a job id.

use crate::api::NodeState;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use sendense_shared::api::{JobStatus, TunnelStateKind};

fn must<T>(r: Result<T, prometheus::Error>) -> T {
    // Fails only on an invalid name or a duplicate: a bug of this module, caught by its test.
    r.expect("metric definition")
}

fn gauge(reg: &Registry, name: &str, help: &str) -> IntGauge {
    let g = must(IntGauge::new(name, help));
    must(reg.register(Box::new(g.clone())));
    g
}

fn gauge_vec(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = must(IntGaugeVec::new(Opts::new(name, help), labels));
    must(reg.register(Box::new(g.clone())));
    g
}

/// Children of this process whose command is `program` (from `/proc/*/stat`).
fn children_named(program: &str) -> i64 {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // `pid (comm) state ppid ...`: comm may hold spaces, so split after its `)`.
            let Some((head, rest)) = stat.rsplit_once(") ") else {
                return false;
            };
            let comm = head.split_once(" (").map_or("", |(_, c)| c);
            let ppid = rest.split_whitespace().nth(1).unwrap_or("");
            comm == program && ppid == me
        })
        .count() as i64
}

/// The text exposition of the node's state now.
pub fn render(state: &NodeState) -> String {
    let reg = Registry::new();
    let backups = gauge_vec(
        &reg,
        "sendense_node_backups",
        "Backup jobs the node holds, by status",
        &["status"],
    );
    let bytes = gauge_vec(
        &reg,
        "sendense_node_running_bytes",
        "Bytes of the disks of running backup jobs: read, written, skipped",
        &["what"],
    );
    for s in [JobStatus::Running, JobStatus::Completed, JobStatus::Failed] {
        backups.with_label_values(&[s.as_str()]).set(0);
    }
    for j in state.jobs.list() {
        let v = j.view();
        backups.with_label_values(&[v.status.as_str()]).inc();
        if v.status == JobStatus::Running {
            for d in &v.disks {
                for (what, n) in [
                    ("read", d.bytes_read),
                    ("written", d.bytes_written),
                    ("skipped", d.bytes_skipped),
                ] {
                    bytes
                        .with_label_values(&[what])
                        .add(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
        }
    }
    let up = gauge(
        &reg,
        "sendense_node_tunnel_up",
        "1 when the node's tunnel to the hub is up (0 when down, connecting or not configured)",
    );
    let configured = gauge(
        &reg,
        "sendense_node_tunnel_configured",
        "1 when the node runs a tunnel to the hub",
    );
    let restarts = must(IntCounter::new(
        "sendense_node_tunnel_restarts_total",
        "Restarts of the tunnel's ssh since the node started",
    ));
    must(reg.register(Box::new(restarts.clone())));
    let link_up = gauge_vec(
        &reg,
        "sendense_node_tunnel_link_up",
        "1 when this ssh process (link) of the tunnel has its forwards established",
        &["link"],
    );
    let link_restarts = must(IntCounterVec::new(
        Opts::new(
            "sendense_node_tunnel_link_restarts_total",
            "Restarts of this ssh process (link) of the tunnel since the node started",
        ),
        &["link"],
    ));
    must(reg.register(Box::new(link_restarts.clone())));
    if let Some(t) = &state.tunnel {
        let s = t.state();
        configured.set(1);
        up.set(i64::from(s.state == TunnelStateKind::Up));
        restarts.inc_by(u64::from(s.restarts));
        // At most 16 links (MAX_LINKS): a bounded label.
        for l in &s.links {
            let k = l.link.to_string();
            link_up
                .with_label_values(&[k.as_str()])
                .set(i64::from(l.state == TunnelStateKind::Up));
            link_restarts
                .with_label_values(&[k.as_str()])
                .inc_by(u64::from(l.restarts));
        }
    }
    let procs = gauge_vec(
        &reg,
        "sendense_node_processes_alive",
        "Child processes of the node alive now, by program",
        &["program"],
    );
    procs
        .with_label_values(&["nbdkit"])
        .set(children_named("nbdkit"));
    let uptime = gauge(
        &reg,
        "sendense_node_uptime_seconds",
        "Seconds since the node started",
    );
    uptime.set((chrono::Utc::now() - state.started_at).num_seconds());
    let mut out = Vec::new();
    // Encoding in memory only fails on a metric family without a name: not ours.
    let _ = TextEncoder::new().encode(&reg.gather(), &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test process has no nbdkit child; a child it spawns is counted while it lives.
    #[test]
    fn children_are_counted_by_command_name() {
        assert_eq!(children_named("sleep"), 0);
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        while children_named("sleep") != 1 {
            assert!(t.elapsed() < std::time::Duration::from_secs(5));
            std::thread::yield_now();
        }
        c.kill().unwrap();
        c.wait().unwrap();
        assert_eq!(children_named("sleep"), 0);
    }
}
