"""Misbehaving clients over a real socket: each loses at most its own connection, while a
well-behaved client (raw bytes here, nbdinfo at the end) keeps working."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nbdcore import wire
from nbdcore.aio.server import ExportConfig, NBDServer, ServerLimits
from nbdcore.constants import (
    IHAVEOPT,
    NBD_EXTENDED_REPLY_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    Opt,
    Rep,
    ReplyType,
)
from nbdcore.exceptions import UsageError
from nbdcore.storage.image import Image
from tests.peers import tool

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 4 * MiB
PATTERN = bytes(range(256)) * 16  # 4 KiB


class Raw:
    """A hand-driven NBD client: sends exactly the bytes a test wants."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.extended = False

    @classmethod
    async def open(cls, path: str) -> Raw:
        reader, writer = await asyncio.open_unix_connection(path)
        raw = cls(reader, writer)
        greeting = await raw.recv(18)
        assert wire.GREETING.unpack(greeting)[1] == IHAVEOPT
        return raw

    async def recv(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), 10)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def option(self, option: int, payload: bytes = b"") -> list[tuple[int, bytes]]:
        self.send(wire.encode_option(option, payload))
        replies = []
        while True:
            _, opt, rtype, length = wire.OPTION_REPLY_HEADER.unpack(await self.recv(20))
            assert opt == option
            replies.append((rtype, await self.recv(length)))
            if rtype != Rep.INFO and rtype != Rep.META_CONTEXT and rtype != Rep.SERVER:
                return replies

    async def handshake(
        self, export: str = "disk", extended: bool = False, contexts: tuple[str, ...] = ()
    ) -> None:
        self.send(wire.CLIENT_FLAGS.pack(3))
        opt = Opt.EXTENDED_HEADERS if extended else Opt.STRUCTURED_REPLY
        assert (await self.option(opt))[-1][0] == Rep.ACK
        self.extended = extended
        if contexts:
            req = wire.encode_meta_context_request(export, list(contexts))
            assert (await self.option(Opt.SET_META_CONTEXT, req))[-1][0] == Rep.ACK
        replies = await self.option(Opt.GO, wire.encode_info_request(export, []))
        assert replies[-1][0] == Rep.ACK, replies

    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        cookie: int = 1,
        payload: bytes = b"",
    ) -> None:
        self.send(wire.encode_request(flags, cmd, cookie, offset, length, self.extended) + payload)

    async def reply(self) -> tuple[int, int, bytes]:
        """One whole reply: (cookie, error, data) with READ data reassembled."""
        data = bytearray()
        while True:
            (magic,) = struct.unpack(">I", await self.recv(4))
            if magic == NBD_SIMPLE_REPLY_MAGIC:
                err, cookie = struct.unpack(">IQ", await self.recv(12))
                return cookie, err, b""
            if magic == NBD_STRUCTURED_REPLY_MAGIC:
                flags, rtype, cookie, length = struct.unpack(">HHQI", await self.recv(16))
            else:
                assert magic == NBD_EXTENDED_REPLY_MAGIC
                flags, rtype, cookie, _, length = struct.unpack(">HHQQQ", await self.recv(28))
            body = await self.recv(length)
            if rtype == ReplyType.ERROR:
                return cookie, struct.unpack_from(">I", body)[0], b""
            if rtype == ReplyType.OFFSET_DATA:
                data += body[8:]
            elif rtype == ReplyType.OFFSET_HOLE:
                data += bytes(struct.unpack_from(">I", body, 8)[0])
            if flags & 1:
                return cookie, 0, bytes(data)

    async def read_ok(self, offset: int = 0, length: int = 4096) -> None:
        self.request(Cmd.READ, offset, length, cookie=77)
        cookie, err, data = await self.reply()
        assert (cookie, err) == (77, 0)
        assert data == PATTERN[:length]

    async def closed_by_server(self) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(65536), 10)
        except ConnectionError:
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[NBDServer, str]]:
    img = Image.create(tmp_path / "disk.raw", SIZE)
    img.add_bitmap("b0")
    img.write(PATTERN, 0)
    srv = NBDServer(
        [ExportConfig("disk", img, "a disk")],
        limits=ServerLimits(max_connections=8, max_in_flight=4, handshake_timeout=2.0),
    )
    path = str(tmp_path / "nbd.sock")
    await srv.start_unix(path)
    try:
        yield srv, path
    finally:
        await srv.close()
        img.close()


FATAL = {
    "bad client flags": lambda: struct.pack(">I", 0xFF),
    "bad option magic": lambda: struct.pack(">I", 3) + b"NOTMAGIC" + bytes(8),
    "huge option length": lambda: (
        struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, 2**32 - 1)
    ),
    "export name of a missing export": lambda: (
        struct.pack(">I", 3) + wire.encode_option(Opt.EXPORT_NAME, b"nope")
    ),
}


@pytest.mark.parametrize("name", list(FATAL))
async def test_handshake_violations(server: tuple[NBDServer, str], name: str) -> None:
    _, path = server
    good = await Raw.open(path)
    await good.handshake()
    bad = await Raw.open(path)
    bad.send(FATAL[name]())
    assert await bad.closed_by_server()
    await good.read_ok()
    await good.close()


@pytest.mark.parametrize("extended", [False, True])
async def test_transmission_violations(server: tuple[NBDServer, str], extended: bool) -> None:
    _, path = server
    good = await Raw.open(path)
    await good.handshake()

    # Errors the connection survives: each answered with the spec's errno.
    bad = await Raw.open(path)
    await bad.handshake(extended=extended, contexts=("qemu:dirty-bitmap:b0",))
    cases = [
        (dict(cmd=Cmd.WRITE, offset=SIZE - 2, length=4, payload=b"abcd"), Errno.ENOSPC),
        (dict(cmd=99), Errno.EINVAL),
        (dict(cmd=Cmd.READ, offset=SIZE, length=1), Errno.EINVAL),
        (dict(cmd=Cmd.READ, length=512, flags=1 << 12), Errno.EINVAL),
        (dict(cmd=Cmd.BLOCK_STATUS, length=0), Errno.EINVAL),
    ]
    if extended:
        payload = b"xyz" * 10
        cases.append(
            (
                dict(cmd=77, length=len(payload), flags=CmdFlag.PAYLOAD_LEN, payload=payload),
                Errno.EINVAL,
            )
        )
    for i, (kwargs, errno) in enumerate(cases):
        bad.request(cookie=i, **kwargs)  # type: ignore[arg-type]
        assert await bad.reply() == (i, errno, b"")
        await bad.read_ok()
    # Fatal: a payload the header did not announce (no PAYLOAD_LEN) is parsed as the next
    # request header, whose magic is wrong.
    bad.request(Cmd.FLUSH, 0, 0, cookie=5, payload=b"\xde\xad\xbe\xef" * 8)
    assert await bad.closed_by_server()
    await good.read_ok()
    await good.close()


async def test_write_to_read_only_export_is_eperm(tmp_path: Path) -> None:
    img = Image.create(tmp_path / "ro.raw", MiB)
    async with NBDServer([ExportConfig("ro", img, read_only=True)]) as srv:
        path = str(tmp_path / "s")
        await srv.start_unix(path)
        raw = await Raw.open(path)
        await raw.handshake("ro")
        raw.request(Cmd.WRITE, 0, 3, cookie=4, payload=b"abc")
        assert await raw.reply() == (4, Errno.EPERM, b"")
        await raw.close()
    img.close()


async def test_handshake_timeout(tmp_path: Path) -> None:
    img = Image.memory(MiB)
    srv = NBDServer([ExportConfig("", img)], limits=ServerLimits(handshake_timeout=0.3))
    path = str(tmp_path / "s")
    await srv.start_unix(path)
    try:
        idle = await Raw.open(path)
        assert await idle.closed_by_server()
        # Once negotiated, an idle client is not disconnected.
        busy = await Raw.open(path)
        await busy.handshake("")
        await asyncio.sleep(0.6)
        busy.request(Cmd.FLUSH, cookie=3)
        assert await busy.reply() == (3, 0, b"")
        await busy.close()
    finally:
        await srv.close()


async def test_connection_limit(tmp_path: Path) -> None:
    img = Image.memory(MiB)
    srv = NBDServer([ExportConfig("", img)], limits=ServerLimits(max_connections=2))
    path = str(tmp_path / "s")
    await srv.start_unix(path)
    try:
        a = await Raw.open(path)
        b = await Raw.open(path)
        reader, writer = await asyncio.open_unix_connection(path)
        assert await asyncio.wait_for(reader.read(18), 10) == b""  # refused: no greeting
        writer.close()
        await a.close()
        for _ in range(100):  # the server notices the close asynchronously
            if srv.connections < 2:
                break
            await asyncio.sleep(0.02)
        c = await Raw.open(path)
        await c.handshake("")
        await b.close()
        await c.close()
    finally:
        await srv.close()


async def test_flood_without_reading_replies(server: tuple[NBDServer, str]) -> None:
    """A client that pipelines far more requests than allowed in flight and reads nothing:
    the server stops reading from it, and still serves others; then every reply arrives."""
    _, path = server
    flood = await Raw.open(path)
    await flood.handshake()
    count = 300
    for i in range(count):
        flood.request(Cmd.READ, 0, 256 * 1024, cookie=i)
    await flood.writer.drain()
    good = await Raw.open(path)
    await good.handshake()
    await good.read_ok()
    cookies = set()
    for _ in range(count):
        cookie, err, data = await flood.reply()
        assert err == 0 and data[:4096] == PATTERN
        cookies.add(cookie)
    assert cookies == set(range(count))
    await flood.close()
    await good.close()


async def test_disc_finishes_in_flight_requests(server: tuple[NBDServer, str]) -> None:
    _, path = server
    raw = await Raw.open(path)
    await raw.handshake()
    raw.request(Cmd.WRITE, 8192, 4, cookie=1, payload=b"wxyz")
    raw.request(Cmd.READ, 0, 4096, cookie=2)
    raw.request(Cmd.DISC, cookie=3)
    got = {(await raw.reply())[0] for _ in range(2)}
    assert got == {1, 2}
    assert await raw.closed_by_server()


async def test_close_finishes_in_flight_then_disconnects(server: tuple[NBDServer, str]) -> None:
    srv, path = server
    raw = await Raw.open(path)
    await raw.handshake()
    raw.request(Cmd.WRITE, 0, 4, cookie=1, payload=b"abcd")
    await raw.writer.drain()
    await asyncio.sleep(0.1)  # let the server read the request before it is told to stop
    await srv.close()
    assert await raw.reply() == (1, 0, b"")
    assert await raw.closed_by_server()


async def test_multi_conn_writes_visible_to_other_connections(
    server: tuple[NBDServer, str],
) -> None:
    _, path = server
    a = await Raw.open(path)
    b = await Raw.open(path)
    await a.handshake()
    await b.handshake()
    a.request(Cmd.WRITE, MiB, 5, cookie=1, payload=b"hello")
    assert await a.reply() == (1, 0, b"")
    b.request(Cmd.FLUSH, cookie=2)
    assert await b.reply() == (2, 0, b"")
    b.request(Cmd.READ, MiB, 5, cookie=3)
    assert await b.reply() == (3, 0, b"hello")
    await a.close()
    await b.close()


async def test_exports_added_and_removed(tmp_path: Path) -> None:
    one, two = Image.memory(MiB), Image.memory(2 * MiB)
    srv = NBDServer([ExportConfig("one", one, "first")])
    path = str(tmp_path / "s")
    await srv.start_unix(path)
    try:
        srv.add_export(ExportConfig("two", two, "second", bitmaps=[]))
        proc = await asyncio.create_subprocess_exec(
            tool("nbdinfo"),
            "--list",
            f"nbd+unix:///?socket={path}",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        assert b'export="one"' in out and b'export="two"' in out and b"second" in out
        srv.remove_export("one")
        raw = await Raw.open(path)
        raw.send(wire.CLIENT_FLAGS.pack(3))
        replies = await raw.option(Opt.GO, wire.encode_info_request("one", []))
        assert replies == [(Rep.ERR_UNKNOWN, replies[0][1])]
        await raw.close()
    finally:
        await srv.close()


async def test_nbdinfo_still_works_after_abuse(server: tuple[NBDServer, str]) -> None:
    _, path = server
    for make in FATAL.values():
        bad = await Raw.open(path)
        bad.send(make())
        assert await bad.closed_by_server()
    # Half a request, then a hang-up.
    half = await Raw.open(path)
    await half.handshake()
    half.send(wire.encode_request(0, Cmd.READ, 1, 0, 512, False)[:10])
    await half.close()
    proc = await asyncio.create_subprocess_exec(
        tool("nbdinfo"),
        "--map=qemu:dirty-bitmap:b0",
        f"nbd+unix:///disk?socket={path}",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and b"dirty" in out


async def test_close_does_not_wait_forever_for_a_stalled_client(tmp_path: Path) -> None:
    img = Image.memory(SIZE)
    srv = NBDServer([ExportConfig("", img)], limits=ServerLimits(close_timeout=0.5))
    path = str(tmp_path / "s")
    await srv.start_unix(path)
    stalled = await Raw.open(path)
    await stalled.handshake("")
    for i in range(200):  # far more reply bytes than the socket buffers hold
        stalled.request(Cmd.READ, 0, 1 << 20, cookie=i)
    await stalled.writer.drain()
    await asyncio.sleep(0.2)
    await asyncio.wait_for(srv.close(), 60)  # a hang guard, not a timing assertion
    assert srv.connections == 0
    stalled.writer.close()


async def test_client_vanishing_mid_reply(
    server: tuple[NBDServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Replies to a client that hung up are dropped quietly: no error logged, nothing leaks."""
    srv, path = server
    for _ in range(3):
        gone = await Raw.open(path)
        await gone.handshake()
        for i in range(100):
            gone.request(Cmd.READ, 0, 1 << 20, cookie=i)
        gone.request(Cmd.WRITE, 2 * MiB, 4, cookie=999, payload=b"abcd")
        await gone.writer.drain()
        gone.writer.transport.abort()
    for _ in range(500):
        if srv.connections == 0:
            break
        await asyncio.sleep(0.02)
    assert srv.connections == 0
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    good = await Raw.open(path)
    await good.handshake()
    await good.read_ok()
    await good.close()


def test_export_names_must_be_nbd_strings() -> None:
    img = Image.memory(MiB)
    for name in ("x" * 4097, "a\0b"):
        with pytest.raises(UsageError):
            NBDServer([ExportConfig(name, img)])
    with pytest.raises(UsageError):
        NBDServer([ExportConfig("ok", img, bitmaps=["missing"])])


async def test_removed_export_keeps_serving_connected_clients(tmp_path: Path) -> None:
    img = Image.memory(MiB)
    srv = NBDServer([ExportConfig("disk", img)])
    path = str(tmp_path / "s")
    await srv.start_unix(path)
    try:
        raw = await Raw.open(path)
        await raw.handshake()
        srv.remove_export("disk")
        raw.request(Cmd.WRITE, 0, 3, cookie=1, payload=b"abc")
        assert await raw.reply() == (1, 0, b"")
        raw.request(Cmd.READ, 0, 3, cookie=2)
        assert await raw.reply() == (2, 0, b"abc")
        await raw.close()
    finally:
        await srv.close()
