"""The repository: deduplicated, compressed blocks and the restore points that name them.

Format v1 is described in docs/repository-format.md. The data path uses
:mod:`vbrd.repository.blocks` (digest, zero test, codec) on worker threads and hands the
results to :meth:`Repository.put_block` and a :class:`PointWriter`.
"""
from __future__ import annotations

from vbrd.repository.blocks import BlockCodec, block_digest, is_zero
from vbrd.repository.index import DiskIndex
from vbrd.repository.points import DiskIndexWriter, DiskInfo, PointInfo, PointWriter
from vbrd.repository.repository import (
    GcStats,
    Repository,
    RepoStats,
    RestoreStats,
    VerifyProblem,
)
from vbrd.repository.store import BlockDamaged

__all__ = [
    "BlockCodec",
    "BlockDamaged",
    "DiskIndex",
    "DiskIndexWriter",
    "DiskInfo",
    "GcStats",
    "PointInfo",
    "PointWriter",
    "RepoStats",
    "Repository",
    "RestoreStats",
    "VerifyProblem",
    "block_digest",
    "is_zero",
]
