//! VMs and their disks and snapshots: the public types, the VM properties read, and the
//! inventory calls (every VM, one by name, one by reference, a snapshot's disks) with their
//! datacenter and datastore names resolved.

use std::collections::HashMap;

use crate::collector::{Props, objects_spec, view_spec};
use crate::{Client, MoRef, VsphereError, inventory, soap};

/// One virtual disk of a VM or snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Device key: 2000, 2001, ...
    pub key: i32,
    /// "Hard disk 1"
    pub label: String,
    pub controller_key: i32,
    /// "SCSI controller 0"
    pub controller_label: String,
    pub unit_number: i32,
    pub capacity_bytes: u64,
    /// `"[LocalDS_0] vm1/vm1.vmdk"`
    pub file_name: String,
    /// Datastore name, e.g. "LocalDS_0".
    pub datastore: String,
    pub thin: Option<bool>,
    /// backing.changeId when CBT is on.
    pub change_id: Option<String>,
    /// backing.diskMode: "persistent", "independent_persistent", "independent_nonpersistent", ...
    pub mode: Option<String>,
    /// Set for a raw device mapping (`VirtualDiskRawDiskMappingVer1BackingInfo`): its
    /// compatibilityMode ("physicalMode", "virtualMode"; "" when not given).
    pub raw_mapping: Option<String>,
}

impl DiskInfo {
    /// Why a VM snapshot does not freeze this disk (so a backup of it would not be
    /// consistent), or `None` when it does.
    pub fn not_frozen_by_snapshots(&self) -> Option<String> {
        if let Some(compat) = &self.raw_mapping {
            return Some(match compat.as_str() {
                "physicalMode" => "a raw device mapping in physical compatibility mode: VM snapshots leave it out, the guest writes straight to the LUN".to_string(),
                c => format!(
                    "a raw device mapping ({}): its data lives on a LUN, not in a datastore file a snapshot freezes for this node to read",
                    if c.is_empty() { "compatibility mode not given" } else { c }
                ),
            });
        }
        match self.mode.as_deref() {
            Some(m @ ("independent_persistent" | "independent_nonpersistent")) => Some(format!(
                "in disk mode {m}: VM snapshots leave independent disks out, the guest keeps writing to it"
            )),
            _ => None,
        }
    }
}

/// One snapshot of a VM's snapshot tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub moref: MoRef,
    pub name: String,
    pub description: String,
}

/// A VM with what a backup needs to know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub moref: MoRef,
    pub name: String,
    /// config.instanceUuid, else config.uuid.
    pub uuid: String,
    /// Datacenter name (for dcPath=).
    pub datacenter: String,
    /// "poweredOn", ...
    pub power_state: String,
    /// config.changeTrackingEnabled
    pub cbt_enabled: bool,
    /// Sorted by key.
    pub disks: Vec<DiskInfo>,
    /// The whole tree, flattened, parents before children.
    pub snapshots: Vec<SnapshotInfo>,
}

/// What is read of a VM.
const VM_PROPERTIES: &[&str] = &[
    "name",
    "config.instanceUuid",
    "config.uuid",
    "config.changeTrackingEnabled",
    "config.hardware.device",
    "runtime.powerState",
    "snapshot",
];

/// A VM's properties before its datastores are resolved.
pub(crate) struct RawVm {
    pub(crate) moref: MoRef,
    pub(crate) name: String,
    pub(crate) uuid: String,
    pub(crate) power_state: String,
    pub(crate) cbt_enabled: bool,
    pub(crate) disks: Vec<inventory::RawDisk>,
    pub(crate) snapshots: Vec<SnapshotInfo>,
}

pub(crate) fn raw_vm(
    method: &str,
    moref: MoRef,
    props: &Props<'_, '_>,
) -> Result<RawVm, VsphereError> {
    let disks = match props.get("config.hardware.device") {
        Some(devices) => inventory::disks(method, devices)?,
        None => Vec::new(),
    };
    Ok(RawVm {
        name: props.text("name").unwrap_or_default(),
        uuid: props
            .text("config.instanceUuid")
            .filter(|u| !u.is_empty())
            .or_else(|| props.text("config.uuid"))
            .unwrap_or_default(),
        power_state: props.text("runtime.powerState").unwrap_or_default(),
        cbt_enabled: props
            .text("config.changeTrackingEnabled")
            .and_then(|b| inventory::parse_bool(&b))
            .unwrap_or(false),
        snapshots: props
            .get("snapshot")
            .map(inventory::snapshots)
            .unwrap_or_default(),
        disks,
        moref,
    })
}

impl Client {
    /// Every VM of every datacenter.
    pub async fn list_vms(&self) -> Result<Vec<VmInfo>, VsphereError> {
        let mut vms = Vec::new();
        for (datacenter, name) in self.datacenters().await? {
            let view = self.create_view(&datacenter, "VirtualMachine").await?;
            let listed = self
                .retrieve(
                    &view_spec(&view, "VirtualMachine", VM_PROPERTIES),
                    |obj, props| raw_vm("RetrievePropertiesEx", obj, props),
                )
                .await;
            // The view is session state on the server: destroy it whatever the listing did.
            let destroyed = self.destroy_view(&view).await;
            let listed = listed?;
            destroyed?;
            vms.extend(self.finish_vms(listed, &name).await?);
        }
        Ok(vms)
    }

    /// One VM by name; Ok(None) when there is none. Only the names of the inventory are
    /// retrieved, then the properties of the one VM (a backup asks several times; listing every
    /// VM's devices and datastores each time was the cost of the whole inventory).
    pub async fn find_vm(&self, name: &str) -> Result<Option<VmInfo>, VsphereError> {
        for (datacenter, datacenter_name) in self.datacenters().await? {
            let view = self.create_view(&datacenter, "VirtualMachine").await?;
            let named = self
                .retrieve(
                    &view_spec(&view, "VirtualMachine", &["name"]),
                    |obj, props| Ok((obj, props.text("name").unwrap_or_default())),
                )
                .await;
            // The view is session state on the server: destroy it whatever the listing did.
            let destroyed = self.destroy_view(&view).await;
            let named = named?;
            destroyed?;
            if let Some((vm, _)) = named.into_iter().find(|(_, n)| n == name) {
                return match self.vm_in(&vm, Some(&datacenter_name)).await {
                    // Deleted between the two calls.
                    Err(e) if e.fault() == Some("ManagedObjectNotFound") => Ok(None),
                    found => found.map(Some),
                };
            }
        }
        Ok(None)
    }

    /// One VM by reference (ManagedObjectNotFound fault when it is gone).
    pub async fn vm(&self, vm: &MoRef) -> Result<VmInfo, VsphereError> {
        self.vm_in(vm, None).await
    }

    /// One VM by reference, in the datacenter named `datacenter` (looked up when not known).
    async fn vm_in(&self, vm: &MoRef, datacenter: Option<&str>) -> Result<VmInfo, VsphereError> {
        let raw = self
            .retrieve(
                &objects_spec("VirtualMachine", &[vm], VM_PROPERTIES),
                |obj, props| raw_vm("RetrievePropertiesEx", obj, props),
            )
            .await?;
        let datacenter = match datacenter {
            Some(name) => name.to_string(),
            None => self.datacenter_of(vm).await?,
        };
        self.finish_vms(raw, &datacenter)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| VsphereError::Fault {
                method: "RetrievePropertiesEx".to_string(),
                fault: "ManagedObjectNotFound".to_string(),
                message: format!("{vm} is not in the inventory"),
            })
    }

    /// The disks as the snapshot froze them (snapshot's config.hardware.device).
    pub async fn snapshot_disks(&self, snapshot: &MoRef) -> Result<Vec<DiskInfo>, VsphereError> {
        let method = "RetrievePropertiesEx";
        let raw = self
            .retrieve(
                &objects_spec(
                    "VirtualMachineSnapshot",
                    &[snapshot],
                    &["config.hardware.device"],
                ),
                |_, props| match props.get("config.hardware.device") {
                    Some(devices) => inventory::disks(method, devices),
                    None => Ok(Vec::new()),
                },
            )
            .await?
            .into_iter()
            .flatten()
            .collect::<Vec<_>>();
        let names = self
            .datastore_names(raw.iter().filter_map(|d| d.datastore_ref.clone()).collect())
            .await?;
        Ok(inventory::resolve_datastores(raw, &names))
    }

    /// Every datacenter, with its name.
    async fn datacenters(&self) -> Result<Vec<(MoRef, String)>, VsphereError> {
        let root = self.inner.content.root_folder.clone();
        let view = self.create_view(&root, "Datacenter").await?;
        let listed = self
            .retrieve(&view_spec(&view, "Datacenter", &["name"]), |obj, props| {
                Ok((obj, props.text("name").unwrap_or_default()))
            })
            .await;
        let destroyed = self.destroy_view(&view).await;
        let listed = listed?;
        destroyed?;
        Ok(listed)
    }

    /// The name of the datacenter `entity` lives in, by walking up `parent` (VMs in a vApp have
    /// `parentVApp` instead).
    async fn datacenter_of(&self, entity: &MoRef) -> Result<String, VsphereError> {
        let mut current = entity.clone();
        // Inventory trees are shallow; the bound only guards against a server answering in a loop.
        for _ in 0..64 {
            let parents = self
                .retrieve(
                    &objects_spec(&current.kind, &[&current], &["name", "parent"]),
                    |_, props| {
                        let parent = props.get("parent").and_then(soap::moref);
                        Ok((props.text("name").unwrap_or_default(), parent))
                    },
                )
                .await?;
            let (name, parent) = parents.into_iter().next().unwrap_or_default();
            if current.kind == "Datacenter" {
                return Ok(name);
            }
            current = match parent {
                Some(parent) => parent,
                None if current.kind == "VirtualMachine" => {
                    let vapp = self
                        .retrieve(
                            &objects_spec("VirtualMachine", &[&current], &["parentVApp"]),
                            |_, props| Ok(props.get("parentVApp").and_then(soap::moref)),
                        )
                        .await?;
                    vapp.into_iter()
                        .flatten()
                        .next()
                        .ok_or_else(|| no_datacenter(entity))?
                }
                None => return Err(no_datacenter(entity)),
            };
        }
        Err(no_datacenter(entity))
    }

    /// Names of the given datastores.
    /// (A Vec, not an iterator of references: a borrowing closure held across the await would
    /// make the future not Send.)
    async fn datastore_names(
        &self,
        mut datastores: Vec<MoRef>,
    ) -> Result<HashMap<MoRef, String>, VsphereError> {
        datastores.sort_by(|a, b| a.value.cmp(&b.value));
        datastores.dedup();
        let unique: Vec<&MoRef> = datastores.iter().collect();
        if unique.is_empty() {
            return Ok(HashMap::new());
        }
        let names = self
            .retrieve(
                &objects_spec("Datastore", &unique, &["name"]),
                |obj, props| Ok((obj, props.text("name").unwrap_or_default())),
            )
            .await?;
        Ok(names.into_iter().filter(|(_, n)| !n.is_empty()).collect())
    }

    async fn finish_vms(
        &self,
        raw: Vec<RawVm>,
        datacenter: &str,
    ) -> Result<Vec<VmInfo>, VsphereError> {
        let names = self
            .datastore_names(
                raw.iter()
                    .flat_map(|vm| vm.disks.iter().filter_map(|d| d.datastore_ref.clone()))
                    .collect(),
            )
            .await?;
        Ok(raw
            .into_iter()
            .map(|vm| VmInfo {
                disks: inventory::resolve_datastores(vm.disks, &names),
                moref: vm.moref,
                name: vm.name,
                uuid: vm.uuid,
                datacenter: datacenter.to_string(),
                power_state: vm.power_state,
                cbt_enabled: vm.cbt_enabled,
                snapshots: vm.snapshots,
            })
            .collect())
    }
}

fn no_datacenter(entity: &MoRef) -> VsphereError {
    VsphereError::Protocol {
        method: "RetrievePropertiesEx".to_string(),
        detail: format!("no datacenter above {entity}"),
    }
}
