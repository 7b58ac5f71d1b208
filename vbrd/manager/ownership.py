"""The marks vbrd leaves on what it makes in vCenter, and how it reads them back.

What vbrd makes in vCenter outlives a daemon that is killed, and vCenter is shared: with the
administrators, with other backup products, with a second vbrd installation (a DR server, a
test install). So everything vbrd makes carries who made it — this installation's id
(:mod:`vbrd.installation`) and the session — and vbrd removes only what carries its own mark,
exactly. docs/snapshots.md describes the formats for administrators.

- A **snapshot** is named ``vbrd-<session>`` (a backup) or ``vbrd-cbt-<session>`` (the
  create/remove cycle that makes changed block tracking take effect) and described
  ``vbrd backup snapshot; installation=<id>; session=<session>; job=<job>`` (``vbrd CBT
  activation snapshot; …`` for the latter).
- A **hot-added disk** is tagged in the proxy VM's configuration (``extraConfig``) under
  ``vbrd.hotadd.scsi<bus>:<unit>`` with ``installation=<id>; session=<session>;
  file=<datastore path>``, set in the reconfigure that attaches it and cleared in the one
  that detaches it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from vbrd.vsphere import SNAPSHOT_PREFIX

Purpose = Literal["backup", "cbt"]

_PURPOSES: dict[str, Purpose] = {"backup": "backup", "CBT activation": "cbt"}
_WORDS = {purpose: words for words, purpose in _PURPOSES.items()}
_NAME_PREFIX = {"backup": SNAPSHOT_PREFIX, "cbt": f"{SNAPSHOT_PREFIX}cbt-"}
_INSTALLATION = r"(?P<installation>[0-9a-f]{32})"
_SESSION = r"(?P<session>[A-Za-z0-9_.-]+)"
_SNAPSHOT = re.compile(
    rf"vbrd (?P<words>backup|CBT activation) snapshot; installation={_INSTALLATION}; "
    rf"session={_SESSION}; job=(?P<job>.*)", re.DOTALL)
_DISK = re.compile(rf"installation={_INSTALLATION}; session={_SESSION}; "
                   rf"file=(?P<file>\[[^\]]+\] .+)", re.DOTALL)


@dataclass(frozen=True)
class SnapshotMark:
    """Who made a snapshot, and why."""

    purpose: Purpose
    installation: str
    session: str
    job: str

    @property
    def name(self) -> str:
        return f"{_NAME_PREFIX[self.purpose]}{self.session}"

    @property
    def description(self) -> str:
        return (f"vbrd {_WORDS[self.purpose]} snapshot; installation={self.installation}; "
                f"session={self.session}; job={self.job}")


def read_snapshot_mark(name: str, description: str) -> SnapshotMark | None:
    """The mark of a snapshot vbrd made, or ``None`` when name and description are not,
    exactly and together, a vbrd mark (an administrator's ``vbrd-before-upgrade`` is not)."""
    m = _SNAPSHOT.fullmatch(description)
    if m is None:
        return None
    mark = SnapshotMark(_PURPOSES[m["words"]], m["installation"], m["session"], m["job"])
    return mark if mark.name == name else None


@dataclass(frozen=True)
class DiskMark:
    """Who hot-added a disk to a proxy VM: the tag's value."""

    installation: str
    session: str
    file: str

    @property
    def tag(self) -> str:
        return f"installation={self.installation}; session={self.session}; file={self.file}"


def read_disk_mark(tag: str) -> DiskMark | None:
    m = _DISK.fullmatch(tag)
    return None if m is None else DiskMark(m["installation"], m["session"], m["file"])


__all__ = ["DiskMark", "SnapshotMark", "read_disk_mark", "read_snapshot_mark"]
