"""An image: a disk plus its named dirty bitmaps, the unit an NBD server exports.

Every write path (write, write_zeroes, trim) marks every enabled bitmap dirty *before* the data
changes and *again after*, and both happen before the call returns:

- before: a crash after the data reached the disk cannot leave the granule clean;
- after: a ``clear_bitmap_range`` that runs between the two marks (another thread, or another
  task of the server interleaving) cannot leave a granule clean while it holds data that the
  clearer never saw. Also after a data change that *failed*: a write cut short by ENOSPC,
  EFBIG or EIO may have landed part of its bytes (:meth:`Image._changing`).

Persistent images keep their bitmaps in a ``BitmapStore`` (see ``nbdcore.storage.store`` for
the crash-safety scheme); ``Image.memory`` images keep them in memory only.

Snapshots (``create_snapshot``, ``release_snapshot``; see ``nbdcore.storage.snapshot``): every
write path first preserves, in every open snapshot, the clusters it is about to change
(copy-before-write), under one write lock that also orders snapshot creation and release with
the writes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from nbdcore.storage.bitmap import (
    DEFAULT_GRANULARITY,
    DirtyBitmap,
    Position,
    validate_granularity,
)
from nbdcore.storage.bitmap import validate_name as validate_bitmap_name
from nbdcore.storage.disk import Disk, MemoryDisk, RawFileDisk
from nbdcore.storage.errors import (
    BitmapError,
    BitmapExistsError,
    NoSuchBitmapError,
    NoSuchSnapshotError,
    SnapshotExistsError,
    read_only_error,
)
from nbdcore.storage.store import BitmapStore, fsync_dir, store_dir

if TYPE_CHECKING:
    from nbdcore.storage.snapshot import Snapshot


class Image:
    """A disk and its bitmaps. Build one with ``open``, ``create`` or ``memory``."""

    def __init__(
        self,
        disk: Disk,
        *,
        path: Path | None = None,
        store: BitmapStore | None = None,
        bitmaps: dict[str, DirtyBitmap] | None = None,
    ) -> None:
        self.disk = disk
        self.path = path
        self._store = store
        self._bitmaps: dict[str, DirtyBitmap] = (
            store.bitmaps if store is not None else (bitmaps if bitmaps is not None else {})
        )
        self._meta_lock = threading.Lock()
        self._closed = False
        self._snapshots: dict[str, Snapshot] = {}
        # Orders every write path with snapshot creation and release (see the docstring).
        self._io_lock = threading.Lock()

    # --- construction --------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, read_only: bool = False) -> Image:
        """Open a raw disk image and its persistent bitmaps (``PATH.nbdgw/``)."""
        path = Path(path)
        disk = RawFileDisk(path, read_only=read_only)
        try:
            store = BitmapStore(path, disk.size, read_only=read_only)
        except BaseException:
            disk.close()
            raise
        image = cls(disk, path=path, store=store)
        try:
            from nbdcore.storage import snapshot

            image._snapshots = snapshot.load(image, store)
        except BaseException:
            image.close()
            raise
        return image

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int) -> Image:
        """Create a sparse raw image of ``size`` bytes (refusing to overwrite anything)."""
        path = Path(path)
        if size < 0:
            raise ValueError(f"size must not be negative: {size}")
        if store_dir(path).exists():
            raise FileExistsError(
                errno.EEXIST, f"bitmap directory {store_dir(path)} already exists"
            )
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        fsync_dir(path.resolve().parent)
        return cls.open(path)

    @classmethod
    def memory(cls, size: int) -> Image:
        """A sparse in-memory image; its bitmaps live and die with it."""
        return cls(MemoryDisk(size))

    # --- properties ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.disk.size

    @property
    def read_only(self) -> bool:
        return self.disk.read_only

    @property
    def bitmaps(self) -> Mapping[str, DirtyBitmap]:
        """The bitmaps by name (a read-only view; change them through the methods below)."""
        return MappingProxyType(self._bitmaps)

    @property
    def recovered(self) -> bool:
        """True when opening found an unclean shutdown of the machine and, in doubt, marked
        every bitmap wholly dirty."""
        return self._store is not None and self._store.recovered

    @property
    def writer_active(self) -> bool:
        """True when the image was opened read-only while another process had it open for
        writing: its bitmaps are a copy of that moment and miss that process's later writes."""
        return self._store is not None and self._store.writer_active

    @property
    def can_clear_bitmaps(self) -> bool:
        """Whether ``clear_bitmap_range`` may work (a snapshot clears its forks while
        read-only)."""
        return not self.read_only

    def bitmap(self, name: str) -> DirtyBitmap:
        try:
            return self._bitmaps[name]
        except KeyError:
            raise NoSuchBitmapError(name) from None

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "memory"
        return f"Image({where!r}, size={self.size}, bitmaps={sorted(self._bitmaps)})"

    # --- bitmaps -------------------------------------------------------------------------

    def add_bitmap(
        self, name: str, *, granularity: int = DEFAULT_GRANULARITY, enabled: bool = True
    ) -> DirtyBitmap:
        """A new, clean bitmap."""
        self._check_writable()
        validate_bitmap_name(name)
        validate_granularity(granularity)
        with self._meta_lock:
            if name in self._bitmaps:
                raise BitmapExistsError(name)
            if self._store is not None:
                return self._store.add(name, granularity, enabled)
            bitmap = DirtyBitmap(name, self.size, granularity, enabled=enabled)
            self._bitmaps[name] = bitmap
            return bitmap

    def remove_bitmap(self, name: str) -> None:
        self._check_writable()
        with self._meta_lock:
            self.bitmap(name)
            holders = [s.name for s in self._snapshots.values() if name in s.bitmaps]
            if holders:
                raise BitmapError(
                    f"bitmap {name!r} is forked by snapshot {', '.join(map(repr, holders))};"
                    " release the snapshot first (its fork merges back into the bitmap)"
                )
            if self._store is not None:
                self._store.remove(name)
            else:
                del self._bitmaps[name]

    def set_bitmap_enabled(self, name: str, enabled: bool) -> None:
        """Enable (record writes) or disable (stop recording) a bitmap."""
        self._check_writable()
        with self._meta_lock:
            bitmap = self.bitmap(name)
            if bitmap.enabled == enabled:
                return
            bitmap.enabled = enabled
            if self._store is not None:
                try:
                    self._store.update(bitmap)
                except BaseException:
                    bitmap.enabled = not enabled
                    raise

    def enable_bitmap(self, name: str) -> None:
        self.set_bitmap_enabled(name, True)

    def disable_bitmap(self, name: str) -> None:
        self.set_bitmap_enabled(name, False)

    def merge_bitmap(self, source: str, target: str) -> None:
        """Mark in ``target`` every granule touching a dirty byte of ``source``."""
        self._check_writable()
        self.bitmap(target).merge_from(self.bitmap(source))

    def clear_bitmap_range(self, name: str, offset: int, length: int) -> list[tuple[int, int]]:
        """Clear the granules of bitmap ``name`` lying wholly inside the range; returns the
        byte runs now clean (see ``DirtyBitmap.clear_range``)."""
        self._check_writable()
        return self.bitmap(name).clear_range(offset, length)

    def clear_bitmap_range_since(
        self, name: str, offset: int, length: int, since: Position, *, max_runs: int | None = None
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Clear the granules of bitmap ``name`` wholly inside the range and not written after
        position ``since``; returns the ``(cleared, kept)`` byte runs (see
        ``DirtyBitmap.clear_range_since``, and its ``max_runs``)."""
        self._check_writable()
        return self.bitmap(name).clear_range_since(offset, length, since, max_runs=max_runs)

    def bitmap_position(self, name: str) -> Position:
        """The current point of bitmap ``name``'s write history."""
        return self.bitmap(name).position

    def clear_bitmap(self, name: str) -> None:
        self._check_writable()
        self.bitmap(name).clear()

    def sync_bitmaps(self) -> None:
        """Make the bitmaps' bits durable now (a persistent image; memory ones have nothing)."""
        if self._store is not None:
            self._store.sync()

    def _start_checkpoint(self, new: str, previous: str | None, granularity: int) -> None:
        # The caller holds _meta_lock (and _io_lock: no write in between). Idempotent, so that
        # opening the image can roll an interrupted start forward.
        if new not in self._bitmaps:
            if self._store is not None:
                self._store.add(new, granularity, True)
            else:
                self._bitmaps[new] = DirtyBitmap(new, self.size, granularity)
        old = self._bitmaps.get(previous) if previous else None
        if old is not None and old.enabled:
            old.enabled = False
            if self._store is not None:
                self._store.update(old)

    # --- snapshots -----------------------------------------------------------------------

    @property
    def snapshots(self) -> Mapping[str, Snapshot]:
        """The open snapshots by name (a read-only view)."""
        return MappingProxyType(self._snapshots)

    def snapshot(self, name: str) -> Snapshot:
        try:
            return self._snapshots[name]
        except KeyError:
            raise NoSuchSnapshotError(name) from None

    def create_snapshot(
        self,
        name: str,
        *,
        bitmaps: Sequence[str] = (),
        cluster_size: int = 65536,
        max_bytes: int | None = None,
        on_full: str = "break",
        views: Mapping[str, Sequence[str]] | None = None,
        checkpoint: tuple[str, str | None] | None = None,
    ) -> Snapshot:
        """Freeze the data and fork ``bitmaps`` now: the snapshot's bitmaps hold what the live
        ones held, and the live ones restart clean. ``max_bytes`` bounds the preserved data;
        when it is reached, ``on_full`` says whether the snapshot breaks (``"break"``) or the
        live write fails with ENOSPC (``"fail-write"``). ``views`` are extra forks, each the OR of
        source bitmaps, that merge back nowhere; ``checkpoint`` (new bitmap, the one that stops
        recording) starts a checkpoint at the instant. See ``nbdcore.storage.snapshot`` and
        ``nbdcore.storage.checkpoint``."""
        from nbdcore.storage import snapshot

        self._check_writable()
        with self._io_lock, self._meta_lock:
            if name in self._snapshots:
                raise SnapshotExistsError(name)
            snap = snapshot.create(
                self,
                self._store,
                name,
                list(bitmaps),
                cluster_size,
                max_bytes,
                on_full,
                {k: list(v) for k, v in (views or {}).items()},
                checkpoint,
            )
            self._snapshots[name] = snap
            return snap

    def release_snapshot(self, name: str) -> dict[str, int]:
        """Merge the snapshot's forks back into the live bitmaps, then delete it. Returns the
        dirty bytes each fork merged back (0 for a view, which merges nowhere)."""
        self._check_writable()
        with self._io_lock, self._meta_lock:
            snap = self.snapshot(name)
            merged = snap._release(self._bitmaps, self._store)
            del self._snapshots[name]
        return merged

    def _preserve(self, offset: int, length: int) -> None:
        # Copy-before-write into every snapshot; the caller holds _io_lock.
        for snap in self._snapshots.values():
            snap._preserve(offset, length)

    # --- data ----------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        return self.disk.pread(offset, length)

    def readinto(self, buf: memoryview, offset: int) -> None:
        self.disk.preadinto(buf, offset)

    def try_readinto(self, buf: memoryview, offset: int) -> int:
        """The start of :meth:`readinto` that needs no waiting (Disk.try_preadinto): how many
        bytes were read (a snapshot's disk reads none this way: it may wait for a write)."""
        return self.disk.try_preadinto(buf, offset)

    def write(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        self._check_writable()
        self.disk.check_range(offset, len(view))
        with self._io_lock, self._changing(offset, len(view)):
            self.disk.pwrite(view, offset)
        if fua:
            self._sync_fua()

    @property
    def can_zero_fast(self) -> bool:
        """Whether a fast zero (NBD_CMD_FLAG_FAST_ZERO) can ever succeed here."""
        return not self.read_only and self.disk.can_zero_fast

    def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = True,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        """``fast``: refuse with OSError(ENOTSUP), having changed no data, unless the disk
        zeroes the range without writing zeroes and no snapshot must first copy it (a pre-zero
        pass would otherwise copy the whole disk into the snapshot store)."""
        self._check_writable()
        self.disk.check_range(offset, length)
        with self._io_lock:
            if fast and (self._snapshots or not self.disk.can_zero_fast):
                raise OSError(errno.ENOTSUP, "zeroing this range would not be fast")
            with self._changing(offset, length):
                self.disk.write_zeroes(offset, length, may_trim=may_trim, fast=fast)
        if fua:
            self._sync_fua()

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_writable()
        self.disk.check_range(offset, length)
        with self._io_lock, self._changing(offset, length):
            self.disk.trim(offset, length)
        if fua:
            self._sync_fua()

    def flush(self) -> None:
        """Make the bits, then the data, durable."""
        if self._store is not None and not self.read_only:
            self._store.sync()
        self.disk.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.read_only:
                self.flush()
                # Before the store marks the image cleanly closed (snapshot.py, rule 2).
                for snap in self._snapshots.values():
                    snap._sync()
        finally:
            for snap in self._snapshots.values():
                snap._close()
            try:
                if self._store is not None:
                    self._store.close()
            finally:
                self.disk.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "the image is closed")
        if self.read_only:
            raise read_only_error("the image")

    @contextlib.contextmanager
    def _changing(self, offset: int, length: int) -> Iterator[None]:
        """Around a change of the data in ``[offset, offset + length)``; the caller holds
        _io_lock. Copy-before-write into the snapshots, then the two marks (module docstring):
        the second one even when the change fails, since a failed write may have landed part
        of its bytes, and a reader whose position is past the first mark must not clear them
        unseen."""
        self._preserve(offset, length)
        self._mark(offset, length)
        try:
            yield
        finally:
            self._mark(offset, length)

    def _mark(self, offset: int, length: int) -> None:
        # DirtyBitmap.mark_dirty is a no-op on a disabled bitmap.
        for bitmap in list(self._bitmaps.values()):
            bitmap.mark_dirty(offset, length)

    def _sync_fua(self) -> None:
        if self._store is not None:
            self._store.sync()
        if isinstance(self.disk, RawFileDisk):
            self.disk.datasync()
        else:
            self.disk.flush()
