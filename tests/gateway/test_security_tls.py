"""gRPC over TLS: mutual TLS identities under the policy, certificates reloaded on change without
a restart, plaintext and unknown clients refused."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import GatewayConfig
from gateway.security.access import AccessInterceptor, Authenticator, Policy, StaticTokens
from gateway.security.certs import CertificateError, CertificateReloader
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from tests.gateway.security_support import bearer, fails, guard, make_pki  # noqa: F401
from tests.gateway.test_service_embedded import make_image

TOKEN = "ops-token-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_pki(d / "one", "nbdgw test CA one", clients=("backup-agent", "intruder"))
    make_pki(d / "two", "nbdgw test CA two", clients=("backup-agent",))
    return d


def client_creds(pki: Path, ca: str, client: str | None, client_ca: str | None = None) -> Any:
    cert = key = None
    if client is not None:
        where = pki / (client_ca or ca)
        cert = (where / f"client-{client}-cert.pem").read_bytes()
        key = (where / f"client-{client}-key.pem").read_bytes()
    return grpc.ssl_channel_credentials(
        (pki / ca / "ca-cert.pem").read_bytes(), private_key=key, certificate_chain=cert
    )


def config(tmp_path: Path) -> GatewayConfig:
    c = GatewayConfig(data_dir=tmp_path / "data")
    c.add_image_export("disk", make_image(tmp_path / "disk.img"))
    c.add_image_export("other", make_image(tmp_path / "other.img"))
    return c


async def test_mutual_tls_identity(tmp_path: Path, pki: Path, guard: Any) -> None:  # noqa: F811
    server_dir = tmp_path / "server"
    shutil.copytree(pki / "one", server_dir)
    reloader = CertificateReloader(
        server_dir / "server-cert.pem", server_dir / "server-key.pem", server_dir / "ca-cert.pem"
    )
    policy = Policy.from_table(
        {
            "identities": {
                "backup-agent": {"exports": ["disk"], "operations": ["list", "extents"]},
                "ops": {"operations": ["list"]},
            }
        }
    )
    interceptor = AccessInterceptor(
        Authenticator(StaticTokens({"ops": TOKEN}), client_certificates=True), policy
    )
    gw = await guard(config(tmp_path), interceptor, reloader.credentials())
    agent = gw.stub(client_creds(pki, "one", "backup-agent"))
    listed = await agent.ListExports(pb.ListExportsRequest())
    assert [e.name for e in listed.exports] == ["exports/disk"]
    msgs = [
        m
        async for m in agent.StreamExtents(pb.StreamExtentsRequest(export="disk", context="backup"))
    ]
    assert msgs[-1].next_offset == msgs[-1].range_end
    f = await fails(agent.GetExport(pb.GetExportRequest(name="other")))
    assert f.code == grpc.StatusCode.PERMISSION_DENIED
    assert f.message == "identity 'backup-agent' may not list export 'other'"
    # A certificate whose CN has no rule: authenticated, allowed nothing.
    intruder = gw.stub(client_creds(pki, "one", "intruder"))
    f = await fails(intruder.GetExport(pb.GetExportRequest(name="disk")))
    assert f.code == grpc.StatusCode.PERMISSION_DENIED and "'intruder'" in f.message
    # A token on a verified connection wins over the certificate; a wrong one fails closed.
    listed = await intruder.ListExports(pb.ListExportsRequest(), metadata=bearer(TOKEN))
    assert len(listed.exports) == 2
    f = await fails(intruder.ListExports(pb.ListExportsRequest(), metadata=bearer("x" * 20)))
    assert f.code == grpc.StatusCode.UNAUTHENTICATED
    # No client certificate, a certificate from another CA, plaintext: no connection at all.
    for creds in (
        client_creds(pki, "one", None),
        client_creds(pki, "one", "backup-agent", client_ca="two"),
    ):
        f = await fails(gw.stub(creds).ListExports(pb.ListExportsRequest(), timeout=5))
        assert f.code == grpc.StatusCode.UNAVAILABLE
    f = await fails(gw.stub().ListExports(pb.ListExportsRequest(), timeout=5))
    assert f.code == grpc.StatusCode.UNAVAILABLE


async def test_certificate_reload_without_restart(
    tmp_path: Path,
    pki: Path,
    guard: Any,  # noqa: F811
) -> None:
    server_dir = tmp_path / "server"
    shutil.copytree(pki / "one", server_dir)
    cert, key = server_dir / "server-cert.pem", server_dir / "server-key.pem"
    reloader = CertificateReloader(cert, key)
    interceptor = AccessInterceptor(Authenticator(StaticTokens({"ops": TOKEN})))
    gw = await guard(config(tmp_path), interceptor, reloader.credentials())

    async def exports(ca: str) -> int:
        stub = gw.stub(client_creds(pki, ca, None))
        listed = await stub.ListExports(pb.ListExportsRequest(), metadata=bearer(TOKEN), timeout=5)
        return len(listed.exports)

    assert await exports("one") == 2
    # Rotate to a certificate from CA two: new connections see it, without a restart.
    shutil.copy(pki / "two" / "server-key.pem", key)
    shutil.copy(pki / "two" / "server-cert.pem", cert)
    assert await exports("two") == 2
    assert reloader.reloads == 1
    f = await fails(
        gw.stub(client_creds(pki, "one", None)).ListExports(
            pb.ListExportsRequest(), metadata=bearer(TOKEN), timeout=5
        )
    )
    assert f.code == grpc.StatusCode.UNAVAILABLE
    # A half-done rotation (key of one, certificate of two) keeps the working certificate.
    shutil.copy(pki / "one" / "server-key.pem", key)
    assert await exports("two") == 2
    assert reloader.reloads == 1
    shutil.copy(pki / "one" / "server-cert.pem", cert)
    assert await exports("one") == 2
    assert reloader.reloads == 2


def test_reloader_refuses_mismatched_files(pki: Path) -> None:
    with pytest.raises(CertificateError, match="does not match"):
        CertificateReloader(pki / "one" / "server-cert.pem", pki / "two" / "server-key.pem")
    with pytest.raises(CertificateError):
        CertificateReloader(pki / "one" / "missing.pem", pki / "one" / "server-key.pem")


async def test_gateway_reloads_its_certificate(
    tmp_path: Path,
    pki: Path,
    start_gateway: Any,
) -> None:
    """The wiring: ``grpc_tls_*`` files of the configuration are reloaded by the Gateway."""
    server_dir = tmp_path / "server"
    shutil.copytree(pki / "one", server_dir)
    cfg = config(tmp_path)
    cfg.grpc_tls_cert_file = str(server_dir / "server-cert.pem")
    cfg.grpc_tls_key_file = str(server_dir / "server-key.pem")
    running = await start_gateway(cfg)
    channels = []

    async def exports(ca: str) -> int:
        ch = grpc.aio.secure_channel(
            running.target,
            client_creds(pki, ca, None),
            options=[("grpc.ssl_target_name_override", "localhost")],
        )
        channels.append(ch)
        listed = await pb_grpc.BitmapServiceStub(ch).ListExports(pb.ListExportsRequest(), timeout=5)
        return len(listed.exports)

    try:
        assert await exports("one") == 2
        shutil.copy(pki / "two" / "server-key.pem", server_dir / "server-key.pem")
        shutil.copy(pki / "two" / "server-cert.pem", server_dir / "server-cert.pem")
        assert await exports("two") == 2
        assert running.gateway.certificates.reloads == 1
    finally:
        for ch in channels:
            await ch.close()
