"""Securing the gRPC port as `nbdgw serve` wires it: bearer tokens from a file (health stays
open), TLS with client certificates, and a plaintext health-only port beside it. (The access
rules themselves are tested in test_security_access.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.config import GatewayConfig, load_file
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from tests.gateway.conftest import call_error, stream_all
from tests.gateway.test_observability import value
from tests.gateway.test_service_embedded import make_image
from tests.peers import tool

TOKEN = "hunter2-but-longer"


def embedded(tmp_path: Path) -> GatewayConfig:
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    return config


async def test_bearer_token(tmp_path: Path, start_gateway) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "gw.toml").write_text('token_file = "token"\n[limits]\nmax_streams = 3\n')
    config = load_file(tmp_path / "gw.toml", embedded(tmp_path))
    assert config.tokens is not None and config.limits.max_streams == 3
    gw = await start_gateway(config)
    for metadata, why in ((None, "missing"), ((("authorization", "Bearer nope"),), "wrong")):
        err = await call_error(gw.stub.ListExports(pb.ListExportsRequest(), metadata=metadata))
        assert err.code == grpc.StatusCode.UNAUTHENTICATED
        assert err.info.reason == "UNAUTHENTICATED"
        assert why in err.message and TOKEN not in err.message
        err = await call_error(
            gw.stub.StreamExtents(
                pb.StreamExtentsRequest(export="disk", context="backup"), metadata=metadata
            )
        )
        assert err.code == grpc.StatusCode.UNAUTHENTICATED
    good = (("authorization", f"Bearer {TOKEN}"),)
    listed = await gw.stub.ListExports(pb.ListExportsRequest(), metadata=good)
    assert [e.name for e in listed.exports] == ["exports/disk"]
    messages = [
        m
        async for m in gw.stub.StreamExtents(
            pb.StreamExtentsRequest(export="disk", context="backup"), metadata=good
        )
    ]
    assert messages[-1].next_offset == messages[-1].range_end
    # Probes need no token; reflection needs one (any identity).
    health = health_pb2_grpc.HealthStub(gw.channel)
    resp = await health.Check(health_pb2.HealthCheckRequest(service="nbdgw.v1.BitmapService"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(gw.channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    # No request message: the server refuses on the headers, and a message sent
    # after that answer fails on the client's side (INTERNAL, 'Failed execute_batch').
    err = await call_error(refl.ServerReflectionInfo(iter(())))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED
    replies = [r async for r in refl.ServerReflectionInfo(iter([ask]), metadata=good)]
    assert "nbdgw.v1.BitmapService" in {s.name for s in replies[0].list_services_response.service}


def make_pki(d: Path) -> None:
    openssl = tool("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"),
        "-out", str(d / "ca.pem"), "-days", "2", "-subj", "/CN=nbdgw test CA")  # fmt: skip
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\n"), ("client", "")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"),
            "-out", str(d / f"{name}.csr"), "-subj", f"/CN=nbdgw {name}")  # fmt: skip
        (d / f"{name}.ext").write_text(ext or "basicConstraints=CA:FALSE\n")
        run("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / f"{name}.pem"),
            "-days", "2", "-extfile", str(d / f"{name}.ext"))  # fmt: skip


async def test_mutual_tls_and_plaintext_health_port(tmp_path: Path, start_gateway) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    config = embedded(tmp_path)
    config.grpc_tls_cert_file = str(pki / "server.pem")
    config.grpc_tls_key_file = str(pki / "server.key")
    config.grpc_tls_client_ca_file = str(pki / "ca.pem")
    config.health_listen = "127.0.0.1:0"
    gw = await start_gateway(config)  # its own plaintext channel cannot talk to this port
    listening = gw.gateway.listening
    assert listening is not None and listening.health_port
    ca = (pki / "ca.pem").read_bytes()

    def channel(with_cert: bool) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(pki / "client.key").read_bytes() if with_cert else None,
            certificate_chain=(pki / "client.pem").read_bytes() if with_cert else None,
        )
        return grpc.aio.secure_channel(gw.target, creds)

    async with channel(True) as ch:
        stub = pb_grpc.BitmapServiceStub(ch)
        got = await stream_all(stub, export="disk", context="backup")
        assert got.messages[-1].next_offset == got.messages[-1].range_end
    # No client certificate: the handshake fails (UNAVAILABLE, as gRPC reports it).
    async with channel(False) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.BitmapServiceStub(ch).ListExports(pb.ListExportsRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # Plaintext to the TLS port fails too.
    with pytest.raises(grpc.aio.AioRpcError):
        await gw.stub.ListExports(pb.ListExportsRequest(), timeout=10)
    # The health port answers in plaintext, and only health; its calls are counted too.
    checks = {
        "grpc_type": "unary",
        "grpc_service": "grpc.health.v1.Health",
        "grpc_method": "Check",
        "grpc_code": "OK",
    }
    counted = value(gw.gateway.metrics, "grpc_server_handled_total", **checks) or 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{listening.health_port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="nbdgw.v1.BitmapService"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        assert value(gw.gateway.metrics, "grpc_server_handled_total", **checks) == counted + 1
        # Only the overall statuses here: a per-export one needs the API port's access.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest(service="exports/disk"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.BitmapServiceStub(ch).ListExports(pb.ListExportsRequest())
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
