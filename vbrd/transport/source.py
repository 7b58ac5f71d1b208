"""The proxy's data mover: read a disk through a transport mode and stream its blocks.

The data path is a pipeline of four asyncio tasks joined by bounded queues, so memory stays
flat (about 130 MiB resident at 1 MiB blocks, interpreter included) whatever the size of
the disk:

    read      whole blocks in large sequential chunks from the transport mode's reader
    hash      zero test and SHA-256 per block on a pool of two threads (hashlib and zstd
              release the GIL), digests sent in batches (DIGESTS)
    send      for each batch the repository's answer (WANT) names the blocks it lacks; only
              those are sent (BLOCK), compressed (zstd) if the workers have not done it yet,
              through the bandwidth limit
    receive   WANT and ACK frames from the repository side, its errors, and the final RESULT

Hashing works a chunk (8 MiB) per worker job, so there is no per-block round trip through
the event loop. While the repository keeps asking for most blocks (a full, a CBT incremental)
the workers compress each block as they hash it (:class:`Speculation`); when its answers
(WANT) show it already holds most of them (an incremental without CBT), compression waits
for WANT, so a block the repository holds is neither compressed nor sent and an unchanged
disk costs one SHA-256 per block.

An incremental whose repository side holds the parent point (``patch``) skips all of that:
it reads only the changed areas themselves and sends them per block (PATCH frames); the
repository side rebuilds each block from the parent's and hashes and compresses it there.
So a 4 KiB change costs a 4 KiB read, not the read of its whole block.

Modes are tried in the order the Manager gave; a mode whose ``probe`` says no, or whose
``open`` fails, is passed over and recorded with its reason in ``fallbacks``. If the chosen
mode fails while reading, the next mode carries on from the first block whose data was not
read yet: everything read before is valid snapshot data and is still hashed and stored,
nothing is read twice.

Each stage keeps its busy time (source: awaiting reads; proxy: hashing and compressing, per
worker; network: awaiting the socket and the bandwidth limit; target: the repository's lookups
and writes, reported in ACKs), and the busiest is named the bottleneck.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vbrd.errors import TransportError
from vbrd.models import Extent
from vbrd.protocols import DiskReader, TransportMode
from vbrd.repository.blocks import BlockCodec, block_digest, is_zero
from vbrd.transport import wire
from vbrd.transport.spec import (
    STAGES,
    Progress,
    SourceSpec,
    TransferResult,
    TransferRules,
    progress_to_json,
    result_to_json,
)
from vbrd.transport.throttle import TokenBucket
from vbrd.transport.wire import BlockEntry, Msg

log = logging.getLogger(__name__)

WORKERS = 2
CHUNK_BYTES = 8 << 20  # one read from the transport mode
BATCH_BYTES = 8 << 20  # blocks per DIGESTS batch, at most MAX_BATCH_BLOCKS
MAX_BATCH_BLOCKS = 1024
BATCHES_IN_FLIGHT = 4  # batches hashed and announced but not yet sent
PATCH_WINDOW = 32 << 20  # changed bytes sent in PATCH frames and not yet acknowledged
PROGRESS_INTERVAL = 0.25
RATE_WINDOW = 3.0


def block_runs(areas: Sequence[Extent], disk_size: int, block_size: int) -> list[tuple[int, int]]:
    """The blocks touching ``areas``, as sorted, merged ``[first, end)`` block ranges.

    A changed area that covers part of a block makes the whole block read: the repository
    stores whole blocks.
    """
    spans: list[tuple[int, int]] = []
    for a in areas:
        start, end = max(a.offset, 0), min(a.end, disk_size)
        if end <= start:
            continue
        spans.append((start // block_size, (end - 1) // block_size + 1))
    spans.sort()
    runs: list[tuple[int, int]] = []
    for first, end in spans:
        if runs and first <= runs[-1][1]:
            if end > runs[-1][1]:
                runs[-1] = (runs[-1][0], end)
        else:
            runs.append((first, end))
    return runs


def merged_areas(areas: Sequence[Extent], disk_size: int) -> list[tuple[int, int]]:
    """``areas`` clipped to the disk, sorted and merged, as ``(offset, length)``."""
    spans = sorted((max(a.offset, 0), min(a.end, disk_size)) for a in areas)
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if end <= start:
            continue
        if out and start <= out[-1][0] + out[-1][1]:
            last_start, last_length = out[-1]
            out[-1] = (last_start, max(last_start + last_length, end) - last_start)
        else:
            out.append((start, end - start))
    return out


def chunks(runs: Sequence[tuple[int, int]], per_chunk: int) -> Iterator[tuple[int, int]]:
    """``(first_block, count)`` reads of at most ``per_chunk`` blocks, in disk order."""
    for first, end in runs:
        while first < end:
            n = min(per_chunk, end - first)
            yield first, n
            first += n


@dataclass(slots=True)
class _Hashed:
    """One block after the worker: its digest (None: all zero) and what to send if wanted,
    already compressed when the worker compressed it speculatively."""

    block_no: int
    length: int
    digest: bytes | None
    payload: memoryview | bytes | None
    compressed: bool


@dataclass(slots=True)
class _Batch:
    seq: int
    entries: list[BlockEntry] = field(default_factory=list)
    data: list[memoryview | bytes | None] = field(default_factory=list)
    compressed: list[bool] = field(default_factory=list)
    nbytes: int = 0
    want: asyncio.Future[list[int]] | None = None


class Speculation:
    """Whether to compress blocks before the repository says it wants them.

    Waiting for WANT spares the compression of blocks the repository holds (an incremental
    without CBT, a disk much like another), but leaves the workers idle for a round trip per
    batch and hashes and compresses in two passes. A full backup or a CBT incremental wants
    nearly every block, so the workers compress at once while the repository's recent
    answers asked for most of what was offered, and stop when they did not.
    """

    WINDOW = 64  # data blocks the recent share is taken over, about

    def __init__(self) -> None:
        self.share = 1.0  # of offered data blocks, how many were wanted, recently

    @property
    def on(self) -> bool:
        return self.share >= 0.5

    def answer(self, wanted: int, offered: int) -> None:
        if offered:
            weight = min(1.0, offered / self.WINDOW)
            self.share += weight * (wanted / offered - self.share)


@dataclass(slots=True)
class _Stats:
    bytes_read: int = 0
    bytes_sent: int = 0
    bytes_done: int = 0
    total_bytes: int = 0
    blocks_total: int = 0
    blocks_sent: int = 0
    zero_blocks: int = 0
    bytes_stored: int = 0
    target_stalled: float = 0.0
    busy: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))


class SourceMover:
    """One disk's transfer from the proxy side; :meth:`run` returns the result as a dict."""

    def __init__(
        self,
        spec: SourceSpec,
        rules: TransferRules,
        *,
        address: Awaitable[tuple[str, int]],
        token: str,
        emit: Callable[[dict[str, Any]], None],
        patch: bool = False,
    ) -> None:
        """``patch``: the repository side holds the parent point this incremental's areas
        are relative to, so only the changed areas themselves are read and sent."""
        self.spec, self.rules = spec, rules
        self.address, self.token = address, token
        self.emit = emit
        self.throttle = TokenBucket(rules.bandwidth_limit)
        self.codec = BlockCodec(rules.compression_level)
        self.bs = rules.block_size
        self.stats = _Stats()
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="vbrd-mover")
        self._modes: dict[str, TransportMode] = {}
        self._plugin_failures: list[str] = []
        self._queue: list[str] = []  # modes not tried yet
        # every mode passed over or abandoned, in order, and why
        self.fallbacks: list[tuple[str, str]] = []
        self.used: list[str] = []
        self._reader: DiskReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._send_lock = asyncio.Lock()
        self._inflight: dict[int, _Batch] = {}
        self._speculation = Speculation()
        self.patch = patch
        self._window_bytes = 0  # bytes of PATCH frames not yet acknowledged
        self._acked = asyncio.Event()
        self._hashing_done = False
        self._all_acked = asyncio.Event()
        self._result: asyncio.Future[dict[str, Any]] | None = None
        self._t0 = self._started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque()

    # ----------------------------------------------------------------------------------------
    # the whole transfer

    async def run(self) -> dict[str, Any]:
        try:
            await asyncio.to_thread(self._load_modes)
            self._queue = list(self.spec.modes)
            await self._open_next()
            runs = await self._plan()
            reader = await self._connect()
            progress = asyncio.create_task(self._report_progress())
            try:
                if self.patch and self.spec.areas is not None:
                    await self._stream_patches(
                        merged_areas(self.spec.areas, self.spec.task.capacity), reader)
                else:
                    await self._stream(runs, reader)
            finally:
                progress.cancel()
                self._emit_progress()
            assert self._result is not None
            target = self._result.result()
        except BaseException as e:
            if self._writer is not None and not self._writer.is_closing():
                message = (wire.describe(e) if isinstance(e, Exception)
                           else "the proxy's data mover stopped")
                await wire.send_error(self._writer, message)
            raise
        finally:
            if self._reader is not None:
                await self._close_reader(self.used[-1] if self.used else "")
            self._pool.shutdown(wait=False, cancel_futures=True)
            if self._writer is not None:
                self._writer.close()
        s = self.stats
        bottleneck, load = self._bottleneck()
        mode: str | list[str] = self.used[0] if len(self.used) == 1 else list(self.used)
        result = TransferResult(
            index_path=target["index_path"],
            blocks_total=s.blocks_total,
            blocks_sent=s.blocks_sent,
            blocks_deduplicated=s.blocks_total - s.zero_blocks - s.blocks_sent,
            zero_blocks=s.zero_blocks,
            bytes_read=s.bytes_read,
            bytes_sent=s.bytes_sent,
            bytes_stored=int(target["bytes_stored"]),
            blocks_durable=bool(target.get("blocks_durable", False)),
            mode=mode,
            duration=time.monotonic() - self._t0,
            fallbacks=list(self.fallbacks),
            bottleneck=bottleneck,
            stage_load=load,
            transfer_seconds=time.monotonic() - self._started,
        )
        return result_to_json(result)

    # ----------------------------------------------------------------------------------------
    # modes

    def _load_modes(self) -> None:
        from vbrd.plugins import make_plugin_manager, transport_modes

        pm = make_plugin_manager(
            plugin_dirs=[Path(d) for d in self.spec.plugin_dirs],
            disabled=self.spec.disabled_plugins,
            load_entrypoints=self.spec.load_entrypoints,
            extra_modules=self.spec.plugin_modules,
            only=self.spec.plugin_names,
        )
        self._plugin_failures = [f"plugin {f.name} ({f.source}): {f.reason}" for f in pm.failures]
        self._modes = transport_modes(pm)

    async def _open_next(self) -> None:
        """Open the next usable mode of the queue, or raise naming why each one could not."""
        task = self.spec.task
        while self._queue:
            name = self._queue.pop(0)
            mode = self._modes.get(name)
            if mode is None:
                reason = "no installed plugin provides this transport mode"
                if self._plugin_failures:
                    reason += " (" + "; ".join(self._plugin_failures) + ")"
                self.fallbacks.append((name, reason))
                continue
            try:
                probe = await mode.probe(task, self.spec.proxy)
            except Exception as e:  # a plugin's bug must not hide the next mode
                probe_reason = f"probe failed: {wire.describe(e)}"
                self.fallbacks.append((name, probe_reason))
                continue
            if not probe.usable:
                self.fallbacks.append((name, probe.reason or "not usable"))
                continue
            try:
                self._reader = await mode.open(task, self.spec.proxy)
            except Exception as e:
                reason = wire.describe(e)
                self.fallbacks.append((name, reason))
                continue
            if self._reader.size != task.capacity:
                reason = (f"reports {self._reader.size} bytes for a disk whose capacity is "
                          f"{task.capacity}")
                await self._close_reader(name)
                self.fallbacks.append((name, reason))
                continue
            self.used.append(name)
            self.emit({"event": "mode", "mode": name,
                       "fallbacks": [list(f) for f in self.fallbacks]})
            return
        if not self.fallbacks:
            raise TransportError(
                f"no transport mode was given for {task.label} of VM {task.vm.name}"
            )
        raise TransportError("; ".join(f"transport mode {m}: {r}" for m, r in self.fallbacks))

    async def _close_reader(self, name: str) -> None:
        reader, self._reader = self._reader, None
        if reader is None:
            return
        try:
            await reader.close()
        except Exception as e:
            log.warning("closing the %s reader failed: %s", name, wire.describe(e))

    async def _plan(self) -> list[tuple[int, int]]:
        """The block runs to read: the Manager's areas, or what the reader calls allocated."""
        assert self._reader is not None
        size = self._reader.size
        if self.spec.areas is not None:
            return block_runs(self.spec.areas, size, self.bs)
        while True:
            try:
                extents = [e async for e in self._reader.extents()]
                return block_runs(extents, size, self.bs)
            except Exception as e:
                await self._fail_over(f"cannot list allocated areas: {wire.describe(e)}")

    async def _fail_over(self, reason: str) -> None:
        name = self.used[-1]
        self.fallbacks.append((name, reason))
        log.warning("transport mode %s failed, trying the next: %s", name, reason)
        await self._close_reader(name)
        await self._open_next()

    # ----------------------------------------------------------------------------------------
    # the connection

    async def _connect(self) -> asyncio.StreamReader:
        task = self.spec.task
        ctx = _client_ssl(self.rules)
        host, port = await self.address
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx), timeout=30
            )
        except (OSError, TimeoutError) as e:
            raise TransportError(
                f"cannot reach the repository's data mover at {host}:{port}: "
                f"{getattr(e, 'strerror', None) or e or 'timed out'}"
            ) from None
        self._writer = writer
        hello = wire.encode_hello(
            self.token, disk=task.label, vm=task.vm.name,
            block_size=self.bs, disk_size=task.capacity,
        )
        writer.writelines(wire.frame(Msg.HELLO, hello))
        self.stats.bytes_sent += wire.frame_size(hello)
        await writer.drain()
        await wire.expect(reader, Msg.WELCOME)
        return reader

    async def _send(self, parts: list[bytes | bytearray | memoryview], size: int) -> None:
        assert self._writer is not None
        async with self._send_lock:
            await self.throttle.consume(size)
            t = time.perf_counter()
            self._writer.writelines(parts)
            await self._writer.drain()
            self.stats.busy["network"] += time.perf_counter() - t
            self.stats.bytes_sent += size

    # ----------------------------------------------------------------------------------------
    # the pipeline

    async def _stream(self, runs: list[tuple[int, int]], reader: asyncio.StreamReader) -> None:
        self.stats.total_bytes = sum(
            min(end * self.bs, self.spec.task.capacity) - first * self.bs for first, end in runs
        )
        self._started = time.monotonic()
        loop = asyncio.get_running_loop()
        self._result = loop.create_future()
        read_q: asyncio.Queue[tuple[int, int, bytes] | None] = asyncio.Queue(2)
        batch_q: asyncio.Queue[_Batch | None] = asyncio.Queue(BATCHES_IN_FLIGHT)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(reader))
                tg.create_task(self._read(runs, read_q))
                tg.create_task(self._hash(read_q, batch_q))
                tg.create_task(self._send_blocks(batch_q))
        except BaseExceptionGroup as group:
            raise wire.root_cause(group) from None

    async def _read(
        self, runs: list[tuple[int, int]], out: asyncio.Queue[tuple[int, int, bytes] | None]
    ) -> None:
        size = self.spec.task.capacity
        per_chunk = max(1, CHUNK_BYTES // self.bs)
        for first, count in chunks(runs, per_chunk):
            offset = first * self.bs
            length = min((first + count) * self.bs, size) - offset
            await out.put((first, count, await self._read_range(offset, length)))
        await out.put(None)

    async def _read_range(self, offset: int, length: int) -> bytes:
        """Exactly these bytes, from the current mode or, when it fails, the next ones."""
        while True:
            assert self._reader is not None
            t = time.perf_counter()
            try:
                data = await self._reader.read(offset, length)
                reason = (f"short read at offset {offset}: {len(data)} of {length} bytes"
                          if len(data) != length else "")
            except Exception as e:
                reason = f"read failed at offset {offset}: {wire.describe(e)}"
            finally:
                self.stats.busy["source"] += time.perf_counter() - t
            if not reason:
                self.stats.bytes_read += length
                return data
            await self._fail_over(reason)

    # ----------------------------------------------------------------------------------------
    # the patch pipeline: an incremental that reads only the changed areas

    async def _stream_patches(self, areas: list[tuple[int, int]],
                              reader: asyncio.StreamReader) -> None:
        self.stats.total_bytes = sum(length for _, length in areas)
        self._started = time.monotonic()
        self._result = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(reader))
                tg.create_task(self._send_patches(areas))
        except BaseExceptionGroup as group:
            raise wire.root_cause(group) from None

    async def _send_patches(self, areas: list[tuple[int, int]]) -> None:
        """Read each changed area (in chunks) and send, per block it touches, the changed
        ranges' bytes; the repository side rebuilds the block from the parent point's.

        Nothing is hashed or compressed here: the block is whole only on the other side.
        At most PATCH_WINDOW bytes are in flight unacknowledged, so memory stays flat.
        """
        bs, capacity = self.bs, self.spec.task.capacity
        block = -1
        parts: list[tuple[int, memoryview]] = []
        seq = 0

        async def flush() -> None:
            nonlocal seq, parts
            if not parts:
                return
            length = min(bs, capacity - block * bs)
            ranges = [(offset, len(view)) for offset, view in parts]
            head = wire.encode_patch_head(seq, block, length, ranges)
            views = [view for _, view in parts]
            nbytes = sum(size for _, size in ranges)
            while self._window_bytes > PATCH_WINDOW:
                self._acked.clear()
                await self._acked.wait()
            self._inflight[seq] = _Batch(seq, nbytes=nbytes)
            self._window_bytes += nbytes
            self.stats.blocks_total += 1
            self.stats.blocks_sent += 1
            await self._send(wire.frame(Msg.PATCH, head, *views), wire.frame_size(head, *views))
            seq += 1
            parts = []

        for offset, length in areas:
            for start in range(offset, offset + length, CHUNK_BYTES):
                size = min(CHUNK_BYTES, offset + length - start)
                view = memoryview(await self._read_range(start, size))
                pos, end = start, start + size
                while pos < end:
                    here = pos // bs
                    stop = min((here + 1) * bs, end)
                    if here != block:
                        await flush()
                        block = here
                    parts.append((pos - here * bs, view[pos - start : stop - start]))
                    pos = stop
        await flush()
        self._hashing_done = True
        if not self._inflight:
            self._all_acked.set()
        await self._all_acked.wait()
        done = wire.encode_json({"blocks": self.stats.blocks_total})
        await self._send(wire.frame(Msg.DONE, done), wire.frame_size(done))

    def _chunk_job(self, first: int, data: bytes, speculate: bool) -> tuple[list[_Hashed], float]:
        """Zero test and SHA-256 (and zstd, when speculating) for every block of one chunk.

        One job per chunk rather than per block: the worker's loop runs without the event
        loop in between, and the GIL is released inside hashlib and zstd for each block.
        """
        t = time.perf_counter()
        bs = self.bs
        view = memoryview(data)
        out: list[_Hashed] = []
        for i in range(0, len(view), bs):
            block = view[i : i + bs]
            if is_zero(block):
                out.append(_Hashed(first + i // bs, len(block), None, None, False))
            elif speculate:
                out.append(_Hashed(first + i // bs, len(block), block_digest(block),
                                   self.codec.compress(block), True))
            else:
                out.append(_Hashed(first + i // bs, len(block), block_digest(block), block,
                                   False))
        return out, time.perf_counter() - t

    def _compress_job(self, view: memoryview | bytes) -> tuple[bytes, float]:
        t = time.perf_counter()
        data = self.codec.compress(view)
        return data, time.perf_counter() - t

    async def _hash(
        self,
        inp: asyncio.Queue[tuple[int, int, bytes] | None],
        out: asyncio.Queue[_Batch | None],
    ) -> None:
        loop = asyncio.get_running_loop()
        per_batch = max(1, min(MAX_BATCH_BLOCKS, BATCH_BYTES // self.bs))
        pending: deque[asyncio.Future[tuple[list[_Hashed], float]]] = deque()
        seq = 0
        batch = _Batch(seq)

        async def settle_one() -> None:
            nonlocal batch, seq
            hashed, busy = await pending.popleft()
            self.stats.busy["proxy"] += busy / WORKERS
            for h in hashed:
                batch.entries.append(BlockEntry(h.block_no, h.length, h.digest))
                batch.data.append(h.payload)
                batch.compressed.append(h.compressed)
                batch.nbytes += h.length
                if h.digest is None:
                    self.stats.zero_blocks += 1
                if len(batch.entries) >= per_batch:
                    await self._announce(batch, out)
                    seq += 1
                    batch = _Batch(seq)

        while (item := await inp.get()) is not None:
            first, _count, data = item
            pending.append(loop.run_in_executor(
                self._pool, self._chunk_job, first, data, self._speculation.on))
            while len(pending) > WORKERS:
                await settle_one()
        while pending:
            await settle_one()
        if batch.entries:
            await self._announce(batch, out)
        self._hashing_done = True
        if not self._inflight:
            self._all_acked.set()
        await out.put(None)

    async def _announce(self, batch: _Batch, out: asyncio.Queue[_Batch | None]) -> None:
        batch.want = asyncio.get_running_loop().create_future()
        self._inflight[batch.seq] = batch
        self.stats.blocks_total += len(batch.entries)
        payload = wire.encode_digests(batch.seq, batch.entries)
        await self._send(wire.frame(Msg.DIGESTS, payload), wire.frame_size(payload))
        await out.put(batch)

    async def _send_blocks(self, inp: asyncio.Queue[_Batch | None]) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await inp.get()) is not None:
            assert batch.want is not None
            wanted = await batch.want
            self._speculation.answer(
                len(wanted), sum(e.digest is not None for e in batch.entries))
            jobs: list[tuple[int, asyncio.Future[tuple[bytes, float]] | bytes]] = []
            for i in wanted:
                payload = batch.data[i]
                assert payload is not None
                if batch.compressed[i]:
                    jobs.append((i, bytes(payload)))
                else:
                    jobs.append((i, loop.run_in_executor(self._pool, self._compress_job,
                                                         payload)))
            batch.data = []
            for i, job in jobs:
                if isinstance(job, bytes):
                    compressed = job
                else:
                    compressed, busy = await job
                    self.stats.busy["proxy"] += busy / WORKERS
                digest = batch.entries[i].digest
                assert digest is not None
                parts = wire.frame(Msg.BLOCK, digest, compressed)
                await self._send(parts, wire.frame_size(digest, compressed))
                self.stats.blocks_sent += 1
        await self._all_acked.wait()
        done = wire.encode_json({"blocks": self.stats.blocks_total})
        await self._send(wire.frame(Msg.DONE, done), wire.frame_size(done))

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        assert self._result is not None
        while True:
            try:
                msg, payload = await wire.read_frame(reader)
            except wire.ConnectionClosed:
                raise TransportError(
                    "the repository's data mover closed the connection before the transfer "
                    "finished"
                ) from None
            if msg is Msg.WANT:
                seq, indexes = wire.decode_want(payload)
                batch = self._inflight.get(seq)
                if batch is None or batch.want is None or batch.want.done():
                    raise wire.ProtocolError(f"WANT for batch {seq}, which is not awaiting one")
                for i in indexes:
                    if not 0 <= i < len(batch.entries) or batch.entries[i].digest is None:
                        raise wire.ProtocolError(f"WANT names block {i} of batch {seq}, "
                                                 "which holds no such data block")
                batch.want.set_result(indexes)
            elif msg is Msg.ACK:
                ack = wire.decode_ack(payload)
                done = self._inflight.pop(ack.seq, None)
                if done is None:
                    raise wire.ProtocolError(f"ACK for batch {ack.seq}, which is not in flight")
                self.stats.bytes_done += done.nbytes
                if self.patch:
                    self._window_bytes -= done.nbytes
                    self._acked.set()
                self.stats.busy["target"] = ack.target_busy
                self.stats.target_stalled = ack.target_stalled
                self.stats.bytes_stored = ack.bytes_stored
                now = time.monotonic()
                self._samples.append((now, self.stats.bytes_done))
                if self._hashing_done and not self._inflight:
                    self._all_acked.set()
            elif msg is Msg.RESULT:
                self._result.set_result(wire.decode_json(msg, payload))
                return
            elif msg is Msg.ERROR:
                raise wire.PeerError(f"repository side: {wire.decode_error(payload)}")
            else:
                raise wire.ProtocolError(f"unexpected {msg.name} frame from the repository side")

    # ----------------------------------------------------------------------------------------
    # progress

    def _bottleneck(self) -> tuple[str, dict[str, float]]:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        busy = dict(self.stats.busy)
        # time blocked sending while the repository side's writes fell behind is the target's
        busy["network"] = max(0.0, busy["network"] - self.stats.target_stalled)
        busy["network"] += self.throttle.waited
        load = {k: round(min(v / elapsed, 1.0), 3) for k, v in busy.items()}
        return max(STAGES, key=lambda k: load[k]), load

    def _rate(self) -> float:
        now = time.monotonic()
        while self._samples and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        if not self._samples:
            return 0.0
        t0, b0 = self._samples[0]
        if now - t0 < 0.5:
            elapsed = max(now - self._started, 1e-6)
            return self.stats.bytes_done / elapsed
        return (self.stats.bytes_done - b0) / (now - t0)

    def progress(self) -> Progress:
        s = self.stats
        bottleneck, load = self._bottleneck()
        return Progress(
            bytes_read=s.bytes_read,
            bytes_sent=s.bytes_sent,
            bytes_done_of_total=s.bytes_done,
            total_bytes=s.total_bytes,
            rate_bps=self._rate(),
            bottleneck=bottleneck,
            stage_load=load,
            mode=self.used[-1] if self.used else "",
        )

    def _emit_progress(self) -> None:
        self.emit({"event": "progress", **progress_to_json(self.progress())})

    async def _report_progress(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            self._emit_progress()

    def set_bandwidth_limit(self, rate: float | None) -> None:
        self.throttle.set_rate(rate)


def _client_ssl(rules: TransferRules) -> ssl.SSLContext | None:
    if rules.tls is None:
        return None
    ctx = ssl.create_default_context(cafile=rules.tls.cafile or None)
    ctx.check_hostname = False  # the certificate is pinned by the CA the Manager hands out
    return ctx
