"""Dirty bitmaps: one bit per granule, set when any byte of the granule is written.

Bit ``i`` (granule ``i``, bytes ``[i * granularity, (i + 1) * granularity)`` clipped to the
disk size) is bit ``i % 8`` of byte ``i // 8`` (least significant bit first), so
``int.from_bytes(bits, "little")`` has bit ``i`` for granule ``i``. The last granule may be
partial when the disk size is not a multiple of the granularity.

Run finding never loops per granule in Python: a window of bits becomes one big int ``x``,
``x ^ (x >> 1)`` has a bit set exactly where a run ends, and the set bits of that (sparse) int
are found a byte at a time with a C-speed regex skipping zero bytes and a 256-entry table of
bit positions for the rest. A bitmap of 1M alternating granules gives 1M runs in a few tenths
of a second.

The buffer is any writable buffer: a ``bytearray`` for memory images, or a shared ``mmap`` of
the bits file for persistent ones (see ``nbdcore.storage.store``), so that a bit set here is in
the kernel's page cache, and survives the death of the process, as soon as the store returns.

Write history (conditional clears, docs/extension-clear.md): every mark takes the next number
of a per-bitmap write *sequence* and stamps it on the regions it touches (a region is one
granule, or 2**k granules on disks of more than ``MAX_HISTORY_REGIONS`` granules, so the
history stays within 2 MiB). A *position* ``(history_id, sequence)`` names a point of that
history; ``clear_range_since(position)`` clears only granules whose region is stamped at or
before it, and reports the others as kept: a write that lands after a reader took its
position can never be cleared by that reader. The history lives in its own buffer (a shared
mapping for persistent bitmaps, like the bits), and ``history_id`` is drawn at random whenever
the history cannot be trusted to have kept every stamp (new file, crash of the machine): a
position of an older history then clears nothing.
"""

from __future__ import annotations

import errno
import mmap
import secrets
import struct
import sys
import threading
from array import array
from collections.abc import Iterator
from itertools import accumulate, islice
from typing import Final

from nbdcore.constants import NBD_STATE_DIRTY
from nbdcore.storage.errors import BitmapError, RangeError

MIN_GRANULARITY: Final = 512
MAX_GRANULARITY: Final = 1 << 31  # qemu's limit for persistent bitmaps
DEFAULT_GRANULARITY: Final = 65536
# qemu: BDRV_BITMAP_MAX_NAME_SIZE
MAX_NAME_BYTES: Final = 1023

# The write history: header (magic, history id, sequence, log2 granules per region), then one
# native u64 sequence stamp per region. 2**18 regions: 2 MiB, exact up to 16 GiB at 64 KiB.
HISTORY_MAGIC: Final = b"NBDGWHS1"
_HISTORY_HEADER: Final = struct.Struct("=8sQQQ")
_STAMP: Final = struct.Struct("=Q")
_SEQUENCE_AT: Final = 16  # offset of the sequence in the header
MAX_HISTORY_REGIONS: Final = 1 << 18

# Bytes of bits looked at per step: bounds the temporary big ints (512K granules a step).
_WINDOW_BYTES: Final = 64 * 1024
_ONE_U64: Final = (1).to_bytes(8, sys.byteorder)  # a 1 in one packed array("Q") element
_ones_cache: tuple[int, int] = (0, 0)


def _ones(n: int) -> int:
    """The packed array("Q") of ``n`` ones as an int; the last one is kept, since answers
    of the same length (a server's extent limit) come in a row."""
    global _ones_cache
    cached_n, value = _ones_cache
    if cached_n != n:
        value = int.from_bytes(_ONE_U64 * n, sys.byteorder)
        _ones_cache = (n, value)
    return value


Buffer = bytearray | mmap.mmap


def validate_name(name: str) -> None:
    """Raise BitmapError unless ``name`` is a valid bitmap name (qemu's rules: not empty, at
    most 1023 bytes of UTF-8; we also refuse NUL, which qemu's C strings cannot hold)."""
    if not isinstance(name, str) or not name:
        raise BitmapError("bitmap name cannot be empty")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise BitmapError(f"bitmap name {name!r} is not valid UTF-8") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise BitmapError(f"bitmap name is too long ({len(encoded)} > {MAX_NAME_BYTES} bytes)")
    if "\0" in name:
        raise BitmapError("bitmap name cannot contain NUL")


def validate_granularity(granularity: int) -> None:
    if (
        not isinstance(granularity, int)
        or granularity < MIN_GRANULARITY
        or granularity > MAX_GRANULARITY
        or granularity & (granularity - 1)
    ):
        raise BitmapError(
            f"granularity must be a power of two from {MIN_GRANULARITY} to {MAX_GRANULARITY},"
            f" not {granularity}"
        )


def granule_count(size: int, granularity: int) -> int:
    return (size + granularity - 1) // granularity


def bits_length(size: int, granularity: int) -> int:
    """Bytes needed for the bits of a disk of ``size`` bytes."""
    return (granule_count(size, granularity) + 7) // 8


def history_shift(size: int, granularity: int) -> int:
    """log2 of the granules per history region: 0 (exact) unless the disk has more than
    ``MAX_HISTORY_REGIONS`` granules."""
    granules = granule_count(size, granularity)
    return max(0, (max(granules, 1) - 1).bit_length() - MAX_HISTORY_REGIONS.bit_length() + 1)


def history_length(size: int, granularity: int) -> int:
    """Bytes of the write history of a bitmap over a disk of ``size`` bytes."""
    shift = history_shift(size, granularity)
    regions = (granule_count(size, granularity) + (1 << shift) - 1) >> shift
    return _HISTORY_HEADER.size + _STAMP.size * regions


Position = tuple[int, int]  # (history id, sequence): a point in a bitmap's write history


class _History:
    """The write history of one bitmap over ``buffer`` (see the module docstring). Every
    method but ``__init__`` runs under the bitmap's lock."""

    def __init__(self, buffer: Buffer, size: int, granularity: int, *, trusted: bool) -> None:
        self.shift = history_shift(size, granularity)
        self.regions = (granule_count(size, granularity) + (1 << self.shift) - 1) >> self.shift
        need = _HISTORY_HEADER.size + _STAMP.size * self.regions
        if len(buffer) < need:
            raise BitmapError(f"write history of {len(buffer)} bytes, {need} needed")
        self.buffer = buffer
        magic, history_id, sequence, shift = _HISTORY_HEADER.unpack_from(buffer, 0)
        if trusted and magic == HISTORY_MAGIC and shift == self.shift and history_id:
            # The header is stored after the stamps: a process killed in between left a
            # stamp ahead of it, and a sequence must never be handed out twice.
            self.id = history_id
            self.sequence = max(sequence, max(self._stamps(0, self.regions), default=0))
        else:
            # A history we cannot vouch for: a new id, so that no older position matches.
            self.id = secrets.randbits(64) | 1
            self.sequence = 0
            buffer[_HISTORY_HEADER.size : need] = bytes(need - _HISTORY_HEADER.size)
        self._store_header()

    def _stamps(self, lo: int, hi: int) -> array[int]:
        out = array("Q")
        out.frombytes(self.buffer[_HISTORY_HEADER.size + 8 * lo : _HISTORY_HEADER.size + 8 * hi])
        return out

    def _store_header(self) -> None:
        _HISTORY_HEADER.pack_into(self.buffer, 0, HISTORY_MAGIC, self.id, self.sequence, self.shift)

    def record(self, first: int, end: int) -> None:
        """Stamp the regions of granules ``[first, end)`` with the next sequence number."""
        if first >= end:
            return
        self.sequence = sequence = self.sequence + 1
        shift = self.shift
        lo, hi = first >> shift, ((end - 1) >> shift) + 1
        base = _HISTORY_HEADER.size
        if hi - lo == 1:
            _STAMP.pack_into(self.buffer, base + 8 * lo, sequence)
        else:
            self.buffer[base + 8 * lo : base + 8 * hi] = _STAMP.pack(sequence) * (hi - lo)
        # After the stamps (see __init__): only the sequence changes in the header.
        _STAMP.pack_into(self.buffer, _SEQUENCE_AT, sequence)

    def changed_since(self, sequence: int, first: int, end: int) -> list[tuple[int, int]]:
        """Granule runs ``[a, b)`` within ``[first, end)`` whose region was stamped after
        ``sequence``, in order, merged."""
        lo, hi = first >> self.shift, ((end - 1) >> self.shift) + 1
        runs: list[tuple[int, int]] = []
        for i, stamp in enumerate(self._stamps(lo, hi), lo):
            if stamp <= sequence:
                continue
            a = max(i << self.shift, first)
            b = min((i + 1) << self.shift, end)
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((a, b))
        return runs


class DirtyBitmap:
    """A named dirty bitmap over a disk of ``size`` bytes.

    ``bits`` is the buffer holding the bits (at least ``bits_length(size, granularity)``
    bytes); a fresh zeroed ``bytearray`` when omitted. Mutations hold a lock, so that a clear and
    a mark from different threads never lose each other's bits in a shared byte.
    """

    def __init__(
        self,
        name: str,
        size: int,
        granularity: int = DEFAULT_GRANULARITY,
        *,
        enabled: bool = True,
        bits: Buffer | None = None,
        history: Buffer | None = None,
        history_trusted: bool = False,
    ) -> None:
        validate_name(name)
        validate_granularity(granularity)
        if size < 0:
            raise BitmapError(f"size must not be negative: {size}")
        self.name = name
        self.size = size
        self.granularity = granularity
        self.enabled = enabled
        self._shift = granularity.bit_length() - 1
        self._granules = granule_count(size, granularity)
        nbytes = bits_length(size, granularity)
        if bits is None:
            bits = bytearray(nbytes)
        elif len(bits) < nbytes:
            raise BitmapError(f"bitmap {name!r}: {len(bits)} bytes of bits, {nbytes} needed")
        self._bits: Buffer = bits
        if history is None:
            history = bytearray(history_length(size, granularity))
        # ``history_trusted``: the buffer holds a history kept by an earlier owner, every stamp
        # of which survived (the store knows; a fresh buffer never is).
        self._history = _History(history, size, granularity, trusted=history_trusted)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"DirtyBitmap({self.name!r}, size={self.size}, granularity={self.granularity},"
            f" enabled={self.enabled})"
        )

    @property
    def granules(self) -> int:
        return self._granules

    # --- mutation ------------------------------------------------------------------------

    @property
    def position(self) -> Position:
        """The current point of the write history: a clear since it keeps every granule
        marked after this call returns."""
        with self._lock:
            return self._history.id, self._history.sequence

    def mark_dirty(self, offset: int, length: int) -> None:
        """Mark every granule touching ``[offset, offset + length)``; only the write history
        when disabled (a disabled bitmap keeps no bits, but a clear since an older position
        must still not clear what was written after it)."""
        self._check_range(offset, length)
        if length == 0:
            return
        first = offset >> self._shift
        end = ((offset + length - 1) >> self._shift) + 1
        with self._lock:
            self._history.record(first, end)
            if self.enabled:
                self._set(first, end, True)

    def mark_all(self) -> None:
        """Mark every granule dirty, enabled or not (used when in doubt)."""
        with self._lock:
            self._history.record(0, self._granules)
            self._set(0, self._granules, True)

    def clear_range(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Clear the granules lying wholly inside ``[offset, offset + length)``.

        A range ending at the disk size covers the last granule even when it is partial. Returns
        the byte runs now clean because of this call: ``[(start, length)]`` (the granule-aligned
        part of the range, clipped to the size) or ``[]`` when no granule lies wholly inside.
        Clearing is idempotent: the same call returns the same runs.
        """
        self._check_range(offset, length)
        first, end = self._inner_granules(offset, length)
        if first >= end:
            return []
        with self._lock:
            self._set(first, end, False)
        start = first << self._shift
        return [(start, min(end << self._shift, self.size) - start)]

    def clear_range_since(
        self, offset: int, length: int, since: Position, *, max_runs: int | None = None
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Clear the granules wholly inside ``[offset, offset + length)`` that were not marked
        after position ``since``; returns ``(cleared, kept)`` byte runs (in order, whole
        granules, together the granule-aligned part of the range).

        Kept granules may have been written after the reader took ``since`` (exactly so on
        disks of at most ``MAX_HISTORY_REGIONS`` granules; a whole region beyond): their bits
        stay as they are. A position of another history, or from the future, keeps the whole
        range: a clear is never blind.

        ``max_runs``: refuse with OSError(EOVERFLOW), having cleared nothing, when the cleared
        or the kept runs would be more (what one reply can carry).
        """
        self._check_range(offset, length)
        first, end = self._inner_granules(offset, length)
        if first >= end:
            return [], []
        history_id, sequence = since
        with self._lock:
            if history_id != self._history.id or sequence > self._history.sequence:
                kept = [(first, end)]
            else:
                kept = self._history.changed_since(sequence, first, end)
            cleared: list[tuple[int, int]] = []
            at = first
            for a, b in [*kept, (end, end)]:
                if at < a:
                    cleared.append((at, a))
                at = b
            if max_runs is not None and max(len(cleared), len(kept)) > max_runs:
                raise OSError(
                    errno.EOVERFLOW,
                    f"clearing [{offset}, {offset + length}) would leave {len(kept)} runs kept"
                    f" and {len(cleared)} cleared, more than {max_runs}: clear smaller ranges",
                )
            for a, b in cleared:
                self._set(a, b, False)
        return self._byte_runs(cleared), self._byte_runs(kept)

    def _byte_runs(self, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out = []
        for a, b in runs:
            start = a << self._shift
            out.append((start, min(b << self._shift, self.size) - start))
        return out

    def clear(self) -> None:
        """Clear every granule."""
        with self._lock:
            self._set(0, self._granules, False)

    def merge_from(self, other: DirtyBitmap) -> None:
        """Mark every granule of this bitmap that touches a dirty byte of ``other`` (any
        granularity; sizes must match). Marks even when this bitmap is disabled, like qemu."""
        if other.size != self.size:
            raise BitmapError(
                f"cannot merge bitmap {other.name!r} (size {other.size}) into {self.name!r}"
                f" (size {self.size})"
            )
        if other.granularity == self.granularity:
            # The same granules: OR the bits a window at a time (a snapshot's release).
            nbytes = bits_length(self.size, self.granularity)
            for lo in range(0, nbytes, _WINDOW_BYTES * 16):
                hi = min(lo + _WINDOW_BYTES * 16, nbytes)
                theirs = int.from_bytes(other._bits[lo:hi], "little")
                if not theirs:
                    continue
                with self._lock:
                    ours = int.from_bytes(self._bits[lo:hi], "little")
                    if ours | theirs != ours:
                        # Merged bits count as written now (a snapshot's release).
                        self._history.record(lo * 8, min(hi * 8, self._granules))
                        self._bits[lo:hi] = (ours | theirs).to_bytes(hi - lo, "little")
            return
        for start, length, flags in other.extents(0, other.size):
            if flags and length:
                first = start >> self._shift
                end = ((start + length - 1) >> self._shift) + 1
                with self._lock:
                    self._history.record(first, end)
                    self._set(first, end, True)

    def copy_bits(self) -> bytes:
        """A copy of the bits (``bits_length(size, granularity)`` bytes), taken atomically with
        respect to marks and clears."""
        with self._lock:
            return bytes(self._bits[: bits_length(self.size, self.granularity)])

    def detach(self) -> None:
        """Move the bits to a private in-memory copy, so that the backing mapping can be closed
        while a racing write still marks this (removed) bitmap."""
        with self._lock:
            self._bits = bytearray(self._bits[:])
            self._history.buffer = bytearray(self._history.buffer[:])

    # --- queries -------------------------------------------------------------------------

    def is_dirty(self, offset: int) -> bool:
        """Whether the granule holding byte ``offset`` is dirty."""
        self._check_range(offset, 1)
        i = offset >> self._shift
        return bool(self._bits[i >> 3] >> (i & 7) & 1)

    def dirty_bytes(self) -> int:
        """Bytes of the disk covered by dirty granules (the last granule counts its real size)."""
        if self._granules == 0:
            return 0
        count = 0
        nbytes = bits_length(self.size, self.granularity)
        for lo in range(0, nbytes, _WINDOW_BYTES * 16):
            hi = min(lo + _WINDOW_BYTES * 16, nbytes)
            count += int.from_bytes(self._bits[lo:hi], "little").bit_count()
        total = count << self._shift
        last = self._granules - 1
        if self._bits[last >> 3] >> (last & 7) & 1:
            total -= (self._granules << self._shift) - self.size
        return total

    def extents(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """``(offset, length, 0 or NBD_STATE_DIRTY)`` runs, adjacent equal runs merged, covering
        ``[offset, offset + length)`` exactly."""
        self._check_range(offset, length)
        end = offset + length
        while offset < end:
            # A batch that hits the limit ends where a run ends, so the next batch starts with
            # the other flag: batches never need merging.
            lengths, flags = self.runs(offset, end - offset, limit=65536)
            # accumulate(initial=) yields one offset more than there are runs.
            yield from zip(accumulate(lengths, initial=offset), lengths, flags, strict=False)
            offset += sum(lengths)

    def runs(
        self, offset: int, length: int, *, limit: int | None = None
    ) -> tuple[array[int], array[int]]:
        """The runs from ``offset`` as two arrays, lengths (``"Q"``) and flags (``"L"``),
        consecutive from ``offset``, adjacent equal runs merged, clipped to the range.

        With ``limit`` at most that many runs are returned: they then may cover less than the
        range (always at least one run when ``length > 0``). This is the fast path for a server
        answering NBD_CMD_BLOCK_STATUS.
        """
        self._check_range(offset, length)
        if length == 0:
            return array("Q"), array("L")
        if limit is not None and limit < 1:
            raise RangeError(f"limit must be at least 1, not {limit}")
        end = offset + length
        shift = self._shift
        first = offset >> shift
        last = ((end - 1) >> shift) + 1
        bits = self._bits
        # Run lengths in granules, minus one (see below); `prev` is the granule where the
        # open run started.
        counts = array("Q")
        prev = first
        start = first + 1
        while start < last and (limit is None or len(counts) < limit):
            stop = min(start + _WINDOW_BYTES * 8, last)
            # Bits [lo, stop) with lo = start - 1: bit j of t is set when bits lo + j and
            # lo + j + 1 differ, that is when a run ends and the next starts at lo + j + 1.
            lo = start - 1
            x = int.from_bytes(bits[lo >> 3 : ((stop - 1) >> 3) + 1], "little") >> (lo & 7)
            nbits = stop - lo
            t = (x ^ (x >> 1)) & ((1 << (nbits - 1)) - 1)
            if t:
                # Run lengths between set bits at C speed: the binary digits of t, lowest
                # first, split at each "1"; a gap of k zeros is a run of k + 1 granules.
                # Splitting on the "1"s themselves makes no new string for the runs of one
                # granule (the empty string is shared), the common case of a fragmented map.
                gaps = bin(t)[:1:-1].split("1")
                gaps.pop()  # empty: the highest digit of bin() is always a "1"
                counts.append(lo + len(gaps[0]) - prev)  # the open run, closed here
                counts.extend(map(len, islice(gaps, 1, None)))
                prev = lo + t.bit_length()
            start = stop
        if limit is not None and len(counts) >= limit:
            del counts[limit:]
            closed = True
        else:
            counts.append(last - prev - 1)
            closed = False
        # Plus one, then granules to bytes, for every element at once: big-int arithmetic on
        # the packed array (no element can carry into its neighbour: sizes stay below 2**63).
        n = len(counts)
        big = int.from_bytes(counts.tobytes(), sys.byteorder)
        big = (big + _ones(n)) << shift
        lengths = array("Q")
        lengths.frombytes(big.to_bytes(n * counts.itemsize, sys.byteorder))
        lengths[0] -= offset - (first << shift)
        if not closed:
            lengths[-1] -= (last << shift) - end
        bit = bits[first >> 3] >> (first & 7) & 1
        dirty = NBD_STATE_DIRTY if bit else 0
        flags = array("L", [dirty, dirty ^ NBD_STATE_DIRTY]) * ((n + 1) // 2)
        del flags[n:]
        return lengths, flags

    # --- internals -----------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RangeError(
                f"range [{offset}, {offset + length}) is outside bitmap {self.name!r}"
                f" of size {self.size}"
            )

    def _inner_granules(self, offset: int, length: int) -> tuple[int, int]:
        """Granules ``[first, end)`` lying wholly inside the byte range."""
        g = self.granularity
        first = (offset + g - 1) >> self._shift
        stop = offset + length
        end = self._granules if stop == self.size else stop >> self._shift
        return first, end

    def _set(self, first: int, end: int, value: bool) -> None:
        """Set (or clear) the bits of granules ``[first, end)``; caller holds the lock."""
        if first >= end:
            return
        bits = self._bits
        lo, hi = first >> 3, end >> 3
        head, tail = first & 7, end & 7
        if lo == hi:
            mask = ((1 << (tail - head)) - 1) << head
            bits[lo] = bits[lo] | mask if value else bits[lo] & ~mask
            return
        if hi - lo < 8:
            # Small (up to 64 granules: a 4 MiB write at 64 KiB granules): one read-modify-write
            # of the covering bytes, skipped when nothing changes, so that marking again after
            # the data write does not dirty the page of a shared mapping once more.
            stop = ((end - 1) >> 3) + 1
            cur = int.from_bytes(bits[lo:stop], "little")
            mask = ((1 << (end - first)) - 1) << (first & 7)
            new = cur | mask if value else cur & ~mask
            if new != cur:
                bits[lo:stop] = new.to_bytes(stop - lo, "little")
            return
        if head:
            mask = (0xFF << head) & 0xFF
            bits[lo] = bits[lo] | mask if value else bits[lo] & ~mask
            lo += 1
        fill = 0xFF if value else 0
        while lo < hi:
            step = min(hi - lo, 1 << 20)
            bits[lo : lo + step] = bytes((fill,)) * step
            lo += step
        if tail:
            mask = (1 << tail) - 1
            bits[hi] = bits[hi] | mask if value else bits[hi] & ~mask
