"""A transfer that stops moving ends: its data movers are killed and the disk fails (or is
tried again another way), naming the stall; the session does not hang and leaves no snapshot.

The fault is real: a drop-in plugin stops (SIGSTOP) a data mover process in the middle of
the disk's transfer, as a hung process or a half-open connection would leave it.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.integration.backup_support import (
    events_of,
    job,
    lab_config,
    run_job,
    vbrd_snapshots,
)
from vbrd.repository import Repository

pytestmark = pytest.mark.lab

# Stops the data movers of one side (MOVER_ROLE) at the first progress report with bytes
# done, and writes down their pids.
STOP_A_MOVER = '''
import os, signal
from pathlib import Path
from vbrd import hookimpl

ROLE = {role!r}
RECORD = Path({record!r})


def movers():
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(bytes(1))
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me and \\
                any(b"vbrd.transport.mover" in arg for arg in argv) and \\
                ROLE.encode() in argv:
            yield int(entry.name)


@hookimpl
def vbrd_event(event):
    if event.type == "transfer.progress" and event.bytes_done > 0 and not RECORD.exists():
        pids = list(movers())
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        RECORD.write_text(" ".join(map(str, pids)))
'''

# slow enough (about 3 s for the disk) that the fault lands mid-transfer
SLOW_LINK = '''
[[traffic_rules]]
name = "slow"
from_network = "lab"
to_network = "lab"
limit = "10MB/s"
'''


def stalling_config(tmp_path: Path, lab: dict, role: str, transport: str) -> tuple[Path, Path]:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    record = tmp_path / "stopped.txt"
    (plugins / f"stop_the_{role}_mover.py").write_text(
        STOP_A_MOVER.format(role=role, record=str(record)))
    config = lab_config(lab, tmp_path, job("stall", ["off-vm"], transport=transport)
                        + SLOW_LINK, plugin_dir=plugins)
    config.write_text(config.read_text().replace(
        "[daemon]\n", '[daemon]\nstall_timeout = "10s"\n', 1))
    return config, record


def assert_gone(record: Path) -> None:
    pids = [int(p) for p in record.read_text().split()]
    assert pids, "the fault found no data mover to stop"
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"stopped data mover {pid} is still there"


async def test_a_stopped_repository_side_mover_fails_the_disk_naming_the_stall(lab, tmp_path):
    config, record = stalling_config(tmp_path, lab, "target", "san")

    status, events = await asyncio.wait_for(run_job(config, "stall"), 240)

    assert status == "failed"
    (finished,) = events_of(events, "vm.finished", vm="off-vm")
    assert finished["status"] == "failed"
    assert "Hard disk 1 of VM off-vm" in finished["reason"]
    assert "made no progress for" in finished["reason"], finished["reason"]
    assert_gone(record)
    assert await vbrd_snapshots(config) == []
    assert Repository.open(tmp_path / "repo").points("off-vm") == []


async def test_a_stopped_proxy_side_mover_is_tried_again_with_the_next_mode(lab, tmp_path):
    config, record = stalling_config(tmp_path, lab, "source", "auto")

    status, events = await asyncio.wait_for(run_job(config, "stall"), 240)

    assert status == "warning", [e["message"] for e in events_of(events, "log")]
    warnings = [e["message"] for e in events_of(events, "log", level="warning")]
    assert any("made no progress for" in m and "without transport san" in m
               for m in warnings), warnings
    (transferred,) = events_of(events, "disk.transferred", vm="off-vm")
    assert transferred["mode"] != "san"
    assert_gone(record)
    assert await vbrd_snapshots(config) == []
    assert len(Repository.open(tmp_path / "repo").points("off-vm")) == 1
