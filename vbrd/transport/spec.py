"""What the Manager hands a pair of data movers, and what they hand back.

These are values that cross a process boundary (and later a host boundary, through the agent),
so each has a JSON form. JSON rather than pickle: a mover must never execute what it is sent.
Secrets (the vCenter password in :class:`ProxyContext`) travel on the mover's stdin, never on
its command line.
"""
from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vbrd.models import DatastoreFile, DiskTask, Extent, ProxyContext, Secret, VmRef

STAGES = ("source", "proxy", "network", "target")

MAX_AREAS = 1 << 20
"""The most areas one task carries: 16 MiB in their binary form, well inside
:data:`MAX_TASK_BYTES`. A longer CBT answer is brought under it by :func:`bounded_areas`."""

MAX_TASK_BYTES = 64 << 20
"""The largest task a data mover accepts on its stdin (see :func:`encode_task`)."""

TASK_HEADER = struct.Struct(">I")
_AREA = struct.Struct(">QQ")


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Files for TLS between the two movers when they run on different hosts.

    The repository side presents ``certfile``/``keyfile``; the proxy side verifies it against
    ``cafile``. Loopback transfers on one host leave :attr:`TransferRules.tls` unset.
    """

    certfile: str = ""
    keyfile: str = ""
    cafile: str = ""


@dataclass(frozen=True, slots=True)
class TransferRules:
    """The Manager's rules for one transfer: the repository's block format and the limits."""

    block_size: int
    compression_level: int
    bandwidth_limit: float | None = None  # bytes per second on the wire; None = unlimited
    tls: TlsSettings | None = None


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """What the proxy's data mover reads.

    ``modes`` in order of preference (``["san", "hotadd", "nbd"]`` for auto, one name when a
    job pins its mode). ``areas`` are the byte ranges to read (CBT's changed areas); ``None``
    reads the whole disk except what the reader's ``extents()`` leaves out as unallocated.
    ``plugin_modules`` are import paths (``pkg.mod`` or ``pkg.mod:object``) of plugins to
    register on top of the installed ones; ``plugin_dirs`` are drop-in folders;
    ``plugin_names``, when given, are the only installed or drop-in plugins to load (those of
    the modes in ``modes``).
    """

    task: DiskTask
    modes: list[str]
    proxy: ProxyContext
    areas: list[Extent] | None = None
    plugin_modules: list[str] = field(default_factory=list)
    plugin_dirs: list[str] = field(default_factory=list)
    disabled_plugins: list[str] = field(default_factory=list)
    load_entrypoints: bool = True
    plugin_names: list[str] | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot of one transfer, sent a few times per second.

    ``stage_load`` is the share of the elapsed time each stage was busy (source: waiting for the
    transport mode's reads; proxy: hashing and compressing; network: sending, including the
    bandwidth limit; target: the repository's lookups and writes); ``bottleneck`` names the
    busiest.
    """

    bytes_read: int
    bytes_sent: int
    bytes_done_of_total: int
    total_bytes: int
    rate_bps: float
    bottleneck: str
    stage_load: dict[str, float] = field(default_factory=dict)
    mode: str = ""


@dataclass(frozen=True, slots=True)
class TransferResult:
    """What one disk's transfer did.

    ``index_path`` is the block map the repository's mover wrote (see
    :mod:`vbrd.transport.blockmap`); its blocks are durable when this result exists. ``mode``
    is the transport mode used, or the list of modes in order when one failed mid-disk and the
    next took over. ``fallbacks`` are the modes passed over (``probe`` said no, ``open``
    failed) or abandoned mid-disk, in order, each with its reason. ``duration`` is the wall
    time from starting the movers to both having finished.
    """

    index_path: str
    blocks_total: int
    blocks_sent: int
    blocks_deduplicated: int
    zero_blocks: int
    bytes_read: int
    bytes_sent: int
    bytes_stored: int
    mode: str | list[str]
    duration: float
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    bottleneck: str = ""
    stage_load: dict[str, float] = field(default_factory=dict)
    peak_rss: int = 0  # bytes, the larger of the two movers' peak resident memory
    blocks_durable: bool = False  # the repository side fsynced every block the map names
    transfer_seconds: float = 0.0  # from the first read to the repository's last word

    @property
    def processing_rate(self) -> float:
        """Bytes read per second while data moved (start-up and opening the mode excluded)."""
        return self.bytes_read / self.transfer_seconds if self.transfer_seconds > 0 else 0.0

    @property
    def modes_used(self) -> list[str]:
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)


# --------------------------------------------------------------------------------------------
# JSON forms


def task_to_json(task: DiskTask) -> dict[str, Any]:
    vm = asdict(task.vm)
    vm["ip_addresses"] = list(task.vm.ip_addresses)
    return {
        "session_id": task.session_id,
        "vm": vm,
        "disk_key": task.disk_key,
        "label": task.label,
        "capacity": task.capacity,
        "backing": str(task.backing),
        "snapshot_moref": task.snapshot_moref,
        "change_id": task.change_id,
        "disk_uuid": task.disk_uuid,
        "datacenter": task.datacenter,
        "extra": task.extra,
    }


def task_from_json(obj: dict[str, Any]) -> DiskTask:
    vm = dict(obj["vm"])
    vm["ip_addresses"] = tuple(vm.get("ip_addresses", ()))
    return DiskTask(
        session_id=obj["session_id"],
        vm=VmRef(**vm),
        disk_key=int(obj["disk_key"]),
        label=obj["label"],
        capacity=int(obj["capacity"]),
        backing=DatastoreFile.parse(obj["backing"]),
        snapshot_moref=obj.get("snapshot_moref", ""),
        change_id=obj.get("change_id"),
        disk_uuid=obj.get("disk_uuid", ""),
        datacenter=obj.get("datacenter", ""),
        extra=dict(obj.get("extra", {})),
    )


def proxy_to_json(ctx: ProxyContext) -> dict[str, Any]:
    return {
        "proxy": ctx.proxy,
        "san_paths": dict(ctx.san_paths),
        "proxy_vm": ctx.proxy_vm,
        "vcenter_url": ctx.vcenter_url,
        "vcenter_user": ctx.vcenter_user,
        "vcenter_password": ctx.vcenter_password.reveal(),
        "verify_tls": ctx.verify_tls,
        "datacenter": ctx.datacenter,
        "attached_disks": {str(k): v for k, v in ctx.attached_disks.items()},
        "hotadd_refusals": {str(k): v for k, v in ctx.hotadd_refusals.items()},
        "device_root": ctx.device_root,
    }


def proxy_from_json(obj: dict[str, Any]) -> ProxyContext:
    return ProxyContext(
        proxy=obj["proxy"],
        san_paths=dict(obj.get("san_paths", {})),
        proxy_vm=obj.get("proxy_vm", ""),
        vcenter_url=obj.get("vcenter_url", ""),
        vcenter_user=obj.get("vcenter_user", ""),
        vcenter_password=Secret(obj.get("vcenter_password", "")),
        verify_tls=bool(obj.get("verify_tls", True)),
        datacenter=obj.get("datacenter", "DC0"),
        attached_disks={int(k): v for k, v in obj.get("attached_disks", {}).items()},
        hotadd_refusals={int(k): v for k, v in obj.get("hotadd_refusals", {}).items()},
        device_root=obj.get("device_root", ""),
    )


def source_to_json(spec: SourceSpec) -> dict[str, Any]:
    return {
        "task": task_to_json(spec.task),
        "modes": list(spec.modes),
        "proxy": proxy_to_json(spec.proxy),
        "areas": None if spec.areas is None else encode_areas(spec.areas),
        "plugin_modules": list(spec.plugin_modules),
        "plugin_dirs": list(spec.plugin_dirs),
        "disabled_plugins": list(spec.disabled_plugins),
        "load_entrypoints": spec.load_entrypoints,
        "plugin_names": None if spec.plugin_names is None else list(spec.plugin_names),
    }


def source_from_json(obj: dict[str, Any]) -> SourceSpec:
    areas = obj.get("areas")
    return SourceSpec(
        task=task_from_json(obj["task"]),
        modes=list(obj["modes"]),
        proxy=proxy_from_json(obj["proxy"]),
        areas=None if areas is None else decode_areas(areas),
        plugin_modules=list(obj.get("plugin_modules", [])),
        plugin_dirs=list(obj.get("plugin_dirs", [])),
        disabled_plugins=list(obj.get("disabled_plugins", [])),
        load_entrypoints=bool(obj.get("load_entrypoints", True)),
        plugin_names=None if obj.get("plugin_names") is None else list(obj["plugin_names"]),
    )


def encode_areas(areas: Sequence[Extent]) -> str:
    """Areas in their compact form: base64 of (offset u64, length u64) big-endian pairs.

    A CBT answer can list hundreds of thousands of areas: in this form each costs a fixed
    ~21 bytes, so the bound on their number is checked from the text's length before
    anything is decoded, and decoding is one pass of ``struct``.
    """
    if len(areas) > MAX_AREAS:
        raise ValueError(f"{len(areas)} areas are more than the {MAX_AREAS} a task carries")
    packed = bytearray(_AREA.size * len(areas))
    for i, a in enumerate(areas):
        _AREA.pack_into(packed, i * _AREA.size, a.offset, a.length)
    return base64.b64encode(packed).decode("ascii")


def decode_areas(text: object) -> list[Extent]:
    """The areas :func:`encode_areas` made; ValueError for anything else or too many."""
    if not isinstance(text, str):
        raise ValueError("a task's areas must be a base64 string")
    if len(text) > (MAX_AREAS * _AREA.size + 2) // 3 * 4:
        raise ValueError(f"a task carries at most {MAX_AREAS} areas")
    try:
        packed = base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(f"a task's areas are not valid base64: {e}") from None
    if len(packed) % _AREA.size:
        raise ValueError(f"a task's areas hold {len(packed)} bytes, not a whole number of "
                         f"{_AREA.size}-byte entries")
    return [Extent(offset, length) for offset, length in _AREA.iter_unpack(packed)]


def bounded_areas(areas: Sequence[Extent], limit: int = MAX_AREAS) -> list[Extent]:
    """``areas`` sorted and merged; if more than ``limit`` remain, the neighbours with the
    smallest gaps between them are joined (the gap is read too) until ``limit`` remain.

    Reading a few unchanged bytes more is harmless: they come from the same snapshot, so
    the blocks rebuilt from them are the same.
    """
    if limit < 1:
        raise ValueError(f"an area limit must be positive, not {limit}")
    merged: list[Extent] = []
    for a in sorted(areas, key=lambda a: a.offset):
        if a.length <= 0:
            continue
        if merged and a.offset <= merged[-1].end:
            last = merged[-1]
            if a.end > last.end:
                merged[-1] = Extent(last.offset, a.end - last.offset)
        else:
            merged.append(a)
    excess = len(merged) - limit
    if excess <= 0:
        return merged
    by_gap = sorted(range(len(merged) - 1), key=lambda i: merged[i + 1].offset - merged[i].end)
    joined = set(by_gap[:excess])  # i: area i + 1 joins area i
    out: list[Extent] = []
    for i, a in enumerate(merged):
        if i - 1 in joined:
            out[-1] = Extent(out[-1].offset, a.end - out[-1].offset)
        else:
            out.append(a)
    return out


def encode_task(config: dict[str, Any]) -> bytes:
    """A data mover's task as it goes to its stdin: a u32 big-endian length, then JSON.

    Length-prefixed rather than a line, so the reader needs no line-length limit (a task
    holds every area of a disk to read) and can refuse an oversized one before reading it.
    """
    body = json.dumps(config, separators=(",", ":")).encode()
    if len(body) > MAX_TASK_BYTES:
        raise ValueError(f"a data mover task of {len(body)} bytes is more than the "
                         f"{MAX_TASK_BYTES} allowed")
    return TASK_HEADER.pack(len(body)) + body


def rules_to_json(rules: TransferRules) -> dict[str, Any]:
    return {
        "block_size": rules.block_size,
        "compression_level": rules.compression_level,
        "bandwidth_limit": rules.bandwidth_limit,
        "tls": None if rules.tls is None else asdict(rules.tls),
    }


def rules_from_json(obj: dict[str, Any]) -> TransferRules:
    tls = obj.get("tls")
    limit = obj.get("bandwidth_limit")
    return TransferRules(
        block_size=int(obj["block_size"]),
        compression_level=int(obj["compression_level"]),
        bandwidth_limit=None if limit is None else float(limit),
        tls=None if tls is None else TlsSettings(**tls),
    )


def result_to_json(result: TransferResult) -> dict[str, Any]:
    obj = asdict(result)
    obj["fallbacks"] = [list(f) for f in result.fallbacks]
    return obj


def result_from_json(obj: dict[str, Any]) -> TransferResult:
    obj = dict(obj)
    obj["fallbacks"] = [tuple(f) for f in obj.get("fallbacks", [])]
    return TransferResult(**obj)


def progress_to_json(p: Progress) -> dict[str, Any]:
    return asdict(p)


def progress_from_json(obj: dict[str, Any]) -> Progress:
    return Progress(**obj)
