"""The extent rules (nbdcore.extents) against a plain model, with hypothesis.

A fake block-status source answers the way the spec allows a server to: short answers, an
overshooting last extent, adjacent extents with equal flags, contexts cut at different places.
It is not a stand-in for a real peer (tests/interop does that); it is the adversary that the
pure rules must survive.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from array import array
from collections.abc import AsyncGenerator, Sequence
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdcore.constants import CONTEXT_BASE_ALLOCATION
from nbdcore.exceptions import ServerProtocolError, UsageError
from nbdcore.extents import (
    Allocation,
    ExtentWalker,
    allocation_of,
    classify,
    clip_table,
    fit_answer,
    iter_allocation,
    iter_extents,
    merge_contexts,
    merge_runs,
    to_u64,
)
from nbdcore.wire import BlockSize

Extents = list[tuple[int, int]]  # (length, flags)

# --- the model -------------------------------------------------------------------------------


def flags_at(extents: Extents, pos: int) -> int:
    start = 0
    for length, flags in extents:
        if start <= pos < start + length:
            return flags
        start += length
    raise AssertionError(pos)


def boundaries(extents: Extents) -> list[int]:
    out, pos = [], 0
    for length, _ in extents:
        pos += length
        out.append(pos)
    return out


def model_rows(
    contexts: Sequence[Extents], offset: int, end: int
) -> list[tuple[int, int, tuple[int, ...]]]:
    """(offset, length, flags) rows over [offset, end): all boundaries, equal neighbours merged."""
    if offset == end:
        return []
    cuts = sorted({b for ext in contexts for b in boundaries(ext) if offset < b < end} | {end})
    rows: list[tuple[int, int, tuple[int, ...]]] = []
    pos = offset
    for cut in cuts:
        flags = tuple(flags_at(ext, pos) for ext in contexts)
        if rows and rows[-1][2] == flags:
            o, n, f = rows[-1]
            rows[-1] = (o, n + cut - pos, f)
        else:
            rows.append((pos, cut - pos, flags))
        pos = cut
    return rows


def rows_of(batches: Sequence[Any]) -> list[tuple[int, int, tuple[int, ...]]]:
    out = []
    for b in batches:
        out += b.rows()
    return out


# --- strategies ------------------------------------------------------------------------------


@st.composite
def extent_lists(draw: st.DrawFn, size: int, max_flags: int = 3) -> Extents:
    """Extents covering exactly ``size`` bytes, neighbours possibly equal."""
    cuts = draw(st.lists(st.integers(1, size - 1), max_size=40, unique=True)) if size > 1 else []
    edges = [0, *sorted(cuts), size]
    return [(b - a, draw(st.integers(0, max_flags))) for a, b in itertools.pairwise(edges)]


@st.composite
def exports(draw: st.DrawFn) -> tuple[int, list[Extents], int, int]:
    size = draw(st.integers(1, 1 << 20))
    k = draw(st.integers(1, 3))
    contexts = [draw(extent_lists(size)) for _ in range(k)]
    offset = draw(st.integers(0, size - 1))
    length = draw(st.integers(0, size - offset))
    return size, contexts, offset, length


class FakeServer:
    """Answers block status the loose ways the spec allows (see module docstring)."""

    def __init__(
        self,
        size: int,
        contexts: dict[str, Extents],
        rnd: random.Random,
        *,
        extended: bool = False,
        cap: int = 5,
        block: int = 1,
    ) -> None:
        self.size = size
        self.contexts = contexts
        self.rnd = rnd
        self.extended_headers = extended
        self.block_size = BlockSize(block, 4096, 1 << 25) if block > 1 else None
        self.meta_contexts = {name: i for i, name in enumerate(contexts)}
        self.cap = cap
        self.requests: list[tuple[int, int]] = []

    def answer(self, name: str, offset: int, length: int) -> tuple[array[int], array[int]]:
        assert length > 0 and offset + length <= self.size
        lengths, flags = [], []
        pos = 0
        limit = self.rnd.randint(1, self.cap)
        for ext_len, ext_flags in self.contexts[name]:
            start, end = pos, pos + ext_len
            pos = end
            if end <= offset:
                continue
            start = max(start, offset)
            # Sometimes split an extent in two equal-flag pieces.
            block = self.block_size.minimum if self.block_size else 1
            if end - start > block and self.rnd.random() < 0.2:
                mid = start + block * self.rnd.randint(1, (end - start - 1) // block)
                pieces = [(start, mid), (mid, end)]
            else:
                pieces = [(start, end)]
            for a, b in pieces:
                if a >= offset + length:
                    break
                if b > offset + length and self.rnd.random() < 0.5:
                    b = offset + length  # clip instead of overshooting
                lengths.append(b - a)
                flags.append(ext_flags)
                if b >= offset + length or len(lengths) >= limit:
                    break
            if lengths and (sum(lengths) >= length or len(lengths) >= limit):
                break
        code = "Q" if self.extended_headers else "I"
        return array(code, lengths), array(code, flags)

    async def block_status(
        self,
        offset: int,
        length: int,
        *,
        contexts: Sequence[str] | None = None,
        req_one: bool = False,
    ) -> dict[str, tuple[array[int], array[int]]]:
        self.requests.append((offset, length))
        if self.block_size is not None:
            # The spec's MUST once block sizes were negotiated (the tail may be unaligned).
            block = self.block_size.minimum
            assert offset % block == 0
            assert (offset + length) % block == 0 or offset + length == self.size
        await asyncio.sleep(0)
        names = contexts if contexts is not None else list(self.contexts)
        return {name: self.answer(name, offset, length) for name in names}


async def collect(it: Any) -> list[Any]:
    return [b async for b in it]


# --- pure functions --------------------------------------------------------------------------


@given(st.lists(st.integers(0, (1 << 32) - 1), max_size=50))
def test_to_u64(values: list[int]) -> None:
    wide = to_u64(array("I", values))
    assert wide.typecode == "Q" and wide.tolist() == values


@given(st.data())
def test_fit_answer(data: st.DataObject) -> None:
    lengths = data.draw(st.lists(st.integers(1, 1000), min_size=1, max_size=20))
    flags = data.draw(st.lists(st.integers(0, 3), min_size=len(lengths), max_size=len(lengths)))
    before_last = sum(lengths) - lengths[-1]
    request = data.draw(st.integers(1, sum(lengths) + 100))
    if before_last >= request:
        with pytest.raises(ServerProtocolError):
            fit_answer(array("I", lengths), array("I", flags), request)
        return
    got_l, got_f, covered = fit_answer(array("I", lengths), array("I", flags), request)
    assert covered == min(sum(lengths), request) == sum(got_l)
    assert got_l.tolist()[:-1] == lengths[:-1] and got_f.tolist() == flags
    assert got_l.typecode == got_f.typecode == "Q"


@pytest.mark.parametrize(
    ("lengths", "flags"), [([], []), ([1, 0, 2], [0, 0, 0]), ([1, 2], [0])], ids=str
)
def test_fit_answer_rejects(lengths: list[int], flags: list[int]) -> None:
    with pytest.raises(ServerProtocolError):
        fit_answer(array("I", lengths), array("I", flags), 10)


@given(st.data())
def test_clip_table(data: st.DataObject) -> None:
    ext = data.draw(extent_lists(data.draw(st.integers(1, 5000))))
    total = sum(n for n, _ in ext)
    cut = data.draw(st.integers(1, total))
    lengths, (flags,) = clip_table(
        array("Q", [n for n, _ in ext]), (array("Q", [f for _, f in ext]),), cut
    )
    assert sum(lengths) == cut and 0 not in lengths
    rows = list(zip(lengths, flags, strict=True))
    assert model_rows([rows], 0, cut) == model_rows([ext], 0, cut)


@given(st.data())
def test_merge_runs(data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 5000))
    k = data.draw(st.integers(1, 3))
    # One table with k columns: cut every context at the same boundaries.
    base = data.draw(extent_lists(size, max_flags=1))
    cols = [
        [data.draw(st.integers(0, 1)) for _ in base] if i else [f for _, f in base]
        for i in range(k)
    ]
    lengths, columns = merge_runs(
        array("Q", [n for n, _ in base]), tuple(array("Q", c) for c in cols)
    )
    rows = list(zip(lengths, zip(*columns, strict=True), strict=True))
    assert sum(lengths) == size
    assert all(a[1] != b[1] for a, b in itertools.pairwise(rows))
    per_context = [list(zip([n for n, _ in base], c, strict=True)) for c in cols]
    assert [(o, n, f) for o, n, f in model_rows(per_context, 0, size)] == [
        (o, n, f)
        for (o, (n, f)) in zip([sum(lengths[:i]) for i in range(len(lengths))], rows, strict=True)
    ]


def test_merge_runs_alternating_fast_path() -> None:
    lengths = array("Q", [5, 6, 7, 8])
    flags = array("Q", [1, 0, 1, 0])
    assert merge_runs(lengths, (flags,)) == (lengths, (flags,))
    flags2 = array("Q", [1, 0, 0, 1])
    got_lengths, (got_flags,) = merge_runs(lengths, (flags2,))
    assert got_lengths.tolist() == [5, 13, 8] and got_flags.tolist() == [1, 0, 1]


@given(st.data())
def test_merge_contexts(data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 5000))
    contexts = [data.draw(extent_lists(size)) for _ in range(data.draw(st.integers(1, 4)))]
    normal = []
    for ext in contexts:
        lengths, (flags,) = merge_runs(
            array("Q", [n for n, _ in ext]), (array("Q", [f for _, f in ext]),)
        )
        normal.append((lengths, flags))
    lengths, columns = merge_contexts(normal)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    rows = list(zip(starts, lengths, zip(*columns, strict=True), strict=True))
    assert rows == model_rows(contexts, 0, size)


def test_merge_contexts_rejects_unequal_cover() -> None:
    with pytest.raises(UsageError):
        merge_contexts([(array("Q", [5]), array("Q", [0])), (array("Q", [6]), array("Q", [0]))])


def test_allocation_of() -> None:
    assert allocation_of(0) is Allocation.DATA
    assert allocation_of(1) is Allocation.DATA  # HOLE without ZERO: contents undefined
    assert allocation_of(2) is Allocation.ZERO
    assert allocation_of(3) is Allocation.HOLE
    assert allocation_of(0x10 | 3) is Allocation.HOLE  # reserved bits ignored


@given(st.data())
def test_classify(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 30))
    lengths = data.draw(st.lists(st.integers(1, 99), min_size=n, max_size=n))
    alloc = data.draw(st.lists(st.integers(0, 7), min_size=n, max_size=n))
    dirty = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    got_l, (kinds, dirt) = classify(array("Q", lengths), array("Q", alloc), array("Q", dirty))
    expect = model_rows(
        [
            list(zip(lengths, [allocation_of(a) for a in alloc], strict=True)),
            list(zip(lengths, [d & 1 for d in dirty], strict=True)),
        ],
        0,
        sum(lengths),
    )
    assert [(n, (k, d)) for _, n, (k, d) in expect] == list(
        zip(got_l, zip(kinds, dirt, strict=True), strict=True)
    )


# --- the walk --------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    exports(),
    st.randoms(use_true_random=False),
    st.integers(1, 7),
    st.integers(1, 4),
    st.booleans(),
)
def test_iter_extents_matches_model(
    export: tuple[int, list[Extents], int, int],
    rnd: random.Random,
    max_extents: int,
    depth: int,
    extended: bool,
) -> None:
    size, contexts, offset, length = export
    names = [f"x-test:c{i}" for i in range(len(contexts))]
    server = FakeServer(size, dict(zip(names, contexts, strict=True)), rnd, extended=extended)
    batches = asyncio.run(
        collect(iter_extents(server, names, offset, length, max_extents=max_extents, depth=depth))
    )
    pos = offset
    for batch in batches:
        assert batch.offset == pos and 0 < len(batch.lengths) <= max_extents
        assert batch.lengths.typecode == "Q" and all(c.typecode == "Q" for c in batch.flags)
        assert all(len(c) == len(batch.lengths) for c in batch.flags)
        pos = batch.end
    assert pos == offset + length
    assert rows_of(batches) == model_rows(contexts, offset, offset + length)
    for start, n in server.requests:
        assert offset <= start and start + n <= offset + length


@settings(max_examples=60, deadline=None)
@given(exports(), st.randoms(use_true_random=False))
def test_iter_allocation_matches_model(
    export: tuple[int, list[Extents], int, int], rnd: random.Random
) -> None:
    size, contexts, offset, length = export
    alloc = contexts[0]
    bitmap = [(n, f & 1) for n, f in contexts[-1]]
    server = FakeServer(size, {CONTEXT_BASE_ALLOCATION: alloc, "qemu:dirty-bitmap:b0": bitmap}, rnd)
    batches = asyncio.run(collect(iter_allocation(server, "b0", offset, length, max_extents=3)))
    rows = []
    for b in batches:
        pos = b.offset
        for n, k, d in zip(b.lengths, b.allocation, b.dirty, strict=True):
            rows.append((pos, n, (k, d)))
            pos += n
    kinds = [(n, int(allocation_of(f))) for n, f in alloc]
    assert rows == model_rows([kinds, bitmap], offset, offset + length)


def test_step_adapts_to_short_answers() -> None:
    """A server that answers 5 extents at a time over a fragmented map: after the first short
    answer the walker asks for about what the server answers, instead of re-asking for 4 GiB."""
    size = 1 << 30
    ext = [(4096, i & 1) for i in range(size // 4096)]
    server = FakeServer(size, {"x-test:a": ext}, random.Random(1), cap=5)
    server.rnd.randint = lambda a, b: b  # type: ignore[method-assign]
    walker = ExtentWalker(["x-test:a"], 0, 1 << 20, align=512, depth=2)

    rows = 0
    sent: list[tuple[int, int]] = []
    while not walker.done:
        sent += walker.requests()
        start = walker.head
        n = next(n for s, n in reversed(sent) if s == start)
        walker.receive(start, {"x-test:a": server.answer("x-test:a", start, n)})
        rows += sum(len(b.lengths) for b in walker.batches())
    assert rows == 256
    # The first requests share the range between them (depth 2); later ones ask for about
    # what one short answer covered (5 extents of 4 KiB), give or take the doubling after
    # full answers.
    assert sent[:2] == [(0, 1 << 19), (1 << 19, 1 << 19)]
    assert max(n for _, n in sent[-10:]) <= 4 * 5 * 4096


def test_walker_usage_errors() -> None:
    with pytest.raises(UsageError):
        ExtentWalker([], 0, 10)
    with pytest.raises(UsageError, match="not the string"):
        ExtentWalker("base:allocation", 0, 10)
    with pytest.raises(UsageError):
        ExtentWalker(["a:b", "a:b"], 0, 10)
    walker = ExtentWalker(["a:b"], 0, 10)
    with pytest.raises(UsageError):
        walker.receive(0, {})
    assert walker.requests() == [(0, 10)]
    with pytest.raises(ServerProtocolError):
        walker.receive(0, {"other:x": (array("I", [10]), array("I", [0]))})
    with pytest.raises(ServerProtocolError):
        walker.receive(0, {"a:b": (array("I", [10, 7]), array("I", [0, 1]))})


async def test_iter_extents_checks_range_and_contexts() -> None:
    server = FakeServer(100, {"x-test:a": [(100, 0)]}, random.Random(0))
    with pytest.raises(UsageError):
        await collect(iter_extents(server, ["x-test:a"], 50, 51))
    with pytest.raises(UsageError):
        await collect(iter_extents(server, ["x-test:b"]))
    assert await collect(iter_extents(server, ["x-test:a"], 100, 0)) == []


async def test_iter_extents_early_close_cancels_requests() -> None:
    size = 1 << 20
    server = FakeServer(
        size, {"x-test:a": [(512, i & 1) for i in range(size // 512)]}, random.Random(0), cap=3
    )
    it = cast(AsyncGenerator[Any, None], iter_extents(server, ["x-test:a"], max_extents=2, depth=4))
    first = await it.__anext__()
    assert first.offset == 0
    await it.aclose()
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.randoms(use_true_random=False), st.sampled_from([2, 512, 4096]))
def test_iter_extents_aligns_requests_to_the_minimum_block(
    data: st.DataObject, rnd: random.Random, block: int
) -> None:
    """With a minimum block size, requests are widened to whole blocks and the answers
    clipped back to the (unaligned) range; extents are block multiples except the tail."""
    blocks = data.draw(st.integers(1, 64))
    tail = data.draw(st.integers(0, block - 1))
    contexts = [
        [(n * block, f) for n, f in data.draw(extent_lists(blocks))]
        for _ in range(data.draw(st.integers(1, 2)))
    ]
    for ext in contexts:
        ext[-1] = (ext[-1][0] + tail, ext[-1][1])
    size = blocks * block + tail
    offset = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(0, size - offset))
    names = [f"x-test:c{i}" for i in range(len(contexts))]
    server = FakeServer(size, dict(zip(names, contexts, strict=True)), rnd, block=block)
    batches = asyncio.run(collect(iter_extents(server, names, offset, length, max_extents=4)))
    assert rows_of(batches) == model_rows(contexts, offset, offset + length)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_merge_contexts_dense_and_sparse(data: st.DataObject) -> None:
    """One fragmented context (a bitmap) beside sparse ones: both expansion paths."""
    rows = data.draw(st.integers(50, 200))
    dense = [(data.draw(st.integers(1, 9)), i % 2) for i in range(rows)]
    size = sum(n for n, _ in dense)
    contexts = [dense] + [
        data.draw(extent_lists(size, max_flags=3)) for _ in range(data.draw(st.integers(1, 2)))
    ]
    normal = []
    for ext in contexts:
        lengths, (flags,) = merge_runs(
            array("Q", [n for n, _ in ext]), (array("Q", [f for _, f in ext]),)
        )
        normal.append((lengths, flags))
    lengths, columns = merge_contexts(normal)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    got = list(zip(starts, lengths, zip(*columns, strict=True), strict=True))
    assert got == model_rows(contexts, 0, size)


@pytest.mark.parametrize("seed", range(40))
def test_merge_contexts_into_dense_blocks(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense path with many blocks of rows (a small block size stands in for 4096):
    sparse boundaries inside rows, on row boundaries, several in one row."""
    from nbdcore import extents

    monkeypatch.setattr(extents, "_LOCATE_BLOCK", 1 + seed % 7)
    rnd = random.Random(seed)
    dense = [(rnd.randint(1, 9), i % 2) for i in range(rnd.randint(40, 120))]
    size = sum(n for n, _ in dense)
    sparse = []
    for _ in range(rnd.randint(1, 2)):
        cuts = sorted(rnd.sample(range(1, size), rnd.randint(0, 4)))
        edges = [0, *cuts, size]
        sparse.append([(b - a, rnd.randint(0, 3)) for a, b in itertools.pairwise(edges)])
    contexts = [dense, *sparse] if seed % 2 else [*sparse, dense]
    normal = [
        merge_runs(array("Q", [n for n, _ in e]), (array("Q", [f for _, f in e]),))
        for e in contexts
    ]
    lengths, columns = merge_contexts([(t[0], t[1][0]) for t in normal])
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    got = list(zip(starts, lengths, zip(*columns, strict=True), strict=True))
    assert got == model_rows(contexts, 0, size)
