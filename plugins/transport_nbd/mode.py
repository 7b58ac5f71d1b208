"""The ``nbd`` mode: the snapshot's chain read with HTTP range requests.

vCenter and ESXi serve datastore files at ``/folder/<path>?dcPath=<datacenter>&dsName=<ds>``
and honour single ``Range`` requests; they accept HTTP basic auth with the vCenter user (the
same user the daemon logs in with, which needs the Datastore.Browse privilege). The chain is
the same as for ``san`` (:mod:`vbrd.vmdk`), only the byte source differs, so both modes read
identical bytes.

Each disk keeps up to :data:`IN_FLIGHT` requests in flight: the data mover's large reads are
split into :data:`REQUEST_BYTES` range requests fetched concurrently, and the grain tables a
read needs are fetched together, adjacent ones as one request.

Over HTTP the holes of a flat extent cannot be seen, so ``extents()`` reports a flat base
disk as wholly allocated (sparse layers still list only their grains); the data mover drops
zero blocks anyway, and an incremental narrows the reads with CBT.
"""
from __future__ import annotations

import asyncio
import base64
import posixpath
from collections.abc import AsyncIterator

import aiohttp
from yarl import URL

from vbrd.errors import TransportError
from vbrd.models import DatastoreFile, DiskTask, Extent, ProbeResult, ProxyContext
from vbrd.protocols import probe_by_opening
from vbrd.vmdk import AsyncVmdkChain, HttpRangeSource

IN_FLIGHT = 8
REQUEST_BYTES = 1 << 20
VMFS_VOLUMES = "/vmfs/volumes/"


class NbdMode:
    """Network mode over datastore HTTP access."""

    name = "nbd"

    async def probe(self, task: DiskTask, context: ProxyContext) -> ProbeResult:
        """Usable when the snapshot's descriptor and every file of its chain can be fetched
        from vCenter; otherwise the reason names the datastore file and the HTTP answer."""
        return await probe_by_opening(self, task, context)

    async def open(self, task: DiskTask, context: ProxyContext) -> NbdDiskReader:
        if not context.vcenter_url:
            raise TransportError(f"nbd: {task.backing}: the proxy context names no vCenter URL")
        session = open_session(context)
        try:
            space = DatastoreHttpSpace(
                session, context.vcenter_url, task.datacenter or context.datacenter
            )
            chain = await AsyncVmdkChain.open(str(task.backing), space, chunk=REQUEST_BYTES,
                                              capacity=task.capacity or None)
            if task.capacity and task.capacity != chain.capacity:
                await chain.close()
                raise TransportError(
                    f"vSphere reports {task.capacity} bytes, the disk chain holds "
                    f"{chain.capacity}"
                )
        except TransportError as exc:
            await session.close()
            message = str(exc)
            if not message.startswith(str(task.backing)):
                message = f"{task.backing}: {message}"
            raise TransportError(f"nbd: {message}") from exc
        except BaseException:
            await session.close()
            raise
        return NbdDiskReader(chain, session)


class NbdDiskReader:
    """The snapshot's bytes over HTTP; owns its HTTP session."""

    def __init__(self, chain: AsyncVmdkChain, session: aiohttp.ClientSession) -> None:
        self._chain = chain
        self._session = session
        self.size = chain.capacity

    async def extents(self) -> AsyncIterator[Extent]:
        async for extent in self._chain.allocated_extents():
            yield extent

    async def read(self, offset: int, length: int) -> bytes:
        return await self._chain.read(offset, length)

    async def close(self) -> None:
        try:
            await self._chain.close()
        finally:
            await self._session.close()


def open_session(context: ProxyContext) -> aiohttp.ClientSession:
    """One session per disk: basic auth with the vCenter user, TLS verified unless the
    proxy context says otherwise, at most :data:`IN_FLIGHT` connections."""
    headers = {}
    if context.vcenter_user:
        headers["Authorization"] = basic_auth(
            context.vcenter_user, context.vcenter_password.reveal()
        )
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT, ssl=True if context.verify_tls else False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    return aiohttp.ClientSession(headers=headers, connector=connector, timeout=timeout)


def basic_auth(user: str, password: str) -> str:
    """The ``Authorization`` value vCenter expects (UTF-8, as for its SOAP login)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


class DatastoreHttpSpace:
    """Files named ``[datastore] path`` fetched from ``/folder`` on vCenter."""

    def __init__(
        self, session: aiohttp.ClientSession, vcenter_url: str, datacenter: str
    ) -> None:
        self._session = session
        self._base = URL(vcenter_url).with_path("/").with_query(None)
        self._datacenter = datacenter
        self._limiter = asyncio.Semaphore(IN_FLIGHT)

    def resolve(self, base: str, name: str) -> str:
        """A name from a descriptor, as a datastore path: relative to the descriptor's
        folder, or ``/vmfs/volumes/<ds>/...`` as ESXi writes parents on other datastores."""
        name = name.replace("\\", "/")
        if name.startswith("["):
            return str(DatastoreFile.parse(name))
        if name.startswith(VMFS_VOLUMES):
            datastore, _, rest = name[len(VMFS_VOLUMES) :].partition("/")
            return str(DatastoreFile(datastore, posixpath.normpath(rest)))
        if posixpath.isabs(name):
            raise TransportError(f"{base}: names {name}, which is on no datastore")
        here = DatastoreFile.parse(base)
        path = posixpath.normpath(posixpath.join(posixpath.dirname(here.path), name))
        return str(DatastoreFile(here.datastore, path))

    def url(self, location: str) -> URL:
        file = DatastoreFile.parse(location)
        return self._base.with_path(f"/folder/{file.path.lstrip('/')}").with_query(
            {"dcPath": self._datacenter, "dsName": file.datastore}
        )

    async def open(self, location: str) -> HttpRangeSource:
        return await HttpRangeSource.open(
            self._session, self.url(location), location, self._limiter
        )
