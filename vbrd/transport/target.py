"""The repository's data mover: receive one disk's blocks and store the ones missing.

It listens, refuses any connection that does not greet with this task's token (a stray or
garbled connection gets an ERROR frame naming why, and the mover keeps listening for the real
one; a greeting is bounded and its token checked before anything else in it is read, and at
most :data:`vbrd.transport.wire.MAX_GREETINGS` connections wait to greet at once), then for
each DIGESTS batch asks the proxy only for the blocks the repository lacks and that no earlier
batch already asked for. Received blocks are written in arrival order on one
writer thread, while lookups run on another, so a slow lookup never stalls writes.

It trusts the proxy side with nothing it stores: every received block is decompressed (into
at most the length its entry declared, itself at most a block) and hashed on a pool of
verify threads before the writer may store it. A block whose data is not what its digest
names fails the transfer, naming the disk and block, and is never stored: otherwise every
later backup would deduplicate against it.

It never writes a restore point. At the end it writes the block map (see
:mod:`vbrd.transport.blockmap`) to the path the Manager named, makes every block the map names
durable (``make_blocks_durable``), and only then answers RESULT (``blocks_durable``): the
Manager commits the point once every disk of the VM has reached this state, without syncing
those blocks again.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vbrd.errors import TransportError
from vbrd.repository import DiskIndex, Repository
from vbrd.repository.blocks import BlockCodec, block_digest, frame_size, is_zero
from vbrd.repository.store import BlockDamaged, LockHold
from vbrd.transport import wire
from vbrd.transport.blockmap import BlockMapWriter
from vbrd.transport.spec import TransferRules
from vbrd.transport.wire import BlockEntry, Msg

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
WRITE_QUEUE = 16  # received blocks waiting for the writer thread
STREAM_LIMIT = 4 << 20  # socket bytes buffered before reading pauses (frames may be larger)
PATCH_WORKERS = 2  # threads rebuilding patched blocks (zstd and hashlib release the GIL)
PATCHES_AHEAD = 8  # patched blocks being rebuilt, in order, ahead of the writer
VERIFY_WORKERS = 2  # threads decompressing and hashing received blocks before they are stored


@dataclass(slots=True)
class _Session:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: str
    disk: str
    disk_size: int
    bytes_stored: int = 0
    blocks_written: int = 0
    blocks_received: int = 0
    busy: float = 0.0
    stalled: float = 0.0
    pending: set[bytes] = field(default_factory=set)
    named: set[bytes] = field(default_factory=set)  # every block the block map names
    # per batch awaiting its blocks: (digest, length, block number) of each block asked for
    expected: deque[tuple[int, deque[tuple[bytes, int, int]]]] = field(default_factory=deque)
    parent: DiskIndex | None = None


class TargetMover:
    """One disk's transfer on the repository side; :meth:`run` returns the stats as a dict."""

    def __init__(
        self,
        repository_path: str,
        rules: TransferRules,
        *,
        token: str,
        index_out: str,
        emit: Callable[[dict[str, Any]], None],
        host: str = "127.0.0.1",
        port: int = 0,
        accept_timeout: float = 3600.0,
        parent: tuple[str, int] | None = None,
    ) -> None:
        """``parent``: (restore point, disk key) an incremental's PATCH frames apply to."""
        self.repository_path = repository_path
        self.rules = rules
        self.token = token
        self.index_out = index_out
        self.emit = emit
        self.host, self.port = host, port
        self.accept_timeout = accept_timeout
        self.repo: Repository | None = None
        self._lookups = ThreadPoolExecutor(1, thread_name_prefix="vbrd-lookup")
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="vbrd-write")
        self._patchers = ThreadPoolExecutor(PATCH_WORKERS, thread_name_prefix="vbrd-patch")
        self._verifiers = ThreadPoolExecutor(VERIFY_WORKERS, thread_name_prefix="vbrd-verify")
        self.parent = parent
        self.codec = BlockCodec(rules.compression_level)
        self._session: _Session | None = None
        self._hold: LockHold | None = None
        self._done: asyncio.Future[dict[str, Any]] | None = None
        self._greeting: dict[asyncio.StreamWriter, None] = {}  # oldest first
        self._evicted: set[asyncio.StreamWriter] = set()

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        try:
            repo = self.repo = await asyncio.to_thread(Repository.open, self.repository_path)
            # the shared lock keeps gc from removing blocks we store before a point names them
            self._hold = await asyncio.to_thread(repo.writing)
            if repo.block_size != self.rules.block_size:
                raise TransportError(
                    f"repository {self.repository_path} stores blocks of "
                    f"{repo.block_size} bytes, the transfer rules say {self.rules.block_size}"
                )
            context = _server_ssl(self.rules)
            server = await asyncio.start_server(
                self._on_connect, self.host, self.port, ssl=context, limit=STREAM_LIMIT,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if context is not None else None,
            )
            try:
                host, port = server.sockets[0].getsockname()[:2]
                self.emit({"event": "listening", "host": host, "port": port})
                try:
                    return await asyncio.wait_for(asyncio.shield(self._done), self.accept_timeout)
                except TimeoutError:
                    if self._session is not None:
                        return await self._done
                    raise TransportError(
                        f"no data mover connected within {self.accept_timeout:g} s"
                    ) from None
            finally:
                server.close()
        finally:
            self._lookups.shutdown(wait=False, cancel_futures=True)
            self._patchers.shutdown(wait=False, cancel_futures=True)
            self._verifiers.shutdown(wait=False, cancel_futures=True)
            self._writes.shutdown(wait=True, cancel_futures=True)
            if self._hold is not None:
                self._hold.release()

    @property
    def _repository(self) -> Repository:
        if self.repo is None:
            raise TransportError("the repository is not open")
        return self.repo

    # ----------------------------------------------------------------------------------------
    # connections

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection, from a stranger or the proxy: nothing it sends escapes from here
        (whatever goes wrong ends this connection, never the mover)."""
        peer = _peer(writer)
        try:
            await self._connection(reader, writer, peer)
        except Exception as e:
            log.exception("the connection from %s failed", peer)
            if self._session is None or self._session.writer is not writer:
                await self._refuse(writer, peer, wire.describe(e))
        finally:
            self._greeting.pop(writer, None)
            self._evicted.discard(writer)

    async def _greet(self, reader: asyncio.StreamReader) -> tuple[str, int]:
        """The proxy's HELLO: its disk's name and size, or a ProtocolError saying why not."""
        _, payload = await wire.read_frame(reader, wire.GREETING_LIMITS)
        meta = wire.check_hello(payload, self.token)
        block_size, disk_size = meta.get("block_size"), meta.get("disk_size")
        if block_size != self.rules.block_size:
            raise wire.ProtocolError(
                f"the proxy cuts blocks of {block_size} bytes, this repository stores "
                f"{self.rules.block_size}"
            )
        if not isinstance(disk_size, int) or disk_size <= 0:
            raise wire.ProtocolError(f"the proxy announces a disk of {disk_size} bytes")
        disk = str(meta.get("disk", ""))
        if disk and meta.get("vm"):
            disk += f" of VM {meta['vm']}"
        return disk, disk_size

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          peer: str) -> None:
        if self._session is not None:
            await self._refuse(writer, peer, "another data mover is already connected for this "
                                             "task")
            return
        if len(self._greeting) >= wire.MAX_GREETINGS:
            self._evict(next(iter(self._greeting)))
        self._greeting[writer] = None
        try:
            disk, disk_size = await asyncio.wait_for(self._greet(reader), HANDSHAKE_TIMEOUT)
        except TimeoutError:
            await self._refuse(writer, peer, f"no greeting within {HANDSHAKE_TIMEOUT:g} s")
            return
        except TransportError as e:
            if writer not in self._evicted:
                await self._refuse(writer, peer, str(e))
            return
        finally:
            self._greeting.pop(writer, None)
        if self._session is not None:  # another one won while we read this greeting
            await self._refuse(writer, peer, "another data mover is already connected")
            return
        session = self._session = _Session(reader, writer, peer, disk, disk_size)
        assert self._done is not None
        try:
            result = await self._serve(session)
        except BaseException as e:
            if not writer.is_closing():
                await wire.send_error(writer, wire.describe(e) if isinstance(e, Exception) else
                                      "the repository's data mover stopped")
            if not isinstance(e, Exception):
                self._done.cancel()
                raise
            if not self._done.done():
                self._done.set_exception(e)
        else:
            if not self._done.done():
                self._done.set_result(result)
        finally:
            writer.close()

    def _evict(self, writer: asyncio.StreamWriter) -> None:
        """Close the connection that has waited longest to greet, to make room."""
        self._greeting.pop(writer, None)
        self._evicted.add(writer)
        log.warning("closed a connection from %s: too many connections are greeting at once",
                    _peer(writer))
        writer.writelines(wire.frame(Msg.ERROR, wire.encode_error(
            "connection refused: too many connections are greeting this data mover at once, "
            "and this one waited longest")))
        writer.close()

    async def _refuse(self, writer: asyncio.StreamWriter, peer: str, reason: str) -> None:
        log.warning("refused a connection from %s: %s", peer, reason)
        self.emit({"event": "refused", "peer": peer, "reason": reason})
        await wire.send_error(writer, f"connection refused: {reason}")

    # ----------------------------------------------------------------------------------------
    # one session

    async def _serve(self, s: _Session) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        s.writer.writelines(wire.frame(Msg.WELCOME, wire.encode_json({"version": wire.VERSION})))
        await s.writer.drain()
        if self.parent is not None:
            s.parent = await loop.run_in_executor(self._lookups, self._parent_index, s)
        blockmap = await loop.run_in_executor(
            self._writes, BlockMapWriter, self.index_out, self.rules.block_size, s.disk_size
        )
        queue: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue(WRITE_QUEUE)
        patches: asyncio.Queue[tuple[wire.Patch, asyncio.Future[Any]] | None] = (
            asyncio.Queue(PATCHES_AHEAD))
        try:
            async with asyncio.TaskGroup() as tg:
                writing = tg.create_task(self._write_loop(s, blockmap, queue))
                patching = tg.create_task(self._patch_loop(s, patches, queue))
                tg.create_task(self._receive(s, blockmap, queue, writing, patches, patching))
        except BaseExceptionGroup as group:
            await loop.run_in_executor(self._writes, blockmap.abort)
            raise wire.root_cause(group) from None
        except BaseException:
            await loop.run_in_executor(self._writes, blockmap.abort)
            raise
        return await self._finish(s, blockmap)

    async def _receive(
        self,
        s: _Session,
        blockmap: BlockMapWriter,
        queue: asyncio.Queue[tuple[str, Any] | None],
        writing: asyncio.Task[None],
        patches: asyncio.Queue[tuple[wire.Patch, asyncio.Future[Any]] | None],
        patching: asyncio.Task[None],
    ) -> None:
        next_seq, last_block = 0, -1
        kinds: set[Msg] = set()
        loop = asyncio.get_running_loop()

        async def put(job: tuple[str, Any] | None) -> None:
            if queue.full():
                t = time.perf_counter()
                await queue.put(job)
                s.stalled += time.perf_counter() - t
            else:
                queue.put_nowait(job)

        while True:
            try:
                msg, payload = await wire.read_frame(s.reader)
            except wire.ConnectionClosed:
                raise TransportError(
                    f"the proxy's data mover ({s.peer}) closed the connection before the "
                    f"transfer of {s.disk or 'the disk'} finished"
                ) from None
            if msg in (Msg.DIGESTS, Msg.PATCH):
                kinds.add(msg)
                if len(kinds) > 1:
                    raise wire.ProtocolError("DIGESTS and PATCH frames mixed in one transfer")
            if msg is Msg.PATCH:
                if s.parent is None:
                    raise wire.ProtocolError(
                        "PATCH frame, but this transfer has no parent point to patch")
                patch = wire.decode_patch(payload)
                if patch.seq != next_seq:
                    raise wire.ProtocolError(f"PATCH {patch.seq} where {next_seq} was due")
                next_seq += 1
                last_block = self._check_entries(
                    [BlockEntry(patch.block_no, patch.length, None)], last_block, s.disk_size)
                job = loop.run_in_executor(self._patchers, self._timed, self._rebuild, s, patch)
                await patches.put((patch, job))
            elif msg is Msg.DIGESTS:
                seq, entries = wire.decode_digests(payload)
                if seq != next_seq:
                    raise wire.ProtocolError(f"DIGESTS batch {seq} where {next_seq} was due")
                next_seq += 1
                last_block = self._check_entries(entries, last_block, s.disk_size)
                await put(("map", entries))
                wanted = await self._wanted(s, entries)
                s.writer.writelines(wire.frame(Msg.WANT, wire.encode_want(seq, wanted)))
                await s.writer.drain()
                if wanted:
                    s.expected.append((seq, deque(
                        (entries[i].digest, entries[i].length,  # type: ignore[misc]
                         entries[i].block_no)
                        for i in wanted
                    )))
                else:
                    await put(("ack", seq))
            elif msg is Msg.BLOCK:
                digest, data = wire.split_block(payload)
                if not s.expected:
                    raise wire.ProtocolError("BLOCK frame that no WANT asked for")
                seq, todo = s.expected[0]
                want_digest, length, block_no = todo.popleft()
                if digest != want_digest:
                    raise wire.ProtocolError(
                        f"BLOCK {digest.hex()[:16]}… where {want_digest.hex()[:16]}… was due"
                    )
                try:
                    declared = frame_size(data)
                except ValueError as e:
                    raise wire.ProtocolError(f"block {digest.hex()}: {e}") from None
                if declared != length:
                    raise wire.ProtocolError(
                        f"block {digest.hex()} decompresses to {declared} bytes, "
                        f"its entry says {length}"
                    )
                s.blocks_received += 1
                check = loop.run_in_executor(self._verifiers, self._timed, self._verify,
                                             digest, data, length)
                await put(("block", (digest, data, check, block_no)))
                if not todo:
                    s.expected.popleft()
                    await put(("ack", seq))
            elif msg is Msg.DONE:
                done = wire.decode_json(msg, payload)
                if s.expected:
                    raise wire.ProtocolError(
                        f"DONE while {sum(len(t) for _, t in s.expected)} asked-for blocks "
                        "never came"
                    )
                await patches.put(None)
                await patching
                await put(None)
                await writing
                if int(done.get("blocks", -1)) != blockmap.count:
                    raise wire.ProtocolError(
                        f"the proxy counted {done.get('blocks')} blocks, {blockmap.count} arrived"
                    )
                return
            elif msg is Msg.ERROR:
                raise wire.PeerError(f"proxy side: {wire.decode_error(payload)}")
            else:
                raise wire.ProtocolError(f"unexpected {msg.name} frame from the proxy side")

    def _check_entries(self, entries: list[BlockEntry], last: int, disk_size: int) -> int:
        bs = self.rules.block_size
        for e in entries:
            if e.block_no <= last:
                raise wire.ProtocolError(f"block {e.block_no} announced after block {last}")
            if not 0 < e.length <= bs or e.block_no * bs + e.length > disk_size:
                raise wire.ProtocolError(
                    f"block {e.block_no} of {e.length} bytes lies outside the disk "
                    f"({disk_size} bytes in blocks of {bs})"
                )
            last = e.block_no
        return last

    async def _wanted(self, s: _Session, entries: list[BlockEntry]) -> list[int]:
        """Indexes of the batch's blocks that neither the repository nor the queue hold."""
        candidates: dict[bytes, int] = {}
        for i, e in enumerate(entries):
            if e.digest is not None and e.digest not in s.pending and e.digest not in candidates:
                candidates[e.digest] = i
        if not candidates:
            return []
        digests = list(candidates)
        present = await asyncio.get_running_loop().run_in_executor(
            self._lookups, self._timed, self._repository.has_blocks, digests
        )
        wanted = sorted(candidates[d] for d, have in zip(digests, present, strict=True) if not have)
        s.pending.update(entries[i].digest for i in wanted)  # type: ignore[misc]
        return wanted

    def _parent_index(self, s: _Session) -> DiskIndex:
        assert self.parent is not None
        point, disk_key = self.parent
        index = self._repository.disk_index(point, disk_key)
        if index.block_size != self.rules.block_size or index.capacity != s.disk_size:
            raise TransportError(
                f"the parent point {point} holds disk {disk_key} as {index.capacity} bytes in "
                f"blocks of {index.block_size}; this transfer is of {s.disk_size} bytes in "
                f"blocks of {self.rules.block_size}"
            )
        return index

    def _rebuild(self, s: _Session, patch: wire.Patch) -> tuple[bytes | None, bytes | None]:
        """The patched block's digest (None: all zero) and, when the repository lacks it, its
        compressed form. Runs on a patch worker."""
        assert s.parent is not None
        covered = sum(size for _, size in patch.ranges)
        parent = s.parent.digest(patch.block_no)
        if covered == patch.length or parent is None:
            block = bytearray(patch.length)
        else:
            try:
                block = bytearray(self._repository.read_block(parent, patch.length))
            except BlockDamaged as e:
                raise TransportError(
                    f"cannot apply the changes at offset {patch.block_no * self.rules.block_size}"
                    f": the parent point {s.parent.point_id} holds a damaged block there "
                    f"({e.reason})"
                ) from None
        pos = 0
        for offset, size in patch.ranges:
            block[offset : offset + size] = patch.data[pos : pos + size]
            pos += size
        if is_zero(block):
            return None, None
        digest = block_digest(block)
        if self._repository.has_blocks([digest])[0]:
            return digest, None
        return digest, self.codec.compress(block)

    async def _patch_loop(
        self,
        s: _Session,
        patches: asyncio.Queue[tuple[wire.Patch, asyncio.Future[Any]] | None],
        queue: asyncio.Queue[tuple[str, Any] | None],
    ) -> None:
        """Rebuilt blocks, in the order their PATCH frames came, to the writer."""
        while (item := await patches.get()) is not None:
            patch, job = item
            digest, compressed = await job
            await queue.put(("map", [BlockEntry(patch.block_no, patch.length, digest)]))
            if digest is not None and compressed is not None and digest not in s.pending:
                s.pending.add(digest)
                s.blocks_received += 1
                # rebuilt and hashed here, not received: nothing to verify
                await queue.put(("block", (digest, compressed, None, patch.block_no)))
            await queue.put(("ack", patch.seq))

    def _verify(self, digest: bytes, data: memoryview, length: int) -> str | None:
        """Why a received block must not be stored, or None when its data is what its digest
        names. Runs on a verify worker; decompression is bounded by ``length``, which
        :meth:`_check_entries` bounded by the block size, and zstd checks the frame's own
        content checksum on the way."""
        try:
            block = self.codec.decompress(data, length)
        except ValueError as e:
            return f"its zstd frame is damaged ({e})"
        if block_digest(block) != digest:
            return "its content does not match its digest"
        return None

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            assert self._session is not None
            self._session.busy += time.perf_counter() - t

    async def _write_loop(
        self, s: _Session, blockmap: BlockMapWriter, queue: asyncio.Queue[tuple[str, Any] | None]
    ) -> None:
        loop = asyncio.get_running_loop()
        while (job := await queue.get()) is not None:
            kind, arg = job
            if kind == "block":
                digest, data, check, block_no = arg
                if check is not None and (fault := await check):
                    raise TransportError(
                        f"block {block_no} of {s.disk or 'the disk'} from the proxy's data mover "
                        f"({s.peer}) is refused: {fault} (digest {digest.hex()}); the block is "
                        f"not stored and the transfer fails"
                    )
                written = await loop.run_in_executor(
                    self._writes, self._timed, self._repository.put_block, digest, data
                )
                s.pending.discard(digest)
                s.bytes_stored += written
                s.blocks_written += 1 if written else 0
            elif kind == "map":
                s.named.update(e.digest for e in arg if e.digest is not None)
                await loop.run_in_executor(self._writes, self._timed, _add_entries, blockmap, arg)
            else:
                ack = wire.Ack(arg, s.busy, s.stalled, s.bytes_stored)
                s.writer.writelines(wire.frame(Msg.ACK, wire.encode_ack(ack)))

    async def _finish(self, s: _Session, blockmap: BlockMapWriter) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(self._writes, self._timed, blockmap.finish)
        # the blocks this mover found present too: another writer may not have synced them yet
        await loop.run_in_executor(self._writes, self._timed,
                                   self._repository.make_blocks_durable, s.named)
        result = {
            "index_path": path,
            "blocks_durable": True,
            "blocks": blockmap.count,
            "blocks_received": s.blocks_received,
            "blocks_written": s.blocks_written,
            "bytes_stored": s.bytes_stored,
            "busy": s.busy,
        }
        s.writer.writelines(wire.frame(Msg.RESULT, wire.encode_json(result)))
        await s.writer.drain()
        return result


def _add_entries(blockmap: BlockMapWriter, entries: list[BlockEntry]) -> None:
    for e in entries:
        blockmap.add(e.block_no, e.length, e.digest)


def _peer(writer: asyncio.StreamWriter) -> str:
    info = writer.get_extra_info("peername")
    if isinstance(info, tuple) and len(info) >= 2:
        return f"{info[0]}:{info[1]}"
    return str(info or "unknown peer")


def _server_ssl(rules: TransferRules) -> ssl.SSLContext | None:
    if rules.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(rules.tls.certfile, rules.tls.keyfile or None)
    return ctx
