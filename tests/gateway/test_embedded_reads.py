"""StreamExtents of an embedded export reads the data straight from the image
(NBDServer.pread_into, gateway.api.bitmaps._LocalReads), not with NBD READs to the embedded host
over its socket: the bytes are the image's, a snapshot's are the snapshot's (not the live
disk's, written meanwhile), a failed read fails the stream with a clear error and the gateway
goes on serving; and the library call itself checks its arguments."""

from __future__ import annotations

import errno
import random
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import GatewayConfig
from nbdcore.aio.server import ExportConfig, NBDServer
from nbdcore.constants import Errno
from nbdcore.exceptions import ConnectionLostError, RequestError, UsageError
from nbdcore.storage import Image
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc
from tests.gateway.conftest import stream_all

MiB = 1024 * 1024
SIZE = 8 * MiB


def make_disk(path: Path) -> bytes:
    """Data in every MiB but the third (a hole), with an odd-sized extent at the end."""
    rng = random.Random(7)
    with Image.create(path, SIZE) as image:
        for off in range(0, SIZE, MiB):
            if off // MiB != 2:
                image.write(rng.randbytes(MiB), off)
        image.add_bitmap("b")
        return image.read(0, SIZE)


def joined(data: dict[int, bytes]) -> bytes:
    """The DATA rows of a stream laid out on a zeroed disk."""
    out = bytearray(SIZE)
    for off, chunk in data.items():
        out[off : off + len(chunk)] = chunk
    return bytes(out)


class Counting:
    """Counts the direct reads of the embedded host (NBDServer.pread_into): the data took the
    direct path when there are some (the NBD path never calls it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.direct = 0
        original = NBDServer.pread_into

        async def pread_into(server: NBDServer, name: str, buf: Any, offset: int) -> None:
            self.direct += 1
            await original(server, name, buf, offset)

        monkeypatch.setattr(NBDServer, "pread_into", pread_into)


async def start(start_gateway: Any, tmp_path: Path) -> Any:
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", tmp_path / "disk.img")
    return await start_gateway(config)


async def test_embedded_data_comes_from_the_image_directly(
    start_gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = make_disk(tmp_path / "disk.img")
    counting = Counting(monkeypatch)
    run = await start(start_gateway, tmp_path)
    streamed = await stream_all(
        run.stub, export="exports/disk", context="base:allocation", include_data=True
    )
    assert joined(streamed.data) == want
    # One direct read per piece of a message: 7 MiB of data in 1 MiB messages.
    assert counting.direct >= 7
    # An offset that does not start on a message boundary: the pieces land where they belong.
    part = await stream_all(
        run.stub,
        export="exports/disk",
        context="base:allocation",
        include_data=True,
        offset=MiB + 12345,
        length=3 * MiB,
    )
    got = b"".join(part.data[o] for o in sorted(part.data))
    assert got == want[MiB + 12345 : 2 * MiB] + want[3 * MiB : 4 * MiB + 12345]


async def test_a_snapshot_streams_its_own_bytes_while_the_live_disk_changes(
    start_gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = make_disk(tmp_path / "disk.img")
    counting = Counting(monkeypatch)
    run = await start(start_gateway, tmp_path)
    snapshots = spb_grpc.SnapshotServiceStub(run.channel)
    await snapshots.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="exports/disk", snapshot_id="s1", bitmaps=["b"])
    )
    # The live disk is rewritten after the snapshot (through the gateway's own image).
    image = run.gateway.images["disk"]
    fresh = random.Random(8).randbytes(3 * MiB)
    image.write(fresh, 2 * MiB)
    snap = await stream_all(
        run.stub, export="exports/disk@s1", context="base:allocation", include_data=True
    )
    assert joined(snap.data) == before
    live = await stream_all(
        run.stub, export="exports/disk", context="base:allocation", include_data=True
    )
    assert joined(live.data) == before[: 2 * MiB] + fresh + before[5 * MiB :]
    assert counting.direct >= 14  # both streams read directly


async def test_a_failed_read_fails_the_stream_and_the_gateway_goes_on(
    start_gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = make_disk(tmp_path / "disk.img")
    run = await start(start_gateway, tmp_path)
    image = run.gateway.images["disk"]
    real, real_try = image.readinto, image.try_readinto
    failing = True

    # The disk fails from 4 MiB on, whether the read is served from the page cache on the
    # loop (try_readinto) or by a reader thread (readinto).
    def readinto(buf: memoryview, offset: int) -> None:
        if failing and offset >= 4 * MiB:
            raise OSError(errno.EIO, "Input/output error")
        real(buf, offset)

    def try_readinto(buf: memoryview, offset: int) -> int:
        if failing and offset >= 4 * MiB:
            raise OSError(errno.EIO, "Input/output error")
        return real_try(buf, offset)

    monkeypatch.setattr(image, "readinto", readinto)
    monkeypatch.setattr(image, "try_readinto", try_readinto)
    request = pb.StreamExtentsRequest(
        export="exports/disk", context="base:allocation", include_data=True
    )
    received: list[pb.StreamExtentsResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for msg in run.stub.StreamExtents(request):
            received.append(msg)
    err = caught.value
    assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    assert "Input/output error" in (err.details() or "") or "EIO" in (err.details() or "")
    # What was delivered before the failure is the disk's, and never past the bad read.
    assert received and received[-1].next_offset <= 4 * MiB
    # The gateway serves the same export again once the image reads.
    failing = False
    streamed = await stream_all(
        run.stub, export="exports/disk", context="base:allocation", include_data=True
    )
    assert joined(streamed.data) == want


async def test_server_pread_into_checks_its_arguments(tmp_path: Path) -> None:
    want = make_disk(tmp_path / "disk.img")
    with Image.open(tmp_path / "disk.img") as image:
        server = NBDServer([ExportConfig(name="d", image=image)])
        buf = bytearray(MiB)
        await server.pread_into("d", memoryview(buf), 3 * MiB + 5)
        assert bytes(buf) == want[3 * MiB + 5 : 4 * MiB + 5]
        # Bigger than what is read on the loop at once (2 MiB): the rest comes from a thread.
        big = bytearray(5 * MiB)
        await server.pread_into("d", memoryview(big), MiB + 3)
        assert bytes(big) == want[MiB + 3 : 6 * MiB + 3]
        with pytest.raises(UsageError, match="no export named 'x'"):
            await server.pread_into("x", memoryview(buf), 0)
        with pytest.raises(RequestError) as past:
            await server.pread_into("d", memoryview(buf), SIZE - 10)
        assert past.value.errno == Errno.EINVAL
        await server.close()
        # A read after (or racing) the close: the error a lost connection gives, which the
        # gateway answers with UNAVAILABLE and a resume token.
        with pytest.raises(ConnectionLostError):
            await server.pread_into("d", memoryview(buf), 0)
