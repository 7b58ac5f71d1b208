"""Reading VMDK disk chains, shared by every transport mode.

A snapshot's disk is a chain: the leaf descriptor vSphere names as the snapshot's backing,
its parent, down to the base disk. This package parses descriptors (text files and those
embedded in hosted sparse files), opens the chain through ``parentFileNameHint``, reads it
(flat extents directly; hosted sparse ``KDMV``, vmfsSparse ``COWD`` and SESparse through their
grain tables; a child's unallocated grains fall through to its parent) and lists the areas
any layer holds data for, so that a full backup can skip holes when CBT is unavailable.

The chain logic is written once, without I/O (:mod:`vbrd.vmdk.steps`); two drivers run it,
one on local files for the san and hotadd modes, one over HTTP ranges for the nbd mode, so
every mode reads the same bytes by construction.

    with VmdkChain.open("/mnt/ds1/vm/disk1-000001.vmdk", LocalFileSpace()) as chain:
        data = chain.read(0, 1 << 20)
"""
from __future__ import annotations

from vbrd.vmdk.chain import Chain, Layer, open_chain
from vbrd.vmdk.descriptor import Descriptor, ExtentLine
from vbrd.vmdk.reader import AsyncVmdkChain, VmdkChain
from vbrd.vmdk.sources import (
    AsyncFileSpace,
    AsyncRangeSource,
    FileSpace,
    HttpRangeSource,
    LocalFile,
    LocalFileSpace,
    RangeSource,
)

__all__ = [
    "AsyncFileSpace",
    "AsyncRangeSource",
    "AsyncVmdkChain",
    "Chain",
    "Descriptor",
    "ExtentLine",
    "FileSpace",
    "HttpRangeSource",
    "Layer",
    "LocalFile",
    "LocalFileSpace",
    "RangeSource",
    "VmdkChain",
    "open_chain",
]
