"""The plugin contract: every hook vbrd calls, when, and what it may return.

docs/plugins.md documents each hook with an example; a test keeps it in step with this file.
Hooks are plain functions. They decide and hand back objects; the objects do the async work
(an ``async def`` hookimpl would return a coroutine, which is never ``None`` and so would
always win a firstresult call). Collect-all hooks return one value per plugin, ``None``
meaning "nothing from me". Every hook but ``vbrd_before_phase`` calls each plugin's
implementation on its own (:func:`vbrd.plugins.call_each`): one that raises is logged with
its plugin's name and the others still run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from vbrd import PROJECT_NAME

if TYPE_CHECKING:
    from vbrd.config import Config
    from vbrd.events import Event
    from vbrd.protocols import GuestProcessor, TransportMode

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


# --------------------------------------------------------------------------------------------
# lifecycle


@hookspec
def vbrd_startup(config: Config) -> None:
    """Called once when the daemon has loaded its configuration, before any session runs.

    Raising is logged with the plugin's name; the other plugins still start and the daemon
    continues without that plugin's startup work."""


@hookspec
def vbrd_validate_plugin_config(name: str, table: dict[str, Any]) -> list[str] | None:
    """Validate the ``[plugins.<name>]`` table of the configuration.

    Called for every table under ``[plugins]``. Return a list of problems (each a sentence
    naming the key) for tables this plugin owns, or ``None`` for tables it does not own.
    Problems stop the daemon from starting, with exit code 2."""


# --------------------------------------------------------------------------------------------
# transport modes


@hookspec
def vbrd_transport_modes() -> list[TransportMode] | None:
    """The transport modes this plugin provides (objects satisfying
    :class:`vbrd.protocols.TransportMode`).

    Called once per process (the daemon, each data mover); the modes it returns are kept. A
    mode's ``name`` is what jobs name in ``transport`` and proxies in ``transport_modes``: a
    name no loaded plugin provides is refused when the daemon starts or reloads, naming the
    loaded modes, and ``auto`` tries the built-in ``san``, ``hotadd``, ``nbd`` in that
    order. Two plugins providing the same name is a configuration error naming both.
    ``probe`` answers whether this proxy can
    read a disk with this mode and, if not, why; ``open`` returns a
    :class:`vbrd.protocols.DiskReader` of the snapshot's data and raises
    :class:`vbrd.errors.TransportError` when it cannot."""


# --------------------------------------------------------------------------------------------
# guest processing


@hookspec
def vbrd_guest_processors() -> list[GuestProcessor] | None:
    """The guest processors this plugin provides (objects satisfying
    :class:`vbrd.protocols.GuestProcessor`).

    The Manager builds the chain for a guest from the processors whose ``families`` include
    the guest's OS family, lowest ``rank`` first (the built-ins: windows ``winrm`` then
    ``vix``; linux ``ssh`` then ``vix``), or in the order of the job's ``guest.processors``.
    ``connect`` raising :class:`vbrd.errors.GuestUnreachable` moves to the next
    processor; any other :class:`vbrd.errors.GuestError` is a guest processing failure."""


# --------------------------------------------------------------------------------------------
# events


@hookspec
def vbrd_event(event: Event) -> None:
    """Called for every event on the bus, after the catalog has taken it for writing.

    Observers must return quickly (they run on the event loop, outside the data path); a
    raising observer is logged with its plugin's name, the other observers still get the
    event, and the session is not affected."""


# --------------------------------------------------------------------------------------------
# phases


@hookspec
def vbrd_before_phase(session_id: str, job: str, phase: str, vm: str) -> None:
    """Called as a phase begins, for the session (``vm`` empty: initialization) or for one
    VM (guest_processing, snapshot, guest_release, data_transport, snapshot_commit).

    A policy plugin may refuse by raising :class:`vbrd.errors.VbrdError`: the phase fails for
    that VM with the error's message, and everything the earlier phases set up is still
    cleaned up (thaw, snapshot commit). Returning is consent."""
