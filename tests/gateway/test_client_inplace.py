"""How the client library receives StreamExtents data, against a real gateway: in place (the
data stays in the bytes gRPC received, protobuf parses only the other fields), decompressed
when the stream asked for zstd, and checked against each message's CRC32C before it reaches
the caller; a message corrupted in flight fails with its range named, in both flavours."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import nbdgw
from nbdgw.errors import DataCorrupted
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.cli_support import EmbeddedDisk, GatewayProcess, make_embedded_disk
from tests.gateway.client_support import FLAVOURS, client, serve_embedded
from tests.gateway.corrupting_proxy import CorruptingProxy
from tests.gateway.test_service_embedded import make_image

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, EmbeddedDisk]]:
    yield from serve_embedded(tmp_path_factory, "inplace")


@pytest.fixture(scope="module")
def compressible(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Path]]:
    """A disk of the sample pattern, which zstd compresses."""
    d = tmp_path_factory.mktemp("zstd")
    path = make_image(d / "disk.img")
    with GatewayProcess("--image", f"disk={path}", data_dir=d / "data") as gw:
        yield gw, path


def rebuild(batches: list[nbdgw.ExtentBatch], size: int) -> bytearray:
    image = bytearray(size)
    for batch in batches:
        for chunk in batch.chunks():
            if chunk.data is not None:
                image[chunk.offset : chunk.end] = chunk.data
    return image


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_data_is_a_view_of_the_bytes_received(
    served: tuple[GatewayProcess, EmbeddedDisk], flavour: str
) -> None:
    gw, disk = served
    with client(flavour, gw.target) as c:
        batches = c.call("iter_batches", "disk", "base:allocation", include_data=True)
    with_data = [b for b in batches if b.data]
    assert with_data, "the sample disk has data"
    for b in with_data:
        assert b.data is not None and b.data.readonly
        # The whole message as gRPC handed it over, the data a slice of it: no copy made.
        assert isinstance(b.data.obj, bytes) and len(b.data.obj) > len(b.data)
        assert b.data.obj is b.raw.data.obj
        assert not b.raw.message.data  # protobuf parsed the other fields only
        # Every other field reads as on the protobuf message.
        assert b.raw.data_crc32c and b.raw.next_offset == b.next_offset
    assert rebuild(batches, disk.size) == disk.content


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_zstd_data_comes_decompressed_and_checked(
    compressible: tuple[GatewayProcess, Path], flavour: str
) -> None:
    gw, path = compressible
    content = path.read_bytes()
    request = pb.StreamExtentsRequest(
        export="disk",
        context="base:allocation",
        include_data=True,
        compression="zstd",
        compression_level=3,
    )
    with client(flavour, gw.target) as c:
        batches = c.call("stream_extents", request)
    compressed = [b for b in batches if b.raw.data_compression == "zstd"]
    assert compressed, "the sample pattern compresses"
    for b in compressed:
        assert b.data is not None and len(b.data) > len(b.raw.data)  # the frame, decoded
    assert rebuild(batches, len(content)) == content


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_message_corrupted_in_flight_is_refused_with_its_range(
    served: tuple[GatewayProcess, EmbeddedDisk], flavour: str
) -> None:
    gw, disk = served
    received: list[nbdgw.DataChunk] = []
    with CorruptingProxy(gw.target) as proxy, client(flavour, proxy.target) as c:
        stream = c.client.iter_data("disk", "base:allocation")
        with pytest.raises(
            DataCorrupted, match=r"the data of \[\d+, \d+\) is corrupt: CRC32C"
        ) as info:
            # Chunk by chunk, so that what came before the corrupt message is kept.
            if c.runner is None:
                received.extend(stream)
            else:

                async def drain() -> None:
                    async for chunk in stream:
                        received.append(chunk)

                c.runner.run(drain())
    assert proxy.flipped, "the proxy corrupted nothing"
    error = info.value
    assert error.offset < error.next_offset <= disk.size
    assert f"[{error.offset}, {error.next_offset})" in str(error)
    # What came before the corrupt message is the disk's; nothing of it, nor after it, came.
    for chunk in received:
        if chunk.data is not None:
            assert bytes(chunk.data) == disk.content[chunk.offset : chunk.end]
    assert all(chunk.end <= error.offset for chunk in received)


def test_release_says_what_it_released(tmp_path: Path) -> None:
    """release_snapshot's answer: the forks merged back and the snapshots released; it still
    iterates as the merged forks (the answer before 0.2)."""
    disk = make_embedded_disk(tmp_path / "disk.img")
    with (
        GatewayProcess("--image", f"disk={disk.path}", data_dir=tmp_path / "data") as gw,
        nbdgw.Client(gw.target) as c,
    ):
        snap = c.create_snapshot("disk", snapshot_id="s1", bitmaps=["backup"])
        release = c.release_snapshot("disk", "s1")
    assert isinstance(release, nbdgw.Release)
    assert release.released == ("exports/disk/snapshots/s1",)
    assert [(m.context, m.dirty_bytes) for m in release.merged] == [
        (f.context, f.dirty_bytes) for f in snap.forks
    ]
    assert list(release) == list(release.merged) and len(release) == 1
    assert release[0] == release.merged[0]
    assert list(release.raw.released) == ["exports/disk/snapshots/s1"]
