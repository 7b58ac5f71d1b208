"""A disk's transfer through both data mover processes into a real repository.

The disks are raw image files read by the test transport modes of
``transport_test_modes.py`` (loaded by the proxy's mover as a plugin module, as installed
plugins are). What a user checks: the repository gives back the disk byte for byte, an
unchanged disk costs no block data on the wire, a failing mode hands over to the next, stop
leaves no process behind, the bandwidth limit holds, and a stranger cannot talk to the
repository's mover.
"""
from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vbrd.errors import TransportError
from vbrd.models import DatastoreFile, DiskTask, Extent, ProxyContext, VmRef
from vbrd.repository import Repository
from vbrd.repository.blocks import BlockCodec, block_digest, is_zero
from vbrd.transport import (
    Progress,
    SourceSpec,
    TlsSettings,
    TransferControl,
    TransferResult,
    TransferRules,
    TransferStopped,
    run_transfer,
    wire,
)
from vbrd.transport.blockmap import read_block_map
from vbrd.transport.movers import MoverProcess, _child_env
from vbrd.transport.spec import MAX_TASK_BYTES, TASK_HEADER, rules_to_json, source_to_json

MiB = 1 << 20
BS = MiB
RULES = TransferRules(block_size=BS, compression_level=3)
PLUGIN = "tests.integration.transport_test_modes"

# --------------------------------------------------------------------------------------------
# disk images: the generator of bench/make_disk.py — zero (holes), log-like text, word salad
# and random extents, the same bytes for the same seed (word salad reshuffled by phrases, which
# keeps it free of long repeats and makes it fast enough for a test)

ALIGN = 4096
WORDS = (b"alpha beta gamma delta epsilon backup restore vmdk snapshot proxy repository "
         b"disk block chunk extent guest freeze thaw kernel systemd nginx postgres table "
         b"index page commit rollback error warning info debug trace request response").split()


def _text(rnd: random.Random, n: int) -> bytes:
    out, size = [], 0
    while size < n:
        line = (b'{"ts":%d,"level":"info","host":"web-%02d","msg":"GET /api/v1/items/%d 200",'
                b'"ms":%d}\n' % (1700000000 + rnd.randrange(10**6), rnd.randrange(40),
                                rnd.randrange(10**5), rnd.randrange(900)))
        out.append(line)
        size += len(line)
    return b"".join(out)[:n]


def _words(rnd: random.Random, n: int) -> bytes:
    return b" ".join(rnd.choices(WORDS, k=n // 5 + 1))[:n].ljust(n, b" ")


def _extent(rnd: random.Random, kind: str, n: int) -> bytes:
    if kind == "random":
        return rnd.randbytes(n)
    unit = min(n, MiB)
    base = _text(rnd, unit) if kind == "text" else _words(rnd, unit)
    sep = b"\n" if kind == "text" else b" "
    lines = base.split(sep)
    if kind == "words":  # shuffle phrases rather than single words: 16 times fewer to shuffle
        lines = [b" ".join(lines[i:i + 16]) for i in range(0, len(lines), 16)]
    reps, size = [base], unit
    while size < n:
        rnd.shuffle(lines)
        reps.append(sep.join(lines))
        size += len(reps[-1])
    return b"".join(reps)[:n]


def make_image(path: Path, size: int, seed: int) -> Path:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        off = 0
        while off < size:
            n = min(rnd.randrange(16, 16384) * ALIGN, size - off)
            r = rnd.random()
            kind = "zero" if r < 0.35 else "text" if r < 0.60 else "words" if r < 0.80 else "random"
            if kind != "zero":
                f.seek(off)
                f.write(_extent(rnd, kind, n))
            off += n
    return path


def blocks_of(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(BS):
            yield block


@dataclass
class Image:
    path: Path
    size: int
    digests: list[bytes | None]  # per block, None for an all-zero block

    @classmethod
    def of(cls, path: Path) -> Image:
        digests = [None if is_zero(b) else block_digest(b) for b in blocks_of(path)]
        return cls(path, path.stat().st_size, digests)

    @property
    def zero_blocks(self) -> int:
        return sum(d is None for d in self.digests)

    @property
    def distinct_data_blocks(self) -> int:
        return len({d for d in self.digests if d is not None})


def task_for(image: Path, **extra: object) -> DiskTask:
    return DiskTask(
        session_id="s-1", vm=VmRef("web01", "vm-42"), disk_key=2000, label="Hard disk 1",
        capacity=image.stat().st_size, backing=DatastoreFile("LocalDS_0", "web01/web01.vmdk"),
        extra={"image": str(image), **extra},
    )


def spec_for(image: Path, modes: list[str], areas: list[Extent] | None = None,
             **extra: object) -> SourceSpec:
    return SourceSpec(task=task_for(image, **extra), modes=modes, proxy=ProxyContext("proxy-1"),
                      areas=areas, plugin_modules=[PLUGIN], load_entrypoints=False)


async def transfer(spec: SourceSpec, repo: Path, out: Path,
                   control: TransferControl | None = None) -> TransferResult:
    return await run_transfer(spec, str(repo), RULES, on_progress=lambda p: None,
                              index_out=str(out), control=control)


def assert_map_matches(repo: Path, result: TransferResult, image: Image) -> set[int]:
    """Every block the map names holds the image's bytes; returns the block numbers named."""
    repository = Repository.open(repo)
    bmap = read_block_map(result.index_path)
    assert (bmap.block_size, bmap.disk_size) == (BS, image.size)
    named = set()
    with open(image.path, "rb") as f:
        for entry in bmap.entries():
            data = os.pread(f.fileno(), BS, entry.block_no * BS)
            assert entry.length == len(data)
            if entry.digest is None:
                assert is_zero(data), f"block {entry.block_no} marked zero but holds data"
            else:
                assert repository.read_block(entry.digest, entry.length) == data
            named.add(entry.block_no)
    return named


def assert_gone(pids: dict[str, int]) -> None:
    assert pids, "the transfer did not report its movers' pids"
    for role, pid in pids.items():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
            pytest.fail(f"the {role} data mover (pid {pid}) is still running")


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("movers")


@pytest.fixture(scope="module")
def disk256(workdir: Path) -> Image:
    return Image.of(make_image(workdir / "disk256.img", 256 * MiB, seed=1))


@pytest.fixture(scope="module")
def disk64(workdir: Path) -> Image:
    """64 MiB and 12 KiB: the last block is short."""
    return Image.of(make_image(workdir / "disk64.img", 64 * MiB + 3 * ALIGN, seed=7))


@pytest.fixture(scope="module")
def random64(workdir: Path) -> Path:
    path = workdir / "random64.img"
    path.write_bytes(random.Random(3).randbytes(64 * MiB))
    return path


def new_repo(base: Path, name: str) -> Path:
    Repository.create(base / name, block_size=BS, compression_level=3)
    return base / name


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def first_full(workdir: Path, disk256: Image) -> tuple[Path, TransferResult]:
    """The 256 MiB disk read whole (zero blocks included) into a new repository."""
    repo = new_repo(workdir, "repo-full")
    result = await transfer(spec_for(disk256.path, ["nosan", "raw"], [Extent(0, disk256.size)]),
                            repo, workdir / "full.map")
    return repo, result


# --------------------------------------------------------------------------------------------
# the data path


async def test_a_disk_comes_back_byte_for_byte_and_zero_blocks_carry_no_data(
    first_full: tuple[Path, TransferResult], disk256: Image
) -> None:
    repo, result = first_full
    named = assert_map_matches(repo, result, disk256)
    assert named == set(range(len(disk256.digests)))
    assert result.blocks_total == len(disk256.digests)
    assert result.zero_blocks == disk256.zero_blocks > 0
    # each distinct data block crossed once; zero blocks and repeats did not
    assert result.blocks_sent == disk256.distinct_data_blocks
    assert result.blocks_sent + result.blocks_deduplicated + result.zero_blocks == (
        result.blocks_total)
    assert result.bytes_read == disk256.size
    assert 0 < result.bytes_stored <= result.bytes_sent < disk256.size
    assert result.mode == "raw"
    assert result.fallbacks == [("nosan", "no SAN path to LocalDS_0 from this proxy")]
    assert result.blocks_durable
    assert result.peak_rss < 300 * MiB


async def test_a_second_transfer_of_the_same_disk_sends_no_block_data(
    first_full: tuple[Path, TransferResult], disk256: Image, workdir: Path
) -> None:
    repo, _ = first_full
    stored_before = Repository.open(repo).stats()
    result = await transfer(spec_for(disk256.path, ["raw"]), repo, workdir / "again.map")
    assert result.blocks_sent == 0 and result.bytes_stored == 0
    assert result.blocks_deduplicated == result.blocks_total > 0
    # only the greeting, the digests (45 bytes per block) and their framing crossed
    assert result.bytes_sent < 100 * result.blocks_total + 4096
    named = assert_map_matches(repo, result, disk256)
    # read by allocation: what the map leaves out is a hole of the image, i.e. zeros
    assert all(disk256.digests[n] is None for n in set(range(len(disk256.digests))) - named)
    assert Repository.open(repo).stats() == stored_before


async def test_only_the_blocks_touching_the_changed_areas_are_read_and_sent(
    disk64: Image, workdir: Path
) -> None:
    repo = new_repo(workdir, "repo-areas")
    areas = [
        Extent(3 * BS + 100, 10),          # inside block 3
        Extent(10 * BS - 4096, 8192),      # straddles blocks 9 and 10
        Extent(disk64.size - 4096, 4096),  # the short last block
    ]
    result = await transfer(spec_for(disk64.path, ["raw"], areas), repo, workdir / "areas.map")
    last = len(disk64.digests) - 1
    assert assert_map_matches(repo, result, disk64) == {3, 9, 10, last}
    assert result.bytes_read == 3 * BS + (disk64.size - last * BS)
    assert result.blocks_total == 4


async def test_a_mode_failing_mid_disk_hands_over_to_the_next_without_rereading(
    disk64: Image, workdir: Path
) -> None:
    repo = new_repo(workdir, "repo-fallback")
    spec = spec_for(disk64.path, ["nosan", "locked", "flaky", "raw"],
                    [Extent(0, disk64.size)], fail_at=36 * BS)
    result = await transfer(spec, repo, workdir / "fallback.map")
    assert result.mode == ["flaky", "raw"]
    assert result.fallbacks[:2] == [
        ("nosan", "no SAN path to LocalDS_0 from this proxy"),
        ("locked", "cannot open [LocalDS_0] web01/web01.vmdk: the file is locked"),
    ]
    assert result.fallbacks[2][0] == "flaky"
    assert result.fallbacks[2][1].startswith("read failed at offset 33554432: connection to")
    assert len(result.fallbacks) == 3
    assert result.bytes_read == disk64.size
    assert assert_map_matches(repo, result, disk64) == set(range(len(disk64.digests)))


async def test_when_no_mode_is_left_the_error_names_each_modes_reason(
    disk64: Image, workdir: Path
) -> None:
    repo = new_repo(workdir, "repo-nomode")
    control = TransferControl()
    spec = spec_for(disk64.path, ["locked", "flaky"], [Extent(0, disk64.size)], fail_at=4 * BS)
    with pytest.raises(TransportError) as failure:
        await transfer(spec, repo, workdir / "nomode.map", control=control)
    message = str(failure.value)
    assert "transport mode locked: cannot open [LocalDS_0] web01/web01.vmdk: the file is locked" \
        in message
    assert "transport mode flaky: read failed at offset 0: connection to the host was reset" \
        in message
    assert not (workdir / "nomode.map").exists()
    assert_gone(control.pids)


async def test_an_unknown_mode_is_reported_by_name(disk64: Image, workdir: Path) -> None:
    repo = new_repo(workdir, "repo-unknown")
    with pytest.raises(TransportError, match="transport mode hotadd: no installed plugin "
                                             "provides this transport mode"):
        await transfer(spec_for(disk64.path, ["hotadd"]), repo, workdir / "unknown.map")


async def test_the_repository_sides_failure_reaches_the_caller_in_its_own_words(
    disk64: Image, workdir: Path
) -> None:
    Repository.create(workdir / "repo-2m", block_size=2 * MiB)
    spec = spec_for(disk64.path, ["raw"])
    with pytest.raises(TransportError, match="stores blocks of 2097152 bytes, the transfer "
                                             "rules say 1048576"):
        await transfer(spec, workdir / "repo-2m", workdir / "2m.map")

    control = TransferControl()
    missing = workdir / "no-such-dir" / "disk.map"
    with pytest.raises(TransportError) as failure:
        await transfer(spec, new_repo(workdir, "repo-nodir"), missing, control)
    assert str(failure.value).startswith("repository side: No such file or directory: ")
    assert str(missing) in str(failure.value)
    assert_gone(control.pids)


async def test_stop_kills_both_movers_and_raises(disk64: Image, workdir: Path) -> None:
    repo = new_repo(workdir, "repo-stop")
    stop = asyncio.Event()
    control = TransferControl()
    progress: list[Progress] = []

    def on_progress(p: Progress) -> None:
        progress.append(p)
        if p.bytes_read > 0:
            stop.set()

    spec = spec_for(disk64.path, ["slow"], [Extent(0, disk64.size)], delay=0.3)
    started = time.monotonic()
    with pytest.raises(TransferStopped, match="transfer of Hard disk 1 of VM web01 was stopped"):
        await run_transfer(spec, str(repo), RULES, on_progress=on_progress, stop=stop,
                           index_out=str(workdir / "stop.map"), control=control)
    assert time.monotonic() - started < 10
    assert progress and progress[-1].bytes_read < disk64.size
    assert_gone(control.pids)
    assert not (workdir / "stop.map").exists()
    assert not (workdir / "stop.map.partial").exists()


async def test_a_throttled_transfer_keeps_within_10_percent_of_its_limit(
    random64: Path, workdir: Path
) -> None:
    repo = new_repo(workdir, "repo-throttle")
    limit = 20e6
    samples: list[tuple[float, int]] = []
    progress: list[Progress] = []

    def on_progress(p: Progress) -> None:
        samples.append((time.monotonic(), p.bytes_sent))
        progress.append(p)

    rules = TransferRules(block_size=BS, compression_level=3, bandwidth_limit=limit)
    result = await run_transfer(spec_for(random64, ["raw"]), str(repo), rules,
                                on_progress=on_progress, index_out=str(workdir / "thr.map"))
    assert result.bytes_sent > 60e6  # random data does not compress: ~3 s at the limit
    steady = [s for s in samples if s[1] > 0]
    (t0, b0), (t1, b1) = steady[0], steady[-1]
    assert t1 - t0 > 2.0
    assert (b1 - b0) / (t1 - t0) == pytest.approx(limit, rel=0.10)
    assert result.bottleneck == "network"
    # progress: a few reports per second, never going back, ending at 100 %
    assert len(progress) <= 5 * (samples[-1][0] - samples[0][0]) + 2
    done = [p.bytes_done_of_total for p in progress]
    assert done == sorted(done)
    assert progress[-1].bytes_done_of_total == progress[-1].total_bytes == 64 * MiB
    assert progress[-1].bottleneck == "network" and progress[-1].mode == "raw"
    assert progress[-1].rate_bps == pytest.approx(limit, rel=0.25)


async def test_a_stray_or_garbled_connection_is_refused_and_the_real_one_still_served(
    disk64: Image, workdir: Path
) -> None:
    repo = new_repo(workdir, "repo-stray")
    token = "the-task-token"
    target = await MoverProcess.start("target", {
        "repository": str(repo), "rules": rules_to_json(RULES), "token": token,
        "index_out": str(workdir / "stray.map"),
    })
    refused: list[str] = []
    target.on_event = lambda e: refused.append(e["reason"]) if e["event"] == "refused" else None
    source = None
    try:
        port = (await target.listening(30))["port"]

        async def answer_to(data: bytes) -> str:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            await writer.drain()
            msg, payload = await asyncio.wait_for(wire.read_frame(reader), 10)
            writer.close()
            assert msg is wire.Msg.ERROR
            return wire.decode_error(payload)

        garbage = await answer_to(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert garbage.startswith("connection refused: not a vbrd data mover frame")
        hello = wire.encode_hello("a-guessed-token", block_size=BS, disk_size=disk64.size)
        wrong = await answer_to(b"".join(bytes(p) for p in wire.frame(wire.Msg.HELLO, hello)))
        assert wrong == "connection refused: the session token does not match this task; " \
                        "connection refused"

        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(bytes([wire.Msg.HELLO, 0, 0]))  # a header cut short, then gone
        writer.close()
        for _ in range(100):
            if len(refused) == 3:
                break
            await asyncio.sleep(0.05)
        assert "connection closed in the middle of a frame header (got 3 of 5 bytes)" in refused

        source = await MoverProcess.start("source", {
            "spec": source_to_json(spec_for(disk64.path, ["raw"])), "rules": rules_to_json(RULES),
            "token": token, "host": "127.0.0.1", "port": port,
        })
        assert await asyncio.wait_for(source.finished, 30) == 0
        assert await asyncio.wait_for(target.finished, 30) == 0
        assert source.result is not None
        assert read_block_map(source.result["index_path"]).count == source.result["blocks_total"]
    finally:
        await target.kill()
        if source is not None:
            await source.kill()


def resident(pid: int) -> int:
    """A process's resident memory now, in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def start_target(repo: Path, token: str, index_out: Path) -> MoverProcess:
    return await MoverProcess.start("target", {
        "repository": str(repo), "rules": rules_to_json(RULES), "token": token,
        "index_out": str(index_out),
    })


async def test_huge_and_deeply_nested_greetings_are_refused_unread_and_the_real_one_served(
    disk64: Image, workdir: Path
) -> None:
    repo = new_repo(workdir, "repo-greetings")
    token = "the-task-token"
    target = await start_target(repo, token, workdir / "greetings.map")
    refused: list[str] = []
    target.on_event = lambda e: refused.append(e["reason"]) if e["event"] == "refused" else None
    source = None
    try:
        port = (await target.listening(30))["port"]
        before = resident(target.pid)

        async def greet_with(payload_size: int) -> int:
            """A HELLO announcing ``payload_size`` bytes, then that many bytes as fast as the
            mover takes them; returns how many it took before it hung up."""
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(wire.HEADER.pack(wire.Msg.HELLO, payload_size))
            sent, piece = 0, b"\x5b" * MiB
            try:
                while sent < payload_size:
                    writer.write(piece[:payload_size - sent])
                    await asyncio.wait_for(writer.drain(), 10)
                    sent += len(piece)
            except (ConnectionError, TimeoutError):
                pass
            finally:
                writer.close()
            return sent

        taken = await asyncio.gather(*(greet_with(48 * MiB) for _ in range(3)))

        nested = b"[" * 100_000 + b"]" * 100_000
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        hello = wire.encode_hello(token) + nested  # more than this side's own frame() sends
        writer.write(wire.HEADER.pack(wire.Msg.HELLO, len(hello)) + hello)
        msg, answer = await asyncio.wait_for(wire.read_frame(reader), 10)
        writer.close()

        assert all(n < 48 * MiB for n in taken), f"the mover read {taken} bytes of greetings"
        assert msg is wire.Msg.ERROR
        assert wire.decode_error(answer).startswith(
            "connection refused: a HELLO frame announces 200")
        for _ in range(100):
            if len(refused) == 4:
                break
            await asyncio.sleep(0.05)
        assert refused.count("a HELLO frame announces 50331648 bytes, more than the 16384 a "
                             "HELLO may hold") == 3, refused
        grown = resident(target.pid) - before
        print(f"refused greetings: {sum(taken) >> 20} MiB of 144 MiB got through to the mover, "
              f"its resident memory grew {grown / MiB:.1f} MiB")
        # less than one refused greeting's worth: lazily started threads and imports of the
        # mover's first connection come to some MiB on a busy machine; reading even one of
        # the greetings whole would cost 48
        assert grown < 40 * MiB, f"the refused greetings cost the mover {grown >> 20} MiB"

        source = await MoverProcess.start("source", {
            "spec": source_to_json(spec_for(disk64.path, ["raw"])), "rules": rules_to_json(RULES),
            "token": token, "host": "127.0.0.1", "port": port,
        })
        assert await asyncio.wait_for(source.finished, 30) == 0, source.failure()
        assert await asyncio.wait_for(target.finished, 30) == 0, target.failure()
    finally:
        await target.kill()
        if source is not None:
            await source.kill()


STRANGERS = 48  # three times the cap on connections that have not greeted yet


async def test_idle_strangers_cannot_hold_the_mover_s_port_against_the_real_connection(
    disk64: Image, workdir: Path
) -> None:
    repo = new_repo(workdir, "repo-idle")
    token = "the-task-token"
    target = await start_target(repo, token, workdir / "idle.map")
    source = None
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        port = (await target.listening(30))["port"]
        for _ in range(STRANGERS):
            idle.append(await asyncio.open_connection("127.0.0.1", port))

        async def answer(reader: asyncio.StreamReader) -> str:
            """What the mover says to a stranger that says nothing, within a few seconds
            (well inside the time a greeting may take): "" while it keeps the connection."""
            try:
                msg, payload = await asyncio.wait_for(wire.read_frame(reader), 3)
            except TimeoutError:
                return ""
            except (wire.ProtocolError, ConnectionError) as e:
                return f"closed: {e}"
            assert msg is wire.Msg.ERROR
            return wire.decode_error(payload)

        # while the mover still waits for its real connection, it holds at most its cap of
        # strangers: the oldest ones were closed, told why, to make room for newer ones
        answers = await asyncio.gather(*(answer(reader) for reader, _ in idle))
        held = answers.count("")
        assert held <= wire.MAX_GREETINGS <= 16, answers
        assert all("too many connections are greeting" in a for a in answers if a), answers

        source = await MoverProcess.start("source", {
            "spec": source_to_json(spec_for(disk64.path, ["raw"])), "rules": rules_to_json(RULES),
            "token": token, "host": "127.0.0.1", "port": port,
        })
        assert await asyncio.wait_for(source.finished, 30) == 0, source.failure()
        assert await asyncio.wait_for(target.finished, 30) == 0, target.failure()
    finally:
        for _, writer in idle:
            writer.close()
        await target.kill()
        if source is not None:
            await source.kill()


async def test_a_mover_started_from_a_directory_with_planted_modules_does_not_import_them(
    disk64: Image, workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = tmp_path / "planted"
    planted.mkdir()
    marker = tmp_path / "imported"
    for name in ("vbrd", "zstandard", "uvloop"):
        (planted / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n")
    monkeypatch.chdir(planted)
    repo = new_repo(workdir, "repo-planted")
    target = await start_target(repo, "the-task-token", workdir / "planted.map")
    source = None
    try:
        port = (await target.listening(30))["port"]
        source = await MoverProcess.start("source", {
            "spec": source_to_json(spec_for(disk64.path, ["raw"])), "rules": rules_to_json(RULES),
            "token": "the-task-token", "host": "127.0.0.1", "port": port,
        })
        assert await asyncio.wait_for(source.finished, 30) == 0, source.failure()
        assert await asyncio.wait_for(target.finished, 30) == 0, target.failure()
    finally:
        await target.kill()
        if source is not None:
            await source.kill()
    assert not marker.exists(), f"a mover imported {marker.read_text().split()}"


def self_signed(directory: Path, name: str) -> tuple[str, str]:
    """A certificate and key for ``name``, signed by itself (the lab's stand-in for a CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


async def test_with_tls_the_proxy_side_trusts_only_the_repository_sides_certificate(
    disk64: Image, workdir: Path
) -> None:
    repo = new_repo(workdir, "repo-tls")
    cert, key = self_signed(workdir, "repository")
    other, _ = self_signed(workdir, "impostor")
    rules = TransferRules(BS, 3, tls=TlsSettings(certfile=cert, keyfile=key, cafile=cert))
    spec = spec_for(disk64.path, ["raw"], [Extent(0, disk64.size)])
    result = await run_transfer(spec, str(repo), rules, on_progress=lambda p: None,
                                index_out=str(workdir / "tls.map"))
    assert assert_map_matches(repo, result, disk64) == set(range(len(disk64.digests)))

    distrust = replace(rules, tls=TlsSettings(certfile=cert, keyfile=key, cafile=other))
    with pytest.raises(TransportError, match="cannot reach the repository's data mover at "
                                             "127.0.0.1:[0-9]+: .*certificate verify failed"):
        await run_transfer(spec, str(repo), distrust, on_progress=lambda p: None,
                           index_out=str(workdir / "tls2.map"))


# --------------------------------------------------------------------------------------------
# throughput


def hash_and_compress(image: Image, blocks: list[int]) -> float:
    """Seconds for zero test, SHA-256 and zstd of ``blocks`` on 2 threads, in memory."""
    with open(image.path, "rb") as f:
        data = [os.pread(f.fileno(), BS, n * BS) for n in blocks]
    codec = BlockCodec(RULES.compression_level)

    def work(block: bytes) -> int:
        if is_zero(block):
            return 0
        hashlib.sha256(block).digest()
        return len(codec.compress(block))

    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(work, data))
    return time.perf_counter() - start


async def test_throughput_against_hashing_and_compressing_in_process(
    disk256: Image, workdir: Path, record_property: Callable[[str, object], None]
) -> None:
    """Reported, not a benchmark: the machine may be shared, so only a collapse fails it."""
    repo = new_repo(workdir, "repo-speed")
    result = await transfer(spec_for(disk256.path, ["raw"]), repo, workdir / "speed.map")
    blocks = [e.block_no for e in read_block_map(result.index_path).entries()]
    baseline = result.bytes_read / hash_and_compress(disk256, blocks)
    wall = result.bytes_read / result.duration
    steady = result.processing_rate
    record_property("transfer_MBps", round(wall / 1e6, 1))
    record_property("processing_MBps", round(steady / 1e6, 1))
    record_property("hash_compress_2_threads_MBps", round(baseline / 1e6, 1))
    print(f"\n256 MiB disk, {result.bytes_read >> 20} MiB allocated: "
          f"{wall / 1e6:.0f} MB/s over {result.duration:.2f} s with mover start-up, "
          f"{steady / 1e6:.0f} MB/s while moving data (bottleneck {result.bottleneck}, "
          f"{result.stage_load}); hash+compress on 2 threads in-process {baseline / 1e6:.0f} "
          f"MB/s; ratios {wall / baseline:.2f} / {steady / baseline:.2f}")
    assert steady > 0.1 * baseline


async def test_a_mover_refuses_an_oversized_task_before_reading_it() -> None:
    """The task's length comes first and is checked against the bound: a parent (or anyone
    who can write to the mover's stdin) cannot make it buffer more."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vbrd.transport.mover", "source", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_child_env())
    out, _ = await asyncio.wait_for(
        proc.communicate(TASK_HEADER.pack(MAX_TASK_BYTES + 1) + b"{"), 60)
    assert proc.returncode == 1
    event = json.loads(out.splitlines()[-1])
    assert event["event"] == "error"
    assert f"announces {MAX_TASK_BYTES + 1} bytes" in event["message"]


async def test_a_block_whose_content_differs_from_its_digest_is_refused_and_not_stored(
    workdir: Path,
) -> None:
    """A faulty or hostile proxy side that holds the task's token sends, under the digest of
    one block, the data of another: the repository side must not store it (every later
    backup would deduplicate against it), and the transfer fails naming the disk and block.
    The same for a zstd frame whose content no longer matches its checksum."""
    codec = BlockCodec(3)
    rnd = random.Random(11)
    claimed, sent, honest = (rnd.randbytes(BS) for _ in range(3))
    flipped = bytearray(codec.compress(claimed))
    flipped[len(flipped) // 2] ^= 0x01

    for n, (lie, what) in enumerate(((codec.compress(sent), "does not match its digest"),
                                     (bytes(flipped), "checksum"))):
        repo = new_repo(workdir, f"repo-hostile-{n}")
        token = "the-task-token"
        target = await MoverProcess.start("target", {
            "repository": str(repo), "rules": rules_to_json(RULES), "token": token,
            "index_out": str(workdir / "hostile.map"),
        })
        try:
            port = (await target.listening(30))["port"]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            hello = wire.encode_hello(token, disk="Hard disk 1", vm="web01", block_size=BS,
                                      disk_size=3 * BS)
            writer.writelines(wire.frame(wire.Msg.HELLO, hello))
            await wire.expect(reader, wire.Msg.WELCOME)
            entries = [wire.BlockEntry(0, BS, block_digest(honest)),
                       wire.BlockEntry(1, BS, block_digest(claimed)),
                       wire.BlockEntry(2, BS, block_digest(honest[::-1]))]
            writer.writelines(wire.frame(wire.Msg.DIGESTS, wire.encode_digests(0, entries)))
            _, want = await wire.expect(reader, wire.Msg.WANT)
            assert wire.decode_want(want) == (0, [0, 1, 2])
            for entry, payload in zip(entries, (codec.compress(honest), lie,
                                                codec.compress(honest[::-1])), strict=True):
                assert entry.digest is not None
                writer.writelines(wire.frame(wire.Msg.BLOCK, entry.digest, payload))
            await writer.drain()
            msg, payload = await asyncio.wait_for(wire.read_frame(reader), 30)
            writer.close()

            assert msg is wire.Msg.ERROR
            message = wire.decode_error(payload)
            assert "block 1 of Hard disk 1 of VM web01" in message
            assert what in message
            assert await asyncio.wait_for(target.finished, 30) == 1
            assert target.error is not None and "block 1 of Hard disk 1" in target.error
            repository = Repository.open(repo)
            lied_about = entries[1].digest
            assert lied_about is not None
            assert repository.has_blocks([lied_about, block_digest(sent)]) == [False, False]
            assert not (workdir / "hostile.map").exists()
            assert not list((workdir).glob("hostile.map*"))
        finally:
            await target.kill()
