"""Image: write ordering, persistence round trips, recovery after unclean shutdowns, locking."""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nbdcore.storage import (
    BitmapError,
    BitmapExistsError,
    Image,
    NoSuchBitmapError,
    RangeError,
)
from nbdcore.storage.store import IN_USE, BitmapStore, _lock_held, bitmap_key, boot_id, store_dir

G = 65536
SIZE = 64 * G + 1000  # not a granule multiple


def dirty_runs(image: Image, name: str) -> list[tuple[int, int]]:
    bitmap = image.bitmaps[name]
    return [(o, n) for o, n, f in bitmap.extents(0, bitmap.size) if f]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    Image.create(path, SIZE).close()
    return path


def test_memory_image_dirties_enabled_bitmaps() -> None:
    image = Image.memory(SIZE)
    image.add_bitmap("on")
    image.add_bitmap("off", enabled=False)
    image.add_bitmap("fine", granularity=512)
    image.write(b"abc", G - 1)
    image.write_zeroes(10 * G, 1, may_trim=False)
    image.trim(SIZE - 1, 1)
    assert image.read(G - 1, 3) == b"abc"
    assert dirty_runs(image, "on") == [(0, 2 * G), (10 * G, G), (64 * G, 1000)]
    assert dirty_runs(image, "fine") == [(G - 512, 1024), (10 * G, 512), (SIZE - 488, 488)]
    assert dirty_runs(image, "off") == []
    assert image.path is None and image.size == SIZE and not image.read_only


def test_round_trip(disk: Path) -> None:
    names = ["backup", "spaces / and slashes", "émoji🙂", "x" * 1023]
    with Image.open(disk) as image:
        for i, name in enumerate(names):
            image.add_bitmap(name, granularity=512 << i, enabled=i != 1)
        image.write(b"\xff" * 5000, 3 * G + 7, fua=True)
        image.write(b"\x01", SIZE - 1)
        before = {name: list(image.bitmaps[name].extents(0, SIZE)) for name in names}
        assert image.clear_bitmap_range("backup", 0, 3 * G + 1024) == [(0, 3 * G + 1024)]
        before["backup"] = list(image.bitmaps["backup"].extents(0, SIZE))
        image.disable_bitmap("backup")
        image.enable_bitmap(names[1])
    with Image.open(disk) as image:
        assert sorted(image.bitmaps) == sorted(names)
        for i, name in enumerate(names):
            bitmap = image.bitmaps[name]
            assert bitmap.granularity == 512 << i
            assert list(bitmap.extents(0, SIZE)) == before[name]
        assert not image.bitmaps["backup"].enabled
        assert image.bitmaps[names[1]].enabled
        assert image.read(3 * G + 7, 5000) == b"\xff" * 5000
        assert not image.recovered
    assert not (store_dir(disk) / IN_USE).exists()


def test_merge_and_clear_persist(disk: Path) -> None:
    with Image.open(disk) as image:
        image.add_bitmap("a", granularity=512)
        image.add_bitmap("b", enabled=False)
        image.write(b"x", 5 * G + 100)
        image.merge_bitmap("a", "b")
        image.clear_bitmap("a")
    with Image.open(disk) as image:
        assert dirty_runs(image, "a") == []
        assert dirty_runs(image, "b") == [(5 * G, G)]


def test_remove_then_add_is_clean(disk: Path) -> None:
    with Image.open(disk) as image:
        image.add_bitmap("b")
        image.write(b"x", 0)
        image.remove_bitmap("b")
        with pytest.raises(NoSuchBitmapError):
            image.remove_bitmap("b")
        image.add_bitmap("b")
        assert dirty_runs(image, "b") == []
    with Image.open(disk) as image:
        assert dirty_runs(image, "b") == []
    assert sorted(p.suffix for p in store_dir(disk).iterdir() if p.name != "lock") == [
        ".bits",
        ".hist",
        ".json",
    ]


def test_errors(disk: Path) -> None:
    with Image.open(disk) as image:
        image.add_bitmap("b")
        with pytest.raises(BitmapExistsError):
            image.add_bitmap("b")
        with pytest.raises(BitmapError):
            image.add_bitmap("")
        with pytest.raises(BitmapError):
            image.add_bitmap("g", granularity=3000)
        with pytest.raises(NoSuchBitmapError):
            image.clear_bitmap_range("nope", 0, G)
        with pytest.raises(RangeError):
            image.write(b"xx", SIZE - 1)
        with pytest.raises(RangeError):
            image.clear_bitmap_range("b", SIZE, 1)
        assert dirty_runs(image, "b") == []  # a refused write dirties nothing
    with pytest.raises(FileExistsError):
        Image.create(disk, G)
    assert disk.stat().st_size == SIZE


def test_a_readers_probe_never_makes_a_writer_fail(disk: Path) -> None:
    """A read-only open tests whether a writer holds the lock by taking a shared lock for an
    instant; a writer opening in that instant must not take it for another writer."""
    Image.open(disk).close()  # the store and its lock file exist
    lock = store_dir(disk) / "lock"
    stop = threading.Event()
    probes = 0

    def probe() -> None:
        nonlocal probes
        while not stop.is_set():
            _lock_held(lock)
            probes += 1

    t = threading.Thread(target=probe)
    t.start()
    try:
        for _ in range(200):
            Image.open(disk).close()
    finally:
        stop.set()
        t.join()
    assert probes > 200


def test_read_only_and_lock(disk: Path) -> None:
    with Image.open(disk) as writer:
        writer.add_bitmap("b")
        writer.write(b"w", 0)
        with pytest.raises(OSError) as info:
            Image.open(disk)
        assert info.value.errno == errno.EBUSY
        # Readers take no lock and see what the writer wrote so far (shared mapping).
        with Image.open(disk, read_only=True) as reader:
            assert dirty_runs(reader, "b") == [(0, G)]
            for call in (
                lambda: reader.write(b"x", 0),
                lambda: reader.clear_bitmap_range("b", 0, G),
                lambda: reader.add_bitmap("c"),
                lambda: reader.remove_bitmap("b"),
                lambda: reader.disable_bitmap("b"),
            ):
                with pytest.raises(OSError) as info:
                    call()
                assert info.value.errno == errno.EPERM
    with Image.open(disk, read_only=True) as reader:
        assert reader.read(0, 1) == b"w"


def test_read_only_without_bitmap_dir(tmp_path: Path) -> None:
    path = tmp_path / "plain.raw"
    path.write_bytes(bytes(4096))
    with Image.open(path, read_only=True) as image:
        assert dict(image.bitmaps) == {}
    assert not store_dir(path).exists()


def _fake_in_use(disk: Path, boot: str) -> None:
    (store_dir(disk) / IN_USE).write_text(json.dumps({"boot_id": boot, "pid": 1}))


def test_crash_of_the_process_keeps_bits(disk: Path) -> None:
    with Image.open(disk) as image:
        image.add_bitmap("b")
        image.write(b"x", 2 * G)
    _fake_in_use(disk, boot_id())  # a writer of this boot died
    with Image.open(disk) as image:
        assert not image.recovered
        assert dirty_runs(image, "b") == [(2 * G, G)]


@pytest.mark.parametrize("marker", ["other-boot", None])
def test_crash_of_the_machine_marks_everything_dirty(disk: Path, marker: str | None) -> None:
    with Image.open(disk) as image:
        image.add_bitmap("b")
        image.add_bitmap("off", enabled=False, granularity=512)
    if marker is None:
        (store_dir(disk) / IN_USE).write_text("{torn")
    else:
        _fake_in_use(disk, marker)
    # A reader reports all dirty without writing anything.
    with Image.open(disk, read_only=True) as reader:
        assert reader.recovered
        assert dirty_runs(reader, "b") == [(0, SIZE)]
    assert (store_dir(disk) / IN_USE).exists()
    with Image.open(disk) as image:
        assert image.recovered
        assert dirty_runs(image, "b") == [(0, SIZE)]
        assert dirty_runs(image, "off") == [(0, SIZE)]
        image.clear_bitmap_range("b", 0, SIZE)
    with Image.open(disk) as image:
        assert not image.recovered
        assert dirty_runs(image, "b") == []


def test_missing_or_short_bits_are_dirty(disk: Path) -> None:
    with Image.open(disk) as image:
        image.add_bitmap("gone")
        image.add_bitmap("short", granularity=512)
    bits = store_dir(disk) / f"{bitmap_key('gone')}.bits"
    bits.unlink()
    short = store_dir(disk) / f"{bitmap_key('short')}.bits"
    short.write_bytes(b"\0" * 3)
    with Image.open(disk) as image:
        assert dirty_runs(image, "gone") == [(0, SIZE)]
        assert dirty_runs(image, "short") == [(0, SIZE)]


def test_resized_disk_is_dirty(disk: Path) -> None:
    with Image.open(disk) as image:
        image.add_bitmap("b")
    with open(disk, "r+b") as f:
        f.truncate(SIZE + 3 * G)
    with Image.open(disk) as image:
        assert image.bitmaps["b"].size == SIZE + 3 * G
        assert dirty_runs(image, "b") == [(0, SIZE + 3 * G)]
    meta = json.loads((store_dir(disk) / f"{bitmap_key('b')}.json").read_text())
    assert meta["size"] == SIZE + 3 * G


def test_orphans_and_corrupt_metadata(disk: Path) -> None:
    with Image.open(disk) as image:
        image.add_bitmap("b")
    sdir = store_dir(disk)
    (sdir / "0123.bits").write_bytes(b"\xff")
    (sdir / "x.json.tmp").write_text("half")
    with Image.open(disk) as image:
        assert list(image.bitmaps) == ["b"]
    assert not (sdir / "0123.bits").exists() and not (sdir / "x.json.tmp").exists()
    (sdir / f"{bitmap_key('b')}.json").write_text('{"format": "nbdgw-bitmap", "version": 9}')
    with pytest.raises(BitmapError, match="corrupt bitmap metadata"):
        Image.open(disk)
    # The failed open released everything: the lock and the disk.
    (sdir / f"{bitmap_key('b')}.json").unlink()
    with Image.open(disk) as image:
        assert dict(image.bitmaps) == {}


def test_dirty_before_the_data_is_written() -> None:
    image = Image.memory(SIZE)
    image.add_bitmap("b")
    seen = []
    real = image.disk.pwrite

    def spy(data: bytes | memoryview, offset: int) -> None:
        seen.append(image.bitmaps["b"].is_dirty(offset))
        real(data, offset)

    image.disk.pwrite = spy  # type: ignore[method-assign]
    image.write(b"x", 7 * G)
    assert seen == [True]


@pytest.mark.parametrize("op", ["write", "write_zeroes", "trim"])
def test_clear_racing_a_write_is_undone(op: str) -> None:
    """A clear landing between the data write and the return re-dirties: the second mark."""
    image = Image.memory(SIZE)
    image.add_bitmap("b")
    disk = image.disk
    name = {"write": "pwrite", "write_zeroes": "write_zeroes", "trim": "trim"}[op]
    real = getattr(disk, name)

    def racing(*args: object, **kwargs: object) -> None:
        real(*args, **kwargs)
        assert image.clear_bitmap_range("b", 0, SIZE) == [(0, SIZE)]

    setattr(disk, name, racing)
    if op == "write":
        image.write(b"x" * 10, 3 * G)
    else:
        getattr(image, op)(3 * G, 10)
    assert dirty_runs(image, "b") == [(3 * G, G)]


def test_failed_write_leaves_bits_dirty(disk: Path) -> None:
    with Image.open(disk) as image:
        image.add_bitmap("b")

        def broken(data: bytes | memoryview, offset: int) -> None:
            raise OSError(errno.EIO, "injected")

        image.disk.pwrite = broken  # type: ignore[method-assign]
        with pytest.raises(OSError) as info:
            image.write(b"x", 9 * G)
        assert info.value.errno == errno.EIO
        # The data may be partly written: when in doubt, dirty.
        assert dirty_runs(image, "b") == [(9 * G, G)]


def test_closed_image_refuses_writes(disk: Path) -> None:
    image = Image.open(disk)
    image.close()
    image.close()
    with pytest.raises(OSError):
        image.write(b"x", 0)


class PersistentImageMachine(RuleBasedStateMachine):
    """Random writes, clears, enable/disable, clean reopens and process crashes (the store
    dropped without its clean close) against a model of dirty granules per bitmap."""

    GRANULARITIES: ClassVar[dict[str, int]] = {"a": 512, "b": 4096, "c": 65536}

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="nbdgw-storage-"))
        self.path = self.tmp / "disk.raw"
        self.size = 40 * 4096 + 333
        self.image = Image.create(self.path, self.size)
        self.model: dict[str, set[int]] = {}
        self.enabled: dict[str, bool] = {}
        for name, g in self.GRANULARITIES.items():
            self.image.add_bitmap(name, granularity=g, enabled=name != "c")
            self.model[name] = set()
            self.enabled[name] = name != "c"

    def teardown(self) -> None:
        self.image.close()
        shutil.rmtree(self.tmp)

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        offset = data.draw(st.integers(0, self.size - 1))
        return offset, data.draw(st.integers(1, min(self.size - offset, 30_000)))

    @rule(data=st.data(), op=st.sampled_from(["write", "zero", "trim"]))
    def write(self, data: st.DataObject, op: str) -> None:
        offset, length = self._range(data)
        if op == "write":
            self.image.write(b"\x5a" * length, offset, fua=data.draw(st.booleans()))
        elif op == "zero":
            self.image.write_zeroes(offset, length, may_trim=data.draw(st.booleans()))
        else:
            self.image.trim(offset, length)
        for name, g in self.GRANULARITIES.items():
            if self.enabled[name]:
                self.model[name].update(range(offset // g, (offset + length - 1) // g + 1))

    @rule(data=st.data(), name=st.sampled_from(sorted(GRANULARITIES)))
    def clear(self, data: st.DataObject, name: str) -> None:
        offset, length = self._range(data)
        g = self.GRANULARITIES[name]
        first = -(-offset // g)
        end = -(-self.size // g) if offset + length == self.size else (offset + length) // g
        self.image.clear_bitmap_range(name, offset, length)
        self.model[name].difference_update(range(first, end))

    @rule(name=st.sampled_from(sorted(GRANULARITIES)), enabled=st.booleans())
    def toggle(self, name: str, enabled: bool) -> None:
        self.image.set_bitmap_enabled(name, enabled)
        self.enabled[name] = enabled

    @rule(crash=st.booleans())
    def reopen(self, crash: bool) -> None:
        if crash:
            # What a kill -9 leaves: no msync, no fsync, in-use still there, lock released.
            store = self.image._store
            assert store is not None
            store.close(clean=False)
            self.image.disk.close()
        else:
            self.image.close()
        self.image = Image.open(self.path)
        assert not self.image.recovered

    @invariant()
    def bitmaps_match_model(self) -> None:
        for name, g in self.GRANULARITIES.items():
            bitmap = self.image.bitmaps[name]
            assert bitmap.enabled == self.enabled[name]
            got = {
                i
                for o, n, f in bitmap.extents(0, self.size)
                if f
                for i in range(o // g, (o + n - 1) // g + 1)
            }
            assert got == self.model[name], name


TestPersistentImage = PersistentImageMachine.TestCase
TestPersistentImage.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)


def test_interrupted_recovery_is_redone(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Image.open(disk) as image:
        image.add_bitmap("b")
    _fake_in_use(disk, "other-boot")

    def crash(self: BitmapStore) -> None:
        raise OSError(errno.EIO, "machine died during recovery")

    with monkeypatch.context() as m:
        m.setattr(BitmapStore, "sync", crash)
        with pytest.raises(OSError):
            Image.open(disk)
    # The marker still names the crashed boot: the next open recovers again.
    assert json.loads((store_dir(disk) / IN_USE).read_text())["boot_id"] == "other-boot"
    with Image.open(disk) as image:
        assert image.recovered
        assert dirty_runs(image, "b") == [(0, SIZE)]


def test_removed_bitmap_survives_a_racing_write(disk: Path) -> None:
    """A write that took its list of bitmaps before a remove still marks the removed one,
    without touching its closed mapping."""
    with Image.open(disk) as image:
        a = image.add_bitmap("a")
        b = image.add_bitmap("b")
        real = a.mark_dirty

        def remove_b_meanwhile(offset: int, length: int) -> None:
            real(offset, length)
            if "b" in image.bitmaps:
                image.remove_bitmap("b")

        a.mark_dirty = remove_b_meanwhile  # type: ignore[method-assign]
        image.write(b"y", 3 * G)
        assert list(image.bitmaps) == ["a"]
        assert [(o, n) for o, n, f in b.extents(0, SIZE) if f] == [(3 * G, G)]
        assert image.read(3 * G, 1) == b"y"
