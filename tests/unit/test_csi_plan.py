"""The CSI stream rules of gateway.api.csi.plan over random range sets: strictly increasing and
disjoint ranges across the stream, none ending at or before starting_offset, max_results per
message, resuming from the end of any range repeats nothing and loses nothing, and FIXED_LENGTH
blocks cover exactly the blocks the ranges touch."""

from __future__ import annotations

import itertools
import random

import pytest

from gateway.api.csi import blocks, merged, plan

Range = tuple[int, int]


def random_ranges(rng: random.Random, n: int, size: int) -> list[Range]:
    cuts = sorted(rng.sample(range(1, size), 2 * n))
    raw = [(cuts[i], cuts[i + 1] - cuts[i]) for i in range(0, 2 * n, 2)]
    return list(merged(raw))


def check_rules(messages: list[list[Range]], start: int, max_results: int) -> list[Range]:
    flat = [r for m in messages for r in m]
    for m in messages:
        assert m, "no empty message"
        if max_results:
            assert len(m) <= max_results
    for off, length in flat:
        assert length > 0 and off >= 0
    for a, b in itertools.pairwise(flat):
        assert a[0] + a[1] <= b[0], "strictly increasing, never overlapping"
    if flat:
        assert flat[0][0] + flat[0][1] > start, "no range ends at or before starting_offset"
    return flat


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("max_results", [1, 7, 0])
def test_plan_rules_and_resume(seed: int, max_results: int) -> None:
    rng = random.Random(seed)
    size = 1 << 30
    ranges = random_ranges(rng, rng.randint(0, 60), size)
    full = check_rules(list(plan(ranges, 0, max_results, None)), 0, max_results)
    assert full == ranges
    # Resume from every range's end (every message boundary among them): exactly the rest.
    for i, (off, length) in enumerate(full):
        rest = check_rules(list(plan(ranges, off + length, max_results, None)), off + length, 0)
        assert rest == full[i + 1 :]
    # From inside a range: that range comes again (it may start before starting_offset).
    for i, (off, length) in enumerate(full):
        inside = off + rng.randrange(length)
        again = check_rules(list(plan(ranges, inside, max_results, None)), inside, 0)
        assert again == full[i:]


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("block", [512, 65536, 1 << 20])
def test_fixed_length_blocks(seed: int, block: int) -> None:
    rng = random.Random(seed)
    ranges = random_ranges(rng, rng.randint(1, 40), 256 * block)
    out = check_rules(list(plan(ranges, 0, 7, block)), 0, 7)
    assert all(length == block and off % block == 0 for off, length in out)
    want = sorted(
        {b for off, length in ranges for b in range(off // block, (off + length - 1) // block + 1)}
    )
    assert [off // block for off, _ in out] == want
    # Resume at a block's end gives the blocks after it.
    for i in sorted(rng.sample(range(len(out)), min(len(out), 30))):
        off, length = out[i]
        assert [r for m in plan(ranges, off + length, 3, block) for r in m] == out[i + 1 :]


def test_edges() -> None:
    assert list(plan([], 0, 0, None)) == []
    assert list(plan([(0, 10)], 10, 0, None)) == []  # ends at starting_offset: not sent
    assert list(plan([(0, 10)], 9, 0, None)) == [[(0, 10)]]
    assert list(merged([(0, 5), (5, 5), (20, 1), (20, 3)])) == [(0, 10), (20, 3)]
    assert list(blocks([(1, 1), (2, 1), (4096, 1)], 4096)) == [(0, 4096), (4096, 4096)]
