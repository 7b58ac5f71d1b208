"""The bandwidth limit: honoured within 10 % on a real loopback socket, changeable live."""
from __future__ import annotations

import asyncio
import time

import pytest

from vbrd.transport.throttle import TokenBucket

FRAME = 1 << 20


async def send_through(bucket: TokenBucket, seconds: float) -> tuple[int, float]:
    """Send 1 MiB frames over loopback TCP through ``bucket``; bytes received and time."""
    received = 0
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while chunk := await reader.read(1 << 20):
            received += len(chunk)
        writer.close()
        done.set()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = bytes(FRAME)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        await bucket.consume(len(payload))
        writer.write(payload)
        await writer.drain()
    writer.close()
    await done.wait()
    elapsed = time.monotonic() - start
    server.close()
    return received, elapsed


async def test_a_20_mb_per_second_limit_holds_within_10_percent_over_3_seconds() -> None:
    limit = 20e6
    received, elapsed = await send_through(TokenBucket(limit), 3.0)
    assert received / elapsed == pytest.approx(limit, rel=0.10)


async def test_the_rate_can_change_while_sending() -> None:
    bucket = TokenBucket(40e6)

    async def slow_down() -> None:
        await asyncio.sleep(1.0)
        bucket.set_rate(10e6)

    changer = asyncio.create_task(slow_down())
    received, elapsed = await send_through(bucket, 2.0)
    await changer
    # one second at 40 MB/s, one at 10 MB/s
    assert received == pytest.approx(50e6, rel=0.10)


async def test_no_limit_does_not_wait() -> None:
    bucket = TokenBucket(None)
    start = time.monotonic()
    for _ in range(1000):
        await bucket.consume(FRAME)
    assert time.monotonic() - start < 0.1
    assert bucket.waited == 0


def test_a_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        TokenBucket(0)
