"""The errors of nbdcore.storage, inside nbdcore's one exception tree.

::

    UsageError (nbdcore.exceptions)
    ├── BitmapError               bad bitmap name or granularity, corrupt bitmap metadata
    │   ├── NoSuchBitmapError     no bitmap of that name
    │   └── BitmapExistsError     a bitmap of that name already exists
    ├── RangeError                a range outside the disk (also an OSError with EINVAL, so that
    │                             a server maps it to NBD_EINVAL like any storage error)
    └── SnapshotError             a snapshot operation was refused
        ├── NoSuchSnapshotError   no snapshot of that name (also: released already)
        ├── SnapshotExistsError   a snapshot of that name already exists
        ├── SnapshotFullError     the snapshot store hit its limit; a live write was refused
        │                         (also an OSError with ENOSPC)
        └── SnapshotUnavailableError  reading a broken or released snapshot (also an OSError
                                  with EIO, so that an NBD client sees a failed read)

Storage I/O failures are plain ``OSError`` (EIO, ENOSPC...); writing to a read-only image is
``OSError(EPERM)``; an image held by another process is ``OSError(EBUSY)``.
"""

from __future__ import annotations

import errno

from nbdcore.exceptions import UsageError


class BitmapError(UsageError):
    """A bitmap operation was refused: bad name, bad granularity, corrupt metadata."""


class NoSuchBitmapError(BitmapError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no bitmap named {name!r}")
        self.name = name


class BitmapExistsError(BitmapError):
    def __init__(self, name: str) -> None:
        super().__init__(f"bitmap {name!r} already exists")
        self.name = name


class RangeError(OSError, UsageError):
    """A byte range outside the disk or bitmap (``errno`` is EINVAL)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)

    def __str__(self) -> str:
        return str(self.strerror)


def read_only_error(what: str) -> OSError:
    return OSError(errno.EPERM, f"{what} is read-only")


class SnapshotError(UsageError):
    """A snapshot operation was refused."""


class NoSuchSnapshotError(SnapshotError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no snapshot named {name!r} (never created, or released already)")
        self.name = name


class SnapshotExistsError(SnapshotError):
    def __init__(self, name: str) -> None:
        super().__init__(f"snapshot {name!r} already exists")
        self.name = name


class SnapshotFullError(OSError, SnapshotError):
    """Preserving old data for a snapshot would exceed its space limit (``errno`` ENOSPC)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


class SnapshotUnavailableError(OSError, SnapshotError):
    """The snapshot can no longer be read: broken (out of space) or released (``errno`` EIO)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)

    def __str__(self) -> str:
        return str(self.strerror)


class CheckpointError(SnapshotError):
    """A checkpoint operation was refused."""


class NoSuchCheckpointError(CheckpointError):
    def __init__(self, checkpoint: str) -> None:
        super().__init__(f"no checkpoint {checkpoint!r} (never taken, or deleted)")
        self.checkpoint = checkpoint


class CheckpointExistsError(CheckpointError):
    def __init__(self, checkpoint: str) -> None:
        super().__init__(f"checkpoint {checkpoint!r} already exists")
        self.checkpoint = checkpoint


class CheckpointOrderError(CheckpointError):
    """A range of the chain asked backwards: the base is newer than the target."""
