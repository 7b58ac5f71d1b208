"""What every guest processor promises the Backup Manager, checked for each one alike.

A processor joins this suite with a rig in ``RIGS``: the processor loaded through the plugin
hook, a VM it can reach, one it cannot, the guest's file system as seen from this machine,
and a way to break its connection. The guests are the lab's real ones: sshd for ``ssh``, the
WinRM endpoint for ``winrm``, the simulator's Guest Operations API for ``vix``.

The scripts record what they did in a marker folder inside the guest (which phases ran, in
what order, as which uid, and from where: ``$0`` is the injected copy's path), so the tests
check the guest, not what the processor says about it.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import plugins.guest_linux
import plugins.guest_vix
import plugins.guest_windows
from tests.plugins.guest_support import (
    LAB_WINRM,
    RecordingContext,
    Rig,
    guests_dir,  # noqa: F401  (fixture)
    linux_guest,  # noqa: F401  (fixture)
    make_context,
    marker_dir,
    marking,
    order,
    processor_from_plugin,
    windows_guest,  # noqa: F401  (fixture)
    windows_host_path,
    write_config,
)
from vbrd.errors import GuestError, GuestUnreachable
from vbrd.lab.guests import GuestEndpoint, set_guest_running
from vbrd.models import VmRef
from vbrd.protocols import GuestProcessor, GuestSession

pytestmark = pytest.mark.lab

CLOSED_PORT_VM_IP = "127.0.10.99"  # nothing listens there in the lab


# --------------------------------------------------------------------------------------------
# rigs


@asynccontextmanager
async def ssh_rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    guest: GuestEndpoint = request.getfixturevalue("linux_guest")
    lab_dir = request.getfixturevalue("guests_dir")

    def configure(table: dict[str, Any]) -> RecordingContext:
        table = {"host_key_check": "known_hosts", "known_hosts": guest.known_hosts,
                 "elevate": True, **table}
        return make_context(write_config(tmp_path / "config", guest=table, linux=guest))

    async def break_connection(ctx: RecordingContext) -> None:
        set_guest_running(lab_dir, "ssh", False)

    yield Rig(processor_from_plugin(plugins.guest_linux, "ssh"), "linux",
              VmRef("linux-vm", "vm-1", "linux", uuid=guest.system_uuid,
                    ip_addresses=(guest.host,)), Path(guest.root),
              tmp_path, configure, Path,
              VmRef("linux-vm", "vm-1", "linux", uuid=guest.system_uuid,
                    ip_addresses=(CLOSED_PORT_VM_IP,)),
              break_connection, lambda: set_guest_running(lab_dir, "ssh", True),
              Path(guest.password_file).read_text().strip())


@asynccontextmanager
async def winrm_rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    guest: GuestEndpoint = request.getfixturevalue("windows_guest")
    lab_dir = request.getfixturevalue("guests_dir")

    def configure(table: dict[str, Any]) -> RecordingContext:
        return make_context(write_config(tmp_path / "config", guest=table, windows=guest,
                                         plugins=LAB_WINRM))

    async def break_connection(ctx: RecordingContext) -> None:
        set_guest_running(lab_dir, "winrm", False)

    yield Rig(processor_from_plugin(plugins.guest_windows, "winrm"), "windows",
              VmRef("windows-vm", "vm-2", "windows", uuid=guest.system_uuid,
                    ip_addresses=(guest.host,)),
              Path(guest.root), tmp_path, configure,
              lambda p: windows_host_path(guest.root, p) if ":" in p else Path(p),
              VmRef("windows-vm", "vm-2", "windows", uuid=guest.system_uuid,
                    ip_addresses=(CLOSED_PORT_VM_IP,)),
              break_connection, lambda: set_guest_running(lab_dir, "winrm", True),
              Path(guest.password_file).read_text().strip())


def vix_rig(family: str) -> Callable[[pytest.FixtureRequest, Path], Any]:
    @asynccontextmanager
    async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
        from tests.plugins.guest_vix.vix_support import lab_vix_rig

        async with lab_vix_rig(request, tmp_path, family) as made:
            yield made
    return rig


RIGS = {
    "ssh": ssh_rig,
    "winrm": winrm_rig,
    "vix-linux": vix_rig("linux"),
    "vix-windows": vix_rig("windows"),
}


@pytest.fixture(params=list(RIGS))
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    async with RIGS[request.param](request, tmp_path) as made:
        yield made


def where_it_ran(markers: Path, phase: str, rig: Rig) -> Path:
    """The injected script's own path, as it recorded it (``$0``), on this machine."""
    return rig.to_host((markers / f"{phase}.path").read_text().strip())


def records_path(markers: Path, phase: str) -> str:
    return f'echo "$0" > {markers}/{phase}.path'


# --------------------------------------------------------------------------------------------
# the contract


def test_the_plugin_hook_provides_the_processor(rig: Rig) -> None:
    assert isinstance(rig.processor, GuestProcessor)
    assert rig.family in rig.processor.families


async def test_scripts_run_in_the_guest_around_the_snapshot_and_leave_nothing_behind(
        rig: Rig) -> None:
    markers = marker_dir(rig.root)
    ctx = rig.context(pre=marking(markers, "pre-freeze", records_path(markers, "pre-freeze")),
                      post=marking(markers, "post-thaw"))
    session = await rig.processor.connect(rig.vm, ctx)
    assert isinstance(session, GuestSession)
    assert session.processor == rig.processor.name
    try:
        await session.prepare()
        assert order(markers) == [], "prepare must not run any script"
        await session.freeze()
        assert order(markers) == ["pre-freeze"]
        injected = where_it_ran(markers, "pre-freeze", rig)
        await session.thaw()
        assert order(markers) == ["pre-freeze", "post-thaw"]
        await session.after_backup(True)
    finally:
        await session.close()
    assert injected.name.startswith("pre-freeze")
    assert not injected.parent.exists(), "close must remove the folder the scripts were in"
    assert "pre-freeze says hello" in ctx.log_text, "the script's output belongs in the log"


async def test_a_failing_pre_freeze_is_a_guest_error_with_its_output_and_thaw_still_runs(
        rig: Rig) -> None:
    markers = marker_dir(rig.root)
    ctx = rig.context(pre=marking(markers, "pre-freeze", 'echo "database is busy"; exit 3'),
                      post=marking(markers, "post-thaw"))
    session = await rig.processor.connect(rig.vm, ctx)
    try:
        await session.prepare()
        with pytest.raises(GuestError) as failure:
            await session.freeze()
        assert not isinstance(failure.value, GuestUnreachable)
        assert "exit code 3" in str(failure.value)
        assert "database is busy" in str(failure.value)
        await session.thaw()
        await session.thaw()
        assert order(markers) == ["pre-freeze", "post-thaw"], "post-thaw runs, and only once"
    finally:
        await session.close()


async def test_secrets_never_leave_the_guest_in_output_or_errors(rig: Rig) -> None:
    vcenter_password = rig.configure({}).config.vcenters["lab"].password.reveal()
    leak = f'echo "guest password: {rig.password} vcenter: {vcenter_password}"'
    ctx = rig.context(pre=f"{leak}\nexit 1", post=leak)
    session = await rig.processor.connect(rig.vm, ctx)
    try:
        await session.prepare()
        with pytest.raises(GuestError) as failure:
            await session.freeze()
        await session.thaw()
    finally:
        await session.close()
    everything = f"{failure.value}\n{ctx.log_text}"
    assert "guest password: ***" in everything
    assert rig.password not in everything
    assert vcenter_password not in everything


async def test_a_script_that_outlives_the_job_timeout_is_a_guest_error(rig: Rig) -> None:
    markers = marker_dir(rig.root)
    ctx = rig.context(pre='echo "taking my time"\nsleep 30\necho never >> ' + str(markers / "x"),
                      timeout="1s")
    session = await rig.processor.connect(rig.vm, ctx)
    try:
        await session.prepare()
        started = time.monotonic()
        with pytest.raises(GuestError, match="did not finish within 1 s"):
            await session.freeze()
        assert time.monotonic() - started < 15
    finally:
        await session.close()


async def test_a_guest_it_cannot_reach_is_unreachable_not_failed(rig: Rig) -> None:
    ctx = rig.context()
    started = time.monotonic()
    with pytest.raises(GuestUnreachable):
        await rig.processor.connect(rig.unreachable, ctx)
    assert time.monotonic() - started < 15


async def test_close_never_raises_even_on_a_dead_connection(rig: Rig) -> None:
    markers = marker_dir(rig.root)
    ctx = rig.context(pre=marking(markers, "pre-freeze"), post=marking(markers, "post-thaw"))
    session = await rig.processor.connect(rig.vm, ctx)
    try:
        await session.prepare()
        await rig.break_connection(ctx)
        with pytest.raises(GuestError):
            await session.freeze()
        await session.close()
        await session.close()
    finally:
        rig.repair()


async def test_a_job_without_scripts_still_connects_and_closes(rig: Rig) -> None:
    ctx = rig.context()
    session = await rig.processor.connect(rig.vm, ctx)
    try:
        await session.prepare()
        await session.freeze()
        await session.thaw()
        await session.after_backup(True)
    finally:
        await session.close()
    assert not [line for line in ctx.lines if line[0] == "error"]

