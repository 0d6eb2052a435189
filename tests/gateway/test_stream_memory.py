"""Memory of one StreamExtents stream over a fragmented bitmap is bounded, whatever the NBD host
is allowed to put in one BLOCK_STATUS answer.

The host here is NBDServer configured as the spec allows at most (2^20 extents per context per
answer, where qemu-nbd sends 131072), serving a 1 GiB image whose bitmap alternates every 512 B
granule: 2,097,152 extents. The gateway is ``nbdgw serve`` in its own process, so its peak RSS
(VmHWM) is its own. Measured here (2 cores, Python 3.11): +68-75 MiB over the ready gateway
before the walker sized its requests by extent density (4 answers of up to 2^20 extents in
flight), +19.5-22 MiB after. The bound, 50 MiB, is about 2.3x the figure measured now and
below what the walk held before, so it fails if the walk goes back to holding whole answers.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nbdcore.aio.server import ExportConfig, NBDServer, ServerLimits
from nbdcore.constants import MAX_EXTENTS_PER_CHUNK
from nbdcore.extents import DEFAULT_ANSWER_EXTENTS, ExtentWalker
from nbdcore.storage.image import Image
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.test_serve_cmd import serve

GRANULE = 512
SIZE = 1 << 30
EXTENTS = SIZE // GRANULE
BOUND_MIB = 50


def status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture
async def fragmented_host(tmp_path: Path) -> AsyncIterator[str]:
    """An NBD host (in this process) of the fragmented image, answering 2^20 extents at once."""
    path = tmp_path / "disk.raw"
    image = Image.create(path, SIZE)
    bitmap = image.add_bitmap("b0", granularity=GRANULE)
    for offset in range(0, SIZE, 2 * GRANULE):
        bitmap.mark_dirty(offset, GRANULE)
    image.close()
    image = Image.open(path, read_only=True)
    limits = ServerLimits(max_extents=MAX_EXTENTS_PER_CHUNK)
    sock = tmp_path / "nbd.sock"
    try:
        async with NBDServer(
            [ExportConfig(name="disk", image=image, read_only=True)], limits=limits
        ) as server:
            await server.start_unix(str(sock))
            yield f"nbd+unix:///disk?socket={sock}"
    finally:
        image.close()


async def test_one_stream_over_a_fragmented_bitmap_is_bounded(
    fragmented_host: str, tmp_path: Path
) -> None:
    args = ["--listen", "127.0.0.1:0", "--export", f"disk={fragmented_host}"]
    args += ["--data-dir", str(tmp_path / "gw")]
    async with serve(args, cwd=tmp_path) as served:
        pid = served.proc.pid
        await asyncio.sleep(0.5)
        ready = status_mib(pid, "VmRSS")
        request = pb.StreamExtentsRequest(
            export="exports/disk", context="b0", merge_allocation=True
        )
        rows = dirty = 0
        end = range_end = 0
        async for msg in served.stub.StreamExtents(request):
            rows += len(msg.lengths)
            dirty += sum(msg.flags)
            end, range_end = msg.next_offset, msg.range_end
        peak = status_mib(pid, "VmHWM")
    # The whole map went through (so the walk did meet the fragmented answers).
    assert (end, range_end) == (SIZE, SIZE)
    assert rows == EXTENTS and dirty == EXTENTS // 2
    grown = peak - ready
    assert grown < BOUND_MIB, f"gateway peak RSS grew by {grown:.1f} MiB for one stream"


def walk(walker: ExtentWalker, granule: int, cap: int) -> tuple[list[int], list[int], int]:
    """Drive the sans-I/O walker against a map alternating every ``granule`` bytes (one big
    extent when granule is 0), the server answering up to ``cap`` extents: the request
    lengths, the extents of each answer, the rows."""
    asked: dict[int, int] = {}
    lengths, answers, rows = [], [], 0
    while not walker.done:
        for start, n in walker.requests():
            asked[start] = n
            lengths.append(n)
        start = walker.head
        n = asked.pop(start)
        if granule:
            count = min(n // granule, cap)
            ext = array("Q", [granule]) * count
            flags = array("Q", [(start // granule + i) & 1 for i in range(count)])
        else:
            ext, flags = array("Q", [n]), array("Q", [0])
        answers.append(len(ext))
        walker.receive(start, {"ctx:a": (ext, flags)})
        rows += sum(len(b.lengths) for b in walker.batches())
    return lengths, answers, rows


def test_walker_requests_about_answer_extents_from_a_dense_map() -> None:
    walker = ExtentWalker(["ctx:a"], 0, SIZE, align=GRANULE, max_step=(1 << 32) - GRANULE)
    lengths, answers, rows = walk(walker, GRANULE, MAX_EXTENTS_PER_CHUNK)
    assert rows == EXTENTS
    # Without the sizing the first four requests asked 256 MiB each: 524288 extents.
    assert max(answers) <= DEFAULT_ANSWER_EXTENTS
    assert max(lengths) <= DEFAULT_ANSWER_EXTENTS * GRANULE


def test_walker_still_grows_its_requests_over_a_sparse_map() -> None:
    size = 64 << 30
    walker = ExtentWalker(["ctx:a"], 0, size, align=GRANULE, max_step=(1 << 32) - GRANULE)
    lengths, _, rows = walk(walker, 0, MAX_EXTENTS_PER_CHUNK)
    assert rows == 1
    assert max(lengths) == (1 << 32) - GRANULE  # the compact limit, reached by doubling
    assert len(lengths) < 40
