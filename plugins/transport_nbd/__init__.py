"""Network mode (``nbd``): the snapshot's disk chain read over HTTPS from vCenter's (or an
ESXi host's) datastore access, ``/folder/<path>?dcPath=<dc>&dsName=<ds>`` with ``Range``
requests. Needs nothing on the proxy but a route to vCenter, so it is the mode of last resort
that always works; it is the slowest of the three.
"""
from __future__ import annotations

from vbrd import hookimpl
from vbrd.protocols import TransportMode

from .mode import NbdMode


@hookimpl
def vbrd_transport_modes() -> list[TransportMode]:
    return [NbdMode()]
