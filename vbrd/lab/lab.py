"""Start, stop, inspect and change the vSphere lab (what ``vbrd lab ...`` runs).

``up`` makes the lab in a directory that belongs to it, private to the user running it (made
0700, or taken over only when that user owns it and no one else can write to it or swap it,
see :mod:`vbrd.lab.private`; the default is ``/run/vbrd-lab`` for root, else
``$XDG_RUNTIME_DIR/vbrd-lab`` or ``~/.local/state/vbrd-lab``). Secrets and configuration are
written as new files (``O_CREAT | O_EXCL | O_NOFOLLOW``) renamed into place, never through a
link someone planted. The lab's guest accounts get search permission on it (an ACL entry).
It holds:

- ``datastores/san-ds`` and ``datastores/nfs-ds``: the datastores' files (a VMFS LUN and an
  NFS export stand-ins), holding the VMs' real VMDKs (:mod:`vbrd.lab.disks`);
- ``guests/``: the guest endpoints (:mod:`vbrd.lab.guests`), whose sandboxes are also where
  the Guest Operations API runs programs;
- ``cbt/<vm>/<key>.json|.jsonl|.lock``: each disk's change-tracking state and change log
  (see ``sim/cbt.go``), shared by the simulator and :func:`write`;
- ``proxy-root/``: what the proxy VM (``vbrd-proxy``) sees of its SCSI disks, as a Linux
  guest shows them (``sys/bus/scsi/devices/H:C:T:L``, ``dev/sdX``), kept by the simulator
  as disks are hot-added and removed (see ``sim/hotadd.go``);
- ``labsim.log``, ``labsim.pid``, ``labsim-spec.json`` (mode 0600), ``labsim-state.json``:
  the simulator (``sim/*.go``, built by :mod:`vbrd.lab.build`);
- ``vbrd.toml``, ``api-token``, ``secrets/``, ``scripts/``, ``state/``, ``repo/``: a ready
  vbrd configuration for the lab, and ``lab.json``, which describes all of it
  (docs/architecture.md, section 6).

``down`` stops every process ``up`` started and removes the directory; the last lab on the
machine to go down also removes the machine state its Linux guest needed (the ``vbrdguest``
user, ``/etc/sudoers.d/vbrd-lab``, ``/var/lib/vbrd-lab``; :func:`cleanup` when a lab directory
vanished without ``down``). Disk sizes follow
``disk_scale`` (or the environment variable ``VBRD_LAB_DISK_SCALE``) for benchmarks.
"""
from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import fcntl
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vbrd.errors import VbrdError
from vbrd.lab import build, disks, private
from vbrd.models import Extent

try:
    from vbrd.lab import guests as _guests
except ImportError:  # the guest endpoints are optional for the simulator's own use
    _guests = None  # type: ignore[assignment]

DEFAULT_DIR = private.default_dir()
#: Well-known ports the default lab takes when they are free (the README's examples use them).
DEFAULT_VCENTER_PORT = 18989
DEFAULT_API_PORT = 8470
MARKER = ".vbrd-lab"
VCENTER_USER = "administrator@vsphere.local"
DATACENTER = "DC0"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
BASE_SEED = 20240601
PROTECTED_VMS = ("linux-vm", "windows-vm", "two-disk-vm", "off-vm")
PROXY_VM = "vbrd-proxy"
#: Where the lab's VMs have their addresses (loopback): the guest networks of its jobs.
GUEST_NETWORK = "127.0.10.0/24"
EXTRA_PREFIX = "extra-vm-"

_spawned: dict[int, subprocess.Popen[bytes]] = {}


class LabError(VbrdError):
    """The lab cannot be started, used or stopped as asked."""


@dataclass(frozen=True, slots=True)
class DiskPlan:
    key: int
    datastore: str
    format: str  # flat | sparse
    size_mib: int
    filesystem: bool = True
    image: Path | None = None  # a raw image the disk is made of, instead of seeded content


@dataclass(frozen=True, slots=True)
class VmPlan:
    name: str
    host: int
    guest_id: str
    guest_full_name: str
    family: str  # linux | windows | other
    power_state: str
    disks: tuple[DiskPlan, ...]
    endpoint: str | None = None  # "linux" | "windows": the guest endpoint behind its IP
    ip: str = ""  # reported by VMware Tools; a guest endpoint's own address takes its place
    uuid: str = ""  # the BIOS UUID (config.uuid), fresh for every lab; its guest shows it


def inventory(disk_scale: float = 1.0, extra_vms: int = 0) -> list[VmPlan]:
    """The lab's VMs. Their names are a contract: jobs, tests and docs use them.

    ``extra_vms`` adds that many VMs named ``extra-vm-1``, ``extra-vm-2``, ... with three
    disks each (san-ds, nfs-ds, san-ds), for tests that need many disks at once; the default
    lab has none.
    """
    def size(mib: int) -> int:
        return max(16, round(mib * disk_scale))

    extras = [
        VmPlan(f"{EXTRA_PREFIX}{i}", i % 2, "otherLinux64Guest", "Other Linux (64-bit)",
               "linux", "poweredOn",
               (DiskPlan(2000, "san-ds", "flat", size(64)),
                DiskPlan(2001, "nfs-ds", "flat", size(64)),
                DiskPlan(2002, "san-ds", "flat", size(64))), ip=f"127.0.10.{40 + i}")
        for i in range(1, extra_vms + 1)
    ]
    return [
        VmPlan("linux-vm", 0, "debian11_64Guest", "Debian GNU/Linux 11 (64-bit)", "linux",
               "poweredOn", (DiskPlan(2000, "san-ds", "flat", size(256)),), endpoint="linux",
               ip="127.0.10.11"),
        VmPlan("windows-vm", 1, "windows2019srv_64Guest",
               "Microsoft Windows Server 2019 (64-bit)", "windows", "poweredOn",
               (DiskPlan(2000, "san-ds", "sparse", size(128)),), endpoint="windows",
               ip="127.0.10.12"),
        VmPlan("two-disk-vm", 0, "ubuntu64Guest", "Ubuntu Linux (64-bit)", "linux", "poweredOn",
               (DiskPlan(2000, "san-ds", "flat", size(96)),
                DiskPlan(2001, "nfs-ds", "flat", size(96))), ip="127.0.10.21"),
        VmPlan("off-vm", 1, "centos8_64Guest", "CentOS 8 (64-bit)", "linux", "poweredOff",
               (DiskPlan(2000, "nfs-ds", "flat", size(64)),)),
        VmPlan(PROXY_VM, 0, "debian11_64Guest", "Debian GNU/Linux 11 (64-bit)", "linux",
               "poweredOn", (DiskPlan(2000, "san-ds", "flat", 16, filesystem=False),),
               ip="127.0.0.1"),
        *extras,
    ]


_VMWARE_FAMILY = {"linux": "linuxGuest", "windows": "windowsGuest", "other": "otherGuestFamily"}


# ---- up -----------------------------------------------------------------------------------


def up(lab_dir: Path = DEFAULT_DIR, *, disk_scale: float | None = None,
       guests: bool = True, disk_images: Mapping[str, Path] | None = None,
       extra_vms: int = 0) -> Path:
    """Start the lab in ``lab_dir`` and return the path of its lab.json.

    ``extra_vms``: see :func:`inventory`.

    ``disk_images`` maps a VM name to a raw image file that becomes that VM's first disk
    (a monolithicFlat VMDK whose extent is a copy of the image, holes kept), so that a
    benchmark backs up exactly the bytes it also hands to other tools.
    """
    lab_dir = Path(lab_dir).absolute()
    if disk_scale is None:
        disk_scale = float(os.environ.get("VBRD_LAB_DISK_SCALE", "1") or 1)
    if disk_scale <= 0:
        raise LabError(f"disk_scale must be positive, not {disk_scale}")
    plans = [replace(vm, uuid=str(uuid.uuid4()))
             for vm in _with_images(inventory(disk_scale, extra_vms), disk_images or {})]
    _claim_dir(lab_dir)
    try:
        return _up(lab_dir, plans, guests)
    except BaseException:
        with contextlib.suppress(Exception):
            down(lab_dir)
        raise


def _claim_dir(lab_dir: Path) -> None:
    try:
        private.claim_dir(lab_dir)
    except OSError as e:
        raise LabError(f"cannot make the lab directory {lab_dir}: {e.strerror}") from None
    if lab_dir.exists():
        if not (lab_dir / MARKER).exists():
            if any(lab_dir.iterdir()):
                raise LabError(f"{lab_dir} exists and is not a lab directory; the lab removes its "
                               f"directory at `down`, so give an empty or new one")
        elif _simulator_alive(lab_dir):
            raise LabError(f"a lab is already running in {lab_dir}; stop it with "
                           f"`vbrd lab down --dir {lab_dir}`")
        else:
            down(lab_dir)
        private.claim_dir(lab_dir)
    private.write_private(lab_dir / MARKER, "This directory belongs to a vbrd lab; `vbrd lab "
                                            "down` removes it.\n", 0o644)


def _with_images(plans: list[VmPlan], images: Mapping[str, Path]) -> list[VmPlan]:
    """The plans with each named VM's first disk made from its raw image."""
    names = {vm.name for vm in plans}
    unknown = sorted(set(images) - names)
    if unknown:
        raise LabError(f"no lab VM is named {', '.join(unknown)} (the lab has "
                       f"{', '.join(sorted(names))})")
    out = []
    for vm in plans:
        image = images.get(vm.name)
        if image is not None:
            image = Path(image).absolute()
            try:
                size = image.stat().st_size
            except OSError as e:
                raise LabError(f"disk image {image} for {vm.name}: {e.strerror}") from None
            if size % disks.MiB or size < 16 * disks.MiB:
                raise LabError(f"disk image {image} for {vm.name} holds {size} bytes; a lab "
                               f"disk is a multiple of 1 MiB and at least 16 MiB")
            first = replace(vm.disks[0], format="flat", size_mib=size // disks.MiB,
                            filesystem=False, image=image)
            vm = replace(vm, disks=(first, *vm.disks[1:]))
        out.append(vm)
    return out


def _up(lab_dir: Path, plans: list[VmPlan], with_guests: bool) -> Path:
    for sub in ("datastores/san-ds", "datastores/nfs-ds", "guests", "cbt", "scripts", "secrets",
                "state", "repo", "tmp", "build"):
        (lab_dir / sub).mkdir(parents=True, exist_ok=True)
    (lab_dir / "secrets").chmod(0o700)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        binary = pool.submit(build.ensure_binary)
        made = {(vm.name, d.key): pool.submit(_make_disk, lab_dir, vm, d, i)
                for i, vm in enumerate(plans) for d in vm.disks}
        endpoints, warnings = _start_guests(lab_dir, plans) if with_guests else ({}, [])
        images = {k: f.result() for k, f in made.items()}
        binary_path = binary.result()
    shutil.rmtree(lab_dir / "build", ignore_errors=True)

    password = secrets.token_urlsafe(18)
    _write_secret(lab_dir / "secrets" / "vcenter-password", password)
    vix = _vix_settings(lab_dir, endpoints)
    spec = _simulator_spec(lab_dir, plans, password, endpoints, vix)
    spec_path = lab_dir / "labsim-spec.json"
    _write_secret(spec_path, json.dumps(spec, indent=2))
    state = _start_simulator(lab_dir, binary_path, spec_path)

    scripts, markers = _write_scripts(lab_dir, endpoints, vix)
    api_port = _port_for(lab_dir, DEFAULT_API_PORT) or _free_port()
    token_file = lab_dir / "api-token"
    _write_secret(token_file, secrets.token_urlsafe(32))
    config = _write_config(lab_dir, state["url"], endpoints, vix, api_port, scripts)
    info = _lab_json(lab_dir, plans, state, images, endpoints, vix, password, config,
                     api_port, token_file, scripts, markers, warnings)
    return private.write_private(lab_dir / "lab.json", json.dumps(info, indent=2) + "\n")


def _make_disk(lab_dir: Path, vm: VmPlan, d: DiskPlan, index: int) -> disks.DiskImage:
    suffix = "" if d.key == 2000 else f"_{d.key - 2000}"
    descriptor = lab_dir / "datastores" / d.datastore / vm.name / f"{vm.name}{suffix}.vmdk"
    if d.image is not None:
        return disks.import_raw(descriptor, d.image)
    return disks.make_disk(descriptor, d.size_mib * disks.MiB, BASE_SEED + 100 * index + d.key,
                           d.format, work_dir=lab_dir / "build", filesystem=d.filesystem)


def _start_guests(lab_dir: Path, plans: Sequence[VmPlan]) -> tuple[dict[str, Any], list[str]]:
    """Start the Linux and Windows guest endpoints, each showing its VM's BIOS UUID as its
    SMBIOS UUID; a guest that cannot start is reported."""
    if _guests is None:
        return {}, ["the guest endpoints (vbrd.lab.guests) are not available"]
    endpoints: dict[str, Any] = {}
    warnings: list[str] = []
    identity = {vm.endpoint: vm.uuid for vm in plans if vm.endpoint}
    for name, start in (("linux", _guests.start_linux_guest),
                        ("windows", _guests.start_windows_guest)):
        try:
            endpoints[name] = start(lab_dir, identity=identity.get(name))
        except VbrdError as e:
            warnings.append(f"the {name} guest endpoint did not start: {e}")
    return endpoints, warnings


@dataclass(frozen=True, slots=True)
class VixAccess:
    """What the simulator's Guest Operations API accepts for one VM, and where it runs."""

    user: str
    password_file: Path
    sandbox: Path
    os: str
    run_as: str


def _vix_settings(lab_dir: Path, endpoints: dict[str, Any]) -> dict[str, VixAccess]:
    """Guest operations use the guest's own account and file system (its endpoint's root)."""
    settings: dict[str, VixAccess] = {}
    for vm, os_name, user in (("linux-vm", "linux", "vbrdguest"),
                              ("windows-vm", "windows", "Administrator")):
        ep = endpoints.get(os_name)
        if ep is not None:
            settings[vm] = VixAccess(ep.user, Path(ep.password_file), Path(ep.root), os_name,
                                     ep.user)
            continue
        password_file = lab_dir / "secrets" / f"{os_name}-guest-password"
        if not password_file.exists():
            _write_secret(password_file, secrets.token_urlsafe(18))
        sandbox = lab_dir / "guests" / vm / "vix"
        sandbox.mkdir(parents=True, exist_ok=True)
        sandbox.parent.chmod(0o755)
        if os_name == "linux" and os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(sandbox, nobody.pw_uid, nobody.pw_gid)
            for directory in [sandbox.parent, *sandbox.parent.parents]:
                if directory == lab_dir.parent:
                    break
                private.grant_search(directory, nobody.pw_uid)
        settings[vm] = VixAccess(user, password_file, sandbox, os_name, "nobody")
    return settings


def _simulator_spec(lab_dir: Path, plans: Sequence[VmPlan], password: str,
                    endpoints: dict[str, Any], vix: dict[str, VixAccess]) -> dict[str, Any]:
    vms = []
    for vm in plans:
        ep = endpoints.get(vm.endpoint) if vm.endpoint else None
        ip = ep.host if ep is not None else vm.ip
        access = vix.get(vm.name)
        vms.append({
            "name": vm.name,
            "host": vm.host,
            "guest_id": vm.guest_id,
            "guest_full_name": vm.guest_full_name,
            "guest_family": _VMWARE_FAMILY[vm.family],
            "hostname": vm.name if vm.family != "windows" else "VBRD-WIN",
            "ip": ip,
            "tools_running": vm.power_state == "poweredOn",
            "power_state": vm.power_state,
            "cbt": vm.name in PROTECTED_VMS or vm.name.startswith(EXTRA_PREFIX),
            "uuid": vm.uuid,
            "memory_mb": 1024,
            "cpus": 2,
            "guest_ops": None if access is None else {
                "user": access.user,
                "password": access.password_file.read_text().strip(),
                "sandbox": str(access.sandbox),
                "os": access.os,
                "run_as": access.run_as,
            },
            "disks": [{
                "key": d.key,
                "datastore": d.datastore,
                "path": f"{vm.name}/{vm.name}{'' if d.key == 2000 else f'_{d.key - 2000}'}.vmdk",
                "capacity": d.size_mib * disks.MiB,
            } for d in vm.disks],
        })
    return {
        "dir": str(lab_dir),
        "listen": f"127.0.0.1:{_port_for(lab_dir, DEFAULT_VCENTER_PORT)}",
        "user": VCENTER_USER,
        "password": password,
        "state_file": str(lab_dir / "labsim-state.json"),
        "cbt_dir": str(lab_dir / "cbt"),
        "hosts": 2,
        "datastores": [
            {"name": "san-ds", "dir": str(lab_dir / "datastores" / "san-ds"), "kind": "vmfs"},
            {"name": "nfs-ds", "dir": str(lab_dir / "datastores" / "nfs-ds"), "kind": "nfs"},
        ],
        "vms": vms,
        "proxy_vm": PROXY_VM,
        "proxy_root": str(lab_dir / "proxy-root"),
    }


def _start_simulator(lab_dir: Path, binary: Path, spec_path: Path) -> dict[str, Any]:
    state_file = lab_dir / "labsim-state.json"
    log_path = lab_dir / "labsim.log"
    # Anything the simulator would put in a temp directory stays in the lab directory.
    env = dict(os.environ, TMPDIR=str(lab_dir / "tmp"))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([str(binary), "-spec", str(spec_path)], cwd=lab_dir, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    _spawned[proc.pid] = proc
    (lab_dir / "labsim.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + START_TIMEOUT
    while not state_file.exists():
        if proc.poll() is not None:
            raise LabError(f"the lab's vCenter simulator exited at start (code {proc.returncode});"
                           f" its log {log_path} ends with:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise LabError(f"the lab's vCenter simulator did not come up within "
                           f"{START_TIMEOUT:.0f} s; see {log_path}")
        time.sleep(0.05)
    state: dict[str, Any] = json.loads(state_file.read_text())
    versions = state["url"] + "/vimServiceVersions.xml"
    try:
        with urllib.request.urlopen(versions, timeout=10) as response:
            response.read()
    except (OSError, urllib.error.URLError) as e:
        raise LabError(f"the lab's vCenter simulator does not answer at {versions}: {e}") from e
    return state


def _write_scripts(lab_dir: Path, endpoints: dict[str, Any],
                   vix: dict[str, VixAccess]) -> tuple[dict[str, Path], dict[str, Path]]:
    """Pre-freeze/post-thaw scripts that leave a marker line (phase, uid, time) in the guest."""
    linux_root = Path(endpoints["linux"].root) if "linux" in endpoints else vix["linux-vm"].sandbox
    windows_root = (Path(endpoints["windows"].root) if "windows" in endpoints
                    else vix["windows-vm"].sandbox)
    markers = {"linux-vm": linux_root / "vbrd-markers.log",
               "windows-vm": windows_root / "vbrd-markers.log"}
    marker = markers["linux-vm"]
    marker.touch()
    with contextlib.suppress(OSError):
        st = linux_root.stat()
        os.chown(marker, st.st_uid, st.st_gid)
    stamp = "$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)"
    scripts: dict[str, Path] = {}
    for phase in ("pre-freeze", "post-thaw"):
        sh = lab_dir / "scripts" / f"{phase}.sh"
        sh.write_text(
            "#!/bin/sh\n"
            f"# vbrd lab {phase} script: appends '{phase} uid=<id -u> time=<UTC>' to the guest's\n"
            "# marker file, so tests see that it ran, when, and whether it was elevated.\n"
            "set -e\n"
            f'echo "{phase} uid=$(id -u) time={stamp}" >> {_sh_quote(str(marker))}\n')
        sh.chmod(0o755)
        ps1 = lab_dir / "scripts" / f"{phase}.ps1"
        ps1.write_text(
            f"# vbrd lab {phase} script for Windows guests. The lab's Windows guest runs only the\n"
            "# '#lab:' lines, with sh (the lab stand-in rule, see vbrd.lab.winrm).\n"
            f'Write-Output "vbrd {phase}"\n'
            f'#lab: echo "{phase} uid=$(id -u) time={stamp}" >> '
            '"$VBRD_GUEST_ROOT/vbrd-markers.log"\n')
        scripts[phase] = sh
        scripts[f"windows-{phase}"] = ps1
    return scripts, markers


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _table(name: str, values: dict[str, Any]) -> str:
    lines = [f"[{name}]"] + [f"{k} = {_toml(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def _write_config(lab_dir: Path, url: str, endpoints: dict[str, Any],
                  vix: dict[str, VixAccess], api_port: int, scripts: dict[str, Path]) -> Path:
    """A vbrd config for the lab (schema: docs of vbrd.config); every path is absolute."""
    linux, windows = endpoints.get("linux"), endpoints.get("windows")
    linux_credentials = {"user": vix["linux-vm"].user,
                         "password_file": str(vix["linux-vm"].password_file)}
    if linux is not None and getattr(linux, "key_file", None):
        linux_credentials["key_file"] = str(linux.key_file)
    parts = [
        "# vbrd configuration for the lab in this directory (written by `vbrd lab up`).\n",
        _table("daemon", {
            "state_dir": str(lab_dir / "state"),
            "api_listen": f"127.0.0.1:{api_port}",
            "api_socket": str(lab_dir / "vbrd.sock"),
            "token_file": str(lab_dir / "api-token"),
            "log_level": "info",
        }),
        _table("vcenters.lab", {
            "url": url,
            "user": VCENTER_USER,
            "password_file": str(lab_dir / "secrets" / "vcenter-password"),
            "verify_tls": False,
            "datacenter": DATACENTER,
        }),
        _table("credentials.linux-guest", linux_credentials),
        _table("credentials.windows-guest", {
            "user": vix["windows-vm"].user,
            "password_file": str(vix["windows-vm"].password_file),
        }),
        _table("proxies.local", {
            "address": "local",
            "max_tasks": 2,
            "vm": PROXY_VM,
            "network": "lab",
        }),
        _table("proxies.local.san_paths", {
            "san-ds": str(lab_dir / "datastores" / "san-ds"),
            "nfs-ds": str(lab_dir / "datastores" / "nfs-ds"),
        }),
        _table("repositories.default", {
            "path": str(lab_dir / "repo"),
            "block_size": "1MiB",
            "compression_level": 3,
            "max_tasks": 4,
            "address": "local",
            "network": "lab",
        }),
    ]
    for mode in ("san", "hotadd", "nbd", "auto"):
        parts.append(_table(f"jobs.lab-{mode}", {
            "vcenter": "lab", "repository": "default", "transport": mode, "cbt": True,
            "vms": list(PROTECTED_VMS), "schedule": "", "retention_points": 7,
        }))
    parts.append(_table("jobs.lab-guest", {
        "vcenter": "lab", "repository": "default", "transport": "auto", "cbt": True,
        "vms": ["linux-vm", "windows-vm"], "schedule": "", "retention_points": 7,
    }))
    parts.append(_table("jobs.lab-guest.guest", {
        "enabled": True,
        "on_failure": "require",
        "elevate": True,
        "linux_credentials": "linux-guest",
        "windows_credentials": "windows-guest",
        "pre_freeze": str(scripts["pre-freeze"]),
        "post_thaw": str(scripts["post-thaw"]),
        "windows_pre_freeze": str(scripts["windows-pre-freeze"]),
        "windows_post_thaw": str(scripts["windows-post-thaw"]),
        "host_key_check": "known_hosts" if linux is not None and linux.known_hosts else "tofu",
        "known_hosts": (str(linux.known_hosts) if linux is not None and linux.known_hosts
                        else str(lab_dir / "state" / "known_hosts")),
        "ssh_port": linux.port if linux is not None else 22,
        "winrm_port": windows.port if windows is not None else 5985,
        "networks": [GUEST_NETWORK],
        "timeout": "5m",
        "log_handling": "copy_only",
    }))
    # The lab's WinRM endpoint speaks HTTP Basic only (real Windows guests keep NTLM).
    parts.append(_table("plugins.guest_windows", {"transport": "basic"}))
    # The proxy VM's devices, as the simulator shows them (a real proxy reads /sys and /dev).
    parts.append(_table("plugins.transport_hotadd", {"device_root": str(lab_dir / "proxy-root")}))
    return private.write_private(lab_dir / "vbrd.toml", "\n".join(parts))


def _lab_json(lab_dir: Path, plans: Sequence[VmPlan], state: dict[str, Any],
              images: dict[tuple[str, int], disks.DiskImage], endpoints: dict[str, Any],
              vix: dict[str, VixAccess], password: str, config: Path, api_port: int,
              token_file: Path, scripts: dict[str, Path], markers: dict[str, Path],
              warnings: list[str]) -> dict[str, Any]:
    sim_vms = {v["name"]: v for v in state["vms"]}
    spec = json.loads((lab_dir / "labsim-spec.json").read_text())
    spec_vms = {v["name"]: v for v in spec["vms"]}
    vms = []
    proxy: dict[str, Any] = {}
    for plan in plans:
        sim = sim_vms[plan.name]
        ep = endpoints.get(plan.endpoint) if plan.endpoint else None
        access = vix.get(plan.name)
        entry: dict[str, Any] = {
            "name": plan.name,
            "moref": sim["moref"],
            "uuid": plan.uuid,
            "host": sim["host"],
            "guest_family": plan.family,
            "guest_id": plan.guest_id,
            "ip": spec_vms[plan.name]["ip"],
            "tools_running": spec_vms[plan.name]["tools_running"],
            "power_state": plan.power_state,
            "cbt": spec_vms[plan.name]["cbt"],
            "guest": ep.to_dict() if ep is not None else None,
            "vix": None if access is None else {
                "user": access.user, "password_file": str(access.password_file),
                "sandbox": str(access.sandbox), "os": access.os, "run_as": access.run_as},
            "marker_file": str(markers[plan.name]) if plan.name in markers else None,
            "disks": [],
        }
        for d, sd in zip(plan.disks, sim["disks"], strict=True):
            image = images[(plan.name, d.key)]
            entry["disks"].append({
                "key": sd["key"],
                "label": sd["label"],
                "capacity": sd["capacity"],
                "datastore": d.datastore,
                "file": sd["file"],
                "uuid": sd["uuid"],
                "descriptor": str(image.descriptor),
                "extents": [str(e) for e in image.extents],
                "format": image.format,
                "cbt_state": str(lab_dir / "cbt" / plan.name / f"{d.key}.json"),
            })
        if plan.name == PROXY_VM:
            proxy = entry
        else:
            vms.append(entry)
    pids = {"simulator": state["pid"]}
    for name, ep in endpoints.items():
        pids[f"{name}-guest"] = ep.pid
    return {
        "dir": str(lab_dir),
        "vcenter": {
            "url": state["url"],
            "user": VCENTER_USER,
            "password": password,
            "password_file": str(lab_dir / "secrets" / "vcenter-password"),
            "datacenter": state["datacenter"],
            "cluster": state["cluster"],
            "verify_tls": False,
            "control_url": state["url"].removesuffix("/sdk") + "/lab/",
        },
        "hosts": state["hosts"],
        "datastores": state["datastores"],
        "vms": vms,
        "proxy_vm": proxy,
        "proxy_root": str(lab_dir / "proxy-root"),
        "vbrd_config": str(config),
        "api_url": f"http://127.0.0.1:{api_port}",
        "api_socket": str(lab_dir / "vbrd.sock"),
        "token_file": str(token_file),
        "scripts": {k: str(v) for k, v in scripts.items()},
        "pids": pids,
        "warnings": warnings,
    }


# ---- down, status -----------------------------------------------------------------------


def down(lab_dir: Path = DEFAULT_DIR) -> None:
    """Stop everything the lab in ``lab_dir`` runs and remove the directory."""
    lab_dir = Path(lab_dir).absolute()
    if not lab_dir.exists():
        return
    if not (lab_dir / MARKER).exists():
        raise LabError(f"{lab_dir} is not a lab directory (no {MARKER}); leaving it alone")
    pid = _read_pid(lab_dir / "labsim.pid")
    if pid is not None and _is_simulator(pid, lab_dir):
        _stop(pid)
    if _guests is not None:
        for os_name in ("linux", "windows"):
            guest_dir = lab_dir / "guests" / os_name
            if (guest_dir / "state.json").exists():
                with contextlib.suppress(VbrdError, OSError, KeyError, ValueError):
                    _guests.stop_guest(_guests.read_guest(lab_dir, os_name))
    for straggler in _processes_in(lab_dir):
        _stop(straggler)
    shutil.rmtree(lab_dir, ignore_errors=True)
    if lab_dir.exists():
        raise LabError(f"could not remove the lab directory {lab_dir}")


def status(lab_dir: Path = DEFAULT_DIR) -> dict[str, Any]:
    """Whether the lab in ``lab_dir`` runs, and its processes."""
    lab_dir = Path(lab_dir).absolute()
    info = _read_lab_json(lab_dir, required=False)
    pid = _read_pid(lab_dir / "labsim.pid")
    result: dict[str, Any] = {
        "dir": str(lab_dir),
        "lab_json": str(lab_dir / "lab.json") if info else None,
        "simulator": {"pid": pid, "running": pid is not None and _is_simulator(pid, lab_dir)},
    }
    if info:
        result["url"] = info["vcenter"]["url"]
        try:
            with urllib.request.urlopen(info["vcenter"]["url"] + "/vimServiceVersions.xml",
                                        timeout=5):
                result["answering"] = True
        except OSError:
            result["answering"] = False
        guests: dict[str, bool] = {}
        for os_name in ("linux", "windows"):
            if _guests is not None and (lab_dir / "guests" / os_name / "state.json").exists():
                with contextlib.suppress(VbrdError, OSError, KeyError, ValueError):
                    guests[os_name] = _alive(_guests.read_guest(lab_dir, os_name).pid)
        result["guests"] = guests
    return result


def _read_lab_json(lab_dir: Path, required: bool = True) -> dict[str, Any]:
    path = lab_dir / "lab.json"
    if not path.exists():
        if required:
            raise LabError(f"no lab runs in {lab_dir} ({path} is missing); start one with "
                           f"`vbrd lab up --dir {lab_dir}`")
        return {}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _is_simulator(pid: int, lab_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (_alive(pid) and len(cmdline) >= 3 and Path(cmdline[0].decode()).name.startswith(
        "labsim") and cmdline[2].decode() == str(lab_dir / "labsim-spec.json"))


def _simulator_alive(lab_dir: Path) -> bool:
    pid = _read_pid(lab_dir / "labsim.pid")
    return pid is not None and _is_simulator(pid, lab_dir)


def _processes_in(lab_dir: Path) -> list[int]:
    """Processes still working inside the lab directory (programs a guest started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cwd = Path(os.readlink(entry / "cwd"))
            if cwd == lab_dir or lab_dir in cwd.parents:
                found.append(int(entry.name))
    return found


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc = _spawned.pop(pid, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT)


# ---- write, tools, guests ---------------------------------------------------------------


@contextlib.contextmanager
def _disk_lock(lab_dir: Path, vm: str, key: int) -> Iterator[Path]:
    """The disk's change-tracking lock, shared with the simulator (sim/cbt.go)."""
    base = lab_dir / "cbt" / vm / str(key)
    if not base.with_suffix(".json").exists():
        raise LabError(f"disk {key} of {vm} has no change-tracking state in {base.parent}")
    with open(base.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield base
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write(lab_dir: Path, vm: str, *, disk_key: int | None = None, fraction: float,
          seed: int) -> list[Extent]:
    """Change ``fraction`` of a VM's disk as its guest would, and record it for CBT.

    The bytes go into the disk's current leaf: the base disk, or the newest snapshot's delta
    once a snapshot exists, so a snapshot's point-in-time content never changes. Returns the
    changed extents (4 KiB-aligned, merged, sorted).
    """
    lab_dir = Path(lab_dir).absolute()
    info = _read_lab_json(lab_dir)
    entry = next((v for v in [*info["vms"], info.get("proxy_vm") or {}]
                  if v.get("name") == vm), None)
    if entry is None:
        names = ", ".join(v["name"] for v in info["vms"])
        raise LabError(f"the lab has no VM named {vm!r} (it has {names})")
    keys = [d["key"] for d in entry["disks"]]
    key = keys[0] if disk_key is None else disk_key
    if key not in keys:
        raise LabError(f"{vm} has no disk {key} (its disks: {', '.join(map(str, keys))})")
    with _disk_lock(lab_dir, vm, key) as base:
        state = json.loads(base.with_suffix(".json").read_text())
        extents = disks.random_extents(state["capacity"], fraction, seed)
        _record_write(base, state, extents, disks.extent_data(extents, seed))
    return extents


def write_extents(lab_dir: Path, vm: str, key: int, extents: Sequence[Extent],
                  source: Path) -> None:
    """Replay a guest's writes: copy ``source``'s bytes at ``extents`` into the VM's disk.

    For a benchmark that changed a raw image itself (bench/make_disk.py ``--mutate``, whose
    changes file lists the extents): the same change reaches the lab's disk and its change
    log, so CBT reports it, and afterwards the disk holds ``source``'s bytes there.
    """
    lab_dir = Path(lab_dir).absolute()
    info = _read_lab_json(lab_dir)
    entry = next((v for v in [*info["vms"], info.get("proxy_vm") or {}]
                  if v.get("name") == vm), None)
    if entry is None or key not in [d["key"] for d in entry["disks"]]:
        raise LabError(f"the lab has no disk {key} on a VM named {vm!r}")
    with _disk_lock(lab_dir, vm, key) as base:
        state = json.loads(base.with_suffix(".json").read_text())
        outside = [e for e in extents if e.offset < 0 or e.end > state["capacity"]]
        if outside:
            raise LabError(f"extent {outside[0]} lies outside disk {key} of {vm} "
                           f"({state['capacity']} bytes)")
        _record_write(base, state, extents, disks.read_extents(Path(source), extents))


def _record_write(base: Path, state: dict[str, Any], extents: Sequence[Extent],
                  data: Sequence[bytes]) -> None:
    """Write into the disk's current leaf and append the extents to its change log."""
    disks.write_extents(Path(state["leaf"]), extents, data)
    if state.get("enabled"):
        record = {"epoch": state["epoch"], "seq": state["seq"] + 1,
                  "extents": [[e.offset, e.length] for e in extents]}
        with open(base.with_suffix(".jsonl"), "a") as log:
            log.write(json.dumps(record) + "\n")
            log.flush()
            os.fsync(log.fileno())


def set_tools_running(lab_dir: Path, vm: str, running: bool) -> None:
    """Switch a VM's VMware Tools on or off (guest operations then fail as in vSphere)."""
    info = _read_lab_json(Path(lab_dir).absolute())
    vc = info["vcenter"]
    query = urllib.parse.urlencode({"vm": vm, "running": "true" if running else "false"})
    request = urllib.request.Request(vc["control_url"] + "tools?" + query, method="POST")
    token = base64.b64encode(f"{vc['user']}:{vc['password']}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    except urllib.error.HTTPError as e:
        raise LabError(f"switching the tools of {vm}: {e.read().decode().strip()}") from e


def cleanup() -> list[str]:
    """Remove the machine state the lab's Linux guest needs when no lab holds it any more
    (what the last ``down`` does by itself); returns what was removed."""
    if _guests is None:
        return []
    return _guests.cleanup()


def set_guest_identity(lab_dir: Path, os_name: str, system_uuid: str) -> None:
    """Make a guest endpoint show ``system_uuid`` as its SMBIOS UUID (the VM's own BIOS UUID
    is in lab.json): it then stands for a machine that is not its VM's guest."""
    if _guests is None:
        raise LabError("the guest endpoints (vbrd.lab.guests) are not available")
    _guests.set_guest_identity(Path(lab_dir).absolute(), os_name, system_uuid)


def set_guest(lab_dir: Path, os_name: str, running: bool) -> None:
    """Switch a guest's network endpoint off (VIX fallback) or on again."""
    if _guests is None:
        raise LabError("the guest endpoints (vbrd.lab.guests) are not available")
    _guests.set_guest_running(Path(lab_dir).absolute(), os_name, running)


# ---- helpers -------------------------------------------------------------------------------


def _write_secret(path: Path, text: str) -> None:
    private.write_private(path, text if text.endswith("\n") else text + "\n")


def _port_for(lab_dir: Path, well_known: int) -> int:
    """The well-known port for the default lab (as the README shows it) when it is
    free; 0 (any free port) for every other lab directory."""
    if Path(lab_dir).absolute() != DEFAULT_DIR:
        return 0
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", well_known))
        except OSError:
            return 0
    return well_known


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""

