"""The framed binary protocol between the proxy's and the repository's data movers.

Every message is one frame::

    type   u8        what the payload is (:class:`Msg`)
    length u32 BE    payload bytes that follow (at most that type's :data:`FRAME_LIMITS`)
    payload

A frame's type and length are checked before its payload is read: a frame of a type not
expected at that point, or longer than its type may be, is refused from its five header bytes
(a greeting may hold 16 KiB, a block frame a whole compressed block).

A session, from the proxy's side (S) to the repository's side (T)::

    S: HELLO    magic "VBRDMOVE", version u16, token length u8, token, then JSON
                {disk, vm, block_size, disk_size}
    T: WELCOME  JSON {version}                        (or ERROR and the connection closes)
    S: DIGESTS  seq u32, count u32, count x (block_no u64, length u32, flags u8, sha256 32)
    T: WANT     seq u32, count u32, count x u32       indexes into that batch the repository lacks
    S: BLOCK    sha256 32, zstd frame                 one per wanted block, in the order asked
    T: ACK      seq u32, busy f64, stalled f64,       the batch's blocks are written; busy and
                stored u64                            stalled are seconds so far (below)
       ... DIGESTS/WANT/BLOCK/ACK repeat, several batches in flight ...
    S: PATCH    seq u32, block_no u64, length u32,    instead of DIGESTS/BLOCK, in an incremental
                count u32, count x (offset u32,       whose repository side holds the parent
                size u32), then the ranges' bytes     point: only the changed ranges of a block
                                                      travel; the repository side rebuilds the
                                                      block from the parent's and ACKs the seq
    S: DONE     JSON {blocks}
    T: RESULT   JSON {index_path, bytes_stored, ...}  after the block map is written and synced
    either: ERROR  UTF-8 message; the sender closes the connection after it

``busy`` is the time the repository side spent in lookups and writes, ``stalled`` the time
its receiving was held up by writes falling behind, which the proxy side must not count as
time spent on the network when it names the bottleneck.

Digests travel in batches so the per-block cost in Python stays a few microseconds at 1 MiB
blocks; only wanted blocks ever carry data. The token in HELLO is the per-task secret the
Manager handed to both movers: a connection that does not present it is refused before it can
touch the repository, and before anything it sent is parsed (the token comes first, the JSON
only once it matched).
"""
from __future__ import annotations

import asyncio
import enum
import hmac
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vbrd.errors import TransportError

MAGIC = b"VBRDMOVE"
VERSION = 2  # 2: the token leads the greeting, before its JSON
HEADER = struct.Struct(">BI")
MAX_PAYLOAD = 64 * 1024 * 1024
DIGEST_SIZE = 32
#: The most entries one DIGESTS batch (and so one WANT) may hold.
MAX_BATCH_ENTRIES = 8192
#: Connections that have not greeted yet, at most, per repository-side mover: a new one past
#: this closes the one waiting longest, so strangers cannot hold the port against the proxy.
MAX_GREETINGS = 16
MAX_TOKEN = 255
_SMALL = 16 * 1024  # a greeting, its welcome, DONE: a few hundred bytes of JSON

_HELLO_PREFIX = struct.Struct(">8sH")
_BATCH_HEAD = struct.Struct(">II")
_ENTRY = struct.Struct(">QIB32s")
_INDEX = struct.Struct(">I")
_ACK = struct.Struct(">IddQ")
_PATCH_HEAD = struct.Struct(">IQII")
_RANGE = struct.Struct(">II")

FLAG_ZERO = 0x01
_NO_DIGEST = bytes(DIGEST_SIZE)


class Msg(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    DIGESTS = 3
    WANT = 4
    BLOCK = 5
    ACK = 6
    DONE = 7
    RESULT = 8
    ERROR = 9
    PATCH = 10


#: The most payload bytes each frame type may announce; a longer frame is refused unread.
FRAME_LIMITS: dict[Msg, int] = {
    Msg.HELLO: _SMALL,
    Msg.WELCOME: _SMALL,
    Msg.DIGESTS: _BATCH_HEAD.size + MAX_BATCH_ENTRIES * _ENTRY.size,
    Msg.WANT: _BATCH_HEAD.size + MAX_BATCH_ENTRIES * _INDEX.size,
    Msg.BLOCK: MAX_PAYLOAD,
    Msg.ACK: _ACK.size,
    Msg.DONE: _SMALL,
    Msg.RESULT: 64 * 1024,
    Msg.ERROR: 64 * 1024,
    Msg.PATCH: MAX_PAYLOAD,
}
#: What the repository side reads from a connection that has not greeted yet: a HELLO only.
GREETING_LIMITS: dict[Msg, int] = {Msg.HELLO: FRAME_LIMITS[Msg.HELLO]}


class ProtocolError(TransportError):
    """The peer sent something that is not this protocol (or stopped in the middle of it)."""


class PeerError(TransportError):
    """The peer reported an error in an ERROR frame; the message is the peer's own."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection cleanly between two frames."""


@dataclass(frozen=True, slots=True)
class BlockEntry:
    """One block of a DIGESTS batch; ``digest`` is ``None`` for an all-zero block."""

    block_no: int
    length: int
    digest: bytes | None


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    target_busy: float
    target_stalled: float
    bytes_stored: int


# --------------------------------------------------------------------------------------------
# framing


async def read_frame(reader: asyncio.StreamReader,
                     limits: Mapping[Msg, int] = FRAME_LIMITS) -> tuple[Msg, bytes]:
    """The next frame; :class:`ConnectionClosed` at a clean end of stream.

    ``limits`` are the frame types allowed here and the most payload each may have; another
    type, or a longer payload, is a :class:`ProtocolError` before a byte of the payload is
    read."""
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise ConnectionClosed("the peer closed the connection") from None
        raise ProtocolError(
            f"connection closed in the middle of a frame header "
            f"(got {len(e.partial)} of {HEADER.size} bytes)"
        ) from None
    kind, length = HEADER.unpack(head)
    try:
        msg = Msg(kind)
    except ValueError:
        raise ProtocolError(
            f"not a vbrd data mover frame (type byte {kind:#04x}, "
            f"first bytes {head[:8]!r})"
        ) from None
    limit = limits.get(msg)
    if limit is None:
        names = " or ".join(m.name for m in limits)
        raise ProtocolError(f"expected {names}, got a {msg.name} frame")
    if length > limit:
        raise ProtocolError(
            f"a {msg.name} frame announces {length} bytes, more than the {limit} a "
            f"{msg.name} may hold"
        )
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise ProtocolError(
            f"truncated {msg.name} frame: {length} bytes announced, "
            f"the connection closed after {len(e.partial)}"
        ) from None
    return msg, payload


def frame(msg: Msg, *parts: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview]:
    """The buffers of one frame, for ``writer.writelines`` (the payload is not copied)."""
    length = sum(len(p) for p in parts)
    if length > FRAME_LIMITS[msg]:
        raise ProtocolError(f"{msg.name} frame of {length} bytes exceeds the "
                            f"{FRAME_LIMITS[msg]} its peer accepts")
    return [HEADER.pack(msg, length), *parts]


def frame_size(*parts: bytes | bytearray | memoryview) -> int:
    return HEADER.size + sum(len(p) for p in parts)


async def expect(reader: asyncio.StreamReader, *wanted: Msg) -> tuple[Msg, bytes]:
    """Read a frame that must be one of ``wanted``; an ERROR frame raises :class:`PeerError`."""
    msg, payload = await read_frame(reader)
    if msg is Msg.ERROR and Msg.ERROR not in wanted:
        raise PeerError(decode_error(payload))
    if msg not in wanted:
        names = " or ".join(m.name for m in wanted)
        raise ProtocolError(f"expected {names}, got {msg.name}")
    return msg, payload


# --------------------------------------------------------------------------------------------
# payloads


def encode_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(msg: Msg, payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"{msg.name} frame does not hold valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{msg.name} frame does not hold a JSON object")
    return obj


def encode_hello(token: str, **meta: Any) -> bytes:
    secret = token.encode()
    if not 0 < len(secret) <= MAX_TOKEN:
        raise ProtocolError(f"a session token of {len(secret)} bytes (1 to {MAX_TOKEN})")
    return _HELLO_PREFIX.pack(MAGIC, VERSION) + bytes([len(secret)]) + secret + encode_json(meta)


def check_hello(payload: bytes, token: str) -> dict[str, Any]:
    """The HELLO's metadata, if it carries our magic, version and token; else ProtocolError.

    The token is compared before the metadata is parsed: a stranger's JSON is never read."""
    if len(payload) < _HELLO_PREFIX.size or not payload.startswith(MAGIC):
        raise ProtocolError(
            f"not a vbrd data mover greeting (starts with {payload[:8]!r})"
        )
    _, version = _HELLO_PREFIX.unpack_from(payload)
    if version != VERSION:
        raise ProtocolError(
            f"data mover protocol version {version} is not supported (this side speaks "
            f"{VERSION}); run the same vbrd version on proxy and repository"
        )
    start = _HELLO_PREFIX.size + 1
    size = payload[_HELLO_PREFIX.size] if len(payload) >= start else 0
    offered = payload[start:start + size]
    if len(offered) != size or not hmac.compare_digest(offered, token.encode()):
        raise ProtocolError("the session token does not match this task; connection refused")
    return decode_json(Msg.HELLO, payload[start + size:])


def encode_digests(seq: int, entries: Sequence[BlockEntry]) -> bytes:
    out = bytearray(_BATCH_HEAD.size + _ENTRY.size * len(entries))
    _BATCH_HEAD.pack_into(out, 0, seq, len(entries))
    pos = _BATCH_HEAD.size
    for e in entries:
        if e.digest is None:
            _ENTRY.pack_into(out, pos, e.block_no, e.length, FLAG_ZERO, _NO_DIGEST)
        else:
            _ENTRY.pack_into(out, pos, e.block_no, e.length, 0, e.digest)
        pos += _ENTRY.size
    return bytes(out)


def decode_digests(payload: bytes) -> tuple[int, list[BlockEntry]]:
    if len(payload) < _BATCH_HEAD.size:
        raise ProtocolError(f"DIGESTS frame of {len(payload)} bytes is too short")
    seq, count = _BATCH_HEAD.unpack_from(payload)
    if len(payload) != _BATCH_HEAD.size + count * _ENTRY.size:
        raise ProtocolError(
            f"DIGESTS frame announces {count} entries but holds {len(payload)} bytes"
        )
    entries = [
        BlockEntry(no, length, None if flags & FLAG_ZERO else digest)
        for no, length, flags, digest in _ENTRY.iter_unpack(
            memoryview(payload)[_BATCH_HEAD.size:]
        )
    ]
    return seq, entries


def encode_want(seq: int, indexes: Iterable[int]) -> bytes:
    idx = list(indexes)
    return _BATCH_HEAD.pack(seq, len(idx)) + struct.pack(f">{len(idx)}I", *idx)


def decode_want(payload: bytes) -> tuple[int, list[int]]:
    if len(payload) < _BATCH_HEAD.size:
        raise ProtocolError(f"WANT frame of {len(payload)} bytes is too short")
    seq, count = _BATCH_HEAD.unpack_from(payload)
    if len(payload) != _BATCH_HEAD.size + count * _INDEX.size:
        raise ProtocolError(f"WANT frame announces {count} indexes but holds {len(payload)} bytes")
    return seq, list(struct.unpack_from(f">{count}I", payload, _BATCH_HEAD.size))


def split_block(payload: bytes) -> tuple[bytes, memoryview]:
    if len(payload) <= DIGEST_SIZE:
        raise ProtocolError(f"BLOCK frame of {len(payload)} bytes holds no data")
    view = memoryview(payload)
    return bytes(view[:DIGEST_SIZE]), view[DIGEST_SIZE:]


@dataclass(frozen=True, slots=True)
class Patch:
    """The changed ranges of one block, ``(offset in the block, size)``, and their bytes."""

    seq: int
    block_no: int
    length: int
    ranges: list[tuple[int, int]]
    data: memoryview


def encode_patch_head(seq: int, block_no: int, length: int,
                      ranges: Sequence[tuple[int, int]]) -> bytes:
    """The PATCH payload before the ranges' bytes (which follow it, not copied)."""
    head = bytearray(_PATCH_HEAD.size + _RANGE.size * len(ranges))
    _PATCH_HEAD.pack_into(head, 0, seq, block_no, length, len(ranges))
    pos = _PATCH_HEAD.size
    for offset, size in ranges:
        _RANGE.pack_into(head, pos, offset, size)
        pos += _RANGE.size
    return bytes(head)


def decode_patch(payload: bytes) -> Patch:
    """A PATCH frame, its ranges checked to be sorted, disjoint, inside the block and paid
    for by the bytes that follow them."""
    if len(payload) < _PATCH_HEAD.size:
        raise ProtocolError(f"PATCH frame of {len(payload)} bytes is too short")
    seq, block_no, length, count = _PATCH_HEAD.unpack_from(payload)
    start = _PATCH_HEAD.size + count * _RANGE.size
    if count == 0 or len(payload) < start:
        raise ProtocolError(f"PATCH frame of block {block_no} announces {count} ranges but "
                            f"holds {len(payload)} bytes")
    ranges = list(_RANGE.iter_unpack(memoryview(payload)[_PATCH_HEAD.size:start]))
    end = 0
    for offset, size in ranges:
        if size == 0 or offset < end or offset + size > length:
            raise ProtocolError(f"PATCH of block {block_no}: range {offset}+{size} overlaps "
                                f"another or lies outside the block's {length} bytes")
        end = offset + size
    data = memoryview(payload)[start:]
    if len(data) != sum(size for _, size in ranges):
        raise ProtocolError(f"PATCH of block {block_no}: {len(data)} bytes for ranges of "
                            f"{sum(size for _, size in ranges)}")
    return Patch(seq, block_no, length, ranges, data)


def encode_ack(ack: Ack) -> bytes:
    return _ACK.pack(ack.seq, ack.target_busy, ack.target_stalled, ack.bytes_stored)


def decode_ack(payload: bytes) -> Ack:
    if len(payload) != _ACK.size:
        raise ProtocolError(f"ACK frame of {len(payload)} bytes, expected {_ACK.size}")
    return Ack(*_ACK.unpack(payload))


def encode_error(message: str) -> bytes:
    return message.encode("utf-8", "replace")[:FRAME_LIMITS[Msg.ERROR]]


def decode_error(payload: bytes) -> str:
    return payload.decode("utf-8", "replace")


async def send_error(writer: asyncio.StreamWriter, message: str) -> None:
    """Tell the peer why we stop, as far as the connection still allows, and close it."""
    try:
        writer.writelines(frame(Msg.ERROR, encode_error(message)))
        await asyncio.wait_for(writer.drain(), timeout=2)
    except (OSError, TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), timeout=2)
        except (OSError, TimeoutError, ConnectionError):
            pass


# --------------------------------------------------------------------------------------------
# errors as sentences


def describe(e: BaseException) -> str:
    """An exception as a sentence: its own message, or its type when it has none."""
    text = str(e)
    if isinstance(e, TransportError):
        return text
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def root_cause(group: BaseExceptionGroup) -> BaseException:
    """The error worth reporting from a failed task group: the peer's word first, then ours.

    When one side fails, the other usually fails a moment later with a broken connection;
    the first side's message (relayed in an ERROR frame) is the one a human needs.
    """
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                leaves.append(e)

    walk(group)
    for kind in (PeerError, TransportError, Exception):
        for e in leaves:
            if isinstance(e, kind):
                return e
    return leaves[0]
