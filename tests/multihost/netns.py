"""Test hosts on this machine: network namespaces joined by a bridge, one address each.

::

    root namespace (the backup server, .1) ──veth──┐
    <prefix>-pxa  (proxy-a, .11)          ──veth──┤ bridge br0 in <prefix>-sw
    <prefix>-pxb  (proxy-b, .12)          ──veth──┤
    <prefix>-repo (repository host, .21)  ──veth──┘

The namespaces share this machine's file system, so every host sees the lab's datastore
directories (as proxies with direct SAN/NFS access would) and the repository's directory. The
backup server stays in the root namespace, where the lab's vCenter listens on loopback. Each
host's switch port counts the bytes it sends and receives, which is how tests see what really
crossed the network. The subnet is a free 10.213.N.0/24; namespaces are named after this
process, and leftovers of a test run that died are removed first.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import subprocess
from dataclasses import dataclass, field

HOSTS = {"proxy-a": ("pxa", 11), "proxy-b": ("pxb", 12), "repo": ("repo", 21)}
SERVER_HOST = 1
_NAME = re.compile(r"^vbmh(\d+)-")


class NetnsUnavailable(RuntimeError):
    """This machine (or this user) cannot make network namespaces."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def probe() -> None:
    """Raise :class:`NetnsUnavailable` with the reason when namespaces cannot be made here."""
    name = f"vbmh{os.getpid()}-probe"
    try:
        proc = ip("netns", "add", name, check=False)
    except FileNotFoundError:
        raise NetnsUnavailable("iproute2 (`ip`) is not installed") from None
    if proc.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` is not permitted: {proc.stderr.strip()}")
    try:
        made = ip("-n", name, "link", "add", "br-probe", "type", "bridge", check=False)
        if made.returncode != 0:
            raise NetnsUnavailable(f"cannot make a bridge in a namespace: {made.stderr.strip()}")
    finally:
        ip("netns", "del", name, check=False)


def remove_leftovers() -> None:
    """Namespaces (and their links) of test runs whose process is gone."""
    listing = ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            ip("netns", "del", name, check=False)
            ip("link", "del", f"vbmh{m.group(1)}", check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for entry in json.loads(ip("-j", "addr").stdout or "[]"):
        for a in entry.get("addr_info", []):
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}",
                                                 strict=False))
    for route in json.loads(ip("-j", "route").stdout or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(dst, strict=False))
    for n in range(os.getpid() % 200 + 20, 255):
        candidate = ipaddress.IPv4Network(f"10.213.{n}.0/24")
        if not any(candidate.overlaps(u) for u in used if u.version == 4):
            return candidate
    raise RuntimeError("no free 10.213.N.0/24 subnet for the test hosts")


@dataclass
class Network:
    prefix: str = field(default_factory=lambda: f"vbmh{os.getpid()}")
    subnet: ipaddress.IPv4Network = field(default_factory=_free_subnet)
    made: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def namespace(self, host: str) -> str:
        return f"{self.prefix}-{HOSTS[host][0]}"

    def address(self, host: str) -> str:
        number = SERVER_HOST if host == "server" else HOSTS[host][1]
        return str(self.subnet.network_address + number)

    def up(self) -> None:
        self._add_namespace(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        # the backup server: the root namespace, one leg on the bridge
        ip("link", "add", self.prefix, "type", "veth", "peer", "name", "srv", "netns",
           self.switch)
        ip("addr", "add", f"{self.address('server')}/{self.subnet.prefixlen}", "dev",
           self.prefix)
        ip("link", "set", self.prefix, "up")
        self._plug("srv")
        for host, (port, _) in HOSTS.items():
            ns = self.namespace(host)
            self._add_namespace(ns)
            ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            self._plug(port)
            ip("-n", ns, "addr", "add", f"{self.address(host)}/{self.subnet.prefixlen}", "dev",
               "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.made.append(name)

    def _plug(self, port: str) -> None:
        ip("-n", self.switch, "link", "set", port, "master", "br0")
        ip("-n", self.switch, "link", "set", port, "up")

    def down(self) -> None:
        for name in reversed(self.made):
            ip("netns", "del", name, check=False)
        self.made.clear()
        ip("link", "del", self.prefix, check=False)

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(host)]

    def counters(self) -> dict[str, tuple[int, int]]:
        """Per host, ``(bytes sent, bytes received)`` so far, read at its switch port."""
        links = json.loads(ip("-n", self.switch, "-s", "-j", "link", "show").stdout)
        ports = {port: host for host, (port, _) in HOSTS.items()} | {"srv": "server"}
        out: dict[str, tuple[int, int]] = {}
        for link in links:
            host = ports.get(link.get("ifname", "").split("@")[0])
            if host is not None:
                stats = link.get("stats64", {})
                # the port receives what the host sends, and sends what the host receives
                out[host] = (int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"]))
        return out
