"""Disks: the bytes of an export, with the allocation map that ``base:allocation`` reports.

``RawFileDisk`` is a raw file (or block device) read and written with ``preadv``/``pwrite``
straight from and into the caller's buffers; holes come from ``SEEK_DATA``/``SEEK_HOLE`` and
are made with ``fallocate(PUNCH_HOLE | KEEP_SIZE)``. ``MemoryDisk`` keeps fixed-size chunks in a
dict: a chunk never written, or trimmed or zeroed whole, is a hole.

Allocation flags follow the NBD spec's ``base:allocation``: a hole is ``NBD_STATE_HOLE |
NBD_STATE_ZERO`` (a hole reads as zeroes), data is ``0`` (it may hold zeroes, not promised).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from nbdcore.constants import NBD_STATE_HOLE, NBD_STATE_ZERO
from nbdcore.storage.errors import RangeError, read_only_error

HOLE: Final = NBD_STATE_HOLE | NBD_STATE_ZERO
DATA: Final = 0

# linux/falloc.h
_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02
_FALLOC_FL_ZERO_RANGE: Final = 0x10
FALLOC_FL_KEEP_SIZE: Final = _FALLOC_FL_KEEP_SIZE

_ZERO_CHUNK: Final = 1 << 20
_ZEROES: Final = bytes(_ZERO_CHUNK)
_ZERO_VIEW: Final = memoryview(_ZEROES)


def _load_fallocate() -> ctypes._NamedFuncPointer | None:
    try:
        # The process's own symbols, libc's among them: ctypes.util.find_library("c") would
        # run `ldconfig -p` in a child process at every import of this module.
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError(EOPNOTSUPP) where the system or file system lacks it."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _probe_punch(directory: Path) -> bool:
    """Whether the file system under ``directory`` punches holes, tried on a scratch file
    there, never on the disk itself: even a punch past its end updates the image's mtime, and
    an unchanged image must look unchanged (a restart reuses the sample disk as it is). Where
    no scratch file can be made, assume yes: a punch that fails later turns it off."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".nbdgw-punch-probe-")
    except OSError:
        return True
    try:
        os.unlink(name)
        os.ftruncate(fd, 8192)
        fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, 4096)
    except OSError as exc:
        return exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
    finally:
        os.close(fd)
    return True


# preadv2(2) flag; 0 where Python does not have it (not Linux): no reads without waiting.
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)


def _not_fast() -> OSError:
    return OSError(errno.ENOTSUP, "zeroing this range would not be fast (it writes zeroes)")


class Disk(ABC):
    """A fixed-size disk. Ranges outside ``[0, size)`` raise RangeError (an OSError, EINVAL);
    writes to a read-only disk raise OSError(EPERM)."""

    size: int
    read_only: bool

    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.preadinto(memoryview(buf), offset)
        return bytes(buf)

    @abstractmethod
    def preadinto(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the bytes from ``offset``."""

    def try_preadinto(self, buf: memoryview, offset: int) -> int:
        """Fill the start of ``buf`` with what can be read without waiting (for the disk, or
        for a lock a writer holds); returns how many bytes that was (0: nothing, read it with
        :meth:`preadinto`). For a caller on an event loop: a page-cache hit is cheaper read
        there than handed to a thread. Ranges are checked as :meth:`preadinto` does."""
        self.check_range(offset, len(buf))
        return 0

    @abstractmethod
    def pwrite(self, data: bytes | memoryview, offset: int) -> None: ...

    @abstractmethod
    def flush(self) -> None:
        """Make every completed write durable (fsync)."""

    @abstractmethod
    def trim(self, offset: int, length: int) -> None:
        """Discard the range: it reads as zeroes afterwards (a hole where possible)."""

    @abstractmethod
    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False
    ) -> None:
        """Make the range read as zeroes. ``fast`` (NBD_CMD_FLAG_FAST_ZERO): only if that
        is faster than writing zeroes; otherwise raise OSError(ENOTSUP) having changed
        nothing."""

    @property
    def can_zero_fast(self) -> bool:
        """Whether ``write_zeroes(..., fast=True)`` can succeed at all (what
        NBD_FLAG_SEND_FAST_ZERO advertises)."""
        return False

    @abstractmethod
    def allocation(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """``(offset, length, flags)`` covering ``[offset, offset + length)`` exactly, flags
        ``NBD_STATE_HOLE | NBD_STATE_ZERO`` for holes and 0 for data."""

    @abstractmethod
    def close(self) -> None: ...

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RangeError(
                f"range [{offset}, {offset + length}) is outside the disk of size {self.size}"
            )

    def check_writable(self) -> None:
        if self.read_only:
            raise read_only_error("the disk")

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawFileDisk(Disk):
    """A raw disk image file or block device. The size is the file's size at open."""

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self._fd = os.open(self.path, flags)
        try:
            st = os.fstat(self._fd)
            self._block_device = stat.S_ISBLK(st.st_mode)
            if not (stat.S_ISREG(st.st_mode) or self._block_device):
                raise OSError(errno.EINVAL, f"{self.path} is not a regular file or block device")
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self._fd)
            raise
        # Whether SEEK_DATA works here; cleared on the first EINVAL/EOPNOTSUPP.
        self._seek_data = hasattr(os, "SEEK_DATA") and not self._block_device
        # Block devices: no PUNCH_HOLE through fallocate on a bdev here (BLKDISCARD may not
        # read back as zeroes), so zeroing one writes zeroes: never fast.
        self._can_punch = (
            not self._block_device and not read_only and _probe_punch(self.path.parent)
        )
        self._can_zero_range = True
        self._nowait = _RWF_NOWAIT != 0  # preadv2 RWF_NOWAIT (Linux 4.14); cleared if refused
        self._closed = False
        self._lock = threading.Lock()

    @property
    def fd(self) -> int:
        return self._fd

    def pread(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) == length:  # the usual case: one call, no extra copy
            return data
        buf = bytearray(length)
        self.preadinto(memoryview(buf), offset)
        return bytes(buf)

    def try_preadinto(self, buf: memoryview, offset: int) -> int:
        length = len(buf)
        self.check_range(offset, length)
        if not self._nowait:
            return 0
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        done = 0
        while done < length:
            try:
                # RWF_NOWAIT: what the page cache holds, EAGAIN (or a short read) where the
                # disk would have to be read.
                n = os.preadv(self._fd, [view[done:]], offset + done, _RWF_NOWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._nowait = False  # this file system (or kernel) cannot: stop asking
                    break
                raise
            if n == 0:
                break  # at the end of a shrunk file, or nothing cached: preadinto decides
            done += n
        return done

    def preadinto(self, buf: memoryview, offset: int) -> None:
        length = len(buf)
        self.check_range(offset, length)
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        done = 0
        while done < length:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                # The file shrank under us: never invent data.
                raise OSError(errno.EIO, f"unexpected end of file at {offset + done}")
            done += n

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        self.check_writable()
        view = memoryview(data).cast("B")
        length = len(view)
        self.check_range(offset, length)
        done = 0
        while done < length:
            done += os.pwrite(self._fd, view[done:], offset + done)

    def flush(self) -> None:
        if not self.read_only:
            os.fsync(self._fd)

    def datasync(self) -> None:
        """fdatasync: what FUA needs (the data and the metadata to find it)."""
        if not self.read_only:
            os.fdatasync(self._fd)

    def trim(self, offset: int, length: int) -> None:
        self.check_writable()
        self.check_range(offset, length)
        if length:
            self._zero(offset, length, punch=True)

    @property
    def can_zero_fast(self) -> bool:
        # Only a punched hole is fast for sure; ZERO_RANGE may write zeroes (NO_HOLE).
        return self._can_punch and not self.read_only

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False
    ) -> None:
        self.check_writable()
        self.check_range(offset, length)
        if fast and not (may_trim and self._can_punch):
            raise _not_fast()
        if length:
            self._zero(offset, length, punch=may_trim, fast=fast)

    def _zero(self, offset: int, length: int, *, punch: bool, fast: bool = False) -> None:
        if punch and self._can_punch:
            try:
                fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._can_punch = False
                if fast:
                    # The punch changed nothing; the fallback would be the slow write the
                    # client asked us to refuse (spec: NBD_CMD_FLAG_FAST_ZERO).
                    raise _not_fast() from exc
        if not punch and self._can_zero_range and not self._block_device:
            try:
                fallocate(self._fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._can_zero_range = False
        end = offset + length
        while offset < end:
            n = min(end - offset, _ZERO_CHUNK)
            self.pwrite(_ZERO_VIEW[:n], offset)
            offset += n

    def allocation(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        self.check_range(offset, length)
        end = offset + length
        pos = offset
        while pos < end:
            if not self._seek_data:
                yield pos, end - pos, DATA
                return
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: a hole to the end of file
                    data = end
                elif exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    self._seek_data = False
                    continue
                else:
                    raise
            if data > pos:
                stop = min(data, end)
                yield pos, stop - pos, HOLE
                pos = stop
                continue
            try:
                hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # raced with a truncate: call it data
                    raise
                hole = end
            # SEEK_HOLE returns pos itself if pos became a hole in between: report a minimal
            # data run rather than loop forever.
            stop = min(max(hole, pos + 1), end)
            yield pos, stop - pos, DATA
            pos = stop

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def __repr__(self) -> str:
        return f"RawFileDisk({str(self.path)!r}, size={self.size}, read_only={self.read_only})"


class MemoryDisk(Disk):
    """A sparse disk in memory: ``chunk_size`` chunks in a dict, absent chunks are holes."""

    def __init__(self, size: int, *, chunk_size: int = 65536, read_only: bool = False) -> None:
        if size < 0:
            raise ValueError(f"size must not be negative: {size}")
        if chunk_size <= 0 or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk size must be a power of two: {chunk_size}")
        self.size = size
        self.read_only = read_only
        self.chunk_size = chunk_size
        self._chunks: dict[int, bytearray] = {}

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(chunk index, start in chunk, length, position in the range) pieces of a range."""
        cs = self.chunk_size
        pos = 0
        while pos < length:
            index, start = divmod(offset + pos, cs)
            n = min(cs - start, length - pos)
            yield index, start, n, pos
            pos += n

    def try_preadinto(self, buf: memoryview, offset: int) -> int:
        self.preadinto(buf, offset)  # memory: nothing to wait for
        return len(buf)

    def preadinto(self, buf: memoryview, offset: int) -> None:
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        self.check_range(offset, len(view))
        for index, start, n, pos in self._pieces(offset, len(view)):
            chunk = self._chunks.get(index)
            if chunk is None:
                view[pos : pos + n] = _ZERO_VIEW[:n] if n <= _ZERO_CHUNK else bytes(n)
            else:
                view[pos : pos + n] = chunk[start : start + n]

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        self.check_writable()
        view = memoryview(data).cast("B")
        self.check_range(offset, len(view))
        for index, start, n, pos in self._pieces(offset, len(view)):
            chunk = self._chunks.get(index)
            if chunk is None:
                chunk = self._chunks[index] = bytearray(self._chunk_len(index))
            chunk[start : start + n] = view[pos : pos + n]

    def _chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def flush(self) -> None:
        pass

    def trim(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, may_trim=True)

    @property
    def can_zero_fast(self) -> bool:
        return not self.read_only  # dropping or clearing chunks in memory

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False
    ) -> None:
        self.check_writable()
        self.check_range(offset, length)
        for index, start, n, _pos in self._pieces(offset, length):
            whole = start == 0 and n == self._chunk_len(index)
            chunk = self._chunks.get(index)
            if whole and may_trim:
                self._chunks.pop(index, None)
            elif chunk is not None:
                chunk[start : start + n] = bytes(n)
            elif not may_trim:
                self._chunks[index] = bytearray(self._chunk_len(index))

    def allocation(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        self.check_range(offset, length)
        if length == 0:
            return
        cs = self.chunk_size
        end = offset + length
        # A snapshot of the keys: the server's image worker thread may add chunks meanwhile,
        # and iterating the live dict would raise instead of answering.
        allocated = sorted(i for i in list(self._chunks) if i * cs < end and (i + 1) * cs > offset)
        # Adjacent chunks merge into one data run, like the extents of a file.
        run_start = run_end = offset
        for index in allocated:
            start = max(index * cs, offset)
            stop = min((index + 1) * cs, end)
            if start > run_end:
                if run_end > run_start:
                    yield run_start, run_end - run_start, DATA
                yield run_end, start - run_end, HOLE
                run_start = start
            run_end = stop
        if run_end > run_start:
            yield run_start, run_end - run_start, DATA
        if run_end < end:
            yield run_end, end - run_end, HOLE

    def close(self) -> None:
        pass
