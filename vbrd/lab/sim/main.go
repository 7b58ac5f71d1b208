// Command labsim is the vSphere lab's vCenter: the govmomi simulator with the inventory the
// vbrd lab needs, extended where vbrd depends on vSphere behaviour the simulator lacks
// (snapshots with real delta disks, changed block tracking, guest operations).
//
// It is started by vbrd.lab.lab with -spec FILE (written by the lab) and writes the state
// file named in the spec once it answers; SIGTERM or SIGINT stops it and removes everything
// the simulator created outside the lab directory.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
)

// Spec is what the lab asks for; vbrd/lab/lab.py writes it.
type Spec struct {
	Dir         string          `json:"dir"`
	Listen      string          `json:"listen"`
	User        string          `json:"user"`
	Password    string          `json:"password"`
	StateFile   string          `json:"state_file"`
	CbtDir      string          `json:"cbt_dir"`
	CbtSpan     int64           `json:"cbt_span"`
	CbtMaxAreas int             `json:"cbt_max_areas"`
	Hosts       int             `json:"hosts"`
	Datastores  []DatastoreSpec `json:"datastores"`
	VMs         []VMSpec        `json:"vms"`
	ProxyVM     string          `json:"proxy_vm"`   // the VM whose guest sees hot-added disks
	ProxyRoot   string          `json:"proxy_root"` // where that guest's sys/ and dev/ are kept
}

// DatastoreSpec names a datastore and the directory that holds its files. Kind is "vmfs"
// (a SAN LUN formatted with VMFS) or "nfs" (an NFS export).
type DatastoreSpec struct {
	Name string `json:"name"`
	Dir  string `json:"dir"`
	Kind string `json:"kind"`
}

// VMSpec is one VM of the inventory; its disks already exist as VMDK files.
type VMSpec struct {
	Name          string        `json:"name"`
	Host          int           `json:"host"`
	GuestID       string        `json:"guest_id"`
	GuestFullName string        `json:"guest_full_name"`
	GuestFamily   string        `json:"guest_family"`
	HostName      string        `json:"hostname"`
	IP            string        `json:"ip"`
	ToolsRunning  bool          `json:"tools_running"`
	PowerState    string        `json:"power_state"`
	CBT           bool          `json:"cbt"`
	MemoryMB      int32         `json:"memory_mb"`
	CPUs          int32         `json:"cpus"`
	UUID          string        `json:"uuid"` // the BIOS UUID (config.uuid); empty: the simulator's
	GuestOps      *GuestOpsSpec `json:"guest_ops"`
	Disks         []DiskSpec    `json:"disks"`
}

// GuestOpsSpec configures the Guest Operations API for a VM: the credentials it accepts, the
// sandbox directory its programs and files live in, the OS flavour ("linux" or "windows")
// and the local account programs run as.
type GuestOpsSpec struct {
	User     string `json:"user"`
	Password string `json:"password"`
	Sandbox  string `json:"sandbox"`
	OS       string `json:"os"`
	RunAs    string `json:"run_as"`
}

// DiskSpec is one virtual disk: a descriptor at Path on Datastore.
type DiskSpec struct {
	Key       int32  `json:"key"`
	Datastore string `json:"datastore"`
	Path      string `json:"path"`
	Capacity  int64  `json:"capacity"`
}

func loadSpec(path string) (*Spec, error) {
	data, err := ioutil.ReadFile(path)
	if err != nil {
		return nil, err
	}
	spec := new(Spec)
	if err := json.Unmarshal(data, spec); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	if spec.Listen == "" {
		spec.Listen = "127.0.0.1:0"
	}
	if spec.CbtSpan <= 0 {
		spec.CbtSpan = 64 << 20
	}
	if spec.CbtMaxAreas <= 0 {
		spec.CbtMaxAreas = 2000
	}
	if spec.Hosts <= 0 {
		spec.Hosts = 2
	}
	return spec, nil
}

// writeJSONAtomic writes v so that readers never see a half-written file.
func writeJSONAtomic(path string, v interface{}) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := ioutil.TempFile(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err != nil {
		return err
	}
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func main() {
	specPath := flag.String("spec", "", "lab spec (JSON) written by vbrd.lab")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	if *specPath == "" {
		log.Fatal("labsim: -spec FILE is required")
	}
	spec, err := loadSpec(*specPath)
	if err != nil {
		log.Fatalf("labsim: %v", err)
	}

	lab, err := startLab(spec)
	if err != nil {
		log.Fatalf("labsim: %v", err)
	}

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	sig := <-signals
	log.Printf("labsim: %s, stopping", sig)
	lab.stop()
}
