"""Disks and datastore access for tests and the lab.

VMDK files are made with ``qemu-img``/``qemu-io`` (Debian ``qemu-utils``), which also serve as
the independent reference a reader's output is compared with. :func:`serve_datastores` is a
small ``/folder`` endpoint as vCenter and ESXi offer it (basic auth, ``dcPath``/``dsName``,
``Range``), for tests that must not depend on the vSphere simulator.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import hdrs, web

CHUNK = 4 << 20


def run(*args: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed: {done.stderr.strip()}")
    return done.stdout


def make_raw(path: Path, size: int, writes: Iterable[tuple[int, bytes]] = ()) -> Path:
    """A sparse raw image of ``size`` bytes holding ``writes`` ((offset, data), ...)."""
    with open(path, "wb") as out:
        out.truncate(size)
        for offset, data in writes:
            out.seek(offset)
            out.write(data)
    return path


def convert(raw: Path, vmdk: Path, subformat: str = "monolithicFlat") -> Path:
    """raw → VMDK: ``monolithicFlat`` (descriptor + ``-flat.vmdk``, as ESXi keeps base
    disks), ``monolithicSparse``, ``twoGbMaxExtentSparse``/``Flat``."""
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}",
        raw, vmdk)
    return vmdk


def create_child(parent: Path, child: Path) -> Path:
    """A hosted sparse delta on ``parent`` (named relative to the child's directory, as a
    snapshot names its parent)."""
    hint = os.path.relpath(parent, child.parent)
    run("qemu-img", "create", "-q", "-f", "vmdk", "-b", hint, "-F", "vmdk", child.name,
        cwd=child.parent)
    return child


def write(vmdk: Path, offset: int, length: int, pattern: int) -> None:
    """Write ``length`` bytes of ``pattern`` at ``offset`` into the top of a chain, as a
    guest would after a snapshot."""
    run("qemu-io", "-f", "vmdk", "-c", f"write -P {pattern:#x} {offset} {length}", vmdk)


def to_raw(vmdk: Path, raw: Path) -> Path:
    """What qemu reads from the whole chain, as a raw file."""
    run("qemu-img", "convert", "-O", "raw", vmdk, raw)
    return raw


def read_slice(vmdk: Path, offset: int, length: int, scratch: Path) -> bytes:
    """What qemu reads from ``[offset, offset+length)`` of the chain, without converting
    all of a large disk."""
    start = offset - offset % 512
    size = -(-(offset + length - start) // 512) * 512
    opts = f"driver=raw,offset={start},size={size},file.driver=vmdk,file.file.filename={vmdk}"
    run("qemu-img", "convert", "-O", "raw", "--image-opts", opts, scratch)
    try:
        return scratch.read_bytes()[offset - start : offset - start + length]
    finally:
        scratch.unlink()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while block := source.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# a datastore /folder endpoint


@dataclass
class DatastoreServer:
    """A running ``/folder`` endpoint and what it saw."""

    url: str  # the vCenter SDK URL, http://127.0.0.1:PORT/sdk
    latency: float = 0.0  # seconds added to every request, as a WAN would
    requests: int = 0
    in_flight: int = 0  # requests being answered (during their latency)
    max_in_flight: int = 0
    ranges: list[str] = field(default_factory=list)


@asynccontextmanager
async def serve_datastores(
    datastores: dict[str, Path],
    user: str = "",
    password: str = "",
    datacenter: str = "DC0",
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[DatastoreServer]:
    """Serve ``GET /folder/<path>?dcPath=<dc>&dsName=<ds>`` with ranges from the given
    directories on 127.0.0.1 (over TLS with ``ssl_context``). With a ``user``, requests need
    basic auth, as on vCenter."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    expected = f"Basic {token}" if user else None
    server = DatastoreServer(url="")

    async def folder(request: web.Request) -> web.StreamResponse:
        server.requests += 1
        server.in_flight += 1
        server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            if server.latency:
                await asyncio.sleep(server.latency)
            if expected is not None and request.headers.get(hdrs.AUTHORIZATION) != expected:
                raise web.HTTPUnauthorized(headers={hdrs.WWW_AUTHENTICATE: 'Basic realm="vbrd"'})
            if request.query.get("dcPath") != datacenter:
                raise web.HTTPNotFound(text="unknown datacenter")
            root = datastores.get(request.query.get("dsName", ""))
            if root is None:
                raise web.HTTPNotFound(text="unknown datastore")
            path = (root / request.match_info["path"]).resolve()
            if not path.is_relative_to(root.resolve()) or not path.is_file():
                raise web.HTTPNotFound()
            server.ranges.append(request.headers.get(hdrs.RANGE, ""))
            return web.FileResponse(path)
        finally:
            server.in_flight -= 1

    app = web.Application()
    app.router.add_get("/folder/{path:.+}", folder)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        scheme = "https" if ssl_context else "http"
        server.url = f"{scheme}://127.0.0.1:{runner.addresses[0][1]}/sdk"
        yield server
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------------------------
# a datastore of sample disks


@dataclass(frozen=True)
class SampleDisk:
    """A disk on a sample datastore and what qemu reads from it."""

    path: str  # relative to the datastore's directory, as vSphere names it
    capacity: int
    reference: Path  # qemu-img convert -O raw of the chain


def make_sample_datastore(root: Path, seed: int = 7) -> dict[str, SampleDisk]:
    """Disks of every shape a transport reads, in ``root/vm1/``:

    - ``flat``: monolithicFlat (descriptor + ``-flat.vmdk``), as ESXi keeps base disks;
    - ``sparse``: monolithicSparse;
    - ``chain``: a flat base with two hosted sparse snapshot deltas written after each
      snapshot, read from the newest delta.

    Capacities are 6 MiB plus three sectors, so the last grain of sparse disks is partial.
    """
    rng = random.Random(seed)
    folder = root / "vm1"
    folder.mkdir(parents=True, exist_ok=True)
    size = 6 * 1024 * 1024 + 1536
    writes = [(rng.randrange(size - 300_000), rng.randbytes(rng.randrange(1, 300_000)))
              for _ in range(8)]
    writes.append((size - 700, rng.randbytes(700)))
    raw = make_raw(root / "base.raw", size, writes)
    flat = convert(raw, folder / "flat.vmdk", "monolithicFlat")
    sparse = convert(raw, folder / "sparse.vmdk", "monolithicSparse")
    base = convert(raw, folder / "chain.vmdk", "monolithicFlat")
    first = create_child(base, folder / "chain-000001.vmdk")
    write(first, 100_001, 150_000, 0xA1)
    write(first, size - 70_000, 70_000, 0xA2)
    second = create_child(first, folder / "chain-000002.vmdk")
    write(second, 140_000, 3_000, 0xB1)
    write(second, 4 * 1024 * 1024 - 1, 2, 0xB2)
    raw.unlink()
    disks = {}
    for name, descriptor in [("flat", flat), ("sparse", sparse), ("chain", second)]:
        reference = to_raw(descriptor, root / f"{name}.reference.raw")
        disks[name] = SampleDisk(
            str(descriptor.relative_to(root)), reference.stat().st_size, reference
        )
    return disks
