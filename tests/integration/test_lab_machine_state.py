"""What the lab leaves on the machine and where it writes: its directory is private to the
user running it, and the Linux guest's machine state (a system user with passwordless sudo)
goes away with the last lab.

The machine-state tests use a user, sudoers file and state directory of their own (the
module's names, pointed elsewhere), so that labs running beside them keep theirs.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vbrd.errors import GuestError, VbrdError
from vbrd.lab import cli as labcli
from vbrd.lab import guests
from vbrd.lab import lab as labctl
from vbrd.lab.private import PrivateDirError

pytestmark = pytest.mark.lab


class Machine:
    """The names of the machine state the lab's Linux guest makes, for one test."""

    def __init__(self, root: Path) -> None:
        self.user = f"vbrdt{secrets.token_hex(4)}"
        self.state_dir = root / "var-lib-vbrd-lab"
        self.sudoers = Path("/etc/sudoers.d") / f"vbrd-lab-test-{self.user}"

    def user_exists(self) -> bool:
        try:
            pwd.getpwnam(self.user)
        except KeyError:
            return False
        return True

    def left_behind(self) -> list[str]:
        return ([f"user {self.user}"] if self.user_exists() else []) + [
            str(p) for p in (self.sudoers, self.state_dir) if p.exists()]


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Machine]:
    if os.geteuid() != 0:
        pytest.fail("the lab's Linux guest needs root")
    m = Machine(tmp_path_factory.mktemp("machine"))
    monkeypatch.setattr(guests, "LINUX_USER", m.user)
    monkeypatch.setattr(guests, "MACHINE_STATE_DIR", m.state_dir)
    monkeypatch.setattr(guests, "MACHINE_PASSWORD_FILE", m.state_dir / "vbrdguest-password")
    monkeypatch.setattr(guests, "HOLDERS_DIR", m.state_dir / "holders")
    monkeypatch.setattr(guests, "SUDOERS_FILE", m.sudoers)
    monkeypatch.setattr(guests, "MACHINE_LOCK", m.state_dir.parent / "machine.lock")
    try:
        yield m
    finally:
        if m.user_exists():
            subprocess.run(["userdel", "--remove", m.user], capture_output=True)
        m.sudoers.unlink(missing_ok=True)


def test_the_machine_state_goes_with_the_last_linux_guest(machine, tmp_path):
    first = guests.start_linux_guest(tmp_path / "lab-1")
    second = guests.start_linux_guest(tmp_path / "lab-2")
    assert machine.user_exists() and machine.sudoers.exists()

    guests.stop_guest(first)
    assert machine.user_exists(), "the second guest still logs its user in"
    assert machine.sudoers.exists()

    guests.stop_guest(second)
    assert machine.left_behind() == []


def test_after_the_last_lab_down_its_user_sudo_rule_and_state_are_gone(machine, tmp_path):
    lab_dir = tmp_path / "lab"
    info = labctl.up(lab_dir, disk_scale=0.1)
    assert info.exists() and machine.user_exists() and machine.sudoers.exists()
    labctl.down(lab_dir)
    assert not lab_dir.exists()
    assert machine.left_behind() == []


def test_lab_cleanup_refuses_while_a_lab_holds_the_state_and_removes_it_after(
        machine, tmp_path, capsys):
    lab_dir = tmp_path / "lab"
    endpoint = guests.start_linux_guest(lab_dir)
    assert labcli.main(["lab", "cleanup"]) != 0
    assert f"the Linux guest in {lab_dir}" in capsys.readouterr().err
    assert machine.user_exists()
    with pytest.raises(GuestError, match="still in use"):
        labctl.cleanup()

    # the lab's directory is deleted without `vbrd lab down`: nothing holds the state now
    guests._terminate(endpoint.pid)
    shutil.rmtree(lab_dir)
    assert machine.user_exists()
    assert labcli.main(["lab", "cleanup"]) == 0
    assert f"the user {machine.user}" in capsys.readouterr().out
    assert machine.left_behind() == []
    assert labcli.main(["lab", "cleanup"]) == 0
    assert "nothing to remove" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# the lab's directory


def test_a_lab_directory_another_user_made_is_refused_and_left_alone(tmp_path):
    planted = tmp_path / "vbrd-lab"
    planted.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(planted, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(PrivateDirError, match="belongs to user nobody") as refused:
        labctl.up(planted, guests=False)
    assert str(planted) in str(refused.value)
    assert list(planted.iterdir()) == [] and planted.stat().st_uid == nobody.pw_uid


def test_a_lab_directory_that_is_a_symbolic_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "vbrd-lab"
    link.symlink_to(elsewhere)
    with pytest.raises(PrivateDirError, match="symbolic link"):
        labctl.up(link, guests=False)
    assert list(elsewhere.iterdir()) == []


def test_a_lab_directory_below_a_directory_others_may_write_to_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone could swap the lab directory for their own
    with pytest.raises(VbrdError, match="writable by others"):
        labctl.up(shared / "vbrd-lab", guests=False)
    assert not (shared / "vbrd-lab").exists()


def test_the_default_lab_directory_is_private_and_not_below_tmp():
    assert not labctl.DEFAULT_DIR.is_relative_to("/tmp")
    if os.geteuid() == 0:
        assert labctl.DEFAULT_DIR == Path("/run/vbrd-lab")
