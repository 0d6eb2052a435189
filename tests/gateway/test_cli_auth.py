"""The connection flags of the gateway commands: ``--token`` / ``$NBDGW_TOKEN`` travel as
``authorization: Bearer``, ``--tls-ca`` (and a client certificate) speak TLS. The gateway does
not check tokens or speak TLS yet, so a small grpc.aio server plays it here: it answers
ListExports only to a caller with the right token."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from tests.gateway.cli_support import assert_one_line_error, cli
from tests.peers import tool

TOKEN = "s3cret-token"


class Guarded(pb_grpc.BitmapServiceServicer):
    def __init__(self) -> None:
        self.seen: list[str | None] = []

    async def ListExports(self, request: Any, context: Any) -> pb.ListExportsResponse:
        auth = dict(context.invocation_metadata()).get("authorization")
        self.seen.append(auth)
        if auth != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
        return pb.ListExportsResponse(exports=[pb.Export(name="exports/guarded", size_bytes=512)])


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    openssl = tool("openssl")
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem")
    )

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
        "-out", str(ca), "-days", "2", "-subj", "/CN=nbdgw test CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:gateway.test\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[tuple[Guarded, str, str, Path]]:
    """(servicer, plaintext target, TLS target, CA file)."""
    ca, cert, key = make_certs(tmp_path)
    servicer = Guarded()
    server = grpc.aio.server()
    pb_grpc.add_BitmapServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    tls_port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}", f"127.0.0.1:{tls_port}", ca
    finally:
        await server.stop(0)


async def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # The command runs its own event loop: give it a thread.
    return await asyncio.to_thread(cli, *args)


async def test_token_flag_and_env(
    guarded: tuple[Guarded, str, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    servicer, target, _, _ = guarded
    ok = await run_cli("exports", "--target", target, "--token", TOKEN, "--json")
    assert ok.returncode == 0, ok.stderr
    assert '"exports/guarded"' in ok.stdout

    line = assert_one_line_error(await run_cli("exports", "--target", target), 1)
    assert line == "nbdgw exports: UNAUTHENTICATED: missing or wrong token"
    monkeypatch.setenv("NBDGW_TOKEN", TOKEN)
    monkeypatch.setenv("NBDGW_TARGET", target)
    assert (await run_cli("exports")).returncode == 0
    assert servicer.seen == [f"Bearer {TOKEN}", None, f"Bearer {TOKEN}"]


async def test_tls_with_ca(guarded: tuple[Guarded, str, str, Path]) -> None:
    servicer, _, tls_target, ca = guarded
    args = ["exports", "--target", tls_target, "--token", TOKEN]
    ok = await run_cli(*args, "--tls-ca", str(ca))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[1].split()[0] == "guarded"
    # The certificate names 127.0.0.1 and gateway.test; asking for another name fails.
    named = await run_cli(*args, "--tls-ca", str(ca), "--tls-server-name", "gateway.test")
    assert named.returncode == 0, named.stderr
    line = assert_one_line_error(
        await run_cli(
            *args, "--tls-ca", str(ca), "--tls-server-name", "other.test", "--timeout", "5"
        ),
        1,
    )
    assert "UNAVAILABLE" in line
    # Plaintext against the TLS port: one line, not a hang.
    line = assert_one_line_error(await run_cli(*args, "--timeout", "5"), 1)
    assert "UNAVAILABLE" in line or "DEADLINE_EXCEEDED" in line
    assert len(servicer.seen) == 2
    assert os.environ.get("NBDGW_TOKEN") is None
