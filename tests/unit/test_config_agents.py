"""Proxies and repositories on other hosts, and the agent's own config: what is accepted,
and what is refused with the file, key and reason."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.conftest import MINIMAL_CONFIG
from vbrd.config import load_agent_config, load_config
from vbrd.errors import ConfigError

FINGERPRINT = "sha256:" + "4f0c" * 16
SECRET = "0123456789abcdef0123456789abcdef"

REMOTE = MINIMAL_CONFIG + f"""
[proxies.proxy-a]
address = "10.9.0.11:8471"
fingerprint = "{FINGERPRINT}"
secret_file = "secrets/proxy-a"
max_tasks = 2
network = "proxies"

[repositories.main]
path = "/mnt/main"
address = "[fd00::21]:8471"
fingerprint = "{FINGERPRINT.upper().replace("SHA256", "sha256")}"
secret_env = "MAIN_SECRET"
"""


@pytest.fixture
def remote(write_config, tmp_path: Path):
    (tmp_path / "secrets").mkdir(exist_ok=True)
    (tmp_path / "secrets" / "proxy-a").write_text(SECRET + "\n")

    def write(body: str = REMOTE) -> Path:
        return write_config(body)

    return write


def test_proxies_and_repositories_with_agents_load(remote):
    config = load_config(remote(), env={"MAIN_SECRET": "repository-secret-1234"})
    proxy, repo = config.proxies["proxy-a"], config.repositories["main"]
    assert proxy.agent.remote and proxy.agent.host == "10.9.0.11"
    assert proxy.secret is not None and proxy.secret.reveal() == SECRET
    assert repo.agent.host == "fd00::21"
    assert not config.proxies["local"].agent.remote
    assert config.proxies["local"].agent.host == "local"
    assert SECRET not in repr(config) and "repository-secret-1234" not in repr(config)
    assert {SECRET, "repository-secret-1234"} <= set(config.secrets())


@pytest.mark.parametrize(("change", "key", "reason"), [
    (('address = "10.9.0.11:8471"', 'address = "10.9.0.11"'), "proxies.proxy-a.address",
     "must be \"local\" or the agent's HOST:PORT"),
    ((f'fingerprint = "{FINGERPRINT}"\n', ""), "proxies.proxy-a.fingerprint",
     "`vbrd agent --config FILE --fingerprint`"),
    ((f'fingerprint = "{FINGERPRINT}"', 'fingerprint = "sha1:abcd"'),
     "proxies.proxy-a.fingerprint", "not a certificate fingerprint"),
    (('secret_file = "secrets/proxy-a"\n', ""), "proxies.proxy-a.secret_file",
     "is required"),
    (('secret_file = "secrets/proxy-a"', 'secret = "inline"'), "proxies.proxy-a.secret",
     "not accepted inline"),
    (("[proxies.local]\n", f'[proxies.local]\nfingerprint = "{FINGERPRINT}"\n'),
     "proxies.local.fingerprint", "address is \"local\""),
])
def test_agent_settings_are_checked(remote, change, key, reason):
    old, new = change
    path = remote(REMOTE.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={"MAIN_SECRET": "repository-secret-1234"})
    assert err.value.key == key
    assert reason in err.value.reason
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------------------------
# the agent's own config


def write_agent(tmp_path: Path, body: str, secret: str = SECRET) -> Path:
    (tmp_path / "agent-secret").write_text(secret + "\n")
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(body))
    return path


AGENT = """
[agent]
role = "repository"
listen = "0.0.0.0:8471"
state_dir = "state"
secret_file = "agent-secret"

[repositories.main]
path = "repo"
block_size = "4MiB"
"""


def test_the_agent_config_loads_with_its_defaults(tmp_path):
    settings = load_agent_config(write_agent(tmp_path, AGENT))
    assert settings.state_dir == tmp_path / "state"
    assert settings.certificate == tmp_path / "state" / "agent.crt"
    assert settings.key == tmp_path / "state" / "agent.key"
    assert settings.repositories["main"].path == tmp_path / "repo"
    assert settings.repositories["main"].block_size == 4 << 20
    assert settings.secret.reveal() == SECRET and SECRET not in repr(settings)


PROXY = """
[agent]
role = "proxy"
listen = "0.0.0.0:8471"
state_dir = "state"
secret_file = "agent-secret"
plugin_modules = ["tests.multihost.random_disk"]
device_root = "/srv/proxy-root"

[san_paths]
ds1 = "/mnt/ds1"
nfs-b = "exports/b"
"""


def test_a_proxy_agent_holds_its_own_policy(tmp_path):
    settings = load_agent_config(write_agent(tmp_path, PROXY))
    assert settings.role == "proxy"
    assert settings.plugin_modules == ("tests.multihost.random_disk",)
    assert settings.device_root == "/srv/proxy-root"
    assert settings.san_paths == {"ds1": "/mnt/ds1", "nfs-b": str(tmp_path / "exports" / "b")}
    assert settings.repositories == {}
    defaults = load_agent_config(write_agent(tmp_path, PROXY.replace(
        'device_root = "/srv/proxy-root"\n', "")))
    assert defaults.device_root == "/"


def test_the_shipped_agent_config_is_valid(tmp_path):
    shipped = Path(__file__).resolve().parents[2] / "etc" / "agent.toml"
    text = shipped.read_text().replace("/etc/vbrd/agent-secret", str(tmp_path / "secret"))
    (tmp_path / "secret").write_text(SECRET)
    (tmp_path / "agent.toml").write_text(text)
    assert load_agent_config(tmp_path / "agent.toml").listen == "0.0.0.0:8471"


@pytest.mark.parametrize(("body", "secret", "key", "reason"), [
    (AGENT.replace('state_dir = "state"', 'state_dir = "state"\ncolour = "blue"'), SECRET,
     "agent.colour", "unknown key"),
    (AGENT, "short", "agent.secret_file", "shorter than 16 characters"),
    (AGENT.replace('listen = "0.0.0.0:8471"', 'listen = "everywhere"'), SECRET,
     "agent.listen", "not HOST:PORT"),
    (AGENT.replace('block_size = "4MiB"', 'block_size = "3MiB"'), SECRET,
     "repositories.main.block_size", "power of two"),
    (AGENT.replace('role = "repository"\n', ""), SECRET, "agent.role", "is required"),
    (AGENT.replace('role = "repository"', 'role = "both"'), SECRET, "agent.role",
     "must be one of proxy, repository"),
    (AGENT.replace('role = "repository"', 'role = "proxy"'), SECRET, "repositories",
     "a proxy agent serves no repositories"),
    (AGENT + '[san_paths]\nds = "/mnt/ds"\n', SECRET, "san_paths",
     "only a proxy agent reads datastores"),
    (AGENT.replace('state_dir = "state"', 'state_dir = "state"\nplugin_modules = ["x"]'),
     SECRET, "agent.plugin_modules", "only a proxy agent loads transport plugins"),
    (PROXY.replace('device_root = "/srv/proxy-root"', 'device_root = "proxy-root"'), SECRET,
     "agent.device_root", "must be an absolute path"),
    (PROXY.replace('"tests.multihost.random_disk"', '"../evil"'), SECRET,
     "agent.plugin_modules", "not a module name"),
    (PROXY.replace('ds1 = "/mnt/ds1"', 'ds1 = 7'), SECRET, "san_paths.ds1",
     "must be a string"),
])
def test_the_agent_config_refuses_what_it_cannot_use(tmp_path, body, secret, key, reason):
    path = write_agent(tmp_path, body, secret)
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    assert err.value.key == key
    assert reason in err.value.reason
