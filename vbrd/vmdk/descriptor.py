"""VMDK descriptors: the text that says what a disk is made of and who its parent is.

A descriptor is either a small text file (``disk1.vmdk`` beside ``disk1-flat.vmdk``, or a
snapshot's ``disk1-000001.vmdk`` beside ``disk1-000001-delta.vmdk``) or a text area embedded
in a hosted sparse file (``KDMV``, as VMware Workstation and ``qemu-img`` make them). Either
way it names the extents in order and, for a child disk, the parent by ``parentFileNameHint``
and ``parentCID``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from vbrd.errors import TransportError

SECTOR = 512

#: parentCID of a disk without a parent.
NO_PARENT = 0xFFFFFFFF

#: Extent kinds this package reads. ``VMFSRDM``/``VMFSRAW`` (raw device mappings) and
#: ``VMFSRDM``-style device extents are left to modes that see the LUN itself.
FLAT_KINDS = frozenset({"FLAT", "VMFS"})
SPARSE_KINDS = frozenset({"SPARSE", "VMFSSPARSE", "SESPARSE"})
KNOWN_KINDS = FLAT_KINDS | SPARSE_KINDS | {"ZERO", "VMFSRDM", "VMFSRAW"}

_EXTENT_LINE = re.compile(
    r"""^(?P<access>RW|RDONLY|NOACCESS)\s+
        (?P<sectors>\d+)\s+
        (?P<kind>[A-Z]+)
        (?:\s+"(?P<file>[^"]*)"
           (?:\s+(?P<start>\d+))?
        )?
        (?:\s+.*)?$""",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class ExtentLine:
    """One ``RW <sectors> <KIND> "<file>" [<start sector>]`` line."""

    access: str
    sectors: int
    kind: str
    filename: str | None
    start_sector: int = 0

    @property
    def length(self) -> int:
        return self.sectors * SECTOR


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A parsed descriptor. ``cid``/``parent_cid`` are the content ids vSphere uses to tell
    whether a parent changed after its child was made."""

    create_type: str
    extents: tuple[ExtentLine, ...]
    cid: int | None = None
    parent_cid: int | None = None
    parent_hint: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    ddb: dict[str, str] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return sum(extent.length for extent in self.extents)

    @property
    def has_parent(self) -> bool:
        return self.parent_cid not in (None, NO_PARENT) and bool(self.parent_hint)

    @classmethod
    def parse(cls, text: str, name: str) -> Descriptor:
        """Parse descriptor ``text`` read from the file called ``name`` (for messages)."""
        attributes: dict[str, str] = {}
        ddb: dict[str, str] = {}
        extents: list[ExtentLine] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip().strip("\x00")
            if not line or line.startswith("#"):
                continue
            if line.startswith(("RW ", "RDONLY ", "NOACCESS ")):
                extents.append(_parse_extent(line, name, number))
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise TransportError(
                    f"{name}: line {number} of the VMDK descriptor is neither an extent nor "
                    f"key=value: {line[:80]!r}"
                )
            key, value = key.strip(), value.strip().strip('"')
            (ddb if key.startswith("ddb.") else attributes)[key] = value
        if "createType" not in attributes:
            raise TransportError(f"{name}: not a VMDK descriptor (no createType)")
        if not extents:
            raise TransportError(f"{name}: the VMDK descriptor lists no extents")
        return cls(
            create_type=attributes["createType"],
            extents=tuple(extents),
            cid=_content_id(attributes.get("CID"), "CID", name),
            parent_cid=_content_id(attributes.get("parentCID"), "parentCID", name),
            parent_hint=attributes.get("parentFileNameHint") or None,
            attributes=attributes,
            ddb=ddb,
        )


def looks_like_descriptor(head: bytes) -> bool:
    """Whether the first bytes of a file are a text descriptor (and not a flat extent that
    happens to start with text)."""
    start = head[:1024].lstrip()
    return start.startswith(b"# Disk DescriptorFile") or b"createType" in start


def decode(data: bytes) -> str:
    """Descriptors are UTF-8 on current ESXi and Workstation; older ones may be Latin-1."""
    data = data.split(b"\x00", 1)[0]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _parse_extent(line: str, name: str, number: int) -> ExtentLine:
    match = _EXTENT_LINE.match(line)
    if not match:
        raise TransportError(f"{name}: line {number}: cannot read the extent line {line!r}")
    kind = match["kind"]
    if kind not in KNOWN_KINDS:
        raise TransportError(f"{name}: line {number}: unknown extent type {kind}")
    if kind != "ZERO" and not match["file"]:
        raise TransportError(f"{name}: line {number}: a {kind} extent needs a file name")
    return ExtentLine(
        access=match["access"],
        sectors=int(match["sectors"]),
        kind=kind,
        filename=match["file"],
        start_sector=int(match["start"] or 0),
    )


def _content_id(value: str | None, key: str, name: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 16)
    except ValueError:
        raise TransportError(f"{name}: {key}={value!r} is not a hexadecimal content id") from None
