"""Hostile byte streams into the sans-I/O server, from every state.

Whatever the bytes, the server either answers (well-formed replies only) or fails the
connection with ClientProtocolError; never another exception, never a reply it cannot frame.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdcore import wire
from nbdcore.constants import IHAVEOPT, Cmd, CmdFlag, Opt
from nbdcore.exceptions import ClientProtocolError
from nbdcore.server import Request, ServerConnection, State
from tests.unit.test_server_support import (
    CTX_ALL,
    joined,
    new_conn,
    option_replies,
    parse_replies,
    start,
    transmission,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def options() -> st.SearchStrategy[bytes]:
    """Mostly-valid option requests with random payloads: deeper than random bytes."""
    name = st.sampled_from([b"", b"disk", b"ro", b"nope", b"\xff\xfe"])
    info = st.builds(
        lambda n, infos: (
            struct.pack(">I", len(n))
            + n
            + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos)
        ),
        name,
        st.lists(st.integers(0, 5), max_size=4),
    )
    query = st.sampled_from([b"base:", b"base:allocation", b"qemu:", b"qemu:dirty-bitmap:b0", b"x"])
    meta = st.builds(
        lambda n, qs: (
            struct.pack(">I", len(n))
            + n
            + struct.pack(">I", len(qs))
            + b"".join(struct.pack(">I", len(q)) + q for q in qs)
        ),
        name,
        st.lists(query, max_size=4),
    )
    payload = st.one_of(st.binary(max_size=40), info, meta, st.just(b""))
    option = st.one_of(st.sampled_from(list(Opt)), st.integers(0, 2**32 - 1))
    return st.builds(lambda o, p: wire.encode_option(o, p), option, payload)


def requests(extended: bool) -> st.SearchStrategy[bytes]:
    cmd = st.one_of(st.sampled_from([c for c in Cmd if c != Cmd.DISC]), st.integers(0, 0xFFFF))
    flags = st.one_of(
        st.sampled_from([0, CmdFlag.FUA, CmdFlag.DF, CmdFlag.REQ_ONE]), st.integers(0, 0xFFFF)
    )
    offset = st.one_of(st.integers(0, 5 << 20), st.integers(0, 2**64 - 1))
    length = st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1))

    def build(c: int, f: int, o: int, n: int, tail: bytes) -> bytes:
        if c == Cmd.WRITE or (extended and f & CmdFlag.PAYLOAD_LEN):
            n = min(n, 64)
            tail = bytes(n)  # keep the stream framed: the payload the header promises
        return wire.encode_request(f, c, 1, o, n, extended) + tail

    return st.builds(build, cmd, flags, offset, length, st.binary(max_size=8))


def feed(conn: ServerConnection, chunks: list[bytes]) -> None:
    """Feed chunks; only ClientProtocolError may escape, and then the connection is closed."""
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            for event in conn.events_received():
                if isinstance(event, Request):
                    answer(conn, event)
    except ClientProtocolError:
        assert conn.state is State.CLOSED


def hang_up(conn: ServerConnection) -> None:
    """EOF is acceptable in any state and leaves the connection closed (or disconnecting)."""
    conn.receive_eof()
    assert conn.state in (State.CLOSED, State.DISCONNECTING)


def answer(conn: ServerConnection, req: Request) -> None:
    if req.command == Cmd.READ:
        conn.reply_read(req, [req.length])
    elif req.command == Cmd.BLOCK_STATUS:
        conn.reply_block_status(req, [(cid, [req.length + 5], [1]) for cid, _ in req.contexts])
    else:
        conn.reply_ok(req)


@SETTINGS
@given(st.binary(max_size=200))
def test_random_client_flags_and_options(data: bytes) -> None:
    conn = new_conn()
    feed(conn, [data])
    if conn.state is State.OPTIONS:
        option_replies(joined(conn))  # whatever was answered is well framed
    hang_up(conn)


@SETTINGS
@given(st.lists(options(), max_size=8), st.binary(max_size=30))
def test_option_sequences(opts: list[bytes], tail: bytes) -> None:
    conn = start(tls_available=True)
    feed(conn, [*opts, tail])
    out = joined(conn)
    if conn.state in (State.OPTIONS, State.TLS_HANDSHAKE, State.CLOSED) and not conn.export:
        option_replies(out)
    if conn.state is State.TLS_HANDSHAKE:
        conn.tls_established()
        feed(conn, [wire.encode_option(Opt.LIST)])
    hang_up(conn)


@SETTINGS
@given(st.booleans(), st.booleans(), st.lists(st.binary(max_size=60), max_size=5))
def test_random_bytes_in_transmission(
    structured: bool, extended: bool, chunks: list[bytes]
) -> None:
    conn = transmission(structured, extended, contexts=CTX_ALL if structured else ())
    feed(conn, chunks)
    hang_up(conn)


@SETTINGS
@given(st.booleans(), st.data())
def test_request_sequences_get_framed_replies(extended: bool, data: st.DataObject) -> None:
    conn = transmission(True, extended, contexts=CTX_ALL)
    reqs = data.draw(st.lists(requests(extended), max_size=10))
    feed(conn, reqs)
    if conn.state is State.TRANSMISSION:
        parse_replies(joined(conn))  # every reply is well framed
        assert conn.in_flight == 0
    hang_up(conn)


def test_option_magic_and_huge_lengths() -> None:
    conn = start()
    feed(conn, [struct.pack(">QII", IHAVEOPT, Opt.GO, 2**32 - 1)])
    assert conn.state is State.CLOSED
