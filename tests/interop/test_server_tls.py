"""STARTTLS with X.509 against real clients (nbdinfo, nbdcopy, qemu-img), optional and required."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nbdcore.aio.server import ExportConfig, NBDServer
from nbdcore.storage.image import Image
from nbdcore.tls import server_context
from tests.peers import tool

pytestmark = pytest.mark.interop

MiB = 1 << 20


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, laid out
    as libnbd and qemu expect (ca-cert.pem, client-cert.pem, client-key.pem...)."""
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        cwd=d,
    )
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={who}",
            "-keyout",
            f"{who}-key.pem",
            "-out",
            f"{who}.csr",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{who}.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            "-out",
            f"{who}-cert.pem",
            cwd=d,
        )
    return d


async def run(*cmd: str) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out


@pytest.fixture
async def image(tmp_path: Path) -> AsyncIterator[Image]:
    img = Image.create(tmp_path / "disk.raw", 8 * MiB)
    img.add_bitmap("b0")
    img.write(b"\x5a" * MiB, 2 * MiB)
    yield img
    img.close()


async def serve(image: Image, pki: Path, required: bool) -> tuple[NBDServer, int]:
    ctx = server_context(
        str(pki / "server-cert.pem"),
        str(pki / "server-key.pem"),
        str(pki / "ca-cert.pem"),
        require_client_cert=True,
    )
    srv = NBDServer([ExportConfig("disk", image)], tls=ctx, tls_required=required)
    _, port = await srv.start_tcp("127.0.0.1", 0)
    return srv, port


async def test_tls_required(image: Image, pki: Path, tmp_path: Path) -> None:
    srv, port = await serve(image, pki, required=True)
    try:
        tls_uri = f"nbds://localhost:{port}/disk?tls-certificates={pki}"
        rc, out = await run(tool("nbdinfo"), "--map=qemu:dirty-bitmap:b0", tls_uri)
        assert rc == 0, out
        assert b"2097152     1048576    1  dirty" in out
        # Without TLS the server refuses everything but STARTTLS.
        rc, out = await run(tool("nbdinfo"), f"nbd://localhost:{port}/disk")
        assert rc != 0
        # Data integrity over TLS (the raw file's sendfile path cannot be used there).
        copy = tmp_path / "copy.raw"
        rc, out = await run(tool("nbdcopy"), tls_uri, str(copy))
        assert rc == 0, out
        assert copy.read_bytes() == image.read(0, image.size)
    finally:
        await srv.close()


async def test_tls_optional_and_qemu(image: Image, pki: Path) -> None:
    srv, port = await serve(image, pki, required=False)
    try:
        rc, out = await run(tool("nbdinfo"), "--size", f"nbd://localhost:{port}/disk")
        assert rc == 0 and out.strip() == str(8 * MiB).encode()
        rc, out = await run(
            tool("qemu-io"),
            "--object",
            f"tls-creds-x509,id=tls0,endpoint=client,dir={pki}",
            "--image-opts",
            f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
            "export=disk,tls-creds=tls0",
            "-c",
            "write -P 0x77 5M 64k",
            "-c",
            "read -P 0x77 5M 64k",
            "-c",
            "read -P 0x5a 2M 4k",
        )
        assert rc == 0 and b"failed" not in out, out
        assert image.read(5 * MiB, 3) == b"\x77" * 3
        dirty = list(image.bitmaps["b0"].extents(5 * MiB, 64 * 1024))
        assert dirty == [(5 * MiB, 64 * 1024, 1)]
    finally:
        await srv.close()


async def test_client_without_certificate_is_refused(
    image: Image, pki: Path, tmp_path: Path
) -> None:
    only_ca = tmp_path / "only-ca"
    only_ca.mkdir()
    (only_ca / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
    srv, port = await serve(image, pki, required=True)
    try:
        rc, _ = await run(
            tool("nbdinfo"), f"nbds://localhost:{port}/disk?tls-certificates={only_ca}"
        )
        assert rc != 0
        # The server survives the failed handshake.
        rc, out = await run(
            tool("nbdinfo"), "--size", f"nbds://localhost:{port}/disk?tls-certificates={pki}"
        )
        assert rc == 0, out
    finally:
        await srv.close()
