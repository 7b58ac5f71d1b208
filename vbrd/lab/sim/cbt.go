package main

import (
	"bufio"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// Changed block tracking, as the lab keeps it.
//
// Every disk has a state file (CbtDir/<vm>/<key>.json) and a change log (<key>.jsonl),
// guarded by an flock on <key>.lock that `vbrd lab write` takes too. A tracking epoch (a
// UUID) starts when CBT is switched on; each snapshot increments the disk's sequence number
// and its backing carries changeId "<epoch>/<seq>". The lab's disk writer appends the
// extents it changes with seq = current seq + 1, so "changed since changeId e/k up to the
// snapshot with e/s" is the union of log entries of epoch e with k < seq <= s.

type diskState struct {
	VM       string `json:"vm"`
	Key      int32  `json:"key"`
	Enabled  bool   `json:"enabled"`
	Epoch    string `json:"epoch"`
	Seq      int64  `json:"seq"`
	Leaf     string `json:"leaf"`
	Capacity int64  `json:"capacity"`
}

type logEntry struct {
	Epoch   string     `json:"epoch"`
	Seq     int64      `json:"seq"`
	Extents [][2]int64 `json:"extents"`
}

type area struct{ start, end int64 }

func (lab *Lab) cbtFiles(vm string, key int32) (state, changes, lock string) {
	dir := filepath.Join(lab.spec.CbtDir, vm)
	base := filepath.Join(dir, strconv.Itoa(int(key)))
	return base + ".json", base + ".jsonl", base + ".lock"
}

// lockDisk takes the disk's change-tracking lock (shared with the lab's disk writer).
func (lab *Lab) lockDisk(vm string, key int32) (func(), error) {
	_, _, lock := lab.cbtFiles(vm, key)
	if err := os.MkdirAll(filepath.Dir(lock), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(lock, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, err
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

func (lab *Lab) readDiskState(vm string, key int32) (*diskState, error) {
	path, _, _ := lab.cbtFiles(vm, key)
	data, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return &diskState{VM: vm, Key: key}, nil
	}
	if err != nil {
		return nil, err
	}
	st := new(diskState)
	if err := json.Unmarshal(data, st); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	return st, nil
}

func (lab *Lab) writeDiskState(st *diskState) error {
	path, _, _ := lab.cbtFiles(st.VM, st.Key)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return writeJSONAtomic(path, st)
}

func (lab *Lab) readChanges(vm string, key int32) ([]logEntry, error) {
	_, path, _ := lab.cbtFiles(vm, key)
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var entries []logEntry
	scanner := bufio.NewScanner(f)
	scanner.Buffer(make([]byte, 1<<20), 1<<30)
	for n := 1; scanner.Scan(); n++ {
		line := strings.TrimSpace(scanner.Text())
		if line == "" {
			continue
		}
		var e logEntry
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			return nil, fmt.Errorf("%s:%d: %v", path, n, err)
		}
		entries = append(entries, e)
	}
	return entries, scanner.Err()
}

func newUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = (b[6] & 0x0f) | 0x40
	b[8] = (b[8] & 0x3f) | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func changeID(epoch string, seq int64) string {
	return fmt.Sprintf("%s/%d", epoch, seq)
}

func parseChangeID(id string) (string, int64, bool) {
	i := strings.LastIndexByte(id, '/')
	if i <= 0 {
		return "", 0, false
	}
	seq, err := strconv.ParseInt(id[i+1:], 10, 64)
	if err != nil || seq < 0 {
		return "", 0, false
	}
	return id[:i], seq, true
}

// copyDisk copies a virtual disk and its backing, so that changing the copy's backing never
// changes a device another config (a snapshot's) still points at.
func copyDisk(d *types.VirtualDisk) *types.VirtualDisk {
	c := *d
	b := *d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	c.Backing = &b
	return &c
}

func backingOf(d *types.VirtualDisk) *types.VirtualDiskFlatVer2BackingInfo {
	return d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
}

// replaceDisks returns a new device list with the disks in repl put in place of those with
// the same key.
func replaceDisks(devices []types.BaseVirtualDevice, repl map[int32]*types.VirtualDisk) []types.BaseVirtualDevice {
	out := make([]types.BaseVirtualDevice, 0, len(devices))
	for _, d := range devices {
		if disk, ok := d.(*types.VirtualDisk); ok {
			if r, ok := repl[disk.Key]; ok {
				out = append(out, r)
				continue
			}
		}
		out = append(out, d)
	}
	return out
}

// resetChangeTracking starts a new tracking epoch on every disk of the VM (CBT switched on).
// Called with the VM locked.
func (lab *Lab) resetChangeTracking(vm *simulator.VirtualMachine) error {
	return lab.setChangeTracking(vm, true)
}

// setChangeTracking switches the lab's tracking on (new epoch, empty log) or off for every
// disk of the VM and updates the backings' changeId. Called with the VM locked.
func (lab *Lab) setChangeTracking(vm *simulator.VirtualMachine, enabled bool) error {
	repl := make(map[int32]*types.VirtualDisk)
	for _, d := range diskDevices(vm.Config.Hardware.Device) {
		if _, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo); !ok {
			continue
		}
		unlock, err := lab.lockDisk(vm.Name, d.Key)
		if err != nil {
			return err
		}
		err = func() error {
			defer unlock()
			st, err := lab.readDiskState(vm.Name, d.Key)
			if err != nil {
				return err
			}
			leaf, err := lab.hostPath(backingOf(d).FileName)
			if err != nil {
				return err
			}
			st.Leaf = leaf
			st.Capacity = d.CapacityInBytes
			st.Enabled = enabled
			st.Seq = 0
			st.Epoch = ""
			if enabled {
				st.Epoch = newUUID()
			}
			_, changes, _ := lab.cbtFiles(vm.Name, d.Key)
			if err := os.WriteFile(changes, nil, 0o644); err != nil {
				return err
			}
			if err := lab.writeDiskState(st); err != nil {
				return err
			}
			nd := copyDisk(d)
			backingOf(nd).ChangeId = ""
			if enabled {
				backingOf(nd).ChangeId = changeID(st.Epoch, 0)
			}
			repl[d.Key] = nd
			return nil
		}()
		if err != nil {
			return err
		}
	}
	simulator.Map.Update(vm, []types.PropertyChange{
		{Name: "config.hardware.device", Val: replaceDisks(vm.Config.Hardware.Device, repl)},
	})
	return nil
}

// writeLeafStates records every disk's current leaf (for disks the lab does not track, too,
// so that the disk writer always knows where a guest's writes go). Called with the VM locked.
func (lab *Lab) writeLeafStates(vm *simulator.VirtualMachine) error {
	for _, d := range diskDevices(vm.Config.Hardware.Device) {
		if _, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo); !ok {
			continue
		}
		unlock, err := lab.lockDisk(vm.Name, d.Key)
		if err != nil {
			return err
		}
		st, err := lab.readDiskState(vm.Name, d.Key)
		if err == nil {
			st.Leaf, err = lab.hostPath(backingOf(d).FileName)
		}
		if err == nil {
			st.Capacity = d.CapacityInBytes
			err = lab.writeDiskState(st)
		}
		unlock()
		if err != nil {
			return err
		}
	}
	return nil
}

func cbtFault(file, msg string) (string, types.BaseMethodFault) {
	return msg, &types.FileFault{
		VimFault: types.VimFault{MethodFault: types.MethodFault{
			FaultMessage: []types.LocalizableMessage{{Key: "com.vmware.vbrd.lab.cbt", Message: msg}},
		}},
		File: file,
	}
}

func invalidArgument(property, msg string) (string, types.BaseMethodFault) {
	return msg, &types.InvalidArgument{InvalidProperty: property}
}

// QueryChangedDiskAreas answers VirtualMachine.QueryChangedDiskAreas from the disk files'
// allocation ("*") or the lab's change log (a changeId), one slice of the disk per call.
func (p *LabVm) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	body := new(methods.QueryChangedDiskAreasBody)
	info, msg, fault := p.lab.queryChangedDiskAreas(realVMRef(p.Self), req)
	if fault != nil {
		body.Fault_ = simulator.Fault(msg, fault)
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *info}
	return body
}

func (lab *Lab) queryChangedDiskAreas(vmRef types.ManagedObjectReference, req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, string, types.BaseMethodFault) {
	vm := mustVM(vmRef)
	if vm == nil {
		return nil, "no such VM", &types.ManagedObjectNotFound{Obj: vmRef}
	}
	var devices []types.BaseVirtualDevice
	var cbtOn bool
	var name string
	simulator.Map.WithLock(vm, func() {
		devices = vm.Config.Hardware.Device
		cbtOn = vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
		name = vm.Name
	})
	where := "the VM's current state"
	if req.Snapshot != nil {
		snap, ok := simulator.Map.Get(*req.Snapshot).(*simulator.VirtualMachineSnapshot)
		if !ok {
			return nil, fmt.Sprintf("snapshot %s does not exist", req.Snapshot.Value),
				&types.ManagedObjectNotFound{Obj: *req.Snapshot}
		}
		var owner types.ManagedObjectReference
		simulator.Map.WithLock(snap, func() {
			owner = snap.Vm
			devices = snap.Config.Hardware.Device
		})
		if owner.Value != vmRef.Value {
			msg, f := invalidArgument("snapshot", fmt.Sprintf("snapshot %s belongs to another VM", req.Snapshot.Value))
			return nil, msg, f
		}
		where = "snapshot " + req.Snapshot.Value
	}
	var disk *types.VirtualDisk
	for _, d := range diskDevices(devices) {
		if d.Key == req.DeviceKey {
			disk = d
		}
	}
	if disk == nil {
		msg, f := invalidArgument("deviceKey", fmt.Sprintf("VM %s has no disk %d in %s", name, req.DeviceKey, where))
		return nil, msg, f
	}
	backing, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	if !ok {
		msg, f := invalidArgument("deviceKey", fmt.Sprintf("disk %d of VM %s is not a file-backed disk", req.DeviceKey, name))
		return nil, msg, f
	}
	if !cbtOn {
		msg, f := cbtFault(backing.FileName, fmt.Sprintf(
			"changed block tracking is not enabled on VM %s (config.changeTrackingEnabled is false)", name))
		return nil, msg, f
	}
	capacity := disk.CapacityInBytes
	if req.StartOffset < 0 || req.StartOffset >= capacity {
		msg, f := invalidArgument("startOffset", fmt.Sprintf(
			"startOffset %d is outside disk %d (capacity %d bytes)", req.StartOffset, req.DeviceKey, capacity))
		return nil, msg, f
	}
	start := req.StartOffset
	end := start + lab.spec.CbtSpan
	if end > capacity {
		end = capacity
	}

	var areas []area
	if req.ChangeId == "*" {
		var err error
		areas, err = lab.allocatedAreas(backing, start, end)
		if err != nil {
			msg, f := cbtFault(backing.FileName, fmt.Sprintf("reading the allocation of %s: %v", backing.FileName, err))
			return nil, msg, f
		}
	} else {
		var msg string
		var fault types.BaseMethodFault
		areas, msg, fault = lab.changedAreas(name, req, backing, start, end)
		if fault != nil {
			return nil, msg, fault
		}
	}

	areas = mergeAreas(areas)
	if len(areas) > lab.spec.CbtMaxAreas {
		areas = areas[:lab.spec.CbtMaxAreas]
		end = areas[len(areas)-1].end
	}
	info := &types.DiskChangeInfo{StartOffset: start, Length: end - start}
	for _, a := range areas {
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: a.start, Length: a.end - a.start})
	}
	return info, "", nil
}

func (lab *Lab) changedAreas(vm string, req *types.QueryChangedDiskAreas, backing *types.VirtualDiskFlatVer2BackingInfo, start, end int64) ([]area, string, types.BaseMethodFault) {
	unlock, err := lab.lockDisk(vm, req.DeviceKey)
	if err != nil {
		msg, f := cbtFault(backing.FileName, err.Error())
		return nil, msg, f
	}
	defer unlock()
	st, err := lab.readDiskState(vm, req.DeviceKey)
	if err != nil {
		msg, f := cbtFault(backing.FileName, err.Error())
		return nil, msg, f
	}
	if !st.Enabled || st.Epoch == "" {
		msg, f := cbtFault(backing.FileName, fmt.Sprintf("changed block tracking is not active on disk %d of VM %s", req.DeviceKey, vm))
		return nil, msg, f
	}
	epoch, since, ok := parseChangeID(req.ChangeId)
	if !ok {
		msg, f := cbtFault(backing.FileName, fmt.Sprintf("unknown changeId %q for disk %d of VM %s", req.ChangeId, req.DeviceKey, vm))
		return nil, msg, f
	}
	if epoch != st.Epoch {
		msg, f := cbtFault(backing.FileName, fmt.Sprintf(
			"changeId %q of disk %d of VM %s is stale: change tracking was reset since", req.ChangeId, req.DeviceKey, vm))
		return nil, msg, f
	}
	upTo := int64(math.MaxInt64)
	if req.Snapshot != nil {
		snapEpoch, seq, ok := parseChangeID(backing.ChangeId)
		if !ok || snapEpoch != st.Epoch {
			msg, f := cbtFault(backing.FileName, fmt.Sprintf(
				"snapshot %s of VM %s was taken outside the current change tracking epoch", req.Snapshot.Value, vm))
			return nil, msg, f
		}
		upTo = seq
	}
	if since > st.Seq || since > upTo {
		msg, f := cbtFault(backing.FileName, fmt.Sprintf(
			"unknown changeId %q for disk %d of VM %s: no such point in its change log", req.ChangeId, req.DeviceKey, vm))
		return nil, msg, f
	}
	entries, err := lab.readChanges(vm, req.DeviceKey)
	if err != nil {
		msg, f := cbtFault(backing.FileName, err.Error())
		return nil, msg, f
	}
	var areas []area
	for _, e := range entries {
		if e.Epoch != epoch || e.Seq <= since || e.Seq > upTo {
			continue
		}
		for _, x := range e.Extents {
			a := area{x[0], x[0] + x[1]}
			if a.end <= start || a.start >= end {
				continue
			}
			if a.start < start {
				a.start = start
			}
			if a.end > end {
				a.end = end
			}
			areas = append(areas, a)
		}
	}
	return areas, "", nil
}

// allocatedAreas lists the areas of [start, end) that the disk chain ending at backing
// really holds: SEEK_DATA/SEEK_HOLE on a lone flat extent, qemu-img map otherwise.
func (lab *Lab) allocatedAreas(backing *types.VirtualDiskFlatVer2BackingInfo, start, end int64) ([]area, error) {
	leaf, err := lab.hostPath(backing.FileName)
	if err != nil {
		return nil, err
	}
	if backing.Parent == nil {
		extent, err := flatExtent(leaf)
		if err != nil {
			return nil, err
		}
		if extent != "" {
			return seekData(extent, start, end)
		}
	}
	return qemuMap(leaf, start, end)
}

func seekData(path string, start, end int64) ([]area, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	const seekData, seekHole = 3, 4
	var areas []area
	off := start
	for off < end {
		data, err := f.Seek(off, seekData)
		if err != nil {
			break // ENXIO: no data after off
		}
		if data >= end {
			break
		}
		hole, err := f.Seek(data, seekHole)
		if err != nil {
			return nil, err
		}
		if hole > end {
			hole = end
		}
		areas = append(areas, area{data, hole})
		off = hole
	}
	return areas, nil
}

type mapEntry struct {
	Start   int64 `json:"start"`
	Length  int64 `json:"length"`
	Present bool  `json:"present"`
	Zero    bool  `json:"zero"`
}

func qemuMap(path string, start, end int64) ([]area, error) {
	out, err := runQemu(filepath.Dir(path), "qemu-img", "map", "-U", "-f", "vmdk", "--output=json",
		fmt.Sprintf("--start-offset=%d", start), fmt.Sprintf("--max-length=%d", end-start), path)
	if err != nil {
		return nil, err
	}
	var entries []mapEntry
	if err := json.Unmarshal(out, &entries); err != nil {
		return nil, fmt.Errorf("qemu-img map %s: %v", path, err)
	}
	var areas []area
	for _, e := range entries {
		if e.Present && !e.Zero {
			areas = append(areas, area{e.Start, e.Start + e.Length})
		}
	}
	return areas, nil
}

func mergeAreas(areas []area) []area {
	sort.Slice(areas, func(i, j int) bool { return areas[i].start < areas[j].start })
	var out []area
	for _, a := range areas {
		if a.end <= a.start {
			continue
		}
		if n := len(out); n > 0 && a.start <= out[n-1].end {
			if a.end > out[n-1].end {
				out[n-1].end = a.end
			}
			continue
		}
		out = append(out, a)
	}
	return out
}
