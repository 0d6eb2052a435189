"""ClearRange on every kind of host, through an in-process gateway: a remote nbdcore host
clears at the source (NBD clear extension), a read-only qemu-nbd export uses the ledger scoped
to a generation, a writable qemu-nbd export is refused; and a write racing a clear."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import shutil
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import GatewayConfig
from nbdcore.aio.client import NBDClient
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.clear_support import (
    G,
    MiB,
    NbdcoreHost,
    WritableQemuNBD,
    dirty_runs,
    make_image,
)
from tests.gateway.conftest import (
    QEMU_B0_DATA,
    QEMU_B1_DATA,
    QemuDisk,
    QemuNBD,
    call_error,
    stream_all,
)

B0 = "qemu:dirty-bitmap:b0"
B1 = "qemu:dirty-bitmap:b1"


def dirty_of(streamed: Any) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length, flags, _ in streamed.rows:
        if flags & 1:
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((start, length))
    return out


async def remaining(stub: Any, export: str, bitmap: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    request = pb.StreamRemainingDirtyRequest(export=export, bitmap=bitmap)
    async for m in stub.StreamRemainingDirty(request):
        pos = m.offset
        for delta, length in zip(m.offset_deltas, m.lengths, strict=True):
            start = pos + delta
            out.append((start, length))
            pos = start + length
        assert pos <= m.next_offset
    return out


def minus(runs: list[tuple[int, int]], cut: tuple[int, int]) -> list[tuple[int, int]]:
    s, e = cut
    out = []
    for o, n in runs:
        if o < s:
            out.append((o, min(o + n, s) - o))
        if o + n > e:
            out.append((max(o, e), o + n - max(o, e)))
    return [r for r in out if r[1] > 0]


@pytest.fixture
def nbdcore_host(tmp_path: Path) -> Any:
    disk = tmp_path / "disk.raw"
    make_image(disk, 8 * MiB, [(0, 4 * MiB), (6 * MiB + 100, 1000)])
    host = NbdcoreHost(disk, tmp_path / "host.sock").start()
    yield host
    host.stop()


async def test_remote_nbdcore_host_clears_at_the_source(
    tmp_path: Path, nbdcore_host: NbdcoreHost, start_gateway: Any
) -> None:
    cfg = GatewayConfig(data_dir=tmp_path / "gw")
    cfg.add_uri_export("disk", nbdcore_host.uri)
    gw = await start_gateway(cfg)
    stub = gw.stub
    listed = await stub.ListBitmaps(pb.ListBitmapsRequest(parent="exports/disk"))
    modes = {b.context: b.clear_mode for b in listed.bitmaps}
    assert modes == {"base:allocation": pb.CLEAR_MODE_UNSUPPORTED, B0: pb.CLEAR_MODE_AT_SOURCE}
    export = await stub.GetExport(pb.GetExportRequest(name="exports/disk"))
    assert export.clear_mode == pb.CLEAR_MODE_AT_SOURCE

    # The disk is writable: a clear needs a token, or the caller's word that nothing writes
    # (tests/gateway/test_clear_conditional.py covers the tokens).
    err = await call_error(
        stub.ClearRange(pb.ClearRangeRequest(export="disk", bitmap="b0", offset=0, length=G))
    )
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.info.reason == "CLEAR_TOKEN_REQUIRED"
    req = pb.ClearRangeRequest(
        export="disk", bitmap="b0", offset=1000, length=3 * G, unconditional=True
    )
    for _ in range(2):  # repeating is harmless: the same answer
        resp = await stub.ClearRange(req)
        assert [(r.offset, r.length) for r in resp.cleared_ranges] == [(G, 2 * G)]
        assert resp.cleared_bytes == 2 * G
        assert resp.clear_mode == pb.CLEAR_MODE_AT_SOURCE
        assert resp.granularity_bytes == G
    # Nothing outside the whole granules of the range changed, at the source itself.
    want = [(0, G), (3 * G, 4 * MiB - 3 * G), (6 * MiB, G)]
    assert await dirty_runs(nbdcore_host.uri, B0) == want
    assert dirty_of(await stream_all(stub, export="disk", context=B0)) == want
    assert await remaining(stub, "disk", "b0") == want
    # A range without a whole granule clears nothing.
    resp = await stub.ClearRange(
        pb.ClearRangeRequest(
            export="disk", bitmap="b0", offset=6 * MiB + 10, length=G, unconditional=True
        )
    )
    assert list(resp.cleared_ranges) == [] and resp.cleared_bytes == 0
    err = await call_error(
        stub.ClearRange(
            pb.ClearRangeRequest(
                export="disk", bitmap="b0", offset=0, length=9 * MiB, unconditional=True
            )
        )
    )
    assert err.code == grpc.StatusCode.OUT_OF_RANGE
    err = await call_error(
        stub.ClearRange(pb.ClearRangeRequest(export="disk", bitmap="nope", offset=0, length=G))
    )
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert await dirty_runs(nbdcore_host.uri, B0) == want


async def test_read_only_qemu_export_uses_the_ledger_per_generation(
    tmp_path: Path, qemu_nbd: QemuNBD, qemu_disk: QemuDisk, start_gateway: Any
) -> None:
    cfg = GatewayConfig(data_dir=tmp_path / "gw")
    cfg.add_uri_export("qd", qemu_nbd.uri)
    gw = await start_gateway(cfg)
    stub = gw.stub
    host_before = await dirty_runs(qemu_nbd.uri, B0)
    original = dirty_of(await stream_all(stub, export="qd", context=B0))
    assert original == host_before

    # No generation yet: refused, and told how to get one.
    listed = await stub.ListBitmaps(pb.ListBitmapsRequest(parent="qd"))
    b0 = next(b for b in listed.bitmaps if b.context == B0)
    assert b0.clear_mode == pb.CLEAR_MODE_UNSUPPORTED
    assert "generation" in b0.clear_unsupported_reason
    clear = pb.ClearRangeRequest(export="qd", bitmap="b0", offset=1 * MiB + 1000, length=50000)
    err = await call_error(stub.ClearRange(clear))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.info.reason == "CLEAR_NOT_SUPPORTED"

    got = await stub.SetExportGeneration(
        pb.SetExportGenerationRequest(export="qd", generation="g1")
    )
    assert (got.generation, got.previous_generation) == ("g1", "")
    listed = await stub.ListBitmaps(pb.ListBitmapsRequest(parent="qd"))
    b0 = next(b for b in listed.bitmaps if b.context == B0)
    assert (b0.clear_mode, b0.generation) == (pb.CLEAR_MODE_LEDGER_MASK, "g1")

    # In ledger mode a clear must name the generation it copied from (review H4): without
    # one it is refused, and the message says which generation is current.
    err = await call_error(stub.ClearRange(clear))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.info.reason == "GENERATION_MISMATCH" and "'g1'" in err.message
    assert dirty_of(await stream_all(stub, export="qd", context=B0)) == original
    clear.generation = "g1"
    resp = await stub.ClearRange(clear)
    assert resp.clear_mode == pb.CLEAR_MODE_LEDGER_MASK and resp.generation == "g1"
    # Byte-exact: a point-in-time bitmap cannot gain bits under the mask.
    assert [(r.offset, r.length) for r in resp.cleared_ranges] == [(1 * MiB + 1000, 50000)]
    masked = minus(original, (1 * MiB + 1000, 1 * MiB + 51000))
    assert dirty_of(await stream_all(stub, export="qd", context=B0)) == masked
    assert await remaining(stub, "qd", "b0") == masked
    # Merged with allocation, too; and the other bitmap is untouched.
    merged = await stream_all(stub, export="qd", context=B0, merge_allocation=True)
    assert dirty_of(merged) == masked
    b1 = dirty_of(await stream_all(stub, export="qd", context=B1))
    assert b1 == [(o - o % G, G) for o, _, _ in QEMU_B1_DATA]
    # The host's bitmap itself is unchanged.
    assert await dirty_runs(qemu_nbd.uri, B0) == host_before

    # A clear that names another generation is refused.
    stale = pb.ClearRangeRequest(export="qd", bitmap="b0", offset=0, length=G, generation="g0")
    err = await call_error(stub.ClearRange(stale))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.info.reason == "GENERATION_MISMATCH"
    # A new generation starts with nothing masked; a generation is a point in time, so going
    # back to the name g1 (a new snapshot under a reused name) starts clean too (review H3).
    got = await stub.SetExportGeneration(
        pb.SetExportGenerationRequest(export="qd", generation="g2")
    )
    assert got.previous_generation == "g1"
    assert dirty_of(await stream_all(stub, export="qd", context=B0)) == original
    await stub.SetExportGeneration(pb.SetExportGenerationRequest(export="qd", generation="g1"))
    assert masked != original
    assert dirty_of(await stream_all(stub, export="qd", context=B0)) == original
    assert QEMU_B0_DATA[0][0] == 1 * MiB  # the range cleared above is dirty data in b0

    err = await call_error(
        stub.SetExportGeneration(pb.SetExportGenerationRequest(export="qd", generation=""))
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_configured_generation_and_restart_keep_the_mask(
    tmp_path: Path, qemu_nbd: QemuNBD, start_gateway: Any
) -> None:
    def config() -> GatewayConfig:
        cfg = GatewayConfig(data_dir=tmp_path / "gw")
        cfg.add_uri_export("qd", qemu_nbd.uri)
        cfg.exports["qd"] = dataclasses.replace(cfg.exports["qd"], generation="snap-1")
        return cfg

    gw = await start_gateway(config())
    original = dirty_of(await stream_all(gw.stub, export="qd", context=B0))
    resp = await gw.stub.ClearRange(
        pb.ClearRangeRequest(
            export="qd", bitmap="b0", offset=0, length=4 * MiB, generation="snap-1"
        )
    )
    assert resp.generation == "snap-1"
    await gw.gateway.stop(grace=0)
    again = await start_gateway(config())
    masked = dirty_of(await stream_all(again.stub, export="qd", context=B0))
    assert masked == minus(original, (0, 4 * MiB))


async def test_writable_foreign_export_is_refused(
    tmp_path: Path, qemu_disk: QemuDisk, start_gateway: Any
) -> None:
    disk = tmp_path / "rw.qcow2"
    shutil.copyfile(qemu_disk.path, disk)
    host = WritableQemuNBD(disk, tmp_path / "rw.sock").start()
    try:
        cfg = GatewayConfig(data_dir=tmp_path / "gw")
        cfg.add_uri_export("rw", host.uri)
        gw = await start_gateway(cfg)
        listed = await gw.stub.ListBitmaps(pb.ListBitmapsRequest(parent="rw"))
        b0 = next(b for b in listed.bitmaps if b.context == B0)
        assert b0.clear_mode == pb.CLEAR_MODE_UNSUPPORTED
        assert "writable" in b0.clear_unsupported_reason
        # Even with a generation: a mask over a writable export would hide new writes.
        await gw.stub.SetExportGeneration(
            pb.SetExportGenerationRequest(export="rw", generation="g")
        )
        before = await dirty_runs(host.uri, B0)
        err = await call_error(
            gw.stub.ClearRange(pb.ClearRangeRequest(export="rw", bitmap="b0", offset=0, length=G))
        )
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION
        assert err.info.reason == "CLEAR_NOT_SUPPORTED"
        assert "writable" in err.message and "mask" in err.message
        assert await dirty_runs(host.uri, B0) == before
        assert dirty_of(await stream_all(gw.stub, export="rw", context=B0)) == before
    finally:
        host.stop()


async def test_a_write_racing_a_clear_stays_dirty(
    tmp_path: Path, nbdcore_host: NbdcoreHost, start_gateway: Any
) -> None:
    """Writers (straight to the host over NBD) and clears (through the gateway) race on the
    same granules. Afterwards, a granule written after the last clear's reply must be dirty,
    and one whose writes all completed before the last clear was sent must be clean."""
    cfg = GatewayConfig(data_dir=tmp_path / "gw")
    cfg.add_uri_export("disk", nbdcore_host.uri)
    gw = await start_gateway(cfg)
    n = 16  # granules raced over
    rng = random.Random(5)
    last_write_sent = [0.0] * n  # when the last write to each granule was sent
    last_write_done = [0.0] * n
    stop = asyncio.Event()

    async def writer() -> None:
        async with await NBDClient.connect(nbdcore_host.uri) as client:
            while not stop.is_set():
                g = rng.randrange(n)
                last_write_sent[g] = time.monotonic()
                await client.pwrite(bytes([g]) * 4096, g * G + rng.randrange(0, G - 4096))
                last_write_done[g] = time.monotonic()

    # Unconditional: what is tested here is the host's atomicity of a clear with the writes.
    clear = pb.ClearRangeRequest(
        export="disk", bitmap="b0", offset=0, length=n * G, unconditional=True
    )
    writers = [asyncio.create_task(writer()) for _ in range(3)]
    for _ in range(30):
        await gw.stub.ClearRange(clear)
    stop.set()
    await asyncio.gather(*writers)
    sent = time.monotonic()
    await gw.stub.ClearRange(clear)
    done = time.monotonic()
    for _ in range(20):  # writes after the last clear: they must show
        g = rng.randrange(n)
        async with await NBDClient.connect(nbdcore_host.uri) as client:
            last_write_sent[g] = time.monotonic()
            await client.pwrite(b"\xff" * 512, g * G + 512)
    runs = await dirty_runs(nbdcore_host.uri, B0)
    dirty = {o // G + i for o, n_ in runs for i in range(n_ // G) if o // G + i < n}
    for g in range(n):
        if last_write_sent[g] > done:
            assert g in dirty, f"granule {g} written after the clear is clean"
        elif last_write_done[g] < sent and last_write_sent[g] < sent:
            assert g not in dirty, f"granule {g} untouched since the clear is dirty"


@pytest.mark.parametrize("mode", ["ledger", "at_source"])
async def test_concurrent_clears_and_streams_stay_consistent(
    tmp_path: Path, qemu_nbd: QemuNBD, nbdcore_host: NbdcoreHost, start_gateway: Any, mode: str
) -> None:
    """Many clients clear disjoint granules while others stream the bitmap. Every stream shows
    clean whatever was acknowledged before it started, and dirty whatever no clear asked for;
    at the end the bitmap is the original minus exactly the acknowledged ranges."""
    cfg = GatewayConfig(data_dir=tmp_path / "gw")
    if mode == "ledger":
        cfg.add_uri_export("x", qemu_nbd.uri)
    else:
        cfg.add_uri_export("x", nbdcore_host.uri)
    gw = await start_gateway(cfg)
    if mode == "ledger":
        await gw.stub.SetExportGeneration(pb.SetExportGenerationRequest(export="x", generation="g"))
    original = dirty_of(await stream_all(gw.stub, export="x", context=B0))
    granules = [o + k * G for o, n in original for k in range(n // G)]
    rng = random.Random(7)
    asked = rng.sample(granules, min(60, len(granules) * 2 // 3))
    acked: dict[int, float] = {}  # granule -> when its clear was acknowledged

    async def clearer(mine: list[int]) -> None:
        for g in mine:
            await gw.stub.ClearRange(
                # "g" is the ledger's generation; the source ignores it. Nothing writes.
                pb.ClearRangeRequest(
                    export="x", bitmap="b0", offset=g, length=G, generation="g", unconditional=True
                )
            )
            acked[g] = time.monotonic()

    async def streamer() -> None:
        for _ in range(4):
            started = time.monotonic()
            before = {g for g, t in acked.items() if t < started}
            shown = {
                o + k * G
                for o, n in dirty_of(await stream_all(gw.stub, export="x", context=B0))
                for k in range(n // G)
            }
            assert not shown & before, "a clear acknowledged before the stream shows dirty"
            assert set(granules) - set(asked) <= shown, "a granule nobody cleared shows clean"

    await asyncio.gather(*(clearer(asked[i::6]) for i in range(6)), *(streamer() for _ in range(3)))
    final = {
        o + k * G
        for o, n in dirty_of(await stream_all(gw.stub, export="x", context=B0))
        for k in range(n // G)
    }
    assert final == set(granules) - set(asked)


async def test_nbdcore_host_without_the_extension_is_like_any_other(
    tmp_path: Path, start_gateway: Any
) -> None:
    """``nbd serve --no-clear-extension``: the gateway cannot clear at the source, so a writable
    export is refused and a read-only one goes to the ledger."""
    disk = tmp_path / "disk.raw"
    make_image(disk, 4 * MiB, [(0, MiB)])
    hosts = {
        "rw": NbdcoreHost(disk, tmp_path / "rw.sock", extra=("--no-clear-extension",)),
        "ro": NbdcoreHost(
            disk, tmp_path / "ro.sock", extra=("--no-clear-extension", "--read-only")
        ),
    }
    cfg = GatewayConfig(data_dir=tmp_path / "gw")
    try:
        for name, host in hosts.items():
            host.start()
            cfg.add_uri_export(name, host.uri)
        gw = await start_gateway(cfg)
        await gw.stub.SetExportGeneration(
            pb.SetExportGenerationRequest(export="ro", generation="g")
        )
        modes = {}
        for name in hosts:
            listed = await gw.stub.ListBitmaps(pb.ListBitmapsRequest(parent=name))
            modes[name] = next(b.clear_mode for b in listed.bitmaps if b.context == B0)
        assert modes == {"rw": pb.CLEAR_MODE_UNSUPPORTED, "ro": pb.CLEAR_MODE_LEDGER_MASK}
        err = await call_error(
            gw.stub.ClearRange(pb.ClearRangeRequest(export="rw", bitmap="b0", offset=0, length=G))
        )
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "writable" in err.message
        resp = await gw.stub.ClearRange(
            pb.ClearRangeRequest(export="ro", bitmap="b0", offset=0, length=G, generation="g")
        )
        assert resp.clear_mode == pb.CLEAR_MODE_LEDGER_MASK
        assert await dirty_runs(hosts["ro"].uri, B0) == [(0, MiB)]  # the source is untouched
    finally:
        for host in hosts.values():
            host.stop()


async def test_remaining_dirty_bad_fields(
    tmp_path: Path, nbdcore_host: NbdcoreHost, start_gateway: Any
) -> None:
    cfg = GatewayConfig(data_dir=tmp_path / "gw")
    cfg.add_uri_export("disk", nbdcore_host.uri)
    gw = await start_gateway(cfg)
    for bitmap in ("", "base:allocation", "x" * 5000):
        err = await call_error(
            gw.stub.StreamRemainingDirty(
                pb.StreamRemainingDirtyRequest(export="disk", bitmap=bitmap)
            )
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "bitmap" in err.fields()
    err = await call_error(
        gw.stub.StreamRemainingDirty(
            pb.StreamRemainingDirtyRequest(export="disk", bitmap="b0", offset=9 * MiB)
        )
    )
    assert err.code == grpc.StatusCode.OUT_OF_RANGE
    for generation in ("", "g" * 300):
        err = await call_error(
            gw.stub.SetExportGeneration(
                pb.SetExportGenerationRequest(export="disk", generation=generation)
            )
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "generation" in err.fields()
    err = await call_error(
        gw.stub.SetExportGeneration(pb.SetExportGenerationRequest(export="nope", generation="g"))
    )
    assert err.code == grpc.StatusCode.NOT_FOUND


async def test_api_generation_and_its_clears_survive_a_restart(
    tmp_path: Path, qemu_nbd: QemuNBD, start_gateway: Any
) -> None:
    def config() -> GatewayConfig:
        cfg = GatewayConfig(data_dir=tmp_path / "gw")
        cfg.add_uri_export("qd", qemu_nbd.uri)
        return cfg

    assert not (tmp_path / "gw" / "ledger.sqlite").exists()
    gw = await start_gateway(config())
    assert not (tmp_path / "gw" / "ledger.sqlite").exists()  # created on first need only
    original = dirty_of(await stream_all(gw.stub, export="qd", context=B0))
    await gw.stub.SetExportGeneration(pb.SetExportGenerationRequest(export="qd", generation="api"))
    await gw.stub.ClearRange(
        pb.ClearRangeRequest(export="qd", bitmap="b0", offset=0, length=2 * MiB, generation="api")
    )
    await gw.gateway.stop(grace=0)
    again = await start_gateway(config())
    export = await again.stub.GetExport(pb.GetExportRequest(name="qd"))
    assert (export.clear_mode, export.generation) == (pb.CLEAR_MODE_LEDGER_MASK, "api")
    masked = dirty_of(await stream_all(again.stub, export="qd", context=B0))
    assert masked == minus(original, (0, 2 * MiB))


async def test_a_resized_export_under_the_same_generation_is_not_masked(
    tmp_path: Path, start_gateway: Any
) -> None:
    """The operator exports another snapshot but forgets to set a new generation: if the size
    differs, the gateway knows it is another point in time and neither masks nor records."""
    from tests.gateway.clear_support import ReadOnlyQemu
    from tests.gateway.conftest import run
    from tests.peers import tool

    disks = []
    for name, size in (("a", 8 * MiB), ("b", 12 * MiB)):
        path = tmp_path / f"{name}.qcow2"
        run(tool("qemu-img"), "create", "-q", "-f", "qcow2", str(path), str(size))
        run(tool("qemu-img"), "bitmap", "--add", "-g", str(G), str(path), "b0")
        run(tool("qemu-io"), "-f", "qcow2", str(path), input=f"write -z 0 {4 * MiB}\n")
        disks.append(path)
    sock = tmp_path / "q.sock"
    host = ReadOnlyQemu(disks[0], sock).start()
    try:
        cfg = GatewayConfig(data_dir=tmp_path / "gw")
        cfg.add_uri_export("qd", host.uri)
        gw = await start_gateway(cfg)
        await gw.stub.SetExportGeneration(
            pb.SetExportGenerationRequest(export="qd", generation="g")
        )
        clear = pb.ClearRangeRequest(
            export="qd", bitmap="b0", offset=0, length=2 * MiB, generation="g"
        )
        await gw.stub.ClearRange(clear)
        assert dirty_of(await stream_all(gw.stub, export="qd", context=B0)) == [(2 * MiB, 2 * MiB)]
        host.stop()
        host = ReadOnlyQemu(disks[1], sock).start()  # another snapshot, same generation
        await asyncio.sleep(0.2)
        # The first stream reconnects (the old connections died with the old host).
        shown = None
        for _ in range(20):
            try:
                shown = dirty_of(await stream_all(gw.stub, export="qd", context=B0))
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
        assert shown == [(0, 4 * MiB)]  # nothing masked
        listed = await gw.stub.ListBitmaps(pb.ListBitmapsRequest(parent="qd"))
        b0 = next(b for b in listed.bitmaps if b.context == B0)
        assert b0.clear_mode == pb.CLEAR_MODE_UNSUPPORTED
        assert "another point in time" in b0.clear_unsupported_reason
        err = await call_error(gw.stub.ClearRange(clear))
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION
        await gw.stub.SetExportGeneration(
            pb.SetExportGenerationRequest(export="qd", generation="g2")
        )
        clear.generation = "g2"
        resp = await gw.stub.ClearRange(clear)
        assert resp.generation == "g2"
        assert dirty_of(await stream_all(gw.stub, export="qd", context=B0)) == [(2 * MiB, 2 * MiB)]
    finally:
        host.stop()
