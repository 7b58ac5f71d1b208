"""The lab's private files: written as new files, never through a link someone planted."""
from __future__ import annotations

import os
import stat

import pytest

from vbrd.lab.private import PrivateDirError, claim_dir, read_private, write_private


def test_a_symbolic_link_planted_at_a_secret_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("the file the link points at\n")
    secret = tmp_path / "api-token"
    secret.symlink_to(victim)
    write_private(secret, "t0ken\n")
    assert victim.read_text() == "the file the link points at\n"
    assert not secret.is_symlink()
    assert secret.read_text() == "t0ken\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_someone_holding_the_old_file_open_does_not_see_the_new_secret(tmp_path):
    secret = tmp_path / "password"
    write_private(secret, "old\n")
    with open(secret) as held:
        write_private(secret, "new\n")
        assert held.read() == "old\n"
    assert read_private(secret) == "new\n"


def test_reading_a_lab_file_does_not_follow_a_link(tmp_path):
    (tmp_path / "link").symlink_to("/etc/hostname")
    with pytest.raises(OSError):
        read_private(tmp_path / "link")


def test_a_directory_made_for_the_lab_is_0700_and_one_others_may_write_is_refused(tmp_path):
    made = claim_dir(tmp_path / "lab")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(PrivateDirError, match="writable by others"):
        claim_dir(open_dir)
