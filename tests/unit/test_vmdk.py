"""The VMDK chain reader reads what qemu reads, from every format a snapshot chain uses.

qemu-img/qemu-io make the disks (flat, hosted sparse, deltas) and are the reference: a chain
read through vbrd.vmdk must hash equal to ``qemu-img convert -O raw`` of the same chain.
ESXi's own delta formats (vmfsSparse ``COWD``, SESparse) cannot be made by qemu, so the test
writes them from their layout below, and qemu (which reads both) stays the reference.
"""
from __future__ import annotations

import hashlib
import random
import re
import struct
import threading
from bisect import bisect_right
from pathlib import Path

import pytest

from tests.vmdk_support import (
    convert,
    create_child,
    make_raw,
    read_slice,
    run,
    sha256_file,
    to_raw,
    write,
)
from vbrd.errors import TransportError
from vbrd.models import Extent
from vbrd.vmdk import Descriptor, LocalFileSpace, VmdkChain
from vbrd.vmdk import extents as vmdk_extents

MiB = 1 << 20
SECTOR = 512


def open_chain(path: Path) -> VmdkChain:
    return VmdkChain.open(str(path), LocalFileSpace())


def chain_sha256(path: Path, block: int = MiB) -> str:
    digest = hashlib.sha256()
    with open_chain(path) as chain:
        for offset in range(0, chain.capacity, block):
            digest.update(chain.read(offset, min(block, chain.capacity - offset)))
    return digest.hexdigest()


def qemu_sha256(path: Path) -> str:
    return sha256_file(to_raw(path, path.with_suffix(".qemu.raw")))


def random_writes(seed: int, size: int, count: int) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    writes = []
    for _ in range(count):
        length = rng.randrange(1, 200_000)
        offset = rng.randrange(0, size - length)
        writes.append((offset, rng.randbytes(length)))
    return writes


def cid_of(descriptor: Path) -> int:
    match = re.search(rb"\nCID=([0-9a-fA-F]+)", descriptor.read_bytes())
    assert match
    return int(match.group(1), 16)


def uncovered(extents: list[Extent], data: bytes) -> list[int]:
    """Offsets of non-zero sectors of ``data`` that no extent covers."""
    starts = [extent.offset for extent in extents]
    zero = bytes(SECTOR)
    missing = []
    for offset in range(0, len(data), SECTOR):
        if data[offset : offset + SECTOR] == zero:
            continue
        index = bisect_right(starts, offset) - 1
        if index < 0 or extents[index].end < offset + SECTOR:
            missing.append(offset)
    return missing


@pytest.fixture
def base_raw(tmp_path: Path) -> Path:
    """8 MiB of scattered random data with holes, as a used disk looks."""
    return make_raw(tmp_path / "base.raw", 8 * MiB, random_writes(1, 8 * MiB, 12))


# --------------------------------------------------------------------------------------------
# descriptors


ESXI_DESCRIPTOR = """\
# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=fffffffe
parentCID=0a1b2c3d
isNativeSnapshot="no"
createType="seSparse"
parentFileNameHint="/vmfs/volumes/5f0c-aa/web server/web server.vmdk"
# Extent description
RW 83886080 SESPARSE "web server-000001-sesparse.vmdk"
RW 2048 VMFS "web server-flat.vmdk"
RW 1024 ZERO

# The Disk Data Base
#DDB

ddb.longContentID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
ddb.uuid = "60 00 C2 9a 6d 4c 8a 3e-f8 0d 5c 8e 3d 1c 0b 2a"
"""


def test_descriptor_names_parent_content_ids_and_extents_as_esxi_writes_them() -> None:
    descriptor = Descriptor.parse(ESXI_DESCRIPTOR, "web server-000001.vmdk")

    assert descriptor.create_type == "seSparse"
    assert descriptor.cid == 0xFFFFFFFE
    assert descriptor.parent_cid == 0x0A1B2C3D
    assert descriptor.has_parent
    assert descriptor.parent_hint == "/vmfs/volumes/5f0c-aa/web server/web server.vmdk"
    assert [(e.kind, e.sectors, e.filename, e.start_sector) for e in descriptor.extents] == [
        ("SESPARSE", 83886080, "web server-000001-sesparse.vmdk", 0),
        ("VMFS", 2048, "web server-flat.vmdk", 0),
        ("ZERO", 1024, None, 0),
    ]
    assert descriptor.capacity == (83886080 + 2048 + 1024) * SECTOR
    assert descriptor.ddb["ddb.longContentID"] == "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def test_a_base_disk_has_no_parent() -> None:
    text = (
        'version=1\nCID=1234abcd\nparentCID=ffffffff\ncreateType="vmfs"\n'
        'RW 8 VMFS "a-flat.vmdk"\n'
    )
    assert not Descriptor.parse(text, "a.vmdk").has_parent


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('version=1\nRW 8 FLAT "x-flat.vmdk" 0\n', "no createType"),
        ('createType="vmfs"\n', "lists no extents"),
        ('createType="vmfs"\nRW 8 FLAT\n', "needs a file name"),
        ('createType="vmfs"\nRW 8 TAPE "x"\n', "unknown extent type TAPE"),
        ('createType="vmfs"\nCID=xyz\nRW 8 FLAT "x" 0\n', "CID='xyz'"),
    ],
)
def test_a_broken_descriptor_is_refused_naming_the_file_and_the_fault(
    text: str, complaint: str
) -> None:
    with pytest.raises(TransportError) as caught:
        Descriptor.parse(text, "vm/disk1.vmdk")
    assert "vm/disk1.vmdk" in str(caught.value)
    assert complaint in str(caught.value)


# --------------------------------------------------------------------------------------------
# single disks and chains made by qemu


@pytest.mark.parametrize("subformat", ["monolithicFlat", "monolithicSparse"])
def test_a_base_disk_reads_as_qemu_reads_it(tmp_path: Path, base_raw: Path, subformat: str) -> None:
    disk = convert(base_raw, tmp_path / "disk1.vmdk", subformat)

    assert chain_sha256(disk) == qemu_sha256(disk) == sha256_file(base_raw)


@pytest.mark.parametrize("subformat", ["monolithicFlat", "monolithicSparse"])
def test_a_snapshot_chain_reads_as_qemu_reads_it_and_each_layer_keeps_its_point_in_time(
    tmp_path: Path, base_raw: Path, subformat: str
) -> None:
    base = convert(base_raw, tmp_path / "disk1.vmdk", subformat)
    base_before = sha256_file(base_raw)
    first = create_child(base, tmp_path / "disk1-000001.vmdk")
    write(first, 1000, 70_000, 0xAB)  # unaligned, spans two grains
    write(first, 5 * MiB, 3 * MiB, 0x11)  # up to the end of the disk
    first_state = qemu_sha256(first)
    second = create_child(first, tmp_path / "disk1-000002.vmdk")
    write(second, 60_000, 200_000, 0xCD)  # overlaps the first delta's write
    write(second, 4 * MiB - 10, 20, 0xEF)  # a few bytes across a 64 KiB grain boundary

    assert chain_sha256(second) == qemu_sha256(second)
    assert chain_sha256(first) == first_state
    assert chain_sha256(base) == base_before
    with open_chain(second) as chain:
        assert [Path(layer.location).name for layer in chain.chain.layers] == [
            "disk1-000002.vmdk", "disk1-000001.vmdk", "disk1.vmdk"
        ]
        assert chain.read(60_000, 4) == b"\xcd" * 4
        assert chain.read(1000, 4) == b"\xab" * 4


def test_reads_at_odd_offsets_and_lengths_match_qemu_across_grain_extent_and_layer_edges(
    tmp_path: Path, base_raw: Path
) -> None:
    base = convert(base_raw, tmp_path / "disk1.vmdk", "monolithicSparse")
    child = create_child(base, tmp_path / "disk1-000001.vmdk")
    for offset, data in random_writes(2, 8 * MiB, 6):
        write(child, offset, len(data), data[0])
    reference = to_raw(child, tmp_path / "reference.raw").read_bytes()
    rng = random.Random(3)
    with open_chain(child) as chain:
        probes = [(0, 1), (chain.capacity - 1, 1), (chain.capacity - 4097, 4097), (65535, 2)]
        probes += [(rng.randrange(chain.capacity - 300_000), rng.randrange(1, 300_000))
                   for _ in range(40)]
        for offset, length in probes:
            assert chain.read(offset, length) == reference[offset : offset + length], (
                offset, length
            )
        assert chain.read(17, 0) == b""


def test_zero_grains_in_a_child_hide_the_parents_data(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "base.raw", 4 * MiB, [(MiB, b"\x6b" * (256 * 1024))])
    convert(raw, tmp_path / "disk1.vmdk", "monolithicFlat")
    child = tmp_path / "disk1-000001.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", "disk1.vmdk",
        "-F", "vmdk", child.name, cwd=tmp_path)
    run("qemu-io", "-f", "vmdk", "-c", f"write -z {MiB + 65536} 131072", child)

    with open_chain(child) as chain:
        assert chain.read(MiB, 256 * 1024) == (
            b"\x6b" * 65536 + bytes(131072) + b"\x6b" * 65536
        )
        assert chain.read(MiB + 65536, 131072) == bytes(131072)
    assert chain_sha256(child) == qemu_sha256(child)


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_a_disk_of_several_extent_files_reads_across_their_boundaries(
    tmp_path: Path, subformat: str
) -> None:
    disk = tmp_path / "disk1.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", disk, "5G")
    edge = 2048 * MiB
    write(disk, edge - 5000, 9000, 0x5A)
    write(disk, 2 * edge + 100, 700, 0x77)

    with open_chain(disk) as chain:
        assert len(chain.chain.layers[0].extents) == 3
        for offset, length in [(edge - 8192, 16384), (2 * edge, 4096), (chain.capacity - 9, 9)]:
            assert chain.read(offset, length) == read_slice(disk, offset, length, tmp_path / "s")
        extents = list(chain.allocated_extents())
    written = [Extent(edge - 5000, 9000), Extent(2 * edge + 100, 700)]
    assert all(any(e.offset <= w.offset and w.end <= e.end for e in extents) for w in written)
    assert sum(e.length for e in extents) <= 4 * MiB


def test_a_zero_extent_reads_as_zeros_between_flat_extents(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"\x01" * 4096)
    (tmp_path / "b.bin").write_bytes(b"\x00" * 512 + b"\x02" * 4096)
    (tmp_path / "d.vmdk").write_text(
        'version=1\nCID=00000001\nparentCID=ffffffff\ncreateType="custom"\n'
        'RW 8 FLAT "a.bin" 0\nRW 4 ZERO\nRW 8 FLAT "b.bin" 1\n'
    )
    with open_chain(tmp_path / "d.vmdk") as chain:
        assert chain.capacity == 20 * SECTOR
        assert chain.read(0, chain.capacity) == b"\x01" * 4096 + bytes(2048) + b"\x02" * 4096
        assert chain.read(4000, 200) == b"\x01" * 96 + bytes(104)


# --------------------------------------------------------------------------------------------
# ESXi delta formats, written from their layout and read by qemu as the reference


def write_cowd_delta(
    directory: Path, name: str, parent: Path, capacity: int, grains: dict[int, bytes]
) -> Path:
    """A vmfsSparse delta as ESXi writes it on VMFS 5: a ``COWD`` header, a grain directory
    of 32-bit sector numbers, grain tables of 4096 entries, 512-byte grains."""
    entries = 4096
    gd_entries = -(-capacity // (entries * SECTOR))
    gd_sector, gd_sectors = 4, -(-gd_entries * 4 // SECTOR)
    tables = sorted({g // entries for g in grains})
    table_sector = {t: gd_sector + gd_sectors + n * 32 for n, t in enumerate(tables)}
    next_sector = gd_sector + gd_sectors + len(tables) * 32
    directory_entries = [0] * gd_entries
    table_entries = {t: [0] * entries for t in tables}
    extent = directory / f"{name}-delta.vmdk"
    with open(extent, "wb") as out:
        for grain in sorted(grains):
            table, slot = divmod(grain, entries)
            directory_entries[table] = table_sector[table]
            table_entries[table][slot] = next_sector
            out.seek(next_sector * SECTOR)
            out.write(grains[grain])
            next_sector += 1
        out.seek(0)
        out.write(struct.pack("<4s10I", b"COWD", 1, 3, capacity // SECTOR, 1, gd_sector,
                              gd_entries, next_sector, 0, 0, 0))
        out.seek(gd_sector * SECTOR)
        out.write(struct.pack(f"<{gd_entries}I", *directory_entries))
        for table in tables:
            out.seek(table_sector[table] * SECTOR)
            out.write(struct.pack(f"<{entries}I", *table_entries[table]))
        out.truncate(next_sector * SECTOR)
    return _delta_descriptor(directory, name, parent, capacity, "vmfsSparse", "VMFSSPARSE", extent)


def write_sesparse_delta(
    directory: Path, name: str, parent: Path, capacity: int, grains: dict[int, bytes | str]
) -> Path:
    """A SESparse delta as ESXi writes it on VMFS 6: 64-bit grain directory and table entries
    whose top nibble is the state (1 unmapped, 2 zero, 3 allocated), 4 KiB grains, cluster
    numbers stored with their low 12 bits above the high ones. Clusters are numbered from 4090
    so that the shuffle of numbers above 4095 is exercised."""
    entries = 4096
    gd_entries = -(-capacity // (entries * 4096))
    gd_offset, gd_sectors = 4, -(-gd_entries * 8 // SECTOR)
    tables = sorted({g // entries for g in grains})
    tables_offset = gd_offset + gd_sectors
    tables_sectors = max(1, len(tables)) * 64
    grains_offset = tables_offset + tables_sectors + 2
    directory_entries = [0] * gd_entries
    table_entries = {t: [0] * entries for t in tables}
    for number, table in enumerate(tables):
        directory_entries[table] = 0x1000000000000000 | number
    extent = directory / f"{name}-sesparse.vmdk"
    cluster = 4090
    with open(extent, "wb") as out:
        for grain in sorted(grains):
            table, slot = divmod(grain, entries)
            value = grains[grain]
            if value == "zero":
                table_entries[table][slot] = 0x2000000000000000
            elif value == "unmapped":
                table_entries[table][slot] = 0x1000000000000000
            else:
                assert isinstance(value, bytes)
                table_entries[table][slot] = (
                    0x3000000000000000 | ((cluster & 0xFFF) << 48) | (cluster >> 12)
                )
                out.seek((grains_offset + cluster * 8) * SECTOR)
                out.write(value)
                cluster += 1
        grains_sectors = (cluster + 1) * 8
        out.seek(0)
        out.write(struct.pack(
            "<26Q", 0xCAFEBABE, 0x0000000200000001, capacity // SECTOR, 8, 64, 0, 0, 0, 0, 0,
            1, 1, 2, 1, 3, 1, gd_offset, gd_sectors, tables_offset, tables_sectors,
            tables_offset + tables_sectors, 1, tables_offset + tables_sectors + 1, 1,
            grains_offset, grains_sectors,
        ).ljust(SECTOR, b"\0"))
        out.write(struct.pack("<4Q", 0xCAFECAFE, 0, 1, 0).ljust(SECTOR, b"\0"))
        out.seek(gd_offset * SECTOR)
        out.write(struct.pack(f"<{gd_entries}Q", *directory_entries))
        for number, table in enumerate(tables):
            out.seek((tables_offset + number * 64) * SECTOR)
            out.write(struct.pack(f"<{entries}Q", *table_entries[table]))
        out.truncate((grains_offset + grains_sectors) * SECTOR)
    return _delta_descriptor(directory, name, parent, capacity, "seSparse", "SESPARSE", extent)


def _delta_descriptor(
    directory: Path, name: str, parent: Path, capacity: int, create_type: str, kind: str,
    extent: Path,
) -> Path:
    descriptor = directory / f"{name}.vmdk"
    descriptor.write_text(
        f'# Disk DescriptorFile\nversion=1\nencoding="UTF-8"\nCID=fffffffe\n'
        f'parentCID={cid_of(parent):08x}\ncreateType="{create_type}"\n'
        f'parentFileNameHint="{parent.name}"\n\n# Extent description\n'
        f'RW {capacity // SECTOR} {kind} "{extent.name}"\n\n# The Disk Data Base\n#DDB\n\n'
        'ddb.adapterType = "lsilogic"\n'
    )
    return descriptor


def test_a_vmfs_sparse_delta_reads_as_qemu_reads_it(tmp_path: Path, base_raw: Path) -> None:
    base = convert(base_raw, tmp_path / "disk1.vmdk", "monolithicFlat")
    rng = random.Random(4)
    grains = {g: rng.randbytes(SECTOR) for g in [0, 1, 2, 7, 4095, 4096, 9000, 16383]}
    delta = write_cowd_delta(tmp_path, "disk1-000001", base, 8 * MiB, grains)

    assert chain_sha256(delta) == qemu_sha256(delta)
    with open_chain(delta) as chain:
        assert chain.read(4095 * SECTOR, 2 * SECTOR) == grains[4095] + grains[4096]


def test_a_sesparse_delta_reads_as_qemu_reads_it(tmp_path: Path, base_raw: Path) -> None:
    base = convert(base_raw, tmp_path / "disk1.vmdk", "monolithicFlat")
    rng = random.Random(5)
    grains: dict[int, bytes | str] = {g: rng.randbytes(4096) for g in range(2040, 2050)}
    grains.update({0: rng.randbytes(4096), 5: "zero", 6: "unmapped", 2047: "zero"})
    grains[7] = rng.randbytes(4096)
    delta = write_sesparse_delta(tmp_path, "disk1-000001", base, 8 * MiB, grains)

    assert chain_sha256(delta) == qemu_sha256(delta)
    with open_chain(delta) as chain:
        assert chain.read(5 * 4096, 2 * 4096) == bytes(8192)
        assert chain.read(2045 * 4096, 4096) == grains[2045]


# --------------------------------------------------------------------------------------------
# allocated extents


def test_allocated_extents_cover_every_nonzero_byte_of_a_chain(
    tmp_path: Path, base_raw: Path
) -> None:
    base = convert(base_raw, tmp_path / "disk1.vmdk", "monolithicSparse")
    child = create_child(base, tmp_path / "disk1-000001.vmdk")
    for offset, data in random_writes(6, 8 * MiB, 5):
        write(child, offset, len(data), data[0])
    reference = to_raw(child, tmp_path / "reference.raw").read_bytes()

    with open_chain(child) as chain:
        extents = list(chain.allocated_extents(window=3 * MiB + 512))
    assert uncovered(extents, reference) == []
    assert all(0 <= e.offset and e.end <= len(reference) for e in extents)
    assert all(a.end < b.offset for a, b in zip(extents, extents[1:], strict=False))
    assert sum(e.length for e in extents) < len(reference)


def test_allocated_extents_of_a_flat_disk_skip_the_files_holes(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "base.raw", 64 * MiB, [(10 * MiB, b"\x01" * 5000)])
    disk = convert(raw, tmp_path / "disk1.vmdk", "monolithicFlat")
    with open_chain(disk) as chain:
        extents = list(chain.allocated_extents())
    assert uncovered(extents, raw.read_bytes()) == []
    assert sum(e.length for e in extents) <= MiB


def test_allocated_extents_of_esxi_deltas_list_their_grains_and_the_parents(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "base.raw", 32 * MiB, [(20 * MiB, b"\x01" * 4096)])
    base = convert(raw, tmp_path / "disk1.vmdk", "monolithicSparse")
    cowd = write_cowd_delta(
        tmp_path, "cowd", base, 32 * MiB, {3: b"\x02" * SECTOR, 4: b"\x03" * SECTOR}
    )
    sesparse = write_sesparse_delta(tmp_path, "se", base, 32 * MiB, {1: b"\x04" * 4096, 2: "zero"})

    with open_chain(cowd) as chain:
        assert list(chain.allocated_extents()) == [Extent(1536, 1024), Extent(20 * MiB, 65536)]
    with open_chain(sesparse) as chain:
        assert list(chain.allocated_extents()) == [Extent(4096, 4096), Extent(20 * MiB, 65536)]


# --------------------------------------------------------------------------------------------
# refusals


def test_a_parent_changed_after_its_child_was_made_is_refused(
    tmp_path: Path, base_raw: Path
) -> None:
    base = convert(base_raw, tmp_path / "disk1.vmdk", "monolithicSparse")
    child = create_child(base, tmp_path / "disk1-000001.vmdk")
    write(base, 0, 512, 0x99)  # the parent is written to: its CID changes

    with pytest.raises(TransportError) as caught:
        open_chain(child)
    assert "disk1-000001.vmdk" in str(caught.value)
    assert "disk1.vmdk" in str(caught.value)
    assert "parent changed" in str(caught.value)


def test_a_missing_parent_is_named(tmp_path: Path, base_raw: Path) -> None:
    base = convert(base_raw, tmp_path / "disk1.vmdk", "monolithicSparse")
    child = create_child(base, tmp_path / "disk1-000001.vmdk")
    base.unlink()

    with pytest.raises(TransportError, match=r"disk1\.vmdk: cannot open: No such file"):
        open_chain(child)


def test_a_missing_or_short_extent_is_named(tmp_path: Path, base_raw: Path) -> None:
    disk = convert(base_raw, tmp_path / "disk1.vmdk", "monolithicFlat")
    flat = tmp_path / "disk1-flat.vmdk"
    with open(flat, "r+b") as extent:
        extent.truncate(4 * MiB)
    with pytest.raises(TransportError, match=r"disk1-flat\.vmdk: the extent holds 4194304 bytes"):
        open_chain(disk)
    flat.unlink()
    with pytest.raises(TransportError, match=r"disk1-flat\.vmdk: cannot open"):
        open_chain(disk)


def test_a_stream_optimized_export_is_not_taken_for_a_disk(tmp_path: Path, base_raw: Path) -> None:
    disk = convert(base_raw, tmp_path / "export.vmdk", "streamOptimized")
    with pytest.raises(TransportError, match="streamOptimized"):
        open_chain(disk)


def test_a_chain_that_loops_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a-flat.vmdk").write_bytes(bytes(4096))
    (tmp_path / "a.vmdk").write_text(
        'version=1\nCID=0000000a\nparentCID=0000000a\ncreateType="vmfs"\n'
        'parentFileNameHint="a.vmdk"\nRW 8 VMFS "a-flat.vmdk"\n'
    )
    with pytest.raises(TransportError, match="loops"):
        open_chain(tmp_path / "a.vmdk")


def test_opening_an_extent_instead_of_its_descriptor_says_so(
    tmp_path: Path, base_raw: Path
) -> None:
    convert(base_raw, tmp_path / "disk1.vmdk", "monolithicFlat")
    with pytest.raises(TransportError, match="open the disk's descriptor"):
        open_chain(tmp_path / "disk1-flat.vmdk")


def test_an_empty_disk_file_is_named_empty_not_an_extent(tmp_path: Path) -> None:
    empty = tmp_path / "disk1.vmdk"
    empty.write_bytes(b"")
    with pytest.raises(TransportError) as caught:
        open_chain(empty)
    message = str(caught.value)
    assert f"{empty} is empty (0 bytes)" in message
    assert "descriptor, not its extent" not in message


def test_a_disk_file_shorter_than_its_capacity_is_named_short_not_an_extent(
    tmp_path: Path, base_raw: Path
) -> None:
    """A file cut short (a copy that stopped, a truncated flat file named as the disk) is
    damaged; telling the administrator to open the descriptor instead would mislead."""
    short = tmp_path / "disk1.vmdk"
    short.write_bytes(base_raw.read_bytes()[: 3 * MiB])
    with pytest.raises(TransportError) as caught:
        VmdkChain.open(str(short), LocalFileSpace(), capacity=8 * MiB)
    message = str(caught.value)
    assert f"{short} holds 3145728 bytes, less than the disk's capacity of 8388608" in message
    assert "descriptor, not its extent" not in message
    # a file as large as the disk that is no descriptor is most likely its extent
    whole = tmp_path / "disk2.vmdk"
    whole.write_bytes(base_raw.read_bytes())
    with pytest.raises(TransportError, match="open the disk's descriptor, not its extent"):
        VmdkChain.open(str(whole), LocalFileSpace(), capacity=8 * MiB)


def test_reading_past_the_end_of_the_disk_is_refused(tmp_path: Path, base_raw: Path) -> None:
    disk = convert(base_raw, tmp_path / "disk1.vmdk", "monolithicFlat")
    with open_chain(disk) as chain, pytest.raises(TransportError, match="holds 8388608 bytes"):
        chain.read(chain.capacity - 10, 11)


# --------------------------------------------------------------------------------------------
# concurrency


def test_many_threads_read_one_chain_correctly_while_grain_tables_are_evicted(
    tmp_path: Path, base_raw: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vmdk_extents, "TABLE_CACHE", 1)
    base = convert(base_raw, tmp_path / "disk1.vmdk", "monolithicSparse")
    child = create_child(base, tmp_path / "disk1-000001.vmdk")
    write(child, 3 * MiB, 2 * MiB, 0x42)
    reference = to_raw(child, tmp_path / "reference.raw").read_bytes()
    failures: list[str] = []

    with open_chain(child) as chain:
        def reader(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(60):
                offset = rng.randrange(chain.capacity - 100_000)
                length = rng.randrange(1, 100_000)
                if chain.read(offset, length) != reference[offset : offset + length]:
                    failures.append(f"{offset}+{length}")

        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
