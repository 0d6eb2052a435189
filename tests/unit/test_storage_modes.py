"""Everything nbdcore.storage creates has an explicit mode: with a umask of 000 no file or
directory of an image's store is writable by anyone but its owner (review, issue 15)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdcore.storage import Image
from nbdcore.storage.store import store_dir


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_store_is_not_world_writable_with_umask_000(tmp_path: Path, umask_000: None) -> None:
    disk = tmp_path / "d.raw"
    with Image.create(disk, 1 << 20) as image:
        image.add_bitmap("b")
        image.write(b"x" * 4096, 0)
        image.create_snapshot("s", bitmaps=["b"])
    paths = [disk, *store_dir(disk).rglob("*")]
    assert len(paths) > 4  # the image, the store, a bitmap, the snapshot's files
    loose = {
        str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.lstat().st_mode))
        for p in paths
        if p.lstat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    }
    assert loose == {}
