"""The lab's guests: the network endpoints behind the IP addresses the lab's VMs report.

A Linux guest is a real OpenSSH server (Debian's ``/usr/sbin/sshd``) listening on a loopback
address; a Windows guest is the WS-Management endpoint of :mod:`vbrd.lab.winrm`. Each runs under
a small supervisor process (``python -m vbrd.lab.guests supervise``) that is a Linux child
subreaper: whatever the server starts, even processes that detach or change session (sshd's
per-connection children do), stays below it, so stopping the supervisor stops all of it.
``GuestEndpoint.pid`` is the supervisor's pid.

Everything a guest makes lives under ``lab_dir/guests/<linux|windows>/`` (configuration, keys,
logs, ``state.json`` with the current pid, ``dmi/``, its hardware identity, and ``root/``, the
guest's sandbox); its password is in ``lab_dir/secrets/<linux|windows>-guest-password`` (mode
0600, written without following links).

Identity: each guest is the guest of one VM and reports that VM's BIOS UUID as its SMBIOS UUID,
where a real guest does. ``dmi/product_uuid`` (root's, mode 0400, with ``sys_vendor`` and
``product_name`` as VMware shows them) is what the Linux guest's sshd and everything it starts
see as ``/sys/class/dmi/id``: sshd runs in a mount namespace of its own with that directory
bound there (on a tmpfs over ``/sys/class`` where the machine has no DMI). The Windows guest
answers ``(Get-CimInstance Win32_ComputerSystemProduct).UUID`` from the same file. Both read
it live, so :func:`set_guest_identity` can make a guest claim to be another machine.

Machine state the Linux guest needs (it must run as root, and sets this up idempotently):

- the system user ``vbrdguest`` (``useradd --system --create-home``), whose password is set with
  chpasswd. The password is kept machine-wide in ``/var/lib/vbrd-lab/vbrdguest-password``
  (0600) and copied into each lab, so that labs started side by side (a person's lab and a test
  run) never change each other's password;
- ``/etc/sudoers.d/vbrd-lab`` granting that user passwordless sudo (checked with ``visudo -cf``
  before it is installed), as a backup service account on a real guest would have;
- ``/run/sshd``, the privilege separation directory sshd insists on;
- search permission for that user (an ACL entry, see :func:`vbrd.lab.private.grant_search`)
  on the directories above the guest's that lack it, so that the user can reach its sandbox
  ``root/`` and sshd can read ``authorized_keys`` as that user.

Every Linux guest holds that state: ``/var/lib/vbrd-lab/holders/`` has one entry per guest
(written under the machine lock ``/var/lib/vbrd-lab.lock``), and :func:`stop_guest` gives the
hold back. When the last holder lets go, the user, its home, the sudoers file and
``/var/lib/vbrd-lab`` are removed. A holder counts while its guest's ``state.json`` exists
(its lab has not gone down, even with the guest switched off); a running guest supervisor
whose sshd admits the user but never registered (an older lab), and any process of the user,
count too. :func:`cleanup` (``vbrd lab cleanup``) removes the machine state when nothing
holds it, e.g. after a lab directory was deleted without ``vbrd lab down``.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from vbrd.errors import GuestError, UsageError
from vbrd.lab.private import grant_search, write_private

LINUX_GUEST_HOST = "127.0.10.11"
WINDOWS_GUEST_HOST = "127.0.10.12"
LINUX_USER = "vbrdguest"
WINDOWS_USER = "Administrator"
WINDOWS_HOSTNAME = "VBRD-WIN"
DEFAULT_WINDOWS_SERVICES = ("MSSQLSERVER",)

SSHD = Path("/usr/sbin/sshd")
DMI_DIR = Path("/sys/class/dmi/id")
#: What VMware's virtual firmware reports besides the UUID, as a Linux guest shows it.
DMI_FILES = {"sys_vendor": "VMware, Inc.", "product_name": "VMware Virtual Platform"}
SSHD_PRIVSEP_DIR = Path("/run/sshd")
MACHINE_STATE_DIR = Path("/var/lib/vbrd-lab")
MACHINE_PASSWORD_FILE = MACHINE_STATE_DIR / "vbrdguest-password"
SUDOERS_FILE = Path("/etc/sudoers.d/vbrd-lab")
HOLDERS_DIR = MACHINE_STATE_DIR / "holders"
# Outside the state directory, which goes away while others may wait for the lock.
MACHINE_LOCK = Path("/var/lib/vbrd-lab.lock")

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
SUPERVISOR_GRACE = 3.0
SUPERVISOR_MODULE = "vbrd.lab.guests"

_OS_OF_KIND = {"ssh": "linux", "linux": "linux", "winrm": "windows", "windows": "windows"}
_KIND_OF_OS = {"linux": "ssh", "windows": "winrm"}
_spawned: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class GuestEndpoint:
    """How vbrd reaches one lab guest; what lab.json stores per VM."""

    kind: str  # "ssh" | "winrm"
    host: str
    port: int
    user: str
    password_file: str
    pid: int
    root: str
    key_file: str | None = None  # ssh: a private key that authorized_keys accepts
    known_hosts: str | None = None  # ssh: a known_hosts file naming this server's host key
    system_uuid: str = ""  # the SMBIOS UUID the guest reports: its VM's BIOS UUID

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuestEndpoint:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------
# Public interface
# --------------------------------------------------------------------------------------------


def start_linux_guest(lab_dir: Path, *, host: str = LINUX_GUEST_HOST,
                      identity: str | None = None) -> GuestEndpoint:
    """Start sshd for the Linux guest on a free port of ``host`` (provisioning the user).

    ``identity`` is the BIOS UUID of the VM this is the guest of, which the guest then shows
    as its SMBIOS UUID (a fresh random one when not given).
    """
    if os.geteuid() != 0:
        raise GuestError("the lab's Linux guest needs root: it runs sshd and creates the user "
                         f"{LINUX_USER}")
    if not SSHD.exists():
        raise GuestError(f"the lab's Linux guest needs the OpenSSH server ({SSHD} is missing); "
                         "install the Debian package openssh-server")
    guest_dir = _guest_dir(lab_dir, "linux")
    _stop_previous(guest_dir)
    system_uuid = _write_identity(guest_dir, identity)
    password = provision_linux_user(holder=guest_dir)
    user = pwd.getpwnam(LINUX_USER)
    password_file = _write_secret(lab_dir, "linux-guest-password", password)

    root = guest_dir / "root"
    root.mkdir(exist_ok=True)
    os.chown(root, user.pw_uid, user.pw_gid)
    root.chmod(0o755)
    _grant_search(guest_dir, user)
    _grant_search(root, user)

    host_key = _keygen(guest_dir / "ssh_host_ed25519_key", "vbrd-lab-linux-guest-host")
    client_key = _keygen(guest_dir / "client_key", "vbrd-lab-client")
    authorized = guest_dir / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    authorized.chmod(0o644)

    port = _free_port(host)
    known_hosts = guest_dir / "known_hosts"
    known_hosts.write_text(f"[{host}]:{port} {Path(f'{host_key}.pub').read_text()}")
    config = guest_dir / "sshd_config"
    config.write_text(_sshd_config(host, port, guest_dir, host_key, authorized, root))
    SSHD_PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    check = subprocess.run([str(SSHD), "-t", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise GuestError(f"sshd refuses the Linux guest's configuration {config}: "
                         f"{check.stderr.strip()}")

    argv = [sys.executable, "-m", SUPERVISOR_MODULE, "with-identity", "--dmi",
            str(guest_dir / "dmi"), "--",
            str(SSHD), "-D", "-f", str(config), "-E", str(guest_dir / "sshd.log")]
    endpoint = GuestEndpoint(
        kind="ssh", host=host, port=port, user=LINUX_USER, password_file=str(password_file),
        pid=0, root=str(root), key_file=str(client_key), known_hosts=str(known_hosts),
        system_uuid=system_uuid)
    return _launch(guest_dir, endpoint, argv)


def start_windows_guest(lab_dir: Path, *, host: str = WINDOWS_GUEST_HOST,
                        services: Iterable[str] | None = None,
                        hostname: str = WINDOWS_HOSTNAME,
                        identity: str | None = None) -> GuestEndpoint:
    """Start the Windows guest's WinRM endpoint on a free port of ``host``.

    ``identity``: as for :func:`start_linux_guest`.

    ``services`` are the "installed" Windows services that application discovery finds
    (written to ``root/services.json``); by default SQL Server, so that log truncation runs.
    An existing services.json is kept when ``services`` is not given.
    """
    guest_dir = _guest_dir(lab_dir, "windows")
    _stop_previous(guest_dir)
    system_uuid = _write_identity(guest_dir, identity)
    password_file = lab_dir / "secrets" / "windows-guest-password"
    password = (password_file.read_text().strip() if password_file.exists()
                else secrets.token_urlsafe(18))
    password_file = _write_secret(lab_dir, "windows-guest-password", password)
    root = guest_dir / "root"
    root.mkdir(exist_ok=True)
    services_file = root / "services.json"
    if services is not None or not services_file.exists():
        chosen = DEFAULT_WINDOWS_SERVICES if services is None else tuple(services)
        services_file.write_text(json.dumps(list(chosen), indent=2) + "\n")
    port = _free_port(host)
    argv = [sys.executable, "-m", "vbrd.lab.winrm", "--host", host, "--port", str(port),
            "--root", str(root), "--user", WINDOWS_USER, "--password-file", str(password_file),
            "--log", str(guest_dir / "winrm.log"), "--hostname", hostname,
            "--identity-file", str(guest_dir / "dmi" / "product_uuid")]
    endpoint = GuestEndpoint(kind="winrm", host=host, port=port, user=WINDOWS_USER,
                             password_file=str(password_file), pid=0, root=str(root),
                             system_uuid=system_uuid)
    return _launch(guest_dir, endpoint, argv)


def stop_guest(endpoint: GuestEndpoint) -> None:
    """Stop the guest's server and every process it started; its files stay for inspection."""
    guest_dir = Path(endpoint.root).parent
    state = _read_state(guest_dir)
    pids = {endpoint.pid}
    if state is not None:
        pids.add(state["endpoint"]["pid"])
    for pid in pids:
        if pid and _is_supervisor(pid, guest_dir):
            _terminate(pid)
    if state is not None:
        state["running"] = False
        _write_state(guest_dir, state)
    if endpoint.kind == "ssh":
        release(guest_dir)


def release(guest_dir: Path) -> bool:
    """Give back the hold ``guest_dir``'s Linux guest has on the machine state; remove that
    state when no other holder is left. Returns whether it was removed."""
    with _machine_lock():
        (HOLDERS_DIR / _holder_name(guest_dir)).unlink(missing_ok=True)
        if _holders():
            return False
        with contextlib.suppress(GuestError):  # e.g. userdel refused: a process still runs
            _remove_machine_state()
            return True
    return False


def cleanup() -> list[str]:
    """``vbrd lab cleanup``: remove the Linux guest's machine state (module docstring) when
    no lab holds it; returns what was removed. Refused, naming the holders, while any do."""
    with _machine_lock():
        holders = _holders()
        if holders:
            raise GuestError("the lab's machine state is still in use by " + "; ".join(holders)
                             + "; stop those labs with `vbrd lab down --dir DIR` first")
        return _remove_machine_state()


def set_guest_running(lab_dir: Path, kind: str, running: bool) -> None:
    """Switch a guest's server off (connections refused) or on again on the same host:port.

    Switching it off is how the lab makes a guest unreachable over the network, so that guest
    processing falls back to VIX. ``kind`` is "ssh" or "winrm" ("linux"/"windows" also do).
    """
    os_name = _OS_OF_KIND.get(kind)
    if os_name is None:
        raise UsageError(f"unknown guest kind {kind!r}: expected one of ssh, winrm")
    guest_dir = _guest_dir(lab_dir, os_name, create=False)
    state = _read_state(guest_dir)
    if state is None:
        raise GuestError(f"no {os_name} guest was started in {lab_dir}")
    pid = state["endpoint"]["pid"]
    alive = bool(pid) and _is_supervisor(pid, guest_dir)
    if running and not alive:
        endpoint = GuestEndpoint.from_dict(state["endpoint"])
        _launch(guest_dir, endpoint, state["argv"])
    elif not running:
        if alive:
            _terminate(pid)
        state["running"] = False
        _write_state(guest_dir, state)


def read_guest(lab_dir: Path, os_name: str) -> GuestEndpoint:
    """The endpoint of a lab's guest as it is now (its pid changes when it is switched on)."""
    state = _read_state(_guest_dir(lab_dir, os_name, create=False))
    if state is None:
        raise GuestError(f"no {os_name} guest was started in {lab_dir}")
    return GuestEndpoint.from_dict(state["endpoint"])


def set_guest_identity(lab_dir: Path, os_name: str, system_uuid: str) -> None:
    """Make a running guest report ``system_uuid`` as its SMBIOS UUID from now on: how the
    lab stands for a machine that is not the VM's guest (an address someone else holds)."""
    guest_dir = _guest_dir(lab_dir, os_name, create=False)
    if _read_state(guest_dir) is None:
        raise GuestError(f"no {os_name} guest was started in {lab_dir}")
    _write_identity(guest_dir, system_uuid)


def _remove_machine_state() -> list[str]:
    """Remove user, home, sudoers file and state directory (under the machine lock)."""
    removed: list[str] = []
    with contextlib.suppress(KeyError):
        pwd.getpwnam(LINUX_USER)
        _run(["userdel", "--remove", LINUX_USER], f"remove the user {LINUX_USER}")
        removed.append(f"the user {LINUX_USER} and its home")
    if SUDOERS_FILE.exists():
        SUDOERS_FILE.unlink()
        removed.append(str(SUDOERS_FILE))
    if MACHINE_STATE_DIR.exists():
        shutil.rmtree(MACHINE_STATE_DIR)
        removed.append(str(MACHINE_STATE_DIR))
    return removed


def _holder_name(guest_dir: Path) -> str:
    return hashlib.sha256(str(Path(guest_dir).absolute()).encode()).hexdigest()[:32]


def _holders() -> list[str]:
    """Who still needs the machine state (see the module docstring), for people."""
    found: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(HOLDERS_DIR.iterdir()):
            guest_dir = Path(entry.read_text().strip())
            if (guest_dir / "state.json").exists():
                found.append(f"the Linux guest in {guest_dir}")
            else:
                entry.unlink(missing_ok=True)  # its lab directory is gone
    registered = set(found)
    for pid, guest_dir in _linux_supervisors():
        if f"the Linux guest in {guest_dir}" not in registered:
            found.append(f"the running Linux guest in {guest_dir} (pid {pid})")
    try:
        uid = pwd.getpwnam(LINUX_USER).pw_uid
    except KeyError:
        return found
    for pid in _pids_of(uid):
        found.append(f"a process of {LINUX_USER} (pid {pid})")
    return found


def _linux_supervisors() -> list[tuple[int, Path]]:
    """Running guest supervisors whose sshd admits :data:`LINUX_USER`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if SUPERVISOR_MODULE.encode() not in argv or b"supervise" not in argv:
            continue
        with contextlib.suppress(ValueError, IndexError, OSError):
            guest_dir = Path(argv[argv.index(b"--guest-dir") + 1].decode())
            config = (guest_dir / "sshd_config").read_text()
            if f"AllowUsers {LINUX_USER}\n" in config and _alive(int(entry.name)):
                found.append((int(entry.name), guest_dir))
    return found


def _pids_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid and _alive(int(entry.name)):
                    found.append(int(entry.name))
    return found


# --------------------------------------------------------------------------------------------
# Linux guest provisioning
# --------------------------------------------------------------------------------------------


def provision_linux_user(holder: Path | None = None) -> str:
    """Make sure user, password and sudo rule exist; return the (machine-wide) password.
    ``holder`` (a guest directory) is registered as needing them (see :func:`release`)."""
    with _machine_lock():
        MACHINE_STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        if holder is not None:
            HOLDERS_DIR.mkdir(mode=0o700, exist_ok=True)
            write_private(HOLDERS_DIR / _holder_name(holder), f"{Path(holder).absolute()}\n")
        try:
            pwd.getpwnam(LINUX_USER)
        except KeyError:
            _run(["useradd", "--system", "--create-home", "--shell", "/bin/bash",
                  "--comment", "vbrd lab Linux guest", LINUX_USER], "create the guest user")
        if MACHINE_PASSWORD_FILE.exists():
            password = MACHINE_PASSWORD_FILE.read_text().strip()
        else:
            password = secrets.token_urlsafe(18)
            write_private(MACHINE_PASSWORD_FILE, password + "\n")
        _run(["chpasswd"], f"set the password of {LINUX_USER}",
             stdin=f"{LINUX_USER}:{password}\n")
        _install_sudoers()
    return password


def _install_sudoers() -> None:
    wanted = ("# vbrd lab: the Linux guest's account elevates without a password, as a backup\n"
              "# service account on a real guest would.\n"
              f"{LINUX_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    if SUDOERS_FILE.exists() and SUDOERS_FILE.read_text() == wanted:
        return
    SUDOERS_FILE.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    # sudo ignores files in sudoers.d whose names contain a dot, so the draft is never live.
    draft = write_private(SUDOERS_FILE.parent / f".{SUDOERS_FILE.name}.new", wanted, 0o440)
    try:
        _run(["visudo", "-cf", str(draft)], f"validate {SUDOERS_FILE}")
        os.replace(draft, SUDOERS_FILE)
    finally:
        draft.unlink(missing_ok=True)


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    fd = os.open(MACHINE_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _grant_search(path: Path, user: pwd.struct_passwd) -> None:
    """Let ``user`` traverse every directory from / down to ``path`` (an ACL entry for that
    user where one is missing, see :func:`vbrd.lab.private.grant_search`)."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for directory in [path, *path.parents]:
        st = directory.stat()
        if (st.st_mode & stat.S_IXOTH
                or st.st_uid == user.pw_uid and st.st_mode & stat.S_IXUSR
                or st.st_gid in groups and st.st_mode & stat.S_IXGRP):
            continue
        grant_search(directory, user.pw_uid)


def _write_identity(guest_dir: Path, identity: str | None) -> str:
    """The guest's ``dmi/`` files (see the module docstring); returns the UUID it shows."""
    system_uuid = str(uuid.UUID(identity)) if identity else str(uuid.uuid4())
    dmi = guest_dir / "dmi"
    dmi.mkdir(mode=0o755, exist_ok=True)
    for name, value in {**DMI_FILES, "product_uuid": system_uuid}.items():
        write_private(dmi / name, value + "\n", mode=0o400 if name == "product_uuid" else 0o444)
    return system_uuid


def with_identity(dmi: Path, argv: Sequence[str]) -> int:
    """Run ``argv`` (exec, same pid) in a mount namespace of its own where ``dmi`` is what
    ``/sys/class/dmi/id`` shows: the SMBIOS identity of the lab guest's virtual machine."""
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns = 0x00020000
    if libc.unshare(clone_newns) != 0:
        print(f"with-identity: cannot make a mount namespace (errno {ctypes.get_errno()})",
              file=sys.stderr, flush=True)
        return 1
    _run(["mount", "--make-rprivate", "/"], "keep the guest's mounts to itself")
    if not DMI_DIR.is_dir():
        # No DMI on this machine (a container): a small tmpfs over /sys/class gives the place.
        _run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64k", "vbrd-lab-dmi",
              str(DMI_DIR.parent.parent)], "make room for the guest's DMI identity")
        DMI_DIR.mkdir(parents=True)
    _run(["mount", "--bind", str(dmi), str(DMI_DIR)], "show the guest's DMI identity")
    os.execv(argv[0], list(argv))


def _keygen(path: Path, comment: str) -> Path:
    if not path.exists():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
             f"make the key {path}")
    path.chmod(0o600)
    return path


def _sshd_config(host: str, port: int, guest_dir: Path, host_key: Path, authorized: Path,
                 root: Path) -> str:
    return f"""\
# The lab's Linux guest (vbrd.lab.guests); rewritten at every start.
ListenAddress {host}:{port}
HostKey {host_key}
PidFile {guest_dir / 'sshd.pid'}
AuthorizedKeysFile {authorized}
AllowUsers {LINUX_USER}
PermitRootLogin no
PasswordAuthentication yes
PubkeyAuthentication yes
KbdInteractiveAuthentication no
UsePAM no
# The lab directory usually sits below world-writable /tmp, which StrictModes rejects.
StrictModes no
PrintMotd no
SetEnv VBRD_GUEST_ROOT={root}
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def _launch(guest_dir: Path, endpoint: GuestEndpoint, argv: list[str]) -> GuestEndpoint:
    """Start ``argv`` under a supervisor, wait until it accepts connections, record it."""
    supervisor_log = guest_dir / "supervisor.log"
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    with open(supervisor_log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", SUPERVISOR_MODULE, "supervise", "--guest-dir",
             str(guest_dir), "--", *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
    _spawned[proc.pid] = proc
    endpoint = GuestEndpoint(**{**endpoint.to_dict(), "pid": proc.pid})
    try:
        _wait_listening(endpoint, proc, guest_dir)
    except BaseException:
        _terminate(proc.pid)
        raise
    _write_state(guest_dir, {"kind": endpoint.kind, "argv": argv, "running": True,
                             "endpoint": endpoint.to_dict()})
    return endpoint


def _wait_listening(endpoint: GuestEndpoint, proc: subprocess.Popen[bytes],
                    guest_dir: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise GuestError(f"the lab's {endpoint.kind} guest exited at start (code "
                             f"{proc.returncode}); see the logs in {guest_dir}:\n"
                             f"{_log_tail(guest_dir)}")
        try:
            with socket.create_connection((endpoint.host, endpoint.port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise GuestError(f"the lab's {endpoint.kind} guest does not listen on "
                                 f"{endpoint.host}:{endpoint.port} after {START_TIMEOUT:.0f} s; "
                                 f"see the logs in {guest_dir}") from None
            time.sleep(0.05)


def _log_tail(guest_dir: Path, lines: int = 20) -> str:
    tails = []
    for log in sorted(guest_dir.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        if text:
            tails.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(tails)


def _terminate(pid: int) -> None:
    """Ask a supervisor to stop (it takes its whole tree down) and wait until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, STOP_TIMEOUT):
        for victim in [pid, *_descendants(pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        _wait_gone(pid, STOP_TIMEOUT)


def _wait_gone(pid: int, timeout: float) -> bool:
    proc = _spawned.get(pid)
    if proc is not None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        del _spawned[pid]
        return True
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


def _is_supervisor(pid: int, guest_dir: Path) -> bool:
    """Whether ``pid`` is the running supervisor of this guest (pids get reused)."""
    if not _alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (SUPERVISOR_MODULE.encode() in argv and b"supervise" in argv
            and str(guest_dir).encode() in argv)


def _process_table() -> dict[int, int]:
    """pid → parent pid, from /proc."""
    table: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        table[int(entry)] = int(stat_line.rsplit(")", 1)[1].split()[1])
    return table


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, parent in _process_table().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop_previous(guest_dir: Path) -> None:
    state = _read_state(guest_dir)
    if state is not None:
        pid = state["endpoint"]["pid"]
        if pid and _is_supervisor(pid, guest_dir):
            _terminate(pid)


def supervise(argv: Sequence[str]) -> int:
    """Run ``argv`` as a child subreaper; on SIGTERM, or when it exits, end the whole tree."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    if libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        print(f"supervisor: cannot become a child subreaper (errno {ctypes.get_errno()})",
              file=sys.stderr, flush=True)
        return 1
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, request_stop)
    me = os.getpid()
    server = os.posix_spawn(argv[0], list(argv), os.environ)
    status = 0
    while not stopping:
        for pid, code in _reap():
            if pid == server:
                status = code
                stopping = True
                print(f"supervisor: {argv[0]} exited with {code}", file=sys.stderr, flush=True)
        time.sleep(0.05)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + SUPERVISOR_GRACE
        for pid in _descendants(me):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        while _descendants(me) and time.monotonic() < deadline:
            _reap()
            time.sleep(0.05)
        _reap()
        if not _descendants(me):
            break
    return status


def _reap() -> list[tuple[int, int]]:
    reaped: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append((pid, os.waitstatus_to_exitcode(status)))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _guest_dir(lab_dir: Path, os_name: str, create: bool = True) -> Path:
    guest_dir = Path(lab_dir).resolve() / "guests" / os_name
    if create:
        guest_dir.mkdir(parents=True, exist_ok=True)
        guest_dir.chmod(0o755)
    return guest_dir


def _read_state(guest_dir: Path) -> dict[str, Any] | None:
    path = guest_dir / "state.json"
    if not path.exists():
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    return state


def _write_state(guest_dir: Path, state: dict[str, Any]) -> None:
    write_private(guest_dir / "state.json", json.dumps(state, indent=2) + "\n", 0o644)


def _write_secret(lab_dir: Path, name: str, value: str) -> Path:
    secrets_dir = Path(lab_dir).resolve() / "secrets"
    secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = secrets_dir / name
    _write_private(path, value)
    return path


def _write_private(path: Path, value: str) -> None:
    write_private(path, value + "\n")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _run(argv: list[str], what: str, stdin: str | None = None) -> None:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise GuestError(f"cannot {what}: {' '.join(argv[:1])} exited with "
                         f"{result.returncode}: {(result.stderr or result.stdout).strip()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {SUPERVISOR_MODULE}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("supervise", help="run a guest server and everything it starts")
    run.add_argument("--guest-dir", required=True, help="names the guest this process serves")
    run.add_argument("server", nargs=argparse.REMAINDER)
    ident = sub.add_parser("with-identity",
                           help="run a command that sees DIR as /sys/class/dmi/id")
    ident.add_argument("--dmi", required=True, help="the guest's DMI identity directory")
    ident.add_argument("server", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    server = args.server[1:] if args.server[:1] == ["--"] else args.server
    if not server:
        parser.error(f"{args.command} needs a server command after --")
    if args.command == "with-identity":
        return with_identity(Path(args.dmi), server)
    return supervise(server)


if __name__ == "__main__":
    raise SystemExit(main())
