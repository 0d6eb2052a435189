"""The errors of nbdcore.storage, inside nbdcore's one exception tree.

::

    UsageError (nbdcore.exceptions)
    ├── BitmapError               bad bitmap name or granularity, corrupt bitmap metadata
    │   ├── NoSuchBitmapError     no bitmap of that name
    │   └── BitmapExistsError     a bitmap of that name already exists
    └── RangeError                a range outside the disk (also an OSError with EINVAL, so that
                                  a server maps it to NBD_EINVAL like any storage error)

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
