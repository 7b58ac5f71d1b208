package main

import (
	"bytes"
	"fmt"
	"html"
	"io/ioutil"
	"log"
	"net/http"
	"regexp"
	"runtime/debug"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// The simulator's VirtualMachine cannot be wrapped (its own code asserts the concrete type),
// so the lab answers some VirtualMachine and VirtualMachineSnapshot methods through proxy
// objects of its own types: the HTTP layer rewrites `_this` of those calls from
// VirtualMachine:vm-42 to LabVm:vm-42, and the simulator's dispatcher, with its session
// check, SOAP decoding and fault encoding, calls the proxy's method. The proxies reach the
// real objects through simulator.Map.
const (
	proxyVMType       = "LabVm"
	proxySnapshotType = "LabSnapshot"
)

var interceptedMethods = map[string]string{
	"QueryChangedDiskAreas":        proxyVMType,
	"CreateSnapshot_Task":          proxyVMType,
	"RemoveAllSnapshots_Task":      proxyVMType,
	"RevertToCurrentSnapshot_Task": proxyVMType,
	"ReconfigVM_Task":              proxyVMType,
	"RemoveSnapshot_Task":          proxySnapshotType,
	"RevertToSnapshot_Task":        proxySnapshotType,
}

var (
	methodPattern    = regexp.MustCompile(`<(?:[\w-]+:)?Body[^>]*>\s*<(?:[\w-]+:)?(\w+)[\s/>]`)
	thisPattern      = regexp.MustCompile(`(<(?:[\w-]+:)?_this\b[^>]*\btype=")(VirtualMachine|VirtualMachineSnapshot)(")`)
	thisValuePattern = regexp.MustCompile(`<(?:[\w-]+:)?_this\b[^>]*>\s*([^<\s]+)\s*<`)
)

// proxyBase gives proxies the embedded mo type the simulator's registry expects.
type proxyBase struct {
	mo.ExtensibleManagedObject
}

// LabVm answers the VirtualMachine methods the lab implements for VM Value.
type LabVm struct {
	proxyBase
	lab *Lab
}

// LabSnapshot answers the VirtualMachineSnapshot methods the lab implements.
type LabSnapshot struct {
	proxyBase
	lab *Lab
	vm  types.ManagedObjectReference
}

func (lab *Lab) installProxies() {
	for value := range lab.vms {
		p := &LabVm{lab: lab}
		p.Self = types.ManagedObjectReference{Type: proxyVMType, Value: value}
		simulator.Map.Put(p)
	}
	for _, obj := range simulator.Map.All("VirtualMachine") {
		ref := obj.Reference()
		if _, ok := lab.vms[ref.Value]; !ok {
			p := &LabVm{lab: lab}
			p.Self = types.ManagedObjectReference{Type: proxyVMType, Value: ref.Value}
			simulator.Map.Put(p)
		}
	}
}

func (lab *Lab) putSnapshotProxy(snapshot, vm types.ManagedObjectReference) {
	p := &LabSnapshot{lab: lab, vm: vm}
	p.Self = types.ManagedObjectReference{Type: proxySnapshotType, Value: snapshot.Value}
	simulator.Map.Put(p)
}

func (lab *Lab) removeSnapshotProxy(snapshot types.ManagedObjectReference) {
	simulator.Map.Remove(types.ManagedObjectReference{Type: proxySnapshotType, Value: snapshot.Value})
}

func realVMRef(ref types.ManagedObjectReference) types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "VirtualMachine", Value: ref.Value}
}

func realSnapshotRef(ref types.ManagedObjectReference) types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: ref.Value}
}

// serveHTTP routes the lab's own endpoints and rewrites intercepted SOAP calls before the
// simulator sees them.
func (lab *Lab) serveHTTP(inner http.Handler, w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == guestFilePath:
		lab.guest.serveFile(w, r)
		return
	case strings.HasPrefix(r.URL.Path, "/lab/"):
		lab.serveControl(w, r)
		return
	case r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/sdk"):
		body, err := ioutil.ReadAll(r.Body)
		_ = r.Body.Close()
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		method := ""
		if m := methodPattern.FindSubmatch(body); m != nil {
			method = string(m[1])
		}
		body = rewriteThis(body)
		r.Body = ioutil.NopCloser(bytes.NewReader(body))
		r.ContentLength = int64(len(body))
		rw := &trackingWriter{ResponseWriter: w}
		defer func() {
			if p := recover(); p != nil {
				log.Printf("labsim: %s panicked: %v\n%s", method, p, debug.Stack())
				if rw.wrote {
					return
				}
				if method == "Fetch" {
					// The simulator's Fetch panics on an unset property (vm.snapshot of a VM
					// without snapshots); vSphere answers with no value.
					writeEnvelope(w, http.StatusOK, `<FetchResponse xmlns="urn:vim25"></FetchResponse>`)
					return
				}
				writeEnvelope(w, http.StatusInternalServerError, fmt.Sprintf(
					`<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring>`+
						`<detail><SystemErrorFault xmlns="urn:vim25" xsi:type="SystemError"><reason>%s</reason>`+
						`</SystemErrorFault></detail></soapenv:Fault>`,
					html.EscapeString(fmt.Sprintf("lab simulator error in %s: %v", method, p)),
					html.EscapeString(fmt.Sprint(p))))
			}
		}()
		inner.ServeHTTP(rw, r)
		return
	}
	inner.ServeHTTP(w, r)
}

type trackingWriter struct {
	http.ResponseWriter
	wrote bool
}

func (t *trackingWriter) WriteHeader(code int) {
	t.wrote = true
	t.ResponseWriter.WriteHeader(code)
}

func (t *trackingWriter) Write(b []byte) (int, error) {
	t.wrote = true
	return t.ResponseWriter.Write(b)
}

func writeEnvelope(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(status)
	fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?>`+
		`<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" `+
		`xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" `+
		`xmlns:xsd="http://www.w3.org/2001/XMLSchema" `+
		`xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">`+
		`<soapenv:Body>%s</soapenv:Body></soapenv:Envelope>`, body)
}

// rewriteThis points `_this` of an intercepted call at the lab's proxy of that object.
// A call on an object that has no proxy (a snapshot removed meanwhile) is passed on as it
// came, so that the simulator answers ManagedObjectNotFound for the object the client named,
// as vSphere does, not for a proxy type no client knows.
func rewriteThis(body []byte) []byte {
	m := methodPattern.FindSubmatch(body)
	if m == nil {
		return body
	}
	proxy, ok := interceptedMethods[string(m[1])]
	if !ok {
		return body
	}
	if v := thisValuePattern.FindSubmatch(body); v == nil ||
		simulator.Map.Get(types.ManagedObjectReference{Type: proxy, Value: string(v[1])}) == nil {
		return body
	}
	done := false
	return thisPattern.ReplaceAllFunc(body, func(match []byte) []byte {
		if done {
			return match
		}
		done = true
		sub := thisPattern.FindSubmatch(match)
		return append(append(append([]byte{}, sub[1]...), proxy...), sub[3]...)
	})
}
