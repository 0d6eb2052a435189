"""kill -9 of the gateway and of the host in the middle of a stream of ClearRange calls:
after both restart, every acknowledged clear is there, and no granule outside a requested range
was ever cleared. Once at the source (a remote nbdcore host) and once in the ledger (a read-only
qemu-nbd export)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from tests.gateway.clear_support import G, MiB, NbdcoreHost, ReadOnlyQemu, dirty_runs, make_image
from tests.gateway.cli_support import GatewayProcess, run
from tests.peers import tool

SIZE = 32 * MiB
GRANULES = SIZE // G
B0 = "qemu:dirty-bitmap:b0"


def request_range(i: int) -> tuple[int, int]:
    """Request i clears granules 3i and 3i+1, by a byte range slightly wider than them
    (unaligned ends: only the whole granules inside may go); granule 3i+2 is never asked."""
    return 3 * i * G - (100 if i else 0), 2 * G + (100 if i else 0) + 37


def check(dirty: list[tuple[int, int]], acked: set[int]) -> None:
    """Granules 3i, 3i+1 of every acknowledged request hold no dirty byte; every granule 3i+2
    still holds one."""
    granules = {g for o, n in dirty for g in range(o // G, (o + n - 1) // G + 1)}
    for i in acked:
        assert 3 * i not in granules and 3 * i + 1 not in granules, f"acked clear {i} lost"
    for g in range(2, GRANULES, 3):
        assert g in granules, f"granule {g} was cleared but never requested"


async def clear_until_killed(
    target: str, count: int, kill_after: int, kill: Callable[[], None]
) -> set[int]:
    """ClearRange requests 0..count-1, 8 in flight; kill everything once kill_after were
    acknowledged. Returns the acknowledged ones."""
    acked: set[int] = set()
    todo = iter(range(count))
    killed = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.BitmapServiceStub(channel)

        async def worker() -> None:
            for i in todo:
                if killed.is_set():
                    return
                offset, length = request_range(i)
                try:
                    await stub.ClearRange(
                        # The ledger host's configured generation (ignored at the source).
                        pb.ClearRangeRequest(
                            export="disk",
                            bitmap="b0",
                            offset=offset,
                            length=length,
                            generation="snap-1",
                            # Nothing writes (the source's clears race only the kills).
                            unconditional=True,
                        ),
                        timeout=10,
                    )
                except grpc.aio.AioRpcError:
                    continue  # killed under it: not acknowledged
                acked.add(i)
                if len(acked) == kill_after and not killed.is_set():
                    killed.set()
                    kill()

        await asyncio.gather(*(worker() for _ in range(8)))
    return acked


def kill9(proc: subprocess.Popen[Any] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


async def test_kill_9_at_the_source(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    make_image(disk, SIZE, [(0, SIZE)])
    host = NbdcoreHost(disk, tmp_path / "host.sock").start()
    gw = GatewayProcess("--export", f"disk={host.uri}", data_dir=tmp_path / "gw").start()
    try:

        def kill() -> None:
            kill9(gw.proc)
            kill9(host.proc)

        acked = await clear_until_killed(gw.target, GRANULES // 3, 60, kill)
        assert len(acked) >= 60
        gw.stop()
        host.start()  # the same disk and bitmap files
        check(await dirty_runs(host.uri, B0), acked)
        # A restarted gateway sees the same (it clears at the source, it keeps nothing).
        gw = GatewayProcess("--export", f"disk={host.uri}", data_dir=tmp_path / "gw").start()
        async with grpc.aio.insecure_channel(gw.target) as channel:
            stub = pb_grpc.BitmapServiceStub(channel)
            again = [
                (m.offset, m)
                async for m in stub.StreamRemainingDirty(
                    pb.StreamRemainingDirtyRequest(export="disk", bitmap="b0")
                )
            ]
        rows = []
        for _, m in again:
            pos = m.offset
            for d, n in zip(m.offset_deltas, m.lengths, strict=True):
                rows.append((pos + d, n))
                pos += d + n
        assert rows == await dirty_runs(host.uri, B0)
    finally:
        gw.stop()
        host.stop()


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
async def test_kill_9_in_the_ledger(tmp_path: Path, synchronous: str) -> None:
    disk = tmp_path / "disk.qcow2"
    run(tool("qemu-img"), "create", "-q", "-f", "qcow2", str(disk), str(SIZE))
    run(tool("qemu-img"), "bitmap", "--add", "--granularity", str(G), str(disk), "b0")
    run(tool("qemu-io"), "-f", "qcow2", str(disk), input=f"write -z 0 {SIZE}\n")
    host = ReadOnlyQemu(disk, tmp_path / "q.sock").start()
    config = tmp_path / "gw.toml"
    config.write_text(
        f'ledger_synchronous = "{synchronous}"\n'
        f'[[exports]]\nname = "disk"\nuri = "{host.uri}"\ngeneration = "snap-1"\n'
    )
    args = ("--config", str(config))
    gw = GatewayProcess(*args, data_dir=tmp_path / "gw").start()
    try:

        def kill() -> None:
            kill9(gw.proc)
            kill9(host.proc)

        acked = await clear_until_killed(gw.target, GRANULES // 3, 60, kill)
        assert len(acked) >= 60
        gw.stop()
        host.start()
        # The host's bitmap never changed: all of it is still dirty there.
        assert await dirty_runs(host.uri, B0) == [(0, SIZE)]
        gw = GatewayProcess(*args, data_dir=tmp_path / "gw").start()
        async with grpc.aio.insecure_channel(gw.target) as channel:
            stub = pb_grpc.BitmapServiceStub(channel)
            dirty = []
            req = pb.StreamExtentsRequest(export="disk", context=B0, filter=pb.EXTENT_FILTER_SET)
            async for m in stub.StreamExtents(req):
                pos = m.offset
                for d, n in zip(m.offset_deltas, m.lengths, strict=True):
                    dirty.append((pos + d, n))
                    pos += d + n
        check(dirty, acked)
        # Byte-exact mask: the unaligned edges of acknowledged requests are clean too.
        for i in acked:
            offset, length = request_range(i)
            assert not any(o < offset + length and offset < o + n for o, n in dirty)
    finally:
        gw.stop()
        host.stop()
