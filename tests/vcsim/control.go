package main

// The tests' control endpoint (plain HTTP on 127.0.0.1): what a vSphere admin would see in the
// vSphere client, and the few things an admin (or a fault) does to a VM behind a backup's back.
//
//	GET  /vms/<name>            the snapshot tree and every disk's current file + change id
//	POST /vms/<name>/reset-cbt  new tracking ids: older change ids fault from now on
//	POST /vms/<name>/destroy    power off and delete the VM (and its files)
//	POST /vms/<name>/disk-mode?key=K&mode=M  set disk K's backing.diskMode (independent_persistent, ...)

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type controller struct {
	client     *govmomi.Client
	dsDir      string
	datacenter string
}

type diskView struct {
	Key           int32  `json:"key"`
	FileName      string `json:"file_name"`
	PathOnDisk    string `json:"path_on_disk"`
	ChangeID      string `json:"change_id"`
	CapacityBytes int64  `json:"capacity_bytes"`
}

type snapshotView struct {
	Moref       string         `json:"moref"`
	Name        string         `json:"name"`
	Description string         `json:"description"`
	Disks       []diskView     `json:"disks"`
	Children    []snapshotView `json:"children"`
}

type vmView struct {
	Name          string         `json:"name"`
	Moref         string         `json:"moref"`
	PowerState    string         `json:"power_state"`
	CbtEnabled    bool           `json:"cbt_enabled"`
	SnapshotCount int            `json:"snapshot_count"`
	Snapshots     []snapshotView `json:"snapshots"`
	Disks         []diskView     `json:"disks"`
}

func (c *controller) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	if len(parts) < 2 || parts[0] != "vms" {
		http.Error(rw, "unknown path "+r.URL.Path, http.StatusNotFound)
		return
	}
	vm := findVM(parts[1])
	if vm == nil {
		http.Error(rw, "no VM named "+parts[1], http.StatusNotFound)
		return
	}
	switch {
	case len(parts) == 2 && r.Method == http.MethodGet:
		var view vmView
		simulator.Map.WithLock(vm, func() { view = vm.view() })
		rw.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(rw).Encode(view)
	case len(parts) == 3 && parts[2] == "reset-cbt" && r.Method == http.MethodPost:
		var err error
		simulator.Map.WithLock(vm, func() { err = vm.resetTracking() })
		if err != nil {
			http.Error(rw, err.Error(), http.StatusConflict)
			return
		}
		rw.WriteHeader(http.StatusNoContent)
	case len(parts) == 3 && parts[2] == "disk-mode" && r.Method == http.MethodPost:
		key, mode := r.URL.Query().Get("key"), r.URL.Query().Get("mode")
		var err error
		simulator.Map.WithLock(vm, func() { err = vm.setDiskMode(key, mode) })
		if err != nil {
			http.Error(rw, err.Error(), http.StatusBadRequest)
			return
		}
		rw.WriteHeader(http.StatusNoContent)
	case len(parts) == 3 && parts[2] == "destroy" && r.Method == http.MethodPost:
		if err := c.destroy(r.Context(), vm.Self); err != nil {
			http.Error(rw, err.Error(), http.StatusInternalServerError)
			return
		}
		rw.WriteHeader(http.StatusNoContent)
	default:
		http.Error(rw, r.Method+" "+r.URL.Path+" is not supported", http.StatusMethodNotAllowed)
	}
}

func findVM(name string) *backupVM {
	for _, e := range simulator.Map.All("VirtualMachine") {
		if vm, ok := e.(*backupVM); ok && vm.Name == name {
			return vm
		}
	}
	return nil
}

// view is the VM as the tests check it. The caller holds the VM's lock.
func (w *backupVM) view() vmView {
	stateMu.Lock()
	defer stateMu.Unlock()
	v := vmView{
		Name:       w.Name,
		Moref:      w.Self.Value,
		PowerState: string(w.Runtime.PowerState),
		CbtEnabled: w.changeTracking(),
		Disks:      w.diskViews(w.Config.Hardware.Device),
	}
	if w.Snapshot != nil {
		v.Snapshots = w.snapshotViews(w.Snapshot.RootSnapshotList)
	}
	v.SnapshotCount = len(w.snaps)
	return v
}

func (w *backupVM) diskViews(devices []types.BaseVirtualDevice) []diskView {
	var out []diskView
	for _, d := range devices {
		disk, ok := d.(*types.VirtualDisk)
		if !ok || diskBacking(disk) == nil {
			continue
		}
		b := diskBacking(disk)
		out = append(out, diskView{
			Key:           disk.Key,
			FileName:      b.FileName,
			PathOnDisk:    w.flatPath(b.FileName),
			ChangeID:      b.ChangeId,
			CapacityBytes: diskCapacity(disk),
		})
	}
	return out
}

func (w *backupVM) snapshotViews(tree []types.VirtualMachineSnapshotTree) []snapshotView {
	out := []snapshotView{}
	for _, t := range tree {
		sv := snapshotView{
			Moref:       t.Snapshot.Value,
			Name:        t.Name,
			Description: t.Description,
			Children:    w.snapshotViews(t.ChildSnapshotList),
		}
		if s := w.snaps[t.Snapshot]; s != nil {
			sv.Disks = w.diskViews(s.Config.Hardware.Device)
		}
		out = append(out, sv)
	}
	return out
}

func (c *controller) destroy(ctx context.Context, ref types.ManagedObjectReference) error {
	vm := object.NewVirtualMachine(c.client.Client, ref)
	state, err := vm.PowerState(ctx)
	if err != nil {
		return fmt.Errorf("power state: %v", err)
	}
	if state == types.VirtualMachinePowerStatePoweredOn {
		task, err := vm.PowerOff(ctx)
		if err == nil {
			err = task.Wait(ctx)
		}
		if err != nil {
			return fmt.Errorf("power off: %v", err)
		}
	}
	task, err := vm.Destroy(ctx)
	if err == nil {
		err = task.Wait(ctx)
	}
	if err != nil {
		return fmt.Errorf("destroy: %v", err)
	}
	return nil
}

func powerOn(ctx context.Context, c *govmomi.Client, ref types.ManagedObjectReference) error {
	task, err := object.NewVirtualMachine(c.Client, ref).PowerOn(ctx)
	if err == nil {
		err = task.Wait(ctx)
	}
	if err != nil {
		return fmt.Errorf("power on: %v", err)
	}
	return nil
}

// setDiskMode changes a disk's mode in place, as an admin would in the VM's settings (the
// simulator's ReconfigVM would want the whole device). The caller holds the VM's lock.
func (w *backupVM) setDiskMode(key, mode string) error {
	switch types.VirtualDiskMode(mode) {
	case types.VirtualDiskModePersistent, types.VirtualDiskModeIndependent_persistent,
		types.VirtualDiskModeIndependent_nonpersistent, types.VirtualDiskModeNonpersistent:
	default:
		return fmt.Errorf("mode %q is not a disk mode", mode)
	}
	for _, d := range w.disks() {
		if b := diskBacking(d); b != nil && fmt.Sprint(d.Key) == key {
			b.DiskMode = mode
			return nil
		}
	}
	return fmt.Errorf("VM %s has no disk with key %q", w.Name, key)
}
