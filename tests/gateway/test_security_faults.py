"""Faults of the gateway process itself, behind its bearer tokens: SIGTERM and kill -9 in the
middle of a data stream and of a run of ClearRange calls. After a restart the stream resumes
from the last message received and the whole is exactly the disk; every acknowledged clear is
in the bitmap file; nothing never asked for was cleared.

(A host dying mid-stream and coming back is test_service_qemu.py's
test_host_killed_mid_stream_then_restarted; kill -9 of gateway and host during clears of a
remote host and of the ledger is test_clear_crash.py.)"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.sample import sample_pattern
from nbdcore.storage.image import Image
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from tests.gateway.cli_support import GatewayProcess
from tests.gateway.conftest import MiB, check_continuity
from tests.gateway.security_support import bearer, failure

SIZE = 48 * MiB
G = 64 * 1024
TOKEN = "fault-test-token-0123456789"


def make_disk(path: Path) -> Path:
    image = Image.create(path, SIZE)
    try:
        image.add_bitmap("b0", granularity=G)  # streamed
        image.add_bitmap("b1", granularity=G)  # cleared
        step = 4 * MiB
        for off in range(0, SIZE, step):
            image.write(sample_pattern(off, step), off)
        image.flush()
    finally:
        image.close()
    return path


def clear_range(i: int) -> tuple[int, int]:
    """Request i clears granules 2i and 2i+1 exactly; odd pairs are never requested."""
    return 4 * i * G, 2 * G


async def fault_mid_stream_and_clear(
    gw: GatewayProcess, how: signal.Signals
) -> tuple[list[pb.StreamExtentsResponse], set[int], Any]:
    """Stream b0 with data (slowly) and clear b1, 4 in flight; send ``how`` to the gateway
    once the stream is under way and clears were acknowledged. Returns the messages received,
    the acknowledged clears and the stream's failure."""
    assert gw.proc is not None
    metadata = bearer(TOKEN)
    acked: set[int] = set()
    faulted = asyncio.Event()
    enough = asyncio.Event()  # 20 clears acknowledged
    options = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 16 * MiB)]
    async with grpc.aio.insecure_channel(gw.target, options=options) as channel:
        stub = pb_grpc.BitmapServiceStub(channel)
        todo = iter(range(SIZE // (4 * G)))

        async def clearer() -> None:
            for i in todo:
                offset, length = clear_range(i)
                try:
                    resp = await stub.ClearRange(
                        pb.ClearRangeRequest(
                            export="disk",
                            bitmap="b1",
                            offset=offset,
                            length=length,
                            unconditional=True,  # nothing writes
                        ),
                        metadata=metadata,
                        timeout=10,
                    )
                except grpc.aio.AioRpcError:
                    return  # the gateway went away: not acknowledged
                assert resp.cleared_bytes == length
                acked.add(i)
                if len(acked) >= 20:
                    enough.set()
                if faulted.is_set():
                    return
                await asyncio.sleep(0.005)

        clearers = [asyncio.create_task(clearer()) for _ in range(4)]
        got: list[pb.StreamExtentsResponse] = []
        call = stub.StreamExtents(
            pb.StreamExtentsRequest(export="disk", context="b0", include_data=True),
            metadata=metadata,
        )
        err = None
        try:
            async for msg in call:
                got.append(msg)
                if len(got) == 3:
                    await enough.wait()
                    gw.proc.send_signal(how)
                    faulted.set()
                await asyncio.sleep(0.02)  # a slow reader: the fault lands mid-stream
        except grpc.aio.AioRpcError as exc:
            err = exc
        await asyncio.gather(*clearers)
    return got, acked, err


async def resume(target: str, token: str) -> list[pb.StreamExtentsResponse]:
    options = [("grpc.max_receive_message_length", 16 * MiB)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.BitmapServiceStub(channel)
        request = pb.StreamExtentsRequest(
            export="disk", context="b0", include_data=True, resume_token=token
        )
        return [m async for m in stub.StreamExtents(request, metadata=bearer(TOKEN))]


def check_disk(messages: list[pb.StreamExtentsResponse]) -> None:
    """The messages cover the disk in order, every byte as written, all dirty in b0."""
    check_continuity(messages, 0)
    assert messages[-1].next_offset == SIZE
    data = b"".join(m.data for m in messages)
    assert len(data) == SIZE
    assert data == sample_pattern(0, SIZE)
    assert all(set(m.flags) == {1} for m in messages if len(m.flags))


def check_clears(path: Path, acked: set[int]) -> None:
    image = Image.open(path, read_only=True)
    try:
        dirty = [(o, n) for o, n, f in image.bitmaps["b1"].extents(0, SIZE) if f]
        # b0 is streamed only: never cleared.
        assert [(o, n) for o, n, f in image.bitmaps["b0"].extents(0, SIZE) if f] == [(0, SIZE)]
    finally:
        image.close()
    granules = {g for o, n in dirty for g in range(o // G, (o + n) // G)}
    for i in acked:
        assert 4 * i not in granules and 4 * i + 1 not in granules, f"acknowledged clear {i} lost"
    for g in range(SIZE // G):
        if g % 4 in (2, 3):
            assert g in granules, f"granule {g} cleared but never asked"


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill9"])
async def test_gateway_fault_mid_stream_and_mid_clear(tmp_path: Path, how: signal.Signals) -> None:
    disk = make_disk(tmp_path / "disk.img")
    (tmp_path / "tokens").write_text(f"backup {TOKEN}\n")
    args = ("--image", f"disk={disk}", "--token-file", str(tmp_path / "tokens"))
    gw = GatewayProcess(*args, data_dir=tmp_path / "gw").start()
    try:
        got, acked, err = await fault_mid_stream_and_clear(gw, how)
        assert gw.proc is not None
        code = await asyncio.to_thread(gw.proc.wait, 30)
        assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL)
        assert err is not None, "the stream ended before the fault"
        assert got and got[-1].next_offset < SIZE
        f = failure(err)
        assert f.code == grpc.StatusCode.UNAVAILABLE
        if how == signal.SIGTERM:
            # A graceful stop says where to resume: right after the last message received.
            assert f.reason == "GATEWAY_SHUTTING_DOWN"
            assert f.metadata["resume_offset"] == str(got[-1].next_offset)
            assert f.metadata["resume_token"] == got[-1].resume_token
        gw.stop()

        gw = GatewayProcess(*args, data_dir=tmp_path / "gw").start()
        rest = await resume(gw.target, got[-1].resume_token)
        check_disk([*got, *rest])
        gw.stop()
        check_clears(disk, acked)
        assert len(acked) >= 20
    finally:
        gw.stop()


async def sigterm_under_calls(gw: GatewayProcess) -> list[tuple[grpc.StatusCode, str]]:
    """16 callers send ClearRange after ClearRange without pause; SIGTERM once 200 are done.
    Returns each caller's last call's code and reason."""
    assert gw.proc is not None
    endings: list[tuple[grpc.StatusCode, str]] = []
    busy = asyncio.Event()
    calls = 0
    async with grpc.aio.insecure_channel(gw.target) as channel:
        stub = pb_grpc.BitmapServiceStub(channel)

        async def caller(i: int) -> None:
            nonlocal calls
            offset, length = clear_range(i)
            request = pb.ClearRangeRequest(
                export="disk", bitmap="b1", offset=offset, length=length, unconditional=True
            )
            while True:
                try:
                    await stub.ClearRange(request, metadata=bearer(TOKEN), timeout=10)
                except grpc.aio.AioRpcError as err:
                    endings.append((err.code(), failure(err).reason))
                    return
                calls += 1
                if calls >= 200:
                    busy.set()

        callers = [asyncio.create_task(caller(i)) for i in range(16)]
        await asyncio.wait_for(busy.wait(), 60)
        gw.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*callers), 30)
    return endings


async def test_calls_arriving_at_a_stopping_gateway_are_unavailable_not_cancelled(
    tmp_path: Path,
) -> None:
    """SIGTERM while callers send one call after another: every caller's last call ends
    UNAVAILABLE (a client retries it elsewhere), none CANCELLED (which a client takes for its
    own doing and does not retry). grpc cancels a call that reaches it once its server has
    begun to stop, so the gateway first answers new calls GATEWAY_SHUTTING_DOWN until they
    stop coming, and only then stops its server."""
    disk = make_disk(tmp_path / "disk.img")
    (tmp_path / "tokens").write_text(f"backup {TOKEN}\n")
    args = ("--image", f"disk={disk}", "--token-file", str(tmp_path / "tokens"))
    endings: list[tuple[grpc.StatusCode, str]] = []
    for _ in range(3):  # the race is narrow: a few stops make a regression show
        gw = GatewayProcess(*args, data_dir=tmp_path / "gw").start()
        try:
            endings += await sigterm_under_calls(gw)
            assert gw.proc is not None
            assert await asyncio.to_thread(gw.proc.wait, 30) == 0
        finally:
            gw.stop()
    codes = [code for code, _reason in endings]
    assert grpc.StatusCode.CANCELLED not in codes, endings
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, endings
    # The stopping gateway answered them itself (a caller may also find it gone already).
    assert any(reason == "GATEWAY_SHUTTING_DOWN" for _code, reason in endings), endings
