"""The rules every guest processor shares (vbrd.guest_common) and the PowerShell the Windows
processor sends, checked without a guest."""
from __future__ import annotations

import asyncio
import base64
import ipaddress
import re

import pytest

from plugins.guest_windows import powershell as ps
from vbrd.errors import GuestIdentityError, GuestUnreachable
from vbrd.guest_common import (
    OUTPUT_LIMIT,
    allowed_addresses,
    check_identity,
    clip,
    first_listening,
    ordered_addresses,
    redact,
    shown_output,
)
from vbrd.models import VmRef


def test_addresses_are_ordered_ipv4_then_ipv6_with_link_local_last():
    reported = ["fe80::250:56ff:fe01:2", "169.254.10.1", "2001:db8::7", "10.0.0.5",
                "not-an-address", "192.168.1.9", "10.0.0.5", "fe80::1%eth0"]
    assert ordered_addresses(reported) == [
        "10.0.0.5", "192.168.1.9", "2001:db8::7", "169.254.10.1",
        "fe80::250:56ff:fe01:2", "fe80::1%eth0"]


def test_every_secret_is_redacted_even_one_inside_another():
    text = "login admin/hunter2 and hunter2-backup, again hunter2"
    assert redact(text, ["hunter2", "hunter2-backup", ""]) == \
        "login admin/*** and ***, again ***"


def test_long_output_keeps_its_beginning_and_its_end():
    lines = [f"line {i}" for i in range(5000)]
    shown = clip("\n".join(lines))
    assert len(shown) < OUTPUT_LIMIT + 100
    assert shown.startswith("line 0\n")
    assert shown.endswith("line 4999")
    left_out = int(re.search(r"\[\.\.\. (\d+) characters left out", shown).group(1))
    assert left_out + OUTPUT_LIMIT == len("\n".join(lines))


def test_output_is_redacted_before_it_is_clipped():
    secret = "s3cr3t-value"
    output = ("x" * (OUTPUT_LIMIT // 4 - 5) + secret + "y" * 10000).encode()
    shown = shown_output(output, [secret])
    assert "s3cr3t" not in shown and "r3t-value" not in shown


def test_uploads_are_cut_into_command_lines_that_windows_accepts_and_rebuild_the_file():
    data = bytes(range(256)) * 150  # ~38 KiB, every byte value
    path = "C:\\Users\\Administrator\\AppData\\Local\\Temp\\vbrd-0123456789ab\\pre-freeze.ps1"
    chunks = list(ps.upload_chunks(path, data))
    assert len(chunks) > 1
    rebuilt = b""
    for i, script in enumerate(chunks):
        assert len(ps.command_line(script)) <= ps.CMD_LINE_LIMIT
        verb = "[IO.File]::WriteAllBytes" if i == 0 else "Add-Content -Encoding Byte"
        assert verb in script
        rebuilt += base64.b64decode(re.search(r"FromBase64String\('([^']*)'\)", script)[1])
    assert rebuilt == data


def test_an_empty_script_is_still_created():
    chunks = list(ps.upload_chunks("C:\\t\\x.ps1", b""))
    assert len(chunks) == 1 and "WriteAllBytes" in chunks[0]


def test_paths_with_quotes_stay_literal():
    assert ps.quote("C:\\it's here") == "'C:\\it''s here'"
    assert ps.double_quote('say "$x" `n') == '"say `"`$x`" ``n"'


def test_powershell_errors_come_back_as_text():
    clixml = (b'#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/'
              b'powershell/2004/04"><S S="Error">Access is denied &lt;C:\\x&gt;_x000D__x000A_'
              b'</S></Objs>')
    assert ps.readable_stderr(clixml) == "Access is denied <C:\\x>"
    assert ps.readable_stderr(b"plain text") == "plain text"


# --------------------------------------------------------------------------------------------
# where a guest may be reached, and who it is


def test_only_addresses_inside_the_guest_networks_are_candidates():
    networks = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    vm = VmRef("db01", "vm-7", "linux", uuid=UUID,
               ip_addresses=("192.168.1.9", "10.1.2.3", "2001:db8::7", "fe80::1%eth0"))
    assert allowed_addresses(vm, networks) == (["10.1.2.3", "2001:db8::7"],
                                               ["192.168.1.9", "fe80::1%eth0"])
    assert allowed_addresses(vm, ()) == ([], ["192.168.1.9", "10.1.2.3", "2001:db8::7",
                                              "fe80::1%eth0"])


async def test_an_address_outside_the_guest_networks_is_never_contacted():
    """The addresses come from VMware Tools, that is from inside the guest: a guest that
    reports someone else's address must not get the job's credentials sent there."""
    contacted: list[str] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        contacted.append("yes")
        writer.close()

    server = await asyncio.start_server(record, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        vm = VmRef("db01", "vm-7", "linux", uuid=UUID, ip_addresses=("127.0.0.1",))
        with pytest.raises(GuestUnreachable) as refused:
            await first_listening(vm, port, "SSH",
                                  networks=(ipaddress.ip_network("10.0.0.0/8"),))
        assert "127.0.0.1" in str(refused.value) and "networks" in str(refused.value)
        await asyncio.sleep(0.1)
        assert contacted == []
        allowed = (ipaddress.ip_network("127.0.0.0/8"),)
        assert await first_listening(vm, port, "SSH", networks=allowed) == "127.0.0.1"
    finally:
        server.close()
        await server.wait_closed()


UUID = "4231d2f4-8c5e-1b2a-9f3e-0a1b2c3d4e5f"


@pytest.mark.parametrize("reported", [
    UUID, UUID.upper(), f"  {UUID}\n",
    # SMBIOS 2.6 and later store the first three fields little-endian; guests and firmware
    # disagree on which order they show, so both are the same machine
    "f4d23142-5e8c-2a1b-9f3e-0a1b2c3d4e5f",
])
def test_the_guest_may_show_its_bios_uuid_in_either_smbios_byte_order(reported):
    vm = VmRef("db01", "vm-7", "linux", uuid=UUID)
    check_identity(vm, reported, "over SSH at 10.0.0.5")


@pytest.mark.parametrize("reported", [
    "4231d2f4-8c5e-1b2a-9f3e-0a1b2c3d4e50", "", "not a uuid",
    "f4d23142-5e8c-2a1b-3e9f-0a1b2c3d4e5f",
])
def test_a_guest_reporting_another_identity_is_refused_naming_both(reported):
    vm = VmRef("db01", "vm-7", "linux", uuid=UUID)
    with pytest.raises(GuestIdentityError) as refused:
        check_identity(vm, reported, "over SSH at 10.0.0.5")
    assert UUID in str(refused.value) and "db01" in str(refused.value)
    assert "10.0.0.5" in str(refused.value)


def test_a_vm_without_a_known_uuid_cannot_be_checked_and_is_refused():
    with pytest.raises(GuestIdentityError, match="no BIOS UUID"):
        check_identity(VmRef("db01", "vm-7", "linux"), UUID, "over WinRM at 10.0.0.5")
