"""Snapshots under kill -9: a child process writes, snapshots, clears forks and releases at
random, logging each step's intent before it and its acknowledgement after it; the test kills it
at a random moment, reopens the image and checks that

- every granule written and not cleared in a fork is still dirty somewhere (the live bitmap or
  the fork of a snapshot still present): no dirty block lost;
- every snapshot still present reads exactly as the disk did when it was created, even when
  the kill hit a copy-before-write;
- the live disk holds every acknowledged write.

Then a new child carries on from the state found, for several rounds."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from nbdcore.storage import Image

SIZE = 8 * 1024 * 1024 + 999
G = 4096  # bitmap granularity and cluster size

CHILD = r"""
import random, sys
from nbdcore.storage import Image

path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
image = Image.open(path)
size = image.size
out = sys.stdout
def say(line):
    out.write(line + "\n")
    out.flush()
n = 0
while True:
    kind = rng.random()
    snaps = sorted(image.snapshots)
    if kind < 0.06 and len(snaps) < 3:
        n += 1
        name = f"p{seed}-{n}"
        say(f"s {name}")
        image.create_snapshot(name, bitmaps=["b"], cluster_size=4096)
        say(f"S {name}")
    elif kind < 0.09 and snaps:
        name = rng.choice(snaps)
        say(f"r {name}")
        image.release_snapshot(name)
        say(f"R {name}")
    elif kind < 0.25 and snaps:
        name = rng.choice(snaps)
        length = rng.randrange(1, 1 << 20)
        offset = rng.randrange(0, size - length + 1)
        say(f"c {name} {offset} {length}")
        image.snapshot(name).clear_bitmap_range("b", offset, length)
        say(f"C {name}")
    else:
        length = rng.choice((1, 4096, 65536, rng.randrange(1, 300_000)))
        offset = rng.randrange(0, size - length + 1)
        byte = rng.randrange(1, 256)
        say(f"w {offset} {length} {byte}")
        image.write(bytes([byte]) * length, offset)
        say("W")
"""


def granules_of(image: Image, name: str) -> set[int]:
    bitmap = image.bitmaps[name]
    out: set[int] = set()
    for offset, length, flags in bitmap.extents(0, bitmap.size):
        if flags:
            out.update(range(offset // G, -(-(offset + length) // G)))
    return out


class World:
    """What the test knows: live data, owed granules (live and per fork), snapshot data."""

    def __init__(self, image: Image) -> None:
        self.data = bytearray(image.read(0, SIZE))
        self.live = granules_of(image, "b")
        self.forks = {n: granules_of(s, "b") for n, s in image.snapshots.items()}
        self.frozen = {n: s.read(0, SIZE) for n, s in image.snapshots.items()}
        self.pending: tuple[int, int, int] | None = None

    def apply(self, line: str) -> None:
        op, *args = line.split()
        if op == "w":
            offset, length, byte = map(int, args)
            self.pending = (offset, length, byte)
        elif op == "W":
            assert self.pending is not None
            offset, length, byte = self.pending
            self.data[offset : offset + length] = bytes([byte]) * length
            self.live |= set(range(offset // G, (offset + length - 1) // G + 1))
            self.pending = None
        elif op == "s":
            # The fork may or may not exist yet: the union check below does not care.
            self.forks[args[0]] = set(self.live)
            self.frozen[args[0]] = bytes(self.data)
        elif op == "S":
            self.live = set()
        elif op == "c":
            # A clear asked for is a clear the consumer could have had done: count it.
            name, offset, length = args[0], int(args[1]), int(args[2])
            first = -(-offset // G)
            end = -(-SIZE // G) if offset + length == SIZE else (offset + length) // G
            self.forks[name] -= set(range(first, end))
        elif op == "r":
            self.live |= self.forks[args[0]]
        elif op == "R":
            del self.forks[args[0]]

    def owed(self) -> set[int]:
        out = set(self.live)
        for bits in self.forks.values():
            out |= bits
        return out

    def check(self, image: Image) -> None:
        found = granules_of(image, "b")
        for name, snap in image.snapshots.items():
            assert name in self.frozen, f"unknown snapshot {name}"
            found |= granules_of(snap, "b")
            assert snap.read(0, SIZE) == self.frozen[name], f"snapshot {name} changed"
        lost = self.owed() - found
        assert not lost, f"{len(lost)} dirty granules lost, e.g. {sorted(lost)[:5]}"
        data = image.read(0, SIZE)
        if self.pending is not None:
            # The write in flight at the kill: each byte old or new, nothing else.
            offset, length, byte = self.pending
            got = data[offset : offset + length]
            old = self.data[offset : offset + length]
            assert all(b in (o, byte) for b, o in zip(got, old, strict=True))
            data = data[:offset] + bytes(old) + data[offset + length :]
        assert data == self.data


def run_and_kill(path: Path, seed: int, rng: random.Random, world: World) -> int:
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(seed)], stdout=subprocess.PIPE, env=env
    )
    assert child.stdout is not None
    steps = 0
    kill_after = rng.choice((0, rng.randrange(1, 40), rng.randrange(40, 1500)))
    try:
        if kill_after == 0:
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            while steps < kill_after:
                line = child.stdout.readline().decode()
                assert line, f"child died by itself: {child.wait()}"
                world.apply(line)
                steps += 1
        os.kill(child.pid, signal.SIGKILL)
        for line in child.stdout.read().decode().splitlines():
            world.apply(line)
            steps += 1
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return steps


def test_kill9_never_loses_a_dirty_granule_nor_changes_a_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    with Image.create(path, SIZE) as image:
        image.add_bitmap("b", granularity=G)
        image.write(bytes(range(256)) * (SIZE // 256), 0)
    rng = random.Random(1234)
    total = snapshots_seen = 0
    for seed in range(8):
        with Image.open(path) as image:
            world = World(image)
        total += run_and_kill(path, seed, rng, world)
        with Image.open(path) as image:
            world.check(image)
            snapshots_seen += len(image.snapshots)
    assert total > 100  # the children did get going
    assert snapshots_seen > 0
