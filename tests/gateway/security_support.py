"""Helpers of the security tests: a gateway whose API port is guarded by AccessInterceptor
(built beside an in-process Gateway that supplies the backend), status decoding, a test PKI."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.api.bitmaps import BitmapServicer
from gateway.api.framing import add_bitmap_service
from gateway.security.access import AccessInterceptor
from gateway.server import HEALTH_SERVICE_NAME, SERVICE_NAME, Gateway
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from tests.gateway.conftest import MiB, run
from tests.peers import tool


@dataclass
class Guarded:
    gateway: Gateway
    interceptor: AccessInterceptor
    target: str
    server: grpc.aio.Server
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def channel(self, credentials: grpc.ChannelCredentials | None = None, **opts: Any) -> Any:
        options = [("grpc.max_receive_message_length", 16 * MiB), *opts.items()]
        if credentials is None:
            ch = grpc.aio.insecure_channel(self.target, options=options)
        else:
            options.append(("grpc.ssl_target_name_override", "localhost"))
            ch = grpc.aio.secure_channel(self.target, credentials, options=options)
        self.channels.append(ch)
        return ch

    def stub(self, credentials: grpc.ChannelCredentials | None = None, **opts: Any) -> Any:
        return pb_grpc.BitmapServiceStub(self.channel(credentials, **opts))


@pytest.fixture
async def guard(start_gateway: Any) -> AsyncIterator[Callable[..., Any]]:
    """``await guard(config, interceptor, credentials=None)`` -> Guarded: the gateway's
    servicer, health and reflection on a second port, behind ``interceptor``."""
    made: list[Guarded] = []

    async def start(
        config: Any,
        interceptor: AccessInterceptor,
        credentials: grpc.ServerCredentials | None = None,
    ) -> Guarded:
        running = await start_gateway(config)
        gw = running.gateway
        server = grpc.aio.server(interceptors=[interceptor])
        add_bitmap_service(BitmapServicer(gw.backend), server)
        health_pb2_grpc.add_HealthServicer_to_server(gw.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        g = Guarded(gw, interceptor, f"127.0.0.1:{port}", server)
        made.append(g)
        return g

    yield start
    for g in made:
        for ch in g.channels:
            await ch.close()
        await g.server.stop(0)


@dataclass
class Failure:
    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]
    retry_ms: int | None


def failure(err: grpc.aio.AioRpcError) -> Failure:
    trailers = dict(err.trailing_metadata() or ())
    raw = trailers.get("grpc-status-details-bin")
    reason, metadata, retry = "", {}, None
    if raw is not None:
        status = status_pb2.Status.FromString(raw)
        for packed in status.details:
            if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                packed.Unpack(info)
                assert info.domain == "nbdgw.dev"
                reason, metadata = info.reason, dict(info.metadata)
            elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                ri = error_details_pb2.RetryInfo()
                packed.Unpack(ri)
                retry = ri.retry_delay.ToMilliseconds()
    return Failure(err.code(), err.details() or "", reason, metadata, retry)


async def fails(call: Any) -> Failure:
    """Await a unary call or drain a stream that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return failure(info.value)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def make_pki(d: Path, ca_name: str, clients: tuple[str, ...] = ("backup-agent",)) -> Path:
    """A CA, a server certificate for localhost, and one client certificate per CN
    (``client-CN-cert.pem``/``-key.pem``)."""
    d.mkdir(parents=True)
    openssl = tool("openssl")
    run(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "2", "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"),
        "-subj", f"/CN={ca_name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    roles = [("server", "serverAuth", "subjectAltName=DNS:localhost\n", "localhost")]
    roles += [(f"client-{cn}", "clientAuth", "", cn) for cn in clients]
    for role, usage, san, cn in roles:
        ext = d / f"{role}.ext"
        ext.write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n{san}")
        run(openssl, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(d / f"{role}-key.pem"), "-out", str(d / f"{role}.csr"),
            "-subj", f"/CN={cn}")  # fmt: skip
        run(openssl, "x509", "-req", "-in", str(d / f"{role}.csr"), "-CA", str(d / "ca-cert.pem"),
            "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-days", "2",
            "-out", str(d / f"{role}-cert.pem"), "-extfile", str(ext))  # fmt: skip
    return d
