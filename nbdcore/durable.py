"""Writing files so that they survive a crash: whole, fsync'd, replaced atomically.

Apart from :mod:`nbdcore.storage` (whose store writes its bitmaps and snapshots with these) so
that a command that only records its own progress (``nbdgw backup``) does not import the
image store.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` whole (short writes retried) and fsync it; ``exclusive``
    refuses a file that already exists instead of truncating it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync(dir)."""
    tmp = path.with_name(path.name + ".tmp")
    write_file(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)
