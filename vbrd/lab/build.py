"""Build the lab's simulator (``sim/*.go``) on demand and cache the binary.

The binary is named by the SHA-256 of the Go sources and kept in ``~/.cache/vbrd/`` (or
``$XDG_CACHE_HOME/vbrd``), never in the repository, so a changed source builds once and an
unchanged one never again. Builds use Debian's Go and govmomi packages in GOPATH mode
(LAB-NOTES.md); a lock keeps parallel test runs from building the same binary twice.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vbrd.errors import VbrdError

SIM_DIR = Path(__file__).resolve().parent / "sim"
GOPATH = Path("/usr/share/gocode")
GOVMOMI = GOPATH / "src/github.com/vmware/govmomi"
BUILD_TIMEOUT = 300.0


class LabBuildError(VbrdError):
    """The simulator cannot be built on this machine."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vbrd"


def sources_digest(sim_dir: Path = SIM_DIR) -> str:
    """SHA-256 over the Go sources' names and contents."""
    digest = hashlib.sha256()
    sources = sorted(sim_dir.glob("*.go"))
    if not sources:
        raise LabBuildError(f"no Go sources in {sim_dir}")
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()


def binary_path(sim_dir: Path = SIM_DIR) -> Path:
    return cache_dir() / f"labsim-{sources_digest(sim_dir)[:24]}"


def ensure_binary(sim_dir: Path = SIM_DIR) -> Path:
    """Return the simulator binary for the current sources, building it when missing."""
    target = binary_path(sim_dir)
    if os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "labsim.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.access(target, os.X_OK):
            return target
        _build(sim_dir, target)
    return target


def _build(sim_dir: Path, target: Path) -> None:
    go = shutil.which("go")
    if go is None:
        raise LabBuildError("building the lab's vCenter simulator needs Go: install the Debian "
                            "packages golang-go and golang-github-vmware-govmomi-dev")
    if not (GOVMOMI / "simulator").is_dir():
        raise LabBuildError(f"the govmomi simulator sources are missing ({GOVMOMI}): install "
                            "the Debian package golang-github-vmware-govmomi-dev")
    env = dict(os.environ, GOPATH=str(GOPATH), GO111MODULE="off", CGO_ENABLED="0")
    if "HOME" not in env and "GOCACHE" not in env:
        env["GOCACHE"] = str(cache_dir() / "go-build")
    fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [go, "build", "-ldflags=-s -w", "-o", partial, "."],
            cwd=sim_dir, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        if result.returncode != 0:
            raise LabBuildError(f"go build of the lab simulator in {sim_dir} failed:\n"
                                f"{result.stderr.strip()}")
        os.chmod(partial, 0o755)
        os.replace(partial, target)
    except subprocess.TimeoutExpired as e:
        raise LabBuildError(f"go build of the lab simulator took longer than "
                            f"{BUILD_TIMEOUT:.0f} s") from e
    finally:
        Path(partial).unlink(missing_ok=True)
