"""The data movers' wire protocol: frames, batches, greeting, and what it refuses."""
from __future__ import annotations

import asyncio
import hashlib

import pytest

from vbrd.transport import wire
from vbrd.transport.wire import Ack, BlockEntry, Msg


def stream(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def raw(msg: Msg, payload: bytes) -> bytes:
    return b"".join(bytes(p) for p in wire.frame(msg, payload))


async def test_frames_come_back_as_sent_one_after_another() -> None:
    block = bytes(range(256)) * 4096
    reader = stream(raw(Msg.BLOCK, block) + raw(Msg.DONE, b"{}"))
    assert await wire.read_frame(reader) == (Msg.BLOCK, block)
    assert await wire.read_frame(reader) == (Msg.DONE, b"{}")
    with pytest.raises(wire.ConnectionClosed):
        await wire.read_frame(reader)


async def test_a_frame_cut_short_names_what_was_missing() -> None:
    whole = raw(Msg.BLOCK, b"x" * 1000)
    with pytest.raises(wire.ProtocolError, match="truncated BLOCK frame: 1000 bytes announced, "
                                                  "the connection closed after 400"):
        await wire.read_frame(stream(whole[:405]))
    with pytest.raises(wire.ProtocolError, match="middle of a frame header \\(got 3 of 5"):
        await wire.read_frame(stream(whole[:3]))


async def test_garbage_is_not_taken_for_a_frame() -> None:
    with pytest.raises(wire.ProtocolError, match="not a vbrd data mover frame"):
        await wire.read_frame(stream(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))


async def test_a_frame_announcing_more_than_the_limit_is_refused_before_reading_it() -> None:
    head = wire.HEADER.pack(Msg.BLOCK, wire.MAX_PAYLOAD + 1)
    with pytest.raises(wire.ProtocolError, match="more than the .* a BLOCK may hold"):
        await wire.read_frame(stream(head, eof=False))


async def test_an_error_frame_where_another_was_expected_raises_the_peers_message() -> None:
    with pytest.raises(wire.PeerError, match="repository is full"):
        await wire.expect(stream(raw(Msg.ERROR, b"repository is full")), Msg.WELCOME)


def test_digest_batches_round_trip_with_zero_blocks_marked() -> None:
    entries = [
        BlockEntry(0, 1 << 20, hashlib.sha256(b"a").digest()),
        BlockEntry(1, 1 << 20, None),
        BlockEntry(7, 4096, hashlib.sha256(b"b").digest()),
    ]
    payload = wire.encode_digests(42, entries)
    assert wire.decode_digests(payload) == (42, entries)
    with pytest.raises(wire.ProtocolError, match="announces 3 entries"):
        wire.decode_digests(payload[:-1])


def test_want_and_ack_round_trip() -> None:
    assert wire.decode_want(wire.encode_want(3, [0, 5, 9])) == (3, [0, 5, 9])
    assert wire.decode_want(wire.encode_want(4, [])) == (4, [])
    ack = Ack(7, 1.25, 0.5, 123456789)
    assert wire.decode_ack(wire.encode_ack(ack)) == ack


def test_hello_is_accepted_only_with_this_tasks_token_and_version() -> None:
    hello = wire.encode_hello("s3cret", disk="Hard disk 1", block_size=1 << 20)
    assert wire.check_hello(hello, "s3cret") == {"disk": "Hard disk 1", "block_size": 1 << 20}
    with pytest.raises(wire.ProtocolError, match="token does not match"):
        wire.check_hello(hello, "another")
    old = wire.MAGIC + (wire.VERSION + 1).to_bytes(2, "big") + b"{}"
    with pytest.raises(wire.ProtocolError, match=f"version {wire.VERSION + 1} is not supported"):
        wire.check_hello(old, "s3cret")
    with pytest.raises(wire.ProtocolError, match="not a vbrd data mover greeting"):
        wire.check_hello(b"SSH-2.0-OpenSSH_9.2", "s3cret")


def test_the_root_cause_of_a_failed_group_is_the_peers_error() -> None:
    group = BaseExceptionGroup("x", [
        ConnectionResetError("reset"),
        ExceptionGroup("y", [wire.PeerError("repository side: disk full")]),
    ])
    assert str(wire.root_cause(group)) == "repository side: disk full"


# --------------------------------------------------------------------------------------------
# what a stranger on the mover's port can make it do


async def test_a_greeting_announcing_48_mib_is_refused_from_its_header_alone() -> None:
    # only the five header bytes ever arrive: a reader that waited for the payload would hang
    head = wire.HEADER.pack(Msg.HELLO, 48 << 20)
    with pytest.raises(wire.ProtocolError, match=r"HELLO frame announces 50331648 bytes, more "
                                                 r"than the \d+ a HELLO may hold"):
        await asyncio.wait_for(wire.read_frame(stream(head, eof=False)), 5)


async def test_every_frame_type_has_its_own_bound_checked_before_its_payload() -> None:
    for msg in Msg:
        bound = wire.FRAME_LIMITS[msg]
        assert bound <= wire.MAX_PAYLOAD
        head = wire.HEADER.pack(msg, bound + 1)
        with pytest.raises(wire.ProtocolError, match=f"{msg.name} frame announces"):
            await asyncio.wait_for(wire.read_frame(stream(head, eof=False)), 5)
    assert wire.FRAME_LIMITS[Msg.HELLO] <= 16 << 10, "a greeting is small"
    assert wire.FRAME_LIMITS[Msg.ACK] == wire._ACK.size, "an ACK is of one size"


async def test_a_frame_type_not_allowed_at_this_point_is_refused_before_its_payload() -> None:
    head = wire.HEADER.pack(Msg.BLOCK, 1 << 20)
    with pytest.raises(wire.ProtocolError, match="expected HELLO, got a BLOCK frame"):
        await asyncio.wait_for(wire.read_frame(stream(head, eof=False),
                                               wire.GREETING_LIMITS), 5)


def test_the_token_is_checked_before_the_greetings_json_is_parsed() -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    forged = wire._HELLO_PREFIX.pack(wire.MAGIC, wire.VERSION) + bytes([5]) + b"guess" + nested
    with pytest.raises(wire.ProtocolError, match="token does not match"):
        wire.check_hello(forged, "s3cret")


def test_json_nested_too_deep_is_a_protocol_error_not_a_crash() -> None:
    deep = b"{\"a\":" * 3000 + b"1" + b"}" * 3000
    with pytest.raises(wire.ProtocolError, match="DONE frame does not hold valid JSON"):
        wire.decode_json(Msg.DONE, deep)
    hello = wire._HELLO_PREFIX.pack(wire.MAGIC, wire.VERSION) + bytes([6]) + b"s3cret" + deep
    with pytest.raises(wire.ProtocolError, match="HELLO frame does not hold valid JSON"):
        wire.check_hello(hello, "s3cret")
