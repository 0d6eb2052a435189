"""gateway.hosts.qmp_monitor against a real QEMU (7.2 and 10.0, guest-less, TCG) while a
writer keeps writing through QEMU: bitmaps from QMP, the fleecing transaction, the point in time
read over QEMU's NBD server, a precise merge-back, and recovery by names."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.hosts.qmp_monitor import Fleece, Monitor, QMPFailure, fleece_path, new_token
from nbdcore.aio.client import NBDClient
from nbdcore.extents import iter_extents
from tests.qemu_vm import GRANULE, GuestlessVM, Writer, granules

pytestmark = [pytest.mark.interop, pytest.mark.slow]

CTX = "qemu:dirty-bitmap:b"


@pytest.fixture(params=["7", "10"])
def vm(request: pytest.FixtureRequest, tmp_path: Path):
    machine = GuestlessVM(tmp_path, request.param).start()
    yield machine
    machine.stop()


async def _dirty(uri: str) -> set[int]:
    async with await NBDClient.connect(uri, meta_contexts=[CTX]) as c:
        found = []
        async for batch in iter_extents(c, [CTX]):
            found += [(o, n) for o, n, (f,) in batch.rows() if f & 1]
    return granules(found)


async def test_fleecing_point_in_time_and_precise_merge_back(vm: GuestlessVM, tmp_path: Path):
    mon = Monitor(vm.qmp_path)
    sock = tmp_path / "nbd.sock"
    await mon.ensure_nbd_server(sock)
    await mon.ensure_nbd_server(sock)  # a second time: the running server is kept
    await mon.add_bitmap("drive0", "b")
    writer = Writer(vm, sock).open()
    for i in range(8):
        writer.write_pattern(i * 3 * GRANULE, 4096, i)
    info = await mon.node("drive0")
    (b,) = info.bitmaps
    assert (b.name, b.granularity, b.recording, b.persistent, b.busy) == (
        "b",
        GRANULE,
        True,
        True,
        False,
    )
    assert b.count == 8 * GRANULE
    before = {w.offset: w.data for w in writer.writes}

    writer.start(seed=7)
    token = new_token()
    f = Fleece(
        "disk", "s1", token, 0, "drive0",
        fleece_path(tmp_path, "disk", "s1", token, 0), {"b": GRANULE}, "disk@s1",
    )  # fmt: skip
    writer._pause.set()  # the instant must be known to compare bytes: no write in flight
    await asyncio.sleep(0.05)
    at = len(writer.writes)
    await mon.create_fleeces([f])
    await mon.export_fleece(f)
    writer._pause.clear()
    await asyncio.sleep(0.5)
    writer.stop()
    assert len(writer.writes) > at, "the writer kept writing after the snapshot"

    # The point in time: the writes before it, none after; the fork holds what b held.
    uri = f"nbd+unix:///disk@s1?socket={sock}"
    expected = writer.image_after(b"\0" * vm.disks[0].size, writer.writes[:at])
    async with await NBDClient.connect(uri) as c:
        got = await c.pread(0, vm.disks[0].size)
    assert got == expected
    assert got != writer.image_after(b"\0" * vm.disks[0].size, writer.writes)
    fork = await _dirty(uri)
    assert fork == granules([(w.offset, len(w.data)) for w in writer.writes[:at]])
    assert set(before) <= {g * GRANULE for g in fork}
    live = {x.name: x for x in (await mon.node("drive0")).bitmaps}
    after = granules([(w.offset, len(w.data)) for w in writer.writes[at:]])
    assert live["b"].count == len(after) * GRANULE and live["b"].recording

    # Found again by its names.
    ((found, alive),) = await mon.find_fleeces(tmp_path)
    assert alive and (found.export, found.snapshot, found.token) == ("disk", "s1", token)
    assert found.forks == {"b": GRANULE}

    # Release: acknowledge all but two granules of the fork; merge back exactly those.
    keep = sorted(fork)[:2]
    await mon.remove_export(f.export_id)
    await mon.cancel_job(f.job)
    await mon.merge_ranges(
        f, "b", GRANULE, vm.disks[0].size, [(g * GRANULE, GRANULE) for g in keep],
        tmp_path / "scratch.qcow2",
    )  # fmt: skip
    await mon.drop_fleece(f)
    assert not f.path.exists()
    assert f.fleece_node not in vm.node_names()
    live = {x.name: x for x in (await mon.node("drive0")).bitmaps}
    assert live["b"].count == len(after | set(keep)) * GRANULE
    writer.close()
    await mon.close()


async def test_errors_are_precise(vm: GuestlessVM, tmp_path: Path):
    mon = Monitor(vm.qmp_path)
    with pytest.raises(QMPFailure) as exc:
        await mon.node("nosuch")
    assert exc.value.kind == "not_found"
    await mon.add_bitmap("drive0", "b")
    with pytest.raises(QMPFailure) as exc:
        await mon.add_bitmap("drive0", "b")
    assert exc.value.kind == "exists"
    with pytest.raises(QMPFailure) as exc:
        await mon.remove_bitmap("drive0", "nosuch")
    assert exc.value.kind == "not_found"
    # A transaction QEMU refuses (a fork of a bitmap the disk lacks) leaves nothing behind.
    token = new_token()
    f = Fleece("disk", "s1", token, 0, "drive0", fleece_path(tmp_path, "disk", "s1", token, 0),
               {"nosuch": GRANULE}, "disk@s1")  # fmt: skip
    await mon.ensure_nbd_server(tmp_path / "nbd.sock")
    with pytest.raises(QMPFailure) as exc:
        await mon.create_fleeces([f])
    assert exc.value.kind == "not_found", exc.value
    assert not f.path.exists()
    assert f.fleece_node not in vm.node_names()
    assert not vm.cmd("query-block-jobs")
    # QEMU gone: unavailable, then back.
    vm.stop()
    with pytest.raises(QMPFailure) as exc:
        await mon.node("drive0")
    assert exc.value.kind == "unavailable"
    vm.start()
    assert (await mon.node("drive0")).node_name == "drive0"
    await mon.close()
