"""vbrd: VM backup for VMware vSphere.

Plugins import :data:`hookimpl` from here to mark their hook implementations.
"""
from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "vbrd"
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["hookimpl", "__version__", "PROJECT_NAME"]
