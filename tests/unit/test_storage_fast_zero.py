"""Fast zero in storage (review L20): ``can_zero_fast`` says whether NBD_CMD_FLAG_FAST_ZERO
can ever succeed, and ``write_zeroes(fast=True)`` refuses with ENOTSUP, data untouched,
whenever it would have to write zeroes: no punch (NO_HOLE), a punch the file system refuses,
a block device, a snapshot that would have to copy the range first."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from nbdcore.storage import MemoryDisk, RawFileDisk
from nbdcore.storage import disk as disk_mod
from nbdcore.storage.image import Image

KiB = 1024
SIZE = 1 << 20
DATA = b"\x5a" * (64 * KiB)


@pytest.fixture
def raw(tmp_path: Path) -> RawFileDisk:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(SIZE))
    disk = RawFileDisk(path)
    disk.pwrite(DATA, 0)
    return disk


def test_punching_file_is_fast(raw: RawFileDisk) -> None:
    assert raw.can_zero_fast
    raw.write_zeroes(0, len(DATA), fast=True)
    assert raw.pread(0, len(DATA)) == bytes(len(DATA))
    assert next(raw.allocation(0, len(DATA)))[2] == disk_mod.HOLE


def test_no_hole_is_never_fast(raw: RawFileDisk) -> None:
    with pytest.raises(OSError) as info:
        raw.write_zeroes(0, len(DATA), may_trim=False, fast=True)
    assert info.value.errno == errno.ENOTSUP
    assert raw.pread(0, len(DATA)) == DATA


def test_file_system_without_punch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fallocate(PUNCH_HOLE) failing with EOPNOTSUPP, as on vfat: known at open (a probe on a
    scratch file in the disk's directory), so the disk never claims fast zeroes, and a fast
    zero fails while a plain one still writes zeroes."""

    def no_punch(fd: int, mode: int, offset: int, length: int) -> int:
        import ctypes

        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(disk_mod, "_fallocate", no_punch)
    path = tmp_path / "disk.raw"
    path.write_bytes(DATA + bytes(SIZE - len(DATA)))
    disk = RawFileDisk(path)
    assert not disk.can_zero_fast
    with pytest.raises(OSError) as info:
        disk.write_zeroes(0, len(DATA), fast=True)
    assert info.value.errno == errno.ENOTSUP
    assert disk.pread(0, len(DATA)) == DATA
    disk.write_zeroes(0, 4096)
    assert disk.pread(0, 4096) == bytes(4096)


def test_punch_refused_after_open(raw: RawFileDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe said yes but a punch fails (a file system that refuses some ranges): the fast
    zero fails with ENOTSUP instead of falling back to writing zeroes, and from then on the
    disk no longer claims to be fast."""
    assert raw.can_zero_fast

    def refuse(fd: int, mode: int, offset: int, length: int) -> int:
        import ctypes

        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(disk_mod, "_fallocate", refuse)
    with pytest.raises(OSError) as info:
        raw.write_zeroes(0, len(DATA), fast=True)
    assert info.value.errno == errno.ENOTSUP
    assert raw.pread(0, len(DATA)) == DATA
    assert not raw.can_zero_fast


def test_memory_disk_is_fast() -> None:
    disk = MemoryDisk(SIZE)
    disk.pwrite(DATA, 0)
    assert disk.can_zero_fast
    disk.write_zeroes(0, len(DATA), fast=True)
    assert disk.pread(0, len(DATA)) == bytes(len(DATA))
    assert not MemoryDisk(SIZE, read_only=True).can_zero_fast


def test_image_with_a_snapshot_refuses_fast_zero(tmp_path: Path) -> None:
    """A snapshot would first copy the range into its store: no faster than writing."""
    image = Image.create(tmp_path / "disk.raw", SIZE)
    try:
        image.write(DATA, 0)
        assert image.can_zero_fast
        snap = image.create_snapshot("s1")
        with pytest.raises(OSError) as info:
            image.write_zeroes(0, len(DATA), fast=True)
        assert info.value.errno == errno.ENOTSUP
        assert image.read(0, len(DATA)) == DATA
        assert snap.read(0, len(DATA)) == DATA
        image.release_snapshot("s1")
        image.write_zeroes(0, len(DATA), fast=True)
        assert image.read(0, len(DATA)) == bytes(len(DATA))
    finally:
        image.close()
