package main

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf16"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// The Guest Operations API (what backup software calls VIX), run in a sandbox per VM.
//
// Each VM with guest operations has a sandbox directory on this machine that stands for its
// file system (the lab makes it the root of the VM's network guest, so that both paths see
// the same guest files) and a local account its programs run as. Guest paths map into the
// sandbox:
//
//   - Linux VMs: an absolute guest path /a/b is the sandbox's a/b, unless it already names a
//     path inside the sandbox. Programs run as `/bin/sh -c "PROGRAM ARGUMENTS"` (what
//     VMware Tools does on Linux) in the working directory (default: the sandbox), as the
//     guest account and never elevated. A program path that is not in the sandbox runs this
//     machine's program of that name (/bin/sh, /usr/bin/id). In ARGUMENTS, an absolute path
//     whose directory exists in the sandbox is rewritten into it.
//   - Windows VMs: the sandbox is the C: drive, as in vbrd.lab.winrm: C:\a\b (or \a\b) is
//     the sandbox's a/b, and such paths in ARGUMENTS are rewritten the same way. There is no
//     Windows here, so programs follow the lab's stand-in rule (the one vbrd.lab.winrm
//     applies to script files): powershell.exe -File F ARGS, a bare F.ps1/.bat/.cmd and
//     powershell.exe -Command/-EncodedCommand TEXT run only the lines of F or TEXT marked
//     "#lab: <shell>" (also "REM #lab:" and ":: #lab:"), joined, with sh -c, ARGS as $1...
//     and VBRD_GUEST_ROOT set to the sandbox; cmd.exe /c LINE runs LINE with sh -c (so
//     redirections work) with powershell, cmd and their .exe names on PATH. A script without
//     "#lab:" lines fails (exit 1): a script the lab cannot run must not look as if it ran.
//     Programs run as this machine's user running the lab (Windows has no uid to show).
//
// Temporary directories are created under /tmp (Linux) or C:\Windows\Temp (Windows).
// File transfers go through this server: GET (ranges allowed) or PUT on /guestFile?id=TOKEN.

const guestFilePath = "/guestFile"

type guestOps struct {
	lab       *Lab
	mu        sync.Mutex
	procs     map[string]map[int64]*guestProc // VM moref -> pid -> process
	transfers map[string]*transfer
}

type guestProc struct {
	info types.GuestProcessInfo
	cmd  *exec.Cmd
	done bool
}

type transfer struct {
	path    string
	upload  bool
	expires time.Time
	uid     int
	gid     int
}

// LabGuestProcessManager replaces the simulator's GuestProcessManager.
type LabGuestProcessManager struct {
	mo.GuestProcessManager
	g *guestOps
}

// LabGuestFileManager replaces the simulator's GuestFileManager.
type LabGuestFileManager struct {
	mo.GuestFileManager
	g *guestOps
}

func newGuestOps(lab *Lab) *guestOps {
	g := &guestOps{
		lab:       lab,
		procs:     make(map[string]map[int64]*guestProc),
		transfers: make(map[string]*transfer),
	}
	ref := lab.model.ServiceContent.GuestOperationsManager
	if ref == nil {
		return g
	}
	gom, ok := simulator.Map.Get(*ref).(*simulator.GuestOperationsManager)
	if !ok {
		return g
	}
	if gom.ProcessManager != nil {
		pm := &LabGuestProcessManager{g: g}
		pm.Self = *gom.ProcessManager
		simulator.Map.Put(pm)
	}
	if gom.FileManager != nil {
		fm := &LabGuestFileManager{g: g}
		fm.Self = *gom.FileManager
		simulator.Map.Put(fm)
	}
	for _, v := range lab.vms {
		if s := v.spec.GuestOps; s != nil {
			if _, err := os.Stat(s.Sandbox); os.IsNotExist(err) {
				uid, gid := runAs(s.RunAs)
				if err := os.MkdirAll(s.Sandbox, 0o755); err == nil && s.OS != "windows" {
					_ = os.Chown(s.Sandbox, uid, gid)
				}
			}
		}
	}
	if err := g.writeShims(); err != nil {
		log.Printf("labsim: writing the Windows stand-in programs: %v", err)
	}
	return g
}

const systemPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

func (g *guestOps) shimDir() string { return filepath.Join(g.lab.spec.Dir, "vix-bin") }

// The Windows stand-in programs (see the top of this file), put on PATH for Windows VMs.
var shims = map[string]string{
	"labscript": `#!/bin/sh
# vbrd lab: run a Windows script file's "#lab: <shell>" lines (the lab's stand-in rule).
script="$1"; shift
if [ ! -f "$script" ]; then
	echo "The term '$script' is not recognized as the name of a script file." >&2
	exit 1
fi
lines=$(tr -d '\r' < "$script" | sed -n -e 's/^[[:space:]]*\(REM[[:space:]][[:space:]]*\|::[[:space:]]*\)\{0,1\}#lab:[[:space:]]\{0,1\}//p')
if [ -z "$lines" ]; then
	echo "script $script has no '#lab:' lines; the lab's Windows guest runs only those" >&2
	exit 1
fi
exec sh -c "$lines" "$script" "$@"
`,
	"powershell": `#!/bin/sh
# vbrd lab: powershell.exe stand-in: -File F ARGS, F ARGS, -Command TEXT (#lab: lines only).
while [ $# -gt 0 ]; do
	opt=$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')
	case "$opt" in
	-noprofile|-nop|-noninteractive|-noni|-nologo|-sta|-mta|-noexit) shift ;;
	-executionpolicy|-ep|-ex|-windowstyle|-inputformat|-outputformat|-version) shift 2 ;;
	-file|-f) shift; exec labscript "$@" ;;
	-command|-c)
		shift
		text=$(mktemp) || exit 1
		printf '%s\n' "$*" > "$text"
		labscript "$text"
		rc=$?
		rm -f "$text"
		exit $rc ;;
	-*) echo "powershell option '$1' is not emulated by the lab guest" >&2; exit 1 ;;
	*) exec labscript "$@" ;;
	esac
done
echo "powershell: nothing to run (give -File or -Command)" >&2
exit 1
`,
	"cmd": `#!/bin/sh
# vbrd lab: cmd.exe stand-in: /c LINE runs LINE with sh -c.
opt=$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')
case "$opt" in
/c|/k) shift; exec sh -c "$*" ;;
esac
echo "cmd: only /c LINE is emulated by the lab guest" >&2
exit 1
`,
}

func (g *guestOps) writeShims() error {
	dir := g.shimDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for name, text := range shims {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o755); err != nil {
			return err
		}
	}
	for alias, target := range map[string]string{
		"powershell.exe": "powershell", "pwsh": "powershell", "pwsh.exe": "powershell", "cmd.exe": "cmd",
	} {
		_ = os.Remove(filepath.Join(dir, alias))
		if err := os.Symlink(target, filepath.Join(dir, alias)); err != nil {
			return err
		}
	}
	return nil
}

// runAs resolves the local account guest programs run as (nobody when it does not exist).
func runAs(name string) (int, int) {
	for _, n := range []string{name, "nobody"} {
		if n == "" {
			continue
		}
		if u, err := user.Lookup(n); err == nil {
			uid, _ := strconv.Atoi(u.Uid)
			gid, _ := strconv.Atoi(u.Gid)
			return uid, gid
		}
	}
	return 65534, 65534
}

func (g *guestOps) stopAll() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, procs := range g.procs {
		for _, p := range procs {
			if !p.done && p.cmd.Process != nil {
				_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			}
		}
	}
}

type guestFault struct {
	msg   string
	fault types.BaseMethodFault
}

func gfault(fault types.BaseMethodFault, format string, args ...interface{}) *guestFault {
	return &guestFault{msg: fmt.Sprintf(format, args...), fault: fault}
}

func (f *guestFault) soap() *soap.Fault { return simulator.Fault(f.msg, f.fault) }

// guestVM is what an authenticated guest operation works on.
type guestVM struct {
	ref  types.ManagedObjectReference
	name string
	spec *GuestOpsSpec
	uid  int
	gid  int
}

// prepare checks what vSphere checks before any guest operation: the VM is on, its Tools
// run, and the credentials are the guest's.
func (g *guestOps) prepare(ref types.ManagedObjectReference, auth types.BaseGuestAuthentication) (*guestVM, *guestFault) {
	vm := mustVM(ref)
	if vm == nil {
		return nil, gfault(&types.ManagedObjectNotFound{Obj: ref}, "VM %s does not exist", ref.Value)
	}
	lvm := g.lab.vms[ref.Value]
	var state types.VirtualMachinePowerState
	var tools, name string
	simulator.Map.WithLock(vm, func() {
		state = vm.Runtime.PowerState
		tools = vm.Guest.ToolsRunningStatus
		name = vm.Name
	})
	if state != types.VirtualMachinePowerStatePoweredOn {
		return nil, gfault(&types.InvalidPowerState{
			RequestedState: types.VirtualMachinePowerStatePoweredOn, ExistingState: state,
		}, "VM %s is %s", name, state)
	}
	if lvm == nil || lvm.spec.GuestOps == nil ||
		tools != string(types.VirtualMachineToolsRunningStatusGuestToolsRunning) {
		return nil, gfault(&types.GuestOperationsUnavailable{},
			"the guest operations agent of VM %s could not be contacted (VMware Tools not running)", name)
	}
	spec := lvm.spec.GuestOps
	np, ok := auth.(*types.NamePasswordAuthentication)
	if !ok || np.Username != spec.User || np.Password != spec.Password {
		return nil, gfault(&types.InvalidGuestLogin{}, "failed to authenticate with the guest operating system of VM %s", name)
	}
	uid, gid := runAs(spec.RunAs)
	return &guestVM{ref: ref, name: name, spec: spec, uid: uid, gid: gid}, nil
}

var windowsPath = regexp.MustCompile(`^(?:([A-Za-z]):)?([\\/].*|)$`)

func (v *guestVM) windows() bool { return v.spec.OS == "windows" }

func within(dir, path string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// hostPath maps a guest path into the sandbox.
func (v *guestVM) hostPath(guest string) (string, *guestFault) {
	sandbox := filepath.Clean(v.spec.Sandbox)
	var p string
	if v.windows() {
		m := windowsPath.FindStringSubmatch(guest)
		switch {
		case within(sandbox, filepath.Clean(guest)) && strings.HasPrefix(guest, "/"):
			p = filepath.Clean(guest)
		case m == nil || (m[1] == "" && (m[2] == "" || strings.HasPrefix(m[2], `\\`))):
			return "", gfault(&types.InvalidArgument{InvalidProperty: "path"},
				"%q is not an absolute C: path", guest)
		case m[1] != "" && strings.ToUpper(m[1]) != "C":
			return "", gfault(&types.InvalidArgument{InvalidProperty: "path"},
				"drive %s: does not exist on the lab guest (only C:): %q", strings.ToUpper(m[1]), guest)
		default:
			p = filepath.Join(sandbox, filepath.FromSlash(strings.ReplaceAll(m[2], `\`, "/")))
		}
	} else {
		clean := filepath.Clean("/" + guest)
		if within(sandbox, clean) {
			p = clean
		} else {
			p = filepath.Join(sandbox, clean)
		}
	}
	if !within(sandbox, p) {
		return "", gfault(&types.InvalidArgument{InvalidProperty: "path"}, "%q leaves the guest's file system", guest)
	}
	return p, nil
}

// guestPath maps a sandbox path back to the path the guest would report.
func (v *guestVM) guestPath(host string) string {
	if !v.windows() {
		return host
	}
	rel, err := filepath.Rel(filepath.Clean(v.spec.Sandbox), host)
	if err != nil || rel == "." {
		return `C:\`
	}
	return `C:\` + strings.ReplaceAll(filepath.ToSlash(rel), "/", `\`)
}

func (v *guestVM) tempDir() string {
	if v.windows() {
		return filepath.Join(v.spec.Sandbox, "Windows", "Temp")
	}
	return filepath.Join(v.spec.Sandbox, "tmp")
}

// mkdirAll creates directories owned by the guest's account.
func (v *guestVM) mkdirAll(dir string) error {
	sandbox := filepath.Clean(v.spec.Sandbox)
	var missing []string
	for d := dir; within(sandbox, d) && d != sandbox; d = filepath.Dir(d) {
		if _, err := os.Stat(d); err == nil {
			break
		}
		missing = append(missing, d)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		if err := os.Mkdir(missing[i], 0o755); err != nil && !os.IsExist(err) {
			return err
		}
		_ = os.Chown(missing[i], v.uid, v.gid)
	}
	return nil
}

func randomToken(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func fileFaultFor(path string, err error) types.BaseMethodFault {
	if os.IsNotExist(err) {
		return &types.FileNotFound{FileFault: types.FileFault{File: path}}
	}
	if os.IsExist(err) {
		return &types.FileAlreadyExists{FileFault: types.FileFault{File: path}}
	}
	if os.IsPermission(err) {
		return &types.NoPermission{}
	}
	return &types.FileFault{File: path}
}

// ---- processes ---------------------------------------------------------------------------

var (
	linuxArgPath   = regexp.MustCompile(`(^|[\s=<>'"])(/[^\s'"<>|;&()]*)`)
	windowsArgPath = regexp.MustCompile(`"([A-Za-z]:\\[^"]*)"|([A-Za-z]:\\[^\s"<>|&]*)`)
	psEncoded      = regexp.MustCompile(`(?i)(^|\s)[-/](EncodedCommand|enc|ec|e)\s+(\S+)`)
)

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// commandLine turns a GuestProgramSpec into the shell command the lab runs.
func (v *guestVM) commandLine(spec *types.GuestProgramSpec) (string, *guestFault) {
	if v.windows() {
		return v.windowsCommandLine(spec)
	}
	program := spec.ProgramPath
	if mapped, f := v.hostPath(program); f == nil {
		if _, err := os.Stat(mapped); err == nil {
			program = mapped
		} else if _, err := os.Stat(spec.ProgramPath); err != nil {
			return "", gfault(fileFaultFor(spec.ProgramPath, err), "program %s not found in the guest", spec.ProgramPath)
		}
	}
	sandbox := filepath.Clean(v.spec.Sandbox)
	args := linuxArgPath.ReplaceAllStringFunc(spec.Arguments, func(m string) string {
		sub := linuxArgPath.FindStringSubmatch(m)
		p := filepath.Clean(sub[2])
		if within(sandbox, p) {
			return m
		}
		mapped := filepath.Join(sandbox, p)
		if _, err := os.Stat(filepath.Dir(mapped)); err != nil || filepath.Dir(mapped) == sandbox {
			return m
		}
		return sub[1] + mapped
	})
	return shellQuote(program) + " " + args, nil
}

// windowsCommandLine applies the stand-in rule described at the top of this file.
func (v *guestVM) windowsCommandLine(spec *types.GuestProgramSpec) (string, *guestFault) {
	var bad *guestFault
	args := psEncoded.ReplaceAllStringFunc(spec.Arguments, func(m string) string {
		sub := psEncoded.FindStringSubmatch(m)
		text, err := decodePowerShell(sub[3])
		if err != nil {
			bad = gfault(&types.InvalidArgument{InvalidProperty: "arguments"}, "bad -EncodedCommand: %v", err)
			return m
		}
		return sub[1] + "-Command " + shellQuote(text)
	})
	if bad != nil {
		return "", bad
	}
	args = windowsArgPath.ReplaceAllStringFunc(args, func(m string) string {
		sub := windowsArgPath.FindStringSubmatch(m)
		mapped, f := v.hostPath(sub[1] + sub[2])
		if f != nil {
			return m
		}
		return shellQuote(mapped)
	})
	name := strings.ToLower(filepath.Base(strings.ReplaceAll(spec.ProgramPath, `\`, "/")))
	switch strings.TrimSuffix(name, ".exe") {
	case "powershell", "pwsh":
		return "powershell " + args, nil
	case "cmd":
		return "cmd " + args, nil
	}
	mapped, f := v.hostPath(spec.ProgramPath)
	if f != nil {
		return "", f
	}
	if _, err := os.Stat(mapped); err != nil {
		return "", gfault(fileFaultFor(spec.ProgramPath, err), "program %s not found in the guest", spec.ProgramPath)
	}
	return "labscript " + shellQuote(mapped) + " " + args, nil
}

func (m *LabGuestProcessManager) StartProgramInGuest(ctx *simulator.Context, req *types.StartProgramInGuest) soap.HasFault {
	body := new(methods.StartProgramInGuestBody)
	pid, f := m.g.start(req)
	if f != nil {
		body.Fault_ = f.soap()
		return body
	}
	body.Res = &types.StartProgramInGuestResponse{Returnval: pid}
	return body
}

func (g *guestOps) start(req *types.StartProgramInGuest) (int64, *guestFault) {
	v, f := g.prepare(req.Vm, req.Auth)
	if f != nil {
		return 0, f
	}
	spec := req.Spec.GetGuestProgramSpec()
	line, f := v.commandLine(spec)
	if f != nil {
		return 0, f
	}
	dir := v.spec.Sandbox
	if spec.WorkingDirectory != "" {
		d, f := v.hostPath(spec.WorkingDirectory)
		if f != nil {
			return 0, f
		}
		if st, err := os.Stat(d); err != nil || !st.IsDir() {
			return 0, gfault(&types.FileNotFound{FileFault: types.FileFault{File: spec.WorkingDirectory}},
				"working directory %s does not exist in the guest", spec.WorkingDirectory)
		}
		dir = d
	}
	cmd := exec.Command("/bin/sh", "-c", line)
	cmd.Dir = dir
	path := systemPath
	if v.windows() {
		path = g.shimDir() + ":" + path
	}
	cmd.Env = append([]string{
		"PATH=" + path,
		"HOME=" + v.spec.Sandbox,
		"USER=" + v.spec.User,
		"LOGNAME=" + v.spec.User,
		"LANG=C.UTF-8",
		"TMPDIR=" + v.tempDir(),
		"VBRD_GUEST_ROOT=" + v.spec.Sandbox,
	}, spec.EnvVariables...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if os.Geteuid() == 0 && !v.windows() {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(v.uid), Gid: uint32(v.gid)}
	}
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return 0, gfault(&types.SystemError{Reason: err.Error()}, "%v", err)
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, devnull
	if err := cmd.Start(); err != nil {
		devnull.Close()
		return 0, gfault(&types.SystemError{Reason: err.Error()}, "starting %s: %v", spec.ProgramPath, err)
	}
	devnull.Close()
	pid := int64(cmd.Process.Pid)
	proc := &guestProc{cmd: cmd, info: types.GuestProcessInfo{
		Name:      filepath.Base(strings.ReplaceAll(spec.ProgramPath, `\`, "/")),
		Pid:       pid,
		Owner:     v.spec.User,
		CmdLine:   strings.TrimSpace(spec.ProgramPath + " " + spec.Arguments),
		StartTime: time.Now(),
	}}
	g.mu.Lock()
	if g.procs[v.ref.Value] == nil {
		g.procs[v.ref.Value] = make(map[int64]*guestProc)
	}
	g.procs[v.ref.Value][pid] = proc
	g.mu.Unlock()
	log.Printf("labsim: %s: started pid %d: %s", v.name, pid, line)
	go func() {
		err := cmd.Wait()
		code := 0
		if err != nil {
			if ee, ok := err.(*exec.ExitError); ok {
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					code = 128 + int(ws.Signal())
				} else {
					code = ee.ExitCode()
				}
			} else {
				code = 1
			}
		}
		end := time.Now()
		g.mu.Lock()
		proc.done = true
		proc.info.EndTime = &end
		proc.info.ExitCode = int32(code)
		g.mu.Unlock()
	}()
	return pid, nil
}

// ListProcessesInGuestResponse replaces the generated type, whose exitCode is omitempty: a
// process that exited with 0 must say so (vSphere sends exitCode 0 once endTime is set).
type ListProcessesInGuestResponse struct {
	Returnval []guestProcessInfo `xml:"returnval,omitempty"`
}

type guestProcessInfo struct {
	Name      string     `xml:"name"`
	Pid       int64      `xml:"pid"`
	Owner     string     `xml:"owner"`
	CmdLine   string     `xml:"cmdLine"`
	StartTime time.Time  `xml:"startTime"`
	EndTime   *time.Time `xml:"endTime,omitempty"`
	ExitCode  *int32     `xml:"exitCode,omitempty"`
}

type listProcessesBody struct {
	Res    *ListProcessesInGuestResponse
	Fault_ *soap.Fault
}

func (b *listProcessesBody) Fault() *soap.Fault { return b.Fault_ }

func (m *LabGuestProcessManager) ListProcessesInGuest(ctx *simulator.Context, req *types.ListProcessesInGuest) soap.HasFault {
	body := new(listProcessesBody)
	v, f := m.g.prepare(req.Vm, req.Auth)
	if f != nil {
		body.Fault_ = f.soap()
		return body
	}
	m.g.mu.Lock()
	procs := m.g.procs[v.ref.Value]
	var out []types.GuestProcessInfo
	if len(req.Pids) == 0 {
		for _, p := range procs {
			out = append(out, p.info)
		}
	} else {
		for _, pid := range req.Pids {
			if p, ok := procs[pid]; ok {
				out = append(out, p.info)
			}
		}
	}
	m.g.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Pid < out[j].Pid })
	res := &ListProcessesInGuestResponse{}
	for _, p := range out {
		info := guestProcessInfo{Name: p.Name, Pid: p.Pid, Owner: p.Owner, CmdLine: p.CmdLine,
			StartTime: p.StartTime, EndTime: p.EndTime}
		if p.EndTime != nil {
			code := p.ExitCode
			info.ExitCode = &code
		}
		res.Returnval = append(res.Returnval, info)
	}
	body.Res = res
	return body
}

func (m *LabGuestProcessManager) TerminateProcessInGuest(ctx *simulator.Context, req *types.TerminateProcessInGuest) soap.HasFault {
	body := new(methods.TerminateProcessInGuestBody)
	v, f := m.g.prepare(req.Vm, req.Auth)
	if f != nil {
		body.Fault_ = f.soap()
		return body
	}
	m.g.mu.Lock()
	p, ok := m.g.procs[v.ref.Value][req.Pid]
	m.g.mu.Unlock()
	if !ok {
		body.Fault_ = gfault(&types.GuestProcessNotFound{Pid: req.Pid}, "no process %d in the guest", req.Pid).soap()
		return body
	}
	if !p.done {
		_ = syscall.Kill(-int(req.Pid), syscall.SIGKILL)
	}
	body.Res = new(types.TerminateProcessInGuestResponse)
	return body
}

func (m *LabGuestProcessManager) ReadEnvironmentVariableInGuest(ctx *simulator.Context, req *types.ReadEnvironmentVariableInGuest) soap.HasFault {
	body := new(methods.ReadEnvironmentVariableInGuestBody)
	v, f := m.g.prepare(req.Vm, req.Auth)
	if f != nil {
		body.Fault_ = f.soap()
		return body
	}
	env := map[string]string{"PATH": systemPath,
		"HOME": v.guestPath(v.spec.Sandbox), "USER": v.spec.User, "TEMP": v.guestPath(v.tempDir()),
		"TMPDIR": v.guestPath(v.tempDir())}
	var out []string
	names := req.Names
	if len(names) == 0 {
		for k := range env {
			names = append(names, k)
		}
		sort.Strings(names)
	}
	for _, n := range names {
		if val, ok := env[n]; ok {
			out = append(out, n+"="+val)
		}
	}
	body.Res = &types.ReadEnvironmentVariableInGuestResponse{Returnval: out}
	return body
}

// ---- files ---------------------------------------------------------------------------------

func (g *guestOps) transferURL(token string) string {
	u := g.lab.baseURL
	u.Path = guestFilePath
	u.RawQuery = url.Values{"id": []string{token}}.Encode()
	return u.String()
}

func (m *LabGuestFileManager) InitiateFileTransferToGuest(ctx *simulator.Context, req *types.InitiateFileTransferToGuest) soap.HasFault {
	body := new(methods.InitiateFileTransferToGuestBody)
	v, f := m.g.prepare(req.Vm, req.Auth)
	if f == nil {
		var path string
		path, f = v.hostPath(req.GuestFilePath)
		if f == nil {
			if st, err := os.Stat(filepath.Dir(path)); err != nil || !st.IsDir() {
				f = gfault(&types.FileNotFound{FileFault: types.FileFault{File: req.GuestFilePath}},
					"the directory of %s does not exist in the guest", req.GuestFilePath)
			} else if _, err := os.Stat(path); err == nil && !req.Overwrite {
				f = gfault(&types.FileAlreadyExists{FileFault: types.FileFault{File: req.GuestFilePath}},
					"%s already exists in the guest", req.GuestFilePath)
			} else {
				token := randomToken(16)
				m.g.mu.Lock()
				m.g.transfers[token] = &transfer{path: path, upload: true, expires: time.Now().Add(30 * time.Minute), uid: v.uid, gid: v.gid}
				m.g.mu.Unlock()
				body.Res = &types.InitiateFileTransferToGuestResponse{Returnval: m.g.transferURL(token)}
				return body
			}
		}
	}
	body.Fault_ = f.soap()
	return body
}

func (m *LabGuestFileManager) InitiateFileTransferFromGuest(ctx *simulator.Context, req *types.InitiateFileTransferFromGuest) soap.HasFault {
	body := new(methods.InitiateFileTransferFromGuestBody)
	v, f := m.g.prepare(req.Vm, req.Auth)
	if f == nil {
		var path string
		path, f = v.hostPath(req.GuestFilePath)
		if f == nil {
			st, err := os.Stat(path)
			if err != nil || st.IsDir() {
				f = gfault(&types.FileNotFound{FileFault: types.FileFault{File: req.GuestFilePath}},
					"%s does not exist in the guest", req.GuestFilePath)
			} else {
				token := randomToken(16)
				m.g.mu.Lock()
				m.g.transfers[token] = &transfer{path: path, expires: time.Now().Add(30 * time.Minute)}
				m.g.mu.Unlock()
				mtime := st.ModTime()
				body.Res = &types.InitiateFileTransferFromGuestResponse{Returnval: types.FileTransferInformation{
					Attributes: &types.GuestFileAttributes{ModificationTime: &mtime, AccessTime: &mtime},
					Size:       st.Size(),
					Url:        m.g.transferURL(token),
				}}
				return body
			}
		}
	}
	body.Fault_ = f.soap()
	return body
}

// serveFile carries the bytes of a file transfer: GET (with ranges) from the guest, PUT to it.
func (g *guestOps) serveFile(w http.ResponseWriter, r *http.Request) {
	token := r.URL.Query().Get("id")
	g.mu.Lock()
	t, ok := g.transfers[token]
	g.mu.Unlock()
	if !ok || time.Now().After(t.expires) {
		http.Error(w, "unknown or expired file transfer", http.StatusNotFound)
		return
	}
	switch {
	case t.upload && (r.Method == http.MethodPut || r.Method == http.MethodPost):
		f, err := os.OpenFile(t.path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		_, err = io.Copy(f, r.Body)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		_ = os.Chown(t.path, t.uid, t.gid)
		w.WriteHeader(http.StatusOK)
	case !t.upload && (r.Method == http.MethodGet || r.Method == http.MethodHead):
		f, err := os.Open(t.path)
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		http.ServeContent(w, r, "", st.ModTime(), f)
	default:
		http.Error(w, "method not allowed for this transfer", http.StatusMethodNotAllowed)
	}
}

func (m *LabGuestFileManager) MakeDirectoryInGuest(ctx *simulator.Context, req *types.MakeDirectoryInGuest) soap.HasFault {
	body := new(methods.MakeDirectoryInGuestBody)
	v, f := m.g.prepare(req.Vm, req.Auth)
	if f == nil {
		var path string
		if path, f = v.hostPath(req.DirectoryPath); f == nil {
			var err error
			if req.CreateParentDirectories {
				err = v.mkdirAll(path)
			} else if err = os.Mkdir(path, 0o755); err == nil {
				_ = os.Chown(path, v.uid, v.gid)
			}
			if err == nil {
				body.Res = new(types.MakeDirectoryInGuestResponse)
				return body
			}
			f = gfault(fileFaultFor(req.DirectoryPath, err), "making %s: %v", req.DirectoryPath, err)
		}
	}
	body.Fault_ = f.soap()
	return body
}

func (m *LabGuestFileManager) DeleteFileInGuest(ctx *simulator.Context, req *types.DeleteFileInGuest) soap.HasFault {
	body := new(methods.DeleteFileInGuestBody)
	v, f := m.g.prepare(req.Vm, req.Auth)
	if f == nil {
		var path string
		if path, f = v.hostPath(req.FilePath); f == nil {
			st, err := os.Lstat(path)
			if err == nil && st.IsDir() {
				f = gfault(&types.NotAFile{FileFault: types.FileFault{File: req.FilePath}}, "%s is a directory", req.FilePath)
			} else if err = os.Remove(path); err != nil {
				f = gfault(fileFaultFor(req.FilePath, err), "deleting %s: %v", req.FilePath, err)
			} else {
				body.Res = new(types.DeleteFileInGuestResponse)
				return body
			}
		}
	}
	body.Fault_ = f.soap()
	return body
}

func (m *LabGuestFileManager) DeleteDirectoryInGuest(ctx *simulator.Context, req *types.DeleteDirectoryInGuest) soap.HasFault {
	body := new(methods.DeleteDirectoryInGuestBody)
	v, f := m.g.prepare(req.Vm, req.Auth)
	if f == nil {
		var path string
		if path, f = v.hostPath(req.DirectoryPath); f == nil {
			var err error
			if filepath.Clean(path) == filepath.Clean(v.spec.Sandbox) {
				err = os.ErrPermission
			} else if req.Recursive {
				if _, err = os.Stat(path); err == nil {
					err = os.RemoveAll(path)
				}
			} else {
				err = os.Remove(path)
			}
			if err == nil {
				body.Res = new(types.DeleteDirectoryInGuestResponse)
				return body
			}
			f = gfault(fileFaultFor(req.DirectoryPath, err), "deleting %s: %v", req.DirectoryPath, err)
		}
	}
	body.Fault_ = f.soap()
	return body
}

func (g *guestOps) createTemp(vmRef types.ManagedObjectReference, auth types.BaseGuestAuthentication, prefix, suffix, dir string, isDir bool) (string, *guestFault) {
	v, f := g.prepare(vmRef, auth)
	if f != nil {
		return "", f
	}
	parent := v.tempDir()
	if dir != "" {
		if parent, f = v.hostPath(dir); f != nil {
			return "", f
		}
	} else if err := v.mkdirAll(parent); err != nil {
		return "", gfault(fileFaultFor(parent, err), "%v", err)
	}
	for i := 0; i < 100; i++ {
		p := filepath.Join(parent, prefix+randomToken(4)+suffix)
		var err error
		if isDir {
			err = os.Mkdir(p, 0o700)
		} else {
			var fh *os.File
			if fh, err = os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600); err == nil {
				fh.Close()
			}
		}
		if os.IsExist(err) {
			continue
		}
		if err != nil {
			return "", gfault(fileFaultFor(dir, err), "creating a temporary file in %s: %v", v.guestPath(parent), err)
		}
		_ = os.Chown(p, v.uid, v.gid)
		return v.guestPath(p), nil
	}
	return "", gfault(&types.CannotCreateFile{}, "no free temporary name in %s", v.guestPath(parent))
}

func (m *LabGuestFileManager) CreateTemporaryDirectoryInGuest(ctx *simulator.Context, req *types.CreateTemporaryDirectoryInGuest) soap.HasFault {
	body := new(methods.CreateTemporaryDirectoryInGuestBody)
	p, f := m.g.createTemp(req.Vm, req.Auth, req.Prefix, req.Suffix, req.DirectoryPath, true)
	if f != nil {
		body.Fault_ = f.soap()
		return body
	}
	body.Res = &types.CreateTemporaryDirectoryInGuestResponse{Returnval: p}
	return body
}

func (m *LabGuestFileManager) CreateTemporaryFileInGuest(ctx *simulator.Context, req *types.CreateTemporaryFileInGuest) soap.HasFault {
	body := new(methods.CreateTemporaryFileInGuestBody)
	p, f := m.g.createTemp(req.Vm, req.Auth, req.Prefix, req.Suffix, req.DirectoryPath, false)
	if f != nil {
		body.Fault_ = f.soap()
		return body
	}
	body.Res = &types.CreateTemporaryFileInGuestResponse{Returnval: p}
	return body
}

func (m *LabGuestFileManager) ListFilesInGuest(ctx *simulator.Context, req *types.ListFilesInGuest) soap.HasFault {
	body := new(methods.ListFilesInGuestBody)
	v, f := m.g.prepare(req.Vm, req.Auth)
	if f == nil {
		var path string
		if path, f = v.hostPath(req.FilePath); f == nil {
			st, err := os.Stat(path)
			if err != nil {
				f = gfault(fileFaultFor(req.FilePath, err), "%s does not exist in the guest", req.FilePath)
			} else {
				var infos []os.FileInfo
				if st.IsDir() {
					entries, _ := os.ReadDir(path)
					for _, e := range entries {
						if i, err := e.Info(); err == nil {
							infos = append(infos, i)
						}
					}
				} else {
					infos = []os.FileInfo{st}
				}
				var pattern *regexp.Regexp
				if req.MatchPattern != "" {
					pattern, _ = regexp.Compile(req.MatchPattern)
				}
				var files []types.GuestFileInfo
				for _, i := range infos {
					if pattern != nil && !pattern.MatchString(i.Name()) {
						continue
					}
					kind := "file"
					if i.IsDir() {
						kind = "directory"
					} else if i.Mode()&os.ModeSymlink != 0 {
						kind = "symlink"
					}
					mtime := i.ModTime()
					files = append(files, types.GuestFileInfo{Path: i.Name(), Type: kind, Size: i.Size(),
						Attributes: &types.GuestFileAttributes{ModificationTime: &mtime, AccessTime: &mtime}})
				}
				start := int(req.Index)
				if start > len(files) {
					start = len(files)
				}
				files = files[start:]
				remaining := 0
				if req.MaxResults > 0 && len(files) > int(req.MaxResults) {
					remaining = len(files) - int(req.MaxResults)
					files = files[:req.MaxResults]
				}
				body.Res = &types.ListFilesInGuestResponse{Returnval: types.GuestListFileInfo{Files: files, Remaining: int32(remaining)}}
				return body
			}
		}
	}
	body.Fault_ = f.soap()
	return body
}

// decodePowerShell decodes powershell.exe -EncodedCommand (base64 of UTF-16LE text).
func decodePowerShell(b64 string) (string, error) {
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return "", err
	}
	if len(raw)%2 != 0 {
		return "", fmt.Errorf("odd length")
	}
	u := make([]uint16, len(raw)/2)
	for i := range u {
		u[i] = binary.LittleEndian.Uint16(raw[2*i:])
	}
	return string(utf16.Decode(u)), nil
}
