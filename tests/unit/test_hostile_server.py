"""The asyncio client against a scripted, misbehaving server on a unix socket.

Every case must end in a clear nbdcore error within a short timeout: never a hang, never a
struct.error, never an unbounded buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from nbdcore import wire
from nbdcore.aio.client import NBDClient, export_info, list_exports
from nbdcore.constants import (
    CLISERV_MAGIC,
    NBD_REP_MAGIC,
    NBD_REPLY_FLAG_DONE,
    NBDMAGIC,
    Cmd,
    HandshakeFlag,
    Opt,
    Rep,
    ReplyType,
    TransmissionFlag,
)
from nbdcore.exceptions import (
    ConnectionLostError,
    HandshakeError,
    NBDTimeoutError,
    OptionError,
    RequestError,
    ServerProtocolError,
    UnsupportedServerError,
    UsageError,
)

SIZE = 1 << 20
FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_DF
CONTEXTS = {"base:allocation": 3, "qemu:dirty-bitmap:b0": 9}

Transmission = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[int, int, int, int, int]:
    """(flags, cmd, cookie, offset, length) of a compact request, consuming WRITE payloads."""
    _, flags, cmd, cookie, offset, length = wire.REQUEST.unpack(await reader.readexactly(28))
    if cmd == Cmd.WRITE:
        await reader.readexactly(length)
    return flags, cmd, cookie, offset, length


def chunk(cookie: int, rtype: int, payload: bytes, done: bool = True) -> bytes:
    return (
        wire.encode_chunk_header(
            NBD_REPLY_FLAG_DONE if done else 0, rtype, cookie, len(payload), False
        )
        + payload
    )


async def negotiate(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    structured: bool = True,
    set_meta_error: int = 0,
) -> None:
    """A well-behaved handshake: STRUCTURED_REPLY, SET_META_CONTEXT and GO succeed."""
    writer.write(wire.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
    await reader.readexactly(4)
    while True:
        _, opt, length = wire.OPTION_HEADER.unpack(await reader.readexactly(16))
        payload = await reader.readexactly(length)
        if opt == Opt.STRUCTURED_REPLY and structured:
            writer.write(wire.encode_option_reply(opt, Rep.ACK))
        elif opt == Opt.SET_META_CONTEXT and set_meta_error:
            writer.write(wire.encode_option_reply(opt, set_meta_error))
        elif opt == Opt.SET_META_CONTEXT:
            _, queries = wire.decode_meta_context_request(payload)
            for q in queries:
                if q in CONTEXTS:
                    body = wire.encode_rep_meta_context(CONTEXTS[q], q)
                    writer.write(wire.encode_option_reply(opt, Rep.META_CONTEXT, body))
            writer.write(wire.encode_option_reply(opt, Rep.ACK))
        elif opt == Opt.GO:
            body = wire.encode_info_export(SIZE, FLAGS)
            writer.write(wire.encode_option_reply(opt, Rep.INFO, body))
            writer.write(wire.encode_option_reply(opt, Rep.ACK))
            return
        else:
            writer.write(wire.encode_option_reply(opt, Rep.ERR_UNSUP))


@contextlib.asynccontextmanager
async def server(tmp_path: Path, handler: Transmission) -> AsyncIterator[str]:
    path = str(tmp_path / "hostile.sock")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await handler(reader, writer)
            await writer.drain()
        # A handler that returns is done: hang up, as a server does after NBD_CMD_DISC.
        writer.close()

    srv = await asyncio.start_unix_server(serve, path)
    try:
        yield f"nbd+unix:///?socket={path}"
    finally:
        srv.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await srv.wait_closed()


def after_go(transmission: Transmission, structured: bool = True) -> Transmission:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await negotiate(reader, writer, structured=structured)
        await transmission(reader, writer)

    return handler


async def connect(uri: str, **kw: object) -> NBDClient:
    kw.setdefault("timeout", 2.0)
    kw.setdefault("meta_contexts", list(CONTEXTS))
    return await NBDClient.connect(uri, **kw)  # type: ignore[arg-type]


# --- handshake ---------------------------------------------------------------------------------


async def raw(data: bytes) -> Transmission:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)

    return handler


@pytest.mark.parametrize(
    ("greeting", "error", "match"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(20), ServerProtocolError, "greeting magic"),
        (
            struct.pack(">QQ", NBDMAGIC, CLISERV_MAGIC) + bytes(136),
            UnsupportedServerError,
            "oldstyle",
        ),
        (wire.encode_greeting(0), UnsupportedServerError, "fixed newstyle"),
        (struct.pack(">QQH", NBDMAGIC, 0x1234, 1), ServerProtocolError, "after NBDMAGIC"),
        (b"NBDMAG", ConnectionLostError, "closed the connection"),
    ],
)
async def test_bad_greetings(tmp_path: Path, greeting: bytes, error: type, match: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        writer.close()

    async with server(tmp_path, handler) as uri:
        with pytest.raises(error, match=match):
            await connect(uri)


async def test_silent_server_times_out(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async with server(tmp_path, handler) as uri:
        with pytest.raises(NBDTimeoutError):
            await connect(uri, timeout=0.3)


async def test_huge_option_reply_is_refused(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(wire.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE))
        await reader.readexactly(4 + 16)
        writer.write(wire.OPTION_REPLY_HEADER.pack(NBD_REP_MAGIC, Opt.STRUCTURED_REPLY, 1, 1 << 30))
        writer.write(bytes(65536))

    async with server(tmp_path, handler) as uri:
        with pytest.raises(ServerProtocolError, match="implausibly long"):
            await connect(uri, extended_headers=False)


async def test_go_errors_become_option_errors(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(wire.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
        await reader.readexactly(4)
        while True:
            _, opt, length = wire.OPTION_HEADER.unpack(await reader.readexactly(16))
            await reader.readexactly(length)
            code = Rep.ERR_UNKNOWN if opt == Opt.GO else Rep.ERR_UNSUP
            writer.write(wire.encode_option_reply(opt, code, b"export 'x' not found"))

    async with server(tmp_path, handler) as uri:
        with pytest.raises(OptionError, match="ERR_UNKNOWN: export 'x' not found") as info:
            await connect(uri)
        assert info.value.code == Rep.ERR_UNKNOWN


async def test_starttls_refused_is_not_silently_plaintext(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(wire.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
        await reader.readexactly(4)
        _, opt, _length = wire.OPTION_HEADER.unpack(await reader.readexactly(16))
        assert opt == Opt.STARTTLS
        writer.write(wire.encode_option_reply(opt, Rep.ERR_POLICY))

    async with server(tmp_path, handler) as uri:
        tls_uri = uri.replace("nbd+unix", "nbds+unix")
        with pytest.raises(HandshakeError, match="refused TLS"):
            await connect(tls_uri)


async def test_old_server_without_go_falls_back_to_export_name(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(wire.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE))
        await reader.readexactly(4)
        while True:
            _, opt, length = wire.OPTION_HEADER.unpack(await reader.readexactly(16))
            payload = await reader.readexactly(length)
            if opt == Opt.EXPORT_NAME:
                assert payload == b"vm"
                writer.write(wire.EXPORT_NAME_REPLY.pack(SIZE, FLAGS) + bytes(124))
                break
            writer.write(wire.encode_option_reply(opt, Rep.ERR_UNSUP))
        _, _cmd, cookie, _offset, length = await read_request(reader)
        writer.write(wire.encode_simple_reply(0, cookie) + b"\x42" * length)

    async with server(tmp_path, handler) as uri:
        client = await connect(uri.replace(":///", ":///vm"))
        assert client.size == SIZE and not client.structured_replies and client.meta_contexts == {}
        assert await client.pread(0, 16) == b"\x42" * 16
        with pytest.raises(UsageError, match="structured replies"):
            await client.block_status(0, 512)
        await client.close()


async def test_listing_against_old_server(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(wire.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
        await reader.readexactly(4)
        while True:
            _, opt, length = wire.OPTION_HEADER.unpack(await reader.readexactly(16))
            await reader.readexactly(length)
            if opt == Opt.LIST:
                for name in ("a", "b"):
                    body = wire.encode_rep_server(name, f"disk {name}")
                    writer.write(wire.encode_option_reply(opt, Rep.SERVER, body))
                writer.write(wire.encode_option_reply(opt, Rep.ACK))
            elif opt == Opt.ABORT:
                writer.write(wire.encode_option_reply(opt, Rep.ACK))
                return
            else:
                writer.write(wire.encode_option_reply(opt, Rep.ERR_UNSUP))

    async with server(tmp_path, handler) as uri:
        exports = await list_exports(uri, timeout=2)
        assert [(e.name, e.description, e.size) for e in exports] == [
            ("a", "disk a", None),
            ("b", "disk b", None),
        ]
    async with server(tmp_path, handler) as uri:
        with pytest.raises(OptionError, match="ERR_UNSUP"):
            await export_info(uri, timeout=2)


# --- transmission --------------------------------------------------------------------------------


def replying(make: Callable[[int, int, int], bytes], *, close: bool = False) -> Transmission:
    """After GO, answer each request with make(cookie, offset, length); with ``close``, hang
    up right after the first answer."""

    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, cmd, cookie, offset, length = await read_request(reader)
            if cmd == Cmd.DISC:
                return
            writer.write(make(cookie, offset, length))
            if close:
                await writer.drain()
                writer.close()
                return

    return transmission


def bursts(total: int, seen: list[int]) -> Transmission:
    """After GO, take every request that arrives within a moment, then answer them all (a
    byte of ``offset // 512`` each), until ``total`` were answered; ``seen`` gets the size of
    each burst, the requests the client had unanswered at once."""

    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        while served < total:
            reqs = [await read_request(reader)]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    while True:
                        reqs.append(await read_request(reader))
            seen.append(len(reqs))
            for _, _, cookie, offset, length in reqs:
                writer.write(data(cookie, offset, bytes([offset // 512]) * length))
                served += 1
            await writer.drain()

    return transmission


def data(cookie: int, offset: int, payload: bytes, done: bool = True) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_DATA, wire.OFFSET.pack(offset) + payload, done)


def status(cookie: int, cid: int, extents: list[tuple[int, int]], done: bool = True) -> bytes:
    return chunk(
        cookie, ReplyType.BLOCK_STATUS, wire.encode_block_status(cid, extents, False), done
    )


HOSTILE_READS = [
    (lambda c, o, n: data(c + 99, o, b"x" * n), ServerProtocolError, "unknown cookie"),
    (lambda c, o, n: data(c, o + n, b"x"), ServerProtocolError, "outside the read"),
    (lambda c, o, n: data(c, o, b"x" * (n + 1)), ServerProtocolError, "data chunk of"),
    (
        lambda c, o, n: data(c, o, b"x" * 8, False) + data(c, o + 4, b"y" * 4),
        ServerProtocolError,
        "overlaps",
    ),
    (
        lambda c, o, n: wire.STRUCTURED_REPLY.pack(0x668E33EF, 1, 1, c, 0xFFFFFFF0),
        ServerProtocolError,
        "data chunk of",
    ),
    (lambda c, o, n: data(c, o, b"x" * n)[:-3], ConnectionLostError, "connection"),
    (lambda c, o, n: wire.encode_simple_reply(0, c) + b"x" * n, ServerProtocolError, "simple"),
    (lambda c, o, n: struct.pack(">I", 0x12345678) + bytes(40), ServerProtocolError, "magic"),
    (
        lambda c, o, n: chunk(c, ReplyType.ERROR, wire.encode_error_payload(5, "disk on fire")),
        RequestError,
        "EIO.*disk on fire",
    ),
]


@pytest.mark.parametrize(("make", "error", "match"), HOSTILE_READS)
async def test_hostile_read_replies(tmp_path: Path, make, error, match) -> None:  # type: ignore[no-untyped-def]
    async with server(tmp_path, after_go(replying(make, close=True))) as uri:
        client = await connect(uri)
        with pytest.raises(error, match=match):
            await client.pread(0, 64)
        if error is not RequestError:
            # The connection is unusable afterwards, with the same kind of error.
            with pytest.raises((ServerProtocolError, ConnectionLostError)):
                await client.pread(0, 64)
        await client.close()


HOSTILE_STATUS = [
    (lambda c, o, n: status(c, 3, [(0, 0)], False) + status(c, 9, [(n, 1)]), "zero-length"),
    (
        lambda c, o, n: status(c, 3, [(n, 0), (512, 1)], False) + status(c, 9, [(n, 1)]),
        "before the last",
    ),
    (lambda c, o, n: status(c, 3, [(n, 0)]), "lacks contexts \\[9\\]"),
    (lambda c, o, n: status(c, 4, [(n, 0)]), "not asked"),
    (lambda c, o, n: status(c, 3, [(n, 0)], False) + status(c, 3, [(n, 0)]), "two block status"),
    (lambda c, o, n: chunk(c, ReplyType.BLOCK_STATUS, b"\0\0\0\3\0\0"), "not 4 \\+ 8n"),
    (lambda c, o, n: wire.STRUCTURED_REPLY.pack(0x668E33EF, 1, 5, c, 1 << 31), "too long"),
    (
        lambda c, o, n: chunk(c, ReplyType.OFFSET_DATA, wire.OFFSET.pack(o) + b"x"),
        "data chunk in the reply to BLOCK_STATUS",
    ),
]


@pytest.mark.parametrize(("make", "match"), HOSTILE_STATUS)
async def test_hostile_block_status_replies(tmp_path: Path, make, match) -> None:  # type: ignore[no-untyped-def]
    async with server(tmp_path, after_go(replying(make, close=True))) as uri:
        client = await connect(uri)
        with pytest.raises(ServerProtocolError, match=match):
            await client.block_status(0, 65536)
        await client.close()


async def test_overshooting_last_extent_is_accepted(tmp_path: Path) -> None:
    def make(c: int, o: int, n: int) -> bytes:
        return status(c, 9, [(n * 4, 1)], False) + status(c, 3, [(512, 0), (n, 3)])

    async with server(tmp_path, after_go(replying(make))) as uri:
        client = await connect(uri)
        result = await client.block_status(0, 4096)
        assert {k: (list(v[0]), list(v[1])) for k, v in result.items()} == {
            "base:allocation": ([512, 4096], [0, 3]),
            "qemu:dirty-bitmap:b0": ([16384], [1]),
        }
        only = await client.block_status(0, 4096, contexts=["qemu:dirty-bitmap:b0"])
        assert list(only) == ["qemu:dirty-bitmap:b0"]
        await client.close()


async def test_stalled_request_times_out_and_closes(tmp_path: Path) -> None:
    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with server(tmp_path, after_go(transmission)) as uri:
        client = await connect(uri, timeout=0.3)
        with pytest.raises(NBDTimeoutError):
            await client.pread(0, 512)
        assert client.closed or client._failure is not None
        with pytest.raises(NBDTimeoutError):
            await client.flush()
        await client.close()


async def test_truncated_chunk_then_stall_times_out(tmp_path: Path) -> None:
    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, _, cookie, offset, length = await read_request(reader)
        writer.write(data(cookie, offset, b"x" * length)[:-100])
        await asyncio.sleep(30)

    async with server(tmp_path, after_go(transmission)) as uri:
        client = await connect(uri, timeout=0.3)
        with pytest.raises(NBDTimeoutError):
            await client.pread(0, 4096)
        await client.close()


async def test_eof_fails_every_waiter(tmp_path: Path) -> None:
    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):
            await read_request(reader)
        writer.close()

    async with server(tmp_path, after_go(transmission)) as uri:
        client = await connect(uri)
        results = await asyncio.gather(
            client.pread(0, 512), client.flush(), client.pread(512, 512), return_exceptions=True
        )
        assert all(isinstance(r, ConnectionLostError) for r in results), results
        await client.close()


async def test_out_of_order_replies_and_cancelled_request(tmp_path: Path) -> None:
    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reqs = [await read_request(reader) for _ in range(3)]
        # Answer in reverse order; the first request was cancelled by then.
        for _, _, cookie, offset, length in reversed(reqs):
            writer.write(data(cookie, offset, bytes([offset // 512]) * length))
        await writer.drain()
        _, _, cookie, offset, length = await read_request(reader)
        writer.write(data(cookie, offset, b"\x07" * length))

    async with server(tmp_path, after_go(transmission)) as uri:
        client = await connect(uri)
        cancelled = asyncio.ensure_future(client.pread(0, 512))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(client.pread(512, 512))
        third = asyncio.ensure_future(client.pread(1024, 512))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        assert await second == b"\x01" * 512
        assert await third == b"\x02" * 512
        # The late answer to the cancelled read was discarded; the connection still works.
        assert await client.pread(4096, 16) == b"\x07" * 16
        await client.close()


async def test_in_flight_window_is_bounded(tmp_path: Path) -> None:
    extra_before_answers: list[bool] = []

    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        while served < 9:
            # The window is 3: three requests arrive, then nothing until one is answered.
            batch = [await read_request(reader) for _ in range(3)]
            try:
                async with asyncio.timeout(0.2):
                    await reader.readexactly(1)
                extra_before_answers.append(True)
            except TimeoutError:
                extra_before_answers.append(False)
            for _, _, cookie, offset, length in batch:
                writer.write(data(cookie, offset, b"\0" * length))
                served += 1
        _, _, cookie, offset, length = await read_request(reader)
        writer.write(data(cookie, offset, b"\0" * length))

    async with server(tmp_path, after_go(transmission)) as uri:
        client = await connect(uri, max_in_flight=3)
        results = await asyncio.gather(*(client.pread(i * 512, 512) for i in range(10)))
        assert results == [bytes(512)] * 10
        assert extra_before_answers == [False, False, False]
        await client.close()


async def test_pread_above_max_payload_is_split(tmp_path: Path) -> None:
    lengths: list[int] = []

    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, cmd, cookie, offset, length = await read_request(reader)
            if cmd == Cmd.DISC:
                return
            lengths.append(length)
            writer.write(data(cookie, offset, bytes([offset >> 20]) * length))

    async with server(tmp_path, after_go(transmission)) as uri:
        client = await connect(uri)
        client._conn.block_size = wire.BlockSize(1, 4096, 1 << 18)
        buf = await client.pread(0, SIZE)
        assert buf == bytes(SIZE) and sorted(lengths) == [1 << 18] * 4
        await client.close()


async def test_write_error_is_a_request_error_and_connection_survives(tmp_path: Path) -> None:
    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, cmd, cookie, _, _ = await read_request(reader)
        assert cmd == Cmd.WRITE
        writer.write(wire.encode_simple_reply(28, cookie))
        _, cmd, cookie, _, _ = await read_request(reader)
        writer.write(wire.encode_simple_reply(0, cookie))

    async with server(tmp_path, after_go(transmission)) as uri:
        client = await connect(uri)
        with pytest.raises(RequestError, match="ENOSPC") as info:
            await client.pwrite(b"x" * 512, 0)
        assert info.value.errno == 28
        await client.flush()
        await client.close()


async def test_close_lets_requests_in_flight_finish(tmp_path: Path) -> None:
    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, _, cookie, offset, length = await read_request(reader)
        _, cmd, _, _, _ = await read_request(reader)
        assert cmd == Cmd.DISC  # the spec: finish what is in flight, then hang up
        writer.write(data(cookie, offset, b"\x09" * length))
        await writer.drain()
        writer.close()

    async with server(tmp_path, after_go(transmission)) as uri:
        client = await connect(uri)
        pending = asyncio.ensure_future(client.pread(0, 512))
        await asyncio.sleep(0.01)
        await client.close()
        assert await pending == b"\x09" * 512
        with pytest.raises(UsageError, match="closed"):
            await client.pread(0, 512)


@pytest.mark.parametrize("code", [Rep.ERR_UNSUP, Rep.ERR_INVALID])
async def test_server_refusing_meta_contexts(tmp_path: Path, code: int) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await negotiate(reader, writer, set_meta_error=code)
        await replying(lambda c, o, n: data(c, o, b"\x05" * n))(reader, writer)

    async with server(tmp_path, handler) as uri:
        if code == Rep.ERR_INVALID:
            with pytest.raises(OptionError, match="ERR_INVALID"):
                await connect(uri)
            return
        # No contexts, but the data is still there.
        client = await connect(uri)
        assert client.structured_replies and client.meta_contexts == {}
        assert await client.pread(0, 8) == b"\x05" * 8
        with pytest.raises(UsageError, match="no metadata context"):
            await client.block_status(0, 512)
        await client.close()


# --- batches of READs (pread_many_into) ----------------------------------------------------------


def pieces_of(buf: bytearray, offsets: list[int], n: int) -> list[tuple[memoryview, int]]:
    view = memoryview(buf)
    return [(view[i * n : (i + 1) * n], off) for i, off in enumerate(offsets)]


async def test_read_batch_lands_every_piece_from_out_of_order_replies(tmp_path: Path) -> None:
    arrived: list[int] = []

    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reqs = [await read_request(reader) for _ in range(5)]
        arrived.extend(r[3] for r in reqs)
        for _, _, cookie, offset, length in reversed(reqs):
            writer.write(data(cookie, offset, bytes([offset >> 16]) * length))
        _, _, cookie, offset, length = await read_request(reader)
        writer.write(data(cookie, offset, b"\x07" * length))

    async with server(tmp_path, after_go(transmission)) as uri:
        client = await connect(uri, max_in_flight=8)
        buf = bytearray(5 * 4096)
        offsets = [9 << 16, 2 << 16, 7 << 16, 4 << 16, 1 << 16]
        await client.pread_many_into(pieces_of(buf, offsets, 4096))
        assert arrived == offsets  # sent in order, one READ per piece
        assert [buf[i * 4096] for i in range(5)] == [9, 2, 7, 4, 1]
        assert buf == b"".join(bytes([o >> 16]) * 4096 for o in offsets)
        # Every slot came back with its reply.
        assert client._slots.free == 8
        assert await client.pread(0, 16) == b"\x07" * 16
        await client.close()


async def test_read_batch_error_fails_it_and_frees_every_slot(tmp_path: Path) -> None:
    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reqs = [await read_request(reader) for _ in range(3)]
        for i, (_, _, cookie, offset, length) in enumerate(reqs):
            if i == 1:
                writer.write(chunk(cookie, ReplyType.ERROR, wire.encode_error_payload(5, "bad")))
            else:
                writer.write(data(cookie, offset, b"x" * length))
            await writer.drain()
        _, _, cookie, offset, length = await read_request(reader)
        writer.write(data(cookie, offset, b"y" * length))

    async with server(tmp_path, after_go(transmission)) as uri:
        client = await connect(uri, max_in_flight=4)
        buf = bytearray(3 * 512)
        with pytest.raises(RequestError, match=r"EIO.*bad"):
            await client.pread_many_into(pieces_of(buf, [0, 512, 1024], 512))
        # The reply after the error still came (it frees its slot); the connection lives on.
        assert await client.pread(0, 8) == b"y" * 8
        assert client._slots.free == 4
        await client.close()


async def test_read_batch_cancelled_frees_slots_as_late_replies_land(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reqs = [await read_request(reader) for _ in range(2)]
        await release.wait()
        for _, _, cookie, offset, length in reqs:
            writer.write(data(cookie, offset, b"z" * length))
        _, _, cookie, offset, length = await read_request(reader)
        writer.write(data(cookie, offset, b"w" * length))

    async with server(tmp_path, after_go(transmission)) as uri:
        client = await connect(uri, max_in_flight=2)
        buf = bytearray(2 * 512)
        fut = client.pread_many_into(pieces_of(buf, [0, 512], 512))
        await asyncio.sleep(0.05)
        fut.cancel()
        # The server still owes both replies: their slots stay taken until they arrive.
        assert client._slots.free == 0
        release.set()
        # The next read waits for a slot, gets it when the late replies land (in ``buf``).
        assert await client.pread(4096, 8) == b"w" * 8
        assert buf == b"z" * 1024 and client._slots.free == 2
        await client.close()


async def test_read_batch_above_the_window_keeps_it_bounded(tmp_path: Path) -> None:
    seen: list[int] = []

    async with server(tmp_path, after_go(bursts(7, seen))) as uri:
        client = await connect(uri, max_in_flight=3)
        buf = bytearray(7 * 512)
        await client.pread_many_into(pieces_of(buf, [i * 512 for i in range(7)], 512))
        assert buf == b"".join(bytes([i]) * 512 for i in range(7))
        assert max(seen) == 3  # never more unanswered than the window
        assert client._slots.free == 3
        await client.close()


async def test_read_batch_eof_and_stall_fail_it(tmp_path: Path) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)

    async with server(tmp_path, after_go(hang_up)) as uri:
        client = await connect(uri)
        with pytest.raises(ConnectionLostError):
            await client.pread_many_into(pieces_of(bytearray(1024), [0, 512], 512))
        # Once the connection failed, a batch fails at once with the same error.
        with pytest.raises(ConnectionLostError):
            await client.pread_many_into(pieces_of(bytearray(512), [0], 512))
        await client.close()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with server(tmp_path, after_go(stall)) as uri:
        client = await connect(uri, timeout=0.3)
        with pytest.raises(NBDTimeoutError):
            await client.pread_many_into(pieces_of(bytearray(512), [0], 512))
        await client.close()


async def test_read_batch_refused_piece_fails_it_and_returns_its_slots(tmp_path: Path) -> None:
    async with server(tmp_path, after_go(replying(lambda c, o, n: data(c, o, b"q" * n)))) as uri:
        client = await connect(uri, max_in_flight=4)
        good = bytearray(512)
        with pytest.raises(UsageError, match="read-only"):
            await client.pread_many_into([(memoryview(good), 0), (memoryview(bytes(512)), 512)])
        with pytest.raises(UsageError, match="outside the export"):
            await client.pread_many_into([(memoryview(bytearray(512)), SIZE)])
        # The READ queued before the refused piece went out and its reply landed.
        assert await client.pread(0, 4) == b"q" * 4
        assert good == b"q" * 512 and client._slots.free == 4
        assert await client.pread_many_into([]) is None
        await client.close()


async def test_read_batch_waits_for_a_busy_window_without_a_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []

    async with server(tmp_path, after_go(bursts(6, seen))) as uri:
        client = await connect(uri, max_in_flight=2)
        first, second = bytearray(2 * 512), bytearray(4 * 512)
        a = client.pread_many_into(pieces_of(first, [0, 512], 512))
        # The window is full: the second batch waits for a slot, then each reply's slot
        # carries its next piece.
        b = client.pread_many_into(pieces_of(second, [i * 512 for i in range(2, 6)], 512))
        readers = [
            t for t in asyncio.all_tasks() if t.get_coro().__qualname__.startswith("NBDClient.")
        ]
        assert readers == []  # no Task per READ, and none to wait for the window
        await asyncio.gather(a, b)
        assert first == b"".join(bytes([i]) * 512 for i in range(2))
        assert second == b"".join(bytes([i]) * 512 for i in range(2, 6))
        assert max(seen) == 2 and client._slots.free == 2
        await client.close()
    # Slots are handed over in callbacks, whose exceptions asyncio would only log.
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


async def test_read_batch_waiting_for_a_slot_fails_when_the_connection_does(
    tmp_path: Path,
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(0.1)

    async with server(tmp_path, after_go(hang_up)) as uri:
        client = await connect(uri, max_in_flight=1)
        a = client.pread_many_into(pieces_of(bytearray(512), [0], 512))
        b = client.pread_many_into(pieces_of(bytearray(1024), [512, 1024], 512))
        for fut in (a, b):
            with pytest.raises(ConnectionLostError):
                await asyncio.wait_for(fut, 5)
        await client.close()


async def test_window_hands_a_cancelled_waiters_slot_on() -> None:
    from nbdcore.aio.client import _Window

    window = _Window(1, asyncio.get_running_loop())
    assert window.take_up_to(2) == 1 and window.take_up_to(1) == 0
    first = asyncio.ensure_future(window.take())
    second = asyncio.ensure_future(window.take())
    await asyncio.sleep(0)
    window.give(1)  # to ``first``, which is cancelled before it runs
    first.cancel()
    await asyncio.sleep(0)
    await asyncio.wait_for(second, 1)  # the slot went on to ``second``
    assert window.free == 0 and window.take_up_to(1) == 0
    window.give(1)
    assert window.take_up_to(3) == 1
