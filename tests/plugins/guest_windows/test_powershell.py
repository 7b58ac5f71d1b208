"""The PowerShell literals the winrm processor builds, read back by the lab guest's PowerShell
reader (vbrd.lab.winrm), which ends strings where PowerShell does: at any quote of the
string's kind, typographic ones (U+2018-U+201E) included."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from plugins.guest_windows import powershell as ps
from vbrd.lab.winrm import PowerShell, WindowsGuest, split_statements

QUOTES = "'\u2018\u2019\u201a\u201b\"\u201c\u201d\u201e"

TEXTS = [
    "plain",
    "it's",
    "it\u2019s",  # a typographic apostrophe, as word processors write them
    "\u2018quoted\u2019 and \u201cquoted\u201d and \u201elow\u201c",
    f"every quote {QUOTES} in a row {QUOTES}{QUOTES}",
    "x\u2019; New-Item -ItemType Directory 'C:\\pwned'; \u2018",
    "x\u201d; New-Item -ItemType Directory 'C:\\pwned'; \u201c",
    "dollars $env:TEMP and `backticks` and $(whoami)",
]


class Captured:
    """A console that keeps what a script printed."""

    cancelled = False

    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()

    def out(self, data: bytes) -> None:
        self.stdout += data

    def err(self, data: bytes) -> None:
        self.stderr += data

    def run_process(self, argv: Sequence[str], cwd: Path, env: dict[str, str]) -> int:
        raise AssertionError(f"nothing here starts programs: {argv}")


def run(guest: WindowsGuest, script: str) -> tuple[int, str]:
    console = Captured()
    code = PowerShell(guest, console).run(script)
    return code, console.stdout.decode("utf-8").replace("\r\n", "\n")


@pytest.fixture
def guest(tmp_path: Path) -> WindowsGuest:
    made = WindowsGuest(tmp_path, "VBRD-WIN", "Administrator")
    made.prepare()
    return made


@pytest.mark.parametrize("text", TEXTS)
def test_a_single_quoted_literal_is_read_back_exactly(guest, tmp_path, text):
    literal = ps.quote(text)
    assert split_statements(f"Write-Output {literal}") == [f"Write-Output {literal}"]
    assert run(guest, f"Write-Output {literal}\n") == (0, text + "\n")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text", TEXTS)
def test_a_double_quoted_argument_is_read_back_exactly(guest, tmp_path, text):
    literal = ps.double_quote(text)
    assert split_statements(f"Write-Output {literal}") == [f"Write-Output {literal}"]
    assert run(guest, f"Write-Output {literal}\n") == (0, text + "\n")
    assert not (tmp_path / "pwned").exists()


def test_the_lab_reader_ends_strings_at_typographic_quotes_as_powershell_does(guest, tmp_path):
    """The instrument itself: what a careless quote() lets through really runs here."""
    careless = "'x\u2019; New-Item -ItemType Directory 'C:\\pwned'; \u2018'"
    code, _ = run(guest, f"Write-Output {careless}\n")
    assert code == 0
    assert (tmp_path / "pwned").is_dir()


def test_the_log_truncation_batch_is_a_constant_that_names_databases_with_quotename():
    script = ps.truncate_sql_logs()
    assert "QUOTENAME(@name)" in script
    assert not any(q in ps.TRUNCATE_SQL_LOGS for q in QUOTES[1:5] + QUOTES[6:])
    assert '"' not in ps.TRUNCATE_SQL_LOGS and "\n" not in ps.TRUNCATE_SQL_LOGS
