"""The ssh guest processor against the lab's Linux guest: a real sshd whose user vbrdguest
has passwordless sudo. What the contract suite checks for every processor is not repeated."""
from __future__ import annotations

import asyncio
import dataclasses
import pwd
import time
import uuid
from pathlib import Path

import pytest

import plugins.guest_linux
from tests.plugins.guest_support import (
    make_context,
    marker_dir,
    marking,
    order,
    processor_from_plugin,
    script,
    write_config,
)
from vbrd.errors import GuestError, GuestIdentityError, GuestUnreachable
from vbrd.lab.guests import GuestEndpoint, set_guest_identity
from vbrd.models import VmRef

pytestmark = pytest.mark.lab

SSH = processor_from_plugin(plugins.guest_linux, "ssh")


def vm_at(guest: GuestEndpoint, *addresses: str) -> VmRef:
    """linux-vm, whose guest is ``guest`` (the VM's BIOS UUID is the one the guest shows),
    as VMware Tools report it at ``addresses``."""
    return VmRef("linux-vm", "vm-1", "linux", uuid=guest.system_uuid, ip_addresses=addresses)


async def run_cycle(guest: GuestEndpoint, tmp_path: Path, *, linux_key: bool = False,
                    **table: object) -> tuple[Path, str]:
    """Connect, run pre-freeze and post-thaw, close; return the markers and the log."""
    markers = marker_dir(Path(guest.root))
    table = {"host_key_check": "off",
             "pre_freeze": str(script(tmp_path, "pre-freeze", "linux",
                                      marking(markers, "pre-freeze"))),
             "post_thaw": str(script(tmp_path, "post-thaw", "linux",
                                     marking(markers, "post-thaw"))), **table}
    ctx = make_context(write_config(tmp_path / "config", guest=table, linux=guest,
                                    linux_key=linux_key))
    session = await SSH.connect(vm_at(guest, guest.host), ctx)
    try:
        await session.prepare()
        await session.freeze()
        await session.thaw()
    finally:
        await session.close()
    return markers, ctx.log_text


async def test_with_elevate_the_scripts_run_as_root_through_sudo(linux_guest, tmp_path):
    markers, log = await run_cycle(linux_guest, tmp_path, elevate=True)
    assert order(markers) == ["pre-freeze", "post-thaw"]
    assert (markers / "pre-freeze.uid").read_text().strip() == "0"
    assert (markers / "post-thaw.uid").read_text().strip() == "0"
    assert "as root (sudo)" in log


async def test_without_elevate_the_scripts_run_as_the_login_user(linux_guest, tmp_path):
    markers, _ = await run_cycle(linux_guest, tmp_path, elevate=False)
    uid = str(pwd.getpwnam(linux_guest.user).pw_uid)
    assert (markers / "pre-freeze.uid").read_text().strip() == uid


async def test_a_script_without_a_shebang_runs_with_sh(linux_guest, tmp_path):
    markers = marker_dir(Path(linux_guest.root))
    bare = tmp_path / "pre-freeze"
    bare.write_text(f"echo pre-freeze >> {markers}/order\n")
    ctx = make_context(write_config(tmp_path / "config", linux=linux_guest, guest={
        "host_key_check": "off", "pre_freeze": str(bare)}))
    session = await SSH.connect(vm_at(linux_guest, linux_guest.host), ctx)
    try:
        await session.prepare()
        await session.freeze()
    finally:
        await session.close()
    assert order(markers) == ["pre-freeze"]


async def test_addresses_are_tried_ipv4_first_and_link_local_last(linux_guest, tmp_path):
    """VMware Tools list the guest's addresses in the guest's order; the ones that cannot
    answer cost at most the short connect timeout each."""
    ctx = make_context(write_config(tmp_path / "config", linux=linux_guest, guest={
        "host_key_check": "off", "networks": ["127.0.0.0/8", "169.254.0.0/16", "fe80::/10"]}))
    vm = vm_at(linux_guest, "fe80::1", "169.254.7.7", "127.0.10.99", linux_guest.host)
    started = time.monotonic()
    session = await SSH.connect(vm, ctx)
    await session.close()
    assert time.monotonic() - started < 10
    assert f"connected over SSH to {linux_guest.host}:{linux_guest.port}" in ctx.log_text


async def test_a_vm_without_an_ip_address_is_unreachable(linux_guest, tmp_path):
    ctx = make_context(write_config(tmp_path / "config", linux=linux_guest, guest={}))
    with pytest.raises(GuestUnreachable, match="no IP address"):
        await SSH.connect(vm_at(linux_guest), ctx)


async def test_a_refused_password_is_a_failure_not_unreachable(linux_guest, tmp_path):
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    guest = dataclasses.replace(linux_guest, password_file=str(wrong))
    ctx = make_context(write_config(tmp_path / "config", linux=guest,
                                    guest={"host_key_check": "off"}))
    with pytest.raises(GuestError, match="login as vbrdguest .* was refused") as failure:
        await SSH.connect(vm_at(linux_guest, linux_guest.host), ctx)
    assert not isinstance(failure.value, GuestUnreachable)
    assert "not-the-password" not in str(failure.value)


async def test_a_key_file_logs_in_without_a_password(linux_guest, tmp_path):
    markers, log = await run_cycle(linux_guest, tmp_path, linux_key=True, elevate=False)
    assert order(markers) == ["pre-freeze", "post-thaw"]


# --------------------------------------------------------------------------------------------
# host keys


def server_key(guest: GuestEndpoint) -> str:
    """The guest's host key, as 'type base64'."""
    pub = Path(guest.root).parent / "ssh_host_ed25519_key.pub"
    return " ".join(pub.read_text().split()[:2])


async def connect_with(guest: GuestEndpoint, tmp_path: Path, **table: object) -> str:
    ctx = make_context(write_config(tmp_path / "config", linux=guest, guest=table))
    session = await SSH.connect(vm_at(guest, guest.host), ctx)
    await session.close()
    return ctx.log_text


async def test_tofu_records_the_first_key_and_trusts_it_afterwards(linux_guest, tmp_path):
    known = tmp_path / "known_hosts"
    log = await connect_with(linux_guest, tmp_path, host_key_check="tofu",
                             known_hosts=str(known))
    assert known.read_text() == (f"[{linux_guest.host}]:{linux_guest.port} "
                                 f"{server_key(linux_guest)}\n")
    assert "first SSH contact" in log and "SHA256:" in log
    log = await connect_with(linux_guest, tmp_path, host_key_check="tofu",
                             known_hosts=str(known))
    assert "first SSH contact" not in log
    assert len(known.read_text().splitlines()) == 1


async def test_tofu_refuses_a_key_that_changed(linux_guest, tmp_path):
    known = tmp_path / "known_hosts"
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEk3jY1kL6xUzfkJ7nqfH6iO5Kp3F9vQ0xg3y9M1c4Ww"
    known.write_text(f"[{linux_guest.host}]:{linux_guest.port} {other}\n")
    with pytest.raises(GuestError, match="does not match") as failure:
        await connect_with(linux_guest, tmp_path, host_key_check="tofu", known_hosts=str(known))
    assert not isinstance(failure.value, GuestUnreachable)
    assert "changed" in str(failure.value)
    assert known.read_text().count("\n") == 1, "a changed key is never re-learned"


async def test_known_hosts_accepts_only_listed_keys(linux_guest, tmp_path):
    await connect_with(linux_guest, tmp_path, host_key_check="known_hosts",
                       known_hosts=linux_guest.known_hosts)
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(GuestError, match="does not match"):
        await connect_with(linux_guest, tmp_path, host_key_check="known_hosts",
                           known_hosts=str(empty))
    with pytest.raises(GuestError, match="does not exist"):
        await connect_with(linux_guest, tmp_path, host_key_check="known_hosts",
                           known_hosts=str(tmp_path / "absent"))


# --------------------------------------------------------------------------------------------
# who the guest is, and where it may be


def connections_seen(guest: GuestEndpoint) -> int:
    """How many TCP connections the guest's sshd has accepted so far (its log says)."""
    log = Path(guest.root).parent / "sshd.log"
    return log.read_text(errors="replace").count("Connection from") if log.exists() else 0


async def test_a_machine_that_is_not_the_vm_is_refused_before_anything_is_recorded_or_run(
        linux_guest, tmp_path):
    """VM db02's Tools report the address of another machine (the lab guest, which shows its
    own VM's UUID): the job's scripts never reach it and its host key is not learned."""
    markers = marker_dir(Path(linux_guest.root))
    known = tmp_path / "known_hosts"
    ctx = make_context(write_config(tmp_path / "config", linux=linux_guest, guest={
        "host_key_check": "tofu", "known_hosts": str(known), "elevate": True,
        "pre_freeze": str(script(tmp_path, "pre-freeze", "linux",
                                 marking(markers, "pre-freeze")))}))
    other = VmRef("db02", "vm-9", "linux", uuid=str(uuid.uuid4()),
                  ip_addresses=(linux_guest.host,))
    with pytest.raises(GuestIdentityError) as refused:
        await SSH.connect(other, ctx)
    assert other.uuid in str(refused.value) and linux_guest.system_uuid in str(refused.value)
    assert f"{linux_guest.host}:{linux_guest.port}" in str(refused.value)
    assert not known.exists(), "the host key of a machine that is not the VM is not recorded"
    assert order(markers) == []


async def test_the_guest_shows_the_vm_uuid_in_either_byte_order_and_is_accepted(
        linux_guest, guests_dir, tmp_path):
    """Hardware version 13 and later give SMBIOS the first fields little-endian."""
    swapped = str(uuid.UUID(bytes_le=uuid.UUID(linux_guest.system_uuid).bytes))
    set_guest_identity(guests_dir, "linux", swapped)
    try:
        log = await connect_with(linux_guest, tmp_path, host_key_check="off")
    finally:
        set_guest_identity(guests_dir, "linux", linux_guest.system_uuid)
    assert "connected over SSH" in log


async def test_an_address_outside_the_guest_networks_gets_no_connection_at_all(
        linux_guest, tmp_path):
    ctx = make_context(write_config(tmp_path / "config", linux=linux_guest, guest={
        "host_key_check": "off", "networks": ["10.0.0.0/8", "fd00::/8"]}))
    before = connections_seen(linux_guest)
    with pytest.raises(GuestUnreachable) as refused:
        await SSH.connect(vm_at(linux_guest, linux_guest.host), ctx)
    assert linux_guest.host in str(refused.value) and "10.0.0.0/8" in str(refused.value)
    await asyncio.sleep(0.5)  # sshd logs a connection as it accepts it
    assert connections_seen(linux_guest) == before
    # the same guest inside the job's networks: connected, and sshd's log shows it
    session = await SSH.connect(vm_at(linux_guest, linux_guest.host), make_context(
        write_config(tmp_path / "allowed", linux=linux_guest, guest={"host_key_check": "off"})))
    await session.close()
    deadline = time.monotonic() + 30
    while connections_seen(linux_guest) == before and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert connections_seen(linux_guest) > before
