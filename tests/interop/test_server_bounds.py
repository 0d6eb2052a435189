"""Resource bounds of the asyncio NBD server over a real socket (review H5, M8, M7).

Counters are the server's own (``NBDServer.queued_bytes``, ``NBDServer.retired_exports``),
never RSS or timings.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import pytest

from nbdcore.aio.client import NBDClient
from nbdcore.aio.server import ExportConfig, NBDServer, ServerLimits
from nbdcore.constants import (
    CONTEXT_BASE_ALLOCATION,
    NBD_STRUCTURED_REPLY_MAGIC,
    Cmd,
    ReplyType,
)
from nbdcore.exceptions import RequestError
from nbdcore.server import DEFAULT_MAX_EXTENTS
from nbdcore.storage.disk import MemoryDisk
from nbdcore.storage.image import Image
from tests.interop.test_server_hostile import Raw

pytestmark = pytest.mark.interop

MiB = 1 << 20
GRANULE = 512
# Alternating dirty/clean granules: twice as many runs as one reply may carry.
FRAGMENTED = 4 * DEFAULT_MAX_EXTENTS * GRANULE
BITMAP = "qemu:dirty-bitmap:b0"
P = ParamSpec("P")
R = TypeVar("R")


def fragmented_image() -> Image:
    img = Image.memory(FRAGMENTED)
    bitmap = img.add_bitmap("b0", granularity=GRANULE)
    for off in range(0, FRAGMENTED, 2 * GRANULE):
        bitmap.mark_dirty(off, GRANULE)
    return img


@pytest.fixture
async def fragmented(tmp_path: Path) -> AsyncIterator[tuple[NBDServer, str]]:
    img = fragmented_image()
    # A small payload limit makes the send-queue mark (2 * max_payload) small next to the
    # 1 MiB block status replies, so "bounded" and "one reply per request" differ by far.
    srv = NBDServer(
        [ExportConfig("disk", img)], limits=ServerLimits(max_payload=MiB, max_in_flight=64)
    )
    path = str(tmp_path / "nbd.sock")
    await srv.start_unix(path)
    try:
        yield srv, path
    finally:
        await srv.close()
        img.close()


async def block_status_reply(raw: Raw) -> tuple[int, dict[int, int]]:
    """One structured BLOCK_STATUS reply: (cookie, {context id: number of extents})."""
    counts: dict[int, int] = {}
    while True:
        magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", await raw.recv(20))
        assert magic == NBD_STRUCTURED_REPLY_MAGIC
        body = await raw.recv(length)
        if rtype == ReplyType.BLOCK_STATUS:
            (cid,) = struct.unpack_from(">I", body)
            counts[cid] = (length - 4) // 8
        else:
            assert rtype == ReplyType.NONE, (rtype, body)
        if flags & 1:
            return cookie, counts


def test_default_extent_cap_is_qemus() -> None:
    assert DEFAULT_MAX_EXTENTS == 131072
    assert ServerLimits().max_extents == DEFAULT_MAX_EXTENTS


async def test_reply_carries_at_most_the_default_cap(tmp_path: Path) -> None:
    img = fragmented_image()
    async with NBDServer([ExportConfig("disk", img, read_only=True)]) as srv:
        path = str(tmp_path / "s")
        await srv.start_unix(path)
        async with await NBDClient.connect(
            f"nbd+unix:///disk?socket={path}", meta_contexts=[BITMAP], extended_headers=False
        ) as client:
            lengths, flags = (await client.block_status(0, FRAGMENTED))[BITMAP]
    assert len(lengths) == DEFAULT_MAX_EXTENTS
    assert set(lengths) == {GRANULE} and list(flags[:2]) == [1, 0]


async def test_client_reading_nothing_keeps_queued_replies_bounded(
    fragmented: tuple[NBDServer, str],
) -> None:
    """64 BLOCK_STATUS of the whole fragmented disk, nothing read back: the server waits for
    the backlog to drain before it builds the next reply, and serves the other clients."""
    srv, path = fragmented
    count = 64
    reply_bytes = 20 + 4 + 8 * DEFAULT_MAX_EXTENTS
    bound = 2 * MiB + 2 * reply_bytes  # the drain mark, one reply, and slack for the other
    idle = await Raw.open(path)
    await idle.handshake(contexts=(BITMAP,))
    for cookie in range(count):
        idle.request(Cmd.BLOCK_STATUS, 0, FRAGMENTED, cookie=cookie)
    await idle.writer.drain()

    peak = 0
    stop, backed_up = asyncio.Event(), asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, srv.queued_bytes)
            if peak > 2 * MiB:
                backed_up.set()  # more than the drain mark waits in the server
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(backed_up.wait(), 60)
        async with await NBDClient.connect(
            f"nbd+unix:///disk?socket={path}", meta_contexts=[BITMAP]
        ) as good:
            for _ in range(3):
                lengths, _flags = (await good.block_status(0, 64 * GRANULE))[BITMAP]
                assert list(lengths) == [GRANULE] * 64
                assert await good.pread(0, 4096) == bytes(4096)
    finally:
        stop.set()
        await watcher
    assert 2 * MiB < peak <= bound, (peak, bound)
    # Nothing was lost: every reply arrives once the client reads.
    cookies = set()
    for _ in range(count):
        cookie, counts = await block_status_reply(idle)
        assert list(counts.values()) == [DEFAULT_MAX_EXTENTS]
        cookies.add(cookie)
    assert cookies == set(range(count))
    await idle.close()


def export_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("nbd-export")}


async def settle(srv: NBDServer) -> None:
    """Until the server has seen every client leave (it ends its side after ours)."""
    for _ in range(1000):
        if not srv.connections:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{srv.connections} connections still open")


async def test_released_snapshot_exports_are_freed(tmp_path: Path) -> None:
    """Create, use (a clear runs in the snapshot export's worker), release: whether the release
    comes before or after the client leaves, nothing of the snapshot export stays behind."""
    img = Image.create(tmp_path / "disk.raw", 4 * MiB)
    img.add_bitmap("b0")
    srv = NBDServer([ExportConfig("disk", img)], snapshot_management=True)
    path = str(tmp_path / "s")
    await srv.start_unix(path)
    try:
        async with await NBDClient.connect(f"nbd+unix:///disk?socket={path}") as live:
            await live.pwrite(b"x" * 4096, 0)  # the live export's worker: it stays
        before = export_threads()
        workers: set[threading.Thread] = set()
        for i in range(6):
            snap = f"s{i}"
            created = srv.snapshot_request(
                {"op": "create", "export": "disk", "snapshot": snap, "bitmaps": ["b0"]}
            )
            assert "error" not in created, created
            client = await NBDClient.connect(
                f"nbd+unix:///disk@{snap}?socket={path}",
                meta_contexts=[BITMAP],
                clear_extension=True,
            )
            cleared = await client.clear(0, 65536, BITMAP)
            assert cleared.runs  # the write above dirtied it
            workers |= export_threads() - before
            release = {"op": "release", "export": "disk", "snapshot": snap}
            if i % 2:
                assert "error" not in srv.snapshot_request(release)
                assert srv.retired_exports == 1  # its client still reads it
                # Still served: a clean answer, not a dropped connection.
                with pytest.raises(RequestError, match="released"):
                    await client.clear(0, 65536, BITMAP)
                await client.close()
                await settle(srv)
            else:
                await client.close()
                await settle(srv)
                assert "error" not in srv.snapshot_request(release)
            assert srv.retired_exports == 0
            assert srv.exports == ["disk"]
        assert len(workers) == 6  # one per snapshot export, started by its first clear
        for thread in workers:
            thread.join(10)
        assert not [t for t in workers if t.is_alive()]
    finally:
        await srv.close()
        img.close()


class GatedDisk(MemoryDisk):
    """A memory disk whose reads wait until the test opens the gate (at most 10 s)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = threading.Event()
        self.readers: list[str] = []
        self.timed_out = False

    def preadinto(self, buf: memoryview, offset: int) -> None:
        self.readers.append(threading.current_thread().name)
        if not self.gate.wait(10):
            self.timed_out = True
        super().preadinto(buf, offset)


def recording(func: Callable[P, R], threads: list[str]) -> Callable[P, R]:
    def wrapper(*args: P.args, **kw: P.kwargs) -> R:
        threads.append(threading.current_thread().name)
        return func(*args, **kw)

    return wrapper


async def test_read_without_sendfile_does_not_stall_the_loop(tmp_path: Path) -> None:
    """A READ that blocks in the disk (a snapshot waiting for a writer's copy-before-write,
    say) blocks its own request only: another client is served meanwhile."""
    slow = GatedDisk(MiB)
    srv = NBDServer([ExportConfig("slow", Image(slow)), ExportConfig("other", Image.memory(MiB))])
    path = str(tmp_path / "s")
    await srv.start_unix(path)
    try:
        async with await NBDClient.connect(f"nbd+unix:///slow?socket={path}") as a:
            await a.pwrite(b"s" * 4096, 0)
            pending = asyncio.create_task(a.pread(0, 4096))
            for _ in range(1000):
                if slow.readers:
                    break
                await asyncio.sleep(0.01)
            async with await NBDClient.connect(
                f"nbd+unix:///other?socket={path}", meta_contexts=[CONTEXT_BASE_ALLOCATION]
            ) as b:
                await b.pwrite(b"o" * 512, 0)
                assert await b.pread(0, 512) == b"o" * 512
                assert CONTEXT_BASE_ALLOCATION in await b.block_status(0, MiB)
            assert not pending.done()  # the slow read is still waiting for its disk
            slow.gate.set()
            assert await pending == b"s" * 4096
        assert not slow.timed_out  # the gate opened: nothing waited for the slow read
        assert slow.readers and all(n.startswith("nbd-read") for n in slow.readers)
    finally:
        slow.gate.set()
        await srv.close()


async def test_snapshot_reads_and_allocation_run_off_the_loop(tmp_path: Path) -> None:
    img = Image.create(tmp_path / "disk.raw", 4 * MiB)
    img.add_bitmap("b0")
    img.write(b"d" * 65536, 0)
    snap = img.create_snapshot("s", bitmaps=["b0"])
    threads: list[str] = []
    disk = snap.disk
    disk.preadinto = recording(disk.preadinto, threads)  # type: ignore[method-assign]
    disk.allocation = recording(disk.allocation, threads)  # type: ignore[method-assign]
    srv = NBDServer([ExportConfig("disk", img), ExportConfig("disk@s", snap, read_only=True)])
    path = str(tmp_path / "s.sock")
    await srv.start_unix(path)
    try:
        async with await NBDClient.connect(
            f"nbd+unix:///disk@s?socket={path}", meta_contexts=[CONTEXT_BASE_ALLOCATION]
        ) as client:
            img.write(b"L" * 4096, 0)  # the live disk moves on; the snapshot does not
            assert await client.pread(0, 8192) == b"d" * 8192
            lengths, flags = (await client.block_status(0, 4 * MiB))[CONTEXT_BASE_ALLOCATION]
            assert sum(lengths) == 4 * MiB and flags[0] == 0
        assert threads and all(n.startswith("nbd-read") for n in threads), threads
    finally:
        await srv.close()
        img.release_snapshot("s")
        img.close()


async def test_raw_file_reads_keep_the_sendfile_path(tmp_path: Path) -> None:
    img = Image.create(tmp_path / "disk.raw", MiB)
    img.write(b"f" * 8192, 4096)
    threads: list[str] = []
    img.disk.preadinto = recording(img.disk.preadinto, threads)  # type: ignore[method-assign]
    async with NBDServer([ExportConfig("disk", img)]) as srv:
        path = str(tmp_path / "s")
        await srv.start_unix(path)
        async with await NBDClient.connect(f"nbd+unix:///disk?socket={path}") as client:
            assert await client.pread(0, 16384) == bytes(4096) + b"f" * 8192 + bytes(4096)
    img.close()
    assert threads == []  # sendfile: the data never entered Python
