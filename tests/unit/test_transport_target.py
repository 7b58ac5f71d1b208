"""The repository-side mover's port: whatever a connection makes go wrong ends that
connection, never the mover."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from vbrd.repository import Repository
from vbrd.transport import TransferRules, wire
from vbrd.transport.target import TargetMover

TOKEN = "the-task-token"
RULES = TransferRules(block_size=1 << 20, compression_level=3)


async def ask(port: int, hello: bytes) -> str:
    """Greet the mover with ``hello``; what it answers (its ERROR frame's text)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.writelines(wire.frame(wire.Msg.HELLO, hello))
        msg, payload = await asyncio.wait_for(wire.read_frame(reader), 10)
    finally:
        writer.close()
    assert msg is wire.Msg.ERROR
    return wire.decode_error(payload)


async def test_a_fault_while_a_connection_greets_is_answered_and_the_mover_serves_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Repository.open_or_create(tmp_path / "repo", block_size=RULES.block_size,
                              compression_level=RULES.compression_level)
    events: list[dict[str, Any]] = []
    listening = asyncio.Event()

    def emit(event: dict[str, Any]) -> None:
        events.append(event)
        if event["event"] == "listening":
            listening.set()

    mover = TargetMover(str(tmp_path / "repo"), RULES, token=TOKEN,
                        index_out=str(tmp_path / "disk.map"), emit=emit, accept_timeout=60)
    run = asyncio.ensure_future(mover.run())
    try:
        await asyncio.wait_for(listening.wait(), 30)
        port = int(next(e["port"] for e in events if e["event"] == "listening"))

        def fault(payload: bytes, token: str) -> dict[str, Any]:
            raise RuntimeError("a fault nobody foresaw")

        # a fault of any kind, not only the protocol errors the mover expects
        with monkeypatch.context() as patched:
            patched.setattr(wire, "check_hello", fault)
            assert await ask(port, wire.encode_hello(TOKEN, block_size=RULES.block_size,
                                                     disk_size=1 << 20)) \
                == "connection refused: RuntimeError: a fault nobody foresaw"
        # values of the wrong kind in a greeting with the right token
        assert await ask(port, wire.encode_hello(TOKEN, block_size=RULES.block_size,
                                                 disk_size={"x": 1})) \
            == "connection refused: the proxy announces a disk of {'x': 1} bytes"
        assert not run.done(), "the mover still waits for its proxy"
        guess = await ask(port, wire.encode_hello("a-guess", block_size=RULES.block_size,
                                                  disk_size=1 << 20))
        assert guess.startswith("connection refused: ") and "token" in guess, guess
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
