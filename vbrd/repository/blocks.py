"""The per-block work of the data path: digest, zero test, compression.

These run on worker threads for every block of every disk, so they avoid copies: hashlib
and zstandard release the GIL on large buffers, which is what lets two cores hash and
compress two blocks at once.
"""
from __future__ import annotations

import hashlib
import threading
from functools import lru_cache

import zstandard

DIGEST_SIZE = 32
"""SHA-256: a block's name in the repository and the entry in a disk's block index."""

ZERO_DIGEST = bytes(DIGEST_SIZE)
"""The index entry of an all-zero block. No SHA-256 output is 32 zero bytes in practice."""

MIN_COMPRESSION_LEVEL = -7
MAX_COMPRESSION_LEVEL = 22


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The block's SHA-256, which names it in the repository."""
    return hashlib.sha256(data).digest()


@lru_cache(maxsize=8)
def _zeros(length: int) -> bytes:
    return bytes(length)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether every byte is zero.

    ``bytes.startswith`` compares with memcmp for any buffer, so a memoryview is tested
    without a copy (``memoryview == bytes`` compares item by item, ~100x slower), and a
    block with data fails on its first non-zero byte.
    """
    view = data if isinstance(data, bytes) else memoryview(data).cast("B")
    return _zeros(len(view)).startswith(view)


class BlockCodec:
    """zstd for blocks: one compression and one decompression context per thread.

    zstd contexts are not thread-safe, and making one per call costs more than compressing
    a small block, so each thread keeps its own.
    """

    def __init__(self, level: int) -> None:
        if not MIN_COMPRESSION_LEVEL <= level <= MAX_COMPRESSION_LEVEL or level == 0:
            raise ValueError(
                f"zstd compression level {level} is out of range "
                f"({MIN_COMPRESSION_LEVEL}..-1 or 1..{MAX_COMPRESSION_LEVEL})"
            )
        self.level = level
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(
                level=self.level, write_content_size=True, write_checksum=True
            )
        return cctx

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return dctx

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        """One zstd frame that records the block's length in its header and ends with the
        content checksum (XXH64) that decompression checks."""
        return self._compressor().compress(data)

    def decompress(self, data: bytes | memoryview, expected_size: int | None = None) -> bytes:
        """The block's bytes; ValueError when ``data`` is not one whole zstd frame.

        The length the frame claims is checked against ``expected_size`` *before*
        decompressing, so a damaged header cannot make us allocate gigabytes.
        """
        size = frame_size(data)
        if expected_size is not None and size != expected_size:
            raise ValueError(f"frame holds {size} bytes, expected {expected_size}")
        try:
            out = self._decompressor().decompress(data)
        except zstandard.ZstdError as exc:
            raise ValueError(f"cannot decompress: {exc}") from exc
        if len(out) != size:
            raise ValueError(f"frame decompressed to {len(out)} bytes, header says {size}")
        return out


def frame_size(data: bytes | bytearray | memoryview) -> int:
    """The uncompressed length a zstd frame's header declares; ValueError if it has none."""
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise ValueError("not a zstd frame") from exc
    if size < 0:
        raise ValueError("zstd frame does not record its length")
    return size
