#!/usr/bin/env python3
"""How fast each transport mode reads a snapshot's disk, against ``cat FILE > /dev/null``.

One lab, one run: ``linux-vm``'s disk (flat, ``--size-mib``) is snapshotted, and each mode
reads the snapshot's disk whole through its plugin's reader, in the data mover's 8 MiB reads
(``san`` from the datastore directory; ``hotadd`` with the disk attached to the lab's proxy
VM through vCenter and found in the proxy's device tree; ``nbd`` over vCenter's datastore
HTTP access). ``cat`` reads the disk's flat extent. As root, ``hotadd-blockdev`` reads a
read-only loop device of that extent with hotadd's raw block-device reader: the lab's proxy
device is a descriptor read through the chain reader, a real proxy's is a block device. The
page cache is warmed first, the order alternates between rounds, and the best round counts.
Every reader's bytes are checked against the extent's (SHA-256, outside the timed reads).

    python3 bench/transport_read.py --size-mib 1024 --rounds 3

The lab reads its disks from local files, so this measures what each mode costs on top of
the disk (its reader, its protocol, its process); not a SAN, a hypervisor or a network.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from plugins.transport_hotadd.mode import BlockDeviceReader  # noqa: E402
from vbrd.config import JobSettings, load_config  # noqa: E402
from vbrd.lab import lab as lab_module  # noqa: E402
from vbrd.models import AttachedDisk, DiskTask, ProxyContext  # noqa: E402
from vbrd.plugins import make_plugin_manager, transport_modes  # noqa: E402
from vbrd.vsphere import VSphere  # noqa: E402

VM = "linux-vm"
LAB_DISK_MIB = 256  # linux-vm's disk at disk_scale 1
CHUNK = 8 << 20
MODES = ("san", "hotadd", "nbd")
MB = 1e6


def cat_seconds(path: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["sh", "-c", f'cat "{path}" > /dev/null'], check=True)
    return time.perf_counter() - started


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


async def read_seconds(mode: Any, task: DiskTask, context: ProxyContext) -> tuple[float, str]:
    """Seconds spent in the reader's reads of the whole disk, and the bytes' SHA-256."""
    return await timed_read(await mode.open(task, context))


async def blockdev_seconds(device: str) -> tuple[float, str]:
    return await timed_read(BlockDeviceReader(device))


async def timed_read(reader: Any) -> tuple[float, str]:
    """Read the whole disk in CHUNK reads and close the reader: seconds inside the reads,
    and the bytes' SHA-256."""
    digest = hashlib.sha256()
    spent = 0.0
    try:
        for offset in range(0, reader.size, CHUNK):
            started = time.perf_counter()
            data = await reader.read(offset, min(CHUNK, reader.size - offset))
            spent += time.perf_counter() - started
            digest.update(data)
    finally:
        await reader.close()
    return spent, digest.hexdigest()


def loop_device(path: Path) -> str | None:
    """A read-only loop device of ``path``, or ``None`` where none can be made."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        return None
    done = subprocess.run(["losetup", "--read-only", "--find", "--show", str(path)],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


async def one_round(lab: dict[str, Any], rnd: int, extent: Path, expected: str,
                    results: dict[str, list[float]], blockdev: str | None) -> None:
    config = load_config(lab["vbrd_config"])
    vsphere = VSphere(config.vcenters["lab"])
    modes = transport_modes(make_plugin_manager())
    vc = lab["vcenter"]
    base = ProxyContext(
        proxy="local", san_paths={d["name"]: d["dir"] for d in lab["datastores"]},
        proxy_vm=lab_module.PROXY_VM, vcenter_url=vc["url"], vcenter_user=vc["user"],
        vcenter_password=config.vcenters["lab"].password, verify_tls=False,
        datacenter=vc["datacenter"], device_root=lab["proxy_root"])
    try:
        (vm,), _ = await vsphere.select_vms(JobSettings("bench", "lab", "default", vms=(VM,)))
        snapshot = await vsphere.create_snapshot(vm, f"bench-{rnd}", "transport read bench",
                                                 quiesce=False)
        try:
            (disk,) = await vsphere.snapshot_disks(snapshot)
            proxy = await vsphere.proxy_vm(lab_module.PROXY_VM)
            (device,) = await vsphere.attach_disks(proxy, [(disk.backing, disk.capacity)])
            try:
                address = AttachedDisk(device.bus, device.unit, device.uuid)
                context = replace(base, attached_disks={disk.key: str(address)})
                task = DiskTask(session_id="bench", vm=vm.ref, disk_key=disk.key,
                                label=disk.label, capacity=disk.capacity, backing=disk.backing,
                                disk_uuid=disk.uuid, datacenter=vc["datacenter"])
                order = ["cat", *MODES] + (["hotadd-blockdev"] if blockdev else [])
                for name in order if rnd % 2 == 0 else reversed(order):
                    if name == "cat":
                        seconds, sha = cat_seconds(extent), expected
                    elif name == "hotadd-blockdev":
                        assert blockdev is not None
                        await blockdev_seconds(blockdev)  # its own page cache, warmed too
                        seconds, sha = await blockdev_seconds(blockdev)
                    else:
                        seconds, sha = await read_seconds(modes[name], task, context)
                    if sha != expected:
                        raise SystemExit(f"{name} read other bytes than the disk holds")
                    results.setdefault(name, []).append(seconds)
                    print(f"  round {rnd + 1}: {name:7} {disk.capacity / seconds / MB:8.0f} MB/s",
                          file=sys.stderr)
            finally:
                await vsphere.detach_disks(proxy, [device.key])
        finally:
            await vsphere.remove_snapshot(snapshot, f"VM {VM}")
    finally:
        await vsphere.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="the disk's size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vbrd-bench-lab-") as tmp:
        lab_dir = Path(tmp) / "lab"
        lab_json = lab_module.up(lab_dir, disk_scale=args.size_mib / LAB_DISK_MIB,
                                 guests=False)
        try:
            lab = json.loads(lab_json.read_text())
            entry = next(v for v in lab["vms"] if v["name"] == VM)
            extent = Path(entry["disks"][0]["extents"][0])
            size = entry["disks"][0]["capacity"]
            expected = file_sha256(extent)  # also warms the page cache
            blockdev = loop_device(extent)
            try:
                for rnd in range(args.rounds):
                    asyncio.run(one_round(lab, rnd, extent, expected, results, blockdev))
            finally:
                if blockdev:
                    subprocess.run(["losetup", "--detach", blockdev], check=True)
        finally:
            lab_module.down(lab_dir)
    best = {name: min(times) for name, times in results.items()}
    rows = [{"reader": name, "MB_per_s": round(size / best[name] / MB, 1),
             "ratio_to_cat": round(best["cat"] / best[name], 3)} for name in best]
    if args.json:
        print(json.dumps({"disk_bytes": size, "rounds": args.rounds, "rows": rows}, indent=2))
        return 0
    print(f"read of a {size >> 20} MiB snapshot disk, best of {args.rounds} round(s)\n")
    print("| reader | MB/s | ratio to cat |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['reader']} | {row['MB_per_s']:.0f} | {row['ratio_to_cat']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
