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
import os
import sys
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

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


# --------------------------------------------------------------------------------------------
# calling hooks


TRACE_ENV = "VBRD_TRACE_HOOKS"


@dataclass(frozen=True)
class HookAnswer:
    """What one plugin's implementation of a hook returned."""

    plugin: str
    value: Any


def call_each(pm: pluggy.PluginManager, hook: str, /, **kwargs: Any) -> list[HookAnswer]:
    """Call every implementation of the collect-all ``hook`` on its own, in pluggy's order.

    pluggy stops a hook call at the first implementation that raises, so one broken plugin
    would keep an event from every other observer and the log would name the caller, not
    the plugin. Here each implementation runs alone: one that raises is logged with its
    plugin's name and the hook's, and the others still run. Answers of ``None`` ("nothing
    from me") are left out. With ``VBRD_TRACE_HOOKS=1`` in the environment every call is
    logged with the plugin, the hook and how long it took.
    """
    caller = getattr(pm.hook, hook)
    trace = os.environ.get(TRACE_ENV, "") not in ("", "0")
    answers: list[HookAnswer] = []
    # pluggy calls the last registered (and tryfirst) implementations first
    for impl in reversed(caller.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            continue
        started = time.perf_counter()
        try:
            value = impl.function(*[kwargs[name] for name in impl.argnames])
        except Exception as e:  # noqa: BLE001 - a plugin's fault must stay the plugin's
            log.error("plugin %s failed in hook %s: %s: %s", impl.plugin_name, hook,
                      type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
            continue
        finally:
            if trace:
                log.info("hook %s: plugin %s took %.3f ms", hook, impl.plugin_name,
                         (time.perf_counter() - started) * 1e3)
        if value is not None:
            answers.append(HookAnswer(impl.plugin_name, value))
    return answers


def transport_modes(pm: pluggy.PluginManager) -> dict[str, TransportMode]:
    """Every transport mode the plugins provide, by name."""
    return {name: mode for name, (mode, _plugin) in _modes_with_plugins(pm).items()}


def transport_mode_plugins(pm: pluggy.PluginManager) -> dict[str, str]:
    """The name of the plugin that provides each transport mode."""
    return {name: plugin for name, (_mode, plugin) in _modes_with_plugins(pm).items()}


_MODES: weakref.WeakKeyDictionary[pluggy.PluginManager, tuple[
    tuple[object, ...], dict[str, tuple[TransportMode, str]]]] = weakref.WeakKeyDictionary()


def _modes_with_plugins(pm: pluggy.PluginManager) -> dict[str, tuple[TransportMode, str]]:
    """The modes, built once per plugin manager (so once per process) and again only when
    the plugins providing modes change."""
    providers = tuple(pm.hook.vbrd_transport_modes.get_hookimpls())
    cached = _MODES.get(pm)
    if cached is not None and cached[0] == providers:
        return cached[1]
    modes: dict[str, tuple[TransportMode, str]] = {}
    for answer in call_each(pm, "vbrd_transport_modes"):
        for mode in cast("Iterable[TransportMode]", answer.value):
            if mode.name in modes:
                raise ConfigError("plugins", mode.name,
                                  f"two plugins provide a transport mode of this name: "
                                  f"{modes[mode.name][1]} and {answer.plugin}")
            modes[mode.name] = (mode, answer.plugin)
    _MODES[pm] = (providers, modes)
    return modes


def guest_processors(pm: pluggy.PluginManager) -> dict[str, GuestProcessor]:
    """Every guest processor the plugins provide, by name."""
    processors: dict[str, GuestProcessor] = {}
    for answer in call_each(pm, "vbrd_guest_processors"):
        for processor in cast("Iterable[GuestProcessor]", answer.value):
            processors[processor.name] = processor
    return processors


# --------------------------------------------------------------------------------------------
# what is loaded, for people


def plugins_report(pm: PluginManager) -> dict[str, Any]:
    """The loaded plugins (name, where from, version, the hooks each implements, the modes
    and guest processors it provides) and the ones that failed to load, with the reason."""
    modes = transport_mode_plugins(pm)
    processors: dict[str, list[str]] = {}
    for answer in call_each(pm, "vbrd_guest_processors"):
        processors.setdefault(answer.plugin, []).extend(
            p.name for p in cast("Iterable[GuestProcessor]", answer.value))
    loaded = []
    for name, plugin in sorted(pm.list_name_plugin()):
        if plugin is None:
            continue
        loaded.append({
            "name": name,
            "source": pm.sources.get(name, "registered"),
            "version": _version_of(plugin, pm.sources.get(name, "")),
            "hooks": sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()),
            "transport_modes": sorted(m for m, p in modes.items() if p == name),
            "guest_processors": sorted(processors.get(name, [])),
        })
    failed = [{"name": f.name, "source": f.source, "reason": f.reason} for f in pm.failures]
    return {"plugins": loaded, "failures": failed}


def _version_of(plugin: object, source: str) -> str:
    version = getattr(plugin, "__version__", None)
    if isinstance(version, str):
        return version
    distribution = BUILTIN_DISTRIBUTION if source == "built-in" else (
        source.removeprefix("package ") if source.startswith("package ") else "")
    if distribution:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            pass
    return ""
