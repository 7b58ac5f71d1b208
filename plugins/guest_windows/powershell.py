"""The PowerShell this plugin sends, in one place, so that what runs in a guest can be read.

Everything here is plain Windows PowerShell 5.1 that also runs on the lab's WinRM endpoint
(:mod:`vbrd.lab.winrm` documents the statements it emulates). Literal paths are always in
single quotes (no expansion); only ``$env:TEMP`` is expanded, in double quotes. PowerShell
ends a string at typographic quotes as well as at ASCII ones, so :func:`quote` and
:func:`double_quote` escape every one of them; names that come from inside the guest (SQL
Server databases) never become part of a script at all.
"""
from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass

CMD_LINE_LIMIT = 8191
"""cmd.exe refuses longer command lines, and WinRM hands every command to cmd.exe."""

POWERSHELL = "powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand"

APPLICATION_SERVICES = ("MSSQLSERVER", "MSExchangeIS", "NTDS")
"""Services whose presence means an application vbrd knows about: SQL Server (default
instance), Exchange (Information Store) and Active Directory Domain Services."""

SINGLE_QUOTES = "'\u2018\u2019\u201a\u201b"
"""Every character PowerShell takes for a single quote: ASCII and the typographic ones (left,
right, low-9 and reversed-9 single quotation marks). Any of them ends a single-quoted string;
two in a row stand for one."""

DOUBLE_QUOTES = '"\u201c\u201d\u201e'
"""Every character PowerShell takes for a double quote (ASCII, left, right and low-9)."""

TRUNCATE_SQL_LOGS = (
    "SET NOCOUNT ON; "
    "DECLARE @name sysname, @sql nvarchar(max); "
    "DECLARE vbrd_databases CURSOR LOCAL FAST_FORWARD FOR "
    "SELECT name FROM sys.databases WHERE recovery_model_desc = 'FULL' "
    "AND state_desc = 'ONLINE' AND database_id > 4; "
    "OPEN vbrd_databases; FETCH NEXT FROM vbrd_databases INTO @name; "
    "WHILE @@FETCH_STATUS = 0 BEGIN "
    "SET @sql = N'BACKUP LOG ' + QUOTENAME(@name) + N' TO DISK = N''NUL'''; "
    "BEGIN TRY EXEC sys.sp_executesql @sql; "
    "PRINT N'vbrd-log-truncated ' + CONVERT(nvarchar(512), CONVERT(varbinary(256), @name), 2); "
    "END TRY BEGIN CATCH "
    "PRINT N'vbrd-log-failed ' + CONVERT(nvarchar(512), CONVERT(varbinary(256), @name), 2) "
    "+ N' ' + REPLACE(REPLACE(ERROR_MESSAGE(), NCHAR(13), N' '), NCHAR(10), N' '); "
    "END CATCH; "
    "FETCH NEXT FROM vbrd_databases INTO @name; END; "
    "CLOSE vbrd_databases; DEALLOCATE vbrd_databases;")
"""One T-SQL batch that finds the user databases that are online and in the full recovery
model (those whose log grows until a log backup truncates it) and backs up each one's log to
the ``NUL`` device. The names never leave SQL Server as code: the dynamic ``BACKUP LOG`` names
the database with ``QUOTENAME``, and each outcome is printed as ``vbrd-log-truncated HEX`` or
``vbrd-log-failed HEX MESSAGE``, HEX being the name's UTF-16LE bytes, so that no name, however
it is spelt, can change the batch, the PowerShell around it or how its output is read."""

TRUNCATED = "vbrd-log-truncated "
FAILED = "vbrd-log-failed "


def quote(text: str) -> str:
    """A PowerShell single-quoted string literal (nothing inside it expands): every character
    PowerShell reads as a single quote is doubled, the typographic ones too."""
    return "'" + re.sub(f"([{SINGLE_QUOTES}])", r"\1\1", text) + "'"


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


def system_uuid() -> str:
    """Print the machine's SMBIOS UUID (what vCenter calls the VM's BIOS UUID)."""
    return "(Get-CimInstance Win32_ComputerSystemProduct).UUID\nexit 0\n"


def double_quote(text: str) -> str:
    """A PowerShell double-quoted string literal whose ``$``, backtick and every double quote
    (typographic ones too) are escaped with a backtick, for arguments of native programs
    (sqlcmd's query), which PowerShell passes as is."""
    return '"' + re.sub(f"([`${DOUBLE_QUOTES}])", r"`\1", text) + '"'


def truncate_sql_logs() -> str:
    """Truncate the transaction log of every online user database in full recovery of the
    default SQL Server instance, in one server-side batch (:data:`TRUNCATE_SQL_LOGS`). Only
    right after a successful image-level backup: each log is marked as backed up, so it is
    truncated, and nothing is kept."""
    return f"sqlcmd -E -b -Q {double_quote(TRUNCATE_SQL_LOGS)}\nexit $LASTEXITCODE\n"


@dataclass(frozen=True)
class LogTruncation:
    """What :func:`truncate_sql_logs` printed: the databases done and those that failed."""

    truncated: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]  # (database, SQL Server's message)


def read_log_truncation(output: str) -> LogTruncation:
    """The outcome lines of :data:`TRUNCATE_SQL_LOGS`; other lines are ignored."""
    done: list[str] = []
    failed: list[tuple[str, str]] = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith(TRUNCATED):
            done.append(_name(line[len(TRUNCATED):].strip()))
        elif line.startswith(FAILED):
            name_hex, _, message = line[len(FAILED):].partition(" ")
            failed.append((_name(name_hex), message.strip()))
    return LogTruncation(tuple(done), tuple(failed))


def _name(name_hex: str) -> str:
    try:
        return bytes.fromhex(name_hex).decode("utf-16-le", errors="replace")
    except ValueError:
        return f"(unreadable name {name_hex[:64]!r})"


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
