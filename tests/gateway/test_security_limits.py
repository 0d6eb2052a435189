"""Limits: concurrent streams per identity and in total, a stalled reader cancelled while the
others keep streaming, ClearRange rate, and a flood of bad calls beside good ones."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import GatewayConfig
from gateway.security.access import AccessInterceptor, Authenticator, TokenFile
from gateway.security.limits import Limiter, Limits, TokenBucket
from nbdcore.storage.image import Image
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.conftest import MiB
from tests.gateway.security_support import bearer, fails, failure, guard  # noqa: F401
from tests.gateway.test_service_embedded import make_image

A = "token-of-identity-a"
B = "token-of-identity-b"
BIG = 48 * MiB


def big_image(path: Path) -> Path:
    """Data everywhere: a StreamExtents with include_data sends 48 MiB, far more than HTTP/2
    flow-control windows hold, so a client that stops reading stalls the server's writes."""
    image = Image.create(path, BIG)
    try:
        chunk = bytes(range(256)) * (4 * MiB // 256)
        for off in range(0, BIG, len(chunk)):
            image.write(chunk, off)
        image.add_bitmap("backup")
    finally:
        image.close()
    return path


async def limited(tmp_path: Path, guard: Any, limits: Limits) -> Any:  # noqa: F811
    (tmp_path / "tokens").write_text(f"a {A}\nb {B}\n")
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    config.add_image_export("big", big_image(tmp_path / "big.img"))
    interceptor = AccessInterceptor(
        Authenticator(TokenFile(tmp_path / "tokens")), limiter=Limiter(limits)
    )
    return await guard(config, interceptor)


def data_stream(stub: Any, token: str) -> Any:
    return stub.StreamExtents(
        pb.StreamExtentsRequest(export="big", context="base:allocation", include_data=True),
        metadata=bearer(token),
    )


async def complete(stub: Any, token: str, export: str = "disk") -> int:
    msgs = [
        m
        async for m in stub.StreamExtents(
            pb.StreamExtentsRequest(export=export, context="backup"), metadata=bearer(token)
        )
    ]
    assert msgs[-1].next_offset == msgs[-1].range_end
    return len(msgs)


async def test_stream_limits_and_stalled_reader(
    tmp_path: Path,
    guard: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = Limits(max_streams=2, max_streams_per_identity=1, stall_timeout=1.0)
    gw = await limited(tmp_path, guard, limits)
    limiter = gw.interceptor.limiter
    stalled_stub = gw.stub()
    stalled = data_stream(stalled_stub, A)
    first = await stalled.read()  # then stop reading: the server's writes stall
    assert first.data
    # A second stream of identity a: over its limit, refused at once.
    f = await fails(
        gw.stub().StreamExtents(
            pb.StreamExtentsRequest(export="disk", context="backup"), metadata=bearer(A)
        )
    )
    assert f.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f.metadata == {"limit": "streams_per_identity"} and f.retry_ms
    # Identity b is not starved: its streams complete while a's is stalled.
    assert await complete(gw.stub(), B) >= 1
    # Total limit: a (stalled) + b (held open) fill it; a third caller is refused.
    held = data_stream(gw.stub(), B)
    assert (await held.read()).data
    f = await fails(data_stream(gw.stub(), B))
    assert f.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f.metadata["limit"] in ("streams", "streams_per_identity")
    held.cancel()
    for _ in range(200):  # the stall timeout (1 s) passes while nothing reads
        if limiter.stalled:
            break
        await asyncio.sleep(0.05)
    # The stalled stream is cancelled by the gateway; what the client buffered, then the status.
    received = [first]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while (msg := await stalled.read()) is not grpc.aio.EOF:
            received.append(msg)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "read nothing" in (info.value.details() or "")
    assert limiter.stalled == 1
    # As after any failure of a started stream, the status says where to resume: at most what
    # the client received (the cut write's message may or may not have gone out).
    cut = failure(info.value)
    resume_at = int(cut.metadata["resume_offset"])
    assert first.next_offset <= resume_at <= received[-1].next_offset < BIG
    trailers = dict(info.value.trailing_metadata() or ())
    assert trailers["nbdgw-resume-offset"] == str(resume_at)
    rest = [
        m
        async for m in gw.stub().StreamExtents(
            pb.StreamExtentsRequest(
                export="big",
                context="base:allocation",
                include_data=True,
                resume_token=cut.metadata["resume_token"],
            ),
            metadata=bearer(A),
        )
    ]
    assert rest[0].offset == resume_at and rest[-1].next_offset == BIG
    # What was received up to the position, then the resumed stream: the image, byte for byte.
    got = b"".join(m.data for m in received if m.next_offset <= resume_at)
    got += b"".join(m.data for m in rest)
    assert got == (bytes(range(256)) * (BIG // 256))
    for _ in range(100):
        if limiter.streams == 0:
            break
        await asyncio.sleep(0.05)
    assert limiter.streams == 0 and limiter.per_identity == {}
    # The slots are free again.
    assert await complete(gw.stub(), A) >= 1
    # Cancelling the stalled stream is the gateway's own doing: nothing logged as an error
    # (grpc's ExecuteBatchError for the write it cut, say).
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [m for m in loud if "ExecuteBatchError" in m or "unexpected" in m], loud
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_clear_rate(tmp_path: Path, guard: Any) -> None:  # noqa: F811
    gw = await limited(tmp_path, guard, Limits(clear_rate=0.5, clear_burst=2))
    stub = gw.stub()

    def clear(token: str, offset: int) -> Any:
        return stub.ClearRange(
            pb.ClearRangeRequest(
                export="disk", bitmap="backup", offset=offset, length=65536, unconditional=True
            ),
            metadata=bearer(token),
        )

    assert (await clear(A, 0)).cleared_bytes == 65536
    await clear(A, 65536)
    f = await fails(clear(A, 131072))
    assert f.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f.metadata == {"limit": "clear_rate"}
    assert f.retry_ms is not None and 0 < f.retry_ms <= 2000
    # Per identity: b has its own bucket.
    await clear(B, 131072)
    assert gw.interceptor.limiter.refused_clears == 1


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, 3, lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    now[0] += 0.5
    assert bucket.take() == 0.0
    now[0] += 100
    assert [bucket.take() for _ in range(4)][-1] == pytest.approx(0.5)  # never above burst


async def test_flood_of_bad_calls(tmp_path: Path, guard: Any) -> None:  # noqa: F811
    """Unauthenticated, wrong-token, malformed and oversized calls, hundreds at once, while
    good streams keep completing correctly."""
    gw = await limited(tmp_path, guard, Limits())
    bad_stub = gw.stub()
    good_stub = gw.stub()
    reference = await complete(good_stub, A)

    async def bad(i: int) -> grpc.StatusCode:
        kind = i % 4
        try:
            if kind == 0:
                await bad_stub.ListExports(pb.ListExportsRequest())
            elif kind == 1:
                await bad_stub.GetExport(
                    pb.GetExportRequest(name="disk"), metadata=bearer(f"guess{i:08d}")
                )
            elif kind == 2:
                async for _ in bad_stub.StreamExtents(
                    pb.StreamExtentsRequest(export="x" * 100_000, context="y"),
                    metadata=(("authorization", "Bearer"),),
                ):
                    pass
            else:
                await bad_stub.ClearRange(
                    pb.ClearRangeRequest(export="disk", bitmap="\x00" * 1000),
                    metadata=bearer(B + "x"),
                )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    async def good() -> list[int]:
        return [await complete(good_stub, B) for _ in range(10)]

    flood = asyncio.gather(*(bad(i) for i in range(800)))
    goods = await asyncio.gather(good(), good(), good())
    codes = await flood
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    assert all(n == reference for run in goods for n in run)
    assert gw.interceptor.denied == 800


async def test_unary_calls_are_cut_at_the_gateway_deadline(
    tmp_path: Path,
    guard: Any,  # noqa: F811
) -> None:
    """A host that goes silent (a proxy in front of the embedded host stops passing bytes):
    calls on its export end with DEADLINE_EXCEEDED at the gateway's unary_timeout, even without
    a client deadline, and the other exports keep answering."""
    sock = str(tmp_path / "proxy.sock")
    upstream = str(tmp_path / "data" / "nbd.sock")  # the embedded host, once started
    muted = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            if not muted.is_set():
                dst.write(data)
                await dst.drain()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        if muted.is_set():
            return  # accept, say nothing
        up_reader, up_writer = await asyncio.open_unix_connection(upstream)
        writers.append(up_writer)
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    server = await asyncio.start_unix_server(proxy, sock)
    try:
        (tmp_path / "tokens").write_text(f"a {A}\n")
        config = GatewayConfig(data_dir=tmp_path / "data")
        config.add_image_export("disk", make_image(tmp_path / "disk.img"))
        config.add_uri_export("mute", f"nbd+unix:///disk?socket={sock}", None)
        interceptor = AccessInterceptor(
            Authenticator(TokenFile(tmp_path / "tokens")),
            limiter=Limiter(Limits(unary_timeout=1.0)),
        )
        gw = await guard(config, interceptor)
        stub = gw.stub()
        request = pb.ListBitmapsRequest(parent="mute")
        assert (await stub.ListBitmaps(request, metadata=bearer(A))).bitmaps
        muted.set()
        f = await fails(stub.ListBitmaps(request, metadata=bearer(A)))
        assert f.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert f.reason == "DEADLINE_EXCEEDED" and "1 s" in f.message
        assert gw.interceptor.limiter.timed_out == 1
        export = await stub.GetExport(pb.GetExportRequest(name="disk"), metadata=bearer(A))
        assert export.name == "exports/disk"
    finally:
        for w in writers:
            w.close()
        server.close()
