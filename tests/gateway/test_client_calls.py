"""Every call of the nbdgw client library, in both flavours, against a real ``nbdgw serve``
in front of its embedded host (and a read-only qemu-nbd for the ledger's generations); what
it returns is checked against nbdinfo and the disk's own bytes."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

import nbdgw
from nbdgw import ExtentFilter
from tests.gateway.cli_support import (
    GRANULARITY,
    EmbeddedDisk,
    GatewayProcess,
    MiB,
    QemuNBD,
    granules,
    make_embedded_disk,
    make_qemu_disk,
)
from tests.gateway.client_support import FLAVOURS, client, merged_extents, serve_embedded
from tests.gateway.conftest import nbdinfo_map

pytestmark = pytest.mark.interop
DIRTY = "qemu:dirty-bitmap:backup"


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, EmbeddedDisk]]:
    """One gateway for the tests that change nothing."""
    yield from serve_embedded(tmp_path_factory, "client")


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[tuple[GatewayProcess, EmbeddedDisk]]:
    """A gateway of its own, for the tests that clear or snapshot."""
    disk = make_embedded_disk(tmp_path / "disk.img")
    with GatewayProcess("--image", f"disk={disk.path}", data_dir=tmp_path / "data") as gw:
        yield gw, disk


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_exports_and_bitmaps(served: tuple[GatewayProcess, EmbeddedDisk], flavour: str) -> None:
    gw, disk = served
    with client(flavour, gw.target) as c:
        exports = c.call("list_exports")
        assert [e.id for e in exports] == ["disk"]
        export = c.call("get_export", "disk")
        assert export == exports[0] == c.call("get_export", "exports/disk")
        assert isinstance(export, nbdgw.Export)
        assert (export.name, export.size, export.host) == ("exports/disk", disk.size, "embedded")
        assert export.state is nbdgw.ExportState.AVAILABLE
        assert export.clear_mode is nbdgw.ClearMode.AT_SOURCE
        assert export.block_sizes is not None and export.flags.can_flush
        assert not export.read_only

        bitmaps = {b.context: b for b in c.call("list_bitmaps", "disk")}
        backup = bitmaps[DIRTY]
        assert backup.kind is nbdgw.BitmapKind.DIRTY_BITMAP
        assert (backup.export, backup.granularity, backup.export_size) == (
            "disk",
            GRANULARITY,
            disk.size,
        )
        assert backup.name == f"exports/disk/bitmaps/{DIRTY}"
        assert backup.recording is True
        assert backup.dirty_bytes == sum(n for _, n in granules(disk.dirty, disk.size))
        alloc = bitmaps["base:allocation"]
        assert alloc.kind is nbdgw.BitmapKind.ALLOCATION
        assert alloc.clear_mode is nbdgw.ClearMode.UNSUPPORTED and alloc.clear_unsupported_reason
        assert alloc.recording is None and alloc.dirty_bytes is None


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_extents_match_nbdinfo(served: tuple[GatewayProcess, EmbeddedDisk], flavour: str) -> None:
    gw, disk = served
    uri = gw.nbd_uri("disk")
    with client(flavour, gw.target) as c:
        every = c.call("iter_extents", "disk", "backup")
        assert all(isinstance(e, nbdgw.Extent) for e in every)
        # The whole disk, in order, without gaps, as nbdinfo --map sees it from the host.
        assert every[0].offset == 0 and every[-1].end == disk.size
        assert all(a.end == b.offset for a, b in itertools.pairwise(every))
        expected = [(o, n, f) for o, n, f, _ in nbdinfo_map(uri, DIRTY)]
        assert merged_extents(every) == expected
        dirty = c.call("iter_extents", "disk", DIRTY, filter=ExtentFilter.SET)
        assert [(e.offset, e.length) for e in merged_extents_as(dirty)] == granules(
            disk.dirty, disk.size
        )
        clean = c.call("iter_extents", "disk", DIRTY, filter=ExtentFilter.CLEAR)
        assert {e.flags for e in clean} == {0}
        assert sum(e.length for e in clean) + sum(e.length for e in dirty) == disk.size

        # A sub-range, with the allocation map merged in.
        part = c.call(
            "iter_extents", "disk", "backup", offset=4 * MiB, length=MiB, merge_allocation=True
        )
        assert part[0].offset == 4 * MiB and part[-1].end == 5 * MiB
        alloc = [(o, n, f) for o, n, f, _ in nbdinfo_map(uri, "base:allocation")]
        assert merged_extents(c.call("iter_extents", "disk", "base:allocation")) == alloc
        # Each extent's allocation is what base:allocation says there (hole/zero flags).
        kinds = {0: "DATA", 1: "DATA", 2: "ZERO", 3: "HOLE"}
        for e in part:
            (flags,) = {f for o, n, f in alloc if o < e.end and e.offset < o + n}
            assert e.allocation.name == kinds[flags], (e, flags)
        assert {e.allocation for e in part} >= {nbdgw.Allocation.DATA, nbdgw.Allocation.HOLE}


def merged_extents_as(extents: list[nbdgw.Extent]) -> list[nbdgw.Extent]:
    return [nbdgw.Extent(o, n, f) for o, n, f in merged_extents(extents)]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_data_is_the_disk(served: tuple[GatewayProcess, EmbeddedDisk], flavour: str) -> None:
    """iter_data over the whole disk rebuilds it byte for byte; with SET, only the dirty
    granules come, each with the disk's bytes or as zeroes."""
    gw, disk = served
    with client(flavour, gw.target) as c:
        image = bytearray(disk.size)
        pos = 0
        for chunk in c.call("iter_data", "disk", "backup"):
            assert isinstance(chunk, nbdgw.DataChunk) and chunk.offset == pos
            if chunk.data is None:
                assert chunk.allocation in (nbdgw.Allocation.ZERO, nbdgw.Allocation.HOLE)
            else:
                assert chunk.allocation is nbdgw.Allocation.DATA
                assert len(chunk.data) == chunk.length
                image[chunk.offset : chunk.end] = chunk.data
            pos = chunk.end
        assert pos == disk.size
        assert image == disk.content

        covered = 0
        for chunk in c.call("iter_data", "disk", DIRTY, filter=ExtentFilter.SET):
            assert chunk.flags == 1
            want = disk.content[chunk.offset : chunk.end]
            assert (bytes(chunk.data) if chunk.data is not None else bytes(chunk.length)) == want
            covered += chunk.length
        assert covered == sum(n for _, n in granules(disk.dirty, disk.size))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_batches_and_resume_tokens(
    served: tuple[GatewayProcess, EmbeddedDisk], flavour: str
) -> None:
    """Batches tile the range; any batch's token continues the stream exactly after it, in
    a new call (as another process would)."""
    gw, _disk = served
    with client(flavour, gw.target) as c:
        batches = c.call("iter_batches", "disk", DIRTY, max_extents_per_message=4)
        assert len(batches) > 5
        assert batches[0].offset == 0 and batches[-1].complete
        assert all(a.next_offset == b.offset for a, b in itertools.pairwise(batches))
        every = [e for b in batches for e in b.extents()]
        assert merged_extents(every) == merged_extents(c.call("iter_extents", "disk", DIRTY))
        middle = batches[len(batches) // 2]
        rest = c.call("iter_extents", "disk", DIRTY, resume_token=middle.resume_token)
        assert rest == [e for b in batches[len(batches) // 2 + 1 :] for e in b.extents()]

        # A request built by hand goes through as it is.
        from nbdgw.v1 import bitmap_service_pb2 as pb

        req = pb.StreamExtentsRequest(export="disk", context=DIRTY, offset=8 * MiB, length=MiB)
        (only,) = c.call("stream_extents", req)
        assert (only.offset, only.next_offset, only.range_end) == (8 * MiB, 9 * MiB, 9 * MiB)
        assert only.raw.lengths == [MiB]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_clear_remaining_and_snapshots(
    fresh: tuple[GatewayProcess, EmbeddedDisk], flavour: str
) -> None:
    gw, disk = fresh
    dirty = granules(disk.dirty, disk.size)
    with client(flavour, gw.target) as c:
        assert [(r.offset, r.length) for r in c.call("iter_remaining_dirty", "disk", "backup")] == (
            dirty
        )
        # The export is writable: a clear carries the clear token of the batch that read it.
        first = dirty[0]
        token = c.call("iter_batches", "disk", "backup", filter=ExtentFilter.SET)[0].clear_token
        assert token
        with pytest.raises(nbdgw.errors.ClearTokenRequired):
            c.call("clear_range", "disk", "backup", first[0], first[1])
        # Only whole granules inside the range: the first dirty granule plus a bit of the next.
        result = c.call(
            "clear_range", "disk", "backup", first[0], first[1] + 4096, clear_token=token
        )
        assert isinstance(result, nbdgw.ClearResult)
        assert result.cleared == (nbdgw.ByteRange(first[0], first[1]),)
        assert result.cleared_bytes == first[1]
        assert result.clear_mode is nbdgw.ClearMode.AT_SOURCE
        assert result.granularity == GRANULARITY
        assert result.conditional and result.kept == ()  # nothing wrote since
        left = c.call("iter_remaining_dirty", "disk", "backup")
        assert [(r.offset, r.length) for r in left] == dirty[1:]
        again = c.call(  # harmless
            "clear_range", "disk", "backup", first[0], first[1], clear_token=token
        )
        assert again.cleared_bytes == first[1]
        with pytest.raises(nbdgw.errors.GenerationsNotSupported):  # it clears at the source
            c.call("set_generation", "disk", "g1")

        snap = c.call("create_snapshot", "disk", snapshot_id="s1", bitmaps=["backup"])
        assert isinstance(snap, nbdgw.Snapshot)
        assert (snap.id, snap.parent, snap.export) == ("s1", "disk", "disk@s1")
        assert snap.name == "exports/disk/snapshots/s1"
        assert snap.state is nbdgw.SnapshotState.READY and snap.size == disk.size
        assert [f.context for f in snap.forks] == [DIRTY]
        assert snap.forks[0].dirty_bytes == sum(n for _, n in dirty[1:])
        assert c.call("list_snapshots", "disk") == [snap]
        # The snapshot's export reads like any other, with its forked bitmap.
        snap_dirty = c.call("iter_extents", snap.export, "backup", filter=ExtentFilter.SET)
        assert [(e.offset, e.length) for e in merged_extents_as(snap_dirty)] == dirty[1:]
        with pytest.raises(nbdgw.errors.AlreadyExists) as exists:
            c.call("create_snapshot", "disk", snapshot_id="s1")
        assert exists.value.reason == "SNAPSHOT_EXISTS"
        merged = c.call("release_snapshot", "disk", "s1")
        assert [m.context for m in merged] == [DIRTY]
        assert c.call("list_snapshots", "disk") == []
        with pytest.raises(nbdgw.errors.SnapshotNotFound):
            c.call("release_snapshot", "disk", "s1")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_checkpoints(fresh: tuple[GatewayProcess, EmbeddedDisk], flavour: str) -> None:
    gw, _ = fresh
    with client(flavour, gw.target) as c:
        assert c.call("list_checkpoints", "disk") == []
        s0 = c.call("create_snapshot", "disk", snapshot_id="s0", checkpoint="c0")
        assert s0.raw.checkpoint_id == "c0"
        c.call("release_snapshot", "disk", "s0")
        (c0,) = c.call("list_checkpoints", "disk")
        assert isinstance(c0, nbdgw.Checkpoint)
        assert (c0.name, c0.id, c0.export) == ("exports/disk/checkpoints/c0", "c0", "disk")
        assert c0.recording and c0.dirty_bytes == 0 and c0.granularity > 0
        # Nothing was written since c0: the view since it is clean.
        s1 = c.call("create_snapshot", "disk", snapshot_id="s1", checkpoint="c1", since="c0")
        assert [(f.context, f.dirty_bytes) for f in s1.forks] == [("qemu:dirty-bitmap:since:c0", 0)]
        c.call("release_snapshot", "disk", "s1")
        listed = c.call("list_checkpoints", "disk")
        assert [(k.id, k.recording) for k in listed] == [("c0", False), ("c1", True)]
        assert c.call("delete_checkpoint", "disk", "c1") == "c0"
        assert c.call("delete_checkpoint", "exports/disk", "c0") == ""
        assert c.call("list_checkpoints", "disk") == []
        with pytest.raises(nbdgw.errors.NotFound):
            c.call("delete_checkpoint", "disk", "c0")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_generations_on_a_ledger_export(tmp_path: Path, flavour: str) -> None:
    """A read-only qemu-nbd export clears through the ledger: a clear must name the current
    generation, and GenerationMismatch says which one that is."""
    qdisk = make_qemu_disk(tmp_path)
    host = QemuNBD(qdisk, tmp_path / "qemu.sock").start()
    try:
        with (
            GatewayProcess("--export", f"qd={host.uri}", data_dir=tmp_path / "data") as gw,
            client(flavour, gw.target) as c,
        ):
            b0 = "qemu:dirty-bitmap:b0"
            dirty = [(o, n) for o, n, f, _ in nbdinfo_map(host.uri, b0) if f & 1]
            change = c.call("set_generation", "qd", "g1")
            assert change == nbdgw.GenerationChange("qd", "g1", "")
            assert c.call("get_export", "qd").generation == "g1"
            with pytest.raises(nbdgw.errors.GenerationMismatch) as mismatch:
                c.call("clear_range", "qd", "b0", dirty[0][0], 4096, generation="g0")
            err = mismatch.value
            assert isinstance(err, nbdgw.errors.FailedPrecondition)
            assert (err.generation, err.current_generation) == ("g0", "g1")
            assert err.violations and err.violations[0].type == "GENERATION"
            result = c.call("clear_range", "qd", "b0", dirty[0][0], 4096, generation="g1")
            assert result.clear_mode is nbdgw.ClearMode.LEDGER_MASK
            assert (result.generation, result.cleared_bytes) == ("g1", 4096)
            left = c.call("iter_remaining_dirty", "qd", "b0")
            assert sum(r.length for r in left) == sum(n for _, n in dirty) - 4096
            assert c.call("set_generation", "qd", "g2").previous_generation == "g1"
            left = c.call("iter_remaining_dirty", "qd", "b0")
            assert [(r.offset, r.length) for r in left] == dirty
    finally:
        host.stop()
