package main

import (
	"context"
	"crypto/sha1"
	"fmt"
	"log"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/simulator/esx"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/types"
)

// Lab is the running simulator and the lab's own state around it.
type Lab struct {
	spec       *Spec
	model      *simulator.Model
	server     *simulator.Server
	baseURL    url.URL
	datastores map[string]string // datastore name -> directory on this machine
	vms        map[string]*labVM // by moref value
	guest      *guestOps
}

type labVM struct {
	spec VMSpec
	ref  types.ManagedObjectReference
}

// State is what the simulator reports once it answers (spec.StateFile).
type State struct {
	URL        string           `json:"url"`
	Pid        int              `json:"pid"`
	Datacenter string           `json:"datacenter"`
	Cluster    string           `json:"cluster"`
	Hosts      []StateHost      `json:"hosts"`
	Datastores []StateDatastore `json:"datastores"`
	VMs        []StateVM        `json:"vms"`
}

type StateHost struct {
	Name  string `json:"name"`
	Moref string `json:"moref"`
}

type StateDatastore struct {
	Name  string `json:"name"`
	Moref string `json:"moref"`
	Dir   string `json:"dir"`
	Type  string `json:"type"`
}

type StateVM struct {
	Name  string      `json:"name"`
	Moref string      `json:"moref"`
	Host  string      `json:"host"`
	Disks []StateDisk `json:"disks"`
}

type StateDisk struct {
	Key      int32  `json:"key"`
	Label    string `json:"label"`
	File     string `json:"file"`
	UUID     string `json:"uuid"`
	Capacity int64  `json:"capacity"`
}

func startLab(spec *Spec) (*Lab, error) {
	lab := &Lab{
		spec:       spec,
		datastores: make(map[string]string),
		vms:        make(map[string]*labVM),
	}

	// The model's own datastores and VMs would be temp directories and empty disks; the lab
	// makes its own under spec.Dir instead.
	model := simulator.VPX()
	model.Datacenter = 1
	model.Host = 0
	model.Cluster = 1
	model.ClusterHost = spec.Hosts
	model.Datastore = 0
	model.Machine = 0
	model.Portgroup = 0
	model.Autostart = false
	if err := model.Create(); err != nil {
		return nil, fmt.Errorf("creating the simulator model: %v", err)
	}
	lab.model = model

	ctx := context.Background()
	client, err := vim25.NewClient(ctx, model.Service)
	if err != nil {
		return nil, err
	}
	state, err := lab.buildInventory(ctx, client)
	if err != nil {
		model.Remove()
		return nil, err
	}
	lab.guest = newGuestOps(lab)
	lab.installProxies()
	if lvm := lab.vmByName(spec.ProxyVM); lvm != nil && spec.ProxyRoot != "" {
		vm := mustVM(lvm.ref)
		simulator.Map.WithLock(vm, func() { err = lab.syncProxyDevices(vm) })
		if err != nil {
			model.Remove()
			return nil, fmt.Errorf("the proxy VM's device tree: %v", err)
		}
	}

	listen := &url.URL{Host: spec.Listen, User: url.UserPassword(spec.User, spec.Password)}
	model.Service.Listen = listen
	lab.server = model.Service.NewServer()
	lab.baseURL = url.URL{Scheme: lab.server.URL.Scheme, Host: lab.server.URL.Host}
	inner := lab.server.Config.Handler
	lab.server.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		lab.serveHTTP(inner, w, r)
	})

	sdk := lab.baseURL
	sdk.Path = "/sdk"
	state.URL = sdk.String()
	state.Pid = os.Getpid()
	if err := writeJSONAtomic(spec.StateFile, state); err != nil {
		lab.stop()
		return nil, err
	}
	log.Printf("labsim: serving %s", state.URL)
	return lab, nil
}

func (lab *Lab) stop() {
	if lab.guest != nil {
		lab.guest.stopAll()
	}
	if lab.server != nil {
		lab.server.Close()
	}
	lab.model.Remove()
}

func (lab *Lab) buildInventory(ctx context.Context, client *vim25.Client) (*State, error) {
	finder := find.NewFinder(client, false)
	dc, err := finder.Datacenter(ctx, "DC0")
	if err != nil {
		return nil, err
	}
	finder.SetDatacenter(dc)
	cluster, err := finder.ClusterComputeResource(ctx, "*")
	if err != nil {
		return nil, err
	}
	hosts, err := finder.HostSystemList(ctx, "*")
	if err != nil {
		return nil, err
	}
	sort.Slice(hosts, func(i, j int) bool { return hosts[i].Name() < hosts[j].Name() })
	pool, err := cluster.ResourcePool(ctx)
	if err != nil {
		return nil, err
	}
	folders, err := dc.Folders(ctx)
	if err != nil {
		return nil, err
	}

	state := &State{Datacenter: "DC0", Cluster: cluster.Name()}
	for _, h := range hosts {
		state.Hosts = append(state.Hosts, StateHost{Name: h.Name(), Moref: h.Reference().Value})
	}

	for _, dspec := range lab.spec.Datastores {
		ref, err := lab.createDatastore(ctx, dspec, hosts)
		if err != nil {
			return nil, fmt.Errorf("datastore %s: %v", dspec.Name, err)
		}
		ds := simulator.Map.Get(ref).(*simulator.Datastore)
		state.Datastores = append(state.Datastores, StateDatastore{
			Name: dspec.Name, Moref: ref.Value, Dir: dspec.Dir, Type: ds.Summary.Type,
		})
		lab.datastores[dspec.Name] = dspec.Dir
	}

	for _, vspec := range lab.spec.VMs {
		if vspec.Host < 0 || vspec.Host >= len(hosts) {
			return nil, fmt.Errorf("VM %s: host index %d out of range", vspec.Name, vspec.Host)
		}
		svm, err := lab.createVM(ctx, client, vspec, folders, pool, hosts[vspec.Host])
		if err != nil {
			return nil, fmt.Errorf("VM %s: %v", vspec.Name, err)
		}
		state.VMs = append(state.VMs, *svm)
	}
	return state, nil
}

func (lab *Lab) createDatastore(ctx context.Context, dspec DatastoreSpec, hosts []*object.HostSystem) (types.ManagedObjectReference, error) {
	var ref types.ManagedObjectReference
	dir, err := filepath.Abs(dspec.Dir)
	if err != nil {
		return ref, err
	}
	if filepath.Base(dir) != dspec.Name {
		return ref, fmt.Errorf("directory %s must be named %s", dir, dspec.Name)
	}
	for _, host := range hosts {
		dss, err := host.ConfigManager().DatastoreSystem(ctx)
		if err != nil {
			return ref, err
		}
		var ds *object.Datastore
		switch dspec.Kind {
		case "nfs":
			ds, err = dss.CreateNasDatastore(ctx, types.HostNasVolumeSpec{
				RemoteHost: "127.0.0.1",
				RemotePath: "/exports/" + dspec.Name,
				LocalPath:  dir,
				AccessMode: string(types.HostMountModeReadWrite),
				Type:       string(types.HostFileSystemVolumeFileSystemTypeNFS),
			})
		default:
			ds, err = dss.CreateLocalDatastore(ctx, dspec.Name, dir)
		}
		if err != nil {
			return ref, err
		}
		ref = ds.Reference()
	}

	ds := simulator.Map.Get(ref).(*simulator.Datastore)
	simulator.Map.WithLock(ds, func() {
		ds.Host = nil
		for _, host := range hosts {
			ds.Host = append(ds.Host, types.DatastoreHostMount{
				Key: host.Reference(),
				MountInfo: types.HostMountInfo{
					Path:       dir,
					AccessMode: string(types.HostMountModeReadWrite),
					Mounted:    types.NewBool(true),
					Accessible: types.NewBool(true),
				},
			})
		}
		ds.Summary.MultipleHostAccess = types.NewBool(true)
		if dspec.Kind == "vmfs" {
			// A shared VMFS volume on a SAN LUN, as a SAN proxy would find it.
			info := *ds.Info.GetDatastoreInfo()
			ds.Summary.Type = string(types.HostFileSystemVolumeFileSystemTypeVMFS)
			ds.Info = &types.VmfsDatastoreInfo{
				DatastoreInfo:          info,
				MaxPhysicalRDMFileSize: 0,
				Vmfs: &types.HostVmfsVolume{
					HostFileSystemVolume: types.HostFileSystemVolume{
						Type:     string(types.HostFileSystemVolumeFileSystemTypeVMFS),
						Name:     dspec.Name,
						Capacity: ds.Summary.Capacity,
					},
					BlockSizeMb:  1,
					BlockSize:    1024,
					MaxBlocks:    63963136,
					MajorVersion: 6,
					Version:      "6.82",
					Uuid:         stableUUID("vmfs:" + dspec.Name),
					Extent: []types.HostScsiDiskPartition{{
						DiskName:  lunName(dspec.Name),
						Partition: 1,
					}},
					Local: types.NewBool(false),
				},
			}
		}
	})
	return ref, nil
}

// lunName is the SCSI name of the LUN that holds a VMFS datastore.
func lunName(ds string) string {
	sum := sha1.Sum([]byte("lun:" + ds))
	return fmt.Sprintf("naa.6000c29%x", sum[:12])
}

// stableUUID derives a UUID from a name, so that the same lab gives the same identities.
func stableUUID(name string) string {
	s := sha1.Sum([]byte(name))
	return fmt.Sprintf("%x-%x-%x-%x-%x", s[0:4], s[4:6], s[6:8], s[8:10], s[10:16])
}

func (lab *Lab) createVM(ctx context.Context, client *vim25.Client, vspec VMSpec, folders *object.DatacenterFolders, pool *object.ResourcePool, host *object.HostSystem) (*StateVM, error) {
	var devices object.VirtualDeviceList
	scsi, err := devices.CreateSCSIController("pvscsi")
	if err != nil {
		return nil, err
	}
	scsi.GetVirtualDevice().Key = 1000
	devices = append(devices, scsi)

	if len(vspec.Disks) == 0 {
		return nil, fmt.Errorf("no disks")
	}
	for i, dspec := range vspec.Disks {
		dir, ok := lab.datastores[dspec.Datastore]
		if !ok {
			return nil, fmt.Errorf("unknown datastore %s", dspec.Datastore)
		}
		if _, err := os.Stat(filepath.Join(dir, dspec.Path)); err != nil {
			return nil, fmt.Errorf("disk %d: %v", dspec.Key, err)
		}
		dsRef := lab.datastoreRef(dspec.Datastore, host)
		disk := devices.CreateDisk(scsi.(types.BaseVirtualController), dsRef,
			fmt.Sprintf("[%s] %s", dspec.Datastore, dspec.Path))
		disk.Key = dspec.Key
		disk.DeviceInfo = &types.Description{
			Label:   fmt.Sprintf("Hard disk %d", i+1),
			Summary: fmt.Sprintf("%d KB", dspec.Capacity/1024),
		}
		disk.CapacityInBytes = dspec.Capacity
		disk.CapacityInKB = dspec.Capacity / 1024
		backing := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		backing.Uuid = stableUUID(fmt.Sprintf("disk:%s:%d", vspec.Name, dspec.Key))
		devices = append(devices, disk)
	}
	nic := esx.EthernetCard
	devices = append(devices, &nic)

	change, err := devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
	if err != nil {
		return nil, err
	}
	for _, c := range change {
		// The disks exist already: attach them, never create (which would fail or truncate).
		c.GetVirtualDeviceConfigSpec().FileOperation = ""
	}
	memory := vspec.MemoryMB
	if memory == 0 {
		memory = 1024
	}
	cpus := vspec.CPUs
	if cpus == 0 {
		cpus = 1
	}
	first := vspec.Disks[0]
	config := types.VirtualMachineConfigSpec{
		Name:                  vspec.Name,
		Uuid:                  vspec.UUID,
		GuestId:               vspec.GuestID,
		NumCPUs:               cpus,
		MemoryMB:              int64(memory),
		ChangeTrackingEnabled: types.NewBool(vspec.CBT),
		Files: &types.VirtualMachineFileInfo{
			VmPathName: fmt.Sprintf("[%s] %s/%s.vmx", first.Datastore, vspec.Name, vspec.Name),
		},
		DeviceChange: change,
	}
	release := lab.flatPlaceholders(config.DeviceChange)
	task, err := folders.VmFolder.CreateVM(ctx, config, pool, host)
	if err != nil {
		release()
		return nil, err
	}
	info, err := task.WaitForResult(ctx, nil)
	release()
	if err != nil {
		return nil, err
	}
	ref := info.Result.(types.ManagedObjectReference)
	if vspec.PowerState == "" || vspec.PowerState == string(types.VirtualMachinePowerStatePoweredOn) {
		t, err := object.NewVirtualMachine(client, ref).PowerOn(ctx)
		if err != nil {
			return nil, err
		}
		if err := t.Wait(ctx); err != nil {
			return nil, err
		}
	}

	lvm := &labVM{spec: vspec, ref: ref}
	lab.vms[ref.Value] = lvm
	vm := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	var svm StateVM
	var failure error
	simulator.Map.WithLock(vm, func() {
		lab.setGuestIdentity(vm, vspec)
		if vspec.CBT {
			failure = lab.resetChangeTracking(vm)
		} else {
			failure = lab.writeLeafStates(vm)
		}
		if failure != nil {
			return
		}
		svm = StateVM{Name: vspec.Name, Moref: ref.Value, Host: host.Reference().Value}
		for _, d := range diskDevices(vm.Config.Hardware.Device) {
			b := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			svm.Disks = append(svm.Disks, StateDisk{
				Key:      d.Key,
				Label:    d.DeviceInfo.GetDescription().Label,
				File:     b.FileName,
				UUID:     b.Uuid,
				Capacity: d.CapacityInBytes,
			})
		}
	})
	if failure != nil {
		return nil, failure
	}
	return &svm, nil
}

func (lab *Lab) datastoreRef(name string, host *object.HostSystem) types.ManagedObjectReference {
	h := simulator.Map.Get(host.Reference()).(*simulator.HostSystem)
	return simulator.Map.FindByName(name, h.Datastore).Reference()
}

// setGuestIdentity makes the VM look like one whose VMware Tools report to vCenter.
// Called with the VM locked.
func (lab *Lab) setGuestIdentity(vm *simulator.VirtualMachine, vspec VMSpec) {
	poweredOn := vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn
	running := poweredOn && vspec.ToolsRunning
	g := vm.Guest
	if g == nil {
		g = new(types.GuestInfo)
		vm.Guest = g
	}
	g.GuestId = vspec.GuestID
	g.GuestFullName = vspec.GuestFullName
	g.GuestFamily = vspec.GuestFamily
	g.ToolsVersion = "12352"
	g.ToolsVersionStatus2 = string(types.VirtualMachineToolsVersionStatusGuestToolsCurrent)
	g.ToolsInstallType = "guestToolsTypeOpenVMTools"
	if running {
		g.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
		g.ToolsStatus = types.VirtualMachineToolsStatusToolsOk
		g.GuestState = "running"
		g.GuestOperationsReady = types.NewBool(true)
		g.InteractiveGuestOperationsReady = types.NewBool(false)
		g.HostName = vspec.HostName
		g.IpAddress = vspec.IP
	} else {
		g.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsNotRunning)
		g.ToolsStatus = types.VirtualMachineToolsStatusToolsNotRunning
		g.GuestState = "notRunning"
		g.GuestOperationsReady = types.NewBool(false)
		g.HostName = ""
		g.IpAddress = ""
	}
	for i := range g.Net {
		if running && vspec.IP != "" {
			g.Net[i].IpAddress = []string{vspec.IP}
			g.Net[i].Connected = true
		} else {
			g.Net[i].IpAddress = nil
		}
	}
	vm.Config.GuestId = vspec.GuestID
	vm.Config.GuestFullName = vspec.GuestFullName
	if vm.Summary.Guest == nil {
		vm.Summary.Guest = new(types.VirtualMachineGuestSummary)
	}
	sg := vm.Summary.Guest
	sg.GuestId = vspec.GuestID
	sg.GuestFullName = vspec.GuestFullName
	sg.ToolsStatus = g.ToolsStatus
	sg.ToolsVersionStatus2 = g.ToolsVersionStatus2
	sg.ToolsRunningStatus = g.ToolsRunningStatus
	sg.HostName = g.HostName
	sg.IpAddress = g.IpAddress
	vm.Summary.Config.GuestId = vspec.GuestID
	vm.Summary.Config.GuestFullName = vspec.GuestFullName
	if running {
		vm.Summary.QuickStats.GuestHeartbeatStatus = types.ManagedEntityStatusGreen
		vm.GuestHeartbeatStatus = types.ManagedEntityStatusGreen
	} else {
		vm.Summary.QuickStats.GuestHeartbeatStatus = types.ManagedEntityStatusGray
		vm.GuestHeartbeatStatus = types.ManagedEntityStatusGray
	}
	g.GuestKernelCrashed = nil
	vm.Summary.Runtime = vm.Runtime
}

// setToolsRunning switches a VM's VMware Tools on or off, as the lab's control endpoint asks.
func (lab *Lab) setToolsRunning(name string, running bool) error {
	lvm := lab.vmByName(name)
	if lvm == nil {
		return fmt.Errorf("no VM named %s", name)
	}
	vm := simulator.Map.Get(lvm.ref).(*simulator.VirtualMachine)
	simulator.Map.WithLock(vm, func() {
		lvm.spec.ToolsRunning = running
		lab.setGuestIdentity(vm, lvm.spec)
	})
	return nil
}

func (lab *Lab) vmByName(name string) *labVM {
	for _, v := range lab.vms {
		if v.spec.Name == name {
			return v
		}
	}
	return nil
}

// diskDevices returns the virtual disks among devices, ordered by key.
func diskDevices(devices []types.BaseVirtualDevice) []*types.VirtualDisk {
	var disks []*types.VirtualDisk
	for _, d := range devices {
		if disk, ok := d.(*types.VirtualDisk); ok {
			disks = append(disks, disk)
		}
	}
	sort.Slice(disks, func(i, j int) bool { return disks[i].Key < disks[j].Key })
	return disks
}

// hostPath maps a datastore path ("[san-ds] vm/disk.vmdk") to the file on this machine.
func (lab *Lab) hostPath(dsPath string) (string, error) {
	var p object.DatastorePath
	if !p.FromString(dsPath) {
		return "", fmt.Errorf("not a datastore path: %q", dsPath)
	}
	dir, ok := lab.datastores[p.Datastore]
	if !ok {
		return "", fmt.Errorf("unknown datastore in %q", dsPath)
	}
	return filepath.Join(dir, filepath.FromSlash(p.Path)), nil
}

// datastorePath maps a file on this machine back to its datastore path.
func (lab *Lab) datastorePath(file string) (string, error) {
	for name, dir := range lab.datastores {
		rel, err := filepath.Rel(dir, file)
		if err == nil && !strings.HasPrefix(rel, "..") {
			return fmt.Sprintf("[%s] %s", name, filepath.ToSlash(rel)), nil
		}
	}
	return "", fmt.Errorf("%s is on no datastore", file)
}

// mustVM returns the simulator VM for a moref, or nil.
func mustVM(ref types.ManagedObjectReference) *simulator.VirtualMachine {
	obj := simulator.Map.Get(ref)
	if obj == nil {
		return nil
	}
	vm, _ := obj.(*simulator.VirtualMachine)
	return vm
}

// flatPlaceholders lets the simulator attach existing sparse disks: it checks that
// "<name>-flat.vmdk" exists before "<name>.vmdk", which only holds for monolithicFlat disks.
// For each attached disk without a flat extent an empty placeholder is made; the returned
// func removes them again.
func (lab *Lab) flatPlaceholders(changes []types.BaseVirtualDeviceConfigSpec) func() {
	var made []string
	for _, c := range changes {
		spec := c.GetVirtualDeviceConfigSpec()
		disk, ok := spec.Device.(*types.VirtualDisk)
		if !ok || spec.Operation != types.VirtualDeviceConfigSpecOperationAdd || spec.FileOperation != "" {
			continue
		}
		b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo)
		if !ok {
			continue
		}
		path, err := lab.hostPath(b.GetVirtualDeviceFileBackingInfo().FileName)
		if err != nil || !strings.HasSuffix(path, ".vmdk") {
			continue
		}
		flat := strings.TrimSuffix(path, ".vmdk") + "-flat.vmdk"
		if _, err := os.Stat(path); err != nil {
			continue
		}
		if _, err := os.Stat(flat); os.IsNotExist(err) {
			if f, err := os.OpenFile(flat, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644); err == nil {
				f.Close()
				made = append(made, flat)
			}
		}
	}
	return func() {
		for _, p := range made {
			_ = os.Remove(p)
		}
	}
}
