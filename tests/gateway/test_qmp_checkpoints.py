"""Checkpoint chains on a running QEMU (7.2 and 10.0, a writer writing through QEMU): each
snapshot may start a checkpoint and fork "changed since" any earlier one; a chain of backups
(full, incrementals, one since an older checkpoint) restored with ``nbdgw restore`` equals the
disk at the last snapshot; deleting a checkpoint merges its interval into its older neighbour."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from gateway.errors import GatewayError
from nbdgw.v1 import snapshot_service_pb2 as spb
from tests.gateway.cli_support import nbdgw
from tests.gateway.test_qmp_gateway import start_qmp
from tests.gateway.test_snapshots import reason
from tests.qemu_vm import GRANULE, GuestlessVM, Writer, granules

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.fixture(params=["7", "10"])
def vm(request: pytest.FixtureRequest, tmp_path: Path):
    machine = GuestlessVM(tmp_path / "vm", request.param, size=16 << 20).start()
    yield machine
    machine.stop()


async def test_chain_since_any_checkpoint(
    vm: GuestlessVM, start_gateway: Any, tmp_path: Path
) -> None:
    run = await start_qmp(start_gateway, tmp_path, vm)
    size = vm.disks[0].size
    zero = b"\0" * size
    writer = Writer(vm, run.host.nbd_socket).open()
    writer.start(seed=9, pace=0.004)

    async def snapshot(i: int, **fields: Any) -> tuple[int, spb.Snapshot]:
        await asyncio.sleep(0.3)
        writer._pause.set()
        await asyncio.sleep(0.05)
        at = len(writer.writes)
        try:
            snap = await run.snapshots.CreateSnapshot(
                spb.CreateSnapshotRequest(parent="d0", snapshot_id=f"s{i}", **fields)
            )
        finally:
            writer._pause.clear()
        return at, snap

    async def backup(i: int, out: Path, *args: str) -> None:
        proc = await asyncio.to_thread(
            nbdgw, "backup", "d0", str(out), "--snapshot", f"s{i}", *args, "--target", run.target
        )
        assert proc.returncode == 0, proc.stderr

    ats = []
    at, snap = await snapshot(0, checkpoint_id="c0")
    assert snap.checkpoint_id == "c0"
    ats.append(at)
    await backup(0, tmp_path / "full.img", "--full")
    for i, since in ((1, "c0"), (2, "c1"), (3, "c0")):  # the last: since an older checkpoint
        at, snap = await snapshot(i, checkpoint_id=f"c{i}", since_checkpoint=since)
        ats.append(at)
        view = f"qemu:dirty-bitmap:since:{since}"
        (fork,) = [f for f in snap.forks if f.context == view]
        start = ats[int(since[1:])]
        expected = granules([(w.offset, len(w.data)) for w in writer.writes[start:at]])
        assert fork.dirty_bytes == len(expected) * GRANULE
        await backup(i, tmp_path / f"inc{i}.img", "--bitmap", view, "--keep-snapshot")
        released = await run.snapshots.ReleaseSnapshot(
            spb.ReleaseSnapshotRequest(name=f"exports/d0/snapshots/s{i}")
        )
        assert all(m.dirty_bytes == 0 for m in released.merged)  # views merge nothing back

    def restored(*incs: str) -> bytes:
        base = tmp_path / "restored.img"
        shutil.copy(tmp_path / "full.img", base)
        for inc in incs:
            proc = nbdgw("restore", str(base), str(tmp_path / inc))
            assert proc.returncode == 0, proc.stderr
        return base.read_bytes()

    at_s2 = writer.image_after(zero, writer.writes[: ats[2]])
    at_s3 = writer.image_after(zero, writer.writes[: ats[3]])
    assert await asyncio.to_thread(restored, "inc1.img", "inc2.img") == at_s2
    assert await asyncio.to_thread(restored, "inc3.img") == at_s3  # full + one since c0
    assert at_s3 != at_s2

    # The CSI delta: between two checkpoints, exactly the writes between their instants.
    for a, b in ((0, 1), (1, 3), (0, 3)):
        delta = await run.gateway.snapshots.checkpoint_delta("d0", f"c{a}", f"c{b}")
        assert granules(delta.ranges) == granules(
            [(w.offset, len(w.data)) for w in writer.writes[ats[a] : ats[b]]]
        )
    with pytest.raises(GatewayError) as err:
        await run.gateway.snapshots.checkpoint_delta("d0", "c3", "c1")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT

    listed = await run.snapshots.ListCheckpoints(spb.ListCheckpointsRequest(parent="d0"))
    assert [c.name.rsplit("/", 1)[1] for c in listed.checkpoints] == ["c0", "c1", "c2", "c3"]
    proc = await asyncio.to_thread(nbdgw, "checkpoint", "list", "d0", "--target", run.target)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[:2] for line in proc.stdout.splitlines()]
    assert rows[0] == ["NAME", "STATE"] and rows[1:] == [
        ["c0", "closed"],
        ["c1", "closed"],
        ["c2", "closed"],
        ["c3", "recording"],
    ]
    assert [c.recording for c in listed.checkpoints] == [False, False, False, True]

    # Deleting c1 merges its interval into c0: "since c0" still has everything.
    deleted = await run.snapshots.DeleteCheckpoint(
        spb.DeleteCheckpointRequest(name="exports/d0/checkpoints/c1")
    )
    assert deleted.merged_into == "exports/d0/checkpoints/c0"
    # Deleting the newest makes the older neighbour record again.
    proc = await asyncio.to_thread(
        nbdgw, "checkpoint", "delete", "d0", "c3", "--target", run.target
    )
    assert proc.returncode == 0 and "merged into c2" in proc.stdout, proc.stderr
    writer._pause.set()
    await asyncio.sleep(0.05)
    at = len(writer.writes)
    proc = await asyncio.to_thread(
        nbdgw, "snapshot", "create", "d0", "s4", "--since", "c0", "--json",
        "--target", run.target,
    )  # fmt: skip
    writer._pause.clear()
    assert proc.returncode == 0, proc.stderr
    snap = json_format.Parse(proc.stdout, spb.Snapshot())
    writer.stop()
    expected = granules([(w.offset, len(w.data)) for w in writer.writes[ats[0] : at]])
    (fork,) = snap.forks
    assert fork.dirty_bytes == len(expected) * GRANULE
    listed = await run.snapshots.ListCheckpoints(spb.ListCheckpointsRequest(parent="d0"))
    assert [(c.name.rsplit("/", 1)[1], c.recording) for c in listed.checkpoints] == [
        ("c0", False), ("c2", True)
    ]  # fmt: skip

    await run.snapshots.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s4"))

    # Errors, each with its reason.
    for fields, want in (
        ({"since_checkpoint": "nosuch"}, (grpc.StatusCode.NOT_FOUND, "CHECKPOINT_NOT_FOUND")),
        ({"checkpoint_id": "c0"}, (grpc.StatusCode.ALREADY_EXISTS, "CHECKPOINT_EXISTS")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await run.snapshots.CreateSnapshot(
                spb.CreateSnapshotRequest(parent="d0", snapshot_id="x", **fields)
            )
        assert reason(exc.value)[:2] == want
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await run.snapshots.DeleteCheckpoint(
            spb.DeleteCheckpointRequest(name="exports/d0/checkpoints/nosuch")
        )
    assert reason(exc.value) == (grpc.StatusCode.NOT_FOUND, "CHECKPOINT_NOT_FOUND")

    # nbdgw backup takes the snapshot with its checkpoint itself: since c2 (recording since c3
    # went), the writer stopped, full + inc1 + inc2 + this one is the disk now.
    proc = await asyncio.to_thread(
        nbdgw, "backup", "d0", str(tmp_path / "inc5.img"), "--checkpoint-id", "c5",
        "--since", "c2", "--target", run.target,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    now = writer.image_after(zero, writer.writes)
    assert await asyncio.to_thread(restored, "inc1.img", "inc2.img", "inc5.img") == now
    listed = await run.snapshots.ListCheckpoints(spb.ListCheckpointsRequest(parent="d0"))
    assert [(c.name.rsplit("/", 1)[1], c.recording) for c in listed.checkpoints] == [
        ("c0", False), ("c2", False), ("c5", True)
    ]  # fmt: skip
    writer.close()
