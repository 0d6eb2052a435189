"""Server reflection as grpc.reflection.v1 (what buf curl and grpcurl ask for first) and as
v1alpha, checked with a real client: buf curl, from the buf-bin wheel, made to use one protocol
or the other, discovering the services and then calling methods it knows only through
reflection."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from gateway.api.reflection import V1_FILE, V1_SERVICE_NAME, v1_file_descriptor
from gateway.config import GatewayConfig
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.test_service_embedded import make_image
from tests.peers import ROOT, missing

BUF = ROOT / ".venv" / "bin" / "buf"
PROTOCOLS = ("grpc-v1", "grpc-v1alpha")


@pytest.fixture
def disk_config(tmp_path: Path) -> GatewayConfig:
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    return config


@pytest.fixture(autouse=True)
def _need_buf() -> None:
    if not BUF.exists():
        missing("buf", ".venv/bin/pip install buf-bin (scripts/install-deps.sh)")


async def buf_curl(url: str, *args: str) -> tuple[int, str, str]:
    """Run buf curl (asynchronously: the gateway serves from this test's event loop)."""
    proc = await asyncio.create_subprocess_exec(
        str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_buf_curl_discovers_and_calls_through_each_protocol(
    protocol: str, disk_config: GatewayConfig, start_gateway
) -> None:
    gw = await start_gateway(disk_config)
    base = f"http://{gw.target}"
    rc, out, err = await buf_curl(base, "--reflect-protocol", protocol, "--list-services")
    assert rc == 0, err
    services = set(out.split())
    assert {
        "nbdgw.v1.BitmapService",
        "nbdgw.v1.SnapshotService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    # A call whose request and response buf knows only from the descriptors reflection sent.
    rc, out, err = await buf_curl(
        f"{base}/nbdgw.v1.BitmapService/StreamExtents", "--reflect-protocol", protocol,
        "-d", json.dumps({"export": "exports/disk", "context": "backup"}),
    )  # fmt: skip
    assert rc == 0, err
    messages = [json.loads(m) for m in out.replace("}\n{", "}\x00{").split("\x00")]
    assert messages[-1]["nextOffset"] == messages[-1]["rangeEnd"]
    assert int(messages[0]["rangeEnd"]) == (await gw.stub.GetExport(
        pb.GetExportRequest(name="exports/disk"))).size_bytes  # fmt: skip
    # The reflection services describe themselves too (the v1 descriptor is in the pool).
    rc, out, err = await buf_curl(base, "--reflect-protocol", protocol, "--list-methods")
    assert rc == 0, err
    assert f"{V1_SERVICE_NAME}/ServerReflectionInfo" in out.split()


async def test_v1_is_refused_when_reflection_is_off(
    disk_config: GatewayConfig, start_gateway
) -> None:
    disk_config.reflection = False
    gw = await start_gateway(disk_config)
    rc, _, _ = await buf_curl(
        f"http://{gw.target}", "--reflect-protocol", "grpc-v1", "--list-services"
    )
    assert rc != 0
    # No request message: the server answers UNIMPLEMENTED on the headers, and a message sent
    # after that answer fails on the client's side (INTERNAL, 'Failed execute_batch').
    call = gw.channel.stream_stream(f"/{V1_SERVICE_NAME}/ServerReflectionInfo")(iter(()))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_v1_descriptor_is_v1alpha_renamed() -> None:
    from grpc_reflection.v1alpha import reflection_pb2

    v1 = descriptor_pb2.FileDescriptorProto()
    v1_file_descriptor().CopyToProto(v1)
    alpha = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(alpha)
    assert v1.name == V1_FILE and v1.package == "grpc.reflection.v1"
    assert [m.name for m in v1.message_type] == [m.name for m in alpha.message_type]
    for m1, m0 in zip(v1.message_type, alpha.message_type, strict=True):
        assert [(f.name, f.number, f.type, f.label, f.oneof_index) for f in m1.field] == [
            (f.name, f.number, f.type, f.label, f.oneof_index) for f in m0.field
        ]
        for f in m1.field:
            assert not f.type_name or f.type_name.startswith(".grpc.reflection.v1.")
    assert v1_file_descriptor() is v1_file_descriptor()  # added to the pool once
