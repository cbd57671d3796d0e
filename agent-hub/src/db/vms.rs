//! VMs: `vm_replication_contexts` (one per hub VM name; see [`Db::upsert_vm_of_node`] for two
//! nodes' VMs of one name) and `vm_disks` (one per disk, each with its
//! own key and unit number).

use super::{DbError, col, from_db_u64, from_us, is_unique_violation, q, to_db_u64, with_retry};
use crate::db::Db;
use sendense_shared::api::{Vm, VmDisk, VmRequest};
use sendense_shared::ids::{BackupId, DiskKey};
use sendense_shared::names::validate_name;
use sqlx::any::AnyRow;
use std::collections::{BTreeSet, HashMap};

/// What a node's inventory says about a VM beyond its disks. A VM registered by hand
/// (`POST /api/v1/vms`) keeps whatever the last inventory said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmSource {
    /// `"qemu"`, `"vsphere"`.
    pub driver: Option<String>,
    /// The hypervisor tracks changed blocks (vSphere CBT).
    pub change_tracking: Option<bool>,
}

/// Longest stored `vm_disks.controller` and `vm_replication_contexts.driver` (their VARCHAR).
const CONTROLLER_MAX: usize = 255;
const DRIVER_MAX: usize = 32;
/// A datastore path is short; this only keeps nonsense out of the database.
const BACKING_FILE_MAX: usize = 4096;

/// 0/1 flags of the schema (see migrations) as the API's booleans.
fn opt_flag(r: &AnyRow, name: &'static str) -> Result<Option<bool>, DbError> {
    col::<Option<i32>>(r, name)?
        .map(|v| match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DbError::Corrupt {
                column: name,
                value: v.to_string(),
            }),
        })
        .transpose()
}

/// A short free text the hub stores and shows: bounded, one line.
fn check_text(field: &'static str, v: &str, max: usize) -> Result<(), DbError> {
    if v.len() > max {
        return Err(DbError::Invalid {
            field,
            reason: format!("{} bytes is longer than {max}", v.len()),
        });
    }
    if v.chars().any(char::is_control) {
        return Err(DbError::Invalid {
            field,
            reason: format!("{v:?} contains a control character"),
        });
    }
    Ok(())
}

fn check_source(source: &VmSource) -> Result<(), DbError> {
    if let Some(d) = &source.driver {
        check_text("driver", d, DRIVER_MAX)?;
    }
    Ok(())
}

fn disk_row(r: &AnyRow) -> Result<(String, VmDisk), DbError> {
    Ok((
        col(r, "vm_context_id")?,
        VmDisk {
            disk_key: DiskKey(col(r, "disk_key")?),
            unit_number: col(r, "unit_number")?,
            size_bytes: from_db_u64("vm_disks.size_bytes", col(r, "size_bytes")?)?,
            label: col(r, "label")?,
            controller: col(r, "controller")?,
            backing_file: col(r, "backing_file")?,
            thin_provisioned: opt_flag(r, "thin_provisioned")?,
        },
    ))
}

fn validate_vm(req: &VmRequest) -> Result<(), DbError> {
    validate_name("vm_name", &req.vm_name)?;
    if let Some(node) = &req.node {
        validate_name("node", node)?;
    }
    if req.disks.is_empty() {
        return Err(DbError::Invalid {
            field: "disks",
            reason: format!("VM '{}' has no disks", req.vm_name),
        });
    }
    let mut seen = BTreeSet::new();
    for d in &req.disks {
        if !seen.insert(d.disk_key) {
            return Err(DbError::Invalid {
                field: "disks[].disk_key",
                reason: format!("disk key {} appears twice", d.disk_key),
            });
        }
        if d.unit_number < 0 {
            return Err(DbError::Invalid {
                field: "disks[].unit_number",
                reason: format!(
                    "disk {} has negative unit number {}",
                    d.disk_key, d.unit_number
                ),
            });
        }
        if d.label.contains('\0') {
            return Err(DbError::Invalid {
                field: "disks[].label",
                reason: format!("label of disk {} contains a NUL byte", d.disk_key),
            });
        }
        to_db_u64("disks[].size_bytes", d.size_bytes)?;
        if let Some(c) = &d.controller {
            check_text("disks[].controller", c, CONTROLLER_MAX)?;
        }
        if let Some(b) = &d.backing_file {
            check_text("disks[].backing_file", b, BACKING_FILE_MAX)?;
        }
    }
    Ok(())
}

/// The context id and node of the VM named `vm`, read inside the registration's transaction.
async fn vm_owner(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    vm: &str,
) -> Result<Option<(String, Option<String>)>, DbError> {
    let r =
        sqlx::query("SELECT vm_context_id, node FROM vm_replication_contexts WHERE vm_name = ?")
            .bind(vm)
            .fetch_optional(&mut **tx)
            .await
            .map_err(q("registering a VM"))?;
    match r {
        Some(r) => Ok(Some((col(&r, "vm_context_id")?, col(&r, "node")?))),
        None => Ok(None),
    }
}

impl Db {
    /// Registers a VM or brings its record in line with `req`: node updated, new disks added,
    /// changed sizes/units/labels updated, vanished disks removed. Returns the VM as stored.
    /// The admin's registration: may also move a VM to another node.
    pub async fn upsert_vm(&self, req: &VmRequest) -> Result<Vm, DbError> {
        self.upsert_vm_from(req, None, false).await
    }

    /// [`Db::upsert_vm`] on behalf of the node `req.node`, with the name the node knows the VM
    /// by: a VM of that name that belongs to another node is never taken over; this node's is
    /// registered as `<name>.<node>` (and found again under it). Only when that name too
    /// belongs to another node is it [`DbError::Owned`]. One registered without a node is
    /// claimed.
    pub async fn upsert_vm_of_node(&self, req: &VmRequest) -> Result<Vm, DbError> {
        self.upsert_vm_from(req, None, true).await
    }

    /// [`Db::upsert_vm_of_node`] for a VM of a node's inventory: also records what the
    /// inventory says of its driver and change tracking (replacing what was stored, unknown
    /// included).
    pub async fn upsert_inventory_vm(
        &self,
        req: &VmRequest,
        source: &VmSource,
    ) -> Result<Vm, DbError> {
        check_source(source)?;
        self.upsert_vm_from(req, Some(source), true).await
    }

    async fn upsert_vm_from(
        &self,
        req: &VmRequest,
        source: Option<&VmSource>,
        keep_owner: bool,
    ) -> Result<Vm, DbError> {
        validate_vm(req)?;
        let mut attempt = 0;
        let hub_name = loop {
            match with_retry(|| self.upsert_vm_once(req, source, keep_owner)).await {
                // A concurrent first registration of the same name committed between our read
                // and our insert: the next attempt sees it and updates instead.
                Err(DbError::Conflict { .. }) if attempt < 3 => attempt += 1,
                other => break other?,
            }
        };
        self.get_vm(&hub_name).await
    }

    /// The hub name of the VM that node `node` knows as `name`: the one it registered under a
    /// qualified name (`<name>.<node>`, another node's VM holding `name`), else `name` itself.
    pub async fn hub_vm_name(&self, node: &str, name: &str) -> Result<String, DbError> {
        let doing = "reading a VM";
        let qualified: Option<String> = sqlx::query_scalar(
            "SELECT vm_name FROM vm_replication_contexts WHERE node = ? AND node_vm_name = ?",
        )
        .bind(node)
        .bind(name)
        .fetch_optional(self.pool())
        .await
        .map_err(q(doing))?;
        Ok(qualified.unwrap_or_else(|| name.to_string()))
    }

    async fn upsert_vm_once(
        &self,
        req: &VmRequest,
        source: Option<&VmSource>,
        keep_owner: bool,
    ) -> Result<String, DbError> {
        let doing = "registering a VM";
        let mut tx = self.begin_write(doing).await?;
        let now = self.now_us();
        // Read and checked inside the write transaction: two nodes reporting the same name at
        // once cannot both take it.
        let mut hub_name = req.vm_name.clone();
        let mut node_vm_name: Option<&str> = None;
        let mut existing = vm_owner(&mut tx, &hub_name).await?;
        if keep_owner && let Some(node) = req.node.as_deref() {
            // Two nodes with a VM of one name get two VMs, never a takeover: the first keeps
            // the name, the second's is `<name>.<node>` on the hub (and remembers its own name).
            let qualified: Option<String> = sqlx::query_scalar(
                "SELECT vm_name FROM vm_replication_contexts WHERE node = ? AND node_vm_name = ?",
            )
            .bind(node)
            .bind(&req.vm_name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(q(doing))?;
            let taken = matches!(&existing, Some((_, Some(owner))) if owner != node);
            if let Some(name) =
                qualified.or_else(|| taken.then(|| format!("{}.{node}", req.vm_name)))
            {
                validate_name("vm_name", &name).map_err(|e| DbError::Invalid {
                    field: "vm_name",
                    reason: format!(
                        "another node's VM holds the name {:?} and the hub name for node \
                         {node:?}'s ({name:?}) is not a valid name: {e}",
                        req.vm_name
                    ),
                })?;
                existing = vm_owner(&mut tx, &name).await?;
                hub_name = name;
                node_vm_name = Some(&req.vm_name);
            }
            if let Some((_, Some(owner))) = &existing
                && owner != node
            {
                return Err(DbError::Owned {
                    vm: hub_name,
                    owner: owner.clone(),
                    claimant: node.to_string(),
                });
            }
        }
        let ctx = match existing.map(|(c, _)| c) {
            Some(ctx) => {
                sqlx::query(
                    "UPDATE vm_replication_contexts SET node = ?, updated_at = ?, \
                     driver = CASE WHEN ? = 1 THEN ? ELSE driver END, \
                     change_tracking = CASE WHEN ? = 1 THEN ? ELSE change_tracking END \
                     WHERE vm_context_id = ?",
                )
                .bind(req.node.as_deref())
                .bind(now)
                .bind(i32::from(source.is_some()))
                .bind(source.and_then(|s| s.driver.as_deref()))
                .bind(i32::from(source.is_some()))
                .bind(source.and_then(|s| s.change_tracking).map(i32::from))
                .bind(&ctx)
                .execute(&mut *tx)
                .await
                .map_err(q(doing))?;
                ctx
            }
            None => {
                let ctx = format!("ctx-{}", uuid::Uuid::new_v4());
                sqlx::query(
                    "INSERT INTO vm_replication_contexts \
                     (vm_context_id, vm_name, node, created_at, updated_at, driver, \
                     change_tracking, node_vm_name) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(&ctx)
                .bind(&hub_name)
                .bind(req.node.as_deref())
                .bind(now)
                .bind(now)
                .bind(source.and_then(|s| s.driver.as_deref()))
                .bind(source.and_then(|s| s.change_tracking).map(i32::from))
                .bind(node_vm_name)
                .execute(&mut *tx)
                .await
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        // Another registration of the same name won the race; the caller
                        // retries and finds it.
                        DbError::Conflict {
                            what: format!("VM '{hub_name}'"),
                        }
                    } else {
                        q(doing)(e)
                    }
                })?;
                ctx
            }
        };
        let have: Vec<i64> =
            sqlx::query_scalar("SELECT disk_key FROM vm_disks WHERE vm_context_id = ?")
                .bind(&ctx)
                .fetch_all(&mut *tx)
                .await
                .map_err(q(doing))?;
        let have: BTreeSet<i64> = have.into_iter().collect();
        for d in &req.disks {
            let size = to_db_u64("disks[].size_bytes", d.size_bytes)?;
            if have.contains(&d.disk_key.0) {
                sqlx::query(
                    "UPDATE vm_disks SET unit_number = ?, size_bytes = ?, label = ?, \
                     controller = ?, backing_file = ?, thin_provisioned = ? \
                     WHERE vm_context_id = ? AND disk_key = ?",
                )
                .bind(d.unit_number)
                .bind(size)
                .bind(&d.label)
                .bind(d.controller.as_deref())
                .bind(d.backing_file.as_deref())
                .bind(d.thin_provisioned.map(i32::from))
                .bind(&ctx)
                .bind(d.disk_key.0)
                .execute(&mut *tx)
                .await
                .map_err(q(doing))?;
            } else {
                sqlx::query(
                    "INSERT INTO vm_disks (vm_context_id, disk_key, unit_number, size_bytes, label, \
                     controller, backing_file, thin_provisioned) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(&ctx)
                .bind(d.disk_key.0)
                .bind(d.unit_number)
                .bind(size)
                .bind(&d.label)
                .bind(d.controller.as_deref())
                .bind(d.backing_file.as_deref())
                .bind(d.thin_provisioned.map(i32::from))
                .execute(&mut *tx)
                .await
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        // A concurrent registration added this disk first: retried.
                        DbError::Conflict {
                            what: format!("disk {} of VM '{}'", d.disk_key, req.vm_name),
                        }
                    } else {
                        q(doing)(e)
                    }
                })?;
            }
        }
        let wanted: BTreeSet<i64> = req.disks.iter().map(|d| d.disk_key.0).collect();
        for gone in have.difference(&wanted) {
            sqlx::query("DELETE FROM vm_disks WHERE vm_context_id = ? AND disk_key = ?")
                .bind(&ctx)
                .bind(*gone)
                .execute(&mut *tx)
                .await
                .map_err(q(doing))?;
        }
        tx.commit().await.map_err(q(doing))?;
        Ok(hub_name)
    }

    /// One VM with its disks (ordered by disk key) and its last completed backup.
    pub async fn get_vm(&self, vm_name: &str) -> Result<Vm, DbError> {
        let doing = "reading a VM";
        let row = sqlx::query(
            "SELECT vm_context_id, vm_name, node, driver, change_tracking, node_vm_name \
             FROM vm_replication_contexts WHERE vm_name = ?",
        )
        .bind(vm_name)
        .fetch_optional(self.pool())
        .await
        .map_err(q(doing))?
        .ok_or_else(|| DbError::NotFound {
            what: format!("VM '{vm_name}'"),
        })?;
        let ctx: String = col(&row, "vm_context_id")?;
        let disks = sqlx::query(
            "SELECT vm_context_id, disk_key, unit_number, size_bytes, label, controller, \
             backing_file, thin_provisioned FROM vm_disks \
             WHERE vm_context_id = ? ORDER BY disk_key",
        )
        .bind(&ctx)
        .fetch_all(self.pool())
        .await
        .map_err(q(doing))?
        .iter()
        .map(|r| disk_row(r).map(|(_, d)| d))
        .collect::<Result<Vec<_>, _>>()?;
        let last = sqlx::query(
            "SELECT backup_id, completed_at FROM backup_jobs \
             WHERE vm_context_id = ? AND status = 'completed' \
             ORDER BY completed_at DESC, created_at DESC LIMIT 1",
        )
        .bind(&ctx)
        .fetch_optional(self.pool())
        .await
        .map_err(q(doing))?;
        let (last_backup_id, last_backup_at) = match last {
            Some(r) => (
                Some(BackupId(col(&r, "backup_id")?)),
                col::<Option<i64>>(&r, "completed_at")?.map(from_us),
            ),
            None => (None, None),
        };
        Ok(Vm {
            vm_context_id: ctx,
            vm_name: col(&row, "vm_name")?,
            node: col(&row, "node")?,
            disks,
            last_backup_id,
            last_backup_at,
            driver: col(&row, "driver")?,
            change_tracking: opt_flag(&row, "change_tracking")?,
            node_vm_name: col(&row, "node_vm_name")?,
        })
    }

    /// Every VM, ordered by name.
    pub async fn list_vms(&self) -> Result<Vec<Vm>, DbError> {
        let doing = "listing VMs";
        let rows = sqlx::query(
            "SELECT vm_context_id, vm_name, node, driver, change_tracking, node_vm_name \
             FROM vm_replication_contexts ORDER BY vm_name",
        )
        .fetch_all(self.pool())
        .await
        .map_err(q(doing))?;
        let mut disks: HashMap<String, Vec<VmDisk>> = HashMap::new();
        for r in sqlx::query(
            "SELECT vm_context_id, disk_key, unit_number, size_bytes, label, controller, \
             backing_file, thin_provisioned FROM vm_disks \
             ORDER BY vm_context_id, disk_key",
        )
        .fetch_all(self.pool())
        .await
        .map_err(q(doing))?
        {
            let (ctx, d) = disk_row(&r)?;
            disks.entry(ctx).or_default().push(d);
        }
        // Ascending, so the last one seen per context is the newest.
        let mut last: HashMap<String, (BackupId, Option<i64>)> = HashMap::new();
        for r in sqlx::query(
            "SELECT vm_context_id, backup_id, completed_at FROM backup_jobs \
             WHERE status = 'completed' ORDER BY completed_at, created_at",
        )
        .fetch_all(self.pool())
        .await
        .map_err(q(doing))?
        {
            last.insert(
                col(&r, "vm_context_id")?,
                (BackupId(col(&r, "backup_id")?), col(&r, "completed_at")?),
            );
        }
        rows.iter()
            .map(|r| {
                let ctx: String = col(r, "vm_context_id")?;
                let (last_backup_id, last_backup_at) = match last.remove(&ctx) {
                    Some((id, at)) => (Some(id), at.map(from_us)),
                    None => (None, None),
                };
                Ok(Vm {
                    disks: disks.remove(&ctx).unwrap_or_default(),
                    vm_context_id: ctx,
                    vm_name: col(r, "vm_name")?,
                    node: col(r, "node")?,
                    last_backup_id,
                    last_backup_at,
                    driver: col(r, "driver")?,
                    change_tracking: opt_flag(r, "change_tracking")?,
                    node_vm_name: col(r, "node_vm_name")?,
                })
            })
            .collect()
    }
}
