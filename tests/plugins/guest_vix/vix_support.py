"""A rig for the vix processor on the lab's VMs: the simulator's Guest Operations API runs
programs in the sandbox of ``linux-vm`` and ``windows-vm``, which is also the root of their
network guests, so the same marker folders work for every way in."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import plugins.guest_vix
from tests.plugins.guest_support import (
    RecordingContext,
    Rig,
    make_context,
    processor_from_plugin,
    windows_host_path,
    write_config,
)
from vbrd.config import Config
from vbrd.lab import lab as labctl
from vbrd.lab.guests import GuestEndpoint
from vbrd.models import VmRef
from vbrd.vsphere import VSphere

VIX = processor_from_plugin(plugins.guest_vix, "vix")
VM_OF_FAMILY = {"linux": "linux-vm", "windows": "windows-vm"}


def lab_vm(lab: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in lab["vms"] if v["name"] == name)


def vm_ref(lab: dict[str, Any], name: str) -> VmRef:
    entry = lab_vm(lab, name)
    return VmRef(name, entry["moref"], entry["guest_family"], uuid=entry["uuid"],
                 ip_addresses=(entry["ip"],) if entry["ip"] else (),
                 tools_running=entry["tools_running"], power_state=entry["power_state"])


def vix_account(lab: dict[str, Any], name: str) -> GuestEndpoint:
    """The VM's guest account as the simulator's guest operations accept it."""
    entry = lab_vm(lab, name)
    vix = entry["vix"]
    return GuestEndpoint(kind="vix", host=entry["ip"], port=0, user=vix["user"],
                         password_file=vix["password_file"], pid=0, root=vix["sandbox"])


def lab_config(lab: dict[str, Any], directory: Path, family: str, table: dict[str, Any]
               ) -> Config:
    account = vix_account(lab, VM_OF_FAMILY[family])
    accounts = {"linux": account} if family == "linux" else {"windows": account}
    vc = lab["vcenter"]
    return write_config(directory, guest=table, vcenter={
        "url": vc["url"], "user": vc["user"], "password": vc["password"]}, **accounts)


@asynccontextmanager
async def lab_vix_rig(request: pytest.FixtureRequest, tmp_path: Path, family: str
                      ) -> AsyncIterator[Rig]:
    lab = request.getfixturevalue("lab")
    name = VM_OF_FAMILY[family]
    sandbox = Path(lab_vm(lab, name)["vix"]["sandbox"])
    connections: list[VSphere] = []

    def configure(table: dict[str, Any]) -> RecordingContext:
        config = lab_config(lab, tmp_path / "config", family, table)
        vsphere = VSphere(config.vcenters["lab"])
        connections.append(vsphere)
        return make_context(config, vsphere)

    def to_host(path: str) -> Path:
        if family == "windows" and ":" in path:
            return windows_host_path(sandbox, path)
        return Path(path) if Path(path).is_relative_to(sandbox) else sandbox / path.lstrip("/")

    async def break_connection(ctx: RecordingContext) -> None:
        labctl.set_tools_running(lab.dir, name, False)

    # off-vm is powered off; as a VM of the rig's family it needs the rig's credentials only
    off = vm_ref(lab, "off-vm")
    unreachable = VmRef(off.name, off.moref, family, power_state=off.power_state)
    try:
        yield Rig(VIX, family, vm_ref(lab, name), sandbox, tmp_path, configure, to_host,
                  unreachable, break_connection,
                  lambda: labctl.set_tools_running(lab.dir, name, True),
                  Path(vix_account(lab, name).password_file).read_text().strip())
    finally:
        for vsphere in connections:
            await vsphere.close()
