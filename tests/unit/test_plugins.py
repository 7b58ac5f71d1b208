"""Plugins load in a fixed order; a broken one is named and does not take the rest down."""
from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

from vbrd import hookspecs
from vbrd.plugins import (
    guest_processors,
    make_plugin_manager,
    transport_mode_plugins,
    transport_modes,
)

GOOD_PLUGIN = """
from vbrd import hookimpl
from .mode import EchoMode

@hookimpl
def vbrd_transport_modes():
    return [EchoMode()]
"""

GOOD_MODE = """
class EchoMode:
    name = "echo"
"""


def make_dropins(root: Path) -> Path:
    dropins = root / "plugins.d"
    (dropins / "echo").mkdir(parents=True)
    (dropins / "echo" / "__init__.py").write_text(textwrap.dedent(GOOD_PLUGIN))
    (dropins / "echo" / "mode.py").write_text(textwrap.dedent(GOOD_MODE))
    (dropins / "broken.py").write_text("import this_module_does_not_exist\n")
    return dropins


def test_dropin_dir_loads_the_good_plugin_and_names_the_broken_one(tmp_path):
    pm = make_plugin_manager([make_dropins(tmp_path)], load_entrypoints=False)
    assert "echo" in transport_modes(pm)
    assert [f.name for f in pm.failures] == ["broken"]
    failure = pm.failures[0]
    assert "this_module_does_not_exist" in failure.reason
    assert "broken.py" in failure.source


def test_disabled_plugins_are_not_loaded(tmp_path):
    pm = make_plugin_manager([make_dropins(tmp_path)], disabled=["echo", "broken"],
                             load_entrypoints=False)
    assert transport_modes(pm) == {} and pm.failures == []


def test_missing_dropin_directory_is_reported(tmp_path):
    pm = make_plugin_manager([tmp_path / "absent"], load_entrypoints=False)
    assert pm.failures and "no such directory" in pm.failures[0].reason


def test_builtin_plugins_come_through_the_entry_point_group():
    pm = make_plugin_manager()
    builtins = {name for name, source in pm.sources.items() if source == "built-in"}
    assert {"transport_san", "transport_nbd"} <= builtins, pm.failures
    assert {"san", "nbd"} <= set(transport_modes(pm))
    assert isinstance(guest_processors(pm), dict)


def test_every_hookspec_is_documented():
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if name.startswith("vbrd_")]
    assert specs
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        assert len(doc) > 80, f"{spec.__name__} needs a real docstring"


def test_a_data_mover_loads_only_the_plugins_of_its_transport_modes(tmp_path):
    dropins = make_dropins(tmp_path)
    everything = make_plugin_manager([dropins])
    providers = transport_mode_plugins(everything)
    assert providers["san"] == "transport_san" and providers["echo"] == "echo"

    mover = make_plugin_manager([dropins],
                                only=[providers["san"], providers["echo"]])
    assert set(transport_modes(mover)) == {"san", "echo"}
    assert guest_processors(mover) == {}
    # the broken drop-in was not asked for, so it was not even imported
    assert mover.failures == []


COUNTING_PLUGIN = """
from vbrd import hookimpl

BUILT = []


class Counted:
    name = "counted"

    def __init__(self):
        BUILT.append(self)


@hookimpl
def vbrd_transport_modes():
    return [Counted()]
"""


def test_modes_are_built_once_per_plugin_manager(tmp_path):
    import sys

    dropins = tmp_path / "plugins.d"
    dropins.mkdir()
    (dropins / "counting.py").write_text(textwrap.dedent(COUNTING_PLUGIN))
    pm = make_plugin_manager([dropins], load_entrypoints=False)
    first = transport_modes(pm)["counted"]
    for _ in range(3):
        assert transport_modes(pm)["counted"] is first
        assert transport_mode_plugins(pm) == {"counted": "counting"}
    assert len(sys.modules["vbrd_dropin_counting"].BUILT) == 1


def test_two_plugins_providing_one_mode_name_are_named(tmp_path):
    import pytest

    from vbrd.errors import ConfigError

    dropins = tmp_path / "plugins.d"
    dropins.mkdir()
    for name in ("one", "two"):
        (dropins / f"{name}.py").write_text(textwrap.dedent(GOOD_PLUGIN.replace(
            "from .mode import EchoMode", "class EchoMode:\n    name = 'echo'")))
    pm = make_plugin_manager([dropins], load_entrypoints=False)
    with pytest.raises(ConfigError, match="two plugins provide a transport mode of this "
                                          "name: (one and two|two and one)"):
        transport_modes(pm)
