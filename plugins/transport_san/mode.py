"""The ``san`` mode: the snapshot's chain read from the datastore as this proxy mounts it.

``ProxyContext.san_paths`` maps a datastore name to the directory where this proxy sees that
datastore: an NFS export's mount point, or a VMFS volume made readable on the proxy. (Reading
a VMFS LUN by its NAA id, without a file system view, is not supported yet; such a proxy
simply has no entry and the mode says why.) ESXi may name a parent by an absolute path
``/vmfs/volumes/<datastore>/...``; those are mapped the same way, so ``san_paths`` may also
list a datastore under its UUID.

Reads are blocking ``pread`` calls run in worker threads; one chain is read by several
threads at once when the data mover asks for several chunks.
"""
from __future__ import annotations

import asyncio
import posixpath

from vbrd.errors import TransportError
from vbrd.models import DiskTask, ProbeResult, ProxyContext
from vbrd.protocols import probe_by_opening
from vbrd.vmdk import LocalFileSpace, VmdkChain
from vbrd.vmdk.reader import ThreadedChainReader

VMFS_VOLUMES = "/vmfs/volumes/"


class SanMode:
    """Direct SAN / NFS access."""

    name = "san"

    async def probe(self, task: DiskTask, context: ProxyContext) -> ProbeResult:
        """Usable when the datastore is mapped here and every file of the snapshot's chain
        opens and parses; otherwise the reason names the datastore and the file."""
        return await probe_by_opening(self, task, context)

    async def open(self, task: DiskTask, context: ProxyContext) -> ThreadedChainReader:
        leaf = leaf_path(task, context)
        space = LocalFileSpace(lambda name: map_vmfs_path(name, context))
        try:
            chain = await asyncio.to_thread(VmdkChain.open, leaf, space,
                                            task.capacity or None)
        except TransportError as exc:
            raise TransportError(f"san: {task.backing}: {exc}") from exc
        if task.capacity and task.capacity != chain.capacity:
            await asyncio.to_thread(chain.close)
            raise TransportError(
                f"san: {task.backing}: vSphere reports {task.capacity} bytes, the disk chain "
                f"on {leaf} holds {chain.capacity}"
            )
        return ThreadedChainReader(chain)


def leaf_path(task: DiskTask, context: ProxyContext) -> str:
    """Where this proxy sees the snapshot's descriptor."""
    datastore = task.backing.datastore
    root = context.san_paths.get(datastore)
    if root is None:
        known = ", ".join(sorted(context.san_paths)) or "none"
        raise TransportError(
            f"san: datastore {datastore} is not mapped on proxy {context.proxy or 'this proxy'} "
            f"(its san_paths map: {known})"
        )
    return _inside(root, task.backing.path, f"san: {task.backing}")


def map_vmfs_path(name: str, context: ProxyContext) -> str:
    """``/vmfs/volumes/<datastore>/<path>`` → the proxy's directory for that datastore."""
    if not name.startswith(VMFS_VOLUMES):
        return name
    datastore, _, rest = name[len(VMFS_VOLUMES) :].partition("/")
    root = context.san_paths.get(datastore)
    if root is None:
        raise TransportError(
            f"the disk chain names {name}, on datastore {datastore}, which is not mapped "
            f"on proxy {context.proxy or 'this proxy'}"
        )
    return _inside(root, rest, name)


def _inside(root: str, path: str, what: str) -> str:
    joined = posixpath.normpath(posixpath.join(root, path.lstrip("/")))
    if joined != posixpath.normpath(root) and not joined.startswith(posixpath.normpath(root) + "/"):
        raise TransportError(f"{what}: the path leaves the datastore's directory {root}")
    return joined
