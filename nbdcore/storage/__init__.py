"""Disk and bitmap storage for the NBD server: raw and memory disks, persistent crash-safe
dirty bitmaps, ``Image``, a disk with its bitmaps, and its point-in-time ``Snapshot``s."""

from __future__ import annotations

from nbdcore.storage.bitmap import DEFAULT_GRANULARITY, DirtyBitmap
from nbdcore.storage.disk import Disk, MemoryDisk, RawFileDisk
from nbdcore.storage.errors import (
    BitmapError,
    BitmapExistsError,
    NoSuchBitmapError,
    NoSuchSnapshotError,
    RangeError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotFullError,
    SnapshotUnavailableError,
)
from nbdcore.storage.image import Image
from nbdcore.storage.snapshot import Snapshot

__all__ = [
    "DEFAULT_GRANULARITY",
    "BitmapError",
    "BitmapExistsError",
    "DirtyBitmap",
    "Disk",
    "Image",
    "MemoryDisk",
    "NoSuchBitmapError",
    "NoSuchSnapshotError",
    "RangeError",
    "RawFileDisk",
    "Snapshot",
    "SnapshotError",
    "SnapshotExistsError",
    "SnapshotFullError",
    "SnapshotUnavailableError",
]
