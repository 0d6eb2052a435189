"""Persistent dirty bitmaps, stored beside their disk in ``DISK.nbdgw/``.

Layout (``KEY`` is the first 32 hex digits of the SHA-256 of the bitmap's UTF-8 name, so any
valid name makes a safe file name)::

    DISK.nbdgw/
        lock          flock()ed exclusively by the one process that has the image writable
        in-use        present while a writer has the image open: {"boot_id": ..., "pid": ...}
        KEY.json      {"format": "nbdgw-bitmap", "version": 1, "name", "granularity",
                       "enabled", "size"}
        KEY.bits      the bits (see nbdcore.storage.bitmap), mapped MAP_SHARED by the writer
        KEY.hist      the bitmap's write history (positions for conditional clears), mapped
                      MAP_SHARED by the writer like the bits

The crash-safety scheme, and why it is safe (the rule: when in doubt a granule is dirty):

1. A writer maps every ``KEY.bits`` with ``MAP_SHARED``. ``Image.write`` sets the bits of the
   written granules in that mapping *before* the data is written, sets them again after, and
   only then returns (the server replies after it returns). A store into a shared mapping is a
   store into the kernel's page cache: it outlives the process, so a ``kill -9`` at any moment
   can never lose a bit that an acknowledged write set, nor one of a write that reached the
   disk (the bits precede the data).
2. The page cache does not outlive the machine. On flush (and FUA) the bits are ``msync``ed
   before the data is ``fsync``ed. A writer's open writes ``in-use`` (atomically, with the
   kernel's ``boot_id``) before it returns, so before any write; a clean close fsyncs the data,
   msyncs every bitmap and only then removes ``in-use``. An open that finds ``in-use`` from
   *another boot* (or unreadable) knows the machine went down while a writer had the image:
   unsynced bits may be lost, so every bitmap is marked wholly dirty and msynced, and only then
   is ``in-use`` rewritten with this boot's id (a crash during recovery leaves the old marker:
   the next open recovers again). ``in-use`` from *this* boot means only the process died: the
   page cache holds every bit, and the bitmaps are trusted as they are.
3. Metadata changes (add, remove, enable, disable) write ``KEY.json.tmp``, fsync it, rename it
   over ``KEY.json`` and fsync the directory: a crash leaves the old or the new file, never a
   torn one. ``add`` creates and fsyncs the zeroed ``KEY.bits`` before its ``KEY.json`` exists;
   ``remove`` deletes ``KEY.json`` first: a bits file without metadata is an orphan, deleted at
   the next writable open. A ``KEY.json`` whose bits file is missing or short, or whose size
   differs from the disk's, gets a bits file marked wholly dirty.
4. Snapshots (``snapshots/``, see ``nbdcore.storage.snapshot``) survive the death of the
   process, not of the machine: an open that finds the machine crashed discards every snapshot
   (rename to a dot name, fsync, delete) *before* ``in-use`` is rewritten, so that a later open
   in this boot can never trust a snapshot whose preserved data the crash may have lost. The
   bitmaps, wholly dirty by then, cover whatever the discarded forks held.
5. The write history (``KEY.hist``) is stamped in the same shared mapping as the bits, so it
   survives the death of the process with them: a position handed out before a restart still
   names the same point. It is trusted only when the bits are: a machine crash, a resize, or a
   missing or short file draws a new history id (every older position then clears nothing),
   since a history that lost stamps could hand out a sequence number twice.
6. One writer at a time (``flock`` on ``lock``); readers (``read_only=True``) take no lock and
   copy the bits into memory; a reader that finds ``in-use`` from another boot reports every
   granule dirty without writing anything. A reader's copy does not follow a writer's later
   writes: a reader that finds the lock held says so (``writer_active``), so that a server
   reading the disk while another process writes it can warn that its bitmaps are frozen.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import time
from pathlib import Path
from typing import Any, Final

# Re-exported: the store's callers (image, snapshot) write their files with these.
from nbdcore.durable import fsync_dir as fsync_dir
from nbdcore.durable import write_atomic as write_atomic
from nbdcore.durable import write_file as write_file
from nbdcore.storage.bitmap import (
    DirtyBitmap,
    bits_length,
    history_length,
    validate_granularity,
    validate_name,
)
from nbdcore.storage.errors import BitmapError

FORMAT: Final = "nbdgw-bitmap"
VERSION: Final = 1
IN_USE: Final = "in-use"
LOCK: Final = "lock"
SNAPSHOTS: Final = "snapshots"
# Explicit, so that a umask of 000 does not make the store world-writable (a local user could
# then swap bitmap or snapshot files): files are 0644, directories this.
DIR_MODE: Final = 0o755


def store_dir(disk_path: str | os.PathLike[str]) -> Path:
    path = Path(disk_path)
    return path.with_name(path.name + ".nbdgw")


def bitmap_key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        # Without a boot id every unclean shutdown counts as a machine crash: conservative.
        return "unknown"


def discard_snapshots(directory: Path) -> None:
    """Delete every snapshot under ``directory/snapshots``: first renamed to dot names (which
    every writable open deletes), so that no crash can leave a half-deleted one looking valid."""
    root = directory / SNAPSHOTS
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if not entry.name.startswith("."):
            entry.rename(root / f".discarded-{entry.name}-{time.time_ns()}")
    fsync_dir(root)
    for entry in root.iterdir():
        shutil.rmtree(entry, ignore_errors=True)


class _Bits:
    """The bits file of one bitmap: a shared mapping (writer) or a private copy (reader)."""

    def __init__(self, path: Path, nbytes: int, *, writable: bool) -> None:
        self.path = path
        self.nbytes = nbytes
        self._map: mmap.mmap | None = None
        self.buffer: bytearray | mmap.mmap
        if not writable:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                data = b""
            self.complete = len(data) >= nbytes
            self.buffer = bytearray(data[:nbytes].ljust(nbytes, b"\0"))
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            have = os.fstat(fd).st_size
            self.complete = have >= nbytes
            if have != max(nbytes, 1):
                os.ftruncate(fd, max(nbytes, 1))  # mmap refuses an empty file
                os.fsync(fd)
            self._map = mmap.mmap(fd, max(nbytes, 1), mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.buffer = self._map

    def sync(self) -> None:
        if self._map is not None:
            self._map.flush()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class BitmapStore:
    """The persistent bitmaps of the disk at ``disk_path`` (a disk of ``size`` bytes)."""

    def __init__(self, disk_path: str | os.PathLike[str], size: int, *, read_only: bool) -> None:
        self.dir = store_dir(disk_path)
        self.size = size
        self.read_only = read_only
        self.bitmaps: dict[str, DirtyBitmap] = {}
        self._bits: dict[str, _Bits] = {}
        self._history: dict[str, _Bits] = {}
        self._lock_fd: int | None = None
        self.recovered = False  # True when an unclean shutdown made every bitmap dirty
        self.machine_crashed = False  # True when the last writer's machine went down
        self.writer_active = False  # a reader's: a writer held the lock when it opened
        try:
            self._open()
        except BaseException:
            self.close(clean=False)
            raise

    # --- open and close ------------------------------------------------------------------

    def _open(self) -> None:
        if not self.dir.is_dir():
            if self.read_only:
                return
            self.dir.mkdir(mode=DIR_MODE)
            fsync_dir(self.dir.parent)
        if self.read_only:
            self.writer_active = _lock_held(self.dir / LOCK)
        else:
            self._lock_fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if not _lock_exclusive(self._lock_fd):
                raise OSError(
                    errno.EBUSY, f"{self.dir.parent / self.dir.name[:-6]} is in use by a writer"
                )
        machine_crashed = self._previous_boot_crashed()
        keys = set()
        for meta_path in sorted(self.dir.glob("*.json")):
            meta = self._read_meta(meta_path)
            key = meta_path.stem
            keys.add(key)
            self._load(key, meta, machine_crashed)
        if not self.read_only:
            for path in self.dir.iterdir():
                if path.suffix in (".bits", ".hist") and path.stem not in keys:
                    path.unlink()  # orphan of an interrupted add or remove
                elif path.name.endswith(".tmp"):
                    path.unlink()
            if machine_crashed:
                self.sync()
                discard_snapshots(self.dir)
            # Only now, with a recovery made durable: a crash before this line leaves the old
            # marker, and the next open recovers again. Written before open returns, so before
            # any write can dirty a bit.
            self._write_in_use()
        self.recovered = machine_crashed and bool(self.bitmaps)
        self.machine_crashed = machine_crashed

    def _previous_boot_crashed(self) -> bool:
        try:
            text = (self.dir / IN_USE).read_text()
        except FileNotFoundError:
            return False
        try:
            previous = json.loads(text).get("boot_id")
        except (ValueError, AttributeError):
            return True  # torn or garbage: assume the worst
        return bool(previous != boot_id())

    def _write_in_use(self) -> None:
        data = json.dumps({"boot_id": boot_id(), "pid": os.getpid()}).encode()
        write_atomic(self.dir / IN_USE, data)

    def _read_meta(self, path: Path) -> dict[str, Any]:
        try:
            meta = json.loads(path.read_bytes())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError("not an nbdgw bitmap")
            if meta.get("version") != VERSION:
                raise ValueError(f"unsupported version {meta.get('version')!r}")
            validate_name(meta["name"])
            validate_granularity(meta["granularity"])
            if not isinstance(meta["enabled"], bool) or not isinstance(meta["size"], int):
                raise ValueError("bad field types")
        except (ValueError, KeyError, TypeError, BitmapError) as exc:
            raise BitmapError(f"corrupt bitmap metadata {path}: {exc}") from None
        if bitmap_key(meta["name"]) != path.stem:
            raise BitmapError(f"corrupt bitmap metadata {path}: name does not match file name")
        return meta

    def _load(self, key: str, meta: dict[str, Any], machine_crashed: bool) -> None:
        name = meta["name"]
        granularity = meta["granularity"]
        nbytes = bits_length(self.size, granularity)
        resized = meta["size"] != self.size
        bits = _Bits(self.dir / f"{key}.bits", nbytes, writable=not self.read_only)
        self._bits[name] = bits
        history = _Bits(
            self.dir / f"{key}.hist",
            history_length(self.size, granularity),
            writable=not self.read_only,
        )
        self._history[name] = history
        trusted = history.complete and bits.complete and not (machine_crashed or resized)
        bitmap = DirtyBitmap(
            name,
            self.size,
            granularity,
            enabled=meta["enabled"],
            bits=bits.buffer,
            history=history.buffer,
            history_trusted=trusted,
        )
        self.bitmaps[name] = bitmap
        if machine_crashed or resized or not bits.complete:
            bitmap.mark_all()
            if not self.read_only:
                bits.sync()
                if resized:
                    self._write_meta(bitmap)

    def sync(self) -> None:
        """msync every bitmap: the bits set so far survive a power loss."""
        for bits in self._bits.values():
            bits.sync()
        for history in self._history.values():
            history.sync()

    def close(self, *, clean: bool = True) -> None:
        """Sync, mark the image cleanly closed, release the lock. Idempotent."""
        try:
            if clean and self._lock_fd is not None:
                self.sync()
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / IN_USE).unlink()
                fsync_dir(self.dir)
        finally:
            for bits in [*self._bits.values(), *self._history.values()]:
                bits.close()
            self._bits.clear()
            self._history.clear()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    # --- changes -------------------------------------------------------------------------

    def _write_meta(self, bitmap: DirtyBitmap) -> None:
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "name": bitmap.name,
            "granularity": bitmap.granularity,
            "enabled": bitmap.enabled,
            "size": bitmap.size,
        }
        data = json.dumps(meta, ensure_ascii=False, indent=1).encode() + b"\n"
        write_atomic(self.dir / f"{bitmap_key(bitmap.name)}.json", data)

    def add(self, name: str, granularity: int, enabled: bool) -> DirtyBitmap:
        key = bitmap_key(name)
        bits_path = self.dir / f"{key}.bits"
        history_path = self.dir / f"{key}.hist"
        for path in (bits_path, history_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # an orphan: its metadata is gone, so is the bitmap
        nbytes = bits_length(self.size, granularity)
        bits = _Bits(bits_path, nbytes, writable=True)
        history = _Bits(history_path, history_length(self.size, granularity), writable=True)
        try:
            bitmap = DirtyBitmap(
                name,
                self.size,
                granularity,
                enabled=enabled,
                bits=bits.buffer,
                history=history.buffer,
            )
            fsync_dir(self.dir)
            self._write_meta(bitmap)
        except BaseException:
            bits.close()
            history.close()
            raise
        self._bits[name] = bits
        self._history[name] = history
        self.bitmaps[name] = bitmap
        return bitmap

    def remove(self, name: str) -> None:
        key = bitmap_key(name)
        (self.dir / f"{key}.json").unlink()
        fsync_dir(self.dir)
        self.bitmaps.pop(name).detach()
        self._bits.pop(name).close()
        self._history.pop(name).close()
        for suffix in (".bits", ".hist"):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / f"{key}{suffix}").unlink()

    def update(self, bitmap: DirtyBitmap) -> None:
        """Persist a change of ``bitmap.enabled``."""
        self._write_meta(bitmap)


# A reader's probe (_lock_held) holds a shared lock for a few microseconds: a writer that
# meets one tries again for this long before it says the image is in use.
_PROBE_WAIT = 0.2


def _lock_exclusive(fd: int) -> bool:
    deadline = time.monotonic() + _PROBE_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)


def _lock_held(path: Path) -> bool:
    """Whether a writer holds the store's lock now (a shared lock cannot be had), without
    keeping any lock: a reader must never block a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken
    return False
