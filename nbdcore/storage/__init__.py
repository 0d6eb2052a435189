"""Disk and bitmap storage for the NBD server: raw and memory disks, persistent crash-safe
dirty bitmaps, and ``Image``, a disk with its bitmaps."""

from __future__ import annotations

from nbdcore.storage.bitmap import DEFAULT_GRANULARITY, DirtyBitmap
from nbdcore.storage.disk import Disk, MemoryDisk, RawFileDisk
from nbdcore.storage.errors import (
    BitmapError,
    BitmapExistsError,
    NoSuchBitmapError,
    RangeError,
)
from nbdcore.storage.image import Image

__all__ = [
    "DEFAULT_GRANULARITY",
    "BitmapError",
    "BitmapExistsError",
    "DirtyBitmap",
    "Disk",
    "Image",
    "MemoryDisk",
    "NoSuchBitmapError",
    "RangeError",
    "RawFileDisk",
]
