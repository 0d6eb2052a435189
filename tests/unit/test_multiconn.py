"""MultiConnClient against our own NBDServer (in process, unix socket): connection count,
dispatch over the connections, flush ordering, one connection lost."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nbdcore.aio.client import NBDClient
from nbdcore.aio.multiconn import MultiConnClient
from nbdcore.aio.server import ExportConfig, NBDServer
from nbdcore.exceptions import ConnectionLostError, UsageError
from nbdcore.storage import Image

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[str, Image]]:
    image = Image.memory(SIZE)
    image.write(os.urandom(SIZE), 0)
    sock = str(tmp_path / "s.sock")
    async with NBDServer([ExportConfig("d", image)]) as server:
        await server.start_unix(sock)
        yield f"nbd+unix:///d?socket={sock}", image
    image.close()


async def test_opens_n_connections_with_same_attributes(served: tuple[str, Image]) -> None:
    uri, _ = served
    async with await MultiConnClient.connect(
        uri, connections=3, meta_contexts=["base:allocation"]
    ) as mc:
        assert mc.can_multi_conn
        assert mc.connections == 3
        assert mc.size == SIZE
        assert "base:allocation" in mc.meta_contexts
        for c in mc.clients:
            assert (c.size, c.flags) == (mc.size, mc.flags)
        got = await mc.block_status(0, SIZE)
        assert sum(got["base:allocation"][0]) >= 1
    assert mc.closed


async def test_one_connection_when_asked(served: tuple[str, Image]) -> None:
    uri, image = served
    async with await MultiConnClient.connect(uri, connections=1) as mc:
        assert mc.connections == 1
        assert await mc.pread(4096, 4096) == image.read(4096, 4096)


async def test_bad_arguments(served: tuple[str, Image]) -> None:
    uri, _ = served
    with pytest.raises(UsageError):
        await MultiConnClient.connect(uri, connections=0)
    with pytest.raises(UsageError):
        MultiConnClient([])
    async with await MultiConnClient.connect(uri, connections=2) as mc:
        with pytest.raises(UsageError):
            await mc.read_range(bytearray(10), 0, request_size=0)


async def test_reads_spread_over_connections(
    served: tuple[str, Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, image = served
    async with await MultiConnClient.connect(uri, connections=4) as mc:
        used: list[int] = []
        for i, c in enumerate(mc.clients):
            orig = c.pread_into

            async def spy(
                buf: memoryview | bytearray, off: int, i: int = i, orig: Any = orig
            ) -> None:
                used.append(i)
                await orig(buf, off)

            monkeypatch.setattr(c, "pread_into", spy)
        buf = bytearray(SIZE)
        await mc.read_range(buf, 0, request_size=256 * 1024, in_flight=8)
        assert buf == image.read(0, SIZE)
        assert set(used) == {0, 1, 2, 3}
        # An unaligned range, larger than one request, through pread too.
        assert await mc.pread(12345, 3 * MiB + 7) == image.read(12345, 3 * MiB + 7)


async def test_read_batches_land_where_asked(served: tuple[str, Image]) -> None:
    uri, image = served
    async with await MultiConnClient.connect(uri, connections=2) as mc:
        spots = [(7 * MiB, 4096), (12345, 65536), (0, 1), (SIZE - 512, 512)]
        bufs = [bytearray(n) for _, n in spots]
        batches = [
            mc.pread_many_into(
                [(memoryview(b), off) for b, (off, _) in zip(bufs, spots, strict=True)]
            )
            for _ in range(2)
        ]
        await asyncio.gather(*batches)
        assert [bytes(b) for b in bufs] == [image.read(off, n) for off, n in spots]


async def test_write_flush_then_read_from_every_connection(served: tuple[str, Image]) -> None:
    uri, image = served
    data = os.urandom(3 * MiB)
    async with await MultiConnClient.connect(uri, connections=4) as mc:
        await mc.pwrite(data, 65536)
        await mc.zero(0, 4096)
        await mc.flush()
        for c in mc.clients:
            assert await c.pread(65536, len(data)) == data
            assert await c.pread(0, 4096) == bytes(4096)
    assert image.read(65536, len(data)) == data


async def test_flush_waits_for_writes_in_flight(
    served: tuple[str, Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLUSH covers only writes already answered: flush must not go out before them."""
    uri, _ = served
    events: list[str] = []
    async with await MultiConnClient.connect(uri, connections=4) as mc:
        for c in mc.clients:
            orig_w, orig_f = c.pwrite, c.flush

            async def pwrite(
                data: bytes, off: int, *, fua: bool = False, orig: Any = orig_w
            ) -> None:
                await orig(data, off, fua=fua)
                events.append("write done")

            async def flush(orig: Any = orig_f) -> None:
                events.append("flush sent")
                await orig()

            monkeypatch.setattr(c, "pwrite", pwrite)
            monkeypatch.setattr(c, "flush", flush)
        writes = [asyncio.ensure_future(mc.pwrite(os.urandom(MiB), i * MiB)) for i in range(6)]
        await asyncio.sleep(0)  # the writes are on the wire, unanswered
        await mc.flush()
        assert events == ["write done"] * 6 + ["flush sent"]
        await asyncio.gather(*writes)


async def test_lost_connection_fails_its_own_requests(
    served: tuple[str, Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, image = served
    async with await MultiConnClient.connect(uri, connections=4) as mc:
        victim = mc.clients[1]
        hit = asyncio.Event()
        orig = victim.pread_into

        async def spy(buf: memoryview | bytearray, off: int) -> None:
            hit.set()  # runs on into orig, which sends the request before we resume
            await orig(buf, off)

        monkeypatch.setattr(victim, "pread_into", spy)
        task = asyncio.ensure_future(mc.read_range(bytearray(SIZE), 0, request_size=65536))
        await hit.wait()
        assert victim._transport is not None
        victim._transport.abort()  # as if the connection were killed
        with pytest.raises(ConnectionLostError, match="connection 2 of 4"):
            await asyncio.wait_for(task, 30)
        # The other connections go on; the dead one is skipped.
        assert victim.closed
        buf = bytearray(SIZE)
        await mc.read_range(buf, 0)
        assert buf == image.read(0, SIZE)
        for c in mc.clients:
            if c is not victim:
                await c.close()
        with pytest.raises(ConnectionLostError, match="every connection"):
            await mc.pread(0, 10)


async def test_nbdclient_api_covered() -> None:
    """Every command of NBDClient but the clear extension is here too."""
    commands = {n for n in vars(NBDClient) if not n.startswith("_")} - {
        "connect",
        "clear",
        "clear_extension",
        "clear_since",
        "conditional_clears",
        "positions",
    }
    assert {"pread", "pwrite", "flush", "block_status", "close"} <= commands
    for name in commands:
        assert hasattr(MultiConnClient, name), name
