"""The configuration refuses what it cannot use, and says exactly where and why."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MINIMAL_CONFIG
from vbrd.config import load_config, parse_rate, parse_schedule, parse_size
from vbrd.errors import ConfigError


def test_minimal_config_loads_with_defaults(write_config):
    config = load_config(write_config(MINIMAL_CONFIG))
    job = config.jobs["nightly"]
    assert job.transport == "auto" and job.transport_order == ("san", "hotadd", "nbd")
    assert job.cbt and job.retention_points == 7
    assert config.repositories["default"].block_size == 1 << 20
    assert config.daemon.state_dir == config.path.parent / "state"
    assert config.vcenters["lab"].password.reveal() == "s3cret-vc-pass"
    assert config.daemon.stall_timeout == 300.0


def test_secrets_never_show_in_reprs(write_config):
    config = load_config(write_config(MINIMAL_CONFIG))
    assert "s3cret-vc-pass" not in repr(config)
    assert "s3cret-vc-pass" not in str(config.vcenters["lab"])


def test_password_from_environment(write_config):
    body = MINIMAL_CONFIG.replace('password_file = "secrets/vcenter-password"',
                                  'password_env = "VC_PASS"')
    config = load_config(write_config(body), env={"VC_PASS": "from-env"})
    assert config.vcenters["lab"].password.reveal() == "from-env"


@pytest.mark.parametrize(("change", "key", "reason"), [
    (("[jobs.nightly]", "[jobs.nightly]\ncolour = \"blue\""), "jobs.nightly.colour",
     "unknown key"),
    (("max_tasks = 2", "max_tasks = \"two\""), "proxies.local.max_tasks", "must be an integer"),
    (("max_tasks = 2", "max_tasks = 0"), "proxies.local.max_tasks", "must be positive"),
    (('password_file = "secrets/vcenter-password"', 'password_file = "secrets/missing"'),
     "vcenters.lab.password_file", "cannot read"),
    (('password_file = "secrets/vcenter-password"', 'password = "inline"'),
     "vcenters.lab.password", "not accepted inline"),
    (('repository = "default"', 'repository = "elsewhere"'), "jobs.nightly.repository",
     "no repository named 'elsewhere'"),
    (('vms = ["linux-vm"]', 'vms = ["linux-vm"]\nschedule = "sometimes"'),
     "jobs.nightly.schedule", "not a schedule"),
    (('vms = ["linux-vm"]', 'vms = ["linux-vm"]\ntransport = "Carrier Pigeon!"'),
     "jobs.nightly.transport", "is not a transport mode name"),
    (('path = "repo"', 'path = "repo"\nblock_size = "3MiB"'),
     "repositories.default.block_size", "power of two"),
    (('vms = ["linux-vm"]', 'vms = ["linux-vm"]\n[jobs.nightly.guest]\n'
                            'networks = ["10.0.0.0/8", "10.1.2.0/33"]'),
     "jobs.nightly.guest.networks[1]", "not a network"),
    (("[daemon]", '[daemon]\nstall_timeout = "0s"'), "daemon.stall_timeout",
     "must be a positive duration"),
    (("[daemon]", '[daemon]\nstall_timeout = "soon"'), "daemon.stall_timeout",
     "not a duration"),
])
def test_invalid_values_name_file_key_and_reason(write_config, change, key, reason):
    old, new = change
    path = write_config(MINIMAL_CONFIG.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key
    assert reason in err.value.reason
    assert str(path) in str(err.value)
    assert "inline" not in str(err.value) or "password" in key


def test_bad_toml_names_file_and_line(write_config):
    path = write_config(MINIMAL_CONFIG + "\n[jobs.broken\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "not valid TOML" in str(err.value)
    assert "line" in str(err.value)


def test_daemon_refuses_to_start_on_invalid_config_with_exit_code_2(write_config):
    path = write_config(MINIMAL_CONFIG.replace("max_tasks = 2", "max_tasks = \"two\""))
    proc = subprocess.run([sys.executable, "-m", "vbrd.cli.vbrd", "run", "--config",
                           str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "proxies.local.max_tasks" in proc.stderr


def test_daemon_exit_2_for_a_missing_config(tmp_path: Path):
    missing = tmp_path / "nope.toml"
    proc = subprocess.run([sys.executable, "-m", "vbrd.cli.vbrd", "run", "--config",
                           str(missing)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no such file" in proc.stderr and str(missing) in proc.stderr


def test_units_and_schedules():
    assert parse_size("4MiB") == 4 << 20 and parse_size("1GB") == 10**9
    assert parse_rate("20MB/s") == 20e6
    daily = parse_schedule("daily 22:30")
    assert daily and daily.kind == "daily" and daily.at_minute == 22 * 60 + 30
    weekly = parse_schedule("weekly sun 03:00")
    assert weekly and weekly.weekday == 6
    every = parse_schedule("every 30m")
    assert every and every.interval == 1800
    assert parse_schedule("") is None


def test_a_plugin_table_no_plugin_owns_is_refused(write_config):
    from vbrd.engine import validate_plugin_tables
    from vbrd.plugins import make_plugin_manager

    config = load_config(write_config(MINIMAL_CONFIG + '\n[plugins.nosuch]\nx = 1\n'))
    with pytest.raises(ConfigError) as err:
        validate_plugin_tables(config, make_plugin_manager())
    assert err.value.key == "plugins.nosuch" and "no loaded plugin" in err.value.reason


def test_a_plugin_validates_its_own_table(write_config):
    from vbrd.engine import validate_plugin_tables
    from vbrd.plugins import make_plugin_manager

    config = load_config(write_config(
        MINIMAL_CONFIG + '\n[plugins.guest_windows]\ntransport = "carrier-pigeon"\n'))
    with pytest.raises(ConfigError) as err:
        validate_plugin_tables(config, make_plugin_manager())
    assert err.value.key == "plugins.guest_windows" and "carrier-pigeon" in err.value.reason


def test_guest_networks_are_parsed_as_networks(write_config):
    body = MINIMAL_CONFIG.replace('vms = ["linux-vm"]', 'vms = ["linux-vm"]\n'
                                  '[jobs.nightly.guest]\nnetworks = ["10.20.0.0/16", '
                                  '"2001:db8::/32", "192.0.2.7"]', 1)
    guest = load_config(write_config(body)).jobs["nightly"].guest
    assert [str(n) for n in guest.networks] == ["10.20.0.0/16", "2001:db8::/32",
                                                 "192.0.2.7/32"]
