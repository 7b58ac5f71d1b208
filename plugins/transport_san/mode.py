"""The ``san`` mode: the snapshot's chain read from the datastore as this proxy mounts it.

``ProxyContext.san_paths`` maps a datastore name to the directory where this proxy sees that
datastore: an NFS export's mount point, or a VMFS volume made readable on the proxy. (Reading
a VMFS LUN by its NAA id, without a file system view, is not supported yet; such a proxy
simply has no entry and the mode says why.) ESXi may name a parent by an absolute path
``/vmfs/volumes/<datastore>/...``; those are mapped the same way, so ``san_paths`` may also
list a datastore under its UUID. On a proxy with an agent, the map is the agent's own
(its agent.toml), never one a request brings.

Every name of the chain (the leaf, each extent, each parent) is resolved through that map and
opened beneath its datastore's directory (:class:`vbrd.vmdk.datastores.DatastoreFileSpace`):
a descriptor that names a file outside the mapped datastores, directly or through a symbolic
link, is refused with the name and the datastore.

Reads are blocking ``pread`` calls run in worker threads; one chain is read by several
threads at once when the data mover asks for several chunks.
"""
from __future__ import annotations

import asyncio

from vbrd.errors import TransportError
from vbrd.models import DiskTask, ProbeResult, ProxyContext
from vbrd.protocols import probe_by_opening
from vbrd.vmdk import VmdkChain
from vbrd.vmdk.datastores import DatastoreFileSpace
from vbrd.vmdk.reader import ThreadedChainReader


class SanMode:
    """Direct SAN / NFS access."""

    name = "san"

    async def probe(self, task: DiskTask, context: ProxyContext) -> ProbeResult:
        """Usable when the datastore is mapped here and every file of the snapshot's chain
        opens and parses; otherwise the reason names the datastore and the file."""
        return await probe_by_opening(self, task, context)

    async def open(self, task: DiskTask, context: ProxyContext) -> ThreadedChainReader:
        space = DatastoreFileSpace(context.san_paths, context.proxy)
        try:
            leaf = space.locate(task.backing.datastore, task.backing.path)
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
