"""Conditional ClearRange through the gateway (issue 15, part 1): StreamExtents hands out a
clear token on a live writable export, a clear with it keeps (and reports) what was written
since, a clear without it is refused, a token of another bitmap is refused, and tokens stay
valid across a restart of the gateway and of a remote ``nbdgw nbd serve`` host. Snapshot
exports need no token. Writes go straight to the host over NBD, never through the gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import GatewayConfig
from gateway.hosts.pool import Host
from nbdcore.aio.client import NBDClient
from nbdcore.clear_ext import MAX_CLEARED_RUNS
from nbdcore.storage.image import Image
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc
from tests.gateway.clear_support import G, NbdcoreHost, dirty_runs, make_image
from tests.gateway.conftest import call_error, stream_all

MiB = 1 << 20
B0 = "qemu:dirty-bitmap:b0"
SIZE = 8 * MiB


def ranges(rs: Any) -> list[tuple[int, int]]:
    return [(r.offset, r.length) for r in rs]


async def token_of(stub: Any, export: str = "disk") -> str:
    got = await stream_all(stub, export=export, context="b0", filter=pb.EXTENT_FILTER_SET)
    tokens = {m.clear_token for m in got.messages}
    assert len(tokens) == 1, "every message of one stream carries the same token"
    return tokens.pop()


async def write(uri: str, offset: int, data: bytes) -> None:
    async with await NBDClient.connect(uri) as client:
        await client.pwrite(data, offset)


@pytest.fixture
def host(tmp_path: Path) -> Any:
    make_image(tmp_path / "disk.raw", SIZE, [(0, 4 * MiB)])
    peer = NbdcoreHost(tmp_path / "disk.raw", tmp_path / "host.sock").start()
    yield peer
    peer.stop()


@pytest.mark.parametrize("where", ["remote", "embedded"])
async def test_a_write_after_the_read_is_kept(
    tmp_path: Path, start_gateway: Any, where: str, request: Any
) -> None:
    cfg = GatewayConfig(data_dir=tmp_path / "gw")
    if where == "remote":
        uri = request.getfixturevalue("host").uri
        cfg.add_uri_export("disk", uri)
    else:
        make_image(tmp_path / "e.raw", SIZE, [(0, 4 * MiB)])
        cfg.add_image_export("disk", tmp_path / "e.raw")
    gw = await start_gateway(cfg)
    if where == "embedded":
        uri = f"nbd+unix:///disk?socket={(tmp_path / 'gw' / 'nbd.sock').absolute()}"
    token = await token_of(gw.stub)
    assert token
    # A bitmap the export lacks is NOT_FOUND, though the token names another (test_refusals).
    err = await call_error(gw.stub.ClearRange(pb.ClearRangeRequest(
        export="disk", bitmap="nosuch", offset=0, length=G, clear_token=token)))  # fmt: skip
    assert (err.code, err.info.reason) == (grpc.StatusCode.NOT_FOUND, "BITMAP_NOT_FOUND")
    # Written after the read: granules 3 and 40 (the second one clean before).
    await write(uri, 3 * G + 100, b"x" * 10)
    await write(uri, 40 * G, b"y" * 4096)
    resp = await gw.stub.ClearRange(
        pb.ClearRangeRequest(export="disk", bitmap="b0", offset=0, length=SIZE, clear_token=token)
    )
    assert resp.conditional
    assert ranges(resp.kept_ranges) == [(3 * G, G), (40 * G, G)]
    assert resp.kept_bytes == 2 * G
    assert ranges(resp.cleared_ranges) == [(0, 3 * G), (4 * G, 36 * G), (41 * G, SIZE - 41 * G)]
    assert await dirty_runs(uri, B0) == [(3 * G, G), (40 * G, G)]
    # Copy them again (a new stream, a new token), and they clear.
    token2 = await token_of(gw.stub)
    assert token2 != token
    resp = await gw.stub.ClearRange(
        pb.ClearRangeRequest(export="disk", bitmap="b0", offset=0, length=SIZE, clear_token=token2)
    )
    assert ranges(resp.kept_ranges) == [] and resp.cleared_bytes == SIZE
    assert await dirty_runs(uri, B0) == []


async def test_refusals(
    tmp_path: Path, start_gateway: Any, host: NbdcoreHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = GatewayConfig(data_dir=tmp_path / "gw")
    cfg.add_uri_export("disk", host.uri)
    cfg.add_uri_export("other", host.uri)  # the same bitmap under another name
    gw = await start_gateway(cfg)
    # Refusals cost no connection: each is decided on a leased one, which the lease closes
    # when its user raises (it may hold unanswered requests), so a refusal must not raise.
    opened = 0
    connect = Host.connect

    async def counted(self: Host, *args: Any, **kwargs: Any) -> Any:
        nonlocal opened
        opened += 1
        return await connect(self, *args, **kwargs)

    monkeypatch.setattr(Host, "connect", counted)
    base = {"export": "disk", "bitmap": "b0", "offset": 0, "length": G}
    err = await call_error(gw.stub.ClearRange(pb.ClearRangeRequest(**base)))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.info.reason == "CLEAR_TOKEN_REQUIRED"
    assert "clear_token" in err.message
    for bad in ("!!", "AAAA", "x" * 40):
        err = await call_error(gw.stub.ClearRange(pb.ClearRangeRequest(**base, clear_token=bad)))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.info.reason == "CLEAR_TOKEN_INVALID"
    other = await token_of(gw.stub, "other")
    err = await call_error(gw.stub.ClearRange(pb.ClearRangeRequest(**base, clear_token=other)))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "another" in err.message
    # An unknown export is NOT_FOUND, whatever the token says.
    err = await call_error(gw.stub.ClearRange(
        pb.ClearRangeRequest(**{**base, "export": "nosuch"}, clear_token=other)))  # fmt: skip
    assert (err.code, err.info.reason) == (grpc.StatusCode.NOT_FOUND, "EXPORT_NOT_FOUND")
    # So is an unknown bitmap: a token names one bitmap, so for any other it is "from another
    # bitmap", which would hide what is wrong.
    err = await call_error(gw.stub.ClearRange(
        pb.ClearRangeRequest(**{**base, "bitmap": "nosuch"}, clear_token=other)))  # fmt: skip
    assert (err.code, err.info.reason) == (grpc.StatusCode.NOT_FOUND, "BITMAP_NOT_FOUND")
    # Nothing was cleared by any of them, and their connections were kept: one for b0's
    # clears, one for the stream of "other" (token_of), one asking for the unknown bitmap.
    assert await dirty_runs(host.uri, B0) == [(0, 4 * MiB)]
    assert opened == 3, opened
    # The caller's word that nothing writes still clears.
    resp = await gw.stub.ClearRange(pb.ClearRangeRequest(**base, unconditional=True))
    assert resp.cleared_bytes == G and not resp.conditional


async def test_a_read_only_host_image_is_read_only(tmp_path: Path, start_gateway: Any) -> None:
    """nbdgw nbd serve --read-only offers the clear extension, whose clears then fail with
    NBD_EPERM: READ_ONLY (FAILED_PRECONDITION), not the caller's PERMISSION_DENIED."""
    make_image(tmp_path / "ro.raw", SIZE, [(0, MiB)])
    peer = NbdcoreHost(tmp_path / "ro.raw", tmp_path / "ro.sock", extra=("--read-only",)).start()
    try:
        cfg = GatewayConfig(data_dir=tmp_path / "gw")
        cfg.add_uri_export("ro", peer.uri)
        gw = await start_gateway(cfg)
        err = await call_error(gw.stub.ClearRange(pb.ClearRangeRequest(
            export="ro", bitmap="b0", offset=0, length=G, unconditional=True)))  # fmt: skip
        assert (err.code, err.info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "READ_ONLY")
        assert await dirty_runs(peer.uri, B0) == [(0, MiB)]
    finally:
        peer.stop()


async def test_tokens_survive_restarts_of_the_gateway_and_the_host(
    tmp_path: Path, start_gateway: Any, host: NbdcoreHost
) -> None:
    cfg = GatewayConfig(data_dir=tmp_path / "gw")
    cfg.add_uri_export("disk", host.uri)
    gw = await start_gateway(cfg)
    token = await token_of(gw.stub)
    await gw.gateway.stop(grace=0)
    host.stop()
    host.start()
    await write(host.uri, 5 * G, b"z")  # after the read, across both restarts
    cfg = GatewayConfig(data_dir=tmp_path / "gw")
    cfg.add_uri_export("disk", host.uri)
    gw = await start_gateway(cfg)
    resp = await gw.stub.ClearRange(
        pb.ClearRangeRequest(export="disk", bitmap="b0", offset=0, length=SIZE, clear_token=token)
    )
    assert ranges(resp.kept_ranges) == [(5 * G, G)]
    assert await dirty_runs(host.uri, B0) == [(5 * G, G)]


async def test_snapshot_exports_need_no_token(tmp_path: Path, start_gateway: Any) -> None:
    make_image(tmp_path / "e.raw", SIZE, [(0, 2 * MiB)])
    cfg = GatewayConfig(data_dir=tmp_path / "gw")
    cfg.add_image_export("disk", tmp_path / "e.raw")
    gw = await start_gateway(cfg)
    snaps = spb_grpc.SnapshotServiceStub(gw.channel)
    await snaps.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="exports/disk", snapshot_id="s1", bitmaps=["b0"])
    )
    got = await stream_all(gw.stub, export="disk@s1", context="b0", filter=pb.EXTENT_FILTER_SET)
    assert all(not m.clear_token for m in got.messages)
    resp = await gw.stub.ClearRange(
        pb.ClearRangeRequest(export="disk@s1", bitmap="b0", offset=0, length=2 * MiB)
    )
    assert resp.cleared_bytes == 2 * MiB and not resp.conditional


async def test_a_clear_too_fragmented_for_one_reply_is_done_in_pieces(
    tmp_path: Path, start_gateway: Any
) -> None:
    """More kept runs than one NBD reply carries (clear_ext.MAX_CLEARED_RUNS): the host
    refuses with NBD_EOVERFLOW before clearing anything (it used to clear, then fail the
    reply: EINVAL, with the bitmap changed), and the gateway clears in pieces."""
    g, runs = 512, MAX_CLEARED_RUNS + 1
    size = 2 * runs * g
    image = Image.create(tmp_path / "frag.raw", size)
    image.add_bitmap("b0", granularity=g)
    image.write(b"\x01" * size, 0)
    image.close()
    peer = NbdcoreHost(tmp_path / "frag.raw", tmp_path / "frag.sock").start()
    try:
        cfg = GatewayConfig(data_dir=tmp_path / "gw")
        cfg.add_uri_export("disk", peer.uri)
        gw = await start_gateway(cfg)
        token = await token_of(gw.stub)
        async with await NBDClient.connect(peer.uri) as client:
            for first in range(0, runs, 512):  # every other granule, written after the read
                await asyncio.gather(
                    *(client.pwrite(b"w", 2 * i * g) for i in range(first, min(runs, first + 512)))
                )
        resp = await gw.stub.ClearRange(
            pb.ClearRangeRequest(
                export="disk", bitmap="b0", offset=0, length=size, clear_token=token
            )
        )
        kept = [(2 * i * g, g) for i in range(runs)]
        assert ranges(resp.kept_ranges) == kept
        assert ranges(resp.cleared_ranges) == [((2 * i + 1) * g, g) for i in range(runs)]
        assert await dirty_runs(peer.uri, B0) == kept
    finally:
        peer.stop()
