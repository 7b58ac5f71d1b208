"""The lab's Windows guest: a WS-Management (WinRM) endpoint on loopback.

Run as its own process::

    python -m vbrd.lab.winrm --host H --port P --root DIR --user U --password-file F --log FILE \
        [--identity-file FILE]

It speaks the part of WS-Management's Windows Remote Shell that pywinrm uses (``transport=
"basic"`` or ``"plaintext"`` over HTTP, ``POST /wsman``): Create shell, Command, Receive, Signal
and Delete. Every request needs HTTP Basic credentials matching ``--user`` (case-insensitive,
as Windows accounts are) and the password in ``--password-file``; anything else gets a 401,
which pywinrm reports as ``InvalidCredentialsError``. Input to a running command (``Send``) is
answered with a WS-Man fault: nothing the lab runs reads stdin.

There is no Windows here, so what a command does is emulated in a sandbox, ``--root``, which
stands for the guest's ``C:\\`` drive. The emulation is deliberately small: anything it does
not know fails with a non-zero exit code and a message naming the statement, so a guest plugin
never believes something happened that did not.

Paths
    ``C:\\x\\y`` (or ``C:/x/y``, ``\\x\\y``) maps to ``root/x/y``. Other drives, relative paths
    and paths that leave the root (``..``, symbolic links) are refused. Names are case-sensitive
    here, unlike on Windows. ``$env:NAME`` (PowerShell) and ``%NAME%`` (cmd) expand for
    SystemDrive, SystemRoot, windir, ProgramData, USERPROFILE, TEMP, TMP, COMPUTERNAME and
    USERNAME; other variables expand to nothing, as Windows does for unset ones.

Command lines (what ``Session.run_cmd`` sends; cmd.exe rules)
    ``whoami``, ``hostname``, ``echo TEXT``, ``exit [/b] N``, ``type PATH``, ``sqlcmd ... -Q
    "QUERY"``, ``cmd /c LINE``, a ``.bat``/``.cmd`` path (run as a script, below), and
    ``powershell [options] -EncodedCommand B64`` (what ``Session.run_ps`` sends), ``-Command
    SCRIPT`` or ``-File PATH``. ``&&``, ``||`` and ``&`` chain commands; pipes and redirection
    are refused. A command line longer than cmd.exe's limit (8191 characters; 32767 with
    ``WINRS_SKIP_CMD_SHELL``) fails as it would on Windows, so uploads must be chunked here as
    they must be there: through ``run_ps``, about 2000 bytes of file per command fit. An unknown
    command exits 9009 with cmd's "is not recognized" message.

PowerShell statements (separated by newlines or ``;``; ``#`` and ``<# #>`` comments)
    Strings end where PowerShell ends them: a single-quoted string at any of ``'`` and the
    typographic single quotes U+2018-U+201B, a double-quoted one at any of ``"`` and U+201C-
    U+201E; two such quotes in a row stand for one, and a backtick escapes in double quotes.
    Only ``$env:`` variables expand, and only in double quotes or unquoted words.
    - ``$ErrorActionPreference = 'Stop'`` (or Continue, SilentlyContinue, Ignore); other
      ``$...Preference`` assignments and ``Set-StrictMode`` are accepted and change nothing.
    - ``New-Item -ItemType Directory [-Force] [-Path] 'C:\\dir'``
    - ``[IO.File]::WriteAllBytes('C:\\f', [Convert]::FromBase64String('B64'))`` writes a file;
      ``Add-Content -Encoding Byte -Path 'C:\\f' -Value ([Convert]::FromBase64String('B64'))``
      appends to it (create with the first, append the next chunks with the second).
    - ``& 'C:\\path\\script.ps1' [ARGS]`` or ``cmd /c 'C:\\path\\script.bat' [ARGS]``: run a
      script file (below) and set ``$LASTEXITCODE`` to its exit code.
    - ``Remove-Item [-Recurse] [-Force] [-Path|-LiteralPath] 'C:\\x'``
    - ``Get-Service [-Name] A,B,C``, answered from ``root/services.json`` (a JSON list of service
      names, or of objects with Name, DisplayName, Status). Output is a table, or one name per
      line with ``| Select-Object -ExpandProperty Name``, or JSON with ``| ConvertTo-Json``
      (one object for one service, a list for several, as PowerShell does). A name that is not
      installed is an error ("Cannot find any service with service name ...").
    - ``sqlcmd ... -Q "BACKUP LOG [db] TO DISK='NUL'"`` or ``Invoke-Sqlcmd -Query "..."``: the
      transaction log truncation stand-in. It needs a SQL Server service (MSSQLSERVER or
      ``MSSQL$...``) in services.json, accepts only BACKUP LOG to the NUL device, and records
      each truncation as a JSON line in ``root/sql.jsonl``. ``sqlcmd`` also answers the one
      query that finds the databases to truncate, ``[SET NOCOUNT ON;] SELECT name FROM
      sys.databases WHERE recovery_model_desc = 'FULL' [AND state_desc = 'ONLINE'] [AND
      database_id > 4]``, one name per line, from ``root/databases.json`` (a JSON list of
      names of online databases in full recovery, or of objects with name, recovery_model
      and state; master, model, msdb and tempdb count as system databases).
      The stand-in also runs the batch that truncates every log server-side
      (``TRUNCATE_ALL_LOGS``: a cursor over the databases in full recovery, each log backed up
      through dynamic SQL naming it with ``QUOTENAME``, each outcome PRINTed as a prefix and the
      name's UTF-16LE bytes in hex); a database entry with ``log_backup_error`` fails with that
      message.
    - ``(Get-CimInstance [-ClassName] Win32_ComputerSystemProduct).UUID``: the machine's
      SMBIOS UUID, read from ``--identity-file`` at every call.
    - ``Test-Path``, ``Get-Content [-Raw]``, ``Write-Output``/``Write-Host``/``echo``, a
      string on its own (output), ``whoami``, ``hostname``, and ``exit [N|$LASTEXITCODE]``.
    - Any statement may end in ``| Out-Null`` or start with ``$null =``; every cmdlet takes
      ``-ErrorAction``.
    The whole script is read before any of it runs: one statement outside this list fails the
    script (exit 1, naming the statement) and nothing runs. Errors go to stderr as CLIXML, as
    PowerShell's do, so ``Session.run_ps`` turns them into readable text. Without an ``exit``
    the script exits 0 when its last statement succeeded and 1 otherwise; native exit codes
    reach the caller only through ``exit $LASTEXITCODE``, as with powershell.exe. As in
    PowerShell, an error hidden by ``-ErrorAction SilentlyContinue`` still makes its statement
    fail (``Get-Service`` of a service that is not installed, as the last statement, exits 1).

Script files (the lab stand-in rule)
    A script file's own language is not interpreted. The lab runs only its lines marked
    ``#lab: <shell>`` (also ``REM #lab:`` or ``:: #lab:`` in batch files), joined in order, with
    ``sh -c`` in the root, the script's arguments as ``$1...``, and ``VBRD_GUEST_ROOT`` set to
    the root. Their stdout/stderr and exit code are the script's. A script without such lines
    fails, naming the file: a script the lab cannot run must not look as if it ran.

Records for tests (under the root)
    ``commands.jsonl``: every command line received, in order, with the decoded PowerShell
    script when it was ``-EncodedCommand``. ``sql.jsonl``: every log truncation.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

from aiohttp import web

log = logging.getLogger("vbrd.lab.winrm")

NS_SOAP = "http://www.w3.org/2003/05/soap-envelope"
NS_ADDRESSING = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
NS_WSMAN = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"
NS_TRANSFER = "http://schemas.xmlsoap.org/ws/2004/09/transfer"
NS_SHELL = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
NS_FAULT = "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault"
NS = {"s": NS_SOAP, "a": NS_ADDRESSING, "w": NS_WSMAN, "x": NS_TRANSFER, "rsp": NS_SHELL}

CMD_RESOURCE = f"{NS_SHELL}/cmd"
ACTION_CREATE = f"{NS_TRANSFER}/Create"
ACTION_DELETE = f"{NS_TRANSFER}/Delete"
ACTION_COMMAND = f"{NS_SHELL}/Command"
ACTION_RECEIVE = f"{NS_SHELL}/Receive"
ACTION_SIGNAL = f"{NS_SHELL}/Signal"
ACTION_SEND = f"{NS_SHELL}/Send"
STATE_DONE = f"{NS_SHELL}/CommandState/Done"
STATE_RUNNING = f"{NS_SHELL}/CommandState/Running"
ANONYMOUS = f"{NS_ADDRESSING}/role/anonymous"

# cmd.exe refuses longer command lines; CreateProcess (WINRS_SKIP_CMD_SHELL) refuses beyond 32767.
CMD_LINE_LIMIT = 8191
PROCESS_LINE_LIMIT = 32767
# Output per stream per Receive answer, well inside pywinrm's 150 KiB MaxEnvelopeSize once base64.
RECEIVE_CHUNK = 48 * 1024
NOT_RECOGNIZED_EXIT = 9009

# WS-Man fault codes as Windows reports them.
FAULT_SHELL_NOT_FOUND = 2150858843
FAULT_INVALID = 2150858817
FAULT_ACTION_NOT_SUPPORTED = 2150858778

KNOWN_DISPLAY_NAMES = {
    "MSSQLSERVER": "SQL Server (MSSQLSERVER)",
    "MSExchangeIS": "Microsoft Exchange Information Store",
    "NTDS": "Active Directory Domain Services",
}
ERROR_ACTIONS = {"stop": "Stop", "continue": "Continue", "silentlycontinue": "SilentlyContinue",
                 "ignore": "Ignore", "inquire": "Continue"}
# PowerShell ends a string at any quote of the string's kind, typographic ones included
# (U+2018-U+201B and U+201C-U+201E), and reads two of them in a row as one.
SINGLE_QUOTES = "'\u2018\u2019\u201a\u201b"
DOUBLE_QUOTES = '"\u201c\u201d\u201e'
# A ``$`` that PowerShell would not expand (single quotes, or escaped with a backtick), while a
# string is on its way from the reader to where it is used.
LITERAL_DOLLAR = "\x00$"
LAB_LINE = re.compile(r"^\s*(?:(?:rem|::)\s+)?#lab:\s?(.*)$", re.IGNORECASE)
FULL_RECOVERY_QUERY = re.compile(
    r"^\s*(?:SET\s+NOCOUNT\s+ON\s*;\s*)?SELECT\s+name\s+FROM\s+sys\.databases\s+WHERE\s+"
    r"recovery_model_desc\s*=\s*'FULL'(\s+AND\s+state_desc\s*=\s*'ONLINE')?"
    r"(\s+AND\s+database_id\s*>\s*4)?\s*;?\s*$",
    re.IGNORECASE,
)
SYSTEM_DATABASES = ("master", "model", "msdb", "tempdb")
# The one batch that truncates every log server-side: a cursor over the databases in full
# recovery, each log backed up to NUL through dynamic SQL that names the database with
# QUOTENAME, each outcome PRINTed as a prefix and the name's UTF-16LE bytes in hex.
_HEX_NAME = (r"CONVERT\s*\(\s*nvarchar\s*\(\s*\d+\s*\)\s*,\s*CONVERT\s*\(\s*varbinary\s*"
             r"\(\s*\d+\s*\)\s*,\s*@(?P=v)\s*\)\s*,\s*2\s*\)")
TRUNCATE_ALL_LOGS = re.compile(
    r"^\s*SET\s+NOCOUNT\s+ON\s*;\s*"
    r"DECLARE\s+@(?P<v>\w+)\s+sysname\s*,\s*@(?P<sql>\w+)\s+nvarchar\s*\(\s*max\s*\)\s*;\s*"
    r"DECLARE\s+(?P<cur>\w+)\s+CURSOR\s+LOCAL\s+FAST_FORWARD\s+FOR\s+"
    r"SELECT\s+name\s+FROM\s+sys\.databases\s+WHERE\s+recovery_model_desc\s*=\s*'FULL'"
    r"(?P<online>\s+AND\s+state_desc\s*=\s*'ONLINE')?(?P<user>\s+AND\s+database_id\s*>\s*4)?"
    r"\s*;\s*OPEN\s+(?P=cur)\s*;\s*FETCH\s+NEXT\s+FROM\s+(?P=cur)\s+INTO\s+@(?P=v)\s*;\s*"
    r"WHILE\s+@@FETCH_STATUS\s*=\s*0\s+BEGIN\s+"
    r"SET\s+@(?P=sql)\s*=\s*N'BACKUP\s+LOG\s+'\s*\+\s*QUOTENAME\s*\(\s*@(?P=v)\s*\)\s*\+\s*"
    r"N'\s+TO\s+DISK\s*=\s*N''NUL:?''\s*'\s*;\s*"
    r"BEGIN\s+TRY\s+EXEC\s+(?:sys\.)?sp_executesql\s+@(?P=sql)\s*;\s*"
    r"PRINT\s+N'(?P<ok>[^']*)'\s*\+\s*" + _HEX_NAME + r"\s*;\s*END\s+TRY\s+"
    r"BEGIN\s+CATCH\s+PRINT\s+N'(?P<failed>[^']*)'\s*\+\s*" + _HEX_NAME +
    r"\s*\+\s*N'(?P<sep>[^']*)'\s*\+\s*REPLACE\s*\(\s*REPLACE\s*\(\s*ERROR_MESSAGE\s*\(\s*\)\s*,"
    r"\s*NCHAR\s*\(\s*13\s*\)\s*,\s*N' '\s*\)\s*,\s*NCHAR\s*\(\s*10\s*\)\s*,\s*N' '\s*\)\s*;\s*"
    r"END\s+CATCH\s*;?\s*FETCH\s+NEXT\s+FROM\s+(?P=cur)\s+INTO\s+@(?P=v)\s*;\s*END\s*;?\s*"
    r"CLOSE\s+(?P=cur)\s*;\s*DEALLOCATE\s+(?P=cur)\s*;?\s*$",
    re.IGNORECASE,
)


def quotename(name: str) -> str:
    """T-SQL's QUOTENAME: the name in brackets, a closing bracket doubled."""
    return "[" + name.replace("]", "]]") + "]"
BACKUP_LOG = re.compile(
    r"^\s*BACKUP\s+LOG\s+(\[[^\]]+\]|\"[^\"]+\"|[A-Za-z0-9_$#@]+)\s+TO\s+DISK\s*=\s*N?'NUL:?'"
    r"(\s+WITH\s+[^;]*)?\s*;?\s*$",
    re.IGNORECASE,
)


class Refused(Exception):
    """The emulation cannot do what was asked; the message names the statement or path."""


class Console(Protocol):
    """Where a command's output goes, and how it learns that it was told to stop."""

    @property
    def cancelled(self) -> bool: ...

    def out(self, data: bytes) -> None: ...

    def err(self, data: bytes) -> None: ...

    def run_process(self, argv: Sequence[str], cwd: Path, env: dict[str, str]) -> int: ...


def crlf(text: str) -> bytes:
    """Windows tools end lines with CRLF; clients that work against Windows expect that."""
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


# --------------------------------------------------------------------------------------------
# The emulated machine: its C: drive, services and command interpreter (cmd.exe rules)
# --------------------------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    display_name: str
    status: str = "Running"

    def as_json(self) -> dict[str, str]:
        return {"Name": self.name, "DisplayName": self.display_name, "Status": self.status}


class WindowsGuest:
    """One emulated Windows machine whose C: drive is the directory ``root``."""

    def __init__(self, root: Path, hostname: str, user: str,
                 identity_file: Path | None = None) -> None:
        self.root = root
        self.identity_file = identity_file
        self.real_root = Path(os.path.realpath(root))
        self.hostname = hostname
        self.user = user
        self._records = threading.Lock()
        profile = f"C:\\Users\\{user}"
        self.env = {
            "systemdrive": "C:",
            "systemroot": "C:\\Windows",
            "windir": "C:\\Windows",
            "programdata": "C:\\ProgramData",
            "userprofile": profile,
            "temp": f"{profile}\\AppData\\Local\\Temp",
            "tmp": f"{profile}\\AppData\\Local\\Temp",
            "computername": hostname,
            "username": user,
        }

    def prepare(self) -> None:
        """Create the folders every Windows machine has, so that TEMP exists."""
        for win in ("C:\\Windows\\Temp", self.env["temp"], "C:\\ProgramData"):
            self.host_path(win).mkdir(parents=True, exist_ok=True)

    # paths -----------------------------------------------------------------------------------

    def host_path(self, win: str) -> Path:
        """Map a Windows path on C: to the sandbox; refuse anything that would leave it."""
        drive = re.match(r"^([A-Za-z]):(.*)$", win, re.DOTALL)
        if drive:
            if drive[1].upper() != "C":
                raise Refused(f"drive {drive[1].upper()}: does not exist on the lab guest "
                              f"(only C:): '{win}'")
            rest = drive[2]
        elif win.startswith(("\\", "/")) and not win.startswith(("\\\\", "//")):
            rest = win
        else:
            raise Refused(f"path '{win}' is not an absolute C: path")
        parts: list[str] = []
        for part in re.split(r"[\\/]+", rest):
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    raise Refused(f"path '{win}' leaves the C: drive")
                parts.pop()
                continue
            parts.append(part)
        host = self.root.joinpath(*parts)
        real = Path(os.path.realpath(host))
        if real != self.real_root and self.real_root not in real.parents:
            raise Refused(f"path '{win}' leads outside the lab guest's C: drive")
        return host

    def win_path(self, host: Path) -> str:
        rel = host.relative_to(self.root)
        return "C:\\" + "\\".join(rel.parts)

    def expand_env(self, text: str, style: str) -> str:
        """Expand ``$env:NAME`` (PowerShell) or ``%NAME%`` (cmd) the way Windows would."""
        if style == "ps":
            return re.sub(r"(?<!\x00)\$env:([A-Za-z_][A-Za-z0-9_]*)",
                          lambda m: self.env.get(m[1].lower(), ""), text)
        return re.sub(r"%([A-Za-z_][A-Za-z0-9_]*)%",
                      lambda m: self.env.get(m[1].lower(), m[0]), text)

    def system_uuid(self) -> str | None:
        """The SMBIOS UUID this machine reports (None: it has no identity file)."""
        if self.identity_file is None:
            return None
        try:
            return self.identity_file.read_text().strip() or None
        except OSError:
            return None

    # services and SQL ------------------------------------------------------------------------

    def services(self) -> list[Service]:
        """The "installed" services, read on every call so that tests can change them live."""
        path = self.root / "services.json"
        if not path.exists():
            return []
        entries = json.loads(path.read_text())
        found: list[Service] = []
        for entry in entries:
            if isinstance(entry, str):
                found.append(Service(entry, KNOWN_DISPLAY_NAMES.get(entry, entry)))
            else:
                name = str(entry["Name"])
                found.append(Service(name, str(entry.get("DisplayName") or
                                                KNOWN_DISPLAY_NAMES.get(name, name)),
                                     str(entry.get("Status", "Running"))))
        return found

    def has_sql_server(self) -> bool:
        return any(s.name.upper() == "MSSQLSERVER" or s.name.upper().startswith("MSSQL$")
                   for s in self.services())

    def full_recovery_databases(self, query: str) -> str | None:
        """Answer the query for databases in full recovery from databases.json (None: the
        query is another one)."""
        match = FULL_RECOVERY_QUERY.match(query)
        if not match:
            return None
        path = self.root / "databases.json"
        entries = json.loads(path.read_text()) if path.exists() else []
        names = []
        for entry in entries:
            if isinstance(entry, str):
                entry = {"name": entry}
            if str(entry.get("recovery_model", "FULL")).upper() != "FULL":
                continue
            if match[1] and str(entry.get("state", "ONLINE")).upper() != "ONLINE":
                continue
            if match[2] and str(entry["name"]).lower() in SYSTEM_DATABASES:
                continue
            names.append(str(entry["name"]))
        return "".join(f"{name}\n" for name in names)

    def databases(self) -> list[dict[str, Any]]:
        path = self.root / "databases.json"
        entries = json.loads(path.read_text()) if path.exists() else []
        return [{"name": e} if isinstance(e, str) else dict(e) for e in entries]

    def truncate_all_logs(self, query: str) -> str | None:
        """Run the server-side batch that truncates every log (:data:`TRUNCATE_ALL_LOGS`);
        None: the query is another one."""
        match = TRUNCATE_ALL_LOGS.match(query)
        if not match:
            return None
        out = []
        for entry in self.databases():
            name = str(entry["name"])
            if str(entry.get("recovery_model", "FULL")).upper() != "FULL":
                continue
            if match["online"] and str(entry.get("state", "ONLINE")).upper() != "ONLINE":
                continue
            if match["user"] and name.lower() in SYSTEM_DATABASES:
                continue
            name_hex = name.encode("utf-16-le").hex().upper()
            error = entry.get("log_backup_error")
            if error:
                out.append(f"{match['failed']}{name_hex}{match['sep']}{error}\n")
                continue
            self.record("sql.jsonl", {"tool": "sqlcmd", "database": name, "batch": True,
                                      "query": f"BACKUP LOG {quotename(name)} TO DISK = N'NUL'"})
            out.append(f"{match['ok']}{name_hex}\n")
        return "".join(out)

    def truncate_sql_log(self, query: str, tool: str) -> str:
        """The log truncation stand-in: record it and answer as SQL Server would."""
        match = BACKUP_LOG.match(query)
        if not match:
            raise Refused(f"the lab's SQL Server stand-in runs only "
                          f"BACKUP LOG <db> TO DISK='NUL', not: {query}")
        database = match[1].strip('[]"')
        self.record("sql.jsonl", {"tool": tool, "database": database, "query": query})
        return (f"Processed 0 pages for database '{database}', file '{database}_log' on file 1.\n"
                f"BACKUP LOG successfully processed 0 pages in 0.001 seconds (0.000 MB/sec).\n")

    def record(self, name: str, entry: dict[str, Any]) -> None:
        line = json.dumps({"time": datetime.now(UTC).isoformat(), **entry})
        with self._records, open(self.root / name, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    # script files ----------------------------------------------------------------------------

    def run_script(self, win: str, args: Sequence[str], console: Console) -> int:
        """Run a script file's ``#lab:`` lines (the lab stand-in rule in the module docstring)."""
        path = self.host_path(win)
        if not path.is_file():
            raise Refused(f"The term '{win}' is not recognized as the name of a cmdlet, "
                          f"function, script file, or operable program.")
        text = path.read_text(encoding="utf-8-sig", errors="replace")
        lines = [m[1] for m in map(LAB_LINE.match, text.splitlines()) if m]
        if not lines:
            raise Refused(f"script {win} has no '#lab:' lines; the lab's Windows guest runs "
                          f"only those (see vbrd.lab.winrm)")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(self.root),
            "VBRD_GUEST_ROOT": str(self.root),
            "VBRD_GUEST_SCRIPT": str(path),
        }
        return console.run_process(["sh", "-c", "\n".join(lines), win, *args], self.root, env)

    # cmd.exe ---------------------------------------------------------------------------------

    def run_command_line(self, line: str, console: Console, limit: int = CMD_LINE_LIMIT) -> int:
        """Run what a WinRS Command carries, with cmd.exe's chaining and its length limit."""
        if len(line) > limit:
            console.err(crlf("The command line is too long.\n"))
            return 1
        rc = 0
        for op, segment in split_cmd_chain(line):
            if op == "&&" and rc != 0 or op == "||" and rc == 0:
                continue
            if console.cancelled:
                return 1
            rc = self.run_simple(self.expand_env(segment, "cmd"), console)
        return rc

    def run_simple(self, segment: str, console: Console) -> int:
        words = split_cmd_words(segment)
        if not words:
            return 0
        first, rest = words[0][0], segment[words[0][2]:].strip()
        args = [w for w, _, _ in words[1:]]
        name = first.lower().replace("/", "\\").rsplit("\\", 1)[-1]
        name = name[:-4] if name.endswith(".exe") else name
        try:
            if name == "cmd":
                return self.run_cmd_exe(rest, console)
            if name in ("powershell", "pwsh"):
                return self.run_powershell(args, rest, console)
            if name == "whoami":
                console.out(crlf(f"{self.hostname.lower()}\\{self.user.lower()}\n"))
                return 0
            if name == "hostname":
                console.out(crlf(f"{self.hostname}\n"))
                return 0
            if name in ("echo", "echo."):
                console.out(crlf((rest if name == "echo" and rest else
                                  "" if name == "echo." else "ECHO is on.") + "\n"))
                return 0
            if name == "exit":
                codes = [a for a in args if a.lower() != "/b"]
                return int(codes[0]) if codes else 0
            if name == "type":
                if not args:
                    raise Refused("The syntax of the command is incorrect.")
                console.out(self.host_path(args[0]).read_bytes())
                return 0
            if name == "sqlcmd":
                return self.run_sqlcmd(args, console)
            if name.endswith((".bat", ".cmd")):
                return self.run_script(first, args, console)
        except Refused as e:
            console.err(crlf(f"{e}\n"))
            return 1
        except (OSError, ValueError) as e:
            console.err(crlf(f"{first}: {e}\n"))
            return 1
        console.err(crlf(
            f"'{first}' is not recognized as an internal or external command,\n"
            f"operable program or batch file.\n"
            f"(the lab's Windows guest emulates only the commands listed in vbrd.lab.winrm)\n"))
        return NOT_RECOGNIZED_EXIT

    def run_cmd_exe(self, rest: str, console: Console) -> int:
        while True:
            flag = re.match(r"^/([A-Za-z])(?=\s|$)\s*", rest)
            if not flag:
                raise Refused(f"cmd {rest}: only 'cmd /c COMMAND' is emulated")
            rest = rest[flag.end():]
            letter = flag[1].lower()
            if letter in ("c", "k"):
                break
            if letter not in ("q", "d", "s"):
                raise Refused(f"cmd /{flag[1]}: not emulated by the lab guest")
        rest = rest.strip()
        if len(rest) >= 2 and rest[0] == rest[-1] == '"' and rest.count('"') == 2:
            rest = rest[1:-1]
        return self.run_command_line(rest, console, PROCESS_LINE_LIMIT)

    def run_sqlcmd(self, args: Sequence[str], console: Console) -> int:
        if not self.has_sql_server():
            console.err(crlf("'sqlcmd' is not recognized as an internal or external command,\n"
                             "operable program or batch file.\n"))
            return NOT_RECOGNIZED_EXIT
        query = None
        for option, value in itertools.pairwise(args):
            if option in ("-Q", "-q"):
                query = value
        if query is None:
            raise Refused("sqlcmd: the lab runs only 'sqlcmd ... -Q \"QUERY\"'")
        listing = self.full_recovery_databases(query)
        if listing is None:
            listing = self.truncate_all_logs(query)
        console.out(crlf(listing if listing is not None else
                         self.truncate_sql_log(query, "sqlcmd")))
        return 0

    def run_powershell(self, args: Sequence[str], rest: str, console: Console) -> int:
        mode, value, script_args = parse_powershell_args(args, rest)
        shell = PowerShell(self, console)
        if mode == "encoded":
            try:
                script = decode_encoded_command(value)
            except ValueError as e:
                console.err(crlf(f"powershell: {e}\n"))
                return 1
            return shell.run(script)
        if mode == "command":
            return shell.run(value)
        return shell.run_file(value, script_args)


def split_cmd_chain(line: str) -> list[tuple[str, str]]:
    """Cut a command line at unquoted ``&&``, ``||`` and ``&``; refuse pipes and redirection."""
    parts: list[tuple[str, str]] = []
    op, start, i, quoted = "", 0, 0, False
    while i < len(line):
        c = line[i]
        if c == '"':
            quoted = not quoted
        elif not quoted and c in "&|":
            pair = line[i:i + 2]
            if pair in ("&&", "||"):
                parts.append((op, line[start:i]))
                op, i = pair, i + 2
                start = i
                continue
            if c == "|":
                raise Refused(f"pipes are not emulated by the lab guest: {line}")
            parts.append((op, line[start:i]))
            op, start = "&", i + 1
        elif not quoted and c in "<>":
            raise Refused(f"redirection is not emulated by the lab guest: {line}")
        i += 1
    parts.append((op, line[start:]))
    return [(o, s.strip()) for o, s in parts if s.strip()]


def split_cmd_words(segment: str) -> list[tuple[str, int, int]]:
    """Split at unquoted whitespace and drop the double quotes; keep each word's span."""
    words: list[tuple[str, int, int]] = []
    i = 0
    while i < len(segment):
        if segment[i].isspace():
            i += 1
            continue
        start, text, quoted = i, [], False
        while i < len(segment) and (quoted or not segment[i].isspace()):
            if segment[i] == '"':
                quoted = not quoted
            else:
                text.append(segment[i])
            i += 1
        words.append(("".join(text), start, i))
    return words


def parse_powershell_args(args: Sequence[str], rest: str) -> tuple[str, str, list[str]]:
    """Read powershell.exe's options; return the mode (encoded/command/file) and its value."""
    skip_value = ("executionpolicy", "ep", "ex", "inputformat", "outputformat", "windowstyle",
                  "version", "configurationname")
    flags = ("noprofile", "nop", "noninteractive", "noni", "nologo", "sta", "mta", "noexit")
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith(("-", "/")):
            raise Refused(f"powershell: only -EncodedCommand, -Command and -File are emulated, "
                          f"not '{arg}'")
        name = arg[1:].lower()
        if name in flags:
            i += 1
        elif name in skip_value:
            i += 2
        elif name in ("e", "ec") or (len(name) >= 2 and "encodedcommand".startswith(name)):
            if i + 1 >= len(args):
                raise Refused("powershell: -EncodedCommand needs a value")
            return "encoded", args[i + 1], []
        elif name in ("c", "command"):
            command = rest.split(arg, 1)[1].strip()
            if len(command) >= 2 and command[0] == command[-1] == '"':
                command = command[1:-1]
            return "command", command, []
        elif name in ("f", "file"):
            if i + 1 >= len(args):
                raise Refused("powershell: -File needs a path")
            return "file", args[i + 1], list(args[i + 2:])
        else:
            raise Refused(f"powershell option '{arg}' is not emulated by the lab guest")
    raise Refused("powershell: nothing to run (give -EncodedCommand, -Command or -File)")


def decode_encoded_command(value: str) -> str:
    try:
        return base64.b64decode(value, validate=True).decode("utf-16-le")
    except (binascii.Error, UnicodeDecodeError) as e:
        raise ValueError(f"-EncodedCommand is not base64 of UTF-16LE text ({e})") from e


def decoded_powershell(line: str) -> str | None:
    """The script inside a ``powershell -EncodedCommand`` line, for the command log."""
    words = [w for w, _, _ in split_cmd_words(line)]
    if not words or words[0].lower().removesuffix(".exe") not in ("powershell", "pwsh"):
        return None
    try:
        mode, value, _ = parse_powershell_args(words[1:], line)
        return decode_encoded_command(value) if mode == "encoded" else None
    except (Refused, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# PowerShell: a reader for the documented statements, and their execution
# --------------------------------------------------------------------------------------------


class Terminate(Exception):
    """A terminating error (ErrorAction Stop): the script ends with exit code 1."""


class ScriptExit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Tok:
    kind: str  # "str" (quoted), "word", "paren", "pipe", "comma", "amp"
    text: str


@dataclass
class Statement:
    source: str
    action: Callable[[PowerShell, str | None], bool]
    error_action: str | None = None
    quiet: bool = False


class PowerShell:
    """Runs one script of documented statements; errors leave as CLIXML on stderr at the end."""

    def __init__(self, guest: WindowsGuest, console: Console) -> None:
        self.guest = guest
        self.console = console
        self.error_preference = "Continue"
        self.last_exit_code = 0
        self.errors: list[str] = []
        self.quiet = False

    # the Console the statements write to: stdout passes, stderr becomes error records
    @property
    def cancelled(self) -> bool:
        return self.console.cancelled

    def out(self, data: bytes) -> None:
        if not self.quiet:
            self.console.out(data)

    def err(self, data: bytes) -> None:
        text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").rstrip("\n")
        if text:
            self.errors.append(text)

    def run_process(self, argv: Sequence[str], cwd: Path, env: dict[str, str]) -> int:
        return self.console.run_process(argv, cwd, env)

    def write(self, text: str) -> None:
        self.out(crlf(text + "\n"))

    def error(self, message: str, action: str | None) -> bool:
        """Report a non-terminating error the way -ErrorAction says; always a failure."""
        action = action or self.error_preference
        if action == "Stop":
            raise Terminate(message)
        if action not in ("SilentlyContinue", "Ignore"):
            self.errors.append(message)
        return False

    def run_file(self, win: str, args: Sequence[str]) -> int:
        try:
            return self.guest.run_script(win, args, self)
        except Refused as e:
            self.errors.append(str(e))
            return 1
        finally:
            self.flush_errors()

    def run(self, script: str) -> int:
        try:
            statements = [parse_statement(s) for s in split_statements(script)]
        except Refused as e:
            self.errors.append(f"The lab's Windows guest cannot run this script: {e}")
            self.flush_errors()
            return 1
        ok, code = True, None
        for st in statements:
            if self.console.cancelled:
                code = 1
                break
            self.quiet = st.quiet
            try:
                ok = st.action(self, st.error_action)
            except ScriptExit as e:
                code = e.code
                break
            except Terminate as e:
                self.errors.append(str(e))
                code = 1
                break
            except Refused as e:
                ok = self.error(str(e), st.error_action)
            except OSError as e:
                ok = self.error(f"{st.source}: {e.strerror or e}", st.error_action)
            finally:
                self.quiet = False
        self.flush_errors()
        return code if code is not None else (0 if ok else 1)

    def flush_errors(self) -> None:
        if not self.errors:
            return
        records = "".join(
            f'<S S="Error">{escape(line)}_x000D__x000A_</S>'
            for message in self.errors for line in message.split("\n"))
        self.errors = []
        self.console.err(
            b"#< CLIXML\r\n" + '<Objs Version="1.1.0.1" '
            'xmlns="http://schemas.microsoft.com/powershell/2004/04">'
            f"{records}</Objs>".encode())


def split_statements(script: str) -> list[str]:
    """Cut a script at newlines and ``;`` outside quotes and brackets, dropping comments."""
    script = re.sub(r"<#.*?#>", " ", script, flags=re.DOTALL)
    statements: list[str] = []
    current: list[str] = []
    depth, quote, i = 0, "", 0
    while i < len(script):
        c = script[i]
        if quote:
            current.append(c)
            if c == "`" and quote == DOUBLE_QUOTES and i + 1 < len(script):
                current.append(script[i + 1])
                i += 1
            elif c in quote:
                if script[i + 1:i + 2] and script[i + 1] in quote:
                    current.append(script[i + 1])  # a doubled quote stays inside
                    i += 1
                else:
                    quote = ""
        elif c in SINGLE_QUOTES or c in DOUBLE_QUOTES:
            quote = SINGLE_QUOTES if c in SINGLE_QUOTES else DOUBLE_QUOTES
            current.append(c)
        elif c == "`" and script[i + 1:i + 2] in ("\n", "\r"):
            i += 2 if script[i + 1:i + 3] == "\r\n" else 1
            current.append(" ")
        elif c == "#" and (not current or current[-1].isspace()):
            while i < len(script) and script[i] not in "\r\n":
                i += 1
            continue
        elif c in "({[":
            depth += 1
            current.append(c)
        elif c in ")}]":
            depth -= 1
            current.append(c)
        elif depth <= 0 and c in ";\r\n":
            statements.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    if quote:
        raise Refused(f"unterminated string in: {''.join(current).strip()}")
    statements.append("".join(current))
    return [s.strip() for s in statements if s.strip()]


def tokenize(text: str) -> list[Tok]:
    toks: list[Tok] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in SINGLE_QUOTES:
            value, i = read_single_quoted(text, i)
            toks.append(Tok("str", value))
        elif c in DOUBLE_QUOTES:
            value, i = read_double_quoted(text, i)
            toks.append(Tok("str", value))
        elif c == "(":
            depth, j, quote = 0, i, ""
            while j < len(text):
                ch = text[j]
                if quote:
                    if ch == "`" and quote == DOUBLE_QUOTES:
                        j += 1
                    elif ch in quote:
                        quote = ""  # a doubled quote closes and reopens: same outcome
                elif ch in SINGLE_QUOTES or ch in DOUBLE_QUOTES:
                    quote = SINGLE_QUOTES if ch in SINGLE_QUOTES else DOUBLE_QUOTES
                elif ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if j >= len(text):
                raise Refused(f"unbalanced parentheses in: {text}")
            toks.append(Tok("paren", text[i + 1:j]))
            i = j + 1
        elif c == "|":
            toks.append(Tok("pipe", c))
            i += 1
        elif c == ",":
            toks.append(Tok("comma", c))
            i += 1
        elif c == "&" and not toks:
            toks.append(Tok("amp", c))
            i += 1
        elif c in "{}&;":
            raise Refused(f"'{c}' is not emulated by the lab guest in: {text}")
        else:
            j = i
            while (j < len(text) and not text[j].isspace()
                   and text[j] not in "|,;(){}" + SINGLE_QUOTES + DOUBLE_QUOTES):
                j += 1
            toks.append(Tok("word", text[i:j]))
            i = j
    return toks


def read_single_quoted(text: str, i: int) -> tuple[str, int]:
    """A verbatim string: any of PowerShell's single quotes ends it, two of them in a row
    stand for the first. Its ``$`` are literal (kept as :data:`LITERAL_DOLLAR`)."""
    value, j = [], i + 1
    while j < len(text):
        c = text[j]
        if c in SINGLE_QUOTES:
            if text[j + 1:j + 2] and text[j + 1] in SINGLE_QUOTES:
                value.append(c)
                j += 2
                continue
            return "".join(value), j + 1
        value.append(LITERAL_DOLLAR if c == "$" else c)
        j += 1
    raise Refused(f"unterminated string in: {text}")


def read_double_quoted(text: str, i: int) -> tuple[str, int]:
    """An expandable string: any of PowerShell's double quotes ends it, two in a row stand
    for the first, a backtick escapes the next character. Only ``$env:`` variables expand
    here; an escaped ``$`` is kept as :data:`LITERAL_DOLLAR`."""
    escapes = {"n": "\n", "r": "\r", "t": "\t", "0": "\0", "`": "`", "$": LITERAL_DOLLAR}
    value, j = [], i + 1
    while j < len(text):
        c = text[j]
        if c == "`" and j + 1 < len(text):
            value.append(escapes.get(text[j + 1], text[j + 1]))
            j += 2
            continue
        if c in DOUBLE_QUOTES:
            if text[j + 1:j + 2] and text[j + 1] in DOUBLE_QUOTES:
                value.append(c)
                j += 2
                continue
            raw = "".join(value)
            if re.search(r"(?<!\x00)\$(?!env:)[A-Za-z_({]", raw):
                raise Refused(f"only $env: variables expand in strings in the lab guest: {text}")
            return raw, j + 1
        value.append(c)
        j += 1
    raise Refused(f"unterminated string in: {text}")


def expand(guest: WindowsGuest, value: str) -> str:
    """``value`` as PowerShell hands it on: ``$env:`` expanded, literal ``$`` restored."""
    return plain(guest.expand_env(value, "ps"))


def plain(value: str) -> str:
    """``value`` with literal ``$`` restored and nothing expanded (names, queries, flags)."""
    return value.replace(LITERAL_DOLLAR, "$")


_SQ = f"[{SINGLE_QUOTES}]"
_DQ = f"[{DOUBLE_QUOTES}]"
QUOTED = (f"({_SQ}(?:[^{SINGLE_QUOTES}]|{_SQ}{_SQ})*{_SQ}"
          f"|{_DQ}(?:[^{DOUBLE_QUOTES}`]|`.|{_DQ}{_DQ})*{_DQ})")
FROM_BASE64 = rf"\[(?:System\.)?Convert\]::FromBase64String\(\s*{QUOTED}\s*\)"
WRITE_ALL_BYTES = re.compile(
    rf"^\[(?:System\.)?IO\.File\]::WriteAllBytes\(\s*{QUOTED}\s*,\s*{FROM_BASE64}\s*\)$",
    re.IGNORECASE)
PREFERENCE = re.compile(r"^\$(\w*Preference)\s*=\s*(.+)$", re.IGNORECASE | re.DOTALL)


def quoted_value(literal: str) -> str:
    if literal[:1] in SINGLE_QUOTES:
        return read_single_quoted(literal, 0)[0]
    return read_double_quoted(literal, 0)[0]


def base64_bytes(literal: str, statement: str) -> bytes:
    try:
        return base64.b64decode(plain(quoted_value(literal)), validate=True)
    except binascii.Error as e:
        raise Refused(f"invalid base64 ({e}) in: {statement[:200]}") from e


def parse_statement(source: str) -> Statement:
    """Turn one statement into an action, or refuse it naming the statement."""
    text, quiet = source, False
    null = re.match(r"^(?:\$null\s*=|\[void\])\s*(.+)$", text, re.IGNORECASE | re.DOTALL)
    if null:
        text, quiet = null[1], True
    pref = PREFERENCE.match(text)
    if pref:
        return parse_preference(source, pref[1], pref[2].strip())
    write = WRITE_ALL_BYTES.match(text)
    if write:
        return write_all_bytes(source, quoted_value(write[1]), base64_bytes(write[2], source))
    if SYSTEM_PRODUCT_UUID.match(text):
        return Statement(source, system_product_uuid)
    toks = tokenize(text)
    if len(toks) == 1 and toks[0].kind == "str":
        value = toks[0].text  # a string on its own is output, as PowerShell does

        def output(ps: PowerShell, ea: str | None) -> bool:
            ps.write(expand(ps.guest, value))
            return True
        return Statement(source, output)
    segments: list[list[Tok]] = [[]]
    for tok in toks:
        if tok.kind == "pipe":
            segments.append([])
        else:
            segments[-1].append(tok)
    if any(not s for s in segments):
        raise Refused(f"empty pipeline element in: {source}")
    filters = [pipeline_filter(seg, source) for seg in segments[1:]]
    if "out-null" in filters:
        quiet = True
        filters = [f for f in filters if f != "out-null"]
    statement = parse_command(segments[0], filters, source)
    statement.quiet = statement.quiet or quiet
    return statement


SYSTEM_PRODUCT_UUID = re.compile(
    r"^\(\s*Get-CimInstance\s+(?:-ClassName\s+)?Win32_ComputerSystemProduct\s*\)\.UUID$",
    re.IGNORECASE)


def system_product_uuid(ps: PowerShell, ea: str | None) -> bool:
    """``(Get-CimInstance Win32_ComputerSystemProduct).UUID``: the machine's SMBIOS UUID,
    read from the guest's identity file on every call (so that the lab can change it)."""
    reported = ps.guest.system_uuid()
    if reported is None:
        return ps.error("Get-CimInstance : Invalid class \"Win32_ComputerSystemProduct\"", ea)
    ps.write(reported.upper())
    return True


def parse_preference(source: str, name: str, value_text: str) -> Statement:
    toks = tokenize(value_text)
    if len(toks) != 1 or toks[0].kind not in ("str", "word"):
        raise Refused(f"unsupported value in: {source}")
    value = plain(toks[0].text)
    if name.lower() != "erroractionpreference":
        return Statement(source, lambda ps, ea: True)
    action = ERROR_ACTIONS.get(value.lower())
    if action is None:
        raise Refused(f"unknown ErrorAction '{value}' in: {source}")

    def run(ps: PowerShell, ea: str | None) -> bool:
        ps.error_preference = action
        return True
    return Statement(source, run)


def pipeline_filter(seg: list[Tok], source: str) -> str:
    words = " ".join(t.text.lower() for t in seg if t.kind == "word")
    if words == "out-null":
        return "out-null"
    if words in ("select-object -expandproperty name", "select -expandproperty name"):
        return "names"
    if words in ("convertto-json", "convertto-json -compress"):
        return "json"
    raise Refused(f"pipeline element '{' '.join(t.text for t in seg)}' is not emulated "
                  f"in: {source}")


@dataclass
class Params:
    named: dict[str, Any] = field(default_factory=dict)
    positional: list[Any] = field(default_factory=list)


def parse_params(cmdlet: str, toks: list[Tok], valued: set[str], switches: set[str],
                 source: str) -> Params:
    aliases = {"ea": "erroraction", "lp": "literalpath", "pspath": "literalpath"}
    params = Params()
    i = 0
    while i < len(toks):
        tok = toks[i]
        if tok.kind == "word" and tok.text.startswith("-") and len(tok.text) > 1 \
                and not tok.text[1:].isdigit():
            name = tok.text[1:].lower().rstrip(":")
            name = aliases.get(name, name)
            if name in switches:
                params.named[name] = True
                i += 1
                continue
            if name not in valued and name != "erroraction":
                raise Refused(f"parameter {tok.text} of {cmdlet} is not emulated in: {source}")
            value, i = read_value(toks, i + 1, source)
            params.named[name] = value
            continue
        value, i = read_value(toks, i, source)
        params.positional.append(value)
    return params


def read_value(toks: list[Tok], i: int, source: str) -> tuple[Any, int]:
    """One argument: a value, or a comma-separated list of them."""
    if i >= len(toks):
        raise Refused(f"a parameter needs a value in: {source}")
    values = [eval_value(toks[i], source)]
    i += 1
    while i + 1 < len(toks) and toks[i].kind == "comma":
        values.append(eval_value(toks[i + 1], source))
        i += 2
    return (values if len(values) > 1 else values[0]), i


def eval_value(tok: Tok, source: str) -> Any:
    if tok.kind in ("str", "word"):
        return tok.text
    if tok.kind == "paren":
        inner = tok.text.strip()
        b64 = re.fullmatch(FROM_BASE64, inner, re.IGNORECASE)
        if b64:
            return base64_bytes(b64[1], source)
        if re.fullmatch(QUOTED, inner):
            return quoted_value(inner)
    raise Refused(f"expression '{tok.text}' is not emulated in: {source}")


def error_action(params: Params, source: str) -> str | None:
    value = params.named.get("erroraction")
    if value is None:
        return None
    action = ERROR_ACTIONS.get(plain(str(value)).lower())
    if action is None:
        raise Refused(f"unknown ErrorAction '{value}' in: {source}")
    return action


def one_path(params: Params, cmdlet: str, source: str, *names: str) -> str:
    for name in names:
        if name in params.named:
            value = params.named[name]
            break
    else:
        if len(params.positional) != 1:
            raise Refused(f"{cmdlet} needs exactly one path in: {source}")
        value = params.positional[0]
    if not isinstance(value, str):
        raise Refused(f"{cmdlet} takes one path, not a list, in: {source}")
    return value


def parse_command(toks: list[Tok], filters: list[str], source: str) -> Statement:
    if filters and not (toks[0].kind == "word" and toks[0].text.lower() == "get-service"):
        raise Refused(f"only Get-Service output can be piped to Select-Object/ConvertTo-Json "
                      f"in: {source}")
    head = toks[0]
    if head.kind == "amp":
        if len(toks) < 2 or toks[1].kind not in ("str", "word"):
            raise Refused(f"'&' needs a script path in: {source}")
        args = [eval_value(t, source) for t in toks[2:]]
        return run_script_statement(source, toks[1].text, [plain(str(a)) for a in args])
    if head.kind != "word":
        raise Refused(f"statement not emulated by the lab's Windows guest: {source}")
    name = head.text.lower()
    rest = toks[1:]
    builders: dict[str, Callable[[list[Tok], str], Statement]] = {
        "new-item": parse_new_item,
        "add-content": parse_add_content,
        "remove-item": parse_remove_item,
        "test-path": parse_test_path,
        "get-content": parse_get_content,
        "write-output": parse_write,
        "write-host": parse_write,
        "echo": parse_write,
        "invoke-sqlcmd": parse_invoke_sqlcmd,
        "set-strictmode": lambda t, s: Statement(s, lambda ps, ea: True),
        "exit": parse_exit,
    }
    if name == "get-service":
        return parse_get_service(rest, source, filters)
    if name in builders:
        return builders[name](rest, source)
    if name.removesuffix(".exe") in ("cmd", "sqlcmd", "whoami", "hostname"):
        args = [eval_value(t, source) for t in rest]
        if not all(isinstance(a, str) for a in args):
            raise Refused(f"native command arguments must be text in: {source}")
        return native_statement(source, name, [str(a) for a in args])
    raise Refused(f"statement not emulated by the lab's Windows guest: {source}")


def win_quote(arg: str) -> str:
    return f'"{arg}"' if not arg or any(c.isspace() for c in arg) else arg


def native_statement(source: str, name: str, args: list[str]) -> Statement:
    def run(ps: PowerShell, ea: str | None) -> bool:
        args_x = [expand(ps.guest, a) for a in args]
        line = " ".join([name, *(win_quote(a) for a in args_x)])
        if name.removesuffix(".exe") == "sqlcmd":
            try:
                rc = ps.guest.run_sqlcmd(args_x, ps)
            except Refused as e:
                ps.err(crlf(str(e)))
                rc = 1
        else:
            rc = ps.guest.run_command_line(line, ps, PROCESS_LINE_LIMIT)
        ps.last_exit_code = rc
        return rc == 0
    return Statement(source, run)


def run_script_statement(source: str, path: str, args: list[str]) -> Statement:
    def run(ps: PowerShell, ea: str | None) -> bool:
        rc = ps.guest.run_script(expand(ps.guest, path), args, ps)
        ps.last_exit_code = rc
        return rc == 0
    return Statement(source, run)


def write_all_bytes(source: str, path: str, data: bytes) -> Statement:
    def run(ps: PowerShell, ea: str | None) -> bool:
        win = expand(ps.guest, path)
        target = ps.guest.host_path(win)
        if not target.parent.is_dir():
            return ps.error(f'Exception calling "WriteAllBytes" with "2" argument(s): '
                            f"\"Could not find a part of the path '{win}'.\"", ea)
        target.write_bytes(data)
        return True
    return Statement(source, run)


def parse_new_item(toks: list[Tok], source: str) -> Statement:
    params = parse_params("New-Item", toks, {"itemtype", "path", "type"}, {"force"}, source)
    kind = plain(str(params.named.get("itemtype", params.named.get("type", "")))).lower()
    if kind != "directory":
        raise Refused(f"New-Item is emulated only with -ItemType Directory: {source}")
    path = one_path(params, "New-Item", source, "path")
    force = bool(params.named.get("force"))

    def run(ps: PowerShell, ea: str | None) -> bool:
        win = expand(ps.guest, path)
        target = ps.guest.host_path(win)
        if target.exists() and (not force or not target.is_dir()):
            return ps.error(f"New-Item : An item with the specified name {win} already exists.",
                            ea)
        target.mkdir(parents=True, exist_ok=True)
        ps.write(ps.guest.win_path(target))
        return True
    return Statement(source, run, error_action(params, source))


def parse_add_content(toks: list[Tok], source: str) -> Statement:
    params = parse_params("Add-Content", toks, {"path", "value", "encoding"}, set(), source)
    path = one_path(params, "Add-Content", source, "path")
    data = params.named.get("value")
    encoding = plain(str(params.named.get("encoding", ""))).lower()
    if encoding != "byte" or not isinstance(data, bytes):
        raise Refused("Add-Content is emulated only as -Encoding Byte -Value "
                      f"([Convert]::FromBase64String('...')): {source[:200]}")

    def run(ps: PowerShell, ea: str | None) -> bool:
        win = expand(ps.guest, path)
        target = ps.guest.host_path(win)
        if not target.parent.is_dir():
            return ps.error(f"Add-Content : Could not find a part of the path '{win}'.", ea)
        with open(target, "ab") as f:
            f.write(data)
        return True
    return Statement(source, run, error_action(params, source))


def parse_remove_item(toks: list[Tok], source: str) -> Statement:
    params = parse_params("Remove-Item", toks, {"path", "literalpath"}, {"recurse", "force"},
                          source)
    path = one_path(params, "Remove-Item", source, "path", "literalpath")
    recurse = bool(params.named.get("recurse"))

    def run(ps: PowerShell, ea: str | None) -> bool:
        win = expand(ps.guest, path)
        target = ps.guest.host_path(win)
        if target == ps.guest.root:
            return ps.error(f"Remove-Item : the lab guest does not remove its C: drive ({win})",
                            ea)
        if not target.exists() and not target.is_symlink():
            return ps.error(f"Remove-Item : Cannot find path '{win}' because it does not "
                            f"exist.", ea)
        if target.is_dir() and not target.is_symlink():
            if any(target.iterdir()) and not recurse:
                return ps.error(f"Remove-Item : The item at {win} has children and the Recurse "
                                f"parameter was not specified.", ea)
            remove_tree(target)
        else:
            target.unlink()
        return True
    return Statement(source, run, error_action(params, source))


def remove_tree(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            remove_tree(child)
        else:
            child.unlink()
    path.rmdir()


def parse_test_path(toks: list[Tok], source: str) -> Statement:
    params = parse_params("Test-Path", toks, {"path", "literalpath"}, set(), source)
    path = one_path(params, "Test-Path", source, "path", "literalpath")

    def run(ps: PowerShell, ea: str | None) -> bool:
        try:
            exists = ps.guest.host_path(expand(ps.guest, path)).exists()
        except Refused:
            exists = False
        ps.write("True" if exists else "False")
        return True
    return Statement(source, run, error_action(params, source))


def parse_get_content(toks: list[Tok], source: str) -> Statement:
    params = parse_params("Get-Content", toks, {"path", "literalpath"}, {"raw"}, source)
    path = one_path(params, "Get-Content", source, "path", "literalpath")

    def run(ps: PowerShell, ea: str | None) -> bool:
        win = expand(ps.guest, path)
        target = ps.guest.host_path(win)
        if not target.is_file():
            return ps.error(f"Get-Content : Cannot find path '{win}' because it does not "
                            f"exist.", ea)
        text = target.read_text(encoding="utf-8-sig", errors="replace")
        ps.out(crlf(text if params.named.get("raw") else "".join(
            line + "\n" for line in text.splitlines())))
        return True
    return Statement(source, run, error_action(params, source))


def parse_write(toks: list[Tok], source: str) -> Statement:
    params = parse_params("Write-Output", toks, set(), set(), source)
    values: list[str] = []
    for value in params.positional:
        if isinstance(value, bytes):
            raise Refused(f"Write-Output of bytes is not emulated: {source[:200]}")
        values.extend(value if isinstance(value, list) else [value])

    def run(ps: PowerShell, ea: str | None) -> bool:
        for value in values:
            ps.write(expand(ps.guest, str(value)))
        return True
    return Statement(source, run)


def parse_exit(toks: list[Tok], source: str) -> Statement:
    if len(toks) > 1 or toks and toks[0].kind != "word":
        raise Refused(f"exit takes a number or $LASTEXITCODE: {source}")
    arg = toks[0].text if toks else "0"
    if arg.lower() != "$lastexitcode" and not re.fullmatch(r"-?\d+", arg):
        raise Refused(f"exit takes a number or $LASTEXITCODE: {source}")

    def run(ps: PowerShell, ea: str | None) -> bool:
        raise ScriptExit(ps.last_exit_code if arg.lower() == "$lastexitcode" else int(arg))
    return Statement(source, run)


def parse_get_service(toks: list[Tok], source: str, filters: list[str]) -> Statement:
    params = parse_params("Get-Service", toks, {"name"}, set(), source)
    raw = params.named.get("name", params.positional[0] if params.positional else None)
    if len(params.positional) > (0 if "name" in params.named else 1):
        raise Refused(f"Get-Service takes one list of names: {source}")
    names = [] if raw is None else [plain(str(n))
                                    for n in (raw if isinstance(raw, list) else [raw])]
    if len(filters) > 1 and filters != ["names", "json"]:
        raise Refused(f"unsupported pipeline after Get-Service: {source}")

    def run(ps: PowerShell, ea: str | None) -> bool:
        installed = {s.name.lower(): s for s in ps.guest.services()}
        found, ok = [], True
        for name in names or [s.name for s in installed.values()]:
            service = installed.get(name.lower())
            if service is None:
                ok = ps.error(f"Get-Service : Cannot find any service with service name "
                              f"'{name}'.", ea)
            else:
                found.append(service)
        if "json" in filters:
            items: list[Any] = [s.name for s in found] if "names" in filters else \
                [s.as_json() for s in found]
            if items:
                ps.write(json.dumps(items[0] if len(items) == 1 else items, indent=4))
        elif "names" in filters:
            for service in found:
                ps.write(service.name)
        elif found:
            width = max(len(s.name) for s in found) + 2
            rows = [f"{'Status':<9}{'Name':<{width}}DisplayName",
                    f"{'------':<9}{'----':<{width}}-----------"]
            rows += [f"{s.status:<9}{s.name:<{width}}{s.display_name}" for s in found]
            ps.write("\n" + "\n".join(rows) + "\n")
        return ok
    return Statement(source, run, error_action(params, source))


def parse_invoke_sqlcmd(toks: list[Tok], source: str) -> Statement:
    params = parse_params("Invoke-Sqlcmd", toks,
                          {"query", "serverinstance", "database", "querytimeout"}, set(), source)
    query = params.named.get("query")
    if not isinstance(query, str):
        raise Refused(f"Invoke-Sqlcmd needs -Query '...': {source}")

    def run(ps: PowerShell, ea: str | None) -> bool:
        if not ps.guest.has_sql_server():
            return ps.error("The term 'Invoke-Sqlcmd' is not recognized as the name of a "
                            "cmdlet, function, script file, or operable program.", ea)
        ps.guest.truncate_sql_log(plain(query), "Invoke-Sqlcmd")
        return True
    return Statement(source, run, error_action(params, source))


# --------------------------------------------------------------------------------------------
# WS-Management: shells, commands and the SOAP around them
# --------------------------------------------------------------------------------------------


class Execution:
    """One command running in its own thread; the Console its statements write to."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._proc: subprocess.Popen[bytes] | None = None
        self.cancelled = False
        self.exit_code: int | None = None
        self.finished = asyncio.Event()

    def out(self, data: bytes) -> None:
        with self._lock:
            self._stdout += data

    def err(self, data: bytes) -> None:
        with self._lock:
            self._stderr += data

    def take(self) -> tuple[bytes, bytes, bool]:
        """Output not yet received (bounded per answer) and whether all of it has been."""
        with self._lock:
            out, err = bytes(self._stdout[:RECEIVE_CHUNK]), bytes(self._stderr[:RECEIVE_CHUNK])
            del self._stdout[:RECEIVE_CHUNK]
            del self._stderr[:RECEIVE_CHUNK]
            done = not self._stdout and not self._stderr and self.exit_code is not None
        return out, err, done

    def run_process(self, argv: Sequence[str], cwd: Path, env: dict[str, str]) -> int:
        with self._lock:
            if self.cancelled:
                return 1
            proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
            self._proc = proc
        try:
            out, err = proc.communicate()
        finally:
            with self._lock:
                self._proc = None
        self.out(out)
        self.err(err)
        return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode

    def terminate(self) -> None:
        with self._lock:
            self.cancelled = True
            proc = self._proc
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def start(self, work: Callable[[Execution], int]) -> None:
        def body() -> None:
            try:
                code = work(self)
            except Exception as e:  # the endpoint must answer even when the emulation breaks
                log.exception("command failed inside the emulation")
                self.err(crlf(f"lab guest internal error: {e}\n"))
                code = 1
            with self._lock:
                self.exit_code = code
            self._loop.call_soon_threadsafe(self.finished.set)
        threading.Thread(target=body, name="winrm-command", daemon=True).start()


@dataclass
class Shell:
    id: str
    commands: dict[str, Execution] = field(default_factory=dict)


class WsmanFault(Exception):
    def __init__(self, subcode: str, reason: str, code: int, status: int = 500) -> None:
        super().__init__(reason)
        self.subcode, self.reason, self.code, self.status = subcode, reason, code, status


class Endpoint:
    """The WS-Man service: authenticates, dispatches the shell actions, keeps shell state."""

    def __init__(self, guest: WindowsGuest, user: str, password: str) -> None:
        self.guest = guest
        self.user = user
        self.password = password
        self.shells: dict[str, Shell] = {}
        self.sequence = itertools.count(1)

    def authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return user.lower() == self.user.lower() and hmac.compare_digest(
            password.encode(), self.password.encode())

    async def handle(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            log.warning("rejected credentials from %s", request.remote)
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="WSMAN"'})
        if not request.content_type.startswith("application/soap+xml"):
            return web.Response(status=415, text="WS-Management needs application/soap+xml")
        message_id = ""
        try:
            root = ET.fromstring(await request.read())
            header = root.find("s:Header", NS)
            if header is None:
                raise WsmanFault("w:InvalidMessageInformationHeader", "no SOAP header",
                                 FAULT_INVALID)
            message_id = header.findtext("a:MessageID", "", NS)
            action = header.findtext("a:Action", "", NS).strip()
            resource = header.findtext("w:ResourceURI", "", NS).strip()
            if resource != CMD_RESOURCE:
                raise WsmanFault("w:DestinationUnreachable",
                                 f"the lab endpoint serves only {CMD_RESOURCE}, not {resource!r}",
                                 FAULT_ACTION_NOT_SUPPORTED)
            body = await self.dispatch(action, header, root.find("s:Body", NS))
            return self.answer(f"{action}Response", message_id, body)
        except ET.ParseError as e:
            return self.fault(message_id, WsmanFault("w:InvalidMessageInformationHeader",
                                                     f"the request is not XML: {e}",
                                                     FAULT_INVALID))
        except WsmanFault as e:
            return self.fault(message_id, e)

    async def dispatch(self, action: str, header: ET.Element, body: ET.Element | None) -> str:
        if action == ACTION_CREATE:
            return self.create()
        shell = self.shell_of(header)
        if action == ACTION_DELETE:
            for execution in shell.commands.values():
                execution.terminate()
            del self.shells[shell.id]
            return ""
        if body is None:
            raise WsmanFault("w:InvalidMessageInformationHeader", "no SOAP body", FAULT_INVALID)
        if action == ACTION_COMMAND:
            return self.command(shell, header, body)
        if action == ACTION_RECEIVE:
            return await self.receive(shell, header, body)
        if action == ACTION_SIGNAL:
            return self.signal(shell, body)
        if action == ACTION_SEND:
            raise WsmanFault("w:ActionNotSupported", "the lab endpoint takes no command input",
                             FAULT_ACTION_NOT_SUPPORTED)
        raise WsmanFault("w:ActionNotSupported", f"action {action!r} is not supported by the "
                         f"lab endpoint", FAULT_ACTION_NOT_SUPPORTED)

    def shell_of(self, header: ET.Element) -> Shell:
        selector = header.find("w:SelectorSet/w:Selector[@Name='ShellId']", NS)
        shell_id = (selector.text or "").strip() if selector is not None else ""
        shell = self.shells.get(shell_id)
        if shell is None:
            raise WsmanFault("w:InvalidSelectors",
                             f"The request for the Windows Remote Shell with ShellId {shell_id} "
                             f"failed because the shell was not found.", FAULT_SHELL_NOT_FOUND)
        return shell

    def create(self) -> str:
        shell = Shell(str(uuid.uuid4()).upper())
        self.shells[shell.id] = shell
        return (
            "<x:ResourceCreated><a:Address>http://schemas.xmlsoap.org/ws/2004/08/addressing/"
            "role/anonymous</a:Address><a:ReferenceParameters>"
            f"<w:ResourceURI>{CMD_RESOURCE}</w:ResourceURI><w:SelectorSet>"
            f'<w:Selector Name="ShellId">{shell.id}</w:Selector></w:SelectorSet>'
            "</a:ReferenceParameters></x:ResourceCreated>"
            f"<rsp:Shell><rsp:ShellId>{shell.id}</rsp:ShellId>"
            f"<rsp:ResourceUri>{CMD_RESOURCE}</rsp:ResourceUri>"
            f"<rsp:Owner>{escape(self.user)}</rsp:Owner>"
            "<rsp:InputStreams>stdin</rsp:InputStreams>"
            "<rsp:OutputStreams>stdout stderr</rsp:OutputStreams></rsp:Shell>")

    def command(self, shell: Shell, header: ET.Element, body: ET.Element) -> str:
        command = body.find("rsp:CommandLine/rsp:Command", NS)
        if command is None:
            raise WsmanFault("w:InvalidMessageInformationHeader", "no rsp:Command in the body",
                             FAULT_INVALID)
        arguments = [a.text or "" for a in body.findall("rsp:CommandLine/rsp:Arguments", NS)]
        line = " ".join([(command.text or "").strip(), *arguments]).strip()
        skip_cmd = any(
            (o.text or "").strip().upper() == "TRUE"
            for o in header.findall("w:OptionSet/w:Option[@Name='WINRS_SKIP_CMD_SHELL']", NS))
        command_id = str(uuid.uuid4()).upper()
        self.guest.record("commands.jsonl", {
            "seq": next(self.sequence), "shell_id": shell.id, "command_id": command_id,
            "command_line": line, "powershell": decoded_powershell(line)})
        execution = Execution(asyncio.get_running_loop())
        shell.commands[command_id] = execution
        limit = PROCESS_LINE_LIMIT if skip_cmd else CMD_LINE_LIMIT
        execution.start(lambda console: self.run_line(line, console, limit))
        return (f"<rsp:CommandResponse><rsp:CommandId>{command_id}</rsp:CommandId>"
                f"</rsp:CommandResponse>")

    def run_line(self, line: str, console: Console, limit: int) -> int:
        try:
            return self.guest.run_command_line(line, console, limit)
        except Refused as e:
            console.err(crlf(f"{e}\n"))
            return 1

    async def receive(self, shell: Shell, header: ET.Element, body: ET.Element) -> str:
        stream = body.find("rsp:Receive/rsp:DesiredStream", NS)
        command_id = stream.get("CommandId", "") if stream is not None else ""
        execution = shell.commands.get(command_id)
        if execution is None:
            raise WsmanFault("w:InvalidSelectors", f"no command {command_id!r} in shell "
                             f"{shell.id}", FAULT_SHELL_NOT_FOUND)
        wait = max(0.5, parse_duration(header.findtext("w:OperationTimeout", "PT20S", NS)) - 1)
        try:
            await asyncio.wait_for(execution.finished.wait(), timeout=min(wait, 10.0))
        except TimeoutError:
            pass
        out, err, done = execution.take()
        parts = []
        for name, data in (("stdout", out), ("stderr", err)):
            if data:
                parts.append(f'<rsp:Stream Name="{name}" CommandId="{command_id}">'
                             f"{base64.b64encode(data).decode()}</rsp:Stream>")
        if done:
            parts += [f'<rsp:Stream Name="{n}" CommandId="{command_id}" End="true"></rsp:Stream>'
                      for n in ("stdout", "stderr")]
            parts.append(f'<rsp:CommandState CommandId="{command_id}" State="{STATE_DONE}">'
                         f"<rsp:ExitCode>{execution.exit_code}</rsp:ExitCode></rsp:CommandState>")
        else:
            parts.append(f'<rsp:CommandState CommandId="{command_id}" '
                         f'State="{STATE_RUNNING}"/>')
        return f"<rsp:ReceiveResponse>{''.join(parts)}</rsp:ReceiveResponse>"

    def signal(self, shell: Shell, body: ET.Element) -> str:
        sig = body.find("rsp:Signal", NS)
        command_id = sig.get("CommandId", "") if sig is not None else ""
        execution = shell.commands.pop(command_id, None)
        if execution is None:
            raise WsmanFault("w:InvalidSelectors", f"no command {command_id!r} in shell "
                             f"{shell.id}", FAULT_SHELL_NOT_FOUND)
        execution.terminate()
        return "<rsp:SignalResponse/>"

    def terminate_all(self) -> None:
        for shell in self.shells.values():
            for execution in shell.commands.values():
                execution.terminate()

    def answer(self, action: str, relates_to: str, body: str, status: int = 200) -> web.Response:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<s:Envelope xml:lang="en-US" xmlns:s="{NS_SOAP}" xmlns:a="{NS_ADDRESSING}" '
            f'xmlns:x="{NS_TRANSFER}" xmlns:w="{NS_WSMAN}" xmlns:rsp="{NS_SHELL}">'
            f"<s:Header><a:Action>{escape(action)}</a:Action>"
            f"<a:MessageID>uuid:{str(uuid.uuid4()).upper()}</a:MessageID>"
            f"<a:To>{ANONYMOUS}</a:To><a:RelatesTo>{escape(relates_to)}</a:RelatesTo>"
            f"</s:Header><s:Body>{body}</s:Body></s:Envelope>")
        return web.Response(status=status, body=xml.encode("utf-8"),
                            content_type="application/soap+xml", charset="UTF-8")

    def fault(self, relates_to: str, fault: WsmanFault) -> web.Response:
        log.info("fault: %s", fault.reason)
        reason = escape(fault.reason)
        body = (
            "<s:Fault><s:Code><s:Value>s:Sender</s:Value><s:Subcode>"
            f"<s:Value>{fault.subcode}</s:Value></s:Subcode></s:Code>"
            f'<s:Reason><s:Text xml:lang="en-US">{reason}</s:Text></s:Reason>'
            f'<s:Detail><f:WSManFault xmlns:f="{NS_FAULT}" Code="{fault.code}" '
            f'Machine="{escape(self.guest.hostname)}"><f:Message>{reason}</f:Message>'
            "</f:WSManFault></s:Detail></s:Fault>")
        return self.answer("http://schemas.dmtf.org/wbem/wsman/1/wsman/fault", relates_to, body,
                           fault.status)


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"\s*PT(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?\s*", text)
    if not match:
        return 20.0
    return float(match[1] or 0) * 60 + float(match[2] or 0)


# --------------------------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------------------------


def make_app(endpoint: Endpoint) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/wsman", endpoint.handle)
    return app


async def serve(args: argparse.Namespace) -> None:
    password = Path(args.password_file).read_text(encoding="utf-8").strip()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    guest = WindowsGuest(root, args.hostname, args.user,
                         Path(args.identity_file) if args.identity_file else None)
    guest.prepare()
    endpoint = Endpoint(guest, args.user, password)
    runner = web.AppRunner(make_app(endpoint), handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, args.host, args.port, reuse_address=True)
        await site.start()
        log.info("WS-Man endpoint for %s on http://%s:%d/wsman, C: is %s",
                 args.hostname, args.host, args.port, root)
        await stop.wait()
    finally:
        endpoint.terminate_all()
        await runner.cleanup()
        log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vbrd.lab.winrm",
                                     description="The lab's Windows guest: a WinRM endpoint.")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", required=True, help="the directory standing for C:\\")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--hostname", default="VBRD-WIN")
    parser.add_argument("--identity-file", default="",
                        help="a file holding the machine's SMBIOS UUID (read on every query)")
    args = parser.parse_args(argv)
    logging.basicConfig(filename=args.log, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
