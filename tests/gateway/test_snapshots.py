"""SnapshotService over a real in-process gateway with its embedded nbdcore host: the snapshot
is an export of its own that every BitmapService RPC takes, clears act on its fork, release
merges what is left back, errors are rich, snapshots outlive a gateway restart; and
``nbdgw backup`` of a disk under live writes (our client and qemu-io) is the disk at the
snapshot instant, leaving the live bitmap exactly the writes since."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from gateway.config import GatewayConfig
from nbdcore.aio.client import NBDClient
from nbdcore.storage import Image
from nbdcore.storage.snapshot import MAX_SNAPSHOTS, default_max_bytes
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc
from tests.gateway.cli_support import cli
from tests.peers import tool

MiB = 1024 * 1024
KiB = 1024
G = 64 * KiB
SIZE = 16 * MiB


def make_disk(path: Path, seed: int = 1) -> bytes:
    """Data everywhere but a few holes; bitmap ``b`` dirty at a few places."""
    rng = random.Random(seed)
    with Image.create(path, SIZE) as image:
        for off in range(0, SIZE, MiB):
            if off // MiB % 4 != 3:
                image.write(rng.randbytes(MiB), off)
        image.add_bitmap("b", granularity=G)
        for off in (0, 5 * MiB + 100, 9 * MiB):
            image.write(rng.randbytes(200 * KiB), off)
        image.add_bitmap("other")
        return image.read(0, SIZE)


def reason(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    """The code and ErrorInfo reason of a failed call (one of ErrorReason or
    SnapshotErrorReason)."""
    trailers = dict(err.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    infos = []
    for packed in status.details:
        info = error_details_pb2.ErrorInfo()
        if packed.Unpack(info):
            infos.append(info)
    assert len(infos) == 1 and infos[0].domain == "nbdgw.dev"
    names = {n.removeprefix("ERROR_REASON_") for n in pb.ErrorReason.keys()}  # noqa: SIM118
    names |= {n.removeprefix("SNAPSHOT_ERROR_REASON_") for n in spb.SnapshotErrorReason.keys()}  # noqa: SIM118
    assert infos[0].reason in names
    return err.code(), infos[0].reason


def granules(runs: list[tuple[int, int]]) -> set[int]:
    return {g for off, n in runs for g in range(off // G, -(-(off + n) // G))}


def dirty_of(image: Image, name: str) -> set[int]:
    b = image.bitmaps[name]
    return granules([(o, n) for o, n, f in b.extents(0, b.size) if f])


async def start(start_gateway: Any, tmp_path: Path) -> tuple[Any, spb_grpc.SnapshotServiceStub]:
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", tmp_path / "disk.img")
    config.add_uri_export("remote", f"nbd+unix:///x?socket={tmp_path / 'nowhere.sock'}")
    run = await start_gateway(config)
    return run, spb_grpc.SnapshotServiceStub(run.channel)


async def test_life_cycle_and_errors(start_gateway: Any, tmp_path: Path) -> None:
    make_disk(tmp_path / "disk.img")
    run, stub = await start(start_gateway, tmp_path)
    image = run.gateway.images["disk"]
    fork_before = dirty_of(image, "b")
    assert fork_before

    snap = await stub.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="exports/disk", snapshot_id="s1", bitmaps=["b"])
    )
    assert snap.name == "exports/disk/snapshots/s1" and snap.export == "exports/disk@s1"
    assert snap.state == spb.SNAPSHOT_STATE_READY and snap.size_bytes == SIZE
    assert [(f.context, f.dirty_bytes) for f in snap.forks] == [
        ("qemu:dirty-bitmap:b", len(fork_before) * G)
    ]
    assert dirty_of(image, "b") == set()  # the live bitmap restarted clean

    # The snapshot's export, through the BitmapService: read-only, its fork clearable.
    export = await run.stub.GetExport(pb.GetExportRequest(name="exports/disk@s1"))
    assert export.read_only and export.size_bytes == SIZE
    bitmaps = await run.stub.ListBitmaps(pb.ListBitmapsRequest(parent="exports/disk@s1"))
    by_ctx = {b.context: b for b in bitmaps.bitmaps}
    assert set(by_ctx) == {"base:allocation", "qemu:dirty-bitmap:b"}
    assert by_ctx["qemu:dirty-bitmap:b"].clear_mode == pb.CLEAR_MODE_AT_SOURCE
    assert by_ctx["qemu:dirty-bitmap:b"].dirty_bytes == len(fork_before) * G
    cleared = await run.stub.ClearRange(
        pb.ClearRangeRequest(export="exports/disk@s1", bitmap="b", offset=0, length=4 * MiB)
    )
    assert cleared.cleared_bytes == 4 * MiB
    image.write(b"new", 12 * MiB)  # a live write after the snapshot

    listed = await stub.ListSnapshots(spb.ListSnapshotsRequest(parent="disk"))
    assert [s.name for s in listed.snapshots] == ["exports/disk/snapshots/s1"]
    assert listed.snapshots[0].preserved_bytes == G

    # Errors: each with its reason.
    cases: list[tuple[Any, grpc.StatusCode, str]] = [
        (
            stub.CreateSnapshot(
                spb.CreateSnapshotRequest(parent="disk", snapshot_id="s1", bitmaps=["b"])
            ),
            grpc.StatusCode.ALREADY_EXISTS,
            "SNAPSHOT_EXISTS",
        ),
        (
            stub.CreateSnapshot(spb.CreateSnapshotRequest(parent="disk", bitmaps=["nope"])),
            grpc.StatusCode.NOT_FOUND,
            "BITMAP_NOT_FOUND",
        ),
        (  # another host is asked (NBD_OPT_X_NBDGW_SNAPSHOT); this one is down
            stub.CreateSnapshot(spb.CreateSnapshotRequest(parent="remote")),
            grpc.StatusCode.UNAVAILABLE,
            "HOST_UNAVAILABLE",
        ),
        (
            stub.CreateSnapshot(spb.CreateSnapshotRequest(parent="disk@s1")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "SNAPSHOTS_NOT_SUPPORTED",
        ),
        (
            stub.CreateSnapshot(spb.CreateSnapshotRequest(parent="disk", snapshot_id="a/b")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
        ),
        (
            stub.CreateSnapshot(spb.CreateSnapshotRequest(parent="nosuch")),
            grpc.StatusCode.NOT_FOUND,
            "EXPORT_NOT_FOUND",
        ),
        (
            stub.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name="exports/disk/snapshots/zz")),
            grpc.StatusCode.NOT_FOUND,
            "SNAPSHOT_NOT_FOUND",
        ),
        (
            stub.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name="disk/s1")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
        ),
    ]
    for call, code, why in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert reason(info.value) == (code, why), info.value.details()

    released = await stub.ReleaseSnapshot(
        spb.ReleaseSnapshotRequest(name="exports/disk/snapshots/s1")
    )
    left = fork_before - set(range(4 * MiB // G))
    assert [(m.context, m.dirty_bytes) for m in released.merged] == [
        ("qemu:dirty-bitmap:b", len(left) * G)
    ]
    assert dirty_of(image, "b") == left | {12 * MiB // G}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name="exports/disk/snapshots/s1"))
    assert reason(info.value)[1] == "SNAPSHOT_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run.stub.GetExport(pb.GetExportRequest(name="exports/disk@s1"))
    assert reason(info.value)[1] == "EXPORT_NOT_FOUND"


async def test_snapshot_outlives_a_gateway_restart(start_gateway: Any, tmp_path: Path) -> None:
    frozen = make_disk(tmp_path / "disk.img")
    run, stub = await start(start_gateway, tmp_path)
    await stub.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="disk", snapshot_id="keep", bitmaps=["b", "other"])
    )
    run.gateway.images["disk"].write(b"x" * MiB, 0)
    await run.gateway.stop(grace=0)
    run, stub = await start(start_gateway, tmp_path)
    listed = await stub.ListSnapshots(spb.ListSnapshotsRequest(parent="disk"))
    assert [s.export for s in listed.snapshots] == ["exports/disk@keep"]
    client = await NBDClient.connect(
        f"nbd+unix:///disk@keep?socket={run.gateway.listening.nbd_socket}"
    )
    try:
        assert await client.pread(0, 2 * MiB) == frozen[: 2 * MiB]
        assert client.read_only
    finally:
        await client.close()


# --- the backup loop under live writes ----------------------------------------------------------


async def writer(socket: str, stop: asyncio.Event, log: list[tuple[int, int]], seed: int) -> None:
    """Our client writing 4-64 KiB pieces at random until ``stop``; ``log`` gets each write
    once it is acknowledged."""
    rng = random.Random(seed)
    client = await NBDClient.connect(f"nbd+unix:///disk?socket={socket}")
    try:
        while not stop.is_set():
            length = rng.choice((4 * KiB, 64 * KiB, rng.randrange(1, 200 * KiB)))
            offset = rng.randrange(SIZE - length)
            await client.pwrite(rng.randbytes(length), offset)
            log.append((offset, length))
            await asyncio.sleep(0)
    finally:
        await client.close()


async def test_backup_under_live_writes_is_the_snapshot_instant(
    start_gateway: Any, tmp_path: Path
) -> None:
    make_disk(tmp_path / "disk.img")
    run, stub = await start(start_gateway, tmp_path)
    image = run.gateway.images["disk"]
    socket = run.gateway.listening.nbd_socket
    stop = asyncio.Event()
    before: list[tuple[int, int]] = []
    task = asyncio.create_task(writer(socket, stop, before, 1))
    await asyncio.sleep(0.3)
    stop.set()
    await task  # paused, so that the snapshot instant is known exactly
    frozen = image.read(0, SIZE)
    fork = dirty_of(image, "b")
    await stub.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="disk", snapshot_id="nightly", bitmaps=["b"])
    )

    # Writers on the live disk during the whole backup: our client and qemu-io.
    stop = asyncio.Event()
    after: list[tuple[int, int]] = []
    ours = asyncio.create_task(writer(socket, stop, after, 2))
    script = "".join(f"write -P 0x{i + 1:02x} {i * 700 * KiB} 300k\n" for i in range(20))
    qemu_io = await asyncio.create_subprocess_exec(
        tool("qemu-io"),
        "-f",
        "raw",
        f"nbd+unix:///disk?socket={socket}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out = tmp_path / "inc.img"
    backup = asyncio.create_task(
        asyncio.to_thread(
            cli,
            "backup",
            "disk",
            str(out),
            "--bitmap",
            "b",
            "--clear",
            "--snapshot",
            "nightly",
            "--checkpoint",
            "256k",
            "--target",
            run.target,
        )
    )
    qemu_out, qemu_err = await qemu_io.communicate(script.encode())
    assert qemu_io.returncode == 0, qemu_err
    assert qemu_out.count(b"wrote 307200/307200 bytes") == 20
    proc = await backup
    stop.set()
    await ours
    assert proc.returncode == 0, proc.stderr
    assert "snapshot nightly" in proc.stdout and "cleared" in proc.stdout
    after += [(i * 700 * KiB, 300 * KiB) for i in range(20)]
    assert len(after) > 20  # our writer did write during the backup

    # The backup holds the disk at the snapshot instant wherever the fork was dirty.
    data = out.read_bytes()
    for g in fork:
        lo, hi = g * G, min((g + 1) * G, SIZE)
        assert data[lo:hi] == frozen[lo:hi], f"granule {g}"
    # Released (the backup did it); the consumer cleared everything it stored, so the live
    # bitmap is exactly the writes since the snapshot.
    assert not image.snapshots
    assert dirty_of(image, "b") == granules(after)


async def test_backup_takes_and_releases_its_own_snapshot(
    start_gateway: Any, tmp_path: Path
) -> None:
    frozen = make_disk(tmp_path / "disk.img")
    run, _ = await start(start_gateway, tmp_path)
    image = run.gateway.images["disk"]
    fork = dirty_of(image, "b")
    out = tmp_path / "inc.img"
    proc = await asyncio.to_thread(
        cli, "backup", "disk", str(out), "--bitmap", "b", "--clear", "--target", run.target
    )
    assert proc.returncode == 0, proc.stderr
    assert "(snapshot backup-" in proc.stdout
    data = out.read_bytes()
    for g in fork:
        assert data[g * G : (g + 1) * G] == frozen[g * G : (g + 1) * G]
    assert not image.snapshots and dirty_of(image, "b") == set()
    # Without --clear nothing is acknowledged: release merges everything back.
    proc = await asyncio.to_thread(
        cli, "backup", "disk", str(tmp_path / "again.img"), "--bitmap", "other",
        "--target", run.target,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    image.write(b"z", 0)
    proc = await asyncio.to_thread(
        cli, "backup", "disk", str(tmp_path / "third.img"), "--bitmap", "b",
        "--target", run.target,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert dirty_of(image, "b") == {0}
    assert not image.snapshots


async def test_chain_of_backups_restores_every_snapshot_instant(
    start_gateway: Any, tmp_path: Path
) -> None:
    """Full backup, writes, incremental, writes, incremental: 'nbdgw restore' from the backups
    alone (each OUTPUT and its dirty map; the bitmap was cleared) gives the disk at each
    snapshot instant, byte for byte, including ranges zeroed or trimmed since."""
    make_disk(tmp_path / "disk.img")
    run, stub = await start(start_gateway, tmp_path)
    image = run.gateway.images["disk"]
    rng = random.Random(4)
    restored = tmp_path / "restored.img"
    restored.write_bytes(bytes(SIZE))  # anything: the full backup replaces all of it

    def writes(count: int) -> list[tuple[int, int]]:
        """Data, zeroes over data, trims, sub-granule bits."""
        done = []
        for _ in range(count):
            length = rng.randrange(1, 300 * KiB)
            offset = rng.randrange(SIZE - length)
            kind = rng.random()
            if kind < 0.7:
                image.write(rng.randbytes(length), offset)
            elif kind < 0.85:
                image.write_zeroes(offset, length, may_trim=False)
            else:
                image.trim(offset, length)
            done.append((offset, length))
        return done

    for step in range(3):
        if step:
            writes(30)
        instant = image.read(0, SIZE)
        snap_id = f"chain{step}"
        await stub.CreateSnapshot(
            spb.CreateSnapshotRequest(parent="disk", snapshot_id=snap_id, bitmaps=["b"])
        )
        since = writes(10)  # after the instant: the backup must not see them
        out = tmp_path / f"backup{step}.img"
        args = ["backup", "disk", str(out), "--bitmap", "b", "--clear", "--snapshot", snap_id]
        if step == 0:
            args.append("--full")
        proc = await asyncio.to_thread(cli, *args, "--target", run.target)
        assert proc.returncode == 0, proc.stderr
        proc = await asyncio.to_thread(cli, "restore", str(restored), str(out))
        assert proc.returncode == 0, proc.stderr
        assert restored.read_bytes() == instant, f"step {step}"
        if step:  # an incremental map: the writes since the last backup, not the whole disk
            dirty = int(proc.stdout.split(": ")[1].split()[0])
            assert 0 < dirty < SIZE, proc.stdout
        assert not image.snapshots and dirty_of(image, "b") == granules(since)


async def test_snapshots_commands(start_gateway: Any, tmp_path: Path) -> None:
    make_disk(tmp_path / "disk.img")
    run, _ = await start(start_gateway, tmp_path)
    t = ("--target", run.target)

    async def nbdgw(*args: str) -> Any:
        return await asyncio.to_thread(cli, "snapshot", *args, *t)

    made = await nbdgw("create", "disk", "n1", "--bitmap", "b", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["export"] == "exports/disk@n1"
    listed = await nbdgw("list", "disk")
    header, row = listed.stdout.splitlines()
    assert header.split()[:2] == ["NAME", "CREATED"]
    assert row.split()[0] == "n1" and "qemu:dirty-bitmap:b(" in row
    again = await nbdgw("create", "disk", "n1")
    assert again.returncode == 1
    assert again.stderr.strip().endswith("[SNAPSHOT_EXISTS]") and "\n" not in again.stderr.strip()
    released = await nbdgw("release", "disk", "n1")
    assert released.returncode == 0 and "merged back: qemu:dirty-bitmap:b" in released.stdout
    gone = await nbdgw("release", "disk", "n1")
    assert gone.returncode == 1 and "[SNAPSHOT_NOT_FOUND]" in gone.stderr
    none = await nbdgw("list", "disk")
    assert none.stdout.strip() == "no snapshots of disk"
    # --json: the API's answer, with the snapshots the release took (the client's Release).
    assert (await nbdgw("create", "disk", "n2", "--no-fork")).returncode == 0
    answer = await nbdgw("release", "disk", "n2", "--json")
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout) == {"merged": [], "released": ["exports/disk/snapshots/n2"]}


async def test_a_full_snapshot_breaks_and_says_so(start_gateway: Any, tmp_path: Path) -> None:
    make_disk(tmp_path / "disk.img")
    run, stub = await start(start_gateway, tmp_path)
    image = run.gateway.images["disk"]
    await stub.CreateSnapshot(
        spb.CreateSnapshotRequest(
            parent="disk", snapshot_id="small", bitmaps=["b"], max_preserved_bytes=4 * G
        )
    )
    image.write(b"w" * 8 * G, 0)  # the live write goes on; the snapshot cannot keep up
    listed = await stub.ListSnapshots(spb.ListSnapshotsRequest(parent="disk"))
    snap = listed.snapshots[0]
    assert snap.state == spb.SNAPSHOT_STATE_BROKEN and snap.max_preserved_bytes == 4 * G
    assert image.read(0, 8 * G) == b"w" * 8 * G
    out = tmp_path / "x.img"
    proc = await asyncio.to_thread(
        cli, "backup", "disk", str(out), "--bitmap", "b", "--snapshot", "small",
        "--target", run.target,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "broken" in proc.stderr and "out of space" in proc.stderr, proc.stderr
    released = await stub.ReleaseSnapshot(
        spb.ReleaseSnapshotRequest(name="exports/disk/snapshots/small")
    )
    assert released.merged[0].dirty_bytes > 0  # nothing acknowledged: all merged back
    assert {0, 1, 2} <= dirty_of(image, "b")


async def test_two_snapshots_at_once_each_with_its_fork(start_gateway: Any, tmp_path: Path) -> None:
    make_disk(tmp_path / "disk.img")
    run, stub = await start(start_gateway, tmp_path)
    image = run.gateway.images["disk"]
    first_fork = dirty_of(image, "b")
    await stub.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="disk", snapshot_id="a", bitmaps=["b"])
    )
    image.write(b"1" * G, 3 * G)
    middle = image.read(0, SIZE)
    await stub.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="disk", snapshot_id="b", bitmaps=["b"])
    )
    image.write(b"2" * G, 3 * G)
    image.write(b"2" * G, 7 * G)

    for name, fork in (("a", first_fork), ("b", {3})):
        bitmaps = await run.stub.ListBitmaps(pb.ListBitmapsRequest(parent=f"disk@{name}"))
        dirty = {b.context: b.dirty_bytes for b in bitmaps.bitmaps}
        assert dirty["qemu:dirty-bitmap:b"] == len(fork) * G
    client = await NBDClient.connect(
        f"nbd+unix:///disk@b?socket={run.gateway.listening.nbd_socket}"
    )
    try:
        assert await client.pread(0, SIZE) == middle
    finally:
        await client.close()
    # Clearing one fork leaves the other alone; releasing both merges what is left.
    await run.stub.ClearRange(
        pb.ClearRangeRequest(export="disk@b", bitmap="b", offset=0, length=SIZE)
    )
    listed = await stub.ListSnapshots(spb.ListSnapshotsRequest(parent="disk"))
    assert [s.forks[0].dirty_bytes for s in listed.snapshots] == [len(first_fork) * G, 0]
    for name in ("b", "a"):
        await stub.ReleaseSnapshot(
            spb.ReleaseSnapshotRequest(name=f"exports/disk/snapshots/{name}")
        )
    assert dirty_of(image, "b") == first_fork | {3, 7}


async def test_reflection_lists_the_snapshot_service(start_gateway: Any, tmp_path: Path) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    make_disk(tmp_path / "disk.img")
    run, _ = await start(start_gateway, tmp_path)
    stub = reflection_pb2_grpc.ServerReflectionStub(run.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names = [
        s.name
        async for r in stub.ServerReflectionInfo(iter([request]))
        for s in r.list_services_response.service
    ]
    assert "nbdgw.v1.SnapshotService" in names


async def test_default_size_limit_and_count_limit(start_gateway: Any, tmp_path: Path) -> None:
    """Review M6: a snapshot taken without a limit gets the default one (10% of the disk, at
    least 256 MiB); an export holds at most MAX_SNAPSHOTS (RESOURCE_EXHAUSTED, nothing made)."""
    make_disk(tmp_path / "disk.img")
    run, stub = await start(start_gateway, tmp_path)
    image = run.gateway.images["disk"]
    for i in range(MAX_SNAPSHOTS):
        snap = await stub.CreateSnapshot(
            spb.CreateSnapshotRequest(parent="disk", snapshot_id=f"s{i}")
        )
        assert snap.max_preserved_bytes == default_max_bytes(SIZE) == 256 * MiB
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateSnapshot(spb.CreateSnapshotRequest(parent="disk", snapshot_id="more"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "release one" in (info.value.details() or "")
    assert sorted(image.snapshots) == [f"s{i}" for i in range(MAX_SNAPSHOTS)]
    assert default_max_bytes(1 << 40) == (1 << 40) // 10
    explicit = Image.create(tmp_path / "other.img", SIZE)
    try:
        assert explicit.create_snapshot("big", max_bytes=1 << 40).max_bytes == 1 << 40
    finally:
        explicit.close()
