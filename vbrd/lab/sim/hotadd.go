package main

import (
	"fmt"
	"io/ioutil"
	"log"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// Hot-add, as the proxy VM's guest and ESXi see it.
//
// A Linux guest shows every disk on its SCSI controllers under
// /sys/bus/scsi/devices/H:C:T:L (H the controller's bus number, T the disk's unit, L 0),
// with the disk's UUID as its WWID when the VM has disk.EnableUUID, and a block device
// /dev/sdX named in the device's block/ directory. The lab keeps that tree for the proxy VM
// (spec.ProxyVM) under spec.ProxyRoot (sys/ and dev/) and rewrites it after every
// reconfigure of that VM. A device node is a symlink to the disk's descriptor: the lab has
// no kernel to turn a VMDK chain into a block device, so vbrd reads the chain itself where it
// would read /dev/sdX raw on a real proxy.
//
// ESXi locks the files of a disk attached to a VM. Consolidating a snapshot writes into its
// point-in-time file, so while that file is hot-added to another VM the removal fails with
// FileLocked, as it does on ESXi; a backup product must detach first.

var scsiAddress = regexp.MustCompile(`^\d+:\d+:\d+:\d+$`)

type proxyDevice struct {
	name     string // sdX
	file     string // the descriptor on this machine
	uuid     string
	capacity int64
}

func (lab *Lab) isProxy(vm *simulator.VirtualMachine) bool {
	return lab.spec.ProxyVM != "" && lab.spec.ProxyRoot != "" && vm.Name == lab.spec.ProxyVM
}

func (lab *Lab) proxyDirs() (sys, dev string) {
	return filepath.Join(lab.spec.ProxyRoot, "sys", "bus", "scsi", "devices"),
		filepath.Join(lab.spec.ProxyRoot, "dev")
}

func wwid(uuid string) string {
	if uuid == "" {
		return ""
	}
	return "naa." + strings.ToLower(strings.Replace(uuid, "-", "", -1))
}

// diskName is the kernel's name of the i-th SCSI disk: sda ... sdz, sdaa ...
func diskName(i int) string {
	name := ""
	for i++; i > 0; i = (i - 1) / 26 {
		name = string(rune('a'+(i-1)%26)) + name
	}
	return "sd" + name
}

// syncProxyDevices makes the proxy's device tree show the VM's disks. VM locked.
func (lab *Lab) syncProxyDevices(vm *simulator.VirtualMachine) error {
	sysDir, devDir := lab.proxyDirs()
	for _, dir := range []string{sysDir, devDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	buses := make(map[int32]int32)
	for _, d := range vm.Config.Hardware.Device {
		if c, ok := d.(types.BaseVirtualSCSIController); ok {
			v := c.GetVirtualSCSIController()
			buses[v.Key] = v.BusNumber
		}
	}
	want := make(map[string]proxyDevice)
	for _, d := range diskDevices(vm.Config.Hardware.Device) {
		bus, ok := buses[d.ControllerKey]
		b, isFile := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok || !isFile || d.UnitNumber == nil {
			continue
		}
		file, err := lab.hostPath(b.FileName)
		if err != nil {
			continue
		}
		addr := fmt.Sprintf("%d:0:%d:0", bus, *d.UnitNumber)
		want[addr] = proxyDevice{file: file, uuid: b.Uuid, capacity: d.CapacityInBytes}
	}

	used := make(map[string]bool)
	entries, err := ioutil.ReadDir(sysDir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		path := filepath.Join(sysDir, e.Name())
		if !scsiAddress.MatchString(e.Name()) {
			_ = os.RemoveAll(path) // a half-written entry
			continue
		}
		name := blockName(path)
		target, _ := os.Readlink(filepath.Join(devDir, name))
		seen, _ := ioutil.ReadFile(filepath.Join(path, "wwid"))
		w, keep := want[e.Name()]
		if keep && name != "" && target == w.file && strings.TrimSpace(string(seen)) == wwid(w.uuid) {
			used[name] = true
			delete(want, e.Name())
			continue
		}
		if err := os.RemoveAll(path); err != nil {
			return err
		}
		if name != "" {
			_ = os.Remove(filepath.Join(devDir, name))
		}
		log.Printf("labsim: %s: SCSI device %s (%s) gone from the guest", vm.Name, e.Name(), name)
	}

	addrs := make([]string, 0, len(want))
	for a := range want {
		addrs = append(addrs, a)
	}
	sort.Strings(addrs)
	for _, addr := range addrs {
		d := want[addr]
		i := 0
		for used[diskName(i)] {
			i++
		}
		d.name = diskName(i)
		used[d.name] = true
		if err := writeProxyDevice(sysDir, devDir, addr, i, d); err != nil {
			return err
		}
		log.Printf("labsim: %s: SCSI device %s is /dev/%s (%s)", vm.Name, addr, d.name, d.file)
	}
	return nil
}

func blockName(deviceDir string) string {
	names, err := ioutil.ReadDir(filepath.Join(deviceDir, "block"))
	if err != nil || len(names) != 1 {
		return ""
	}
	return names[0].Name()
}

// writeProxyDevice writes a device's directory beside its final place and renames it in, so
// that a reader never sees half of it.
func writeProxyDevice(sysDir, devDir, addr string, index int, d proxyDevice) error {
	node := filepath.Join(devDir, d.name)
	_ = os.Remove(node)
	if err := os.Symlink(d.file, node); err != nil {
		return err
	}
	tmp, err := ioutil.TempDir(sysDir, ".new-")
	if err != nil {
		return err
	}
	files := map[string]string{
		"vendor":                               "VMware  ",
		"model":                                "Virtual disk    ",
		"rev":                                  "2.0 ",
		"type":                                 "0",
		"state":                                "running",
		filepath.Join("block", d.name, "dev"):  fmt.Sprintf("8:%d", 16*index),
		filepath.Join("block", d.name, "size"): fmt.Sprintf("%d", d.capacity/512),
		filepath.Join("block", d.name, "ro"):   "0",
	}
	if d.uuid != "" {
		files["wwid"] = wwid(d.uuid)
	}
	for name, text := range files {
		path := filepath.Join(tmp, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err == nil {
			err = ioutil.WriteFile(path, []byte(text+"\n"), 0o644)
		}
		if err != nil {
			_ = os.RemoveAll(tmp)
			return err
		}
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		_ = os.RemoveAll(tmp)
		return err
	}
	return os.Rename(tmp, filepath.Join(sysDir, addr))
}

// fillAttachedIdentity gives disks a reconfigure attaches without a UUID the identity their
// file has: its UUID and its parent chain, as ESXi reads them from the descriptor. Call it
// with no VM locked.
func (lab *Lab) fillAttachedIdentity(changes []types.BaseVirtualDeviceConfigSpec) {
	for _, c := range changes {
		spec := c.GetVirtualDeviceConfigSpec()
		disk, ok := spec.Device.(*types.VirtualDisk)
		if !ok || spec.Operation != types.VirtualDeviceConfigSpecOperationAdd || spec.FileOperation != "" {
			continue
		}
		b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok || b.Uuid != "" {
			continue
		}
		if known := lab.backingOfFile(b.FileName); known != nil {
			b.Uuid = known.Uuid
			if known.Parent != nil {
				b.Parent = linkChain(chainOf(known.Parent))
			}
		}
	}
}

// backingOfFile finds the backing that names file in any VM's disk chains or its snapshots'.
func (lab *Lab) backingOfFile(file string) *types.VirtualDiskFlatVer2BackingInfo {
	var found *types.VirtualDiskFlatVer2BackingInfo
	look := func(devices []types.BaseVirtualDevice) {
		for _, d := range diskDevices(devices) {
			b, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			if !ok {
				continue
			}
			for _, link := range chainOf(b) {
				if found == nil && link.FileName == file {
					c := *link
					found = &c
				}
			}
		}
	}
	for _, v := range lab.vms {
		vm := mustVM(v.ref)
		if vm == nil {
			continue
		}
		simulator.Map.WithLock(vm, func() { look(vm.Config.Hardware.Device) })
		for _, s := range vmSnapshots(vm) {
			simulator.Map.WithLock(s, func() { look(s.Config.Hardware.Device) })
		}
		if found != nil {
			return found
		}
	}
	return nil
}

// attachedElsewhere names a VM other than vm that has file in one of its disks' chains.
func (lab *Lab) attachedElsewhere(vm *simulator.VirtualMachine, file string) string {
	for _, v := range lab.vms {
		other := mustVM(v.ref)
		if other == nil || other.Self == vm.Self {
			continue
		}
		holder := ""
		simulator.Map.WithLock(other, func() {
			for _, d := range diskDevices(other.Config.Hardware.Device) {
				b, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
				if !ok {
					continue
				}
				for _, link := range chainOf(b) {
					if link.FileName == file {
						holder = other.Name
					}
				}
			}
		})
		if holder != "" {
			return holder
		}
	}
	return ""
}

func fileLocked(file, holder string) types.BaseMethodFault {
	return &types.FileLocked{FileFault: types.FileFault{
		VimFault: types.VimFault{MethodFault: types.MethodFault{
			FaultMessage: []types.LocalizableMessage{{
				Key:     "com.vmware.vbrd.lab.locked",
				Message: fmt.Sprintf("Unable to access file %s since it is locked (attached to VM %s)", file, holder),
			}},
		}},
		File: file,
	}}
}
