"""A lab whose VM disk is a given raw image, and a guest's writes replayed from another image.

This is how the benchmark backs up exactly the bytes it hands to restic and borg: the disk
must hold the image bit for bit, and a change copied in with ``write_extents`` must reach
the disk and its change log, so CBT reports it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vbrd.lab import lab
from vbrd.models import Extent

MiB = 1 << 20


@pytest.fixture(scope="module")
def image_lab() -> Iterator[tuple[Path, Path, dict]]:
    work = Path(tempfile.mkdtemp(prefix="vbrd-lab-images-"))
    work.chmod(0o755)
    image = work / "disk.img"
    rnd = random.Random(4)
    with open(image, "wb") as f:
        f.truncate(24 * MiB)
        for offset in range(0, 24 * MiB, 3 * MiB):  # data and holes
            f.seek(offset)
            f.write(rnd.randbytes(MiB))
    lab_dir = work / "lab"
    try:
        info = json.loads(lab.up(lab_dir, disk_scale=0.0625, guests=False,
                                 disk_images={"linux-vm": image}).read_text())
    except Exception as e:  # noqa: BLE001 - the lab's own tests report why it cannot start
        shutil.rmtree(work, ignore_errors=True)
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip(f"the lab cannot start: {e}")
    try:
        yield work, image, info
    finally:
        lab.down(lab_dir)
        shutil.rmtree(work, ignore_errors=True)


def test_the_vm_disk_holds_the_image_bit_for_bit(image_lab: tuple[Path, Path, dict]) -> None:
    _, image, info = image_lab
    vm = next(v for v in info["vms"] if v["name"] == "linux-vm")
    disk = vm["disks"][0]
    assert disk["capacity"] == image.stat().st_size
    assert disk["format"] == "flat"
    assert Path(disk["extents"][0]).read_bytes() == image.read_bytes()


def test_replayed_writes_reach_the_disk_and_its_change_log(
    image_lab: tuple[Path, Path, dict]
) -> None:
    work, image, info = image_lab
    changed = work / "changed.img"
    shutil.copyfile(image, changed)
    extents = [Extent(4096, 8192), Extent(5 * MiB, MiB), Extent(23 * MiB, 4096)]
    with open(changed, "r+b") as f:
        for e in extents:
            os.pwrite(f.fileno(), random.Random(e.offset).randbytes(e.length), e.offset)

    lab.write_extents(Path(info["dir"]), "linux-vm", 2000, extents, changed)

    disk = next(v for v in info["vms"] if v["name"] == "linux-vm")["disks"][0]
    assert Path(disk["extents"][0]).read_bytes() == changed.read_bytes()
    log = Path(disk["cbt_state"]).with_suffix(".jsonl").read_text().splitlines()
    assert json.loads(log[-1])["extents"] == [[e.offset, e.length] for e in extents]


def test_an_extent_outside_the_disk_is_refused_by_name(
    image_lab: tuple[Path, Path, dict]
) -> None:
    _, image, info = image_lab
    with pytest.raises(lab.LabError, match="outside disk 2000 of linux-vm"):
        lab.write_extents(Path(info["dir"]), "linux-vm", 2000, [Extent(24 * MiB, 4096)], image)
