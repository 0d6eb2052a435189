"""The clear ledger: durable record of ClearRange calls on bitmaps whose host cannot clear.

A point-in-time, read-only export (qemu-nbd -r over a snapshot, a libvirt backup export) shows a
dirty bitmap that never changes while it is exported. The gateway cannot clear it there, so it
records each acknowledged clear here and applies the union of the clears as a *mask* on that
bitmap's extents: a masked byte reads as clean. The mask is byte-exact (the bitmap cannot gain
new dirty bits under it, since the export is a fixed point in time).

Scope: every clear belongs to ``(export, bitmap, generation)``. The generation names the point in
time the export shows; the operator sets it in the configuration and an orchestrator may change it
through the API when it re-exports a new snapshot. The clears of one generation never mask
another, so a new snapshot starts with nothing masked. A generation is a point in time that, once
the export moved on, never comes back: changing an export's generation deletes the clears of all
its other generations (in the database and in memory), so a reused name starts clean and the
ledger holds the clears of one generation per export. A clear for a generation that is no longer
current when it commits is refused (:class:`GenerationChangedError`).

Durability: SQLite in WAL mode with ``synchronous=FULL``, so a committed transaction survives the
death of the process and of the machine. A clear is acknowledged only after the transaction that
holds it committed. One thread owns the connection and commits whatever has queued up while the
previous commit was syncing (group commit): N concurrent clears cost one fsync, not N.

Memory: each scope's mask is kept as merged intervals (a backup clearing in order makes one
interval); rows in the database are rewritten as the merged intervals when they outnumber them.
A scope holds at most ``max_intervals`` of them: a clear that would leave more (byte-exact
disjoint clears, which a client may send on purpose) is refused whole with
:class:`ScopeFullError`, and nothing of it is recorded.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import logging
import queue
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Final

from nbdcore.constants import NBD_STATE_DIRTY
from nbdcore.extents import merge_runs

log = logging.getLogger("nbdgw.ledger")

SCHEMA_VERSION: Final = 1
# SQLite integers are signed 64-bit.
MAX_OFFSET: Final = (1 << 63) - 1
# At most this many queued operations go into one transaction.
MAX_BATCH: Final = 4096
# Group commit: with concurrent callers, wait up to this share of the last commit's duration
# (at most GATHER_MAX seconds) for more of them before committing.
GATHER_FRACTION: Final = 0.5
GATHER_MAX: Final = 0.005
# Rows of one scope are rewritten as its merged intervals once they outnumber them by this.
COMPACT_SLACK: Final = 1024
# IntervalSet block size (intervals); blocks split at twice this.
INTERVAL_BLOCK: Final = 512
# Merged intervals one scope may hold (about 100 MB of Python ints at the cap); gateway.config's
# ledger_max_intervals.
DEFAULT_MAX_INTERVALS: Final = 1_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clears (
    export TEXT NOT NULL, bitmap TEXT NOT NULL, generation TEXT NOT NULL,
    start INTEGER NOT NULL, stop INTEGER NOT NULL, CHECK (0 <= start AND start < stop)
);
CREATE INDEX IF NOT EXISTS clears_scope ON clears (export, bitmap, generation, start);
CREATE TABLE IF NOT EXISTS generations (
    export TEXT PRIMARY KEY, generation TEXT NOT NULL, config_generation TEXT,
    source TEXT NOT NULL, updated REAL NOT NULL
);
-- The export's size when its first clear of a generation was recorded: a point in time has one
-- size, so a different size means another snapshot behind the same generation name.
CREATE TABLE IF NOT EXISTS generation_sizes (
    export TEXT NOT NULL, generation TEXT NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY (export, generation)
);
"""


class LedgerError(Exception):
    """The ledger cannot do what was asked (closed, bad range, unreadable database)."""


class GenerationChangedError(LedgerError):
    """A clear names a generation that is not the export's current one (it changed since)."""

    def __init__(self, scope: Scope, current: str) -> None:
        super().__init__(
            f"generation {scope.generation!r} of export {scope.export!r} is no longer current"
            f" ({current!r} is): nothing was recorded"
        )
        self.scope = scope
        self.current = current


class ScopeFullError(OSError):
    """A clear would leave more than the ledger's ``max_intervals`` intervals in its scope:
    refused whole, nothing recorded. An OSError (ENOSPC), not a :class:`LedgerError`: the ledger
    is fine, the request asks for more room than a scope has (gateway.errors maps it to
    RESOURCE_EXHAUSTED)."""

    def __init__(self, scope: Scope, limit: int, intervals: int) -> None:
        super().__init__(
            errno.ENOSPC,
            f"the ledger of {scope.bitmap!r} of export {scope.export!r} (generation"
            f" {scope.generation!r}) holds {intervals} disjoint cleared ranges, its limit is"
            f" {limit}: clear adjacent or larger ranges; nothing was recorded",
        )
        self.scope = scope
        self.limit = limit
        self.intervals = intervals


@dataclass(frozen=True, slots=True)
class Scope:
    """What one set of clears applies to."""

    export: str
    bitmap: str
    generation: str


class IntervalSet:
    """Disjoint, non-adjacent ``[start, stop)`` intervals in order (adjacent ones merge).

    Kept in blocks of at most ``2 * INTERVAL_BLOCK`` intervals (two lists each), with every
    block's first start and last stop alongside for bisecting: an add moves at most a block's
    worth of list items, not the whole set (a million disjoint clears made each add move 16 MB).
    :meth:`copy` shares the blocks and each set copies a shared block the first time it changes
    it (copy-on-write), so the ledger's copy of a scope per transaction costs O(blocks).
    """

    __slots__ = ("_firsts", "_lasts", "_len", "_owned", "_starts", "_stops")

    def __init__(self, intervals: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[list[int]] = []
        self._stops: list[list[int]] = []
        self._firsts: list[int] = []  # _starts[b][0] of every block
        self._lasts: list[int] = []  # _stops[b][-1] of every block
        self._len = 0
        self._owned: set[int] = set()  # ids of the blocks only this set holds
        for start, stop in intervals:
            self.add(start, stop)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for starts, stops in zip(self._starts, self._stops, strict=True):
            yield from zip(starts, stops, strict=True)

    def __repr__(self) -> str:
        return f"IntervalSet({list(self)!r})"

    def copy(self) -> IntervalSet:
        out = IntervalSet()
        out._starts = self._starts.copy()
        out._stops = self._stops.copy()
        out._firsts = self._firsts.copy()
        out._lasts = self._lasts.copy()
        out._len = self._len
        self._owned = set()  # every block is shared now
        return out

    def _span(self, start: int, stop: int) -> tuple[int, int, int, int, int]:
        """Where ``[start, stop)`` goes: the first interval it touches or precedes (block bi,
        index i), the end of the ones it touches (block bj, index j, exclusive), and how many
        it touches."""
        bi = bisect.bisect_left(self._lasts, start)  # first block with an interval stop >= start
        if bi == len(self._lasts):
            return bi, 0, bi, 0, 0
        i = bisect.bisect_left(self._stops[bi], start)
        bj = bisect.bisect_right(self._firsts, stop) - 1  # last block with a start <= stop
        if bj < bi:
            return bi, i, bi, i, 0
        j = bisect.bisect_right(self._starts[bj], stop)
        if bi == bj:
            return bi, i, bj, j, max(0, j - i)
        middle = sum(len(self._starts[b]) for b in range(bi + 1, bj))
        return bi, i, bj, j, len(self._starts[bi]) - i + middle + j

    def length_after_add(self, start: int, stop: int) -> int:
        """``len(self)`` once ``add(start, stop)`` is done (nothing changes)."""
        if start >= stop:
            return self._len
        return self._len - self._span(start, stop)[4] + 1

    def add(self, start: int, stop: int) -> None:
        if start >= stop:
            return
        bi, i, bj, j, touched = self._span(start, stop)
        if not self._starts:
            self._new_block(0, [start], [stop])
        elif bi == len(self._starts):
            b = bi - 1  # after everything: the last block takes it
            self._own(b)
            self._starts[b].append(start)
            self._stops[b].append(stop)
            self._fix(b)
        elif not touched:
            self._own(bi)
            self._starts[bi].insert(i, start)
            self._stops[bi].insert(i, stop)
            self._fix(bi)
        else:
            start = min(start, self._starts[bi][i])
            stop = max(stop, self._stops[bj][j - 1])
            self._own(bi)
            if bi == bj:
                self._starts[bi][i:j] = [start]
                self._stops[bi][i:j] = [stop]
            else:
                # bi keeps its head and the merged interval; bj loses what merged; the
                # blocks between merged whole.
                self._own(bj)
                self._starts[bi][i:] = [start]
                self._stops[bi][i:] = [stop]
                del self._starts[bj][:j]
                del self._stops[bj][:j]
                drop = bj + 1 if not self._starts[bj] else bj
                for b in range(bi + 1, drop):
                    self._owned.discard(id(self._starts[b]))
                del self._starts[bi + 1 : drop]
                del self._stops[bi + 1 : drop]
                del self._firsts[bi + 1 : drop]
                del self._lasts[bi + 1 : drop]
                nxt = bi + 1
                if nxt < len(self._starts):
                    if len(self._starts[bi]) + len(self._starts[nxt]) <= INTERVAL_BLOCK:
                        # Two short blocks left by the merge become one (blocks never get
                        # shorter otherwise, so this keeps them from piling up).
                        self._starts[bi] += self._starts[nxt]
                        self._stops[bi] += self._stops[nxt]
                        self._owned.discard(id(self._starts[nxt]))
                        del self._starts[nxt], self._stops[nxt], self._firsts[nxt]
                        del self._lasts[nxt]
                    else:
                        self._firsts[nxt] = self._starts[nxt][0]
            self._fix(bi)
        self._len += 1 - touched

    def _own(self, b: int) -> None:
        if id(self._starts[b]) not in self._owned:
            self._starts[b] = self._starts[b].copy()
            self._stops[b] = self._stops[b].copy()
            self._owned.add(id(self._starts[b]))

    def _new_block(self, b: int, starts: list[int], stops: list[int]) -> None:
        self._starts.insert(b, starts)
        self._stops.insert(b, stops)
        self._firsts.insert(b, starts[0])
        self._lasts.insert(b, stops[-1])
        self._owned.add(id(starts))

    def _fix(self, b: int) -> None:
        """Block ``b`` changed: split it when too long, refresh its bounds."""
        starts, stops = self._starts[b], self._stops[b]
        if len(starts) > 2 * INTERVAL_BLOCK:
            half = len(starts) // 2
            self._new_block(b + 1, starts[half:], stops[half:])
            del starts[half:]
            del stops[half:]
        self._firsts[b] = starts[0]
        self._lasts[b] = stops[-1]

    def covered(self, start: int, stop: int) -> int:
        """Bytes of ``[start, stop)`` inside the set."""
        total = 0
        for s, e in self.window(start, stop):
            total += e - s
        return total

    def window(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The intervals meeting ``[start, stop)``, clipped to it."""
        out: list[tuple[int, int]] = []
        b = bisect.bisect_right(self._lasts, start)
        if b == len(self._lasts):
            return out
        i = bisect.bisect_right(self._stops[b], start)
        while b < len(self._starts):
            starts, stops = self._starts[b], self._stops[b]
            while i < len(starts):
                if starts[i] >= stop:
                    return out
                out.append((max(starts[i], start), min(stops[i], stop)))
                i += 1
            b, i = b + 1, 0
        return out


def mask_table(
    mask: IntervalSet,
    offset: int,
    lengths: array[int],
    columns: Sequence[array[int]],
    *,
    column: int = 0,
    bit: int = NBD_STATE_DIRTY,
) -> tuple[array[int], tuple[array[int], ...]]:
    """Rows ``(lengths, columns)`` from ``offset`` with ``bit`` of ``columns[column]`` cleared
    wherever ``mask`` covers them, rows split at the mask's edges, adjacent equal rows merged.

    Byte-exact: a dirty row half inside the mask becomes two rows. Cost is proportional to the
    rows that meet the mask and the mask's intervals; the rows between are copied in slices.
    """
    n = len(lengths)
    cols = tuple(columns)
    if not n:
        return lengths, cols
    bounds = array("Q", accumulate(lengths, initial=offset))  # row i is [bounds[i], bounds[i+1])
    cuts = mask.window(offset, bounds[-1])
    if not cuts:
        return lengths, cols
    out_len = array("Q")
    out_cols = tuple(array(c.typecode) for c in cols)

    def emit(length: int, row: int, masked: bool = False) -> None:
        out_len.append(length)
        for k, (o, c) in enumerate(zip(out_cols, cols, strict=True)):
            o.append(c[row] & ~bit if masked and k == column else c[row])

    def copy(first: int, stop: int) -> None:
        if first < stop:
            out_len.extend(lengths[first:stop])
            for o, c in zip(out_cols, cols, strict=True):
                o.extend(c[first:stop])

    dirty = cols[column]
    row, pos = 0, offset  # everything before pos was emitted; pos lies in row `row`
    for cut_start, cut_stop in cuts:
        first = bisect.bisect_right(bounds, cut_start) - 1  # the row holding cut_start
        if first > row:
            emit(bounds[row + 1] - pos, row)
            copy(row + 1, first)
            row, pos = first, bounds[first]
        while pos < cut_stop:
            row_stop = bounds[row + 1]
            stop = min(row_stop, cut_stop)
            if dirty[row] & bit:
                if pos < cut_start:
                    emit(cut_start - pos, row)
                    pos = cut_start
                emit(stop - pos, row, masked=True)
            else:
                emit(stop - pos, row)
            pos = stop
            if pos == row_stop:
                row += 1
    if row < n:
        emit(bounds[row + 1] - pos, row)
        copy(row + 1, n)
    return merge_runs(out_len, out_cols)


def subtract(runs: Iterable[tuple[int, int]], mask: IntervalSet) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` runs minus the mask: what stays dirty."""
    for start, length in runs:
        pos, stop = start, start + length
        for s, e in mask.window(start, stop):
            if s > pos:
                yield pos, s - pos
            pos = e
        if pos < stop:
            yield pos, stop - pos


# --- the durable ledger -----------------------------------------------------------------------


@dataclass
class _Op:
    kind: str  # "clear" | "set_generation" | "load"
    args: tuple[Any, ...]
    done: Callable[[BaseException | None, Any], None]


@dataclass
class LedgerStats:
    commits: int = 0
    clears: int = 0
    largest_batch: int = 0
    commit_seconds: float = 0.0
    batches: list[int] = field(default_factory=list, repr=False)


class Ledger:
    """The ledger of one gateway, in the SQLite database at ``path`` (created if missing).

    ``synchronous``: SQLite's setting; FULL (the default) makes every acknowledged clear
    survive a machine crash, NORMAL only a process crash (WAL). ``max_intervals``: the merged
    intervals one scope may hold (see :class:`ScopeFullError`). Use :meth:`open` from async code
    (the first read of the database runs off the event loop).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        max_intervals: int = DEFAULT_MAX_INTERVALS,
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        if max_intervals < 1:
            raise ValueError(f"max_intervals must be at least 1, not {max_intervals}")
        self.max_intervals = max_intervals
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.stats = LedgerStats()
        self._masks: dict[Scope, IntervalSet] = {}
        self._rows: dict[Scope, int] = {}
        self._generations: dict[str, str] = {}
        self._sizes: dict[tuple[str, str], int] = {}
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._closed = False
        self._db = self._connect()
        self._load_generations()
        self._thread = threading.Thread(target=self._worker, name="nbdgw-ledger", daemon=True)
        self._thread.start()

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        max_intervals: int = DEFAULT_MAX_INTERVALS,
    ) -> Ledger:
        return await asyncio.to_thread(
            cls, path, synchronous=synchronous, max_intervals=max_intervals
        )

    # --- reads (in memory, any thread) ------------------------------------------------------

    def generation(self, export: str) -> str | None:
        """The export's current generation, or None when none was ever set."""
        return self._generations.get(export)

    async def mask(self, scope: Scope) -> IntervalSet:
        """The scope's mask as of the last commit (loaded from the database on first use).

        The object is never changed afterwards (a commit publishes a new one), so a reader may
        keep it without copying, and must not change it."""
        current = self._masks.get(scope)
        if current is None:
            current = await self._submit("load", scope)
        return current

    # --- writes (durable before they return) ------------------------------------------------

    def export_size(self, export: str, generation: str) -> int | None:
        """The export's size recorded with the first clear of this generation, if any."""
        return self._sizes.get((export, generation))

    async def record_clear(
        self, scope: Scope, offset: int, length: int, *, export_size: int | None = None
    ) -> list[tuple[int, int]]:
        """Record that ``[offset, offset + length)`` of the scope was safely stored; returns the
        byte runs now masked because of this call (the whole range: the mask is byte-exact).
        Returns once the record is durable. Repeating a call is harmless. ``export_size`` is
        remembered with the generation's first clear (see :meth:`export_size`). Raises
        :class:`ScopeFullError` (nothing recorded) when the scope would exceed
        ``max_intervals``."""
        if offset < 0 or length <= 0 or offset + length > MAX_OFFSET:
            raise LedgerError(f"cannot record the range [{offset}, {offset + length})")
        await self._submit("clear", scope, offset, offset + length, export_size)
        return [(offset, length)]

    async def set_generation(
        self, export: str, generation: str, *, source: str = "api"
    ) -> str | None:
        """Make ``generation`` the export's current one (durably); returns the previous one."""
        if not generation:
            raise LedgerError("a generation cannot be empty")
        previous = self._generations.get(export)
        await self._submit("set_generation", export, generation, None, source)
        return previous

    async def apply_config_generation(self, export: str, generation: str) -> str:
        """The configuration names ``generation`` for the export. It becomes current when the
        configuration changed since the last start (the operator's word is the latest); an
        API-set generation survives restarts with an unchanged configuration. Returns the
        current generation."""
        await self._submit("set_generation", export, generation, generation, "config")
        return self._generations[export]

    # --- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._db.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # see DATA_DIR_MODE
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise LedgerError(f"ledger {self.path} has schema {row[0]}, not {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the ledger {self.path}: {exc}") from exc
        return db

    def _load_generations(self) -> None:
        for export, generation in self._db.execute("SELECT export, generation FROM generations"):
            self._generations[export] = generation
        for export, generation, size in self._db.execute("SELECT * FROM generation_sizes"):
            self._sizes[export, generation] = size

    async def _submit(self, kind: str, *args: Any) -> Any:
        if self._closed:
            raise LedgerError("the ledger is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def done(exc: BaseException | None, value: Any) -> None:
            def settle() -> None:
                if fut.done():
                    return
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(value)

            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                loop.call_soon_threadsafe(settle)

        self._queue.put(_Op(kind, args, done))
        # Shielded: a caller cancelled after submitting must not make the record look undone
        # while it still commits (the commit is what matters, and it is idempotent).
        return await asyncio.shield(fut)

    def _worker(self) -> None:
        last_batch, last_commit = 1, 0.0
        while True:
            op = self._queue.get()
            if op is None:
                return
            batch = [op]
            stop = False
            # Under concurrency (the last batch held several clears), wait a fraction of a
            # commit for the callers that are about to arrive: one fsync then covers them all.
            # A lone caller never waits.
            window = min(GATHER_MAX, last_commit * GATHER_FRACTION) if last_batch > 1 else 0.0
            deadline = time.monotonic() + window
            while len(batch) < MAX_BATCH:
                left = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            t0 = time.perf_counter()
            self._run_batch(batch)
            last_batch, last_commit = len(batch), time.perf_counter() - t0
            if stop:
                return

    def _run_batch(self, batch: list[_Op]) -> None:
        loads = [op for op in batch if op.kind == "load"]
        writes = [op for op in batch if op.kind != "load"]
        for op in loads:
            try:
                op.done(None, self._load(op.args[0]))
            except Exception as exc:
                op.done(LedgerError(f"ledger read failed: {exc}"), None)
        if not writes:
            return
        t0 = time.perf_counter()
        db = self._db
        pending_masks: dict[Scope, IntervalSet] = {}
        pending_gens: dict[str, str] = {}
        pending_sizes: dict[tuple[str, str], int] = {}
        results: list[Any] = []
        # Exports whose generation changed in this batch: their other generations' clears go.
        moved: dict[str, str] = {}
        try:
            db.execute("BEGIN IMMEDIATE")
            for op in writes:
                if op.kind == "clear":
                    scope, start, stop, size = op.args
                    current = pending_gens.get(scope.export, self._generations.get(scope.export))
                    if current is not None and current != scope.generation:
                        # The generation changed after the caller checked it: recording the
                        # clear would resurrect it if the name came back.
                        results.append(GenerationChangedError(scope, current))
                        continue
                    mask = pending_masks.get(scope)
                    if mask is None:
                        # Loaded before this transaction writes the scope: what _load
                        # publishes must be committed state only. (A copy costs O(blocks):
                        # IntervalSet copies on write.)
                        mask = self._load(scope).copy()
                        pending_masks[scope] = mask
                    after = mask.length_after_add(start, stop)
                    if after > self.max_intervals and after > len(mask):
                        # Checked before anything of this clear is written: refused whole. A
                        # clear that merges intervals (no more of them) always passes, so a
                        # scope over a lowered cap can still be cleared towards one interval.
                        results.append(ScopeFullError(scope, self.max_intervals, len(mask)))
                        continue
                    key = (scope.export, scope.generation)
                    if size is not None and key not in self._sizes and key not in pending_sizes:
                        db.execute(
                            "INSERT OR IGNORE INTO generation_sizes VALUES (?, ?, ?)", (*key, size)
                        )
                        pending_sizes[key] = size
                    db.execute(
                        "INSERT INTO clears VALUES (?, ?, ?, ?, ?)",
                        (scope.export, scope.bitmap, scope.generation, start, stop),
                    )
                    mask.add(start, stop)
                    self._rows[scope] = self._rows.get(scope, 0) + 1
                    results.append(None)
                else:
                    export, generation, config_generation, source = op.args
                    before = pending_gens.get(export, self._generations.get(export))
                    now = self._set_generation(export, generation, config_generation, source)
                    results.append(now)
                    pending_gens[export] = now
                    if now != before:
                        self._forget_others(export, now)
                        moved[export] = now
                        for scope in [s for s in pending_masks if s.export == export]:
                            if scope.generation != now:
                                del pending_masks[scope]
                        for key in [k for k in pending_sizes if k[0] == export]:
                            if key[1] != now:
                                del pending_sizes[key]
            for scope, mask in pending_masks.items():
                if self._rows.get(scope, 0) > len(mask) + COMPACT_SLACK:
                    self._compact(scope, mask)
            db.execute("COMMIT")
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            # Row counts may be off after a rollback: recount on next load.
            for scope in pending_masks:
                self._rows.pop(scope, None)
                self._masks.pop(scope, None)
            log.error("ledger commit failed: %s", exc)
            err = LedgerError(f"ledger commit failed: {exc}")
            for op in writes:
                op.done(err, None)
            return
        # Durable: publish, then acknowledge.
        for export, now in moved.items():
            for scope in [s for s in self._masks if s.export == export]:
                if scope.generation != now:
                    self._masks.pop(scope, None)
                    self._rows.pop(scope, None)
            for key in [k for k in self._sizes if k[0] == export]:
                if key[1] != now:
                    del self._sizes[key]
        self._masks.update(pending_masks)
        self._generations.update(pending_gens)
        self._sizes.update(pending_sizes)
        st = self.stats
        st.commits += 1
        st.clears += sum(
            1
            for op, value in zip(writes, results, strict=True)
            if op.kind == "clear" and not isinstance(value, BaseException)
        )
        st.largest_batch = max(st.largest_batch, len(writes))
        st.commit_seconds += time.perf_counter() - t0
        for op, value in zip(writes, results, strict=True):
            if isinstance(value, BaseException):
                op.done(value, None)
            else:
                op.done(None, value)

    def _load(self, scope: Scope) -> IntervalSet:
        mask = self._masks.get(scope)
        if mask is not None:
            return mask
        rows = self._db.execute(
            "SELECT start, stop FROM clears WHERE export = ? AND bitmap = ? AND generation = ?"
            " ORDER BY start",
            (scope.export, scope.bitmap, scope.generation),
        ).fetchall()
        mask = IntervalSet(rows)
        current = self._generations.get(scope.export)
        if current is None or current == scope.generation:
            # Only current scopes stay in memory: a past generation's mask is empty and
            # would never be dropped.
            self._rows[scope] = len(rows)
            self._masks[scope] = mask
        return mask

    def _forget_others(self, export: str, generation: str) -> None:
        """Delete the clears of every generation of ``export`` but ``generation``: a
        generation is a point in time, and once the export moved on it never shows it again."""
        self._db.execute(
            "DELETE FROM clears WHERE export = ? AND generation != ?", (export, generation)
        )
        self._db.execute(
            "DELETE FROM generation_sizes WHERE export = ? AND generation != ?",
            (export, generation),
        )

    def _compact(self, scope: Scope, mask: IntervalSet) -> None:
        key = (scope.export, scope.bitmap, scope.generation)
        self._db.execute(
            "DELETE FROM clears WHERE export = ? AND bitmap = ? AND generation = ?", key
        )
        self._db.executemany(
            "INSERT INTO clears VALUES (?, ?, ?, ?, ?)", [(*key, s, e) for s, e in mask]
        )
        self._rows[scope] = len(mask)

    def _set_generation(
        self, export: str, generation: str, config_generation: str | None, source: str
    ) -> str:
        row = self._db.execute(
            "SELECT generation, config_generation FROM generations WHERE export = ?", (export,)
        ).fetchone()
        now = time.time()
        if config_generation is not None:
            if row is not None and row[1] == config_generation:
                return str(row[0])  # unchanged configuration: keep what the API set since
            self._db.execute(
                "INSERT OR REPLACE INTO generations VALUES (?, ?, ?, 'config', ?)",
                (export, config_generation, config_generation, now),
            )
            return config_generation
        self._db.execute(
            "INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?)",
            (export, generation, row[1] if row is not None else None, source, now),
        )
        return generation
