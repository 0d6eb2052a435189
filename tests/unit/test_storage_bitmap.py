"""DirtyBitmap against a model: a Python set of dirty granule indexes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nbdcore.constants import NBD_STATE_DIRTY
from nbdcore.storage import BitmapError, DirtyBitmap, RangeError
from nbdcore.storage.bitmap import validate_name


def model_extents(
    dirty: set[int], granularity: int, offset: int, length: int
) -> list[tuple[int, int, int]]:
    """The extents a bitmap with granules `dirty` must report, computed the slow obvious way."""
    out: list[list[int]] = []
    pos, end = offset, offset + length
    while pos < end:
        g = pos // granularity
        stop = min((g + 1) * granularity, end)
        flag = NBD_STATE_DIRTY if g in dirty else 0
        if out and out[-1][2] == flag:
            out[-1][1] += stop - pos
        else:
            out.append([pos, stop - pos, flag])
        pos = stop
    return [(a, b, c) for a, b, c in out]


def model_clear(dirty: set[int], granularity: int, size: int, offset: int, length: int) -> list:
    granules = -(-size // granularity)
    first = -(-offset // granularity)
    end = granules if offset + length == size else (offset + length) // granularity
    dirty.difference_update(range(first, end))
    if first >= end:
        return []
    return [(first * granularity, min(end * granularity, size) - first * granularity)]


class BitmapMachine(RuleBasedStateMachine):
    """Random mark/clear/extents/runs calls, unaligned ranges, sizes not granule multiples."""

    @initialize(
        shift=st.integers(9, 13),
        granules=st.integers(0, 300),
        tail=st.integers(0, 8191),
    )
    def setup(self, shift: int, granules: int, tail: int) -> None:
        self.g = 1 << shift
        self.size = granules * self.g + tail % self.g
        self.bitmap = DirtyBitmap("m", self.size, self.g)
        self.dirty: set[int] = set()

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        offset = data.draw(st.integers(0, self.size))
        length = data.draw(st.integers(0, self.size - offset))
        return offset, length

    @rule(data=st.data())
    def mark(self, data: st.DataObject) -> None:
        offset, length = self._range(data)
        self.bitmap.mark_dirty(offset, length)
        if length:
            self.dirty.update(range(offset // self.g, (offset + length - 1) // self.g + 1))

    @rule(data=st.data())
    def clear(self, data: st.DataObject) -> None:
        offset, length = self._range(data)
        got = self.bitmap.clear_range(offset, length)
        assert got == model_clear(self.dirty, self.g, self.size, offset, length)
        # Idempotent: the same answer again, nothing else changes.
        assert self.bitmap.clear_range(offset, length) == got

    @precondition(lambda self: self.size > 0)
    @rule(data=st.data())
    def extents(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(0, self.size - 1))
        length = data.draw(st.integers(1, self.size - offset))
        expected = model_extents(self.dirty, self.g, offset, length)
        assert list(self.bitmap.extents(offset, length)) == expected
        limit = data.draw(st.integers(1, 5))
        lengths, flags = self.bitmap.runs(offset, length, limit=limit)
        assert list(zip(lengths, flags, strict=True)) == [(n, f) for _, n, f in expected][:limit]

    @rule(data=st.data())
    def mark_long_runs(self, data: st.DataObject) -> None:
        # Runs crossing the bitmap's internal byte and window boundaries.
        first = data.draw(st.integers(0, max(0, self.size - 1)))
        self.mark_range(first, self.size - first)

    def mark_range(self, offset: int, length: int) -> None:
        self.bitmap.mark_dirty(offset, length)
        if length:
            self.dirty.update(range(offset // self.g, (offset + length - 1) // self.g + 1))

    @invariant()
    def dirty_bytes(self) -> None:
        expected = sum(min((g + 1) * self.g, self.size) - g * self.g for g in self.dirty)
        assert self.bitmap.dirty_bytes() == expected


TestBitmapMachine = BitmapMachine.TestCase
TestBitmapMachine.settings = settings(max_examples=100, stateful_step_count=25, deadline=None)


@settings(max_examples=60, deadline=None)
@given(
    granules=st.lists(st.booleans(), min_size=1, max_size=4000),
    shift=st.integers(9, 16),
)
def test_runs_over_windows_match_model(granules: list[bool], shift: int) -> None:
    g = 1 << shift
    bitmap = DirtyBitmap("w", len(granules) * g, g)
    for i, dirty in enumerate(granules):
        if dirty:
            bitmap.mark_dirty(i * g, 1)
    dirty_set = {i for i, d in enumerate(granules) if d}
    assert list(bitmap.extents(0, bitmap.size)) == model_extents(dirty_set, g, 0, bitmap.size)


def test_runs_cross_window_boundaries() -> None:
    # 3 windows of bits: runs straddle the window edges at 512K granules.
    g = 512
    n = 3 * 512 * 1024 + 77
    bitmap = DirtyBitmap("big", n * g, g)
    marks = [(0, 5), (524_280, 20), (1_048_570, 10), (1_100_000, 400_000), (n - 3, 3)]
    dirty: set[int] = set()
    for first, count in marks:
        bitmap.mark_dirty(first * g, count * g)
        dirty.update(range(first, first + count))
    expected = model_extents_sparse(dirty, g, n)
    assert list(bitmap.extents(0, bitmap.size)) == expected
    lengths, flags = bitmap.runs(0, bitmap.size)
    assert sum(lengths) == bitmap.size
    assert list(flags) == [f for _, _, f in expected]


def model_extents_sparse(dirty: set[int], g: int, n: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    start = 0
    state = 0 in dirty
    for i in sorted(dirty | {j + 1 for j in dirty} | {n}):
        if i >= n or (i in dirty) != state:
            if i > start:
                out.append((start * g, (i - start) * g, NBD_STATE_DIRTY if state else 0))
            start, state = i, i in dirty
    return out


def test_alternating_million_granules() -> None:
    g = 65536
    n = 1 << 20
    bitmap = DirtyBitmap("alt", n * g - 1000, g)
    # Every even granule dirty (0x55 = bits 0, 2, 4, 6), set in bulk rather than by half a
    # million mark_dirty calls.
    bits = bitmap._bits
    bits[:] = b"\x55" * len(bits)
    lengths, flags = bitmap.runs(0, bitmap.size)
    assert len(lengths) == n
    assert set(lengths[:-1]) == {g}
    assert lengths[-1] == g - 1000
    assert flags[:4].tolist() == [1, 0, 1, 0]
    assert bitmap.dirty_bytes() == (n // 2) * g
    lengths, flags = bitmap.runs(g // 2, 3 * g, limit=2)
    assert lengths.tolist() == [g // 2, g]
    assert flags.tolist() == [1, 0]


def test_clear_only_whole_granules() -> None:
    g = 4096
    bitmap = DirtyBitmap("c", 10 * g + 100, g)
    bitmap.mark_dirty(0, bitmap.size)
    assert bitmap.clear_range(1, g) == []  # touches two granules, holds neither
    assert bitmap.clear_range(g - 1, 2 * g + 2) == [(g, 2 * g)]
    assert bitmap.clear_range(10 * g + 50, 50) == []  # part of the last granule
    assert bitmap.clear_range(9 * g, g + 100) == [(9 * g, g + 100)]  # to the end: whole
    assert list(bitmap.extents(0, bitmap.size)) == [
        (0, g, 1),
        (g, 2 * g, 0),
        (3 * g, 6 * g, 1),
        (9 * g, g + 100, 0),
    ]


def test_disabled_bitmap_ignores_writes() -> None:
    bitmap = DirtyBitmap("d", 1 << 20, enabled=False)
    bitmap.mark_dirty(0, 1 << 20)
    assert bitmap.dirty_bytes() == 0
    bitmap.enabled = True
    bitmap.mark_dirty(70000, 1)
    assert list(bitmap.extents(0, 1 << 20)) == [
        (0, 65536, 0),
        (65536, 65536, 1),
        (131072, 917504, 0),
    ]


def test_merge_different_granularities() -> None:
    fine = DirtyBitmap("fine", 1 << 20, 512)
    coarse = DirtyBitmap("coarse", 1 << 20, 65536, enabled=False)
    fine.mark_dirty(70000, 1000)
    coarse.merge_from(fine)  # merge marks even a disabled target, like qemu
    assert list(coarse.extents(0, 1 << 20)) == [
        (0, 65536, 0),
        (65536, 65536, 1),
        (131072, 917504, 0),
    ]
    with pytest.raises(BitmapError):
        coarse.merge_from(DirtyBitmap("other", 4096, 512))


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, (1 << 20) + 1), (1 << 20, 1), (5, -1)])
def test_bad_ranges(offset: int, length: int) -> None:
    bitmap = DirtyBitmap("r", 1 << 20)
    for call in (bitmap.mark_dirty, bitmap.clear_range, bitmap.runs):
        with pytest.raises(RangeError) as info:
            call(offset, length)
        assert info.value.errno == 22
    with pytest.raises(RangeError):
        list(bitmap.extents(offset, length))


@pytest.mark.parametrize("name", ["", "a\0b", "x" * 1024, "\udcff"])
def test_bad_names(name: str) -> None:
    with pytest.raises(BitmapError):
        validate_name(name)


@pytest.mark.parametrize("name", ["b", "x" * 1023, "spaces and / slashes", "émoji🙂", "..", "."])
def test_good_names(name: str) -> None:
    validate_name(name)
    assert DirtyBitmap(name, 4096).name == name


@pytest.mark.parametrize("granularity", [0, 256, 1000, 65535, 1 << 32])
def test_bad_granularity(granularity: int) -> None:
    with pytest.raises(BitmapError):
        DirtyBitmap("g", 4096, granularity)


def test_empty_bitmap() -> None:
    bitmap = DirtyBitmap("e", 0)
    assert bitmap.dirty_bytes() == 0
    assert list(bitmap.extents(0, 0)) == []
    assert bitmap.clear_range(0, 0) == []
    bitmap.mark_dirty(0, 0)
    assert bitmap.runs(0, 0)[0].tolist() == []
