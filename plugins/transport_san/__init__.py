"""Direct SAN / NFS access (mode ``san``): the proxy reads the snapshot's disk chain straight
from storage it sees itself — an NFS export mounted on the proxy, or a VMFS datastore made
readable there — mapped per datastore by the proxy's ``san_paths``.
"""
from __future__ import annotations

from vbrd import hookimpl
from vbrd.protocols import TransportMode

from .mode import SanMode


@hookimpl
def vbrd_transport_modes() -> list[TransportMode]:
    return [SanMode()]
