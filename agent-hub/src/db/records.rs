//! Small tables: repositories, nodes, the job event log, qemu-nbd processes.

use super::{DbError, DbKind, col, from_us, is_foreign_key_violation, is_unique_violation, q};
use crate::db::Db;
use chrono::{DateTime, Utc};
use sendense_shared::api::{JobEvent, Node, NodeRegistration, ProcessInfo, TunnelState};
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};
use sendense_shared::names::validate_name;
use sqlx::any::AnyRow;

/// A row of `repositories`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryRow {
    pub id: String,
    pub path: String,
    pub created_at: DateTime<Utc>,
    /// Scheduled verification: every this many seconds (`None`: on demand only).
    pub verify_interval_secs: Option<u64>,
    /// When the last scheduled verify job of the repository ended.
    pub last_verified_at: Option<DateTime<Utc>>,
}

fn repository_row(r: &AnyRow) -> Result<RepositoryRow, DbError> {
    let interval: Option<i64> = col(r, "verify_interval_secs")?;
    Ok(RepositoryRow {
        id: col(r, "id")?,
        path: col(r, "path")?,
        created_at: from_us(col(r, "created_at")?),
        verify_interval_secs: interval
            .map(|v| super::from_db_u64("repositories.verify_interval_secs", v))
            .transpose()?,
        last_verified_at: col::<Option<i64>>(r, "last_verified_at")?.map(from_us),
    })
}

fn node_row(r: &AnyRow) -> Result<Node, DbError> {
    let tunnel_json: Option<String> = col(r, "tunnel_json")?;
    let tunnel = match tunnel_json {
        Some(j) => Some(
            serde_json::from_str::<TunnelState>(&j).map_err(|_| DbError::Corrupt {
                column: "nodes.tunnel_json",
                value: j,
            })?,
        ),
        None => None,
    };
    Ok(Node {
        name: col(r, "name")?,
        api_url: col(r, "api_url")?,
        version: col(r, "version")?,
        last_seen_at: col::<Option<i64>>(r, "last_seen_at")?.map(from_us),
        tunnel,
    })
}

fn event_row(r: &AnyRow) -> Result<JobEvent, DbError> {
    Ok(JobEvent {
        seq: col(r, "seq")?,
        backup_id: BackupId(col(r, "backup_id")?),
        at: from_us(col(r, "at")?),
        level: col(r, "level")?,
        step: col(r, "step")?,
        message: col(r, "message")?,
        disk_key: col::<Option<i64>>(r, "disk_key")?.map(DiskKey),
        job_id: col(r, "job_id")?,
    })
}

fn process_row(r: &AnyRow) -> Result<ProcessInfo, DbError> {
    let pid: i64 = col(r, "pid")?;
    let port: i64 = col(r, "port")?;
    Ok(ProcessInfo {
        pid: u32::try_from(pid).map_err(|_| DbError::Corrupt {
            column: "qemu_nbd_processes.pid",
            value: pid.to_string(),
        })?,
        port: NbdPort(u16::try_from(port).map_err(|_| DbError::Corrupt {
            column: "qemu_nbd_processes.port",
            value: port.to_string(),
        })?),
        export_name: col(r, "export_name")?,
        qcow2_path: col(r, "qcow2_path")?,
        backup_id: BackupId(col(r, "backup_id")?),
        disk_key: DiskKey(col(r, "disk_key")?),
        alive: col::<i64>(r, "alive")? != 0,
        started_at: from_us(col(r, "started_at")?),
    })
}

/// One recorded qemu-nbd with what [`ProcessInfo`] leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRecord {
    pub info: ProcessInfo,
    pub command_line: String,
    pub stopped_at: Option<DateTime<Utc>>,
    pub exit_status: Option<String>,
}

impl Db {
    // ---- repositories -------------------------------------------------------------------

    /// Registers a repository. `Conflict` if the id is taken.
    pub async fn insert_repository(&self, id: &str, path: &str) -> Result<(), DbError> {
        validate_name("repository id", id)?;
        if path.is_empty() || path.contains('\0') {
            return Err(DbError::Invalid {
                field: "path",
                reason: "must be a non-empty directory path without NUL bytes".into(),
            });
        }
        sqlx::query("INSERT INTO repositories (id, path, created_at) VALUES (?, ?, ?)")
            .bind(id)
            .bind(path)
            .bind(self.now_us())
            .execute(self.pool())
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    DbError::Conflict {
                        what: format!("repository '{id}'"),
                    }
                } else {
                    q("inserting a repository")(e)
                }
            })?;
        Ok(())
    }

    pub async fn list_repositories(&self) -> Result<Vec<RepositoryRow>, DbError> {
        sqlx::query(
            "SELECT id, path, created_at, verify_interval_secs, last_verified_at FROM repositories \
             ORDER BY id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(q("listing repositories"))?
        .iter()
        .map(repository_row)
        .collect()
    }

    pub async fn get_repository(&self, id: &str) -> Result<RepositoryRow, DbError> {
        let row = sqlx::query(
            "SELECT id, path, created_at, verify_interval_secs, last_verified_at FROM repositories \
             WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(q("reading a repository"))?
        .ok_or_else(|| DbError::NotFound {
            what: format!("repository '{id}'"),
        })?;
        repository_row(&row)
    }

    // ---- nodes --------------------------------------------------------------------------

    /// Registers a node or refreshes its URL and version; sets `last_seen_at` to now.
    pub async fn upsert_node(&self, reg: &NodeRegistration) -> Result<(), DbError> {
        validate_name("node name", &reg.name)?;
        let now = self.now_us();
        let sql = match self.kind() {
            DbKind::Sqlite => {
                "INSERT INTO nodes (name, api_url, version, registered_at, last_seen_at) \
                 VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT (name) DO UPDATE SET api_url = excluded.api_url, \
                 version = excluded.version, last_seen_at = excluded.last_seen_at"
            }
            DbKind::Mysql => {
                "INSERT INTO nodes (name, api_url, version, registered_at, last_seen_at) \
                 VALUES (?, ?, ?, ?, ?) \
                 ON DUPLICATE KEY UPDATE api_url = VALUES(api_url), \
                 version = VALUES(version), last_seen_at = VALUES(last_seen_at)"
            }
        };
        sqlx::query(sql)
            .bind(&reg.name)
            .bind(&reg.api_url)
            .bind(&reg.version)
            .bind(now)
            .bind(now)
            .execute(self.pool())
            .await
            .map_err(q("registering a node"))?;
        Ok(())
    }

    pub async fn list_nodes(&self) -> Result<Vec<Node>, DbError> {
        sqlx::query(
            "SELECT name, api_url, version, last_seen_at, tunnel_json FROM nodes ORDER BY name",
        )
        .fetch_all(self.pool())
        .await
        .map_err(q("listing nodes"))?
        .iter()
        .map(node_row)
        .collect()
    }

    pub async fn get_node(&self, name: &str) -> Result<Node, DbError> {
        let row = sqlx::query(
            "SELECT name, api_url, version, last_seen_at, tunnel_json FROM nodes WHERE name = ?",
        )
        .bind(name)
        .fetch_optional(self.pool())
        .await
        .map_err(q("reading a node"))?
        .ok_or_else(|| DbError::NotFound {
            what: format!("node '{name}'"),
        })?;
        node_row(&row)
    }

    /// Stores the node's latest tunnel state (and counts as a sign of life).
    pub async fn set_node_tunnel(&self, name: &str, t: &TunnelState) -> Result<(), DbError> {
        let json = serde_json::to_string(t).map_err(|e| DbError::Invalid {
            field: "tunnel",
            reason: e.to_string(),
        })?;
        let res = sqlx::query("UPDATE nodes SET tunnel_json = ?, last_seen_at = ? WHERE name = ?")
            .bind(json)
            .bind(self.now_us())
            .bind(name)
            .execute(self.pool())
            .await
            .map_err(q("storing a node's tunnel state"))?;
        if res.rows_affected() == 0 {
            return Err(DbError::NotFound {
                what: format!("node '{name}'"),
            });
        }
        Ok(())
    }

    // ---- job events ---------------------------------------------------------------------

    /// Appends to a backup's own event log; the returned event carries its `seq`.
    pub async fn append_event(
        &self,
        id: &BackupId,
        level: &str,
        step: &str,
        message: &str,
        disk: Option<DiskKey>,
    ) -> Result<JobEvent, DbError> {
        self.append_job_event(id, None, level, step, message, disk)
            .await
    }

    /// Appends to the event log of backup `id`, as an event of job `job_id` when that is another
    /// job about the backup (a restore of it).
    pub async fn append_job_event(
        &self,
        id: &BackupId,
        job_id: Option<&str>,
        level: &str,
        step: &str,
        message: &str,
        disk: Option<DiskKey>,
    ) -> Result<JobEvent, DbError> {
        self.append_job_event_at(id, job_id, self.now_us(), level, step, message, disk)
            .await
    }

    /// [`Db::append_job_event`] with the time the event happened (`at`, microseconds since the
    /// epoch): an event kept while the database was unreachable keeps its own time.
    #[allow(clippy::too_many_arguments)]
    pub async fn append_job_event_at(
        &self,
        id: &BackupId,
        job_id: Option<&str>,
        at: i64,
        level: &str,
        step: &str,
        message: &str,
        disk: Option<DiskKey>,
    ) -> Result<JobEvent, DbError> {
        let disk_key = disk.map(|d| d.0);
        let not_found = |e: sqlx::Error| {
            if is_foreign_key_violation(&e) {
                DbError::NotFound {
                    what: format!("backup '{id}'"),
                }
            } else {
                q("appending a job event")(e)
            }
        };
        let seq: i64 = match self.kind() {
            // The Any driver reports no last_insert_id for SQLite; RETURNING is exact there.
            DbKind::Sqlite => {
                let row = sqlx::query(
                    "INSERT INTO job_events (backup_id, job_id, at, level, step, message, disk_key) \
                     VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                )
                .bind(&id.0)
                .bind(job_id)
                .bind(at)
                .bind(level)
                .bind(step)
                .bind(message)
                .bind(disk_key)
                .fetch_one(self.pool())
                .await
                .map_err(not_found)?;
                col(&row, "seq")?
            }
            // MySQL has no INSERT ... RETURNING (MariaDB has); the OK packet carries the id.
            DbKind::Mysql => {
                let res = sqlx::query(
                    "INSERT INTO job_events (backup_id, job_id, at, level, step, message, disk_key) \
                     VALUES (?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(&id.0)
                .bind(job_id)
                .bind(at)
                .bind(level)
                .bind(step)
                .bind(message)
                .bind(disk_key)
                .execute(self.pool())
                .await
                .map_err(not_found)?;
                res.last_insert_id().ok_or(DbError::Corrupt {
                    column: "job_events.seq",
                    value: "no generated key returned".into(),
                })?
            }
        };
        Ok(JobEvent {
            seq,
            backup_id: id.clone(),
            at: from_us(at),
            level: level.to_string(),
            step: step.to_string(),
            message: message.to_string(),
            disk_key: disk,
            job_id: job_id.map(str::to_string),
        })
    }

    /// A job's event log, oldest first (by `seq`).
    pub async fn list_events(&self, id: &BackupId) -> Result<Vec<JobEvent>, DbError> {
        sqlx::query(
            "SELECT seq, backup_id, job_id, at, level, step, message, disk_key FROM job_events \
             WHERE backup_id = ? ORDER BY seq",
        )
        .bind(&id.0)
        .fetch_all(self.pool())
        .await
        .map_err(q("listing job events"))?
        .iter()
        .map(event_row)
        .collect()
    }

    /// The event log of job `job_id` (a restore), oldest first.
    pub async fn list_job_events(&self, job_id: &str) -> Result<Vec<JobEvent>, DbError> {
        sqlx::query(
            "SELECT seq, backup_id, job_id, at, level, step, message, disk_key FROM job_events \
             WHERE job_id = ? ORDER BY seq",
        )
        .bind(job_id)
        .fetch_all(self.pool())
        .await
        .map_err(q("listing a job's events"))?
        .iter()
        .map(event_row)
        .collect()
    }

    /// Events of every job with `seq` greater than `after`, oldest first, at most `limit`.
    /// On MySQL two events appended at the same instant by different connections may commit in
    /// the other order than their `seq`; a poller that must not miss one should re-read a short
    /// window behind its last `seq` (SQLite serialises writers, so there it cannot happen).
    pub async fn events_since(&self, after: i64, limit: u32) -> Result<Vec<JobEvent>, DbError> {
        sqlx::query(
            "SELECT seq, backup_id, job_id, at, level, step, message, disk_key FROM job_events \
             WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(q("listing recent job events"))?
        .iter()
        .map(event_row)
        .collect()
    }

    // ---- qemu-nbd processes -------------------------------------------------------------

    /// Records a started qemu-nbd (alive) with the command line it was started with.
    pub async fn record_process(&self, p: &ProcessInfo, command_line: &str) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO qemu_nbd_processes (pid, port, export_name, qcow2_path, backup_id, \
             disk_key, alive, started_at, command_line) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(i64::from(p.pid))
        .bind(i32::from(p.port.0))
        .bind(&p.export_name)
        .bind(&p.qcow2_path)
        .bind(&p.backup_id.0)
        .bind(p.disk_key.0)
        .bind(i32::from(p.alive))
        .bind(p.started_at.timestamp_micros())
        .bind(command_line)
        .execute(self.pool())
        .await
        .map_err(q("recording a qemu-nbd process"))?;
        Ok(())
    }

    /// Marks the live record of `pid` on `port` as stopped with its exit description
    /// (e.g. `"exit status 0"`, `"killed by SIGKILL"`). Already stopped: no change.
    pub async fn mark_process_stopped(
        &self,
        pid: u32,
        port: NbdPort,
        exit: &str,
    ) -> Result<(), DbError> {
        let res = sqlx::query(
            "UPDATE qemu_nbd_processes SET alive = 0, stopped_at = ?, exit_status = ? \
             WHERE pid = ? AND port = ? AND alive = 1",
        )
        .bind(self.now_us())
        .bind(exit)
        .bind(i64::from(pid))
        .bind(i32::from(port.0))
        .execute(self.pool())
        .await
        .map_err(q("marking a qemu-nbd process stopped"))?;
        if res.rows_affected() == 0 {
            let known: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM qemu_nbd_processes WHERE pid = ? AND port = ?",
            )
            .bind(i64::from(pid))
            .bind(i32::from(port.0))
            .fetch_one(self.pool())
            .await
            .map_err(q("looking up a qemu-nbd process"))?;
            if known == 0 {
                return Err(DbError::NotFound {
                    what: format!("qemu-nbd process {pid} on port {port}"),
                });
            }
        }
        Ok(())
    }

    /// Every recorded qemu-nbd, newest first, `alive` as recorded.
    pub async fn list_processes(&self) -> Result<Vec<ProcessInfo>, DbError> {
        sqlx::query(
            "SELECT pid, port, export_name, qcow2_path, backup_id, disk_key, alive, started_at \
             FROM qemu_nbd_processes ORDER BY id DESC",
        )
        .fetch_all(self.pool())
        .await
        .map_err(q("listing qemu-nbd processes"))?
        .iter()
        .map(process_row)
        .collect()
    }

    /// qemu-nbd processes recorded alive (the reconciler checks each against /proc).
    pub async fn live_processes(&self) -> Result<Vec<ProcessInfo>, DbError> {
        sqlx::query(
            "SELECT pid, port, export_name, qcow2_path, backup_id, disk_key, alive, started_at \
             FROM qemu_nbd_processes WHERE alive = 1 ORDER BY id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(q("listing live qemu-nbd processes"))?
        .iter()
        .map(process_row)
        .collect()
    }

    /// Full records (command line, stop time, exit) of one backup's qemu-nbd processes.
    pub async fn process_records(&self, id: &BackupId) -> Result<Vec<ProcessRecord>, DbError> {
        let rows = sqlx::query(
            "SELECT pid, port, export_name, qcow2_path, backup_id, disk_key, alive, started_at, \
             stopped_at, exit_status, command_line FROM qemu_nbd_processes \
             WHERE backup_id = ? ORDER BY id",
        )
        .bind(&id.0)
        .fetch_all(self.pool())
        .await
        .map_err(q("listing a backup's qemu-nbd processes"))?;
        rows.iter()
            .map(|r| {
                Ok(ProcessRecord {
                    info: process_row(r)?,
                    command_line: col(r, "command_line")?,
                    stopped_at: col::<Option<i64>>(r, "stopped_at")?.map(from_us),
                    exit_status: col(r, "exit_status")?,
                })
            })
            .collect()
    }
}
