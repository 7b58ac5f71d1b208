package main

import (
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"os"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

func cbtEnabled(vm *simulator.VirtualMachine) bool {
	return vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
}

// ReconfigVMTask is VirtualMachine.ReconfigVM_Task; switching changeTrackingEnabled off and
// on again starts a new tracking epoch, so changeIds from before become stale as in vSphere.
// extraConfig is applied as vSphere does it (the simulator only appends), in the same
// reconfigure as the device changes.
func (p *LabVm) ReconfigVMTask(ctx *simulator.Context, req *types.ReconfigVM_Task) soap.HasFault {
	vm := mustVM(realVMRef(p.Self))
	inner := *req
	inner.This = vm.Self
	p.lab.fillAttachedIdentity(inner.Spec.DeviceChange)
	var options []types.BaseOptionValue
	inner.Spec.ExtraConfig, options = plainExtraConfig(inner.Spec.ExtraConfig)
	var res soap.HasFault
	simulator.Map.WithLock(vm, func() {
		before := cbtEnabled(vm)
		release := p.lab.flatPlaceholders(inner.Spec.DeviceChange)
		res = vm.ReconfigVMTask(ctx, &inner)
		release()
		body, ok := res.(*methods.ReconfigVM_TaskBody)
		if !ok || body.Res == nil {
			return
		}
		if _, fault := taskFault(res, body.Res.Returnval); fault != nil {
			return
		}
		if len(options) > 0 {
			simulator.Map.Update(vm, []types.PropertyChange{
				{Name: "config.extraConfig", Val: setExtraConfig(vm.Config.ExtraConfig, options)},
			})
		}
		if p.lab.isProxy(vm) {
			if err := p.lab.syncProxyDevices(vm); err != nil {
				log.Printf("labsim: %s: the guest's device tree: %v", vm.Name, err)
			}
		}
		after := cbtEnabled(vm)
		var err error
		if before != after {
			err = p.lab.setChangeTracking(vm, after)
			log.Printf("labsim: %s: changed block tracking %s", vm.Name, map[bool]string{true: "on", false: "off"}[after])
		} else {
			err = p.lab.trackNewDisks(vm, after)
		}
		if err != nil {
			log.Printf("labsim: %s: change tracking after reconfigure: %v", vm.Name, err)
		}
	})
	return res
}

// plainExtraConfig splits a spec's extraConfig into what the simulator itself interprets
// (its "SET." and "ip0" aliases, passed on) and the plain options the lab applies.
func plainExtraConfig(all []types.BaseOptionValue) (keep, plain []types.BaseOptionValue) {
	for _, o := range all {
		key := o.GetOptionValue().Key
		if key == "ip0" || strings.HasPrefix(key, "SET.") {
			keep = append(keep, o)
		} else {
			plain = append(plain, o)
		}
	}
	return keep, plain
}

// setExtraConfig applies options as vSphere does: a key already present takes the new value,
// a key set to the empty string is removed, a new key is added.
func setExtraConfig(current, options []types.BaseOptionValue) []types.BaseOptionValue {
	out := append([]types.BaseOptionValue(nil), current...)
	for _, o := range options {
		opt := o.GetOptionValue()
		value, _ := opt.Value.(string)
		at := -1
		for i, c := range out {
			if strings.EqualFold(c.GetOptionValue().Key, opt.Key) {
				at = i
				break
			}
		}
		switch {
		case value == "" && at >= 0:
			out = append(out[:at], out[at+1:]...)
		case value == "":
		case at >= 0:
			out[at] = &types.OptionValue{Key: opt.Key, Value: value}
		default:
			out = append(out, &types.OptionValue{Key: opt.Key, Value: value})
		}
	}
	return out
}

// trackNewDisks gives disks added by a reconfigure a state of their own. VM locked.
func (lab *Lab) trackNewDisks(vm *simulator.VirtualMachine, enabled bool) error {
	repl := make(map[int32]*types.VirtualDisk)
	for _, d := range diskDevices(vm.Config.Hardware.Device) {
		b, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok || strings.HasPrefix(b.DiskMode, "independent") {
			continue
		}
		path, _, _ := lab.cbtFiles(vm.Name, d.Key)
		if _, err := os.Stat(path); err == nil {
			continue
		}
		leaf, err := lab.hostPath(backingOf(d).FileName)
		if err != nil {
			continue // a disk on storage the lab does not own
		}
		st := &diskState{VM: vm.Name, Key: d.Key, Enabled: enabled, Leaf: leaf, Capacity: d.CapacityInBytes}
		if enabled {
			st.Epoch = newUUID()
			nd := copyDisk(d)
			backingOf(nd).ChangeId = changeID(st.Epoch, 0)
			repl[d.Key] = nd
		}
		if err := lab.writeDiskState(st); err != nil {
			return err
		}
	}
	if len(repl) > 0 {
		simulator.Map.Update(vm, []types.PropertyChange{
			{Name: "config.hardware.device", Val: replaceDisks(vm.Config.Hardware.Device, repl)},
		})
	}
	return nil
}

// serveControl answers the lab's own control calls (HTTP basic auth with the vCenter
// credentials):
//
//	POST /lab/tools?vm=NAME&running=true|false   switch a VM's VMware Tools on or off
//	GET  /lab/status                              liveness and the VMs' tools state
func (lab *Lab) serveControl(w http.ResponseWriter, r *http.Request) {
	user, pass, ok := r.BasicAuth()
	if !ok || user != lab.spec.User || pass != lab.spec.Password {
		w.Header().Set("WWW-Authenticate", `Basic realm="labsim"`)
		http.Error(w, "lab control needs the vCenter credentials", http.StatusUnauthorized)
		return
	}
	switch {
	case r.URL.Path == "/lab/tools" && r.Method == http.MethodPost:
		name := r.URL.Query().Get("vm")
		running := r.URL.Query().Get("running") == "true"
		if err := lab.setToolsRunning(name, running); err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		fmt.Fprintf(w, "%s: tools running=%v\n", name, running)
	case r.URL.Path == "/lab/status":
		status := map[string]interface{}{"pid": os.Getpid()}
		tools := map[string]bool{}
		for _, v := range lab.vms {
			tools[v.spec.Name] = v.spec.ToolsRunning
		}
		status["tools_running"] = tools
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(status)
	default:
		http.NotFound(w, r)
	}
}
