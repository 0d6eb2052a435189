"""The clear ledger (gateway.ledger): masks against byte models, durability, group commit,
generations, and kill -9 of a process in the middle of a stream of clears."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import textwrap
from array import array
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ledger import (
    GenerationChangedError,
    IntervalSet,
    Ledger,
    LedgerError,
    Scope,
    mask_table,
    subtract,
)

S = Scope("disk", "qemu:dirty-bitmap:b0", "gen-1")


# --- intervals and masks against byte models ----------------------------------------------------

spans = st.lists(st.tuples(st.integers(0, 200), st.integers(1, 40)), max_size=15)


@given(spans)
def test_interval_set_is_the_union(items: list[tuple[int, int]]) -> None:
    iv = IntervalSet((s, s + n) for s, n in items)
    model = {b for s, n in items for b in range(s, s + n)}
    got = {b for s, e in iv for b in range(s, e)}
    assert got == model
    pairs = list(iv)
    # ordered, disjoint, not adjacent (adjacent intervals merge)
    assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(pairs))
    assert iv.covered(50, 150) == len([b for b in model if 50 <= b < 150])


rows = st.lists(st.tuples(st.integers(1, 30), st.integers(0, 3)), min_size=1, max_size=12)


@given(st.integers(0, 50), rows, spans)
def test_mask_table_matches_a_byte_model(
    offset: int, table: list[tuple[int, int]], items: list[tuple[int, int]]
) -> None:
    mask = IntervalSet((s, s + n) for s, n in items)
    lengths = array("Q", [n for n, _ in table])
    dirty = array("Q", [f for _, f in table])
    alloc = array("Q", [(f * 7 + i) % 3 for i, (_, f) in enumerate(table)])
    out_len, (out_dirty, out_alloc) = mask_table(mask, offset, lengths, [dirty, alloc])

    def expand(lens: array[int], *cols: array[int]) -> list[tuple[int, ...]]:
        return [tuple(c[i] for c in cols) for i, n in enumerate(lens) for _ in range(n)]

    before = expand(lengths, dirty, alloc)
    after = expand(out_len, out_dirty, out_alloc)
    assert len(after) == len(before)
    for i, ((d0, a0), (d1, a1)) in enumerate(zip(before, after, strict=True)):
        masked = any(s <= offset + i < e for s, e in mask)
        assert a1 == a0  # other columns untouched
        assert d1 == (d0 & ~1 if masked else d0)  # only the dirty bit, only under the mask
    assert all(out_len)
    # adjacent rows differ
    assert all(
        (out_dirty[i], out_alloc[i]) != (out_dirty[i + 1], out_alloc[i + 1])
        for i in range(len(out_len) - 1)
    )


def test_mask_table_without_overlap_returns_the_input() -> None:
    lengths, flags = array("Q", [10, 10]), array("Q", [1, 0])
    got = mask_table(IntervalSet([(100, 200)]), 0, lengths, [flags])
    assert got[0] is lengths and got[1][0] is flags


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 30)), max_size=8), spans)
def test_subtract_matches_a_byte_model(
    runs: list[tuple[int, int]], items: list[tuple[int, int]]
) -> None:
    mask = IntervalSet((s, s + n) for s, n in items)
    masked = {b for s, e in mask for b in range(s, e)}
    want = sorted(b for b in {b for s, n in runs for b in range(s, s + n)} if b not in masked)
    merged = IntervalSet((s, s + n) for s, n in runs)
    got = [b for s, n in subtract(((s, e - s) for s, e in merged), mask) for b in range(s, s + n)]
    assert got == want


# --- the durable ledger ---------------------------------------------------------------------


async def test_clears_survive_reopen_and_scopes_stay_apart(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = await Ledger.open(db)
    assert await ledger.record_clear(S, 0, 65536) == [(0, 65536)]
    assert await ledger.record_clear(S, 65536, 1000) == [(65536, 1000)]
    assert await ledger.record_clear(S, 65536, 1000) == [(65536, 1000)]  # repeat: harmless
    other_gen = Scope(S.export, S.bitmap, "gen-2")
    other_bitmap = Scope(S.export, "qemu:dirty-bitmap:b1", S.generation)
    await ledger.record_clear(other_bitmap, 5, 5)
    assert list(await ledger.mask(S)) == [(0, 66536)]
    assert list(await ledger.mask(other_gen)) == []
    await ledger.aclose()

    again = await Ledger.open(db)
    assert list(await again.mask(S)) == [(0, 66536)]
    assert list(await again.mask(other_gen)) == []
    assert list(await again.mask(other_bitmap)) == [(5, 10)]
    await again.aclose()
    with pytest.raises(LedgerError):
        await again.record_clear(S, 0, 1)


async def test_bad_ranges_are_refused(tmp_path: Path) -> None:
    async with asyncio.timeout(30):
        ledger = await Ledger.open(tmp_path / "l.db")
        for offset, length in [(-1, 5), (0, 0), (1 << 63, 1)]:
            with pytest.raises(LedgerError):
                await ledger.record_clear(S, offset, length)
        assert list(await ledger.mask(S)) == []
        await ledger.aclose()


async def test_concurrent_clears_share_commits(tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "l.db")
    n = 400
    await asyncio.gather(*(ledger.record_clear(S, i * 4096, 4096) for i in range(0, 2 * n, 2)))
    assert ledger.stats.clears == n
    assert ledger.stats.commits < n  # group commit: fewer fsyncs than clears
    mask = await ledger.mask(S)
    assert len(mask) == n and mask.covered(0, 2 * n * 4096) == n * 4096
    await ledger.aclose()


async def test_compaction_keeps_the_mask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.ledger as mod

    monkeypatch.setattr(mod, "COMPACT_SLACK", 4)
    db = tmp_path / "l.db"
    ledger = await Ledger.open(db)
    for i in range(40):
        await ledger.record_clear(S, i * 10, 10)  # one growing interval
    await ledger.aclose()
    import sqlite3

    with sqlite3.connect(db) as con:
        (count,) = con.execute("SELECT count(*) FROM clears").fetchone()
    assert count <= 5
    again = await Ledger.open(db)
    assert list(await again.mask(S)) == [(0, 400)]
    await again.aclose()


async def test_generations_config_and_api(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    ledger = await Ledger.open(db)
    assert ledger.generation("disk") is None
    assert await ledger.apply_config_generation("disk", "g1") == "g1"
    assert await ledger.set_generation("disk", "g2") == "g1"
    assert ledger.generation("disk") == "g2"
    await ledger.aclose()
    # Same configuration after a restart: the generation the API set stays.
    ledger = await Ledger.open(db)
    assert ledger.generation("disk") == "g2"
    assert await ledger.apply_config_generation("disk", "g1") == "g2"
    # The operator changed the configuration: it wins.
    assert await ledger.apply_config_generation("disk", "g3") == "g3"
    with pytest.raises(LedgerError):
        await ledger.set_generation("disk", "")
    await ledger.aclose()
    ledger = await Ledger.open(db)
    assert ledger.generation("disk") == "g3"
    await ledger.aclose()


def test_unreadable_database_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="cannot open"):
        Ledger(bad)


_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.ledger import Ledger, Scope

    async def main():
        ledger = await Ledger.open(sys.argv[1])
        scope = Scope("disk", "qemu:dirty-bitmap:b0", "g")
        counter = iter(range(10**9))

        async def worker():
            for i in counter:
                await ledger.record_clear(scope, i * 3 * 512, 512 * (1 + i % 2))
                print(i, flush=True)

        await asyncio.gather(*(worker() for _ in range(32)))

    asyncio.run(main())
    """
)


def test_kill_9_loses_no_acknowledged_clear(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db)], stdout=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdout is not None
    acked: list[int] = []
    for line in proc.stdout:
        acked.append(int(line))
        if len(acked) >= 3000:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Ledger(db) as ledger:
        mask = asyncio.run(ledger.mask(Scope("disk", "qemu:dirty-bitmap:b0", "g")))
    for i in acked:
        start, n = i * 3 * 512, 512 * (1 + i % 2)
        assert mask.covered(start, start + n) == n, f"acknowledged clear {i} lost"
    # nothing outside a requested range is masked (the third 512-byte block of each step)
    for s, e in mask:
        for b in range(s, e, 512):
            i, r = divmod(b, 3 * 512)
            assert r < 512 * (1 + i % 2)


async def test_a_failed_commit_is_not_acknowledged_nor_masked(tmp_path: Path) -> None:
    import sqlite3

    ledger = await Ledger.open(tmp_path / "l.db")
    await ledger.record_clear(S, 0, 100)
    real = ledger._db

    class FailingCommit:
        def execute(self, sql: str, *args: object) -> object:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            return real.execute(sql, *args)

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    ledger._db = FailingCommit()  # type: ignore[assignment]
    with pytest.raises(LedgerError, match="commit failed"):
        await ledger.record_clear(S, 1000, 100)
    ledger._db = real
    assert list(await ledger.mask(S)) == [(0, 100)]  # the failed clear masks nothing
    await ledger.record_clear(S, 2000, 100)
    assert list(await ledger.mask(S)) == [(0, 100), (2000, 2100)]
    await ledger.aclose()


async def test_nothing_uncommitted_is_ever_published(tmp_path: Path) -> None:
    """While a clear's transaction is open, no reader may see it masked."""
    import threading

    ledger = await Ledger.open(tmp_path / "l.db")
    real = ledger._db
    at_commit, release = threading.Event(), threading.Event()

    class SlowCommit:
        def execute(self, sql: str, *args: object) -> object:
            if sql == "COMMIT":
                at_commit.set()
                release.wait(10)
            return real.execute(sql, *args)

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    ledger._db = SlowCommit()  # type: ignore[assignment]
    task = asyncio.create_task(ledger.record_clear(S, 0, 4096))
    assert await asyncio.to_thread(at_commit.wait, 10)
    published = ledger._masks.get(S)
    assert published is None or published.covered(0, 4096) == 0
    release.set()
    await task
    assert (await ledger.mask(S)).covered(0, 4096) == 4096
    ledger._db = real
    await ledger.aclose()


@settings(max_examples=20, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("clear"), st.integers(0, 300), st.integers(1, 60), st.booleans()),
            st.tuples(st.just("restart"), st.just(0), st.just(0), st.just(False)),
        ),
        max_size=20,
    )
)
def test_ledger_against_a_model_with_restarts(steps: list[tuple[str, int, int, bool]]) -> None:
    """Random clears in two generations and restarts: the mask of each generation is exactly the
    union of its acknowledged clears, before and after every restart."""
    import tempfile

    async def main(db: Path) -> None:
        model: dict[str, set[int]] = {"a": set(), "b": set()}
        ledger = await Ledger.open(db)
        try:
            for op, offset, length, second in steps:
                if op == "restart":
                    await ledger.aclose()
                    ledger = await Ledger.open(db)
                else:
                    gen = "b" if second else "a"
                    await ledger.record_clear(Scope("e", "bm", gen), offset, length)
                    model[gen] |= set(range(offset, offset + length))
                for gen, want in model.items():
                    mask = await ledger.mask(Scope("e", "bm", gen))
                    assert {b for s, e in mask for b in range(s, e)} == want
        finally:
            await ledger.aclose()

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(main(Path(d) / "l.db"))


async def test_a_reused_generation_name_starts_clean(tmp_path: Path) -> None:
    """A generation is a point in time: switching away deletes its clears (review H3, M12), so
    coming back to the same name (a new snapshot) masks nothing, even after a restart."""
    db = tmp_path / "l.db"
    ledger = await Ledger.open(db)
    night = Scope("disk", "qemu:dirty-bitmap:b0", "nightly")
    await ledger.set_generation("disk", "nightly")
    await ledger.record_clear(night, 0, 1 << 20, export_size=1 << 30)
    await ledger.record_clear(Scope("other", "qemu:dirty-bitmap:b0", "x"), 0, 10)
    assert list(await ledger.mask(night)) == [(0, 1 << 20)]
    await ledger.set_generation("disk", "other")
    assert ledger.export_size("disk", "nightly") is None
    assert not any(s.generation == "nightly" for s in ledger._masks)
    await ledger.set_generation("disk", "nightly")
    assert list(await ledger.mask(night)) == []
    await ledger.aclose()
    ledger = await Ledger.open(db)
    assert list(await ledger.mask(night)) == []
    # Another export's clears are untouched; the database holds only those.
    assert list(await ledger.mask(Scope("other", "qemu:dirty-bitmap:b0", "x"))) == [(0, 10)]
    assert ledger._db.execute("SELECT count(*) FROM clears").fetchone()[0] == 1
    await ledger.aclose()


async def test_a_clear_for_a_generation_no_longer_current_is_refused(tmp_path: Path) -> None:
    """The generation can change between the service's check and the commit: such a clear is
    refused, not recorded under a name that may come back."""
    ledger = await Ledger.open(tmp_path / "l.db")
    await ledger.set_generation("disk", "g1")
    g1 = Scope("disk", "qemu:dirty-bitmap:b0", "g1")
    switch = asyncio.create_task(ledger.set_generation("disk", "g2"))
    late = asyncio.create_task(ledger.record_clear(g1, 0, 4096))
    assert await switch == "g1"
    with pytest.raises(GenerationChangedError, match="'g2'"):
        await late
    await ledger.set_generation("disk", "g1")
    assert list(await ledger.mask(g1)) == []
    await ledger.aclose()
