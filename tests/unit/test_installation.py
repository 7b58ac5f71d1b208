"""This installation's id: made once, kept in the state directory, never silently replaced."""
from __future__ import annotations

import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import MINIMAL_CONFIG
from vbrd.config import load_config
from vbrd.engine import Engine
from vbrd.errors import StateError
from vbrd.installation import ID_FILE, is_installation_id, load_or_create


def test_the_first_start_makes_an_id_only_the_daemon_can_read_and_later_starts_keep_it(
        write_config, tmp_path):
    config = load_config(write_config(MINIMAL_CONFIG))
    first = Engine(config)
    first.close()
    second = Engine(config)
    second.close()

    path = tmp_path / "state" / ID_FILE
    assert path.read_text() == first.installation_id + "\n"
    assert is_installation_id(first.installation_id)
    assert second.installation_id == first.installation_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == [], \
        "no temporary file is left"


def test_two_installations_get_different_ids(tmp_path):
    assert load_or_create(tmp_path / "a") != load_or_create(tmp_path / "b")


def test_starts_racing_for_the_first_id_all_end_with_the_same_one(tmp_path):
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.append(load_or_create(tmp_path)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 8 and len(set(ids)) == 1
    assert (tmp_path / ID_FILE).read_text() == ids[0] + "\n"


@pytest.mark.parametrize("content", [b"", b"not-an-id\n", b"0123456789ABCDEF0123456789ABCDEF\n",
                                     b"0123456789abcdef0123456789abcde\n",
                                     b"0123456789abcdef0123456789abcdef0\n", b"\xff" * 4096])
def test_a_damaged_id_is_a_clear_error_and_is_kept_as_it_is(tmp_path, content):
    path = tmp_path / ID_FILE
    path.write_bytes(content)

    with pytest.raises(StateError, match="does not hold an installation id") as raised:
        load_or_create(tmp_path)

    assert str(path) in str(raised.value)
    assert "restore the file from a backup" in str(raised.value)
    assert path.read_bytes() == content, "never replaced: the old id still marks snapshots"


def test_a_symlink_in_place_of_the_id_is_refused(tmp_path):
    (tmp_path / "elsewhere").write_text("0123456789abcdef0123456789abcdef\n")
    (tmp_path / ID_FILE).symlink_to(tmp_path / "elsewhere")

    with pytest.raises(StateError, match="cannot be read"):
        load_or_create(tmp_path)


def test_the_daemon_refuses_to_start_with_a_damaged_id(write_config, tmp_path: Path):
    config = write_config(MINIMAL_CONFIG)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / ID_FILE).write_text("garbage\n")

    run = subprocess.run([sys.executable, "-m", "vbrd.cli.vbrd", "run", "--config",
                          str(config)], capture_output=True, text=True, timeout=60)

    assert run.returncode == 3, "the state directory cannot be used"
    assert f"{tmp_path / 'state' / ID_FILE} does not hold an installation id" in run.stderr
