"""The snapshot store reserves its data file's blocks ahead (FALLOC_FL_KEEP_SIZE) instead of
allocating them on every copy-before-write: the size still counts only preserved data (the
next slot after a reopen comes from it), the reservation never passes max_bytes, and a file
system without fallocate just writes as before."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nbdcore.storage import Image
from nbdcore.storage import snapshot as snapmod
from nbdcore.storage.store import SNAPSHOTS, store_dir

MiB = 1 << 20
C = 65536
SIZE = 32 * MiB


def filled(path: Path) -> Image:
    image = Image.create(path, SIZE)
    image.write(os.urandom(SIZE), 0)
    return image


def data_file(path: Path, name: str) -> Path:
    return store_dir(path) / SNAPSHOTS / name / "data"


def test_data_grows_into_reserved_blocks(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    image = filled(path)
    try:
        before = image.read(0, 3 * C)
        snap = image.create_snapshot("s", max_bytes=16 * MiB)
        image.write(b"\x01" * (3 * C), 0)
        st = os.stat(data_file(path, "s"))
        assert st.st_size == 3 * C == snap.used_bytes  # the size: preserved data only
        # Blocks reserved past it, up to max_bytes (the step is larger than the limit here).
        assert st.st_blocks * 512 >= 16 * MiB
        assert st.st_blocks * 512 < 16 * MiB + MiB
        assert snap.read(0, 3 * C) == before
        image.write(b"\x02" * C, 10 * C)
        assert os.stat(data_file(path, "s")).st_size == 4 * C
    finally:
        image.close()
    reopened = Image.open(path)
    try:
        snap = reopened.snapshot("s")
        assert snap.used_bytes == 4 * C  # slots continue after the data, not the reservation
        assert snap.read(0, 3 * C) == before
        reopened.write(b"\x03" * C, 20 * C)
        assert snap.used_bytes == 5 * C
        assert snap.read(0, 3 * C) == before
    finally:
        reopened.close()


def test_without_fallocate_writes_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        calls.append(length)
        raise OSError(errno.EOPNOTSUPP, "no fallocate here")

    monkeypatch.setattr(snapmod, "fallocate", refuse)
    path = tmp_path / "disk.raw"
    image = filled(path)
    try:
        before = image.read(0, 8 * C)
        snap = image.create_snapshot("s")
        for i in range(8):
            image.write(b"\x07" * C, i * C)
        assert len(calls) == 1  # tried once, then never again
        assert snap.read(0, 8 * C) == before
        assert os.stat(data_file(path, "s")).st_size == 8 * C
    finally:
        image.close()
