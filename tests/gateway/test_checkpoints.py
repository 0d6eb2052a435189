"""Checkpoint chains on nbdcore hosts (the gateway's embedded host and a separate
``nbdgw nbd serve`` process), with the same API and semantics as on running QEMU VMs
(test_qmp_checkpoints.py): ``nbdgw backup --checkpoint C [--since B]`` starts the chain
itself; a write between two checkpoints is in "since" and nothing written before the base is;
a chain restored with ``nbdgw restore`` (one incremental since an older checkpoint) equals the
disk; ``Snapshots.checkpoint_delta`` (the CSI GetMetadataDelta) answers "between A and B";
deleting merges into the older neighbour; a kill -9 of the host or of the process that starts or
deletes a checkpoint loses nothing."""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway import errors
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from nbdcore.aio.client import NBDClient
from nbdcore.storage import Image
from nbdcore.storage import checkpoint as ckpt
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc
from tests.gateway.cli_support import ENV, cli
from tests.gateway.test_snapshot_crash import WRITER, restart
from tests.gateway.test_snapshots import SIZE, G, granules, make_disk, reason
from tests.gateway.test_snapshots_remote import Host

pytestmark = pytest.mark.interop

KiB = 1024
CRASH_SIZE = 8 * 1024 * 1024

Write = Callable[[bytes, int], Awaitable[None]]


async def start(
    start_gateway: Any, tmp_path: Path, kind: str
) -> tuple[Any, spb_grpc.SnapshotServiceStub, Write, Host | None]:
    """A gateway in front of ``disk`` on an embedded or a remote nbdcore host, and a way to
    write to the disk that returns once the write is acknowledged."""
    make_disk(tmp_path / "disk.img")
    config = GatewayConfig(data_dir=tmp_path / "data")
    host = None
    if kind == "embedded":
        config.add_image_export("disk", tmp_path / "disk.img")
    else:
        host = Host(tmp_path / "disk.img", tmp_path / "host.sock").start()
        config.add_uri_export("disk", host.uri)
    run = await start_gateway(config)
    if host is None:
        image = run.gateway.images["disk"]

        async def write(data: bytes, offset: int) -> None:
            await asyncio.to_thread(image.write, data, offset)

    else:
        uri = host.uri

        async def write(data: bytes, offset: int) -> None:
            client = await NBDClient.connect(uri)
            try:
                await client.pwrite(data, offset)
                await client.flush()
            finally:
                await client.close()

    return run, spb_grpc.SnapshotServiceStub(run.channel), write, host


async def scatter(write: Write, rng: random.Random, count: int) -> list[tuple[int, int]]:
    done = []
    for _ in range(count):
        length = rng.randrange(1, 200 * KiB)
        offset = rng.randrange(SIZE - length)
        await write(rng.randbytes(length), offset)
        done.append((offset, length))
    return done


async def read_disk(run: Any) -> bytes:
    """The live disk, through the gateway's own NBD view of it (any kind of host)."""
    pool = run.gateway.pools["disk"]
    out = bytearray()

    async def read(client: NBDClient) -> None:
        for off in range(0, SIZE, 1 << 20):
            out.extend(await client.pread(off, 1 << 20))

    await pool.run([], read)
    return bytes(out)


@pytest.mark.parametrize("kind", ["embedded", "remote"])
async def test_backup_chain_with_checkpoints(start_gateway: Any, tmp_path: Path, kind: str) -> None:
    run, stub, write, host = await start(start_gateway, tmp_path, kind)
    try:
        rng = random.Random(7)
        await scatter(write, rng, 10)  # before the base: never in any "since"

        async def backup(out: str, *args: str) -> str:
            proc = await asyncio.to_thread(
                cli, "backup", "disk", str(tmp_path / out), *args, "--target", run.target
            )
            assert proc.returncode == 0, proc.stderr
            return proc.stdout

        at_c0 = await read_disk(run)
        await backup("full.img", "--full", "--checkpoint", "c0")
        assert (tmp_path / "full.img").read_bytes() == at_c0
        listed = await stub.ListCheckpoints(spb.ListCheckpointsRequest(parent="disk"))
        assert [(c.name, c.recording, c.dirty_bytes) for c in listed.checkpoints] == [
            ("exports/disk/checkpoints/c0", True, 0)
        ]
        w1 = await scatter(write, rng, 12)
        await backup("inc1.img", "--since", "c0", "--checkpoint-id", "c1")
        at_c1 = await read_disk(run)
        w2 = await scatter(write, rng, 12)
        # Since an older checkpoint: w1 and w2.
        await backup("inc2.img", "--since", "c0", "--checkpoint-id", "c2")
        at_c2 = await read_disk(run)
        assert at_c1 != at_c2

        snaps = run.gateway.snapshots
        d01 = await snaps.checkpoint_delta("disk", "c0", "c1")
        assert (d01.export, d01.granularity, d01.size) == ("disk", G, SIZE)
        assert granules(d01.ranges) == granules(w1)  # nothing from before c0, nothing after c1
        d12 = await snaps.checkpoint_delta("disk", "c1", "c2")
        assert granules(d12.ranges) == granules(w2)
        d02 = await snaps.checkpoint_delta("disk", "c0", "c2")
        assert granules(d02.ranges) == granules(w1 + w2)
        assert (await snaps.checkpoint_delta("disk", "c1", "c1")).ranges == []
        with pytest.raises(GatewayError) as err:
            await snaps.checkpoint_delta("disk", "c2", "c0")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(GatewayError) as err:
            await snaps.checkpoint_delta("disk", "c0", "gone")
        assert (err.value.code, err.value.reason) == (
            grpc.StatusCode.NOT_FOUND,
            "CHECKPOINT_NOT_FOUND",
        )

        def restored(*incs: str) -> bytes:
            base = tmp_path / "restored.img"
            base.write_bytes((tmp_path / "full.img").read_bytes())
            for inc in incs:
                proc = cli("restore", str(base), str(tmp_path / inc))
                assert proc.returncode == 0, proc.stderr
            return base.read_bytes()

        assert await asyncio.to_thread(restored, "inc1.img") == at_c1
        assert await asyncio.to_thread(restored, "inc2.img") == at_c2  # full + one since c0

        # Delete c1: its interval goes into c0, so "between c0 and c2" is unchanged.
        deleted = await stub.DeleteCheckpoint(
            spb.DeleteCheckpointRequest(name="exports/disk/checkpoints/c1")
        )
        assert deleted.merged_into == "exports/disk/checkpoints/c0"
        assert granules((await snaps.checkpoint_delta("disk", "c0", "c2")).ranges) == granules(
            w1 + w2
        )
        # Delete the newest: c0 records again, so a write now is in "since c0".
        proc = await asyncio.to_thread(
            cli, "checkpoint", "delete", "disk", "c2", "--target", run.target
        )
        assert proc.returncode == 0 and "merged into c0" in proc.stdout, proc.stderr
        w3 = await scatter(write, rng, 5)
        snap = await stub.CreateSnapshot(
            spb.CreateSnapshotRequest(parent="disk", snapshot_id="s", since_checkpoint="c0")
        )
        (fork,) = snap.forks
        assert fork.context == "qemu:dirty-bitmap:since:c0"
        assert fork.dirty_bytes == len(granules(w1 + w2 + w3)) * G
        released = await stub.ReleaseSnapshot(
            spb.ReleaseSnapshotRequest(name="exports/disk/snapshots/s")
        )
        assert [m.dirty_bytes for m in released.merged] == [0]  # a view merges nothing back
        listed = await stub.ListCheckpoints(spb.ListCheckpointsRequest(parent="disk"))
        assert [(c.name.rsplit("/", 1)[1], c.recording) for c in listed.checkpoints] == [
            ("c0", True)
        ]

        # Errors, each with its reason, touching nothing.
        for fields, want in (
            ({"since_checkpoint": "nosuch"}, (grpc.StatusCode.NOT_FOUND, "CHECKPOINT_NOT_FOUND")),
            ({"checkpoint_id": "c0"}, (grpc.StatusCode.ALREADY_EXISTS, "CHECKPOINT_EXISTS")),
            ({"checkpoint_id": "a/b"}, (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.CreateSnapshot(
                    spb.CreateSnapshotRequest(parent="disk", snapshot_id="x", **fields)
                )
            assert reason(exc.value)[:2] == want
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.DeleteCheckpoint(
                spb.DeleteCheckpointRequest(name="exports/disk/checkpoints/nosuch")
            )
        assert reason(exc.value) == (grpc.StatusCode.NOT_FOUND, "CHECKPOINT_NOT_FOUND")
        listed = await stub.ListSnapshots(spb.ListSnapshotsRequest(parent="disk"))
        assert list(listed.snapshots) == []
        # A checkpoint's bitmap is the gateway's: ClearRange on it would drop an interval's
        # changes from every later "since"; it is refused, whatever the token.
        bitmaps = await run.stub.ListBitmaps(pb.ListBitmapsRequest(parent="disk"))
        owned = [b.context for b in bitmaps.bitmaps if "nbdgw-ckpt-" in b.context]
        assert owned
        for ctx in owned:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await run.stub.ClearRange(
                    pb.ClearRangeRequest(
                        export="disk", bitmap=ctx, offset=0, length=SIZE, unconditional=True
                    )
                )
            assert reason(exc.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "BITMAP_BUSY")
        proc = await asyncio.to_thread(
            cli, "backup", "disk", str(tmp_path / "bad.img"), "--since", "nosuch",
            "--target", run.target,
        )  # fmt: skip
        assert proc.returncode != 0 and "no checkpoint 'nosuch'" in proc.stderr, proc.stderr
        assert not (tmp_path / "bad.img").exists()

        # restore checks that each incremental follows what comes before it.
        await backup("fullb.img", "--full", "--checkpoint", "d1")
        await scatter(write, rng, 6)
        await backup("incb1.img", "--since", "d1", "--checkpoint-id", "d2")
        await scatter(write, rng, 6)
        await backup("inc3.img", "--since", "d2", "--checkpoint-id", "d3")
        at_d3 = await read_disk(run)

        def restore(base: str, *backups: str) -> Any:
            args = [str(tmp_path / b) for b in (base, *backups)]
            return cli("restore", *args)

        proc = await asyncio.to_thread(restore, "new.img", "fullb.img", "inc3.img")  # a gap
        assert proc.returncode != 0 and "since checkpoint 'd2'" in proc.stderr
        assert "missing" in proc.stderr and not (tmp_path / "new.img").exists()
        proc = await asyncio.to_thread(restore, "new.img", "fullb.img", "incb1.img", "inc3.img")
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "new.img").read_bytes() == at_d3
        # In place, over two calls: a copy of the full backup with its state file, then the
        # record the first restore leaves.
        for suffix in ("", ".nbdgw-backup.json"):
            shutil.copy(tmp_path / f"fullb.img{suffix}", tmp_path / f"copy.img{suffix}")
        proc = await asyncio.to_thread(restore, "copy.img", "inc3.img")
        assert proc.returncode != 0 and "missing" in proc.stderr
        proc = await asyncio.to_thread(restore, "copy.img", "incb1.img")
        assert proc.returncode == 0, proc.stderr
        proc = await asyncio.to_thread(restore, "copy.img", "incb1.img")  # again
        assert proc.returncode != 0 and "taken before" in proc.stderr
        proc = await asyncio.to_thread(restore, "copy.img", "inc3.img")
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "copy.img").read_bytes() == at_d3

    finally:
        if host is not None:
            host.stop()


async def test_kill9_of_the_host_between_checkpoint_steps(
    start_gateway: Any, tmp_path: Path
) -> None:
    """The host dies (SIGKILL) at a random moment of each create-with-checkpoint: after it
    comes back, the chain has one recording checkpoint, and "since c0" holds every
    acknowledged write."""
    run, stub, write, host = await start(start_gateway, tmp_path, "remote")
    assert host is not None
    try:
        await stub.CreateSnapshot(
            spb.CreateSnapshotRequest(parent="disk", snapshot_id="s0", checkpoint_id="c0")
        )
        await stub.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name="exports/disk/snapshots/s0"))
        rng = random.Random(11)
        written: list[tuple[int, int]] = []
        outcomes: list[bool] = []  # whether the kill cut the create short
        for i in range(1, 6):
            written += await scatter(write, rng, 4)
            create = asyncio.ensure_future(
                stub.CreateSnapshot(
                    spb.CreateSnapshotRequest(
                        parent="disk", snapshot_id=f"s{i}", checkpoint_id=f"c{i}"
                    )
                )
            )
            await asyncio.sleep((0.0, 0.001, 0.003, 0.008, 0.02)[i - 1])
            host.kill()
            (outcome,) = await asyncio.gather(create, return_exceptions=True)
            outcomes.append(isinstance(outcome, BaseException))
            host.start()
            for _ in range(100):  # the gateway finds the host again
                try:
                    chain = await run.gateway.snapshots.checkpoints("disk")
                    break
                except Exception:  # down, or refused until the gateway notices
                    await asyncio.sleep(0.1)
            assert [c["recording"] for c in chain].count(True) == 1, chain
            assert chain[-1]["recording"]
            listed = await stub.ListSnapshots(spb.ListSnapshotsRequest(parent="disk"))
            for s in listed.snapshots:
                await stub.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name=s.name))
        assert any(outcomes), "no kill landed inside a create"
        ids = [c["id"] for c in await run.gateway.snapshots.checkpoints("disk")]
        delta = await run.gateway.snapshots.checkpoint_delta("disk", "c0", ids[-1])
        last = await stub.CreateSnapshot(
            spb.CreateSnapshotRequest(parent="disk", snapshot_id="end", since_checkpoint="c0")
        )
        (fork,) = last.forks
        assert granules(delta.ranges) <= granules(written)
        assert fork.dirty_bytes == len(granules(written)) * G  # nothing lost, nothing extra
    finally:
        host.stop()


# --- storage level: a process killed (os._exit) between the steps -------------------------

CRASH = r"""
import os, sys
from nbdcore.storage import Image
from nbdcore.storage import checkpoint as ckpt
path, where = sys.argv[1], sys.argv[2]
image = Image.open(path)
if where == "start":
    Image._start_checkpoint = lambda *a: os._exit(9)  # the snapshot is durable, then death
    plan = ckpt.plan(ckpt.chain(image), "c1", "c0")
    image.create_snapshot("s1", views=plan.views, checkpoint=plan.started)
else:
    Image.remove_bitmap = lambda *a: os._exit(9)  # merged into c0, then death
    ckpt.delete(image, "c1")
"""


def test_process_killed_inside_a_checkpoint_step_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    make_disk(path)
    with Image.open(path) as image:
        plan = ckpt.plan(ckpt.chain(image), "c0", "")
        image.create_snapshot("s0", checkpoint=plan.started)
        image.release_snapshot("s0")
        image.write(b"x" * 100, 3 * G + 5)
    subprocess.run([sys.executable, "-c", CRASH, str(path), "start"], env=ENV, check=False)
    with Image.open(path) as image:
        # Rolled forward at open: c1 records, c0 stopped, the snapshot and its view are there.
        chain = ckpt.chain(image)
        assert [(c.id, c.recording) for c in chain] == [("c0", False), ("c1", True)]
        snap = image.snapshots["s1"]
        assert snap.checkpoint == "c1"
        assert granules([(o, n) for o, n, f in snap.bitmaps["since:c0"].extents(0, SIZE) if f]) == {
            3
        }
        image.release_snapshot("s1")
        image.write(b"y" * 100, 7 * G)
    with Image.open(path) as image:  # not rolled forward again
        assert [(c.id, c.recording) for c in ckpt.chain(image)] == [("c0", False), ("c1", True)]
    subprocess.run([sys.executable, "-c", CRASH, str(path), "delete"], env=ENV, check=False)
    with Image.open(path) as image:
        # Both hold c1's bits (more dirty, never less); deleting again finishes.
        assert granules(ckpt.delta(image, "c0", "c1")[1]) >= {3, 7}
        assert ckpt.delete(image, "c1") == "c0"
        (c0,) = ckpt.chain(image)
        assert c0.recording
        assert granules([(o, n) for o, n, f in image.bitmaps[c0.bitmap].extents(0, SIZE) if f]) == {
            3,
            7,
        }


@pytest.mark.parametrize("kind", ["embedded", "remote"])
async def test_fragmented_delta(start_gateway: Any, tmp_path: Path, kind: str) -> None:
    """Every other granule written between c0 and c1: the delta is those granules, one run
    each (the remote host's is read over NBD through a short-lived snapshot, then released)."""
    run, stub, write, host = await start(start_gateway, tmp_path, kind)
    try:
        await stub.CreateSnapshot(
            spb.CreateSnapshotRequest(parent="disk", snapshot_id="a", checkpoint_id="c0")
        )
        await stub.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name="exports/disk/snapshots/a"))
        for g in range(1, SIZE // G, 2):
            await write(b"z", g * G + 7)
        await stub.CreateSnapshot(
            spb.CreateSnapshotRequest(parent="disk", snapshot_id="b", checkpoint_id="c1")
        )
        await stub.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name="exports/disk/snapshots/b"))
        delta = await run.gateway.snapshots.checkpoint_delta("disk", "c0", "c1")
        assert delta.ranges == [(g * G, G) for g in range(1, SIZE // G, 2)]
        assert (await run.gateway.snapshots.checkpoint_delta("disk", "c1", "c1")).ranges == []
        # Backwards is the caller's "base" at fault; an unknown id is NOT_FOUND. A remote host
        # says which in its reply's "field"/"checkpoint" keys, not in words.
        with pytest.raises(GatewayError) as backwards:
            await run.gateway.snapshots.checkpoint_delta("disk", "c1", "c0")
        assert backwards.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in errors.field_violations(backwards.value)] == ["base"]
        with pytest.raises(GatewayError) as unknown:
            await run.gateway.snapshots.checkpoint_delta("disk", "c0", "nope")
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        assert unknown.value.metadata["checkpoint"] == "nope"
        listed = await stub.ListSnapshots(spb.ListSnapshotsRequest(parent="disk"))
        assert list(listed.snapshots) == []  # nothing left behind
    finally:
        if host is not None:
            host.stop()


def test_kill9_of_the_gateway_in_a_checkpoint_backup_chain(tmp_path: Path) -> None:
    """A gateway process with its embedded host serves a disk a writer keeps writing; a chain of
    ``nbdgw backup --checkpoint cN --since cN-1`` runs, the gateway is killed with SIGKILL
    while each backup runs, restarted, and the backup resumed. With the writer stopped, one last
    backup since the newest checkpoint: the chain restored equals the disk (nothing lost)."""
    rng = random.Random(5)
    disk = tmp_path / "disk.img"
    with Image.create(disk, CRASH_SIZE) as image:
        image.write(rng.randbytes(CRASH_SIZE).replace(b"\0", b"\1"), 0)
    gw = restart(disk, tmp_path / "data")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, gw.nbd_uri("disk"), "2"], env=ENV, cwd=Path.cwd()
    )

    def backup(target: str, out: Path, i: int, *extra: str) -> list[str]:
        chain = ["--full"] if i == 0 else ["--since", f"c{i - 1}"]
        return [
            sys.executable, "-m", "gateway", "backup", "disk", str(out), *chain,
            "--checkpoint", f"c{i}", "--save-every", "256k", "--retries", "2",
            "--target", target, *extra,
        ]  # fmt: skip

    kills = 0
    try:
        for i in range(3):
            out = tmp_path / f"b{i}.img"
            proc = subprocess.Popen(
                backup(gw.target, out, i), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            spath = out.with_name(out.name + ".nbdgw-backup.json")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and proc.poll() is None:
                if spath.exists() and '"snapshot": "backup-' in spath.read_text():
                    break
                time.sleep(0.002)
            time.sleep((0.0, 0.01, 0.05)[i])
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGKILL)
            kills += 1
            proc.communicate(timeout=60)
            gw.stop()
            gw = restart(disk, tmp_path / "data")
            args = ["--resume"] if spath.exists() else []
            done = subprocess.run(
                backup(gw.target, out, i, *args), env=ENV, capture_output=True, text=True,
                timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
    finally:
        writer.kill()
        writer.wait()
    out = tmp_path / "last.img"
    done = subprocess.run(
        backup(gw.target, out, 3), env=ENV, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    gw.stop()
    restored = tmp_path / "restored.img"
    restored.write_bytes((tmp_path / "b0.img").read_bytes())
    for inc in ("b1.img", "b2.img", "last.img"):
        proc2 = cli("restore", str(restored), str(tmp_path / inc))
        assert proc2.returncode == 0, proc2.stderr
    with Image.open(disk, read_only=True) as image:
        assert not image.snapshots
        assert [(c.id, c.recording) for c in ckpt.chain(image)] == [
            ("c0", False), ("c1", False), ("c2", False), ("c3", True)
        ]  # fmt: skip
        assert restored.read_bytes() == image.read(0, CRASH_SIZE)
    assert kills == 3
