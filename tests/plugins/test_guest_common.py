"""The rules every guest processor shares (vbrd.guest_common) and the PowerShell the Windows
processor sends, checked without a guest."""
from __future__ import annotations

import base64
import re

from plugins.guest_windows import powershell as ps
from vbrd.guest_common import OUTPUT_LIMIT, clip, ordered_addresses, redact, shown_output


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
