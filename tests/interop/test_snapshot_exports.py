"""A snapshot served as its own read-only export (``EXPORT@SNAP``) by the nbdcore server, read
by real clients (qemu-img 7.2 and 10, nbdinfo) while qemu-io writes to the live export: the
readers see the disk, its allocation and the forked bitmap exactly as they were at the
snapshot instant, and the live bitmap records exactly qemu-io's writes."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nbdcore.aio.server import ExportConfig, NBDServer
from nbdcore.constants import NBD_STATE_ZERO
from nbdcore.storage import Image
from nbdcore.tools.snapshot_cmds import snapshot_export
from tests.peers import qemu10, tool

pytestmark = pytest.mark.interop

KiB = 1024
MiB = 1024 * KiB
SIZE = 32 * MiB
G = 64 * KiB


async def run(*cmd: str, input: bytes | None = None, ok: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(input), 60)
    if ok:
        assert proc.returncode == 0, (cmd, out, err)
    else:
        assert proc.returncode != 0, (cmd, out, err)
    return (out + err).decode()


def dirty_granules(runs: list[tuple[int, int, int]]) -> set[int]:
    out: set[int] = set()
    for offset, length, flags in runs:
        if flags:
            out.update(range(offset // G, -(-(offset + length) // G)))
    return out


class Setup:
    def __init__(self, tmp: Path, image: Image, server: NBDServer, sock: str) -> None:
        self.tmp = tmp
        self.image = image
        self.server = server
        self.sock = sock

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    image = Image.create(tmp_path / "disk.raw", SIZE)
    rng = random.Random(5)
    image.add_bitmap("b", granularity=G)
    for _ in range(40):  # scattered data, some dirty, the rest of the disk a hole
        length = rng.randrange(1, 600 * KiB)
        offset = rng.randrange(SIZE - length)
        image.write(rng.randbytes(length), offset)
    image.add_bitmap("other")
    sock = str(tmp_path / "nbd.sock")
    server = NBDServer([ExportConfig("disk", image)])
    await server.start_unix(sock)
    try:
        yield Setup(tmp_path, image, server, sock)
    finally:
        await server.close()
        image.close()


async def test_readers_see_the_snapshot_instant_while_qemu_io_writes(setup: Setup) -> None:
    image = setup.image
    frozen = image.read(0, SIZE)
    frozen_fork = list(image.bitmaps["b"].extents(0, SIZE))
    assert dirty_granules(frozen_fork)  # something to see
    snap = await asyncio.to_thread(image.create_snapshot, "s1", bitmaps=["b"])
    setup.server.add_export(snapshot_export("disk", snap))
    assert list(image.bitmaps["b"].extents(0, SIZE)) == [(0, SIZE, 0)]

    # qemu-io rewrites a third of the disk in 256 KiB pieces while the readers run.
    rng = random.Random(9)
    writes = sorted(rng.sample(range(SIZE // (256 * KiB)), SIZE // (256 * KiB) // 3))
    script = "".join(
        f"write -P 0x{i % 200 + 1:02x} {w * 256 * KiB} 256k\n" for i, w in enumerate(writes)
    )
    copy7 = setup.tmp / "copy7.raw"
    copy10 = setup.tmp / "copy10.raw"
    snap_uri = setup.uri("disk@s1")
    results = await asyncio.gather(
        run(tool("qemu-io"), "-f", "raw", setup.uri("disk"), input=script.encode()),
        run(tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", snap_uri, str(copy7)),
        run(qemu10("qemu-img"), "convert", "-f", "raw", "-O", "raw", snap_uri, str(copy10)),
        run(tool("nbdinfo"), "--json", "--map=qemu:dirty-bitmap:b", snap_uri),
        run(tool("nbdinfo"), "--json", "--map", snap_uri),
    )
    assert results[0].count("wrote 262144/262144 bytes") == len(writes)
    assert copy7.read_bytes() == frozen
    assert copy10.read_bytes() == frozen

    fork_map = json.loads(results[3])
    seen = [(e["offset"], e["length"], e["type"]) for e in fork_map]
    assert dirty_granules(seen) == dirty_granules(frozen_fork)
    allocation = json.loads(results[4])
    assert sum(e["length"] for e in allocation) == SIZE
    zero_runs = [e for e in allocation if e["type"] & NBD_STATE_ZERO]
    assert zero_runs  # the scattered data left holes
    for e in zero_runs:
        assert frozen[e["offset"] : e["offset"] + e["length"]] == bytes(e["length"])

    # The live export has the new data; the live bitmap exactly qemu-io's writes; the fork
    # is untouched, and the snapshot still reads as before.
    live = image.read(0, SIZE)
    for i, w in enumerate(writes):
        assert live[w * 256 * KiB : (w + 1) * 256 * KiB] == bytes([i % 200 + 1]) * 256 * KiB
    expected = {w * 4 + k for w in writes for k in range(4)}
    assert dirty_granules(list(image.bitmaps["b"].extents(0, SIZE))) == expected
    assert list(snap.bitmaps["b"].extents(0, SIZE)) == frozen_fork
    assert await asyncio.to_thread(snap.read, 0, SIZE) == frozen

    # Read-only: qemu-io cannot write the snapshot export.
    out = await run(tool("qemu-io"), "-f", "raw", "-c", "write 0 4k", snap_uri, ok=False)
    assert "ermission" in out or "read-only" in out.lower() or "Read-only" in out

    # Release: the fork merges back; new clients no longer find the export.
    setup.server.remove_export("disk@s1")
    await asyncio.to_thread(image.release_snapshot, "s1")
    merged = dirty_granules(list(image.bitmaps["b"].extents(0, SIZE)))
    assert merged == expected | dirty_granules(frozen_fork)
    await run(tool("nbdinfo"), snap_uri, ok=False)


async def test_nbdinfo_lists_the_snapshot_export_with_its_forks(setup: Setup) -> None:
    snap = await asyncio.to_thread(setup.image.create_snapshot, "nightly", bitmaps=["b", "other"])
    setup.server.add_export(snapshot_export("disk", snap))
    out = await run(tool("nbdinfo"), "--list", "--json", setup.uri(""))
    exports = {e["export-name"]: e for e in json.loads(out)["exports"]}
    assert set(exports) == {"disk", "disk@nightly"}
    snap_export = exports["disk@nightly"]
    assert snap_export["is_read_only"] is True
    assert set(snap_export["contexts"]) == {
        "base:allocation",
        "qemu:dirty-bitmap:b",
        "qemu:dirty-bitmap:other",
    }
