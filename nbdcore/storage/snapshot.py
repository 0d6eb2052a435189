"""Point-in-time snapshots of an image ("fleecing"): copy-before-write, with forked bitmaps.

``Image.create_snapshot(name, bitmaps=[...])`` freezes the image's data and the chosen dirty
bitmaps at one instant, without copying the disk. The returned :class:`Snapshot` is a read-only
image (an ``Image`` an NBD server exports like any other) whose data is the disk as it was,
whose ``base:allocation`` is the allocation as it was, and whose bitmaps are the *forks*: the
live bitmaps' bits at that instant. The live bitmaps restart clean and record what changes
after it; clears act on the forks. ``Image.release_snapshot(name)`` merges whatever the forks
still hold back into the live bitmaps, then frees the snapshot: nothing a consumer did not
clear (acknowledge) is ever lost.

Copy-before-write: the snapshot shares every *cluster* (``cluster_size`` bytes, 64 KiB by
default) with the live disk until a write, zero or trim is about to change it; the image then
first preserves the old cluster in the snapshot's store (a hole or a zero run costs nothing)
and records where in the snapshot's map. A cluster is preserved at most once per snapshot.
Reading the snapshot takes each cluster from the store when the map has it and from the live
disk otherwise.

Layout, in the image's bitmap directory (``DISK.nbdgw/snapshots/NAME/``)::

    meta.json      {"format": "nbdgw-snapshot", "version": 1, "name", "created", "size",
                    "cluster_size", "max_bytes", "on_full", "broken",
                    "forks": [{"name", "granularity"}]}
    map            one little-endian uint32 per cluster: 0 the cluster is still the live
                   disk's; HOLE (0xffffffff) it was a hole; k + 1 it is in slot k of ``data``
    data           the preserved clusters, slot k at byte k * cluster_size (sparse)
    KEY.bits       the bits of each fork (KEY and format as in nbdcore.storage.store)

The crash-safety scheme (the rule: when in doubt, a granule is dirty; see also store.py):

1. Create, under the image's write lock (no write can interleave): build the snapshot in
   ``snapshots/.creating-NAME`` (fork bits copied from the live bitmaps, an empty sparse map,
   an empty data file, ``meta.json``), fsync every file and the directory, rename it to
   ``NAME``, fsync ``snapshots/``; only then clear the live bitmaps and msync them. A crash
   before the rename leaves a dot directory (deleted at the next open) and the live bitmaps
   untouched; a crash after it leaves the bits in the fork and maybe also in the live bitmap:
   more dirty, never less.
2. Copy-before-write, before the live bitmaps are marked and the data changes: the old data is
   written to ``data``, then the map entry is stored (the map is a ``MAP_SHARED`` mapping, like
   the bitmaps); a cluster whose map entry is 0 has never been changed. A ``kill -9`` leaves all
   of it in the page cache, in that order, so after it the snapshot is exactly as it was.
   ``data`` grows into blocks reserved ahead with ``FALLOC_FL_KEEP_SIZE``: its size still
   counts only what was written (the next slot is taken from it at open), and the reserved
   blocks past it are never read. The page cache does not outlive the machine: an open that
   finds the machine crashed (store.py, rule 2) discards every snapshot before it trusts
   anything, the live bitmaps being wholly dirty by then. A clean close fsyncs ``data`` and
   msyncs the map and forks before the image is marked cleanly closed, so snapshots outlive
   clean restarts.
3. Release, under the write lock: merge each fork into its live bitmap, msync the live
   bitmaps, rename the directory to ``.released-NAME``, fsync, delete it. A crash before the
   rename keeps the snapshot (releasing it again merges again: harmless); after it, the merge
   is already durable.
4. Out of space: preserving more than ``max_bytes`` (or ENOSPC from the file system) either
   *breaks* the snapshot (``on_full="break"``, the default: the live write goes on, the
   snapshot's reads fail from then on, ``broken`` is persisted in ``meta.json`` *before* the
   live data changes, and releasing it still merges its forks back) or refuses the live write
   with ENOSPC (``on_full="fail-write"``). A snapshot is a backup aid: by default it never
   makes the guest's disk fail. Without an explicit ``max_bytes`` the limit is
   :func:`default_max_bytes` (10% of the disk, at least 256 MiB), so that a forgotten snapshot
   of a busy disk cannot fill the file system; and an image holds at most ``MAX_SNAPSHOTS``.
5. Unreadable or inconsistent snapshot metadata found at open: the snapshot is deleted and
   every live bitmap is marked wholly dirty (we do not know what its forks held).

Locks: the image's write lock orders writes with create and release; each snapshot's lock
orders its copy-before-write with its reads (a read of a shared cluster holds it, so the
cluster cannot be preserved and overwritten mid-read) and with release.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import re
import shutil
import sys
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from nbdcore.constants import NBD_STATE_HOLE, NBD_STATE_ZERO
from nbdcore.storage.bitmap import (
    DEFAULT_GRANULARITY,
    DirtyBitmap,
    Position,
    bits_length,
    validate_granularity,
)
from nbdcore.storage.checkpoint import checkpoint_id
from nbdcore.storage.disk import FALLOC_FL_KEEP_SIZE, Disk, MemoryDisk, fallocate
from nbdcore.storage.errors import (
    BitmapError,
    NoSuchBitmapError,
    SnapshotError,
    SnapshotFullError,
    SnapshotUnavailableError,
    read_only_error,
)
from nbdcore.storage.image import Image
from nbdcore.storage.store import (
    DIR_MODE,
    SNAPSHOTS,
    _Bits,
    bitmap_key,
    fsync_dir,
    write_atomic,
    write_file,
)

if TYPE_CHECKING:
    from nbdcore.storage.store import BitmapStore

log = logging.getLogger("nbdcore.storage")

FORMAT: Final = "nbdgw-snapshot"
VERSION: Final = 1
DEFAULT_CLUSTER_SIZE: Final = 65536
MIN_CLUSTER_SIZE: Final = 4096
MAX_CLUSTER_SIZE: Final = 16 * 1024 * 1024

DEFAULT_CHECKPOINT_GRANULARITY: Final = DEFAULT_GRANULARITY
OnFull = Literal["break", "fail-write"]
ON_FULL: Final = ("break", "fail-write")
# Limits of every snapshot, whoever asks (NBD clients of `nbdgw nbd serve`, the gateway, the
# local command): what one snapshot may preserve unless told, and how many an image may hold.
DEFAULT_MAX_PERCENT: Final = 10
DEFAULT_MIN_MAX_BYTES: Final = 256 * 1024 * 1024
MAX_SNAPSHOTS: Final = 8


def default_max_bytes(size: int) -> int:
    """The preserved-data limit of a snapshot of a ``size``-byte disk when none is given."""
    return max(size * DEFAULT_MAX_PERCENT // 100, DEFAULT_MIN_MAX_BYTES)


class SnapshotLimitError(SnapshotError):
    """The image holds ``MAX_SNAPSHOTS`` snapshots already: release one first."""


# Map entries (uint32 per cluster).
SHARED: Final = 0  # still the live disk's
HOLE: Final = 0xFFFFFFFF  # was a hole: reads as zeroes, costs nothing
_SLOT: Final = -1  # a run kind of _runs(): preserved data
MAX_SLOTS: Final = 0xFFFFFFF0
MAX_RESERVED: Final = 1 << 62  # "reserve nothing more": fallocate does not work here

# Snapshot names become export names (EXPORT@NAME) and directory names. Matched with
# fullmatch: "$" also matches before a final newline ("snap\n" would pass).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_NONZERO = re.compile(rb"[^\x00]")
# Bytes copied per step (at least one cluster): bounds the memory of a big trim; the buffer is
# kept by the snapshot, so a stream of writes does not allocate (and page-fault) a fresh one each.
_COPY_BYTES: Final = 8 * 1024 * 1024
# The data file grows into space reserved this far ahead (FALLOC_FL_KEEP_SIZE): appending into
# reserved blocks skips the file system's block allocation on every write (1 MiB appends on ext4
# here: 3.5 GB/s, 5.3 GB/s into reserved space).
_RESERVE_STEP: Final = 64 * 1024 * 1024
_ALLOCATION_STEP: Final = 1 << 30  # bytes of allocation computed per lock hold


def validate_snapshot_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SnapshotError(
            f"snapshot name {name!r}: use 1-63 letters, digits, '.', '_' or '-'"
            " (starting with a letter or digit)"
        )


def validate_cluster_size(size: int) -> None:
    if (
        not isinstance(size, int)
        or size < MIN_CLUSTER_SIZE
        or size > MAX_CLUSTER_SIZE
        or size & (size - 1)
    ):
        raise SnapshotError(
            f"cluster size must be a power of two from {MIN_CLUSTER_SIZE} to"
            f" {MAX_CLUSTER_SIZE}, not {size}"
        )


def _pack(values: Sequence[int] | range) -> bytes:
    a = array("I", values)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


# --- backing: where a snapshot keeps its map, data and forks ---------------------------------


class _Backing:
    """A snapshot's storage: the map, the preserved data, the fork bits, its metadata."""

    map: bytearray | mmap.mmap

    def read_data(self, buf: memoryview, offset: int) -> None:
        raise NotImplementedError

    def write_data(self, data: bytes | memoryview, offset: int) -> None:
        raise NotImplementedError

    def data_end(self) -> int:
        raise NotImplementedError

    def reserve(self, need: int, limit: int | None) -> None:
        """Data is about to be written up to ``need``: reserve space ahead (never past
        ``limit``) if that makes writing it cheaper. Never fails, and never changes what
        :meth:`data_end` says."""

    def fork_bits(self, name: str, nbytes: int) -> tuple[bytearray | mmap.mmap, bool]:
        """The bits buffer of fork ``name`` and whether it was complete."""
        raise NotImplementedError

    def save_meta(self, meta: dict[str, Any]) -> None:
        pass

    def sync(self) -> None:
        pass

    def discard(self, how: str) -> None:
        """Delete the snapshot's files (crash-safely: rename to a dot name first)."""

    def close(self) -> None:
        pass


class _MemoryBacking(_Backing):
    def __init__(self, clusters: int, cluster_size: int, forks: dict[str, bytes]) -> None:
        self.map = bytearray(clusters * 4)
        self._data = MemoryDisk(max(clusters, 1) * cluster_size, chunk_size=cluster_size)
        self._end = 0
        self._forks = {name: bytearray(bits) for name, bits in forks.items()}

    def read_data(self, buf: memoryview, offset: int) -> None:
        self._data.preadinto(buf, offset)

    def write_data(self, data: bytes | memoryview, offset: int) -> None:
        self._data.pwrite(data, offset)
        self._end = max(self._end, offset + len(data))

    def data_end(self) -> int:
        return self._end

    def fork_bits(self, name: str, nbytes: int) -> tuple[bytearray | mmap.mmap, bool]:
        return self._forks[name], True


class _FileBacking(_Backing):
    """The files of ``DISK.nbdgw/snapshots/NAME/``. Writable: map and forks are shared
    mappings, as the live bitmaps are; read-only: private copies, no writes."""

    def __init__(self, path: Path, clusters: int, *, writable: bool) -> None:
        self.path = path
        self.writable = writable
        self._maps: list[_Bits] = []
        self._fd = -1
        self._reserved = 0  # data file blocks reserved up to here (beyond its size)
        try:
            map_bits = _Bits(path / "map", clusters * 4, writable=writable)
            self._maps.append(map_bits)
            self.map = map_bits.buffer
            self.map_complete = map_bits.complete
            self._fd = os.open(
                path / "data", (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
            )
        except BaseException:
            self.close()
            raise

    @classmethod
    def build(
        cls, root: Path, name: str, clusters: int, forks: dict[str, bytes], meta: dict[str, Any]
    ) -> _FileBacking:
        """Create the snapshot's directory with everything durable, atomically (rule 1)."""
        if not root.is_dir():
            root.mkdir(mode=DIR_MODE)
            fsync_dir(root.parent)
        tmp = root / f".creating-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=DIR_MODE)
        try:
            for fork, bits in forks.items():
                write_file(tmp / f"{bitmap_key(fork)}.bits", bits, exclusive=True)
            fd = os.open(tmp / "map", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, max(clusters * 4, 1))  # sparse: O(1) whatever the disk size
                os.fsync(fd)
            finally:
                os.close(fd)
            write_file(tmp / "data", b"", exclusive=True)
            write_file(tmp / "meta.json", _meta_bytes(meta), exclusive=True)
            fsync_dir(tmp)
            final = root / name
            if final.exists():
                raise SnapshotError(f"snapshot directory {final} already exists")
            tmp.rename(final)
            fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(final, clusters, writable=True)

    def read_data(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:  # beyond the end of the data file: a torn slot, never invented data
                raise OSError(errno.EIO, f"snapshot data {self.path} is short at {offset}")
            done += n

    def write_data(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def data_end(self) -> int:
        return os.fstat(self._fd).st_size

    def reserve(self, need: int, limit: int | None) -> None:
        if need <= self._reserved or not self.writable:
            return
        # One fallocate per step, not per write: a stream of 64 KiB clusters would otherwise
        # pay a system call each.
        end = need + _RESERVE_STEP
        if limit is not None:
            end = max(need, min(end, limit))
        start = max(self._reserved, self.data_end())
        try:
            # KEEP_SIZE: the file's size still says how much data was written (slots are
            # handed out from it at open, rule 2); the reserved blocks past it hold nothing
            # anyone reads, and go with the directory at release.
            fallocate(self._fd, FALLOC_FL_KEEP_SIZE, start, end - start)
        except OSError as exc:
            # Only an optimisation: without it (no fallocate, or no room for a whole step)
            # the writes allocate as they go, and meet ENOSPC themselves if it comes to it.
            log.debug("snapshot %s: no space reserved (%s)", self.path.name, exc)
            self._reserved = MAX_RESERVED if exc.errno != errno.ENOSPC else end
            return
        self._reserved = end

    def fork_bits(self, name: str, nbytes: int) -> tuple[bytearray | mmap.mmap, bool]:
        bits = _Bits(self.path / f"{bitmap_key(name)}.bits", nbytes, writable=self.writable)
        self._maps.append(bits)
        return bits.buffer, bits.complete

    def save_meta(self, meta: dict[str, Any]) -> None:
        write_atomic(self.path / "meta.json", _meta_bytes(meta))

    def sync(self) -> None:
        if self.writable:
            os.fsync(self._fd)
            for bits in self._maps:
                bits.sync()

    def discard(self, how: str) -> None:
        # Unique: the remains of an earlier snapshot of the same name may still be there.
        dead = self.path.with_name(f".{how}-{self.path.name}-{time.time_ns()}")
        self.path.rename(dead)
        fsync_dir(self.path.parent)
        shutil.rmtree(dead, ignore_errors=True)

    def close(self) -> None:
        for bits in self._maps:
            bits.close()
        self._maps.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, ensure_ascii=False, indent=1).encode() + b"\n"


# --- the snapshot ----------------------------------------------------------------------------


class SnapshotDisk(Disk):
    """The snapshot's data as a read-only :class:`Disk`: what a server reads and asks for
    ``base:allocation``. It has no ``fd``, so servers read it through Python (not sendfile)."""

    def __init__(self, snapshot: Snapshot, size: int) -> None:
        self._snapshot = snapshot
        self.size = size
        self.read_only = True

    def preadinto(self, buf: memoryview, offset: int) -> None:
        self._snapshot._readinto(buf, offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        raise read_only_error("a snapshot")

    def flush(self) -> None:
        pass

    def trim(self, offset: int, length: int) -> None:
        raise read_only_error("a snapshot")

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False
    ) -> None:
        raise read_only_error("a snapshot")

    def allocation(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        return self._snapshot._allocation(offset, length)

    def close(self) -> None:
        pass


class Snapshot(Image):
    """A read-only point-in-time view of an image, with its forked bitmaps.

    It is an :class:`Image` (so it can be exported as one) whose ``bitmaps`` are the forks and
    whose only change is ``clear_bitmap_range``/``clear_bitmap`` on a fork. Build one with
    ``Image.create_snapshot``; it lives until ``Image.release_snapshot`` (closing it does
    nothing: its life is its image's).
    """

    def __init__(self, live: Image, meta: dict[str, Any], backing: _Backing) -> None:
        super().__init__(SnapshotDisk(self, meta["size"]))
        self.live = live
        self.name: str = meta["name"]
        self.created: float = meta["created"]
        self.cluster_size: int = meta["cluster_size"]
        self.max_bytes: int | None = meta["max_bytes"]
        self.on_full: OnFull = meta["on_full"]
        self.broken: bool = meta["broken"]
        self.released = False
        self._meta = meta
        # Forks that are views (the OR of sources, nbdcore.storage.checkpoint) -> sources.
        self.views: dict[str, list[str]] = {
            f["name"]: f["sources"] for f in meta["forks"] if "sources" in f
        }
        self.checkpoint: str = meta.get("checkpoint_id", "")  # the checkpoint it started
        self._backing = backing
        self._lock = threading.Lock()
        self._copy_buf = bytearray()  # see _buffer
        self._shift = self.cluster_size.bit_length() - 1
        self._clusters = -(-self.size // self.cluster_size)
        # Slots are handed out from the end of the data file: a slot written but not yet
        # mapped when the process died is just wasted space.
        self._next_slot: int = -(-backing.data_end() // self.cluster_size)
        for fork in meta["forks"]:
            granularity = fork["granularity"]
            bits, complete = backing.fork_bits(fork["name"], bits_length(self.size, granularity))
            bitmap = DirtyBitmap(fork["name"], self.size, granularity, enabled=False, bits=bits)
            if not complete:
                bitmap.mark_all()  # a torn fork: in doubt, dirty
            self._bitmaps[fork["name"]] = bitmap

    def __repr__(self) -> str:
        state = " broken" if self.broken else " released" if self.released else ""
        return f"Snapshot({self.name!r}, forks={self.forks}{state})"

    # --- information ---------------------------------------------------------------------

    @property
    def forks(self) -> list[str]:
        """The names of the forked bitmaps."""
        return list(self._bitmaps)

    @property
    def used_bytes(self) -> int:
        """Bytes of preserved data in the snapshot store."""
        return self._next_slot * self.cluster_size

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created": self.created,
            "size": self.size,
            "cluster_size": self.cluster_size,
            "used_bytes": self.used_bytes,
            "max_bytes": self.max_bytes,
            "on_full": self.on_full,
            "broken": self.broken,
            "checkpoint": self.checkpoint,
            "forks": {
                name: {"granularity": b.granularity, "dirty_bytes": b.dirty_bytes()}
                for name, b in self._bitmaps.items()
            },
        }

    # --- the forks -----------------------------------------------------------------------

    @property
    def can_clear_bitmaps(self) -> bool:
        return not self.released

    def clear_bitmap_range(self, name: str, offset: int, length: int) -> list[tuple[int, int]]:
        """Clear the granules of fork ``name`` lying wholly inside the range (the consumer has
        what they held); returns the byte runs now clean."""
        self._check_present()
        return self.bitmap(name).clear_range(offset, length)

    def clear_bitmap_range_since(
        self, name: str, offset: int, length: int, since: Position, *, max_runs: int | None = None
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """As ``Image.clear_bitmap_range_since``: nothing writes a fork, so only a position of
        another history keeps anything."""
        self._check_present()
        return self.bitmap(name).clear_range_since(offset, length, since, max_runs=max_runs)

    def bitmap_position(self, name: str) -> Position:
        return self.bitmap(name).position

    def clear_bitmap(self, name: str) -> None:
        self._check_present()
        self.bitmap(name).clear()

    def close(self) -> None:
        """Nothing: a snapshot lives until ``Image.release_snapshot``."""

    def flush(self) -> None:
        pass

    # --- internals: reading --------------------------------------------------------------

    def _check_present(self) -> None:
        if self.released:
            raise SnapshotUnavailableError(f"snapshot {self.name!r} was released")

    def _check_readable(self) -> None:
        self._check_present()
        if self.broken:
            limit = "" if self.max_bytes is None else f" (limit {self.max_bytes} bytes)"
            raise SnapshotUnavailableError(
                f"snapshot {self.name!r} is broken: it ran out of space{limit} and no longer"
                " holds the disk as it was; release it (its bitmaps are merged back) and take"
                " a new one"
            )

    def _entry(self, cluster: int) -> int:
        return int.from_bytes(self._backing.map[cluster * 4 : cluster * 4 + 4], "little")

    def _runs(self, first: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """``(first, end, kind, slot)`` runs of clusters ``[first, end)``: kind SHARED, HOLE,
        or _SLOT for preserved clusters in consecutive slots from ``slot``."""
        m = self._backing.map
        c = first
        while c < end:
            v = self._entry(c)
            if v == SHARED:
                # The map of a young snapshot is mostly zeroes: find the next entry at C speed.
                found = _NONZERO.search(m, c * 4, end * 4)
                stop = end if found is None else found.start() // 4
                yield c, stop, SHARED, 0
            elif v == HOLE:
                stop = c + 1
                while stop < end and self._entry(stop) == HOLE:
                    stop += 1
                yield c, stop, HOLE, 0
            else:
                stop = c + 1
                while stop < end and self._entry(stop) == v + (stop - c):
                    stop += 1
                yield c, stop, _SLOT, v - 1
            c = stop

    def _readinto(self, buf: memoryview, offset: int) -> None:
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        length = len(view)
        self.disk.check_range(offset, length)
        if not length:
            return
        end = offset + length
        shift = self._shift
        with self._lock:
            self._check_readable()
            for c0, c1, kind, slot in self._runs(offset >> shift, ((end - 1) >> shift) + 1):
                a = max(c0 << shift, offset)
                b = min(c1 << shift, end)
                piece = view[a - offset : b - offset]
                if kind == SHARED:
                    self.live.disk.preadinto(piece, a)
                elif kind == HOLE:
                    piece[:] = bytes(b - a)
                else:
                    self._backing.read_data(piece, (slot << shift) + a - (c0 << shift))

    def _allocation(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        self.disk.check_range(offset, length)
        end = offset + length
        run_start, run_len, run_flags = offset, 0, -1
        pos = offset
        while pos < end:
            stop = min(end, pos + _ALLOCATION_STEP)
            with self._lock:
                self._check_readable()
                pieces = list(self._allocation_locked(pos, stop))
            for start, n, flags in pieces:
                if flags == run_flags:
                    run_len += n
                    continue
                if run_len:
                    yield run_start, run_len, run_flags
                run_start, run_len, run_flags = start, n, flags
            pos = stop
        if run_len:
            yield run_start, run_len, run_flags

    def _allocation_locked(self, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
        shift = self._shift
        for c0, c1, kind, _ in self._runs(offset >> shift, ((end - 1) >> shift) + 1):
            a = max(c0 << shift, offset)
            b = min(c1 << shift, end)
            if kind == SHARED:
                # The live disk's allocation of a cluster no write has touched since the
                # snapshot is its allocation then (and no write can touch it while we hold
                # the lock: copy-before-write needs it first).
                yield from self.live.disk.allocation(a, b - a)
            elif kind == HOLE:
                yield a, b - a, NBD_STATE_HOLE | NBD_STATE_ZERO
            else:
                yield a, b - a, 0

    # --- internals: copy-before-write (called by the image under its write lock) ---------

    def _preserve(self, offset: int, length: int) -> None:
        """Preserve the clusters of ``[offset, offset + length)`` not yet preserved."""
        if self.broken or self.released or not length:
            return
        shift = self._shift
        with self._lock:
            first, end = offset >> shift, ((offset + length - 1) >> shift) + 1
            for c0, c1, kind, _ in list(self._runs(first, end)):
                if kind == SHARED:
                    self._copy(c0, c1)
                if self.broken:
                    return

    def _copy(self, first: int, end: int) -> None:
        shift = self._shift
        cs = self.cluster_size
        size = self.size
        live = self.live.disk
        per_step = max(1, _COPY_BYTES // cs)
        start, stop = first << shift, min(end << shift, size)
        holes = [
            (o, o + n) for o, n, f in live.allocation(start, stop - start) if f & NBD_STATE_HOLE
        ]
        # Clusters wholly inside a hole cost nothing; the others are copied in runs.
        data_runs: list[tuple[int, int]] = []
        hole_clusters: list[int] = []
        h = 0
        for c in range(first, end):
            a, b = c << shift, min((c + 1) << shift, size)
            while h < len(holes) and holes[h][1] <= a:
                h += 1
            if h < len(holes) and holes[h][0] <= a and b <= holes[h][1]:
                hole_clusters.append(c)
            elif data_runs and data_runs[-1][1] == c and c - data_runs[-1][0] < per_step:
                data_runs[-1] = (data_runs[-1][0], c + 1)
            else:
                data_runs.append((c, c + 1))
        m = self._backing.map
        hole = _pack([HOLE])
        for c in hole_clusters:
            m[c * 4 : c * 4 + 4] = hole
        for c0, c1 in data_runs:
            n = c1 - c0
            slot = self._next_slot
            if (self.max_bytes is not None and (slot + n) * cs > self.max_bytes) or (
                slot + n > MAX_SLOTS
            ):
                self._full(f"preserving {n * cs} more bytes would exceed the limit")
                return
            a, b = c0 << shift, min(c1 << shift, size)
            data = self._buffer(b - a)
            live.preadinto(data, a)
            self._backing.reserve((slot + n) * cs, self.max_bytes)
            try:
                # Data first, map entry after: a map entry never points at unwritten data.
                self._backing.write_data(data, slot * cs)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise
                self._full(f"the snapshot store is out of space ({os.strerror(exc.errno)})")
                return
            self._next_slot = slot + n
            m[c0 * 4 : c1 * 4] = _pack(range(slot + 1, slot + n + 1))

    def _buffer(self, n: int) -> memoryview:
        """``n`` bytes of the snapshot's copy buffer (callers hold ``_lock``)."""
        if len(self._copy_buf) < n:
            self._copy_buf = bytearray(n)
        return memoryview(self._copy_buf)[:n]

    def _full(self, why: str) -> None:
        message = f"snapshot {self.name!r} is full: {why} ({self.used_bytes} bytes preserved" + (
            f", limit {self.max_bytes})" if self.max_bytes is not None else ")"
        )
        if self.on_full == "fail-write":
            raise SnapshotFullError(message + "; the write was refused")
        # Persisted before the live data changes: after a kill -9 the snapshot must not look
        # whole. If even that fails, the write fails: in doubt, keep the snapshot true.
        self._meta["broken"] = True
        try:
            self._backing.save_meta(self._meta)
        except OSError as exc:
            self._meta["broken"] = False
            raise SnapshotFullError(
                f"{message}; cannot mark it broken ({exc}); the write was refused"
            ) from exc
        self.broken = True
        log.warning("%s; it is broken now (release it)", message)

    # --- internals: life cycle -----------------------------------------------------------

    def _release(
        self, live_bitmaps: dict[str, DirtyBitmap], store: BitmapStore | None
    ) -> dict[str, int]:
        """Merge the forks back (durably), then delete the snapshot (rule 3). Returns the
        dirty bytes each fork merged back (0 for a view): exactly what merged, whatever clears
        raced the release."""
        merged: dict[str, int] = {}
        with self._lock:
            for name, fork in self._bitmaps.items():
                merged[name] = 0
                if name in self.views:  # a view merges back nowhere: the chain holds it
                    continue
                # The fork's bits at one instant (a clear in flight lands before or after
                # them, never in the middle of the merge), counted and merged. A clear that
                # lands after them is acknowledged and changes nothing: the live bitmap keeps
                # those bits (the safe direction).
                frozen = DirtyBitmap(
                    name, fork.size, fork.granularity, bits=bytearray(fork.copy_bits())
                )
                merged[name] = frozen.dirty_bytes()
                live_bitmaps[name].merge_from(frozen)
            if store is not None:
                store.sync()
            self._backing.discard("released")
            for fork in self._bitmaps.values():
                fork.detach()
            self._backing.close()
            self.released = True
        return merged

    def _checkpoint_started(self) -> None:
        # The start is durable in the bitmaps: never roll it forward again (the checkpoint may
        # be deleted while this snapshot lives).
        self._meta.pop("pending_checkpoint", None)
        self._backing.save_meta(self._meta)

    def _sync(self) -> None:
        with self._lock:
            if not self.released:
                self._backing.sync()

    def _close(self) -> None:
        with self._lock:
            for fork in self._bitmaps.values():
                fork.detach()
            self._backing.close()
            self.released = True


# --- creating and loading (called by Image) --------------------------------------------------


def create(
    image: Image,
    store: BitmapStore | None,
    name: str,
    bitmaps: Sequence[str],
    cluster_size: int,
    max_bytes: int | None,
    on_full: str,
    views: dict[str, list[str]] | None = None,
    checkpoint: tuple[str, str | None] | None = None,
) -> Snapshot:
    """Fork ``bitmaps`` (and ``views``: the OR of their sources) and freeze the data, starting
    ``checkpoint`` if given; the caller holds the image's write lock."""
    validate_snapshot_name(name)
    validate_cluster_size(cluster_size)
    if on_full not in ON_FULL:
        raise SnapshotError(f"on_full must be one of {', '.join(ON_FULL)}, not {on_full!r}")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
        raise SnapshotError(f"max_bytes must be a byte count, not {max_bytes!r}")
    if len(set(bitmaps)) != len(bitmaps):
        raise SnapshotError("a bitmap can be forked only once per snapshot")
    if len(image.snapshots) >= MAX_SNAPSHOTS:
        raise SnapshotLimitError(
            f"the image has {len(image.snapshots)} snapshots already, the most it may hold:"
            " release one first"
        )
    if max_bytes is None:
        max_bytes = default_max_bytes(image.size)
    live = [image.bitmap(b) for b in bitmaps]  # NoSuchBitmapError for a missing one
    views = views or {}
    view_bits: dict[str, DirtyBitmap] = {}
    for view, sources in views.items():
        if view in bitmaps or not sources:
            raise SnapshotError(f"view {view!r}: a name of its own and at least one source")
        # The chain's bitmaps share one granularity; the first source's is the view's.
        bitmap = DirtyBitmap(view, image.size, image.bitmap(sources[0]).granularity)
        for source in sources:
            bitmap.merge_from(image.bitmap(source))
        view_bits[view] = bitmap
    granularity = DEFAULT_CHECKPOINT_GRANULARITY
    if checkpoint is not None and checkpoint[1] is not None:
        granularity = image.bitmap(checkpoint[1]).granularity
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "created": time.time(),
        "size": image.size,
        "cluster_size": cluster_size,
        "max_bytes": max_bytes,
        "on_full": on_full,
        "broken": False,
        "forks": [{"name": b.name, "granularity": b.granularity} for b in live]
        + [
            {"name": v.name, "granularity": v.granularity, "sources": views[v.name]}
            for v in view_bits.values()
        ],
    }
    if checkpoint is not None:
        meta["checkpoint_id"] = checkpoint_id(checkpoint[0])
        meta["pending_checkpoint"] = [*checkpoint, granularity]
    forks = {b.name: b.copy_bits() for b in [*live, *view_bits.values()]}
    clusters = -(-image.size // cluster_size)
    backing: _Backing
    if store is None:
        backing = _MemoryBacking(clusters, cluster_size, forks)
    else:
        backing = _FileBacking.build(store.dir / SNAPSHOTS, name, clusters, forks, meta)
    snapshot = Snapshot(image, meta, backing)
    if checkpoint is not None:
        # Named in meta.json, durable: a crash from here on is rolled forward at open.
        image._start_checkpoint(checkpoint[0], checkpoint[1], granularity)
        snapshot._checkpoint_started()
    # The forks are durable: only now may the live bitmaps restart clean (rule 1).
    for bitmap in live:
        bitmap.clear()
    if store is not None:
        store.sync()
    return snapshot


def load(image: Image, store: BitmapStore) -> dict[str, Snapshot]:
    """The snapshots found beside a persistent image (rules 1, 2 and 5)."""
    root = store.dir / SNAPSHOTS
    if not root.is_dir() or (store.read_only and store.machine_crashed):
        return {}
    writable = not store.read_only
    snapshots: dict[str, Snapshot] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            if writable:  # an interrupted create, release or discard
                shutil.rmtree(path, ignore_errors=True)
            continue
        try:
            meta = _read_meta(path, image)
            clusters = -(-image.size // meta["cluster_size"])
            backing = _FileBacking(path, clusters, writable=writable)
            if not backing.map_complete:
                backing.close()
                raise SnapshotError("its map is short")
            try:
                snapshots[meta["name"]] = Snapshot(image, meta, backing)
            except BaseException:
                backing.close()
                raise
            pending = meta.get("pending_checkpoint")
            if pending and writable:
                # A start cut short by a crash: nothing wrote since, so rolling it forward
                # is exact (nbdcore.storage.checkpoint).
                image._start_checkpoint(pending[0], pending[1], pending[2])
                snapshots[meta["name"]]._checkpoint_started()
        except (SnapshotError, BitmapError, OSError) as exc:
            if not writable:
                log.warning("ignoring snapshot %s: %s", path, exc)
                continue
            # We do not know what its forks held: every live bitmap becomes wholly dirty.
            log.warning("discarding snapshot %s (%s): every bitmap marked dirty", path, exc)
            for bitmap in image.bitmaps.values():
                bitmap.mark_all()
            store.sync()
            dead = root / f".corrupt-{path.name}-{time.time_ns()}"
            path.rename(dead)
            fsync_dir(root)
            shutil.rmtree(dead, ignore_errors=True)
    return snapshots


def _read_meta(path: Path, image: Image) -> dict[str, Any]:
    try:
        meta = json.loads((path / "meta.json").read_bytes())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError("not an nbdgw snapshot")
        if meta.get("version") != VERSION:
            raise ValueError(f"unsupported version {meta.get('version')!r}")
        if meta["name"] != path.name:
            raise ValueError("name does not match its directory")
        validate_snapshot_name(meta["name"])
        validate_cluster_size(meta["cluster_size"])
        if meta["size"] != image.size:
            raise ValueError(f"size {meta['size']} is not the disk's {image.size}")
        if meta["on_full"] not in ON_FULL or not isinstance(meta["broken"], bool):
            raise ValueError("bad on_full or broken")
        if not isinstance(meta["created"], (int, float)):
            raise ValueError("bad created")
        if meta["max_bytes"] is not None and not isinstance(meta["max_bytes"], int):
            raise ValueError("bad max_bytes")
        for fork in meta["forks"]:
            validate_granularity(fork["granularity"])
            if "sources" in fork:
                if not all(isinstance(x, str) for x in fork["sources"]):
                    raise ValueError("bad view sources")
            elif fork["name"] not in image.bitmaps:
                raise NoSuchBitmapError(fork["name"])
    except FileNotFoundError:
        raise SnapshotError(f"{path}: meta.json is missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"corrupt snapshot metadata in {path}: {exc}") from None
    return meta


__all__ = [
    "DEFAULT_CLUSTER_SIZE",
    "Snapshot",
    "SnapshotDisk",
    "validate_snapshot_name",
]
