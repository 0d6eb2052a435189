"""RawFileDisk and MemoryDisk: content against a bytearray model, allocation maps against the
file system's own SEEK_DATA/SEEK_HOLE answers (raw) or the chunk model (memory)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdcore.storage import Disk, MemoryDisk, RangeError, RawFileDisk
from nbdcore.storage.disk import DATA, HOLE
from tests import peers

SIZE = 1 << 20
BLOCK = 4096


def seek_truth(path: Path, size: int) -> list[tuple[int, int, int]]:
    """The allocation of a file, walked with SEEK_DATA/SEEK_HOLE directly."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                data = size
            if data > pos:
                out.append((pos, min(data, size) - pos, HOLE))
                pos = min(data, size)
                continue
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
            out.append((pos, hole - pos, DATA))
            pos = hole
    finally:
        os.close(fd)
    return out


def check_cover(extents: list[tuple[int, int, int]], offset: int, length: int) -> None:
    pos = offset
    for start, n, flags in extents:
        assert start == pos and n > 0 and flags in (DATA, HOLE)
        pos += n
    assert pos == offset + length


def check_holes_read_zero(disk: Disk, extents: list[tuple[int, int, int]]) -> None:
    for start, n, flags in extents:
        if flags == HOLE:
            assert disk.pread(start, n) == bytes(n)


@pytest.fixture
def raw(tmp_path: Path) -> Iterator[RawFileDisk]:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    disk = RawFileDisk(path)
    yield disk
    disk.close()


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "trim", "zero", "zero_alloc"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 200_000),
        st.integers(1, 255),
    ),
    max_size=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=ops)
def test_raw_disk_matches_model_and_seek_data(tmp_path: Path, ops: list) -> None:
    path = tmp_path / "h.raw"
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(SIZE)
    model = bytearray(SIZE)
    written: list[tuple[int, int]] = []
    with RawFileDisk(path) as disk:
        for op, offset, length, byte in ops:
            length = min(length, SIZE - offset)
            if op == "write":
                disk.pwrite(bytes([byte]) * length, offset)
                model[offset : offset + length] = bytes([byte]) * length
                written.append((offset, length))
            else:
                if op == "trim":
                    disk.trim(offset, length)
                else:
                    disk.write_zeroes(offset, length, may_trim=op == "zero")
                model[offset : offset + length] = bytes(length)
                written = [(o, n) for o, n in written if o + n <= offset or o >= offset + length]
        assert disk.pread(0, SIZE) == model
        extents = list(disk.allocation(0, SIZE))
        check_cover(extents, 0, SIZE)
        assert extents == seek_truth(path, SIZE)
        check_holes_read_zero(disk, extents)
        # Data written and not zeroed since is never reported as a hole.
        for offset, length in written:
            for start, n, flags in disk.allocation(offset, length):
                assert flags == DATA, (offset, length, start, n)
        # Sub-ranges are clipped views of the same map.
        sub = list(disk.allocation(1000, 300_000))
        check_cover(sub, 1000, 300_000)


def test_raw_trim_punches_holes(raw: RawFileDisk) -> None:
    raw.pwrite(b"\xaa" * (16 * BLOCK), 0)
    assert list(raw.allocation(0, 16 * BLOCK)) == [(0, 16 * BLOCK, DATA)]
    raw.trim(4 * BLOCK, 4 * BLOCK)
    raw.write_zeroes(12 * BLOCK, 4 * BLOCK, may_trim=True)
    assert list(raw.allocation(0, 16 * BLOCK)) == [
        (0, 4 * BLOCK, DATA),
        (4 * BLOCK, 4 * BLOCK, HOLE),
        (8 * BLOCK, 4 * BLOCK, DATA),
        (12 * BLOCK, 4 * BLOCK, HOLE),
    ]
    assert raw.pread(3 * BLOCK, 2 * BLOCK) == b"\xaa" * BLOCK + bytes(BLOCK)
    raw.write_zeroes(0, BLOCK, may_trim=False)  # zeroes, still allocated
    assert next(raw.allocation(0, BLOCK)) == (0, BLOCK, DATA)
    assert raw.pread(0, BLOCK) == bytes(BLOCK)


def test_raw_preadinto_and_memoryviews(raw: RawFileDisk) -> None:
    payload = bytes(range(256)) * 64
    raw.pwrite(memoryview(payload)[100:], 5000)
    buf = bytearray(len(payload) - 100)
    raw.preadinto(memoryview(buf), 5000)
    assert buf == payload[100:]


def test_raw_read_only(tmp_path: Path) -> None:
    path = tmp_path / "ro.raw"
    path.write_bytes(b"x" * 8192)
    with RawFileDisk(path, read_only=True) as disk:
        assert disk.size == 8192
        for call in (
            lambda: disk.pwrite(b"y", 0),
            lambda: disk.trim(0, 4096),
            lambda: disk.write_zeroes(0, 4096),
        ):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.EPERM
        assert path.read_bytes() == b"x" * 8192


@pytest.mark.parametrize("make", ["raw", "memory"])
def test_ranges_outside_the_disk(make: str, raw: RawFileDisk) -> None:
    disk: Disk = raw if make == "raw" else MemoryDisk(SIZE)
    for call in (
        lambda: disk.pread(SIZE - 1, 2),
        lambda: disk.pwrite(b"ab", SIZE - 1),
        lambda: disk.trim(-1, 1),
        lambda: disk.write_zeroes(SIZE, 1),
        lambda: list(disk.allocation(0, SIZE + 1)),
    ):
        with pytest.raises(RangeError) as info:
            call()
        assert info.value.errno == errno.EINVAL


def test_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        RawFileDisk(tmp_path)
    with pytest.raises(FileNotFoundError):
        RawFileDisk(tmp_path / "missing")


def memory_truth(disk: MemoryDisk, chunks: set[int]) -> list[tuple[int, int, int]]:
    out: list[list[int]] = []
    cs = disk.chunk_size
    for index in range(-(-disk.size // cs)):
        n = min(cs, disk.size - index * cs)
        flags = DATA if index in chunks else HOLE
        if out and out[-1][2] == flags:
            out[-1][1] += n
        else:
            out.append([index * cs, n, flags])
    return [(a, b, c) for a, b, c in out]


@settings(max_examples=80, deadline=None)
@given(ops=ops, size=st.integers(1, SIZE))
def test_memory_disk_matches_model(ops: list, size: int) -> None:
    disk = MemoryDisk(size, chunk_size=16384)
    model = bytearray(size)
    chunks: set[int] = set()
    cs = disk.chunk_size
    for op, offset, length, byte in ops:
        offset %= size
        length = min(length, size - offset)
        first, last = offset // cs, (offset + length - 1) // cs
        if op == "write":
            disk.pwrite(bytes([byte]) * length, offset)
            model[offset : offset + length] = bytes([byte]) * length
            chunks.update(range(first, last + 1))
        else:
            if op == "trim":
                disk.trim(offset, length)
            else:
                disk.write_zeroes(offset, length, may_trim=op == "zero")
            model[offset : offset + length] = bytes(length)
            for index in range(first, last + 1):
                whole = offset <= index * cs and min((index + 1) * cs, size) <= offset + length
                if op == "zero_alloc":
                    chunks.add(index)
                elif whole:
                    chunks.discard(index)
    assert disk.pread(0, size) == model
    extents = list(disk.allocation(0, size))
    assert extents == memory_truth(disk, chunks)
    check_holes_read_zero(disk, extents)
    offset = size // 3
    sub = list(disk.allocation(offset, size - offset))
    check_cover(sub, offset, size - offset)


def test_memory_disk_fresh_is_one_hole() -> None:
    disk = MemoryDisk(3 * 65536 + 5)
    assert list(disk.allocation(0, disk.size)) == [(0, disk.size, HOLE)]
    disk.pwrite(b"z", disk.size - 1)
    assert list(disk.allocation(0, disk.size)) == [(0, 3 * 65536, HOLE), (3 * 65536, 5, DATA)]
    assert disk.pread(disk.size - 2, 2) == b"\0z"


# --- reads that never wait (Disk.try_preadinto) -------------------------------------------------


def _raw_with(tmp_path: Path, data: bytes) -> RawFileDisk:
    path = tmp_path / "d.raw"
    path.write_bytes(data)  # just written: in the page cache
    return RawFileDisk(path)


def _nowait_works(disk: RawFileDisk) -> bool:
    """Whether this kernel and file system answer preadv2(RWF_NOWAIT) on a cached page."""
    try:
        return os.preadv(disk.fd, [bytearray(1)], 0, os.RWF_NOWAIT) == 1
    except (OSError, AttributeError):
        return False


def test_try_preadinto_reads_a_cached_file_whole(tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    disk = _raw_with(tmp_path, data)
    if not _nowait_works(disk):
        # Linux >= 4.14 on ext4/xfs/btrfs has it (CI: Debian 12); elsewhere nothing is tried.
        peers.missing("preadv2(RWF_NOWAIT) on this file system", "run on Linux >= 4.14")
    buf = bytearray(SIZE // 2)
    assert disk.try_preadinto(memoryview(buf), 1000) == len(buf)
    assert bytes(buf) == data[1000 : 1000 + len(buf)]
    with pytest.raises(RangeError):
        disk.try_preadinto(memoryview(bytearray(10)), SIZE - 5)
    disk.close()


def test_try_preadinto_stops_where_the_disk_would_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short read, then EAGAIN: what was read is kept and counted, the rest is left to
    preadinto; a file system that refuses the flag is not asked again."""
    data = os.urandom(SIZE)
    disk = _raw_with(tmp_path, data)
    real = os.preadv
    calls: list[int] = []

    def short_then_eagain(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        calls.append(flags)
        if len(calls) == 1:
            view = buffers[0][:4096]
            return real(fd, [view], offset, 0)
        raise BlockingIOError(errno.EAGAIN, "would block")

    monkeypatch.setattr(os, "preadv", short_then_eagain)
    buf = bytearray(65536)
    n = disk.try_preadinto(memoryview(buf), 8192)
    if not calls:
        peers.missing("os.RWF_NOWAIT in this Python", "run CPython on Linux")
    assert n == 4096
    assert bytes(buf[:n]) == data[8192 : 8192 + n]
    monkeypatch.setattr(os, "preadv", real)
    disk.preadinto(memoryview(buf)[n:], 8192 + n)
    assert bytes(buf) == data[8192 : 8192 + len(buf)]

    def refused(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        calls.append(flags)
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "preadv", refused)
    calls.clear()
    assert disk.try_preadinto(memoryview(buf), 0) == 0
    assert disk.try_preadinto(memoryview(buf), 0) == 0
    assert len(calls) == 1  # asked once, then known
    disk.close()


def test_try_preadinto_of_memory_and_snapshot_disks(tmp_path: Path) -> None:
    from nbdcore.storage import Image

    mem = MemoryDisk(SIZE)
    mem.pwrite(b"x" * 100, 50)
    buf = bytearray(200)
    assert mem.try_preadinto(memoryview(buf), 0) == 200  # memory never waits
    assert bytes(buf) == bytes(50) + b"x" * 100 + bytes(50)
    with Image.create(tmp_path / "i.img", SIZE) as image:
        image.write(b"y" * 4096, 0)
        snap = image.create_snapshot("s")
        # A snapshot's read may wait for the image's writer (copy-on-write): never tried here.
        assert snap.try_readinto(memoryview(buf), 0) == 0
        assert image.try_readinto(memoryview(buf), 0) in (0, 200)
