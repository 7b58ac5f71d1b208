"""The PowerShell this plugin sends, in one place, so that what runs in a guest can be read.

Everything here is plain Windows PowerShell 5.1 that also runs on the lab's WinRM endpoint
(:mod:`vbrd.lab.winrm` documents the statements it emulates). Literal paths are always in
single quotes (no expansion); only ``$env:TEMP`` is expanded, in double quotes.
"""
from __future__ import annotations

import base64
import re
from collections.abc import Iterator

CMD_LINE_LIMIT = 8191
"""cmd.exe refuses longer command lines, and WinRM hands every command to cmd.exe."""

POWERSHELL = "powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand"

APPLICATION_SERVICES = ("MSSQLSERVER", "MSExchangeIS", "NTDS")
"""Services whose presence means an application vbrd knows about: SQL Server (default
instance), Exchange (Information Store) and Active Directory Domain Services."""

FULL_RECOVERY_DATABASES = (
    "SET NOCOUNT ON; SELECT name FROM sys.databases WHERE recovery_model_desc = 'FULL' "
    "AND state_desc = 'ONLINE' AND database_id > 4")


def quote(text: str) -> str:
    """A PowerShell single-quoted string literal (nothing inside it expands)."""
    return "'" + text.replace("'", "''") + "'"


def command_line(script: str) -> str:
    """The command line that runs ``script`` (UTF-16LE, base64, as powershell.exe wants)."""
    encoded = base64.b64encode(script.encode("utf-16-le")).decode("ascii")
    return f"{POWERSHELL} {encoded}"


def fits(script: str) -> bool:
    return len(command_line(script)) <= CMD_LINE_LIMIT


def make_folder(name: str) -> str:
    """Create ``$env:TEMP\\<name>`` and print its full path. The user's TEMP is readable only
    by that user, SYSTEM and Administrators, which makes it the private folder we want."""
    return ("$ErrorActionPreference = 'Stop'\n"
            f'$null = New-Item -ItemType Directory -Path "$env:TEMP\\{name}"\n'
            f'Write-Output "$env:TEMP\\{name}"\n')


def upload_chunks(path: str, data: bytes) -> Iterator[str]:
    """Scripts that write ``data`` to ``path``: the first chunk creates the file, the next
    ones append, each small enough for one command line."""
    chunk = 2048
    first = True
    offset = 0
    while first or offset < len(data):
        while True:
            piece = base64.b64encode(data[offset:offset + chunk]).decode("ascii")
            if first:
                statement = (f"[IO.File]::WriteAllBytes({quote(path)}, "
                             f"[Convert]::FromBase64String('{piece}'))")
            else:
                statement = (f"Add-Content -Encoding Byte -Path {quote(path)} "
                             f"-Value ([Convert]::FromBase64String('{piece}'))")
            script = f"$ErrorActionPreference = 'Stop'\n{statement}\n"
            if fits(script) or chunk <= 64:
                break
            chunk //= 2
        yield script
        offset += chunk
        first = False


def run_script(path: str) -> str:
    """Run an uploaded script and hand its exit code on (``exit $LASTEXITCODE``: a script's
    ``exit N`` reaches the caller only that way)."""
    if path.lower().endswith((".bat", ".cmd")):
        return f"cmd /c {quote(path)}\nexit $LASTEXITCODE\n"
    return f"$ErrorActionPreference = 'Stop'\n& {quote(path)}\nexit $LASTEXITCODE\n"


def remove_folder(path: str) -> str:
    return f"Remove-Item -LiteralPath {quote(path)} -Recurse -Force -ErrorAction Stop\n"


def discover_applications() -> str:
    """Print one line per installed application service (nothing when there is none)."""
    names = ",".join(APPLICATION_SERVICES)
    return (f"Get-Service -Name {names} -ErrorAction SilentlyContinue "
            f"| Select-Object -ExpandProperty Name\nexit 0\n")


def double_quote(text: str) -> str:
    """A PowerShell double-quoted string literal whose ``$``, backtick and quote are escaped,
    for arguments of native programs (sqlcmd's query), which PowerShell passes as is."""
    return '"' + re.sub(r'([`"$])', r"`\1", text) + '"'


def list_full_recovery_databases() -> str:
    """User databases of the default SQL Server instance that are online and in the full
    recovery model: the ones whose transaction log grows until a log backup truncates it."""
    return (f"sqlcmd -E -b -h -1 -W -Q {double_quote(FULL_RECOVERY_DATABASES)}\n"
            f"exit $LASTEXITCODE\n")


def truncate_sql_log(database: str) -> str:
    """A log backup to the NUL device: SQL Server marks the log as backed up, so it is
    truncated, and nothing is kept. Only right after a successful image-level backup."""
    name = "[" + database.replace("]", "]]") + "]"
    query = f"BACKUP LOG {name} TO DISK='NUL'"
    return f"sqlcmd -E -b -Q {double_quote(query)}\nexit $LASTEXITCODE\n"


_CLIXML_ERROR = re.compile(r'<S S="Error">(.*?)</S>', re.DOTALL)


def readable_stderr(data: bytes) -> str:
    """PowerShell writes errors to stderr as CLIXML; turn them back into the text it shows."""
    text = data.decode("utf-8", errors="replace")
    if not text.startswith("#< CLIXML"):
        return text
    parts = [_unescape(m) for m in _CLIXML_ERROR.findall(text)]
    return "".join(parts).strip() if parts else text


def _unescape(fragment: str) -> str:
    fragment = fragment.replace("_x000D__x000A_", "\n").replace("_x000A_", "\n")
    for entity, char in (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'"),
                         ("&amp;", "&")):
        fragment = fragment.replace(entity, char)
    return fragment
