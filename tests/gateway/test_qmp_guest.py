"""What a VM does: a real guest (tests/qemu_guest.py) boots under TCG and writes to its virtio
disk while the gateway turns change tracking on, takes a point in time, serves its fork and
data, and releases it; the guest's own writes are checked on both sides of the instant.
Kept to one short test per QEMU version: TCG is slow and the machine is shared."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import snapshot_service_pb2 as spb
from tests.gateway.conftest import stream_all
from tests.gateway.test_qmp_gateway import start_qmp
from tests.qemu_guest import BLOCK, GuestVM, guest_block
from tests.qemu_vm import GRANULE

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.mark.parametrize("version", ["7", "10"])
async def test_guest_writes_around_a_snapshot(
    version: str, start_gateway: Any, tmp_path: Path
) -> None:
    vm = GuestVM(tmp_path / "vm", version, count=40, pause=0.1).start()
    try:
        # The disk named as the docs allow: by its node name, or by its device's id (-device
        # ...,id=vd0), which QEMU reports only inside a QOM path.
        node = "drive0" if version == "7" else "vd0"
        run = await start_qmp(start_gateway, tmp_path, vm, node=node)
        await run.stub.AddBitmap(pb.AddBitmapRequest(parent="d0", bitmap="b"))
        vm.run()
        before = await asyncio.to_thread(vm.wait_writes, 8)
        await run.snapshots.CreateSnapshot(
            spb.CreateSnapshotRequest(parent="d0", snapshot_id="s", bitmaps=["b"])
        )
        by_end = vm.writes()
        await asyncio.to_thread(vm.wait_writes, len(by_end) + 5)  # the VM keeps writing

        # Writes reported before the call are in the fork; writes started after it ended
        # are not (write len(by_end) may have been in flight at the instant).
        must = {off // GRANULE for _, off in before}
        may = {off // GRANULE for i, off in vm.writes() if i <= len(by_end)}
        s = await stream_all(run.stub, export="d0@s", context="b", include_data=True,
                             filter=pb.EXTENT_FILTER_SET)  # fmt: skip
        fork = {
            g for o, n, f, _ in s.rows if f & 1 for g in range(o // GRANULE, (o + n) // GRANULE)
        }
        assert must <= fork <= may | must
        data = s.data
        for i, off in before:
            start = max(o for o in data if o <= off)
            assert data[start][off - start : off - start + BLOCK] == guest_block(i)
        # A block the guest wrote after the instant reads as before it (zeroes) in the
        # snapshot, while the disk has it.
        later = [(i, off) for i, off in vm.writes() if i > len(by_end)]
        assert later
        i, off = later[0]
        whole = await stream_all(run.stub, export="d0@s", context="base:allocation",
                                 offset=off, length=BLOCK, include_data=True)  # fmt: skip
        assert b"".join(whole.data.values()) in (b"", b"\0" * BLOCK)
        live = await stream_all(run.stub, export="d0", context="base:allocation",
                                offset=off, length=BLOCK, include_data=True)  # fmt: skip
        assert b"".join(live.data.values()) == guest_block(i)

        # Everything acknowledged: nothing merges back; the live bitmap has the rest.
        for g in sorted(fork):
            await run.stub.ClearRange(
                pb.ClearRangeRequest(export="d0@s", bitmap="b", offset=g * GRANULE,
                                     length=GRANULE)
            )  # fmt: skip
        released = await run.snapshots.ReleaseSnapshot(
            spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s")
        )
        assert [m.dirty_bytes for m in released.merged] == [0]
        await asyncio.to_thread(vm.wait_writes, 40)
        since = {off // GRANULE for i, off in vm.writes() if i >= len(before)}
        live_dirty = vm.bitmaps()["b"]["count"] // GRANULE
        assert len(since - may) <= live_dirty <= len(since)
    finally:
        vm.stop()
