"""BitmapService in front of real qemu-nbd (7.2, and 10 with extended headers) serving a qcow2
disk whose bitmaps qemu-io dirtied: maps equal nbdinfo's, data equals what qemu-io wrote,
filters and merge_allocation, resume, a host killed and restarted mid-stream."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from gateway.api.bitmaps import NBD_DATA_PER_MESSAGE
from gateway.config import GatewayConfig
from gateway.integrity import RangeDigest
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.conftest import (
    QEMU_B0_BULK,
    QEMU_B0_DATA,
    QEMU_B1_DATA,
    QEMU_CLEAN,
    KiB,
    MiB,
    QemuDisk,
    QemuNBD,
    Streamed,
    call_error,
    check_continuity,
    merged,
    nbdinfo_map,
    stream_all,
    wait_health,
)
from tests.peers import qemu10, tool

pytestmark = pytest.mark.interop

CONTEXTS = ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1", "base:allocation"]


def config_for(*hosts: tuple[str, str]) -> GatewayConfig:
    config = GatewayConfig()
    for name, uri in hosts:
        config.add_uri_export(name, uri)
    return config


@pytest.fixture(params=["qemu-nbd-7.2", "qemu-nbd-10"])
def host(request: pytest.FixtureRequest, qemu_disk: QemuDisk, tmp_path: Path):
    binary = tool("qemu-nbd") if request.param == "qemu-nbd-7.2" else qemu10("qemu-nbd")
    h = QemuNBD(binary, qemu_disk, tmp_path / "q.sock").start()
    yield h
    h.stop()


async def test_extents_equal_nbdinfo_map(host: QemuNBD, start_gateway) -> None:
    gw = await start_gateway(config_for(("vm", host.uri)))
    for context in CONTEXTS:
        expected = nbdinfo_map(host.uri, context)
        got = await stream_all(gw.stub, export="exports/vm", context=context)
        assert merged(got.rows) == expected, context
        # Bare export id and the short bitmap name give the same map.
    short = await stream_all(gw.stub, export="vm", context="b0")
    assert merged(short.rows) == nbdinfo_map(host.uri, "qemu:dirty-bitmap:b0")
    # Small messages: the same map, cut into many contiguous messages.
    small = await stream_all(
        gw.stub, export="vm", context="qemu:dirty-bitmap:b0", max_extents_per_message=5
    )
    assert len(small.messages) > 40
    assert all(len(m.lengths) <= 5 for m in small.messages)
    assert merged(small.rows) == nbdinfo_map(host.uri, "qemu:dirty-bitmap:b0")


async def test_data_equals_what_qemu_io_wrote(qemu_nbd: QemuNBD, start_gateway) -> None:
    gw = await start_gateway(config_for(("vm", qemu_nbd.uri)))
    raw = qemu_nbd.disk.raw.read_bytes()
    got = await stream_all(
        gw.stub, export="vm", context="b0", filter=pb.EXTENT_FILTER_SET, include_data=True
    )
    data = got.data
    assert all(len(m.data) <= MiB for m in got.messages)
    dirty = nbdinfo_map(qemu_nbd.uri, "qemu:dirty-bitmap:b0")
    dirty_bytes = sum(n for _, n, f, _ in dirty if f)
    assert sum(n for _, n, _, _ in got.rows) == dirty_bytes
    for start, length, flags, kind in got.rows:
        assert flags == 1
        if kind == pb.ALLOCATION_DATA:
            assert data[start] == raw[start : start + length]
        else:
            assert kind in (pb.ALLOCATION_ZERO, pb.ALLOCATION_HOLE)
            assert raw[start : start + length] == bytes(length)
    # The patterns qemu-io wrote are there, byte for byte.
    carried = b"".join(data[o] for o in sorted(data))
    for _off, n, pat in [*QEMU_B0_DATA, QEMU_B0_BULK]:
        assert bytes([pat]) * n in carried
    # From an NBD host a message carries at most one READ's worth (BULK_READ, 960 KiB): the
    # 8 MiB bulk range fills what the message before it left, then whole 960 KiB messages.
    bulk_off, bulk_len, _ = QEMU_B0_BULK
    pieces = [len(data[s]) for s in sorted(data) if bulk_off <= s < bulk_off + bulk_len]
    assert all(len(m.data) <= NBD_DATA_PER_MESSAGE for m in got.messages)
    assert pieces[1:-1] == [NBD_DATA_PER_MESSAGE] * (len(pieces) - 2)
    assert len(pieces) >= bulk_len // NBD_DATA_PER_MESSAGE
    # Clean data (written before b0) and b1's data are not carried.
    for off, _n, _ in [QEMU_CLEAN, *QEMU_B1_DATA]:
        assert off not in data


async def test_digest_of_a_host_stream_survives_resumes(qemu_nbd: QemuNBD, start_gateway) -> None:
    """From an NBD host, data messages end off the digest's 1 MiB blocks (960 KiB each): a
    resume at any of them hashes the block's start again from the host, and the digest is the
    one of the bytes qemu-io wrote."""
    gw = await start_gateway(config_for(("vm", qemu_nbd.uri)))
    raw = qemu_nbd.disk.raw.read_bytes()
    fields = dict(
        export="vm", context="b0", filter=pb.EXTENT_FILTER_SET, include_data=True, digest="blake3"
    )
    whole = await stream_all(gw.stub, **fields)
    expected = RangeDigest("blake3", 0)
    for start, length, _flags, kind in whole.rows:
        if kind == pb.ALLOCATION_DATA:
            expected.update(start, raw[start : start + length])
    digest = whole.messages[-1].digest
    assert digest == expected.finish(whole.messages[-1].range_end)
    ends = [m.next_offset for m in whole.messages]
    assert any(e % MiB for e in ends), "some message ends inside a digest block"
    for k in range(1, len(whole.messages)):
        rest = await stream_all(gw.stub, resume_token=whole.messages[k - 1].resume_token, **fields)
        assert rest.messages[0].offset == whole.messages[k - 1].next_offset
        assert rest.messages[-1].digest == digest, f"resumed after message {k}"
        assert rest.data == {s: b for s, b in whole.data.items() if s >= rest.messages[0].offset}


async def test_filters_and_merge_allocation(qemu_nbd: QemuNBD, start_gateway) -> None:
    gw = await start_gateway(config_for(("vm", qemu_nbd.uri)))
    full = merged(nbdinfo_map(qemu_nbd.uri, "qemu:dirty-bitmap:b0"))
    dirty = [r for r in full if r[2]]
    clean = [r for r in full if not r[2]]
    got_set = await stream_all(gw.stub, export="vm", context="b0", filter=pb.EXTENT_FILTER_SET)
    got_clear = await stream_all(gw.stub, export="vm", context="b0", filter=pb.EXTENT_FILTER_CLEAR)
    assert merged(got_set.rows) == dirty
    assert merged(got_clear.rows) == clean
    # Gaps are real gaps: the deltas of a filtered stream skip exactly the other kind.
    assert any(d for m in got_set.messages for d in m.offset_deltas)

    alloc = nbdinfo_map(qemu_nbd.uri, "base:allocation")
    got = await stream_all(gw.stub, export="vm", context="b0", merge_allocation=True)
    rows = got.rows
    assert sum(n for _, n, _, _ in rows) == qemu_nbd.disk.size

    def at(table: list, pos: int) -> int:
        for off, n, flags, _ in table:
            if off <= pos < off + n:
                return flags
        raise AssertionError(pos)

    expected_kind = {0: pb.ALLOCATION_DATA, 1: pb.ALLOCATION_DATA, 2: pb.ALLOCATION_ZERO}
    expected_kind[3] = pb.ALLOCATION_HOLE
    for off, n, flags, kind in rows:
        for pos in (off, off + n - 1):
            assert flags == at(full, pos)
            assert kind == expected_kind[at(alloc, pos) & 3]
    # qemu-io's write -z dirtied b0 without allocating: dirty rows that need no data exist.
    assert any(f == 1 and k != pb.ALLOCATION_DATA for _, _, f, k in rows)


async def test_resume_after_cut_continues_exactly(qemu_nbd: QemuNBD, start_gateway) -> None:
    gw = await start_gateway(config_for(("vm", qemu_nbd.uri)))
    fields = dict(export="vm", context="b0", max_extents_per_message=7, merge_allocation=True)
    whole = await stream_all(gw.stub, **fields)
    call = gw.stub.StreamExtents(pb.StreamExtentsRequest(**fields))
    first = []
    async for msg in call:
        first.append(msg)
        if len(first) == 9:
            break
    call.cancel()
    token = first[-1].resume_token
    rest = await stream_all(gw.stub, resume_token=token, **fields)
    assert rest.messages[0].offset == first[-1].next_offset
    both = [*first, *rest.messages]
    check_continuity(both, 0)
    assert merged(Streamed(both).rows) == merged(whole.rows)
    # The same with resume_offset; and both together when they agree.
    by_offset = await stream_all(gw.stub, resume_offset=first[-1].next_offset, **fields)
    assert [r for m in by_offset.messages for r in m.lengths] == [
        r for m in rest.messages for r in m.lengths
    ]
    agree = await stream_all(
        gw.stub, resume_offset=first[-1].next_offset, resume_token=token, **fields
    )
    assert merged(agree.rows) == merged(rest.rows)
    # Resuming at the very end gives one empty final message.
    end = await stream_all(gw.stub, resume_token=whole.messages[-1].resume_token, **fields)
    assert len(end.messages) == 1 and not end.messages[0].lengths
    # A sub-range with a filter resumes inside the sub-range.
    sub = dict(fields, offset=20 * MiB, length=8 * MiB, filter=pb.EXTENT_FILTER_SET)
    sub_whole = await stream_all(gw.stub, **sub)
    assert sub_whole.messages[0].range_end == 28 * MiB
    mid = sub_whole.messages[len(sub_whole.messages) // 2]
    sub_rest = await stream_all(gw.stub, resume_token=mid.resume_token, **sub)
    i = sub_whole.messages.index(mid)
    assert merged(Streamed(sub_whole.messages[i + 1 :]).rows) == merged(sub_rest.rows)


async def test_host_killed_mid_stream_then_restarted(
    qemu_disk: QemuDisk, tmp_path: Path, start_gateway
) -> None:
    host = QemuNBD(tool("qemu-nbd"), qemu_disk, tmp_path / "k.sock").start()
    other = QemuNBD(tool("qemu-nbd"), qemu_disk, tmp_path / "o.sock").start()
    try:
        # No BDP probing: the gateway runs at most about a message ahead of this reader.
        gw = await start_gateway(
            config_for(("vm", host.uri), ("other", other.uri)), **{"grpc.http2.bdp_probe": 0}
        )
        fields = dict(export="vm", context="b0", filter=pb.EXTENT_FILTER_SET, include_data=True)
        whole = await stream_all(gw.stub, **fields)
        call = gw.stub.StreamExtents(pb.StreamExtentsRequest(**fields))
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for msg in call:
                got.append(msg)
                if len(got) == 2:
                    host.stop(signal.SIGKILL)
                await asyncio.sleep(0.01)
        from tests.gateway.conftest import rich

        err = rich(info.value)
        assert err.code == grpc.StatusCode.UNAVAILABLE
        assert err.info.reason == "HOST_UNAVAILABLE"
        from google.rpc import error_details_pb2

        err.detail(error_details_pb2.RetryInfo)
        resume_offset = int(err.info.metadata["resume_offset"])
        assert resume_offset == got[-1].next_offset
        assert err.trailers["nbdgw-resume-offset"] == str(resume_offset)
        assert err.info.metadata["resume_token"] == got[-1].resume_token
        assert len(got) < len(whole.messages)

        # While it is down: its export fails fast, its health says NOT_SERVING, the other
        # export keeps working.
        await wait_health(gw.channel, "exports/vm", health_pb2.HealthCheckResponse.NOT_SERVING)
        await wait_health(
            gw.channel, "nbdgw.v1.BitmapService", health_pb2.HealthCheckResponse.NOT_SERVING
        )
        down = await call_error(gw.stub.GetExport(pb.GetExportRequest(name="exports/vm")))
        assert down.code == grpc.StatusCode.UNAVAILABLE
        assert down.detail(error_details_pb2.RetryInfo).retry_delay.ToNanoseconds() > 0
        ok = await gw.stub.GetExport(pb.GetExportRequest(name="exports/other"))
        assert ok.size_bytes == qemu_disk.size
        listed = await gw.stub.ListExports(pb.ListExportsRequest())
        states = {e.name: e.state for e in listed.exports}
        assert states == {
            "exports/vm": pb.EXPORT_STATE_UNAVAILABLE,
            "exports/other": pb.EXPORT_STATE_AVAILABLE,
        }

        host.start()
        await wait_health(gw.channel, "exports/vm", health_pb2.HealthCheckResponse.SERVING)
        await wait_health(
            gw.channel, "nbdgw.v1.BitmapService", health_pb2.HealthCheckResponse.SERVING
        )
        rest = await stream_all(gw.stub, resume_token=got[-1].resume_token, **fields)
        both = [*got, *rest.messages]
        check_continuity(both, 0)
        joined = Streamed(both)
        assert merged(joined.rows) == merged(whole.rows)
        assert joined.data == whole.data
    finally:
        host.stop()
        other.stop()


async def test_list_bitmaps_and_clear_refused(qemu_nbd: QemuNBD, start_gateway) -> None:
    gw = await start_gateway(config_for(("vm", qemu_nbd.uri)))
    resp = await gw.stub.ListBitmaps(pb.ListBitmapsRequest(parent="exports/vm"))
    by_context = {b.context: b for b in resp.bitmaps}
    assert set(CONTEXTS) <= set(by_context)
    assert by_context["base:allocation"].kind == pb.BITMAP_KIND_ALLOCATION
    b0 = by_context["qemu:dirty-bitmap:b0"]
    assert b0.kind == pb.BITMAP_KIND_DIRTY_BITMAP
    assert b0.name == "exports/vm/bitmaps/qemu:dirty-bitmap:b0"
    assert b0.export_size_bytes == qemu_nbd.disk.size
    assert b0.granularity_bytes == 0  # qemu-nbd does not say
    assert not b0.HasField("recording")
    assert b0.clear_mode == pb.CLEAR_MODE_UNSUPPORTED
    assert "generation" in b0.clear_unsupported_reason  # read-only: the ledger, once set
    export = await gw.stub.GetExport(pb.GetExportRequest(name="vm"))
    assert export.size_bytes == qemu_nbd.disk.size
    # qemu-nbd -r advertises SEND_FLUSH (flags 0x048f on 7.2).
    assert export.read_only and export.flags.can_flush
    assert export.clear_mode == pb.CLEAR_MODE_UNSUPPORTED
    assert export.host.startswith("nbd+unix:")

    err = await call_error(
        gw.stub.ClearRange(
            pb.ClearRangeRequest(export="vm", bitmap="b0", offset=0, length=64 * KiB)
        )
    )
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.info.reason == "CLEAR_NOT_SUPPORTED"
    from google.rpc import error_details_pb2

    violation = err.detail(error_details_pb2.PreconditionFailure).violations[0]
    assert violation.subject == "exports/vm/bitmaps/qemu:dirty-bitmap:b0"
    assert "generation" in err.message
    # Nothing was cleared: the bitmap is unchanged.
    assert nbdinfo_map(qemu_nbd.uri, "qemu:dirty-bitmap:b0")[0][2] == 0
    still = await stream_all(gw.stub, export="vm", context="b0", filter=pb.EXTENT_FILTER_SET)
    assert still.rows[0][0] == QEMU_B0_DATA[0][0]


async def test_host_that_accepts_one_client(
    qemu_disk: QemuDisk, tmp_path: Path, start_gateway
) -> None:
    """qemu-nbd -e 1 keeps a second client waiting: the gateway must never hold two."""
    host = QemuNBD(tool("qemu-nbd"), qemu_disk, tmp_path / "one.sock", clients=1).start()
    try:
        # nbdinfo is a client too: ask it first, while the gateway holds no connection.
        expected = nbdinfo_map(host.uri, "qemu:dirty-bitmap:b0")
        expected_b1 = nbdinfo_map(host.uri, "qemu:dirty-bitmap:b1")
        config = config_for(("vm", host.uri))
        config.max_connections_per_host = 1
        gw = await start_gateway(config)
        async with asyncio.timeout(60):
            export = await gw.stub.GetExport(pb.GetExportRequest(name="vm"))
            assert export.size_bytes == qemu_disk.size
            listed = await gw.stub.ListBitmaps(pb.ListBitmapsRequest(parent="vm"))
            assert "qemu:dirty-bitmap:b0" in [b.context for b in listed.bitmaps]
            plain, merged_alloc, other = await asyncio.gather(
                stream_all(gw.stub, export="vm", context="b0"),
                stream_all(gw.stub, export="vm", context="b0", merge_allocation=True),
                stream_all(gw.stub, export="vm", context="b1"),
            )
            assert merged(plain.rows) == expected
            assert sum(n for _, n, _, _ in merged_alloc.rows) == qemu_disk.size
            assert merged(other.rows) == expected_b1
            listed = await gw.stub.ListExports(pb.ListExportsRequest())
            assert listed.exports[0].state == pb.EXPORT_STATE_AVAILABLE
        assert gw.gateway.hosts[gw.gateway.pools["vm"].host.name]._open <= 1
    finally:
        host.stop()


async def test_host_down_at_start_comes_up_later(
    qemu_disk: QemuDisk, tmp_path: Path, start_gateway
) -> None:
    host = QemuNBD(tool("qemu-nbd"), qemu_disk, tmp_path / "late.sock")
    gw = await start_gateway(config_for(("vm", host.uri)))
    try:
        err = await call_error(gw.stub.GetExport(pb.GetExportRequest(name="vm")))
        assert err.code == grpc.StatusCode.UNAVAILABLE
        assert err.info.reason == "HOST_UNAVAILABLE"
        assert "late.sock" in err.info.metadata["cause"]
        await wait_health(gw.channel, "exports/vm", health_pb2.HealthCheckResponse.NOT_SERVING)
        host.start()
        await wait_health(gw.channel, "exports/vm", health_pb2.HealthCheckResponse.SERVING)
        await wait_health(
            gw.channel, "nbdgw.v1.BitmapService", health_pb2.HealthCheckResponse.SERVING
        )
        got = await stream_all(gw.stub, export="vm", context="b0")
        assert merged(got.rows) == nbdinfo_map(host.uri, "qemu:dirty-bitmap:b0")
    finally:
        host.stop()
