"""The sans-I/O client fed arbitrary server bytes in every state: during the greeting, with each
option pending, in transmission (simple, structured and extended replies) with each kind of
request in flight, and while disconnecting.

Whatever the bytes, the client produces well-typed events or fails the connection with
ServerProtocolError (UnsupportedServerError for an unsupported greeting), after which it stays
FAILED; end of file afterwards never raises; a reply never completes a request that was not
sent, and none completes twice.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdcore import wire
from nbdcore.client import (
    BlockStatusResult,
    ClientConnection,
    ClientState,
    ConnectionClosed,
    ExportReady,
    ExportsListed,
    Greeting,
    InfoReceived,
    MetaContextsListed,
    OptionAcked,
    OptionFailed,
    Reply,
)
from nbdcore.constants import (
    IHAVEOPT,
    NBD_EXTENDED_REPLY_MAGIC,
    NBD_REPLY_FLAG_DONE,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyType,
)
from nbdcore.exceptions import ServerProtocolError, UnsupportedServerError
from nbdcore.wire import BlockSize
from tests.fuzz.support import FUZZ, tried
from tests.unit.test_client_protocol import SIZE, negotiated

EVENTS = (
    Greeting,
    OptionAcked,
    OptionFailed,
    ExportsListed,
    MetaContextsListed,
    InfoReceived,
    ExportReady,
    BlockStatusResult,
    Reply,
    ConnectionClosed,
)


def feed(conn: ClientConnection, chunks: list[bytes], sent: set[int] | None = None) -> None:
    done: set[int] = set()
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            check(conn, done, sent)
    except (ServerProtocolError, UnsupportedServerError) as exc:
        assert conn.state is ClientState.FAILED, conn.state
        assert str(exc)
        # Sticky: more bytes raise the same failure, EOF is quiet.
        try:
            conn.receive_data(b"\0")
        except (ServerProtocolError, UnsupportedServerError):
            pass
        else:
            assert isinstance(exc, UnsupportedServerError)
    conn.receive_eof()
    check(conn, done, sent)
    conn.receive_eof()


def check(conn: ClientConnection, done: set[int], sent: set[int] | None) -> None:
    for event in conn.events_received():
        assert isinstance(event, EVENTS), event
        if isinstance(event, Reply):
            cookie = event.cookie
            assert sent is None or cookie in sent, f"reply for unsent cookie {cookie}"
            assert cookie not in done, f"cookie {cookie} completed twice"
            done.add(cookie)
    for piece in conn.data_to_send():
        assert isinstance(piece, (bytes, bytearray, memoryview))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [c for c in out if c]


# --- greeting ------------------------------------------------------------------------------

greetings = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda m1, m2, flags, tail: struct.pack(">QQH", m1, m2, flags) + tail,
        st.sampled_from([NBDMAGIC, 0, 2**64 - 1]),
        st.sampled_from([IHAVEOPT, 0x00420281861253, 0]),
        st.integers(0, 0xFFFF),
        st.binary(max_size=30),
    ),
)


@FUZZ
@given(greetings, st.lists(st.integers(0, 64), max_size=4))
def test_greeting(data: bytes, cuts: list[int]) -> None:
    tried("client.greeting")
    feed(ClientConnection(), split(data, cuts))


# --- negotiation ---------------------------------------------------------------------------

SENDERS: dict[str, Callable[[ClientConnection], None]] = {
    "go": lambda c: c.send_go("disk"),
    "info": lambda c: c.send_go("disk", info=True),
    "export_name": lambda c: c.send_export_name("disk"),
    "list": lambda c: c.send_list(),
    "starttls": lambda c: c.send_starttls(),
    "structured_reply": lambda c: c.send_structured_reply(),
    "extended_headers": lambda c: c.send_extended_headers(),
    "abort": lambda c: c.send_abort(),
    "list_meta_context": lambda c: c.send_list_meta_context("disk", ["base:"]),
    "set_meta_context": lambda c: c.send_set_meta_context("disk", ["base:allocation"]),
    "raw_option": lambda c: c.send_option(0x7777, b"xyz"),
}
PENDING = {
    "go": Opt.GO,
    "info": Opt.INFO,
    "export_name": Opt.EXPORT_NAME,
    "list": Opt.LIST,
    "starttls": Opt.STARTTLS,
    "structured_reply": Opt.STRUCTURED_REPLY,
    "extended_headers": Opt.EXTENDED_HEADERS,
    "abort": Opt.ABORT,
    "list_meta_context": Opt.LIST_META_CONTEXT,
    "set_meta_context": Opt.SET_META_CONTEXT,
    "raw_option": 0x7777,
}

name_text = st.sampled_from(["", "disk", "other", "base:allocation", "qemu:dirty-bitmap:b"])
info_payloads = st.one_of(
    st.builds(wire.encode_info_export, st.integers(0, 2**64 - 1), st.integers(0, 0xFFFF)),
    st.builds(lambda n: wire.encode_info_string(Info.NAME, n), name_text),
    st.builds(lambda n: wire.encode_info_string(Info.DESCRIPTION, n), name_text),
    st.builds(
        lambda a, b, c: wire.encode_info_block_size(BlockSize(a, b, c)),
        st.sampled_from([0, 1, 512, 4096, 3]),
        st.sampled_from([0, 512, 4096, 65536, 5]),
        st.sampled_from([0, 512, 2**25, 2**32 - 1]),
    ),
    st.builds(
        lambda k, b: struct.pack(">H", k) + b, st.integers(0, 0xFFFF), st.binary(max_size=16)
    ),
)
payloads = st.one_of(
    st.just(b""),
    st.binary(max_size=40),
    info_payloads,
    st.builds(wire.encode_rep_server, name_text, name_text),
    st.builds(wire.encode_rep_meta_context, st.integers(0, 2**32 - 1), name_text),
)
rep_types = st.one_of(st.sampled_from(list(Rep)), st.integers(0, 2**32 - 1))


def option_replies(pending: int) -> st.SearchStrategy[bytes]:
    option = st.one_of(st.just(pending), st.sampled_from(list(Opt)), st.integers(0, 2**32 - 1))
    one = st.builds(wire.encode_option_reply, option, rep_types, payloads)
    # Export-name answers are not option replies: size, flags and (maybe) 124 zeroes.
    export_name = st.builds(
        lambda size, flags, zeroes: wire.EXPORT_NAME_REPLY.pack(size, flags) + bytes(zeroes),
        st.integers(0, 2**64 - 1),
        st.integers(0, 0xFFFF),
        st.sampled_from([0, 124, 3]),
    )
    return st.lists(st.one_of(one, export_name, st.binary(max_size=24)), max_size=6).map(b"".join)


@pytest.mark.parametrize("kind", sorted(SENDERS))
@FUZZ
@given(
    hflags=st.sampled_from(
        [HandshakeFlag.FIXED_NEWSTYLE, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES]
    ),
    data=st.data(),
)
def test_option_replies(kind: str, hflags: int, data: st.DataObject) -> None:
    tried(f"client.option.{kind}")
    conn = ClientConnection()
    conn.receive_data(wire.encode_greeting(hflags))
    conn.events_received()
    conn.data_to_send()
    SENDERS[kind](conn)
    replies = data.draw(option_replies(PENDING[kind]))
    cuts = data.draw(st.lists(st.integers(0, 200), max_size=3))
    feed(conn, split(replies, cuts))
    if conn.state is ClientState.TLS_UPGRADE:
        # Cleartext where the TLS handshake should be: refused, never parsed as options.
        conn.tls_established()
        assert conn.state is ClientState.NEGOTIATING


# --- transmission --------------------------------------------------------------------------

CONTEXTS = {"base:allocation": 1, "qemu:dirty-bitmap:b": 2}


def chunks(cookies: list[int], extended: bool) -> st.SearchStrategy[bytes]:
    cookie = st.one_of(st.sampled_from(cookies), st.integers(0, 2**64 - 1))
    flags = st.sampled_from([0, NBD_REPLY_FLAG_DONE, 0xFFFF])
    rtype = st.one_of(st.sampled_from(list(ReplyType)), st.integers(0, 0xFFFF))
    offset = st.one_of(st.integers(0, 1 << 20), st.integers(0, 2**64 - 1))
    payload = st.one_of(
        st.binary(max_size=48),
        st.builds(lambda o, d: wire.OFFSET.pack(o) + d, offset, st.binary(max_size=64)),
        st.builds(lambda o, n: wire.OFFSET_HOLE.pack(o, n), offset, st.integers(0, 2**32 - 1)),
        st.builds(lambda o, n: wire.OFFSET_HOLE_EXT.pack(o, n), offset, st.integers(0, 2**64 - 1)),
        st.builds(
            wire.encode_error_payload,
            st.integers(0, 200),
            st.text(max_size=10),
            st.one_of(st.none(), offset),
        ),
        st.builds(
            lambda cid, ext, e: wire.encode_block_status(cid, e, ext),
            st.sampled_from([1, 2, 3]),
            st.booleans(),
            st.lists(
                st.tuples(st.integers(0, 1 << 21), st.integers(0, 2**32 - 1)),
                min_size=0,
                max_size=5,
            ),
        ),
    )

    def header(f: int, t: int, c: int, p: bytes, lie: int | None, magic: int) -> bytes:
        n = len(p) if lie is None else lie
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            return wire.SIMPLE_REPLY.pack(magic, f, c) + p
        if extended or magic == NBD_EXTENDED_REPLY_MAGIC:
            return wire.EXTENDED_REPLY.pack(NBD_EXTENDED_REPLY_MAGIC, f, t, c, 0, n) + p
        return wire.STRUCTURED_REPLY.pack(magic, f, t, c, n % 2**32) + p

    magic = st.sampled_from(
        [NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC, NBD_EXTENDED_REPLY_MAGIC, 0x12345678]
    )
    lie = st.one_of(st.none(), st.none(), st.integers(0, 2**32 - 1))
    return st.builds(header, flags, rtype, cookie, payload, lie, magic)


@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
@FUZZ
@given(data=st.data())
def test_replies_in_transmission(mode: str, data: st.DataObject) -> None:
    tried(f"client.transmission.{mode}")
    structured = mode != "simple"
    extended = mode == "extended"
    conn = negotiated(
        structured=structured, extended=extended, contexts=CONTEXTS if structured else None
    )
    sent: set[int] = set()
    requests = data.draw(
        st.lists(
            st.sampled_from(["read", "write", "flush", "trim", "zero", "cache", "status", "disc"]),
            min_size=1,
            max_size=5,
        )
    )
    for kind in requests:
        if conn.state is not ClientState.TRANSMISSION:
            break
        off = data.draw(st.integers(0, SIZE - 4096))
        if kind == "read":
            sent.add(conn.send_read(off, data.draw(st.integers(1, 64))))
        elif kind == "write":
            sent.add(conn.send_write(off, b"x" * 8))
        elif kind == "flush":
            sent.add(conn.send_flush())
        elif kind == "trim":
            sent.add(conn.send_trim(off, 4096))
        elif kind == "zero":
            sent.add(conn.send_write_zeroes(off, 4096))
        elif kind == "cache":
            sent.add(conn.send_cache(off, 4096))
        elif kind == "status" and structured:
            sent.add(conn.send_block_status(off, data.draw(st.integers(1, SIZE - off))))
        elif kind == "disc":
            conn.send_disc()
    conn.data_to_send()
    replies = data.draw(st.lists(chunks(sorted(sent) or [1], extended), max_size=6))
    tail = data.draw(st.binary(max_size=16))
    cuts = data.draw(st.lists(st.integers(0, 400), max_size=3))
    feed(conn, split(b"".join(replies) + tail, cuts), sent)
