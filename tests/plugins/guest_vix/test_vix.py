"""The vix guest processor against the lab's simulated vCenter, whose Guest Operations API
runs programs in each VM's sandbox as the guest account (never elevated, as VMware Tools).
What the contract suite checks for every processor is not repeated."""
from __future__ import annotations

import dataclasses
import pwd
import uuid
from pathlib import Path

import pytest

from tests.plugins.guest_support import make_context, marker_dir, marking, order, script
from tests.plugins.guest_vix.vix_support import VIX, lab_config, lab_vm, vm_ref
from vbrd.errors import GuestError, GuestIdentityError, GuestUnreachable
from vbrd.guestops import transfer_url
from vbrd.lab import lab as labctl
from vbrd.models import Secret
from vbrd.vsphere import VSphere


@pytest.fixture
async def contexts():
    """Contexts with a vCenter connection each, closed at the end."""
    made = []

    def make(config):
        ctx = make_context(config, VSphere(config.vcenters["lab"]))
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        await ctx.vsphere.close()


@pytest.mark.lab
async def test_vix_warns_that_it_cannot_elevate_and_runs_as_the_guest_account(
        lab, tmp_path, contexts):
    markers = marker_dir(Path(lab_vm(lab, "linux-vm")["vix"]["sandbox"]))
    pre = script(tmp_path, "pre-freeze", "linux", marking(markers, "pre-freeze"))
    ctx = contexts(lab_config(lab, tmp_path / "config", "linux",
                              {"elevate": True, "pre_freeze": str(pre)}))
    session = await VIX.connect(vm_ref(lab, "linux-vm"), ctx)
    try:
        await session.prepare()
        await session.freeze()
    finally:
        await session.close()
    account = lab_vm(lab, "linux-vm")["vix"]["run_as"]
    assert (markers / "pre-freeze.uid").read_text().strip() == str(pwd.getpwnam(account).pw_uid)
    warnings = ctx.warnings()
    assert len(warnings) == 1
    assert "VIX runs scripts without elevation (no sudo)" in warnings[0]
    assert "vbrdguest" in warnings[0]


@pytest.mark.lab
async def test_tools_that_are_not_running_make_the_guest_unreachable(lab, tmp_path, contexts):
    ctx = contexts(lab_config(lab, tmp_path / "config", "linux", {}))
    labctl.set_tools_running(lab.dir, "linux-vm", False)
    try:
        with pytest.raises(GuestUnreachable, match="VMware Tools are not running"):
            await VIX.connect(vm_ref(lab, "linux-vm"), ctx)
    finally:
        labctl.set_tools_running(lab.dir, "linux-vm", True)
    session = await VIX.connect(vm_ref(lab, "linux-vm"), ctx)
    await session.close()


@pytest.mark.lab
async def test_a_refused_guest_login_fails_at_connect(lab, tmp_path, contexts):
    config = lab_config(lab, tmp_path / "config", "windows", {})
    creds = config.credentials["windows-guest"]
    config = dataclasses.replace(config, credentials={
        "windows-guest": dataclasses.replace(creds, password=Secret("not-the-password"))})
    ctx = contexts(config)
    with pytest.raises(GuestError, match="refused the login of Administrator") as failure:
        await VIX.connect(vm_ref(lab, "windows-vm"), ctx)
    assert not isinstance(failure.value, GuestUnreachable)


@pytest.mark.lab
async def test_windows_scripts_run_and_log_truncation_is_declined(lab, tmp_path, contexts):
    markers = marker_dir(Path(lab_vm(lab, "windows-vm")["vix"]["sandbox"]))
    pre = script(tmp_path, "pre-freeze", "windows", marking(markers, "pre-freeze"))
    post = script(tmp_path, "post-thaw", "windows", marking(markers, "post-thaw"))
    ctx = contexts(lab_config(lab, tmp_path / "config", "windows", {
        "windows_pre_freeze": str(pre), "windows_post_thaw": str(post),
        "log_handling": "truncate"}))
    session = await VIX.connect(vm_ref(lab, "windows-vm"), ctx)
    try:
        await session.prepare()
        await session.freeze()
        await session.thaw()
        await session.after_backup(True)
    finally:
        await session.close()
    assert order(markers) == ["pre-freeze", "post-thaw"]
    assert "pre-freeze says hello" in ctx.log_text
    assert any("transaction logs were not truncated" in w and "WinRM" in w
               for w in ctx.warnings())


def test_a_transfer_url_with_host_star_goes_to_the_vcenter_host():
    assert (transfer_url("https://*:443/guestFile?id=7&token=a", "https://vc.example/sdk")
            == "https://vc.example:443/guestFile?id=7&token=a")
    assert (transfer_url("https://*/guestFile?id=7", "https://[fd00::5]:8443/sdk")
            == "https://[fd00::5]/guestFile?id=7")
    assert (transfer_url("https://esx-01.example/guestFile?id=7", "https://vc.example/sdk")
            == "https://esx-01.example/guestFile?id=7")


@pytest.mark.lab
async def test_a_moref_that_now_names_another_vm_is_refused_before_anything_runs(
        lab, tmp_path, contexts):
    """The session planned with linux-vm's BIOS UUID; the moref now answers with another
    (the VM was replaced, or the plan is stale): guest operations are not used on it."""
    markers = marker_dir(Path(lab_vm(lab, "linux-vm")["vix"]["sandbox"]))
    pre = script(tmp_path, "pre-freeze", "linux", marking(markers, "pre-freeze"))
    ctx = contexts(lab_config(lab, tmp_path / "config", "linux", {"pre_freeze": str(pre)}))
    planned = dataclasses.replace(vm_ref(lab, "linux-vm"), uuid=str(uuid.uuid4()))
    with pytest.raises(GuestIdentityError) as refused:
        await VIX.connect(planned, ctx)
    assert planned.uuid in str(refused.value)
    assert lab_vm(lab, "linux-vm")["uuid"] in str(refused.value)
    assert order(markers) == []
