"""Loading plugins: built-ins, installed packages, drop-in folders — in that order.

Built-in plugins (``plugins/<name>/``) are registered through the entry point group ``vbrd``
exactly as a third-party package is, so they get no private door. Drop-in folders named in
the config hold ``name.py`` files or ``name/`` packages, imported as real packages so relative
imports work. A plugin that fails to import is recorded with its name and the reason, and the
daemon starts without it.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, cast

import pluggy

from vbrd import PROJECT_NAME, hookspecs
from vbrd.errors import ConfigError

if TYPE_CHECKING:
    from vbrd.protocols import GuestProcessor, TransportMode

log = logging.getLogger(__name__)

BUILTIN_DISTRIBUTION = "vbrd"


@dataclass(frozen=True)
class PluginFailure:
    name: str
    source: str
    reason: str


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the record of plugins that could not be loaded."""

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self.sources: dict[str, str] = {}

    def register_module(self, module: ModuleType, name: str, source: str) -> None:
        if self.is_blocked(name) or self.has_plugin(name):
            return
        self.register(module, name=name)
        self.sources[name] = source


def make_plugin_manager(plugin_dirs: Iterable[Path] = (), disabled: Iterable[str] = (), *,
                        load_entrypoints: bool = True,
                        extra_modules: Iterable[str] = (),
                        only: Iterable[str] | None = None) -> PluginManager:
    """``only`` names the installed and drop-in plugins to load (None: all of them).

    A data mover needs the plugins of its transport modes and nothing else; importing the
    guest plugins (and with them asyncssh, pywinrm and pyVmomi) would cost every mover a
    noticeable share of a short incremental's time.
    """
    pm = PluginManager()
    for name in disabled:
        pm.set_blocked(name)
    wanted = None if only is None else frozenset(only)
    if load_entrypoints:
        _load_entrypoints(pm, wanted)
    for directory in plugin_dirs:
        _load_dropins(pm, Path(directory), wanted)
    for dotted in extra_modules:
        try:
            pm.register_module(importlib.import_module(dotted), dotted, "module")
        except Exception as e:
            _failed(pm, dotted, "module", e)
    pm.check_pending()
    return pm


def _failed(pm: PluginManager, name: str, source: str, error: BaseException) -> None:
    reason = f"{type(error).__name__}: {error}"
    pm.failures.append(PluginFailure(name, source, reason))
    log.error("plugin %s (%s) could not be loaded: %s", name, source, reason)


def _load_entrypoints(pm: PluginManager, wanted: frozenset[str] | None) -> None:
    entry_points = sorted(
        importlib.metadata.entry_points(group=PROJECT_NAME),
        # built-ins first, then third-party packages, each in name order
        key=lambda ep: (ep.dist is None or ep.dist.name != BUILTIN_DISTRIBUTION, ep.name))
    for ep in entry_points:
        source = "built-in" if ep.dist and ep.dist.name == BUILTIN_DISTRIBUTION else (
            f"package {ep.dist.name}" if ep.dist else "entry point")
        if pm.is_blocked(ep.name) or (wanted is not None and ep.name not in wanted):
            continue
        try:
            pm.register_module(ep.load(), ep.name, source)
        except Exception as e:
            _failed(pm, ep.name, source, e)


def _load_dropins(pm: PluginManager, directory: Path, wanted: frozenset[str] | None) -> None:
    if not directory.is_dir():
        _failed(pm, str(directory), "drop-in directory",
                FileNotFoundError(f"no such directory: {directory}"))
        return
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file():
            name, init, search = entry.name, entry / "__init__.py", [str(entry)]
        elif entry.suffix == ".py":
            name, init, search = entry.stem, entry, None
        else:
            continue
        if pm.is_blocked(name) or (wanted is not None and name not in wanted):
            continue
        module_name = f"vbrd_dropin_{name}"
        try:
            spec = importlib.util.spec_from_file_location(
                module_name, init, submodule_search_locations=search)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import {init}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(module_name, None)
                raise
            pm.register_module(module, name, f"drop-in {directory}")
        except Exception as e:
            _failed(pm, name, f"drop-in {entry}", e)


def transport_modes(pm: pluggy.PluginManager) -> dict[str, TransportMode]:
    """Every transport mode the plugins provide, by name."""
    modes: dict[str, TransportMode] = {}
    for provided in pm.hook.vbrd_transport_modes():
        for mode in provided or ():
            if mode.name in modes:
                raise ConfigError("plugins", mode.name,
                                  "two plugins provide a transport mode of this name")
            modes[mode.name] = mode
    return modes


def transport_mode_plugins(pm: pluggy.PluginManager) -> dict[str, str]:
    """The name of the plugin that provides each transport mode."""
    providers: dict[str, str] = {}
    for impl in pm.hook.vbrd_transport_modes.get_hookimpls():
        provided = cast("Iterable[TransportMode] | None", impl.function())
        for mode in provided or ():
            providers[mode.name] = impl.plugin_name
    return providers


def guest_processors(pm: pluggy.PluginManager) -> dict[str, GuestProcessor]:
    """Every guest processor the plugins provide, by name."""
    processors: dict[str, GuestProcessor] = {}
    for provided in pm.hook.vbrd_guest_processors():
        for processor in provided or ():
            processors[processor.name] = processor
    return processors
