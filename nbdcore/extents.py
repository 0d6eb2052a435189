"""Extents: the rules for turning raw NBD_CMD_BLOCK_STATUS answers into a clean map.

The spec ("NBD_CMD_BLOCK_STATUS" in doc/proto.md) lets a server answer loosely, and a client
must cope:

- an answer may cover *less* than asked (the client continues from where it ends, per context),
- only its *last* extent may run past the end of the request (the client clips it),
- contexts may cover different amounts and cut the range at different boundaries,
- adjacent extents may carry the same flags (within an answer and across answers).

This module holds those rules as pure functions over ``array`` columns (no sockets, no
per-extent Python objects on the hot path), a sans-I/O :class:`ExtentWalker` that plans the
requests of a walk and assembles their answers, and :func:`iter_extents`, the thin asyncio loop
that drives it over an :class:`~nbdcore.aio.client.NBDClient`. ovirt-imageio's ``nbdutil`` is
the model for the rules (clip, merge runs, merge ``base:allocation`` with a dirty bitmap); the
implementation works on whole columns so that a million-extent bitmap costs tens of
nanoseconds per extent.

A *table* is ``(lengths, columns)``: ``lengths`` an ``array("Q")`` of consecutive extent
lengths and ``columns`` one ``array("Q")`` of flags per context, each as long as ``lengths``.
"""

from __future__ import annotations

import asyncio
import enum
import operator
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, compress, repeat
from typing import TYPE_CHECKING, Protocol

from nbdcore.constants import (
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    NBD_STATE_DIRTY,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
)
from nbdcore.exceptions import ServerProtocolError, UsageError

if TYPE_CHECKING:
    from nbdcore.wire import BlockSize

__all__ = [
    "Allocation",
    "AllocationBatch",
    "BlockStatusClient",
    "ExtentBatch",
    "ExtentWalker",
    "allocation_of",
    "bitmap_context",
    "classify",
    "clip_table",
    "fit_answer",
    "iter_allocation",
    "iter_extents",
    "merge_contexts",
    "merge_runs",
    "to_u64",
    "trim_head",
    "walker_for",
]

Columns = tuple["array[int]", ...]
Table = tuple["array[int]", Columns]
Answer = Mapping[str, tuple["array[int]", "array[int]"]]

_LITTLE = sys.byteorder == "little"
# Compact requests carry a 32-bit length: stay below 4 GiB, keeping the step aligned
# (nbdinfo --map does the same: UINT32_MAX - align + 1).
_COMPACT_LIMIT = 1 << 32
# Extended headers carry 64-bit lengths; a server still answers at most one chunk's worth.
_EXTENDED_LIMIT = 1 << 62
DEFAULT_ALIGN = 512  # steps end on multiples of this (or of the minimum block, if larger)
DEFAULT_MAX_EXTENTS = 65536
# Requests in flight per walk: measured against qemu-nbd 7.2, 4 beat 1 by ~30% and 8 added
# nothing; each holds at most one answer (qemu: <= 131072 extents).
DEFAULT_DEPTH = 4
# Extents one answer should carry (qemu's chunk: 1 MiB of compact extents). The spec lets a
# server send up to 2^20 per context: with ``depth`` answers in flight that held ~140 MiB per
# walk. Requests are sized from the density seen so far so that answers stay near this.
DEFAULT_ANSWER_EXTENTS = 131072


# --- Batches ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExtentBatch:
    """Consecutive rows from ``offset``: ``lengths[i]`` bytes whose flags are ``flags[k][i]`` in
    the k-th requested context. Both are ``array("Q")``."""

    offset: int
    lengths: array[int]
    flags: tuple[array[int], ...]

    @property
    def end(self) -> int:
        return self.offset + sum(self.lengths)

    def rows(self) -> list[tuple[int, int, tuple[int, ...]]]:
        """(offset, length, flags per context) per row: handy in tests and tools, slow."""
        starts = accumulate(self.lengths, initial=self.offset)
        return list(zip(starts, self.lengths, zip(*self.flags, strict=True), strict=False))


class Allocation(enum.IntEnum):
    """What a reader of a range must do, from ``base:allocation``."""

    DATA = 0  # read it (this includes NBD_STATE_HOLE without ZERO: contents are undefined)
    ZERO = 1  # reads as zeroes, allocated
    HOLE = 2  # reads as zeroes, not allocated


# Index: base:allocation flags & 3.
_ALLOCATION_TABLE = bytes(
    [
        Allocation.DATA,  # 0: data
        Allocation.DATA,  # HOLE only: undefined contents must still be read
        Allocation.ZERO,  # ZERO
        Allocation.HOLE,  # HOLE | ZERO
    ]
)


def allocation_of(flags: int) -> Allocation:
    """Classify one ``base:allocation`` status (reserved bits ignored, as the spec says)."""
    return Allocation(_ALLOCATION_TABLE[flags & (NBD_STATE_HOLE | NBD_STATE_ZERO)])


@dataclass(frozen=True, slots=True)
class AllocationBatch:
    """Rows from ``offset`` with their :class:`Allocation` and dirtiness (0 or 1), both
    ``array("B")``; adjacent rows differ in at least one of the two."""

    offset: int
    lengths: array[int]
    allocation: array[int]
    dirty: array[int]

    @property
    def end(self) -> int:
        return self.offset + sum(self.lengths)


# --- Pure rules -------------------------------------------------------------------------------


def to_u64(values: array[int]) -> array[int]:
    """``values`` as an ``array("Q")`` (the same object if it already is one).

    Widening 32-bit items goes through bytes (strided copies into a zeroed buffer), several
    times faster than ``array("Q", values)``, which boxes every item.
    """
    if values.typecode == "Q":
        return values
    if values.typecode == "I" and values.itemsize == 4 and _LITTLE:
        out = bytearray(len(values) * 8)
        memoryview(out).cast("I")[0::2] = memoryview(values)
        wide = array("Q")
        wide.frombytes(out)
        return wide
    return array("Q", values)


def fit_answer(
    lengths: array[int], flags: array[int], request_length: int, *, strict: bool = True
) -> tuple[array[int], array[int], int]:
    """Check one context's raw answer to a request of ``request_length`` bytes and clip it.

    Returns ``(lengths, flags, covered)`` as ``array("Q")`` columns, with ``covered`` bytes
    described (at most ``request_length``; less when the server answered short). The arrays
    may be modified in place. ``strict=False`` skips the per-extent zero-length scan, for
    answers that the client already checked.
    """
    n = len(lengths)
    if n == 0:
        raise ServerProtocolError("block status answer without extents")
    if len(flags) != n:
        raise ServerProtocolError("block status answer with unequal lengths and flags")
    if strict and 0 in lengths:
        raise ServerProtocolError("block status extent of length 0")
    lengths = to_u64(lengths)
    flags = to_u64(flags)
    total = sum(lengths)
    last = lengths[-1]
    if total - last >= request_length:
        # Only the final extent may run past the end of the request.
        raise ServerProtocolError(
            f"block status extents run past the request end ({request_length} bytes) "
            "before the last extent"
        )
    if total > request_length:
        lengths[-1] = last - (total - request_length)
        total = request_length
    return lengths, flags, total


def clip_table(lengths: array[int], columns: Columns, length: int) -> Table:
    """The first ``length`` bytes of a table (``0 < length <= sum(lengths)``)."""
    ends = array("Q", accumulate(lengths))
    i = bisect_left(ends, length)
    if i == len(ends) - 1 and ends[i] == length:
        return lengths, columns
    lengths = lengths[: i + 1]
    lengths[i] -= ends[i] - length
    return lengths, tuple(col[: i + 1] for col in columns)


def trim_head(lengths: array[int], columns: Columns, skip: int) -> Table:
    """The table without its first ``skip`` bytes (``0 <= skip < sum(lengths)``)."""
    if skip == 0:
        return lengths, columns
    ends = array("Q", accumulate(lengths))
    i = bisect_right(ends, skip)
    lengths = lengths[i:]
    lengths[0] = ends[i] - skip
    return lengths, tuple(col[i:] for col in columns)


def _alternates(col: array[int]) -> bool:
    """True if ``col`` is 0/1 alternating (a dirty bitmap answer): no equal neighbours.
    A byte comparison against a precomputed pattern, without copies (``startswith`` takes a
    buffer and an offset), costs under 1 ns per item."""
    n = len(col)
    first = col[0]
    if first > 1 or col.typecode != "Q":
        return False
    pattern = _alternating_pattern(n + 1)
    return pattern.startswith(memoryview(col).cast("B"), first * 8)


_PATTERN = array("Q", [0, 1] * 4096).tobytes()


def _alternating_pattern(n: int) -> bytes:
    global _PATTERN
    while len(_PATTERN) < 8 * (n + 1):
        _PATTERN = _PATTERN * 2
    return _PATTERN


def merge_runs(lengths: array[int], columns: Columns) -> Table:
    """Merge adjacent rows whose flags are equal in every column."""
    n = len(lengths)
    if n < 2:
        return lengths, columns
    if len(columns) == 1 and _alternates(columns[0]):
        return lengths, columns
    changed = None
    for col in columns:
        diff = map(operator.ne, col[1:], col[:-1])
        changed = diff if changed is None else map(operator.or_, changed, diff)
    if changed is None:  # no columns: one run
        return array("Q", [sum(lengths)]), columns
    return _merge_at(lengths, columns, list(compress(range(1, n), changed)))


def _merge_at(lengths: array[int], columns: Columns, starts: list[int]) -> Table:
    """Rows merged into runs that begin at row 0 and at each of ``starts`` (ascending)."""
    n = len(lengths)
    if len(starts) == n - 1:
        return lengths, columns
    ends = array("Q", accumulate(lengths))
    run_ends = array("Q", map(ends.__getitem__, [s - 1 for s in starts]))
    run_ends.append(ends[-1])
    merged = array("Q", map(operator.sub, run_ends, [0, *run_ends[:-1]]))
    firsts = [0, *starts]
    return merged, tuple(array(col.typecode, map(col.__getitem__, firsts)) for col in columns)


def merge_contexts(tables: Sequence[tuple[array[int], array[int]]]) -> Table:
    """Merge one ``(lengths, flags)`` per context, all covering the same bytes, into rows whose
    flags are constant in every context (the union of all boundaries).

    If no context has equal neighbours, neither has the result: every boundary is one where
    some context changes.

    The usual case is one dense context (a fragmented bitmap) and sparse ones
    (``base:allocation`` of a mostly empty disk): the dense one's column is kept as it is and
    the sparse ones are expanded run by run, so the per-row work stays in C.
    """
    if not tables:
        raise UsageError("merge_contexts needs at least one context")
    if len(tables) == 1:
        return tables[0][0], (tables[0][1],)
    dense = max(range(len(tables)), key=lambda k: len(tables[k][0]))
    others = sum(len(lengths) for k, (lengths, _) in enumerate(tables) if k != dense)
    if others * 8 <= len(tables[dense][0]):
        return _merge_into_dense(tables, dense)
    # Lists, not arrays: bisect on a list compares stored ints instead of boxing each probe.
    all_ends = [list(accumulate(lengths)) for lengths, _ in tables]
    total = all_ends[0][-1]
    if any(ends[-1] != total for ends in all_ends):
        raise UsageError("merge_contexts: contexts cover different lengths")
    union = sorted(set().union(*all_ends))
    merged = array("Q", map(operator.sub, union, [0, *union[:-1]]))
    columns = tuple(
        _expand(flags, ends, union) for ends, (_, flags) in zip(all_ends, tables, strict=True)
    )
    return merged, columns


_LOCATE_BLOCK = 4096


def _locate(lengths: array[int], targets: list[int]) -> tuple[int, list[tuple[int, int]]]:
    """The total of ``lengths``, and for each target byte position (ascending, inside the
    table): ``(i, end)``, row i being the first whose end is >= the target.

    Prefix sums of a whole dense column cost a Python int per row; here one pass sums blocks
    of rows, and only the blocks that hold a target get prefix sums."""
    step = _LOCATE_BLOCK
    block_ends = list(
        accumulate(map(sum, (lengths[j : j + step] for j in range(0, len(lengths), step))))
    )
    out = []
    block = -1
    inner: list[int] = []
    for x in targets:
        b = bisect_left(block_ends, x)
        if b != block:
            block = b
            inner = list(
                accumulate(
                    lengths[b * step : (b + 1) * step], initial=block_ends[b - 1] if b else 0
                )
            )
        k = bisect_left(inner, x, 1)
        out.append((b * step + k - 1, inner[k]))
    return (block_ends[-1] if block_ends else 0), out


def _merge_into_dense(tables: Sequence[tuple[array[int], array[int]]], dense: int) -> Table:
    """merge_contexts when one context has most of the rows: its columns are copied in
    slices, split where another context has a boundary inside one of its rows, and the sparse
    contexts' flags are repeated over the rows each of their rows spans."""
    lengths, flags = tables[dense]
    sparse_ends = [list(accumulate(t[0])) for k, t in enumerate(tables) if k != dense]
    targets = sorted({x for ends in sparse_ends for x in ends[:-1]})
    total, located = _locate(lengths, targets)
    if any(ends[-1] != total for ends in sparse_ends):
        raise UsageError("merge_contexts: contexts cover different lengths")
    if not targets:  # no boundary inside the dense rows: its columns are the result
        return lengths, tuple(
            flags if k == dense else array(f.typecode, [f[0]]) * len(lengths)
            for k, (_, f) in enumerate(tables)
        )
    merged = array("Q")
    column = array(flags.typecode)
    rows_before: dict[int, int] = {}  # cut position -> merged rows that end at or before it
    count = 0
    prev = 0  # next dense row not yet copied
    j = 0
    while j < len(targets):
        i, end = located[j]
        merged.extend(lengths[prev:i])
        column.extend(flags[prev:i])
        count += i - prev
        cut = end - lengths[i]
        f = flags[i]
        while j < len(targets) and located[j][0] == i:
            x = targets[j]
            if x < end:  # inside row i: split it
                merged.append(x - cut)
                column.append(f)
                count += 1
                cut = x
                rows_before[x] = count
            j += 1
        merged.append(end - cut)
        column.append(f)
        count += 1
        rows_before[end] = count
        prev = i + 1
    merged.extend(lengths[prev:])
    column.extend(flags[prev:])
    count += len(lengths) - prev
    columns: list[array[int]] = []
    sparse = iter(sparse_ends)
    for k, (_, sflags) in enumerate(tables):
        if k == dense:
            columns.append(column)
            continue
        ends = next(sparse)
        stops = [rows_before[x] for x in ends[:-1]]
        stops.append(count)
        col = array(sflags.typecode)
        for f, n in zip(sflags, map(operator.sub, stops, [0, *stops[:-1]]), strict=True):
            col += array(sflags.typecode, [f]) * n  # few rows: a memset-like repeat each
        columns.append(col)
    return merged, tuple(columns)


def _expand(flags: array[int], ends: list[int], union: list[int]) -> array[int]:
    """The column of one context over the rows cut at ``union`` (a superset of ``ends``)."""
    missing = len(union) - len(ends)
    if missing == 0:
        return flags
    if missing <= len(ends):
        # Few new cuts: copy the column in slices, repeating a row's flags at each cut.
        col = array(flags.typecode)
        prev = 0
        for cut in sorted(set(union).difference(ends)):
            i = bisect_left(ends, cut)
            col.extend(flags[prev:i])
            col.append(flags[i])
            prev = i
        col.extend(flags[prev:])
        return col
    # Many new cuts (a sparse context): repeat each row's flags once per union row in it.
    stops = [bisect_left(union, e) + 1 for e in ends]
    counts = map(operator.sub, stops, [0, *stops[:-1]])
    return array(flags.typecode, chain.from_iterable(map(repeat, flags, counts)))


# Low byte of a status -> Allocation, and -> dirty bit (only bits 0-1 matter to either).
_KIND_BYTES = bytes(_ALLOCATION_TABLE[i & (NBD_STATE_HOLE | NBD_STATE_ZERO)] for i in range(256))
_DIRTY_BYTES = bytes(i & NBD_STATE_DIRTY for i in range(256))


def _low_bytes(col: array[int]) -> bytes:
    """The low byte of every item, as bytes (a strided copy for "Q" arrays)."""
    if col.typecode == "B":
        return col.tobytes()
    if col.typecode == "Q" and _LITTLE:
        return memoryview(col).cast("B")[0::8].tobytes()
    return bytes(x & 0xFF for x in col)


def classify(lengths: array[int], allocation: array[int], dirty: array[int]) -> Table:
    """Rows of (base:allocation flags, bitmap flags) as (:class:`Allocation`, dirty 0/1)
    columns of typecode "B", with rows made equal by the mapping merged.

    Works on bytes: translate tables map the statuses, and rows that change are found by
    XOR-ing the packed row keys shifted by one row, as big integers (all in C)."""
    n = len(lengths)
    kinds = _low_bytes(allocation).translate(_KIND_BYTES)
    dirt = _low_bytes(dirty).translate(_DIRTY_BYTES)
    columns = (array("B", kinds), array("B", dirt))
    if n < 2:
        return lengths, columns
    # One byte per row, kind | dirty << 2: no carries between bytes.
    key = (int.from_bytes(kinds, "little") | int.from_bytes(dirt, "little") << 2).to_bytes(
        n, "little"
    )
    change = int.from_bytes(key[1:], "little") ^ int.from_bytes(key[:-1], "little")
    return _merge_at(
        lengths, columns, list(compress(range(1, n), change.to_bytes(n - 1, "little")))
    )


# --- Sans-I/O walk ----------------------------------------------------------------------------


class _Segment:
    """A piece of the range, answered by one request: ``sent`` is the (first, last) byte range
    actually asked (block-aligned, possibly wider than the segment), None until it is sent."""

    __slots__ = ("end", "sent", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.sent: tuple[int, int] | None = None


class _Joiner:
    """Holds back the last row of what it was given, so that a row equal to it at the start of
    the next piece merges across the boundary; cuts rows into batches of at most ``limit``."""

    __slots__ = ("held", "limit", "typecodes")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: tuple[int, int, tuple[int, ...]] | None = None  # start, length, flags
        self.typecodes = ""

    def push(
        self, offset: int, lengths: array[int], columns: Columns, total: int | None = None
    ) -> list[Table | int]:
        """Rows from ``offset``, ``total`` bytes (computed if not given); the arrays are
        modified in place."""
        if total is None:
            total = sum(lengths)
        end = offset + total
        held = self.held
        if held is not None:
            hstart, hlen, hflags = held
            if all(col[0] == f for col, f in zip(columns, hflags, strict=True)):
                lengths[0] += hlen
            else:
                lengths.insert(0, hlen)
                for col, f in zip(columns, hflags, strict=True):
                    col.insert(0, f)
            offset = hstart
        last = lengths.pop()
        flags = tuple(col.pop() for col in columns)
        self.held = (end - last, last, flags)
        self.typecodes = "".join(col.typecode for col in columns)
        return self._cut(offset, lengths, columns)

    def flush(self) -> list[Table | int]:
        if self.held is None:
            return []
        start, length, flags = self.held
        self.held = None
        cols = tuple(array(t, [f]) for t, f in zip(self.typecodes, flags, strict=True))
        return [start, (array("Q", [length]), cols)]

    def _cut(self, offset: int, lengths: array[int], columns: Columns) -> list[Table | int]:
        """[offset, table, offset, table...] flattened, in batches of at most ``limit`` rows."""
        out: list[Table | int] = []
        n = len(lengths)
        if n == 0:
            return out
        if n <= self.limit:
            return [offset, (lengths, columns)]
        for i in range(0, n, self.limit):
            part = lengths[i : i + self.limit]
            out += [offset, (part, tuple(col[i : i + self.limit] for col in columns))]
            if i + self.limit < n:  # (no sum over the last part: nothing follows it)
                offset += sum(part)
        return out


class ExtentWalker:
    """The sans-I/O core of :func:`iter_extents`: plans BLOCK_STATUS requests over
    ``[offset, offset + length)`` and assembles their answers into :class:`ExtentBatch`.

    Use: send every ``(offset, length)`` of :meth:`requests`; feed the answer of the request
    at offset :attr:`head` to :meth:`receive` (a follow-up request can come before requests
    sent earlier, so key answers by offset), collect :meth:`batches`; repeat until
    :attr:`done`.

    The range is cut into segments of ``step`` bytes, at most ``depth`` requests outstanding
    (one more when the awaited follow-up needs it). A short answer leaves the rest of its
    segment as the next one to ask for, and shrinks ``step`` to what the server covered (the
    segments in flight are cut to it as well), so that later requests are answered whole
    instead of in chains of follow-ups; complete answers let it grow again. ``step`` is also
    kept to what, at the density of the last answer, holds ``answer_extents`` extents, and
    starts at ``answer_extents`` blocks of ``align`` bytes (nothing is known of the density
    yet), so that a server allowed to answer 2^20 extents per context does not make the walk
    hold ``depth`` such answers. Memory is bounded by ``depth + 1`` answers of about
    ``answer_extents`` extents per context plus one batch, whatever the range or the server.
    """

    def __init__(
        self,
        contexts: Sequence[str],
        offset: int,
        length: int,
        *,
        max_extents: int = DEFAULT_MAX_EXTENTS,
        align: int = DEFAULT_ALIGN,
        max_step: int = _COMPACT_LIMIT - DEFAULT_ALIGN,
        depth: int = DEFAULT_DEPTH,
        block: int = 1,
        size: int | None = None,
        answer_extents: int = DEFAULT_ANSWER_EXTENTS,
    ) -> None:
        if isinstance(contexts, str):
            raise UsageError(f"contexts must be a sequence of names, not the string {contexts!r}")
        if not contexts:
            raise UsageError("no metadata context to walk")
        if len(set(contexts)) != len(contexts):
            raise UsageError("a metadata context is named twice")
        if offset < 0 or length < 0:
            raise UsageError("negative offset or length")
        if max_extents < 1 or depth < 1 or align < 1 or max_step < align or answer_extents < 1:
            raise UsageError(
                "max_extents, depth, align, answer_extents must be positive and max_step >= align"
            )
        if block < 1 or align % block:
            raise UsageError("block must be positive and divide align")
        self.contexts = tuple(contexts)
        self.offset = offset
        self.end = offset + length
        self.align = align
        # Requests start and end on multiples of ``block`` (the export's minimum block size,
        # which the spec says requests MUST respect once it was asked for); answers are
        # clipped back to the range. ``size`` caps the rounding up at the end of the export.
        self.block = block
        self.size = size if size is not None else self.end
        self.max_step = max_step - max_step % align
        # Start with the range shared among the first ``depth`` requests, so that even a
        # range one request could ask for (extended headers) is walked in parallel.
        share = -(-length // depth)
        self.answer_extents = answer_extents
        # The densest map (one extent per aligned block) answers answer_extents extents here.
        self._dense_step = min(self.max_step, answer_extents * align)
        self.step = min(self._dense_step, max(align, share + (-share) % align))
        self.depth = depth
        self._segments: list[_Segment] = []
        self._next = offset  # first byte not yet in any segment
        self._joiner = _Joiner(max_extents)
        self._ready: list[ExtentBatch] = []
        self.requests_sent = 0

    @property
    def head(self) -> int:
        """Offset of the oldest outstanding request: the one :meth:`receive` wants next."""
        if not self._segments or self._segments[0].sent is None:
            raise UsageError("no block status request is outstanding")
        return self._segments[0].sent[0]

    @property
    def done(self) -> bool:
        return not self._segments and self._next >= self.end and not self._ready

    def _cut(self, start: int, limit: int) -> int:
        """End of a segment starting at ``start``: ``step`` bytes, ending on an aligned offset
        so that requests start aligned after the first one."""
        end = start + self.step
        aligned = end - end % self.align
        if aligned > start:
            end = aligned
        return min(end, limit)

    def _request(self, seg: _Segment) -> tuple[int, int]:
        """The block-aligned byte range asked for a segment."""
        first = seg.start - seg.start % self.block
        last = min(-(-seg.end // self.block) * self.block, self.size)
        return first, last

    def requests(self) -> list[tuple[int, int]]:
        """New requests to send now, as (offset, length): segments in order, unsent ones cut
        to ``step``, while fewer than ``depth`` are outstanding (the oldest always goes: its
        answer is the one awaited)."""
        out: list[tuple[int, int]] = []
        segs = self._segments
        outstanding = sum(1 for seg in segs if seg.sent is not None)
        i = 0
        while True:
            if i == len(segs):
                if self._next >= self.end or outstanding >= self.depth:
                    break
                segs.append(_Segment(self._next, self._cut(self._next, self.end)))
                self._next = segs[-1].end
            seg = segs[i]
            if seg.sent is None:
                if outstanding >= self.depth and i > 0:
                    break
                cut = self._cut(seg.start, seg.end)
                if cut < seg.end:
                    segs.insert(i + 1, _Segment(cut, seg.end))
                    seg.end = cut
                seg.sent = self._request(seg)
                outstanding += 1
                out.append((seg.sent[0], seg.sent[1] - seg.sent[0]))
            i += 1
        self.requests_sent += len(out)
        return out

    def _resplit(self) -> None:
        """After the step shrank: cut the segments in flight to the new step, so that the
        rest of each is asked for now rather than after its (likely short) answer. Their
        answers are clipped to the shorter segment when they arrive."""
        segs = self._segments
        i = 1
        while i < len(segs):
            seg = segs[i]
            if seg.sent is not None:
                cut = self._cut(seg.start, seg.end)
                if cut < seg.end:
                    segs.insert(i + 1, _Segment(cut, seg.end))
                    seg.end = cut
                    i += 1
            i += 1

    def receive(self, offset: int, answer: Answer) -> None:
        """Feed the answer to the oldest outstanding request (which started at ``offset``)."""
        if not self._segments or self._segments[0].sent is None:
            raise UsageError("no block status request is outstanding")
        seg = self._segments[0]
        first, last = self._segments[0].sent
        if offset != first:
            raise UsageError(f"expected the answer for offset {first}, got {offset}")
        skip = seg.start - first  # rounding down to a block: not part of the range
        want = seg.end - seg.start
        fitted = []
        for name in self.contexts:
            try:
                lengths, flags = answer[name]
            except KeyError:
                raise ServerProtocolError(f"block status answer lacks context {name}") from None
            fitted.append(fit_answer(lengths, flags, last - first, strict=False))
        # Rows can only be emitted where every context has answered; the walk continues
        # from the shortest answer, for all contexts. What the longer answers said past it is
        # dropped and asked again: simpler than carrying per-context leftovers, and without
        # the BLOCK_STATUS_PAYLOAD filter (extended headers only) the server would send every
        # context anyway.
        covered = min(f[2] for f in fitted) - skip
        if covered <= 0:
            raise ServerProtocolError(
                f"block status answer for offset {first} ends before {seg.start}, "
                "inside the first block"
            )
        covered = min(covered, want)
        # The density of this answer caps the next steps (the densest context counts).
        answered = min(f[2] for f in fitted)
        dense = max(len(f[0]) for f in fitted)
        cap = answered * self.answer_extents // dense
        self._dense_step = min(self.max_step, max(self.align, cap - cap % self.align))
        offset = seg.start
        tables = []
        for lengths, flags, got in fitted:
            if skip:
                lengths, (flags,) = trim_head(lengths, (flags,), skip)
            if got - skip > covered:
                lengths, (flags,) = clip_table(lengths, (flags,), covered)
            tables.append(merge_runs(lengths, (flags,)))
        lengths, columns = merge_contexts([(t[0], t[1][0]) for t in tables])
        if covered < want:
            # Short answer: ask for the rest next, and size new requests to what this server
            # answers in one go.
            seg.start += covered
            seg.sent = None
            step = max(covered - covered % self.align, self.align)
            if step < self.step:
                self.step = step
                self._resplit()
            self.step = min(self.step, self._dense_step)
        else:
            del self._segments[0]
            self.step = min(self.step * 2, self.max_step, self._dense_step)
        self._emit(self._joiner.push(offset, lengths, columns, covered))
        if not self._segments and self._next >= self.end:
            self._emit(self._joiner.flush())

    def _emit(self, parts: list[Table | int]) -> None:
        for i in range(0, len(parts), 2):
            start = parts[i]
            table = parts[i + 1]
            assert isinstance(start, int) and isinstance(table, tuple)
            self._ready.append(ExtentBatch(start, table[0], table[1]))

    def batches(self) -> list[ExtentBatch]:
        """Batches completed since the last call, in order."""
        out, self._ready = self._ready, []
        return out


# --- asyncio ----------------------------------------------------------------------------------


class BlockStatusClient(Protocol):
    """What :func:`iter_extents` needs of :class:`~nbdcore.aio.client.NBDClient`."""

    @property
    def size(self) -> int: ...
    @property
    def extended_headers(self) -> bool: ...
    @property
    def block_size(self) -> BlockSize | None: ...
    @property
    def meta_contexts(self) -> dict[str, int]: ...

    async def block_status(
        self,
        offset: int,
        length: int,
        *,
        contexts: Sequence[str] | None = None,
        req_one: bool = False,
    ) -> dict[str, tuple[array[int], array[int]]]: ...


def walker_for(
    client: BlockStatusClient,
    contexts: Sequence[str],
    offset: int = 0,
    length: int | None = None,
    *,
    max_extents: int = DEFAULT_MAX_EXTENTS,
    depth: int = DEFAULT_DEPTH,
) -> ExtentWalker:
    """An :class:`ExtentWalker` for a connected client: checks the range and the contexts,
    and picks the step limits the connection allows."""
    if isinstance(contexts, str):
        raise UsageError(f"contexts must be a sequence of names, not the string {contexts!r}")
    size = client.size
    if length is None:
        length = max(size - offset, 0)
    if offset < 0 or length < 0 or offset + length > size:
        raise UsageError(f"range {offset}+{length} is outside the export (size {size})")
    missing = [c for c in contexts if c not in client.meta_contexts]
    if missing:
        raise UsageError(f"metadata context not negotiated: {', '.join(missing)}")
    bs = client.block_size
    block = bs.minimum if bs is not None else 1
    align = max(block, DEFAULT_ALIGN)
    limit = _EXTENDED_LIMIT if client.extended_headers else _COMPACT_LIMIT
    return ExtentWalker(
        contexts,
        offset,
        length,
        max_extents=max_extents,
        align=align,
        max_step=limit - align,
        depth=depth,
        block=block,
        size=size,
    )


async def iter_extents(
    client: BlockStatusClient,
    contexts: Sequence[str],
    offset: int = 0,
    length: int | None = None,
    *,
    max_extents: int = DEFAULT_MAX_EXTENTS,
    depth: int = DEFAULT_DEPTH,
) -> AsyncIterator[ExtentBatch]:
    """Batches covering ``[offset, offset + length)`` exactly (``length=None``: to the end of
    the export), one column of flags per context in ``contexts`` order, boundaries of all
    contexts merged, adjacent equal rows merged, at most ``max_extents`` rows per batch.
    Up to ``depth`` requests are in flight. Takes ownership of the arrays the client returns.
    """
    walker = walker_for(client, contexts, offset, length, max_extents=max_extents, depth=depth)
    names = list(walker.contexts)
    # Keyed by offset: a short answer puts its follow-up ahead of requests already in flight.
    inflight: dict[int, asyncio.Task[dict[str, tuple[array[int], array[int]]]]] = {}
    try:
        while not walker.done:
            for start, size in walker.requests():
                if start in inflight:  # only with extents that split the minimum block
                    raise ServerProtocolError(
                        f"block status extents not aligned to the minimum block size near {start}"
                    )
                inflight[start] = asyncio.ensure_future(
                    client.block_status(start, size, contexts=names)
                )
            if inflight:
                start = walker.head
                answer = await inflight.pop(start)
                walker.receive(start, answer)
            for batch in walker.batches():
                yield batch
    finally:
        for task in inflight.values():
            task.cancel()
        if inflight:
            await asyncio.gather(*inflight.values(), return_exceptions=True)


def bitmap_context(bitmap: str) -> str:
    """``NAME`` or ``qemu:dirty-bitmap:NAME`` as the context name."""
    return bitmap if ":" in bitmap else CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + bitmap


async def iter_allocation(
    client: BlockStatusClient,
    bitmap: str,
    offset: int = 0,
    length: int | None = None,
    *,
    max_extents: int = DEFAULT_MAX_EXTENTS,
    depth: int = DEFAULT_DEPTH,
) -> AsyncIterator[AllocationBatch]:
    """``base:allocation`` merged with a dirty bitmap (``NAME`` or its full context name):
    per row, :class:`Allocation` (data / zero / hole) and dirty (0/1), so that a backup reads
    only dirty data and writes dirty zero ranges as zeroes."""
    contexts = [CONTEXT_BASE_ALLOCATION, bitmap_context(bitmap)]
    joiner = _Joiner(max_extents)
    async for batch in iter_extents(
        client, contexts, offset, length, max_extents=max_extents, depth=depth
    ):
        lengths, cols = classify(batch.lengths, batch.flags[0], batch.flags[1])
        for part in _tables(joiner.push(batch.offset, lengths, cols)):
            yield part
    for part in _tables(joiner.flush()):
        yield part


def _tables(parts: list[Table | int]) -> list[AllocationBatch]:
    out = []
    for i in range(0, len(parts), 2):
        start = parts[i]
        table = parts[i + 1]
        assert isinstance(start, int) and isinstance(table, tuple)
        lengths, (kinds, dirty) = table
        out.append(AllocationBatch(start, lengths, kinds, dirty))
    return out
