"""IntervalSet in blocks with copy-on-write (review M12): against a byte model with tiny blocks
so that every block path (split, merge across blocks, join, append) runs, copies that never see
later adds, and the size a clear would leave (the per-scope cap)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import ledger
from gateway.ledger import IntervalSet


@pytest.fixture(autouse=True)
def tiny_blocks() -> Iterator[None]:
    old = ledger.INTERVAL_BLOCK
    ledger.INTERVAL_BLOCK = 2
    try:
        yield
    finally:
        ledger.INTERVAL_BLOCK = old


def check(iv: IntervalSet, model: set[int]) -> None:
    pairs = list(iv)
    assert {b for s, e in pairs for b in range(s, e)} == model
    assert all(s < e for s, e in pairs)
    assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(pairs))  # merged
    assert len(iv) == len(pairs)
    for lo, hi in ((0, 400), (37, 91), (150, 151), (399, 500)):
        want = sorted(b for b in model if lo <= b < hi)
        got = [b for s, e in iv.window(lo, hi) for b in range(s, e)]
        assert got == want
        assert iv.covered(lo, hi) == len(want)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 380), st.integers(1, 30)),
        st.tuples(st.just("copy"), st.just(0), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_blocks_match_a_byte_model_and_copies_stay_frozen(
    steps: list[tuple[str, int, int]],
) -> None:
    iv = IntervalSet()
    model: set[int] = set()
    frozen: list[tuple[IntervalSet, list[tuple[int, int]]]] = []
    for kind, start, n in steps:
        if kind == "copy":
            # The ledger publishes the old set and changes the copy (or the other way round):
            # keep changing either, the other must not move.
            snap = iv.copy()
            frozen.append((iv, list(iv)))
            iv = snap
            continue
        expected = len(iv) - len(iv.window(start - 1, start + n + 1)) + 1
        assert iv.length_after_add(start, start + n) == expected
        iv.add(start, start + n)
        model.update(range(start, start + n))
        check(iv, model)
        assert len(iv) == expected
    for old, content in frozen:
        assert list(old) == content


def test_length_after_add_changes_nothing() -> None:
    iv = IntervalSet([(0, 10), (20, 30), (40, 50)])
    assert iv.length_after_add(5, 45) == 1
    assert iv.length_after_add(60, 70) == 4
    assert iv.length_after_add(10, 20) == 2  # adjacent on both sides: one interval
    assert iv.length_after_add(7, 7) == 3
    assert list(iv) == [(0, 10), (20, 30), (40, 50)]


def test_many_disjoint_intervals_in_blocks() -> None:
    """Reverse-order disjoint adds (each at the front, the worst case for one flat list)
    split into blocks that stay bounded; then one add swallows them all."""
    iv = IntervalSet()
    for i in reversed(range(1000)):
        iv.add(10 * i, 10 * i + 5)
    assert len(iv) == 1000
    assert max(len(b) for b in iv._starts) <= 2 * ledger.INTERVAL_BLOCK
    assert list(iv)[:2] == [(0, 5), (10, 15)]
    iv.add(3, 9995)
    assert list(iv) == [(0, 9995)]
    assert len(iv._starts) == 1
