package main

import (
	"fmt"
	"log"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// Snapshots as ESXi makes them. Taking a snapshot freezes every disk's current file and
// gives the VM a new sparse delta per disk (qemu-img create -b), so the VM's backing becomes
// the delta (parent = the frozen file) while the snapshot's config keeps the point-in-time
// backing. Removing a snapshot commits the delta created when it was taken into the frozen
// file (qemu-img commit), relinks whatever sat on top of the delta, and deletes the delta.

var deltaSuffix = regexp.MustCompile(`-\d{6}$`)

// nextDeltaPath names the next delta of a disk ESXi-style: <base>-000001.vmdk, beside leaf.
func nextDeltaPath(leaf string) string {
	dir := filepath.Dir(leaf)
	base := deltaSuffix.ReplaceAllString(trimExt(filepath.Base(leaf)), "")
	for i := 1; ; i++ {
		p := filepath.Join(dir, fmt.Sprintf("%s-%06d.vmdk", base, i))
		if _, err := os.Stat(p); os.IsNotExist(err) {
			return p
		}
	}
}

func trimExt(name string) string {
	return name[:len(name)-len(filepath.Ext(name))]
}

func taskFault(res soap.HasFault, ref types.ManagedObjectReference) (*simulator.Task, types.BaseMethodFault) {
	task, ok := simulator.Map.Get(ref).(*simulator.Task)
	if !ok {
		return nil, &types.RuntimeFault{}
	}
	if task.Info.State == types.TaskInfoStateError && task.Info.Error != nil {
		return task, task.Info.Error.Fault
	}
	return task, nil
}

// lockDisks takes the change-tracking locks of all the VM's disks, in key order.
func (lab *Lab) lockDisks(vm string, disks []*types.VirtualDisk) (func(), error) {
	var unlocks []func()
	release := func() {
		for i := len(unlocks) - 1; i >= 0; i-- {
			unlocks[i]()
		}
	}
	keys := make([]int, 0, len(disks))
	for _, d := range disks {
		keys = append(keys, int(d.Key))
	}
	sort.Ints(keys)
	for _, k := range keys {
		u, err := lab.lockDisk(vm, int32(k))
		if err != nil {
			release()
			return nil, err
		}
		unlocks = append(unlocks, u)
	}
	return release, nil
}

func fileFault(file string, err error) types.BaseMethodFault {
	return &types.FileFault{
		VimFault: types.VimFault{MethodFault: types.MethodFault{
			FaultMessage: []types.LocalizableMessage{{Key: "com.vmware.vbrd.lab.disk", Message: err.Error()}},
		}},
		File: file,
	}
}

// CreateSnapshotTask is VirtualMachine.CreateSnapshot_Task with real delta disks.
func (p *LabVm) CreateSnapshotTask(ctx *simulator.Context, req *types.CreateSnapshot_Task) soap.HasFault {
	vm := mustVM(realVMRef(p.Self))
	task := simulator.CreateTask(vm, "createSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return p.lab.createSnapshot(vm, req)
	})
	return &methods.CreateSnapshot_TaskBody{Res: &types.CreateSnapshot_TaskResponse{Returnval: task.Run()}}
}

func (lab *Lab) createSnapshot(vm *simulator.VirtualMachine, req *types.CreateSnapshot_Task) (types.AnyType, types.BaseMethodFault) {
	var disks []*types.VirtualDisk
	var cbtOn, toolsRunning, poweredOn bool
	simulator.Map.WithLock(vm, func() {
		for _, d := range diskDevices(vm.Config.Hardware.Device) {
			// Independent disks (a proxy's hot-added ones) are not part of snapshots.
			if !strings.HasPrefix(backingOf(d).DiskMode, "independent") {
				disks = append(disks, d)
			}
		}
		cbtOn = vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
		toolsRunning = vm.Guest != nil &&
			vm.Guest.ToolsRunningStatus == string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
		poweredOn = vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn
	})
	if req.Quiesce && poweredOn && !toolsRunning {
		return nil, &types.ToolsUnavailable{}
	}

	unlock, err := lab.lockDisks(vm.Name, disks)
	if err != nil {
		return nil, fileFault(vm.Name, err)
	}
	defer unlock()

	deltas := make(map[int32]string)
	cleanup := func() {
		for _, d := range deltas {
			_ = os.Remove(d)
		}
	}
	for _, d := range disks {
		leaf, err := lab.hostPath(backingOf(d).FileName)
		if err != nil {
			cleanup()
			return nil, fileFault(backingOf(d).FileName, err)
		}
		delta := nextDeltaPath(leaf)
		if _, err := runQemu(filepath.Dir(leaf), "qemu-img", "create", "-q", "-f", "vmdk",
			"-b", filepath.Base(leaf), "-F", "vmdk", filepath.Base(delta)); err != nil {
			cleanup()
			return nil, fileFault(backingOf(d).FileName, err)
		}
		deltas[d.Key] = delta
	}

	inner := *req
	inner.This = vm.Self
	var res soap.HasFault
	simulator.Map.WithLock(vm, func() { res = vm.CreateSnapshotTask(&inner) })
	innerTask, fault := taskFault(res, res.(*methods.CreateSnapshot_TaskBody).Res.Returnval)
	if fault != nil {
		cleanup()
		return nil, fault
	}
	snapRef := innerTask.Info.Result.(types.ManagedObjectReference)
	snap := simulator.Map.Get(snapRef).(*simulator.VirtualMachineSnapshot)

	var snapDevices []types.BaseVirtualDevice
	var failure types.BaseMethodFault
	simulator.Map.WithLock(vm, func() {
		pit := make(map[int32]*types.VirtualDisk)
		cur := make(map[int32]*types.VirtualDisk)
		for _, d := range diskDevices(vm.Config.Hardware.Device) {
			delta, ok := deltas[d.Key]
			if !ok {
				continue
			}
			st, err := lab.readDiskState(vm.Name, d.Key)
			if err != nil {
				failure = fileFault(delta, err)
				return
			}
			id := ""
			if cbtOn && st.Enabled {
				st.Seq++
				id = changeID(st.Epoch, st.Seq)
			}
			st.Leaf = delta
			st.Capacity = d.CapacityInBytes
			if err := lab.writeDiskState(st); err != nil {
				failure = fileFault(delta, err)
				return
			}
			dsPath, err := lab.datastorePath(delta)
			if err != nil {
				failure = fileFault(delta, err)
				return
			}
			pd := copyDisk(d)
			backingOf(pd).ChangeId = id
			nd := copyDisk(d)
			nb := backingOf(nd)
			nb.FileName = dsPath
			nb.Parent = backingOf(pd)
			nb.ChangeId = id
			nb.ThinProvisioned = types.NewBool(true)
			nb.DeltaDiskFormat = string(types.VirtualDiskDeltaDiskFormatRedoLogFormat)
			nb.ContentId = newUUID()
			pit[d.Key] = pd
			cur[d.Key] = nd
		}
		simulator.Map.Update(vm, []types.PropertyChange{
			{Name: "config.hardware.device", Val: replaceDisks(vm.Config.Hardware.Device, cur)},
		})
		snapDevices = replaceDisks(snap.Config.Hardware.Device, pit)
	})
	if failure != nil {
		return nil, failure
	}
	simulator.Map.WithLock(snap, func() { snap.Config.Hardware.Device = snapDevices })
	lab.putSnapshotProxy(snapRef, vm.Self)
	log.Printf("labsim: %s: snapshot %s (%q) created", vm.Name, snapRef.Value, req.Name)
	return snapRef, nil
}

// RevertToCurrentSnapshotTask is refused: the lab does not model reverting disk state.
func (p *LabVm) RevertToCurrentSnapshotTask(req *types.RevertToCurrentSnapshot_Task) soap.HasFault {
	vm := mustVM(realVMRef(p.Self))
	task := simulator.CreateTask(vm, "revertToCurrentSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, &types.NotSupported{}
	})
	return &methods.RevertToCurrentSnapshot_TaskBody{Res: &types.RevertToCurrentSnapshot_TaskResponse{Returnval: task.Run()}}
}

// RevertToSnapshotTask is refused: the lab does not model reverting disk state.
func (p *LabSnapshot) RevertToSnapshotTask(req *types.RevertToSnapshot_Task) soap.HasFault {
	snap := simulator.Map.Get(realSnapshotRef(p.Self))
	task := simulator.CreateTask(snap, "revertToSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, &types.NotSupported{}
	})
	return &methods.RevertToSnapshot_TaskBody{Res: &types.RevertToSnapshot_TaskResponse{Returnval: task.Run()}}
}

// RemoveSnapshotTask is VirtualMachineSnapshot.RemoveSnapshot_Task with consolidation.
func (p *LabSnapshot) RemoveSnapshotTask(ctx *simulator.Context, req *types.RemoveSnapshot_Task) soap.HasFault {
	ref := realSnapshotRef(p.Self)
	snap, _ := simulator.Map.Get(ref).(*simulator.VirtualMachineSnapshot)
	if snap == nil {
		return &methods.RemoveSnapshot_TaskBody{Fault_: simulator.Fault("", &types.ManagedObjectNotFound{Obj: ref})}
	}
	vm := mustVM(snap.Vm)
	// vCenter names the VM as the task's entity (a snapshot is no managed entity).
	task := simulator.CreateTask(vm, "removeSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		order := []types.ManagedObjectReference{ref}
		if req.RemoveChildren {
			order = postOrder(snap)
		}
		for _, s := range order {
			if fault := p.lab.consolidate(vm, s); fault != nil {
				return nil, fault
			}
		}
		inner := *req
		inner.This = ref
		res := snap.RemoveSnapshotTask(ctx, &inner)
		if _, fault := taskFault(res, res.(*methods.RemoveSnapshot_TaskBody).Res.Returnval); fault != nil {
			return nil, fault
		}
		for _, s := range order {
			p.lab.removeSnapshotProxy(s)
		}
		log.Printf("labsim: %s: snapshot %s removed", vm.Name, ref.Value)
		return nil, nil
	})
	return &methods.RemoveSnapshot_TaskBody{Res: &types.RemoveSnapshot_TaskResponse{Returnval: task.Run()}}
}

// RemoveAllSnapshotsTask consolidates every snapshot of the VM, newest first.
func (p *LabVm) RemoveAllSnapshotsTask(ctx *simulator.Context, req *types.RemoveAllSnapshots_Task) soap.HasFault {
	vm := mustVM(realVMRef(p.Self))
	task := simulator.CreateTask(vm, "removeAllSnapshots", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		var roots []types.VirtualMachineSnapshotTree
		simulator.Map.WithLock(vm, func() {
			if vm.Snapshot != nil {
				roots = vm.Snapshot.RootSnapshotList
			}
		})
		var order []types.ManagedObjectReference
		for _, r := range roots {
			if s, ok := simulator.Map.Get(r.Snapshot).(*simulator.VirtualMachineSnapshot); ok {
				order = append(order, postOrder(s)...)
			}
		}
		for _, s := range order {
			if fault := p.lab.consolidate(vm, s); fault != nil {
				return nil, fault
			}
		}
		inner := *req
		inner.This = vm.Self
		var res soap.HasFault
		simulator.Map.WithLock(vm, func() { res = vm.RemoveAllSnapshotsTask(ctx, &inner) })
		if _, fault := taskFault(res, res.(*methods.RemoveAllSnapshots_TaskBody).Res.Returnval); fault != nil {
			return nil, fault
		}
		for _, s := range order {
			p.lab.removeSnapshotProxy(s)
		}
		return nil, nil
	})
	return &methods.RemoveAllSnapshots_TaskBody{Res: &types.RemoveAllSnapshots_TaskResponse{Returnval: task.Run()}}
}

// postOrder lists a snapshot's subtree, children before their parent.
func postOrder(s *simulator.VirtualMachineSnapshot) []types.ManagedObjectReference {
	var out []types.ManagedObjectReference
	for _, c := range s.ChildSnapshot {
		if child, ok := simulator.Map.Get(c).(*simulator.VirtualMachineSnapshot); ok {
			out = append(out, postOrder(child)...)
		}
	}
	return append(out, s.Self)
}

// chainOf lists a backing chain from the leaf to the base disk.
func chainOf(b *types.VirtualDiskFlatVer2BackingInfo) []*types.VirtualDiskFlatVer2BackingInfo {
	var out []*types.VirtualDiskFlatVer2BackingInfo
	for ; b != nil; b = b.Parent {
		out = append(out, b)
	}
	return out
}

// linkChain copies a chain (leaf first) and links the copies; it returns the new leaf.
func linkChain(chain []*types.VirtualDiskFlatVer2BackingInfo) *types.VirtualDiskFlatVer2BackingInfo {
	var parent *types.VirtualDiskFlatVer2BackingInfo
	for i := len(chain) - 1; i >= 0; i-- {
		c := *chain[i]
		c.Parent = parent
		parent = &c
	}
	return parent
}

// withoutFile removes the element named file from a chain. When it was the leaf, the new
// leaf keeps the old leaf's changeId: the snapshot or VM state it stands for is unchanged.
func withoutFile(leaf *types.VirtualDiskFlatVer2BackingInfo, file string) (*types.VirtualDiskFlatVer2BackingInfo, bool) {
	chain := chainOf(leaf)
	for i, b := range chain {
		if b.FileName != file {
			continue
		}
		if i == len(chain)-1 {
			return leaf, false // a base disk is never removed
		}
		rest := append(append([]*types.VirtualDiskFlatVer2BackingInfo{}, chain[:i]...), chain[i+1:]...)
		if i == 0 {
			c := *rest[0]
			c.ChangeId = leaf.ChangeId
			rest[0] = &c
		}
		return linkChain(rest), true
	}
	return leaf, false
}

// consolidate merges away the state snapshot ref preserved: the delta created when it was
// taken is committed into the snapshot's point-in-time file, whatever sat on that delta is
// relinked to the point-in-time file, and the delta is deleted.
func (lab *Lab) consolidate(vm *simulator.VirtualMachine, ref types.ManagedObjectReference) types.BaseMethodFault {
	snap, ok := simulator.Map.Get(ref).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return &types.ManagedObjectNotFound{Obj: ref}
	}
	var pit []*types.VirtualDisk
	simulator.Map.WithLock(snap, func() { pit = diskDevices(snap.Config.Hardware.Device) })
	var current []*types.VirtualDisk
	simulator.Map.WithLock(vm, func() { current = diskDevices(vm.Config.Hardware.Device) })

	unlock, err := lab.lockDisks(vm.Name, current)
	if err != nil {
		return fileFault(vm.Name, err)
	}
	defer unlock()

	// Committing writes into the point-in-time files; none may be attached elsewhere.
	for _, pd := range pit {
		if holder := lab.attachedElsewhere(vm, backingOf(pd).FileName); holder != "" {
			return fileLocked(backingOf(pd).FileName, holder)
		}
	}
	for _, pd := range pit {
		var cd *types.VirtualDisk
		for _, d := range current {
			if d.Key == pd.Key {
				cd = d
			}
		}
		if cd == nil {
			continue // the disk was removed from the VM since
		}
		frozen := backingOf(pd).FileName
		chain := chainOf(backingOf(cd))
		idx := -1
		for i, b := range chain {
			if b.FileName == frozen {
				idx = i
			}
		}
		if idx < 0 {
			return &types.NotSupported{}
		}
		if idx == 0 {
			continue
		}
		delta := chain[idx-1].FileName
		deltaPath, err := lab.hostPath(delta)
		if err != nil {
			return fileFault(delta, err)
		}
		frozenPath, err := lab.hostPath(frozen)
		if err != nil {
			return fileFault(frozen, err)
		}
		if _, err := runQemu(filepath.Dir(deltaPath), "qemu-img", "commit", "-q", "-f", "vmdk", deltaPath); err != nil {
			return fileFault(delta, err)
		}
		if idx >= 2 {
			above, err := lab.hostPath(chain[idx-2].FileName)
			if err != nil {
				return fileFault(chain[idx-2].FileName, err)
			}
			text, err := readDescriptor(frozenPath)
			if err != nil {
				return fileFault(frozen, err)
			}
			hint, _ := filepath.Rel(filepath.Dir(above), frozenPath)
			if err := setSparseParent(above, hint, descriptorField(text, "CID")); err != nil {
				return fileFault(chain[idx-2].FileName, err)
			}
		}
		if err := os.Remove(deltaPath); err != nil {
			return fileFault(delta, err)
		}

		var failure types.BaseMethodFault
		simulator.Map.WithLock(vm, func() {
			for _, d := range diskDevices(vm.Config.Hardware.Device) {
				if d.Key != cd.Key {
					continue
				}
				leaf, changed := withoutFile(backingOf(d), delta)
				if !changed {
					continue
				}
				nd := copyDisk(d)
				nd.Backing = leaf
				simulator.Map.Update(vm, []types.PropertyChange{
					{Name: "config.hardware.device", Val: replaceDisks(vm.Config.Hardware.Device,
						map[int32]*types.VirtualDisk{d.Key: nd})},
				})
				st, err := lab.readDiskState(vm.Name, d.Key)
				if err == nil {
					st.Leaf, err = lab.hostPath(leaf.FileName)
				}
				if err == nil {
					err = lab.writeDiskState(st)
				}
				if err != nil {
					failure = fileFault(leaf.FileName, err)
				}
			}
		})
		if failure != nil {
			return failure
		}
		for _, s := range vmSnapshots(vm) {
			if s.Self == ref {
				continue
			}
			simulator.Map.WithLock(s, func() {
				for _, d := range diskDevices(s.Config.Hardware.Device) {
					if d.Key != cd.Key {
						continue
					}
					if leaf, changed := withoutFile(backingOf(d), delta); changed {
						nd := copyDisk(d)
						nd.Backing = leaf
						s.Config.Hardware.Device = replaceDisks(s.Config.Hardware.Device,
							map[int32]*types.VirtualDisk{d.Key: nd})
					}
				}
			})
		}
		log.Printf("labsim: %s: committed %s into %s", vm.Name, delta, frozen)
	}
	return nil
}

// vmSnapshots lists every snapshot object of the VM's snapshot tree.
func vmSnapshots(vm *simulator.VirtualMachine) []*simulator.VirtualMachineSnapshot {
	var roots []types.VirtualMachineSnapshotTree
	simulator.Map.WithLock(vm, func() {
		if vm.Snapshot != nil {
			roots = vm.Snapshot.RootSnapshotList
		}
	})
	var out []*simulator.VirtualMachineSnapshot
	var walk func([]types.VirtualMachineSnapshotTree)
	walk = func(trees []types.VirtualMachineSnapshotTree) {
		for _, t := range trees {
			if s, ok := simulator.Map.Get(t.Snapshot).(*simulator.VirtualMachineSnapshot); ok {
				out = append(out, s)
			}
			walk(t.ChildSnapshotList)
		}
	}
	walk(roots)
	return out
}
