"""The blocking client against the scripted, misbehaving servers of test_hostile_server.py (run on
the test's event loop; the client runs in a thread). Same rule: every case ends in a clear
nbdcore error within a short timeout, never a hang."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from nbdcore.exceptions import (
    ConnectionLostError,
    HandshakeError,
    NBDTimeoutError,
    RequestError,
    ServerProtocolError,
)
from nbdcore.sync.client import NBDClient
from tests.unit.test_hostile_server import (
    CONTEXTS,
    HOSTILE_READS,
    HOSTILE_STATUS,
    after_go,
    data,
    read_request,
    replying,
    server,
)


def connect(uri: str, **kw: Any) -> NBDClient:
    kw.setdefault("timeout", 2.0)
    kw.setdefault("meta_contexts", list(CONTEXTS))
    return NBDClient.connect(uri, **kw)


async def in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


@pytest.mark.parametrize(("make", "error", "match"), HOSTILE_READS)
async def test_hostile_read_replies(tmp_path: Path, make, error, match) -> None:  # type: ignore[no-untyped-def]
    def run(uri: str) -> None:
        client = connect(uri)
        with pytest.raises(error, match=match):
            client.pread(0, 64)
        if error is not RequestError:
            with pytest.raises((ServerProtocolError, ConnectionLostError)):
                client.pread(0, 64)
        client.close()

    async with server(tmp_path, after_go(replying(make, close=True))) as uri:
        await in_thread(run, uri)


@pytest.mark.parametrize(("make", "match"), HOSTILE_STATUS)
async def test_hostile_block_status_replies(tmp_path: Path, make, match) -> None:  # type: ignore[no-untyped-def]
    def run(uri: str) -> None:
        with connect(uri) as client, pytest.raises(ServerProtocolError, match=match):
            client.block_status(0, 65536)

    async with server(tmp_path, after_go(replying(make, close=True))) as uri:
        await in_thread(run, uri)


async def test_silent_server_times_out(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async with server(tmp_path, handler) as uri:
        with pytest.raises(NBDTimeoutError):
            await in_thread(lambda: connect(uri, timeout=0.3))


async def test_bad_greeting(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"NBDMAGIC" + bytes(10))

    async with server(tmp_path, handler) as uri:
        with pytest.raises((HandshakeError, ServerProtocolError)):
            await in_thread(connect, uri)


async def test_payload_stalls_midway_times_out(tmp_path: Path) -> None:
    """The payload starts, then the server goes quiet: the blocking receive of the rest ends at
    the timeout (SO_RCVTIMEO), with a clear error, and the client is closed."""

    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, _, cookie, offset, length = await read_request(reader)
        writer.write(data(cookie, offset, b"x" * length)[:100_000])
        await asyncio.sleep(30)

    def run(uri: str) -> None:
        client = connect(uri, timeout=0.3)
        with pytest.raises(NBDTimeoutError):
            client.pread(0, 1 << 20)
        assert client.closed
        with pytest.raises(NBDTimeoutError):
            client.pread(0, 4)

    async with server(tmp_path, after_go(transmission)) as uri:
        await asyncio.wait_for(in_thread(run, uri), 10)


async def test_eof_midway_is_connection_lost(tmp_path: Path) -> None:
    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, _, cookie, offset, length = await read_request(reader)
        writer.write(data(cookie, offset, b"x" * length)[:100_000])

    def run(uri: str) -> None:
        with connect(uri) as client, pytest.raises(ConnectionLostError):
            list(client.iter_reads([(0, 1 << 20)], request_size=1 << 20))

    async with server(tmp_path, after_go(transmission)) as uri:
        await asyncio.wait_for(in_thread(run, uri), 10)


async def test_out_of_order_replies(tmp_path: Path) -> None:
    """Three reads in flight answered last first: iter_reads yields them as they come, and in
    request order when asked."""

    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            requests = [await read_request(reader) for _ in range(3)]
            for _, _, cookie, offset, length in reversed(requests):
                writer.write(data(cookie, offset, bytes([offset >> 12]) * length))

    def run(uri: str) -> tuple[list[int], list[int]]:
        with connect(uri) as client:
            ranges = [(0, 3 * 4096)]
            free = [o for o, d in client.iter_reads(ranges, request_size=4096, window=3)]
            ordered = []
            for o, d in client.iter_reads(ranges, request_size=4096, window=3, ordered=True):
                assert bytes(d) == bytes([o >> 12]) * 4096
                ordered.append(o)
            return free, ordered

    async with server(tmp_path, after_go(transmission)) as uri:
        free, ordered = await asyncio.wait_for(in_thread(run, uri), 10)
    assert free == [8192, 4096, 0]
    assert ordered == [0, 4096, 8192]
