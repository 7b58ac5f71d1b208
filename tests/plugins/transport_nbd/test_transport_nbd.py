"""The nbd mode: the chain over vCenter's datastore HTTP access.

What every mode must do is in tests/plugins/test_transport_contract.py; here is what is
particular to reading over the network: auth, TLS, requests in flight, URLs.
"""
from __future__ import annotations

import hashlib
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp import web

from plugins.transport_nbd.mode import IN_FLIGHT, DatastoreHttpSpace, NbdMode
from tests.vmdk_support import (
    SampleDisk,
    convert,
    make_raw,
    make_sample_datastore,
    serve_datastores,
)
from vbrd.errors import TransportError
from vbrd.models import DatastoreFile, DiskTask, ProxyContext, Secret, VmRef

pytestmark = pytest.mark.asyncio(loop_scope="session")

MiB = 1 << 20
USER, PASSWORD = "backup@vsphere.local", "s3cret"


def task_for(path: str, datastore: str = "DS1") -> DiskTask:
    return DiskTask(
        session_id="session-1", vm=VmRef("web server", "vm-9"), disk_key=2000,
        label="Hard disk 1", capacity=0, backing=DatastoreFile(datastore, path),
        datacenter="DC0",
    )


def context_for(url: str, password: str = PASSWORD, verify_tls: bool = True) -> ProxyContext:
    return ProxyContext(
        proxy="proxy-1", vcenter_url=url, vcenter_user=USER, vcenter_password=Secret(password),
        verify_tls=verify_tls,
    )


@pytest.fixture(scope="module")
def datastore(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, SampleDisk]]:
    root = tmp_path_factory.mktemp("ds1")
    return root, make_sample_datastore(root)


async def test_a_large_read_keeps_several_range_requests_in_flight(tmp_path: Path) -> None:
    (tmp_path / "vm").mkdir()
    raw = make_raw(tmp_path / "disk.raw", 16 * MiB, [(0, b"\x5a" * (16 * MiB))])
    convert(raw, tmp_path / "vm" / "disk.vmdk", "monolithicFlat")

    async with serve_datastores({"DS1": tmp_path}, USER, PASSWORD) as server:
        reader = await NbdMode().open(task_for("vm/disk.vmdk"), context_for(server.url))
        try:
            server.latency = 0.05
            started = time.monotonic()
            data = await reader.read(0, 16 * MiB)
            elapsed = time.monotonic() - started
        finally:
            await reader.close()

    assert data == b"\x5a" * (16 * MiB)
    assert 4 <= server.max_in_flight <= IN_FLIGHT
    assert elapsed < 16 * 0.05  # sixteen 1 MiB requests, not one after another


async def test_wrong_credentials_are_reported_as_refused_access(
    datastore: tuple[Path, dict[str, SampleDisk]],
) -> None:
    async with serve_datastores({"DS1": datastore[0]}, USER, PASSWORD) as server:
        result = await NbdMode().probe(task_for("vm1/flat.vmdk"), context_for(server.url, "nope"))
    assert not result.usable
    assert "[DS1] vm1/flat.vmdk" in result.reason
    assert "HTTP 401" in result.reason


async def test_an_unreachable_vcenter_is_reported_with_the_disk(unused_tcp_port: int) -> None:
    result = await NbdMode().probe(
        task_for("vm1/flat.vmdk"), context_for(f"http://127.0.0.1:{unused_tcp_port}/sdk")
    )
    assert not result.usable
    assert "[DS1] vm1/flat.vmdk" in result.reason
    assert "connect" in result.reason.lower()


async def test_no_vcenter_url_means_no_network_mode() -> None:
    result = await NbdMode().probe(task_for("vm1/flat.vmdk"), ProxyContext(proxy="proxy-1"))
    assert not result.usable
    assert "no vCenter URL" in result.reason


async def test_a_server_that_ignores_ranges_is_not_downloaded_whole(
    unused_tcp_port: int,
) -> None:
    async def whole_file(request: web.Request) -> web.Response:
        return web.Response(body=b"# Disk DescriptorFile\n" + bytes(100_000))

    app = web.Application()
    app.router.add_get("/folder/{path:.+}", whole_file)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        result = await NbdMode().probe(
            task_for("vm/disk.vmdk"), context_for(f"http://127.0.0.1:{unused_tcp_port}/sdk")
        )
    finally:
        await runner.cleanup()
    assert not result.usable
    assert "ignores Range" in result.reason


async def test_folders_and_files_with_spaces_and_symbols_are_fetched(tmp_path: Path) -> None:
    folder = tmp_path / "web server #2"
    folder.mkdir()
    raw = make_raw(tmp_path / "d.raw", 2 * MiB, [(12345, b"\x42" * 777)])
    convert(raw, folder / "web server #2 & more.vmdk", "monolithicSparse")

    async with serve_datastores({"Local DS 1": tmp_path}, USER, PASSWORD) as server:
        reader = await NbdMode().open(
            task_for("web server #2/web server #2 & more.vmdk", "Local DS 1"),
            context_for(server.url),
        )
        try:
            data = await reader.read(0, reader.size)
        finally:
            await reader.close()
    assert hashlib.sha256(data).digest() == hashlib.sha256(raw.read_bytes()).digest()


def self_signed(directory: Path) -> ssl.SSLContext:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def test_tls_is_verified_unless_the_proxy_context_says_otherwise(
    datastore: tuple[Path, dict[str, SampleDisk]], tmp_path: Path
) -> None:
    server_tls = self_signed(tmp_path)
    async with serve_datastores({"DS1": datastore[0]}, USER, PASSWORD,
                                ssl_context=server_tls) as server:
        assert server.url.startswith("https://")
        verified = await NbdMode().probe(task_for("vm1/flat.vmdk"), context_for(server.url))
        unverified = await NbdMode().probe(
            task_for("vm1/flat.vmdk"), context_for(server.url, verify_tls=False)
        )
    assert not verified.usable
    assert "certificate" in verified.reason.lower()
    assert unverified.usable


async def test_names_in_descriptors_become_datastore_paths() -> None:
    space = DatastoreHttpSpace(None, "https://vc.example/sdk", "DC0")  # type: ignore[arg-type]
    base = "[DS1] vm/vm-000001.vmdk"

    assert space.resolve(base, "vm.vmdk") == "[DS1] vm/vm.vmdk"
    assert space.resolve(base, "../template/t.vmdk") == "[DS1] template/t.vmdk"
    assert space.resolve(base, "/vmfs/volumes/gold/template/t.vmdk") == "[gold] template/t.vmdk"
    with pytest.raises(TransportError, match="on no datastore"):
        space.resolve(base, "/home/someone/t.vmdk")
    assert str(space.url("[Local DS] web server/disk 1.vmdk")) == (
        "https://vc.example/folder/web%20server/disk%201.vmdk?dcPath=DC0&dsName=Local+DS"
    )
