package main

// The test VM, wrapped (govmomi's example_extend_test.go pattern) so that its disks behave like
// vSphere's where the plain simulator only keeps the snapshot tree:
//
//   - CreateSnapshot_Task freezes each disk's current file (the snapshot's config keeps pointing
//     at it) and moves the VM onto a new file "<disk>-00000N.vmdk" that starts as a copy
//     (reflink, else sparse) and takes later writes.
//   - RemoveSnapshot_Task / RemoveAllSnapshots_Task consolidate: the newer file's data replaces
//     the frozen one (a rename, as every file is a full copy), references move to it, the newer
//     file is deleted.
//   - With changeTrackingEnabled each disk backing carries changeId "<uuid>/<seq>"; every
//     snapshot starts a new seq and records the 64 KiB block hashes of the frozen data.
//     QueryChangedDiskAreas is NOT implemented by govmomi 0.24's simulator: this launcher answers
//     it for the tests by comparing those block hashes.
//
// The wrappers embed the simulator's structs by value: its property collector digs through the
// first field of a wrapper to the mo type, which a pointer would break. The simulator's own
// snapshot code type-asserts *simulator.VirtualMachine, so every snapshot method the tests use is
// implemented here instead.

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const blockSize = 64 << 10

type blockHash [sha256.Size]byte

var zeroBlockHash = sha256.Sum256(make([]byte, blockSize))

// stateMu guards the launcher's own fields of every backupVM and backupSnapshot. Lock order:
// the simulator's object lock of the VM first, then stateMu.
var stateMu sync.Mutex

type diskState struct {
	// Datastore file names ("[ds] vm1/vm1.vmdk"), oldest first; the last one is the running file.
	chain []string
	// Delta files created so far, so a name is never reused.
	deltas int
	// Empty while change tracking is off.
	cbtUUID string
	seq     int
	// The block hashes of the disk at each seq of cbtUUID.
	content map[int][]blockHash
}

type backupVM struct {
	simulator.VirtualMachine
	dsDir   string
	state   map[int32]*diskState
	snaps   map[types.ManagedObjectReference]*backupSnapshot
	snapSeq int32
}

type backupSnapshot struct {
	simulator.VirtualMachineSnapshot
	// The block hashes of each disk (by key) when the snapshot was taken; nil when change
	// tracking was off then.
	content map[int32][]blockHash
}

func wrapVM(plain *simulator.VirtualMachine, dsDir string) *backupVM {
	w := &backupVM{
		VirtualMachine: *plain,
		dsDir:          dsDir,
		state:          map[int32]*diskState{},
		snaps:          map[types.ManagedObjectReference]*backupSnapshot{},
	}
	simulator.Map.Put(w)
	return w
}

func (w *backupVM) disks() []*types.VirtualDisk {
	var out []*types.VirtualDisk
	for _, d := range w.Config.Hardware.Device {
		if disk, ok := d.(*types.VirtualDisk); ok {
			out = append(out, disk)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

func diskBacking(d *types.VirtualDisk) *types.VirtualDiskFlatVer2BackingInfo {
	b, _ := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	return b
}

func diskCapacity(d *types.VirtualDisk) int64 {
	if d.CapacityInBytes > 0 {
		return d.CapacityInBytes
	}
	return d.CapacityInKB * 1024
}

// relPath turns "[ds] vm1/vm1.vmdk" into "vm1/vm1.vmdk".
func relPath(fileName string) string {
	if i := strings.Index(fileName, "]"); i >= 0 {
		return strings.TrimSpace(fileName[i+1:])
	}
	return fileName
}

// flatPath is the data file on disk of a datastore disk name.
func (w *backupVM) flatPath(fileName string) string {
	rel := relPath(fileName)
	if !strings.HasSuffix(rel, "-flat.vmdk") {
		rel = strings.TrimSuffix(rel, ".vmdk") + "-flat.vmdk"
	}
	return filepath.Join(w.dsDir, filepath.FromSlash(rel))
}

func (w *backupVM) descriptorPath(fileName string) string {
	return filepath.Join(w.dsDir, filepath.FromSlash(relPath(fileName)))
}

func (w *backupVM) changeTracking() bool {
	return w.Config.ChangeTrackingEnabled != nil && *w.Config.ChangeTrackingEnabled
}

// initDisks brings the launcher's state in line with the VM's disks: new disks get a chain and
// a flat file of their full size; change tracking gets ids where it is on, loses them where off.
// The caller holds the VM's lock (or the VM is not yet served).
func (w *backupVM) initDisks() error {
	stateMu.Lock()
	defer stateMu.Unlock()
	seen := map[int32]bool{}
	for _, d := range w.disks() {
		b := diskBacking(d)
		if b == nil {
			continue
		}
		seen[d.Key] = true
		st := w.state[d.Key]
		if st == nil {
			st = &diskState{chain: []string{b.FileName}}
			w.state[d.Key] = st
			p := w.flatPath(b.FileName)
			fi, err := os.Stat(p)
			if err != nil {
				return fmt.Errorf("disk %d: %v", d.Key, err)
			}
			if fi.Size() < diskCapacity(d) {
				if err := os.Truncate(p, diskCapacity(d)); err != nil {
					return fmt.Errorf("disk %d: %v", d.Key, err)
				}
			}
		}
		if w.changeTracking() && st.cbtUUID == "" {
			if err := w.restartTracking(d, st); err != nil {
				return err
			}
		} else if !w.changeTracking() {
			st.cbtUUID, st.seq, st.content = "", 0, nil
			b.ChangeId = ""
		}
	}
	for key := range w.state {
		if !seen[key] {
			delete(w.state, key)
		}
	}
	return nil
}

// restartTracking gives a disk a new tracking uuid at seq 0, recording its current content.
func (w *backupVM) restartTracking(d *types.VirtualDisk, st *diskState) error {
	b := diskBacking(d)
	hashes, err := hashFile(w.flatPath(b.FileName), diskCapacity(d))
	if err != nil {
		return fmt.Errorf("disk %d: %v", d.Key, err)
	}
	st.cbtUUID = uuid.New().String()
	st.seq = 0
	st.content = map[int][]blockHash{0: hashes}
	b.ChangeId = st.cbtUUID + "/0"
	return nil
}

func (w *backupVM) ReconfigVMTask(ctx *simulator.Context, req *types.ReconfigVM_Task) soap.HasFault {
	res := w.VirtualMachine.ReconfigVMTask(ctx, req)
	if err := w.initDisks(); err != nil {
		// The reconfiguration itself happened; the launcher's bookkeeping failing is a test bug.
		fmt.Fprintf(os.Stderr, "vcsim-launcher: after ReconfigVM: %v\n", err)
	}
	return res
}

func (w *backupVM) CreateSnapshotTask(req *types.CreateSnapshot_Task) soap.HasFault {
	task := simulator.CreateTask(w, "createSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return w.createSnapshot(req)
	})
	return &methods.CreateSnapshot_TaskBody{
		Res: &types.CreateSnapshot_TaskResponse{Returnval: task.Run()},
	}
}

func (w *backupVM) createSnapshot(req *types.CreateSnapshot_Task) (types.AnyType, types.BaseMethodFault) {
	stateMu.Lock()
	defer stateMu.Unlock()

	snap := &backupSnapshot{content: map[int32][]blockHash{}}
	snap.Self.Type = "VirtualMachineSnapshot"
	snap.Vm = w.Self
	cfg := *w.Config
	cfg.Hardware.Device = nil
	frozen := map[int32]*types.VirtualDisk{}
	for _, d := range w.Config.Hardware.Device {
		if disk, ok := d.(*types.VirtualDisk); ok && diskBacking(disk) != nil {
			c := *disk
			b := *diskBacking(disk)
			c.Backing = &b
			frozen[disk.Key] = &c
			cfg.Hardware.Device = append(cfg.Hardware.Device, &c)
			continue
		}
		cfg.Hardware.Device = append(cfg.Hardware.Device, d)
	}
	snap.Config = cfg

	// Move every disk onto a new running file first; undo all of it if one fails.
	type move struct {
		disk      *types.VirtualDisk
		st        *diskState
		name      string
		oldParent *types.VirtualDiskFlatVer2BackingInfo
	}
	var moves []move
	undo := func() {
		for _, m := range moves {
			b := diskBacking(m.disk)
			_ = os.Remove(w.flatPath(m.name))
			_ = os.Remove(w.descriptorPath(m.name))
			m.st.chain = m.st.chain[:len(m.st.chain)-1]
			b.FileName = m.st.chain[len(m.st.chain)-1]
			b.Parent = m.oldParent
		}
	}
	for _, d := range w.disks() {
		b := diskBacking(d)
		st := w.state[d.Key]
		if b == nil || st == nil {
			continue
		}
		from := b.FileName
		st.deltas++
		base := strings.TrimSuffix(st.chain[0], ".vmdk")
		name := fmt.Sprintf("%s-%06d.vmdk", base, st.deltas)
		if err := copyDisk(w.flatPath(from), w.flatPath(name)); err != nil {
			undo()
			return nil, &types.FileFault{File: name}
		}
		if f, err := os.Create(w.descriptorPath(name)); err == nil {
			_ = f.Close()
		}
		parent := *diskBacking(frozen[d.Key])
		moves = append(moves, move{disk: d, st: st, name: name, oldParent: b.Parent})
		st.chain = append(st.chain, name)
		b.FileName = name
		b.Parent = &parent
	}

	if w.changeTracking() {
		for _, m := range moves {
			fd := frozen[m.disk.Key]
			hashes, err := hashFile(w.flatPath(diskBacking(fd).FileName), diskCapacity(fd))
			if err != nil {
				undo()
				return nil, &types.FileFault{File: diskBacking(fd).FileName}
			}
			if m.st.cbtUUID == "" {
				continue
			}
			m.st.seq++
			m.st.content[m.st.seq] = hashes
			id := m.st.cbtUUID + "/" + strconv.Itoa(m.st.seq)
			diskBacking(fd).ChangeId = id
			diskBacking(m.disk).ChangeId = id
			snap.content[m.disk.Key] = hashes
		}
	}

	simulator.Map.Put(snap)
	w.snaps[snap.Self] = snap
	w.snapSeq++
	item := types.VirtualMachineSnapshotTree{
		Snapshot:        snap.Self,
		Vm:              w.Self,
		Name:            req.Name,
		Description:     req.Description,
		Id:              w.snapSeq,
		CreateTime:      time.Now(),
		State:           w.Runtime.PowerState,
		Quiesced:        req.Quiesce,
		ReplaySupported: types.NewBool(false),
	}
	if w.Snapshot == nil {
		w.Snapshot = &types.VirtualMachineSnapshotInfo{}
	}
	var changes []types.PropertyChange
	if cur := w.Snapshot.CurrentSnapshot; cur != nil {
		if parent := w.snaps[*cur]; parent != nil {
			parent.ChildSnapshot = append(parent.ChildSnapshot, snap.Self)
		}
		if node := findInTree(w.Snapshot.RootSnapshotList, *cur); node != nil {
			node.ChildSnapshotList = append(node.ChildSnapshotList, item)
		}
		changes = append(changes, types.PropertyChange{Name: "snapshot.rootSnapshotList", Val: w.Snapshot.RootSnapshotList})
	} else {
		changes = append(changes, types.PropertyChange{
			Name: "snapshot.rootSnapshotList",
			Val:  append(w.Snapshot.RootSnapshotList, item),
		})
	}
	changes = append(changes,
		types.PropertyChange{Name: "snapshot.currentSnapshot", Val: snap.Self},
		types.PropertyChange{Name: "rootSnapshot", Val: rootRefs(w.Snapshot.RootSnapshotList, item, w.Snapshot.CurrentSnapshot == nil)},
	)
	simulator.Map.Update(w, changes)
	return snap.Self, nil
}

func rootRefs(roots []types.VirtualMachineSnapshotTree, added types.VirtualMachineSnapshotTree, isRoot bool) []types.ManagedObjectReference {
	var out []types.ManagedObjectReference
	for _, r := range roots {
		out = append(out, r.Snapshot)
	}
	if isRoot {
		out = append(out, added.Snapshot)
	}
	return out
}

func findInTree(tree []types.VirtualMachineSnapshotTree, ref types.ManagedObjectReference) *types.VirtualMachineSnapshotTree {
	for i := range tree {
		if tree[i].Snapshot == ref {
			return &tree[i]
		}
		if n := findInTree(tree[i].ChildSnapshotList, ref); n != nil {
			return n
		}
	}
	return nil
}

func findParentInTree(tree []types.VirtualMachineSnapshotTree, ref types.ManagedObjectReference) *types.ManagedObjectReference {
	for i := range tree {
		for _, c := range tree[i].ChildSnapshotList {
			if c.Snapshot == ref {
				p := tree[i].Snapshot
				return &p
			}
		}
		if p := findParentInTree(tree[i].ChildSnapshotList, ref); p != nil {
			return p
		}
	}
	return nil
}

// removeFromTree drops ref, lifting its children to its place.
func removeFromTree(tree []types.VirtualMachineSnapshotTree, ref types.ManagedObjectReference) []types.VirtualMachineSnapshotTree {
	var out []types.VirtualMachineSnapshotTree
	for _, n := range tree {
		if n.Snapshot == ref {
			out = append(out, n.ChildSnapshotList...)
			continue
		}
		n.ChildSnapshotList = removeFromTree(n.ChildSnapshotList, ref)
		out = append(out, n)
	}
	return out
}

// descendants lists the snapshots under ref, deepest first.
func descendants(tree []types.VirtualMachineSnapshotTree, ref types.ManagedObjectReference) []types.ManagedObjectReference {
	n := findInTree(tree, ref)
	if n == nil {
		return nil
	}
	var out []types.ManagedObjectReference
	var walk func([]types.VirtualMachineSnapshotTree)
	walk = func(ts []types.VirtualMachineSnapshotTree) {
		for _, t := range ts {
			walk(t.ChildSnapshotList)
			out = append(out, t.Snapshot)
		}
	}
	walk(n.ChildSnapshotList)
	return out
}

func (s *backupSnapshot) RemoveSnapshotTask(req *types.RemoveSnapshot_Task) soap.HasFault {
	task := simulator.CreateTask(s, "removeSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		w, ok := simulator.Map.Get(s.Vm).(*backupVM)
		if !ok {
			return nil, &types.ManagedObjectNotFound{Obj: s.Vm}
		}
		var fault types.BaseMethodFault
		simulator.Map.WithLock(w, func() {
			stateMu.Lock()
			defer stateMu.Unlock()
			if w.snaps[s.Self] == nil {
				fault = &types.ManagedObjectNotFound{Obj: s.Self}
				return
			}
			if req.RemoveChildren {
				for _, child := range descendants(w.Snapshot.RootSnapshotList, s.Self) {
					if fault = w.removeOne(w.snaps[child]); fault != nil {
						return
					}
				}
			}
			fault = w.removeOne(s)
		})
		return nil, fault
	})
	return &methods.RemoveSnapshot_TaskBody{
		Res: &types.RemoveSnapshot_TaskResponse{Returnval: task.Run()},
	}
}

func (s *backupSnapshot) RevertToSnapshotTask(req *types.RevertToSnapshot_Task) soap.HasFault {
	task := simulator.CreateTask(s, "revertToSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, &types.NotSupported{}
	})
	return &methods.RevertToSnapshot_TaskBody{
		Res: &types.RevertToSnapshot_TaskResponse{Returnval: task.Run()},
	}
}

func (w *backupVM) RemoveAllSnapshotsTask(req *types.RemoveAllSnapshots_Task) soap.HasFault {
	task := simulator.CreateTask(w, "removeAllSnapshots", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		stateMu.Lock()
		defer stateMu.Unlock()
		if w.Snapshot == nil {
			return nil, nil
		}
		var all []types.ManagedObjectReference
		for _, root := range w.Snapshot.RootSnapshotList {
			all = append(all, descendants(w.Snapshot.RootSnapshotList, root.Snapshot)...)
			all = append(all, root.Snapshot)
		}
		for _, ref := range all {
			if s := w.snaps[ref]; s != nil {
				if fault := w.removeOne(s); fault != nil {
					return nil, fault
				}
			}
		}
		return nil, nil
	})
	return &methods.RemoveAllSnapshots_TaskBody{
		Res: &types.RemoveAllSnapshots_TaskResponse{Returnval: task.Run()},
	}
}

func (w *backupVM) RevertToCurrentSnapshotTask(req *types.RevertToCurrentSnapshot_Task) soap.HasFault {
	task := simulator.CreateTask(w, "revertToCurrentSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, &types.NotSupported{}
	})
	return &methods.RevertToCurrentSnapshot_TaskBody{
		Res: &types.RevertToCurrentSnapshot_TaskResponse{Returnval: task.Run()},
	}
}

// removeOne consolidates and forgets one snapshot. The caller holds the VM's lock and stateMu.
func (w *backupVM) removeOne(s *backupSnapshot) types.BaseMethodFault {
	for _, d := range s.Config.Hardware.Device {
		disk, ok := d.(*types.VirtualDisk)
		if !ok || diskBacking(disk) == nil {
			continue
		}
		st := w.state[disk.Key]
		if st == nil {
			continue
		}
		frozen := diskBacking(disk).FileName
		idx := -1
		for i, f := range st.chain {
			if f == frozen {
				idx = i
			}
		}
		if idx < 0 || idx == len(st.chain)-1 {
			return &types.FileFault{File: frozen}
		}
		newer := st.chain[idx+1]
		if err := os.Rename(w.flatPath(newer), w.flatPath(frozen)); err != nil {
			return &types.FileFault{File: newer}
		}
		_ = os.Remove(w.descriptorPath(newer))
		st.chain = append(st.chain[:idx+1], st.chain[idx+2:]...)
		w.renameRefs(disk.Key, newer, frozen, st)
	}

	var changes []types.PropertyChange
	if cur := w.Snapshot.CurrentSnapshot; cur != nil && *cur == s.Self {
		changes = append(changes, types.PropertyChange{
			Name: "snapshot.currentSnapshot",
			Val:  findParentInTree(w.Snapshot.RootSnapshotList, s.Self),
		})
	}
	if p := findParentInTree(w.Snapshot.RootSnapshotList, s.Self); p != nil {
		if parent := w.snaps[*p]; parent != nil {
			var kept []types.ManagedObjectReference
			for _, c := range parent.ChildSnapshot {
				if c != s.Self {
					kept = append(kept, c)
				}
			}
			parent.ChildSnapshot = append(kept, s.ChildSnapshot...)
		}
	}
	roots := removeFromTree(w.Snapshot.RootSnapshotList, s.Self)
	changes = append(changes,
		types.PropertyChange{Name: "snapshot.rootSnapshotList", Val: roots},
		types.PropertyChange{Name: "rootSnapshot", Val: rootRefs(roots, types.VirtualMachineSnapshotTree{}, false)},
	)
	if len(roots) == 0 {
		changes = []types.PropertyChange{{Name: "snapshot", Val: nil}, {Name: "rootSnapshot", Val: nil}}
	}
	simulator.Map.Update(w, changes)
	delete(w.snaps, s.Self)
	simulator.Map.Remove(s.Self)
	return nil
}

// renameRefs points the running disk and every snapshot that used file `from` at `to`.
func (w *backupVM) renameRefs(key int32, from, to string, st *diskState) {
	fix := func(b *types.VirtualDiskFlatVer2BackingInfo) {
		if b == nil {
			return
		}
		if b.FileName == from {
			b.FileName = to
		}
	}
	for _, d := range w.disks() {
		if d.Key != key {
			continue
		}
		b := diskBacking(d)
		fix(b)
		if len(st.chain) > 1 {
			parent := *b
			parent.Parent = nil
			parent.FileName = st.chain[len(st.chain)-2]
			b.Parent = &parent
		} else {
			b.Parent = nil
		}
	}
	for _, s := range w.snaps {
		for _, d := range s.Config.Hardware.Device {
			if disk, ok := d.(*types.VirtualDisk); ok && disk.Key == key {
				fix(diskBacking(disk))
			}
		}
	}
}

func (w *backupVM) DestroyTask(ctx *simulator.Context, req *types.Destroy_Task) soap.HasFault {
	if w.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		stateMu.Lock()
		for ref := range w.snaps {
			simulator.Map.Remove(ref)
		}
		w.snaps = map[types.ManagedObjectReference]*backupSnapshot{}
		stateMu.Unlock()
	}
	return w.VirtualMachine.DestroyTask(ctx, req)
}

// QueryChangedDiskAreas answers for the tests what govmomi 0.24's simulator does not implement,
// from the block hashes recorded at each change id.
func (w *backupVM) QueryChangedDiskAreas(req *types.QueryChangedDiskAreas) soap.HasFault {
	body := &methods.QueryChangedDiskAreasBody{}
	info, msg, fault := w.changedAreas(req)
	if fault != nil {
		body.Fault_ = simulator.Fault(msg, fault)
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *info}
	return body
}

func (w *backupVM) changedAreas(req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, string, types.BaseMethodFault) {
	stateMu.Lock()
	defer stateMu.Unlock()
	if req.Snapshot == nil {
		return nil, "a snapshot is required", &types.InvalidArgument{InvalidProperty: "snapshot"}
	}
	snap := w.snaps[*req.Snapshot]
	if snap == nil {
		return nil, fmt.Sprintf("snapshot %s of %s not found", req.Snapshot.Value, w.Name),
			&types.ManagedObjectNotFound{Obj: *req.Snapshot}
	}
	var disk *types.VirtualDisk
	for _, d := range snap.Config.Hardware.Device {
		if vd, ok := d.(*types.VirtualDisk); ok && vd.Key == req.DeviceKey {
			disk = vd
		}
	}
	if disk == nil || diskBacking(disk) == nil {
		return nil, fmt.Sprintf("no disk with device key %d", req.DeviceKey),
			&types.InvalidArgument{InvalidProperty: "deviceKey"}
	}
	file := diskBacking(disk).FileName
	capacity := diskCapacity(disk)
	if req.StartOffset < 0 || req.StartOffset >= capacity {
		return nil, fmt.Sprintf("startOffset %d outside the disk (%d bytes)", req.StartOffset, capacity),
			&types.InvalidArgument{InvalidProperty: "startOffset"}
	}
	if !w.changeTracking() {
		return nil, "change tracking is not enabled on " + w.Name, &types.FileFault{File: file}
	}
	current := snap.content[req.DeviceKey]
	if current == nil {
		return nil, "the snapshot was taken without change tracking", &types.FileFault{File: file}
	}
	changed := make([]bool, len(current))
	if req.ChangeId == "*" {
		for i, h := range current {
			changed[i] = h != zeroBlockHash
		}
	} else {
		st := w.state[req.DeviceKey]
		id, seqText := req.ChangeId, ""
		if i := strings.LastIndex(id, "/"); i >= 0 {
			id, seqText = id[:i], id[i+1:]
		}
		seq, err := strconv.Atoi(seqText)
		var old []blockHash
		if err == nil && st != nil && id == st.cbtUUID {
			old = st.content[seq]
		}
		if old == nil {
			return nil, fmt.Sprintf("change id %q is not valid for this disk (change tracking was reset)", req.ChangeId),
				&types.FileFault{File: file}
		}
		for i := range current {
			changed[i] = i >= len(old) || old[i] != current[i]
		}
	}
	info := &types.DiskChangeInfo{StartOffset: req.StartOffset, Length: capacity - req.StartOffset}
	for i, c := range changed {
		if !c {
			continue
		}
		start := int64(i) * blockSize
		end := start + blockSize
		if end > capacity {
			end = capacity
		}
		if end <= req.StartOffset {
			continue
		}
		if start < req.StartOffset {
			start = req.StartOffset
		}
		n := len(info.ChangedArea)
		if n > 0 && info.ChangedArea[n-1].Start+info.ChangedArea[n-1].Length == start {
			info.ChangedArea[n-1].Length += end - start
			continue
		}
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: start, Length: end - start})
	}
	return info, "", nil
}

// resetTracking gives every disk a new tracking uuid (like a CBT reset on vSphere), so older
// change ids fault. The caller holds the VM's lock.
func (w *backupVM) resetTracking() error {
	stateMu.Lock()
	defer stateMu.Unlock()
	if !w.changeTracking() {
		return fmt.Errorf("change tracking is off on %s", w.Name)
	}
	for _, d := range w.disks() {
		if st := w.state[d.Key]; st != nil {
			if err := w.restartTracking(d, st); err != nil {
				return err
			}
		}
	}
	return nil
}

// hashFile hashes each 64 KiB block of the first `size` bytes (missing bytes read as zeros).
func hashFile(p string, size int64) ([]blockHash, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	n := (size + blockSize - 1) / blockSize
	out := make([]blockHash, n)
	buf := make([]byte, blockSize)
	for i := int64(0); i < n; i++ {
		for j := range buf {
			buf[j] = 0
		}
		if _, err := f.ReadAt(buf, i*blockSize); err != nil && err != io.EOF {
			return nil, err
		}
		out[i] = sha256.Sum256(buf)
	}
	return out, nil
}

// copyDisk makes dst a copy of src: a reflink where the filesystem can, else a sparse copy.
func copyDisk(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	const ficlone = 0x40049409
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, out.Fd(), ficlone, in.Fd()); errno == 0 {
		return out.Close()
	}
	if err := out.Truncate(fi.Size()); err != nil {
		out.Close()
		return err
	}
	buf := make([]byte, blockSize)
	zero := make([]byte, blockSize)
	for off := int64(0); off < fi.Size(); off += blockSize {
		n, err := in.ReadAt(buf, off)
		if err != nil && err != io.EOF {
			out.Close()
			return err
		}
		if n == 0 {
			break
		}
		if bytes.Equal(buf[:n], zero[:n]) {
			continue
		}
		if _, err := out.WriteAt(buf[:n], off); err != nil {
			out.Close()
			return err
		}
	}
	return out.Close()
}
