"""A job's VMs are resolved at each run, from names or from where they live in vCenter."""
from __future__ import annotations

import dataclasses

import pytest

from tests.integration.backup_support import job, lab_config
from vbrd.config import load_config
from vbrd.vsphere import VSphere

pytestmark = pytest.mark.lab


async def selected(config_path, **selection) -> tuple[list[str], list[str]]:
    config = load_config(config_path)
    base = config.jobs["lab-san"]
    wanted = dataclasses.replace(base, **{"vms": (), **selection})
    vsphere = VSphere(config.vcenters["lab"])
    try:
        vms, problems = await vsphere.select_vms(wanted)
    finally:
        await vsphere.close()
    return sorted(v.ref.name for v in vms), problems


@pytest.fixture
def config(lab, tmp_path):
    return lab_config(lab, tmp_path)


async def test_by_host_picks_what_runs_there(config, lab):
    host_of = {v["name"]: v["host"] for v in lab["vms"]}
    names, problems = await selected(config, hosts=("DC0_C0_H1",))
    assert problems == []
    assert names and all(n in host_of for n in names)
    everything, _ = await selected(config, clusters=("DC0_C0",))
    assert set(names) < set(everything)


async def test_by_cluster_with_exclusions(config):
    names, _ = await selected(config, clusters=("DC0_C0",), exclude=("vbrd-*", "*-disk-*"))
    assert names == ["linux-vm", "off-vm", "windows-vm"]


async def test_by_resource_pool(config):
    names, _ = await selected(config, resource_pools=("Resources",),
                              exclude=("vbrd-proxy",))
    assert {"linux-vm", "windows-vm", "two-disk-vm", "off-vm"} <= set(names)


async def test_unknown_names_are_reported_not_crashed_on(config):
    names, problems = await selected(config, vms=("linux-vm", "no-such-vm"))
    assert names == ["linux-vm"]
    assert problems == ["VM 'no-such-vm' was not found in vCenter lab"]


async def test_a_job_of_only_unknown_vms_fails_with_the_reason(lab, tmp_path):
    from tests.integration.backup_support import run_job

    path = lab_config(lab, tmp_path, job("ghosts", ["ghost-vm"]))
    status, events = await run_job(path, "ghosts")
    assert status == "failed"
    finished = events[-1]
    assert finished["type"] == "session.finished" and "ghost-vm" in finished["reason"]


async def test_templates_are_reported_and_skipped(config):
    from pyVmomi import vim

    settings = load_config(config)
    vsphere = VSphere(settings.vcenters["lab"])
    try:
        vms, _ = await vsphere.select_vms(settings.jobs["lab-san"])
        off = next(v for v in vms if v.ref.name == "off-vm")
        host = next(h for h in (await vsphere.call(lambda: vsphere.content.viewManager
                                .CreateContainerView(vsphere.content.rootFolder,
                                                     [vim.HostSystem], True).view))
                    if h.name == off.host)
        await vsphere.call(off.obj.MarkAsTemplate)
        try:
            names, problems = await selected(config, vms=("linux-vm", "off-vm"))
        finally:
            await vsphere.call(off.obj.MarkAsVirtualMachine, host.parent.resourcePool, host)
    finally:
        await vsphere.close()
    assert names == ["linux-vm"]
    assert problems == ["VM 'off-vm' is a template and cannot be snapshotted; skipped"]
