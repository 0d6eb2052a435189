"""Snapshots: a model of data and bitmaps (hypothesis), errors, running out of space, recovery
after unclean shutdowns, and a reader racing a writer."""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nbdcore.constants import NBD_STATE_ZERO
from nbdcore.storage import (
    BitmapError,
    Image,
    NoSuchBitmapError,
    NoSuchSnapshotError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotFullError,
    SnapshotUnavailableError,
)
from nbdcore.storage.snapshot import Snapshot
from nbdcore.storage.store import IN_USE, SNAPSHOTS, store_dir

C = 4096  # cluster size in the tests
SIZE = 40 * C + 777  # not a cluster multiple


def granules(bitmap_runs: list[tuple[int, int, int]], granularity: int) -> set[int]:
    out: set[int] = set()
    for offset, length, flags in bitmap_runs:
        if flags:
            out.update(range(offset // granularity, -(-(offset + length) // granularity)))
    return out


def dirty(image: Image, name: str) -> set[int]:
    b = image.bitmaps[name]
    return granules(list(b.extents(0, b.size)), b.granularity)


def touched(offset: int, length: int, granularity: int) -> set[int]:
    return set(range(offset // granularity, (offset + length - 1) // granularity + 1))


def inside(offset: int, length: int, granularity: int, size: int) -> set[int]:
    first = -(-offset // granularity)
    end = -(-size // granularity) if offset + length == size else (offset + length) // granularity
    return set(range(first, end))


class SnapshotModel(RuleBasedStateMachine):
    """Live data and bitmaps, snapshots' data and forks, against a plain Python model: every
    snapshot reads as the disk did at its instant, every fork and live bitmap holds exactly the
    granules the rules of forking, clearing and merging say, and reopening changes nothing."""

    BITMAPS: ClassVar[dict[str, int]] = {"a": 512, "b": 8192}

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="snapmodel"))
        self.path = self.dir / "disk.raw"
        self.image = Image.create(self.path, SIZE)
        for name, g in self.BITMAPS.items():
            self.image.add_bitmap(name, granularity=g)
        self.data = bytearray(SIZE)
        self.live = {name: set[int]() for name in self.BITMAPS}
        self.snaps: dict[str, tuple[bytes, dict[str, set[int]]]] = {}
        self.counter = 0

    def teardown(self) -> None:
        self.image.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    ranges = st.integers(0, SIZE - 1).flatmap(
        lambda o: st.tuples(st.just(o), st.integers(1, min(SIZE - o, 3 * C)))
    )

    def _changed(self, offset: int, length: int) -> None:
        for name, g in self.BITMAPS.items():
            self.live[name] |= touched(offset, length, g)

    @rule(r=ranges, byte=st.integers(1, 255))
    def write(self, r: tuple[int, int], byte: int) -> None:
        offset, length = r
        self.image.write(bytes([byte]) * length, offset)
        self.data[offset : offset + length] = bytes([byte]) * length
        self._changed(offset, length)

    @rule(r=ranges, trim=st.booleans())
    def zero(self, r: tuple[int, int], trim: bool) -> None:
        offset, length = r
        if trim:
            self.image.trim(offset, length)
        else:
            self.image.write_zeroes(offset, length, may_trim=False)
        self.data[offset : offset + length] = bytes(length)
        self._changed(offset, length)

    @precondition(lambda self: len(self.snaps) < 3)
    @rule(forks=st.sets(st.sampled_from(sorted(BITMAPS))))
    def create(self, forks: set[str]) -> None:
        self.counter += 1
        name = f"s{self.counter}"
        self.image.create_snapshot(name, bitmaps=sorted(forks), cluster_size=C)
        self.snaps[name] = (bytes(self.data), {f: set(self.live[f]) for f in forks})
        for f in forks:
            self.live[f] = set()

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.image.release_snapshot(name)
        _, forks = self.snaps.pop(name)
        for f, bits in forks.items():
            self.live[f] |= bits
        with pytest.raises(NoSuchSnapshotError):
            self.image.release_snapshot(name)

    @precondition(lambda self: any(forks for _, forks in self.snaps.values()))
    @rule(data=st.data(), r=ranges)
    def clear(self, data: st.DataObject, r: tuple[int, int]) -> None:
        name = data.draw(st.sampled_from(sorted(n for n, s in self.snaps.items() if s[1])))
        fork = data.draw(st.sampled_from(sorted(self.snaps[name][1])))
        offset, length = r
        self.image.snapshot(name).clear_bitmap_range(fork, offset, length)
        self.snaps[name][1][fork] -= inside(offset, length, self.BITMAPS[fork], SIZE)

    @rule()
    def reopen(self) -> None:
        self.image.close()
        self.image = Image.open(self.path)

    @rule(r=ranges)
    def read_snapshots(self, r: tuple[int, int]) -> None:
        offset, length = r
        for name, (data, _) in self.snaps.items():
            assert self.image.snapshot(name).read(offset, length) == data[offset : offset + length]

    @invariant()
    def consistent(self) -> None:
        assert self.image.read(0, SIZE) == self.data
        assert sorted(self.image.snapshots) == sorted(self.snaps)
        for name in self.BITMAPS:
            assert dirty(self.image, name) == self.live[name]
        for name, (data, forks) in self.snaps.items():
            snap = self.image.snapshot(name)
            assert snap.read(0, SIZE) == data
            assert sorted(snap.bitmaps) == sorted(forks)
            for f, bits in forks.items():
                assert dirty(snap, f) == bits
            # base:allocation of the snapshot: covers the disk, and a ZERO run reads as zeroes.
            pos = 0
            for offset, length, flags in snap.disk.allocation(0, SIZE):
                assert offset == pos and length > 0
                if flags & NBD_STATE_ZERO:
                    assert data[offset : offset + length] == bytes(length)
                pos += length
            assert pos == SIZE


SnapshotModel.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestSnapshotModel = SnapshotModel.TestCase


# --- plain tests ------------------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with Image.create(path, SIZE) as image:
        image.add_bitmap("b", granularity=C)
    return path


def test_memory_image_snapshot() -> None:
    image = Image.memory(SIZE)
    image.add_bitmap("b", granularity=C)
    image.write(b"x" * 3 * C, C)
    snap = image.create_snapshot("s", bitmaps=["b"], cluster_size=C)
    image.write(b"y" * C, 2 * C)
    assert snap.read(C, 3 * C) == b"x" * 3 * C
    assert dirty(snap, "b") == {1, 2, 3} and dirty(image, "b") == {2}
    assert snap.used_bytes == C
    image.release_snapshot("s")
    assert dirty(image, "b") == {1, 2, 3}


def test_errors(disk: Path) -> None:
    with Image.open(disk) as image:
        with pytest.raises(NoSuchBitmapError, match="'nope'"):
            image.create_snapshot("s", bitmaps=["nope"])
        assert not image.snapshots and not (store_dir(disk) / SNAPSHOTS / "s").exists()
        image.create_snapshot("s", bitmaps=["b"])
        with pytest.raises(SnapshotExistsError):
            image.create_snapshot("s")
        # A trailing newline too ("$" matches before one): it would name a directory.
        for bad in ("", "a/b", ".x", "x" * 64, "a b", "snap\n", "snap\r", "snap\x00"):
            with pytest.raises(SnapshotError, match="snapshot name"):
                image.create_snapshot(bad)
        assert sorted(p.name for p in (store_dir(disk) / SNAPSHOTS).iterdir()) == ["s"]
        with pytest.raises(SnapshotError, match="cluster size"):
            image.create_snapshot("t", cluster_size=1000)
        with pytest.raises(SnapshotError, match="on_full"):
            image.create_snapshot("t", on_full="explode")
        with pytest.raises(SnapshotError, match="once"):
            image.create_snapshot("t", bitmaps=["b", "b"])
        with pytest.raises(BitmapError, match="forked by snapshot 's'"):
            image.remove_bitmap("b")
        snap = image.snapshot("s")
        with pytest.raises(OSError, match="read-only"):
            snap.write(b"x", 0)
        image.release_snapshot("s")
        with pytest.raises(NoSuchSnapshotError, match="released already"):
            image.release_snapshot("s")
        with pytest.raises(SnapshotUnavailableError, match="released"):
            snap.read(0, 1)
        with pytest.raises(SnapshotUnavailableError, match="released"):
            snap.clear_bitmap_range("b", 0, SIZE)
        image.remove_bitmap("b")
    with Image.open(disk, read_only=True) as image, pytest.raises(OSError, match="read-only"):
        image.create_snapshot("s")


@pytest.mark.parametrize("persistent", [True, False])
def test_break_when_full(disk: Path, persistent: bool) -> None:
    image = Image.open(disk) if persistent else Image.memory(SIZE)
    if not persistent:
        image.add_bitmap("b", granularity=C)
    image.write(b"a" * SIZE, 0)
    snap = image.create_snapshot("s", bitmaps=["b"], cluster_size=C, max_bytes=2 * C)
    image.write(b"b" * 2 * C, 0)  # fits exactly
    assert snap.read(0, 2 * C) == b"a" * 2 * C and not snap.broken
    image.write(b"c" * C, 10 * C)  # does not: the snapshot breaks, the write goes on
    assert snap.broken and image.read(10 * C, C) == b"c" * C
    with pytest.raises(SnapshotUnavailableError, match=r"broken.*limit 8192 bytes"):
        snap.read(0, 1)
    with pytest.raises(SnapshotUnavailableError, match="broken"):
        list(snap.disk.allocation(0, SIZE))
    if persistent:
        image.close()
        image = Image.open(disk)
        snap = image.snapshot("s")
        assert snap.broken
    # Its fork still merges back on release.
    assert dirty(image, "b") == {0, 1, 10}
    snap.clear_bitmap_range("b", 20 * C, C)
    image.release_snapshot("s")
    assert dirty(image, "b") == set(range(41)) - {20}
    image.close()


def test_fail_write_when_full(disk: Path) -> None:
    with Image.open(disk) as image:
        image.write(b"a" * SIZE, 0)
        snap = image.create_snapshot("s", cluster_size=C, max_bytes=C, on_full="fail-write")
        image.write(b"b", 0)
        with pytest.raises(SnapshotFullError, match=r"is full.*refused") as info:
            image.write(b"c" * 2 * C, 5 * C)
        assert info.value.errno == 28  # ENOSPC: a server answers NBD_ENOSPC
        assert image.read(5 * C, 2 * C) == b"a" * 2 * C  # nothing written
        assert snap.read(0, SIZE) == b"a" * SIZE and not snap.broken
        image.write(b"d", 1)  # the preserved cluster takes more writes
        assert snap.read(0, 2) == b"aa"


def test_holes_cost_nothing(tmp_path: Path) -> None:
    size = 1 << 30
    with Image.create(tmp_path / "big.raw", size) as image:
        image.add_bitmap("b")
        image.write(b"x" * 65536, 0)
        snap = image.create_snapshot("s", bitmaps=["b"], max_bytes=65536)
        image.trim(0, size)  # one cluster of data, the rest holes: fits in 64 KiB
        assert not snap.broken and snap.used_bytes == 65536
        assert snap.read(0, 65536) == b"x" * 65536
        assert list(snap.disk.allocation(0, size))[-1] == (65536, size - 65536, 3)


def test_machine_crash_discards_snapshots(disk: Path) -> None:
    with Image.open(disk) as image:
        image.write(b"x", 0)
        image.create_snapshot("s", bitmaps=["b"], cluster_size=C)
        image.write(b"y", 5 * C)
    marker = store_dir(disk) / IN_USE
    marker.write_text(json.dumps({"boot_id": "another-boot", "pid": 1}))
    with Image.open(disk, read_only=True) as image:
        assert not image.snapshots  # a reader trusts nothing either
    with Image.open(disk) as image:
        assert not image.snapshots and image.recovered
        assert dirty(image, "b") == set(range(41))
        assert list((store_dir(disk) / SNAPSHOTS).iterdir()) == []


def test_leftovers_and_corrupt_metadata(disk: Path) -> None:
    with Image.open(disk) as image:
        image.create_snapshot("good", bitmaps=["b"], cluster_size=C)
        image.create_snapshot("bad", bitmaps=["b"], cluster_size=C)
        image.write(b"x", 0)
    root = store_dir(disk) / SNAPSHOTS
    (root / ".creating-half").mkdir()
    (root / "bad" / "meta.json").write_text("{torn")
    with Image.open(disk) as image:
        assert sorted(image.snapshots) == ["good"]
        assert dirty(image, "b") == set(range(41))  # in doubt: everything
        assert sorted(p.name for p in root.iterdir()) == ["good"]


def test_release_survives_a_crash_before_the_rename(disk: Path) -> None:
    """Rule 3: if the process dies after the merge, before the snapshot's files go, the
    snapshot is still there and releasing it again merges again: nothing lost, nothing twice."""
    with Image.open(disk) as image:
        image.write(b"x", 3 * C)
        snap = image.create_snapshot("s", bitmaps=["b"], cluster_size=C)
        image.bitmaps["b"].merge_from(snap.bitmaps["b"])  # the merge half of a release
    with Image.open(disk) as image:
        assert dirty(image, "b") == {3} and dirty(image.snapshot("s"), "b") == {3}
        image.release_snapshot("s")
        assert dirty(image, "b") == {3}


def test_reader_racing_writer(disk: Path) -> None:
    """Reads of the snapshot while a thread writes the live disk always see the frozen data."""
    rng = random.Random(7)
    with Image.open(disk) as image:
        frozen = bytes(rng.randrange(256) for _ in range(SIZE))
        image.write(frozen, 0)
        snap = image.create_snapshot("s", bitmaps=["b"], cluster_size=C)
        stop = threading.Event()

        def writer() -> None:
            r = random.Random(8)
            while not stop.is_set():
                length = r.randrange(1, 3 * C)
                image.write(bytes([r.randrange(256)]) * length, r.randrange(SIZE - length))

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            for _ in range(300):
                length = rng.randrange(1, 8 * C)
                offset = rng.randrange(SIZE - length)
                assert snap.read(offset, length) == frozen[offset : offset + length]
        finally:
            stop.set()
            thread.join()
        assert snap.read(0, SIZE) == frozen


def test_snapshot_create_is_cheap_for_a_huge_disk(tmp_path: Path) -> None:
    """A 64 GiB sparse disk: the map is a sparse file, the forks the size of the bitmaps."""
    size = 64 << 30
    with Image.create(tmp_path / "huge.raw", size) as image:
        image.add_bitmap("b")
        image.write(b"x", size - 1)
        snap = image.create_snapshot("s", bitmaps=["b"])
        disk_usage = sum(
            p.stat().st_blocks * 512 for p in (store_dir(image.path or "") / SNAPSHOTS).rglob("*")
        )
        assert disk_usage < 1 << 20  # the 4 MiB map is a hole
        assert dirty(snap, "b") == {size // 65536 - 1}
        assert next(iter(snap.disk.allocation(0, size))) == (0, size - 4096, 3)


def test_same_name_again_beside_remains(disk: Path) -> None:
    """Remains of an earlier release (a removal that failed half way) never stop a new
    snapshot of the same name from being released."""
    with Image.open(disk) as image:
        root = store_dir(disk) / SNAPSHOTS
        for _ in range(3):
            image.create_snapshot("s", bitmaps=["b"], cluster_size=C)
            remains = root / ".released-s"
            remains.mkdir(exist_ok=True)
            (remains / "map").write_bytes(b"x")
            image.write(b"y", 0)
            image.release_snapshot("s")
        assert dirty(image, "b") == {0}
    with Image.open(disk) as image:  # a writable open deletes the remains
        assert not image.snapshots
        assert list(root.iterdir()) == []


def _clear_granules_downwards(snap: Snapshot, granules: int, go: threading.Event) -> None:
    go.set()
    for k in reversed(range(granules)):  # against the merge, which goes upwards
        try:
            snap.clear_bitmap_range("b", k * C, C)
        except SnapshotUnavailableError:
            return  # released


def test_release_reports_exactly_what_merged_while_clears_race_it(tmp_path: Path) -> None:
    """ReleaseSnapshot's ``merged`` counts came from the forks before the merge, so a clear of
    a fork that landed in between was counted and not merged: the report said more than the
    live bitmap got. Now the count is of the very bits merged, whatever races."""
    size = 1 << 30  # 262,144 granules: a merge long enough for clears to land inside it
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads take turns often: the race shows
    try:
        with Image.create(tmp_path / "big.raw", size) as image:
            image.add_bitmap("b", granularity=C)
            for attempt in range(5):
                image.bitmaps["b"].mark_all()
                snap = image.create_snapshot(f"s{attempt}", bitmaps=["b"], cluster_size=C)
                assert image.bitmaps["b"].dirty_bytes() == 0  # the fork took the bits
                go = threading.Event()
                t = threading.Thread(target=_clear_granules_downwards, args=(snap, size // C, go))
                t.start()
                go.wait()
                merged = image.release_snapshot(f"s{attempt}")
                t.join()
                # Nothing wrote since the instant: the live bitmap holds exactly what merged.
                assert merged == {"b": image.bitmaps["b"].dirty_bytes()}
                image.clear_bitmap("b")
    finally:
        sys.setswitchinterval(interval)


def test_release_returns_what_merged(disk: Path) -> None:
    with Image.open(disk) as image:
        image.write(b"y" * C, 0)
        image.write(b"y", SIZE - 1)  # the last, partial granule counts its real size
        snap = image.create_snapshot("s", bitmaps=["b"], cluster_size=C)
        snap.clear_bitmap_range("b", 0, C)
        assert image.release_snapshot("s") == {"b": SIZE % C}
