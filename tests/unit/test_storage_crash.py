"""Crash safety: a child process writes as fast as it can and acknowledges each write on a pipe
once ``Image.write`` has returned; the test kills it with SIGKILL at a random moment, reopens
the image and checks that every acknowledged write's granules are dirty (and that a disabled
bitmap recorded nothing)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbdcore.storage import Image

SIZE = 256 * 1024 * 1024 + 12345  # sparse; not a granule multiple

CHILD = r"""
import random, sys
from nbdcore.storage import Image

path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
image = Image.open(path)
size = image.size
out = sys.stdout
while True:
    length = rng.choice((1, 512, 4096, 65536, rng.randrange(1, 300_000)))
    offset = rng.randrange(0, size - length + 1)
    kind = rng.random()
    if kind < 0.8:
        image.write(bytes([rng.randrange(1, 256)]) * length, offset, fua=kind < 0.003)
    elif kind < 0.9:
        image.write_zeroes(offset, length, may_trim=kind < 0.85)
    else:
        image.trim(offset, length)
    out.write(f"{offset} {length}\n")
    out.flush()
"""


def run_and_kill(path: Path, seed: int, rng: random.Random) -> list[tuple[int, int]]:
    """Start the writer, kill it after a random number of acks (or a random short time before
    any), return the acknowledged (offset, length) writes."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(seed)],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None
    acks: list[tuple[int, int]] = []
    kill_after = rng.choice((0, rng.randrange(1, 50), rng.randrange(50, 3000)))
    try:
        if kill_after == 0:
            time.sleep(rng.uniform(0.0, 0.3))  # maybe still opening the image
        else:
            while len(acks) < kill_after:
                line = child.stdout.readline()
                assert line, f"writer died by itself: {child.wait()}"
                offset, length = map(int, line.split())
                acks.append((offset, length))
        os.kill(child.pid, signal.SIGKILL)
        # Acks already in the pipe were sent after their write returned: they count too.
        for line in child.stdout.read().splitlines():
            offset, length = map(int, line.split())
            acks.append((offset, length))
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return acks


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_kill_9_loses_no_acknowledged_dirty_bit(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed * 7919)
    path = tmp_path / "disk.raw"
    with Image.create(path, SIZE) as image:
        image.add_bitmap("coarse")
        image.add_bitmap("fine", granularity=512)
        image.add_bitmap("off", enabled=False)
    acks: list[tuple[int, int]] = []
    for round_ in range(2):  # the second round starts from the first one's crash
        acks += run_and_kill(path, seed * 100 + round_, rng)
        # Read-only: a writable close would fsync everything the child left in the page cache.
        with Image.open(path, read_only=True) as image:
            assert not image.recovered  # same boot: the page cache kept every bit
            assert image.bitmaps["off"].dirty_bytes() == 0
            for name in ("coarse", "fine"):
                bitmap = image.bitmaps[name]
                for offset, length in acks:
                    for start, n, flags in bitmap.extents(offset, length):
                        assert flags, (name, offset, length, start, n)
    # Nothing else got dirty: the dirty bytes are covered by the acks plus the writes in
    # flight when killed (one a round, at most 300000 bytes + a granule each side).
    with Image.open(path) as image:
        assert not image.recovered
        bitmap = image.bitmaps["fine"]
        acked = sorted(acks)
        covered = 0
        end = 0
        for offset, length in acked:
            start = max(offset // 512 * 512, end)
            stop = min(-(-(offset + length) // 512) * 512, SIZE)
            if stop > start:
                covered += stop - start
                end = stop
        assert covered <= bitmap.dirty_bytes() <= covered + 2 * (300_000 + 1024)
