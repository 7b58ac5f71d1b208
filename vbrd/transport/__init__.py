"""Moving disk data from proxies to repositories.

A transfer is one disk: the proxy's data mover (:mod:`.source`) reads it through a transport
mode plugin, hashes and compresses it; the repository's data mover (:mod:`.target`) stores
what the repository lacks and leaves a block map (:mod:`.blockmap`). They run as processes
(:mod:`.mover`), speak :mod:`.wire`, and the Manager drives them through
:func:`run_transfer`.
"""
from __future__ import annotations

from vbrd.transport.movers import TransferControl, TransferStopped, run_transfer
from vbrd.transport.spec import Progress, SourceSpec, TlsSettings, TransferResult, TransferRules

__all__ = [
    "Progress",
    "SourceSpec",
    "TlsSettings",
    "TransferControl",
    "TransferResult",
    "TransferRules",
    "TransferStopped",
    "run_transfer",
]
