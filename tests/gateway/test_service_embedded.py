"""BitmapService over the embedded nbdcore host (real NBDServer, real Image on disk, reached
through the NBD client like any host): exports, bitmaps, ClearRange at the source, data."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from gateway.config import GatewayConfig
from gateway.sample import sample_pattern
from nbdcore.storage.image import Image
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.conftest import (
    KiB,
    MiB,
    anbdinfo_map,
    call_error,
    merged,
    stream_all,
)

G = 64 * KiB  # granularity
SIZE = 16 * MiB
DIRTY = [(0, 3 * G), (1 * MiB, G), (4 * MiB, 2 * MiB)]  # written after the bitmap was added
CLEAN = (8 * MiB, 1 * MiB)  # written before


def make_image(path: Path, size: int = SIZE) -> Path:
    image = Image.create(path, size)
    try:
        off, n = CLEAN
        image.write(sample_pattern(off, n), off)
        image.add_bitmap("backup", granularity=G)
        for off, n in DIRTY:
            image.write(sample_pattern(off, n), off)
        image.write_zeroes(12 * MiB, 2 * G)  # dirty, reads as zeros
        image.add_bitmap("quiet", granularity=2 * G)
        image.flush()
    finally:
        image.close()
    return path


@pytest.fixture
def embedded_config(tmp_path: Path) -> GatewayConfig:
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"), description="test disk")
    return config


def socket_uri(config: GatewayConfig, export: str) -> str:
    return f"nbd+unix:///{export}?socket={(config.data_dir / 'nbd.sock').absolute()}"


async def test_exports_pagination(tmp_path: Path, start_gateway) -> None:
    config = GatewayConfig(data_dir=tmp_path / "data")
    for name in ("a", "b", "c"):
        config.add_image_export(name, make_image(tmp_path / f"{name}.img", SIZE + 4096))
    gw = await start_gateway(config)
    first = await gw.stub.ListExports(pb.ListExportsRequest(page_size=2))
    assert [e.name for e in first.exports] == ["exports/a", "exports/b"]
    assert first.next_page_token
    second = await gw.stub.ListExports(
        pb.ListExportsRequest(page_size=2, page_token=first.next_page_token)
    )
    assert [e.name for e in second.exports] == ["exports/c"]
    assert second.next_page_token == ""
    everything = await gw.stub.ListExports(pb.ListExportsRequest())
    assert len(everything.exports) == 3 and not everything.next_page_token
    export = everything.exports[0]
    assert export.size_bytes == SIZE + 4096
    assert export.state == pb.EXPORT_STATE_AVAILABLE
    assert export.host == "embedded"
    assert export.clear_mode == pb.CLEAR_MODE_AT_SOURCE
    assert export.flags.can_flush and not export.read_only
    assert export.transmission_flags & 1  # NBD_FLAG_HAS_FLAGS
    # A token of one list is refused by another.
    err = await call_error(
        gw.stub.ListBitmaps(pb.ListBitmapsRequest(parent="a", page_token=first.next_page_token))
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.info.reason == "INVALID_PAGE_TOKEN"
    assert err.fields() == {"page_token"}


async def test_get_export_and_list_bitmaps(embedded_config: GatewayConfig, start_gateway) -> None:
    gw = await start_gateway(embedded_config)
    export = await gw.stub.GetExport(pb.GetExportRequest(name="exports/disk"))
    assert export.name == "exports/disk"
    assert export.description == "test disk"
    assert export.size_bytes == SIZE
    assert export.block_sizes.minimum_bytes >= 1
    assert export.block_sizes.maximum_bytes >= export.block_sizes.preferred_bytes
    resp = await gw.stub.ListBitmaps(pb.ListBitmapsRequest(parent="exports/disk"))
    by_context = {b.context: b for b in resp.bitmaps}
    assert set(by_context) == {
        "base:allocation",
        "qemu:dirty-bitmap:backup",
        "qemu:dirty-bitmap:quiet",
    }
    backup = by_context["qemu:dirty-bitmap:backup"]
    assert backup.granularity_bytes == G
    assert backup.recording is True
    assert backup.dirty_bytes == sum(n for _, n in DIRTY) + 2 * G
    assert backup.clear_mode == pb.CLEAR_MODE_AT_SOURCE
    assert by_context["qemu:dirty-bitmap:quiet"].dirty_bytes == 0
    assert by_context["qemu:dirty-bitmap:quiet"].granularity_bytes == 2 * G
    alloc = by_context["base:allocation"]
    assert alloc.clear_mode == pb.CLEAR_MODE_UNSUPPORTED and alloc.clear_unsupported_reason
    # Pages of one.
    page = await gw.stub.ListBitmaps(pb.ListBitmapsRequest(parent="disk", page_size=1))
    seen = [b.context for b in page.bitmaps]
    while page.next_page_token:
        page = await gw.stub.ListBitmaps(
            pb.ListBitmapsRequest(parent="disk", page_size=1, page_token=page.next_page_token)
        )
        seen += [b.context for b in page.bitmaps]
    assert seen == [b.context for b in resp.bitmaps]


async def test_stream_matches_nbdinfo_and_data(
    embedded_config: GatewayConfig, start_gateway
) -> None:
    gw = await start_gateway(embedded_config)
    uri = socket_uri(embedded_config, "disk")
    for context in ("qemu:dirty-bitmap:backup", "base:allocation", "qemu:dirty-bitmap:quiet"):
        got = await stream_all(gw.stub, export="disk", context=context)
        assert merged(got.rows) == await anbdinfo_map(uri, context)
    got = await stream_all(
        gw.stub, export="disk", context="backup", filter=pb.EXTENT_FILTER_SET, include_data=True
    )
    data = got.data
    assert sorted((s, n) for s, n, _, k in got.rows if k == pb.ALLOCATION_DATA) == [
        (s, len(b)) for s, b in sorted(data.items())
    ]
    for start, blob in data.items():
        assert blob == sample_pattern(start, len(blob))
    zeroed = [(s, n) for s, n, _, k in got.rows if k != pb.ALLOCATION_DATA]
    assert zeroed == [(12 * MiB, 2 * G)]


async def test_clear_range_at_source(embedded_config: GatewayConfig, start_gateway) -> None:
    gw = await start_gateway(embedded_config)
    uri = socket_uri(embedded_config, "disk")

    # The export is writable: clears carry the token of the stream that read the bitmap.
    read = await stream_all(gw.stub, export="disk", context="backup", filter=pb.EXTENT_FILTER_SET)
    token = read.messages[0].clear_token
    assert token and all(m.clear_token == token for m in read.messages)

    async def clear(offset: int, length: int) -> pb.ClearRangeResponse:
        resp = await gw.stub.ClearRange(
            pb.ClearRangeRequest(
                export="exports/disk",
                bitmap="backup",
                offset=offset,
                length=length,
                clear_token=token,
            )
        )
        assert resp.conditional and list(resp.kept_ranges) == []  # nothing writes
        return resp

    # No whole granule inside: nothing cleared.
    nothing = await clear(1000, G)
    assert list(nothing.cleared_ranges) == [] and nothing.cleared_bytes == 0
    assert nothing.clear_mode == pb.CLEAR_MODE_AT_SOURCE and nothing.granularity_bytes == G
    # Only the whole granules inside [G - 1, 3G + 1): granules 1 and 2.
    resp = await clear(G - 1, 2 * G + 2)
    assert [(r.offset, r.length) for r in resp.cleared_ranges] == [(G, 2 * G)]
    assert resp.cleared_bytes == 2 * G
    # At the source: the NBD host itself (seen by nbdinfo) no longer shows them dirty.
    rows = await anbdinfo_map(uri, "qemu:dirty-bitmap:backup")
    assert rows[0] == (0, G, 1, 0) and rows[1][:3] == (G, 1 * MiB - G, 0)
    got = await stream_all(gw.stub, export="disk", context="backup", filter=pb.EXTENT_FILTER_SET)
    assert got.rows[0] == (0, G, 1, 0)
    assert got.rows[1][0] == 1 * MiB
    bitmaps = await gw.stub.ListBitmaps(pb.ListBitmapsRequest(parent="disk"))
    backup = next(b for b in bitmaps.bitmaps if b.context == "qemu:dirty-bitmap:backup")
    assert backup.dirty_bytes == sum(n for _, n in DIRTY) + 2 * G - 2 * G
    # Clearing to the end of the export works; the other bitmap is untouched.
    tail = await clear(4 * MiB, SIZE - 4 * MiB)
    assert tail.cleared_bytes == SIZE - 4 * MiB
    # Full context name works too, and clearing clean granules reports them (they are clean).
    again = await gw.stub.ClearRange(
        pb.ClearRangeRequest(
            export="disk",
            bitmap="qemu:dirty-bitmap:backup",
            offset=0,
            length=SIZE,
            clear_token=token,
        )
    )
    assert again.cleared_bytes == SIZE
    assert await anbdinfo_map(uri, "qemu:dirty-bitmap:backup") == [(0, SIZE, 0, 0)]


async def test_clear_refusals(embedded_config: GatewayConfig, start_gateway) -> None:
    gw = await start_gateway(embedded_config)
    err = await call_error(
        gw.stub.ClearRange(
            pb.ClearRangeRequest(export="disk", bitmap="base:allocation", offset=0, length=G)
        )
    )
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.info.reason == "CLEAR_NOT_SUPPORTED"
    err.detail(error_details_pb2.PreconditionFailure)
    err = await call_error(
        gw.stub.ClearRange(pb.ClearRangeRequest(export="disk", bitmap="nope", offset=0, length=G))
    )
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.info.reason == "BITMAP_NOT_FOUND"
    info = err.detail(error_details_pb2.ResourceInfo)
    assert info.resource_name == "exports/disk/bitmaps/qemu:dirty-bitmap:nope"
    assert "qemu:dirty-bitmap:backup" in err.message  # says what exists
    err = await call_error(
        gw.stub.ClearRange(
            pb.ClearRangeRequest(export="disk", bitmap="backup", offset=SIZE, length=1)
        )
    )
    assert err.code == grpc.StatusCode.OUT_OF_RANGE
    assert err.info.reason == "RANGE_PAST_END"
    err = await call_error(
        gw.stub.ClearRange(
            pb.ClearRangeRequest(export="disk", bitmap="backup", offset=SIZE - G, length=G + 1)
        )
    )
    assert err.code == grpc.StatusCode.OUT_OF_RANGE
    # Refusals lost nothing.
    got = await stream_all(gw.stub, export="disk", context="backup", filter=pb.EXTENT_FILTER_SET)
    assert sum(n for _, n, _, _ in got.rows) == sum(n for _, n in DIRTY) + 2 * G


async def test_large_sparse_export_and_concurrent_streams(tmp_path: Path, start_gateway) -> None:
    """Offsets past 4 GiB (and 32-bit lengths) on a 1 TiB sparse image; several streams at once
    on one export give the same answers."""
    size = 1 << 40
    image = Image.create(tmp_path / "big.img", size)
    try:
        image.add_bitmap("backup", granularity=1 << 20)
        writes = [(5 << 30, 4096), (600 << 30, 3 << 20), (size - 4096, 4096)]
        for off, n in writes:
            image.write(b"\xab" * n, off)
    finally:
        image.close()
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("big", tmp_path / "big.img")
    gw = await start_gateway(config)
    expected = [
        (5 << 30, 1 << 20, 1, 0),
        (600 << 30, 3 << 20, 1, 0),
        (size - (1 << 20), 1 << 20, 1, 0),
    ]
    results = await asyncio.gather(
        *(
            stream_all(gw.stub, export="big", context="backup", filter=pb.EXTENT_FILTER_SET)
            for _ in range(6)
        )
    )
    for got in results:
        assert got.rows == expected
    whole = await stream_all(gw.stub, export="big", context="backup")
    assert sum(n for _, n, _, _ in whole.rows) == size
    assert merged(whole.rows)[1] == (5 << 30, 1 << 20, 1, 0)
    data = await stream_all(
        gw.stub, export="big", context="backup", filter=pb.EXTENT_FILTER_SET, include_data=True
    )
    carried = data.data
    assert all(len(m.data) <= MiB for m in data.messages)
    assert sum(len(b) for b in carried.values()) == 2 * 4096 + (3 << 20)
    pieces = sorted(carried.items())
    middle = b"".join(b for o, b in pieces if (600 << 30) <= o < (601 << 30))
    assert middle == b"\xab" * (3 << 20)
    assert pieces[0] == (5 << 30, b"\xab" * 4096)
    assert pieces[-1] == (size - 4096, b"\xab" * 4096)


async def test_slow_reader_holds_back_the_gateway(tmp_path: Path, start_gateway) -> None:
    """The gateway reads from NBD no faster than the client consumes: a client that stops
    reading stops the stream a few messages ahead, whatever the size of what remains."""
    image = Image.create(tmp_path / "d.img", 64 * MiB)
    try:
        image.add_bitmap("backup")
        for off in range(0, 64 * MiB, 4 * MiB):
            image.write(b"\x5a" * 4 * MiB, off)
    finally:
        image.close()
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("d", tmp_path / "d.img")
    # Without BDP probing the HTTP/2 window stays small (grpc-conventions.md, flow control).
    gw = await start_gateway(config, **{"grpc.http2.bdp_probe": 0})
    request = pb.StreamExtentsRequest(export="d", context="backup", include_data=True)
    call = gw.stub.StreamExtents(request)
    first = await call.read()
    assert len(first.data) == MiB
    await asyncio.sleep(1.0)  # room to run ahead, if it would
    (stream,) = gw.gateway.backend.streams
    assert stream.messages <= 8, "the gateway ran ahead of its reader"
    rest = [first]
    while (msg := await call.read()) is not grpc.aio.EOF:
        rest.append(msg)
    assert len(rest) == 64
    assert all(m.data == b"\x5a" * MiB for m in rest)
    assert not gw.gateway.backend.streams


async def test_read_only_image(tmp_path: Path, start_gateway) -> None:
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("ro", make_image(tmp_path / "ro.img"), read_only=True)
    gw = await start_gateway(config)
    export = await gw.stub.GetExport(pb.GetExportRequest(name="ro"))
    assert export.read_only and export.clear_mode == pb.CLEAR_MODE_UNSUPPORTED
    bitmaps = await gw.stub.ListBitmaps(pb.ListBitmapsRequest(parent="ro"))
    backup = next(b for b in bitmaps.bitmaps if b.context == "qemu:dirty-bitmap:backup")
    assert backup.clear_mode == pb.CLEAR_MODE_UNSUPPORTED
    assert "read-only" in backup.clear_unsupported_reason
    err = await call_error(
        gw.stub.ClearRange(pb.ClearRangeRequest(export="ro", bitmap="backup", offset=0, length=G))
    )
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.info.reason == "READ_ONLY"
    # Reading still works, and nothing was cleared.
    got = await stream_all(gw.stub, export="ro", context="backup", filter=pb.EXTENT_FILTER_SET)
    assert got.rows[0] == (0, 3 * G, 1, 0)
