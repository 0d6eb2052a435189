"""``nbdgw backup`` and ``nbdgw restore`` against a running QEMU (guest-less, a writer writing
through QEMU all along), and kill -9 of the gateway at every step of the loop.

- A chain (full, then incrementals) restored with ``nbdgw restore`` equals, byte for byte, the
  disk at the last snapshot, while the disk has changed since.
- No dirty bit lost: whatever step a ``kill -9`` of the gateway interrupts (create, read,
  clear, release), after a restart every write acknowledged after the last completed
  snapshot's instant is dirty in the live bitmap or in an open snapshot's fork, no fleecing
  node is left unserved and no bitmap is left frozen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.hosts.qmp import nbd_socket_path
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc
from tests.gateway.cli_support import GatewayProcess, nbdgw
from tests.gateway.test_qmp_gateway import start_qmp
from tests.qemu_vm import GRANULE, GuestlessVM, Writer, granules

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.fixture(params=["7", "10"])
def vm(request: pytest.FixtureRequest, tmp_path: Path):
    machine = GuestlessVM(tmp_path / "vm", request.param, size=16 << 20).start()
    yield machine
    machine.stop()


async def test_backup_chain_restores_the_disk_at_the_last_snapshot(
    vm: GuestlessVM, start_gateway: Any, tmp_path: Path
) -> None:
    run = await start_qmp(start_gateway, tmp_path, vm)
    await run.stub.AddBitmap(pb.AddBitmapRequest(parent="d0", bitmap="b"))
    size = vm.disks[0].size
    zero = b"\0" * size
    writer = Writer(vm, run.host.nbd_socket).open()
    for i in range(20):
        writer.write_pattern(i * 11 * 4096, 8192, i)
    writer.start(seed=5, pace=0.005)
    outs = []
    for i in range(3):
        await asyncio.sleep(0.3)
        # A snapshot taken with the writer paused around it (the instant is known), read by
        # `nbdgw backup --snapshot`, which clears the fork and releases it.
        writer._pause.set()
        await asyncio.sleep(0.05)
        at = len(writer.writes)
        await run.snapshots.CreateSnapshot(
            spb.CreateSnapshotRequest(parent="d0", snapshot_id=f"s{i}", bitmaps=["b"])
        )
        writer._pause.clear()
        out = tmp_path / f"b{i}.img"
        args = ["backup", "d0", str(out), "--bitmap", "b", "--clear", "--snapshot", f"s{i}"]
        proc = await asyncio.to_thread(
            nbdgw, *args, *(["--full"] if i == 0 else []), "--target", run.target
        )
        assert proc.returncode == 0, proc.stderr
        outs.append((out, writer.image_after(zero, writer.writes[:at])))
    # The last one the way a backup service runs it: `nbdgw backup` takes the snapshot itself
    # (the writer paused for its whole length, so that the instant is known).
    writer.stop()
    out = tmp_path / "b3.img"
    proc = await asyncio.to_thread(
        nbdgw, "backup", "d0", str(out), "--bitmap", "b", "--clear", "--target", run.target
    )
    assert proc.returncode == 0, proc.stderr
    last = writer.image_after(zero, writer.writes)
    outs.append((out, last))
    # The disk changes after the last backup.
    writer.write_pattern(0, 4096, 999)

    base = tmp_path / "restored.img"
    shutil.copy(outs[0][0], base)
    assert base.read_bytes() == outs[0][1]  # the full backup: the disk at s0
    for out, expected in outs[1:]:
        proc = await asyncio.to_thread(nbdgw, "restore", str(base), str(out))
        assert proc.returncode == 0, proc.stderr
        assert base.read_bytes() == expected
    assert base.read_bytes() != writer.image_after(zero, writer.writes)
    # Each backup released its snapshot; what was acknowledged is not merged back.
    assert not [n for n in vm.node_names() if n.startswith("nbdgw-")]
    assert vm.bitmaps()["b"]["count"] == GRANULE  # only the write after the last backup
    writer.close()


# --- kill -9 of the gateway at every step ----------------------------------------------------

STEPS = ("create", "read", "clear", "release")


async def _gateway_calls(
    target: str,
    step: str,
    snap: str,
    rng: random.Random,
    acked: list[tuple[int, int]],
    reached: asyncio.Event,
) -> None:
    """The steps of one backup loop over gRPC, up to and including ``step``; the caller kills
    the gateway at a random moment while they run. Every range a ClearRange was sent for goes
    to ``acked`` (the ledger may have recorded it even if the reply was lost)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.BitmapServiceStub(channel)
        snaps = spb_grpc.SnapshotServiceStub(channel)
        if step == "create":
            reached.set()
        await snaps.CreateSnapshot(
            spb.CreateSnapshotRequest(parent="d0", snapshot_id=snap, bitmaps=["b"])
        )
        if step == "create":
            return
        rows = []
        if step == "read":
            reached.set()
        async for m in stub.StreamExtents(
            pb.StreamExtentsRequest(export=f"d0@{snap}", context="b", include_data=True,
                                    filter=pb.EXTENT_FILTER_SET)
        ):  # fmt: skip
            pos = m.offset
            for d, n in zip(m.offset_deltas, m.lengths, strict=True):
                rows.append((pos + d, n))
                pos += d + n
        if step == "read":
            return
        if step == "clear":
            reached.set()
        for off, n in rows[: rng.randrange(1, len(rows) + 1)]:
            acked.append((off, n))
            await stub.ClearRange(
                pb.ClearRangeRequest(export=f"d0@{snap}", bitmap="b", offset=off, length=n)
            )
        if step == "clear":
            return
        reached.set()
        await snaps.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name=f"exports/d0/snapshots/{snap}"))


def _dirty_granules(vm: GuestlessVM) -> set[int]:
    """Granules dirty in the live bitmap b or in any fork (read through QEMU's own NBD export
    of each fleecing node the test makes itself: the test's view, not the gateway's)."""
    from nbdcore.sync.client import NBDClient

    out: set[int] = set()
    nodes = vm.cmd("query-named-block-nodes", flat=True)
    for n in nodes:
        names = [b["name"] for b in n.get("dirty-bitmaps", []) if b.get("name") == "b"]
        if not names:
            continue
        node = n["node-name"]
        eid = f"t-{node}"[:31]
        vm.cmd("block-dirty-bitmap-add", node=node, name="probe", disabled=True)
        vm.cmd("block-dirty-bitmap-merge", node=node, target="probe",
               bitmaps=[{"node": node, "name": "b"}])  # fmt: skip
        vm.cmd("block-export-add", type="nbd", id=eid, **{"node-name": node}, name=eid,
               bitmaps=["probe"])  # fmt: skip
        try:
            sock = vm.test_nbd_socket
            with NBDClient.connect(
                f"nbd+unix:///{eid}?socket={sock}", meta_contexts=["qemu:dirty-bitmap:probe"]
            ) as c:
                pos = 0
                while pos < c.size:
                    ext = c.block_status(pos, c.size - pos, contexts=["qemu:dirty-bitmap:probe"])
                    (runs,) = ext.values()
                    for length, flags in zip(*runs, strict=True):
                        if flags & 1:
                            out |= granules([(pos, length)])
                        pos += length
        finally:
            vm.cmd("block-export-del", id=eid, mode="hard")
            deadline = time.monotonic() + 5
            while any(e["id"] == eid for e in vm.cmd("query-block-exports")):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            vm.cmd("block-dirty-bitmap-remove", node=node, name="probe")
    return out


async def test_kill_9_at_every_step_loses_no_dirty_bit(vm: GuestlessVM, tmp_path: Path) -> None:
    data = tmp_path / "data"
    args = ["--qmp-export", f"d0={vm.qmp_path}:drive0", "--host-check-interval", "0.2"]
    gw = GatewayProcess(*args, data_dir=data).start()
    sock = nbd_socket_path(data / "qmp", f"qmp:{vm.qmp_path}")
    vm.test_nbd_socket = sock
    async with grpc.aio.insecure_channel(gw.target) as channel:
        await pb_grpc.BitmapServiceStub(channel).AddBitmap(
            pb.AddBitmapRequest(parent="d0", bitmap="b")
        )
    writer = Writer(vm, sock).open()
    writer.start(seed=11, pace=0.003)
    rng = random.Random(20261207)
    kills = dict.fromkeys(STEPS, 0)
    # The last instant after which every write must be found dirty: a release that completed
    # acknowledged (cleared) only what the fork held, i.e. writes before its instant.
    floor = 0.0
    try:
        for i in range(int(os.environ.get("NBDGW_QMP_KILL_LOOPS", "16"))):
            step = STEPS[i % len(STEPS)]
            snap = f"k{i}"
            acked: list[tuple[int, int]] = []
            reached = asyncio.Event()
            call = asyncio.ensure_future(_gateway_calls(gw.target, step, snap, rng, acked, reached))
            # Kill a moment after the step's first call went out: inside the step, mostly.
            await asyncio.wait_for(reached.wait(), 30)
            await asyncio.sleep(rng.uniform(0.0, 0.03))
            killed = not call.done()
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGKILL)
            gw.proc.wait()
            gw.stop()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call
            if killed:
                kills[step] += 1
            gw = GatewayProcess(*args, data_dir=data).start()
            # After the restart: every snapshot left in QEMU is served again or gone.
            async with grpc.aio.insecure_channel(gw.target) as channel:
                snaps = spb_grpc.SnapshotServiceStub(channel)
                listed = await snaps.ListSnapshots(spb.ListSnapshotsRequest(parent="d0"))
                served = {s.name.rsplit("/", 1)[1] for s in listed.snapshots}
                nodes = [n for n in vm.node_names() if n.startswith("nbdgw-f")]
                assert len(nodes) == len(served), (nodes, served)
                # Release what is open (a backup service would): merges back.
                for s in served:
                    await snaps.ReleaseSnapshot(
                        spb.ReleaseSnapshotRequest(name=f"exports/d0/snapshots/{s}")
                    )
            assert vm.bitmaps()["b"]["recording"]
            assert not [n for n in vm.node_names() if n.startswith("nbdgw-f")]
            # No write lost: with every snapshot released, a write acknowledged after the
            # floor is dirty in b, unless this loop acknowledged its range (ClearRange).
            writer._pause.set()
            await asyncio.sleep(0.05)
            dirty = _dirty_granules(vm)
            recent = [w for w in writer.writes if w.started >= floor]
            missing = granules([(w.offset, len(w.data)) for w in recent]) - dirty - granules(acked)
            assert not missing, f"loop {i} ({step}): lost {sorted(missing)[:10]}"
            floor = time.monotonic()  # everything before is now known dirty or acknowledged
            writer._pause.clear()
        for step in STEPS:
            assert kills[step] >= 1, f"no kill hit the {step} step: {kills}"
    finally:
        writer.close()
        gw.stop()
