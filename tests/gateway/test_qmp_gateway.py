"""The ``qmp`` host kind through the gateway's API, against a real QEMU (7.2 and 10.0) whose
disk a writer keeps writing through QEMU: change tracking turned on over gRPC, bitmaps listed
from QMP, the backup loop (CreateSnapshot, StreamExtents with data, ClearRange with no
generation, ReleaseSnapshot merging back exactly the unacknowledged granules), consistency
groups, racing creates, QEMU dying and coming back, and recovery after the gateway restarts."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import GatewayConfig
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc
from tests.gateway.conftest import call_error, stream_all, wait_health
from tests.gateway.test_snapshots import reason
from tests.qemu_vm import GRANULE, GuestlessVM, Writer, granules

pytestmark = [pytest.mark.interop, pytest.mark.slow]

CTX = "qemu:dirty-bitmap:b"


@pytest.fixture(params=["7", "10"])
def vm(request: pytest.FixtureRequest, tmp_path: Path):
    machine = GuestlessVM(tmp_path / "vm", request.param, disks=2).start()
    yield machine
    machine.stop()


def qmp_config(
    tmp_path: Path, vm: GuestlessVM, disks: int = 1, node: str = "drive{i}", name: str = "d{i}"
) -> GatewayConfig:
    config = GatewayConfig(data_dir=tmp_path / "data")
    for i in range(disks):
        config.add_qmp_export(name.format(i=i), str(vm.qmp_path), node.format(i=i))
    return config


async def start_qmp(
    start_gateway: Any,
    tmp_path: Path,
    vm: GuestlessVM,
    disks: int = 1,
    node: str = "drive{i}",
    name: str = "d{i}",
) -> Any:
    run = await start_gateway(qmp_config(tmp_path, vm, disks, node, name))
    run.snapshots = spb_grpc.SnapshotServiceStub(run.channel)
    (host,) = run.gateway.hosts.values()
    run.host = host
    vm.test_nbd_socket = host.nbd_socket
    return run


def live_bitmaps(vm: GuestlessVM, node: str = "drive0") -> dict[str, dict[str, Any]]:
    return vm.bitmaps(node)


async def test_bitmaps_over_grpc(vm: GuestlessVM, start_gateway: Any, tmp_path: Path) -> None:
    run = await start_qmp(start_gateway, tmp_path, vm)
    added = await run.stub.AddBitmap(pb.AddBitmapRequest(parent="exports/d0", bitmap="b"))
    assert (added.context, added.granularity_bytes, added.recording, added.persistent) == (
        CTX,
        GRANULE,
        True,
        True,
    )
    assert live_bitmaps(vm)["b"]["recording"]
    err = await call_error(run.stub.AddBitmap(pb.AddBitmapRequest(parent="d0", bitmap="b")))
    assert (err.code, err.info.reason) == (grpc.StatusCode.ALREADY_EXISTS, "BITMAP_EXISTS")
    # The checkpoint chain's names and the views' are not a user's: a fake checkpoint, or a
    # live bitmap taken for a view (its forks were dropped at release, their bits with them).
    for name in ("nbdgw-ckpt-000099-fake", "since:x", "between:a:b"):
        err = await call_error(run.stub.AddBitmap(pb.AddBitmapRequest(parent="d0", bitmap=name)))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "bitmap" in err.message, name
    err = await call_error(run.stub.RemoveBitmap(pb.RemoveBitmapRequest(
        name="exports/d0/bitmaps/qemu:dirty-bitmap:nbdgw-ckpt-000001-c0")))  # fmt: skip
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "DeleteCheckpoint" in err.message
    assert set(live_bitmaps(vm)) == {"b"}

    writer = Writer(vm, run.host.nbd_socket).open()
    for i in range(5):
        writer.write_pattern(i * 2 * GRANULE, 512, i)
    listed = await run.stub.ListBitmaps(pb.ListBitmapsRequest(parent="d0"))
    by_ctx = {b.context: b for b in listed.bitmaps}
    assert set(by_ctx) == {"base:allocation", CTX}
    b = by_ctx[CTX]
    assert (b.granularity_bytes, b.recording, b.persistent, b.busy, b.dirty_bytes) == (
        GRANULE,
        True,
        True,
        False,
        5 * GRANULE,
    )
    assert b.export_size_bytes == vm.disks[0].size

    # The live export reads the disk as QEMU sees it.
    streamed = await stream_all(
        run.stub, export="exports/d0", context="base:allocation", include_data=True
    )
    data = streamed.data
    for w in writer.writes:
        start = max(o for o in data if o <= w.offset)
        assert data[start][w.offset - start : w.offset - start + len(w.data)] == w.data

    exports = await run.stub.ListExports(pb.ListExportsRequest())
    (export,) = exports.exports
    assert export.state == pb.EXPORT_STATE_AVAILABLE and export.host.startswith("qmp:")

    removed = await run.stub.RemoveBitmap(pb.RemoveBitmapRequest(name=f"exports/d0/bitmaps/{CTX}"))
    assert removed.context == CTX
    assert "b" not in live_bitmaps(vm)
    err = await call_error(
        run.stub.RemoveBitmap(pb.RemoveBitmapRequest(name="exports/d0/bitmaps/b"))
    )
    assert (err.code, err.info.reason) == (grpc.StatusCode.NOT_FOUND, "BITMAP_NOT_FOUND")
    writer.close()


async def _snapshot_paused(run: Any, writer: Writer, **fields: Any) -> tuple[spb.Snapshot, int]:
    """CreateSnapshot with the writer paused around it, so that the instant is known: returns
    the snapshot and how many writes came before it."""
    writer._pause.set()
    await asyncio.sleep(0.05)
    at = len(writer.writes)
    try:
        snap = await run.snapshots.CreateSnapshot(spb.CreateSnapshotRequest(**fields))
    finally:
        writer._pause.clear()
    return snap, at


async def test_backup_loop_with_live_writes(
    vm: GuestlessVM, start_gateway: Any, tmp_path: Path
) -> None:
    run = await start_qmp(start_gateway, tmp_path, vm)
    await run.stub.AddBitmap(pb.AddBitmapRequest(parent="d0", bitmap="b"))
    writer = Writer(vm, run.host.nbd_socket).open()
    size = vm.disks[0].size
    for i in range(12):
        writer.write_pattern(i * 5 * GRANULE + 1000, 9000, i)
    writer.start(seed=3)
    await asyncio.sleep(0.3)
    snap, at = await _snapshot_paused(
        run, writer, parent="exports/d0", snapshot_id="s1", bitmaps=["b"]
    )
    assert snap.export == "exports/d0@s1" and snap.size_bytes == size
    before = writer.writes[:at]
    fork = granules([(w.offset, len(w.data)) for w in before])
    assert [(f.context, f.dirty_bytes) for f in snap.forks] == [(CTX, len(fork) * GRANULE)]

    await asyncio.sleep(0.5)  # the VM keeps writing
    # The fork with its data, through the snapshot's export: the disk at the instant.
    streamed = await stream_all(
        run.stub, export="exports/d0@s1", context=CTX, include_data=True,
        filter=pb.EXTENT_FILTER_SET,
    )  # fmt: skip
    expected = writer.image_after(b"\0" * size, before)
    rows = [(o, n) for o, n, f, _ in streamed.rows if f & 1]
    assert granules(rows) == fork
    for off, data in streamed.data.items():
        assert data == expected[off : off + len(data)]
    assert sum(len(d) for d in streamed.data.values()) > 0

    # Acknowledge all but the last three granules of the fork, with no generation.
    kept = sorted(fork)[-3:]
    for g in sorted(fork - set(kept)):
        done = await run.stub.ClearRange(
            pb.ClearRangeRequest(export="exports/d0@s1", bitmap="b", offset=g * GRANULE,
                                 length=GRANULE)
        )  # fmt: skip
        assert done.clear_mode == pb.CLEAR_MODE_LEDGER_MASK and done.cleared_bytes == GRANULE
    remaining = await stream_all(
        run.stub, export="exports/d0@s1", context=CTX, filter=pb.EXTENT_FILTER_SET
    )
    assert granules([(o, n) for o, n, f, _ in remaining.rows if f & 1]) == set(kept)

    writer.stop()
    after = granules([(w.offset, len(w.data)) for w in writer.writes[at:]])
    assert after, "the writer wrote during the snapshot"
    released = await run.snapshots.ReleaseSnapshot(
        spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s1")
    )
    assert [(m.context, m.dirty_bytes) for m in released.merged] == [(CTX, 3 * GRANULE)]
    assert list(released.released) == ["exports/d0/snapshots/s1"]
    # No dirty bit lost, none invented: the writes since the instant and the unacknowledged.
    assert live_bitmaps(vm)["b"]["count"] == len(after | set(kept)) * GRANULE
    assert not [n for n in vm.node_names() if n.startswith("nbdgw-f")]
    assert not list((tmp_path / "data").rglob("*.fleece.qcow2"))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await run.snapshots.ReleaseSnapshot(
            spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s1")
        )
    assert reason(exc.value) == (grpc.StatusCode.NOT_FOUND, "SNAPSHOT_NOT_FOUND")
    writer.close()


async def test_consistency_group_and_races(
    vm: GuestlessVM, start_gateway: Any, tmp_path: Path
) -> None:
    run = await start_qmp(start_gateway, tmp_path, vm, disks=2)
    for d in ("d0", "d1"):
        await run.stub.AddBitmap(pb.AddBitmapRequest(parent=d, bitmap="b"))
    w0 = Writer(vm, run.host.nbd_socket, node="drive0").open()
    w1 = Writer(vm, run.host.nbd_socket, node="drive1").open()
    w0.write_pattern(0, 4096, 1)
    w1.write_pattern(GRANULE, 4096, 2)
    # Ids that name files and exports: refused before QEMU is asked anything (a path was
    # written outside DATA_DIR, "a/b" could not be released, "a@b" was lost at a restart).
    folder_before = sorted(p.name for p in run.host.folder.iterdir())
    for field, value in (("snapshot_id", "../../../escaped"), ("snapshot_id", "a/b"),
                         ("snapshot_id", "a@b"), ("checkpoint_id", "c/1")):  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await run.snapshots.CreateSnapshot(
                spb.CreateSnapshotRequest(parent="d0", bitmaps=["b"], **{field: value})
            )
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (value, exc.value)
        assert field in (exc.value.details() or "")
    assert sorted(p.name for p in run.host.folder.iterdir()) == folder_before
    assert not (tmp_path.parent / "escaped").exists()
    snap = await run.snapshots.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="d0", group=["d1"], snapshot_id="g", bitmaps=["b"])
    )
    assert list(snap.group) == ["exports/d0/snapshots/g", "exports/d1/snapshots/g"]
    # One instant, one creation time for the whole group.
    members = [
        (await run.snapshots.ListSnapshots(spb.ListSnapshotsRequest(parent=d))).snapshots[0]
        for d in ("d0", "d1")
    ]
    assert members[0].create_time == members[1].create_time == snap.create_time
    for d, w in (("d0", w0), ("d1", w1)):
        s = await stream_all(run.stub, export=f"exports/{d}@g", context=CTX, include_data=True,
                             filter=pb.EXTENT_FILTER_SET)  # fmt: skip
        ((off, data),) = s.data.items()
        assert off == w.writes[0].offset // GRANULE * GRANULE
        assert w.writes[0].data in data
    # Racing creates on a disk that has a snapshot: a clear error, whichever the id.
    results = await asyncio.gather(
        *(
            run.snapshots.CreateSnapshot(spb.CreateSnapshotRequest(parent="d0", snapshot_id=i,
                                                                   bitmaps=["b"]))
            for i in ("x", "y")
        ),
        return_exceptions=True,
    )  # fmt: skip
    for r in results:
        assert (
            isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.FAILED_PRECONDITION
        )
    released = await run.snapshots.ReleaseSnapshot(
        spb.ReleaseSnapshotRequest(name="exports/d1/snapshots/g")
    )
    assert sorted(released.released) == ["exports/d0/snapshots/g", "exports/d1/snapshots/g"]
    # Nothing acknowledged: both forks merged back whole.
    assert live_bitmaps(vm, "drive0")["b"]["count"] == GRANULE
    assert live_bitmaps(vm, "drive1")["b"]["count"] == GRANULE
    # Two racing creates on a free disk: one wins, the other gets a clear error.
    results = await asyncio.gather(
        *(
            run.snapshots.CreateSnapshot(spb.CreateSnapshotRequest(parent="d0", snapshot_id=i,
                                                                   bitmaps=["b"]))
            for i in ("p", "q")
        ),
        return_exceptions=True,
    )  # fmt: skip
    won = [r for r in results if isinstance(r, spb.Snapshot)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1 and len(lost) == 1
    assert reason(lost[0]) == (grpc.StatusCode.FAILED_PRECONDITION, "DISK_BUSY")
    assert "release it first" in lost[0].details()
    w0.close()
    w1.close()


async def test_qemu_dies_and_comes_back(
    vm: GuestlessVM, start_gateway: Any, tmp_path: Path
) -> None:
    run = await start_qmp(start_gateway, tmp_path, vm)
    await run.stub.AddBitmap(pb.AddBitmapRequest(parent="d0", bitmap="b"))
    vm.stop()
    await wait_health(run.channel, "nbdgw.v1.BitmapService", 2)  # NOT_SERVING
    for call in (
        run.stub.ListBitmaps(pb.ListBitmapsRequest(parent="d0")),
        run.snapshots.CreateSnapshot(spb.CreateSnapshotRequest(parent="d0", bitmaps=["b"])),
    ):
        err = await call_error(call)
        assert (err.code, err.info.reason) == (grpc.StatusCode.UNAVAILABLE, "HOST_UNAVAILABLE")
    vm.start()
    await wait_health(run.channel, "nbdgw.v1.BitmapService", 1)  # SERVING
    listed = await run.stub.ListBitmaps(pb.ListBitmapsRequest(parent="d0"))
    assert CTX in {b.context for b in listed.bitmaps}  # persistent: QEMU stored it at exit
    # Killed, QEMU cannot store it: loaded again, it is inconsistent, and a fork says so.
    vm.stop(signal.SIGKILL)
    await wait_health(run.channel, "nbdgw.v1.BitmapService", 2)
    vm.start()
    await wait_health(run.channel, "nbdgw.v1.BitmapService", 1)
    listed = await run.stub.ListBitmaps(pb.ListBitmapsRequest(parent="d0"))
    assert {b.context: b.inconsistent for b in listed.bitmaps}[CTX]
    err = await call_error(
        run.snapshots.CreateSnapshot(spb.CreateSnapshotRequest(parent="d0", bitmaps=["b"]))
    )
    assert (err.code, err.info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BITMAP_BUSY")
    assert "inconsistent" in err.message and "full backup" in err.message


async def test_restart_serves_the_snapshot_again(
    vm: GuestlessVM, start_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = await start_qmp(start_gateway, tmp_path, vm)
    await run.stub.AddBitmap(pb.AddBitmapRequest(parent="d0", bitmap="b"))
    writer = Writer(vm, run.host.nbd_socket).open()
    for i in range(4):
        writer.write_pattern(i * GRANULE, 4096, i)
    await run.snapshots.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="d0", snapshot_id="s", bitmaps=["b"], checkpoint_id="k1")
    )
    await run.stub.ClearRange(
        pb.ClearRangeRequest(export="d0@s", bitmap="b", offset=0, length=GRANULE)
    )
    (before,) = (await run.snapshots.ListSnapshots(spb.ListSnapshotsRequest(parent="d0"))).snapshots
    # A gateway that stops without releasing (as after kill -9, QEMU keeps everything).
    await run.gateway.stop(grace=0)
    writer.write_pattern(10 * GRANULE, 4096, 9)
    # Restarted with the export renamed: the snapshot's forks are in QEMU, and the log says
    # which export to configure again to release them.
    caplog.set_level(logging.WARNING, logger="nbdgw.qmp")
    renamed = await start_qmp(start_gateway, tmp_path, vm, node="drive{i}", name="renamed{i}")
    assert any("no export d0 is configured" in r.getMessage() for r in caplog.records)
    await renamed.gateway.stop(grace=0)
    run2 = await start_qmp(start_gateway, tmp_path, vm)
    listed = await run2.snapshots.ListSnapshots(spb.ListSnapshotsRequest(parent="d0"))
    assert [s.name for s in listed.snapshots] == ["exports/d0/snapshots/s"]
    # What QEMU does not keep (the checkpoint the snapshot started, its instant) is read back
    # from the gateway's record beside the fleecing image.
    (after,) = listed.snapshots
    assert before.checkpoint_id == after.checkpoint_id == "k1"
    assert after.create_time == before.create_time
    remaining = await stream_all(run2.stub, export="d0@s", context=CTX, filter=pb.EXTENT_FILTER_SET)
    # The acknowledgement survived the restart (same generation).
    assert granules([(o, n) for o, n, f, _ in remaining.rows if f & 1]) == {1, 2, 3}
    released = await run2.snapshots.ReleaseSnapshot(
        spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s")
    )
    assert [m.dirty_bytes for m in released.merged] == [3 * GRANULE]
    assert live_bitmaps(vm)["b"]["count"] == 4 * GRANULE  # granules 1-3 and the new write
    assert not list((tmp_path / "data").rglob("*.fleece.*"))  # the image and its record
    writer.close()


async def test_cli(vm: GuestlessVM, start_gateway: Any, tmp_path: Path) -> None:
    from tests.gateway.cli_support import nbdgw

    run = await start_qmp(start_gateway, tmp_path, vm, disks=2)

    async def cli(*args: str) -> str:
        proc = await asyncio.to_thread(nbdgw, *args, "--target", run.target)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "recording" in await cli("bitmap", "add", "d0", "b")
    await cli("bitmap", "add", "d1", "b", "--transient", "--granularity", "128K")
    assert vm.bitmaps("drive1")["b"]["granularity"] == 128 << 10
    assert not vm.bitmaps("drive1")["b"]["persistent"]
    table = await cli("bitmap", "list", "d0")
    assert "qemu:dirty-bitmap:b" in table and "65536" in table
    exports = await cli("export", "list")
    assert "qmp:" in exports and "available" in exports
    row = next(line.split() for line in exports.splitlines() if line.startswith("d0 "))
    assert row[2:5] == ["available", row[3], "qmp"]  # STATE, HOST, KIND
    out = await cli("snapshot", "create", "d0", "g", "--bitmap", "b", "--group", "d1")
    assert "d0@g" in out
    out = await cli("snapshot", "release", "d1", "g")
    assert "exports/d0/snapshots/g" in out
    assert "removed qemu:dirty-bitmap:b" in await cli("bitmap", "remove", "d1", "b")
    proc = await asyncio.to_thread(nbdgw, "bitmap", "remove", "d1", "b", "--target", run.target)
    assert proc.returncode != 0 and "qemu:dirty-bitmap:b" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one clear line, no traceback


async def test_qemu_restarts_under_an_open_snapshot(
    vm: GuestlessVM, start_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """QEMU stops (cleanly: it stores its persistent bitmaps, the forks in the fleecing image
    too) while a snapshot is open; when it is back the gateway merges the forks back from the
    image: the dirty bits of before the snapshot are not lost."""
    run = await start_qmp(start_gateway, tmp_path, vm)
    await run.stub.AddBitmap(pb.AddBitmapRequest(parent="d0", bitmap="b"))
    writer = Writer(vm, run.host.nbd_socket).open()
    for i in range(3):
        writer.write_pattern(i * 4 * GRANULE, 4096, i)
    await run.snapshots.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="d0", snapshot_id="s", bitmaps=["b"])
    )
    writer.write_pattern(20 * GRANULE, 4096, 7)  # after the instant: in b
    writer.close()
    caplog.set_level(logging.WARNING, logger="nbdgw.qmp")
    vm.stop()
    await wait_health(run.channel, "nbdgw.v1.BitmapService", 2)  # NOT_SERVING
    err = await call_error(
        run.snapshots.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s"))
    )
    assert err.code == grpc.StatusCode.UNAVAILABLE
    vm.start()
    await wait_health(run.channel, "nbdgw.v1.BitmapService", 1)  # SERVING
    listed = await run.snapshots.ListSnapshots(spb.ListSnapshotsRequest(parent="d0"))
    assert not listed.snapshots  # QEMU lost the point in time
    assert not list((tmp_path / "data").rglob("*.fleece.qcow2"))
    assert granules_of(vm) == {0, 4, 8, 20}
    assert any("forks b merged back" in r.getMessage() for r in caplog.records)


async def test_qemu_killed_under_an_open_snapshot_is_said_plainly(
    vm: GuestlessVM, start_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed, QEMU stores nothing: neither the forks in the fleecing image nor a bitmap added
    since it started (gone when it is back). The log said "forks merged back" all the same;
    it now says that nothing could be, and what to do."""
    run = await start_qmp(start_gateway, tmp_path, vm)
    await run.stub.AddBitmap(pb.AddBitmapRequest(parent="d0", bitmap="b"))
    writer = Writer(vm, run.host.nbd_socket).open()
    writer.write_pattern(0, 4096, 1)
    writer.close()
    await run.snapshots.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="d0", snapshot_id="s", bitmaps=["b"])
    )
    caplog.set_level(logging.WARNING, logger="nbdgw.qmp")
    vm.stop(signal.SIGKILL)
    await wait_health(run.channel, "nbdgw.v1.BitmapService", 2)  # NOT_SERVING
    vm.start()
    await wait_health(run.channel, "nbdgw.v1.BitmapService", 1)  # SERVING
    said = [r.getMessage() for r in caplog.records]
    assert any("without storing the snapshot's forks" in m for m in said), said
    assert not any("merged back" in m for m in said), said
    listed = await run.snapshots.ListSnapshots(spb.ListSnapshotsRequest(parent="d0"))
    assert not listed.snapshots
    assert not list((tmp_path / "data").rglob("*.fleece.*"))
    assert "b" not in live_bitmaps(vm)  # never stored: gone, as the log says


def granules_of(vm: GuestlessVM) -> set[int]:
    """The granules of b that QEMU counts dirty (read through a frozen copy over NBD)."""
    from tests.gateway.test_qmp_backup import _dirty_granules

    return _dirty_granules(vm)


async def test_release_on_a_disk_whose_size_is_not_a_whole_granule(
    start_gateway: Any, tmp_path: Path
) -> None:
    """A "10 GB" disk of 10^10 bytes is not a multiple of 64 KiB: releasing a snapshot with an
    acknowledged granule and the last, partial granule dirty merged a whole granule past the
    disk's end back, which QEMU refused, and the disk stayed busy."""
    size = 16 * GRANULE + 1536
    machine = GuestlessVM(tmp_path / "vm", "7", disks=1, size=size).start()
    try:
        run = await start_qmp(start_gateway, tmp_path, machine)
        await run.stub.AddBitmap(pb.AddBitmapRequest(parent="d0", bitmap="b"))
        w = Writer(machine, run.host.nbd_socket).open()
        w.write_pattern(0, 4096, 1)
        w.write_pattern(size - 512, 512, 2)
        w.close()
        await run.snapshots.CreateSnapshot(
            spb.CreateSnapshotRequest(parent="d0", snapshot_id="s", bitmaps=["b"])
        )
        await run.stub.ClearRange(
            pb.ClearRangeRequest(export="d0@s", bitmap="b", offset=0, length=GRANULE)
        )
        released = await run.snapshots.ReleaseSnapshot(
            spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s")
        )
        assert [m.dirty_bytes for m in released.merged] == [1536]
        # The last granule is dirty again in the live bitmap, the acknowledged one is not.
        await run.snapshots.CreateSnapshot(
            spb.CreateSnapshotRequest(parent="d0", snapshot_id="t", bitmaps=["b"])
        )
        s = await stream_all(run.stub, export="d0@t", context=CTX, filter=pb.EXTENT_FILTER_SET)
        assert [(o, n) for o, n, f, _ in s.rows if f & 1] == [(16 * GRANULE, 1536)]
        # A resume token of snapshot t does not resume a later snapshot that is also named t:
        # another instant (the stream would mix the two).
        req = pb.StreamExtentsRequest(export="d0@t", context="base:allocation",
                                      max_extents_per_message=1)  # fmt: skip
        first = await anext(aiter(run.stub.StreamExtents(req)))
        await run.snapshots.ReleaseSnapshot(
            spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/t")
        )
        await run.snapshots.CreateSnapshot(spb.CreateSnapshotRequest(parent="d0", snapshot_id="t"))
        req.resume_token = first.resume_token
        err = await call_error(run.stub.StreamExtents(req))
        assert (err.code, err.info.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_RESUME_TOKEN",
        )
        await run.snapshots.ReleaseSnapshot(
            spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/t")
        )
        # Someone else's NBD export already has the name the snapshot's would take: QEMU has
        # run the transaction (the fork holds the live bits) when the export fails. The
        # fork goes back into the live bitmap, and the other export stays.
        machine.cmd("block-export-add", type="nbd", id="theirs", name="d0@u",
                    **{"node-name": "drive0"})  # fmt: skip
        err = await call_error(run.snapshots.CreateSnapshot(
            spb.CreateSnapshotRequest(parent="d0", snapshot_id="u", bitmaps=["b"])))  # fmt: skip
        assert err.code != grpc.StatusCode.OK
        assert live_bitmaps(machine)["b"]["count"] == GRANULE  # the last granule, still dirty
        assert "theirs" in {e["id"] for e in machine.cmd("query-block-exports")}
        listed = await run.snapshots.ListSnapshots(spb.ListSnapshotsRequest(parent="d0"))
        assert not listed.snapshots
        # Recovery drops the scratch images of this host's interrupted merge-backs, not those
        # of another QEMU host's exports, whose merge may be running (the folder is shared).
        ours = run.host.folder / "d0@s.0a0b0c0d-0.fleece.6200.merge"
        theirs = run.host.folder / "vm2-disk@s.0a0b0c0d-0.fleece.6200.merge"
        for path in (ours, theirs):
            path.write_bytes(b"")
        await run.gateway.qmp_snapshots.recover(run.host)
        assert not ours.exists() and theirs.exists()
    finally:
        machine.stop()


async def test_a_stream_of_a_snapshot_released_under_it(
    vm: GuestlessVM, start_gateway: Any, tmp_path: Path
) -> None:
    """The snapshot is gone, not the host: NOT_FOUND, not UNAVAILABLE with a resume position
    that a client would retry for ever."""
    run = await start_qmp(start_gateway, tmp_path, vm)
    w = Writer(vm, run.host.nbd_socket).open()
    for g in range(0, vm.disks[0].size // GRANULE, 4):
        w.write_pattern(g * GRANULE, 4096, g)
    w.close()
    await run.snapshots.CreateSnapshot(spb.CreateSnapshotRequest(parent="d0", snapshot_id="s"))
    call = run.stub.StreamExtents(
        pb.StreamExtentsRequest(
            export="d0@s", context="base:allocation", include_data=True, max_extents_per_message=1
        )
    )
    first = await call.read()  # then stop reading: the gateway waits on flow control
    assert first.data
    await run.snapshots.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s"))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND, exc.value
    assert "released" in (exc.value.details() or "")


@pytest.mark.parametrize("retry", ["call", "recovery"])
async def test_a_release_that_fails_part_way_keeps_the_acknowledgements(
    vm: GuestlessVM, start_gateway: Any, tmp_path: Path, retry: str
) -> None:
    """The release stops part-way: the fork's export is gone, its merge cannot create its
    scratch image (a full file system does this; here a directory is in its way). The retry
    cannot read the fork any more: it merged all of it back, and the acknowledgements were
    lost (the next backup copied everything again). It now merges exactly what the first
    attempt found unacknowledged."""
    run = await start_qmp(start_gateway, tmp_path, vm)
    await run.stub.AddBitmap(pb.AddBitmapRequest(parent="d0", bitmap="b"))
    writer = Writer(vm, run.host.nbd_socket).open()
    for i in range(4):
        writer.write_pattern(i * 2 * GRANULE, 4096, i)
    writer.close()
    await run.snapshots.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="d0", snapshot_id="s", bitmaps=["b"])
    )
    for g in (0, 2):  # the first two written granules are backed up and acknowledged
        await run.stub.ClearRange(
            pb.ClearRangeRequest(export="d0@s", bitmap="b", offset=g * GRANULE, length=GRANULE)
        )
    (fleece,) = (tmp_path / "data").rglob("*.fleece.qcow2")
    blocker = fleece.with_suffix(f".{b'b'.hex()}.merge")  # the merge's scratch image
    blocker.mkdir()
    (blocker / "x").write_bytes(b"")
    err = await call_error(
        run.snapshots.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s"))
    )
    assert err.code != grpc.StatusCode.OK and str(blocker) in err.message
    listed = await run.snapshots.ListSnapshots(spb.ListSnapshotsRequest(parent="exports/d0"))
    assert [s.name for s in listed.snapshots] == ["exports/d0/snapshots/s"]
    (blocker / "x").unlink()
    blocker.rmdir()
    if retry == "call":
        released = await run.snapshots.ReleaseSnapshot(
            spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s")
        )
        assert [(m.context, m.dirty_bytes) for m in released.merged] == [(CTX, 2 * GRANULE)]
    else:
        # The monitor's connection lost and made again before anyone retries: the recovery of
        # the new session finds the fork without its job, and finishes the release as the
        # first attempt found it (it merged the forks back whole).
        await run.host.monitor.close()
        await run.host.prepare()
        listed = await run.snapshots.ListSnapshots(spb.ListSnapshotsRequest(parent="exports/d0"))
        assert not listed.snapshots
    # Nothing wrote since the instant: the live bitmap holds exactly the two unacknowledged.
    assert live_bitmaps(vm)["b"]["count"] == 2 * GRANULE
    assert not list((tmp_path / "data").rglob("*.fleece.qcow2"))


async def test_a_release_whose_files_cannot_be_removed_is_done_all_the_same(
    vm: GuestlessVM, start_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The node dropped, the forks merged: the release is done, even if its files cannot be
    removed (here a directory is where the record was). It came back as a snapshot that no
    retry could release; now the log says which files to delete."""
    run = await start_qmp(start_gateway, tmp_path, vm)
    await run.stub.AddBitmap(pb.AddBitmapRequest(parent="d0", bitmap="b"))
    await run.snapshots.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="d0", snapshot_id="s", bitmaps=["b"])
    )
    (record,) = (tmp_path / "data").rglob("*.fleece.json")
    record.unlink()
    record.mkdir()
    (record / "x").write_bytes(b"")
    caplog.set_level(logging.ERROR, logger="nbdgw.qmp")
    released = await run.snapshots.ReleaseSnapshot(
        spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s")
    )
    assert list(released.released) == ["exports/d0/snapshots/s"]
    listed = await run.snapshots.ListSnapshots(spb.ListSnapshotsRequest(parent="exports/d0"))
    assert not listed.snapshots
    assert any("by hand" in r.getMessage() for r in caplog.records)
    assert not [n for n in vm.node_names() if n.startswith("nbdgw-f")]
