"""libvirt-managed VMs (the ``libvirt`` host kind) against a real libvirtd and a real guest
that writes to its virtio disks while the gateway takes libvirt pull-mode backups
(tests/libvirt_env.py). The guest writes block i at its own offset, one at a time, each
fsync'd, on a disk that starts zeroed: the disk at any instant is the image of a prefix of its
writes, so a backup is checked byte for byte against "the prefix at some k between what was
written before the snapshot was asked for and what was written when it was served".

TCG is slow and the machine shared: three guests boot, each test does several things.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import GatewayConfig, load_file
from gateway.hosts.libvirt import host_key
from nbdgw.csi.v1 import csi_pb2 as cpb
from nbdgw.csi.v1 import csi_pb2_grpc as cpb_grpc
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc
from tests.gateway.cli_support import GatewayProcess, nbdgw
from tests.gateway.conftest import call_error, stream_all
from tests.gateway.test_csi_qmp import flat, stream
from tests.gateway.test_snapshots import reason
from tests.libvirt_env import (
    LibvirtVM,
    guest_image,
    libvirtd,
    open_connection,
    start_libvirtd,
    stop_libvirtd,
)
from tests.qemu_vm import GRANULE, granules

# A guest boots under TCG in each test, which then runs several backups: more than the
# default 120 s on a loaded machine.
pytestmark = [pytest.mark.interop, pytest.mark.slow, pytest.mark.timeout(600)]

SIZE = 16 << 20
VIEW = "qemu:dirty-bitmap:since:"


@pytest.fixture(scope="module")
def uri() -> Iterator[str]:
    yield from libvirtd()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # QEMU (libvirt-qemu) must reach DATA_DIR/libvirt: not under pytest's 0700 tmp folders.
    folder = Path(tempfile.mkdtemp(prefix="nbdgw-lv-data-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def config(uri: str, vm: LibvirtVM, data_dir: Path) -> GatewayConfig:
    cfg = GatewayConfig()
    cfg.data_dir = data_dir
    cfg.host_check_interval = 0.3
    for i, target in enumerate(vm.targets):
        cfg.add_libvirt_export(f"d{i}", uri, vm.name, target)
    return cfg


def prefix_of(image: bytes, writes: list[tuple[int, int]], low: int, high: int) -> int:
    """The k in [low, high] whose prefix image ``image`` is (AssertionError: none)."""
    for k in range(low, high + 1):
        if bytes(guest_image(writes[:k], SIZE)) == image:
            return k
    got = [i for i, off in writes if image[off : off + 8] == f"guest:{i}".encode()[:8]]
    raise AssertionError(f"not the disk at one instant between writes {low} and {high}: {got}")


async def backup(target: str, out: Path, *args: str) -> None:
    proc = await asyncio.to_thread(nbdgw, "backup", "d0", str(out), *args, "--target", target)
    assert proc.returncode == 0, proc.stderr


async def timed_backup(
    vm: LibvirtVM, target: str, out: Path, *args: str, wait_for: int = 4
) -> tuple[int, int]:
    """Let the guest write ``wait_for`` more blocks, back up; (writes before, writes after)."""
    await asyncio.to_thread(vm.wait_writes, len(vm.writes()) + wait_for)
    low = len(vm.writes())
    await backup(target, out, *args)
    return low, len(vm.writes())


async def test_backups_through_libvirt_restore_byte_for_byte(
    uri: str, data_dir: Path, start_gateway: Any, tmp_path: Path
) -> None:
    vm = LibvirtVM("nbdgw-t-chain", count=200, pause=0.1).start()
    try:
        cfg = config(uri, vm, data_dir)
        cfg.csi_socket = str(tmp_path / "csi.sock")
        run = await start_gateway(cfg)
        snaps = spb_grpc.SnapshotServiceStub(run.channel)
        export = await run.stub.GetExport(pb.GetExportRequest(name="exports/d0"))
        assert (export.host_kind, export.size_bytes) == ("libvirt", SIZE)
        # libvirt serves a disk over NBD only inside a backup job: read through a snapshot.
        err = await call_error(
            run.stub.StreamExtents(pb.StreamExtentsRequest(export="d0", context="base:allocation"))
        )
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION, err.message
        assert "snapshot" in err.message
        vm.run()

        full = tmp_path / "full.img"
        low0, high0 = await timed_backup(vm, run.target, full, "--full", "--checkpoint-id", "c0")
        writes = await asyncio.to_thread(vm.wait_writes, high0)
        k0 = prefix_of(full.read_bytes(), vm.writes(), low0, high0)
        assert vm.checkpoints() == {"c0": ""}
        assert not vm.backup_job()  # nbdgw backup released it: libvirt's job is over

        incs = []
        for name, since in (("c1", "c0"), ("c2", "c1"), ("c3", "c0")):  # c3: from an older one
            out = tmp_path / f"{name}.img"
            low, high = await timed_backup(
                vm, run.target, out, "--since", since, "--checkpoint-id", name
            )
            incs.append((out, low, high))
        assert vm.checkpoints() == {"c0": "", "c1": "c0", "c2": "c1", "c3": "c2"}

        writes = vm.writes()
        base = tmp_path / "restored.img"
        shutil.copy(full, base)
        ks = []
        for out, low, high in incs[:2]:
            proc = await asyncio.to_thread(nbdgw, "restore", str(base), str(out))
            assert proc.returncode == 0, proc.stderr
            ks.append(prefix_of(base.read_bytes(), writes, low, high))
        # full + an incremental since c0 taken after the others: the disk at c3.
        shutil.copy(full, base)
        proc = await asyncio.to_thread(nbdgw, "restore", str(base), str(incs[2][0]))
        assert proc.returncode == 0, proc.stderr
        k3 = prefix_of(base.read_bytes(), writes, incs[2][1], incs[2][2])
        assert k0 < ks[0] < ks[1] < k3

        # CSI GetMetadataDelta between any two checkpoints joined by snapshots that created
        # one incremental from another (c0 -> c1 -> c2, c0 -> c3): exactly the granules the
        # guest wrote between their instants, composed across links.
        csi = grpc.aio.insecure_channel(f"unix:{cfg.csi_socket}")
        meta = cpb_grpc.SnapshotMetadataStub(csi)

        async def delta(base: str, target: str) -> set[int]:
            req = cpb.GetMetadataDeltaRequest(
                base_snapshot_id=f"d0/{base}", target_snapshot_id=f"d0/{target}"
            )
            msgs = await stream(meta.GetMetadataDelta(req))
            assert all(m.volume_capacity_bytes == SIZE for m in msgs)
            return granules(flat(msgs))

        def written(low: int, high: int) -> set[int]:
            return {off // GRANULE for _, off in writes[low:high]}

        instants = {"c0": k0, "c1": ks[0], "c2": ks[1], "c3": k3}
        for base, target in (("c0", "c1"), ("c1", "c2"), ("c0", "c2"), ("c0", "c3")):
            want = written(instants[base], instants[target])
            assert want and await delta(base, target) == want, (base, target)
        assert await delta("c2", "c2") == set()

        async def refused(base: str, target: str) -> tuple[grpc.StatusCode, str]:
            req = cpb.GetMetadataDeltaRequest(
                base_snapshot_id=f"d0/{base}", target_snapshot_id=f"d0/{target}"
            )
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stream(meta.GetMetadataDelta(req))
            return exc.value.code(), exc.value.details() or ""

        # c3 was taken since c0: nothing recorded joins c1 or c2 to it.
        code, message = await refused("c2", "c3")
        assert code == grpc.StatusCode.FAILED_PRECONDITION, message
        assert "no record" in message and "since_checkpoint" in message
        assert (await refused("c2", "c0"))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert (await refused("c0", "nope"))[0] == grpc.StatusCode.NOT_FOUND

        # Checkpoints over gRPC: the chain with its parents; deleting one merges it.
        listed = await snaps.ListCheckpoints(spb.ListCheckpointsRequest(parent="d0"))
        ids = [c.name.rsplit("/", 1)[1] for c in listed.checkpoints]
        assert ids == ["c0", "c1", "c2", "c3"]
        assert [c.recording for c in listed.checkpoints] == [False, False, False, True]
        bitmaps = await run.stub.ListBitmaps(pb.ListBitmapsRequest(parent="d0"))
        assert [b.context for b in bitmaps.bitmaps] == [
            "base:allocation",
            *(f"qemu:dirty-bitmap:{c}" for c in ids),
        ]
        deleted = await snaps.DeleteCheckpoint(
            spb.DeleteCheckpointRequest(name="exports/d0/checkpoints/c1")
        )
        assert deleted.merged_into == "exports/d0/checkpoints/c0"
        assert vm.checkpoints() == {"c0": "", "c2": "c0", "c3": "c2"}
        # The writes between c0 and c2 did not change: the links through c1 still answer.
        assert await delta("c0", "c2") == written(k0, ks[1])
        # A link lost between the snapshot's creation and its release (the gateway died in
        # between) is recorded at the release.
        folder = data_dir / "libvirt-links" / host_key(f"libvirt:{vm.name}")
        kept = set(folder.glob("*.link"))
        await asyncio.to_thread(vm.wait_writes, len(vm.writes()) + 3)
        low = len(vm.writes())
        await snaps.CreateSnapshot(spb.CreateSnapshotRequest(
            parent="d0", snapshot_id="s4", since_checkpoint="c3", checkpoint_id="c4"))  # fmt: skip
        high = len(vm.writes())
        new = set(folder.glob("*.link")) - kept
        assert len(new) == 1 and folder.stat().st_mode & 0o077 == 0  # the gateway's alone
        for path in new:
            path.unlink()
        await snaps.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s4"))
        assert set(folder.glob("*.link")) - kept
        got = await delta("c3", "c4")
        writes = await asyncio.to_thread(vm.wait_writes, high)
        assert written(k3, low) <= got <= written(k3, high + 1)
        await csi.close()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await snaps.DeleteCheckpoint(
                spb.DeleteCheckpointRequest(name="exports/d0/checkpoints/c1")
            )
        assert reason(exc.value) == (grpc.StatusCode.NOT_FOUND, "CHECKPOINT_NOT_FOUND")
        # The CLI's bitmap add/remove are libvirt checkpoints here.
        proc = await asyncio.to_thread(
            nbdgw, "bitmap", "add", "d0", "manual", "--target", run.target
        )
        assert proc.returncode == 0, proc.stderr
        assert vm.checkpoints()["manual"] == "c4"
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await snaps.CreateSnapshot(
                spb.CreateSnapshotRequest(parent="d0", since_checkpoint="nope")
            )
        assert reason(exc.value) == (grpc.StatusCode.NOT_FOUND, "CHECKPOINT_NOT_FOUND")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await snaps.CreateSnapshot(spb.CreateSnapshotRequest(parent="d0", checkpoint_id="c0"))
        assert reason(exc.value) == (grpc.StatusCode.ALREADY_EXISTS, "CHECKPOINT_EXISTS")
        assert not vm.backup_job()
    finally:
        vm.stop()


def _job_file(data_dir: Path, vm: LibvirtVM) -> Path:
    return data_dir / "libvirt" / f"{host_key(f'libvirt:{vm.name}')}.nbd.job.json"


async def _view_runs(target: str, export: str, since: str) -> list[tuple[int, int]]:
    async with grpc.aio.insecure_channel(target) as channel:
        s = await stream_all(
            pb_grpc.BitmapServiceStub(channel), export=export, context=VIEW + since,
            filter=pb.EXTENT_FILTER_SET,
        )  # fmt: skip
    return [(o, n) for o, n, f, _ in s.rows if f & 1]


async def _clear(target: str, export: str, since: str, runs: list[tuple[int, int]]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.BitmapServiceStub(channel)
        for off, n in runs:
            await stub.ClearRange(
                pb.ClearRangeRequest(export=export, bitmap=VIEW + since, offset=off, length=n)
            )


async def test_release_rule_failed_backups_and_kill_9(uri: str, data_dir: Path, tmp_path: Path):
    vm = LibvirtVM("nbdgw-t-rule", count=300, pause=0.1).start()
    args = ["--libvirt-export", f"d0={vm.name}:vda", "--libvirt-uri", uri,
            "--host-check-interval", "0.3"]  # fmt: skip
    gw = GatewayProcess(*args, data_dir=data_dir).start()
    try:
        vm.run()
        full = tmp_path / "full.img"
        _low0, high0 = await timed_backup(vm, gw.target, full, "--full", "--checkpoint-id", "c0")

        # A consumer copies half of an incremental, acknowledges it, and the gateway dies.
        await asyncio.to_thread(vm.wait_writes, high0 + 6)
        async with grpc.aio.insecure_channel(gw.target) as channel:
            await spb_grpc.SnapshotServiceStub(channel).CreateSnapshot(
                spb.CreateSnapshotRequest(
                    parent="d0", snapshot_id="s1", since_checkpoint="c0", checkpoint_id="c1"
                )
            )
        runs = await _view_runs(gw.target, "d0@s1", "c0")
        assert len(runs) >= 4, runs
        await _clear(gw.target, "d0@s1", "c0", runs[: len(runs) // 2])
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait()
        gw.stop()
        assert vm.backup_job() and _job_file(data_dir, vm).exists()

        # Restarted: the job is served again, with the acknowledgements recorded before.
        gw = GatewayProcess(*args, data_dir=data_dir).start()
        async with grpc.aio.insecure_channel(gw.target) as channel:
            snaps = spb_grpc.SnapshotServiceStub(channel)
            listed = await snaps.ListSnapshots(spb.ListSnapshotsRequest(parent="d0"))
            assert [s.name for s in listed.snapshots] == ["exports/d0/snapshots/s1"]
            assert listed.snapshots[0].checkpoint_id == "c1"
            # The view streams minus what the ledger says was acknowledged before the kill.
            assert await _view_runs(gw.target, "d0@s1", "c0") == runs[len(runs) // 2 :]
            # The consumer gives up: not everything was acknowledged, so the checkpoint the
            # snapshot created goes (libvirt merges it into c0), and "since c0" keeps it all.
            released = await snaps.ReleaseSnapshot(
                spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s1")
            )
            assert released.merged[0].dirty_bytes > 0
        assert vm.checkpoints() == {"c0": ""}
        assert not vm.backup_job() and not _job_file(data_dir, vm).exists()

        # The new incremental since the last complete backup has every write since it.
        inc = tmp_path / "inc.img"
        low, high = await timed_backup(vm, gw.target, inc, "--since", "c0", "--checkpoint-id", "c2")
        base = tmp_path / "restored.img"
        shutil.copy(full, base)
        proc = await asyncio.to_thread(nbdgw, "restore", str(base), str(inc))
        assert proc.returncode == 0, proc.stderr
        prefix_of(base.read_bytes(), vm.writes(), low, high)

        # Everything acknowledged: the checkpoint stays, nothing is left over.
        async with grpc.aio.insecure_channel(gw.target) as channel:
            snaps = spb_grpc.SnapshotServiceStub(channel)
            await asyncio.to_thread(vm.wait_writes, len(vm.writes()) + 4)
            await snaps.CreateSnapshot(
                spb.CreateSnapshotRequest(
                    parent="d0", snapshot_id="s3", since_checkpoint="c2", checkpoint_id="c3"
                )
            )
            await _clear(gw.target, "d0@s3", "c2", await _view_runs(gw.target, "d0@s3", "c2"))
            released = await snaps.ReleaseSnapshot(
                spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s3")
            )
            assert [m.dirty_bytes for m in released.merged] == [0]
            assert vm.checkpoints() == {"c0": "", "c2": "c0", "c3": "c2"}

            # Partly acknowledged, the gateway killed, and the job ended behind its back (the
            # VM's job aborted): the restart finishes the release by the same rule.
            await asyncio.to_thread(vm.wait_writes, len(vm.writes()) + 4)
            await snaps.CreateSnapshot(
                spb.CreateSnapshotRequest(
                    parent="d0", snapshot_id="s4", since_checkpoint="c3", checkpoint_id="c4"
                )
            )
        runs = await _view_runs(gw.target, "d0@s4", "c3")
        await _clear(gw.target, "d0@s4", "c3", runs[:1])
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait()
        gw.stop()
        vm.dom.abortJob()
        gw = GatewayProcess(*args, data_dir=data_dir).start()
        async with grpc.aio.insecure_channel(gw.target) as channel:
            listed = await spb_grpc.SnapshotServiceStub(channel).ListSnapshots(
                spb.ListSnapshotsRequest(parent="d0")
            )
            assert not listed.snapshots
        assert vm.checkpoints() == {"c0": "", "c2": "c0", "c3": "c2"}
        assert not _job_file(data_dir, vm).exists()

        # libvirtd goes away and comes back: UNAVAILABLE meanwhile, then served again.
        vm.conn.close()
        await asyncio.to_thread(stop_libvirtd)
        try:
            async with grpc.aio.insecure_channel(gw.target) as channel:
                snaps = spb_grpc.SnapshotServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await snaps.ListCheckpoints(spb.ListCheckpointsRequest(parent="d0"))
                assert reason(exc.value) == (grpc.StatusCode.UNAVAILABLE, "HOST_UNAVAILABLE")
        finally:
            await asyncio.to_thread(start_libvirtd)
        vm.conn = open_connection()
        vm.dom = vm.conn.lookupByName(vm.name)
        async with grpc.aio.insecure_channel(gw.target) as channel:
            snaps = spb_grpc.SnapshotServiceStub(channel)
            deadline = time.monotonic() + 30
            while True:
                try:
                    listed = await snaps.ListCheckpoints(spb.ListCheckpointsRequest(parent="d0"))
                    break
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                    assert time.monotonic() < deadline, "not served again after libvirtd came back"
                    await asyncio.sleep(0.2)
            assert [c.name.rsplit("/", 1)[1] for c in listed.checkpoints] == ["c0", "c2", "c3"]

        # The domain stops: the host goes down (UNAVAILABLE with a retry), clean errors.
        vm.dom.destroy()
        async with grpc.aio.insecure_channel(gw.target) as channel:
            stub = pb_grpc.BitmapServiceStub(channel)
            deadline = time.monotonic() + 20
            while True:
                try:
                    await stub.ListBitmaps(pb.ListBitmapsRequest(parent="d0"))
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    break
                assert time.monotonic() < deadline, "the host stayed up with the domain gone"
                await asyncio.sleep(0.2)
    finally:
        with contextlib.suppress(Exception):
            gw.stop()
        vm.stop()


async def test_two_disks_are_one_instant(
    uri: str, data_dir: Path, start_gateway: Any, tmp_path: Path
) -> None:
    vm = LibvirtVM("nbdgw-t-two", disks=2, count=120, pause=0.05).start()
    try:
        # Every disk of the domain, found at start (exports DOMAIN-vda, DOMAIN-vdb).
        toml = tmp_path / "nbdgw.toml"
        toml.write_text(
            f'[[hosts]]\nname = "vm"\nlibvirt = "{uri}"\ndomain = "{vm.name}"\ndisks = "all"\n'
        )
        cfg = load_file(toml)
        cfg.data_dir = data_dir
        run = await start_gateway(cfg)
        d0, d1 = f"{vm.name}-vda", f"{vm.name}-vdb"
        assert sorted(run.gateway.pools) == [d0, d1]
        snaps = spb_grpc.SnapshotServiceStub(run.channel)
        vm.run()
        await asyncio.to_thread(vm.wait_writes, 12)
        # One call on one disk: the job covers the domain's disks (a consistency group).
        snap = await snaps.CreateSnapshot(spb.CreateSnapshotRequest(parent=d0, snapshot_id="s"))
        both = [f"exports/{d0}/snapshots/s", f"exports/{d1}/snapshots/s"]
        assert sorted(snap.group) == both
        await asyncio.to_thread(vm.wait_writes, len(vm.writes()) + 6)  # it keeps writing
        images = []
        for export in (f"{d0}@s", f"{d1}@s"):
            s = await stream_all(run.stub, export=export, context="base:allocation",
                                 include_data=True)  # fmt: skip
            image = bytearray(SIZE)
            for off, data in s.data.items():
                image[off : off + len(data)] = data
            images.append(bytes(image))
        writes = vm.writes()
        present = [
            {i for i, off in writes if img[off : off + 8] == f"guest:{i};"[:8].encode()}
            for img in images
        ]
        a, b = present
        assert a and b
        # Each disk is a prefix of the guest's writes, vdb's written right after vda's: at
        # one instant vdb holds the same prefix as vda, or one write less (the one between).
        assert a == set(range(len(a))) and b == set(range(len(b))), (sorted(a), sorted(b))
        assert len(a) - 1 <= len(b) <= len(a)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await snaps.CreateSnapshot(spb.CreateSnapshotRequest(parent=d1))
        assert reason(exc.value) == (grpc.StatusCode.FAILED_PRECONDITION, "DISK_BUSY")
        released = await snaps.ReleaseSnapshot(
            spb.ReleaseSnapshotRequest(name=f"exports/{d1}/snapshots/s")
        )
        assert sorted(released.released) == both
        assert not vm.backup_job()
    finally:
        vm.stop()
