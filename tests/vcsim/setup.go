package main

import (
	"context"
	"fmt"
	"os"
	"path"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const datastoreName = "LocalDS_0"

type inventory struct {
	datacenter string
	datastore  string
	vm         readyVM
}

// setupInventory mounts -dir as the local datastore of the datacenter's host and creates the
// test VM (powered on) with one SCSI controller (key 1000) and disks keyed 2000, 2001, ... on
// units 0, 1, ..., each flat file at its full size (sparse), then wraps the VM so that snapshots
// and changed block tracking behave like vSphere's (vm.go).
func setupInventory(ctx context.Context, c *govmomi.Client, dsDir, vmName string, sizes []int64) (*inventory, error) {
	finder := find.NewFinder(c.Client, false)
	dc, err := finder.DefaultDatacenter(ctx)
	if err != nil {
		return nil, fmt.Errorf("datacenter: %v", err)
	}
	finder.SetDatacenter(dc)
	host, err := finder.DefaultHostSystem(ctx)
	if err != nil {
		return nil, fmt.Errorf("host: %v", err)
	}
	dss, err := host.ConfigManager().DatastoreSystem(ctx)
	if err != nil {
		return nil, fmt.Errorf("datastore system: %v", err)
	}
	ds, err := dss.CreateLocalDatastore(ctx, datastoreName, dsDir)
	if err != nil {
		return nil, fmt.Errorf("create datastore on %s: %v", dsDir, err)
	}
	pool, err := host.ResourcePool(ctx)
	if err != nil {
		return nil, fmt.Errorf("resource pool: %v", err)
	}
	folders, err := dc.Folders(ctx)
	if err != nil {
		return nil, fmt.Errorf("folders: %v", err)
	}

	dsRef := ds.Reference()
	scsi := &types.ParaVirtualSCSIController{
		VirtualSCSIController: types.VirtualSCSIController{
			SharedBus:          types.VirtualSCSISharingNoSharing,
			ScsiCtlrUnitNumber: 7,
			VirtualController: types.VirtualController{
				BusNumber: 0,
				VirtualDevice: types.VirtualDevice{
					Key:        1000,
					DeviceInfo: &types.Description{Label: "SCSI controller 0", Summary: "VMware paravirtual SCSI"},
				},
			},
		},
	}
	changes := []types.BaseVirtualDeviceConfigSpec{&types.VirtualDeviceConfigSpec{
		Operation: types.VirtualDeviceConfigSpecOperationAdd,
		Device:    scsi,
	}}
	for i, size := range sizes {
		name := vmName + ".vmdk"
		if i > 0 {
			name = fmt.Sprintf("%s_%d.vmdk", vmName, i)
		}
		unit := int32(i)
		if unit >= 7 {
			unit++ // 7 is the controller's own unit
		}
		disk := &types.VirtualDisk{
			VirtualDevice: types.VirtualDevice{
				Key:           int32(2000 + i),
				ControllerKey: 1000,
				UnitNumber:    &unit,
				DeviceInfo: &types.Description{
					Label:   fmt.Sprintf("Hard disk %d", i+1),
					Summary: fmt.Sprintf("%d KB", size/1024),
				},
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					DiskMode:        string(types.VirtualDiskModePersistent),
					ThinProvisioned: types.NewBool(true),
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{
						FileName:  fmt.Sprintf("[%s] %s", datastoreName, path.Join(vmName, name)),
						Datastore: &dsRef,
					},
				},
			},
			CapacityInKB:    size / 1024,
			CapacityInBytes: size,
		}
		changes = append(changes, &types.VirtualDeviceConfigSpec{
			Operation:     types.VirtualDeviceConfigSpecOperationAdd,
			FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate,
			Device:        disk,
		})
	}
	spec := types.VirtualMachineConfigSpec{
		Name:         vmName,
		GuestId:      string(types.VirtualMachineGuestOsIdentifierOtherGuest64),
		NumCPUs:      1,
		MemoryMB:     128,
		Files:        &types.VirtualMachineFileInfo{VmPathName: "[" + datastoreName + "]"},
		DeviceChange: changes,
	}
	task, err := folders.VmFolder.CreateVM(ctx, spec, pool, host)
	if err != nil {
		return nil, fmt.Errorf("create VM: %v", err)
	}
	info, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("create VM: %v", err)
	}
	ref := info.Result.(types.ManagedObjectReference)

	plain, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return nil, fmt.Errorf("VM %s is not in the simulator's registry", ref)
	}
	vm := wrapVM(plain, dsDir)
	if err := vm.initDisks(); err != nil {
		return nil, err
	}

	inv := &inventory{datacenter: dc.Name(), datastore: datastoreName}
	inv.vm = readyVM{Name: vmName, Moref: ref.Value, Uuid: vm.Config.InstanceUuid}
	for _, d := range vm.disks() {
		b := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		inv.vm.Disks = append(inv.vm.Disks, readyDisk{
			Key:           d.Key,
			Label:         d.DeviceInfo.GetDescription().Label,
			UnitNumber:    *d.UnitNumber,
			CapacityBytes: d.CapacityInBytes,
			FileName:      b.FileName,
			PathOnDisk:    vm.flatPath(b.FileName),
		})
	}

	// Real VMs being backed up are running.
	if err := powerOn(ctx, c, ref); err != nil {
		return nil, err
	}
	if _, err := os.Stat(inv.vm.Disks[0].PathOnDisk); err != nil {
		return nil, fmt.Errorf("disk file: %v", err)
	}
	return inv, nil
}
