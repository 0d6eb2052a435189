"""The sample disk the gateway serves when nothing is configured (``scripts/run``): 64 MiB with a
dirty bitmap ``backup`` and a few recognisable dirty, clean and zero ranges."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from gateway.config import ensure_data_dir
from nbdcore.storage.image import Image
from nbdcore.storage.store import store_dir

MiB = 1024 * 1024
SAMPLE_EXPORT = "sample"
SAMPLE_BITMAP = "backup"
SAMPLE_SIZE = 64 * 1024 * 1024
# Ranges written into the sample disk after its bitmap was added (so they are dirty).
SAMPLE_DIRTY_WRITES = ((0, 1 * MiB), (8 * MiB, 64 * 1024), (32 * MiB, 4 * MiB), (60 * MiB, 4096))
SAMPLE_CLEAN_WRITE = (16 * MiB, 2 * MiB)  # written before the bitmap: data, but clean
SAMPLE_DIRTY_ZEROES = (48 * MiB, 1 * MiB)  # dirty, reads as zeros


def sample_pattern(offset: int, length: int) -> bytes:
    """The sample disk's data: each 4 KiB block says where it is (recognisable in hexdumps)."""
    out = bytearray()
    block = 4096
    for pos in range(offset - offset % block, offset + length, block):
        out += f"nbdgw sample block at {pos:#x}\n".encode().ljust(block, b".")
    start = offset % block
    return bytes(out[start : start + length])


def ensure_sample(data_dir: Path) -> Path:
    """Create the sample image in ``data_dir`` unless it exists; returns its path."""
    ensure_data_dir(data_dir)
    path = data_dir / "sample.img"
    if path.exists():
        return path
    # Build it under a temporary name, so an interrupted run never leaves half a sample.
    tmp = data_dir / "sample.img.partial"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(store_dir(tmp))
    image = Image.create(tmp, SAMPLE_SIZE)
    try:
        offset, length = SAMPLE_CLEAN_WRITE
        image.write(sample_pattern(offset, length), offset)
        image.add_bitmap(SAMPLE_BITMAP)
        for offset, length in SAMPLE_DIRTY_WRITES:
            image.write(sample_pattern(offset, length), offset)
        offset, length = SAMPLE_DIRTY_ZEROES
        image.write_zeroes(offset, length)
        image.flush()
    finally:
        image.close()
    # The image keeps its bitmaps beside it (PATH.nbdgw/): move them first, the image last, so
    # that sample.img exists only when complete.
    if store_dir(tmp).exists():
        store_dir(tmp).rename(store_dir(path))
    tmp.rename(path)
    return path
