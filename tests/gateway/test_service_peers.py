"""BitmapService in front of nbdkit: a host that offers only base:allocation, and one without
structured replies (no metadata contexts at all)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from gateway.config import GatewayConfig
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.conftest import call_error, merged, nbdinfo_map, stream_all
from tests.peers import tool, wait_listening

pytestmark = pytest.mark.interop

DATA = "( 0x11 * 65536 ) @262144 ( 0x22 * 4096 ) @1048576 ( 0x33 * 512 )"


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Callable[..., str]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> str:
        sock = tmp_path / f"nbdkit{len(procs)}.sock"
        proc = subprocess.Popen(
            [tool("nbdkit"), "-f", "-U", str(sock), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        wait_listening(proc, sock=sock, timeout=15)
        return f"nbd+unix:///?socket={sock}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait()


async def test_nbdkit_allocation_only(nbdkit, start_gateway) -> None:
    uri = nbdkit("data", DATA, "size=4M")
    config = GatewayConfig()
    config.add_uri_export("kit", uri)
    gw = await start_gateway(config)
    listed = await gw.stub.ListBitmaps(pb.ListBitmapsRequest(parent="kit"))
    assert [b.context for b in listed.bitmaps] == ["base:allocation"]
    assert listed.bitmaps[0].kind == pb.BITMAP_KIND_ALLOCATION
    got = await stream_all(gw.stub, export="kit", context="base:allocation")
    assert merged(got.rows) == nbdinfo_map(uri, "base:allocation")
    # The allocated data, with its bytes.
    data = await stream_all(
        gw.stub,
        export="kit",
        context="base:allocation",
        filter=pb.EXTENT_FILTER_CLEAR,
        include_data=True,
    )
    carried = b"".join(b for _, b in sorted(data.data.items()))
    assert b"\x11" * 65536 in carried and b"\x22" * 4096 in carried and b"\x33" * 512 in carried
    err = await call_error(
        gw.stub.StreamExtents(pb.StreamExtentsRequest(export="kit", context="backup"))
    )
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.info.reason == "BITMAP_NOT_FOUND"
    assert err.info.metadata["offered"] == "base:allocation"


async def test_host_without_structured_replies(nbdkit, start_gateway) -> None:
    uri = nbdkit("--no-sr", "memory", "8M")
    config = GatewayConfig()
    config.add_uri_export("old", uri)
    gw = await start_gateway(config)
    export = await gw.stub.GetExport(pb.GetExportRequest(name="old"))
    assert export.size_bytes == 8 * 1024 * 1024
    listed = await gw.stub.ListBitmaps(pb.ListBitmapsRequest(parent="old"))
    assert list(listed.bitmaps) == []
    err = await call_error(
        gw.stub.StreamExtents(pb.StreamExtentsRequest(export="old", context="base:allocation"))
    )
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.info.reason == "BITMAP_NOT_FOUND"
    assert "none" in err.message
