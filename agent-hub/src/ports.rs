//! The NBD port allocator: one port of the configured range per disk of a job.
//!
//! # Invariants
//! - The database decides who holds a port: `nbd_port_allocations.port` is its primary key, and
//!   a port is held exactly while its row exists. Two requests, or two hub processes sharing one
//!   MariaDB, can never both insert the same port; the loser gets a unique violation and moves on
//!   to the next candidate.
//! - All or nothing: the rows of one request are inserted in one transaction, committed only
//!   when every disk has a port. A request that cannot be satisfied rolls back and holds nothing.
//! - Candidates are tried in ascending order, so two transactions waiting on each other's rows
//!   cannot form a cycle; the deadlocks InnoDB can still report (shared locks taken by duplicate
//!   key checks) roll the whole transaction back, and it is retried.
//! - A port is handed out only after a test bind on the NBD bind address succeeded. Its row is
//!   inserted first, so a port that is bound although no row holds it belongs to a foreign
//!   process (an old binary, another service): it is skipped, logged and reported as squatted
//!   until a later bind test finds it free.
//! - A bind test cannot reserve a port: a foreign process may bind it between the test and
//!   qemu-nbd's own bind. qemu-nbd then exits with "Address already in use", and the job moves
//!   that disk to another port ([`PortAllocator::replace_taken`]): the new row is inserted while
//!   the taken one is still held, so the taken port cannot come back, then the taken one is let
//!   go and reported as squatted.
//! - With the exports on unix sockets (`nbd_listen = "unix"`) the numbers are slot ids
//!   ([`PortAllocator::slots_only`]): no TCP bind test, since nothing listens on TCP and a local
//!   user binding the whole range must not be able to starve the hub of slots.

use crate::db::{Db, DbError, col, from_us, is_unique_violation, now_us, q};
use chrono::Utc;
use sendense_shared::api::{PortAllocation, PortsView, SquattedPort};
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;

/// An inclusive range of TCP ports, written `10100-10200`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// `first..=last`; `None` when `first > last` or the range includes port 0.
    pub fn new(first: u16, last: u16) -> Option<PortRange> {
        (first > 0 && first <= last).then_some(PortRange { first, last })
    }

    /// Number of ports in the range.
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Never true for a range built by [`PortRange::new`] or parsing; here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.first > self.last
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> + use<> {
        self.first..=self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Why a port range string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid port range {input:?}: {reason} (expected FIRST-LAST, e.g. 10100-10200)")]
pub struct PortRangeError {
    pub input: String,
    pub reason: &'static str,
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| PortRangeError {
            input: s.to_string(),
            reason,
        };
        let (a, b) = s.trim().split_once('-').ok_or(err("no '-'"))?;
        let first: u16 = a
            .trim()
            .parse()
            .map_err(|_| err("first port is not a number 1-65535"))?;
        let last: u16 = b
            .trim()
            .parse()
            .map_err(|_| err("last port is not a number 1-65535"))?;
        if first == 0 {
            return Err(err("port 0 cannot be allocated"));
        }
        PortRange::new(first, last).ok_or(err("first port is above last port"))
    }
}

/// What the allocator can answer besides ports.
#[derive(Debug, Error)]
pub enum PortError {
    /// Not every disk could get a port; nothing is held. `in_use` counts rows of the range held
    /// by jobs, `squatted` lists ports bound by foreign processes.
    #[error(
        "no free NBD port for each of {requested} disks in range {range}: {in_use} held by jobs, {} squatted by other processes{}",
        squatted.len(),
        squatted_list(squatted)
    )]
    Exhausted {
        range: PortRange,
        requested: usize,
        in_use: usize,
        squatted: Vec<u16>,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

fn squatted_list(ports: &[u16]) -> String {
    if ports.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        format!(" ({})", list.join(", "))
    }
}

/// Hands out NBD ports from a range, backed by `nbd_port_allocations`. Clones share the record
/// of squatted ports.
#[derive(Debug, Clone)]
pub struct PortAllocator {
    db: Db,
    range: PortRange,
    bind: IpAddr,
    /// False for slot ids of unix-socket exports: no TCP bind test.
    bind_test: bool,
    squatted: Arc<Mutex<BTreeMap<u16, SquattedPort>>>,
}

/// One pass of an allocation that did not fail on a database error.
enum Attempt {
    Got(Vec<(DiskKey, NbdPort)>),
    Short,
}

impl PortAllocator {
    pub fn new(db: Db, range: PortRange, bind: IpAddr) -> Self {
        PortAllocator {
            db,
            range,
            bind,
            bind_test: true,
            squatted: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// The numbers are slots of unix-socket exports (`<dir>/<port>.sock`): handed out by the
    /// database alone, without a TCP bind test.
    pub fn slots_only(mut self) -> Self {
        self.bind_test = false;
        self
    }

    pub fn range(&self) -> PortRange {
        self.range
    }

    /// One port per disk, all or nothing (see the module doc). Ports come out in the order of
    /// `disks`, ascending.
    pub async fn allocate(
        &self,
        backup: &BackupId,
        disks: &[DiskKey],
    ) -> Result<Vec<(DiskKey, NbdPort)>, PortError> {
        if disks.is_empty() {
            return Ok(Vec::new());
        }
        let unique: BTreeSet<DiskKey> = disks.iter().copied().collect();
        if unique.len() != disks.len() {
            return Err(DbError::Invalid {
                field: "disks",
                reason: "a disk key appears twice in one port request".into(),
            }
            .into());
        }
        let mut attempt = 0u32;
        loop {
            let mut squatted_now = Vec::new();
            match self.try_allocate(backup, disks, &mut squatted_now).await {
                Ok(outcome) => {
                    self.note_squatted(&squatted_now);
                    return match outcome {
                        Attempt::Got(ports) => {
                            self.note_free(ports.iter().map(|(_, p)| p.0));
                            tracing::info!(backup = %backup, ports = ?ports, "NBD ports allocated");
                            Ok(ports)
                        }
                        Attempt::Short => Err(self.exhausted(disks.len()).await),
                    };
                }
                Err(e) if e.is_retryable() && attempt < 20 => {
                    attempt += 1;
                    tracing::debug!(attempt, error = %e, "port allocation hit a lock conflict; retrying");
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn try_allocate(
        &self,
        backup: &BackupId,
        disks: &[DiskKey],
        squatted_now: &mut Vec<(u16, String)>,
    ) -> Result<Attempt, DbError> {
        let doing = "allocating NBD ports";
        // Read outside the transaction: only a hint to skip ports known to be held. The unique
        // key inside the transaction is what decides.
        let held = self.held_ports().await?;
        let mut tx = self.db.begin_write(doing).await?;
        let now = now_us();
        let mut got = Vec::with_capacity(disks.len());
        let mut want = disks.iter();
        let mut disk = want.next();
        for port in self.range.ports() {
            let Some(&key) = disk else { break };
            if held.contains(&port) {
                continue;
            }
            let inserted = sqlx::query(
                "INSERT INTO nbd_port_allocations (port, backup_id, disk_key, allocated_at) \
                 VALUES (?, ?, ?, ?)",
            )
            .bind(i32::from(port))
            .bind(&backup.0)
            .bind(key.0)
            .bind(now)
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => continue,
                Err(e) => return Err(q(doing)(e)),
            }
            let tested = if self.bind_test {
                bind_test(self.bind, port)
            } else {
                Ok(())
            };
            match tested {
                Ok(()) => {
                    got.push((key, NbdPort(port)));
                    disk = want.next();
                }
                Err(detail) => {
                    sqlx::query("DELETE FROM nbd_port_allocations WHERE port = ?")
                        .bind(i32::from(port))
                        .execute(&mut *tx)
                        .await
                        .map_err(q(doing))?;
                    tracing::warn!(
                        port,
                        bind = %self.bind,
                        %detail,
                        "NBD port is bound by a process that is not ours; skipping it"
                    );
                    squatted_now.push((port, detail));
                }
            }
        }
        if got.len() < disks.len() {
            tx.rollback().await.map_err(q(doing))?;
            return Ok(Attempt::Short);
        }
        tx.commit().await.map_err(q(doing))?;
        Ok(Attempt::Got(got))
    }

    async fn held_ports(&self) -> Result<BTreeSet<u16>, DbError> {
        let ports: Vec<i64> = sqlx::query_scalar(
            "SELECT port FROM nbd_port_allocations WHERE port >= ? AND port <= ?",
        )
        .bind(i32::from(self.range.first))
        .bind(i32::from(self.range.last))
        .fetch_all(self.db.pool())
        .await
        .map_err(q("reading held NBD ports"))?;
        Ok(ports
            .into_iter()
            .filter_map(|p| u16::try_from(p).ok())
            .collect())
    }

    async fn exhausted(&self, requested: usize) -> PortError {
        let in_use = match self.held_ports().await {
            Ok(h) => h.len(),
            Err(e) => return e.into(),
        };
        let squatted: Vec<u16> = self.squatted_map().keys().copied().collect();
        let err = PortError::Exhausted {
            range: self.range,
            requested,
            in_use,
            squatted,
        };
        tracing::warn!(error = %err, "NBD port allocation refused");
        err
    }

    fn squatted_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, SquattedPort>> {
        // A panic while holding this lock cannot leave the map inconsistent: recover it.
        self.squatted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note_squatted(&self, found: &[(u16, String)]) {
        let mut map = self.squatted_map();
        for (port, detail) in found {
            map.insert(
                *port,
                SquattedPort {
                    port: NbdPort(*port),
                    seen_at: Utc::now(),
                    detail: detail.clone(),
                },
            );
        }
    }

    fn note_free(&self, ports: impl Iterator<Item = u16>) {
        let mut map = self.squatted_map();
        for p in ports {
            map.remove(&p);
        }
    }

    /// `taken`, held by `backup` for `disk`, was bound by a foreign process after its bind test
    /// (`detail` says how that showed): another port for the same disk, then `taken` is let go
    /// and reported as squatted. Exhausted: `taken` stays held, the job's unwinding frees it.
    pub async fn replace_taken(
        &self,
        backup: &BackupId,
        disk: DiskKey,
        taken: NbdPort,
        detail: String,
    ) -> Result<NbdPort, PortError> {
        let got = self.allocate(backup, &[disk]).await?;
        self.release_port(taken).await?;
        self.note_squatted(&[(taken.0, detail)]);
        tracing::warn!(backup = %backup, %disk, taken = taken.0, port = got[0].1.0,
            "NBD port was taken by a process that is not ours after its bind test; moved");
        Ok(got[0].1)
    }

    /// Releases every port of a job; returns how many rows were released.
    pub async fn release(&self, backup: &BackupId) -> Result<u64, PortError> {
        let res = sqlx::query("DELETE FROM nbd_port_allocations WHERE backup_id = ?")
            .bind(&backup.0)
            .execute(self.db.pool())
            .await
            .map_err(q("releasing a backup's NBD ports"))?;
        if res.rows_affected() > 0 {
            tracing::info!(backup = %backup, released = res.rows_affected(), "NBD ports released");
        }
        Ok(res.rows_affected())
    }

    /// Releases one port, whoever holds it (the reconciler). Not held: no change.
    pub async fn release_port(&self, port: NbdPort) -> Result<(), PortError> {
        sqlx::query("DELETE FROM nbd_port_allocations WHERE port = ?")
            .bind(i32::from(port.0))
            .execute(self.db.pool())
            .await
            .map_err(q("releasing an NBD port"))?;
        Ok(())
    }

    /// Every held port (of any range, ordered by port) and the squatted ports seen.
    pub async fn view(&self) -> Result<PortsView, PortError> {
        let rows = sqlx::query(
            "SELECT port, backup_id, disk_key, allocated_at FROM nbd_port_allocations ORDER BY port",
        )
        .fetch_all(self.db.pool())
        .await
        .map_err(q("listing NBD port allocations"))?;
        let allocations = rows
            .iter()
            .map(|r| {
                let port: i64 = col(r, "port")?;
                Ok(PortAllocation {
                    port: NbdPort(u16::try_from(port).map_err(|_| DbError::Corrupt {
                        column: "nbd_port_allocations.port",
                        value: port.to_string(),
                    })?),
                    backup_id: BackupId(col(r, "backup_id")?),
                    disk_key: DiskKey(col(r, "disk_key")?),
                    allocated_at: from_us(col(r, "allocated_at")?),
                })
            })
            .collect::<Result<Vec<_>, DbError>>()?;
        Ok(PortsView {
            range: [self.range.first, self.range.last],
            allocations,
            squatted: self.squatted_map().values().cloned().collect(),
        })
    }
}

/// Binds and closes a listener on `ip:port`; the error text says why it could not.
fn bind_test(ip: IpAddr, port: u16) -> Result<(), String> {
    TcpListener::bind(SocketAddr::new(ip, port))
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_parses_and_displays() {
        let r: PortRange = "10100-10200".parse().unwrap();
        assert_eq!(
            r,
            PortRange {
                first: 10100,
                last: 10200
            }
        );
        assert_eq!(r.len(), 101);
        assert_eq!(r.to_string(), "10100-10200");
        assert!(r.contains(10100) && r.contains(10200) && !r.contains(10201));
        assert_eq!(" 5 - 5 ".parse::<PortRange>().unwrap().len(), 1);
    }

    #[test]
    fn bad_ranges_say_why() {
        for (input, why) in [
            ("10200-10100", "above"),
            ("10100", "no '-'"),
            ("a-10", "first port"),
            ("10-70000", "last port"),
            ("0-10", "port 0"),
        ] {
            let e = input.parse::<PortRange>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(input), "{input}: {e}");
        }
    }

    #[test]
    fn exhausted_message_names_range_and_counts() {
        let e = PortError::Exhausted {
            range: PortRange {
                first: 10100,
                last: 10102,
            },
            requested: 4,
            in_use: 2,
            squatted: vec![10101],
        };
        let m = e.to_string();
        assert!(m.contains("10100-10102"), "{m}");
        assert!(m.contains("4 disks"), "{m}");
        assert!(m.contains("2 held"), "{m}");
        assert!(m.contains("1 squatted") && m.contains("(10101)"), "{m}");
    }
}
