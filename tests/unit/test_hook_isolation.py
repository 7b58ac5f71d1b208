"""Each plugin's hook implementation runs on its own: one that raises is logged with its
plugin's name, and the other plugins still get the event, still start, still validate."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import MINIMAL_CONFIG
from vbrd.config import load_config
from vbrd.engine import Engine
from vbrd.events import PhaseStarted
from vbrd.plugins import call_each, make_plugin_manager

RAISING = """
from vbrd import hookimpl

@hookimpl
def vbrd_event(event):
    raise RuntimeError("observer a is broken")

@hookimpl
def vbrd_startup(config):
    raise RuntimeError("startup of a is broken")
"""

RECORDING = """
from pathlib import Path
from vbrd import hookimpl

SEEN = []

@hookimpl
def vbrd_event(event):
    SEEN.append(event.type)

@hookimpl
def vbrd_startup(config):
    Path(config.path).with_name("b-started").write_text("yes")
"""


def dropins(root: Path) -> Path:
    folder = root / "plugins.d"
    folder.mkdir()
    # registered in name order: b is registered after a, so pluggy would call b first; the
    # raising one is tried both before and after the recording one
    (folder / "a_broken.py").write_text(textwrap.dedent(RAISING))
    (folder / "b_recording.py").write_text(textwrap.dedent(RECORDING))
    (folder / "c_broken.py").write_text(textwrap.dedent(RAISING))
    return folder


def test_a_raising_event_observer_is_named_and_the_others_still_get_the_event(
        tmp_path, write_config, caplog):
    folder = dropins(tmp_path)
    config = write_config(MINIMAL_CONFIG.replace(
        "[daemon]\n", f'[daemon]\nplugin_dirs = ["{folder}"]\n'))
    engine = Engine(load_config(config), pm=make_plugin_manager([folder],
                                                                load_entrypoints=False))
    try:
        engine.bus.publish(PhaseStarted(session_id="s", name="snapshot"))
        recorder = sys.modules["vbrd_dropin_b_recording"]
        assert recorder.SEEN == ["phase.started"]
        failures = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert "plugin a_broken failed in hook vbrd_event: RuntimeError: observer a is " \
               "broken" in failures
        assert any(m.startswith("plugin c_broken failed in hook vbrd_event") for m in failures)
    finally:
        engine.close()


def test_a_raising_startup_is_named_and_the_other_plugins_still_start(tmp_path, write_config):
    folder = dropins(tmp_path)
    config = write_config(MINIMAL_CONFIG.replace(
        "[daemon]\n", f'[daemon]\nplugin_dirs = ["{folder}"]\n'))
    proc = subprocess.Popen([sys.executable, "-m", "vbrd.cli.vbrd", "run", "--config",
                             str(config)], stderr=subprocess.PIPE, text=True)
    try:
        marker = tmp_path / "b-started"
        lines = []
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "vbrd is running" in line:
                break
        assert marker.read_text() == "yes", "".join(lines)
        log = "".join(lines)
        assert "plugin a_broken failed in hook vbrd_startup: RuntimeError: startup of a" in log
        assert "plugin c_broken failed in hook vbrd_startup" in log
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_hook_calls_are_traced_with_plugin_and_time_when_asked(tmp_path, monkeypatch,
                                                               caplog):
    caplog.set_level(logging.INFO)
    pm = make_plugin_manager([dropins(tmp_path)], load_entrypoints=False)
    monkeypatch.setenv("VBRD_TRACE_HOOKS", "1")
    call_each(pm, "vbrd_event", event=PhaseStarted(session_id="s", name="snapshot"))
    traced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hook ")]
    assert [t.split(" took")[0] for t in traced] == [
        "hook vbrd_event: plugin c_broken", "hook vbrd_event: plugin b_recording",
        "hook vbrd_event: plugin a_broken"]
    monkeypatch.delenv("VBRD_TRACE_HOOKS")
    caplog.clear()
    call_each(pm, "vbrd_event", event=PhaseStarted(session_id="s", name="snapshot"))
    assert not [r for r in caplog.records if r.getMessage().startswith("hook ")]
